"""Pick nprobe / efSearch / k_factor on held-out queries, against exact search.

Two query sets are measured at each point: `cross` (text-like: --tuning-queries, caption embeddings
for the image index, prompts encoded by the model's text tower, or image embeddings for the text
index) and `same` (rows of the indexed modality). With cross queries the objective is their recall:
text->image queries come from another distribution than the images and quantized indices lose most of
their recall there. The chosen point is the cheapest that meets --min-recall, or the best recall
within the query-time budget.

Without cross queries, same-modality recall is no guide: it plateaus after a few candidates while
text queries' recall keeps rising with every candidate added (docs/bench-index.md). The rule is then
autofaiss's: spend the query-time budget. Among the points whose same-modality recall is on its
plateau, the slowest one within BUDGET_MARGIN of the budget wins (the margin absorbs the run-to-run
noise of latency measurements, so the served latency stays within the budget). With two knobs (lists
probed and candidates re-ranked) "the slowest" is no guide to where the budget is best spent: the
slowest point of an IVFPQR grid probes every list and re-ranks few candidates, which text queries need
more of. There `far` queries decide, random directions (the widest modality gap): the cheapest point
within FAR_PLATEAU of their best recall within the budget (docs/bench-index.md, session 8).

Measuring every point on all text-like queries was most of a residual build's tuning time (a probe x
re-rank grid has ~100 points). Each point is measured on the first N_QUICK of them; only the points that
can still be chosen (within the budget, within QUICK_MARGIN of the best such recall, or of --min-recall)
are measured again on all of them, and the choice is made on those figures. A ladder stops at its first
point over the budget (with --min-recall, 3x the budget), since nothing beyond it can be chosen.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from clipsearch.index.build import apply_search_params, faiss_mod, split_transform, typed

logger = logging.getLogger(__name__)

K = 10
N_LATENCY = 40
BUDGET_MARGIN = 0.85  # the budget rule spends at most this share of --max-index-query-time-ms
PLATEAU = 0.002  # recall differences below this are noise (1000 queries x 10 neighbours)
N_FAR_QUERIES = 300
N_SAME_RECORD = 100  # image queries measured beside text-like or far ones, for index.json only
FAR_PLATEAU = 0.02  # random directions' recall over 300 queries: about two standard errors
N_QUICK = 250  # text-like queries measured at every point of a grid; all of them only near the best
QUICK_MARGIN = 0.02  # about three standard errors of recall@10 over N_QUICK queries


@dataclass
class Tuned:
    search_params: dict
    curve: list[dict]
    reason: str
    rule: str  # "min_recall" | "text_recall" | "budget"
    point: dict  # the chosen point of the curve: params, recalls, latency


def random_directions(n: int, d: int, rng: np.random.Generator | int = 0) -> np.ndarray:
    """n random unit vectors: the widest modality gap, nothing near them. The budget rule's `far`
    queries on a two-knob grid, and the stand-in queries of family.choose and rotation.choose."""
    q = np.random.default_rng(rng).standard_normal((n, d)).astype(np.float32)
    return np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12))


def far_queries(n_cross: int, d: int, seed: int = 0) -> np.ndarray:
    """The `far` queries a caller measures exact neighbours for: N_FAR_QUERIES random directions when
    there are no text-like queries (the budget rule needs them on a two-knob grid), none otherwise."""
    return random_directions(0 if n_cross else N_FAR_QUERIES, d, seed)


def recall_at_k(found: np.ndarray, gt: np.ndarray, k: int = K) -> float:
    if len(gt) == 0:
        return float("nan")
    hits = 0
    for f, g in zip(found[:, :k], gt[:, :k], strict=True):
        hits += len(set(f[f >= 0].tolist()) & set(g[g >= 0].tolist()))
    valid = max(1, int((gt[:, :k] >= 0).sum()))
    return hits / valid


def _measure(index, params: dict, queries: dict[str, np.ndarray], gt: dict[str, np.ndarray]) -> dict:
    apply_search_params(index, params)
    point: dict = {"params": dict(params)}
    for name, key in (("same", "recall_at_10"), ("cross", "recall_at_10_text"), ("far", "recall_at_10_far")):
        q = queries.get(name)
        if q is not None and len(q):
            point[key] = _recall(index, q, gt[name])
    lat_q = (
        queries["cross"] if queries.get("cross") is not None and len(queries["cross"]) else queries["same"]
    )
    point["latency_ms"] = single_query_ms(index, lat_q[:N_LATENCY])
    return point


def _recall(index, q: np.ndarray, gt: np.ndarray) -> float:
    _, ids = index.search(q, K)
    return round(recall_at_k(ids, gt), 4)


def single_query_ms(index, q: np.ndarray) -> float:
    """Median cost of one query searched alone on one thread, in CPU milliseconds of that thread.

    One thread, because the server searches each request on one (serve's search_threads). CPU time,
    because wall time measures the machine as much as the index: under a load of 6 on 2 cores, a
    full fast-scan query at k_factor 1 took 31 ms of wall time against about 1.5 ms of work, and the
    tuner then kept the fastest point it saw. A query's CPU time is what it costs on an idle core."""
    faiss = faiss_mod()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times = []
    try:
        index.search(q[:1], K)  # warm: first-touch of mapped lists, parameter objects
        for i in range(len(q)):
            t0 = time.thread_time()
            index.search(q[i : i + 1], K)
            times.append((time.thread_time() - t0) * 1000)
    finally:
        faiss.omp_set_num_threads(before)
    return round(float(np.median(times)), 3) if times else 0.0


def _objective(point: dict) -> float:
    return point.get("recall_at_10_text", point.get("recall_at_10", 0.0))


def _grid(index, kind: str) -> list[list[dict]]:
    """Candidate parameter ladders; each ladder is ordered by increasing cost."""
    faiss = faiss_mod()
    _, idx = split_transform(index)
    idx = typed(idx)
    if kind == "hnsw" or isinstance(idx, faiss.IndexHNSW):
        return [[{"efSearch": ef} for ef in (16, 32, 64, 128, 256, 512, 1024)]]
    k_factors = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    try:
        ivf = faiss.extract_index_ivf(index)
    except Exception:
        ivf = None
    if ivf is None:
        if isinstance(idx, faiss.IndexRefine):
            return [[{"k_factor": kf} for kf in k_factors]]
        return [[{}]]
    nlist = ivf.nlist
    if nlist == 1 and isinstance(idx, faiss.IndexIVFPQR):  # a full scan: the re-rank depth is the one knob
        return [[{"nprobe": 1, "k_factor": kf} for kf in k_factors[3:]]]
    probes, p = [], 1
    while p < nlist:
        probes.append(p)
        if p >= 8:
            probes.append(int(p * 1.5))
        p *= 2
    probes.append(nlist)
    probes = sorted(set(x for x in probes if x <= nlist))
    if isinstance(idx, faiss.IndexIVFPQR):  # two-level residual codes: few candidates reach the re-rank
        return [[{"nprobe": n, "k_factor": kf} for n in probes] for kf in (16, 32, 64, 128, 256)]
    if isinstance(idx, faiss.IndexRefine):
        return [[{"nprobe": n, "k_factor": kf} for n in probes] for kf in k_factors]
    return [[{"nprobe": n} for n in probes]]


def tune(
    index,
    kind: str,
    queries: dict[str, np.ndarray],
    gt: dict[str, np.ndarray],
    max_query_ms: float,
    min_recall: float | None,
) -> Tuned:
    t0 = time.perf_counter()
    has_cross = queries.get("cross") is not None and len(queries["cross"]) > 0
    spend = not has_cross and min_recall is None  # the budget rule (module docstring)
    curve: list[dict] = []
    grid = _grid(index, kind)
    far = spend and len(grid) > 1 and queries.get("far") is not None and len(queries["far"]) > 0
    if (far or has_cross) and queries.get("same") is not None:
        # text-like or far queries decide: a few image queries are kept for the record
        queries, gt = _head(queries, gt, "same", N_SAME_RECORD)
    quick = has_cross and len(queries["cross"]) >= 2 * N_QUICK
    first = _head(queries, gt, "cross", N_QUICK) if quick else (queries, gt)
    for ladder in grid:
        best, stale = -1.0, 0
        for params in ladder:
            point = _measure(index, params, *first)
            curve.append(point)
            r = _objective(point)
            stale = stale + 1 if r <= best + PLATEAU else 0
            best = max(best, r)
            # no point over the budget can be chosen, so a ladder stops at its first one (with
            # --min-recall the cheapest point reaching it wins, which may lie beyond: up to 3x)
            if point["latency_ms"] > (max_query_ms if min_recall is None else 3 * max_query_ms):
                break
            if not spend and (stale >= 3 or (min_recall is None and r >= 0.999)):
                break
            if min_recall is not None and r >= min_recall and point["latency_ms"] > max_query_ms:
                break
    if quick:
        _measure_again(index, curve, queries["cross"], gt["cross"], max_query_ms, min_recall)
    curve.sort(key=lambda p: p["latency_ms"])
    chosen, reason = _choose(curve, max_query_ms, min_recall, spend, far)
    apply_search_params(index, chosen["params"])
    logger.info(
        "tuned %s: %s -> recall@10 %s (text-like %s), %.2f ms/query; %d points in %.1f s (%s)",
        kind,
        chosen["params"],
        chosen.get("recall_at_10"),
        chosen.get("recall_at_10_text"),
        chosen["latency_ms"],
        len(curve),
        time.perf_counter() - t0,
        reason,
    )
    rule = "min_recall" if min_recall is not None else "budget" if spend else "text_recall"
    return Tuned(dict(chosen["params"]), curve, reason, rule, chosen)


def _head(queries: dict, gt: dict, name: str, n: int) -> tuple[dict, dict]:
    """queries and gt with only the first n of one set."""
    return {**queries, name: queries[name][:n]}, {**gt, name: gt[name][:n]}


def _measure_again(
    index, curve: list[dict], q: np.ndarray, gt: np.ndarray, max_query_ms: float, min_recall: float | None
) -> None:
    """Text-like recall on all of q at the points that can still be chosen (module docstring); the
    others keep their N_QUICK-query figure, and every point records how many queries it is over."""
    ok = [p for p in curve if min_recall is not None or p["latency_ms"] <= max_query_ms] or curve
    bar = (min_recall if min_recall is not None else max(_objective(p) for p in ok)) - QUICK_MARGIN
    candidates = {id(p) for p in ok if _objective(p) >= bar}
    for p in curve:
        p["text_queries"] = N_QUICK
        if id(p) in candidates:
            apply_search_params(index, p["params"])
            p["recall_at_10_text"] = _recall(index, q, gt)
            p["text_queries"] = len(q)


def _choose(
    curve: list[dict], max_query_ms: float, min_recall: float | None, spend: bool, far: bool = False
) -> tuple[dict, str]:
    if min_recall is not None:
        ok = [p for p in curve if _objective(p) >= min_recall]
        if ok:
            return min(
                ok, key=lambda p: p["latency_ms"]
            ), f"lowest latency reaching recall@10 >= {min_recall}"
        chosen = max(curve, key=lambda p: (_objective(p), -p["latency_ms"]))
        reason = f"no point reaches recall@10 {min_recall}: best recall measured"
        logger.warning(
            "%s (%.3f); raise --max-index-memory-usage for a more precise index", reason, _objective(chosen)
        )
        return chosen, reason
    limit = max_query_ms * (BUDGET_MARGIN if spend else 1.0)
    ok = [p for p in curve if p["latency_ms"] <= limit]
    if not ok:
        reason = f"no point is faster than {limit:g} ms: the fastest measured"
        logger.warning("%s (%.2f ms)", reason, curve[0]["latency_ms"])
        return curve[0], reason
    if spend and far:
        top_far = max(p["recall_at_10_far"] for p in ok)
        near = [p for p in ok if p["recall_at_10_far"] >= top_far - FAR_PLATEAU]
        return min(near, key=lambda p: p["latency_ms"]), (
            f"no text-like queries, two knobs: the cheapest point within {FAR_PLATEAU} of the best recall@10 "
            f"of random directions ({top_far:.3f}) within {limit:g} ms ({BUDGET_MARGIN:g} x the "
            f"{max_query_ms:g} ms budget)"
        )
    top = max(_objective(p) for p in ok)
    plateau = [p for p in ok if _objective(p) >= top - PLATEAU]
    if spend:
        return max(plateau, key=lambda p: p["latency_ms"]), (
            f"no text-like queries: the most candidates within {limit:g} ms "
            f"({BUDGET_MARGIN:g} x the {max_query_ms:g} ms budget) among points on the same-modality "
            "recall plateau"
        )
    return min(plateau, key=lambda p: p["latency_ms"]), f"best recall@10 within {max_query_ms:g} ms per query"
