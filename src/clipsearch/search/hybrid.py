"""One query, three modes: `semantic` (CLIP), `keyword` (BM25 over captions) and `hybrid` (both, ranked
as one). Works on any searcher with `search`, `keyword_search`, `keyword_stats` and `vectors`
(`IndexSearcher`, `SegmentedSearcher`).

Hybrid takes the best `depth` rows of each side, with the filter (and tombstones) applied inside each
search, and gives every candidate both scores: its cosine similarity (exact from the stored or
reconstructed vector when only the keyword side found it) and its BM25 score (0 when the caption does not
match). Two fusions:

- `weighted` (default): CLIP ranks, and the caption matches of the query's words that CLIP does not
  understand (names: serial numbers, made-up words, brands) come first.
      score = sem + lambda(q) * kw
      sem = (cos - cos_min) / (cos_max - cos_min) over the candidates: the cosine scaled to [0, 1].
      w(u), per word or phrase u of the query: 2 for a *name*, else 0. A name is in fewer than 5 % of the
            captions (a description word such as "red", "circle" or "a" is not) and the model does not know
            it: it holds a digit or joins parts (`XK-4471`), or the query encoder's tokenizer cuts it into
            two pieces or more (a made-up name, a rare brand: CLIP's vocabulary gives a token of its own to
            the words it saw often). Without a tokenizer (an injected encoder): a word in at most 1 % of the
            captions. A required (+word) or quoted unit: 2. No partial weights: a lift smaller than the
            semantic range only lets near-misses whose captions hold a word overtake better images.
      kw  = BM25 over the units with w > 0 only / the best such BM25: 1 for the best match of the names.
      lambda(q) = max w(u): 2 when the query holds a name, so its caption matches (lambda * kw > 1, more
            than the whole semantic range) rank above every caption without it, in CLIP's order; 0 for a
            query CLIP understands, which then ranks exactly as `semantic`.
  `+word` and quoted phrases keep only rows whose caption has them; `-word` drops rows whose caption has it.
- `rrf`: reciprocal rank fusion over CLIP's list and the full BM25 list (every word), score =
  1/(60 + rank_sem) + 1/(60 + rank_kw) (a side that did not list a row adds nothing). Parameter-free and
  scale-free, but it gives a common word's BM25 list as much say as CLIP's, and a name's exact matches only
  half of the first page.

The 5 % and 1 % shares and the two-piece rule were set on development corpora, kept apart from the evaluation corpora of
docs/bench-hybrid.md (other seeds, sizes and a caption profile the development never saw).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipsearch.errors import InputError
from clipsearch.keywords.query import KeywordQuery
from clipsearch.search.searcher import SearchParams, require_keywords

MODES = ("semantic", "keyword", "hybrid")
FUSIONS = ("weighted", "rrf")
MIN_DEPTH = 100  # candidates from each side, at least
RRF_K = 60
MAX_WEIGHT = 2.0


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


COMMON = 0.05  # a word in at least this share of the captions is a description word, never a name
RARE = 0.01  # without the model's tokenizer: a word in at most this share of the captions is a name


class WordPieces:
    """How many pieces the model's tokenizer cuts a word into (cached): a word the model saw often enough to
    give it one token of its own is a word it knows; a serial number or a made-up name comes out in pieces."""

    def __init__(self, tokenize: Callable[[list[str]], np.ndarray]):
        self._tokenize = tokenize
        self._special = {int(i) for i in np.asarray(tokenize([""]))[0].tolist()}  # start, end, padding
        self._cache: dict[str, int] = {}

    def __call__(self, word: str) -> int:
        n = self._cache.get(word)
        if n is None:
            ids = np.asarray(self._tokenize([word]))[0].tolist()
            n = sum(1 for i in ids if int(i) not in self._special)
            if len(self._cache) < 100_000:
                self._cache[word] = n
        return n


def is_name(u: Any, f: float, pieces: WordPieces | None) -> bool:
    """A word or compound the model does not know (module docstring)."""
    if f >= COMMON:
        return False
    if u.joined is not None or any(ch.isdigit() for t in u.terms for ch in t):
        return True  # a code: XK-4471, v2.1, SN 48291
    if pieces is None:
        return f <= RARE
    return any(pieces(t) >= 2 for t in u.terms)


def unit_weights(s: Any, q: KeywordQuery, pieces: WordPieces | None = None) -> dict[Any, float]:
    """w(u) of each positive word or phrase of the query (module docstring)."""
    units = q.positive
    if not units:
        return {}
    n, dfs = s.keyword_stats(units)
    out: dict[Any, float] = {}
    for u, df in zip(units, dfs, strict=True):
        if u in q.must:
            out[u] = MAX_WEIGHT  # asked for explicitly
        elif df <= 0 or n <= 0:
            out[u] = 0.0
        else:
            out[u] = MAX_WEIGHT if is_name(u, df / n, pieces) else 0.0
    return out


def _caption_terms(s: Any, ids: np.ndarray) -> list[set[str]]:
    from clipsearch.keywords.analyzer import index_text

    if len(ids) == 0 or not s.metadata.has_column("caption"):
        return []
    return [set(index_text(r.get("caption")).split()) for r in s.rows(ids, ["caption"])]


def _holds(terms: set[str], u: Any) -> bool:
    return set(u.terms) <= terms or (u.joined is not None and u.joined in terms)


def keyword_weight(s: Any, q: KeywordQuery, pieces: WordPieces | None = None) -> float:
    """lambda(q) of the weighted fusion: 2 when the query holds a name, else 0."""
    return max(unit_weights(s, q, pieces).values(), default=0.0)


def _caption_has(s: Any, ids: np.ndarray, units: list[Any]) -> np.ndarray:
    """Whether each row's caption holds any of `units` (all of a phrase's terms)."""
    out = np.zeros(len(ids), dtype=bool)
    for j, have in enumerate(_caption_terms(s, ids)):
        out[j] = any(_holds(have, u) for u in units)
    return out


def _filter(s: Any, filter: Any) -> Any:
    if filter is None or filter == "" or not isinstance(filter, str):
        return filter
    return s.filter_bitmap(filter)


def _timed_filter(s: Any, filter: Any, timings: dict[str, float]) -> Any:
    """The filter's allowed-id bitmap (None without a filter), its time recorded as `filter`."""
    t = time.perf_counter()
    bm = _filter(s, filter)
    if bm is not None:
        timings["filter"] = time.perf_counter() - t
    return bm


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
    bm = _timed_filter(s, filter, timings)
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
    pieces: WordPieces | None = None,
) -> RankedResult:
    """The best `n` rows of CLIP and BM25 ranked as one (module docstring). `pieces`: the query encoder's
    tokenizer, which tells the words the model knows from names."""
    require_keywords(s)
    timings: dict[str, float] = {}
    bm = _timed_filter(s, filter, timings)
    depth = max(int(n), MIN_DEPTH)
    sem = s.search(vec.reshape(1, -1), depth, modality=modality, filter=bm, params=params)
    for key, v in sem.timings.items():
        if key != "filter":
            timings[key] = timings.get(key, 0.0) + v
    ok = sem.ids[0] >= 0
    s_ids, s_cos = sem.ids[0][ok], sem.distances[0][ok].astype(np.float32)
    t = time.perf_counter()
    weight = None
    if fusion == "weighted":
        w = unit_weights(s, q, pieces)
        weight = max(w.values(), default=0.0)
        kq = KeywordQuery(should=[u for u in q.should if w.get(u, 0.0) > 0], must=list(q.must),
                          must_not=list(q.must_not))  # fmt: skip
    else:
        kq = q
    k_ids, k_bm25 = s.keyword_search(kq, depth, filter=bm) if not kq.empty else (np.zeros(0, np.int64), None)
    timings["keywords"] = time.perf_counter() - t
    # the union, each row with both scores
    extra = np.setdiff1d(k_ids, s_ids, assume_unique=False)
    t = time.perf_counter()
    extra_cos = _cosines(s, extra, vec, modality)
    timings["search"] = timings.get("search", 0.0) + time.perf_counter() - t
    ids = np.concatenate([s_ids, extra])
    cos = np.concatenate([s_cos, extra_cos])
    bm25 = np.zeros(len(ids), np.float32)
    pos = {int(i): j for j, i in enumerate(ids.tolist())}
    kpos = np.asarray([pos[int(i)] for i in k_ids.tolist()], dtype=np.int64)
    if len(k_ids):
        bm25[kpos] = k_bm25
    if fusion == "rrf":
        score = np.zeros(len(ids), np.float64)
        score[: len(s_ids)] += 1.0 / (RRF_K + 1 + np.arange(len(s_ids)))
        score[kpos] += 1.0 / (RRF_K + 1 + np.arange(len(k_ids)))
    else:
        hi = float(cos.max()) if len(cos) else 0.0
        lo = float(cos.min()) if len(cos) else 0.0
        sem_n = (cos - lo) / (hi - lo) if hi > lo else np.ones(len(cos))
        top = float(bm25.max()) if len(bm25) and bm25.max() > 0 else 1.0
        score = sem_n + (weight or 0.0) * (bm25 / top)
    keep = np.ones(len(ids), dtype=bool)
    if q.must:  # required words: only rows whose caption has them (the keyword side's rows)
        keep[:] = False
        keep[kpos] = True
    elif q.must_not and len(s_ids):  # excluded words: the semantic side's rows whose caption has one
        keep &= ~_caption_has(s, ids, q.must_not)
    score = np.where(keep, score, -np.inf)
    order = np.argsort(-score, kind="stable")[: int(n)]
    order = order[np.isfinite(score[order])]
    plan = f"hybrid-{fusion}({sem.plan}+keyword)"
    allowed = None if bm is None else int(bm.count)
    return RankedResult(
        ids[order], score[order].astype(np.float32), cos[order], bm25[order], plan, allowed, timings, weight
    )
