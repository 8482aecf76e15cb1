"""Searching a segmented index folder, and hot reload.

`SegmentedSearcher` is one generation of an index folder (the segments its manifest names, with their
tombstones) behind the `IndexSearcher` interface the app and `query` use: it holds one `IndexSearcher`
per segment, searches each with the request's parameters and with one faiss `IDSelectorBitmap` per
segment that carries the live rows AND the filter, and merges the top-k by similarity. Ids are global
(segment offset + row in the segment), so metadata lookups by id work across segments.

`LiveIndex` is what the server holds: it checks the manifest (one `stat`, at most every
`check_interval` seconds, on requests and from a background thread) and swaps in a new generation
atomically; a request runs on the generation it started with. Segments are immutable once visible, so
a reload opens only the new ones and reuses the others (and their filter caches).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from clipsearch.errors import InputError
from clipsearch.search.fanout import SharedFanout
from clipsearch.search.filters import FilterBitmap, FilterError
from clipsearch.search.searcher import IndexSearcher, SearchParams, SearchResult, require_keywords
from clipsearch.segments import layout

logger = logging.getLogger(__name__)

DENSE_DELETES = 0.5  # a segment with more rows deleted than this goes through the filter planner
FILTER_CACHE = 64
SHARE_MARGIN = 1.25  # re-rank candidates per segment: its share of k * k_factor, times this


class Segment:
    """One opened segment: its manifest entry, its IndexSearcher and its live-rows bitmap."""

    def __init__(self, entry: layout.SegmentEntry, searcher: IndexSearcher, dead: np.ndarray):
        self.entry = entry
        self.searcher = searcher
        self.dead = dead  # sorted local ids deleted
        self.live = entry.count - len(dead)
        self.alive: FilterBitmap | None = None
        if len(dead):
            packed = layout.packed_alive(entry.count, dead)
            self.alive = FilterBitmap(f"\x00live:{entry.uid}:{len(dead)}", entry.count, self.live, packed)

    @property
    def offset(self) -> int:
        return self.entry.offset


class SegmentedBitmap:
    """A filter over every segment: one FilterBitmap per segment (filter AND live rows)."""

    def __init__(self, expression: str, parts: list[FilterBitmap | None], n: int):
        self.expression = expression
        self.parts = parts  # None = the segment allows nothing
        self.n = n
        self.count = sum(p.count for p in parts if p is not None)

    @property
    def selectivity(self) -> float:
        return self.count / max(1, self.n)


class SegmentedFilters:
    """The `FilterCache` interface over segments; each segment's own cache does the column scans."""

    def __init__(self, view: SegmentedSearcher, size: int = FILTER_CACHE):
        self.view = view
        self.size = size
        self._cache: OrderedDict[str, SegmentedBitmap] = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, expression: str) -> Any:
        from clipsearch.search.filters import parse_canonical

        return parse_canonical(expression)

    def cached(self, expression: str) -> bool:
        try:
            key = self._key(expression)
        except FilterError:
            return True
        with self._lock:
            return key in self._cache

    def get(self, expression: str) -> SegmentedBitmap:
        key = self._key(expression)
        with self._lock:
            bm = self._cache.get(key)
            if bm is not None:
                self._cache.move_to_end(key)
                return bm
        from clipsearch.search.filters import check_filter

        check_filter(key, self.view.metadata.schema)  # unknown column: one error
        budgets = [s.searcher.filters.budget_s for s in self.view.segments]
        # one time budget for the whole request, however many segments it scans
        deadline = time.monotonic() + budgets[0] if budgets and budgets[0] is not None else None
        parts: list[FilterBitmap | None] = []
        for seg in self.view.segments:
            try:
                fb = seg.searcher.filter_bitmap(expression, deadline=deadline)
            except FilterError:
                if any(c not in seg.searcher.metadata.columns for c in _columns(expression)):
                    parts.append(None)  # a column this segment's metadata does not have: no match
                    continue
                raise
            if seg.alive is not None:
                packed = np.bitwise_and(fb.packed, seg.alive.packed)
                count = int(np.unpackbits(packed, count=fb.n, bitorder="little").sum())
                fb = FilterBitmap(f"{fb.expression}{seg.alive.expression}", fb.n, count, packed)
            parts.append(fb)
        bm = SegmentedBitmap(expression, parts, self.view.count)
        with self._lock:
            self._cache[key] = bm
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return bm


