"""Benchmark `clipsearch serve` (and batch search planning) against clip-retrieval's back, on one machine.

    .venv/bin/python benchmarks/serve.py [--n 1000000] [--duration 20] [--concurrency 16]
        [--cr-python /work/venvs/clip-retrieval-interop/bin/python] [--vitb32 DIR] [--skip-reference]

What it does, in one run (everything on 127.0.0.1; every loop is bounded in time and stops by itself):
 1. Generates N CLIP-like clustered embeddings (as shared/bench/make_embeddings.py does), for the tiny
    model's dimension and, for the reference comparison, for 512 (ViT-B/32), and writes `index/` folders per
    docs/formats.md: image.index (`IVF1024,SQ8`, nprobe 16), image.vectors.npy (float16),
    metadata.arrow (url, caption, bucket = i % 1000 -> 0.1 %, shard = i % 100 -> 1 %), index.json.
 2. Serves the tiny index with `clipsearch serve` (tiny model text encoding included) and load-tests
    POST /knn with unique text prompts at k=10 from a concurrent keep-alive client: QPS, p50, p99, and the
    server's RSS (anonymous vs file-backed pages). Also at concurrency 1, and with filters at 1 % and 0.1 %.
 3. Filtered search quality, in process: recall@10 against exact filtered search, for the planner (what the
    server does) and for the IDSelector ANN path forced on (exact_max=0), at 1 % and 0.1 % selectivity.
 4. Reference: the 512-d index served by clip-retrieval's back (Flask, `hf_clip:` random ViT-B/32) and by
    clipsearch with the same model folder, same client, same prompts: the ratio of QPS.
Results go to WORK/results.json and are printed as markdown; docs/bench-serve.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

RUN_CLIPSEARCH = r"""
import sys, logging
logging.basicConfig(level=logging.WARNING)
from clipsearch.serve import ServeConfig, serve
kw = dict(indices={"bench": sys.argv[1]}, host="127.0.0.1", port=int(sys.argv[2]), web=False)
if sys.argv[3] != "-":
    kw["clip_model"] = sys.argv[3]
if len(sys.argv) > 4:  # BACKEND or BACKEND:PRECISION
    kw["backend"], _, prec = sys.argv[4].partition(":")
    kw["precision"] = prec or "auto"
serve(ServeConfig(**kw))
"""

# clip-retrieval back binds 0.0.0.0 in app.run; this keeps it on loopback
RUN_BACK = r"""
import sys, flask
_run = flask.Flask.run
flask.Flask.run = lambda self, *a, **k: _run(self, host="127.0.0.1", port=k.get("port"), debug=False, use_reloader=False, threaded=True)
from clip_retrieval.clip_back import clip_back
clip_back(indices_paths=sys.argv[1], port=int(sys.argv[2]), clip_model=sys.argv[3], enable_mclip_option=False,
          use_jit=False, provide_aesthetic_embeddings=False, provide_safety_model=False, provide_violence_detector=False,
          use_arrow=True, enable_faiss_memory_mapping=True, columns_to_return=["url", "caption"])
