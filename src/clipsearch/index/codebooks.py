"""Codebooks of 2-d product quantizers, trained from a Gaussian start.

The planner's most precise re-rank codes are PQ over 2-d sub-vectors (`Refine(PQ{d/2}x8/x9/x10)`, and
the second level of the residual family `IVF{nlist},PQ{m1}+{d/2}`). faiss trains each of their
sub-quantizers by k-means from randomly drawn points; in 2-d, with 256 to 1024 centroids, that start
is far from the optimum and 25 Lloyd iterations do not get there. After the balanced rotation each
2-d sub-vector is close to a Gaussian blob, so the k-means codebook of a standard 2-d normal, mapped
through the sub-vector's own mean and covariance, is already a better codebook than faiss's trained
one, and a few Lloyd iterations from there adapt it to the real shape.

Measured on the second residual of outliers-200k (PQ256x8): mean squared error 0.00083 with faiss's
training inside the index (about 20 s), about 0.0007 from the Gaussian start and 5 iterations (5-12 s);
text-query recall@10 of the built index 0.916 -> 0.925 (docs/bench-index.md, session 10).

`train(index, x)` is `index.train(x)` with faiss's own k-means for these quantizers switched off (no
iterations) and replaced afterwards, on the same input each level would have seen.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import numpy as np

from clipsearch.index.build import faiss_mod, typed

logger = logging.getLogger(__name__)

LLOYD_ITERATIONS = 5
MAX_POINTS = 131_072  # training points per sub-quantizer (every point is a 2-d pair: cheap)
# made by `python -m clipsearch.index.codebooks`
SHIPPED = os.path.join(os.path.dirname(__file__), "gauss2d.npz")
# the shipped codebooks: Lloyd in 2-d converges slowly, so they take minutes to make (with 256 points per
# centroid and 50 iterations, the 256-centroid codebook's error on the normal is 0.01666; shipped: 0.0155)
MAKE_POINTS_PER_CENTROID = 4096
MAKE_ITERATIONS = 1000
# for sizes not shipped: a quick, rougher codebook
QUICK_POINTS_PER_CENTROID = 1024
QUICK_ITERATIONS = 100


def make_gaussian_codebook(k: int, points_per_centroid: int, iterations: int) -> np.ndarray:
    """(k, 2) k-means centroids of the standard 2-d normal (deterministic)."""
    faiss = faiss_mod()
    g = np.random.default_rng(0).standard_normal((points_per_centroid * k, 2)).astype(np.float32)
    km = faiss.Kmeans(2, k, niter=iterations, max_points_per_centroid=points_per_centroid, seed=0)
    km.train(g)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def gaussian_codebook(k: int) -> np.ndarray:
    """(k, 2) centroids of the standard 2-d normal: shipped for 256, 512 and 1024, else made here."""
    if os.path.exists(SHIPPED):
        with np.load(SHIPPED) as z:
            if f"k{k}" in z.files:
                return np.ascontiguousarray(z[f"k{k}"], dtype=np.float32)
    logger.info("no shipped Gaussian codebook of %d centroids: making one", k)
    return make_gaussian_codebook(k, QUICK_POINTS_PER_CENTROID, QUICK_ITERATIONS)


def is_2d(pq) -> bool:
    return pq.dsub == 2


def train_2d_pq(pq, x: np.ndarray, niter: int = LLOYD_ITERATIONS, seed: int = 0) -> None:
    """Train a 2-d ProductQuantizer in place: per sub-vector, the Gaussian codebook mapped through the
    sub-vector's mean and covariance, then `niter` Lloyd iterations on up to MAX_POINTS points."""
    faiss = faiss_mod()
    if not is_2d(pq):
        raise ValueError(f"train_2d_pq needs 2-d sub-vectors, got {pq.dsub}")
    x = np.asarray(x, dtype=np.float32)
    x = _at_most(x, MAX_POINTS, seed)
    canon = gaussian_codebook(pq.ksub)
    out = np.empty((pq.M, pq.ksub, 2), dtype=np.float32)
    for m in range(pq.M):
        sub = np.ascontiguousarray(x[:, 2 * m : 2 * m + 2])
        mu = sub.mean(axis=0)
        cov = np.cov(sub, rowvar=False) if len(sub) > 1 else np.eye(2)
        w, v = np.linalg.eigh(cov)
        start = (canon * np.sqrt(np.maximum(w, 0.0))) @ v.T + mu
        if niter <= 0 or len(sub) < pq.ksub:
            out[m] = start
            continue
        cp = faiss.ClusteringParameters()
        cp.niter = niter
        cp.max_points_per_centroid = max(1, len(sub) // pq.ksub + 1)  # no second subsampling
        cp.min_points_per_centroid = 1
        cp.seed = seed + m
        clus = faiss.Clustering(2, pq.ksub, cp)
        faiss.copy_array_to_vector(np.ascontiguousarray(start, dtype=np.float32).ravel(), clus.centroids)
        clus.train(sub, faiss.IndexFlatL2(2))
        out[m] = faiss.vector_to_array(clus.centroids).reshape(pq.ksub, 2)
    faiss.copy_array_to_vector(out.ravel(), pq.centroids)


def _at_most(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """x, or n of its rows drawn at random (in order), as contiguous float32."""
    if len(x) > n:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]
    return np.ascontiguousarray(x, dtype=np.float32)


def _deferred(index) -> list[tuple[str, object]]:
    """The 2-d PQs of an index tree with how their input is derived from the index's input:
    ("raw", pq) for a refine IndexPQ (IndexRefine trains it on the vectors themselves), ("pqr", pq)
    for IndexIVFPQR's second level (trained on what the coarse centroid and first PQ leave)."""
    faiss = faiss_mod()
    idx = typed(index)
    out = []
    if isinstance(idx, faiss.IndexRefine):
        ref = typed(idx.refine_index)
        if isinstance(ref, faiss.IndexPQ) and is_2d(ref.pq):
            out.append(("raw", ref.pq))
    if isinstance(idx, faiss.IndexIVFPQR) and is_2d(idx.refine_pq):
        out.append(("pqr", idx.refine_pq))
    return out


def train(index, x: np.ndarray, codebook_points: int | None = None) -> None:
    """`index.train(x)`, its 2-d PQs trained from the Gaussian start on their own input (derived from
    the first codebook_points rows of x, default all; x in the index's own coordinates, i.e. after any
    rotation)."""
    faiss = faiss_mod()
    idx = typed(index)
    deferred = _deferred(idx)
    for _, pq in deferred:
        pq.cp.niter = 0  # faiss's k-means: only its random start is left, replaced below
    index.train(x)
    x = _at_most(x[:codebook_points] if codebook_points else x, MAX_POINTS)
    for where, pq in deferred:
        t0 = time.perf_counter()
        if where == "raw":
            train_2d_pq(pq, x)
        else:
            _, assign = idx.quantizer.search(x, 1)
            r1 = np.empty_like(x)
            idx.quantizer.compute_residual_n(
                len(x), faiss.swig_ptr(x), faiss.swig_ptr(r1), faiss.swig_ptr(assign)
            )
            train_2d_pq(pq, r1 - idx.pq.decode(idx.pq.compute_codes(r1)))
        logger.info(
            "trained PQ%dx%d codebooks from a Gaussian start in %.1f s",
            pq.M,
            pq.nbits,
            time.perf_counter() - t0,
        )


if __name__ == "__main__":  # regenerate the shipped codebooks
    faiss_mod().omp_set_num_threads(os.cpu_count() or 1)
    books = {}
    for k in (256, 512, 1024):
        t0 = time.perf_counter()
        books[f"k{k}"] = make_gaussian_codebook(k, MAKE_POINTS_PER_CENTROID, MAKE_ITERATIONS)
        print(f"{k} centroids in {time.perf_counter() - t0:.0f} s", flush=True)
    np.savez(SHIPPED, **books)
