"""What the index is tuned on when the user has no text queries, and plain folders without a format option."""

from __future__ import annotations

import json
import logging
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsearch.cli import main
from clipsearch.errors import InputError
from clipsearch.index import IndexConfig, build_index
from clipsearch.index.build import apply_search_params, read_index

from .conftest import clip_like


def cfg(src, out, **kw):
    kw.setdefault("nb_cores", 1)
    kw.setdefault("n_tuning_queries", 200)
    kw.setdefault("progress", False)
    return IndexConfig(src, out, **kw)


def text_recall(index, xb, q, k=10) -> float:
    """recall@k of index against faiss's exact search."""
    _, gt = faiss.knn(q, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    _, ids = index.search(q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, gt, strict=True)]))


def test_bare_npy_folder_is_indexed_without_a_format_option(tmp_path):
    folder = tmp_path / "npy"
    folder.mkdir()
    img, _ = clip_like(3000, 16, seed=3)
    np.save(folder / "0.npy", img[:2000].astype(np.float16))
    np.save(folder / "1.npy", img[2000:])
    out = str(tmp_path / "index")
    rc = main(["index", "--embeddings-folder", str(folder), "--index-folder", out, "--no-progress"])
    assert rc == 0
    info = json.load(open(os.path.join(out, "index.json")))
    assert info["input"]["format"] == "npy" and info["count"] == 3000
    index = read_index(os.path.join(out, "image.index"))
    _, ids = index.search(np.ascontiguousarray(img[2500:2501]), 1)
    assert ids[0, 0] == 2500


def test_parquet_folder_with_one_vector_column_needs_no_options(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    x, _ = clip_like(1500, 8, seed=4)
    pq.write_table(pa.table({"uid": np.arange(1500), "clip_l14": list(x)}), folder / "p.parquet")
    info = build_index(cfg(str(folder), str(tmp_path / "index")))
    assert info["input"]["format"] == "parquet" and info["count"] == 1500
    table = pa.ipc.open_file(pa.memory_map(str(tmp_path / "index" / "metadata.arrow"))).read_all()
    assert table.column("uid").to_pylist() == list(range(1500))


def test_ambiguous_folders_get_one_line_naming_the_option(tmp_path, capsys):
    both = tmp_path / "both"
    both.mkdir()
    np.save(both / "a.npy", np.ones((10, 8), np.float32))
    pq.write_table(pa.table({"e": [[1.0] * 8] * 10}), both / "b.parquet")
    two = tmp_path / "two"
    two.mkdir()
    pq.write_table(pa.table({"e": [[1.0] * 8] * 10, "f": [[1.0] * 8] * 10}), two / "b.parquet")
    for folder, option in ((both, "--input-format"), (two, "--embedding-column")):
        out = tmp_path / f"index-{folder.name}"
        rc = main(["index", "--embeddings-folder", str(folder), "--index-folder", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and option in err[0], err
        assert not out.exists()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q: q[:, :8], r"shape \(200, 8\), expected \[n, 16\]"),
        (lambda q: np.where(np.arange(len(q))[:, None] == 7, np.nan, q), "1 of 200 rows hold NaN.*row 7"),
        (lambda q: q[:5], "tune on at least 10"),
    ],
)
def test_bad_tuning_queries_fail_before_any_work(tmp_path, make, match):
    folder = tmp_path / "npy"
    folder.mkdir()
    img, txt = clip_like(2000, 16, seed=5)
    np.save(folder / "a.npy", img)
    np.save(tmp_path / "q.npy", make(txt[:200]))
    out = tmp_path / "index"
    with pytest.raises(InputError, match=match):
        build_index(cfg(str(folder), str(out), tuning_queries=str(tmp_path / "q.npy")))
    assert not out.exists()


def test_budget_rule_does_not_stop_at_the_same_modality_plateau(tmp_path):
    """Image queries find their neighbours with a few candidates; text queries need many more. With
    no text queries to tune on, the tuner must not stop where the image queries' recall plateaus."""
    folder = tmp_path / "npy"
    folder.mkdir()
    img, txt = clip_like(20000, 64, seed=6, n_clusters=200)
    np.save(folder / "a.npy", img)
    out = str(tmp_path / "index")
    info = build_index(cfg(str(folder), out, index_key="PQ8x4fs,Refine(SQ8)", max_index_query_time_ms=50))
    tuning = info["indices"]["image"]["tuning"]
    assert tuning["rule"] == "budget" and tuning["text_like_source"].startswith("none")
    curve = info["indices"]["image"]["curve"]
    chosen = info["indices"]["image"]["search_params"]["k_factor"]
    # where the old rule stopped: the cheapest point on the same-modality plateau
    top = max(p["recall_at_10"] for p in curve)
    plateau = min((p for p in curve if p["recall_at_10"] >= top - 0.002), key=lambda p: p["latency_ms"])
    assert chosen > plateau["params"]["k_factor"]
    index = read_index(os.path.join(out, "image.index"))
    q = np.ascontiguousarray(txt[::20])
    apply_search_params(index, info["indices"]["image"]["search_params"])
    at_chosen = text_recall(index, img, q)
    apply_search_params(index, plateau["params"])
    at_plateau = text_recall(index, img, q)
    assert at_chosen >= at_plateau + 0.05, (at_plateau, at_chosen)
    assert at_chosen >= 0.9


