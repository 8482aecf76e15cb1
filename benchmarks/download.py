"""Benchmark `clipsearch download` against img2dataset on the same URLs, same settings, same machine.

    .venv/bin/python benchmarks/download.py [--n 20000] [--rounds 2] [--out docs-figures.json]

It generates the corpus with shared/bench/make_corpus.py (once; cached in --corpus), serves it with
nginx via shared/bench/serve.sh on 127.0.0.1, then runs the two tools alternately (webdataset, 256 px
border, 2 processes, 64 concurrent requests per process) and reports images/s (URLs / wall time of the
whole command), success counts and peak RSS (the sum over the process tree, sampled every 0.1 s).
img2dataset runs from its own venv (--i2d-python; `pip install img2dataset==1.47 'numpy<2' 'pyarrow<20'`).

--bbox-fraction F adds a `face_bboxes` column where a fraction F of the rows carry 1-3 boxes (each side
5-35% of the image, seeded) and the others none, and both tools blur them (`--bbox-col face_bboxes`,
img2dataset's `--bbox_col`), clipsearch with its default kernel unless --extra says otherwise.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_rss_kb(root: int) -> int:
    """Sum of VmRSS over `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, int, int, float]:
    """Run cmd; return (wall seconds, peak tree RSS in MB, exit code, CPU seconds of the whole tree).

    The CPU seconds (user + system, the tool and every worker it waited for) do not depend on how busy
    the machine is, unlike the wall time, so they compare the tools' efficiency on a shared machine."""
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        peak, status, usage = 0, None, None
        try:
            while True:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                peak = max(peak, tree_rss_kb(p.pid))
                time.sleep(0.1)
        finally:
            if status is None or not pid:  # interrupted: stop the tool and its workers
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, peak // 1024, p.returncode, usage.ru_utime + usage.ru_stime


def outcome_clipsearch(out: str) -> tuple[int, dict[str, int]]:
    """(successes, the 8 most common failure reasons)."""
    run = json.load(open(os.path.join(out, "run_stats.json")))
    return run["total"]["successes"], dict(run["total"]["top_errors"][:8])


def outcome_i2d(out: str) -> tuple[int, dict[str, int]]:
    ok, errors = 0, {}
    for f in glob.glob(os.path.join(out, "*_stats.json")):
        st = json.load(open(f))
        ok += st["successes"]
        for k, v in st["status_dict"].items():
            if k != "success":
                k = " ".join(k.split())[:80]
                errors[k] = errors.get(k, 0) + v
    return ok, dict(sorted(errors.items(), key=lambda kv: -kv[1])[:8])


def with_boxes(urls: str, fraction: float, work: Path) -> str:
    """The URL list plus a face_bboxes column: `fraction` of the rows with 1-3 boxes, the rest []."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(urls)
    r = random.Random(16)
    boxes = []
    for _ in range(table.num_rows):
        row = []
        if r.random() < fraction:
            for _ in range(r.randint(1, 3)):
                w, h = r.uniform(0.05, 0.35), r.uniform(0.05, 0.35)
                x, y = r.uniform(0, 1 - w), r.uniform(0, 1 - h)
                row.append([round(x, 4), round(y, 4), round(x + w, 4), round(y + h, 4)])
        boxes.append(row)
    table = table.append_column("face_bboxes", pa.array(boxes, pa.list_(pa.list_(pa.float64()))))
    out = work / "urls_bbox.parquet"
    pq.write_table(table, out)
    return str(out)


def load() -> str:
    return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each tool")
    ap.add_argument("--port", type=int, default=18181)
    ap.add_argument("--corpus", default="/tmp/clipsearch-bench-download")
    ap.add_argument("--bench-dir", default=str(ROOT.parent / "shared" / "bench"))
    ap.add_argument("--i2d-python", default="/work/venvs/img2dataset/bin/python")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--extra", default="", help="extra clipsearch options, e.g. '--decode-threads 1'")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--bbox-fraction", type=float, default=0.0, help="rows with 1-3 face boxes to blur")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below (nginx, temp dirs)

    corpus = Path(a.corpus)
    if (
        not (corpus / "urls.parquet").exists()
        or json.loads((corpus / "meta.json").read_text()).get("n") != a.n
    ):
        shutil.rmtree(corpus, ignore_errors=True)
        subprocess.run(
            [sys.executable, f"{a.bench_dir}/make_corpus.py", str(corpus), str(a.n), str(a.port)], check=True
        )
        (corpus / "meta.json").write_text(json.dumps({"n": a.n, "port": a.port}))
    port = json.loads((corpus / "meta.json").read_text())["port"]
    pidfile = subprocess.run(
        ["sh", f"{a.bench_dir}/serve.sh", str(corpus / "www"), str(port)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    urls = str(corpus / "urls.parquet")
    if a.bbox_fraction:
        urls = with_boxes(urls, a.bbox_fraction, work)
    ours = [
        str(ROOT / ".venv/bin/python"),
        "-m",
        "clipsearch.download",
        "-q",
        "--url-list",
        urls,
        "--caption-col",
        "caption",
        "--output-format",
        "webdataset",
        "--image-size",
        "256",
        "--resize-mode",
        "border",
        "--processes-count",
        str(a.processes),
        "--thread-count",
        str(a.threads),
        "--no-progress",
        *a.extra.split(),
    ]
    ref = [
        a.i2d_python,
        "-m",
        "img2dataset.main",
        "--url_list",
        urls,
        "--input_format",
        "parquet",
        "--url_col",
        "url",
        "--caption_col",
        "caption",
        "--output_format",
        "webdataset",
        "--image_size",
        "256",
        "--resize_mode",
        "border",
        "--processes_count",
        str(a.processes),
        "--thread_count",
        str(a.threads),
        "--enable_wandb",
        "False",
        "--extract_exif",
        "False",
    ]
    if a.bbox_fraction:
        ours += ["--bbox-col", "face_bboxes"]
        ref += ["--bbox_col", "face_bboxes"]
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    results: dict[str, list[dict]] = {"clipsearch": [], "img2dataset": []}
    try:
        for r in range(a.rounds):
            for tool in ("img2dataset", "clipsearch") if r % 2 == 0 else ("clipsearch", "img2dataset"):
                if tool == "img2dataset" and a.skip_reference:
                    continue
                out = str(work / f"{tool}-{r}")
                cmd = (
                    (ours + ["--output-folder", out])
                    if tool == "clipsearch"
                    else (ref + ["--output_folder", out])
                )
                before = load()
                wall, rss, rc, cpu = timed(cmd, work / f"{tool}-{r}.log", env)
                ok, errors = (-1, {})
                if rc == 0:
                    ok, errors = outcome_clipsearch(out) if tool == "clipsearch" else outcome_i2d(out)
                res = {
                    "round": r,
                    "wall_s": round(wall, 2),
                    "images_per_s": round(a.n / wall, 1),
                    "successes": ok,
                    "peak_rss_mb": rss,
                    "cpu_s": round(cpu, 1),
                    "cpu_ms_per_url": round(1000 * cpu / a.n, 2),
                    "rc": rc,
                    "errors": errors,
                    "load_before": before,
                }
                if rc != 0:
                    res["log_tail"] = (work / f"{tool}-{r}.log").read_text()[-2000:]
                results[tool].append(res)
                print(tool, json.dumps(res), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        subprocess.run(["sh", "-c", f"kill $(cat {pidfile})"], check=False)
    summary = {
        "n_urls": a.n,
        "bbox_fraction": a.bbox_fraction,
        "clipsearch_extra": a.extra,
        "processes": a.processes,
        "threads": a.threads,
        "uptime": os.popen("uptime").read().strip(),
    }
    for tool, rs in results.items():
        if rs:
            summary[tool] = {
                "images_per_s_median": statistics.median(x["images_per_s"] for x in rs),
                "successes": sorted({x["successes"] for x in rs}),
                "peak_rss_mb_median": statistics.median(x["peak_rss_mb"] for x in rs),
                "cpu_ms_per_url_median": statistics.median(x["cpu_ms_per_url"] for x in rs),
                "runs": rs,
            }
    if results["img2dataset"] and results["clipsearch"]:
        summary["cpu_efficiency_ratio"] = round(
            summary["img2dataset"]["cpu_ms_per_url_median"] / summary["clipsearch"]["cpu_ms_per_url_median"],
            2,
        )
        summary["speedup_median"] = round(
            summary["clipsearch"]["images_per_s_median"] / summary["img2dataset"]["images_per_s_median"], 2
        )
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k not in ("clipsearch", "img2dataset")}
            | {t: {k: v for k, v in summary[t].items() if k != "runs"} for t in results if results[t]},
            indent=1,
        )
    )
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
