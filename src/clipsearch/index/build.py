"""Scan, train, add part by part, merge.

1. `scan`: one streamed pass over every part: counts NaN / all-zero rows (a sample with a bad image
   or text vector is skipped in every index and in metadata.arrow, so id i stays row i), and draws
   the training sample and the tuning queries uniformly across all parts (row ids drawn up front).
2. `train_index`: trains the planned factory on the sample and writes `{modality}.trained.index`
   (kept: an append adds new vectors with the same quantizer).
3. `run_part` (the unit of work, picklable, runs on `distribute`): reads one part in batches, adds it
   with its global ids to a copy of the trained index (IVF plans) and writes `.parts/{mod}.{part}.index`
   plus the re-rank codes; computes the exact top-k of the tuning queries over the part.
4. `merge` (the reduce): merges the part inverted lists into on-disk lists (`{mod}.ivfdata`,
   memory-mappable) or in memory for fast-scan lists, appends the re-rank codes, and merges the exact
   top-k into the ground truth used by tuning. Non-IVF plans (Flat, HNSW) are filled here in id order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from clipsearch.distribute import UnitResult
from clipsearch.errors import IndexBuildError, InputError
from clipsearch.index.readers import Part, Source, read_batches

logger = logging.getLogger(__name__)

PARTS_DIR = ".parts"
GT_K = 10


def faiss_mod():
    import faiss

    return faiss


# ---------------------------------------------------------------- cleaning


def clean(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normalised float32 rows, nan mask, zero mask) of a batch.

    Three passes over the batch (copy, squared norms, scale in place): every index build and append
    runs it on every row, and the straightforward masks-and-copies version took ~10x longer.
    """
    x = np.array(x, dtype=np.float32, copy=True)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.einsum("ij,ij->i", x, x)
    nan = np.zeros(len(x), dtype=bool)
    odd = np.flatnonzero(~np.isfinite(sq))  # a NaN/inf value, or finite values whose squares overflow
    big = odd[:0]
    if len(odd):
        nan[odd] = ~np.isfinite(x[odd]).all(axis=1)
        big = odd[~nan[odd]]
        sq[odd] = 1.0  # placeholder: these rows are handled below
    zero = ~nan & (sq == 0)
    ok = ~(nan | zero)
    inv = np.zeros(len(x), dtype=np.float32)
    inv[ok] = 1.0 / np.sqrt(sq[ok])
    inv[big] = 1.0
    with np.errstate(invalid="ignore"):  # inf * 0 in the NaN rows, zeroed below
        x *= inv[:, None]
    if len(big):  # rare: normalise in float64
        x64 = x[big].astype(np.float64)
        x[big] = (x64 / np.linalg.norm(x64, axis=1, keepdims=True)).astype(np.float32)
    x[nan] = 0
    return x, nan, zero


def iter_part(
    part: Part, source: Source, batch_rows: int, modalities: tuple[str, ...]
) -> Iterator[tuple[int, dict[str, np.ndarray], np.ndarray, dict[str, int]]]:  # noqa: F821
    """Yield (first row, {modality: normalised batch}, bad-row mask, {reason: count}) in lockstep."""
    readers = [read_batches(part.path(m), source.fmt, batch_rows, source.column) for m in modalities]
    start = 0
    for batches in zip(*readers, strict=True):
        xs, bad, counts = {}, None, {"nan": 0, "zero": 0}
        for m, b in zip(modalities, batches, strict=True):
            if b.shape[1] != source.dim:
                raise InputError(f"{part.path(m)} has dimension {b.shape[1]}, expected {source.dim}")
            xs[m], nan, zero = clean(b)
            bm = nan | zero
            bad = bm if bad is None else bad | bm
            counts["nan"] += int(nan.sum())
            counts["zero"] += int((zero & ~nan).sum())
        yield start, xs, bad, counts
        start += len(bad)
    if start != part.rows:
        raise InputError(f"part {part.name}: read {start} rows, its header says {part.rows}")


