"""The download stage: check everything, cut the input into shards, run them, sum up.

`run_shard(shard, cfg, ...)` is the unit of work. It is a module-level function of picklable arguments,
so the local process pool and Spark run the same code. Inside a shard, one asyncio loop fetches with up
to `thread_count` requests in flight, and a small thread pool decodes/resizes/encodes (Pillow releases
the GIL there). A shard is complete when its stats file exists; it is written last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import multiprocessing as mp
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch import storage
from clipsearch.distribute import UnitResult, distribute
from clipsearch.download import blur, reader, resize, stats, writers
from clipsearch.download.config import DownloadConfig
from clipsearch.download.fetch import Fetched, Fetcher
from clipsearch.errors import ConfigError, OutputExistsError, UnitFailedError

logger = logging.getLogger(__name__)

MARKER = ".clipsearch-download.json"
MARKER_FORMAT = "clipsearch.images"
_SHARD_FILE = re.compile(r"^\d+(\.tar|\.parquet|\.stats\.json|\.tfrecord)?$")
_OURS = re.compile(r"^(\d+(\.tar|\.parquet|\.stats\.json|\.tfrecord)?|run_stats\.json|_inputs|\..*\.tmp)$")
_PROGRESS_EVERY_S = 0.5


# ---------------------------------------------------------------- the unit of work


def shard_key(shard_id: int, row: int, per_shard: int, shard_digits: int = 5) -> str:
    digits = max(4, len(str(per_shard - 1)))
    return f"{shard_id:0{shard_digits}d}{row:0{digits}d}"


def url_hash(url: str | None) -> str | None:
    return hashlib.sha256(url.encode()).hexdigest()[:16] if url else None


def run_shard(shard: reader.Shard, cfg: DownloadConfig, progress: Any = None, seen: Any = None) -> UnitResult:
    """Download one shard and write it. `progress`: a queue for (done, successes) deltas, or None.
    `seen`: a dict shared across the run for --dedup, or None for a per-shard one."""
    start = time.time()
    t0 = time.perf_counter()
    out = shard.output_folder
    stats_path = storage.join(out, f"{shard.name}.stats.json")
    if shard.retry:
        old, rows = _failed_rows(shard, cfg)
        if not rows:
            return UnitResult(unit=shard.name, skipped=True, extra={"stats": storage.read_json(stats_path)})
        fs, p = storage.get_fs(stats_path)
        if fs.exists(p):
            fs.rm(p)  # from here on the shard counts as unfinished: a kill now means a full redo
    else:
        old = None
        table = reader.read_shard(shard, cfg)
        rows = _rows_from_table(table, shard.shard_id, cfg)
        if cfg.output_format == "files":
            _rm(storage.join(out, shard.name))
    extras = _extras_schema(old if old is not None else table, cfg)
    tally = stats.ShardTally()
    seen = {} if seen is None else seen
    with (
        writers.open_writer(cfg, shard.shard_id, extras) as w,
        blur.single_threaded_blas(cfg.bbox_col is not None),
    ):
        # every key of the shard, so that the writer can lay the samples out in key order as they come
        w.expect(old.column("key").to_pylist() if old is not None else [r["key"] for r in rows])
        if old is not None:
            _carry_over(w, old, {r["key"] for r in rows}, cfg, tally)
        asyncio.run(_download(rows, w, cfg, tally, progress, seen))
    end = time.time()
    shard_stats = tally.to_json(shard.shard_id, start, end)
    storage.write_json_atomic(stats_path, shard_stats)  # last: marks the shard complete
    return UnitResult(
        unit=shard.name,
        counts=dict(tally.status),
        duration_s=time.perf_counter() - t0,
        extra={"stats": shard_stats, "processed": len(rows)},
    )


def _rows_from_table(table: pa.Table, shard_id: int, cfg: DownloadConfig) -> list[dict[str, Any]]:
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    urls = cols.pop("url")
    caps = cols.pop("caption", None)
    rows = []
    for i, u in enumerate(urls):
        row = {
            "key": shard_key(shard_id, i, cfg.number_sample_per_shard, cfg.oom_shard_count),
            "url": u,
            "caption": caps[i] if caps is not None else None,
        }
        row.update({c: v[i] for c, v in cols.items()})
        rows.append(row)
    return rows


def _extras_schema(table: pa.Table, cfg: DownloadConfig) -> pa.Schema:
    return pa.schema([table.schema.field(c) for c in cfg.carried_columns if c in table.column_names])


async def _download(
    rows: list[dict[str, Any]],
    w: writers._Base,
    cfg: DownloadConfig,
    tally: stats.ShardTally,
    progress: Any,
    seen: Any,
) -> None:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="decode")
    lock = threading.Lock()
    pending = [0, 0]
    last = [time.perf_counter()]

    def report(force: bool = False) -> None:
        now = time.perf_counter()
        if progress is not None and pending[0] and (force or now - last[0] >= _PROGRESS_EVERY_S):
            try:
                progress.put((pending[0], pending[1]))
            except Exception:  # the parent went away: progress is best effort
                logger.debug("progress queue unavailable")
            pending[0] = pending[1] = 0
            last[0] = now

    try:
        async with Fetcher(cfg) as fetcher:
            it = iter(rows)
            # Backpressure: while the decoders are behind (CPU-bound), start no new request. Requests in
            # flight then stay few, so the loop serves them promptly and their deadlines measure the
            # server, not our own backlog. When the network is the bottleneck the backlog stays short
            # and all `thread_count` requests run.
            max_backlog = max(4, 2 * cfg.decode_threads)
            backlog = [0]
            room = asyncio.Event()
            room.set()

            async def worker() -> None:
                for row in it:
                    while backlog[0] >= max_backlog:
                        room.clear()
                        await room.wait()
                    try:  # malformed boxes: the sample can never be stored blurred, so not even fetched
                        boxes = blur.parse_boxes(row.get(cfg.bbox_col)) if cfg.bbox_col else ()
                    except blur.BoxError as e:
                        f, boxes = Fetched("failed_to_blur", error=str(e)), ()
                    else:
                        f = await fetcher.fetch(row["url"])
                    if f.status == "ok":
                        backlog[0] += 1
                        try:
                            sample = await loop.run_in_executor(
                                pool, _make_sample, row, f.data, cfg, seen, lock, boxes
                            )
                        finally:
                            backlog[0] -= 1
                            if backlog[0] < max_backlog:
                                room.set()
                    else:
                        sample = _sample(row, cfg, f.status, f.error)
                    w.write(sample)
                    st = sample.meta["status"]
                    tally.add(st, sample.meta["error_message"])
                    pending[0] += 1
                    pending[1] += st == "success"
                    report()

            await asyncio.gather(*[worker() for _ in range(min(cfg.thread_count, len(rows)))])
    finally:
        pool.shutdown(wait=True)
        report(force=True)


def _sample(
    row: dict[str, Any], cfg: DownloadConfig, status: str, error: str | None, **fields: Any
) -> writers.Sample:
    meta: dict[str, Any] = {
        "key": row["key"],
        "url": row["url"],
        "caption": row["caption"],
        "status": status,
        "error_message": error,
        "width": fields.get("width"),
        "height": fields.get("height"),
        "original_width": fields.get("original_width"),
        "original_height": fields.get("original_height"),
        "sha256": fields.get("sha256"),
        "url_hash": url_hash(row["url"]),
    }
    if cfg.extract_exif:
        meta["exif"] = fields.get("exif")
    if cfg.compute_hash in ("md5", "sha512"):
        meta[cfg.compute_hash] = fields.get(cfg.compute_hash)
    for c in cfg.carried_columns:
        meta[c] = row.get(c)
    return writers.Sample(row["key"], meta, fields.get("image"))


def _make_sample(
    row: dict[str, Any],
    data: bytes,
    cfg: DownloadConfig,
    seen: Any,
    lock: threading.Lock,
    boxes: tuple[blur.Box, ...] = (),
) -> writers.Sample:
    """Runs in the decode thread pool: dedup check, decode/resize/blur/encode, hashes."""
    if cfg.verify_hash is not None:
        col, algo = cfg.verify_hash
        want = row.get(col)
        if want and hashlib.new(algo, data).hexdigest() != str(want).lower():
            return _sample(row, cfg, "failed_to_download", f"{algo} mismatch")
    if cfg.dedup:
        h = hashlib.sha256(data).hexdigest()
        with lock:
            first = seen.setdefault(h, row["key"])
        if first != row["key"]:
            return _sample(row, cfg, "duplicate", f"same content as {first}")
    try:
        p = resize.process(data, cfg, boxes)
    except resize.BlurFailed as e:
        return _sample(row, cfg, "failed_to_blur", str(e))
    except resize.ImageError as e:
        return _sample(row, cfg, "failed_to_resize", str(e))
    fields: dict[str, Any] = {
        "image": p.data,
        "width": p.width,
        "height": p.height,
        "original_width": p.original_width,
        "original_height": p.original_height,
        "exif": p.exif,
    }
    if cfg.compute_hash == "sha256":
        fields["sha256"] = hashlib.sha256(p.data).hexdigest()
    elif cfg.compute_hash in ("md5", "sha512"):
        fields[cfg.compute_hash] = hashlib.new(cfg.compute_hash, p.data).hexdigest()
    return _sample(row, cfg, "success", None, **fields)


# ---------------------------------------------------------------- --retry-failed


def _failed_rows(shard: reader.Shard, cfg: DownloadConfig) -> tuple[pa.Table, list[dict[str, Any]]]:
    """The finished shard's metadata table, and the rows to fetch again (failed ones)."""
    path = storage.join(shard.output_folder, f"{shard.name}.parquet")
    fs, p = storage.get_fs(path)
    with fs.open(p, "rb") as f:
        old = pq.read_table(f)
    failed = [
        r
        for r in old.drop_columns([c for c in (cfg.encode_format,) if c in old.column_names]).to_pylist()
        if r["status"] in ("failed_to_download", "failed_to_resize")
    ]
    return old, failed


