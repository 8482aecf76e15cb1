"""Segments benchmark: appends, fan-out search, compaction, deletes and hot reload.

Usage:
    python benchmarks/segments.py WORKDIR [--base 200000] [--segments 10] [--seg-size 20000] [--dim 512]
                                  [--budget 64M] [--threads 2] [--no-watch]

1. Synthetic CLIP-like data in the style of /work/shared/bench/make_embeddings.py: images clustered on
   the sphere (2000 centres), one embed-stage folder for the base and one per appended segment, with
   text-like caption embeddings (a shared modality offset), and held-out text-like evaluation queries
   drawn from a shifted distribution, as text->image CLIP queries are. Exact top-10 over every vector.
2. `clipsearch index` builds the base (--index-key, by default the IVF fast-scan PQ + re-rank family the
   planner picks for large indices under a memory budget), then --segments appends of --seg-size each:
   time per append against the size of the index it lands in.
3. Single-query latency (1 thread, the serve path: SegmentedSearcher) and recall@10 of the evaluation
   queries with all segments, after `--compact-all`, and for a full rebuild of everything.
4. Hot reload: from an append's commit to a LiveIndex (0.5 s checks) serving it; a delete likewise.
5. Streaming (unless --no-watch): `pipeline --watch` with the shipped tiny CLIP over a local HTTP server:
   from a small URL file landing in the watched folder to a search returning it.

Writes WORKDIR/results.json and prints a markdown summary (docs/bench-segments.md holds the figures).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

K = 10
N_CENTERS = 2000


# ------------------------------------------------------------------------------------------ data
def _centers(d: int) -> np.ndarray:
    c = np.random.default_rng(1).standard_normal((N_CENTERS, d)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def _gap(d: int) -> np.ndarray:
    g = np.random.default_rng(2).standard_normal(d).astype(np.float32)
    return g / np.linalg.norm(g)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_folder(root: str, n: int, d: int, seed: int, tag: str, part_rows: int = 1 << 30) -> None:
    """An embed-stage folder of n rows: images near cluster centres, captions shifted (text-like)."""
    if os.path.exists(os.path.join(root, "manifest.json")):
        return
    for sub in ("img_emb", "text_emb", "metadata"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    centers, gap = _centers(d), _gap(d)
    parts = []
    for p, s in enumerate(range(0, n, part_rows)):
        m = min(part_rows, n - s)
        lab = rng.integers(0, N_CENTERS, m)
        img = _unit(centers[lab] + 0.06 * rng.standard_normal((m, d)).astype(np.float32))
        txt = _unit(0.35 * img + 0.9 * gap + 0.08 * rng.standard_normal((m, d)).astype(np.float32))
        name = f"{p:05d}"
        np.save(os.path.join(root, "img_emb", f"{name}.npy"), img.astype(np.float16))
        np.save(os.path.join(root, "text_emb", f"{name}.npy"), txt.astype(np.float16))
        keys = [f"{tag}{p:03d}{i:06d}" for i in range(m)]
        pq.write_table(
            pa.table({"key": keys, "url": [f"http://x/{k}.jpg" for k in keys], "caption": keys}),
            os.path.join(root, "metadata", f"{name}.parquet"),
        )
        parts.append({"name": name, "rows": m, "inputs": []})
    manifest = {"format": "clipsearch.embeddings", "version": 1, "model": "synthetic", "dim": d,
                "dtype": "float16", "normalized": True, "modalities": ["image", "text"], "parts": parts,
                "total_rows": n}  # fmt: skip
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def eval_queries(nq: int, d: int) -> np.ndarray:
    """Held-out text-like queries (as make_embeddings.py): a shared offset plus a target cluster."""
    rng = np.random.default_rng(3)
    lab = rng.integers(0, N_CENTERS, nq)
    q = 0.35 * _centers(d)[lab] + 0.9 * _gap(d) + 0.08 * rng.standard_normal((nq, d)).astype(np.float32)
    return np.ascontiguousarray(_unit(q).astype(np.float32))


def exact_topk(folders: list[str], q: np.ndarray) -> np.ndarray:
    """Exact top-K ids over the image vectors of `folders`, in id order (base, then each segment)."""
    import faiss

    heap = faiss.ResultHeap(len(q), K, keep_max=True)
    off = 0
    for f in folders:
        for name in sorted(os.listdir(os.path.join(f, "img_emb"))):
            x = np.load(os.path.join(f, "img_emb", name)).astype(np.float32)
            D, ids = faiss.knn(q, x, K, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(D, ids + off)
            off += len(x)
    heap.finalize()
    return heap.I


def recall(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(ids[i][:K]) & set(gt[i][:K])) / K for i in range(len(gt))]))


def measure(searcher, q: np.ndarray, gt: np.ndarray, n_lat: int = 300) -> dict:
    """recall@10 (batch) and single-query latency through the searcher's own search()."""
    res = searcher.search(q, K)
    lat = []
    for i in range(min(n_lat, len(q))):
        t = time.perf_counter()
        searcher.search(q[i : i + 1], K)
        lat.append((time.perf_counter() - t) * 1000)
    return {
        "recall_at_10_text": round(recall(res.ids, gt), 4),
        "latency_ms_median": round(float(np.median(lat)), 3),
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 3),
        "plan": res.plan,
    }


