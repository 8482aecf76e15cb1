"""Rotate before quantizing, when the data says so.

Product quantizers split a vector into sub-vectors and quantize each with its own small codebook. On
isotropic data every sub-vector carries the same variance and the split does not matter. Real CLIP
embeddings are not isotropic: a few dozen directions carry most of the variance, and some coordinates
carry far more than others. Split along raw coordinates, some sub-quantizers then spend their
centroids on noise while others are starved, and correlations between sub-vectors are lost.

The balanced PCA rotation (the parametric solution of optimized product quantization, Ge et al.,
CVPR 2013) rotates onto the principal axes, then deals the axes out to the sub-vectors so that the
product of the variances is the same in every sub-vector: each gets an equal share of the
(log-)variance, and the axes inside a sub-vector are uncorrelated. It is a plain orthogonal matrix,
so inner products are unchanged: queries and vectors go through the same `LinearTransform` (no bias:
a centring would shift inner products by a per-vector term) in an `IndexPreTransform`.

Whether to rotate is decided on the training sample (`choose`): each candidate (raw coordinates, or
the rotation) gets stand-ins of the plan's PQ codes trained on sample points, and the share of the
exact top-10 they find over those points is measured for a set of queries. The queries are the
text-like tuning queries when there are any; otherwise random directions. Text queries come from
another distribution than the images, and the image distribution itself is no guide to them: on CLIP-like
data, same-modality queries judge the rotation worse while text queries find more with it (0.850 ->
0.874 recall@10 on our `clip` geometry). A random direction weighs every direction of the data
alike, which is what a code must preserve for queries it knows nothing of; with it, the estimate
ranks the candidates as text queries do on all five geometries of benchmarks/geometries.py
(docs/bench-index.md). The rotation is kept only when it finds at least MIN_GAIN more neighbours.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np

from clipsearch.index.tune import random_directions

logger = logging.getLogger(__name__)

NAME = "pca-balanced"
MIN_GAIN = 0.01  # mean recall gain below which the raw coordinates are kept (noise of the estimate)
EVAL_DB = 20_000  # sample points the candidate codes are trained on and searched over
EVAL_QUERIES = 500
MIN_SAMPLE = 5_000
PQ_ITERATIONS = 10


def balanced_pca(sample: np.ndarray, groups: int | tuple[int, ...]) -> np.ndarray:
    """A d x d orthogonal matrix (rows: output coordinates): principal axes, dealt to sub-vectors so
    that each sub-vector's product of variances is balanced.

    `groups` are the plan's PQ sub-vector sizes, coarsest first (e.g. (4, 2) for a PQ{d/4} ranker in
    front of PQ{d/2} re-rank codes): the axes are dealt to sub-vectors of the coarsest size (the
    largest remaining variance to the sub-vector with the smallest log-variance sum that still has
    room), then each sub-vector is split the same way into the finer sizes, so every code sees
    balanced sub-vectors."""
    x = np.asarray(sample, dtype=np.float64)
    d = x.shape[1]
    sizes = sorted({groups} if isinstance(groups, int) else set(groups), reverse=True)
    if any(d % g for g in sizes) or any(a % b for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(f"sub-vector sizes {sizes} do not nest in dimension {d}")
    xc = x - x.mean(axis=0)
    cov = xc.T @ xc / max(1, len(x) - 1)
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1]
    lam, vec = np.maximum(lam[order], lam[order][0] * 1e-9), vec[:, order]
    logl = np.log(lam) - np.log(lam[-1])  # >= 0, so adding an axis never lowers a bucket's sum
    buckets = [list(range(d))]  # axes, largest variance first
    for g in sizes:
        buckets = [b for axes in buckets for b in _deal(axes, g, logl)]
    perm = [j for b in buckets for j in b]
    return np.ascontiguousarray(vec[:, perm].T, dtype=np.float32)


def _deal(axes: list[int], group: int, logl: np.ndarray) -> list[list[int]]:
    """Split axes (largest variance first) into buckets of `group`, balancing their log-variance sums."""
    nb = len(axes) // group
    members: list[list[int]] = [[] for _ in range(nb)]
    score = np.zeros(nb)
    for j in sorted(axes, key=lambda a: -logl[a]):
        room = [b for b in range(nb) if len(members[b]) < group]
        b = min(room, key=lambda b: score[b])
        members[b].append(j)
        score[b] += logl[j]
    return members


def transform(matrix: np.ndarray):
    """A trained faiss LinearTransform y = matrix @ x (no bias)."""
    import faiss

    d_out, d_in = matrix.shape
    lt = faiss.LinearTransform(d_in, d_out, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(matrix, dtype=np.float32).ravel(), lt.A)
    lt.is_trained = True
    return lt


def sub_vector_sizes(factory: str, d: int) -> tuple[int, ...]:
    """The PQ sub-vector sizes of a plan's factory string, coarsest first; () when it has no PQ codes
    (scalar or flat codes do not depend on how the coordinates are split)."""
    ms = re.findall(r"PQ(\d+)", factory) + re.findall(r"PQ\d+\+(\d+)", factory)  # + IVFPQR's second level
    sizes = {d // int(m) for m in ms if int(m) and d % int(m) == 0}
    return tuple(sorted(sizes, reverse=True))


@dataclass
class Choice:
    rotation: str | None  # NAME or None
    reason: str
    estimates: dict = field(default_factory=dict)  # candidate -> {code: recall}

    def to_json(self) -> dict:
        return {"chosen": self.rotation or "none", "reason": self.reason, "estimates": self.estimates}


def _codes(factory: str) -> list[tuple[str, str, int]]:
    """(what, factory of a cheap stand-in with the same sub-vectors, recall depth) of each PQ code of a
    plan: the ranker's codes (IVF stripped: scanned exhaustively), judged by the share of the true top-10
    in its top 40 (what it hands to the re-rank); the re-rank codes, judged by recall@10. Codes of more
    than 4 bits are stood in for by 4-bit codes over the same sub-vectors: the split is what a rotation
    changes, and 16-centroid k-means trains in seconds where 256 or more take minutes."""
    out = []
    m = re.search(r"Refine\(([^)]*)\)", factory)
    head = re.sub(r",?Refine\([^)]*\)|,RFlat", "", factory)
    for part in head.split(","):
        pq = re.fullmatch(r"PQ(\d+)(?:x\d+)?(fs|fsr)?", part)
        if pq:
            out.append((part, f"PQ{pq.group(1)}x4fs", 40))
        two = re.fullmatch(r"PQ(\d+)\+(\d+)", part)  # IVFPQR: a scanned level, then a re-rank level
        if two:
            out.append((f"PQ{two.group(1)}", f"PQ{two.group(1)}x4fs", 40))
            out.append((f"PQ{two.group(2)}", f"PQ{two.group(2)}x4fs", 10))
    if m:
        pq = re.fullmatch(r"PQ(\d+)(?:x\d+)?(fs|fsr)?", m.group(1))
        if pq:
            out.append((m.group(1), f"PQ{pq.group(1)}x4fs", 10))
    return out


def _estimate(codec: str, depth: int, db: np.ndarray, q: np.ndarray, gt: np.ndarray) -> float:
    """Share of the exact top-10 of q over db found in the codec's top `depth`."""
    import faiss

    from clipsearch.index.tune import recall_at_k

    index = faiss.index_factory(db.shape[1], codec, faiss.METRIC_INNER_PRODUCT)
    pq = getattr(faiss.downcast_index(index), "pq", None)
    if pq is not None:
        pq.cp.niter = PQ_ITERATIONS
    index.train(db)
    index.add(db)
    _, ids = index.search(q, depth)
    return recall_at_k(ids, gt, depth)  # true top-10 found among the first `depth`


