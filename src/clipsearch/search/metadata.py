"""Row lookup by id in a memory-mapped Arrow IPC file; the whole table is never loaded.

`metadata.arrow` is an uncompressed Arrow IPC file whose row *i* is faiss id *i*. Opening it maps the file;
reading a record batch is zero-copy, so only the pages of the rows and columns that are touched come into
memory (and they stay reclaimable page cache, not heap).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from clipsearch.errors import InputError

logger = logging.getLogger(__name__)

SMALL_LOOKUP = 64  # ids per call read one by one (a results page); more go through take()


class MetadataTable:
    """Memory-mapped `metadata.arrow`. Thread-safe for reads."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._source = pa.memory_map(path, "r")
            self._reader = pa.ipc.open_file(self._source)
        except (OSError, pa.ArrowInvalid) as e:
            raise InputError(
                f"{path} is not a readable Arrow IPC file: {e}",
                hint="rebuild the index folder with `clipsearch index`",
            ) from e
        self.schema: pa.Schema = self._reader.schema
        self.num_batches = self._reader.num_record_batches
        self._batches: list[pa.RecordBatch | None] = [None] * self.num_batches
        self._lock = threading.Lock()
        # batch boundaries: reading each batch header is cheap (zero-copy, no data pages touched)
        starts = [0]
        for i in range(self.num_batches):
            starts.append(starts[-1] + self._batch(i).num_rows)
        self._starts = starts
        self.num_rows = starts[-1]
        self.columns: list[str] = list(self.schema.names)

    def __len__(self) -> int:
        return self.num_rows

    def _batch(self, i: int) -> pa.RecordBatch:
        b = self._batches[i]
        if b is None:
            with self._lock:
                b = self._batches[i]
                if b is None:
                    b = self._reader.get_batch(i)
                    self._batches[i] = b
        return b

    def batches(self) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row id, batch) over the whole table, for vectorised column scans."""
        for i in range(self.num_batches):
            yield self._starts[i], self._batch(i)

    def column_type(self, name: str) -> pa.DataType:
        return self.schema.field(name).type

    def has_column(self, name: str) -> bool:
        return name in self.schema.names

    def rows(
        self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Rows for `ids` (in the given order) as dicts of `columns` (all columns when None).

        Ids must be in range; the caller checks them (`valid_ids`).
        """
        ids = np.asarray(ids, dtype=np.int64)
        cols = list(self.columns if columns is None else columns)
        if len(ids) == 0:
            return []
        if len(ids) <= SMALL_LOOKUP:
            # a page of results: scalar reads are cheaper than take + to_pylist (measured 8 % of /knn CPU)
            starts = self._starts
            out_small = []
            for i in ids.tolist():
                b = bisect.bisect_right(starts, i) - 1
                batch = self._batch(b)
                local = i - starts[b]
                out_small.append({c: batch.column(c)[local].as_py() for c in cols})
            return out_small
        out: list[dict[str, Any] | None] = [None] * len(ids)
        # group the wanted rows by batch, take them there in one call per batch
        batch_of = np.searchsorted(np.asarray(self._starts[1:]), ids, side="right")
        for b in np.unique(batch_of):
            pos = np.flatnonzero(batch_of == b)
            local = ids[pos] - self._starts[int(b)]
            sub = self._batch(int(b)).select(cols).take(pa.array(local))
            for j, row in zip(pos, sub.to_pylist(), strict=True):
                out[int(j)] = row
        return out  # type: ignore[return-value]

    def valid_ids(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        ok, bad = [], []
        for i in ids:
            (ok if 0 <= int(i) < self.num_rows else bad).append(int(i))
        return ok, bad

    def batch_index(self, row: int) -> int:
        return bisect.bisect_right(self._starts, row) - 1

    def close(self) -> None:
        self._batches = [None] * self.num_batches
        try:
            self._source.close()
        except Exception:  # pragma: no cover
            pass