# ---------------------------------------------------------------- scan


@dataclass
class ScanResult:
    kept: list[int]  # kept rows per part
    bad: dict[str, int]  # reason -> count of skipped samples
    skipped: int
    train: dict[str, np.ndarray]  # modality -> training sample
    queries: dict[str, np.ndarray]  # modality -> held-out query rows (for tuning)


def scan(
    source: Source, modalities: tuple[str, ...], n_train: int, n_queries: int, batch_rows: int, seed: int
):
    total = source.total_rows
    rng = np.random.default_rng(seed)
    train_ids = np.sort(rng.choice(total, size=min(n_train, total), replace=False))
    query_ids = np.sort(rng.choice(total, size=min(n_queries, total), replace=False))
    train = {m: [] for m in modalities}
    queries = {m: [] for m in modalities}
    kept, bad_counts, skipped = [], {"nan": 0, "zero": 0}, 0
    base = 0
    for part in source.parts:
        n_kept = 0
        for start, xs, bad, counts in iter_part(part, source, batch_rows, modalities):
            lo, hi = base + start, base + start + len(bad)
            for ids, store in ((train_ids, train), (query_ids, queries)):
                sel = ids[np.searchsorted(ids, lo) : np.searchsorted(ids, hi)] - lo
                sel = sel[~bad[sel]]
                for m in modalities:
                    store[m].append(xs[m][sel])
            n_kept += int((~bad).sum())
            skipped += int(bad.sum())
            for k, v in counts.items():
                bad_counts[k] += v
        kept.append(n_kept)
        base += part.rows
    cat = {m: np.concatenate(v) if v else np.zeros((0, source.dim), np.float32) for m, v in train.items()}
    qs = {m: np.concatenate(v) if v else np.zeros((0, source.dim), np.float32) for m, v in queries.items()}
    return ScanResult(kept, bad_counts, skipped, cat, qs)


# ---------------------------------------------------------------- train


def train_index(factory: str, d: int, sample: np.ndarray, path: str, rotation: str | None = None) -> None:
    """Train the planned factory on the sample and write it (empty) to path. With `rotation`
    (rotation.NAME), the balanced PCA rotation is fitted on the sample and put in front of the index
    (an IndexPreTransform), and the index trains on rotated vectors."""
    from clipsearch.index import codebooks
    from clipsearch.index import rotation as rot
    from clipsearch.index.plan import faiss_metric

    faiss = faiss_mod()
    index = faiss.index_factory(d, factory, faiss_metric(factory))
    configure_training(index)
    if len(sample) < 1 and (rotation or not index.is_trained):
        raise IndexBuildError("no valid vector to train on")
    x = np.ascontiguousarray(sample, dtype=np.float32)
    lt = None
    if rotation is not None:
        if rotation != rot.NAME:
            raise IndexBuildError(f"unknown rotation {rotation!r}")
        matrix = rot.balanced_pca(x, rot.sub_vector_sizes(factory, d) or (1,))
        lt = rot.transform(matrix)
        x = np.ascontiguousarray(x @ matrix.T)
    if not index.is_trained:
        t0 = time.perf_counter()
        codebooks.train(index, x)
        logger.info("trained %s on %d vectors in %.1f s", factory, len(x), time.perf_counter() - t0)
    if lt is not None:
        index = faiss.IndexPreTransform(lt, index)  # the python objects stay alive until written
    write_index_atomic(index, path)


def split_transform(index):
    """(vector transforms in order, the index behind them) of a trained or built index."""
    faiss = faiss_mod()
    idx = typed(index)
    if isinstance(idx, faiss.IndexPreTransform):
        chain = [faiss.downcast_VectorTransform(idx.chain.at(i)) for i in range(idx.chain.size())]
        return chain, typed(idx.index)
    return [], index


def apply_chain(chain: list, x: np.ndarray) -> np.ndarray:
    for vt in chain:
        x = vt.apply(np.ascontiguousarray(x, dtype=np.float32))
    return np.ascontiguousarray(x, dtype=np.float32)