def choose(factory: str, sample: np.ndarray, text_queries: np.ndarray | None = None, seed: int = 0) -> Choice:
    """Rotate or not, for this plan, decided on the training sample (module docstring)."""
    import faiss

    d = sample.shape[1]
    sizes = sub_vector_sizes(factory, d)
    codes = _codes(factory)
    if not sizes or not codes or max(sizes) >= d:
        return Choice(None, "no product-quantized codes: the split of coordinates does not matter")
    if len(sample) < MIN_SAMPLE:
        return Choice(None, f"training sample too small to compare rotations ({len(sample)} < {MIN_SAMPLE})")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    db = np.ascontiguousarray(sample[rng.permutation(len(sample))[:EVAL_DB]], dtype=np.float32)
    if text_queries is not None and len(text_queries) >= 100:
        q, what_q = np.ascontiguousarray(text_queries[:EVAL_QUERIES], dtype=np.float32), "text-like queries"
    else:
        q, what_q = random_directions(EVAL_QUERIES, d, rng), "random directions"
    matrix = balanced_pca(db, sizes)
    est: dict[str, dict[str, float]] = {}
    for name, mat in (("none", None), (NAME, matrix)):
        x, qq = (
            (db, q) if mat is None else (np.ascontiguousarray(db @ mat.T), np.ascontiguousarray(q @ mat.T))
        )
        _, gt = faiss.knn(qq, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        est[name] = {what: round(_estimate(codec, depth, x, qq, gt), 4) for what, codec, depth in codes}
    mean = {name: float(np.mean(list(v.values()))) for name, v in est.items()}
    gain = mean[NAME] - mean["none"]
    what = ", ".join(f"{c}: {est['none'][c]:.3f} -> {est[NAME][c]:.3f}" for c, _, _ in codes)
    how = f"{what}; {len(q)} {what_q} over {len(db)} sample points, {time.perf_counter() - t0:.0f} s"
    if gain >= MIN_GAIN:
        choice = Choice(NAME, f"the balanced PCA rotation finds {gain:+.3f} more neighbours ({how})", est)
    else:
        choice = Choice(
            None, f"raw coordinates: the rotation finds {gain:+.3f} < {MIN_GAIN} more ({how})", est
        )
    logger.info("rotation: %s", choice.reason)
    return choice