def _merged_folder(root: str, folders: list[str]) -> tuple[str, str]:
    """(a folder with every image vector of `folders` as ONE .npy, in id order; a .npy of 1000 caption
    embeddings of random rows, to tune it on text-like queries as the embeddings input does).

    Image only, to halve the rebuild (tuning dominates it). One part, because faiss 1.15.1 corrupts its
    heap when IndexIVFFastScan.merge_from runs over many parts (6 parts of 3600 rows reproduce it)."""
    out = os.path.join(root, "npy-all")
    tq = os.path.join(root, "tuning-queries.npy")
    if os.path.exists(tq):
        return out, tq
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    arrays = [
        np.load(os.path.join(f, "img_emb", n))
        for f in folders
        for n in sorted(os.listdir(os.path.join(f, "img_emb")))
    ]
    np.save(os.path.join(out, "all.npy"), np.concatenate(arrays))
    texts = [
        np.load(os.path.join(f, "text_emb", n))
        for f in folders
        for n in sorted(os.listdir(os.path.join(f, "text_emb")))
    ]
    txt = np.concatenate(texts)
    pick = np.random.default_rng(5).choice(len(txt), size=1000, replace=False)
    np.save(tq, txt[pick].astype(np.float32))
    return out, tq


# ------------------------------------------------------------------------------------------ steps
def run(args: argparse.Namespace) -> dict:
    import faiss

    from clipsearch.index import IndexConfig, build_index
    from clipsearch.search.live import LiveIndex, open_index
    from clipsearch.segments import layout
    from clipsearch.segments.append import append_segment
    from clipsearch.segments.compact import CompactConfig, compact
    from clipsearch.segments.delete import DeleteConfig, delete_rows

    w = args.workdir
    os.makedirs(w, exist_ok=True)
    out: dict = {"config": {k: v for k, v in vars(args).items()}, "machine": f"{os.cpu_count()} cores"}
    d = args.dim
    t0 = time.perf_counter()
    base_emb = os.path.join(w, "emb-base")
    make_folder(base_emb, args.base, d, 10, "b")
    seg_embs = []
    for i in range(args.segments):
        f = os.path.join(w, f"emb-seg{i:02d}")
        make_folder(f, args.seg_size, d, 100 + i, f"s{i:02d}")
        seg_embs.append(f)
    q = eval_queries(args.nq, d)
    out["data_s"] = round(time.perf_counter() - t0, 1)

    def cfg(emb: str, index: str) -> IndexConfig:
        return IndexConfig(
            embeddings_folder=emb, index_folder=index, max_index_memory_usage=args.budget,
            index_key=args.index_key or None, nb_cores=args.threads, progress=False,
        )  # fmt: skip

    # base
    index, pristine = os.path.join(w, "index"), os.path.join(w, "index-base")
    shutil.rmtree(index, ignore_errors=True)
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(pristine, "index.json")):  # a re-run reuses the base build
        shutil.rmtree(pristine, ignore_errors=True)
        build_index(cfg(base_emb, pristine))
    build_s = time.perf_counter() - t0
    shutil.copytree(pristine, index)
    info = json.load(open(os.path.join(index, "index.json")))
    out["base"] = {
        "rows": info["count"], "build_s": round(build_s, 1),
        "factory": info["indices"]["image"]["factory"], "search_params": info["indices"]["image"]["search_params"],
    }  # fmt: skip
    if args.base_only:
        return out
    gt_base = exact_topk([base_emb], q)
    faiss.omp_set_num_threads(1)
    out["base"].update(measure(open_index(index), q, gt_base))
    print("base:", out["base"], flush=True)

    # appends, with a served LiveIndex watching the folder for the hot-reload delay
    live = LiveIndex(index, name="bench", check_interval=0.5)
    appends = []
    for f in seg_embs:
        size_before = layout.read_manifest(index).count
        t = time.perf_counter()
        rep = append_segment(cfg(f, index))
        dt = time.perf_counter() - t
        t_commit = time.perf_counter()
        gen = rep["generation"]
        while live.generation < gen:
            time.sleep(0.005)
        reload_s = time.perf_counter() - t_commit
        appends.append({"index_rows_before": size_before, "rows": rep["appended"], "seconds": round(dt, 2),
                        "add_s": rep["timings"]["add_s"], "visible_after_s": round(reload_s, 3)})  # fmt: skip
        print("append:", appends[-1], flush=True)
    out["appends"] = appends
    all_folders = [base_emb, *seg_embs]
    gt = exact_topk(all_folders, q)
    seg10 = os.path.join(w, "index-10seg")  # the state after the appends, kept for the latency table
    shutil.rmtree(seg10, ignore_errors=True)
    shutil.copytree(index, seg10)

    # deletes: 1 % of the rows, visible through the LiveIndex
    rng = np.random.default_rng(4)
    n_all = layout.read_manifest(index).count
    victims = rng.choice(n_all, size=n_all // 100, replace=False)
    t = time.perf_counter()
    rep = delete_rows(DeleteConfig(index, ids=tuple(int(v) for v in victims)))
    del_s = time.perf_counter() - t
    t = time.perf_counter()
    while live.generation < rep["generation"]:
        time.sleep(0.005)
    out["delete"] = {"rows": int(len(victims)), "seconds": round(del_s, 2),
                     "visible_after_s": round(time.perf_counter() - t, 3)}  # fmt: skip
    live.close()
    shutil.rmtree(index + "-deleted-view", ignore_errors=True)
    shutil.copytree(index, index + "-deleted-view")
    gt_live = _gt_without(all_folders, q, set(victims.tolist()))
    gt_renumbered = gt_live - np.searchsorted(np.sort(victims), gt_live)  # compaction drops the deleted ids
    print("delete:", out["delete"], flush=True)

    # compactions that keep the quantizer and the parameters (the fan-out cost alone): the small
    # segments only (default policy: cost in proportion to the appended rows), and everything
    kept = {}
    for name, everything in (("small", False), ("all", True)):
        folder = os.path.join(w, f"index-compact-{name}")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(seg10, folder)
        t = time.perf_counter()
        rep = compact(
            CompactConfig(folder, all_segments=everything, target_recall=1e-6, nb_cores=args.threads)
        )
        kept[name] = {"seconds": round(time.perf_counter() - t, 1), "merged_rows": rep["rows"],
                      "segments_after": rep["segments"]}  # fmt: skip
        print(f"compact {name} (quantizer kept):", kept[name], flush=True)
    out["compact_kept_quantizer"] = kept

    # the real compaction of the live folder: deleted rows dropped, recall check with the index's target
    if not args.skip_default_compact:
        t = time.perf_counter()
        crep = compact(CompactConfig(index, all_segments=True, nb_cores=args.threads))
        out["compact"] = {"seconds": round(time.perf_counter() - t, 1), "rows": crep["rows"],
                          "recall_check": crep["recall"], "retrained": crep["retrained"], "timings": crep["timings"]}  # fmt: skip
        print("compact (default target):", out["compact"], flush=True)

    # full rebuild of everything (no deletes) for the recall/latency reference
    rebuilt = os.path.join(w, "index-rebuilt")
    t = time.perf_counter()
    if not os.path.exists(os.path.join(rebuilt, "index.json")) or args.rebuild:
        shutil.rmtree(rebuilt, ignore_errors=True)
        npy, tq = _merged_folder(w, all_folders)
        build_index(replace(cfg(npy, rebuilt), input_format="npy", tuning_queries=tq))
    info = json.load(open(os.path.join(rebuilt, "index.json")))
    out["rebuild"] = {"seconds": round(time.perf_counter() - t, 1), "factory": info["indices"]["image"]["factory"],
                      "search_params": info["indices"]["image"]["search_params"]}  # fmt: skip
    print("rebuild:", out["rebuild"], flush=True)

    # latency and recall, the indices alternated query by query (the machine is shared: this cancels
    # the drift of the other load), 1 faiss thread as serve uses
    faiss.omp_set_num_threads(1)
    out["search"] = interleaved(
        {
            f"{args.segments + 1} segments": (open_index(seg10), gt),
            f"{args.segments + 1} segments, 1% deleted": (open_index(index + "-deleted-view"), gt_live)
            if os.path.exists(index + "-deleted-view")
            else None,
            "base + merged appends": (open_index(os.path.join(w, "index-compact-small")), gt),
            "compacted, quantizer kept": (open_index(os.path.join(w, "index-compact-all")), gt),
            "compacted, default target, deletes dropped": None
            if args.skip_default_compact
            else (open_index(index), gt_renumbered),
            "full rebuild": (open_index(rebuilt), gt),
        },
        q,
    )
    for k, v in out["search"].items():
        print(f"search {k}:", v, flush=True)
    if not args.no_watch:
        out["watch"] = bench_watch(os.path.join(w, "watch"), args.watch_files)
        print("watch:", out["watch"], flush=True)
    with open(os.path.join(w, "results.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)
    return out


def interleaved(named: dict, q: np.ndarray, n_lat: int = 400) -> dict:
    """Single-query latency of several searchers, alternating them query by query, and their recall@10."""
    named = {k: v for k, v in named.items() if v is not None}
    for s, _ in named.values():
        s.search(q[:5], K)  # warm up
    lat: dict[str, list[float]] = {k: [] for k in named}
    order = list(named)
    for i in range(min(n_lat, len(q))):
        for k in order if i % 2 else order[::-1]:
            t = time.perf_counter()
            named[k][0].search(q[i : i + 1], K)
            lat[k].append((time.perf_counter() - t) * 1000)
    out = {}
    for k, (s, gt) in named.items():
        res = s.search(q, K)
        out[k] = {
            "recall_at_10_text": round(recall(res.ids, gt), 4),
            "latency_ms_median": round(float(np.median(lat[k])), 3),
            "latency_ms_p95": round(float(np.percentile(lat[k], 95)), 3),
        }
    return out


def _gt_without(folders: list[str], q: np.ndarray, dead: set[int]) -> np.ndarray:
    """Exact top-K skipping deleted ids (ids renumbered after compaction are compared by position)."""
    import faiss

    heap = faiss.ResultHeap(len(q), K, keep_max=True)
    off, new_off = 0, 0
    dead_arr = np.asarray(sorted(dead), dtype=np.int64)
    for f in folders:
        for name in sorted(os.listdir(os.path.join(f, "img_emb"))):
            x = np.load(os.path.join(f, "img_emb", name)).astype(np.float32)
            ids = np.arange(off, off + len(x))
            keep = ~np.isin(ids, dead_arr)
            dist, idx = faiss.knn(q, x[keep], K, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(dist, ids[keep][idx])
            off += len(x)
            new_off += int(keep.sum())
    heap.finalize()
    return heap.I


def bench_watch(root: str, n_files: int) -> dict:
    """Small URL files dropped into a watched folder: seconds until a search returns them."""
    from clipsearch import pipeline as pl
    from clipsearch.demo.sample import generate_sample
    from clipsearch.demo.server import serve_directory
    from clipsearch.search.live import LiveIndex
    from clipsearch.segments.watch import Watcher

    shutil.rmtree(root, ignore_errors=True)
    rows = generate_sample(os.path.join(root, "www"), 8 * (n_files + 1), seed=9)
    inbox, outdir = os.path.join(root, "inbox"), os.path.join(root, "out")
    os.makedirs(inbox)
    results = []
    with serve_directory(os.path.join(root, "www")) as base:

        def drop(i: int) -> str:
            chunk = rows[8 * i : 8 * (i + 1)]
            tmp = os.path.join(inbox, f".f{i:03d}.parquet.tmp")
            pq.write_table(pa.table({"url": [f"{base}/{r['file']}" for r in chunk],
                                     "caption": [r["caption"] for r in chunk]}), tmp)  # fmt: skip
            os.replace(tmp, os.path.join(inbox, f"f{i:03d}.parquet"))
            return f"{base}/{chunk[0]['file']}"

        drop(0)
        cfg = pl.config_from_argv(["--output-folder", outdir, "--watch", inbox, "--caption-col", "caption",
                                   "--processes-count", "1", "--no-progress", "--nb-cores", "1"])  # fmt: skip
        interval = 0.5
        w = Watcher(cfg, inbox, interval=interval)
        w.poll()  # builds the index from the first file (loads the model once)
        live = LiveIndex(os.path.join(outdir, "index"), name="watch", check_interval=0.5)
        stop = threading.Event()
        t = threading.Thread(target=w.run, args=(stop,), daemon=True)
        t.start()
        try:
            for i in range(1, n_files + 1):
                time.sleep(0.3 + 0.37 * i % 0.5)  # land at a random point of the polling cycle
                url = drop(i)
                t0 = time.perf_counter()
                while True:
                    view = live.current()
                    res = view.search(np.ones((1, view.dim), np.float32), 1, filter=f'url == "{url}"')
                    if res.ids[0, 0] >= 0:
                        break
                    if time.perf_counter() - t0 > 120:
                        raise RuntimeError("a watched file never became searchable")
                    time.sleep(0.01)
                delay = time.perf_counter() - t0
                rec = w.state["files"][f"f{i:03d}.parquet"]
                results.append({"delay_s": round(delay, 2), **rec["timings"]})
                print("watch file:", results[-1], flush=True)
        finally:
            stop.set()
            t.join(60)
            live.close()
    delays = [r["delay_s"] for r in results]
    keys = [k for k in results[0] if k.endswith("_s") and k != "delay_s"]
    return {
        "files": n_files, "images_per_file": 8, "watch_interval_s": interval, "reload_check_s": 0.5,
        "delay_s_median": round(float(np.median(delays)), 2), "delay_s_max": round(max(delays), 2),
        "stage_s_median": {k: round(float(np.median([r[k] for r in results])), 3) for k in keys},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir")
    p.add_argument("--base", type=int, default=200_000)
    p.add_argument("--segments", type=int, default=10)
    p.add_argument("--seg-size", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--nq", type=int, default=500)
    p.add_argument(
        "--budget", default="4G", help="index memory budget (with --index-key '': the planner picks)"
    )
    p.add_argument(
        "--index-key",
        default="IVF1024,PQ64x4fsr,Refine(SQ8)",
        help="factory of the base (the IVF fast-scan + re-rank family the planner uses for large indices); "
        "'' lets the planner choose under --budget",
    )
    p.add_argument("--threads", type=int, default=2, help="faiss threads for builds, appends, compaction")
    p.add_argument("--no-watch", action="store_true")
    p.add_argument("--base-only", action="store_true", help="make the data and build the base, then stop")
    p.add_argument(
        "--rebuild", action="store_true", help="rebuild the full-rebuild reference even if present"
    )
    p.add_argument("--watch-files", type=int, default=5)
    p.add_argument(
        "--skip-default-compact",
        action="store_true",
        help="skip the compaction with deletes dropped and the default recall target (the slowest step)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = run(args)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    main()
