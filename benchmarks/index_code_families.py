"""Trial of faiss code families on a development draw: text-like recall@10 and single-thread CPU ms per query.

Usage:
    python benchmarks/index_code_families.py DATA_DIR FAMILY[,FAMILY...]

DATA_DIR is made by benchmarks/geometries.py (use a development draw, never the evaluation data).
Families: flat (the planner's `PQ128x4fs,Refine(PQ256x8)`), ivfpq (`IVF256,PQ256x8`, residual, autofaiss's
family), ivffs1 (`IVF256,PQ512x4fsr`, with and without the rotation), ivfpqr (`IVF256,PQ32+256`, L2 only in
faiss). The balanced PCA rotation of clipsearch.index.rotation is fitted on 20k points; codes are trained on
20k points with 10 k-means iterations (a trial, not a build). Figures: docs/bench-index.md (session 6).
"""

from __future__ import annotations

import glob
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from clipsearch.index import rotation  # noqa: E402
from clipsearch.index.tune import recall_at_k, single_query_ms  # noqa: E402

NLIST = 256
TRAIN = 20_000


def trial(emb, q, gt, name, factory, sizes, params, rotate=True, metric=faiss.METRIC_INNER_PRODUCT) -> None:
    t0 = time.process_time()
    x, qq = emb, q
    if rotate:
        m = rotation.balanced_pca(emb[:TRAIN], sizes)
        x, qq = np.ascontiguousarray(emb @ m.T), np.ascontiguousarray(q @ m.T)
    index = faiss.index_factory(emb.shape[1], factory, metric)
    for sub in (index, getattr(index, "base_index", None), getattr(index, "refine_index", None)):
        if sub is not None:
            sub = faiss.downcast_index(sub)
            for attr in ("pq", "refine_pq"):
                if getattr(sub, attr, None) is not None:
                    getattr(sub, attr).cp.niter = 10
    index.train(x[:TRAIN])
    index.add(x)
    build_s = time.process_time() - t0
    space = faiss.ParameterSpace()
    for p in params:
        space.set_index_parameters(index, p)
        _, ids = index.search(qq, 10)
        print(f"{name:42s} {p:28s} recall {recall_at_k(ids, gt):.3f}  cpu ms {single_query_ms(index, qq[:40]):.2f}"
              f"  build {build_s:.0f} CPU s", flush=True)  # fmt: skip


def main() -> None:
    data, families = sys.argv[1], sys.argv[2].split(",")
    emb = np.concatenate([np.load(p).astype(np.float32) for p in sorted(glob.glob(f"{data}/emb/*.npy"))])
    q = np.load(f"{data}/queries.npy").astype(np.float32)
    gt = np.load(f"{data}/gt.npy")
    for f in families:
        if f == "flat":
            trial(emb, q, gt, "rot PQ128x4fs,Refine(PQ256x8)", "PQ128x4fs,Refine(PQ256x8)", (4, 2),
                  [f"k_factor_rf={k}" for k in (16, 64, 128, 256)])  # fmt: skip
        elif f == "ivfpq":
            trial(emb, q, gt, f"rot IVF{NLIST},PQ256x8", f"IVF{NLIST},PQ256x8", (2,),
                  [f"nprobe={p}" for p in (8, 16, 32, 64, 128)])  # fmt: skip
        elif f == "ivffs1":
            for rot in (True, False):
                trial(emb, q, gt, f"{'rot' if rot else 'raw'} IVF{NLIST},PQ512x4fsr", f"IVF{NLIST},PQ512x4fsr", (1,),
                      [f"nprobe={p}" for p in (16, 32, 64, 128)], rotate=rot)  # fmt: skip
        elif f in ("ivfpqr", "ivfpqr-raw"):
            rot = f == "ivfpqr"
            trial(emb, q, gt, f"{'rot' if rot else 'raw'} IVF{NLIST},PQ32+256 (L2)", f"IVF{NLIST},PQ32+256", (16, 2),
                  [f"nprobe={p},k_factor={k}" for p in (16, 32, 64, 128) for k in (16, 64, 256)],
                  rotate=rot, metric=faiss.METRIC_L2)  # fmt: skip
        else:
            sys.exit(f"unknown family {f!r}: flat, ivfpq, ivffs1, ivfpqr, ivfpqr-raw")


if __name__ == "__main__":
    main()
