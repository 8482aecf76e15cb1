"""`IndexSearcher`: open an `index/` folder, search vectors (with per-call parameters and id filters), and
fetch metadata rows by id. Used by the HTTP app and by batch `query`.

Concurrency rule: nothing here mutates a faiss index to search it. nprobe / efSearch / k_factor and the
id selector travel in a faiss `SearchParameters*` object built for each call, so concurrent requests never
share mutable search state.

Filtered search planner (`plan_filtered`): a filter becomes an id bitmap (see filters.py). When the
bitmap allows few ids (<= `exact_max`), the query is answered by exact search over exactly those vectors,
which is both faster and exact. Otherwise the ANN search runs with a faiss `IDSelectorBitmap` and a
widened nprobe / efSearch; a query that still gets fewer than k hits is redone exactly over the subset.
Filtering never happens after the search.

Extension points for segments (append / tombstones) and hot reload: `IndexSearcher.search` and
`IndexSearcher.rows` are the only entry points the app and `query` use, and `ModalityIndex` holds one faiss
index; a segmented searcher can hold several and merge their top-k.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from clipsearch import storage
from clipsearch.errors import ConfigError, InputError
from clipsearch.index.build import quantizer_ef_search
from clipsearch.search.filters import FilterBitmap, FilterCache
from clipsearch.search.metadata import MetadataTable

logger = logging.getLogger(__name__)

MODALITIES = ("image", "text")
_tls = threading.local()
MMAP_AUTO_BYTES = 1 << 30  # memory-map index files larger than this even when index.json does not ask
RERANK_FACTOR = 4  # candidates per wanted result when re-ranking quantized results with stored vectors


@dataclass(frozen=True)
class SearchParams:
    """Per-call search parameters; None = the index.json default."""

    nprobe: int | None = None
    efSearch: int | None = None
    k_factor: float | None = None

    def __post_init__(self) -> None:
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(f"nprobe must be >= 1, got {self.nprobe}")
        if self.efSearch is not None and self.efSearch < 1:
            raise ConfigError(f"efSearch must be >= 1, got {self.efSearch}")
        if self.k_factor is not None and self.k_factor < 1:
            raise ConfigError(f"k_factor must be >= 1, got {self.k_factor}")

    def merged(self, defaults: dict[str, Any]) -> SearchParams:
        return SearchParams(
            nprobe=self.nprobe if self.nprobe is not None else _int_or_none(defaults.get("nprobe")),
            efSearch=self.efSearch if self.efSearch is not None else _int_or_none(defaults.get("efSearch")),
            k_factor=self.k_factor if self.k_factor is not None else _float_or_none(defaults.get("k_factor")),
        )


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass
class SearchResult:
    """Top-k of each query: `distances` / `ids` are [nq, k] (id -1 = no hit); `plan` says how it ran."""

    distances: np.ndarray
    ids: np.ndarray
    plan: str  # "ann", "exact", "ann+filter", "exact-subset", "ann+filter+exact-fallback", "empty-filter"
    allowed: int | None = None  # ids the filter allows (None = no filter)
    timings: dict[str, float] = field(default_factory=dict)


def build_search_params(index: Any, p: SearchParams, sel: Any = None, keep: list[Any] | None = None) -> Any:
    """A faiss SearchParameters tree for `index` carrying nprobe/efSearch/k_factor and the selector.

    `keep` collects every object that must stay alive during the search (SWIG does not own them).
    """
    keep = keep if keep is not None else []
    idx = faiss.downcast_index(index)
    params: Any
    if isinstance(idx, faiss.IndexPreTransform):
        inner = build_search_params(idx.index, p, sel, keep)
        params = faiss.SearchParametersPreTransform(index_params=inner)
    elif isinstance(idx, faiss.IndexRefine):
        base = build_search_params(idx.base_index, p, sel, keep)
        k_factor = p.k_factor if p.k_factor is not None else float(idx.k_factor)
        params = faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=base)
        if sel is not None:
            params.sel = sel
    elif isinstance(idx, faiss.IndexIDMap):
        params = build_search_params(idx.index, p, sel, keep)
    elif isinstance(idx, faiss.IndexIVF):
        nprobe = max(1, min(int(p.nprobe if p.nprobe is not None else idx.nprobe), int(idx.nlist)))
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        quantizer = faiss.downcast_index(idx.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            # an HNSW coarse quantizer must look at more than nprobe candidates to find the nprobe nearest
            # lists; serve with the efSearch the tuner measured with (build.apply_search_params)
            qp = faiss.SearchParametersHNSW(efSearch=quantizer_ef_search(nprobe))
            keep.append(qp)
            params.quantizer_params = qp
        if sel is not None:
            params.sel = sel
    elif isinstance(idx, faiss.IndexFastScan):
        # flat fast-scan (PQ..x4fs without IVF) refuses any SearchParameters, selector included:
        # searchers post-filter its results instead (see ModalityIndex.supports_selector)
        return None
    elif isinstance(idx, faiss.IndexHNSW):
        ef = p.efSearch if p.efSearch is not None else int(idx.hnsw.efSearch)
        params = faiss.SearchParametersHNSW(efSearch=max(1, int(ef)))
        if sel is not None:
            params.sel = sel
    else:
        params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
    keep.append(params)
    return params


def l2_to_inner_product(x: np.ndarray, dist: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Inner products of queries x with unit-norm rows from their squared L2 distances:
    |q - v|^2 = |q|^2 + 1 - 2 q.v. Empty slots (id -1) get -inf, as inner-product searches give."""
    qn = np.einsum("ij,ij->i", x, x)[:, None]
    out = ((qn + 1.0 - dist) * 0.5).astype(np.float32)
    out[ids < 0] = -np.inf
    return out


