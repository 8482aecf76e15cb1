"""`index --compact`: merge segments, drop deleted rows, retrain only when recall has drifted.

1. Choose a contiguous run of segments: the small ones (fewer live rows than `small_fraction` of the
   largest) and those with more than `max_deleted_fraction` of their rows deleted (`--compact-all`:
   every segment).
2. Read their live vectors back (from the recorded source embeddings, else from the index files), add
   them to a copy of the trained index, and compute the exact top-10 of held-out text-like queries
   (caption embeddings of sampled rows for the image index, image embeddings for the text index).
3. Measure recall@10 of the merged index with its search parameters on those queries. Below the
   target (`--target-recall`, else index.json's `--min-recall`, else the recall the index was tuned
   to minus 0.02) the quantizer is retrained on a sample of the live vectors, the segment rebuilt and
   its search parameters tuned again; otherwise the trained quantizer is kept.
4. Write the merged segment, then commit: the manifest names it instead of the run (offsets of the
   later segments shift down by the rows dropped, so their ids change) with the tombstones remapped,
   including rows deleted while the compaction ran. Old files are removed after the switch.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from clipsearch.errors import ConfigError, IndexBuildError
from clipsearch.index.build import apply_search_params, faiss_mod, train_index
from clipsearch.index.tune import far_queries, recall_at_k, tune
from clipsearch.segments import build, layout
from clipsearch.segments.append import _write_json

logger = logging.getLogger(__name__)

K = 10
DRIFT_TOLERANCE = 0.02


@dataclass(frozen=True)
class CompactConfig:
    index_folder: str
    all_segments: bool = False
    small_fraction: float = 0.5
    max_deleted_fraction: float = 0.1
    target_recall: float | None = None
    force_retrain: bool = False
    n_queries: int = 200
    max_train_points: int = 100_000
    max_index_query_time_ms: float | None = None
    batch_rows: int = 65536
    nb_cores: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.index_folder:
            raise ConfigError("an index folder is required", hint="--index-folder")
        if not 0 < self.small_fraction <= 1:
            raise ConfigError("small_fraction must be in (0, 1]")
        if not 0 <= self.max_deleted_fraction <= 1:
            raise ConfigError("max_deleted_fraction must be in [0, 1]")
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise ConfigError(
                f"target recall must be in (0, 1], got {self.target_recall}", hint="--target-recall"
            )
        if self.n_queries < 10:
            raise ConfigError("measure recall on at least 10 queries")

    @property
    def threads(self) -> int:
        return self.nb_cores or os.cpu_count() or 1


def choose_run(manifest: layout.Manifest, dead: np.ndarray, cfg: CompactConfig) -> tuple[int, int] | None:
    """(first, last) segment positions to merge, or None when there is nothing worth doing."""
    segs = manifest.segments
    if not segs:
        return None
    n_dead = [len(layout.segment_deleted(dead, s)) for s in segs]
    live = [s.count - d for s, d in zip(segs, n_dead, strict=True)]
    if cfg.all_segments:
        pick = list(range(len(segs)))
    else:
        largest = max(live)
        pick = [
            j
            for j, s in enumerate(segs)
            if live[j] < cfg.small_fraction * largest
            or n_dead[j] > cfg.max_deleted_fraction * max(1, s.count)
        ]
    if not pick:
        return None
    lo, hi = min(pick), max(pick)
    if lo == hi and n_dead[lo] == 0:
        return None
    return lo, hi


def _reference_recall(manifest: layout.Manifest, info: dict[str, Any], m: str) -> float | None:
    """The text-like recall@10 the index was tuned to at its current search parameters."""
    t = manifest.trained.get(m) or {}
    if t.get("recall") is not None:
        return float(t["recall"])
    entry = (info.get("indices") or {}).get(m) or {}
    params = t.get("search_params", entry.get("search_params")) or {}
    for point in entry.get("curve") or []:
        if point.get("params") == params:
            r = point.get("recall_at_10_text", point.get("recall_at_10"))
            return None if r is None else float(r)
    return None


class _Sampler:
    """Picks live-row positions up front (queries, training sample) and collects their vectors."""

    def __init__(self, n: int, n_queries: int, n_train: int, seed: int):
        rng = np.random.default_rng(seed)
        self.q_pos = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
        self.t_pos = (
            np.sort(rng.choice(n, size=min(n_train, n), replace=False)) if n_train else np.zeros(0, int)
        )
        self.queries: dict[str, list[np.ndarray]] = {}
        self.train: dict[str, list[np.ndarray]] = {}

    def take(self, start: int, xs: dict[str, np.ndarray]) -> None:
        n = len(next(iter(xs.values())))
        for pos, store in ((self.q_pos, self.queries), (self.t_pos, self.train)):
            sel = pos[np.searchsorted(pos, start) : np.searchsorted(pos, start + n)] - start
            for m, x in xs.items():
                store.setdefault(m, []).append(x[sel])

    @staticmethod
    def cat(store: dict[str, list[np.ndarray]], m: str, d: int) -> np.ndarray:
        v = store.get(m) or []
        return np.ascontiguousarray(np.concatenate(v)) if v else np.zeros((0, d), np.float32)


def _live_batches(
    folder: str, run: list[layout.SegmentEntry], dead_local: list[np.ndarray], mods, batch_rows
):
    """Live vectors of the run, in merged id order: yields (first merged id, {m: batch})."""
    out = 0
    for seg, dl in zip(run, dead_local, strict=True):
        it, origin = build.segment_vectors(folder, seg, mods, batch_rows)
        logger.info("compact: reading segment %s from its %s", seg.name, origin)
        local = 0
        for xs in it:
            n = len(next(iter(xs.values())))
            lo, hi = np.searchsorted(dl, [local, local + n])
            keep = np.ones(n, dtype=bool)
            keep[dl[lo:hi] - local] = False
            local += n
            if keep.all():
                yield out, xs
            elif keep.any():
                xs = {m: np.ascontiguousarray(x[keep]) for m, x in xs.items()}
                yield out, xs
            out += int(keep.sum())
        build.check_count(local, seg.count, f"segment {seg.name}")


def _fill(trained: dict[str, str], folder, run, dead_local, mods, batch_rows, queries=None, sampler=None):
    """Add the run's live vectors to copies of the trained indices; optionally the exact top-K of queries."""
    faiss = faiss_mod()
    indices = {m: faiss.read_index(trained[m]) for m in mods}
    heaps = {}
    if queries is not None:
        heaps = {
            (m, s): faiss.ResultHeap(len(q), K, keep_max=True) for (m, s), q in queries.items() if len(q)
        }
    n = 0
    for start, xs in _live_batches(folder, run, dead_local, mods, batch_rows):
        if sampler is not None:
            sampler.take(start, xs)
        for m in mods:
            indices[m].add(xs[m])
        for (m, s), heap in heaps.items():
            x = xs[m]
            kk = min(K, len(x))
            D, Ids = faiss.knn(queries[(m, s)], x, kk, metric=faiss.METRIC_INNER_PRODUCT)
            if kk < K:
                D = np.pad(D, ((0, 0), (0, K - kk)), constant_values=-np.inf)
                Ids = np.pad(Ids, ((0, 0), (0, K - kk)), constant_values=-1)
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.where(Ids >= 0, Ids + start, -1))
        n = start + len(next(iter(xs.values())))
    gts = {}
    for key, heap in heaps.items():
        heap.finalize()
        gts[key] = heap.I
    return indices, gts, n


