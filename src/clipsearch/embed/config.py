"""The embed stage's options: one frozen dataclass, validated on construction. Names follow clip-retrieval."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from clipsearch.distribute import DistributorConfig
from clipsearch.embed.backends.choice import PRECISIONS, check_pair
from clipsearch.errors import ConfigError

INPUT_FORMATS = ("webdataset", "parquet", "files", "tfrecord", "images")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MODEL = (
    "clipsearch-tiny"  # == clipsearch.embed.models.DEFAULT_MODEL (kept here so config needs no torch)
)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class EmbedConfig:
    """Everything `embed()` needs.

    batch_size: images per model call. 0 picks 256 on GPU and 64 on CPU.
    num_prepro_workers: decode/resize processes. 0 decodes in a thread of the main process (small jobs);
        None picks: on CPU one per four cores (at least one; the model needs the cores), on GPU all cores but one.
    shards_per_part: input shards per output part (the unit of work and of resuming).
    write_batch_size: if set, the samples per part instead: shards are grouped by their size from
        the download stats, and a plain image folder is cut into parts of this many images.
    num_threads: torch threads on CPU; 0 = every core this process may use.
    backend: auto (the fastest installed for the device), torch, openvino or onnx; `precision` then says which
        of fp32, bf16, int8 (fp16: torch on GPU) it runs.
    """

    input_dataset: str
    output_folder: str
    input_format: str | None = None
    clip_model: str = DEFAULT_MODEL
    batch_size: int = 0
    num_prepro_workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    backend: str = "auto"
    enable_text: bool = True
    enable_image: bool = True
    compile: bool = False
    shards_per_part: int = 1
    write_batch_size: int | None = None
    num_threads: int = 0
    progress: bool = True
    distributor: DistributorConfig = field(default_factory=DistributorConfig)

    def __post_init__(self) -> None:
        if not self.input_dataset:
            raise ConfigError("no input dataset given", hint="--input-dataset")
        if not self.output_folder:
            raise ConfigError("no output folder given", hint="--output-folder")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise ConfigError(
                f"unknown input format {self.input_format!r}",
                hint="--input-format " + "|".join(INPUT_FORMATS),
            )
        if not self.clip_model:
            raise ConfigError("no model given", hint="--clip-model")
        if self.batch_size < 0:
            raise ConfigError(
                f"batch size must be >= 1 (or 0 for auto), got {self.batch_size}", hint="--batch-size"
            )
        if self.num_prepro_workers is not None and self.num_prepro_workers < 0:
            raise ConfigError(
                f"num_prepro_workers must be >= 0, got {self.num_prepro_workers}", hint="--num-prepro-workers"
            )
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}", hint="--device auto|cpu|cuda")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {self.precision!r}", hint="--precision " + "|".join(PRECISIONS)
            )
        check_pair(self.backend, self.precision)
        if not (self.enable_text or self.enable_image):
            raise ConfigError(
                "nothing to compute: both text and image embeddings are disabled", hint="--enable-image"
            )
        if self.shards_per_part < 1:
            raise ConfigError(
                f"shards_per_part must be >= 1, got {self.shards_per_part}", hint="--shards-per-part"
            )
        if self.write_batch_size is not None and self.write_batch_size < 1:
            raise ConfigError(
                f"write_batch_size must be >= 1, got {self.write_batch_size}", hint="--write-batch-size"
            )
        if self.num_threads < 0:
            raise ConfigError(f"num_threads must be >= 0, got {self.num_threads}", hint="--num-threads")

    def resolved_batch_size(self, device: str) -> int:
        if self.batch_size:
            return self.batch_size
        return 256 if device.startswith("cuda") else 64

    def resolved_workers(self, device: str) -> int:
        if self.num_prepro_workers is not None:
            return self.num_prepro_workers
        n = cpu_count()
        if device.startswith("cuda"):
            return max(1, min(n - 1, 16))
        return max(1, n // 4)

    def resolved_threads(self) -> int:
        return self.num_threads or cpu_count()
