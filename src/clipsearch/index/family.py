"""Which code family serves the data, measured on the training sample.

The planner offers up to three plans for a quantized index (index.plan.plan_candidates):

- the flat fast-scan family, `PQ{d/4}x4fs,Refine(PQ{d/2}x8)` and its IVF variants: every vector's
  4-bit code is scanned, the best candidates re-ranked with finer codes. It ranks queries that lie far
  from the images (a wide modality gap, a flat spectrum) well, because it looks at everything;
- the two-level residual family, `IVF{nlist},PQ{m1}+{m2}` (faiss's IVFPQR): a coarse centroid, a code of
  the residual, then a code of what is left. Where the variance sits in few directions, the centroid
  and the first code take most of it and the second code spends its bytes on the rest, so its
  re-rank is more precise for the same bytes; but only the probed lists are looked at;
- where its scan fits the query-time budget, the same two-level code with one list, `IVF1,PQ{d/8}+{d/2}`:
  every vector's first code is scanned, as in the flat family, and the re-rank codes hold what the
  first code missed, as in the residual family. It costs the lists' ids (8 bytes a vector), so at
  tight budgets it is built without the rotation (Plan.rotation_fits), and measured so here.

No family wins everywhere (docs/bench-index.md), so all are built small, trained on EVAL_DB sample points
with short k-means, and searched at the operating point the tuner will buy within the query-time budget.
A residual plan must beat the flat family by MIN_GAIN (the rule below); of those that do, the one that
finds the most is taken. The flat family is the default (it also serves memory-mapped lists and
per-request re-rank depths).

With text-like tuning queries (--tuning-queries, captions, --clip-model), they decide, and the small
indexes are filled with the **whole training sample**, so that neighbours lie as close together as in
the full index: what limits both families is how precisely the re-rank codes order near-ties, and at
12,000 points there are 16x fewer of them than at 200,000 (outliers-200k: flat family 0.90 estimated
on 12k points, 0.86 built; filled with the 131k sample, 0.861). Lists are scaled to the filled size,
a quarter of them probed (where the text tuner's curve bends), and both families re-rank
FULL_K_FACTOR x 10 candidates, scaled by the filled share of the data (the depth both tuner grids reach).

Without text-like queries, what
decides between the families is how far text queries will lie from the images (the modality gap), and
image vectors alone do not show it. So the two ends of that range are measured instead: held-out sample
points (no gap) and random directions (the widest gap, nothing near). The residual family is taken only
where it wins at the near end by MIN_GAIN and loses at most BLIND_TOLERANCE at the far end, so that it
holds whatever the gap turns out to be; text queries lie between the two. That far-end guard is against
lists left unprobed: far queries' neighbours spread over many lists (wide-gap: the listed residual
family loses 0.14-0.28 of text recall). The full-scan plan probes nothing; what it may lose far out is
code precision, which changes with the gap as smoothly as its gain near does, so it is taken where it
wins by MIN_GAIN near and on the mean of the two ends. On the 200k draws its random-direction estimate
did not predict text queries either way (steep: -0.066 far, +0.06 on text queries; outliers second
draw: -0.035 far, +0.04 on text queries; docs/bench-index.md session 11). On the development draws of
benchmarks/geometries.py this takes the listed residual family on `steep` (small gap, most variance in
few directions) and keeps the flat family on the four others, where random directions cost it
0.05-0.13 (docs/bench-index.md); the full-scan one loses nothing to unprobed lists at the far end.
This comparison stays at sample scale (EVAL_DB points, RERANK_SHARE of them re-ranked, all lists
probed): filled to full density, random directions punish lists trained on a subsample far more than
the full build's (outliers-200k: 0.70 estimated, 0.82 built), and the rule's tolerance was set here.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from clipsearch.index import rotation
from clipsearch.index.plan import Plan, faiss_metric, scans_everything
from clipsearch.index.tune import random_directions

logger = logging.getLogger(__name__)

MIN_GAIN = 0.01
EVAL_DB = 12_000  # points the small indexes are trained on
COARSE_POINTS_PER_LIST = 40  # coarse k-means points per list of the filled index (faiss asks for 39)
EVAL_QUERIES = 400
FULL_K_FACTOR = 256  # with text-like queries: the re-rank depth both tuner grids reach, at full scale
RERANK_SHARE = 0.05  # without: candidates re-ranked, as a share of the points searched
PROBE_SHARE = 0.25  # lists probed by the residual family, with text-like queries (the tuner's knee)
BLIND_PROBE_SHARE = 1.0  # without: the budget rule probes deep
BLIND_RANDOM_QUERIES = 1000
BLIND_TOLERANCE = 0.02  # how much the residual family may lose on random directions, taken blind
ITERATIONS = 10


@dataclass
class FamilyChoice:
    plan: Plan
    reason: str
    estimates: dict = field(default_factory=dict)  # query set -> factory -> recall@10

    def to_json(self) -> dict:
        return {"chosen": self.plan.factory, "reason": self.reason, "estimates": self.estimates}


def scaled_factory(factory: str, n_full: int, n_small: int) -> tuple[str, int]:
    """The factory with its IVF list count scaled so lists hold as many points at sample scale."""
    m = re.match(r"IVF(\d+)(_HNSW\d+)?", factory)
    if not m:
        return factory, 0
    if int(m.group(1)) == 1:  # one list, scanned whole: nothing to scale
        return factory, 1
    per_list = n_full / int(m.group(1))
    nl = max(8, 2 ** round(math.log2(max(1.0, n_small / per_list))))
    return f"IVF{nl}" + factory[m.end() :], nl


def build_small(factory: str, n_full: int, train: np.ndarray, fill: np.ndarray | None = None):
    """The plan's index trained on train and filled with fill (default: train), both already rotated,
    with short k-means and lists scaled to the filled size: (index, its list count)."""
    import faiss

    from clipsearch.index import codebooks
    from clipsearch.index.build import configure_training

    fill = train if fill is None else fill
    key, nlist = scaled_factory(factory, n_full, len(fill))
    index = faiss.index_factory(train.shape[1], key, faiss_metric(factory))
    configure_training(index)
    stack = [index]
    while stack:  # short k-means on at most EVAL_DB points per codebook: a comparison, not a build
        idx = faiss.downcast_index(stack.pop())
        for attr in ("base_index", "refine_index"):
            if getattr(idx, attr, None) is not None:
                stack.append(getattr(idx, attr))
        for attr in ("pq", "refine_pq"):
            pq = getattr(idx, attr, None)
            if pq is not None:
                pq.cp.niter = ITERATIONS
                pq.cp.max_points_per_centroid = max(1, EVAL_DB // pq.ksub)
                pq.cp.min_points_per_centroid = min(
                    pq.cp.min_points_per_centroid, pq.cp.max_points_per_centroid
                )
        if isinstance(idx, faiss.IndexIVF):
            idx.cp.niter = ITERATIONS
    x = np.ascontiguousarray(train[: max(EVAL_DB, COARSE_POINTS_PER_LIST * nlist)])
    codebooks.train(index, x, codebook_points=EVAL_DB)
    index.add(fill)
    return index, nlist


def recall_at_operating_point(
    index, nlist: int, q: np.ndarray, gt: np.ndarray, probe_share: float = PROBE_SHARE, k_factor: float = 0.0
) -> float:
    """recall@10 with probe_share of the lists probed and k_factor x 10 candidates re-ranked (default:
    RERANK_SHARE of the points)."""
    import faiss

    from clipsearch.index.tune import recall_at_k

    ps = faiss.ParameterSpace()
    if nlist:
        ps.set_index_parameter(index, "nprobe", max(1, int(nlist * probe_share)))
    k_factor = max(1.0, k_factor or RERANK_SHARE * index.ntotal / 10)
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexRefine):
        ps.set_index_parameter(index, "k_factor_rf", k_factor)
    elif isinstance(top, faiss.IndexIVFPQR):
        top.k_factor = k_factor
    _, ids = index.search(q, 10)
    return recall_at_k(ids, gt)


def decide(gains: dict[str, float], full_scan: bool = False) -> tuple[bool, str]:
    """Whether a residual plan is taken over the flat family, from its recall gains per query set, and
    why (module docstring). `full_scan`: the plan scans every vector (one list), like the flat family."""
    if "text-like queries" in gains:
        g = gains["text-like queries"]
        return g >= MIN_GAIN, f"finds {g:+.3f} on text-like queries (needs {MIN_GAIN})"
    near, far = gains["held-out points"], gains["random directions"]
    why = f"finds {near:+.3f} on held-out points (needs {MIN_GAIN}) and {far:+.3f} on random directions"
    if full_scan:
        mean = (near + far) / 2
        return near >= MIN_GAIN and mean >= MIN_GAIN, f"{why} (mean {mean:+.3f}, needs {MIN_GAIN})"
    return near >= MIN_GAIN and far >= -BLIND_TOLERANCE, f"{why} (needs {-BLIND_TOLERANCE})"


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _rotated(sample: np.ndarray, order: np.ndarray, m: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """sample[order] @ m.T as one float32 array, built a chunk at a time (no second copy of the sample)."""
    out = np.empty((len(order), m.shape[0]), dtype=np.float32)
    for i in range(0, len(order), chunk):
        out[i : i + chunk] = sample[order[i : i + chunk]].astype(np.float32) @ m.T
    return out


def choose(
    plans: list[Plan], n_full: int, sample: np.ndarray, text_queries: np.ndarray | None = None, seed: int = 0
) -> FamilyChoice:
    """The plan whose codes find the most of the exact top-10 on the sample (module docstring)."""
    import faiss

    if len(plans) < 2:
        return FamilyChoice(plans[0], "one candidate")
    if len(sample) < rotation.MIN_SAMPLE:
        return FamilyChoice(plans[0], f"training sample too small to compare ({len(sample)} points)")
    t0 = time.perf_counter()
    d = sample.shape[1]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(sample))
    db = np.ascontiguousarray(sample[perm[: min(EVAL_DB, len(sample))]], dtype=np.float32)
    text = text_queries is not None and len(text_queries) >= 100
    if text:
        sets = {"text-like queries": (_unit(text_queries[:EVAL_QUERIES]), PROBE_SHARE)}
    else:
        held = sample[perm[len(db) :][:EVAL_QUERIES]]
        if len(held) < 100:  # a small sample: points of the db itself, their own match left in
            held = db[:EVAL_QUERIES]
        sets = {
            "held-out points": (_unit(held), BLIND_PROBE_SHARE),
            "random directions": (random_directions(BLIND_RANDOM_QUERIES, d, rng), BLIND_PROBE_SHARE),
        }
    est: dict[str, dict[str, float]] = {name: {} for name in sets}
    for p in plans:
        sizes = rotation.sub_vector_sizes(p.factory, d) or (1,)
        # measured as it will be built: rotated, unless the rotation does not fit beside its codes
        m = rotation.balanced_pca(db, sizes) if p.rotation_fits else np.eye(d, dtype=np.float32)
        # with text-like queries: trained on the start of the shuffled sample, filled with all of it
        x = _rotated(sample, perm, m) if text else np.ascontiguousarray(db @ m.T)
        index, nlist = build_small(p.factory, n_full, x)
        k_factor = FULL_K_FACTOR * min(1.0, len(x) / n_full) if text else 0.0
        for name, (q, share) in sets.items():
            qq = np.ascontiguousarray(q @ m.T)
            _, gt = faiss.knn(qq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
            est[name][p.factory] = round(recall_at_operating_point(index, nlist, qq, gt, share, k_factor), 4)
        searched = len(x)
        del x, index
    first = plans[0]
    taken: list[tuple[float, Plan]] = []
    whys = []
    for other in plans[1:]:
        gains = {name: e[other.factory] - e[first.factory] for name, e in est.items()}
        ok, why = decide(gains, full_scan=scans_everything(other.factory))
        whys.append(f"{other.factory} {why}")
        if ok:  # the residual candidate that finds the most where it is taken (text-like, else up close)
            taken.append((next(iter(gains.values())), other))
    how = (
        "; ".join(
            f"{name}: " + ", ".join(f"{p.factory} {e[p.factory]:.3f}" for p in plans)
            for name, e in est.items()
        )
        + f" (recall@10 over {searched} sample points, {time.perf_counter() - t0:.0f} s)"
    )
    plan = max(taken, key=lambda t: t[0])[1] if taken else first
    choice = FamilyChoice(plan, f"{plan.factory}: " + "; ".join(whys) + f": {how}", est)
    logger.info("code family: %s", choice.reason)
    return choice
