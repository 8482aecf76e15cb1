"""Hot reload: a running app sees new segments without a restart and keeps answering meanwhile."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from clipsearch.segments.append import append_segment
from clipsearch.segments.compact import CompactConfig, compact
from clipsearch.segments.delete import DeleteConfig, delete_rows
from clipsearch.serve import ServeConfig, create_app

from .helpers import FakeEncoder, index_cfg


def _top(client, vec, **kw):
    r = client.post("/knn", json={"embedding": vec.tolist(), "k": 5, **kw})
    assert r.status_code == 200, r.text
    return r.json()["results"]


# visibility is checked, not its speed (the server looks every 0.5 s; a shared machine at load 4 can stall
# a reload for seconds): a 60 s margin, and reload latency lives in the benchmarks
def _wait(pred, timeout=60.0):
    t0 = time.perf_counter()
    while not pred():
        if time.perf_counter() - t0 > timeout:
            raise AssertionError("not visible in time")
        time.sleep(0.05)
    return time.perf_counter() - t0


def test_new_segment_is_served_without_restart(corpus, flat_index):
    data = corpus["data"]
    app = create_app(ServeConfig(indices={"i": flat_index}), encoder=FakeEncoder())
    with TestClient(app) as client:
        vec = data["new2"]["image"][150]
        assert _top(client, vec)[0]["url"] != data["new2"]["urls"][150]
        append_segment(index_cfg(corpus["emb"]["new2"], flat_index))
        _wait(lambda: _top(client, vec)[0]["url"] == data["new2"]["urls"][150])
        hit = _top(client, vec)[0]
        assert hit["id"] == 2150
        assert (
            client.post("/metadata", json={"ids": [2150]}).json()["rows"][0]["key"]
            == data["new2"]["keys"][150]
        )
        info = client.get("/indices").json()["indices"][0]
        assert info["count"] == 2300
        assert [(g["offset"], g["count"], g["deleted"]) for g in info["segments"]] == [
            (0, 2000, 0),
            (2000, 300, 0),
        ]
        assert info["generation"] >= 1 and info["deleted"] == 0
        metrics = client.get("/metrics").text
        assert 'clipsearch_index_vectors{index="i",modality="image"} 2300.0' in metrics
        # a filter reaches the new segment too
        assert _top(client, vec, filter='key startswith "n2-"')[0]["id"] == 2150


def test_app_keeps_answering_during_appends_deletes_and_compaction(corpus, flat_index):
    data = corpus["data"]
    app = create_app(ServeConfig(indices={"i": flat_index}), encoder=FakeEncoder())
    errors: list[str] = []
    answered = [0]
    stop = threading.Event()
    vec = data["base"]["image"][100]
    with TestClient(app) as client:

        def hammer():
            while not stop.is_set():
                r = client.post("/knn", json={"embedding": vec.tolist(), "k": 5, "filter": "group >= 0"})
                if r.status_code != 200 or not r.json()["results"]:
                    errors.append(r.text)
                answered[0] += 1

        t = threading.Thread(target=hammer)
        t.start()
        try:
            append_segment(index_cfg(corpus["emb"]["new1"], flat_index))
            delete_rows(DeleteConfig(flat_index, ids=(5, 2001)))
            append_segment(index_cfg(corpus["emb"]["new2"], flat_index))
            compact(CompactConfig(flat_index, all_segments=True, nb_cores=1))
            # the compacted generation renumbers ids: the base row 100 becomes 99 (row 5 was dropped)
            _wait(lambda: _top(client, vec)[0]["id"] == 99)
        finally:
            stop.set()
            t.join(20)
        assert not errors, errors[:3]
        assert answered[0] > 5
        info = client.get("/indices").json()["indices"][0]
        assert info["count"] == 2600 - 2
        assert _top(client, vec)[0]["url"] == data["base"]["urls"][100]
