"""Re-measure the two indices that benchmarks/index.py built, in one process, query by query in turn.

Usage:
    python benchmarks/index_interleaved.py DATA_DIR BUDGET [--sweep]

index.py runs each tool in its own process, one after the other, so on a shared machine the two
latency figures can come from different moments of the load. This script loads ours
(DATA_DIR/out-ours-BUDGET) and autofaiss's (DATA_DIR/out-autofaiss-BUDGET/knn.index, read by current
faiss) side by side, each at the parameters its tool chose, and alternates single queries between
them, so both medians see the same load. `--sweep` also measures each index's recall/latency curve
(nprobe for autofaiss, its tuned curve's parameters for ours), to compare at equal latency.
Results go to DATA_DIR/interleaved-BUDGET.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

from index import _eval_queries, recall_at_10  # noqa: E402  (benchmarks/index.py: same queries, same recall)

N_LAT = 300


def recall(index, q, gt) -> float:
    return recall_at_10(index.search(q, 10)[1], gt)


def interleaved_ms(indices: list, q: np.ndarray, rounds: int = N_LAT) -> list[float]:
    """Median single-query ms of each index, alternating which goes first."""
    lat = [[] for _ in indices]
    for i in range(rounds):
        order = range(len(indices)) if i % 2 == 0 else reversed(range(len(indices)))
        for j in order:
            t = time.perf_counter()
            indices[j].search(q[i % len(q) : i % len(q) + 1], 10)
            lat[j].append((time.perf_counter() - t) * 1000)
    return [round(float(np.median(x)), 3) for x in lat]


def main() -> None:
    import faiss

    from clipsearch.index.build import apply_search_params, read_index

    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    faiss.omp_set_num_threads(a.threads)
    q, gt = _eval_queries(a.data)

    ours_dir = os.path.join(a.data, f"out-ours-{a.budget}")
    with open(os.path.join(ours_dir, "index.json")) as f:
        img = json.load(f)["indices"]["image"]
    ours = read_index(os.path.join(ours_dir, img["file"]), mmap=img["mmap"])
    apply_search_params(ours, img["search_params"])

    with open(os.path.join(a.data, f"out-autofaiss-{a.budget}.json")) as f:
        af_res = json.load(f)
    af = faiss.read_index(os.path.join(a.data, f"out-autofaiss-{a.budget}", "knn.index"))
    ps = faiss.ParameterSpace()
    ps.set_index_parameters(af, af_res["params"])

    for idx in (ours, af):  # warm the caches
        idx.search(q[:50], 10)
    ms = interleaved_ms([ours, af], q)
    out = {
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "ours": {
            "factory": img["factory"],
            "params": img["search_params"],
            "recall_at_10_text": round(recall(ours, q, gt), 4),
            "single_query_ms_median": ms[0],
        },
        "autofaiss": {
            "factory": af_res["factory"],
            "params": af_res["params"],
            "recall_at_10_text": round(recall(af, q, gt), 4),
            "single_query_ms_median": ms[1],
        },
    }
    print(json.dumps(out, indent=1), flush=True)
    if a.sweep:
        curve = []
        ivf = faiss.extract_index_ivf(af)
        for nprobe in (16, 32, 64, 128, 256, 512, 1024, 2048):
            if nprobe > ivf.nlist:
                break
            ps.set_index_parameters(af, f"nprobe={nprobe},efSearch={2 * nprobe}")
            r = recall(af, q, gt)
            ms_af = interleaved_ms([af], q, 100)[0]
            curve.append(
                {
                    "params": f"nprobe={nprobe}",
                    "recall_at_10_text": round(r, 4),
                    "single_query_ms_median": ms_af,
                }
            )
            print("autofaiss", curve[-1], flush=True)
        out["autofaiss"]["curve"] = curve
        curve = []
        for p in img["curve"]:
            apply_search_params(ours, p["params"])
            r = recall(ours, q, gt)
            curve.append(
                {
                    "params": p["params"],
                    "recall_at_10_text": round(r, 4),
                    "single_query_ms_median": interleaved_ms([ours], q, 100)[0],
                }
            )
            print("ours", curve[-1], flush=True)
        out["ours"]["curve"] = curve
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    with open(os.path.join(a.data, f"interleaved-{a.budget}.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
