"""Streamed embedding batches from an embed-stage folder, a folder of .npy files, or parquet files.

Listing a source reads only headers (npy) or footers (parquet), so the bad-input checks (empty
folder, mismatched dimensions, misaligned parts) run before any work starts. Reading yields float32
batches of at most `batch_rows` rows: RAM stays bounded whatever the vector count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from clipsearch import storage
from clipsearch.errors import InputError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One input part: aligned embedding files (one per modality) and optional metadata."""

    name: str
    files: tuple[tuple[str, str], ...]  # (modality, path)
    rows: int
    metadata: str | None = None

    def path(self, modality: str) -> str:
        return dict(self.files)[modality]


@dataclass(frozen=True)
class Source:
    fmt: str  # "npy" or "parquet" (file format of the embedding files)
    dim: int
    parts: tuple[Part, ...]
    modalities: tuple[str, ...]
    column: str = "embedding"
    model: str | None = None
    dtype: str = "float32"

    @property
    def total_rows(self) -> int:
        return sum(p.rows for p in self.parts)


# ---------------------------------------------------------------- headers


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an open .npy file."""
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), np.dtype(dtype), bool(fortran), f.tell()


def npy_shape(path: str) -> tuple[tuple[int, ...], np.dtype]:
    fs, p = storage.get_fs(path)
    try:
        with fs.open(p, "rb") as f:
            shape, dtype, _, _ = _npy_header(f)
    except (ValueError, OSError, SyntaxError) as e:
        raise InputError(f"{path} is not a readable .npy file: {e}") from e
    return shape, dtype


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    fs, p = storage.get_fs(path)
    return pq.ParquetFile(fs.open(p, "rb"))


def parquet_shape(path: str, column: str) -> tuple[int, int]:
    """(rows, dim) of a parquet file's embedding column, reading the footer and its first row."""
    try:
        pf = _parquet_file(path)
    except Exception as e:
        raise InputError(f"{path} is not a readable parquet file: {e}") from e
    if column not in pf.schema_arrow.names:
        raise InputError(
            f"{path} has no column {column!r} (columns: {', '.join(pf.schema_arrow.names)})",
            hint="--embedding-column",
        )
    rows = pf.metadata.num_rows
    if rows == 0:
        return 0, 0
    first = next(pf.iter_batches(batch_size=1, columns=[column]))
    return rows, len(first.column(0)[0])


# ---------------------------------------------------------------- listing


def _list(folder: str, suffix: str) -> list[str]:
    return [p for p in storage.listdir(folder, suffix) if not p.rsplit("/", 1)[-1].startswith(".")]


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def detect_input(folder: str, input_format: str, column: str | None) -> tuple[str, str]:
    """(input format, embedding column) of a folder, for `--input-format auto` and an unset column.

    An embed-stage folder has `img_emb/`; otherwise a folder holding only `.npy` files is `npy`, and
    one holding only parquet files is `parquet`, its embedding column being `embedding` or else the
    one list/array column. Anything ambiguous is one error line naming the option to set."""
    if not storage.exists(folder):
        raise InputError(f"the embeddings folder {folder} does not exist", hint="--embeddings-folder")
    fmt = input_format
    if fmt == "auto":
        if _list(storage.join(folder, "img_emb"), ".npy"):
            fmt = "embeddings"
        else:
            npys, pqs = _list(folder, ".npy"), _list(folder, ".parquet")
            if npys and pqs:
                raise InputError(
                    f"{folder} holds both .npy and parquet files: say which to index",
                    hint="--input-format npy|parquet",
                )
            if not npys and not pqs:
                raise InputError(
                    f"no embeddings in {folder}: expected an embed-stage folder (img_emb/), .npy files or "
                    "parquet files",
                    hint="--embeddings-folder",
                )
            fmt = "npy" if npys else "parquet"
        logger.info("input format of %s: %s", folder, fmt)
    if fmt != "parquet" or column:
        return fmt, column or "embedding"
    files = _list(folder, ".parquet")
    if not files:
        raise InputError(f"no .parquet files in {folder}", hint="--input-format")
    try:
        schema = _parquet_file(files[0]).schema_arrow
    except Exception as e:
        raise InputError(f"{files[0]} is not a readable parquet file: {e}") from e
    if "embedding" in schema.names:
        return fmt, "embedding"
    import pyarrow as pa

    vectors = [
        f.name
        for f in schema
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type)
    ]
    if len(vectors) != 1:
        what = f"{len(vectors)} list columns ({', '.join(vectors)})" if vectors else "no list column"
        raise InputError(f"{files[0]} has {what}: say which holds the embeddings", hint="--embedding-column")
    logger.info("embedding column of %s: %s", folder, vectors[0])
    return fmt, vectors[0]


