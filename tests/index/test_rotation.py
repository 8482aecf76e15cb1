"""The balanced PCA rotation: chosen on anisotropic data, kept out where it cannot help, and an index
built with it searches, appends, compacts and serves like any other."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from clipsearch.index import IndexConfig, build_index, rotation
from clipsearch.index.build import apply_search_params, read_index, split_transform
from clipsearch.search.live import open_index
from clipsearch.segments import layout
from clipsearch.segments.append import append_segment
from clipsearch.segments.compact import CompactConfig, compact

from .conftest import make_embeddings_folder


def anisotropic(n: int, d: int, seed: int, decay: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """(images, text-like queries): a shared mean, a j^-decay spectrum in a random basis, 300 concepts;
    queries name concepts from another mean, as CLIP texts do."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    scale = (np.arange(d) + 1.0) ** (-decay / 2)
    scale /= np.linalg.norm(scale)
    centres = rng.standard_normal((300, d)) * scale
    mean_i, mean_t = rng.standard_normal(d), rng.standard_normal(d)
    mean_i *= 1.2 / np.linalg.norm(mean_i)
    mean_t *= 1.5 / np.linalg.norm(mean_t)

    def draw(m: int, mean: np.ndarray, spread: float) -> np.ndarray:
        z = centres[rng.integers(0, 300, m)] + spread * rng.standard_normal((m, d)) * scale
        x = z @ basis.T + mean + 0.02 * rng.standard_normal((m, d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n, mean_i, 0.8), draw(300, mean_t, 0.3)


def test_balanced_pca_is_orthogonal_and_balances_nested_sub_vectors():
    x, _ = anisotropic(5000, 32, seed=1)
    r = rotation.balanced_pca(x, (4, 2))
    assert np.allclose(r @ r.T, np.eye(32), atol=1e-4)  # inner products are unchanged
    y = x @ r.T
    cov = np.cov(y.T)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 1e-3 * np.diag(cov).max()  # the output coordinates are uncorrelated
    var = np.diag(cov)
    pca_order = np.log(np.sort(var)[::-1])
    # each sub-vector holds strong and weak axes, not the strongest g together; the pairs are split
    # out of the balanced groups of 4, so they are balanced less tightly
    for g, share in ((4, 0.25), (2, 0.5)):
        balanced = np.log(var).reshape(-1, g).sum(1)
        in_order = pca_order.reshape(-1, g).sum(1)
        assert np.ptp(balanced) < share * np.ptp(in_order), (g, np.ptp(balanced), np.ptp(in_order))


def test_rotation_is_chosen_on_anisotropic_data_and_helps_text_queries():
    x, q = anisotropic(12000, 64, seed=2)
    choice = rotation.choose("PQ16x4fs,Refine(PQ32x8)", x)
    assert choice.rotation == rotation.NAME, choice.reason
    # checked against exact search on the text-like queries the choice never saw: PQ codes over the
    # rotated vectors find more of the true neighbours than over the raw coordinates
    _, gt = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    mat = rotation.balanced_pca(x, (4, 2))
    found = {}
    for name, m in (("none", np.eye(64, dtype=np.float32)), ("rotated", mat)):
        index = faiss.index_factory(64, "PQ32x4fs", faiss.METRIC_INNER_PRODUCT)
        xr = np.ascontiguousarray(x @ m.T)
        index.train(xr)
        index.add(xr)
        _, ids = index.search(np.ascontiguousarray(q @ m.T), 10)
        found[name] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt, strict=True)])
    assert found["rotated"] >= found["none"] + 0.05, found


def test_no_rotation_for_codes_that_do_not_split_coordinates():
    x, _ = anisotropic(6000, 32, seed=3)
    for factory in ("IVF64,SQ8", "HNSW32", "Flat", "IVF64,SQ4"):
        assert rotation.choose(factory, x).rotation is None


@pytest.fixture(scope="module")
def rotated_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("rot")
    data = make_embeddings_folder(str(root / "emb"), [2500, 2500], d=32, seed=4)
    out = str(root / "index")
    info = build_index(
        IndexConfig(
            str(root / "emb"),
            out,
            index_key="IVF32,PQ8x4fsr,Refine(PQ16x8)",
            rotation="pca-balanced",
            nb_cores=1,
            progress=False,
            n_tuning_queries=200,
        )
    )
    return {"root": root, "out": out, "info": info, "data": data}


def test_rotated_ivf_index_is_built_in_parts_merged_and_tuned(rotated_index):
    info, data = rotated_index["info"], rotated_index["data"]
    image = info["indices"]["image"]
    assert image["rotation"]["chosen"] == rotation.NAME
    index = read_index(os.path.join(rotated_index["out"], "image.index"), image["mmap"])
    chain, _ = split_transform(index)
    assert len(chain) == 1 and index.ntotal == 5000
    apply_search_params(index, image["search_params"])
    q = data["text"][::50]
    _, gt = faiss.knn(q, data["image"], 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, ids = index.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt, strict=True)])
    assert recall >= 0.8
    # the tuner measured on the same index: its figure agrees with an independent exact search
    assert abs(recall - image["tuning"]["measured"]["recall_at_10_text"]) < 0.1


def test_rotated_index_appends_compacts_and_serves(rotated_index, tmp_path):
    import shutil

    out = str(tmp_path / "index")
    shutil.copytree(rotated_index["out"], out)
    new = make_embeddings_folder(str(tmp_path / "new"), [800], d=32, seed=5)
    rep = append_segment(IndexConfig(str(tmp_path / "new"), out, nb_cores=1, progress=False))
    assert rep["appended"] == 800
    searcher = open_index(out)
    assert searcher.count == 5800
    # an appended image finds itself through the rotated segment
    res = searcher.search(new["image"][[3, 700]], 5)
    assert [int(r[0]) for r in res.ids] == [5003, 5700]
    # compacting everything retrains the quantizer: the rotation is fitted again on the live vectors
    compact(CompactConfig(out, all_segments=True, force_retrain=True, nb_cores=1))
    manifest = layout.read_manifest(out)
    assert len(manifest.segments) == 1
    seg = layout.segment_folder(out, manifest.segments[0])
    chain, _ = split_transform(read_index(os.path.join(seg, "image.index")))
    assert len(chain) == 1
    res = open_index(out).search(new["image"][[3]], 5)
    assert int(res.ids[0][0]) == 5003