"""

ADJ = "red blue green small large old young happy wooden shiny dark bright furry striped tiny giant".split()
NOUN = "dog cat house car tree flower bird boat horse chair mountain city beach cake guitar robot".split()
PLACE = "on a beach|in the snow|at night|in a forest|on a table|in the city|under water|in a field".split("|")


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"a photo of a {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(PLACE)} {rng.randrange(10**6)}"
        for _ in range(n)
    ]


# --------------------------------------------------------------------------------------- data + index
def make_index(folder: Path, n: int, d: int, model: str, seed: int = 1, nlist: int = 1024) -> dict:
    import faiss
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "index.json").exists():
        return json.loads((folder / "index.json").read_text())
    t0 = time.time()
    rng = np.random.default_rng(seed)
    kc = 2000
    centers = rng.standard_normal((kc, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vecs = np.lib.format.open_memmap(folder / "image.vectors.npy", mode="w+", dtype=np.float16, shape=(n, d))
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x = centers[rng.integers(0, kc, m)] + 0.06 * rng.standard_normal((m, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        vecs[s : s + m] = x.astype(np.float16)
    vecs.flush()
    # SQ8 rather than PQ fast-scan: clip-retrieval's back calls search_and_reconstruct, which fast-scan lacks
    factory = f"IVF{nlist},SQ8"
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(1)  # OpenMP spin-waits badly on a shared 2-core machine
    train = np.asarray(vecs[np.sort(rng.choice(n, min(n, 60_000), replace=False))], dtype=np.float32)
    index.train(train)
    for s in range(0, n, step):
        index.add(np.asarray(vecs[s : s + step], dtype=np.float32))
    faiss.write_index(index, str(folder / "image.index"))
    import pyarrow.compute as pc

    schema = pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("bucket", pa.int64()),
            ("shard", pa.int64()),
        ]
    )
    with pa.OSFile(str(folder / "metadata.arrow"), "wb") as f, pa.ipc.new_file(f, schema) as w:
        for s0 in range(0, n, 65536):  # built with arrow compute, one batch at a time (10M rows stay cheap)
            ids = np.arange(s0, min(n, s0 + 65536))
            sid = pa.array(ids).cast(pa.string())
            w.write_batch(
                pa.record_batch(
                    [
                        pc.utf8_lpad(sid, 9, "0"),
                        pc.binary_join_element_wise("http://images.invalid/", sid, ".jpg", ""),
                        pc.binary_join_element_wise("caption ", sid, ""),
                        pa.array(ids % 1000, pa.int64()),
                        pa.array(ids % 100, pa.int64()),
                    ],
                    schema=schema,
                )
            )
    # clip-retrieval's back reads metadata/*.arrow (use_arrow) next to image.index
    (folder / "metadata").mkdir(exist_ok=True)
    link = folder / "metadata" / "0.arrow"
    if not link.exists():
        link.symlink_to("../metadata.arrow")
    info = {
        "format": "clipsearch.index",
        "version": 1,
        "model": model,
        "dim": d,
        "metric": "inner_product",
        "count": n,
        "indices": {
            "image": {
                "file": "image.index",
                "factory": factory,
                "reason": "benchmark fixture",
                "search_params": {"nprobe": 16},
                "mmap": True,
                "memory_bytes": os.path.getsize(folder / "image.index"),
                "curve": [],
            }
        },
        "build_seconds": round(time.time() - t0, 1),
    }
    (folder / "index.json").write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------ load gen
async def _request(reader, writer, raw: bytes) -> tuple[int, bool]:
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    close = headers.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0")
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.read()
        close = True
    return status, close


def _raw(path: str, port: int, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode() + data


def _summary(lat: list[float], errors: int, statuses: dict[int, int], wall: float) -> dict:
    a = np.array(lat) if lat else np.array([float("nan")])
    return {
        "requests": len(lat),
        "errors": errors,
        "statuses": statuses,
        "seconds": round(wall, 2),
        "qps": round(len(lat) / wall, 1),
        "p50_ms": round(float(np.percentile(a, 50)) * 1000, 1),
        "p90_ms": round(float(np.percentile(a, 90)) * 1000, 1),
        "p99_ms": round(float(np.percentile(a, 99)) * 1000, 1),
    }


async def _load(port: int, path: str, bodies: list[dict], concurrency: int, duration: float) -> dict:
    lat: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    it = iter(bodies)
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        conn = None
        while time.perf_counter() < deadline:
            body = next(it, None)
            if body is None:
                return
            raw = _raw(path, port, body)
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", port)
                status, close = await asyncio.wait_for(_request(*conn, raw), timeout=60)
            except Exception:
                errors += 1
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            lat.append(time.perf_counter() - t)
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200:
                errors += 1
            if close:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, **_summary(lat, errors, statuses, wall)}


def load(port: int, path: str, bodies: list[dict], concurrency: int, duration: float) -> dict:
    return asyncio.run(_load(port, path, bodies, concurrency, duration))


async def _load_rate(port: int, path: str, bodies: list[dict], rate: float, duration: float) -> dict:
    """Open loop: one request every 1/rate s whatever the server does (up to 256 in flight), latency from
    the scheduled send time, so a stalled server shows in the tail (no coordinated omission)."""
    lat: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    idle: list = []
    sem = asyncio.Semaphore(256)

    async def one(body: dict, scheduled: float) -> None:
        nonlocal errors
        async with sem:
            conn = idle.pop() if idle else None
            raw = _raw(path, port, body)
            try:
                try:
                    if conn is None:
                        conn = await asyncio.open_connection("127.0.0.1", port)
                    status, close = await asyncio.wait_for(_request(*conn, raw), timeout=60)
                except (ConnectionError, asyncio.IncompleteReadError):
                    # a pooled keep-alive connection the server closed while idle: like any HTTP client
                    # pool, retry once on a new connection (the latency still counts from `scheduled`)
                    if conn is not None:
                        conn[1].close()
                    conn = await asyncio.open_connection("127.0.0.1", port)
                    status, close = await asyncio.wait_for(_request(*conn, raw), timeout=60)
            except Exception:
                errors += 1
                if conn is not None:
                    conn[1].close()
                return
            lat.append(time.perf_counter() - scheduled)
            statuses[status] = statuses.get(status, 0) + 1
            errors += status != 200
            if close:
                conn[1].close()
            else:
                idle.append(conn)

    tasks = []
    gc.collect()
    gc.freeze()  # the client's own collections must not show as server latency
    t0 = time.perf_counter()
    n = int(rate * duration)
    for i in range(min(n, len(bodies))):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(bodies[i], scheduled)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    for conn in idle:
        conn[1].close()
    return {"rate": rate, **_summary(lat, errors, statuses, wall)}


def load_rate(port: int, path: str, bodies: list[dict], rate: float, duration: float) -> dict:
    return asyncio.run(_load_rate(port, path, bodies, rate, duration))


# ------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> float:
    import urllib.request

    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return time.time() - t
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout}s; see {log}")


def rss(pid: int) -> dict:
    out: dict = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS", "RssAnon", "RssFile", "VmHWM")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) // 1024
    # resident MB per mapped data file (index, vectors, metadata): where file-backed RSS comes from
    per_file: dict[str, int] = {}
    name = None
    try:
        for line in open(f"/proc/{pid}/smaps"):
            head = line.split()
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
                name = head[5] if len(head) > 5 else None
            elif (
                head
                and head[0] == "Rss:"
                and name
                and name.endswith((".index", ".ivfdata", ".npy", ".arrow"))
            ):
                per_file[os.path.basename(name)] = per_file.get(os.path.basename(name), 0) + int(head[1])
    except OSError:
        pass
    out["files_mb"] = {k: v // 1024 for k, v in sorted(per_file.items())}
    return out


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def uptime() -> str:
    return open("/proc/loadavg").read().split(" ")[0:3].__repr__()


# ------------------------------------------------------------------------------------------ recall
def filtered_recall(folder: Path, nq: int = 200) -> list[dict]:
    from clipsearch.search.searcher import IndexSearcher, exact_topk

    vecs = np.load(folder / "image.vectors.npy", mmap_mode="r")
    n, d = vecs.shape
    rng = np.random.default_rng(5)
    # text-like queries: a shared offset plus a target cluster member (make_embeddings.py's shifted queries)
    gap = rng.standard_normal(d).astype(np.float32)
    gap /= np.linalg.norm(gap)
    targets = np.asarray(vecs[rng.integers(0, n, nq)], dtype=np.float32)
    q = 0.35 * targets + 0.9 * gap + 0.08 * rng.standard_normal((nq, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    out = []
    for label, expr in (("1 %", "shard == 3"), ("0.1 %", "bucket == 7")):
        for plan_name, exact_max in (("planner", 50_000), ("IDSelector ANN forced", 0)):
            s = IndexSearcher(str(folder), exact_max=exact_max, threads=1)
            bm = s.filter_bitmap(expr)
            ids = bm.ids
            sub = np.asarray(vecs[ids], dtype=np.float32)
            truth_d, truth = exact_topk(sub, ids, q, 10)
            s.search(q[:5], 10, filter=expr)  # warm the caches (bitmap, subset vectors)
            t = time.perf_counter()
            res = s.search(q, 10, filter=expr)
            secs = time.perf_counter() - t
            hits = 0
            for r in range(nq):  # tie-aware: a hit scoring at least the k-th exact score counts
                found = res.ids[r][res.ids[r] >= 0]
                scores = (np.asarray(vecs[found], dtype=np.float32) @ q[r]) if len(found) else np.zeros(0)
                hits += int((scores >= truth_d[r, -1] - 1e-4).sum())
            out.append(
                {
                    "selectivity": label,
                    "path": plan_name,
                    "plan": res.plan,
                    "allowed": int(bm.count),
                    "recall_at_10": round(hits / (10 * nq), 4),
                    "full_k": bool((res.ids >= 0).all()),
                    "batch_qps": round(nq / secs, 1),
                }
            )
            s.close()
    return out


# ------------------------------------------------------------------------------------------ main
def start_clipsearch(
    folder: Path, model: str, work: Path, tag: str, backend: str = "auto", env_extra: dict | None = None
) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    log = work / f"clipsearch-{tag}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(env_extra or {}))
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_CLIPSEARCH, str(folder), str(port), model, backend],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        startup = wait_ready(f"http://127.0.0.1:{port}/healthz", proc, 600, log)
    except BaseException:
        stop(proc)
        raise
    return proc, port, startup


def start_back(
    folder: Path, model_dir: str, work: Path, cr_python: str
) -> tuple[subprocess.Popen, int, float]:
    paths = work / "indices_paths.json"
    paths.write_text(json.dumps({"bench": str(folder)}))
    port = free_port()
    log = work / "clip-back.log"
    proc = subprocess.Popen(
        [cr_python, "-c", RUN_BACK, str(paths), str(port), f"hf_clip:{model_dir}"],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        startup = wait_ready(f"http://127.0.0.1:{port}/indices-list", proc, 900, log)
    except BaseException:
        stop(proc)
        raise
    return proc, port, startup


BACK_BODY = {
    "modality": "image", "num_images": 10, "num_result_ids": 10, "indice_name": "bench",
    "deduplicate": True, "use_safety_model": False, "use_violence_detector": False, "use_mclip": False,
    "aesthetic_score": "", "aesthetic_weight": "",
}  # fmt: skip


def bench_tiny(folder: Path, work: Path, a: argparse.Namespace) -> dict:
    proc, port, startup = start_clipsearch(folder, "-", work, "tiny")
    out: dict = {"tool": "clipsearch", "model": a.tiny_model, "startup_s": round(startup, 1)}
    try:
        out["rss_idle_mb"] = rss(proc.pid)
        load(port, "/knn", [{"text": p, "k": 10} for p in prompts(300, 99)], a.concurrency, 5)  # warm-up
        runs = []
        for r in range(a.rounds if a.only != "rate" else 0):
            bodies = [{"text": p, "k": 10} for p in prompts(200_000, 10 + r)]
            runs.append(load(port, "/knn", bodies, a.concurrency, a.duration))
        out["load_runs"] = runs
        out["load"] = median_run(runs) if runs else None
        for rate in a.rates:  # open loop at fixed rates: the p99 a client sending that many q/s sees
            rr = [
                load_rate(
                    port, "/knn", [{"text": p, "k": 10} for p in prompts(50_000, 30 + r)], rate, a.duration
                )
                for r in range(a.rounds)
            ]
            out[f"rate_{rate:g}"] = {
                "runs": rr,
                "median_p99": sorted(rr, key=lambda r: r["p99_ms"])[len(rr) // 2],
            }
        out["rss_loaded_mb"] = rss(proc.pid)
        if a.only == "rate":
            return out
        out["load_c1"] = load(
            port, "/knn", [{"text": p, "k": 10} for p in prompts(50_000, 2)], 1, a.duration / 2
        )
        for label, col in (("1 %", "shard"), ("0.1 %", "bucket")):
            rng = random.Random(3)
            fb = [
                {"text": p, "k": 10, "filter": f"{col} == {rng.randrange(20)}"}  # 20 distinct filters, cached
                for p in prompts(100_000, 4)
            ]
            out[f"load_filter_{label}"] = load(port, "/knn", fb, a.concurrency, a.duration / 2)
        out["rss_after_filters_mb"] = rss(proc.pid)
    finally:
        stop(proc)
    return out


def bench_memory(work: Path, a: argparse.Namespace, d: int) -> dict:
    """RSS of a server over a big index, against the same server over a tiny one (= code + model)."""
    small = work / f"index-2000-{d}"
    make_index(small, 2000, d, a.tiny_model, nlist=16)
    big = work / f"index-{a.n_mem}-{d}"
    t = time.time()
    make_index(big, a.n_mem, d, a.tiny_model, nlist=4096)
    out: dict = {"n": a.n_mem, "build_s": round(time.time() - t), "files_mb": {}}
    for f in big.iterdir():
        if f.is_file():
            out["files_mb"][f.name] = round(f.stat().st_size / 2**20)
    for tag, folder in (("baseline_2000_rows", small), (f"index_{a.n_mem}_rows", big)):
        proc, port, startup = start_clipsearch(folder, "-", work, f"mem-{tag}")
        try:
            r: dict = {"startup_s": round(startup, 1), "idle": rss(proc.pid)}
            r["load"] = load(
                port, "/knn", [{"text": p, "k": 10} for p in prompts(100_000, 7)], 8, a.duration / 2
            )
            rng = random.Random(9)
            fb = [
                {"text": p, "k": 10, "filter": f"bucket == {rng.randrange(5)}"} for p in prompts(100_000, 8)
            ]
            r["load_filter"] = load(port, "/knn", fb, 8, a.duration / 2)
            r["loaded"] = rss(proc.pid)
            out[tag] = r
        finally:
            stop(proc)
    base, big_r = out["baseline_2000_rows"]["loaded"], out[f"index_{a.n_mem}_rows"]["loaded"]
    out["beyond_baseline_mb"] = {k: big_r[k] - base[k] for k in ("VmRSS", "RssAnon", "RssFile")}
    out["beyond_baseline_mb"]["files"] = big_r.get("files_mb")
    return out


def median_run(runs: list[dict]) -> dict:
    by_qps = sorted(runs, key=lambda r: r["qps"])
    return by_qps[len(by_qps) // 2]


def bench_reference(folder: Path, model_dir: str, work: Path, a: argparse.Namespace) -> dict:
    """Both servers up at once; load runs alternate between them so that both see the same machine load."""
    procs = []
    out: dict = {}
    try:
        cs, cs_port, cs_start = start_clipsearch(folder, model_dir, work, "vitb32")
        procs.append(cs)
        back, back_port, back_start = start_back(folder, model_dir, work, a.cr_python)
        procs.append(back)
        targets = {
            "clipsearch": (cs, cs_port, "/knn", lambda p: {"text": p, "k": 10}),
            "clip-retrieval": (back, back_port, "/knn-service", lambda p: {**BACK_BODY, "text": p}),
        }
        out = {name: {"runs": [], "runs_c1": []} for name in targets}
        out["clipsearch"]["startup_s"] = round(cs_start, 1)
        out["clip-retrieval"]["startup_s"] = round(back_start, 1)
        for _, port, path, mk in targets.values():
            load(port, path, [mk(p) for p in prompts(40, 99)], a.concurrency, 5)  # warm-up
        for r in range(a.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in order:
                _, port, path, mk = targets[name]
                out[name]["runs"].append(
                    load(port, path, [mk(p) for p in prompts(50_000, 20 + r)], a.concurrency, a.duration)
                )
                out[name]["runs_c1"].append(
                    load(port, path, [mk(p) for p in prompts(50_000, 40 + r)], 1, a.duration / 2)
                )
        for name, (proc, *_rest) in targets.items():
            out[name]["load"] = median_run(out[name]["runs"])
            out[name]["load_c1"] = median_run(out[name]["runs_c1"])
            out[name]["rss_loaded_mb"] = rss(proc.pid)
        qa, qb = out["clipsearch"]["load"]["qps"], out["clip-retrieval"]["load"]["qps"]
        out["ratio_qps"] = round(qa / qb, 1) if qb else None
        ratios = [
            x["qps"] / y["qps"]
            for x, y in zip(out["clipsearch"]["runs"], out["clip-retrieval"]["runs"], strict=True)
            if y["qps"]
        ]
        out["ratio_qps_per_round"] = [round(x, 1) for x in ratios]
    finally:
        for p in procs:
            stop(p)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def image_query(port: int) -> int:
    """One /knn image query (a 320 px PNG of noise); its HTTP status."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(buf, "PNG")
    body = json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "k": 10}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/knn", data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def encode_batches(port: int) -> tuple[float, float]:
    """(encoder calls, texts encoded) so far, from the server's /metrics."""
    calls = texts = 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("clipsearch_encode_batch_size_count"):
                calls = float(line.split()[-1])
            elif line.startswith("clipsearch_encode_batch_size_sum"):
                texts = float(line.split()[-1])
    return calls, texts


