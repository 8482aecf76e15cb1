"""build_index(cfg): check -> plan -> scan -> train -> add parts (distributed) -> merge -> tune -> write."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace

import numpy as np

from clipsearch import storage
from clipsearch.distribute import distribute
from clipsearch.errors import IndexBuildError, InputError, OutputExistsError, UnitFailedError
from clipsearch.index import build, family, rotation
from clipsearch.index.config import IndexConfig, format_memory
from clipsearch.index.plan import Plan, measured_pq_scan_rate, plan_candidates, rotation_bytes, train_points
from clipsearch.index.readers import detect_input, load_queries, open_source
from clipsearch.index.tune import far_queries, tune

logger = logging.getLogger(__name__)

# what an interrupted run of ours leaves behind; a folder holding only these is resumed
RESUMABLE = {build.PARTS_DIR, "image.trained.index", "text.trained.index", "keywords"}
N_SAME_QUERIES = 500


@functools.cache
def _scan_rate(d: int) -> float:
    """This machine's PQ code scan rate, which decides whether the full-scan plan fits the query budget."""
    rate = measured_pq_scan_rate(d)
    logger.info("8-bit PQ%d codes scan at %.2f GB/s on one core here", d // 8, rate / 1e9)
    return rate


def _check_output(folder: str) -> bool:
    """True when resuming an interrupted run. Raises OutputExistsError when the folder holds anything else."""
    state = storage.folder_state(folder)
    if state != "nonempty":
        return False
    fs, p = storage.get_fs(folder)
    names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(p, detail=False)} if fs.isdir(p) else {"?"}
    if names <= RESUMABLE:
        logger.info("resuming the interrupted build in %s", folder)
        return True
    raise OutputExistsError(
        f"the index folder {folder} already holds {', '.join(sorted(names)[:3])}; nothing was overwritten",
        hint="--index-folder NEW_FOLDER (or remove the old one)",
    )


def build_index(cfg: IndexConfig) -> dict:
    """Build the image (and text) indices of cfg.embeddings_folder into cfg.index_folder.

    Returns the content of index.json (written last)."""
    import faiss

    t_start = time.perf_counter()
    faiss.omp_set_num_threads(cfg.threads)
    resume = _check_output(cfg.index_folder)
    fmt, column = detect_input(cfg.embeddings_folder, cfg.input_format, cfg.embedding_column)
    cfg = replace(cfg, input_format=fmt, embedding_column=column)
    source = open_source(cfg.embeddings_folder, cfg.input_format, cfg.embedding_column)
    n_total = source.total_rows
    if n_total == 0:
        raise InputError(
            f"the embeddings in {cfg.embeddings_folder} have no rows", hint="--embeddings-folder"
        )
    d = source.dim
    modalities = source.modalities
    tuning_q = load_queries(cfg.tuning_queries, d) if cfg.tuning_queries else None
    plans: dict[str, list[Plan]] = {  # candidates, measured on the sample once it is drawn (index.family)
        m: plan_candidates(
            n_total,
            d,
            cfg.budget_bytes,
            cfg.max_index_query_time_ms,
            mmap=cfg.should_be_memory_mappable,
            index_key=cfg.index_key,
            scan_bytes_per_s=lambda: _scan_rate(d),
        )
        for m in modalities
    }
    for m, cands in plans.items():
        for p in cands:
            logger.info("%s index%s: %s (%s)", m, " candidate" if len(cands) > 1 else "", p.factory, p.reason)

    local = storage.is_local(cfg.index_folder)
    created = local and not os.path.exists(cfg.index_folder)
    work = cfg.index_folder if local else tempfile.mkdtemp(prefix="clipsearch-index-")
    os.makedirs(os.path.join(work, build.PARTS_DIR), exist_ok=True)
    timings: dict[str, float] = {}
    try:
        return _build(cfg, source, plans, tuning_q, work, local, resume, timings, t_start)
    except (InputError, IndexBuildError):
        # bad input found while scanning: leave nothing behind (a crash keeps .parts to resume)
        if not resume:
            build.cleanup_parts(work)
            for m in modalities:
                p = os.path.join(work, f"{m}.trained.index")
                if os.path.exists(p):
                    os.remove(p)
            if created and not os.listdir(work):
                os.rmdir(work)
        raise
    finally:
        if not local:
            shutil.rmtree(work, ignore_errors=True)


