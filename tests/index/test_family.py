"""The two-level residual family (faiss's IVFPQR, L2-only): planned beside the flat fast-scan family,
chosen on the sample only where it finds more, and an index of it searches with inner-product scores,
filters, appends, deletes and compacts like any other."""

from __future__ import annotations

import os
import shutil

import faiss
import numpy as np
import pytest

from clipsearch.index import IndexConfig, build_index, family, tune
from clipsearch.index.plan import (
    full_scan_residual_plan,
    measured_pq_scan_rate,
    plan_candidates,
    residual_plan,
)
from clipsearch.search.live import open_index
from clipsearch.segments import layout
from clipsearch.segments.append import append_segment
from clipsearch.segments.compact import CompactConfig, compact
from clipsearch.segments.delete import DeleteConfig, delete_rows

from .conftest import make_embeddings_folder


def test_residual_candidate_fits_the_budget_and_is_never_memory_mappable():
    n, d, budget = 200_000, 512, 64 << 20
    cands = plan_candidates(n, d, budget)
    assert [p.kind for p in cands] == ["other", "pqr", "pqr"]
    pqr = cands[2]
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


@pytest.mark.parametrize(
    "gains, listed, full",
    [
        # the full-scan plan without text: the 200k draws of session 11 (docs/bench-index.md)
        ({"held-out points": 0.071, "random directions": -0.035}, False, True),  # outliers, seed 7
        ({"held-out points": 0.067, "random directions": -0.011}, True, True),  # outliers-200k
        ({"held-out points": 0.058, "random directions": -0.055}, False, False),  # clip-200k: a tie on text
        ({"held-out points": 0.005, "random directions": 0.011}, False, False),  # isotropic: no win near
    ],
)
def test_a_full_scan_plan_is_judged_on_the_mean_of_both_ends(gains, listed, full):
    """Nothing is left unprobed by a one-list plan, so the far end does not veto it alone."""
    assert family.decide(gains)[0] is listed
    ok, why = family.decide(gains, full_scan=True)
    assert ok is full and "mean" in why
    assert family.scans_everything("IVF1,PQ64+256") and not family.scans_everything("IVF16,PQ64+256")


def test_full_scan_residual_candidate_where_its_scan_fits_the_budget():
    n, d = 200_000, 512
    full = full_scan_residual_plan(n, d, 64 << 20)
    assert full.factory == "IVF1,PQ64+256" and full.kind == "pqr"
    # the lists' ids (8 bytes a vector) leave no room for the 1 MiB rotation at 64 MiB
    assert full.memory_bytes <= 64 << 20 and not full.rotation_fits and "no room" in full.reason
    assert full_scan_residual_plan(n, d, 96 << 20).rotation_fits
    assert full_scan_residual_plan(n, d, 48 << 20) is None  # does not fit
    assert full_scan_residual_plan(1_000_000, d, 1 << 30) is None  # a ~16 ms scan: over half of 10 ms
    assert full_scan_residual_plan(1_000_000, d, 1 << 30, max_query_ms=40.0) is not None
    assert full_scan_residual_plan(n, d, 96 << 20, mmap=True) is None
    assert family.scaled_factory(full.factory, n, 12_000) == (full.factory, 1)  # one list stays one


def test_a_plan_without_room_for_the_rotation_is_not_rotated(tmp_path):
    from dataclasses import replace

    from clipsearch.index.runner import _rotation

    from .test_rotation import anisotropic

    x, q = anisotropic(6000, 64, seed=1, decay=2.0)
    cfg = IndexConfig(str(tmp_path / "emb"), str(tmp_path / "out"))
    plan = full_scan_residual_plan(200_000, 64, 64 << 20)
    assert _rotation(cfg, plan, x, q).rotation == "pca-balanced"  # steep data: rotated where it fits
    choice = _rotation(cfg, replace(plan, rotation_fits=False), x, q)
    assert choice.rotation is None and "no room" in choice.reason


def test_the_full_scan_candidate_is_measured_beside_the_others(monkeypatch):
    from clipsearch.index.plan import Plan

    from .test_rotation import anisotropic

    monkeypatch.setattr(family, "EVAL_DB", 5000)
    flat = Plan("PQ16x4fs,Refine(PQ32x8)", "other", "", 0)
    full, pqr = full_scan_residual_plan(200_000, 64, 64 << 20), residual_plan(200_000, 64, 64 << 20)
    x, _ = anisotropic(6000, 64, seed=1, decay=2.0)
    blind = family.choose([flat, full, pqr], 200_000, x, None)
    for name in ("held-out points", "random directions"):
        assert set(blind.estimates[name]) == {flat.factory, full.factory, pqr.factory}
    # on a steep spectrum both residual plans beat the flat family; the one finding the most near is taken
    near = blind.estimates["held-out points"]
    assert blind.plan in (full, pqr) and near[blind.plan.factory] == max(
        near[full.factory], near[pqr.factory]
    )
    assert full.factory in blind.reason and pqr.factory in blind.reason


def test_a_full_scan_residual_index_tunes_its_re_rank_depth_alone(tmp_path):
    data = make_embeddings_folder(str(tmp_path / "emb"), [3000], d=32, seed=3)
    info = build_index(
        IndexConfig(
            str(tmp_path / "emb"),
            str(tmp_path / "index"),
            index_key="IVF1,PQ4+16",
            nb_cores=1,
            progress=False,
            n_tuning_queries=200,
        )
    )
    image = info["indices"]["image"]
    # one list scanned whole: a single ladder of re-rank depths, not a probe x depth grid
    assert {p["params"]["nprobe"] for p in image["curve"]} == {1}
    depths = [p["params"]["k_factor"] for p in image["curve"]]
    assert depths == sorted(depths) and depths[0] == 8 and len(depths) >= 2
    ladders = tune._grid(faiss.read_index(os.path.join(str(tmp_path / "index"), image["file"])), "pqr")
    assert len(ladders) == 1 and [p["k_factor"] for p in ladders[0]] == [8, 16, 32, 64, 128, 256, 512]
    q = data["text"][::20]
    res = open_index(str(tmp_path / "index")).search(q, 10)
    _, gt = faiss.knn(q, data["image"], 10, metric=faiss.METRIC_INNER_PRODUCT)
    assert _recall(res.ids, gt) >= 0.8


def test_full_scan_plan_follows_the_measured_scan_rate():
    """The full scan's latency is the machine's: an AVX2-only CPU scanned PQ codes 5x slower than the
    AVX-512 one the constant was measured on, and the plan must then not be offered."""
    n, d = 200_000, 512
    calls = []

    def slow():
        calls.append(1)
        return 0.74e9  # measured on an AVX2-only EPYC: a 17 ms scan, over half of 10 ms

    kinds = [p.factory for p in plan_candidates(n, d, 64 << 20, scan_bytes_per_s=slow)]
    assert calls and not any(f.startswith("IVF1,") for f in kinds)
    assert any(f.startswith("IVF1,") for f in (p.factory for p in plan_candidates(n, d, 64 << 20)))
    calls.clear()  # no measurement where the plan cannot fit the memory budget anyway
    assert full_scan_residual_plan(n, d, 48 << 20, scan_bytes_per_s=slow) is None and not calls
    rate = measured_pq_scan_rate(64, n=8192, queries=3)
    assert 1e7 < rate < 1e12
