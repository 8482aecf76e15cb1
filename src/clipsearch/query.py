"""Batch retrieval: prompts or query embeddings -> one parquet row per hit (formats.md section 4).

`query(QueryConfig(index="out/index", prompts="prompts.txt", output="hits.parquet", k=10))` encodes the
prompts with the index's model (or `clip_model`), searches (with an optional metadata filter, planned the
same way as the server does) and streams the hits into parquet, written atomically.
"""

from __future__ import annotations

import io
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch import storage
from clipsearch.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

BASE_SCHEMA = [
    ("query", pa.string()),
    ("rank", pa.int32()),
    ("id", pa.int64()),
    ("url", pa.string()),
    ("caption", pa.string()),
    ("similarity", pa.float32()),
]
KEYWORD_SCHEMA = [("score", pa.float32()), ("keyword_score", pa.float32())]  # keyword and hybrid modes


@dataclass(frozen=True)
class QueryConfig:
    index: str
    output: str
    prompts: str | None = (
        None  # text file, one prompt per line (or .parquet/.csv/.jsonl with a `prompt`/`text` column)
    )
    embeddings: str | None = None  # .npy [n, dim]
    k: int = 10
    modality: str = "image"
    filter: str | None = None
    columns: tuple[str, ...] = ()
    clip_model: str | None = None
    device: str = "cpu"
    backend: str = "auto"  # what runs the model for prompts: auto|torch|openvino|onnx
    precision: str = "auto"
    batch_size: int = 256
    nprobe: int | None = None
    efSearch: int | None = None
    mode: str = "semantic"  # semantic (CLIP) | keyword (BM25 over captions) | hybrid (both, ranked as one)
    fusion: str = "weighted"  # hybrid: weighted | rrf (clipsearch.search.hybrid)
    #: encode the prompts with this multilingual text encoder (clipsearch.embed.multilingual) instead
    multilingual_model: str | None = None
    #: nudge every query toward the images rated at this score (0-9), as serve's aesthetic_score does
    aesthetic_score: int | None = None
    aesthetic_weight: float = 0.5
    aesthetic_embeddings: str | None = None  # default: the index folder's aesthetic_embeddings.npy
    overwrite: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.columns))
        if (self.prompts is None) == (self.embeddings is None):
            raise ConfigError(
                "give exactly one of prompts and embeddings", hint="--prompts FILE or --embeddings FILE.npy"
            )
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}", hint="-k 10")
        if self.modality not in ("image", "text"):
            raise ConfigError(
                f"modality must be image or text, got {self.modality!r}", hint="--modality image"
            )
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.mode not in ("semantic", "keyword", "hybrid"):
            raise ConfigError(f"mode must be semantic, keyword or hybrid, got {self.mode!r}", hint="--mode")
        if self.fusion not in ("weighted", "rrf"):
            raise ConfigError(f"fusion must be weighted or rrf, got {self.fusion!r}", hint="--fusion")
        if self.mode != "semantic" and self.prompts is None:
            raise ConfigError(
                f"--mode {self.mode} searches caption keywords: it needs --prompts",
                hint="--prompts FILE, or --mode semantic with --embeddings",
            )
        if self.multilingual_model is not None and self.prompts is None:
            raise ConfigError(
                "--multilingual-model encodes prompts: it needs --prompts", hint="--prompts FILE"
            )
        from clipsearch.aesthetic.table import check_request

        try:
            check_request(
                self.aesthetic_score, self.aesthetic_weight,
                score_field="--aesthetic-score", weight_field="--aesthetic-weight",
            )  # fmt: skip
        except InputError as e:
            raise ConfigError(str(e), hint="--aesthetic-score 0..9 --aesthetic-weight 0.5") from None
        from clipsearch.embed.backends.choice import check_pair

        check_pair(self.backend, self.precision)
        if not self.output.endswith(".parquet"):
            raise ConfigError(f"output {self.output} must end with .parquet", hint="--output FILE.parquet")
        if not self.overwrite and storage.exists(self.output):
            raise ConfigError(f"output {self.output} exists", hint="remove it or choose another --output")