# PQ codes of more than 8 bits per sub-quantizer, and 8-bit PQ over 2-d sub-vectors (the planner's
# `PQ{d/2}x8/x9/x10` re-rank codes): each sub-quantizer trains on 65,536 points for 25 iterations
# (256 / 128 / 64 points per centroid). Measured on 200k CLIP-like vectors, PQ256x8 behind PQ128x4fs
# at k_factor 512: text-query recall@10 0.835 in 42 s, against 0.829 in 45 s with the 12,288 points and
# 12 iterations used before (docs/bench-index.md, session 4). The 2-d ones no longer train in faiss:
# `codebooks` starts them from a Gaussian codebook instead, which is better and faster.
WIDE_PQ_POINTS_PER_CENTROID = 24  # the floor, for codes of more than 11 bits
WIDE_PQ_SAMPLE = 65_536  # points per sub-quantizer
WIDE_PQ_ITERATIONS = 25


def configure_training(index) -> None:
    """Training settings that faiss's defaults get wrong for our plans; stored in nothing but the
    trained codes, so readers need nothing special.

    - 4-bit scalar quantizers: ranges at mean +- 2.5 std instead of min/max. On CLIP-like data this lifts
      text-query recall@10 of SQ4 from 0.77 to 0.83 (measured, docs/bench-index.md).
    - PQ with more than 8 bits per code, or over 2-d sub-vectors: a bounded training cost (WIDE_PQ_*).
    - PQ and IVF-PQ codes: no polysemous training (see below)."""
    faiss = faiss_mod()
    stack = [index]
    while stack:
        idx = typed(stack.pop())
        for attr in ("base_index", "refine_index", "index"):
            sub = getattr(idx, attr, None)
            if sub is not None and isinstance(sub, faiss.Index):
                stack.append(sub)
        sq = getattr(idx, "sq", None)
        if sq is not None and sq.qtype in (faiss.ScalarQuantizer.QT_4bit,):
            sq.rangestat = faiss.ScalarQuantizer.RS_meanstd
            sq.rangestat_arg = 2.5
        if isinstance(idx, (faiss.IndexPQ, faiss.IndexIVFPQ)):
            # index_factory turns polysemous training on for "PQ..." and "IVF...,PQ..." keys: a simulated
            # annealing over code orders that only Hamming-filtered search uses, and that takes hours on
            # wide codes
            idx.do_polysemous_training = False
        for attr in ("pq", "refine_pq"):  # refine_pq: the second residual level of IndexIVFPQR
            pq = getattr(idx, attr, None)
            if isinstance(pq, faiss.ProductQuantizer) and (pq.nbits > 8 or (pq.dsub <= 2 and pq.nbits == 8)):
                pq.cp.max_points_per_centroid = max(WIDE_PQ_POINTS_PER_CENTROID, WIDE_PQ_SAMPLE // pq.ksub)
                pq.cp.min_points_per_centroid = min(pq.cp.min_points_per_centroid, 8)
                pq.cp.niter = WIDE_PQ_ITERATIONS


def write_index_atomic(index, path: str) -> None:
    faiss = faiss_mod()
    tmp = f"{path}.tmp{os.getpid()}"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def typed(index):
    """The typed proxy of a sub-index (members come back as plain `Index`). Never used on an owning
    root proxy: a downcast of a temporary leaves a dangling pointer."""
    faiss = faiss_mod()
    return faiss.downcast_index(index) if type(index) is faiss.Index else index


def split_refine(index):
    """(base index, refine codes index or None) of a trained or built index (kept alive by the caller)."""
    faiss = faiss_mod()
    if isinstance(index, faiss.IndexRefine):
        return typed(index.base_index), typed(index.refine_index)
    return index, None


# ---------------------------------------------------------------- the unit


@dataclass(frozen=True)
class PartUnit:
    """Index one embedding part. Picklable and self-contained (paths and numbers only)."""

    name: str
    part: Part
    source: Source
    modalities: tuple[str, ...]
    kinds: tuple[str, ...]  # plan kind per modality
    id_offset: int
    work_dir: str
    batch_rows: int
    threads: int


def part_paths(work_dir: str, name: str, modality: str) -> dict[str, str]:
    d = os.path.join(work_dir, PARTS_DIR)
    return {
        "index": os.path.join(d, f"{modality}.{name}.index"),
        "refine": os.path.join(d, f"{modality}.{name}.refine.npy"),
        "gt": os.path.join(d, f"{modality}.{name}.gt.npz"),
        "done": os.path.join(d, f"{name}.done.json"),
    }


def run_part(unit: PartUnit) -> UnitResult:
    faiss = faiss_mod()
    t0 = time.perf_counter()
    done = part_paths(unit.work_dir, unit.name, "x")["done"]
    if os.path.exists(done):
        with open(done) as f:
            counts = json.load(f)
        return UnitResult(unit=unit.name, skipped=True, counts=counts)
    faiss.omp_set_num_threads(unit.threads)
    with np.load(os.path.join(unit.work_dir, PARTS_DIR, "queries.npz")) as z:
        queries = {m: np.ascontiguousarray(z[m]) for m in unit.modalities}
    heaps = {m: faiss.ResultHeap(len(queries[m]), GT_K, keep_max=True) for m in unit.modalities}
    bases, refines, codes, keep_alive = {}, {}, {m: [] for m in unit.modalities}, []
    chains: dict[str, list] = {}
    for m, kind in zip(unit.modalities, unit.kinds, strict=True):
        if kind == "ivf":
            trained = faiss.read_index(os.path.join(unit.work_dir, f"{m}.trained.index"))
            keep_alive.append(trained)  # the wrappers own the transform, base and refine indices
            chains[m], inner = split_transform(trained)
            bases[m], refines[m] = split_refine(inner)
    next_id = unit.id_offset
    counts = {"rows": 0, "added": 0, "nan": 0, "zero": 0}
    for _, xs, bad, c in iter_part(unit.part, unit.source, unit.batch_rows, unit.modalities):
        keep = ~bad
        n = int(keep.sum())
        ids = np.arange(next_id, next_id + n, dtype=np.int64)
        for m in unit.modalities:
            x = np.ascontiguousarray(xs[m][keep])
            if n and len(queries[m]):
                dist, idx = faiss.knn(queries[m], x, min(GT_K, n), metric=faiss.METRIC_INNER_PRODUCT)
                if idx.shape[1] < GT_K:
                    pad = GT_K - idx.shape[1]
                    dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=-np.inf)
                    idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
                heaps[m].add_result(np.ascontiguousarray(dist), np.where(idx >= 0, idx + next_id, -1))
            if m in bases and n:
                xt = apply_chain(chains[m], x) if chains[m] else x
                bases[m].add_with_ids(xt, ids)
                if refines[m] is not None:
                    codes[m].append(refines[m].sa_encode(xt))
        next_id += n
        counts["rows"] += len(bad)
        counts["added"] += n
        counts["nan"] += c["nan"]
        counts["zero"] += c["zero"]
    for m in unit.modalities:
        p = part_paths(unit.work_dir, unit.name, m)
        heaps[m].finalize()
        _save_npz_atomic(p["gt"], D=heaps[m].D, I=heaps[m].I)
        if m in bases:
            write_index_atomic(bases[m], p["index"])
            if refines[m] is not None:
                cs = refines[m].sa_code_size()
                arr = np.concatenate(codes[m]) if codes[m] else np.zeros((0, cs), np.uint8)
                _save_npy_atomic(p["refine"], arr)
    with open(done + ".tmp", "w") as f:
        json.dump(counts, f)
    os.replace(done + ".tmp", done)
    return UnitResult(unit=unit.name, counts=counts, duration_s=time.perf_counter() - t0)


