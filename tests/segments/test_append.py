"""Append: a new segment on the trained quantizer; query and the searcher see every segment."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from clipsearch.cli import main
from clipsearch.errors import InputError
from clipsearch.search.live import SegmentedSearcher, open_index
from clipsearch.segments import append as append_mod
from clipsearch.segments import layout
from clipsearch.segments.append import append_segment

from .helpers import build, folder_files, index_cfg, make_embeddings


def test_append_then_query_sees_both_segments(corpus, flat_index, tmp_path):
    emb, data = corpus["emb"], corpus["data"]
    assert (
        main(["-q", "index", "--append", "--embeddings-folder", emb["new1"], "--index-folder", flat_index])
        == 0
    )
    rep = append_segment(index_cfg(emb["new2"], flat_index))
    assert rep["appended"] == 300 and rep["offset"] == 2300 and rep["segment"] == "00002"
    m = layout.read_manifest(flat_index)
    assert [(s.name, s.offset, s.count) for s in m.segments] == [
        ("base", 0, 2000),
        ("00001", 2000, 300),
        ("00002", 2300, 300),
    ]
    # image vectors as queries: each finds itself first (exact Flat), with its global id and its metadata
    picks = [("base", 5), ("base", 1999), ("new1", 0), ("new1", 299), ("new2", 250)]
    offsets = {"base": 0, "new1": 2000, "new2": 2300}
    q = np.stack([data[src]["image"][i] for src, i in picks])
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "hits.parquet"
    assert main(["-q", "query", "--index", flat_index, "--embeddings", str(tmp_path / "q.npy"), "-k", "3",
                 "--columns", "key", "--output", str(out)]) == 0  # fmt: skip
    hits = [h for h in pq.read_table(out).to_pylist() if h["rank"] == 0]
    assert [h["id"] for h in hits] == [offsets[s] + i for s, i in picks]
    assert [h["url"] for h in hits] == [data[s]["urls"][i] for s, i in picks]
    assert [h["key"] for h in hits] == [data[s]["keys"][i] for s, i in picks]
    s = open_index(flat_index)
    assert isinstance(s, SegmentedSearcher) and s.count == 2600
    assert s.rows([2000, 2599], ["key"]) == [
        {"key": data["new1"]["keys"][0]},
        {"key": data["new2"]["keys"][299]},
    ]


def test_append_is_idempotent_per_part(corpus, flat_index):
    emb = corpus["emb"]
    assert append_segment(index_cfg(emb["new1"], flat_index))["appended"] == 300
    again = append_segment(index_cfg(emb["new1"], flat_index))
    assert again["appended"] == 0 and layout.read_manifest(flat_index).count == 2300
    # the base's own input folder is already covered too
    assert append_segment(index_cfg(emb["base"], flat_index))["appended"] == 0


@pytest.fixture(scope="module")
def ivf_bases(corpus, tmp_path_factory):
    """Two IVF indices of different sizes over the same distribution."""
    root = tmp_path_factory.mktemp("ivf")
    small = make_embeddings(str(root / "emb-small"), [1500], tag="s", seed=11)
    big = make_embeddings(str(root / "emb-big"), [3000, 3000], tag="B", seed=12)
    del small, big
    out = {}
    for name in ("small", "big"):
        build(str(root / f"emb-{name}"), str(root / f"idx-{name}"), "IVF16,SQ8")
        out[name] = str(root / f"idx-{name}")
    return out


def test_append_reuses_the_quantizer_and_reads_only_the_new_rows(corpus, ivf_bases, tmp_path, monkeypatch):
    import shutil

    rows_read: dict[str, int] = {}
    files_read: dict[str, list[str]] = {}
    real_iter, real_read = append_mod.iter_part, faiss.read_index

    for name, src in ivf_bases.items():
        folder = str(tmp_path / name)
        shutil.copytree(src, folder)
        before = folder_files(folder)
        rows_read[name], files_read[name] = 0, []

        def counting_iter(part, source, batch_rows, mods, name=name):
            for item in real_iter(part, source, batch_rows, mods):
                rows_read[name] += len(item[2])
                yield item

        def recording_read(path, *a, name=name, folder=folder):
            files_read[name].append(os.path.relpath(path, folder))
            return real_read(path, *a)

        monkeypatch.setattr(append_mod, "iter_part", counting_iter)
        monkeypatch.setattr(faiss, "read_index", recording_read)
        rep = append_segment(index_cfg(corpus["emb"]["new1"], folder))
        monkeypatch.undo()
        assert rep["appended"] == 300
        after = folder_files(folder)
        # nothing already there was rewritten: every base file has the same bytes
        assert all(after[f] == b for f, b in before.items()), "a base file changed"
        seg = faiss.read_index(os.path.join(folder, "segments", "00001", "image.index"))
        trained = faiss.read_index(os.path.join(folder, "image.trained.index"))
        ivf_s, ivf_t = faiss.extract_index_ivf(seg), faiss.extract_index_ivf(trained)
        assert ivf_s.nlist == ivf_t.nlist
        np.testing.assert_array_equal(
            ivf_s.quantizer.reconstruct_n(0, ivf_s.nlist), ivf_t.quantizer.reconstruct_n(0, ivf_t.nlist)
        )
    # the work is the new rows and the trained indices, whatever the base size (1500 vs 6000 rows)
    assert rows_read["small"] == rows_read["big"] == 300
    assert (
        sorted(files_read["small"])
        == sorted(files_read["big"])
        == ["image.trained.index", "text.trained.index"]
    )


def test_append_to_an_index_without_trained_files(corpus, ivf_bases, tmp_path):
    """An index made by `clipsearch import` keeps no trained index: one is derived once, then reused."""
    import shutil

    folder = str(tmp_path / "imported")
    shutil.copytree(ivf_bases["small"], folder)
    for m in ("image", "text"):
        os.remove(os.path.join(folder, f"{m}.trained.index"))
    append_segment(index_cfg(corpus["emb"]["new1"], folder))
    m = layout.read_manifest(folder)
    assert m.trained["image"]["file"] == "segments/00001/image.trained.index"
    append_segment(index_cfg(corpus["emb"]["new2"], folder))
    s = open_index(folder)
    assert s.count == 1500 + 600
    q = corpus["data"]["new2"]["image"][:3]
    res = s.search(q, 1, params=None)
    assert (res.ids[:, 0] == np.arange(3) + 1800).all()


def test_append_refuses_another_model_or_dimension(corpus, flat_index, tmp_path, capsys):
    before = folder_files(flat_index)
    other_dim = str(tmp_path / "emb-16")
    make_embeddings(other_dim, [50], tag="x", d=16)
    assert main(["index", "--append", "--embeddings-folder", other_dim, "--index-folder", flat_index]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dimension 16" in err and "nothing was written" in err
    other_model = str(tmp_path / "emb-model")
    make_embeddings(other_model, [50], tag="y", model="another-model")
    with pytest.raises(InputError, match="another-model"):
        append_segment(index_cfg(other_model, flat_index))
    assert folder_files(flat_index) == before
    info = json.load(open(os.path.join(flat_index, "index.json")))
    assert info["count"] == 2000