def read_bytes(path: str, what: str, hint: str) -> bytes:
    """The whole input: `-` is standard input; a local path is read with plain `open` (so a pipe or a
    process substitution such as `<(...)`, which cannot seek, works too); other URLs go through fsspec."""
    if path == "-":
        return sys.stdin.buffer.read()
    local = path[len("file://") :] if path.startswith("file://") else (path if "://" not in path else None)
    if local is not None:
        if not os.path.exists(local):
            raise InputError(f"{what} {path} does not exist", hint=hint)
        if os.path.isdir(local):
            raise InputError(f"{what} {path} is a folder, not a file", hint=hint)
        try:
            with open(local, "rb") as f:
                return f.read()
        except OSError as e:
            raise InputError(f"{what} {path} cannot be read: {e.strerror or e}", hint=hint) from e
    if not storage.exists(path):
        raise InputError(f"{what} {path} does not exist", hint=hint)
    fs, p = storage.get_fs(path)
    with fs.open(p, "rb") as f:
        return f.read()


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line), or parquet/csv/jsonl with a prompt/text/caption/query column;
    `-` reads text lines from standard input."""
    hint = "--prompts FILE, or - for standard input"
    if path != "-" and "://" not in path and not os.path.exists(path) and " " in path and os.sep not in path:
        # `--prompts "a red circle"`: a prompt given where a file is expected
        hint = f"to search for this text: echo {shlex.quote(path)} | clipsearch query --prompts - ..."
    data = read_bytes(path, "prompts file", hint)
    if path.endswith((".parquet", ".csv", ".jsonl", ".json")):
        import pyarrow.csv as pacsv
        import pyarrow.json as pajson

        buf = pa.BufferReader(data)
        try:
            if path.endswith(".parquet"):
                table = pq.read_table(buf)
            elif path.endswith(".csv"):
                table = pacsv.read_csv(buf)
            else:
                table = pajson.read_json(buf)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{path} could not be read: {e}") from e
        for col in ("prompt", "text", "caption", "query"):
            if col in table.column_names:
                return [str(x) if x is not None else "" for x in table.column(col).to_pylist()]
        raise InputError(f"{path} has no prompt, text, caption or query column")
    text = data.decode("utf-8", errors="replace")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        where = "standard input" if path == "-" else f"prompts file {path}"
        raise InputError(f"{where} holds no prompt", hint="--prompts FILE with one prompt per line")
    return prompts


def read_embeddings(path: str) -> np.ndarray:
    data = read_bytes(path, "embeddings file", "--embeddings FILE.npy, or - for standard input")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path} is not a readable .npy file: {e}") from e
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise InputError(f"{path} must hold a [n, dim] array, got shape {arr.shape}")
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{path} holds non-finite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, 1e-12)


def query(cfg: QueryConfig, encoder: Any = None) -> dict[str, Any]:
    """Run the batch retrieval; returns counts. `encoder` replaces the model (tests)."""
    from clipsearch.search.live import open_index
    from clipsearch.search.searcher import SearchParams

    t0 = time.perf_counter()
    searcher = open_index(cfg.index)  # every visible segment of an appended-to index
    try:
        missing = [c for c in cfg.columns if not searcher.metadata.has_column(c)]
        if missing:
            raise ConfigError(
                f"unknown column(s) {', '.join(missing)}",
                hint="--columns among " + ", ".join(searcher.metadata.columns),
            )
        searcher.modality(cfg.modality)
        if cfg.mode != "semantic":
            from clipsearch.search.searcher import require_keywords

            try:
                require_keywords(searcher)
            except InputError as e:
                raise ConfigError(str(e).split(" (fix:")[0], hint=e.hint) from None
        if cfg.prompts is not None:
            labels = read_prompts(cfg.prompts)
            if encoder is None and cfg.mode != "keyword" and cfg.multilingual_model is not None:
                from clipsearch.embed.multilingual import load_text_encoder

                encoder = load_text_encoder(cfg.multilingual_model, device=cfg.device)
            if encoder is None and cfg.mode != "keyword":
                from clipsearch.embed.models import load_clip

                encoder = load_clip(
                    cfg.clip_model or searcher.model or "clipsearch-tiny",
                    device=cfg.device,
                    backend=cfg.backend,
                    precision=cfg.precision,
                    lazy_towers=("image",),  # prompts need the text tower only
                )
            if encoder is not None and int(encoder.dim) != searcher.dim:
                raise ConfigError(
                    f"model {getattr(encoder, 'name', '?')} makes {encoder.dim}-d vectors, the index holds {searcher.dim}-d",
                    hint="--clip-model with the index's model",
                )
            vectors = None
        else:
            vectors = read_embeddings(cfg.embeddings or "")
            if vectors.shape[1] != searcher.dim:
                raise InputError(
                    f"{cfg.embeddings} has dimension {vectors.shape[1]}, the index has {searcher.dim}"
                )
            labels = [str(i) for i in range(len(vectors))]
        nudge = _aesthetic_nudge(cfg, searcher.dim)
        bitmap = searcher.filter_bitmap(cfg.filter) if cfg.filter else None
        pieces = None  # the model's tokenizer tells hybrid the words it knows from names
        if cfg.mode == "hybrid" and callable(getattr(encoder, "tokenize", None)):
            from clipsearch.search.hybrid import WordPieces

            pieces = WordPieces(encoder.tokenize)
        params = SearchParams(nprobe=cfg.nprobe, efSearch=cfg.efSearch)
        meta_cols = [c for c in ("url", "caption") if searcher.metadata.has_column(c)]
        extra_cols = [
            c for c in cfg.columns if c not in ("query", "rank", "id", "url", "caption", "similarity")
        ]
        keyword_cols = KEYWORD_SCHEMA if cfg.mode != "semantic" else []
        fields = (
            list(BASE_SCHEMA) + keyword_cols + [(c, searcher.metadata.column_type(c)) for c in extra_cols]
        )
        schema = pa.schema(fields)
        hits = 0
        with storage.atomic_open(cfg.output, "wb") as f:
            writer = pq.ParquetWriter(f, schema)
            for start in range(0, len(labels), cfg.batch_size):
                batch_labels = labels[start : start + cfg.batch_size]
                if cfg.mode == "keyword":
                    q = None
                elif vectors is None:
                    q = np.asarray(encoder.encode_text(batch_labels), dtype=np.float32)
                else:
                    q = vectors[start : start + cfg.batch_size]
                if nudge is not None and q is not None:
                    q = np.stack([nudge(v) for v in q])
                extra: dict[str, Any] = {}
                if cfg.mode == "semantic":
                    assert q is not None
                    res = searcher.search(q, cfg.k, modality=cfg.modality, filter=bitmap, params=params)
                    qi, rank = np.nonzero(res.ids >= 0)
                    ids = res.ids[qi, rank]
                    sims = res.distances[qi, rank]
                else:
                    qi, rank, ids, sims, score, kw = _keyword_batch(
                        searcher, cfg, batch_labels, q, bitmap, params, pieces
                    )
                    extra = {"score": score, "keyword_score": kw}
                rows = searcher.rows(ids, meta_cols + extra_cols)
                cols: dict[str, Any] = {
                    "query": [batch_labels[i] for i in qi],
                    "rank": rank.astype(np.int32),
                    "id": ids.astype(np.int64),
                    "url": [r.get("url") for r in rows],
                    "caption": [r.get("caption") for r in rows],
                    "similarity": sims.astype(np.float32),
                    **extra,
                }
                for c in extra_cols:
                    cols[c] = [r.get(c) for r in rows]
                writer.write_table(pa.table(cols, schema=schema))
                hits += len(ids)
            writer.close()
    finally:
        searcher.close()
    secs = time.perf_counter() - t0
    logger.info("query: %d queries, %d hits -> %s in %.1fs", len(labels), hits, cfg.output, secs)
    return {"queries": len(labels), "hits": hits, "output": cfg.output, "seconds": secs}


def _keyword_batch(
    searcher: Any, cfg: QueryConfig, labels: list[str], q: np.ndarray | None, bitmap, params, pieces=None
):
    """Keyword or hybrid hits of a batch of prompts, flattened like the semantic ones (similarity NaN in
    keyword mode: no query vector)."""
    from clipsearch.keywords.query import parse
    from clipsearch.search import hybrid

    parts: list[tuple[int, Any]] = []
    for i, label in enumerate(labels):
        kq = parse(label)
        if cfg.mode == "keyword":
            r = hybrid.keyword_search(searcher, kq, cfg.k, vec=None, modality=cfg.modality, filter=bitmap)
        else:
            assert q is not None
            r = hybrid.hybrid_search(
                searcher,
                q[i],
                kq,
                cfg.k,
                modality=cfg.modality,
                filter=bitmap,
                params=params,
                fusion=cfg.fusion,
                pieces=pieces,
            )
        parts.append((i, r))
    qi = (
        np.concatenate([np.full(len(r.ids), i, np.int64) for i, r in parts])
        if parts
        else np.zeros(0, np.int64)
    )
    rank = np.concatenate([np.arange(len(r.ids)) for _, r in parts]) if parts else np.zeros(0, np.int64)

    def cat(attr: str, dtype: Any) -> np.ndarray:
        return (
            np.concatenate([getattr(r, attr) for _, r in parts]).astype(dtype)
            if parts
            else np.zeros(0, dtype)
        )

    return (
        qi,
        rank,
        cat("ids", np.int64),
        cat("similarity", np.float32),
        cat("score", np.float32),
        cat("keyword", np.float32),
    )


def _aesthetic_nudge(cfg: QueryConfig, dim: int) -> Any:
    """The per-query nudge toward cfg.aesthetic_score, or None when none is asked."""
    if cfg.aesthetic_score is None:
        return None
    from clipsearch.aesthetic.table import find_table, load_table, nudge

    path = cfg.aesthetic_embeddings or find_table(cfg.index)
    if path is None:
        raise ConfigError(
            f"{cfg.index} has no aesthetic embeddings",
            hint="clipsearch aesthetic --index DIR --predictor FILE, or --aesthetic-embeddings FILE",
        )
    table = load_table(path)
    if table.shape[1] != dim:
        raise ConfigError(f"aesthetic embeddings {path} are {table.shape[1]}-d, the index {dim}-d")
    score, weight = int(cfg.aesthetic_score), float(cfg.aesthetic_weight)
    return lambda v: nudge(v, table, score, weight)