def _save_npz_atomic(path: str, **arrays) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _save_npy_atomic(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


# ---------------------------------------------------------------- merge (the reduce)


def merge_ground_truth(work_dir: str, names: list[str], modality: str) -> np.ndarray:
    faiss = faiss_mod()
    heap = None
    for name in names:
        with np.load(part_paths(work_dir, name, modality)["gt"]) as z:
            D, Ids = z["D"], z["I"]
        if heap is None:
            heap = faiss.ResultHeap(D.shape[0], GT_K, keep_max=True)
        heap.add_result(np.ascontiguousarray(D), np.ascontiguousarray(Ids))
    heap.finalize()
    return heap.I


def merge_ivf(work_dir: str, names: list[str], modality: str, total: int, out_path: str):
    """Merge the part indices of an IVF plan into one index at out_path. Returns (index, mmap):
    array inverted lists are merged on disk (`.ivfdata`, memory-mapped when served); fast-scan
    block lists cannot live on disk in faiss and are merged in RAM (bounded by the budget)."""
    faiss = faiss_mod()
    index = faiss.read_index(os.path.join(work_dir, f"{modality}.trained.index"))
    chain, inner = split_transform(index)
    base, refine = split_refine(inner)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(base))  # a member: safe to downcast
    fast_scan = isinstance(ivf, faiss.IndexIVFFastScan)
    paths = [part_paths(work_dir, n, modality) for n in names]
    if fast_scan:
        parts = [faiss.read_index(p["index"]) for p in paths]
        merge_block_lists(ivf, [faiss.extract_index_ivf(part) for part in parts])
        del parts
    else:
        ivfdata = out_path[: -len(".index")] + ".ivfdata"
        if os.path.exists(ivfdata):
            os.remove(ivfdata)
        parts = [faiss.read_index(p["index"], faiss.IO_FLAG_MMAP) for p in paths]
        lists = faiss.InvertedListsPtrVector()
        for part in parts:
            lists.push_back(faiss.extract_index_ivf(part).invlists)
        ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata)
        ondisk.merge_from_multiple(lists.data(), lists.size())
        ivf.replace_invlists(ondisk, True)
        ondisk.this.disown()
        ivf.ntotal = total
        del parts, lists
    if ivf.ntotal != total:
        raise IndexBuildError(f"merged {ivf.ntotal} vectors into the {modality} index, expected {total}")
    _fix_ntotal(base, total)
    if refine is not None:
        for p in paths:
            codes = np.load(p["refine"], mmap_mode="r")
            if len(codes):
                arr = np.ascontiguousarray(codes)
                refine.add_sa_codes(arr)
        if refine.ntotal != total:
            raise IndexBuildError(f"merged {refine.ntotal} re-rank codes, expected {total}")
        inner.ntotal = total
    index.ntotal = total
    write_index_atomic(index, out_path)
    return index, not fast_scan


