"""Which code family serves the data, measured on the training sample.

The planner offers two plans for a quantized index (index.plan.plan_candidates):

- the flat fast-scan family, `PQ{d/4}x4fs,Refine(PQ{d/2}x8)` and its IVF variants: every vector's
  4-bit code is scanned, the best candidates re-ranked with finer codes. It ranks queries that lie far
  from the images (a wide modality gap, a flat spectrum) well, because it looks at everything;
- the two-level residual family, `IVF{nlist},PQ{m1}+{m2}` (faiss's IVFPQR): a coarse centroid, a code of
  the residual, then a code of what is left. Where the variance sits in few directions, the centroid
  and the first code take most of it and the second code spends its bytes on the rest, so its
  re-rank is more precise for the same bytes; but only the probed lists are looked at.

Neither wins everywhere (docs/bench-index.md), so both are built at the scale of the sample: trained
on sample points, filled with EVAL_DB of them, and searched, each at the operating point the tuner will
buy within the query-time budget: RERANK_SHARE of the points re-ranked, and, with text-like queries,
a quarter of the lists probed (where the text tuner's curve bends), without them all of them (the
budget rule spends the budget). The residual family must win by MIN_GAIN; the flat family is the
default (it also serves memory-mapped lists and per-request re-rank depths).

With text-like tuning queries (--tuning-queries, captions, --clip-model), they decide. Without, what
decides between the families is how far text queries will lie from the images (the modality gap), and
image vectors alone do not show it. So the two ends of that range are measured instead: held-out sample
points (no gap) and random directions (the widest gap, nothing near). The residual family is taken only
where it wins at the near end by MIN_GAIN and loses at most BLIND_TOLERANCE at the far end, so that it
holds whatever the gap turns out to be; text queries lie between the two. On the development draws of
benchmarks/geometries.py this takes it on `steep` (small gap, most variance in few directions) and keeps
the flat family on the four others, where random directions cost it 0.05-0.13 (docs/bench-index.md).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from clipsearch.index import rotation
from clipsearch.index.plan import Plan, faiss_metric
from clipsearch.index.tune import random_directions

logger = logging.getLogger(__name__)

MIN_GAIN = 0.01
EVAL_DB = 12_000
EVAL_QUERIES = 400
RERANK_SHARE = 0.05  # candidates re-ranked, as a share of the points searched
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
    per_list = n_full / int(m.group(1))
    nl = max(8, 2 ** round(math.log2(max(1.0, n_small / per_list))))
    return f"IVF{nl}" + factory[m.end() :], nl


def build_small(factory: str, n_full: int, db: np.ndarray):
    """The plan's index built over db (already rotated) with short k-means: (index, its list count)."""
    import faiss

    from clipsearch.index.build import configure_training

    key, nlist = scaled_factory(factory, n_full, len(db))
    index = faiss.index_factory(db.shape[1], key, faiss_metric(factory))
    configure_training(index)
    stack = [index]
    while stack:  # short k-means: a comparison, not a build
        idx = faiss.downcast_index(stack.pop())
        for attr in ("base_index", "refine_index"):
            if getattr(idx, attr, None) is not None:
                stack.append(getattr(idx, attr))
        for attr in ("pq", "refine_pq"):
            pq = getattr(idx, attr, None)
            if pq is not None:
                pq.cp.niter = ITERATIONS
        if isinstance(idx, faiss.IndexIVF):
            idx.cp.niter = ITERATIONS
    index.train(db)
    index.add(db)
    return index, nlist


def recall_at_operating_point(
    index, nlist: int, q: np.ndarray, gt: np.ndarray, probe_share: float = PROBE_SHARE
) -> float:
    """recall@10 with RERANK_SHARE of the points re-ranked and probe_share of the lists probed."""
    import faiss

    from clipsearch.index.tune import recall_at_k

    ps = faiss.ParameterSpace()
    if nlist:
        ps.set_index_parameter(index, "nprobe", max(1, int(nlist * probe_share)))
    k_factor = max(1.0, RERANK_SHARE * index.ntotal / 10)
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexRefine):
        ps.set_index_parameter(index, "k_factor_rf", k_factor)
    elif isinstance(top, faiss.IndexIVFPQR):
        top.k_factor = k_factor
    _, ids = index.search(q, 10)
    return recall_at_k(ids, gt)


def decide(gains: dict[str, float]) -> tuple[bool, str]:
    """Whether the second (residual) family is taken, from its recall gains over the first per query set,
    and why (module docstring)."""
    if "text-like queries" in gains:
        g = gains["text-like queries"]
        return g >= MIN_GAIN, f"finds {g:+.3f} on text-like queries (needs {MIN_GAIN})"
    near, far = gains["held-out points"], gains["random directions"]
    why = f"finds {near:+.3f} on held-out points (needs {MIN_GAIN}) and {far:+.3f} on random directions"
    return near >= MIN_GAIN and far >= -BLIND_TOLERANCE, f"{why} (needs {-BLIND_TOLERANCE})"


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


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
        m = rotation.balanced_pca(db, sizes)
        x = np.ascontiguousarray(db @ m.T)
        index, nlist = build_small(p.factory, n_full, x)
        for name, (q, share) in sets.items():
            qq = np.ascontiguousarray(q @ m.T)
            _, gt = faiss.knn(qq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
            est[name][p.factory] = round(recall_at_operating_point(index, nlist, qq, gt, share), 4)
    first, second = plans[0], plans[1]
    gains = {name: e[second.factory] - e[first.factory] for name, e in est.items()}
    how = (
        "; ".join(
            f"{name}: {first.factory} {e[first.factory]:.3f}, {second.factory} {e[second.factory]:.3f}"
            for name, e in est.items()
        )
        + f" (recall@10 over {len(db)} sample points, {time.perf_counter() - t0:.0f} s)"
    )
    ok, why = decide(gains)
    plan = second if ok else first
    choice = FamilyChoice(plan, f"{plan.factory}: {second.factory} {why}: {how}", est)
    logger.info("code family: %s", choice.reason)
    return choice
