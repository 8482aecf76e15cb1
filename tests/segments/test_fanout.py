"""The shared fan-out (search/fanout.py): segments sharing the base's trained IVF quantizer are searched
with one coarse pass and one re-rank; the results match searching each segment on its own."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest

from clipsearch.search import fanout
from clipsearch.search.live import LiveIndex, SegmentedSearcher, open_index
from clipsearch.search.searcher import SearchParams
from clipsearch.segments.append import append_segment
from clipsearch.segments.delete import DeleteConfig, delete_rows

from .helpers import build, index_cfg, make_embeddings

K = 10


@pytest.fixture(scope="module")
def ivf_segments(corpus, tmp_path_factory):
    """Base IVF16,PQ8x4fsr,Refine(SQ8) (the planner's fast-scan + re-rank family) + two appended segments."""
    root = tmp_path_factory.mktemp("fanout")
    folder = str(root / "ivf")
    build(corpus["emb"]["base"], folder, "IVF16,PQ8x4fsr,Refine(SQ8)")
    append_segment(index_cfg(corpus["emb"]["new1"], folder))
    append_segment(index_cfg(corpus["emb"]["new2"], folder))
    return folder


@pytest.fixture
def ivf_copy(ivf_segments, tmp_path):
    dst = str(tmp_path / "ivf")
    shutil.copytree(ivf_segments, dst)
    return dst


def _queries(corpus, n=40):
    data = corpus["data"]
    rng = np.random.default_rng(5)
    qs = np.concatenate([data["base"]["text"][:n], data["new1"]["text"][:n], data["new2"]["text"][:n]])
    return qs[rng.permutation(len(qs))][:n].astype(np.float32)


def _per_segment(view: SegmentedSearcher, q, k, p):
    return view._search_each(q, k, "image", p)


def _assert_shared_matches_per_segment(view: SegmentedSearcher, q):
    """The shared fan-out returns the ids and scores of each segment searched alone. A re-rank budget above
    every row makes both paths re-rank every scanned row exactly."""
    p = SearchParams(nprobe=4, k_factor=2000)
    res = view.search(q, K, params=p)
    assert res.plan == "ann"
    d_old, i_old = _per_segment(view, q, K, p)
    np.testing.assert_array_equal(res.ids, i_old)
    np.testing.assert_allclose(res.distances, d_old, rtol=1e-5, atol=1e-5)
    return res


def test_shared_fanout_returns_what_each_segment_searched_alone_returns(corpus, ivf_copy):
    view = open_index(ivf_copy)
    assert isinstance(view, SegmentedSearcher) and len(view.segments) == 3
    assert set(view.fanout) == {"image", "text"}
    assert len(view.fanout["image"].members) == 3
    res = _assert_shared_matches_per_segment(view, _queries(corpus))
    assert (res.ids >= 0).all()
    # every segment is reached (ids of all three id ranges come back)
    starts = [s.offset for s in view.segments]
    got = np.searchsorted(starts, res.ids.ravel(), side="right") - 1
    assert set(got.tolist()) == {0, 1, 2}


def test_shared_fanout_recall_not_below_the_per_segment_path(corpus, ivf_copy):
    view = open_index(ivf_copy)
    data = corpus["data"]
    xb = np.concatenate([data[k]["image"] for k in ("base", "new1", "new2")])
    q = _queries(corpus, 60)
    gt = np.argsort(-(q @ xb.T), axis=1)[:, :K]

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / K for a, b in zip(ids.tolist(), gt.tolist(), strict=True)])

    for p in (SearchParams(nprobe=2, k_factor=4), SearchParams(nprobe=8, k_factor=16), SearchParams()):
        new = view.search(q, K, params=p)
        _, old = _per_segment(view, q, K, p)
        assert recall(new.ids) >= recall(old) - 0.02, p


def test_shared_fanout_skips_deleted_rows_inside_the_scan(corpus, ivf_copy):
    q = _queries(corpus, 20)
    p = SearchParams(nprobe=4, k_factor=2000)
    before = open_index(ivf_copy).search(q, 40, params=p)
    victims = sorted(set(before.ids[:, :3].ravel().tolist()))
    delete_rows(DeleteConfig(ivf_copy, ids=tuple(victims)))
    view = open_index(ivf_copy)
    after = view.search(q, K, params=p)
    assert "tombstones" in after.plan and "fallback" not in after.plan
    assert (after.ids >= 0).all() and not set(victims) & set(after.ids.ravel().tolist())
    _, old = _per_segment(view, q, K, p)
    np.testing.assert_array_equal(after.ids, old)
    for row_after, row_before in zip(after.ids, before.ids, strict=True):
        assert row_after.tolist() == [i for i in row_before.tolist() if i not in victims][:K]


