"""`index --append`: add new embedding parts to an existing index as a new segment.

The new vectors are added to a copy of the index's trained (empty) index, so nothing already there is
retrained, rebuilt or even read: the cost is proportional to the new parts (the trained quantizer, the
manifest and index.json are small). Parts already in a segment (same folder and part name) are skipped,
so re-running an append, or appending a folder that grew, adds only what is new.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from typing import Any

import numpy as np

from clipsearch.errors import InputError
from clipsearch.index.build import faiss_mod, iter_part
from clipsearch.index.config import IndexConfig
from clipsearch.index.metadata import write_metadata
from clipsearch.index.readers import Source, detect_input, open_source
from clipsearch.segments import build, layout

logger = logging.getLogger(__name__)


def _covered_parts(folder: str, manifest: layout.Manifest, src_folder: str, src: Source) -> set[str]:
    """Names of the parts of `src_folder` that a visible segment already holds."""
    done: set[str] = set()
    for seg in manifest.segments:
        try:
            sj = layout.read_segment_json(folder, seg)
        except InputError:
            continue
        for rec in sj.get("sources") or []:
            if not rec or os.path.abspath(str(rec.get("folder"))) != src_folder:
                continue
            parts = rec.get("parts")
            if isinstance(parts, int):  # the base: the first N parts of its input folder
                done.update(p.name for p in src.parts[:parts])
            else:
                done.update(p["name"] for p in parts or [])
    return done


def _check_compatible(info: dict[str, Any], source: Source, cfg: IndexConfig) -> tuple[str, ...]:
    dim = int(info.get("dim") or 0)
    if source.dim != dim:
        raise InputError(
            f"the embeddings in {cfg.embeddings_folder} have dimension {source.dim}, the index in "
            f"{cfg.index_folder} holds {dim}-d vectors; nothing was written",
            hint="--embeddings-folder made with the index's model",
        )
    if source.model and info.get("model") and source.model != info.get("model"):
        raise InputError(
            f"the embeddings were made with {source.model}, the index with {info['model']}; nothing was "
            "written",
            hint="--embeddings-folder made with the index's model",
        )
    mods = tuple(m for m in ("image", "text") if m in (info.get("indices") or {}))
    missing = [m for m in mods if m not in source.modalities]
    if missing:
        raise InputError(
            f"the index has a {missing[0]} index but {cfg.embeddings_folder} has no {missing[0]} "
            "embeddings; nothing was written",
            hint="--embeddings-folder with img_emb/ and text_emb/",
        )
    return mods


def append_segment(cfg: IndexConfig) -> dict[str, Any]:
    """Append cfg.embeddings_folder to the index in cfg.index_folder as one new segment.

    Returns a report: the segment's name, offset and count, the parts added, the timings."""
    faiss = faiss_mod()
    t_start = time.perf_counter()
    faiss.omp_set_num_threads(cfg.threads)
    folder = layout.check_local_index(cfg.index_folder)
    info = layout.read_info(folder)
    manifest = layout.read_manifest(folder)
    fmt, column = detect_input(cfg.embeddings_folder, cfg.input_format, cfg.embedding_column)
    cfg = replace(cfg, input_format=fmt, embedding_column=column)
    source = open_source(cfg.embeddings_folder, cfg.input_format, cfg.embedding_column)
    mods = _check_compatible(info, source, cfg)
    src_folder = os.path.abspath(cfg.embeddings_folder)
    done = _covered_parts(folder, manifest, src_folder, source)
    new_parts = tuple(p for p in source.parts if p.name not in done)
    if not new_parts or sum(p.rows for p in new_parts) == 0:
        logger.info("append: every part of %s is already in the index", cfg.embeddings_folder)
        if manifest.explicit:
            with layout.writer_lock(folder):  # still remove what an interrupted writer left behind
                layout.cleanup(folder, layout.read_manifest(folder))
        return {"appended": 0, "segment": None, "skipped_parts": len(source.parts)}
    source = replace(source, parts=new_parts)
    timings: dict[str, float] = {}

    tmp = layout.new_tmp_segment(folder)
    try:
        # 1. the trained (empty) index of each modality: the manifest's, or derived once from the base
        t0 = time.perf_counter()
        trained_update: dict[str, dict[str, Any]] = {}
        indices: dict[str, Any] = {}
        for m in mods:
            path = build.trained_path(folder, manifest, m)
            if path is None:
                path = os.path.join(tmp, f"{m}.trained.index")
                build.derive_trained(folder, info, m, path)
                entry = (info.get("indices") or {}).get(m) or {}
                trained_update[m] = {
                    "file": None,  # set to the segment's final path at commit
                    "factory": entry.get("factory"),
                    "search_params": dict(entry.get("search_params") or {}),
                }
            indices[m] = faiss.read_index(path)
            if indices[m].ntotal:
                raise InputError(f"{path} is not an empty trained index ({indices[m].ntotal} vectors)")
        timings["trained_s"] = time.perf_counter() - t0

        # 2. add the new parts, batch by batch (the index stage's reader and cleaning)
        t0 = time.perf_counter()
        bad_rows: list[np.ndarray] = []
        added = skipped = 0
        for part in source.parts:
            bad_local = []
            for start, xs, bad, _ in iter_part(part, source, cfg.batch_rows, mods):
                keep = ~bad
                for m in mods:
                    x = np.ascontiguousarray(xs[m][keep])
                    if len(x):
                        indices[m].add(x)
                added += int(keep.sum())
                skipped += int(bad.sum())
                bad_local.append(np.flatnonzero(bad) + start)
            bad_rows.append(np.concatenate(bad_local) if bad_local else np.zeros(0, np.int64))
        timings["add_s"] = time.perf_counter() - t0
        if added == 0:
            raise InputError(f"every vector of the new parts of {cfg.embeddings_folder} is NaN or all-zero")
        if skipped:
            logger.warning("append: skipped %d samples with a NaN or all-zero vector", skipped)

        # 3. write the segment: indices, metadata.arrow, index.json, segment.json
        t0 = time.perf_counter()
        entries = {}
        for m in mods:
            t = manifest.trained.get(m) or trained_update.get(m) or {}
            build.write_index(indices[m], os.path.join(tmp, f"{m}.index"), ondisk=False)
            entries[m] = build.index_entry(
                tmp, m, indices[m], t.get("factory"), t.get("search_params") or {}, False,
                "appended segment: the index's trained quantizer and search parameters",
            )  # fmt: skip
        rows = write_metadata(
            source, cfg.input_format, bad_rows, os.path.join(tmp, "metadata.arrow"), cfg.batch_rows
        )
        if rows != added:
            raise InputError(f"metadata.arrow has {rows} rows but the segment holds {added} vectors")
        timings["write_s"] = time.perf_counter() - t0
        record = build.source_record(source, cfg.embeddings_folder, cfg.input_format, mods)
        seg_info = build.segment_info(info, entries, added, "pending", "append", timings)
        seg_info["keywords"] = build.keyword_index(info, tmp, timings)
        _write_json(os.path.join(tmp, "index.json"), seg_info)
        layout.sync_tree(tmp)
        layout.crash_point("append:segment-written")

        # 4. commit: name it, then one atomic manifest update makes it visible
        uid = build.new_uid()
        with layout.writer_lock(folder):
            current = layout.read_manifest(folder)
            if _covered_parts(folder, current, src_folder, source) & {p.name for p in new_parts}:
                raise InputError(f"another append of {cfg.embeddings_folder} committed first; nothing added")
            name = layout.next_segment_name(folder, current)
            offset = current.count
            seg_info["segment"]["name"] = name
            _write_json(os.path.join(tmp, "index.json"), seg_info)
            sj = {
                "format": "clipsearch.segment",
                "version": 1,
                "name": name,
                "uid": uid,
                "kind": "append",
                "offset": offset,
                "count": added,
                "created": time.time(),
                "sources": [record],
                "dropped": None,
            }
            _write_json(os.path.join(tmp, layout.SEGMENT_JSON), sj)
            layout.sync_tree(tmp)
            rel = layout.install_segment(folder, tmp, name)
            layout.crash_point("append:before-manifest")
            trained = dict(current.trained)
            for m, t in trained_update.items():
                if not build.trained_path(folder, current, m):
                    trained[m] = {**t, "file": f"{rel}/{m}.trained.index"}
            seg = layout.SegmentEntry(name, rel, offset, added, uid)
            new = replace(
                current,
                generation=current.generation + 1,
                segments=current.segments + (seg,),
                trained=trained,
            )
            layout.write_manifest(folder, new)
            layout.crash_point("append:after-manifest")
            layout.cleanup(folder, new)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings["total_s"] = time.perf_counter() - t_start
    logger.info(
        "appended %d vectors as segment %s (ids %d..%d) in %.2f s", added, name, offset, offset + added - 1,
        timings["total_s"],
    )  # fmt: skip
    return {
        "appended": added,
        "skipped_samples": skipped,
        "segment": name,
        "offset": offset,
        "parts": [p.name for p in new_parts],
        "generation": new.generation,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
