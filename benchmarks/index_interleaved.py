"""Re-measure the indices that benchmarks/index.py built, in one process, query by query in turn.

Usage:
    python benchmarks/index_interleaved.py DATA_DIR BUDGET [--modes a,b,c]

index.py runs each tool in its own process, one after the other, so on a shared machine the latency
figures can come from different moments of the load. This script loads clipsearch's index of each
mode (DATA_DIR/out-ours-MODE-BUDGET) and autofaiss's (DATA_DIR/out-autofaiss-BUDGET/knn.index, read by
current faiss) side by side, each at the parameters its tool chose, and alternates single queries
between them, so all medians see the same load. In modes b and c clipsearch had text-like queries
(the tuning draw, or caption embeddings) that autofaiss cannot take; to give both the same
information, a third contender is autofaiss's index with its nprobe chosen by clipsearch's tuner on
those same queries. Results go to DATA_DIR/interleaved-BUDGET.json.
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


def _exact(q: np.ndarray, xb: np.ndarray, k: int = 10) -> np.ndarray:
    import faiss

    return faiss.knn(np.ascontiguousarray(q), xb, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def _images(data: str) -> np.ndarray:
    import glob

    return np.concatenate([np.load(f) for f in sorted(glob.glob(os.path.join(data, "emb", "*.npy")))]).astype(
        np.float32
    )


def _same_information(data: str, mode: str, xb: np.ndarray) -> tuple[np.ndarray, str]:
    """The text-like queries clipsearch tuned on in this mode, for re-tuning autofaiss's index."""
    from index import _tuning_queries

    if mode == "b":
        return _tuning_queries(data), "--tuning-queries"
    import glob

    rows = np.random.default_rng(0).choice(len(xb), 1000, replace=False)
    caps = np.concatenate(
        [np.load(f) for f in sorted(glob.glob(os.path.join(data, "embeddings", "text_emb", "*.npy")))]
    )
    return caps[rows].astype(np.float32), "caption embeddings of 1000 rows"


def retune_autofaiss(af, data: str, mode: str, xb: np.ndarray, max_ms: float) -> dict:
    """autofaiss's index with its nprobe picked by clipsearch's tuner from the same text-like queries
    clipsearch had in this mode (autofaiss has no way to take them)."""
    from clipsearch.index.tune import tune

    tq, what = _same_information(data, mode, xb)
    tq /= np.linalg.norm(tq, axis=1, keepdims=True)
    same = xb[np.random.default_rng(1).choice(len(xb), 500, replace=False)]
    queries = {"cross": np.ascontiguousarray(tq), "same": np.ascontiguousarray(same)}
    gts = {"cross": _exact(tq, xb), "same": _exact(same, xb)}
    tuned = tune(af, "ivf", queries, gts, max_ms, None)
    return {"params": tuned.search_params, "tuned_on": what, "reason": tuned.reason}


def main() -> None:
    import faiss

    from clipsearch.index.build import apply_search_params, read_index
    from clipsearch.index.tune import single_query_ms

    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("budget")
    ap.add_argument("--modes", default="a,b,c")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-ms", type=float, default=10.0)
    a = ap.parse_args()
    faiss.omp_set_num_threads(a.threads)
    q, gt = _eval_queries(a.data)
    xb = _images(a.data)
    with open(os.path.join(a.data, f"out-autofaiss-{a.budget}.json")) as f:
        af_res = json.load(f)
    af_path = os.path.join(a.data, f"out-autofaiss-{a.budget}", "knn.index")
    af = faiss.read_index(af_path)
    faiss.ParameterSpace().set_index_parameters(af, af_res["params"])
    results = {"data": a.data, "budget": a.budget, "load_before": [round(x, 2) for x in os.getloadavg()]}
    for mode in a.modes.split(","):
        ours_dir = os.path.join(a.data, f"out-ours-{mode}-{a.budget}")
        if not os.path.exists(os.path.join(ours_dir, "index.json")):
            continue
        with open(os.path.join(ours_dir, "index.json")) as f:
            img = json.load(f)["indices"]["image"]
        ours = read_index(os.path.join(ours_dir, img["file"]), mmap=img["mmap"])
        apply_search_params(ours, img["search_params"])
        contenders = {"ours": ours, "autofaiss": af}
        row = {
            "ours": {
                "factory": img["factory"],
                "rotation": img.get("rotation", {}).get("chosen"),
                "params": img["search_params"],
                "tuning": img["tuning"].get("text_like_source"),
            },
            "autofaiss": {"factory": af_res["factory"], "params": af_res["params"]},
        }
        if mode in ("b", "c"):
            af2 = faiss.read_index(af_path)
            row["autofaiss_same_info"] = retune_autofaiss(af2, a.data, mode, xb, a.max_ms)
            contenders["autofaiss_same_info"] = af2
        for idx in contenders.values():  # warm the caches
            idx.search(q[:50], 10)
        ms = interleaved_ms(list(contenders.values()), q)
        for (name, idx), t in zip(contenders.items(), ms, strict=True):
            row[name]["recall_at_10_text"] = round(recall(idx, q, gt), 4)
            row[name]["single_query_ms_median"] = t  # wall, a.threads threads, interleaved
            # what the query costs on one idle core (as the server runs it; the machine's load aside)
            row[name]["cpu_ms_1thread"] = single_query_ms(idx, q[:200])
            faiss.omp_set_num_threads(a.threads)
        results[mode] = row
        print(mode, json.dumps(row), flush=True)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    with open(os.path.join(a.data, f"interleaved-{a.budget}.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
