"""Searching the segments that share one trained IVF quantizer in one pass.

Appended segments are copies of the base's trained index: the same coarse centroids, the same fine
codes, the same re-rank encoder. Searching each with its own `IndexSearcher.search` repeats per segment
what does not depend on its rows (the coarse quantization, one scan per probed list however few rows it
holds, the re-rank's setup) and splits the re-rank budget. `SharedFanout` instead:

1. at open (and hot reload), merges the inverted lists of the small segments (all but the largest, up to
   MERGE_MAX_BYTES) into one in-memory IVF with ranker-local ids; an append merges onto the previous
   generation's merged lists, a tombstone-only reload reuses them. Large segments (the base, a compacted
   one) keep their own, possibly memory-mapped, lists;
2. per query batch, quantizes the queries once with the base's quantizer (`nprobe`, and for an HNSW
   quantizer the efSearch the tuner used, as `build_search_params` does), then scans each ranker with
   `search_preassigned` (tombstones are an `IDSelectorBitmap` inside that scan), asking each for its share
   of the candidates times SHARED_MARGIN;
3. keeps the best candidates over all rankers by ranker distance (as many as the per-segment path re-ranks
   in all: RERANK_MARGIN) and re-ranks them together: their codes are gathered from each segment's own
   (memory-mapped) re-rank codes into one small scratch index of the same encoder, which faiss scans.

Segments whose index does not share the quantizer and codes (an HNSW or flat segment, a retrained base)
are left to the per-segment path, and so is a modality where fewer than two segments share them, and a
filtered search (each segment's filter planner: exact subsets, widened ANN).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from clipsearch.index.build import quantizer_ef_search
from clipsearch.search.filters import FilterBitmap
from clipsearch.search.searcher import ModalityIndex, SearchParams

logger = logging.getLogger(__name__)

# candidates asked from each segment's ranker: its share of k * k_factor (by live rows) times this, plus
# k; a segment holding more than that of the global best candidates is rare and loses only the excess
SHARED_MARGIN = 2.0
# re-rank budget: k * k_factor times this, as the per-segment path (search.SHARE_MARGIN) re-ranks
RERANK_MARGIN = 1.25
MERGE_MAX_BYTES = 512 * 1024 * 1024  # small segments' lists merged in memory, at most this (codes + ids)
_PROBE_ROWS = 16  # vectors encoded by each segment's re-rank encoder to check that the encoders agree


@dataclass
class Layout:
    """What one segment's faiss index offers to the shared fan-out."""

    ivf: Any  # the IndexIVF ranker (kept alive by the ModalityIndex)
    refine: Any | None  # the flat-codes re-rank index, None when the IVF's distances are final
    key: tuple[Any, ...]  # equal across segments that can share the coarse pass and the re-rank


_layouts: weakref.WeakKeyDictionary[ModalityIndex, Layout | None] = weakref.WeakKeyDictionary()
_layouts_lock = threading.Lock()


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def layout(mi: ModalityIndex) -> Layout | None:
    """The shared-fan-out view of one segment's index (computed once per opened index), or None when its
    index kind is not one the shared path handles: an IVF (inner product, no pre-transform), bare or
    inside an IndexRefine whose re-rank index is flat, scalar-quantized or PQ codes."""
    with _layouts_lock:
        if mi in _layouts:
            return _layouts[mi]
    try:
        out = _make_layout(mi)
    except RuntimeError as e:  # a faiss index that cannot reconstruct its centroids, encode, ...
        logger.info("%s: searched on its own (%s)", mi.path, e)
        out = None
    with _layouts_lock:
        _layouts[mi] = out
    return out


