"""Index benchmark: clipsearch index vs autofaiss 2.18 on the same synthetic CLIP-like data.

Usage:
    python benchmarks/index.py DATA_DIR BUDGET [--tools ours,autofaiss] [--modes a,b,c] [--timeout-min 60]

DATA_DIR is made by benchmarks/geometries.py (any geometry, `isotropic` being the shared generator):
`emb/part_*.npy` (float16 images), `queries.npy` (text-like evaluation queries, never given to either
tool), `gt.npy` (their exact top-100), `tune_queries.npy` (a separate draw of text-like queries) and,
with --embed-folder, `embeddings/` (an embed-stage folder with one caption embedding per image).
A folder made by /work/shared/bench/make_embeddings.py with NQ=2000 works too: its first 1000 queries
are then the tuning draw and the last 1000 the evaluation queries.

clipsearch is run in three modes, each given only what a user of that mode has:
  a: `clipsearch index --embeddings-folder emb/` and the budget: a bare .npy folder, no format option,
     no tuning queries, no model (an autofaiss user's default);
  b: the same plus `--tuning-queries tune_queries.npy`;
  c: `--embeddings-folder embeddings/`, the embed stage's output with its caption embeddings.
autofaiss gets the same vectors (`emb/`; `embeddings/img_emb/` holds the same rows) and the same
budget, and is built once: it has no way to take tuning queries or captions. To give it the same
information in modes b and c, benchmarks/index_interleaved.py also re-tunes its nprobe with
clipsearch's tuner on the same queries.

Each tool runs in its own python (autofaiss needs faiss-cpu 1.9 and numpy<2: /work/venvs/autofaiss),
as a subprocess of this script, one after the other. Results go to DATA_DIR/results-BUDGET.json and a
markdown table is printed.

This file is also the worker (`--worker ours|autofaiss`): it imports only numpy and faiss at top
level so it runs under either venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OURS_PY = os.path.join(ROOT, ".venv", "bin", "python")
AUTOFAISS_PY = "/work/venvs/autofaiss/bin/python"
N_EVAL = 1000


def _eval_queries(data: str) -> tuple[np.ndarray, np.ndarray]:
    q = np.load(os.path.join(data, "queries.npy")).astype(np.float32)
    gt = np.load(os.path.join(data, "gt.npy"))
    if os.path.exists(os.path.join(data, "tune_queries.npy")):
        return np.ascontiguousarray(q), gt
    return np.ascontiguousarray(q[-N_EVAL:]), gt[-N_EVAL:]


def _tuning_queries(data: str) -> np.ndarray:
    """The separate draw of text-like queries (never the evaluation queries)."""
    path = os.path.join(data, "tune_queries.npy")
    if os.path.exists(path):
        return np.load(path).astype(np.float32)
    return np.load(os.path.join(data, "queries.npy")).astype(np.float32)[:-N_EVAL]


def recall_at_10(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(ids[i]) & set(gt[i, :10])) / 10 for i in range(len(ids))]))


def _measure(index, data: str, threads: int) -> dict:
    """recall@10 of the held-out shifted queries, single-query median latency, batch QPS."""
    import faiss

    faiss.omp_set_num_threads(threads)
    q, gt = _eval_queries(data)
    t0 = time.perf_counter()
    _, ids = index.search(q, 10)
    batch_s = time.perf_counter() - t0
    recall = recall_at_10(ids, gt)
    lat = []
    for i in range(300):
        t = time.perf_counter()
        index.search(q[i : i + 1], 10)
        lat.append((time.perf_counter() - t) * 1000)
    return {
        "recall_at_10_text": round(recall, 4),
        "single_query_ms_median": round(float(np.median(lat)), 3),
        "single_query_ms_p90": round(float(np.percentile(lat, 90)), 3),
        "batch_qps": round(len(q) / batch_s, 1),
    }


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children: a build cost that load on a shared
    machine does not inflate (wall time does)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def worker_autofaiss(data: str, budget: str, out: str, threads: int) -> dict:
    import faiss
    from autofaiss import build_index

    os.makedirs(out, exist_ok=True)
    t0, c0 = time.perf_counter(), _cpu_s()
    _, infos = build_index(
        embeddings=os.path.join(data, "emb"),
        index_path=os.path.join(out, "knn.index"),
        index_infos_path=os.path.join(out, "infos.json"),
        max_index_memory_usage=budget,
        current_memory_available="8G",
        max_index_query_time_ms=10,
        metric_type="ip",
        nb_cores=threads,
        file_format="npy",
    )
    build_s, build_cpu = time.perf_counter() - t0, _cpu_s() - c0
    index = faiss.read_index(os.path.join(out, "knn.index"))
    key = infos.get("index_key") if infos else None
    param = infos.get("index_param") if infos else None
    if param:
        faiss.ParameterSpace().set_index_parameters(index, param)
    res = {"tool": f"autofaiss 2.18 (faiss {faiss.__version__})", "factory": key, "params": param}
    res["build_s"] = round(build_s, 1)
    res["build_cpu_s"] = round(build_cpu, 1)
    res["index_bytes"] = os.path.getsize(os.path.join(out, "knn.index"))
    res.update(_measure(index, data, threads))
    return res


def worker_ours(data: str, budget: str, out: str, threads: int, mode: str) -> dict:
    import faiss

    from clipsearch.index import IndexConfig, build_index

    tq = None
    if mode == "b":
        tq = out + "-tuneq.npy"
        np.save(tq, _tuning_queries(data))
    if os.path.exists(out):
        shutil.rmtree(out)
    cfg = IndexConfig(  # what the command line gives: no --input-format, no model
        embeddings_folder=os.path.join(data, "embeddings" if mode == "c" else "emb"),
        index_folder=out,
        max_index_memory_usage=budget,
        max_index_query_time_ms=10.0,
        nb_cores=threads,
        tuning_queries=tq,
        progress=False,
    )
    t0, c0 = time.perf_counter(), _cpu_s()
    info = build_index(cfg)
    build_s, build_cpu = time.perf_counter() - t0, _cpu_s() - c0
    img = info["indices"]["image"]
    path = os.path.join(out, img["file"])
    from clipsearch.index.build import apply_search_params, read_index

    index = read_index(path, mmap=img["mmap"])
    apply_search_params(index, img["search_params"])
    size = os.path.getsize(path)
    if os.path.exists(path.replace(".index", ".ivfdata")):
        size += os.path.getsize(path.replace(".index", ".ivfdata"))
    res = {"tool": f"clipsearch (faiss {faiss.__version__})", "mode": mode, "factory": img["factory"]}
    res["params"] = img["search_params"]
    res["reason"] = img["reason"]
    res["tuning"] = img["tuning"]
    res["build_s"] = round(build_s, 1)
    res["build_cpu_s"] = round(build_cpu, 1)
    res["timings"] = info["timings"]
    res["index_bytes"] = size
    res["memory_bytes"] = img["memory_bytes"]
    res.update(_measure(index, data, threads))
    return res


def out_dir(data: str, tool: str, budget: str) -> str:
    """`tool` is `autofaiss` or `ours-a|b|c`."""
    return os.path.join(data, f"out-{tool}-{budget}")


def run_tool(tool: str, data: str, budget: str, threads: int, timeout_s: float, reuse: bool) -> dict:
    py = AUTOFAISS_PY if tool == "autofaiss" else OURS_PY
    out = out_dir(data, tool, budget)
    res_file = out + ".json"
    if reuse and os.path.exists(res_file):
        with open(res_file) as f:
            return json.load(f)
    cmd = [py, os.path.abspath(__file__), data, budget, "--worker", tool, "--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    t0 = time.perf_counter()
    with open(out + ".log", "w") as log:  # a file, not a pipe: the worker survives its parent
        try:
            p = subprocess.run(cmd, env=env, timeout=timeout_s, stdout=log, stderr=subprocess.STDOUT)
        except subprocess.TimeoutExpired:
            return {"tool": tool, "error": f"timed out after {timeout_s:.0f} s"}
    if p.returncode != 0:
        with open(out + ".log") as f:
            return {"tool": tool, "error": f.read()[-2000:]}
    with open(res_file) as f:
        res = json.load(f)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def table(results: list[dict]) -> str:
    rows = [
        "| tool | factory | params | recall@10 text | 1-query ms (median) | batch QPS | build s (wall) "
        "| build CPU s | index MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['key']} | error: {r['error'][-200:]!r} ||||||||")
            continue
        rows.append(
            f"| {r['key']} | `{r['factory']}` | `{r['params']}` | {r['recall_at_10_text']:.3f} | "
            f"{r['single_query_ms_median']:.2f} | {r['batch_qps']:.0f} | {r['build_s']:.0f} | "
            f"{r.get('build_cpu_s', float('nan')):.0f} | {r['index_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("budget", help="memory budget, e.g. 64M")
    ap.add_argument("--tools", default="ours,autofaiss")
    ap.add_argument("--timeout-min", type=float, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="a,b,c", help="clipsearch's modes (see above)")
    ap.add_argument("--worker", choices=["ours-a", "ours-b", "ours-c", "autofaiss"])
    ap.add_argument("--reuse", action="store_true", help="take a tool's result file from an earlier run")
    a = ap.parse_args()
    if a.worker:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        out = out_dir(a.data, a.worker, a.budget)
        if a.worker == "autofaiss":
            res = worker_autofaiss(a.data, a.budget, out, a.threads)
        else:
            res = worker_ours(a.data, a.budget, out, a.threads, a.worker[-1])
        with open(out + ".json", "w") as f:
            json.dump(res, f, indent=2)
        return
    load = os.getloadavg()
    results = []
    tools = []
    for tool in a.tools.split(","):
        tools += [f"ours-{m}" for m in a.modes.split(",")] if tool == "ours" else [tool]
    for tool in tools:
        res = run_tool(tool, a.data, a.budget, a.threads, a.timeout_min * 60, a.reuse)
        res["key"] = tool
        res["loadavg_before"] = [round(x, 2) for x in load]
        load = os.getloadavg()
        results.append(res)
        print(json.dumps(res), flush=True)
    path = os.path.join(a.data, f"results-{a.budget}.json")
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = [r for r in json.load(f) if r.get("key") not in tools]
    with open(path, "w") as f:
        json.dump(old + results, f, indent=2)
    print(table(old + results))


if __name__ == "__main__":
    sys.exit(main())
