"""The two-level residual family (faiss's IVFPQR, L2-only): planned beside the flat fast-scan family,
chosen on the sample only where it finds more, and an index of it searches with inner-product scores,
filters, appends, deletes and compacts like any other."""

from __future__ import annotations

import os
import shutil

import faiss
import numpy as np
import pytest

from clipsearch.index import IndexConfig, build_index, family
from clipsearch.index.plan import plan_candidates, residual_plan
from clipsearch.search.live import open_index
from clipsearch.segments import layout
from clipsearch.segments.append import append_segment
from clipsearch.segments.compact import CompactConfig, compact
from clipsearch.segments.delete import DeleteConfig, delete_rows

from .conftest import make_embeddings_folder


def test_residual_candidate_fits_the_budget_and_is_never_memory_mappable():
    n, d, budget = 200_000, 512, 64 << 20
    cands = plan_candidates(n, d, budget)
    assert [p.kind for p in cands] == ["other", "pqr"]
    pqr = cands[1]
    assert pqr.factory == "IVF2048,PQ32+256" and pqr.memory_bytes <= budget
    # a tighter budget trades the re-rank level's precision down, then nothing fits
    assert residual_plan(n, d, 48 << 20).factory.endswith("+128")
    assert residual_plan(n, d, 16 << 20) is None
    assert residual_plan(n, d, budget, mmap=True) is None
    assert len(plan_candidates(n, d, budget, mmap=True)) == 1


@pytest.fixture(scope="module")
def residual_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("pqr")
    data = make_embeddings_folder(str(root / "emb"), [2500, 2500], d=32, seed=7)
    out = str(root / "index")
    info = build_index(
        IndexConfig(
            str(root / "emb"), out, index_key="IVF32,PQ8+16", nb_cores=1, progress=False, n_tuning_queries=200
        )
    )
    return {"root": root, "out": out, "info": info, "data": data}


def _recall(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, gt, strict=True)]))


def test_residual_index_serves_inner_products_and_filters(residual_index):
    info, data = residual_index["info"], residual_index["data"]
    image = info["indices"]["image"]
    assert image["factory"] == "IVF32,PQ8+16"
    assert set(image["search_params"]) == {"nprobe", "k_factor"}
    searcher = open_index(residual_index["out"])
    q = data["text"][::50]
    res = searcher.search(q, 10)
    _, gt = faiss.knn(q, data["image"], 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert _recall(res.ids, gt) >= 0.8
    # faiss searched by L2: the scores served are the inner products of the rows found, best first
    ip = np.einsum("qd,qkd->qk", q, data["image"][res.ids])
    assert np.abs(res.distances - ip).max() < 0.05
    assert (np.diff(res.distances, axis=1) <= 1e-6).all()
    # a filter is applied inside the scan
    res = searcher.search(q, 10, filter='key startswith "00001"')
    found = res.ids[res.ids >= 0]
    assert len(found) and (found >= 2500).all()


def test_residual_index_appends_deletes_and_compacts(residual_index, tmp_path):
    out = str(tmp_path / "index")
    shutil.copytree(residual_index["out"], out)
    new = make_embeddings_folder(str(tmp_path / "new"), [800], d=32, seed=8)
    assert (
        append_segment(IndexConfig(str(tmp_path / "new"), out, nb_cores=1, progress=False))["appended"] == 800
    )
    res = open_index(out).search(new["image"][[3, 700]], 5)
    assert [int(r[0]) for r in res.ids] == [5003, 5700]
    delete_rows(DeleteConfig(out, ids=(5003,)))
    res = open_index(out).search(new["image"][[3]], 5)
    assert 5003 not in res.ids[0].tolist()
    compact(CompactConfig(out, all_segments=True, force_retrain=True, nb_cores=1))
    manifest = layout.read_manifest(out)
    assert len(manifest.segments) == 1
    seg = layout.segment_folder(out, manifest.segments[0])
    assert isinstance(faiss.read_index(os.path.join(seg, "image.index")), faiss.IndexIVFPQR)
    res = open_index(out).search(new["image"][[700]], 5)
    assert int(res.ids[0][0]) == 5699  # one row fewer before it


def test_the_family_is_measured_on_the_sample(monkeypatch):
    """On a steep spectrum the two-level residual codes find far more of the neighbours, of text-like
    queries and, without them, at both ends of the modality gap. Text-like queries are measured over
    the whole sample (neighbours as close together as in the full index), the two ends over EVAL_DB."""
    from clipsearch.index.plan import Plan

    from .test_rotation import anisotropic

    monkeypatch.setattr(family, "EVAL_DB", 5000)
    flat = Plan("PQ16x4fs,Refine(PQ32x8)", "other", "", 0)
    pqr = residual_plan(200_000, 64, 64 << 20)
    x, q = anisotropic(6000, 64, seed=1, decay=2.0)
    steep = family.choose([flat, pqr], 200_000, x, q)
    assert steep.plan is pqr and "over 6000 sample points" in steep.reason
    est = steep.estimates["text-like queries"]
    assert est[pqr.factory] >= est[flat.factory] + 0.04
    blind = family.choose([flat, pqr], 200_000, x, None)
    assert (
        blind.plan is pqr and "held-out points" in blind.reason and "over 5000 sample points" in blind.reason
    )
    for name in ("held-out points", "random directions"):
        assert blind.estimates[name][pqr.factory] >= blind.estimates[name][flat.factory] + 0.02
    assert family.choose([flat], 200_000, x, q).plan is flat  # nothing to compare


@pytest.mark.parametrize(
    "gains, taken",
    [
        ({"text-like queries": 0.06}, True),
        ({"text-like queries": 0.005}, False),  # within MIN_GAIN: the flat family stays
        ({"text-like queries": -0.05}, False),
        # without text: the development draws (docs/bench-index.md, session 8)
        ({"held-out points": 0.104, "random directions": -0.004}, True),  # steep
        ({"held-out points": 0.058, "random directions": -0.097}, False),  # clip: far queries lose
        ({"held-out points": 0.082, "random directions": -0.049}, False),  # outliers
        ({"held-out points": -0.047, "random directions": -0.132}, False),  # isotropic
        ({"held-out points": 0.005, "random directions": 0.0}, False),  # no clear win up close
    ],
)
def test_blind_rule_wants_a_win_near_and_no_loss_far(gains, taken):
    ok, why = family.decide(gains)
    assert ok is taken
    assert all(name in why for name in gains)
