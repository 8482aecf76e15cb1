"""Foreign metadata -> `metadata.arrow` (uncompressed Arrow IPC file, row i = faiss id i), streamed.

Two kinds of source:
- `ConcatSource`: files whose rows, concatenated in file-name order, are the faiss ids (clip-retrieval's
  `metadata/metadata_XX.parquet`, or its `--use_arrow` `.arrow` files).
- `IdsParquetSource`: autofaiss' ids parquet files (Fondant's `id_mapping/`): an `i` column holds the faiss
  id of each row, rows may be in any order and spread over several files.

Both are checked (row count, id coverage) from parquet footers and the `i` column alone, before anything
is written. Writing streams record batches, so memory stays flat except where an ids parquet interleaves
id ranges across files (then all rows are loaded once and sorted, with a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch import storage
from clipsearch.errors import InputError

logger = logging.getLogger(__name__)

BATCH_ROWS = 65_536
#: columns never carried into metadata.arrow: pandas' index, autofaiss' id column (it equals the row number)
DROP_COLUMNS = ("__index_level_0__", "i")
#: vectors do not belong in the metadata table (pass them with --embeddings instead)
VECTOR_COLUMNS = ("embedding", "embeddings", "image_embedding", "text_embedding", "clip_embedding")
#: clipsearch's names for the url and caption columns, and the names other tools use for them
CANONICAL_NAMES: dict[str, tuple[str, ...]] = {
    "url": ("url", "URL", "image_url", "img_url"),
    "caption": ("caption", "TEXT", "text", "title"),
}


def _fmt_ids(ids: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _open_ipc(path: str) -> Any:
    """An Arrow IPC file (or stream) reader over any fsspec path."""
    fs, p = storage.get_fs(path)
    src = pa.memory_map(p, "r") if storage.is_local(path) else fs.open(p, "rb")
    try:
        return pa.ipc.open_file(src)
    except pa.ArrowInvalid:
        if hasattr(src, "seek"):
            src.seek(0)
        return pa.ipc.open_stream(src)


def _file_schema(path: str) -> pa.Schema:
    fs, p = storage.get_fs(path)
    try:
        if path.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                return pq.read_schema(f)
        return _open_ipc(path).schema
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(
            f"{path} is not a readable {'parquet' if path.endswith('.parquet') else 'Arrow'} file: {e}"
        ) from e


def _file_rows(path: str) -> int:
    fs, p = storage.get_fs(path)
    try:
        if path.endswith(".parquet"):
            with fs.open(p, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        r = _open_ipc(path)
        if hasattr(r, "num_record_batches"):
            return sum(r.get_batch(i).num_rows for i in range(r.num_record_batches))
        return sum(b.num_rows for b in r)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{path} is not readable: {e}") from e


def _iter_file(path: str, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
    fs, p = storage.get_fs(path)
    if path.endswith(".parquet"):
        with fs.open(p, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        return
    r = _open_ipc(path)
    batches = (r.get_batch(i) for i in range(r.num_record_batches)) if hasattr(r, "num_record_batches") else r
    for b in batches:
        yield b.select(list(columns)) if columns is not None else b


def _read_file(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    batches = list(_iter_file(path, columns))
    if not batches:
        return _file_schema(path).empty_table() if columns is None else pa.table({})
    return pa.Table.from_batches(batches)


@dataclass
class OutputSchema:
    """The unified schema of all files after dropping and renaming columns."""

    source_names: list[str]  # column names as read
    schema: pa.Schema  # output schema (renamed)
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def output_schema(
    files: Sequence[str], url_column: str | None = None, caption_column: str | None = None
) -> OutputSchema:
    schemas = [_file_schema(f).remove_metadata() for f in files]
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise InputError(f"the metadata files do not share compatible column types: {e}") from e
    dropped = [n for n in unified.names if n in DROP_COLUMNS or n in VECTOR_COLUMNS]
    if any(n in VECTOR_COLUMNS for n in dropped):
        logger.info(
            "not copying vector column(s) %s into metadata.arrow", [n for n in dropped if n in VECTOR_COLUMNS]
        )
    keep = [n for n in unified.names if n not in dropped]
    renamed: dict[str, str] = {}
    explicit = {"url": url_column, "caption": caption_column}
    for canonical, aliases in CANONICAL_NAMES.items():
        want = explicit[canonical]
        if want is not None:
            if want not in keep:
                raise InputError(
                    f"the metadata has no column {want!r} (columns: {', '.join(keep)})",
                    hint=f"--{canonical}-column NAME",
                )
            if want != canonical:
                if canonical in keep:
                    raise InputError(
                        f"cannot rename {want!r} to {canonical!r}: the metadata already has a {canonical!r} column"
                    )
                renamed[want] = canonical
            continue
        if canonical in keep:
            continue
        for alias in aliases:
            if alias in keep and alias not in renamed:
                renamed[alias] = canonical
                break
    fields = [unified.field(n).with_name(renamed.get(n, n)) for n in keep]
    if renamed:
        logger.info("renaming metadata columns %s", ", ".join(f"{a}->{b}" for a, b in renamed.items()))
    return OutputSchema(source_names=keep, schema=pa.schema(fields), renamed=renamed, dropped=dropped)


def _conform(table: pa.Table, out: OutputSchema) -> pa.Table:
    """Select, null-fill, rename and cast `table` to the output schema."""
    cols = []
    for name, fld in zip(out.source_names, out.schema, strict=True):
        if name in table.column_names:
            col = table.column(name)
            if not col.type.equals(fld.type):
                try:
                    col = col.cast(fld.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise InputError(f"metadata column {name!r} cannot be read as {fld.type}: {e}") from e
            cols.append(col)
        else:
            cols.append(pa.nulls(table.num_rows, type=fld.type))
    return pa.Table.from_arrays(cols, schema=out.schema)


class MetadataSource:
    """Rows in faiss id order."""

    kind = "metadata"
    files: list[str]
    out: OutputSchema

    def count(self) -> int:
        raise NotImplementedError

    def validate(self, ntotal: int) -> None:
        raise NotImplementedError

    def tables(self) -> Iterator[pa.Table]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "files": len(self.files),
            "renamed_columns": dict(self.out.renamed),
            "dropped_columns": list(self.out.dropped),
        }


class ConcatSource(MetadataSource):
    """Files whose rows, concatenated in the given (file-name) order, are faiss ids 0..n-1."""

    kind = "concatenated"

    def __init__(
        self, files: Sequence[str], *, url_column: str | None = None, caption_column: str | None = None
    ):
        if not files:
            raise InputError("no metadata files")
        self.files = list(files)
        self.out = output_schema(self.files, url_column, caption_column)
        self._counts: list[int] | None = None

    def count(self) -> int:
        if self._counts is None:
            self._counts = [_file_rows(f) for f in self.files]
        return sum(self._counts)

    def validate(self, ntotal: int) -> None:
        n = self.count()
        if n != ntotal:
            raise InputError(
                f"the metadata has {n} rows in {len(self.files)} file(s) but the index holds {ntotal} vectors; "
                f"row i of the metadata must describe faiss id i",
                hint="point --source at the folder the index was built from, or pass the matching --id-mapping",
            )

    def tables(self) -> Iterator[pa.Table]:
        for f in self.files:
            for b in _iter_file(f, self.out.source_names):
                yield _conform(pa.Table.from_batches([b]), self.out)


class IdsParquetSource(MetadataSource):
    """autofaiss ids parquet: an `i` column (faiss id) plus id columns, rows in any order, any number of files."""

    kind = "ids-parquet"

    def __init__(
        self, files: Sequence[str], *, url_column: str | None = None, caption_column: str | None = None
    ):
        if not files:
            raise InputError("no ids parquet files")
        self.files = list(files)
        self.out = output_schema(self.files, url_column, caption_column)
        self._ranges: list[tuple[int, int, int]] | None = None  # (min, max, rows) per file
        self._disjoint = True

    def count(self) -> int:
        return sum(_file_rows(f) for f in self.files)

    def _ids(self, path: str) -> np.ndarray:
        t = _read_file(path, ["i"])
        if t.num_rows == 0:
            return np.zeros(0, dtype=np.int64)
        col = t.column("i")
        if col.null_count:
            raise InputError(f"{path}: the id column 'i' has {col.null_count} null value(s)")
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)

    def validate(self, ntotal: int) -> None:
        seen = np.zeros(ntotal, dtype=bool)
        ranges: list[tuple[int, int, int]] = []
        dup_total = 0
        dups: list[np.ndarray] = []
        for f in self.files:
            ids = self._ids(f)
            bad = ids[(ids < 0) | (ids >= ntotal)]
            if len(bad):
                raise InputError(
                    f"{f}: faiss id(s) {_fmt_ids(np.unique(bad))} are outside the index, which holds {ntotal} vectors "
                    "(ids 0..{})".format(ntotal - 1),
                    hint="pass the ids parquet written with this index (--id-mapping)",
                )
            if len(ids):
                uniq, counts = np.unique(ids, return_counts=True)
                d = np.concatenate([uniq[counts > 1], uniq[seen[uniq]]])
                if len(d):
                    dup_total += len(d)
                    dups.append(d)
                seen[uniq] = True
                ranges.append((int(ids.min()), int(ids.max()), len(ids)))
            else:
                ranges.append((0, -1, 0))
        if dup_total:
            raise InputError(
                f"the ids parquet maps faiss id(s) {_fmt_ids(np.unique(np.concatenate(dups)))} more than once",
                hint="pass the ids parquet written with this index (--id-mapping)",
            )
        missing = np.flatnonzero(~seen)
        if len(missing):
            raise InputError(
                f"the ids parquet ({len(self.files)} file(s)) does not cover every faiss id: "
                f"{len(missing)} of {ntotal} ids have no row, e.g. ids {_fmt_ids(missing)}",
                hint="pass every part of the ids parquet written with this index (--id-mapping FOLDER)",
            )
        order = sorted(range(len(self.files)), key=lambda k: ranges[k][0])
        nonempty = [k for k in order if ranges[k][2]]
        self._disjoint = all(
            ranges[a][1] < ranges[b][0] for a, b in zip(nonempty, nonempty[1:], strict=False)
        )
        self._ranges = ranges
        self.files = [self.files[k] for k in nonempty]
        self._ranges = [ranges[k] for k in nonempty]

    def tables(self) -> Iterator[pa.Table]:
        if self._ranges is None:
            raise RuntimeError("validate() must run before tables()")
        cols = list(dict.fromkeys(["i", *self.out.source_names]))
        if self._disjoint:
            for f in self.files:  # one file at a time: its ids are one block of the id range
                t = _read_file(f, cols)
                yield from self._sorted(t)
            return
        logger.warning(
            "the ids parquet files interleave id ranges: loading all %d files to sort them by id",
            len(self.files),
        )
        yield from self._sorted(
            pa.concat_tables([_read_file(f, cols) for f in self.files], promote_options="permissive")
        )

    def _sorted(self, t: pa.Table) -> Iterator[pa.Table]:
        ids = np.asarray(t.column("i").to_numpy(zero_copy_only=False), dtype=np.int64)
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            t = t.take(pa.array(np.argsort(ids, kind="stable")))
        t = _conform(t, self.out)
        for start in range(0, t.num_rows, BATCH_ROWS):
            yield t.slice(start, BATCH_ROWS)


def write_arrow(source: MetadataSource, path: str, expected_rows: int, *, progress: bool = True) -> int:
    """Stream `source` into an uncompressed Arrow IPC file at `path` (atomic). Returns the row count."""
    from tqdm.auto import tqdm

    rows = 0
    with (
        storage.atomic_open(path, "wb") as f,
        tqdm(total=expected_rows, unit="rows", desc="metadata", disable=not progress) as bar,
    ):
        with pa.ipc.new_file(f, source.out.schema) as writer:
            for t in source.tables():
                for b in t.to_batches(max_chunksize=BATCH_ROWS):
                    writer.write_batch(b)
                    rows += b.num_rows
                    bar.update(b.num_rows)
        if rows != expected_rows:
            raise InputError(f"wrote {rows} metadata rows but the index holds {expected_rows} vectors")
    return rows