def merge_block_lists(target, parts: list) -> None:
    """Move the fast-scan (block-packed) inverted lists of `parts` into the empty lists of `target`.

    faiss's own IndexIVFFastScan.merge_from appends packed blocks with an offset bug (it copies whole
    blocks past the end of a list whose size is a multiple of the block size: heap corruption after a
    few merges, faiss 1.15). Here each list is unpacked from every part, concatenated and packed once
    into an empty target list, the one case faiss copies correctly.
    """
    faiss = faiss_mod()
    dst = faiss.downcast_InvertedLists(target.invlists)
    if dst.compute_ntotal() != 0:
        raise IndexBuildError("merge_block_lists needs an empty target index")
    srcs = [faiss.downcast_InvertedLists(faiss.extract_index_ivf(p).invlists) for p in parts]
    packer = dst.packer
    nvec, block, code_size = int(packer.nvec), int(packer.block_size), int(packer.code_size)
    added = 0
    for lno in range(dst.nlist):
        ids_parts, code_parts = [], []
        for src in srcs:
            n = int(src.list_size(lno))
            if n == 0:
                continue
            nb = -(-n // nvec)
            packed = faiss.rev_swig_ptr(src.get_codes(lno), nb * block)
            flat = np.empty((nb * nvec, code_size), dtype=np.uint8)
            for b in range(nb):
                packer.unpack_all(faiss.swig_ptr(packed[b * block :]), faiss.swig_ptr(flat[b * nvec :]))
            code_parts.append(flat[:n])
            ids_parts.append(faiss.rev_swig_ptr(src.get_ids(lno), n).copy())
        if not ids_parts:
            continue
        ids = np.ascontiguousarray(np.concatenate(ids_parts), dtype=np.int64)
        n = len(ids)
        nb = -(-n // nvec)
        flat = np.zeros((nb * nvec, code_size), dtype=np.uint8)
        flat[:n] = np.concatenate(code_parts)
        packed = np.zeros(nb * block, dtype=np.uint8)
        for b in range(nb):
            packer.pack_all(faiss.swig_ptr(flat[b * nvec :]), faiss.swig_ptr(packed[b * block :]))
        dst.add_entries(lno, n, faiss.swig_ptr(ids), faiss.swig_ptr(packed))
        added += n
    target.ntotal = added


def _fix_ntotal(index, total: int) -> None:
    """Wrappers (IndexPreTransform, IDMap) keep their own ntotal: set it after replacing the lists."""
    faiss = faiss_mod()
    index = typed(index)
    index.ntotal = total
    if isinstance(index, faiss.IndexPreTransform):
        _fix_ntotal(index.index, total)


def fill_sequential(
    source: Source,
    modality: str,
    all_modalities: tuple[str, ...],
    work_dir: str,
    out_path: str,
    batch_rows: int,
):
    """Non-IVF plans (Flat, HNSW, other): add every kept vector in id order, then write."""
    faiss = faiss_mod()
    index = faiss.read_index(os.path.join(work_dir, f"{modality}.trained.index"))
    for part in source.parts:
        for _, xs, bad, _ in iter_part(part, source, batch_rows, all_modalities):
            x = np.ascontiguousarray(xs[modality][~bad])
            if len(x):
                index.add(x)
    write_index_atomic(index, out_path)
    return index


def cleanup_parts(work_dir: str) -> None:
    shutil.rmtree(os.path.join(work_dir, PARTS_DIR), ignore_errors=True)


# ---------------------------------------------------------------- reading and search parameters


def read_index(path: str, mmap: bool = False):
    """Open a built index: on-disk inverted lists (`.ivfdata` beside it) are memory-mapped."""
    faiss = faiss_mod()
    if mmap:
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    return faiss.read_index(path)


def quantizer_ef_search(nprobe: int) -> int:
    """efSearch of an HNSW coarse quantizer for a given nprobe: the tuner measures with it, and the
    server searches with it (search.searcher.build_search_params)."""
    return max(2 * int(nprobe), 64)


def apply_search_params(index, params: dict) -> None:
    """Set nprobe / efSearch / k_factor (the keys of index.json's search_params) on an index."""
    faiss = faiss_mod()
    idx = typed(index)
    if isinstance(idx, faiss.IndexRefine):
        if params.get("k_factor") is not None:
            idx.k_factor = float(params["k_factor"])
        apply_search_params(idx.base_index, params)
        return
    if isinstance(idx, faiss.IndexPreTransform | faiss.IndexIDMap):
        apply_search_params(idx.index, params)
        return
    if isinstance(idx, faiss.IndexIVFPQR) and params.get("k_factor") is not None:
        idx.k_factor = float(params["k_factor"])  # its re-rank depth is an attribute, not a search parameter
    if isinstance(idx, faiss.IndexIVF):
        if params.get("nprobe") is not None:
            idx.nprobe = int(params["nprobe"])
            q = typed(idx.quantizer)
            if isinstance(q, faiss.IndexHNSW):
                q.hnsw.efSearch = quantizer_ef_search(int(params["nprobe"]))
        return
    if isinstance(idx, faiss.IndexHNSW):
        if params.get("efSearch") is not None:
            idx.hnsw.efSearch = int(params["efSearch"])