def bench_backends(folder: Path, model_dir: str, work: Path, a: argparse.Namespace) -> dict:
    """clipsearch's own backends (issue 19): one server per backend on the same ViT-B/32 index, up at once,
    load runs alternating between them. The converted model is cached before the timed starts (a first start
    converts; its time is reported separately as cold_startup_s)."""
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    cache = {"CLIPSEARCH_CACHE_DIR": str(work / "model-cache")}
    out: dict = {b: {"runs": [], "runs_c1": []} for b in backends}
    procs = {}
    try:
        for b in backends:
            if b != "torch" and not a.skip_cold_start:  # cold start: converts the model into a fresh cache
                shutil.rmtree(work / "model-cache", ignore_errors=True)
                proc, _, t = start_clipsearch(folder, model_dir, work, f"cold-{b}", b, cache)
                stop(proc)
                out[b]["cold_startup_s"] = round(t, 1)
            proc, port, t = start_clipsearch(folder, model_dir, work, f"vitb32-{b}", b, cache)
            procs[b] = (proc, port)
            out[b]["startup_s"] = round(t, 1)
            out[b]["rss_started_mb"] = rss(proc.pid)
        for _, port in procs.values():
            load(port, "/knn", [{"text": p, "k": 10} for p in prompts(60, 99)], a.concurrency, 5)  # warm-up
        for r in range(a.rounds):
            for b in backends if r % 2 == 0 else backends[::-1]:
                proc, port = procs[b]
                bodies = [{"text": p, "k": 10} for p in prompts(50_000, 20 + r)]
                cpu0, batches0 = cpu_seconds(proc.pid), encode_batches(port)
                run = load(port, "/knn", bodies, a.concurrency, a.duration)
                batches1 = encode_batches(port)
                if batches1[0] > batches0[0]:  # texts per encoder call in this run
                    run["mean_encode_batch"] = round(
                        (batches1[1] - batches0[1]) / (batches1[0] - batches0[0]), 1
                    )
                # the server's CPU per request does not depend on how busy the machine is: 2 free cores
                # serve at most 2 / cpu_ms_per_request (the client, on the same cores, not counted)
                cpu_ms = 1000 * (cpu_seconds(proc.pid) - cpu0) / max(1, run["requests"])
                run["server_cpu_ms_per_request"] = round(cpu_ms, 2)
                run["qps_cap_2_free_cores"] = round(2000 / cpu_ms, 1) if cpu_ms > 0 else None
                out[b]["runs"].append({**run, "load": uptime()})
                bodies = [{"text": p, "k": 10} for p in prompts(50_000, 40 + r)]
                out[b]["runs_c1"].append(load(port, "/knn", bodies, 1, a.duration / 2))
                print(b, json.dumps(out[b]["runs"][-1]), flush=True)
        for b, (proc, port) in procs.items():
            out[b]["rss_text_only_mb"] = rss(proc.pid)  # after the text load: the image tower not loaded yet
            t = time.perf_counter()
            out[b]["first_image_query_status"] = image_query(port)  # loads the image tower (converted models)
            out[b]["first_image_query_s"] = round(time.perf_counter() - t, 2)
            out[b]["rss_after_image_query_mb"] = rss(proc.pid)
            cpu = sorted(r["server_cpu_ms_per_request"] for r in out[b]["runs"])
            out[b]["server_cpu_ms_per_request"] = cpu[len(cpu) // 2]
            out[b]["qps_cap_2_free_cores"] = round(2000 / cpu[len(cpu) // 2], 1)
            out[b]["load"] = median_run(out[b]["runs"])
            out[b]["load_c1"] = median_run(out[b]["runs_c1"])
            out[b]["rss_loaded_mb"] = rss(proc.pid)
        if "torch" in out:
            t = out["torch"]["load"]["qps"]
            for b in backends:
                if b != "torch" and t:
                    out[b]["ratio_qps_vs_torch"] = round(out[b]["load"]["qps"] / t, 2)
                    out[b]["ratio_qps_per_round"] = [
                        round(x["qps"] / y["qps"], 2)
                        for x, y in zip(out[b]["runs"], out["torch"]["runs"], strict=True)
                        if y["qps"]
                    ]
    finally:
        for proc, _ in procs.values():
            stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--work", default="/tmp/clipsearch-bench-serve")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load run")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument(
        "--rates", type=float, nargs="*", default=[300.0], help="open-loop request rates to test (q/s)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="load runs per server (the median is reported)")
    ap.add_argument("--tiny-model", default="clipsearch-tiny")
    ap.add_argument(
        "--vitb32", default=None, help="random ViT-B/32 in HF format (shared/bench/make_vitb32.py)"
    )
    ap.add_argument("--cr-python", default=None, help="python of a venv with clip-retrieval")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument(
        "--only", default="all", choices=["all", "tiny", "rate", "reference", "recall", "memory", "backends"]
    )
    ap.add_argument(
        "--backends", default="torch,openvino", help="with --only backends: the backends compared"
    )
    ap.add_argument(
        "--skip-cold-start",
        action="store_true",
        help="with --only backends: keep the work folder's converted models (no cold start measured)",
    )
    ap.add_argument("--n-ref", type=int, default=None, help="rows of the ViT-B/32 index (default --n)")
    ap.add_argument("--n-mem", type=int, default=10_000_000, help="rows of the index for the memory run")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"n": a.n, "loadavg_start": uptime(), "cpus": os.cpu_count()}
    sys.path.insert(0, str(ROOT / "src"))

    if a.only == "memory":
        from clipsearch.embed.models import load_clip

        results["memory"] = bench_memory(work, a, int(load_clip(a.tiny_model).dim))
        print(json.dumps(results["memory"], indent=1), flush=True)

    if a.only in ("all", "tiny", "rate", "recall"):
        from clipsearch.embed.models import load_clip

        tiny = load_clip(a.tiny_model)
        d_tiny = int(tiny.dim)
        del tiny
        t = time.time()
        tiny_dir = work / f"index-{a.n}-{d_tiny}"
        info = make_index(tiny_dir, a.n, d_tiny, a.tiny_model)
        print(
            f"[index] {tiny_dir}: {info['indices']['image']['factory']} in {time.time() - t:.0f}s", flush=True
        )
        if a.only in ("all", "recall"):
            results["filtered_recall"] = filtered_recall(tiny_dir)
            print(json.dumps(results["filtered_recall"], indent=1), flush=True)
        if a.only in ("all", "tiny", "rate"):
            results["clipsearch_tiny"] = bench_tiny(tiny_dir, work, a)
            print(json.dumps(results["clipsearch_tiny"], indent=1), flush=True)

    if a.only == "backends":
        vit = a.vitb32 or "/tmp/clipsearch-bench-embed/vitb32"
        n_ref = a.n_ref or a.n
        ref_dir = work / f"index-{n_ref}-512"
        if not (ref_dir / "index.json").exists():
            make_index(ref_dir, n_ref, 512, vit)
        results["backends"] = bench_backends(ref_dir, vit, work, a)
        print(json.dumps(results["backends"], indent=1), flush=True)

    if a.only in ("all", "reference") and not a.skip_reference:
        cr = a.cr_python or next(
            (
                p
                for p in (
                    "/work/venvs/clip-retrieval/bin/python",
                    "/work/venvs/clip-retrieval-interop/bin/python",
                )
                if os.path.exists(p)
            ),
            None,
        )
        vit = a.vitb32 or next(
            (
                p
                for p in ("/tmp/clipsearch-bench-embed/vitb32", "/tmp/emb/bench/vitb32")
                if os.path.exists(f"{p}/config.json")
            ),
            None,
        )
        if cr is None or vit is None:
            results["reference"] = {"skipped": f"clip-retrieval venv {cr} or ViT-B/32 folder {vit} missing"}
        else:
            a.cr_python = cr
            t = time.time()
            ref_dir = work / f"index-{a.n}-512"
            make_index(ref_dir, a.n, 512, vit)
            print(f"[index] {ref_dir} in {time.time() - t:.0f}s", flush=True)
            results["reference"] = bench_reference(ref_dir, vit, work, a)
            print(json.dumps(results["reference"], indent=1), flush=True)
    results["loadavg_end"] = uptime()
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
