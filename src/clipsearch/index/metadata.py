"""metadata.arrow: an uncompressed Arrow IPC file, row i = faiss id i, streamed part by part."""

from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch import storage
from clipsearch.index.readers import Source

logger = logging.getLogger(__name__)


def _open_parquet(path: str) -> pq.ParquetFile:
    fs, p = storage.get_fs(path)
    return pq.ParquetFile(fs.open(p, "rb"))


def _schema(source: Source, input_format: str) -> pa.Schema:
    if input_format == "embeddings":
        schemas = [_open_parquet(p.metadata).schema_arrow for p in source.parts if p.metadata]
        if schemas:
            return pa.unify_schemas(schemas, promote_options="permissive")
        return pa.schema([("part", pa.string()), ("row", pa.int64())])
    if input_format == "parquet":
        s = _open_parquet(source.parts[0].path("image")).schema_arrow
        fields = [f for f in s if f.name != source.column]
        return pa.schema([("part", pa.string()), ("row", pa.int64()), *fields])
    return pa.schema([("part", pa.string()), ("row", pa.int64())])


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    cols = []
    for f in schema:
        if f.name in batch.schema.names:
            col = batch.column(batch.schema.get_field_index(f.name))
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(batch.num_rows, f.type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def write_metadata(
    source: Source, input_format: str, bad_rows: list[np.ndarray], path: str, batch_rows: int = 65536
) -> int:
    """Write metadata.arrow for the kept rows of every part, in part order. Returns the row count."""
    schema = _schema(source, input_format)
    tmp = f"{path}.tmp{os.getpid()}"
    written = 0
    with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for part, bad in zip(source.parts, bad_rows, strict=True):
            keep_all = np.ones(part.rows, dtype=bool)
            keep_all[bad] = False
            meta_path = part.metadata if input_format == "embeddings" else None
            if input_format == "parquet":
                meta_path = part.path("image")
            start = 0
            if meta_path:
                pf = _open_parquet(meta_path)
                cols = [
                    n
                    for n in pf.schema_arrow.names
                    if n != (source.column if input_format == "parquet" else None)
                ]
                batches = pf.iter_batches(batch_size=batch_rows, columns=cols)
            else:
                batches = iter(())
            for b in batches:
                n = b.num_rows
                if input_format == "parquet":
                    b = _with_position(b, part.name, start)
                keep = keep_all[start : start + n]
                if not keep.all():
                    b = b.filter(pa.array(keep))
                writer.write_batch(_conform(b, schema))
                written += b.num_rows
                start += n
            if not meta_path:
                for s in range(0, part.rows, batch_rows):
                    rows = np.arange(s, min(part.rows, s + batch_rows), dtype=np.int64)
                    rows = rows[keep_all[rows]]
                    b = pa.RecordBatch.from_arrays(
                        [pa.array([part.name] * len(rows)), pa.array(rows)], ["part", "row"]
                    )
                    writer.write_batch(_conform(b, schema))
                    written += len(rows)
            elif start != part.rows:
                raise_mismatch(part.name, start, part.rows)
    os.replace(tmp, path)
    return written


def _with_position(b: pa.RecordBatch, name: str, start: int) -> pa.RecordBatch:
    arrays = [pa.array([name] * b.num_rows), pa.array(np.arange(start, start + b.num_rows, dtype=np.int64))]
    names = ["part", "row"]
    for i, f in enumerate(b.schema):
        if f.name not in names:
            arrays.append(b.column(i))
            names.append(f.name)
    return pa.RecordBatch.from_arrays(arrays, names)


def raise_mismatch(name: str, got: int, expected: int) -> None:
    from clipsearch.errors import InputError

    raise InputError(f"metadata of part {name} has {got} rows, its embeddings have {expected}")
