"""One query, three modes: `semantic` (CLIP), `keyword` (BM25 over captions) and `hybrid` (both, ranked
as one). Works on any searcher with `search`, `keyword_search`, `keyword_stats` and `vectors`
(`IndexSearcher`, `SegmentedSearcher`).

Hybrid takes the best `depth` rows of each side, with the filter (and tombstones) applied inside each
search, and gives every candidate both scores: its cosine similarity (exact from the stored or
reconstructed vector when only the keyword side found it) and its BM25 score (0 when the caption does not
match). Two fusions:

- `weighted` (default), a score in [0, 1 + 2]:
      score = sem + lambda(q) * kw
      sem = (cos - cos@100) / (cos_max - cos@100), clipped to [0, 1]: the cosine scaled between the
            semantic list's 100th hit (or its last) and the best candidate; fixed points of the list, so a
            deeper page does not reorder the earlier ones.
      kw  = BM25 / the best BM25 of the query: 1 for the best caption match.
      lambda(q) = 2 * min(1, s)^2, s = idf(the query's rarest word or phrase) / idf(a word in 0.1 % of the
            captions). A word in fewer than ~0.8 % of the captions (a serial number, a made-up name, a brand)
            gives lambda > 1, more than the whole semantic range: its caption matches rank above every
            caption without it, and CLIP orders them. A common word (a colour among twelve: 8 % of the
            captions) gives lambda ~ 0.27: CLIP's order stays, and captions that say the words move up a
            little.
- `rrf`: reciprocal rank fusion, score = 1/(60 + rank_sem) + 1/(60 + rank_kw) over the two lists (a side
  that did not list a row adds nothing). Parameter-free and scale-free, but it gives a common word's BM25
  list as much say as CLIP's, and a rare word's matches only half of the top.

Fixed a priori, not tuned on the benchmark's queries (docs/bench-hybrid.md measures both).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.errors import InputError
from clipsearch.keywords.query import KeywordQuery
from clipsearch.search.searcher import SearchParams, require_keywords

MODES = ("semantic", "keyword", "hybrid")
FUSIONS = ("weighted", "rrf")
NORM_RANK = 100  # the semantic hit whose cosine is the floor of the scaled similarity
MIN_DEPTH = 100  # candidates from each side, at least
RRF_K = 60
MAX_WEIGHT = 2.0
SPECIFIC_FRACTION = 0.001  # a word in this share of the captions is fully specific (s = 1)


@dataclass
class RankedResult:
    """A ranked list of one query, best first: `score` is what ranked it; `similarity` the cosine of each
    row (NaN when unknown), `keyword` its BM25 score (0 = the caption does not match, NaN = not asked)."""

    ids: np.ndarray
    score: np.ndarray
    similarity: np.ndarray
    keyword: np.ndarray
    plan: str
    allowed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    weight: float | None = None  # lambda of the weighted fusion


def check_mode(mode: str, fusion: str = "weighted") -> None:
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", hint="mode: semantic")
    if fusion not in FUSIONS:
        raise InputError(
            f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}", hint="fusion: weighted"
        )


def keyword_weight(s: Any, q: KeywordQuery) -> float:
    """lambda(q) of the weighted fusion, from the IDF of the query's rarest positive word or phrase."""
    units = q.positive
    if not units:
        return 0.0
    n, dfs = s.keyword_stats(units)
    if n <= 1:
        return MAX_WEIGHT if any(dfs) else 0.0
    ref = _idf(n, max(1.0, SPECIFIC_FRACTION * n))
    spec = max((_idf(n, df) / ref for df in dfs if df > 0), default=0.0)
    return MAX_WEIGHT * min(1.0, spec) ** 2


def _idf(n: float, df: float) -> float:
    return math.log(1.0 + (n - df + 0.5) / (df + 0.5))  # BM25's


def _filter(s: Any, filter: Any) -> Any:
    if filter is None or filter == "" or not isinstance(filter, str):
        return filter
    return s.filter_bitmap(filter)


