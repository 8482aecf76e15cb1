"""IndexConfig: every option of `clipsearch index`, validated before any work starts."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from clipsearch.distribute import DistributorConfig
from clipsearch.errors import ConfigError

INPUT_FORMATS = ("auto", "embeddings", "npy", "parquet")
METRICS = ("ip",)
ROTATIONS = ("auto", "none", "pca-balanced")

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(text: str | int) -> int:
    """'4G', '64MB', '512k', '1.5G' or a byte count -> bytes (binary multiples, as autofaiss)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTkmgt]?)[iI]?[bB]?\s*", str(text))
    if not m:
        raise ConfigError(f"cannot read memory size {text!r}", hint="--max-index-memory-usage 4G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_memory(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f}{unit}".replace(".0" + unit, unit)
    return f"{n}B"


@dataclass(frozen=True)
class IndexConfig:
    """What to index, under which budget, and how to tune it. See docs/index.md."""

    embeddings_folder: str
    index_folder: str
    input_format: str = "auto"  # auto: an embed-stage folder, or a folder of only .npy or only parquet
    max_index_memory_usage: str | int = "4G"
    max_index_query_time_ms: float = 10.0
    min_recall: float | None = None
    index_key: str | None = None
    embedding_column: str | None = None  # None: `embedding`, else the parquet's one list column
    metric_type: str = "ip"
    nb_cores: int | None = None
    max_train_points: int | None = None  # None: enough for the plan's IVF lists (plan.train_points)
    tuning_queries: str | None = None
    clip_model: str | None = None  # the model of bare embeddings: its text tower encodes tuning prompts
    should_be_memory_mappable: bool = False
    rotation: str = "auto"  # auto: decided on the training sample (index/rotation.py); none; pca-balanced
    text_index: bool = (
        True  # a keyword (BM25) index of the captions beside the faiss indices (clipsearch.keywords)
    )
    n_tuning_queries: int = 1000
    batch_rows: int = 65536
    seed: int = 0
    progress: bool = True
    distributor: DistributorConfig = field(default_factory=DistributorConfig)

    def __post_init__(self) -> None:
        if not self.embeddings_folder:
            raise ConfigError("an embeddings folder is required", hint="--embeddings-folder")
        if not self.index_folder:
            raise ConfigError("an index folder is required", hint="--index-folder")
        if self.input_format not in INPUT_FORMATS:
            raise ConfigError(
                f"unknown input format {self.input_format!r}",
                hint="--input-format " + "|".join(INPUT_FORMATS),
            )
        if self.metric_type not in METRICS:
            raise ConfigError(
                f"metric {self.metric_type!r} is not supported: embeddings are L2-normalised and searched "
                "by inner product",
                hint="--metric-type ip",
            )
        if parse_memory(self.max_index_memory_usage) <= 0:
            raise ConfigError("the memory budget must be positive", hint="--max-index-memory-usage")
        if not self.max_index_query_time_ms > 0:
            raise ConfigError("the query time budget must be positive", hint="--max-index-query-time-ms")
        if self.min_recall is not None and not 0 < self.min_recall <= 1:
            raise ConfigError(f"min recall must be in (0, 1], got {self.min_recall}", hint="--min-recall")
        if self.nb_cores is not None and self.nb_cores < 1:
            raise ConfigError(f"nb cores must be >= 1, got {self.nb_cores}", hint="--nb-cores")
        if self.max_train_points is not None and self.max_train_points < 1000:
            raise ConfigError("train on at least 1000 points", hint="--max-train-points")
        if self.n_tuning_queries < 10:
            raise ConfigError("tune on at least 10 queries")
        if self.batch_rows < 1:
            raise ConfigError("batch_rows must be >= 1")
        if self.index_key is not None and not self.index_key.strip():
            raise ConfigError("an empty index key", hint="--index-key 'IVF1024,PQ64x4fs,Refine(SQ8)'")
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"unknown rotation {self.rotation!r}", hint="--rotation " + "|".join(ROTATIONS))
        if self.tuning_queries is not None and not self.tuning_queries.endswith(".npy"):
            raise ConfigError("tuning queries must be a .npy file", hint="--tuning-queries FILE.npy")

    @property
    def budget_bytes(self) -> int:
        return parse_memory(self.max_index_memory_usage)

    @property
    def threads(self) -> int:
        return self.nb_cores or os.cpu_count() or 1