def _carry_over(
    w: writers._Base, old: pa.Table, redo: set[str], cfg: DownloadConfig, tally: stats.ShardTally
) -> None:
    """Copy the rows (and stored images) of a finished shard that are not being fetched again."""
    kept = [r for r in old.to_pylist() if r["key"] not in redo]
    for r in kept:
        tally.add(r["status"], r.get("error_message"))
    w.carry_over(kept, redo)


# ---------------------------------------------------------------- the whole run


def _rm(path: str) -> None:
    fs, p = storage.get_fs(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def prepare_output(cfg: DownloadConfig) -> tuple[bool, dict[str, Any]]:
    """Check the output folder before any work. Returns (True when resuming a previous run, the
    folder's marker)."""
    out = cfg.output_folder
    try:
        state = storage.folder_state(out)
    except Exception as e:
        raise ConfigError(f"cannot use output folder {out}: {e}", hint="--output-folder") from e
    marker = storage.join(out, MARKER)
    if state == "nonempty":
        fs, p = storage.get_fs(out)
        if not fs.isdir(p):
            raise OutputExistsError(f"output folder {out} is a file", hint="--output-folder DIR")
        names = [_basename(n) for n in fs.ls(p, detail=False)]
        if MARKER in names:
            prev = storage.read_json(marker)
            if prev.get("format") != MARKER_FORMAT:
                raise OutputExistsError(
                    f"{out} holds a {prev.get('format')!r} folder, not a download; nothing changed",
                    hint="--output-folder NEW_DIR",
                )
        else:
            prev = None
            foreign = [n for n in names if not _OURS.match(n)]
            if foreign:
                raise OutputExistsError(
                    f"output folder {out} exists and holds files that are not a clipsearch download "
                    f"(e.g. {foreign[0]!r}); nothing was changed",
                    hint="--output-folder NEW_DIR",
                )
        if cfg.incremental_mode == "overwrite":
            logger.info("overwriting %s", out)
            for n in fs.ls(p, detail=False):
                fs.rm(n, recursive=True)
        else:
            if prev is not None:
                for field, hint in (
                    ("output_format", "--output-format"),
                    ("number_sample_per_shard", "--number-sample-per-shard"),
                    ("oom_shard_count", "--oom-shard-count"),
                ):
                    if prev.get(field, 5 if field == "oom_shard_count" else None) != getattr(cfg, field):
                        raise ConfigError(
                            f"{out} holds a previous run with {field}={prev.get(field)!r}; resume with the same "
                            f"value or start over with --incremental-mode overwrite",
                            hint=hint,
                        )
            for n in fs.ls(p, detail=False):  # temporaries of a killed run
                if _basename(n).startswith(".") and n.endswith(".tmp"):
                    fs.rm(n, recursive=True)
            if prev is not None:
                return True, prev
            prev = _marker(cfg)
            storage.write_json_atomic(marker, prev)
            return True, prev
    storage.makedirs(out)
    prev = _marker(cfg)
    storage.write_json_atomic(marker, prev)
    return False, prev


def _marker(cfg: DownloadConfig) -> dict[str, Any]:
    return {
        "format": MARKER_FORMAT,
        "version": 1,
        "output_format": cfg.output_format,
        "number_sample_per_shard": cfg.number_sample_per_shard,
        "oom_shard_count": cfg.oom_shard_count,
        "url_list": cfg.url_list,
        "encode_format": cfg.encode_format,
        "runs": [],
    }


def shard_ids_present(out: str) -> set[int]:
    """Every shard number with a file (or a `files` folder) in the output, finished or not."""
    fs, p = storage.get_fs(out)
    return {
        int(_basename(n).split(".")[0]) for n in fs.ls(p, detail=False) if _SHARD_FILE.match(_basename(n))
    }


def _first_shard(
    cfg: DownloadConfig, marker: dict[str, Any], resuming: bool
) -> tuple[int, dict[str, Any] | None]:
    """Where this run's shard numbers start, and the marker entry of an --incremental-mode extend run.

    extend appends the list as new shards after every shard the folder has or was planned to have (as
    img2dataset does). Its entry is recorded before the first download and marked complete at the end,
    so the same extend command after a kill resumes that extension instead of appending a second copy."""
    if cfg.incremental_mode != "extend":
        return 0, None
    runs = marker.setdefault("runs", [])
    last = runs[-1] if runs else None
    if (
        last
        and last.get("mode") == "extend"
        and not last.get("complete")
        and last.get("url_list") == cfg.url_list
    ):
        logger.info("resuming the unfinished extension from shard %d", last["first_shard"])
        return int(last["first_shard"]), last
    ends = [int(r["first_shard"]) + int(r.get("shards") or 0) for r in runs]
    present = shard_ids_present(cfg.output_folder) if resuming else set()
    first = max([*ends, max(present, default=-1) + 1, 0])
    entry = {
        "mode": "extend",
        "url_list": cfg.url_list,
        "first_shard": first,
        "shards": None,
        "complete": False,
    }
    runs.append(entry)
    return first, entry


def _record_run(
    cfg: DownloadConfig, marker: dict[str, Any], entry: dict[str, Any] | None, n_shards: int
) -> None:
    """Note this run's shard range in the marker (so a later extend starts after it)."""
    runs = marker.setdefault("runs", [])
    if entry is None:
        if any(r.get("mode") == "incremental" for r in runs):
            return
        runs.insert(
            0, {"mode": "incremental", "url_list": cfg.url_list, "first_shard": 0, "shards": n_shards}
        )
    elif entry.get("shards") == n_shards:
        return
    else:
        entry["shards"] = n_shards
    storage.write_json_atomic(storage.join(cfg.output_folder, MARKER), marker)


def done_shards(out: str) -> set[int]:
    return {
        int(_basename(p).split(".")[0])
        for p in storage.listdir(out, ".stats.json")
        if _SHARD_FILE.match(_basename(p))
    }


def config_dict(cfg: DownloadConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["distributor"] = dataclasses.asdict(cfg.distributor)
    return d


def validate(cfg: DownloadConfig) -> tuple[list[str], str, DownloadConfig, reader.Footers | None]:
    """All the checks that must pass before any work starts. Returns (input files, input format, the
    config with defaults that depend on the input resolved, the parquet footers if any)."""
    files, fmt = reader.list_input_files(cfg.url_list, cfg.input_format)
    cfg = reader.check_columns(files[0], fmt, cfg)
    footers = reader.check_files(files, fmt, cfg)
    if cfg.enable_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                "--enable-wandb needs Weights & Biases: pip install 'clipsearch[wandb]'",
                hint="--enable-wandb",
            ) from e
    return files, fmt, cfg, footers


def download(cfg: DownloadConfig) -> dict[str, Any]:
    """Download `cfg.url_list` into shards in `cfg.output_folder`; returns the run stats (also saved as
    `run_stats.json`). Raises a ClipsearchError before any work on bad input, options or output folder."""
    files, fmt, cfg, footers = validate(cfg)
    resuming, marker = prepare_output(cfg)
    done = done_shards(cfg.output_folder) if resuming else set()
    first, extension = _first_shard(cfg, marker, resuming)
    if done and extension is None:
        logger.info("resuming: %d shards already complete", len(done))
    t_plan = time.perf_counter()
    todo, n_shards, n_rows = reader.plan_shards(cfg, files, fmt, done, first=first, footers=footers)
    _record_run(cfg, marker, extension, n_shards)
    if cfg.retry_failed:
        todo = sorted(
            todo
            + [
                reader.Shard(i, (), 0, cfg.output_folder, retry=True, digits=cfg.oom_shard_count)
                for i in sorted(done)
            ],
            key=lambda s: s.shard_id,
        )
    logger.info(
        "%d rows in %d shards; %d to do (planned in %.1fs)",
        n_rows,
        n_shards,
        len(todo),
        time.perf_counter() - t_plan,
    )
    to_process = sum(s.count for s in todo if not s.retry)

    wandb_run = stats.init_wandb(cfg.wandb_project, config_dict(cfg)) if cfg.enable_wandb else None
    progress = stats.Progress(to_process, cfg.progress, wandb_run)
    manager = None
    q: Any = None
    seen: Any = None
    local_pool = cfg.distributor.distributor == "local" and cfg.distributor.processes > 1 and len(todo) > 1
    if local_pool:  # worker processes: a manager carries progress and the dedup table across them
        if cfg.progress or wandb_run is not None or cfg.dedup:
            manager = mp.get_context("spawn").Manager()
            q = manager.Queue()
            seen = manager.dict() if cfg.dedup else None
    elif cfg.distributor.distributor == "local":  # inline in this process
        import queue as queue_mod

        q = queue_mod.SimpleQueue()
        seen = {} if cfg.dedup else None
    elif cfg.dedup:
        logger.warning("--dedup under Spark only drops duplicates within a shard")
    if q is not None:
        progress.listen(q)

    def on_unit(res: UnitResult) -> None:
        if not res.ok:
            logger.error("shard %s failed: %s", res.unit, res.error)
        elif q is None and not res.skipped:  # no live channel: count per finished shard
            st = res.extra.get("stats", {})
            progress.update(res.extra.get("processed", 0), st.get("successes", 0))

    fn = functools.partial(run_shard, cfg=cfg, progress=q, seen=seen)
    t0 = time.perf_counter()
    # under Spark, --subjob-size submits the shards in several jobs (img2dataset's subjob_size)
    step = cfg.subjob_size if cfg.distributor.distributor == "spark" and cfg.subjob_size else len(todo) or 1
    try:
        results = []
        for i in range(0, len(todo), step):
            results += distribute(fn, todo[i : i + step], cfg.distributor, progress=on_unit)
    finally:
        progress.close()
        if manager is not None:
            manager.shutdown()
    elapsed = time.perf_counter() - t0

    failed = [r for r in results if not r.ok]
    this_run = stats.merge(r.extra["stats"] for r in results if r.ok and not r.skipped)
    processed = sum(r.extra.get("processed", 0) for r in results if r.ok)
    this_run.update(
        duration_s=round(elapsed, 3),
        processed=processed,
        images_per_s=round(processed / elapsed, 2) if elapsed > 0 else 0.0,
    )
    all_stats = _read_all_stats(cfg.output_folder)
    run = {
        "format": "clipsearch.download_run",
        "this_run": this_run,
        "total": stats.merge(all_stats),
        "skipped_shards": sum(first <= d < first + n_shards for d in done)
        if not cfg.retry_failed
        else sum(r.skipped for r in results),
        "failed_shards": [{"shard": r.unit, "error": r.error} for r in failed],
        "input": {"files": len(files), "format": fmt, "rows": n_rows, "shards": n_shards},
        "config": config_dict(cfg),
    }
    storage.write_json_atomic(storage.join(cfg.output_folder, "run_stats.json"), run)
    if wandb_run is not None:
        wandb_run.log({"final/" + k: v for k, v in this_run.items() if isinstance(v, int | float)})
        wandb_run.finish()
    for line in stats.summary_lines(run):
        logger.info("%s", line)
    if extension is not None and not failed:
        extension["complete"] = True
        storage.write_json_atomic(storage.join(cfg.output_folder, MARKER), marker)
    if failed:
        raise UnitFailedError(
            f"{len(failed)} of {len(todo)} shards failed (first: {failed[0].unit}: {failed[0].error}); "
            "run the same command again to redo them"
        )
    if not cfg.retry_failed or all(r.ok for r in results):
        _rm(storage.join(cfg.output_folder, reader.INPUTS_DIR))
    return run


def _read_all_stats(out: str) -> list[dict[str, Any]]:
    import json

    paths = [p for p in storage.listdir(out, ".stats.json") if _SHARD_FILE.match(_basename(p))]
    if not paths:
        return []
    fs, _ = storage.get_fs(out)
    blobs = fs.cat([storage.get_fs(p)[1] for p in paths])
    return [json.loads(b) for b in blobs.values()]