def _cosines(s: Any, ids: np.ndarray, vec: np.ndarray, modality: str) -> np.ndarray:
    if len(ids) == 0:
        return np.zeros(0, np.float32)
    return (s.vectors(ids, modality) @ vec.reshape(-1)).astype(np.float32)


def keyword_search(
    s: Any, q: KeywordQuery, n: int, *, vec: np.ndarray | None, modality: str, filter: Any = None
) -> RankedResult:
    """BM25 order; the cosine of each hit too when a query vector is given."""
    require_keywords(s)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    bm = _filter(s, filter)
    if bm is not None:
        timings["filter"] = time.perf_counter() - t
    t = time.perf_counter()
    ids, bm25 = s.keyword_search(q, n, filter=bm)
    timings["keywords"] = time.perf_counter() - t
    sims = np.full(len(ids), np.nan, np.float32)
    if vec is not None:
        t = time.perf_counter()
        sims = _cosines(s, ids, vec, modality)
        timings["search"] = time.perf_counter() - t
    allowed = None if bm is None else int(bm.count)
    return RankedResult(
        ids, bm25.astype(np.float32), sims, bm25.astype(np.float32), "keyword", allowed, timings
    )


def hybrid_search(
    s: Any,
    vec: np.ndarray,
    q: KeywordQuery,
    n: int,
    *,
    modality: str = "image",
    filter: Any = None,
    params: SearchParams | None = None,
    fusion: str = "weighted",
) -> RankedResult:
    """The best `n` rows of CLIP and BM25 ranked as one (module docstring)."""
    require_keywords(s)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    bm = _filter(s, filter)
    if bm is not None:
        timings["filter"] = time.perf_counter() - t
    depth = max(int(n), MIN_DEPTH)
    sem = s.search(vec.reshape(1, -1), depth, modality=modality, filter=bm, params=params)
    for key, v in sem.timings.items():
        if key != "filter":
            timings[key] = timings.get(key, 0.0) + v
    ok = sem.ids[0] >= 0
    s_ids, s_cos = sem.ids[0][ok], sem.distances[0][ok].astype(np.float32)
    t = time.perf_counter()
    k_ids, k_bm25 = s.keyword_search(q, depth, filter=bm) if not q.empty else (np.zeros(0, np.int64), None)
    weight = keyword_weight(s, q) if fusion == "weighted" else None
    timings["keywords"] = time.perf_counter() - t
    # the union, each row with both scores
    extra = np.setdiff1d(k_ids, s_ids, assume_unique=False)
    t = time.perf_counter()
    extra_cos = _cosines(s, extra, vec, modality)
    timings["search"] = timings.get("search", 0.0) + time.perf_counter() - t
    ids = np.concatenate([s_ids, extra])
    cos = np.concatenate([s_cos, extra_cos])
    bm25 = np.zeros(len(ids), np.float32)
    if len(k_ids):
        pos = {int(i): j for j, i in enumerate(ids.tolist())}
        bm25[[pos[int(i)] for i in k_ids.tolist()]] = k_bm25
    if fusion == "rrf":
        score = np.zeros(len(ids), np.float64)
        score[: len(s_ids)] += 1.0 / (RRF_K + 1 + np.arange(len(s_ids)))
        if len(k_ids):
            kpos = np.asarray([pos[int(i)] for i in k_ids.tolist()], dtype=np.int64)
            score[kpos] += 1.0 / (RRF_K + 1 + np.arange(len(k_ids)))
    else:
        hi = float(cos.max()) if len(cos) else 0.0
        lo = (
            float(s_cos[min(NORM_RANK, len(s_cos)) - 1])
            if len(s_cos)
            else (float(cos.min()) if len(cos) else 0.0)
        )
        sem_n = np.clip((cos - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.ones(len(cos))
        top = float(bm25.max()) if len(bm25) and bm25.max() > 0 else 1.0
        score = sem_n + (weight or 0.0) * (bm25 / top)
    order = np.argsort(-score, kind="stable")[: int(n)]
    plan = f"hybrid-{fusion}({sem.plan}+keyword)"
    allowed = None if bm is None else int(bm.count)
    return RankedResult(
        ids[order], score[order].astype(np.float32), cos[order], bm25[order], plan, allowed, timings, weight
    )