def _inner(index: Any) -> Any:
    idx = faiss.downcast_index(index)
    while True:
        if isinstance(idx, faiss.IndexPreTransform):
            idx = faiss.downcast_index(idx.index)
        elif isinstance(idx, faiss.IndexRefine):
            idx = faiss.downcast_index(idx.base_index)
        elif isinstance(idx, faiss.IndexIDMap):
            idx = faiss.downcast_index(idx.index)
        else:
            return idx


PREAD_MIN_BYTES = 512 * 1024 * 1024  # vectors files from this size are read with pread, not the map


class RowReader:
    """Rows of a `.npy` matrix read with `pread`, coalescing runs of adjacent ids.

    The file is also memory-mapped (`ModalityIndex.vectors`, for its shape), but rows are not read through
    the map: the kernel maps ~32 neighbouring pages on each fault, so random row reads (dedup, re-rank,
    filter subsets) made a 10M-row vectors file 1 GB of the server's RSS. `pread` leaves the data in the
    page cache, shared and reclaimable, without mapping it into the process.
    """

    def __init__(self, path: str, arr: np.ndarray):
        self._file = open(path, "rb")  # noqa: SIM115 - lives as long as the index; close() ends it
        self.n, self.d = int(arr.shape[0]), int(arr.shape[1])
        self.dtype = arr.dtype
        self.row_bytes = self.d * arr.dtype.itemsize
        self.offset = int(getattr(arr, "offset", 0))

    def take(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), d]; ids in any order, repeats allowed."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.d), dtype=np.float32)
        if len(ids) == 0:
            return out
        order = np.argsort(ids, kind="stable")
        s = ids[order]
        if s[0] < 0 or s[-1] >= self.n:
            raise IndexError(f"row ids out of range [0, {self.n}): {int(s[0])}..{int(s[-1])}")
        cuts = np.flatnonzero(np.diff(s) > 1) + 1  # a run: consecutive (or repeated) ids, one read
        starts, ends = np.r_[0, cuts], np.r_[cuts, len(s)]
        lo, lens = s[starts], s[ends - 1] - s[starts] + 1
        pos = np.r_[0, np.cumsum(lens)[:-1]]
        raw = np.empty((int(lens.sum()), self.d), dtype=self.dtype)
        view = memoryview(raw).cast("B")
        fd, rb = self._file.fileno(), self.row_bytes
        for first, n, p in zip(lo.tolist(), lens.tolist(), pos.tolist(), strict=True):
            if os.preadv(fd, [view[p * rb : (p + n) * rb]], self.offset + first * rb) != n * rb:
                raise InputError(f"{self._file.name} is shorter than its header says (rows from {first})")
        run = np.repeat(np.arange(len(lo)), ends - starts)
        out[order] = raw[pos[run] + (s - lo[run])]
        return out

    def close(self) -> None:
        self._file.close()


