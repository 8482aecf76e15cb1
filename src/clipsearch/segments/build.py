"""Writing segment folders: the trained (empty) index appends copy, adding vectors, the segment's
index.json and segment.json, and reading a segment's vectors back (from its source embeddings, else
from the index itself) for compaction."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from clipsearch import storage
from clipsearch.errors import IndexBuildError, InputError
from clipsearch.index.build import faiss_mod, iter_part, split_refine, typed, write_index_atomic
from clipsearch.index.readers import Source, open_source
from clipsearch.segments import layout

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the trained index
def trained_path(folder: str, manifest: layout.Manifest, modality: str) -> str | None:
    t = manifest.trained.get(modality) or {}
    f = t.get("file")
    if f and os.path.exists(os.path.join(folder, f)):
        return os.path.join(folder, f)
    return None


def derive_trained(folder: str, info: dict[str, Any], modality: str, out_path: str) -> None:
    """An empty copy of the base's index (its trained quantizer, no vectors), for index folders that
    keep no `{m}.trained.index` (e.g. made by `clipsearch import`). Read once; appends reuse the copy."""
    faiss = faiss_mod()
    entry = (info.get("indices") or {}).get(modality) or {}
    path = os.path.join(folder, entry.get("file") or f"{modality}.index")
    ondisk = os.path.exists(os.path.splitext(path)[0] + ".ivfdata")
    t0 = time.perf_counter()
    if ondisk:
        index = faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns the empty lists now
    else:
        index = faiss.read_index(path)
    index.reset()
    write_index_atomic(index, out_path)
    logger.info("derived the trained %s index from %s in %.1f s", modality, path, time.perf_counter() - t0)


def kind_of(index: Any) -> str:
    faiss = faiss_mod()
    base, _ = split_refine(typed(index))
    try:
        faiss.extract_index_ivf(base)
        return "ivf"
    except Exception:
        pass
    inner = typed(base)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = typed(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    return "other"


def write_index(index: Any, path: str, ondisk: bool) -> bool:
    """Write a filled index; IVF array lists go to an on-disk `.ivfdata` beside it when asked (memory-
    mapped when served). Returns whether the lists are on disk."""
    faiss = faiss_mod()
    if ondisk and kind_of(index) == "ivf":
        base, _ = split_refine(typed(index))
        ivf = faiss.downcast_index(faiss.extract_index_ivf(base))
        if not isinstance(ivf, faiss.IndexIVFFastScan):
            ivfdata = path[: -len(".index")] + ".ivfdata"
            lists = faiss.InvertedListsPtrVector()
            lists.push_back(ivf.invlists)
            od = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
            od.merge_from_multiple(lists.data(), lists.size())
            ivf.replace_invlists(od, True)
            od.this.disown()
            write_index_atomic(index, path)
            return True
    write_index_atomic(index, path)
    return False


# ------------------------------------------------------------------------------ segment files
def segment_info(
    base_info: dict[str, Any],
    entries: dict[str, dict[str, Any]],
    count: int,
    name: str,
    kind: str,
    timings: dict[str, float],
) -> dict[str, Any]:
    """index.json of a segment folder: a valid index description of its own."""
    return {
        "format": "clipsearch.index",
        "version": 1,
        "model": base_info.get("model"),
        "dim": base_info.get("dim"),
        "metric": base_info.get("metric", "inner_product"),
        "count": count,
        "segment": {"name": name, "kind": kind},
        "budget": base_info.get("budget"),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "indices": entries,
    }


def index_entry(
    folder: str, modality: str, index: Any, factory: str | None, params: dict, ondisk: bool, reason: str
) -> dict[str, Any]:
    fname = f"{modality}.index"
    size = os.path.getsize(os.path.join(folder, fname))
    e: dict[str, Any] = {
        "file": fname,
        "factory": factory or type(typed(index)).__name__,
        "reason": reason,
        "search_params": dict(params or {}),
        "mmap": bool(ondisk),
        "count": int(index.ntotal),
        "curve": [],
    }
    if ondisk:
        e["ivfdata"] = f"{modality}.ivfdata"
        size += os.path.getsize(os.path.join(folder, e["ivfdata"]))
    e["memory_bytes"] = int(size)
    return e


def keyword_index(
    base_info: dict[str, Any], seg_dir: str, timings: dict[str, float]
) -> dict[str, Any] | None:
    """The keyword index of a new segment (from its metadata.arrow), when the index keeps one: the root
    index.json says so (`keywords`), so every segment of an index built with it has its own."""
    if not isinstance(base_info.get("keywords"), dict):
        return None
    from clipsearch.keywords.writer import build_keyword_index

    t0 = time.perf_counter()
    entry = build_keyword_index(seg_dir, column=str(base_info["keywords"].get("column") or "caption"))
    timings["keywords_s"] = time.perf_counter() - t0
    return entry


def new_uid() -> str:
    return uuid.uuid4().hex[:12]


# -------------------------------------------------------------------------------- sources
def source_record(source: Source, folder: str, input_format: str, modalities: tuple[str, ...]) -> dict:
    return {
        "folder": os.path.abspath(folder) if storage.is_local(folder) else folder,
        "format": input_format,
        "column": source.column,
        "modalities": list(modalities),
        "parts": [{"name": p.name, "rows": p.rows} for p in source.parts],
    }


def _open_recorded(rec: dict[str, Any]) -> Source:
    src = open_source(rec["folder"], rec.get("format", "embeddings"), rec.get("column", "embedding"))
    parts = rec.get("parts")
    if isinstance(parts, int):  # the base: the first N parts of its folder
        if len(src.parts) < parts:
            raise InputError(
                f"{rec['folder']} holds {len(src.parts)} parts, the index was built from {parts}"
            )
        return replace(src, parts=src.parts[:parts])
    by_name = {p.name: p for p in src.parts}
    chosen = []
    for p in parts or []:
        part = by_name.get(p["name"])
        if part is None or part.rows != int(p["rows"]):
            raise InputError(f"part {p['name']} of {rec['folder']} is missing or changed")
        chosen.append(part)
    return replace(src, parts=tuple(chosen))


def iter_source_vectors(
    sources: list[dict[str, Any]], dropped: np.ndarray, modalities: tuple[str, ...], batch_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """The kept vectors of recorded sources, in id order, minus the `dropped` positions."""
    opened = [(_open_recorded(r), tuple(r.get("modalities") or modalities)) for r in sources]
    pos = 0
    for src, mods in opened:
        if not set(modalities) <= set(mods):
            raise InputError(f"{src.parts[0].path('image') if src.parts else '?'} lacks {modalities}")
        for part in src.parts:
            for _, xs, bad, _ in iter_part(part, src, batch_rows, mods):
                keep = ~bad
                n = int(keep.sum())
                sel = np.ones(n, dtype=bool)
                lo, hi = np.searchsorted(dropped, [pos, pos + n])
                sel[dropped[lo:hi] - pos] = False
                pos += n
                if sel.any():
                    yield {m: np.ascontiguousarray(xs[m][keep][sel]) for m in modalities}


def iter_index_vectors(
    seg_dir: str, info: dict[str, Any], modalities: tuple[str, ...], count: int, batch_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """A segment's vectors read back from its files: the stored `{m}.vectors.npy`, else reconstructed
    from the index (exact for Flat, HNSW-Flat, IVF-Flat and refine-Flat indices; lossy for PQ/SQ)."""
    faiss = faiss_mod()
    readers = {}
    for m in modalities:
        entry = (info.get("indices") or {}).get(m) or {}
        vpath = os.path.join(seg_dir, entry.get("vectors") or f"{m}.vectors.npy")
        if os.path.exists(vpath):
            v = np.load(vpath, mmap_mode="r")
            readers[m] = lambda ids, v=v: np.asarray(v[ids], dtype=np.float32)
            continue
        path = os.path.join(seg_dir, entry.get("file") or f"{m}.index")
        ondisk = os.path.exists(os.path.splitext(path)[0] + ".ivfdata")
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY if ondisk else faiss.IO_FLAG_MMAP
        index = faiss.read_index(path, flags)
        base, refine = split_refine(typed(index))
        if refine is None and kind_of(index) == "ivf":
            faiss.extract_index_ivf(base).make_direct_map(True)
            logger.warning("%s: no source embeddings; reading vectors back from %s codes", seg_dir, m)
        readers[m] = lambda ids, index=index: np.asarray(index.reconstruct_batch(ids), dtype=np.float32)
    for s in range(0, count, batch_rows):
        ids = np.arange(s, min(count, s + batch_rows), dtype=np.int64)
        yield {m: np.ascontiguousarray(readers[m](ids)) for m in modalities}


def segment_vectors(
    folder: str, seg: layout.SegmentEntry, modalities: tuple[str, ...], batch_rows: int
) -> tuple[Iterator[dict[str, np.ndarray]], str]:
    """(iterator of vector batches in local id order, where they come from) for one segment."""
    seg_dir = layout.segment_folder(folder, seg)
    sj = layout.read_segment_json(folder, seg)
    sources = sj.get("sources")
    if sources:
        dropped = np.zeros(0, np.int64)
        if sj.get("dropped"):
            dropped = np.load(os.path.join(seg_dir, sj["dropped"]))
        try:
            for r in sources:
                _open_recorded(r)  # every source still there, unchanged
            return iter_source_vectors(sources, dropped, modalities, batch_rows), "source embeddings"
        except InputError as e:
            logger.warning("segment %s: %s; reading vectors back from the index", seg.name, e)
    info = layout.read_info(seg_dir)
    return iter_index_vectors(seg_dir, info, modalities, seg.count, batch_rows), "index"


def check_count(got: int, want: int, what: str) -> None:
    if got != want:
        raise IndexBuildError(f"{what}: read {got} vectors, expected {want} (its source changed?)")
