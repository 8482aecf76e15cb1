"""Delete: tombstones hide rows in batch query and, without a restart, in a running app (with filters)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipsearch.cli import main
from clipsearch.errors import ConfigError
from clipsearch.search import live as search
from clipsearch.search.live import open_index
from clipsearch.segments import layout
from clipsearch.segments.append import append_segment
from clipsearch.segments.delete import DeleteConfig, delete_rows
from clipsearch.serve import ServeConfig, create_app

from .helpers import FakeEncoder, index_cfg


def test_delete_by_key_url_and_ids_hides_rows_in_query(corpus, flat_index, tmp_path):
    data = corpus["data"]
    append_segment(index_cfg(corpus["emb"]["new1"], flat_index))
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("7\n2010, 2011\n")
    rc = main(["-q", "delete", "--index-folder", flat_index, "--key", data["base"]["keys"][3],
               "--url", data["new1"]["urls"][5], "--ids-file", str(ids_file)])  # fmt: skip
    assert rc == 0
    gone = {3, 2005, 7, 2010, 2011}
    m = layout.read_manifest(flat_index)
    assert m.deleted == 5 and m.generation == 2
    assert set(layout.read_tombstones(flat_index, m).tolist()) == gone
    s = open_index(flat_index)
    q = np.concatenate([data["base"]["image"][[3, 7]], data["new1"]["image"][[5, 10, 11]]])
    res = s.search(q, 10)
    assert not gone & set(res.ids.ravel().tolist())
    assert (res.ids >= 0).all()
    assert s.metadata.valid_ids([3, 4, 2005]) == ([4], [3, 2005])
    # deleting again changes nothing
    again = delete_rows(DeleteConfig(flat_index, ids=(3,)))
    assert again["deleted"] == 0 and layout.read_manifest(flat_index).generation == 2


def test_delete_needs_something_to_delete(flat_index, capsys):
    with pytest.raises(ConfigError):
        DeleteConfig(flat_index)
    assert main(["delete", "--index-folder", flat_index]) == 2
    assert "--key" in capsys.readouterr().err


def _knn(client, vec, **kw):
    r = client.post("/knn", json={"embedding": vec.tolist(), "k": 10, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_delete_in_a_running_app_without_restart(corpus, flat_index, monkeypatch):
    data = corpus["data"]
    append_segment(index_cfg(corpus["emb"]["new1"], flat_index))
    app = create_app(ServeConfig(indices={"i": flat_index}), encoder=FakeEncoder())
    with TestClient(app) as client:
        vec = data["new1"]["image"][42]
        first = _knn(client, vec)["results"][0]
        assert first["id"] == 2042 and first["url"] == data["new1"]["urls"][42]
        filtered = _knn(client, vec, filter="group == 2")["results"]
        assert filtered[0]["id"] == 2042 and all(r["id"] % 10 == 2 for r in filtered)
        victims = [2042, filtered[1]["id"], 12]  # a new row, a filtered neighbour, a base row
        t0 = time.perf_counter()
        delete_rows(DeleteConfig(flat_index, ids=tuple(victims)))
        while True:  # the server checks the manifest at most every LiveIndex.check_interval (0.5 s)
            hits = _knn(client, vec)["results"]
            if hits[0]["id"] != 2042 or time.perf_counter() - t0 > 60:  # a margin for a loaded machine
                break
            time.sleep(0.05)
        assert time.perf_counter() - t0 < 60
        assert not set(victims) & {r["id"] for r in hits}
        filtered_after = _knn(client, vec, filter="group == 2")
        got = [r["id"] for r in filtered_after["results"]]
        assert not set(victims) & set(got) and all(i % 10 == 2 for i in got)
        assert got[:8] == [r["id"] for r in filtered if r["id"] not in victims][:8]
        meta = client.post("/metadata", json={"ids": [2042, 2043, 12]}).json()
        assert [r["id"] for r in meta["rows"]] == [2043] and sorted(meta["missing"]) == [12, 2042]
        info = client.get("/indices").json()["indices"][0]
        assert info["count"] == 2300 - 3


def test_deletes_are_applied_inside_the_ivf_search(corpus, tmp_path):
    """IVF segments: the tombstones are an IDSelector in the search, so k results still come back."""
    from .helpers import build

    folder = str(tmp_path / "ivf")
    build(corpus["emb"]["base"], folder, "IVF16,Flat")
    append_segment(index_cfg(corpus["emb"]["new1"], folder))
    q = corpus["data"]["new1"]["image"][:20]
    before = open_index(folder).search(q, 40)
    top = before.ids[:, 0].tolist()
    delete_rows(DeleteConfig(folder, ids=tuple(top)))
    after = open_index(folder).search(q, 10)
    assert "tombstones" in after.plan
    assert (after.ids >= 0).all() and not set(top) & set(after.ids.ravel().tolist())
    # the same lists are probed, minus the deleted rows: the old ranking without them
    for row_after, row_before in zip(after.ids, before.ids, strict=True):
        expected = [i for i in row_before.tolist() if i not in top][:10]
        assert row_after.tolist() == expected


def test_live_index_check_interval_default():
    import inspect

    assert inspect.signature(search.LiveIndex).parameters["check_interval"].default == 0.5
