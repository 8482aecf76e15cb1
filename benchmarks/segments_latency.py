"""Re-measure the search table of benchmarks/segments.py on folders it left behind (same queries, same
interleaving), e.g. after a change to the search path or on a quieter machine:

    python benchmarks/segments_latency.py WORKDIR [--n-lat 400] [--out results-latency.json]

With the segmented index it also times the per-segment path (each segment searched on its own, as before
search/fanout.py) in the same interleaving, and reports the time to open each index (for the segmented
one: the merge of the small segments' inverted lists).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from segments import eval_queries, exact_topk, interleaved  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--n-lat", type=int, default=400)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-per-segment", action="store_true", help="skip the per-segment path's row")
    ap.add_argument(
        "--rerank-margins", type=float, nargs="*", default=[], help="also time the shared path with these"
    )
    a = ap.parse_args()
    import faiss

    from clipsearch.search.live import open_index

    w = a.workdir
    folders = [os.path.join(w, "emb-base")] + sorted(
        os.path.join(w, f) for f in os.listdir(w) if f.startswith("emb-seg")
    )
    cfg = (
        json.load(open(os.path.join(w, "results.json")))["config"]
        if os.path.exists(os.path.join(w, "results.json"))
        else {"nq": 500, "dim": 512, "segments": len(folders) - 1}
    )
    q = eval_queries(cfg["nq"], cfg["dim"])
    gt = exact_topk(folders, q)
    faiss.omp_set_num_threads(1)
    opened = {}
    named = {
        f"{cfg['segments'] + 1} segments": os.path.join(w, "index-10seg"),
        "base + merged appends": os.path.join(w, "index-compact-small"),
        "compacted, quantizer kept": os.path.join(w, "index-compact-all"),
        "full rebuild": os.path.join(w, "index-rebuilt"),
    }
    reload_s = {}
    for k, p in named.items():
        if os.path.exists(os.path.join(p, "index.json")):  # a finished index (not an interrupted build)
            t = time.perf_counter()
            opened[k] = (open_index(p), gt)
            reload_s[k] = round(time.perf_counter() - t, 3)
            opened[k][0].search(q, 10)  # warm: the memory-mapped codes the queries touch are read once
    seg = f"{cfg['segments'] + 1} segments"
    if seg in opened and not a.no_per_segment:
        # the path before the shared fan-out (search/fanout.py): each segment searched on its own
        view = open_index(named[seg])
        view.fanout = {}
        view.search(q, 10)
        opened[f"{seg}, per-segment path"] = (view, gt)
    for margin in a.rerank_margins:  # the shared path with another re-rank budget (fanout.RERANK_MARGIN)
        view = open_index(named[seg])
        for fan in view.fanout.values():
            fan.rerank_margin = margin
        view.search(q, 10)
        opened[f"{seg}, re-rank margin {margin}"] = (view, gt)
    out = interleaved(opened, q, n_lat=a.n_lat)
    out["open_s"] = reload_s
    if seg in opened:
        out["merge_s"] = {m: round(f.merge_s, 3) for m, f in opened[seg][0].fanout.items()}
    for k, v in out.items():
        print(f"{k}: {v}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    main()