def _build(cfg, source, candidates, tuning_q, work, local, resume, timings, t_start) -> dict:
    n_total = source.total_rows
    d = source.dim
    modalities = source.modalities
    # 1. scan: bad rows, training sample and tuning queries, across all parts
    t0 = time.perf_counter()
    n_train = cfg.max_train_points or max(train_points(p, d) for ps in candidates.values() for p in ps)
    logger.info("training sample: %d vectors drawn across %d parts", min(n_train, n_total), len(source.parts))
    sc = build.scan(source, modalities, n_train, cfg.n_tuning_queries, cfg.batch_rows, cfg.seed)
    timings["scan_s"] = time.perf_counter() - t0
    n = sum(sc.kept)
    if n == 0:
        raise InputError(f"every vector in {cfg.embeddings_folder} is NaN or all-zero")
    if sc.skipped:
        logger.warning(
            "skipped %d of %d samples with a NaN (%d) or all-zero (%d) vector; they are in no index "
            "and not in metadata.arrow",
            sc.skipped,
            n_total,
            sc.bad["nan"],
            sc.bad["zero"],
        )
    queries = _tuning_queries(sc, modalities, tuning_q, cfg.clip_model or source.model)
    np.savez(
        os.path.join(work, build.PARTS_DIR, "queries.npz"),
        **{m: np.concatenate([q["cross"], q["same"], q["far"]]) for m, q in queries.items()},
    )

    # 2. the code family, rotate or not (both decided on the sample), then train on the sample
    t0 = time.perf_counter()
    plans: dict[str, Plan] = {}
    families: dict[str, dict] = {}
    for m in modalities:
        t_fam = time.perf_counter()
        plans[m], families[m] = _family(candidates[m], n, sc.train[m], queries[m]["cross"], work, m, cfg.seed)
        timings[f"family_{m}_s"] = time.perf_counter() - t_fam
    rotations: dict[str, dict] = {}
    for m in modalities:
        path = os.path.join(work, f"{m}.trained.index")
        if resume and os.path.exists(path):
            chain, _ = build.split_transform(build.read_index(path))
            rotations[m] = {"chosen": rotation.NAME if chain else "none", "reason": "resumed build"}
            continue
        t_rot = time.perf_counter()
        choice = _rotation(cfg, plans[m], sc.train[m], queries[m]["cross"])
        rotations[m] = choice.to_json()
        timings[f"rotation_{m}_s"] = time.perf_counter() - t_rot
        build.train_index(plans[m].factory, d, sc.train[m], path, rotation=choice.rotation)
    sc.train.clear()
    timings["train_s"] = time.perf_counter() - t0

    # 3. add part by part: the units, possibly distributed
    t0 = time.perf_counter()
    offsets = np.concatenate([[0], np.cumsum(sc.kept)[:-1]]).astype(int)
    units = [
        build.PartUnit(
            name=p.name,
            part=p,
            source=source,
            modalities=modalities,
            kinds=tuple(plans[m].kind for m in modalities),
            id_offset=int(off),
            work_dir=work,
            batch_rows=cfg.batch_rows,
            threads=max(1, cfg.threads // max(1, cfg.distributor.processes)),
        )
        for p, off in zip(source.parts, offsets, strict=True)
    ]
    results = distribute(build.run_part, units, cfg.distributor, _progress(len(units), cfg.progress))
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            logger.error("part %s failed: %s\n%s", r.unit, r.error, r.extra.get("traceback", ""))
        raise UnitFailedError(f"{len(failed)} part(s) failed, first: {failed[0].unit}: {failed[0].error}")
    timings["add_s"] = time.perf_counter() - t0

    # 4. merge (the reduce), 5. tune
    names = [p.name for p in source.parts]
    indices: dict[str, dict] = {}
    for m in modalities:
        t0 = time.perf_counter()
        out = os.path.join(work, f"{m}.index")
        if plans[m].kind == "ivf":
            _, mmap = build.merge_ivf(work, names, m, n, out)
        else:
            build.fill_sequential(source, m, modalities, work, out, cfg.batch_rows)
            mmap = False
        timings[f"merge_{m}_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gt = build.merge_ground_truth(work, names, m)
        n_cross, n_same = len(queries[m]["cross"]), len(queries[m]["same"])
        gts = {"cross": gt[:n_cross], "same": gt[n_cross : n_cross + n_same], "far": gt[n_cross + n_same :]}
        index = build.read_index(out, mmap)
        tuned = tune(index, plans[m].kind, queries[m], gts, cfg.max_index_query_time_ms, cfg.min_recall)
        timings[f"tune_{m}_s"] = time.perf_counter() - t0
        size = os.path.getsize(out)
        if mmap:
            size += os.path.getsize(out[: -len(".index")] + ".ivfdata")
        indices[m] = {
            "file": f"{m}.index",
            "factory": plans[m].factory,
            "reason": plans[m].reason,
            "family": families[m],
            "rotation": rotations[m],
            "search_params": tuned.search_params,
            # a Flat index asked to be memory-mappable is mapped by the searcher (IO_FLAG_MMAP_IFC)
            "mmap": bool(mmap) or (plans[m].mmap and plans[m].kind == "flat"),
            "memory_bytes": int(size),
            "count": int(index.ntotal),
            "trained_file": f"{m}.trained.index",
            "tuning": {
                "rule": tuned.rule,
                "reason": tuned.reason,
                "measured": {k: v for k, v in tuned.point.items() if k != "params"},
                "queries_text_like": n_cross,
                "queries_same_modality": len(queries[m]["same"]),
                "text_like_source": queries[m]["cross_source"],
            },
            "curve": tuned.curve,
        }
        if mmap:
            indices[m]["ivfdata"] = f"{m}.ivfdata"
        del index
        logger.info("%s index: %s, %s, %s", m, plans[m].factory, format_memory(size), tuned.search_params)

    # 6. metadata, then index.json last
    from clipsearch.index.metadata import write_metadata

    t0 = time.perf_counter()
    bad_rows = (
        _bad_rows(source, modalities, cfg.batch_rows)
        if sc.skipped
        else [np.zeros(0, np.int64) for _ in source.parts]
    )
    rows = write_metadata(
        source, cfg.input_format, bad_rows, os.path.join(work, "metadata.arrow"), cfg.batch_rows
    )
    if rows != n:
        raise InputError(f"metadata.arrow has {rows} rows but the indices hold {n} vectors")
    timings["metadata_s"] = time.perf_counter() - t0
    keywords = None  # the caption keyword index (clipsearch.keywords), unless --no-text-index
    if cfg.text_index:
        from clipsearch.keywords.writer import build_keyword_index

        t0 = time.perf_counter()
        keywords = build_keyword_index(work, threads=cfg.threads, tmp_dir=os.path.join(work, build.PARTS_DIR))
        timings["keywords_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    info = {
        "format": "clipsearch.index",
        "version": 1,
        "model": source.model,
        "dim": d,
        "metric": "inner_product",
        "count": n,
        "skipped": {"nan": sc.bad["nan"], "zero": sc.bad["zero"], "samples": sc.skipped},
        "input": {
            "folder": cfg.embeddings_folder,
            "format": cfg.input_format,
            "parts": len(source.parts),
        },
        "budget": {
            "max_index_memory_usage": cfg.budget_bytes,
            "max_index_query_time_ms": cfg.max_index_query_time_ms,
            "min_recall": cfg.min_recall,
        },
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "indices": indices,
        "keywords": keywords,
    }
    build.cleanup_parts(work)
    storage.write_json_atomic(os.path.join(work, "index.json"), info)
    if not local:
        _upload(work, cfg.index_folder)
    logger.info("index built: %d vectors in %.1f s -> %s", n, timings["total_s"], cfg.index_folder)
    return info


def _family(
    cands: list[Plan],
    n: int,
    sample: np.ndarray,
    text_queries: np.ndarray,
    work: str,
    modality: str,
    seed: int,
) -> tuple[Plan, dict]:
    """The candidate plan measured best on the sample; a resumed build reuses its first run's choice
    (its trained index is of that plan)."""
    path = os.path.join(work, build.PARTS_DIR, f"{modality}.family.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for p in cands:
            if p.factory == saved["chosen"]:
                return p, saved
    choice = family.choose(cands, n, sample, text_queries, seed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(choice.to_json(), f)
    os.replace(tmp, path)
    return choice.plan, choice.to_json()


def _rotation(cfg: IndexConfig, plan: Plan, sample: np.ndarray, text_queries: np.ndarray) -> rotation.Choice:
    if cfg.rotation == "none":
        return rotation.Choice(None, "--rotation none")
    if cfg.rotation == rotation.NAME:
        if not rotation.sub_vector_sizes(plan.factory, sample.shape[1]):
            return rotation.Choice(None, f"{plan.factory} has no product-quantized codes to rotate for")
        return rotation.Choice(rotation.NAME, f"--rotation {rotation.NAME}")
    if cfg.index_key:
        return rotation.Choice(None, "the factory was forced by --index-key")
    if not plan.rotation_fits:
        return rotation.Choice(
            None,
            f"no room for the {format_memory(rotation_bytes(sample.shape[1]))} rotation beside {plan.factory}",
        )
    return rotation.choose(plan.factory, sample, text_queries, cfg.seed)


def _tuning_queries(sc, modalities, tuning_q, model: str | None) -> dict[str, dict]:
    """Per index: `cross` (text-like) and `same` (same-modality) held-out queries.

    Text-like queries for the image index, first found first: --tuning-queries, the caption embeddings
    of held-out samples, prompts encoded by the model's text tower; none means the budget rule
    (tune.py). The text index is tuned on the images of held-out samples."""
    out = {}
    for m in modalities:
        other = [o for o in modalities if o != m]
        if m == "image" and tuning_q is not None:
            cross, src = tuning_q, "--tuning-queries"
        elif other:
            cross, src = sc.queries[other[0]], f"{other[0]} embeddings of held-out samples"
        else:
            cross, src = _prompt_queries(model, sc.queries[m].shape[1], len(sc.queries[m]))
        same = sc.queries[m][:N_SAME_QUERIES] if len(cross) else sc.queries[m]
        out[m] = {
            "cross": np.ascontiguousarray(cross, dtype=np.float32),
            "same": np.ascontiguousarray(same),
            "far": far_queries(len(cross), sc.queries[m].shape[1]),
            "cross_source": src,
        }
    return out


def _prompt_queries(model: str | None, dim: int, n: int) -> tuple[np.ndarray, str]:
    """The shipped prompts (index/prompts.py) encoded by the model's text tower, or none (with the
    reason) when the model is unknown or its text tower cannot be used."""
    none = np.zeros((0, dim), np.float32)
    if not model:
        logger.warning(
            "no text-like queries to tune on (no captions, no --tuning-queries, and the model is unknown: "
            "give --clip-model): spending the query-time budget, as autofaiss does"
        )
        return none, "none: budget rule (no captions, no --tuning-queries, model unknown)"
    from clipsearch.index.prompts import prompts

    t0 = time.perf_counter()
    try:
        from clipsearch.embed.models import load_clip

        encoder = load_clip(model, device="cpu")
        texts = prompts(n)
        q = np.asarray(encoder.encode_text(texts), dtype=np.float32)
    except Exception as e:  # any failure of the optional tower falls back to the budget rule
        logger.warning(
            "cannot encode tuning prompts with the text tower of %s (%s); spending the query-time budget "
            "instead",
            model,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        return none, f"none: budget rule (the text tower of {model} could not be used)"
    if q.ndim != 2 or q.shape[1] != dim:
        logger.warning(
            "the text tower of %s gives %s-dimensional vectors, the embeddings have %d: spending the "
            "query-time budget instead",
            model,
            q.shape[-1],
            dim,
        )
        return none, f"none: budget rule ({model}'s text tower has another dimension)"
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    logger.info(
        "encoded %d tuning prompts with %s's text tower in %.1f s", len(q), model, time.perf_counter() - t0
    )
    return q, f"{len(q)} shipped prompts encoded by the text tower of {model}"


def _bad_rows(source, modalities, batch_rows) -> list[np.ndarray]:
    out = []
    for part in source.parts:
        rows = []
        for start, _, bad, _ in build.iter_part(part, source, batch_rows, modalities):
            rows.append(np.nonzero(bad)[0] + start)
        out.append(np.concatenate(rows) if rows else np.zeros(0, np.int64))
    return out


def _progress(total: int, enabled: bool):
    state = {"done": 0}

    def cb(res) -> None:
        state["done"] += 1
        if enabled:
            logger.info("part %s done (%d/%d) %s", res.unit, state["done"], total, res.counts)

    return cb


def _upload(work: str, folder: str) -> None:
    fs, p = storage.get_fs(folder)
    fs.makedirs(p, exist_ok=True)
    names = sorted(os.listdir(work), key=lambda x: x == "index.json")  # index.json last
    for name in names:
        if name.startswith("."):
            continue
        if os.path.isdir(os.path.join(work, name)):  # keywords/
            fs.put(os.path.join(work, name), p.rstrip("/") + "/" + name, recursive=True)
            continue
        fs.put_file(os.path.join(work, name), p.rstrip("/") + "/" + name)