def _measure(index, params: dict, q: np.ndarray, gt: np.ndarray) -> float:
    if not len(q):
        return float("nan")
    apply_search_params(index, params)
    _, ids = index.search(q, K)
    return round(recall_at_k(ids, gt, K), 4)


def compact(cfg: CompactConfig) -> dict[str, Any]:
    """Compact the index in cfg.index_folder. Returns a report (what was merged, recall, retraining)."""
    faiss = faiss_mod()
    t_start = time.perf_counter()
    faiss.omp_set_num_threads(cfg.threads)
    folder = layout.check_local_index(cfg.index_folder)
    info = layout.read_info(folder)
    manifest = layout.read_manifest(folder)
    dead = layout.read_tombstones(folder, manifest)
    span = choose_run(manifest, dead, cfg)
    if span is None:
        logger.info("compact: nothing to do (%d segments, %d deleted)", len(manifest.segments), len(dead))
        if manifest.explicit:
            with layout.writer_lock(folder):  # still remove what an interrupted writer left behind
                layout.cleanup(folder, layout.read_manifest(folder))
        return {"compacted": False, "segments": len(manifest.segments), "generation": manifest.generation}
    lo, hi = span
    run = list(manifest.segments[lo : hi + 1])
    dead_local = [layout.segment_deleted(dead, s) for s in run]
    n_live = sum(s.count - len(d) for s, d in zip(run, dead_local, strict=True))
    mods = tuple(m for m in ("image", "text") if m in (info.get("indices") or {}))
    d = int(info["dim"])
    timings: dict[str, float] = {}
    report: dict[str, Any] = {
        "compacted": True,
        "merged": [s.name for s in run],
        "rows_before": sum(s.count for s in run),
        "rows_dropped": int(sum(len(x) for x in dead_local)),
        "recall": {},
        "retrained": {},
    }
    logger.info(
        "compact: merging %d segment(s) (%s), %d live rows, dropping %d deleted",
        len(run), ", ".join(s.name for s in run), n_live, report["rows_dropped"],
    )  # fmt: skip
    tmp = layout.new_tmp_segment(folder)
    try:
        trained_entries = {m: dict(manifest.trained.get(m) or {}) for m in mods}
        trained: dict[str, str] = {}
        for m in mods:
            p = build.trained_path(folder, manifest, m)
            if p is None:
                p = os.path.join(tmp, f"{m}.trained.index")
                build.derive_trained(folder, info, m, p)
                entry = (info.get("indices") or {}).get(m) or {}
                trained_entries[m] = {
                    "factory": entry.get("factory"),
                    "search_params": entry.get("search_params") or {},
                }
            trained[m] = p
        indices: dict[str, Any] = {}
        if n_live:
            indices = _build_merged(cfg, folder, info, manifest, run, dead_local, mods, d, n_live, trained,
                                    trained_entries, tmp, report, timings)  # fmt: skip
        # files of the merged segment
        t0 = time.perf_counter()
        entries = {}
        for m in mods if n_live else ():
            te = trained_entries[m]
            ondisk = bool(((info.get("indices") or {}).get(m) or {}).get("mmap"))
            ondisk = build.write_index(indices[m], os.path.join(tmp, f"{m}.index"), ondisk)
            entries[m] = build.index_entry(tmp, m, indices[m], te.get("factory"), te.get("search_params") or {},
                                           ondisk, "compacted segment")  # fmt: skip
            if te.get("curve"):
                entries[m]["curve"] = te.pop("curve")
        del indices
        remaps = [_remap(s.count, dl) for s, dl in zip(run, dead_local, strict=True)]
        if n_live:
            rows = _write_metadata(folder, run, remaps, os.path.join(tmp, "metadata.arrow"))
            if rows != n_live:
                raise IndexBuildError(f"compact: wrote {rows} metadata rows for {n_live} vectors")
            sources, dropped = _merge_sources(folder, run, dead_local)
            if dropped is not None and len(dropped):
                np.save(os.path.join(tmp, "dropped.npy"), dropped)
        # the trained index appends will copy: keep it alive outside the folders this run removes
        for m in mods:
            rel = os.path.relpath(trained[m], folder)
            in_run = any(rel.startswith(s.path + "/") for s in run if s.path != layout.BASE_PATH)
            if trained[m].startswith(tmp + "/") or not n_live:
                pass
            elif in_run:
                shutil.copyfile(trained[m], os.path.join(tmp, f"{m}.trained.index"))
                trained[m] = os.path.join(tmp, f"{m}.trained.index")
        timings["write_s"] = time.perf_counter() - t0
        seg_info = build.segment_info(info, entries, n_live, "pending", "compact", timings)
        if n_live:  # the merged rows' captions, in their new ids
            seg_info["keywords"] = build.keyword_index(info, tmp, timings)
        layout.crash_point("compact:segment-written")

        # commit
        with layout.writer_lock(folder):
            cur = layout.read_manifest(folder)
            pos = _find_run(cur, run)
            cur_dead = layout.read_tombstones(folder, cur)
            name = layout.next_segment_name(folder, cur)
            uid = build.new_uid()
            rel = f"{layout.SEGMENTS_DIR}/{name}"
            merged = [layout.SegmentEntry(name, rel, 0, n_live, uid)] if n_live else []
            segs = list(cur.segments[:pos]) + merged + list(cur.segments[pos + len(run) :])
            new = cur.with_segments(segs)
            if merged:
                seg_info["segment"]["name"] = name
                _write_json(os.path.join(tmp, "index.json"), seg_info)
                sj = {
                    "format": "clipsearch.segment", "version": 1, "name": name, "uid": uid, "kind": "compact",
                    "offset": new.segments[pos].offset, "count": n_live, "created": time.time(),
                    "merged": [s.name for s in run], "sources": sources,
                    "dropped": "dropped.npy" if dropped is not None and len(dropped) else None,
                }  # fmt: skip
                _write_json(os.path.join(tmp, layout.SEGMENT_JSON), sj)
                layout.sync_tree(tmp)
                layout.install_segment(folder, tmp, name)
            new_dead = _remap_tombstones(cur, cur_dead, pos, run, dead_local, remaps, new, bool(merged))
            gen = cur.generation + 1
            trained_new = dict(cur.trained)
            for m in mods if merged else ():
                rel_t = os.path.relpath(trained[m], folder)
                if trained[m].startswith(tmp + "/"):
                    rel_t = f"{rel}/{m}.trained.index"
                te = {k: v for k, v in trained_entries[m].items() if k != "curve"}
                trained_new[m] = {**te, "file": rel_t}
            ts = layout.write_tombstones(folder, gen, new_dead)
            new = replace(new, generation=gen, tombstones=ts, deleted=int(len(new_dead)), trained=trained_new)
            layout.crash_point("compact:before-manifest")
            layout.write_manifest(folder, new)
            layout.crash_point("compact:after-manifest")
            layout.cleanup(folder, new)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["total_s"] = time.perf_counter() - t_start
    report.update(
        segment=name if n_live else None,
        rows=n_live,
        generation=gen,
        segments=len(new.segments),
        timings={k: round(v, 3) for k, v in timings.items()},
    )
    logger.info("compact: %s", report)
    return report