def test_filtered_search_over_shared_segments(corpus, ivf_copy):
    """A filter goes through each segment's planner (exact subsets, widened ANN) as before."""
    delete_rows(DeleteConfig(ivf_copy, ids=(3, 2003, 2303)))
    view = open_index(ivf_copy)
    q = _queries(corpus, 10)
    res = view.search(q, K, filter="group == 3")
    assert "filter" in res.plan or "exact" in res.plan
    ok = res.ids[res.ids >= 0]
    assert len(ok) and all(r["group"] == 3 for r in view.rows(ok))
    assert not {3, 2003, 2303} & set(ok.tolist())


def test_old_path_where_no_quantizer_is_shared(corpus, tmp_path, monkeypatch):
    """A Flat or HNSW base has no quantizer to share: each segment is searched on its own."""
    calls = []
    orig = SegmentedSearcher._search_segment

    def spy(self, *a, **kw):
        calls.append(1)
        return orig(self, *a, **kw)

    monkeypatch.setattr(SegmentedSearcher, "_search_segment", spy)
    q = _queries(corpus, 5)
    for key in ("Flat", "HNSW8"):
        folder = str(tmp_path / key)
        build(corpus["emb"]["base"], folder, key)
        append_segment(index_cfg(corpus["emb"]["new1"], folder))
        view = open_index(folder)
        assert view.fanout == {}
        calls.clear()
        res = view.search(q, K)
        assert len(calls) == 2 and (res.ids >= 0).all()


def test_segment_with_another_quantizer_is_searched_on_its_own(corpus, ivf_copy, monkeypatch):
    """A segment whose layout key differs (e.g. a retrained quantizer) is left to the per-segment path."""
    view = open_index(ivf_copy)
    mi = view.segments[2].searcher.indices["image"]
    lay = fanout.layout(mi)
    monkeypatch.setitem(fanout._layouts, mi, fanout.Layout(lay.ivf, lay.refine, (*lay.key, "other")))
    view = SegmentedSearcher(ivf_copy, view.manifest, view.segments)
    assert view.fanout["image"].positions == frozenset({0, 1})
    q = _queries(corpus, 20)
    p = SearchParams(nprobe=4, k_factor=2000)
    res = view.search(q, K, params=p)
    _, old = _per_segment(view, q, K, p)
    np.testing.assert_array_equal(res.ids, old)


def test_numpy_block_packing_matches_faiss(ivf_segments):
    view = open_index(ivf_segments)
    inv = faiss.downcast_InvertedLists(view.fanout["image"].layouts[0].ivf.invlists)
    packer = inv.packer
    nib = fanout.nibble_map(packer)
    nvec, bs, cs = int(packer.nvec), int(packer.block_size), int(packer.code_size)
    codes = np.random.default_rng(1).integers(0, 256, (5 * nvec, cs), dtype=np.uint8)
    ref = np.zeros(5 * bs, np.uint8)
    for b in range(5):
        packer.pack_all(faiss.swig_ptr(codes[b * nvec :]), faiss.swig_ptr(ref[b * bs :]))
    np.testing.assert_array_equal(nib.pack(codes).ravel(), ref)
    np.testing.assert_array_equal(nib.unpack(ref.reshape(5, bs)), codes)


def test_merged_lists_hold_every_entry_of_the_small_segments(ivf_segments):
    view = open_index(ivf_segments)
    fan = view.fanout["image"]
    assert [len(r.members) for r in fan.rankers] == [1, 2]  # the base alone, the two appends merged
    merged = fan.rankers[1]
    parts = [fanout._unpacked_lists(fan.layouts[i].ivf) for i in merged.members]
    lists, ids, codes = fanout._unpacked_lists(merged.ivf)
    want_l = np.concatenate([p[0] for p in parts])
    want_i = np.concatenate([p[1] + st for p, st in zip(parts, merged.starts, strict=True)])
    want_c = np.concatenate([p[2] for p in parts])
    a, b = np.lexsort((want_i, want_l)), np.lexsort((ids, lists))
    np.testing.assert_array_equal(want_l[a], lists[b])
    np.testing.assert_array_equal(want_i[a], ids[b])
    np.testing.assert_array_equal(want_c[a], codes[b])
    assert int(merged.ivf.ntotal) == sum(fan.members[i][2] for i in merged.members)