def test_prompts_encoded_by_the_models_text_tower(tmp_path):
    """--clip-model on a bare folder: the shipped prompts, encoded by that model, are the tuning
    queries, and the recall recorded for them is what exact search gives for those prompts."""
    from clipsearch.embed.models import load_clip
    from clipsearch.index.prompts import prompts

    folder = tmp_path / "npy"
    folder.mkdir()
    img, _ = clip_like(12000, 64, seed=7)
    np.save(folder / "a.npy", img)
    out = str(tmp_path / "index")
    info = build_index(
        cfg(
            str(folder),
            out,
            clip_model="clipsearch-tiny",
            index_key="PQ8x4fs,Refine(SQ4)",
            n_tuning_queries=300,
        )
    )
    image = info["indices"]["image"]
    assert image["tuning"]["rule"] == "text_recall"
    assert "prompts encoded by the text tower of clipsearch-tiny" in image["tuning"]["text_like_source"]
    q = load_clip("clipsearch-tiny").encode_text(prompts(300)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = read_index(os.path.join(out, "image.index"))
    apply_search_params(index, image["search_params"])
    assert text_recall(index, img, q) == pytest.approx(
        image["tuning"]["measured"]["recall_at_10_text"], abs=1e-3
    )


def test_text_tower_that_cannot_load_falls_back_to_the_budget_rule(tmp_path, caplog):
    folder = tmp_path / "npy"
    folder.mkdir()
    img, _ = clip_like(3000, 16, seed=8)
    np.save(folder / "a.npy", img)
    with caplog.at_level(logging.WARNING):
        info = build_index(
            cfg(str(folder), str(tmp_path / "index"), clip_model=str(tmp_path / "no-such-model"))
        )
    tuning = info["indices"]["image"]["tuning"]
    assert tuning["rule"] == "budget" and "could not be used" in tuning["text_like_source"]
    assert any("cannot encode tuning prompts" in r.message for r in caplog.records)


def test_budget_rule_with_two_knobs_spends_where_far_queries_gain():
    """On a probe x re-rank grid the slowest point within the budget probes every list and re-ranks few
    candidates; random directions show that re-ranking more is what far queries need, and the cheapest
    point near their best recall wins."""
    from clipsearch.index.tune import FAR_PLATEAU, _choose

    def point(nprobe, kf, ms, far):
        return {
            "params": {"nprobe": nprobe, "k_factor": kf},
            "latency_ms": ms,
            "recall_at_10": 0.96,
            "recall_at_10_far": far,
        }

    curve = [
        point(16, 256, 4.0, 0.86),
        point(64, 16, 8.0, 0.66),
        point(32, 256, 6.0, 0.875),
        point(64, 256, 12.0, 0.88),
    ]
    curve.sort(key=lambda p: p["latency_ms"])
    chosen, why = _choose(curve, 10.0, None, spend=True, far=True)
    assert chosen["params"] == {"nprobe": 16, "k_factor": 256} and "random directions" in why
    assert 0.875 - 0.86 <= FAR_PLATEAU
    # one knob (or no far queries measured): the most candidates within the budget, as before
    slowest, _ = _choose(curve, 10.0, None, spend=True, far=False)
    assert slowest["params"] == {"nprobe": 64, "k_factor": 16}


def test_blind_residual_index_records_the_far_queries(tmp_path):
    folder = tmp_path / "npy"
    folder.mkdir()
    img, txt = clip_like(8000, 32, seed=9, n_clusters=100)
    np.save(folder / "a.npy", img)
    out = str(tmp_path / "index")
    info = build_index(cfg(str(folder), out, index_key="IVF32,PQ8+16"))
    image = info["indices"]["image"]
    assert image["tuning"]["rule"] == "budget" and "random directions" in image["tuning"]["reason"]
    assert 0 < image["tuning"]["measured"]["recall_at_10_far"] <= 1
    assert all("recall_at_10_far" in p for p in image["curve"])
    index = read_index(os.path.join(out, "image.index"))
    apply_search_params(index, image["search_params"])
    assert text_recall(index, img, np.ascontiguousarray(txt[::40])) >= 0.8


def test_compaction_retunes_a_blind_residual_index_with_far_queries(tmp_path):
    """A compaction that retrains a residual index built without text-like queries tunes it again by the
    build's own rule, random directions included (without them the slowest point within the budget won)."""
    from clipsearch.segments.append import append_segment
    from clipsearch.segments.compact import CompactConfig, compact

    img, _ = clip_like(8000, 32, seed=9, n_clusters=100)
    for name, rows in (("npy", img[:6000]), ("new", img[6000:])):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "a.npy", rows)
    out = str(tmp_path / "index")
    build_index(cfg(str(tmp_path / "npy"), out, index_key="IVF32,PQ8+16"))
    append_segment(cfg(str(tmp_path / "new"), out))
    report = compact(CompactConfig(out, all_segments=True, force_retrain=True, nb_cores=1))
    assert "image" in report["retrained"]
    with open(os.path.join(out, "segments", report["segment"], "index.json")) as f:
        curve = json.load(f)["indices"]["image"]["curve"]
    assert curve and all(0 <= p["recall_at_10_far"] <= 1 for p in curve)


