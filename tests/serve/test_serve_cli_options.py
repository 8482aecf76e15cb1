"""`serve` and `query` options, each run through its command-line path and checked by its effect: the
address and processes that listen, what the app answers, and recall against numpy's exact search."""

from __future__ import annotations

import argparse
import base64
import io
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipsearch.aesthetic.table import save_table
from clipsearch.cli import main
from clipsearch.serve import cli as serve_cli
from clipsearch.serve import create_app

from .conftest import free_port, png_bytes
from .helpers import FakeEncoder, build_index

TORCH = ("--backend", "torch", "--precision", "fp32")  # the model as is: no runtime conversion, no probe


def settings(argv: list[str]):
    """The settings `clipsearch serve ARGV` starts with (the command's own parser and mapping)."""
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    return serve_cli.settings_from_args(p.parse_args(argv))


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 * side**2 bytes."""
    px = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "PNG")
    return buf.getvalue()


def test_app_options(index_dir, encoder, tmp_path, monkeypatch):
    """--no-web, --max-body-mb, --max-image-mb and --aesthetic-embeddings change what the app answers."""
    monkeypatch.delenv("CLIPSEARCH_SERVE_SETTINGS", raising=False)
    table = tmp_path / "table.npy"  # score 9 is the direction of "green", every lower score "black"
    rows = [encoder.word(c) / np.linalg.norm(encoder.word(c)) for c in ["black"] * 9 + ["green"]]
    save_table(table, np.stack(rows))
    base = ["--index", f"shapes={index_dir}"]
    with TestClient(create_app(settings(base), encoder=encoder)) as c:  # the defaults, for comparison
        assert c.get("/").status_code == 200 and "<html" in c.get("/").text.lower()
        assert c.post("/knn", json={"text": "a red circle", "aesthetic_score": 9}).status_code == 400
        plain = [
            h["caption"] for h in c.post("/knn", json={"text": "a red circle", "k": 20}).json()["results"]
        ]
    opts = [
        "--no-web",
        "--max-body-mb",
        "0.25",
        "--max-image-mb",
        "0.05",
        "--aesthetic-embeddings",
        str(table),
    ]
    with TestClient(create_app(settings(base + opts), encoder=encoder)) as c:
        assert c.get("/").status_code == 404  # --no-web: the API only
        assert c.get("/healthz").status_code == 200
        r = c.post("/knn", json={"text": "a red circle " + "x" * 300_000})  # > 0.25 MB
        assert r.status_code == 413 and "body" in r.text
        small = base64.b64encode(png_bytes((40, 180, 60))).decode()
        assert c.post("/knn", json={"image": small, "k": 3}).status_code == 200
        big = base64.b64encode(noise_png(160)).decode()  # ~77 KB > 0.05 MB, the body itself < 0.25 MB
        r = c.post("/knn", json={"image": big, "k": 3})
        assert r.status_code == 413 and "52428 bytes limit" in r.text, r.text  # 0.05 MB, as an image_url body
        r = c.post(
            "/knn", json={"text": "a red circle", "k": 20, "aesthetic_score": 9, "aesthetic_weight": 2}
        )
        nudged = [h["caption"] for h in r.json()["results"]]
        assert sum("green" in x for x in nudged) > sum("green" in x for x in plain) + 3


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_host(tmp_path):
    """`serve --host 127.0.0.2`: a real server answers on 127.0.0.2 and not on 127.0.0.1."""
    folder = str(tmp_path / "index")
    build_index(folder, n=200, dim=64, model="clipsearch-tiny", text_factory=None)
    port = free_port()
    argv = ["serve", "--index", f"t={folder}", "--host", "127.0.0.2", "--port", str(port), *TORCH]
    env = {k: v for k, v in os.environ.items() if k != "CLIPSEARCH_SERVE_SETTINGS"}
    proc = subprocess.Popen([sys.executable, "-m", "clipsearch", *argv], stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 420  # a margin for a loaded machine
        while True:
            try:
                if _get(f"http://127.0.0.2:{port}/healthz") == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                stop_group(proc)  # then its stderr can be read to the end
                pytest.fail(f"serve did not come up: {proc.stderr.read()[-3000:]}")
            time.sleep(0.2)
        with pytest.raises(OSError):  # not listening on 127.0.0.1
            _get(f"http://127.0.0.1:{port}/healthz")
    finally:
        stop_group(proc)


def test_workers(tmp_path, monkeypatch):
    """`serve --workers 2`: uvicorn is asked for two worker processes of the factory app, and the factory,
    from the settings handed over in the environment, serves the same index (uvicorn.run recorded here, so
    the suite loads no model in extra processes)."""
    import uvicorn

    from clipsearch.serve import app_from_env

    monkeypatch.delenv("CLIPSEARCH_SERVE_SETTINGS", raising=False)
    folder = str(tmp_path / "index")
    build_index(folder, n=200, dim=64, model="clipsearch-tiny", text_factory=None)
    runs: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: runs.append((a, k)))
    try:
        assert (
            main(["-q", "serve", "--index", f"t={folder}", "--port", "8123", "--workers", "2", *TORCH]) == 0
        )
        [(args, kw)] = runs
        assert args == ("clipsearch.serve:app_from_env",) and kw["factory"] is True
        assert kw["workers"] == 2 and kw["port"] == 8123
        with TestClient(app_from_env()) as c:  # what each worker builds
            assert c.get("/healthz").json()["indices"] == ["t"]
            assert len(c.post("/knn", json={"text": "a red circle", "k": 3}).json()["results"]) == 3
    finally:
        os.environ.pop("CLIPSEARCH_SERVE_SETTINGS", None)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the parent and its workers), SIGKILL what is left after 60 s."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _recall(found: list[list[int]], vecs: np.ndarray, q: np.ndarray, k: int = 10) -> float:
    """Share of numpy's exact top-k found; a hit tied with the k-th exact score counts (captions repeat, so
    text vectors do too)."""
    sims = q @ vecs.T
    kth = -np.sort(-sims, axis=1)[:, k - 1]
    return float(np.mean([sum(sims[i, j] >= kth[i] - 1e-5 for j in f[:k]) / k for i, f in enumerate(found)]))


def _query_ids(out, n: int = 40) -> list[list[int]]:
    """The hits of each of the n queries (a query may have fewer than k, or none)."""
    by_q: dict[str, list[int]] = {}
    for r in pq.read_table(out).to_pylist():
        by_q.setdefault(r["query"], []).append(r["id"])
    return [by_q.get(str(i), []) for i in range(n)]


def test_query_nprobe_and_modality(tmp_path):
    """`query --nprobe N` on IVF64,Flat: nprobe 1 misses neighbours numpy's exact search finds, 64 (every
    list) finds them all; --modality picks the image or the text index."""
    folder = str(tmp_path / "ivf")
    data = build_index(
        folder, n=5000, encoder=FakeEncoder(32), image_factory="IVF64,Flat", text_factory="Flat"
    )
    image, text = data["image"].astype(np.float32), data["text"].astype(np.float32)
    rng = np.random.default_rng(3)
    q = rng.standard_normal((40, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    np.save(tmp_path / "q.npy", q)

    def run(*opts: str) -> list[list[int]]:
        out = tmp_path / "hits.parquet"
        argv = [
            "query",
            "--index",
            folder,
            "--embeddings",
            str(tmp_path / "q.npy"),
            "-k",
            "10",
            "-o",
            str(out),
        ]
        assert main([*argv, *opts]) == 0
        return _query_ids(out)

    low, high = run("--modality", "image", "--nprobe", "1"), run("--modality", "image", "--nprobe", "64")
    assert _recall(high, image, q) == 1.0 and _recall(low, image, q) < 0.8
    on_text = run("--modality", "text")
    assert _recall(on_text, text, q) == 1.0 and _recall(on_text, image, q) < 0.5


def test_query_ef_search(tmp_path):
    """`query --ef-search N` on an HNSW index: a search depth of 1 loses neighbours that 256 finds."""
    folder = str(tmp_path / "hnsw")
    data = build_index(folder, n=5000, encoder=FakeEncoder(32), image_factory="HNSW8,Flat", text_factory=None)
    vecs = data["image"].astype(np.float32)
    rng = np.random.default_rng(4)
    q = rng.standard_normal((40, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    np.save(tmp_path / "q.npy", q)
    recall = {}
    for ef in ("1", "256"):
        out = tmp_path / f"ef{ef}.parquet"
        argv = ["query", "--index", folder, "--embeddings", str(tmp_path / "q.npy"), "-k", "10", "-o", str(out),
                "--ef-search", ef]  # fmt: skip
        assert main(argv) == 0
        recall[ef] = _recall(_query_ids(out), vecs, q)
    assert recall["256"] >= 0.9 and recall["1"] < recall["256"] - 0.2, recall


def test_query_aesthetic_embeddings(index_dir, encoder, tmp_path):
    """`query --aesthetic-score 9 --aesthetic-embeddings TABLE`: the table's score-9 direction ("green")
    pulls the hits toward it; without the table the score has nothing to nudge with."""
    table = tmp_path / "table.npy"
    rows = [encoder.word(c) / np.linalg.norm(encoder.word(c)) for c in ["black"] * 9 + ["green"]]
    save_table(table, np.stack(rows))
    np.save(tmp_path / "q.npy", encoder.encode_text(["a red circle"]))
    common = ["query", "--index", index_dir, "--embeddings", str(tmp_path / "q.npy"), "-k", "20"]
    assert main([*common, "-o", str(tmp_path / "plain.parquet")]) == 0
    assert main([*common, "-o", str(tmp_path / "nudged.parquet"), "--aesthetic-score", "9", "--aesthetic-weight",
                 "2", "--aesthetic-embeddings", str(table)]) == 0  # fmt: skip

    def green(name: str) -> int:
        return sum("green" in c for c in pq.read_table(tmp_path / name).column("caption").to_pylist())

    assert green("nudged.parquet") > green("plain.parquet") + 3


def test_query_batch_size_and_device(tmp_path, monkeypatch, capsys):
    """`query --prompts F --batch-size 2 --device cpu`: five prompts reach the model as batches of 2, 2 and 1,
    on the CPU; `--device cuda` runs there, or without a GPU is a one-line error."""
    import torch

    from clipsearch.embed import models

    folder = str(tmp_path / "index")
    build_index(folder, n=200, dim=64, model="clipsearch-tiny", text_factory=None)
    prompts = tmp_path / "p.txt"
    texts = ["a red circle", "a blue star", "a green tree", "a black cat", "a white house"]
    prompts.write_text("\n".join(texts) + "\n")
    seen: list[tuple[int, str]] = []  # the prompts' batches (a model may warm up on texts of its own)
    text_features = models.ClipEncoder.text_features

    def spy(self, batch):
        if set(batch) <= set(texts):
            seen.append((len(batch), str(self.device)))
        return text_features(self, batch)

    monkeypatch.setattr(models.ClipEncoder, "text_features", spy)
    # torch fp32: no conversion to another runtime, no precision probe (what the test is not about)
    base = ["-q", "query", "--index", folder, "--prompts", str(prompts), "-k", "3", "--backend", "torch",
            "--precision", "fp32"]  # fmt: skip
    assert main([*base, "-o", str(tmp_path / "cpu.parquet"), "--batch-size", "2", "--device", "cpu"]) == 0
    assert seen == [(2, "cpu"), (2, "cpu"), (1, "cpu")]
    assert pq.read_table(tmp_path / "cpu.parquet").num_rows == 15
    seen.clear()
    code = main([*base, "-o", str(tmp_path / "gpu.parquet"), "--device", "cuda"])
    if torch.cuda.is_available():
        assert code == 0 and seen and all(d.startswith("cuda") for _, d in seen)
    else:
        errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert code == 2 and len(errors) == 1 and "cuda" in errors[0].lower() and seen == []
        assert not (tmp_path / "gpu.parquet").exists()


def test_serve_device(tmp_path, monkeypatch):
    """`serve --device`: the model named by the index is loaded there (cuda without a GPU: refused at start)."""
    import torch

    from clipsearch.errors import ClipsearchError

    monkeypatch.delenv("CLIPSEARCH_SERVE_SETTINGS", raising=False)
    folder = str(tmp_path / "index")
    build_index(folder, n=200, dim=64, model="clipsearch-tiny", text_factory=None)
    with TestClient(create_app(settings(["--index", f"t={folder}", "--device", "cpu", *TORCH]))) as c:
        assert c.app.state.clipsearch.encoder.device == "cpu"
        assert c.post("/knn", json={"text": "a red circle", "k": 3}).status_code == 200
    if torch.cuda.is_available():
        with TestClient(create_app(settings(["--index", f"t={folder}", "--device", "cuda", *TORCH]))) as c:
            assert str(c.app.state.clipsearch.encoder.device).startswith("cuda")
    else:
        with pytest.raises(ClipsearchError, match="(?i)cuda"):
            create_app(settings(["--index", f"t={folder}", "--device", "cuda", *TORCH]))


def test_text_batching_options(index_dir, encoder, monkeypatch, tmp_path, capsys):
    """--text-batch-max caps the texts of one encoder call, --text-batch-wait-ms gathers queries that arrive
    a few ms apart into one call, --encoder-workers sets the calls in flight; every query of a batch gets the
    results it gets alone. Bad values: one line, exit 2."""
    import asyncio

    import httpx

    monkeypatch.delenv("CLIPSEARCH_SERVE_SETTINGS", raising=False)
    base = ["--index", f"shapes={index_dir}"]
    colours, shapes = ["red", "blue", "green"] * 4, ["circle", "star"] * 6
    texts = [f"a {c} {s} number {i}" for i, (c, s) in enumerate(zip(colours, shapes, strict=True))]

    def ids(res: dict) -> list[int]:
        return [h["id"] for h in res["results"]]

    with TestClient(create_app(settings(base), encoder=encoder)) as c:  # one query at a time
        alone = {t: ids(c.post("/knn", json={"text": t, "k": 5}).json()) for t in texts}

    async def burst(app, stagger_s: float) -> list[list[int]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            tasks = []
            for t in texts:
                tasks.append(asyncio.create_task(c.post("/knn", json={"text": t, "k": 5})))
                await asyncio.sleep(stagger_s)
            return [ids(r.json()) for r in await asyncio.gather(*tasks)]

    class SlowEncoder(FakeEncoder):  # the same vectors; queries pile up while a call runs
        def encode_text(self, texts, batch_size=256):
            time.sleep(0.02)
            return super().encode_text(texts, batch_size)

    slow = SlowEncoder(dim=encoder.dim)
    s = settings(base + ["--text-batch-max", "4", "--encoder-workers", "1"])
    assert (s.batch_max_size, s.batch_wait_ms, s.encoder_workers) == (4, 0.0, 1)
    # by default the plan follows the backend: OpenVINO one 2-thread call per 2 cores, the others 2 x 1 thread
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert settings(base).encoder_plan("openvino") == (1, 2)
    assert settings(base).encoder_plan("onnx") == settings(base).encoder_plan("torch") == (2, 1)
    assert s.encoder_plan("openvino") == (1, 2) and s.encoder_plan("torch") == (1, 1)
    with TestClient(create_app(s, encoder=slow)) as c:
        assert c.app.state.clipsearch.batcher.workers == 1
        before = len(slow.calls)
        got = asyncio.run(burst(c.app, 0.0))  # 12 at once: calls of at most 4 texts
        calls = slow.calls[before:]
    assert sum(calls) == len(texts) and max(calls) == 4, calls
    assert got == [alone[t] for t in texts]

    # queries 3 ms apart (33 ms in all) share calls within a 50 ms window
    s = settings(base + ["--text-batch-wait-ms", "50", "--encoder-workers", "1"])
    assert s.batch_wait_ms == 50.0
    with TestClient(create_app(s, encoder=encoder)) as c:
        before = len(encoder.calls)
        got = asyncio.run(burst(c.app, 0.003))
        calls = encoder.calls[before:]
    assert sum(calls) == len(texts) and len(calls) <= len(texts) // 2, calls
    assert got == [alone[t] for t in texts]

    folder = str(index_dir)
    for opt, value, what in (
        ("--text-batch-wait-ms", "500", "batch_wait_ms"),
        ("--text-batch-wait-ms", "-1", "batch_wait_ms"),
        ("--text-batch-max", "0", "batch_max_size"),
        ("--encoder-workers", "-1", "encoder_workers"),
    ):
        capsys.readouterr()
        assert main(["serve", "--index", folder, opt, value]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and what in err[0], err
