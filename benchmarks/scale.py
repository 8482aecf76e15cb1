"""Scale proof: build an index over >= 50M synthetic CLIP-like vectors in parts merged on disk,
with bounded peak RSS, then serve it memory-mapped and measure recall@10 and query latency.

    python benchmarks/scale.py --n 50000000 --dim 128 --budget 3G --work /work/bench-data/scale

Data are generated part by part (clustered on the sphere like CLIP image embeddings, with
text-like queries from a shifted distribution, as ../shared/bench/make_embeddings.py does); the
exact top-10 of the queries is accumulated while generating, so nothing is ever loaded whole.
Results go to WORK/scale.json; docs/benchmarks.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np


class PeakRSS:
    """Samples the RSS of this process and its children every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> int:
        total = 0
        pids = [os.getpid()]
        try:
            pids += [int(p) for p in open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()]
        except OSError:
            pass
        for pid in pids:
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.2)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def generate(
    work: Path, n: int, d: int, part_rows: int, nq: int, k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    emb = work / "emb"
    emb.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((20_000, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    gap = rng.standard_normal(d).astype(np.float32)
    gap /= np.linalg.norm(gap)
    lab = rng.integers(0, len(centers), nq)
    q = 0.35 * centers[lab] + 0.9 * gap + 0.08 * rng.standard_normal((nq, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gt_path = work / "gt.npy"
    if gt_path.exists() and len(list(emb.glob("*.npy"))) == -(-n // part_rows):
        return q, np.load(gt_path)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, k), dtype=np.int64)
    t0 = time.perf_counter()
    for p, start in enumerate(range(0, n, part_rows)):
        m = min(part_rows, n - start)
        x = centers[rng.integers(0, len(centers), m)]
        x += 0.06 * rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x16 = x.astype(np.float16)
        tmp = emb / f".{p:05d}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, x16)
        os.replace(tmp, emb / f"{p:05d}.npy")
        # the index sees the float16 values: exact search on them (faiss's blocked scan with a heap;
        # a numpy matmul + argpartition over [nq, 1M] costs 10x more)
        part_s, top = faiss.knn(q, x16.astype(np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
        cand_s = np.concatenate([best_s, part_s], axis=1)
        cand_i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        print(f"generated part {p} ({start + m:,}/{n:,}) {time.perf_counter() - t0:.0f}s", flush=True)
    np.save(gt_path, best_i)
    return q, best_i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--part-rows", type=int, default=1_000_000)
    ap.add_argument("--budget", default="3G")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--work", default="/work/bench-data/scale")
    ap.add_argument(
        "--measure-only", action="store_true", help="reuse a built index: serve-side figures only"
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    q, gt = generate(work, args.n, args.dim, args.part_rows, args.queries)
    np.save(work / "queries.npy", q)

    from clipsearch.index import IndexConfig, build_index

    out = work / "index"
    cfg = IndexConfig(
        embeddings_folder=str(work / "emb"),
        index_folder=str(out),
        input_format="npy",
        max_index_memory_usage=args.budget,
        should_be_memory_mappable=True,
        tuning_queries=str(work / "queries.npy"),
        progress=False,
    )
    previous = json.loads((work / "scale.json").read_text()) if (work / "scale.json").exists() else None
    if args.measure_only and previous and (out / "index.json").exists():
        # serve-side figures again (e.g. after a change to the search path); the build's are kept
        info = json.loads((out / "index.json").read_text())
        build_s, peak = previous["build_s"], previous["build_peak_rss_gib"] * 2**30
    else:
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            info = build_index(cfg)
        build_s, peak = time.perf_counter() - t0, rss.peak
        print(f"built in {build_s:.0f}s, peak RSS {peak / 2**30:.2f} GiB", flush=True)

    from clipsearch.search.searcher import IndexSearcher

    before = PeakRSS.current()
    searcher = IndexSearcher(str(out), mmap="auto")
    lat = []
    found = np.zeros((len(q), 10), dtype=np.int64)
    for i in range(len(q)):
        t = time.perf_counter()
        res = searcher.search(q[i : i + 1], 10)
        lat.append((time.perf_counter() - t) * 1000)
        found[i] = res.ids[0]
    recall = float(np.mean([len(set(found[i]) & set(gt[i])) / 10 for i in range(len(q))]))
    serve_rss = PeakRSS.current() - before
    result = {
        "n": args.n,
        "dim": args.dim,
        "budget": args.budget,
        "factory": info["indices"]["image"]["factory"],
        "search_params": info["indices"]["image"].get("search_params"),
        "build_s": round(build_s, 1),
        "build_peak_rss_gib": round(peak / 2**30, 2),
        "build_timings_s": info.get("timings"),
        "serve_rss_gib_after_queries": round(serve_rss / 2**30, 3),
        "recall_at_10_text_like": round(recall, 4),
        "latency_ms_p50": round(float(np.median(lat)), 2),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
        "index_bytes_on_disk": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    }
    (work / "scale.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