def _columns(expression: str) -> set[str]:
    from clipsearch.search.filters import _columns_of, parse_canonical

    return _columns_of(parse_canonical(expression))


class SegmentedMetadata:
    """The `MetadataTable` interface over the segments' metadata.arrow files (global row ids)."""

    def __init__(self, view: SegmentedSearcher):
        self.view = view
        tables = [s.searcher.metadata for s in view.segments]
        self.schema: pa.Schema = (
            pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
            if tables
            else pa.schema([])
        )
        self.columns: list[str] = list(self.schema.names)
        self.num_rows = view.count
        self.path = view.local_path

    def __len__(self) -> int:
        return self.num_rows

    def has_column(self, name: str) -> bool:
        return name in self.schema.names

    def column_type(self, name: str) -> pa.DataType:
        return self.schema.field(name).type

    def batches(self) -> Iterator[tuple[int, pa.RecordBatch]]:
        for seg in self.view.segments:
            for start, b in seg.searcher.metadata.batches():
                yield seg.offset + start, b

    def rows(
        self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        ids = np.asarray(ids, dtype=np.int64)
        cols = list(self.columns if columns is None else columns)
        out: list[dict[str, Any] | None] = [None] * len(ids)
        for _, seg, local, pos in self.view._split(ids):
            have = [c for c in cols if seg.searcher.metadata.has_column(c)]
            rows = seg.searcher.metadata.rows(local, have)
            for p, row in zip(pos, rows, strict=True):
                out[int(p)] = {c: row.get(c) for c in cols}
        return out  # type: ignore[return-value]

    def valid_ids(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        ok, bad = [], []
        for i in ids:
            i = int(i)
            (ok if 0 <= i < self.num_rows and not self.view.is_deleted(i) else bad).append(i)
        return ok, bad

    def close(self) -> None:  # the segments' tables are closed with their searchers
        pass


class SegmentedModality:
    """The `ModalityIndex` facts the app reads (kind, counts, defaults) over every segment."""

    def __init__(self, modality: str, parts: list[Any], live: int):
        self.modality = modality
        self.parts = parts
        first = parts[0]
        self.ntotal = live
        self.factory = first.factory
        self.defaults = first.defaults
        self.mmap = any(p.mmap for p in parts)
        self.vectors = first.vectors if len(parts) == 1 else None
        self.is_flat = all(p.is_flat for p in parts)
        self.is_ivf = all(p.is_ivf for p in parts)
        self.is_hnsw = all(p.is_hnsw for p in parts)
        self.inner = first.inner
        self.path = first.path

    @property
    def exact_distances(self) -> bool:
        return all(p.exact_distances for p in self.parts)

    @property
    def exact_vectors(self) -> bool:
        return all(p.exact_vectors for p in self.parts)


class SegmentedSearcher:
    """One generation of a segmented index folder, searchable like an `IndexSearcher`."""

    def __init__(
        self,
        path: str,
        manifest: layout.Manifest,
        segments: list[Segment],
        *,
        name: str | None = None,
        exact_max: int = 50_000,
    ):
        if not segments:
            raise InputError(f"{path}: the segment manifest lists no segment")
        self.uri = path
        self.local_path = path
        self.name = name or os.path.basename(path.rstrip("/")) or "index"
        self.manifest = manifest
        self.generation = manifest.generation
        self.segments = segments
        self.exact_max = exact_max
        first = segments[0].searcher
        self.info = first.info
        self.dim = first.dim
        self.model = first.model
        self.metric = first.metric
        self.count = manifest.count  # the id space; `live` rows are not deleted
        self.live = sum(s.live for s in segments)
        self.deleted = manifest.deleted
        self._starts = np.asarray([s.offset for s in segments], dtype=np.int64)
        for s in segments[1:]:
            if s.searcher.dim != self.dim:
                raise InputError(
                    f"segment {s.entry.name} has dimension {s.searcher.dim}, the base {self.dim}"
                )
        self.indices: dict[str, SegmentedModality] = {}
        for m in first.indices:
            parts = [s.searcher.indices.get(m) for s in segments]
            if all(p is not None for p in parts):
                self.indices[m] = SegmentedModality(m, parts, self.live)
        self.metadata = SegmentedMetadata(self)
        self.filters = SegmentedFilters(self)
        # keyword search needs every segment's keyword index (appends and compactions build theirs)
        self.keywords = self if all(s.searcher.keywords is not None for s in segments) else None
        # segments sharing the base's trained IVF quantizer: one coarse pass and one re-rank (fanout.py)
        self.fanout: dict[str, SharedFanout] = {}
        if len(segments) > 1:
            for m in self.indices:
                fan = SharedFanout.build(m, segments)
                if fan is not None:
                    self.fanout[m] = fan

    # ------------------------------------------------------------------ description
    @property
    def modalities(self) -> list[str]:
        return list(self.indices)

    def modality(self, modality: str) -> SegmentedModality:
        try:
            return self.indices[modality]
        except KeyError:
            raise InputError(
                f"index {self.name!r} has no {modality} index", hint="modality: " + " or ".join(self.indices)
            ) from None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.uri,
            "model": self.model,
            "dim": self.dim,
            "count": self.live,
            "modalities": {
                m: {
                    "factory": mi.factory,
                    "count": mi.ntotal,
                    "mmap": mi.mmap,
                    "search_params": mi.defaults,
                    "vectors_file": all(p.vectors is not None for p in mi.parts),
                }
                for m, mi in self.indices.items()
            },
            "columns": {f.name: str(f.type) for f in self.metadata.schema},
            "keywords": self.keywords is not None,
            "segments": [{**s.entry.to_json(), "deleted": int(len(s.dead))} for s in self.segments],
            "generation": self.generation,
            "deleted": self.deleted,
        }

    def is_deleted(self, gid: int) -> bool:
        j = int(np.searchsorted(self._starts, gid, side="right")) - 1
        seg = self.segments[j]
        dead = seg.dead
        local = gid - seg.offset
        k = int(np.searchsorted(dead, local))
        return k < len(dead) and int(dead[k]) == local

    def _split(self, ids: np.ndarray) -> Iterator[tuple[int, Segment, np.ndarray, np.ndarray]]:
        """(segment index, segment, local ids, positions in `ids`) for each segment `ids` touch."""
        seg_of = np.searchsorted(self._starts, ids, side="right") - 1
        for j in np.unique(seg_of):
            pos = np.flatnonzero(seg_of == j)
            seg = self.segments[int(j)]
            yield int(j), seg, ids[pos] - seg.offset, pos

    # ------------------------------------------------------------------ search
    def filter_bitmap(self, expression: str) -> SegmentedBitmap:
        return self.filters.get(expression)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        modality: str = "image",
        filter: str | SegmentedBitmap | None = None,
        params: SearchParams | None = None,
    ) -> SearchResult:
        """Top-k over every segment, deleted rows and rows the filter rejects skipped inside the search."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise InputError(f"query vectors have dimension {q.shape[1]}, index {self.name!r} has {self.dim}")
        self.modality(modality)
        p = params or SearchParams()
        k = int(k)
        timings: dict[str, float] = {}
        bm: SegmentedBitmap | None = None
        if filter is not None and filter != "":
            t = time.perf_counter()
            bm = filter if isinstance(filter, SegmentedBitmap) else self.filter_bitmap(filter)
            timings["filter"] = time.perf_counter() - t
        t = time.perf_counter()
        dists, ids, plans = [], [], []
        fan = self.fanout.get(modality) if bm is None else None
        if fan is not None:
            base = self.segments[0].searcher.indices[modality]
            base.use_search_threads()
            d, i = fan.search(q, k, p, base.defaults)
            dists.append(d)
            ids.append(i)
            plans.append("ann+tombstones" if any(mb[4] is not None for mb in fan.members) else "ann")
        for j, seg in enumerate(self.segments):
            if seg.live == 0 or (fan is not None and j in fan.positions):
                continue
            allow = bm.parts[j] if bm is not None else seg.alive
            if bm is not None and (allow is None or allow.count == 0):
                continue
            sp = self._segment_params(seg, modality, p)
            d, i, plan = self._search_segment(seg, q, k, modality, sp, allow, bm is not None)
            ok = i >= 0
            dists.append(np.where(ok, d, -np.inf).astype(np.float32))
            ids.append(np.where(ok, i + seg.offset, -1))
            plans.append(plan)
        timings["search"] = time.perf_counter() - t
        nq = q.shape[0]
        if not dists:
            plan = "empty-filter" if bm is not None else "empty"
            return SearchResult(
                np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64), plan,
                None if bm is None else 0, timings,
            )  # fmt: skip
        d_all, i_all = _merge_topk(dists, ids, k)
        if fan is not None and k <= self.live:
            short = np.flatnonzero((i_all < 0).any(axis=1))
            if len(short):  # rows the shared pass left short (deletes): each segment on its own
                r = self._search_each(q[short], k, modality, p)
                d_all[short], i_all[short] = r
                plans.append("per-segment-fallback")
        plan = "+".join(dict.fromkeys(plans))
        return SearchResult(d_all, i_all, plan, None if bm is None else bm.count, timings)

    def _search_each(
        self, q: np.ndarray, k: int, modality: str, p: SearchParams
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unfiltered top-k searching every segment on its own (the path before the shared fan-out)."""
        dists, ids = [], []
        for seg in self.segments:
            if seg.live == 0:
                continue
            sp = self._segment_params(seg, modality, p)
            d, i, _ = self._search_segment(seg, q, k, modality, sp, seg.alive, False)
            ok = i >= 0
            dists.append(np.where(ok, d, -np.inf).astype(np.float32))
            ids.append(np.where(ok, i + seg.offset, -1))
        return _merge_topk(dists, ids, k)

    def _segment_params(self, seg: Segment, modality: str, p: SearchParams) -> SearchParams:
        """The request's parameters for one segment. nprobe / efSearch stay as they are (the segments share
        the quantizer, so the same lists are probed as in one merged index). The re-rank depth k_factor is
        tuned for the whole index: k * k_factor candidates, which spread over the segments in proportion
        to their sizes, so a segment re-ranks its share plus a margin for the spread (SHARE_MARGIN: a 20k
        segment of 400k at k_factor 512 expects 256 of the 5120 candidates, +-16), never more."""
        mi = seg.searcher.indices.get(modality)
        if mi is None or len(self.segments) == 1:
            return p
        merged = p.merged(mi.defaults)
        kf = merged.k_factor
        if kf is None or kf <= 1 or self.live <= 0:
            return p
        share = max(1.0, math.ceil(SHARE_MARGIN * kf * seg.live / self.live))
        return SearchParams(nprobe=merged.nprobe, efSearch=merged.efSearch, k_factor=min(kf, share))

    def _search_segment(
        self,
        seg: Segment,
        q: np.ndarray,
        k: int,
        modality: str,
        p: SearchParams,
        allow: FilterBitmap | None,
        filtered: bool,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        s = seg.searcher
        if allow is None:
            r = s.search(q, k, modality=modality, params=p)
            return r.distances, r.ids, r.plan
        mi = s.modality(modality)
        if filtered or seg.live < (1 - DENSE_DELETES) * seg.entry.count or not mi.supports_selector:
            # the segment's own planner: exact over a small allowed subset, else ANN with the selector
            r = s.search(q, k, modality=modality, filter=allow, params=p)
            return r.distances, r.ids, r.plan
        # sparse deletes: the ANN search skips them through the selector; a short row is redone exactly
        d, i = mi.search(q, k, p, allow.selector())
        plan = "ann+tombstones" if not mi.is_flat else "exact+tombstones"
        short = np.flatnonzero((i < 0).any(axis=1)) if k <= seg.live else np.zeros(0, np.int64)
        if len(short):
            r = s.search(q[short], k, modality=modality, filter=allow, params=p)
            d[short], i[short] = r.distances, r.ids
        return d, i, plan

    # ------------------------------------------------------------------ keywords
    def keyword_search(
        self, q: Any, k: int, *, filter: str | SegmentedBitmap | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(global ids, BM25 scores) of the k best caption matches over every segment: each segment's index
        is searched with its live rows (and the filter) as the allowed set, and the hits merged by score
        (BM25 with each segment's own term statistics, as a sharded search engine does)."""
        require_keywords(self)
        bm: SegmentedBitmap | None = None
        if filter is not None and filter != "":
            bm = filter if isinstance(filter, SegmentedBitmap) else self.filter_bitmap(filter)
        ids, scores = [], []
        for j, seg in enumerate(self.segments):
            if seg.live == 0:
                continue
            allow = bm.parts[j] if bm is not None else seg.alive
            if bm is not None and (allow is None or allow.count == 0):
                continue
            i, sc = seg.searcher.keywords.search(q, int(k), allow)
            ids.append(i + seg.offset)
            scores.append(sc)
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        i_all, s_all = np.concatenate(ids), np.concatenate(scores)
        order = np.argsort(-s_all, kind="stable")[: int(k)]
        return i_all[order], s_all[order]

    def keyword_stats(self, units: Sequence[Any]) -> tuple[int, list[int]]:
        require_keywords(self)
        n, dfs = 0, [0] * len(units)
        for seg in self.segments:
            kw = seg.searcher.keywords
            n += kw.num_docs
            for i, u in enumerate(units):
                dfs[i] += kw.doc_freq(u)
        return n, dfs

    # ------------------------------------------------------------------ vectors and rows
    def vectors(self, ids: Sequence[int] | np.ndarray, modality: str = "image") -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        for _, seg, local, pos in self._split(ids):
            out[pos] = seg.searcher.vectors(local, modality)
        return out

    def rows(
        self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        return self.metadata.rows(ids, columns)

    def close(self) -> None:
        for s in self.segments:
            s.searcher.close()


def _merge_topk(dists: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    if len(dists) == 1:
        d, i = dists[0], ids[0]
    else:
        d = np.concatenate(dists, axis=1)
        i = np.concatenate(ids, axis=1)
    nq = d.shape[0]
    out_d = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    kk = min(k, d.shape[1])
    order = np.argsort(-d, axis=1, kind="stable")[:, :kk]
    out_d[:, :kk] = np.take_along_axis(d, order, axis=1)
    out_i[:, :kk] = np.take_along_axis(i, order, axis=1)
    out_i[~np.isfinite(out_d)] = -1
    return out_d, out_i


# ------------------------------------------------------------------------------------ opening
class _Opener:
    """Opens segments, reusing the IndexSearcher of a segment already open (segments never change)."""

    def __init__(self, path: str, kwargs: dict[str, Any]):
        self.path = path
        self.kwargs = kwargs
        self.cache: dict[tuple[str, str], IndexSearcher] = {}

    def open(self, name: str) -> tuple[IndexSearcher | SegmentedSearcher, Any]:
        folder = self.path
        if not os.path.exists(os.path.join(folder, layout.MANIFEST)):  # a plain index folder
            key = (layout.BASE_PATH, "base")
            s = self.cache.get(key) or IndexSearcher(folder, name=name, **self.kwargs)
            self.cache = {key: s}
            return s, None
        manifest = layout.read_manifest(folder)
        deleted = layout.read_tombstones(folder, manifest)
        segs: list[Segment] = []
        cache: dict[tuple[str, str], IndexSearcher] = {}
        for e in manifest.segments:
            key = (e.path, e.uid)
            s = self.cache.get(key)
            if s is None:
                s = IndexSearcher(layout.segment_folder(folder, e), name=f"{name}/{e.name}", **self.kwargs)
                if s.count != e.count:
                    raise InputError(f"segment {e.path} holds {s.count} rows, the manifest says {e.count}")
            cache[key] = s
            segs.append(Segment(e, s, layout.segment_deleted(deleted, e)))
        self.cache = cache
        exact_max = int(self.kwargs.get("exact_max", 50_000))
        return SegmentedSearcher(folder, manifest, segs, name=name, exact_max=exact_max), manifest


def _watch(ref: weakref.ref[LiveIndex], stop: threading.Event, interval: float) -> None:
    """Background reload checks, so an idle server has the new generation loaded before the next
    request. Holds the LiveIndex weakly: an app dropped without closing lets it go."""
    while not stop.wait(interval):
        live = ref()
        if live is None:
            return
        try:
            live.maybe_reload()
        except Exception:  # pragma: no cover - never let the watcher die
            logger.exception("%s: reload check failed", live.name)
        del live


def open_index(path: str, *, name: str | None = None, **kwargs: Any) -> IndexSearcher | SegmentedSearcher:
    """Open an index folder for one-off use (batch `query`): a plain folder gives an `IndexSearcher`,
    a segmented one (segments.json) a `SegmentedSearcher` over its visible segments."""
    local = path.split("://", 1)[1] if path.startswith("file://") else path
    if not os.path.exists(os.path.join(local, layout.MANIFEST)):
        return IndexSearcher(path, name=name, **kwargs)
    nm = name or os.path.basename(local.rstrip("/")) or "index"
    view, _ = _Opener(local, kwargs).open(nm)
    return view


class LiveIndex:
    """The served handle of an index folder: the current generation, hot-reloaded when the manifest
    changes. `current()` gives the generation a request should use from start to end; every other
    attribute is the current generation's."""

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        check_interval: float = 0.5,
        watch: bool = True,
        **kwargs: Any,
    ):
        local = path.split("://", 1)[1] if path.startswith("file://") else path
        self.uri = path
        self.name = name or os.path.basename(local.rstrip("/")) or "index"
        self.local = os.path.isdir(local) and not ("://" in path and not path.startswith("file://"))
        self.folder = local
        self.check_interval = check_interval
        self._opener = _Opener(local, kwargs)
        self._lock = threading.Lock()
        self._sig = layout.manifest_signature(local) if self.local else None
        if self.local:
            self._view, self._manifest = self._opener.open(self.name)
        else:  # a remote folder is copied once (no hot reload)
            self._view, self._manifest = IndexSearcher(path, name=self.name, **kwargs), None
        self._checked = time.monotonic()
        self.reloads = 0
        self.reload_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if watch and self.local and check_interval > 0:
            self._thread = threading.Thread(
                target=_watch, args=(weakref.ref(self), self._stop, check_interval),
                name=f"clipsearch-reload-{self.name}", daemon=True,
            )  # fmt: skip
            self._thread.start()

    def current(self) -> IndexSearcher | SegmentedSearcher:
        if self.local and time.monotonic() - self._checked >= self.check_interval:
            self.maybe_reload()
        return self._view

    @property
    def generation(self) -> int:
        return self._manifest.generation if self._manifest is not None else 0

    def __del__(self) -> None:
        stop = self.__dict__.get("_stop")
        if stop is not None:
            stop.set()

    def maybe_reload(self) -> bool:
        """Swap in the manifest's generation if it changed. Never blocks a request on another reload."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._checked = time.monotonic()
            sig = layout.manifest_signature(self.folder)
            if sig == self._sig:
                return False
            try:
                view, manifest = self._opener.open(self.name)
            except Exception as e:  # a half-cleaned or racing folder: keep serving the old generation
                self.reload_errors += 1
                logger.warning(
                    "%s: reload failed, still serving generation %d: %s", self.name, self.generation, e
                )
                return False
            self._view, self._manifest, self._sig = view, manifest, sig
            self.reloads += 1
            logger.info(
                "%s: now serving generation %d (%d segments, %d rows, %d deleted)",
                self.name, manifest.generation, len(manifest.segments), manifest.count, manifest.deleted,
            )  # fmt: skip
            return True
        finally:
            self._lock.release()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.current(), name)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        for s in self._opener.cache.values():
            s.close()