def open_source(folder: str, input_format: str, column: str = "embedding") -> Source:
    """List and check the input parts. Raises InputError before any work when the input is bad."""
    if not storage.exists(folder):
        raise InputError(f"the embeddings folder {folder} does not exist", hint="--embeddings-folder")
    if input_format == "auto" or column is None:
        input_format, column = detect_input(folder, input_format, column)
    if input_format == "embeddings":
        return _open_embeddings(folder)
    if input_format == "npy":
        files = _list(folder, ".npy")
        if not files:
            raise InputError(f"no .npy files in {folder}", hint="--input-format")
        parts = []
        dims: dict[str, int] = {}
        for f in files:
            shape, dtype = npy_shape(f)
            if len(shape) != 2:
                raise InputError(f"{f} holds an array of shape {shape}, expected [rows, dim]")
            dims[f] = shape[1]
            parts.append(Part(_stem(f), (("image", f),), shape[0]))
        dim = _check_dims(dims)
        return Source("npy", dim, tuple(parts), ("image",), column)
    if input_format == "parquet":
        files = _list(folder, ".parquet")
        if not files:
            raise InputError(f"no .parquet files in {folder}", hint="--input-format")
        parts, dims = [], {}
        for f in files:
            rows, d = parquet_shape(f, column)
            if rows:
                dims[f] = d
            parts.append(Part(_stem(f), (("image", f),), rows))
        if not dims:
            raise InputError(f"every parquet file in {folder} is empty")
        return Source("parquet", _check_dims(dims), tuple(parts), ("image",), column)
    raise InputError(f"unknown input format {input_format!r}", hint="--input-format")


def _check_dims(dims: dict[str, int]) -> int:
    values = sorted(set(d for d in dims.values()))
    if len(values) > 1:
        by_dim = {d: next(f for f, x in dims.items() if x == d) for d in values}
        detail = ", ".join(f"{f}: {d}" for d, f in by_dim.items())
        raise InputError(f"parts have mismatched dimensions ({detail})")
    if not values or values[0] < 1:
        raise InputError("embeddings have dimension 0")
    return values[0]


def _open_embeddings(folder: str) -> Source:
    img_dir = storage.join(folder, "img_emb")
    img_files = _list(img_dir, ".npy")
    if not img_files:
        if _list(folder, ".npy"):
            raise InputError(f"{folder} has no img_emb/ but holds .npy files", hint="--input-format npy")
        if _list(folder, ".parquet"):
            raise InputError(
                f"{folder} has no img_emb/ but holds parquet files", hint="--input-format parquet"
            )
        raise InputError(f"no embeddings in {folder} (expected img_emb/*.npy)", hint="--embeddings-folder")
    text = {_stem(p): p for p in _list(storage.join(folder, "text_emb"), ".npy")}
    meta = {_stem(p): p for p in _list(storage.join(folder, "metadata"), ".parquet")}
    with_text = bool(text)
    manifest_path = storage.join(folder, "manifest.json")
    manifest = storage.read_json(manifest_path) if storage.exists(manifest_path) else {}
    parts, dims = [], {}
    for f in img_files:
        name = _stem(f)
        shape, _ = npy_shape(f)
        if len(shape) != 2:
            raise InputError(f"{f} holds an array of shape {shape}, expected [rows, dim]")
        dims[f] = shape[1]
        files = [("image", f)]
        if with_text:
            if name not in text:
                raise InputError(f"part {name} has image but no text embeddings (text_emb/{name}.npy)")
            tshape, _ = npy_shape(text[name])
            if tshape[0] != shape[0]:
                raise InputError(f"part {name}: {shape[0]} image rows but {tshape[0]} text rows")
            dims[text[name]] = tshape[1]
            files.append(("text", text[name]))
        if name in meta:
            meta_rows = _parquet_file(meta[name]).metadata.num_rows
            if meta_rows != shape[0]:
                raise InputError(f"part {name}: {shape[0]} embedding rows but {meta_rows} metadata rows")
        parts.append(Part(name, tuple(files), shape[0], meta.get(name)))
    dim = _check_dims(dims)
    if manifest.get("dim") not in (None, dim):
        raise InputError(f"manifest.json says dim {manifest['dim']} but the parts have dim {dim}")
    mods = ("image", "text") if with_text else ("image",)
    return Source("npy", dim, tuple(parts), mods, "embedding", manifest.get("model"))


