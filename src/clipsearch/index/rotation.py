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
the rotation) is trained on part of the sample, and the recall@10 of held-out sample points against
exact search over another part is measured for the plan's ranking codes and re-rank codes, each
scanned alone. The rotation is kept only when it measures better.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

NAME = "pca-balanced"
MIN_GAIN = 0.005  # mean recall gain below which the raw coordinates are kept (noise of the estimate)
EVAL_DB = 30_000  # sample points the estimate searches over
EVAL_QUERIES = 500  # held-out sample points used as queries
TRAIN_POINTS = 20_000  # points the candidate codecs train on (fewer than the build: the estimate is relative)
PQ_ITERATIONS = 10


def balanced_pca(sample: np.ndarray, group: int) -> np.ndarray:
    """A d x d orthogonal matrix (rows: output coordinates). Principal axes, dealt to the d/group
    sub-vectors so that each sub-vector's product of variances is balanced: the largest remaining
    variance goes to the sub-vector with the smallest log-variance sum that still has room."""
    x = np.asarray(sample, dtype=np.float64)
    d = x.shape[1]
    if d % group:
        raise ValueError(f"dimension {d} is not a multiple of the sub-vector size {group}")
    xc = x - x.mean(axis=0)
    cov = xc.T @ xc / max(1, len(x) - 1)
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1]
    lam, vec = np.maximum(lam[order], lam[order][0] * 1e-9), vec[:, order]
    logl = np.log(lam) - np.log(lam[-1])  # >= 0, so adding an axis never lowers a bucket's sum
    nb = d // group
    members: list[list[int]] = [[] for _ in range(nb)]
    score = np.zeros(nb)
    for j in range(d):
        room = [b for b in range(nb) if len(members[b]) < group]
        b = min(room, key=lambda b: score[b])
        members[b].append(j)
        score[b] += logl[j]
    perm = [j for b in members for j in b]
    return np.ascontiguousarray(vec[:, perm].T, dtype=np.float32)


def transform(matrix: np.ndarray):
    """A trained faiss LinearTransform y = matrix @ x (no bias)."""
    import faiss

    d_out, d_in = matrix.shape
    lt = faiss.LinearTransform(d_in, d_out, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(matrix, dtype=np.float32).ravel(), lt.A)
    lt.is_trained = True
    return lt


def sub_vector_size(factory: str, d: int) -> int | None:
    """The smallest PQ sub-vector size of a plan's factory string, or None when it has no PQ codes
    (scalar or flat codes do not depend on how the coordinates are split)."""
    sizes = [d // int(m) for m in re.findall(r"PQ(\d+)", factory) if int(m) and d % int(m) == 0]
    return min(sizes) if sizes else None


@dataclass
class Choice:
    rotation: str | None  # NAME or None
    matrix: np.ndarray | None
    reason: str
    estimates: dict = field(default_factory=dict)  # candidate -> {codes: recall@10}

    def to_json(self) -> dict:
        return {"chosen": self.rotation or "none", "reason": self.reason, "estimates": self.estimates}


def _codecs(factory: str) -> list[str]:
    """The plan's code factories to estimate, each scanned on its own: the ranker (IVF stripped, its
    codes are then exhaustive) and the re-rank codes."""
    parts = []
    m = re.search(r"Refine\(([^)]*)\)", factory)
    head = re.sub(r",?Refine\([^)]*\)|,RFlat", "", factory)
    head = ",".join(p for p in head.split(",") if not p.startswith(("IVF", "OPQ", "PCA")))
    if head and "PQ" in head:
        parts.append(head.replace("x4fsr", "x4fs"))
    if m and "PQ" in m.group(1):
        parts.append(m.group(1))
    return parts


def _estimate(codec: str, train: np.ndarray, db: np.ndarray, q: np.ndarray, gt: np.ndarray) -> float:
    import faiss

    from clipsearch.index.build import configure_training
    from clipsearch.index.tune import recall_at_k

    index = faiss.index_factory(db.shape[1], codec, faiss.METRIC_INNER_PRODUCT)
    configure_training(index)
    pq = getattr(faiss.downcast_index(index), "pq", None)
    if pq is not None:
        pq.cp.niter = min(pq.cp.niter, PQ_ITERATIONS)
    index.train(train)
    index.add(db)
    _, ids = index.search(q, gt.shape[1])
    return recall_at_k(ids, gt)


def choose(factory: str, sample: np.ndarray, seed: int = 0) -> Choice:
    """Rotate or not, for this plan, decided on the training sample (module docstring)."""
    import faiss

    d = sample.shape[1]
    group = sub_vector_size(factory, d)
    if group is None or group >= d:
        return Choice(None, None, "no product-quantized codes: the split of coordinates does not matter")
    codecs = _codecs(factory)
    need = EVAL_QUERIES + 2000
    if not codecs or len(sample) < need:
        return Choice(None, None, f"training sample too small to compare rotations ({len(sample)} < {need})")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(sample))
    q = np.ascontiguousarray(sample[perm[:EVAL_QUERIES]], dtype=np.float32)
    rest = perm[EVAL_QUERIES:]
    db = np.ascontiguousarray(sample[rest[:EVAL_DB]], dtype=np.float32)
    train = np.ascontiguousarray(sample[rest[:TRAIN_POINTS]], dtype=np.float32)
    _, gt = faiss.knn(q, db, 10, metric=faiss.METRIC_INNER_PRODUCT)
    matrix = balanced_pca(train, group)
    candidates = {"none": None, NAME: matrix}
    est: dict[str, dict[str, float]] = {}
    for name, mat in candidates.items():
        rot = (lambda x: x) if mat is None else (lambda x, mat=mat: np.ascontiguousarray(x @ mat.T))
        est[name] = {c: round(_estimate(c, rot(train), rot(db), rot(q), gt), 4) for c in codecs}
    mean = {name: float(np.mean(list(v.values()))) for name, v in est.items()}
    gain = mean[NAME] - mean["none"]
    secs = time.perf_counter() - t0
    what = ", ".join(f"{c}: {est['none'][c]:.3f} -> {est[NAME][c]:.3f}" for c in codecs)
    if gain >= MIN_GAIN:
        reason = f"balanced PCA rotation raises sample recall@10 by {gain:+.3f} ({what}; {secs:.0f} s)"
        choice = Choice(NAME, matrix, reason, est)
    else:
        reason = f"raw coordinates: the rotation gains {gain:+.3f} < {MIN_GAIN} ({what}; {secs:.0f} s)"
        choice = Choice(None, None, reason, est)
    logger.info("rotation: %s", reason)
    return choice