def _build_merged(cfg, folder, info, manifest, run, dead_local, mods, d, n_live, trained, trained_entries, tmp,
                  report, timings):  # fmt: skip
    """Fill the merged indices; measure recall; retrain (and rebuild, retune) the modalities that drifted."""
    faiss = faiss_mod()
    kinds = {m: build.kind_of(faiss.read_index(trained[m])) for m in mods}
    may_retrain = any(k in ("ivf", "other") for k in kinds.values())
    n_train = cfg.max_train_points if may_retrain else 0
    # pass 1: the held-out queries and the training sample, drawn across the whole run
    t0 = time.perf_counter()
    sampler = _Sampler(n_live, cfg.n_queries, n_train, cfg.seed)
    for start, xs in _live_batches(folder, run, dead_local, mods, cfg.batch_rows):
        sampler.take(start, xs)
    qs: dict[tuple[str, str], np.ndarray] = {}
    for m in mods:
        other = [o for o in mods if o != m]
        qs[(m, "same")] = sampler.cat(sampler.queries, m, d)
        qs[(m, "cross")] = (
            sampler.cat(sampler.queries, other[0], d) if other else np.zeros((0, d), np.float32)
        )
        qs[(m, "far")] = far_queries(len(qs[(m, "cross")]), d, cfg.seed)  # as at build (tune.py)
    timings["sample_s"] = time.perf_counter() - t0
    # pass 2: fill with the current quantizer, exact top-K alongside
    t0 = time.perf_counter()
    indices, gts, n = _fill(trained, folder, run, dead_local, mods, cfg.batch_rows, qs)
    build.check_count(n, n_live, "compact")
    timings["fill_s"] = time.perf_counter() - t0
    budget = info.get("budget") or {}
    max_ms = cfg.max_index_query_time_ms or budget.get("max_index_query_time_ms") or 10.0

    def retune(m: str, min_recall: float | None) -> tuple[float | None, float]:
        """Tune the merged index's search parameters; (recall@10, latency ms) of the chosen point."""
        q = {"cross": qs[(m, "cross")], "same": qs[(m, "same")], "far": qs[(m, "far")]}
        gt = {
            "cross": gts[(m, "cross")] if len(q["cross"]) else None,
            "same": gts[(m, "same")],
            "far": gts.get((m, "far")),
        }
        tuned = tune(indices[m], kinds[m], q, gt, max_ms, min_recall)
        chosen = next((p for p in tuned.curve if p["params"] == tuned.search_params), {})
        rec = chosen.get("recall_at_10_text", chosen.get("recall_at_10"))
        trained_entries[m].update(search_params=tuned.search_params, recall=rec, curve=tuned.curve)
        return rec, float(chosen.get("latency_ms", 0.0))

    retrain = []
    for m in mods:
        params = trained_entries[m].get("search_params") or {}
        cross = qs[(m, "cross")]
        which = "cross" if len(cross) else "same"
        r = _measure(indices[m], params, qs[(m, which)], gts[(m, which)])
        ref = _reference_recall(manifest, info, m)
        target = (
            cfg.target_recall or budget.get("min_recall") or (None if ref is None else ref - DRIFT_TOLERANCE)
        )
        entry = report["recall"][m] = {"measured": r, "target": target, "queries": which, "reference": ref}
        logger.info("compact: %s recall@10 (%s queries) %.4f, target %s", m, which, r, target)
        trainable = kinds[m] in ("ivf", "other")
        if cfg.force_retrain and trainable:
            retrain.append(m)
        elif target is not None and r < target:
            # below target: new search parameters on the same quantizer first (no rebuild); retrain only
            # when no parameters within the query-time budget reach the target
            t0 = time.perf_counter()
            rec, ms = retune(m, target)
            timings[f"retune_{m}_s"] = time.perf_counter() - t0
            entry["retuned"] = {
                "search_params": trained_entries[m]["search_params"],
                "recall": rec,
                "latency_ms": ms,
            }
            logger.info(
                "compact: %s retuned to %s -> recall@10 %s, %.2f ms",
                m,
                trained_entries[m]["search_params"],
                rec,
                ms,
            )
            if trainable and (rec is None or rec < target or ms > max_ms):
                retrain.append(m)
    if not retrain:
        return indices
    # retrain the drifted modalities on the live vectors, refill, tune again
    t0 = time.perf_counter()
    for m in retrain:
        factory = trained_entries[m].get("factory") or (info.get("indices") or {}).get(m, {}).get("factory")
        if not factory:
            raise IndexBuildError(f"compact: the {m} index records no factory string to retrain")
        path = os.path.join(tmp, f"{m}.trained.index")
        rot = ((info.get("indices") or {}).get(m, {}).get("rotation") or {}).get("chosen")
        train_index(
            factory,
            d,
            sampler.cat(sampler.train, m, d),
            path,
            rotation=None if rot in (None, "none") else rot,
        )
        trained[m] = path
    sampler.train.clear()
    timings["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    refill, _, _ = _fill({m: trained[m] for m in retrain}, folder, run, dead_local, retrain, cfg.batch_rows)
    timings["refill_s"] = time.perf_counter() - t0
    for m in retrain:
        indices[m] = refill[m]
        rec, _ = retune(m, budget.get("min_recall"))  # the build's own policy, as `clipsearch index` tunes
        params = trained_entries[m]["search_params"]
        report["retrained"][m] = {"search_params": params, "recall": rec}
        logger.info("compact: retrained the %s quantizer: %s -> recall@10 %s", m, params, rec)
    return indices


def _remap(count: int, dead_local: np.ndarray) -> np.ndarray:
    """old local id -> new id within the segment's share of the merged segment (-1 = dropped)."""
    keep = np.ones(count, dtype=bool)
    keep[dead_local] = False
    out = np.full(count, -1, dtype=np.int64)
    out[keep] = np.arange(int(keep.sum()), dtype=np.int64)
    return out


def _find_run(cur: layout.Manifest, run: list[layout.SegmentEntry]) -> int:
    uids = [s.uid for s in cur.segments]
    want = [s.uid for s in run]
    for i in range(len(uids) - len(want) + 1):
        if uids[i : i + len(want)] == want:
            return i
    raise IndexBuildError(
        "the segments being compacted changed meanwhile (another compaction?); nothing changed"
    )


def _remap_tombstones(cur, cur_dead, pos, run, dead_local, remaps, new, has_merged) -> np.ndarray:
    """The deleted ids of the new generation: before the run unchanged, in the run the rows deleted
    while compacting (remapped), after the run shifted by the rows dropped."""
    start = cur.segments[pos].offset
    end = cur.segments[pos + len(run) - 1].end
    before = cur_dead[cur_dead < start]
    after = cur_dead[cur_dead >= end]
    merged_count = new.segments[pos].count if has_merged else 0
    after = after - (end - start) + merged_count
    late = []
    base = 0
    for seg_cur, dl, remap in zip(cur.segments[pos : pos + len(run)], dead_local, remaps, strict=True):
        now = layout.segment_deleted(cur_dead, seg_cur)
        newly = np.setdiff1d(now, dl)
        mapped = remap[newly]
        late.append(mapped[mapped >= 0] + base + start)
        base += int((remap >= 0).sum())
    return np.concatenate([before, *late, after]).astype(np.int64)


def _write_metadata(folder: str, run: list[layout.SegmentEntry], remaps: list[np.ndarray], path: str) -> int:
    readers = []
    for seg in run:
        src = pa.memory_map(os.path.join(layout.segment_folder(folder, seg), "metadata.arrow"), "r")
        readers.append((src, pa.ipc.open_file(src)))
    schema = pa.unify_schemas([r.schema for _, r in readers], promote_options="permissive")
    tmp = f"{path}.tmp{os.getpid()}"
    written = 0
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for (_, reader), remap in zip(readers, remaps, strict=True):
                start = 0
                for b in range(reader.num_record_batches):
                    batch = reader.get_batch(b)
                    keep = remap[start : start + batch.num_rows] >= 0
                    start += batch.num_rows
                    if not keep.all():
                        batch = batch.filter(pa.array(keep))
                    if batch.num_rows:
                        writer.write_batch(_conform(batch, schema))
                        written += batch.num_rows
    finally:
        for src, _ in readers:
            src.close()
    os.replace(tmp, path)
    return written


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    cols = []
    for f in schema:
        i = batch.schema.get_field_index(f.name)
        if i >= 0:
            col = batch.column(i)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(batch.num_rows, f.type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _merge_sources(folder: str, run: list[layout.SegmentEntry], dead_local: list[np.ndarray]):
    """The merged segment's sources and dropped source positions (None when a segment has no source)."""
    sources: list[dict] = []
    dropped: list[np.ndarray] = []
    base = 0
    for seg, dl in zip(run, dead_local, strict=True):
        sj = layout.read_segment_json(folder, seg)
        if not sj.get("sources"):
            return None, None
        own = np.zeros(0, np.int64)
        if sj.get("dropped"):
            own = np.load(os.path.join(layout.segment_folder(folder, seg), sj["dropped"]))
        total = seg.count + len(own)  # kept source rows of this segment
        positions = np.delete(np.arange(total, dtype=np.int64), own)  # local id -> source position
        dropped.append(np.union1d(own, positions[dl]) + base)
        sources.extend(sj["sources"])
        base += total
    return sources, (np.concatenate(dropped) if dropped else np.zeros(0, np.int64))