# ---------------------------------------------------------------- reading


def read_batches(path: str, fmt: str, batch_rows: int, column: str = "embedding") -> Iterator[np.ndarray]:
    """Yield float32 [<=batch_rows, dim] arrays of one file, in row order, never the whole file."""
    if fmt == "npy":
        yield from _npy_batches(path, batch_rows)
    else:
        yield from _parquet_batches(path, batch_rows, column)


def _npy_batches(path: str, batch_rows: int) -> Iterator[np.ndarray]:
    fs, p = storage.get_fs(path)
    with fs.open(p, "rb") as f:
        shape, dtype, fortran, _ = _npy_header(f)
        if fortran:
            raise InputError(f"{path} is a Fortran-order array; save it in C order")
        if dtype.hasobject:
            raise InputError(f"{path} holds Python objects, not numbers")
        n, d = shape
        row_bytes = d * dtype.itemsize
        for s in range(0, n, batch_rows):
            m = min(batch_rows, n - s)
            buf = f.read(m * row_bytes)
            if len(buf) != m * row_bytes:
                raise InputError(f"{path} is truncated")
            yield np.frombuffer(buf, dtype=dtype).reshape(m, d).astype(np.float32)


def _parquet_batches(path: str, batch_rows: int, column: str) -> Iterator[np.ndarray]:
    pf = _parquet_file(path)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
        col = batch.column(0)
        if len(col) == 0:
            continue
        if col.null_count:
            raise InputError(f"{path}: the {column!r} column has null rows")
        values = col.flatten() if hasattr(col, "flatten") else col.values
        arr = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32)
        if arr.size % len(col):
            raise InputError(f"{path}: rows of {column!r} have different lengths")
        yield arr.reshape(len(col), -1)


def load_queries(path: str, dim: int) -> np.ndarray:
    """A small .npy of query vectors (e.g. caption embeddings for the npy input), L2-normalised."""
    if not storage.exists(path):
        raise InputError(f"tuning queries {path} do not exist", hint="--tuning-queries")
    shape, _ = npy_shape(path)
    if len(shape) != 2 or shape[1] != dim:
        raise InputError(
            f"tuning queries {path} have shape {shape}, expected [n, {dim}]", hint="--tuning-queries"
        )
    if shape[0] < 10:
        raise InputError(
            f"tuning queries {path} hold {shape[0]} rows; tune on at least 10", hint="--tuning-queries"
        )
    q = np.concatenate(list(_npy_batches(path, 1 << 20)))
    bad = ~np.isfinite(q).all(axis=1)
    if bad.any():
        raise InputError(
            f"tuning queries {path}: {int(bad.sum())} of {len(q)} rows hold NaN or infinite values "
            f"(first: row {int(np.flatnonzero(bad)[0])})",
            hint="--tuning-queries",
        )
    norms = np.linalg.norm(q, axis=1)
    if (norms == 0).any():
        raise InputError(
            f"tuning queries {path}: {int((norms == 0).sum())} rows are all zero", hint="--tuning-queries"
        )
    return (q / norms[:, None]).astype(np.float32)
