"""2-d PQ codebooks trained from a Gaussian start (index/codebooks.py)."""

from __future__ import annotations

import faiss
import numpy as np

from clipsearch.index import codebooks
from clipsearch.index.build import configure_training, train_index


def anisotropic(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered rows with a decaying spectrum, L2-normalised (the shape of CLIP image embeddings)."""
    rng = np.random.default_rng(seed)
    scale = np.exp(-np.arange(d) / (d / 4)).astype(np.float32)
    centers = rng.standard_normal((500, d)).astype(np.float32) * scale
    x = centers[rng.integers(0, 500, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32) * scale
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def mse(pq, x: np.ndarray) -> float:
    return float(((x - pq.decode(pq.compute_codes(x))) ** 2).sum(1).mean())


def test_shipped_codebooks_quantize_the_normal_better_than_a_quick_kmeans():
    test = np.random.default_rng(5).standard_normal((200_000, 2)).astype(np.float32)
    for k in (256, 512, 1024):
        book = codebooks.gaussian_codebook(k)
        assert book.shape == (k, 2) and np.isfinite(book).all()
        d, _ = faiss.knn(test, book, 1)
        quick = codebooks.make_gaussian_codebook(k, 64, 20)
        dq, _ = faiss.knn(test, quick, 1)
        assert d.mean() < 0.97 * dq.mean(), k
    # 8 bits over a 2-d normal: a well-converged codebook's error is about 0.0155
    d, _ = faiss.knn(test, codebooks.gaussian_codebook(256), 1)
    assert d.mean() < 0.0158


def test_gaussian_start_beats_faiss_training_of_the_same_pq():
    x = anisotropic(30_000, 32, seed=1)
    train, held = x[:20_000], x[20_000:]
    theirs = faiss.ProductQuantizer(32, 16, 8)
    theirs.cp.niter = 25
    theirs.train(train)
    ours = faiss.ProductQuantizer(32, 16, 8)
    codebooks.train_2d_pq(ours, train)
    assert mse(ours, held) < 0.96 * mse(theirs, held), (mse(ours, held), mse(theirs, held))


def test_built_indexes_take_the_gaussian_start(tmp_path):
    x = anisotropic(24_000, 32, seed=2)
    train, held = x[:16_000], x[16_000:]
    for factory in ("PQ8x4fs,Refine(PQ16x8)", "IVF16,PQ4+16"):
        metric = faiss.METRIC_L2 if "+" in factory else faiss.METRIC_INNER_PRODUCT
        path = str(tmp_path / "trained.index")
        train_index(factory, 32, train, path)
        ours = faiss.read_index(path)
        theirs = faiss.index_factory(32, factory, metric)
        configure_training(theirs)
        theirs.train(train)
        if "+" in factory:  # the second residual level of IVFPQR
            ivf_o, ivf_t = faiss.downcast_index(ours), faiss.downcast_index(theirs)
            _, a = ivf_o.quantizer.search(held, 1)
            r1 = held - ivf_o.quantizer.reconstruct_n(0, ivf_o.nlist)[a[:, 0]]
            r2 = r1 - ivf_o.pq.decode(ivf_o.pq.compute_codes(r1))
            _, a = ivf_t.quantizer.search(held, 1)
            t1 = held - ivf_t.quantizer.reconstruct_n(0, ivf_t.nlist)[a[:, 0]]
            t2 = t1 - ivf_t.pq.decode(ivf_t.pq.compute_codes(t1))
            assert mse(ivf_o.refine_pq, r2) < 0.97 * mse(ivf_t.refine_pq, t2)
        else:
            ref_o = faiss.downcast_index(ours.refine_index).pq
            ref_t = faiss.downcast_index(theirs.refine_index).pq
            assert mse(ref_o, held) < 0.97 * mse(ref_t, held)