def _make_layout(mi: ModalityIndex) -> Layout | None:
    idx = faiss.downcast_index(mi.index)
    refine = None
    if isinstance(idx, faiss.IndexRefine):
        refine = faiss.downcast_index(idx.refine_index)
        idx = faiss.downcast_index(idx.base_index)
        if not isinstance(refine, faiss.IndexScalarQuantizer | faiss.IndexPQ | faiss.IndexFlat):
            return None
        if int(refine.metric_type) != faiss.METRIC_INNER_PRODUCT:
            return None
    if not isinstance(idx, faiss.IndexIVF) or int(idx.metric_type) != faiss.METRIC_INNER_PRODUCT:
        return None
    quantizer = faiss.downcast_index(idx.quantizer)
    centroids = quantizer.reconstruct_n(0, int(idx.nlist))
    key: tuple[Any, ...] = (
        type(idx).__name__, int(idx.d), int(idx.nlist), bool(idx.by_residual), int(idx.code_size),
        type(quantizer).__name__, _digest(centroids),
    )  # fmt: skip
    if refine is not None:
        probe = np.random.default_rng(0).standard_normal((_PROBE_ROWS, int(idx.d))).astype(np.float32)
        probe /= np.linalg.norm(probe, axis=1, keepdims=True)
        key += (type(refine).__name__, int(refine.code_size), _digest(refine.sa_encode(probe)))
    else:
        probe = np.random.default_rng(0).standard_normal((_PROBE_ROWS, int(idx.d))).astype(np.float32)
    key += (_digest(idx.sa_encode(probe)),)  # the same fine codes: lists can be merged, distances compared
    return Layout(idx, refine, key)


def _codes(refine: Any) -> np.ndarray:
    """The re-rank codes of `refine` as a [ntotal, code_size] array over faiss's own (mapped) buffer."""
    n, cs = int(refine.ntotal), int(refine.code_size)
    if n == 0:
        return np.zeros((0, cs), np.uint8)
    return faiss.rev_swig_ptr(refine.codes.data(), n * cs).reshape(n, cs)


def _scratch(refine: Any) -> Any:
    """An empty index with the encoder of `refine`, to scan a few gathered codes."""
    if isinstance(refine, faiss.IndexScalarQuantizer):
        t = faiss.IndexScalarQuantizer(int(refine.d), refine.sq.qtype, faiss.METRIC_INNER_PRODUCT)
        t.sq = refine.sq  # copies the trained ranges
        t.is_trained = True
        return t
    if isinstance(refine, faiss.IndexPQ):  # the planner's PQ{d/2}x8/x9/x10 re-rank codes
        t = faiss.IndexPQ(int(refine.d), int(refine.pq.M), int(refine.pq.nbits), faiss.METRIC_INNER_PRODUCT)
        t.pq = refine.pq  # copies the trained codebooks
        t.is_trained = True
        return t
    return faiss.IndexFlatIP(int(refine.d))


