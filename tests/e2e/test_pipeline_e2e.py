"""End to end: generated images served over local HTTP -> `clipsearch pipeline` -> text queries.

The shipped tiny model must make text->image search meaningful: "a red circle" finds red circles.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsearch.cli import main
from clipsearch.demo.sample import generate_sample
from clipsearch.demo.server import serve_directory

N_IMAGES = 300


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    rows = generate_sample(root / "www", N_IMAGES, seed=123)
    with serve_directory(root / "www") as base:
        urls = root / "urls.parquet"
        pq.write_table(
            pa.table(
                {
                    "url": [f"{base}/{r['file']}" for r in rows] + [f"{base}/missing.jpg"],
                    "caption": [r["caption"] for r in rows] + ["a missing image"],
                    "color": [r["color"] for r in rows] + ["none"],
                    "shape": [r["shape"] for r in rows] + ["none"],
                }
            ),
            urls,
        )
        out = root / "out"
        rc = main(
            ["-q", "pipeline", "--url-list", str(urls), "--output-folder", str(out),
             "--caption-col", "caption", "--number-sample-per-shard", "100", "--processes-count", "2", "--thread-count", "16",
             "--save-additional-columns", "color", "shape"]
        )  # fmt: skip
        assert rc == 0
    return root, out, rows


def test_pipeline_writes_every_stage_folder(built):
    root, out, rows = built
    images = sorted(p.name for p in (out / "images").iterdir())
    assert {"00000.tar", "00000.parquet", "00000.stats.json", "00003.stats.json"} <= set(images)
    meta = pq.read_table(sorted((out / "images").glob("*.parquet"))).to_pylist()
    status = Counter(r["status"] for r in meta)
    assert status["success"] == N_IMAGES and status["failed_to_download"] == 1
    manifest = json.loads((out / "embeddings" / "manifest.json").read_text())
    assert manifest["total_rows"] == N_IMAGES and manifest["dtype"] == "float16"
    info = json.loads((out / "index" / "index.json").read_text())
    assert info["count"] == N_IMAGES and set(info["indices"]) >= {"image", "text"}


def _query_hits(out, tmp_path, prompts_list, k=5):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(prompts_list) + "\n")
    hits = tmp_path / "hits.parquet"
    assert main(["-q", "query", "--index", str(out / "index"), "--prompts", str(prompts), "-k", str(k),
                 "--output", str(hits)]) == 0  # fmt: skip
    per_query: dict[str, list] = {}
    for h in pq.read_table(hits).to_pylist():
        per_query.setdefault(h["query"], []).append(h)
    for q in prompts_list:
        per_query[q].sort(key=lambda h: h["rank"])
        assert [h["rank"] for h in per_query[q]] == list(range(k))
    return per_query


def _colour_shape_recall(built, tmp_path):
    """Mean share of the top 5 that has the asked colour (and shape), over colour+shape queries."""
    root, out, rows = built
    combos = Counter((r["color"], r["shape"]) for r in rows)
    # queries for every colour+shape that has at least 5 images, so recall@5 can reach 1
    queries = [(c, s) for (c, s), n in combos.items() if n >= 5]
    assert len(queries) >= 10
    attrs = {r["url"]: (r["color"], r["shape"]) for r in pq.read_table(root / "urls.parquet").to_pylist()}
    hits = _query_hits(out, tmp_path, [f"a {c} {s}" for c, s in queries])
    both = colour = 0.0
    for c, s in queries:
        got = [attrs[h["url"]] for h in hits[f"a {c} {s}"]]
        both += sum(a == (c, s) for a in got) / 5
        colour += sum(a[0] == c for a in got) / 5
    return both / len(queries), colour / len(queries)


def test_text_queries_find_the_colour(built, tmp_path):
    _, colour = _colour_shape_recall(built, tmp_path)
    assert colour >= 0.9, f"share of the top 5 with the asked colour {colour:.2f} < 0.9"


def test_text_queries_find_colour_and_shape(built, tmp_path):
    both, _ = _colour_shape_recall(built, tmp_path)
    assert both >= 0.8, f"recall@5 on colour+shape queries {both:.2f} < 0.8"


def test_second_run_resumes_without_redoing_work(built):
    root, out, rows = built
    before = {p: os.stat(p).st_mtime_ns for p in (out / "images").glob("*.tar")}
    with serve_directory(root / "www"):
        urls = root / "urls.parquet"
        assert main(["-q", "pipeline", "--url-list", str(urls), "--output-folder", str(out),
                     "--number-sample-per-shard", "100", "--save-additional-columns", "color", "shape"]) == 0  # fmt: skip
    after = {p: os.stat(p).st_mtime_ns for p in (out / "images").glob("*.tar")}
    assert before == after


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["download", "--url-list", "{root}/nope.parquet", "--output-folder", "{tmp}/o"], "nope.parquet"),
        (["download", "--url-list", "{root}/urls.parquet", "--output-folder", "{tmp}/o", "--url-col", "link"], "link"),
        (["pipeline", "--url-list", "{root}/urls.parquet", "--output-folder", "{root}/www"], "--output-folder"),
        (["embed", "--input-dataset", "{out}/images", "--output-folder", "{tmp}/e", "--clip-model", "{tmp}/no-model"], "no-model"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2(built, tmp_path, capsys, argv, expect):
    root, out, rows = built
    before = sorted(p.name for p in (root / "www").iterdir())
    argv = [a.format(root=root, out=out, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err and expect in err
    assert sorted(p.name for p in (root / "www").iterdir()) == before  # nothing overwritten
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_malformed_url_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "urls.parquet"
    bad.write_bytes(b"this is not parquet")
    assert main(["download", "--url-list", str(bad), "--output-folder", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "urls.parquet" in err


def test_serve_when_done_under_its_index_name(built):
    """`pipeline ... --serve --host H --port P --index-name shapes`: once the (resumed) run is done, the index
    answers over HTTP under that name, with the rows the URL list gave."""
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    root, out, rows = built
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["pipeline", "--url-list", str(root / "urls.parquet"), "--output-folder", str(out),
            "--number-sample-per-shard", "100", "--save-additional-columns", "color", "shape",
            "--serve", "--host", "127.0.0.1", "--port", str(port), "--index-name", "shapes"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "clipsearch", "-q", *argv], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip

    def stop() -> None:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def call(path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"content-type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    try:
        deadline = time.time() + 420  # a margin for a loaded machine
        while True:
            try:
                code, health = call("/healthz")
                if code == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                stop()  # then its stderr can be read to the end
                pytest.fail(f"pipeline --serve did not come up: {proc.stderr.read()[-3000:]}")
            time.sleep(0.3)
        assert health["indices"] == ["shapes"]
        code, res = call("/knn", {"text": "a red circle", "index": "shapes", "k": 5})
        assert code == 200 and res["index"] == "shapes" and len(res["results"]) == 5
        captions = {r["caption"] for r in rows}
        assert all(h["caption"] in captions for h in res["results"])
        assert call("/knn", {"text": "a red circle", "index": "default"})[0] == 404  # no index of that name
    finally:
        stop()


def test_watch_interval_spaces_the_listings(tmp_path, monkeypatch):
    """`pipeline --watch DIR --watch-interval S`: the folder is listed every S seconds (at least S apart;
    well under the 2 s default for S=0.05). The fifth listing stops the run."""
    from clipsearch.segments.watch import Watcher

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for interval in (0.05, 0.4):
        stamps: list[float] = []

        def pending(self, stamps=stamps):
            stamps.append(time.monotonic())
            if len(stamps) == 5:
                raise KeyboardInterrupt  # main's own way out of a watch: exit code 130
            return []

        monkeypatch.setattr(Watcher, "pending", pending)
        code = main(["-q", "pipeline", "--watch", str(inbox), "--output-folder", str(tmp_path / f"o{interval}"),
                     "--watch-interval", str(interval), "--no-progress"])  # fmt: skip
        gaps = list(np.diff(stamps))
        assert code == 130 and len(gaps) == 4
        assert min(gaps) >= interval * 0.95, gaps  # never sooner (a lower bound holds at any load)
        if interval < 0.1:
            assert max(gaps) < 1.5, gaps  # the option, not the 2 s default
