"""Streaming: `pipeline --watch` appends each new URL file; a running app returns it without a restart."""

from __future__ import annotations

import json
import os
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from clipsearch import pipeline as pl
from clipsearch.demo.sample import generate_sample
from clipsearch.demo.server import serve_directory
from clipsearch.segments import layout
from clipsearch.segments.watch import Watcher, folder_name, is_url_file
from clipsearch.serve import ServeConfig, create_app

from .helpers import FakeEncoder


def _drop(folder, name, rows, base):
    """Write a URL file the way a producer should: under a hidden name, then rename it in."""
    tmp = os.path.join(folder, f".{name}.tmp")
    pq.write_table(
        pa.table({"url": [f"{base}/{r['file']}" for r in rows], "caption": [r["caption"] for r in rows]}), tmp
    )
    os.replace(tmp, os.path.join(folder, name))


def test_url_file_names():
    assert is_url_file("day-1.parquet") and is_url_file("urls.txt.gz") and is_url_file("a.jsonl")
    assert not is_url_file(".day-1.parquet.tmp") and not is_url_file("notes.md") and not is_url_file("x.part")
    assert folder_name("2024-05-01 urls.csv.gz") == "2024-05-01_urls"


@pytest.mark.timeout(900)  # one pipeline run per file: minutes on a starved machine (load 16 took > 300 s)
def test_watched_file_becomes_searchable_in_a_running_app(tmp_path):
    rows = generate_sample(tmp_path / "www", 12, seed=5)
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    with serve_directory(tmp_path / "www") as base:
        _drop(inbox, "day-1.parquet", rows[:6], base)
        (inbox / "notes.md").write_text("not a URL file")
        cfg = pl.config_from_argv(
            ["--output-folder", str(out), "--watch", str(inbox), "--caption-col", "caption",
             "--processes-count", "1", "--no-progress", "--nb-cores", "1"]
        )  # fmt: skip
        w = Watcher(cfg, str(inbox), interval=0.2)
        first = w.poll()
        assert [r["status"] for r in first] == ["done"] and first[0]["segment"] == "base"
        index = str(out / "index")
        dim = json.load(open(os.path.join(index, "index.json")))["dim"]
        app = create_app(ServeConfig(indices={"live": index}), encoder=FakeEncoder(dim))
        stop = threading.Event()
        t = threading.Thread(target=w.run, args=(stop,), daemon=True)
        with TestClient(app) as client:
            t.start()
            try:
                target = f"{base}/{rows[9]['file']}"
                body = {"embedding": [1.0] * dim, "k": 3, "filter": f'url == "{target}"'}
                assert client.post("/knn", json=body).json()["results"] == []
                t0 = time.perf_counter()
                _drop(inbox, "day-2.parquet", rows[6:], base)
                while not client.post("/knn", json=body).json()["results"]:
                    assert time.perf_counter() - t0 < 120, "the new file never became searchable"
                    time.sleep(0.05)
                delay = time.perf_counter() - t0
                hit = client.post("/knn", json=body).json()["results"][0]
                assert hit["url"] == target and hit["caption"] == rows[9]["caption"] and hit["id"] >= 6
                (inbox / "broken.parquet").write_bytes(b"not parquet at all")
                deadline = time.time() + 60
                while "broken.parquet" not in w.state["files"] and time.time() < deadline:
                    time.sleep(0.1)
            finally:
                stop.set()
                t.join(60)
        print(f"watch: a 6-image file was searchable {delay:.2f} s after it landed")
    state = json.load(open(out / ".watch-state.json"))["files"]
    assert state["day-1.parquet"]["status"] == state["day-2.parquet"]["status"] == "done"
    assert state["broken.parquet"]["status"] == "failed" and "notes.md" not in state
    m = layout.read_manifest(index)
    assert [s.count for s in m.segments] == [6, 6]
    # a restarted watcher does not redo processed files
    assert Watcher(cfg, str(inbox), interval=0.2).pending() == []
