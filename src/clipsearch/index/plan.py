"""Pick a faiss index under a memory budget.

The choice follows what measures well for CLIP text->image queries (see docs/bench-index.md): text
queries come from another distribution than the images, their neighbours spread over many IVF lists
and their ranking depends on small score differences, so what matters is (1) scanning many
candidates cheaply and (2) re-ranking them with the most precise codes the budget allows. Hence:

- exact `Flat` when it fits and a brute-force scan meets the query-time budget;
- `HNSW32` (float vectors, else SQ8 codes) when it fits and memory mapping is not required;
- otherwise the most precise re-rank codes that fit (float, fp16, SQ8, SQ6, 2-d PQ at 5, 4.5 or 4
  bits per dimension behind a PQ{d/4} ranker, SQ4, PQ at 2 bits per dimension) behind a fast-scan
  4-bit PQ ranker that scans many candidates cheaply: a full scan
  `PQ{M}x4fs,Refine(...)` (no 8-byte IVF ids, so a finer ranker fits) when it meets the query
  budget, else `IVF{nlist}[_HNSW32],PQ{M}x4fsr,Refine(...)`, else `IVF{nlist},SQ4`;
- beside that plan, where it fits: a two-level residual code `IVF{nlist},PQ{m1}+{m2}` (faiss's IVFPQR:
  coarse centroid, a PQ{m1} code of the residual scanned per probed list, a PQ{m2} code of what is left
  for the re-rank). On data whose variance sits in few directions it is the more precise code for its
  bytes; on flat spectra its ranker ranks text queries worse than the full fast-scan. Which of the two
  serves the data is measured on the training sample (`family.choose`), not decided here;
- beside those, where scanning every vector's 8-bit PQ{d/8} code fits half the query budget: the same
  code with one list, `IVF1,PQ{d/8}+{d/2}` (full_scan_residual_plan), which looks at everything as the
  fast-scan plan does and re-ranks with codes of what its first code missed;
- with `--should-be-memory-mappable`: `Flat` as above (its vectors are mapped from the file when served),
  else `IVF{nlist}[_HNSW32],{SQ8|PQ{M}x8}` merged into on-disk inverted lists (fast-scan lists cannot
  live on disk in faiss).

Memory figures are estimates of the index size (RAM when loaded, disk when memory-mapped).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from clipsearch.errors import ConfigError, IndexBuildError
from clipsearch.index.config import format_memory

logger = logging.getLogger(__name__)

FLAT_SCAN_BYTES_PER_S = 4e9  # one core streaming float32 dot products, measured order of magnitude
HNSW_MAX_VECTORS = 2_000_000  # beyond this, building HNSW on few cores takes hours
ID_BYTES = 8
FAST_SCAN_BYTES_PER_S = 8e9  # PQ x4fs codes scanned per second by one core (measured ~16e9, halved)
# 8-bit PQ codes of an IVFPQR's first level scanned per second by one core (measured: 200k x 64 bytes
# in 3.2 ms of CPU on an AVX-512 Xeon, docs/bench-index.md session 11). Builds measure this machine's own
# rate (measured_pq_scan_rate): an AVX2-only EPYC scanned 0.74e9 per second, 5x slower (session 12).
PQ_SCAN_BYTES_PER_S = 4e9


def rotation_bytes(d: int) -> int:
    """Size of the balanced rotation (a d x d float32 matrix in an IndexPreTransform)."""
    return 4 * d * d


@dataclass(frozen=True)
class Plan:
    factory: str
    kind: str  # "flat" | "hnsw" | "ivf" | "pqr" | "other"
    reason: str
    memory_bytes: int
    mmap: bool = False
    # whether the d x d balanced rotation (index.rotation, 4 d^2 bytes) fits the budget beside the codes
    rotation_fits: bool = True

    def to_json(self) -> dict:
        return {
            "factory": self.factory,
            "kind": self.kind,
            "reason": self.reason,
            "memory_bytes": self.memory_bytes,
            "rotation_fits": self.rotation_fits,
        }


def metric_of(factory: str) -> str:
    """ "l2" for faiss's two-level residual IVFPQR (`PQ{m1}+{m2}`, implemented for L2 only), else "ip".
    Indexed vectors are L2-normalised, so L2 ranking is inner-product ranking; the searcher turns
    the distances back into inner products (search.searcher.ModalityIndex.search)."""
    return "l2" if re.search(r"PQ\d+\+\d+", factory) else "ip"


def faiss_metric(factory: str) -> int:
    import faiss

    return faiss.METRIC_L2 if metric_of(factory) == "l2" else faiss.METRIC_INNER_PRODUCT


def pick_nlist(n: int) -> int:
    """A power of two near 2*sqrt(n), with at least ~40 vectors per list. Few, long lists suit fast-scan
    and text queries, whose neighbours spread over many lists anyway."""
    target = 2 * math.sqrt(max(n, 1))
    nlist = 2 ** round(math.log2(max(target, 1)))
    while nlist > 16 and n / nlist < 40:
        nlist //= 2
    return max(1, nlist)


TRAIN_POINTS = 100_000  # enough for PQ/SQ codebooks and up to ~1.5k lists
TRAIN_POINTS_PER_LIST = 64  # k-means wants 39-256 points per centroid
TRAIN_SAMPLE_BYTES = 1 << 29  # per modality, held in RAM as float32 while training


def train_points(plan: Plan, d: int) -> int:
    """The training sample a plan wants: 100k, or 64 per IVF list when there are more lists (faiss warns
    below 39 per centroid), held to 512 MiB of float32 per modality."""
    m = re.match(r"(?:OPQ[^,]*,)?IVF(\d+)", plan.factory)
    nlist = int(m.group(1)) if m else 0
    cap = max(TRAIN_POINTS, TRAIN_SAMPLE_BYTES // (4 * d))
    return min(max(TRAIN_POINTS, TRAIN_POINTS_PER_LIST * nlist), cap)


def coarse(nlist: int, d: int) -> tuple[str, int]:
    """The coarse quantizer's factory part and its size: HNSW over the centroids when there are many."""
    if nlist > 4096:
        return f"IVF{nlist}_HNSW32", nlist * (d * 4 + 32 * 2 * 4 + 16)
    return f"IVF{nlist}", nlist * d * 4