class ModalityIndex:
    """One faiss index of an index folder (image or text) plus how to get its vectors back."""

    def __init__(
        self, folder: str, modality: str, info: dict[str, Any], dim: int, mmap: str = "auto", threads: int = 0
    ):
        self.modality = modality
        self.threads = threads
        self.info = info
        fname = info.get("file") or f"{modality}.index"
        self.path = os.path.join(folder, fname)
        if not os.path.exists(self.path):
            raise InputError(f"{folder}: index.json names {fname} but the file is missing")
        ondisk = os.path.exists(os.path.join(folder, f"{os.path.splitext(fname)[0]}.ivfdata"))
        size = os.path.getsize(self.path)
        self.mmap = (
            ondisk
            or mmap == "always"
            or (mmap == "auto" and (bool(info.get("mmap")) or size > MMAP_AUTO_BYTES))
        )
        if mmap == "never" and not ondisk:
            self.mmap = False
        # on-disk inverted lists (.ivfdata) map their own file; IO_FLAG_MMAP on top of them crashes faiss.
        # Other indices map their codes with IO_FLAG_MMAP_IFC (flat codes and in-file IVF lists).
        if ondisk:
            attempts = [faiss.IO_FLAG_ONDISK_SAME_DIR]
        elif self.mmap:
            attempts = [faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP, 0]
        else:
            attempts = [0]
        err: RuntimeError | None = None
        for flags in attempts:
            try:
                self.index = faiss.read_index(self.path, flags)
                break
            except RuntimeError as e:
                err = e
        else:
            msg = str(err).strip().splitlines()[-1] if err and str(err).strip() else repr(err)
            raise InputError(f"{self.path} is not a readable faiss index: {msg}") from err
        if self.index.d != dim:
            raise InputError(f"{self.path} has dimension {self.index.d} but index.json says {dim}")
        self.ntotal = int(self.index.ntotal)
        self.defaults: dict[str, Any] = dict(info.get("search_params") or {})
        self.factory = str(info.get("factory", type(faiss.downcast_index(self.index)).__name__))
        self.inner = _inner(self.index)
        self.is_flat = isinstance(self.inner, faiss.IndexFlat)
        self.is_ivf = isinstance(self.inner, faiss.IndexIVF)
        self.is_hnsw = isinstance(self.inner, faiss.IndexHNSW)
        # faiss's two-level residual IVFPQR searches by L2 only; indexed vectors are unit-norm, so its
        # ranking is the inner-product ranking and search() turns its distances into inner products
        self.l2_distances = int(self.inner.metric_type) == faiss.METRIC_L2
        if isinstance(self.inner, faiss.IndexIVFPQR) and self.defaults.get("k_factor") is not None:
            self.inner.k_factor = float(self.defaults["k_factor"])  # an attribute, not a search parameter
        # faiss applies an IDSelector inside the scan of every index kind but flat fast-scan and IVFPQR
        # (whose scan hands list positions to its re-rank: faiss refuses a selector with those)
        self.supports_selector = not (
            (isinstance(self.inner, faiss.IndexFastScan) and not isinstance(self.inner, faiss.IndexIVF))
            or isinstance(self.inner, faiss.IndexIVFPQR)
        )
        self.vectors: np.ndarray | None = None
        self._rows: RowReader | None = None
        vname = info.get("vectors") or f"{modality}.vectors.npy"
        vpath = os.path.join(folder, vname)
        if os.path.exists(vpath):
            v = np.load(vpath, mmap_mode="r")
            if v.ndim != 2 or v.shape[1] != dim or v.shape[0] != self.ntotal:
                raise InputError(f"{vpath} has shape {v.shape}, expected ({self.ntotal}, {dim})")
            self.vectors = v
            # small files: the map is faster, and at most the file itself becomes resident
            self._rows = RowReader(vpath, v) if v.flags.c_contiguous and v.nbytes >= PREAD_MIN_BYTES else None
        self._direct_map_lock = threading.Lock()
        # (nprobe, efSearch, k_factor) -> (faiss params, objects to keep alive); read-only once built
        self._params_cache: dict[tuple[Any, ...], tuple[Any, list[Any]]] = {}
        self._direct_map_ready = not self.is_ivf

    @property
    def exact_distances(self) -> bool:
        """True when the index's own search returns exact inner products (no quantization)."""
        idx = faiss.downcast_index(self.index)
        return (
            self.is_flat
            or isinstance(idx, faiss.IndexRefine)
            or isinstance(self.inner, faiss.IndexHNSWFlat)
            or (isinstance(self.inner, faiss.IndexIVFFlat) and not isinstance(idx, faiss.IndexPreTransform))
        )

    @property
    def exact_vectors(self) -> bool:
        """True when vectors_for returns the original vectors (not a lossy reconstruction)."""
        if self.vectors is not None:
            return True
        idx = faiss.downcast_index(self.index)
        return (
            self.is_flat
            or isinstance(idx, faiss.IndexRefine)
            or isinstance(self.inner, faiss.IndexHNSWFlat)
            or (isinstance(self.inner, faiss.IndexIVFFlat) and not isinstance(idx, faiss.IndexPreTransform))
        )

    def use_search_threads(self) -> None:
        """Give faiss this index's thread count in the calling thread (an OpenMP ICV is per thread):
        server request threads search with one thread each."""
        if self.threads and getattr(_tls, "omp", None) != self.threads:
            faiss.omp_set_num_threads(self.threads)
            _tls.omp = self.threads

    def search(
        self, x: np.ndarray, k: int, p: SearchParams, sel: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        self.use_search_threads()
        merged = p.merged(self.defaults)
        if sel is None:
            # unfiltered searches reuse one parameter tree per setting: building the SWIG objects costs
            # more than a small index's search (a segmented index runs one search per segment)
            key = (merged.nprobe, merged.efSearch, merged.k_factor)
            cached = self._params_cache.get(key)
            if cached is None:
                keep: list[Any] = []
                cached = (build_search_params(self.index, merged, None, keep), keep)
                if len(self._params_cache) < 32:
                    self._params_cache[key] = cached
        else:
            keep = [sel]
            cached = (build_search_params(self.index, merged, sel, keep), keep)
        x = np.ascontiguousarray(x, dtype=np.float32)
        dist, ids = self.index.search(x, k, params=cached[0])
        if self.l2_distances:
            dist = l2_to_inner_product(x, dist, ids)
        return dist, ids

    def _ensure_direct_map(self) -> None:
        if self._direct_map_ready:
            return
        with self._direct_map_lock:
            if not self._direct_map_ready:
                t = time.perf_counter()
                ivf = faiss.extract_index_ivf(self.index)
                ivf.make_direct_map(True)
                self._direct_map_ready = True
                logger.info(
                    "%s: built the id map of %s in %.1fs", self.path, self.modality, time.perf_counter() - t
                )

    def vectors_for(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), dim] vectors of `ids` (original when stored, else reconstructed)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.index.d), dtype=np.float32)
        if self._rows is not None:
            return self._rows.take(ids)
        if self.vectors is not None:  # a small (or Fortran-ordered) file: read through the map
            order = np.argsort(ids, kind="stable")
            out = np.empty((len(ids), self.index.d), dtype=np.float32)
            out[order] = self.vectors[ids[order]]
            return out
        self._ensure_direct_map()
        try:
            return np.asarray(self.index.reconstruct_batch(ids), dtype=np.float32)
        except RuntimeError as e:
            raise InputError(f"{self.path}: cannot read vectors back from a {self.factory} index: {e}") from e