def test_ladders_stop_at_the_first_point_over_the_budget(monkeypatch):
    """Points slower than the budget cannot be chosen (unless --min-recall asks for a recall the budget
    does not reach), so they are not measured: on a residual grid they were the most expensive ones."""
    from clipsearch.index import tune as tune_mod

    ladders = [[{"nprobe": n, "k_factor": kf} for n in (16, 32, 64, 128, 256)] for kf in (16, 64)]
    measured = []

    def fake_measure(index, params, queries, gt):
        measured.append(params)
        ms = params["nprobe"] * params["k_factor"] / 200  # kf 16: 1.3 .. 20 ms; kf 64: 5 .. 80 ms
        return {"params": params, "latency_ms": ms, "recall_at_10_text": 0.5 + params["nprobe"] / 1000}

    monkeypatch.setattr(tune_mod, "_grid", lambda index, kind: ladders)
    monkeypatch.setattr(tune_mod, "_measure", fake_measure)
    monkeypatch.setattr(tune_mod, "apply_search_params", lambda index, params: None)
    q = {"cross": np.zeros((10, 4), np.float32), "same": np.zeros((10, 4), np.float32)}
    gt = {"cross": np.zeros((10, 10), np.int64), "same": np.zeros((10, 10), np.int64)}
    tuned = tune_mod.tune(None, "pqr", q, gt, max_query_ms=10.0, min_recall=None)
    assert tuned.search_params == {"nprobe": 64, "k_factor": 16}  # 5.1 ms; nprobe 128 is 10.2 ms
    # each ladder ends at its first point over 10 ms: kf 16 at nprobe 128, kf 64 at nprobe 32
    assert [(p["nprobe"], p["k_factor"]) for p in measured] == [
        (16, 16),
        (32, 16),
        (64, 16),
        (128, 16),
        (16, 64),
        (32, 64),
    ]
    measured.clear()
    tuned = tune_mod.tune(None, "pqr", q, gt, max_query_ms=10.0, min_recall=0.7)
    assert (256, 16) in [(p["nprobe"], p["k_factor"]) for p in measured]  # 20.5 ms: within 3x the budget
    assert tuned.search_params == {"nprobe": 256, "k_factor": 16}


def test_points_near_the_best_are_measured_again_on_all_text_queries(monkeypatch):
    """Every point is measured on the first N_QUICK text-like queries; those that can still be chosen
    (within the budget, within QUICK_MARGIN of the best) again on all of them, and those figures decide."""
    from clipsearch.index import tune as tune_mod

    quick_recall = {16: 0.70, 32: 0.84, 64: 0.85, 128: 0.95}  # 128 is over the budget
    full_recall = {16: 0.7, 32: 0.9, 64: 0.8}
    n = 600

    class FakeIndex:
        nprobe = 0

        def search(self, q, k):
            assert len(q) == n  # only the second measurement goes through here
            hits = round(full_recall[self.nprobe] * 10)
            ids = np.arange(len(q) * 10).reshape(len(q), 10)
            ids[:, hits:] = -1
            return None, ids

    def fake_measure(index, params, queries, gt):
        assert len(queries["cross"]) == tune_mod.N_QUICK
        npb = params["nprobe"]
        return {"params": params, "latency_ms": npb / 10, "recall_at_10_text": quick_recall[npb]}

    def fake_apply(index, params):
        index.nprobe = params["nprobe"]

    ladders = [[{"nprobe": p, "k_factor": 16} for p in (16, 32, 64, 128)]]
    monkeypatch.setattr(tune_mod, "_grid", lambda index, kind: ladders)
    monkeypatch.setattr(tune_mod, "_measure", fake_measure)
    monkeypatch.setattr(tune_mod, "apply_search_params", fake_apply)
    q = {"cross": np.zeros((n, 4), np.float32)}
    gt = {"cross": np.arange(n * 10).reshape(n, 10)}
    tuned = tune_mod.tune(FakeIndex(), "pqr", q, gt, max_query_ms=10.0, min_recall=None)
    by_probe = {p["params"]["nprobe"]: p for p in tuned.curve}
    assert tuned.search_params["nprobe"] == 32  # on 250 queries nprobe 64 looked best
    assert by_probe[32]["recall_at_10_text"] == 0.9 and by_probe[32]["text_queries"] == n
    assert by_probe[16]["recall_at_10_text"] == 0.7 and by_probe[16]["text_queries"] == tune_mod.N_QUICK
    assert by_probe[128]["text_queries"] == tune_mod.N_QUICK  # over the budget: never chosen