def _refine_ladder(d: int) -> list[tuple[str, int, int]]:
    """(factory suffix, bytes per vector, fixed bytes of codebooks) from the most to the least precise
    re-rank codes."""
    out = [
        (",RFlat", 4 * d, 0),
        (",Refine(SQfp16)", 2 * d, 0),
        (",Refine(SQ8)", d, 0),
        (",Refine(SQ6)", (6 * d + 7) // 8, 0),
    ]
    if d % 2 == 0:
        # PQ over 2-d sub-vectors with 2^10 / 2^9 / 2^8 centroids: 5 / 4.5 / 4 bits per dimension, between
        # SQ6 and SQ4 where faiss has no scalar type. Text-query recall@10 on 200k CLIP-like vectors, code
        # scan: SQ4 0.82, PQ{d/2}x8 0.83, PQ{d/2}x9 0.87; behind PQ128x4fs at k_factor 512: SQ4 0.817,
        # PQ256x8 0.829, 0.839 with the 65,536-point training of session 4 (docs/bench-index.md)
        for nbits in (10, 9, 8):
            out.append((f",Refine(PQ{d // 2}x{nbits})", (d // 2 * nbits + 7) // 8, 4 * d * (1 << nbits)))
    # SQ4 with ranges at mean +- 2.5 std (set at training): as many bytes as PQ{d/2}x8, a little less
    # precise, but it trains in a second and needs no PQ{d/4} ranker beside it
    out.append((",Refine(SQ4)", (d + 1) // 2, 0))
    m = d // 4
    if m >= 1 and d % m == 0 and m <= 64:
        out.append((f",Refine(PQ{m}x8)", m, 4 * d * 256))
    out.append(("", 0, 0))
    return out


def _wide(ref_key: str, d: int) -> bool:
    """2-d PQ re-rank codes (`PQ{d/2}x8/x9/x10`) pay only behind a PQ{d/4} fast-scan ranker: behind
    PQ{d/8}, text queries' neighbours are not among the candidates (200k CLIP-like vectors, PQ256x9
    codes: recall@10 0.67 at k_factor 256 behind PQ64x4fs, OPQ64 no better, against 0.86 behind
    PQ128x4fs; docs/bench-index.md)."""
    return ref_key.startswith(f",Refine(PQ{d // 2}x")


def _fs_sizes(d: int) -> list[int]:
    """Fast-scan PQ sub-quantizer counts to try, largest first (d must be divisible by M)."""
    out = []
    for div in (8, 16, 32):
        m = d // div
        if m >= 2 and d % m == 0 and m % 2 == 0:
            out.append(m)
    return out or [m for m in (2, 1) if d % m == 0]


def _mmap_codes(d: int) -> list[tuple[str, int]]:
    out = [("SQ8", d), ("SQ6", (6 * d + 7) // 8)]
    for div in (2, 4, 8, 16, 32):
        m = d // div
        if m >= 1 and d % m == 0:
            out.append((f"PQ{m}x8", m))
    return out


def ivf_memory(n: int, d: int, nlist: int, code: int, refine: int, fast_scan: bool) -> int:
    _, cq = coarse(nlist, d)
    pad = nlist * 16 * code if fast_scan else 0  # fast-scan packs lists in blocks of 32
    return cq + n * (code + ID_BYTES + refine) + pad + 4 * d * 256  # + codebooks


def smallest_budget(n: int, d: int, mmap: bool) -> int:
    """The smallest index any plan can build (what the budget error names)."""
    nlist = pick_nlist(n)
    m = min(_fs_sizes(d)) if not mmap else min(c for _, c in _mmap_codes(d))
    code = (m + 1) // 2 if not mmap else m
    return ivf_memory(n, d, nlist, code, 0, not mmap)


def plan_index(
    n: int,
    d: int,
    budget: int,
    max_query_ms: float = 10.0,
    *,
    mmap: bool = False,
    index_key: str | None = None,
) -> Plan:
    """Choose the index for n vectors of dimension d under `budget` bytes."""
    if index_key:
        kind, mem = describe_key(index_key, n, d)
        return Plan(index_key, kind, "forced by --index-key", mem, mmap and kind == "ivf")
    flat_mem = n * d * 4
    flat_ms = flat_mem / FLAT_SCAN_BYTES_PER_S * 1000
    if flat_mem <= budget and (flat_ms <= max_query_ms or n <= 10_000):
        # a Flat index's vectors are one array in the file: served memory-mapped (faiss IO_FLAG_MMAP_IFC)
        return Plan(
            "Flat",
            "flat",
            f"{n} vectors: exact search fits the budget ({format_memory(flat_mem)}) and scans in about "
            f"{flat_ms:.1f} ms" + ("; its vectors are memory-mapped when served" if mmap else ""),
            flat_mem,
            mmap,
        )
    if not mmap and n <= HNSW_MAX_VECTORS:
        for key, per in (("HNSW32", 4 * d), ("HNSW32_SQ8", d)):
            mem = n * (per + 32 * 2 * 4 + 16)
            if mem <= budget:
                return Plan(
                    key,
                    "hnsw",
                    f"{n} vectors: a graph over {'float vectors' if per == 4 * d else 'SQ8 codes'} fits "
                    f"({format_memory(mem)} <= {format_memory(budget)}); exact scan would take ~{flat_ms:.0f} ms",
                    mem,
                )
    nlist = pick_nlist(n)
    cq_key, _ = coarse(nlist, d)
    if mmap:
        for code_key, code in _mmap_codes(d):
            mem = ivf_memory(n, d, nlist, code, 0, False)
            if mem <= budget:
                return Plan(
                    f"{cq_key},{code_key}",
                    "ivf",
                    f"{n} vectors, memory-mappable: on-disk inverted lists with the most precise codes that "
                    f"fit ({code_key}, {format_memory(mem)} <= {format_memory(budget)})",
                    mem,
                    True,
                )
    else:
        fs = _fs_sizes(d)
        mid = fs[min(1, len(fs) - 1)]  # prefer precise re-rank codes over a larger fast-scan code
        for ref_key, ref, ref_fixed in _refine_ladder(d):
            if ref:
                flat = _flat_fast_scan(n, d, budget, max_query_ms, ref_key, ref, ref_fixed)
                if flat is not None:
                    return flat
            for m in [x for x in fs if x >= mid] + [x for x in fs if x < mid]:
                if _wide(ref_key, d) and m < d // 4:
                    continue  # see _wide
                code = (m + 1) // 2
                mem = ivf_memory(n, d, nlist, code, ref, True) + ref_fixed
                if mem > budget:
                    continue
                # with the re-rank codes fixed, spend what is left on a larger fast-scan code
                for bigger in fs:
                    big_mem = ivf_memory(n, d, nlist, (bigger + 1) // 2, ref, True) + ref_fixed
                    if bigger > m and big_mem <= budget:
                        m, mem = bigger, big_mem
                        break
                what = ref_key.strip(",") or "no re-rank (budget too tight)"
                return Plan(
                    f"{cq_key},PQ{m}x4fsr{ref_key}",
                    "ivf",
                    f"{n} vectors in {format_memory(budget)}: exact ({format_memory(flat_mem)}) and HNSW do not "
                    f"fit or are too slow; IVF{nlist} fast-scan PQ{m} scans many lists cheaply, re-ranked with "
                    f"{what} ({format_memory(mem)})",
                    mem,
                )
            if ref_key == ",Refine(SQ4)":
                # no room for a fast-scan code beside SQ4 re-rank codes: scan SQ4 residual codes directly
                for nl in (nlist, nlist // 2, nlist // 4):
                    key, cq_mem = coarse(max(nl, 1), d)
                    mem = cq_mem + n * ((d + 1) // 2 + ID_BYTES)
                    if nl >= 1 and mem <= budget:
                        return Plan(
                            f"{key},SQ4",
                            "ivf",
                            f"{n} vectors in {format_memory(budget)}: no room for a fast-scan code beside SQ4 "
                            f"re-rank codes; IVF{nl} over SQ4 residual codes ({format_memory(mem)}), merged on "
                            "disk",
                            mem,
                            True,
                        )
    need = smallest_budget(n, d, mmap)
    raise IndexBuildError(
        f"a memory budget of {format_memory(budget)} is too small for any index of {n} vectors of "
        f"dimension {d}; the smallest that works is {format_memory(need)}",
        hint=f"--max-index-memory-usage {format_memory(int(need * 1.05) + 1)}",
    )


def _flat_fast_scan(
    n: int, d: int, budget: int, max_query_ms: float, ref_key: str, ref: int, ref_fixed: int = 0
) -> Plan | None:
    """`PQ{M}x4fs,Refine(...)` without IVF: no 8-byte ids per vector, so a finer fast-scan code fits.
    Text queries' neighbours spread over most IVF lists, so a full fast-scan costs little more than
    a wide IVF probe and ranks candidates better (measured: docs/bench-index.md)."""
    for div in (4, 8):  # coarser codes rank text queries too badly (1M: PQ16x4 -> recall 0.05)
        m = d // div
        if _wide(ref_key, d) and div > 4:
            continue
        if m < 8 or d % m or m % 2:
            continue
        mem = n * (m // 2 + ref) + 4 * d * 16 + 4 * d * 2 + ref_fixed
        scan_ms = n * (m // 2) / FAST_SCAN_BYTES_PER_S * 1000
        if mem <= budget and scan_ms <= max_query_ms / 2:
            what = ref_key.strip(",").removeprefix("Refine(").removesuffix(")")
            return Plan(
                f"PQ{m}x4fs{ref_key}",
                "other",
                f"{n} vectors in {format_memory(budget)}: exact ({format_memory(n * d * 4)}) and HNSW do not fit; "
                f"a full fast-scan of PQ{m}x4 codes (~{scan_ms:.1f} ms) ranks candidates, re-ranked with {what} "
                f"codes ({format_memory(mem)}); no IVF ids, so more bytes go to the codes",
                mem,
            )
    return None


PQR_MIN_VECTORS = 50_000  # below this the flat fast-scan plan scans everything in well under a ms


def residual_plan(n: int, d: int, budget: int, *, mmap: bool = False) -> Plan | None:
    """The two-level residual candidate `IVF{nlist},PQ{m1}+{m2}` that fits the budget, or None.

    The re-rank level gets 2-d sub-vectors at 8 bits (PQ{d/2}), else 4-d ones; the scanned level the
    largest of PQ{d/8}, PQ{d/16}, PQ{d/32} that still fits. Its refine codes live in the index file,
    not in inverted lists, so it is never memory-mappable."""
    if mmap or n < PQR_MIN_VECTORS or d % 32:
        return None
    # a finer coarse level leaves smaller residuals to both code levels: on the steep development draw
    # (50k), twice the lists gave +0.005 to +0.011 text recall@10 at the same share of lists probed.
    # Twice pick_nlist when the centroids fit beside the codes (and lists keep >= 40 points)
    finer = 2 * pick_nlist(n)
    nlists = ([finer] if n / finer >= 40 else []) + [pick_nlist(n)]
    for m2, m1, nlist in (
        (m2, m1, nl) for m2 in (d // 2, d // 4) for m1 in (d // 8, d // 16, d // 32) for nl in nlists
    ):
        cq_key, cq = coarse(nlist, d)
        fixed = cq + 2 * 4 * d * 256 + rotation_bytes(d)  # centroids, two PQ codebooks, the rotation
        mem = fixed + n * (m1 + m2 + ID_BYTES)
        if mem <= budget:
            return Plan(
                f"{cq_key},PQ{m1}+{m2}",
                "pqr",
                f"{n} vectors in {format_memory(budget)}: IVF{nlist} lists of PQ{m1} residual codes, "
                f"re-ranked with PQ{m2} codes of the second residual ({format_memory(mem)})",
                mem,
            )
    return None


def scans_everything(factory: str) -> bool:
    """A one-list IVF (`IVF1,...`): every vector's code is scanned, nothing is left unprobed."""
    return re.match(r"IVF1,", factory) is not None


def measured_pq_scan_rate(d: int, n: int = 65536, queries: int = 15) -> float:
    """Bytes of 8-bit PQ{d/8} codes one core scans per second here, in an IVFPQ with one list: random
    codebooks and codes (the scan's cost does not depend on them), median CPU time of single queries.
    ~0.25 s. The full-scan plan's latency depends on it more than on anything else (5x between machines)."""
    import time

    import faiss
    import numpy as np

    rng = np.random.default_rng(0)
    m = d // 8
    idx = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, 1, m, 8)
    idx.quantizer.add(np.zeros((1, d), np.float32))
    faiss.copy_array_to_vector(rng.standard_normal(256 * d).astype(np.float32), idx.pq.centroids)
    idx.is_trained = True
    idx.precompute_table()
    codes = rng.integers(0, 256, (n, m), dtype=np.uint8)
    ids = np.arange(n, dtype=np.int64)
    idx.invlists.add_entries(0, n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    idx.ntotal = n
    q = rng.standard_normal((queries + 1, d), dtype=np.float32)
    idx.search(q[:1], 10)  # warm up
    times = []
    for i in range(1, queries + 1):
        t = time.process_time()
        idx.search(q[i : i + 1], 10)
        times.append(time.process_time() - t)
    return n * m / max(float(np.median(times)), 1e-6)


def full_scan_residual_plan(
    n: int,
    d: int,
    budget: int,
    max_query_ms: float = 10.0,
    *,
    mmap: bool = False,
    scan_bytes_per_s: float | Callable[[], float] = PQ_SCAN_BYTES_PER_S,
):
    """The two-level residual code with one list, `IVF1,PQ{d/8}+{d/2}`, or None: every vector's 8-bit
    PQ{d/8} code (of its offset from the mean) is scanned, and the best candidates are re-ranked with
    PQ{d/2} codes of what that code leaves. Like the flat fast-scan family it looks at everything, so
    queries far from the images (a wide modality gap, random directions) lose nothing to unprobed lists;
    like the residual family its re-rank codes spend their bytes on what the first code missed (outliers
    and steep draws of benchmarks/geometries.py at 200k: text-query recall@10 0.92-0.95 against
    0.85-0.88 for `PQ{d/4}x4fs,Refine(PQ{d/2}x8)`, docs/bench-index.md session 11).

    Offered where the scan of the first level takes at most half the query-time budget at
    `scan_bytes_per_s` (builds pass this machine's measured_pq_scan_rate, called only once the plan
    fits the memory budget); its codes are
    8 bytes more per vector than the flat family's (the list's ids), so the rotation may not fit beside
    them (`rotation_fits`). Coarser first levels (PQ{d/16}) rank candidates too badly (0.89 at 9 ms)."""
    if mmap or n < PQR_MIN_VECTORS or d % 32:
        return None
    m1, m2 = d // 8, d // 2
    mem = 4 * d + 2 * 4 * d * 256 + n * (m1 + m2 + ID_BYTES)  # the mean, two PQ codebooks, codes and ids
    if mem > budget:
        return None
    rate = scan_bytes_per_s() if callable(scan_bytes_per_s) else scan_bytes_per_s
    scan_ms = n * m1 / rate * 1000
    if scan_ms > max_query_ms / 2:
        return None
    fits = mem + rotation_bytes(d) <= budget
    return Plan(
        f"IVF1,PQ{m1}+{m2}",
        "pqr",
        f"{n} vectors in {format_memory(budget)}: a full scan of PQ{m1}x8 residual codes (~{scan_ms:.1f} ms), "
        f"re-ranked with PQ{m2} codes of the second residual ({format_memory(mem)}"
        + ("" if fits else f"; no room for the {format_memory(rotation_bytes(d))} rotation")
        + ")",
        mem,
        rotation_fits=fits,
    )


def plan_candidates(
    n: int,
    d: int,
    budget: int,
    max_query_ms: float = 10.0,
    *,
    mmap: bool = False,
    index_key: str | None = None,
    scan_bytes_per_s: float | Callable[[], float] = PQ_SCAN_BYTES_PER_S,
) -> list[Plan]:
    """plan_index's plan, then the two-level residual ones (full scan, IVF lists) when the first is a
    quantized one and they fit: the caller measures them on the training sample (index.family).
    `scan_bytes_per_s`: as in full_scan_residual_plan."""
    first = plan_index(n, d, budget, max_query_ms, mmap=mmap, index_key=index_key)
    if index_key or first.kind in ("flat", "hnsw", "pqr"):
        return [first]
    if first.memory_bytes + rotation_bytes(d) > budget:
        first = replace(first, rotation_fits=False)
    others = [
        full_scan_residual_plan(n, d, budget, max_query_ms, mmap=mmap, scan_bytes_per_s=scan_bytes_per_s),
        residual_plan(n, d, budget, mmap=mmap),
    ]
    return [first] + [p for p in others if p is not None]


def describe_key(key: str, n: int, d: int) -> tuple[str, int]:
    """Kind and estimated size of a forced factory string (checked by building an empty index)."""
    import faiss

    try:
        idx = faiss.index_factory(d, key, faiss_metric(key))
    except Exception as e:
        raise ConfigError(f"faiss cannot build {key!r}: {e}", hint="--index-key") from e
    sa = 0
    try:
        sa = idx.sa_code_size()
    except Exception:
        sa = 0
    try:
        ivf = faiss.extract_index_ivf(idx)
    except Exception:
        ivf = None
    if isinstance(faiss.downcast_index(ivf) if ivf is not None else None, faiss.IndexIVFPQR):
        pqr = faiss.downcast_index(ivf)
        return "pqr", ivf.nlist * d * 4 + n * (pqr.code_size + pqr.refine_pq.code_size + ID_BYTES)
    if ivf is not None:
        refine = 0
        if isinstance(idx, faiss.IndexRefine):
            refine = faiss.downcast_index(idx.refine_index).sa_code_size()
        return "ivf", ivf.nlist * d * 4 + n * (ivf.code_size + ID_BYTES + refine)
    if "HNSW" in key.split(",")[0]:
        return "hnsw", n * ((sa or 4 * d) + 32 * 2 * 4 + 16)
    if key.strip() == "Flat":
        return "flat", n * d * 4
    return "other", n * (sa or 4 * d)
