"""Recall tuning of an imported index on held-out text queries (`--queries FILE`).

The exact neighbours come from the index's own vectors, so this needs an index that stores them exactly
(Flat, HNSW-Flat, IVF-Flat). A compressed index (PQ, SQ, OPQ) cannot give its original vectors back:
its stored parameters are kept, and index.json says why.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from clipsearch import storage
from clipsearch.errors import InputError
from clipsearch.interop.config import ImportConfig

logger = logging.getLogger(__name__)

K = 10
#: the exact-neighbour pass reads every vector back; above this many bytes, tuning is skipped
MAX_EXACT_BYTES = 2 << 30


def load_queries(path: str) -> list[str]:
    """Text queries, one per line (blank lines and lines starting with # are skipped)."""
    fs, p = storage.get_fs(path)
    try:
        with fs.open(p, "rb") as f:
            lines = f.read().decode("utf-8").splitlines()
    except FileNotFoundError as e:
        raise InputError(
            f"queries file {path} does not exist", hint="--queries FILE.txt (one query per line)"
        ) from e
    queries = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not queries:
        raise InputError(
            f"queries file {path} holds no queries", hint="--queries FILE.txt (one query per line)"
        )
    return queries


def _exact_vectors(index: Any) -> np.ndarray | None:
    """All vectors of an index that stores them exactly, else None."""
    import faiss

    idx = faiss.downcast_index(index)
    if not isinstance(idx, faiss.IndexFlat | faiss.IndexHNSWFlat | faiss.IndexIVFFlat):
        return None
    if isinstance(idx, faiss.IndexIVF):
        idx.make_direct_map()
    return np.asarray(idx.reconstruct_n(0, idx.ntotal), dtype=np.float32)


def _grid(index: Any) -> tuple[str, list[int]] | None:
    import faiss

    from clipsearch.search.searcher import _inner

    inner = _inner(index)
    if isinstance(inner, faiss.IndexIVF):
        nlist = int(inner.nlist)
        vals = sorted({min(nlist, 2**e) for e in range(0, 17)} | {int(inner.nprobe)})
        return "nprobe", [v for v in vals if v <= nlist]
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", sorted({10, 16, 24, 32, 48, 64, 96, 128, 256, 512, int(inner.hnsw.efSearch)})
    return None


def _sweep(index: Any, q: np.ndarray, gt: np.ndarray, key: str, values: list[int]) -> list[dict[str, Any]]:
    from clipsearch.search.searcher import SearchParams, build_search_params

    curve: list[dict[str, Any]] = []
    for v in values:
        keep: list[Any] = []
        params = build_search_params(index, SearchParams(**{key: v}), None, keep)
        t = time.perf_counter()
        _, ids = index.search(q, K, params=params)
        ms = (time.perf_counter() - t) * 1000 / len(q)
        recall = float(np.mean([len(set(a[a >= 0]) & set(b)) / K for a, b in zip(ids, gt, strict=True)]))
        curve.append({"params": {key: v}, "recall_at_10_text": round(recall, 4), "latency_ms": round(ms, 3)})
    return curve


def tune_imported(entry: dict[str, Any], index: Any, modality: str, cfg: ImportConfig, encoder: Any) -> None:
    """Sweep nprobe / efSearch on the held-out queries; updates `entry` (search_params, curve, reason)."""
    import faiss

    assert cfg.queries is not None
    texts = load_queries(cfg.queries)
    grid = _grid(index)
    if grid is None:
        entry["reason"] = entry["reason"].replace(
            "no held-out queries were given to tune them", "exact search: nothing to tune"
        )
        return
    nbytes = int(index.ntotal) * int(index.d) * 4
    vectors = _exact_vectors(index) if nbytes <= MAX_EXACT_BYTES else None
    if vectors is None:
        why = (
            f"the {entry['factory']} index does not keep its vectors exactly"
            if nbytes <= MAX_EXACT_BYTES
            else f"reading back {nbytes / 2**30:.1f} GiB of vectors for exact neighbours is too much here"
        )
        entry["reason"] = entry["reason"].replace(
            "no held-out queries were given to tune them", f"not tuned on the held-out queries: {why}"
        )
        logger.warning("%s: %s; keeping its stored search parameters", modality, why)
        return
    q = np.ascontiguousarray(encoder.encode_text(texts), dtype=np.float32)
    _, gt = faiss.knn(q, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
    del vectors
    key, values = grid
    try:  # the index stage's tuner, so imported and native indices are tuned the same way
        from clipsearch.index.tune import tune as index_tune
    except ImportError:  # pragma: no cover - the index stage not installed
        index_tune = None
    if index_tune is not None:
        kind = "hnsw" if key == "efSearch" else "ivf"
        tuned = index_tune(index, kind, {"cross": q}, {"cross": gt}, cfg.max_query_ms, cfg.target_recall)
        curve = list(tuned.curve)
        best = next(c for c in curve if c["params"] == tuned.search_params)
        ok = [best] if best["recall_at_10_text"] >= cfg.target_recall else []
    else:
        curve = _sweep(index, q, gt, key, values)
        ok = [c for c in curve if c["recall_at_10_text"] >= cfg.target_recall]  # cheapest first
        best = ok[0] if ok else max(curve, key=lambda c: c["recall_at_10_text"])
    chosen = best["params"][key]
    before = entry["search_params"].get(key)
    entry["search_params"][key] = chosen
    entry["curve"] = curve
    entry["reason"] = entry["reason"].replace(
        "no held-out queries were given to tune them",
        f"tuned on {len(texts)} held-out text queries: {key}={chosen} "
        + (f"reaches recall@10 {best['recall_at_10_text']} (target {cfg.target_recall})" if ok
           else f"gives the best recall@10 {best['recall_at_10_text']}, below the target {cfg.target_recall}")
        + (f", the file stored {key}={before}" if before is not None and before != chosen else ""),
    )  # fmt: skip
    logger.info(
        "%s: %s=%s, recall@10 %.3f on %d queries",
        modality,
        key,
        chosen,
        best["recall_at_10_text"],
        len(texts),
    )
