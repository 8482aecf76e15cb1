"""Building the keyword index of an index folder (or segment) from its `metadata.arrow`.

One tantivy document per metadata row: `id` (u64 fast field = the row = the faiss id) and `caption` (the
analyzer's terms, whitespace-separated, with positions for phrases). Rows without a caption get no document,
so they never match a keyword. The index is written under a temporary name and renamed into `keywords/`,
so a reader never sees half of it; it is never modified afterwards (an append or a compaction writes the
new segment's own).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import pyarrow as pa

from clipsearch.keywords import analyzer

logger = logging.getLogger(__name__)

DIR = "keywords"
COLUMN = "caption"
HEAP_BYTES_PER_THREAD = 64 * 1024 * 1024  # tantivy's in-memory segment size before it flushes


def schema() -> Any:
    import tantivy

    sb = tantivy.SchemaBuilder()
    sb.add_unsigned_field("id", stored=False, indexed=False, fast=True)
    sb.add_text_field(COLUMN, stored=False, tokenizer_name="whitespace", index_option="position")
    return sb.build()


def build_keyword_index(
    folder: str,
    *,
    column: str = COLUMN,
    threads: int = 1,
    metadata: str = "metadata.arrow",
    tmp_dir: str | None = None,
) -> dict[str, Any] | None:
    """Write `folder/keywords/` from `folder/metadata.arrow`'s `column`. Returns the index.json entry, or
    None when the metadata has no such column (nothing to index). `tmp_dir`: where to write it before the
    rename (same filesystem), default the folder itself."""
    import tantivy

    t0 = time.perf_counter()
    path = os.path.join(folder, metadata)
    with pa.memory_map(path, "r") as src:
        reader = pa.ipc.open_file(src)
        if column not in reader.schema.names:
            logger.info("%s has no %r column: no keyword index", path, column)
            return None
        tmp = os.path.join(tmp_dir or folder, f".{DIR}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            index = tantivy.Index(schema(), tmp, reuse=False)
            threads = max(1, min(int(threads), 8))
            writer = index.writer(heap_size=HEAP_BYTES_PER_THREAD * threads, num_threads=threads)
            rows = docs = 0
            for b in range(reader.num_record_batches):
                col = reader.get_batch(b).column(column)
                if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
                    col = col.cast(pa.string())
                for value in col.to_pylist():
                    text = analyzer.index_text(value)
                    if text:
                        doc = tantivy.Document()
                        doc.add_unsigned("id", rows)
                        doc.add_text(column, text)
                        writer.add_document(doc)
                        docs += 1
                    rows += 1
            writer.commit()
            writer.wait_merging_threads()
            final = os.path.join(folder, DIR)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    size = sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))
    secs = time.perf_counter() - t0
    logger.info("keyword index: %d captions of %d rows, %.1f MB, %.1f s", docs, rows, size / 1e6, secs)
    return {
        "dir": DIR,
        "engine": f"tantivy {_version()}",
        "analyzer": analyzer.VERSION,
        "column": column,
        "count": rows,
        "documents": docs,
        "bytes": size,
        "build_s": round(secs, 2),
    }


def remove_stale(folder: str) -> None:
    """Remove what a killed build left (`.keywords.tmp-*`)."""
    for name in os.listdir(folder):
        if name.startswith(f".{DIR}.tmp-"):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tantivy")
    except PackageNotFoundError:  # pragma: no cover
        return "?"
