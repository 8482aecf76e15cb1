"""Compact: merge segments, drop deleted rows, same results; retrain only below the recall target."""

from __future__ import annotations

import os

import numpy as np

from clipsearch.cli import main
from clipsearch.search.live import open_index
from clipsearch.segments import layout
from clipsearch.segments.append import append_segment
from clipsearch.segments.compact import CompactConfig, compact
from clipsearch.segments.delete import DeleteConfig, delete_rows

from .helpers import build, folder_files, index_cfg


def _urls(folder, q, k=10, **kw):
    s = open_index(folder)
    res = s.search(q, k, **kw)
    return [[r["url"] for r in s.rows(row[row >= 0], ["url"])] for row in res.ids]


def test_compact_all_drops_deleted_rows_and_keeps_the_results(corpus, flat_index):
    data, emb = corpus["data"], corpus["emb"]
    append_segment(index_cfg(emb["new1"], flat_index))
    append_segment(index_cfg(emb["new2"], flat_index))
    gone = (3, 1500, 2001, 2299, 2450)
    delete_rows(DeleteConfig(flat_index, ids=gone))
    q = np.concatenate([data["base"]["text"][:20], data["new1"]["text"][:10], data["new2"]["image"][:10]])
    before = _urls(flat_index, q)
    before_filtered = _urls(flat_index, q, filter="group == 1")
    assert main(["-q", "index", "--compact", "--compact-all", "--index-folder", flat_index]) == 0
    m = layout.read_manifest(flat_index)
    assert len(m.segments) == 1 and m.count == 2600 - 5 and m.deleted == 0 and m.tombstones is None
    assert _urls(flat_index, q) == before
    assert _urls(flat_index, q, filter="group == 1") == before_filtered
    all_urls = {r["url"] for r in open_index(flat_index).rows(np.arange(m.count), ["url"])}
    deleted_urls = {(data["base"]["urls"] + data["new1"]["urls"] + data["new2"]["urls"])[i] for i in gone}
    assert not all_urls & deleted_urls and len(all_urls) == m.count
    # the old files are gone: only the merged segment, index.json and the trained indices are left
    assert sorted(os.listdir(os.path.join(flat_index, "segments"))) == [m.segments[0].name]
    assert not os.path.exists(os.path.join(flat_index, "image.index"))
    assert not os.path.exists(os.path.join(flat_index, "tombstones")) or not os.listdir(
        os.path.join(flat_index, "tombstones")
    )
    # and the index keeps growing
    rep = append_segment(index_cfg(emb["new1"], flat_index))
    assert rep["appended"] == 0  # already in the merged segment: its sources are remembered
    rep = append_segment(index_cfg(emb["base"], flat_index))
    assert rep["appended"] == 0


def test_compact_merges_only_the_small_segments(corpus, flat_index):
    emb = corpus["emb"]
    append_segment(index_cfg(emb["new1"], flat_index))
    append_segment(index_cfg(emb["new2"], flat_index))
    base_before = {k: v for k, v in folder_files(flat_index).items() if "/" not in k and k != "segments.json"}
    rep = compact(CompactConfig(flat_index, nb_cores=1))
    assert rep["merged"] == ["00001", "00002"] and rep["rows"] == 600
    m = layout.read_manifest(flat_index)
    assert [(s.name, s.offset, s.count) for s in m.segments] == [("base", 0, 2000), ("00003", 2000, 600)]
    after = folder_files(flat_index)
    assert all(after[k] == v for k, v in base_before.items())
    assert compact(CompactConfig(flat_index, nb_cores=1))["compacted"] is False  # nothing left to do


def test_compact_retrains_only_when_recall_is_below_target(corpus, tmp_path):
    emb = corpus["emb"]
    folder = str(tmp_path / "ivf")
    # tuned for recall 0.5: few lists probed, so the measured recall is well below 1
    build(emb["base"], folder, "IVF16,Flat", min_recall=0.5)
    append_segment(index_cfg(emb["new1"], folder))
    trained = open(os.path.join(folder, "image.trained.index"), "rb").read()
    keep = compact(CompactConfig(folder, all_segments=True, target_recall=0.05, nb_cores=1))
    assert keep["retrained"] == {} and keep["recall"]["image"]["queries"] == "cross"
    assert keep["recall"]["image"]["measured"] >= 0.05
    m = layout.read_manifest(folder)
    assert m.trained["image"]["file"] == "image.trained.index"
    assert open(os.path.join(folder, "image.trained.index"), "rb").read() == trained

    # below the target: new search parameters on the same quantizer come first (no retraining)
    append_segment(index_cfg(emb["new2"], folder))
    retuned = compact(CompactConfig(folder, all_segments=True, target_recall=0.999, nb_cores=1))
    assert retuned["retrained"] == {}
    assert retuned["recall"]["image"]["measured"] < 0.999 <= retuned["recall"]["image"]["retuned"]["recall"]
    m = layout.read_manifest(folder)
    assert m.trained["image"]["file"] == "image.trained.index"
    assert m.trained["image"]["search_params"] == retuned["recall"]["image"]["retuned"]["search_params"]
    assert open(os.path.join(folder, "image.trained.index"), "rb").read() == trained
    # no search parameters reach it (4-bit codes are lossy): the quantizer is retrained on the live rows
    folder = str(tmp_path / "ivfpq")
    build(emb["base"], folder, "IVF16,SQ4", min_recall=0.3)
    append_segment(index_cfg(emb["new1"], folder))
    append_segment(index_cfg(emb["new2"], folder))
    delete_rows(DeleteConfig(folder, ids=(0,)))
    redo = compact(CompactConfig(folder, all_segments=True, target_recall=0.999, nb_cores=1))
    assert set(redo["retrained"]) == {"image", "text"}
    assert redo["recall"]["image"]["retuned"]["recall"] < 0.999
    m = layout.read_manifest(folder)
    seg = m.segments[0]
    assert m.trained["image"]["file"] == f"{seg.path}/image.trained.index"
    assert m.trained["image"]["search_params"] == redo["retrained"]["image"]["search_params"]
    assert not os.path.exists(
        os.path.join(folder, "image.trained.index")
    )  # replaced, removed after the switch
    # the next append uses the new quantizer and its tuned parameters
    assert append_segment(index_cfg(emb["new1"], folder))["appended"] == 0
    s = open_index(folder)
    assert s.count == 2600 - 1
    res = s.search(corpus["data"]["new2"]["image"][:5], 1)
    assert (res.ids[:, 0] >= 0).all()


def test_compact_without_source_embeddings_reads_the_index_back(corpus, flat_index):
    """An imported index records no source embeddings: compaction reconstructs the vectors from it."""
    import json

    info_path = os.path.join(flat_index, "index.json")
    info = json.load(open(info_path))
    info.pop("input", None)
    json.dump(info, open(info_path, "w"))
    for m in ("image", "text"):
        os.remove(os.path.join(flat_index, f"{m}.trained.index"))
    data = corpus["data"]
    append_segment(index_cfg(corpus["emb"]["new1"], flat_index))
    delete_rows(DeleteConfig(flat_index, ids=(1, 2001)))
    q = np.concatenate([data["base"]["image"][:10], data["new1"]["image"][:10]])
    before = _urls(flat_index, q)
    rep = compact(CompactConfig(flat_index, all_segments=True, nb_cores=1))
    assert rep["rows"] == 2298
    assert _urls(flat_index, q) == before
    sj = json.load(
        open(os.path.join(flat_index, layout.read_manifest(flat_index).segments[0].path, "segment.json"))
    )
    assert sj["sources"] is None  # the base had none: later compactions read this segment's index too
