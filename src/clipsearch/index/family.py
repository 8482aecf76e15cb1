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
on sample points, filled with EVAL_DB of them, searched with the queries, each at a generous operating
point (RERANK_SHARE of the points re-ranked; a quarter of the lists probed) so that the comparison is
of what the codes can reach, which the tuner then buys within the query-time budget. The queries are
the text-like tuning queries when there are any, else random directions, as in rotation.choose.

Without text-like queries the choice is conservative on purpose. What decides between the families is
how far text queries lie from the images (the modality gap), and image vectors alone do not show it:
on the development draws of benchmarks/geometries.py, no query stand-in drawn from the sample (held-out
points, centred points, Gaussian draws with the sample's covariance) ranked the families as text queries
do on both `steep` (small gap: the residual family wins by 0.06) and `clip` (a CLIP-like gap: the flat
family wins by 0.06). Random directions, the widest gap, keep the flat family on every geometry; on the
one where that costs recall (steep), a user gets the residual family by giving text-like queries or the
model (docs/bench-index.md). The residual family must win by MIN_GAIN:
the flat family is the default (it also serves memory-mapped lists and per-request re-rank depths).
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

logger = logging.getLogger(__name__)

MIN_GAIN = 0.01
EVAL_DB = 12_000
EVAL_QUERIES = 400
RERANK_SHARE = 0.05  # candidates re-ranked, as a share of the points searched
PROBE_SHARE = 0.25  # lists probed by the residual family
ITERATIONS = 10


@dataclass
class FamilyChoice:
    plan: Plan
    reason: str
    estimates: dict = field(default_factory=dict)  # factory -> recall@10

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


def recall_at_operating_point(index, nlist: int, q: np.ndarray, gt: np.ndarray) -> float:
    """recall@10 with RERANK_SHARE of the points re-ranked and PROBE_SHARE of the lists probed."""
    import faiss

    from clipsearch.index.tune import recall_at_k

    ps = faiss.ParameterSpace()
    if nlist:
        ps.set_index_parameter(index, "nprobe", max(1, int(nlist * PROBE_SHARE)))
    k_factor = max(1.0, RERANK_SHARE * index.ntotal / 10)
    top = faiss.downcast_index(index)
    if isinstance(top, faiss.IndexRefine):
        ps.set_index_parameter(index, "k_factor_rf", k_factor)
    elif isinstance(top, faiss.IndexIVFPQR):
        top.k_factor = k_factor
    _, ids = index.search(q, 10)
    return recall_at_k(ids, gt)


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
    pick = rng.permutation(len(sample))[: min(EVAL_DB, len(sample))]
    db = np.ascontiguousarray(sample[pick], dtype=np.float32)
    if text_queries is not None and len(text_queries) >= 100:
        q, what_q = np.ascontiguousarray(text_queries[:EVAL_QUERIES], dtype=np.float32), "text-like queries"
    else:
        q = rng.standard_normal((EVAL_QUERIES, d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        what_q = "random directions"
    est: dict[str, float] = {}
    for p in plans:
        sizes = rotation.sub_vector_sizes(p.factory, d) or (1,)
        m = rotation.balanced_pca(db, sizes)
        x, qq = np.ascontiguousarray(db @ m.T), np.ascontiguousarray(q @ m.T)
        _, gt = faiss.knn(qq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        index, nlist = build_small(p.factory, n_full, x)
        est[p.factory] = round(recall_at_operating_point(index, nlist, qq, gt), 4)
    first, second = plans[0], plans[1]
    gain = est[second.factory] - est[first.factory]
    how = (
        f"{first.factory}: {est[first.factory]:.3f}, {second.factory}: {est[second.factory]:.3f} recall@10 "
        f"of {len(q)} {what_q} over {len(db)} sample points, {time.perf_counter() - t0:.0f} s"
    )
    if gain >= MIN_GAIN:
        choice = FamilyChoice(second, f"{second.factory} finds {gain:+.3f} more neighbours ({how})", est)
    else:
        choice = FamilyChoice(
            first, f"{first.factory}: the alternative finds {gain:+.3f} < {MIN_GAIN} more ({how})", est
        )
    logger.info("code family: %s", choice.reason)
    return choice