def _post_filter(
    mi: ModalityIndex, q: np.ndarray, k: int, p: SearchParams, bm: FilterBitmap
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k allowed hits from an index without selector support: fetch enough candidates that about
    2k of them pass the filter, keep the allowed ones in rank order (rows left short get id -1)."""
    fetch = int(min(mi.ntotal, max(k, math.ceil(2 * k / max(bm.selectivity, 1e-9)), 4 * k)))
    dist, ids_ = mi.search(q, fetch, p)
    ok = (ids_ >= 0) & bm.contains(ids_)
    out_d = np.full((q.shape[0], k), -np.inf, np.float32)
    out_i = np.full((q.shape[0], k), -1, np.int64)
    for row in range(q.shape[0]):
        keep = np.flatnonzero(ok[row])[:k]
        out_d[row, : len(keep)] = dist[row, keep]
        out_i[row, : len(keep)] = ids_[row, keep]
    return out_d, out_i


class IndexSearcher:
    """An opened `index/` folder: faiss indices per modality, memory-mapped metadata, filter cache."""

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        exact_max: int = 50_000,
        filter_cache_size: int = 64,
        subset_cache_bytes: int = 256 * 1024 * 1024,
        cache_dir: str | None = None,
        mmap: str = "auto",
        threads: int = 0,
        filter_budget_s: float | None = None,
    ):
        self.uri = path
        self.name = name or os.path.basename(path.rstrip("/")) or "index"
        self.local_path = _localize(path, cache_dir)
        folder = self.local_path
        info_path = os.path.join(folder, "index.json")
        if not os.path.exists(info_path):
            raise InputError(
                f"{path} is not an index folder (no index.json)",
                hint="pass the index/ folder written by `clipsearch index`",
            )
        try:
            info = storage.read_json(info_path)
        except Exception as e:
            raise InputError(f"{info_path} is not valid JSON: {e}") from e
        if not isinstance(info, dict) or info.get("format") != "clipsearch.index":
            raise InputError(
                f"{info_path} is not a clipsearch index description (format != clipsearch.index)"
            )
        self.info = info
        try:
            self.dim = int(info["dim"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{info_path} has no valid 'dim'") from e
        self.model: str | None = info.get("model")
        self.metric = info.get("metric", "inner_product")
        entries = info.get("indices") or {}
        if not isinstance(entries, dict) or not entries:
            raise InputError(f"{info_path} lists no indices")
        meta_path = os.path.join(folder, "metadata.arrow")
        if not os.path.exists(meta_path):
            raise InputError(f"{path}: metadata.arrow is missing")
        self.metadata = MetadataTable(meta_path)
        self.indices: dict[str, ModalityIndex] = {}
        for modality, entry in entries.items():
            if modality not in MODALITIES or not isinstance(entry, dict):
                logger.warning("%s: ignoring unknown index entry %r", info_path, modality)
                continue
            mi = ModalityIndex(folder, modality, entry, self.dim, mmap, threads)
            if mi.ntotal != self.metadata.num_rows:
                raise InputError(
                    f"{mi.path} holds {mi.ntotal} vectors but metadata.arrow has {self.metadata.num_rows} rows"
                )
            self.indices[modality] = mi
        if not self.indices:
            raise InputError(f"{info_path} lists neither an image nor a text index")
        self.count = self.metadata.num_rows
        self.keywords = None  # the caption keyword index (clipsearch.keywords), when the folder has one
        kw = info.get("keywords")
        if isinstance(kw, dict):
            from clipsearch.keywords.reader import KeywordIndex

            self.keywords = KeywordIndex(folder, kw, self.count)
        self.exact_max = exact_max
        self.filters = FilterCache(
            self.metadata, size=filter_cache_size, n=self.count, budget_s=filter_budget_s
        )
        self._subset_cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._subset_bytes = 0
        self._subset_budget = subset_cache_bytes
        self._subset_lock = threading.Lock()
        self._subset_flights: dict[tuple[str, str], threading.Lock] = {}
        logger.info(
            "opened index %s (%s): %d rows, dim %d, %s",
            self.name,
            path,
            self.count,
            self.dim,
            ", ".join(f"{m}={mi.factory}{' mmap' if mi.mmap else ''}" for m, mi in self.indices.items()),
        )

    # ------------------------------------------------------------------ description
    @property
    def modalities(self) -> list[str]:
        return list(self.indices)

    def modality(self, modality: str) -> ModalityIndex:
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
            "count": self.count,
            "modalities": {
                m: {
                    "factory": mi.factory,
                    "count": mi.ntotal,
                    "mmap": mi.mmap,
                    "search_params": mi.defaults,
                    "vectors_file": mi.vectors is not None,
                }
                for m, mi in self.indices.items()
            },
            "columns": {f.name: str(f.type) for f in self.metadata.schema},
            "keywords": self.keywords is not None,
        }

    # ------------------------------------------------------------------ search
    def filter_bitmap(self, expression: str, deadline: float | None = None) -> FilterBitmap:
        return self.filters.get(expression, deadline)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        modality: str = "image",
        filter: str | FilterBitmap | None = None,
        params: SearchParams | None = None,
    ) -> SearchResult:
        """Top-k ids and inner products of each query row; with a filter, only allowed ids."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise InputError(f"query vectors have dimension {q.shape[1]}, index {self.name!r} has {self.dim}")
        mi = self.modality(modality)
        p = params or SearchParams()
        k = int(k)
        timings: dict[str, float] = {}
        if filter is None or filter == "":
            t = time.perf_counter()
            dist, ids_ = mi.search(q, k, p)
            timings["search"] = time.perf_counter() - t
            return SearchResult(dist, ids_, "ann" if not mi.is_flat else "exact", None, timings)
        t = time.perf_counter()
        bm = filter if isinstance(filter, FilterBitmap) else self.filter_bitmap(filter)
        timings["filter"] = time.perf_counter() - t
        t = time.perf_counter()
        res = self._plan_filtered(mi, q, k, bm, p)
        res.timings.update(timings)
        res.timings["search"] = time.perf_counter() - t
        return res

    def _plan_filtered(
        self, mi: ModalityIndex, q: np.ndarray, k: int, bm: FilterBitmap, p: SearchParams
    ) -> SearchResult:
        nq = q.shape[0]
        if bm.count == 0:
            return SearchResult(
                np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64), "empty-filter", 0
            )
        if bm.count <= self.exact_max or (mi.is_flat and bm.count <= 4 * self.exact_max):
            dist, ids_ = self._exact_subset(mi, q, k, bm)
            return SearchResult(dist, ids_, "exact-subset", bm.count)
        # ANN inside the search: the selector skips disallowed ids while scanning; widen the search as
        # the filter gets more selective so that enough allowed neighbours are reached.
        widen = min(16.0, max(1.0, math.sqrt(0.1 / max(bm.selectivity, 1e-9))))
        merged = p.merged(mi.defaults)
        wp = SearchParams(
            nprobe=None if merged.nprobe is None else int(math.ceil(merged.nprobe * widen)),
            efSearch=max(k, int(math.ceil((merged.efSearch or 16) * widen)))
            if mi.is_hnsw
            else merged.efSearch,
            k_factor=merged.k_factor,
        )
        if mi.is_ivf and wp.nprobe is None:
            wp = SearchParams(int(math.ceil(int(mi.inner.nprobe) * widen)), wp.efSearch, wp.k_factor)
        rerank = mi.vectors is not None and not mi.exact_distances
        kk = k * RERANK_FACTOR if rerank else k
        if mi.supports_selector:
            dist, ids_ = mi.search(q, kk, wp, bm.selector())
            plan = "ann+filter"
        else:  # the index cannot skip ids while scanning: over-fetch, then drop what the filter refuses
            dist, ids_ = _post_filter(mi, q, kk, wp, bm)
            plan = "ann+postfilter"
        if rerank:  # quantized codes rank roughly: re-rank the candidates with the stored vectors
            dist, ids_ = _rerank(mi, q, dist, ids_, k)
            plan += "+rerank"
        short = np.flatnonzero((ids_ < 0).any(axis=1)) if k <= bm.count else np.array([], dtype=np.int64)
        if len(short):
            dist2, ids2 = self._exact_subset(mi, q[short], k, bm)
            dist[short], ids_[short] = dist2, ids2
            plan += "+exact-fallback"
        return SearchResult(dist, ids_, plan, bm.count)

    def _subset_vectors(self, mi: ModalityIndex, bm: FilterBitmap) -> Any:
        key = (mi.modality, bm.expression)
        with self._subset_lock:
            v = self._subset_cache.get(key)
            if v is not None:
                self._subset_cache.move_to_end(key)
                return v
            flight = self._subset_flights.setdefault(key, threading.Lock())
        with flight:  # concurrent requests with a new filter gather its vectors once
            with self._subset_lock:
                v = self._subset_cache.get(key)
            if v is not None:
                return v
            try:
                v = self._gather_subset(mi, bm, key)
            finally:
                with self._subset_lock:
                    self._subset_flights.pop(key, None)
        return v

    def _gather_subset(self, mi: ModalityIndex, bm: FilterBitmap, key: tuple[str, str]) -> Any:
        # a flat faiss index over the subset: its single-query scan is SIMD code on the calling thread
        # (numpy's matmul would go through a multi-threaded BLAS, which stalls on a busy machine)
        v = mi.vectors_for(bm.ids)
        flat = faiss.IndexFlatIP(v.shape[1])
        flat.add(np.ascontiguousarray(v, dtype=np.float32))
        nbytes = v.nbytes
        del v
        if nbytes <= self._subset_budget // 2:
            with self._subset_lock:
                if key not in self._subset_cache:
                    self._subset_cache[key] = flat
                    self._subset_bytes += nbytes
                while self._subset_bytes > self._subset_budget and self._subset_cache:
                    _, old = self._subset_cache.popitem(last=False)
                    self._subset_bytes -= int(old.ntotal) * int(old.d) * 4
        return flat

    def _exact_subset(
        self, mi: ModalityIndex, q: np.ndarray, k: int, bm: FilterBitmap
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = bm.ids
        flat = self._subset_vectors(mi, bm)
        nq = q.shape[0]
        dist = np.full((nq, k), -np.inf, dtype=np.float32)
        out = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, len(ids))
        if kk == 0:
            return dist, out
        mi.use_search_threads()
        d, local = flat.search(np.ascontiguousarray(q, dtype=np.float32), kk)
        ok = local >= 0
        dist[:, :kk] = np.where(ok, d, -np.inf)
        out[:, :kk] = np.where(ok, ids[np.maximum(local, 0)], -1)
        return dist, out

    # ------------------------------------------------------------------ keywords
    def keyword_search(
        self, q: Any, k: int, *, filter: str | FilterBitmap | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids, BM25 scores) of the k best caption matches of a parsed keyword query, filter applied."""
        kw = require_keywords(self)
        bm = None
        if filter is not None and filter != "":
            bm = filter if isinstance(filter, FilterBitmap) else self.filter_bitmap(filter)
            if bm.count == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return kw.search(q, int(k), bm)

    def keyword_stats(self, units: Sequence[Any]) -> tuple[int, list[int]]:
        """(captions indexed, captions matching each unit): what IDF is computed from."""
        kw = require_keywords(self)
        return kw.num_docs, [kw.doc_freq(u) for u in units]

    # ------------------------------------------------------------------ vectors and rows
    def vectors(self, ids: Sequence[int] | np.ndarray, modality: str = "image") -> np.ndarray:
        return self.modality(modality).vectors_for(np.asarray(ids, dtype=np.int64))

    def rows(
        self, ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        return self.metadata.rows(ids, columns)

    def close(self) -> None:
        self.metadata.close()
        for mi in self.indices.values():
            if mi._rows is not None:
                mi._rows.close()


def require_keywords(s: Any) -> Any:
    """The keyword index of a searcher, or the 400 that says how to get one."""
    kw = getattr(s, "keywords", None)
    if kw is None:
        raise InputError(
            f"index {s.name!r} has no keyword index, so it answers only mode=semantic",
            hint="rebuild it with `clipsearch index` (the keyword index is built unless --no-text-index), or "
            "add one in place with `clipsearch index --text-index-only --index-folder DIR` and restart",
        )
    return kw


def exact_topk(vecs: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each query over (vecs, ids); pads with id -1 when fewer than k."""
    nq = q.shape[0]
    dist = np.full((nq, k), -np.inf, dtype=np.float32)
    out_ids = np.full((nq, k), -1, dtype=np.int64)
    m = len(ids)
    if m == 0:
        return dist, out_ids
    kk = min(k, m)
    step = max(1, (64 * 1024 * 1024) // (4 * m))  # bound the score matrix to ~64 MB
    for s in range(0, nq, step):
        scores = q[s : s + step] @ vecs.T  # [b, m]
        if kk < m:
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        else:
            part = np.broadcast_to(np.arange(m), scores.shape)
        top = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        dist[s : s + step, :kk] = np.take_along_axis(top, order, axis=1)
        out_ids[s : s + step, :kk] = ids[np.take_along_axis(part, order, axis=1)]
    return dist, out_ids


def _rerank(
    mi: ModalityIndex, q: np.ndarray, dist: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    out_d = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    out_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    for r in range(q.shape[0]):
        cand = ids[r][ids[r] >= 0]
        if len(cand) == 0:
            continue
        d, i = exact_topk(mi.vectors_for(cand), cand, q[r : r + 1], k)
        out_d[r], out_i[r] = d[0], i[0]
    return out_d, out_i


def _localize(path: str, cache_dir: str | None) -> str:
    """A local folder for `path`: itself when local, else a copy in `cache_dir` (faiss needs local files)."""
    if storage.is_local(path):
        local = path.split("://", 1)[1] if path.startswith("file://") else path
        if not os.path.exists(local):
            raise InputError(f"index folder {path} does not exist", hint="--index NAME=DIR")
        if not os.path.isdir(local):
            raise InputError(
                f"{path} is not a folder", hint="pass the index/ folder written by `clipsearch index`"
            )
        return local
    if not storage.exists(path):
        raise InputError(f"index folder {path} does not exist", hint="--index NAME=DIR")
    target = tempfile.mkdtemp(prefix="clipsearch-index-", dir=cache_dir)
    fs, p = storage.get_fs(path)
    logger.info("copying %s to %s (faiss memory-maps local files only)", path, target)
    for f in fs.ls(p, detail=False):
        if fs.isfile(f):
            fs.get(f, os.path.join(target, os.path.basename(f)))
    return target