def test_hot_reload_appends_and_deletes_through_the_shared_path(corpus, ivf_copy, tmp_path):
    emb = str(tmp_path / "emb-new3")
    new3 = make_embeddings(emb, [250], tag="n3", seed=4)
    live = LiveIndex(ivf_copy, watch=False, check_interval=0.0)
    try:
        before = live.current()
        merged_before = before.fanout["image"].rankers[-1].keep
        rep = append_segment(index_cfg(emb, ivf_copy))
        view = live.current()
        assert view is not before and len(view.fanout["image"].members) == 4
        assert view.fanout["image"].rankers[-1].keep is not merged_before  # three small segments now
        q = new3["image"][:8]
        p = SearchParams(nprobe=4, k_factor=2000)
        res = view.search(q, K, params=p)
        assert res.ids[:, 0].tolist() == [rep["offset"] + i for i in range(8)]
        np.testing.assert_array_equal(res.ids, view._search_each(q, K, "image", p)[1])
        merged = view.fanout["image"].rankers[-1].keep
        delete_rows(DeleteConfig(ivf_copy, ids=tuple(res.ids[:, 0].tolist())))
        after_view = live.current()
        assert after_view is not view
        assert after_view.fanout["image"].rankers[-1].keep is merged  # tombstones only: lists reused
        after = after_view.search(q, K, params=p)
        assert "tombstones" in after.plan and not set(res.ids[:, 0].tolist()) & set(
            after.ids.ravel().tolist()
        )
        np.testing.assert_array_equal(after.ids, after_view._search_each(q, K, "image", p)[1])
    finally:
        live.close()


def test_incremental_merge_equals_a_full_merge(ivf_segments):
    view = open_index(ivf_segments)
    fan = view.fanout["image"]
    lays = [fan.layouts[i] for i in (1, 2)]
    counts = [fan.members[i][2] for i in (1, 2)]
    parts = [fanout._unpacked_lists(lay.ivf) for lay in lays]
    full = faiss.clone_index(lays[0].ivf)
    full.reset()
    fanout.merge_lists(full, parts, [0, counts[0]])
    first = faiss.clone_index(lays[0].ivf)
    first.reset()
    fanout.merge_lists(first, parts[:1], [0])
    inc = faiss.clone_index(lays[0].ivf)
    inc.reset()
    fanout.merge_onto(inc, first, parts[1:], [counts[0]])
    a, b = fanout._unpacked_lists(full), fanout._unpacked_lists(inc)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("key", ["IVF16,SQ8", "IVF16,PQ8x4fs", "IVF16_HNSW8,Flat"])
def test_shared_fanout_without_refine(corpus, tmp_path, key):
    """IVF plans without a re-rank (flat inverted lists, or fast-scan): ranker distances are merged as they
    are; a third append is merged onto the previous generation's lists."""
    folder = str(tmp_path / "ivf")
    build(corpus["emb"]["base"], folder, key)
    append_segment(index_cfg(corpus["emb"]["new1"], folder))
    append_segment(index_cfg(corpus["emb"]["new2"], folder))
    live = LiveIndex(folder, watch=False, check_interval=0.0)
    try:
        q = _queries(corpus, 30)
        p = SearchParams(nprobe=4)
        view = live.current()
        assert view.fanout["image"].refine is False
        _same_topk(view.search(q, K, params=p), view._search_each(q, K, "image", p))
        emb = str(tmp_path / "emb-new3")
        make_embeddings(emb, [150], tag="n3", seed=4)
        append_segment(index_cfg(emb, folder))
        view = live.current()
        assert [len(r.members) for r in view.fanout["image"].rankers] == [1, 3]
        _same_topk(view.search(q, K, params=p), view._search_each(q, K, "image", p))
    finally:
        live.close()


def _same_topk(res, old):
    """Same distances, and the same ids but for the order of ties (fast-scan distances are quantized)."""
    d_old, i_old = old
    np.testing.assert_allclose(res.distances, d_old, rtol=1e-5, atol=1e-6)
    for d, a, b in zip(d_old, res.ids, i_old, strict=True):
        sure = d > d[-1]  # ids tied with the k-th distance may differ
        assert set(a[sure].tolist()) == set(b[sure].tolist())


def test_shared_fanout_with_pq_rerank_codes(corpus, tmp_path):
    """The planner's 2-d PQ re-rank codes (PQ{d/2}x8/x9) take the shared path and re-rank as each segment
    alone does."""
    folder = str(tmp_path / "ivf")
    build(corpus["emb"]["base"], folder, "IVF16,PQ8x4fsr,Refine(PQ16x8)")
    append_segment(index_cfg(corpus["emb"]["new1"], folder))
    append_segment(index_cfg(corpus["emb"]["new2"], folder))
    view = open_index(folder)
    assert len(view.fanout["image"].members) == 3
    _assert_shared_matches_per_segment(view, _queries(corpus))