class Ranker:
    """One IVF scanned per query: a segment's own, or the lists of several small segments merged."""

    def __init__(
        self, ivf: Any, members: list[int], counts: list[int], live: int, alive: Any, keep: Any = None
    ):
        self.ivf = ivf
        self.members = np.asarray(members, np.int64)  # positions in SharedFanout.members
        self.starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)  # ranker-local id of each one's row 0
        self.live = live
        self.alive = alive  # FilterBitmap over the ranker-local ids (tombstones), or None
        self.keep = keep  # objects the ivf needs alive (a merged ranker's own index)
        self._params: dict[int, tuple[Any, Any]] = {}

    def params(self, nprobe: int) -> Any:
        """SearchParametersIVF with the tombstone selector, built once per nprobe (read-only after)."""
        got = self._params.get(nprobe)
        if got is None:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            sel = self.alive.selector() if self.alive is not None else None
            if sel is not None:
                params.sel = sel
            got = (params, sel)
            if len(self._params) < 64:
                self._params[nprobe] = got
        return got[0]

    def owners(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(member position, local id in that segment) of ranker-local ids."""
        if len(self.members) == 1:
            return np.full(len(ids), self.members[0]), ids
        j = np.searchsorted(self.starts, ids, side="right") - 1
        return self.members[j], ids - self.starts[j]


class BlockNibbles:
    """The nibble permutation of faiss's 4-bit fast-scan block packing (`CodePacker` of a BlockInvertedLists),
    read off the packer itself by packing probe codes, then checked on random codes: with it, numpy packs and
    unpacks many blocks at once (faiss's packer goes one block or one entry per call)."""

    def __init__(self, packer: Any):
        self.nvec, self.cs, self.bs = int(packer.nvec), int(packer.code_size), int(packer.block_size)
        nflat = self.nvec * 2 * self.cs

        def pack_one(vals: np.ndarray) -> np.ndarray:
            flat = (vals[0::2] | (vals[1::2] << 4)).astype(np.uint8).reshape(self.nvec, self.cs)
            out = np.zeros(self.bs, np.uint8)
            packer.pack_all(faiss.swig_ptr(np.ascontiguousarray(flat)), faiss.swig_ptr(out))
            return _nibbles(out[None])[0].astype(np.int64)

        p = np.arange(nflat)
        present = pack_one(np.full(nflat, 15)) == 15
        src = np.zeros(2 * self.bs, np.int64)
        for r in range(math.ceil(math.log(nflat, 16)) + 1):
            src |= pack_one((p >> (4 * r)) & 15) << (4 * r)
        src[~present] = -1
        if sorted(src[present].tolist()) != p.tolist():
            raise RuntimeError("the fast-scan packing is not a nibble permutation")
        # gathers: flat nibble j = packed nibble unpack_from[j]; packed nibble i = flat nibble pack_from[i]
        # (index nflat: an appended zero, for the packed padding)
        self.unpack_from = np.empty(nflat, np.int64)
        self.unpack_from[src[present]] = np.flatnonzero(present)
        self.pack_from = np.where(present, src, nflat)
        rng = np.random.default_rng(0)
        codes = rng.integers(0, 256, (2 * self.nvec, self.cs), dtype=np.uint8)
        ref = np.zeros(2 * self.bs, np.uint8)
        for b in range(2):
            packer.pack_all(faiss.swig_ptr(codes[b * self.nvec :]), faiss.swig_ptr(ref[b * self.bs :]))
        if not np.array_equal(self.pack(codes), ref.reshape(2, self.bs)):
            raise RuntimeError("numpy packing differs from faiss's")
        if not np.array_equal(self.unpack(ref.reshape(2, self.bs)), codes):
            raise RuntimeError("numpy unpacking differs from faiss's")

    def pack(self, flat: np.ndarray) -> np.ndarray:
        """[nb * nvec, cs] codes -> [nb, bs] packed blocks."""
        nb = len(flat) // self.nvec
        fn = _nibbles(flat.reshape(nb, self.nvec * self.cs), pad=1)
        pn = np.take(fn, self.pack_from, axis=1)
        return pn[:, 0::2] | (pn[:, 1::2] << 4)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """[nb, bs] packed blocks -> [nb * nvec, cs] codes."""
        nb = len(packed)
        fn = np.take(_nibbles(packed), self.unpack_from, axis=1)
        return (fn[:, 0::2] | (fn[:, 1::2] << 4)).reshape(nb * self.nvec, self.cs)


def _nibbles(b: np.ndarray, pad: int = 0) -> np.ndarray:
    """[rows, n] bytes -> [rows, 2n (+ pad zeros)] nibbles, low nibble first (faiss's 4-bit code order)."""
    n2 = 2 * b.shape[1]
    out = np.empty((b.shape[0], n2 + pad), np.uint8)
    out[:, 0:n2:2] = b & 15
    out[:, 1:n2:2] = b >> 4
    out[:, n2:] = 0
    return out


_nibble_maps: dict[tuple[int, int, int], BlockNibbles] = {}


def _unpacked_lists(ivf: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(list number, id, code) of every entry of an IVF's inverted lists, in list order; codes unpacked."""
    inv = faiss.downcast_InvertedLists(ivf.invlists)
    nlist = int(inv.nlist)
    sizes = np.asarray([inv.list_size(lno) for lno in range(nlist)], np.int64)
    n = int(sizes.sum())
    block = isinstance(inv, faiss.BlockInvertedLists)
    ids = np.empty(n, np.int64)
    lists = np.repeat(np.arange(nlist, dtype=np.int32), sizes)
    if block:
        nib = nibble_map(inv.packer)
        nbs = -(-sizes // nib.nvec)
        packed = np.empty((int(nbs.sum()), nib.bs), np.uint8)
    else:
        codes = np.empty((n, int(ivf.code_size)), np.uint8)
    o = ob = 0
    for lno in np.flatnonzero(sizes).tolist():
        m = int(sizes[lno])
        ids[o : o + m] = faiss.rev_swig_ptr(inv.get_ids(lno), m)
        if block:
            nb = int(nbs[lno])
            packed[ob : ob + nb] = faiss.rev_swig_ptr(inv.get_codes(lno), nb * nib.bs).reshape(nb, nib.bs)
            ob += nb
        else:
            codes[o : o + m] = faiss.rev_swig_ptr(inv.get_codes(lno), m * codes.shape[1]).reshape(m, -1)
        o += m
    if block:
        flat = nib.unpack(packed)  # [sum nb * nvec, cs]: drop each list's padding past its size
        pad_start = np.repeat(np.cumsum(nbs) * nib.nvec - nbs * nib.nvec, sizes)
        rank = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        codes = flat[pad_start + rank]
    return lists, ids, codes


def nibble_map(packer: Any) -> BlockNibbles:
    key = (int(packer.nvec), int(packer.code_size), int(packer.block_size))
    got = _nibble_maps.get(key)
    if got is None:
        got = _nibble_maps[key] = BlockNibbles(packer)
    return got


def merge_lists(
    empty_ivf: Any, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], starts: list[int]
) -> None:
    """Fill the empty in-memory `empty_ivf` with the entries `parts` (`_unpacked_lists` of IVFs with the
    same quantizer and codes), the ids of part s shifted by starts[s]. Each list is written once into an
    empty list (fast-scan blocks packed by numpy, `BlockNibbles`): faiss's own IndexIVFFastScan.merge_from,
    and add_entries onto a non-empty block list, copy whole blocks past a list's end in some cases (faiss
    1.15)."""
    dst = faiss.downcast_InvertedLists(empty_ivf.invlists)
    lists = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] + st for p, st in zip(parts, starts, strict=True)])
    codes = np.concatenate([p[2] for p in parts])
    order = np.argsort(lists, kind="stable")
    lists, ids, codes = lists[order], np.ascontiguousarray(ids[order]), codes[order]
    nlist = int(dst.nlist)
    sizes = np.bincount(lists, minlength=nlist).astype(np.int64)
    first = np.cumsum(sizes) - sizes
    if isinstance(dst, faiss.BlockInvertedLists):
        nib = nibble_map(dst.packer)
        nbs = -(-sizes // nib.nvec)
        bstart = np.cumsum(nbs) - nbs
        rank = np.arange(len(lists)) - first[lists]
        flat = np.zeros((int(nbs.sum()) * nib.nvec, codes.shape[1]), np.uint8)
        flat[bstart[lists] * nib.nvec + rank] = codes
        packed = np.ascontiguousarray(nib.pack(flat))
        for lno in np.flatnonzero(sizes).tolist():
            f, b = int(first[lno]), int(bstart[lno])
            dst.add_entries(lno, int(sizes[lno]), faiss.swig_ptr(ids[f:]), faiss.swig_ptr(packed[b]))
    else:
        codes = np.ascontiguousarray(codes)
        for lno in np.flatnonzero(sizes).tolist():
            f = int(first[lno])
            dst.add_entries(lno, int(sizes[lno]), faiss.swig_ptr(ids[f:]), faiss.swig_ptr(codes[f]))
    empty_ivf.ntotal = int(sizes.sum())


class _MergedLists:
    """A merged in-memory IVF, shared by the generations that merge the same segments."""

    def __init__(self, ivf: Any, layouts: list[Layout], counts: list[int]):
        self.ivf = ivf
        self.layouts = layouts  # keeps the cache key's objects alive as long as this
        self.key = tuple(id(lay) for lay in layouts) + tuple(counts)
        self.n = len(layouts)


_merged_cache: weakref.WeakValueDictionary[tuple[int, ...], _MergedLists] = weakref.WeakValueDictionary()


def _predecessor(layouts: list[Layout], counts: list[int]) -> _MergedLists | None:
    """The longest cached merge of a prefix of these segments (an append adds segments at the end)."""
    best = None
    for lists in list(_merged_cache.values()):
        n = lists.n
        if n < len(layouts) and (best is None or n > best.n):
            if lists.key == tuple(id(lay) for lay in layouts[:n]) + tuple(counts[:n]):
                best = lists
    return best


def merge_onto(
    empty_ivf: Any, prev_ivf: Any, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], starts: list[int]
) -> None:
    """`merge_lists` of (the entries of `prev_ivf`, a merged IVF) + `parts`: the previous lists' full blocks
    are copied as they are, only each list's last partial block and the new entries are (re)packed; the
    time follows the new rows, not the rows merged before."""
    dst = faiss.downcast_InvertedLists(empty_ivf.invlists)
    prev = faiss.downcast_InvertedLists(prev_ivf.invlists)
    lists = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] + st for p, st in zip(parts, starts, strict=True)])
    codes = np.concatenate([p[2] for p in parts])
    order = np.argsort(lists, kind="stable")
    lists, ids, codes = lists[order], ids[order], codes[order]
    nlist = int(dst.nlist)
    old = np.asarray([prev.list_size(lno) for lno in range(nlist)], np.int64)
    if not isinstance(dst, faiss.BlockInvertedLists):
        add = np.bincount(lists, minlength=nlist)
        first = np.cumsum(add) - add
        ids, codes = np.ascontiguousarray(ids), np.ascontiguousarray(codes)
        for lno in range(nlist):
            if old[lno]:
                dst.add_entries(lno, int(old[lno]), prev.get_ids(lno), prev.get_codes(lno))
            if add[lno]:
                f = int(first[lno])
                dst.add_entries(lno, int(add[lno]), faiss.swig_ptr(ids[f:]), faiss.swig_ptr(codes[f]))
        empty_ivf.ntotal = int(old.sum() + add.sum())
        return
    nib = nibble_map(dst.packer)
    nvec, bs = nib.nvec, nib.bs
    full, tail = old // nvec, old % nvec
    views, id_views, tails, tail_ids, tail_lists = {}, {}, [], [], []
    for lno in np.flatnonzero(old).tolist():
        n = int(old[lno])
        views[lno] = faiss.rev_swig_ptr(prev.get_codes(lno), -(-n // nvec) * bs)
        id_views[lno] = faiss.rev_swig_ptr(prev.get_ids(lno), n)
        if tail[lno]:
            f = int(full[lno])
            tails.append(views[lno][f * bs : (f + 1) * bs])
            tail_ids.append(id_views[lno][f * nvec :])
            tail_lists.append(np.full(int(tail[lno]), lno, np.int32))
    if tails:  # the partial last blocks, unpacked: their entries are packed again with the new ones
        flat = nib.unpack(np.stack(tails))
        keep = np.concatenate([np.arange(len(t)) + b * nvec for b, t in enumerate(tail_ids)])
        lists = np.concatenate([np.concatenate(tail_lists), lists])
        ids = np.concatenate([np.concatenate(tail_ids).astype(np.int64), ids])
        codes = np.concatenate([flat[keep], codes])
        order = np.argsort(lists, kind="stable")
        lists, ids, codes = lists[order], ids[order], codes[order]
    fresh = np.bincount(lists, minlength=nlist).astype(np.int64)
    first = np.cumsum(fresh) - fresh
    nbs = -(-fresh // nvec)
    bstart = np.cumsum(nbs) - nbs
    rank = np.arange(len(lists)) - first[lists]
    flat = np.zeros((int(nbs.sum()) * nvec, codes.shape[1]), np.uint8)
    flat[bstart[lists] * nvec + rank] = codes
    packed = nib.pack(flat)
    total = 0
    for lno in range(nlist):
        f, nf, nfull = int(first[lno]), int(fresh[lno]), int(full[lno])
        n = nfull * nvec + nf
        if n == 0:
            continue
        b = int(bstart[lno])
        new_blocks = packed[b : b + int(nbs[lno])].ravel()
        if nfull:
            buf = np.concatenate([views[lno][: nfull * bs], new_blocks])
            lid = np.concatenate([id_views[lno][: nfull * nvec].astype(np.int64), ids[f : f + nf]])
        else:
            buf, lid = np.ascontiguousarray(new_blocks), np.ascontiguousarray(ids[f : f + nf])
        dst.add_entries(lno, n, faiss.swig_ptr(lid), faiss.swig_ptr(buf))
        total += n
    empty_ivf.ntotal = total


class SharedFanout:
    """One modality of one generation: the segments (by position) that share the base's quantizer."""

    def __init__(self, modality: str, members: list[tuple[int, int, int, int, Any]], layouts: list[Layout]):
        # members: (position in the view, id offset, rows, live rows, tombstone FilterBitmap or None)
        self.modality = modality
        self.members = members
        self.positions = frozenset(m[0] for m in members)
        self.layouts = layouts
        first = layouts[0]
        self.ivf0 = first.ivf
        self.quantizer = first.ivf.quantizer
        self.nlist = int(first.ivf.nlist)
        self.hnsw_quantizer = isinstance(faiss.downcast_index(first.ivf.quantizer), faiss.IndexHNSW)
        self.refine = first.refine is not None
        self.codes = [_codes(lay.refine) for lay in layouts] if self.refine else []
        self.offsets = np.asarray([m[1] for m in members], np.int64)
        self.live = sum(m[3] for m in members)
        self._template = first.refine
        self._tls = threading.local()
        self.rankers: list[Ranker] = []
        self.merge_s = 0.0
        self.rerank_margin = RERANK_MARGIN
        self.shared_margin = SHARED_MARGIN

    @classmethod
    def build(cls, modality: str, segments: list[Any], merge: bool = True) -> SharedFanout | None:
        """The segments that share the first segment's layout key, or None when fewer than two do."""
        lays = []
        for seg in segments:
            mi = seg.searcher.indices.get(modality)
            lays.append(None if mi is None else layout(mi))
        if lays[0] is None:
            return None
        key = lays[0].key
        members, layouts = [], []
        for j, (seg, lay) in enumerate(zip(segments, lays, strict=True)):
            if lay is not None and lay.key == key:
                members.append((j, seg.offset, seg.entry.count, seg.live, seg.alive))
                layouts.append(lay)
        if len(members) < 2:
            return None
        fan = cls(modality, members, layouts)
        fan._plan_rankers(merge)
        return fan

    def _plan_rankers(self, merge: bool) -> None:
        """The largest member (the base) and members too large to hold in memory keep their own IVF; the
        others' lists are merged into one in-memory IVF (MERGE_MAX_BYTES), so that a query scans each
        probed list once for all of them instead of once per segment."""
        sizes = [
            m[2] * (int(lay.ivf.code_size) + 8) for m, lay in zip(self.members, self.layouts, strict=True)
        ]
        largest = int(np.argmax([m[2] for m in self.members]))
        small, total = [], 0
        for i, nbytes in enumerate(sizes):
            if merge and i != largest and nbytes <= MERGE_MAX_BYTES and total + nbytes <= MERGE_MAX_BYTES:
                small.append(i)
                total += nbytes
        merged = None
        if len(small) >= 2:
            merged = self._merge(small)
        for i, (_, _, count, live, alive) in enumerate(self.members):
            if merged is not None and i in small:
                continue
            self.rankers.append(Ranker(self.layouts[i].ivf, [i], [count], live, alive))
        if merged is not None:
            self.rankers.append(merged)

    def _merge(self, small: list[int]) -> Ranker | None:
        t = time.perf_counter()
        counts = [self.members[i][2] for i in small]
        starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
        key = tuple(id(self.layouts[i]) for i in small) + tuple(counts)
        lists = _merged_cache.get(key)  # a reload that only changed tombstones keeps the merged lists
        if lists is None:
            layouts = [self.layouts[i] for i in small]
            smallest = min(small, key=lambda i: self.members[i][2])
            try:
                ivf = faiss.clone_index(self.layouts[smallest].ivf)
            except RuntimeError as e:  # inverted lists faiss cannot clone (on disk): each searched alone
                logger.info("%s: segments searched one by one, lists not mergeable (%s)", self.modality, e)
                return None
            ivf.reset()
            prev = _predecessor(layouts, counts)
            if prev is not None:  # an append: the lists merged for the previous generation + the new ones
                new = [_unpacked_lists(lay.ivf) for lay in layouts[prev.n :]]
                merge_onto(ivf, prev.ivf, new, starts[prev.n :].tolist())
            else:
                merge_lists(ivf, [_unpacked_lists(lay.ivf) for lay in layouts], starts.tolist())
            lists = _MergedLists(ivf, layouts, counts)
            _merged_cache[key] = lists
        alive = None
        if any(self.members[i][4] is not None for i in small):
            bits = []
            for i in small:
                a = self.members[i][4]
                n = self.members[i][2]
                bits.append(
                    np.ones(n, bool) if a is None else np.unpackbits(a.packed, count=n, bitorder="little")
                )
            mask = np.concatenate(bits).astype(bool)
            alive = FilterBitmap(
                "\x00live:merged", len(mask), int(mask.sum()), np.packbits(mask, bitorder="little")
            )
        live = sum(self.members[i][3] for i in small)
        self.merge_s = time.perf_counter() - t
        logger.info(
            "%s: inverted lists of %d segments (%d rows) merged in memory in %.2f s",
            self.modality, len(small), sum(counts), self.merge_s,
        )  # fmt: skip
        return Ranker(lists.ivf, small, counts, live, alive, keep=lists)

    # ------------------------------------------------------------------ search
    def search(
        self, q: np.ndarray, k: int, p: SearchParams, defaults: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, global ids) [nq, k] over the member segments; -inf / -1 where fewer than k."""
        merged = p.merged(defaults)
        nprobe = int(merged.nprobe if merged.nprobe is not None else self.ivf0.nprobe)
        nprobe = max(1, min(nprobe, self.nlist))
        nq = q.shape[0]
        if self.hnsw_quantizer:
            qp = faiss.SearchParametersHNSW(efSearch=quantizer_ef_search(nprobe))
            dq, iq = self.quantizer.search(q, nprobe, params=qp)
        else:
            dq, iq = self.quantizer.search(q, nprobe)
        want = self._rerank_budget(k, merged.k_factor) if self.refine else k
        xp, iqp, dqp = faiss.swig_ptr(q), faiss.swig_ptr(iq), faiss.swig_ptr(dq)
        dists, ids, owner = [], [], []
        for r, rk in enumerate(self.rankers):
            if rk.live == 0:
                continue
            kk = (
                want
                if not self.refine
                else math.ceil(self.shared_margin * want * rk.live / max(1, self.live)) + k
            )
            kk = max(1, min(kk, want, rk.live))
            dm = np.empty((nq, kk), np.float32)
            im = np.empty((nq, kk), np.int64)
            rk.ivf.search_preassigned_c(
                nq, xp, kk, iqp, dqp, faiss.swig_ptr(dm), faiss.swig_ptr(im), False, rk.params(nprobe)
            )
            dists.append(dm)
            ids.append(im)
            owner.append(np.full(kk, r, np.int32))
        out_d = np.full((nq, k), -np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if not dists:
            return out_d, out_i
        all_d = np.concatenate(dists, axis=1)
        all_i = np.concatenate(ids, axis=1)
        owners = np.concatenate(owner)
        all_d[all_i < 0] = -np.inf
        for row in range(nq):
            d, i = all_d[row], all_i[row]
            n_ok = int(np.count_nonzero(i >= 0))
            if n_ok == 0:
                continue
            take = min(want, n_ok)
            top = np.argpartition(-d, take - 1)[:take] if take < len(d) else np.arange(len(d))
            top = top[i[top] >= 0]
            member, local = self._owners(i[top], owners[top])
            if not self.refine:
                order = np.argsort(-d[top], kind="stable")[:k]
                out_d[row, : len(order)] = d[top][order]
                out_i[row, : len(order)] = local[order] + self.offsets[member[order]]
                continue
            rd, rg = self._rerank(q[row : row + 1], k, local, member)
            out_d[row, : len(rd)] = rd
            out_i[row, : len(rg)] = rg
        return out_d, out_i

    def _rerank_budget(self, k: int, k_factor: float | None) -> int:
        """Candidates re-ranked: as many as the per-segment path re-ranks in all (each segment its share of
        k * k_factor times RERANK_MARGIN, at least k), so recall does not drop below it; the shared pass
        picks them by ranker distance over all segments instead of per segment."""
        kf = float(k_factor) if k_factor is not None else 1.0
        if kf <= 1:
            return k
        total = 0
        for m in self.members:
            if m[3] > 0:
                total += k * max(
                    1, min(int(kf), math.ceil(self.rerank_margin * kf * m[3] / max(1, self.live)))
                )
        return max(k, total)

    def _owners(self, ids: np.ndarray, rankers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        member = np.empty(len(ids), np.int64)
        local = np.empty(len(ids), np.int64)
        for r in np.unique(rankers):
            sel = rankers == r
            member[sel], local[sel] = self.rankers[int(r)].owners(ids[sel])
        return member, local

    def _rerank(
        self, x: np.ndarray, k: int, local: np.ndarray, member: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of the candidates (local ids in their member segments) by their re-rank codes: gathered
        (in id order, for locality in the mapped files) straight into a per-thread scratch index of the same
        encoder, which faiss scans with its own SIMD code."""
        key = np.sort((member << 40) | local)  # by segment, then id (local ids < 2**40)
        member, local = key >> 40, key & ((1 << 40) - 1)
        n = len(local)
        scratch = getattr(self._tls, "index", None)
        if scratch is None:
            scratch = self._tls.index = _scratch(self._template)
        cs = int(scratch.code_size)
        scratch.codes.resize(n * cs)
        scratch.ntotal = n
        buf = faiss.rev_swig_ptr(scratch.codes.data(), n * cs).reshape(n, cs)
        cuts = np.flatnonzero(np.diff(member)) + 1
        for s, e in zip(np.r_[0, cuts].tolist(), np.r_[cuts, n].tolist(), strict=True):
            np.take(self.codes[int(member[s])], local[s:e], axis=0, out=buf[s:e], mode="clip")
        kk = min(k, n)
        d, pos = scratch.search(x, kk)
        pos = pos[0]
        ok = pos >= 0
        pos = pos[ok]
        return d[0][ok], local[pos] + self.offsets[member[pos]]
