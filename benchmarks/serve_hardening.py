"""Costly and hostile requests against `clipsearch serve`: memory per image query, filter cost, dedup cost.

    .venv/bin/python benchmarks/serve_hardening.py [--only images|filters|dedup|all] [--old-src DIR]

Everything runs on 127.0.0.1; every loop is bounded in time and stops by itself.
- images: a server (tiny model, 100k-row index) gets 8 concurrent image queries of the security review's
  131 KB PNG of 6300 x 6300 pixels (multipart uploads in a closed loop) while a client sends text queries
  at a fixed rate (open loop, latency from the scheduled send time). Reports the server's peak RSS (VmHWM)
  above its RSS after a warm-up, the image queries' statuses and latency, and the text queries' p50/p99,
  also without the image load. `--old-src DIR` runs the same against another checkout's src/ (the code
  before the bounded decoding), in alternation, under the same machine load.
- filters: a 10M-row metadata.arrow (the schema benchmarks/serve.py writes); the time to evaluate new
  filters of several shapes (a cache miss), a cache hit, and which ones the default budget stops.
- dedup: near_duplicates over 16,384 candidates (the default hygiene_max_candidates), with and without
  duplicates, at 64 and 512 dimensions, one BLAS thread (as the server runs it).
Results go to WORK/hardening.json; docs/bench-serve.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import (  # noqa: E402  (the load client and index maker of the throughput benchmark)
    RUN_CLIPSEARCH,
    _load_rate,
    _request,
    free_port,
    make_index,
    prompts,
    stop,
    uptime,
    wait_ready,
)


def status_mb(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(("VmRSS", "VmHWM", "RssAnon")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) // 1024
    return out


def bomb_png(side: int = 6300) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (side, side), (200, 30, 40))
    img.paste(Image.new("RGB", (side // 2, side // 2), (20, 200, 40)), (side // 6, side // 6))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def small_png(side: int = 1000) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 80, 220)).save(buf, "PNG")
    return buf.getvalue()


def multipart(port: int, image: bytes) -> bytes:
    boundary = "clipsearchbench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n10\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /knn HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def _images(port: int, raw: bytes, workers: int, duration: float) -> dict:
    lat: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        conn = None
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = await asyncio.open_connection("127.0.0.1", port)
                status, close = await asyncio.wait_for(_request(*conn, raw), timeout=120)
            except Exception:
                statuses[-1] = statuses.get(-1, 0) + 1
                if conn is not None:
                    conn[1].close()
                conn = None
                continue
            lat.append(time.perf_counter() - t)
            statuses[status] = statuses.get(status, 0) + 1
            if close:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    await asyncio.gather(*[worker() for _ in range(workers)])
    a = np.array(lat) if lat else np.array([float("nan")])
    return {
        "workers": workers,
        "requests": len(lat),
        "statuses": statuses,
        "p50_ms": round(float(np.percentile(a, 50)) * 1000, 1),
        "p99_ms": round(float(np.percentile(a, 99)) * 1000, 1),
    }


async def _both(
    port: int, image: bytes, texts: list[dict], rate: float, duration: float
) -> tuple[dict, dict]:
    """8 image workers, and meanwhile text queries at `rate` (open loop)."""
    img = asyncio.create_task(_images(port, multipart(port, image), 8, duration))
    await asyncio.sleep(0.5)  # the image load first
    txt = await _load_rate(port, "/knn", texts, rate, duration - 1)
    return await img, txt


def start_server(folder: Path, src: Path, work: Path, tag: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = work / f"hardening-{tag}.log"
    env = dict(os.environ, PYTHONPATH=str(src))
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_CLIPSEARCH, str(folder), str(port), "-"],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc, 600, log)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def bench_images(work: Path, a: argparse.Namespace) -> dict:
    folder = work / "index-100000-64"
    make_index(folder, 100_000, 64, "clipsearch-tiny", nlist=256)
    bomb, warm = bomb_png(), small_png()
    out: dict = {"png_bytes": len(bomb), "png_pixels": "6300x6300", "rate": a.text_rate, "rounds": []}
    sources = [("new", ROOT / "src")] + ([("old", Path(a.old_src))] if a.old_src else [])
    for r in range(a.rounds):
        for tag, src in sources:
            proc, port = start_server(folder, src, work, f"{tag}-{r}")
            try:
                res: dict = {"code": tag, "loadavg": uptime()}
                texts = [{"text": p, "k": 10} for p in prompts(100_000, 50 + r)]
                # warm-up: the text path, and one image decode of a 1000 px PNG (loads the decoder libraries)
                asyncio.run(_load_rate(port, "/knn", texts[:200], 50, 4))
                asyncio.run(_images(port, multipart(port, warm), 1, 1))
                res["after_warmup_mb"] = status_mb(proc.pid)
                res["text_alone"] = asyncio.run(
                    _load_rate(port, "/knn", texts[200:], a.text_rate, a.duration / 2)
                )

                res["images"], res["text_during_images"] = asyncio.run(
                    _both(port, bomb, texts[5000:], a.text_rate, a.duration)
                )
                res["after_mb"] = status_mb(proc.pid)
                res["peak_rise_mb"] = res["after_mb"]["VmHWM"] - res["after_warmup_mb"]["VmRSS"]
                out["rounds"].append(res)
                print(json.dumps(res), flush=True)
            finally:
                stop(proc)
    return out


# ------------------------------------------------------------------------------------------ filters
def make_metadata(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("caption", pa.string()),
            ("bucket", pa.int64()),
            ("shard", pa.int64()),
        ]
    )
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, schema) as w:
        for s0 in range(0, n, 65536):
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
    tmp.rename(path)


def bench_filters(work: Path, a: argparse.Namespace) -> dict:
    from clipsearch.search.filters import FilterBudgetError, FilterCache, parse_canonical
    from clipsearch.search.metadata import MetadataTable
    from clipsearch.serve.settings import ServeSettings

    path = work / f"meta-{a.n_filter}" / "metadata.arrow"
    t = time.time()
    make_metadata(path, a.n_filter)
    table = MetadataTable(str(path))
    budget = ServeSettings().filter_budget_s
    out: dict = {"rows": table.num_rows, "file_mb": round(path.stat().st_size / 2**20), "budget_s": budget}
    out["build_s"] = round(time.time() - t, 1)
    shapes = {
        "bucket == 7 (int ==, 0.1 %)": "bucket == 7",
        "shard in (1, 2, 3) (int in, 3 %)": "shard in (1, 2, 3)",
        "bucket between 10 and 19 (1 %)": "bucket between 10 and 19",
        "bucket == 7 and shard == 7": "bucket == 7 and shard == 7",
        'caption contains "12345" (1 term)': 'caption contains "12345"',
        'caption startswith "caption 99"': 'caption startswith "caption 99"',
        "10 contains terms (or)": " or ".join(f'caption contains "{i:05d}"' for i in range(10)),
        "64 contains terms (or, the term limit)": " or ".join(f'caption contains "x{i}"' for i in range(64)),
    }
    rows = []
    for label, expr in shapes.items():
        cache = FilterCache(table, n=table.num_rows)  # no budget: the full cost
        t = time.perf_counter()
        bm = cache.get(expr)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        cache.get(expr)
        hot = time.perf_counter() - t
        limited = FilterCache(table, n=table.num_rows, budget_s=budget)
        try:
            t = time.perf_counter()
            limited.get(expr)
            stopped = None
        except FilterBudgetError:
            stopped = round(time.perf_counter() - t, 2)
        row = {
            "filter": label,
            "matches": bm.count,
            "cold_s": round(cold, 3),
            "rows_per_s_m": round(table.num_rows / cold / 1e6, 1),
            "hit_us": round(hot * 1e6, 1),
            "stopped_by_budget_after_s": stopped,
            "loadavg": uptime(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out["filters"] = rows
    long = " or ".join(f"width == {i}" for i in range(60))
    parse_canonical.cache_clear()
    t = time.perf_counter()
    parse_canonical(long)
    cold_parse = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(1000):
        parse_canonical(long)
    out["parse_60_terms_us"] = {
        "cold": round(cold_parse * 1e6),
        "cached": round((time.perf_counter() - t) * 1e3, 2),
    }
    return out


# ------------------------------------------------------------------------------------------ dedup
def bench_dedup(a: argparse.Namespace) -> dict:
    from threadpoolctl import threadpool_limits

    from clipsearch.serve.dedup import near_duplicates
    from clipsearch.serve.settings import ServeSettings

    threadpool_limits(1, "blas")
    n = ServeSettings().hygiene_max_candidates
    rng = np.random.default_rng(0)
    rows = []
    for d in (64, 512):
        for case, want in (("no duplicates, page 5000-6000", 6000), ("no duplicates, first page", 10)):
            v = rng.standard_normal((n, d)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            t = time.perf_counter()
            near_duplicates(v[: 2 * want + 8], 0.95, max_kept=want + 1)
            rows.append(
                {"d": d, "case": case, "candidates": 2 * want + 8, "s": round(time.perf_counter() - t, 3)}
            )
        base = rng.standard_normal((3000, d)).astype(np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        v = base[rng.integers(0, 3000, n)]  # every row has ~5 copies: all 16,384 are examined
        t = time.perf_counter()
        near_duplicates(v, 0.95, max_kept=6001)
        rows.append(
            {
                "d": d,
                "case": "5 copies of each, page 5000-6000",
                "candidates": n,
                "s": round(time.perf_counter() - t, 3),
            }
        )
        t = time.perf_counter()
        near_duplicates(v[:12008], 0.95)  # before: every candidate examined, and the loop doubled up to 96k
        rows.append(
            {
                "d": d,
                "case": "before: 12,008 candidates, no early stop",
                "candidates": 12008,
                "s": round(time.perf_counter() - t, 3),
            }
        )
    for r in rows:
        print(json.dumps(r), flush=True)
    return {"rows": rows, "loadavg": uptime()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="all", choices=["all", "images", "filters", "dedup"])
    ap.add_argument("--work", default="/tmp/clipsearch-bench-serve")
    ap.add_argument("--old-src", default=None, help="src/ of a checkout to compare with (images)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of the image load")
    ap.add_argument("--text-rate", type=float, default=50.0, help="text queries per second meanwhile")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--n-filter", type=int, default=10_000_000, help="rows of the filter benchmark's table")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    results: dict = {"loadavg_start": uptime(), "cpus": os.cpu_count()}
    if a.only in ("all", "dedup"):
        results["dedup"] = bench_dedup(a)
    if a.only in ("all", "filters"):
        results["filters"] = bench_filters(work, a)
    if a.only in ("all", "images"):
        results["images"] = bench_images(work, a)
    results["loadavg_end"] = uptime()
    out = work / f"hardening-{a.only}.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
