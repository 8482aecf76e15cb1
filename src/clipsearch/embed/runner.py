"""The embed stage: plan parts from input shards, then run each part as a unit of work.

Inside a unit, three things overlap:
- a reader thread streams raw samples (bytes, caption, metadata) from the part's shards and hands batches
  of image bytes to a pool of decode processes (`preprocess.decode_batch`), keeping a bounded queue of
  batches in flight;
- the decode processes turn bytes into resized, cropped uint8 arrays, which is all the CPU work;
- the main thread normalises each batch (on the device), runs the image and text towers under
  torch.inference_mode (autocast as asked), and keeps the float16 results on the device until the part
  ends, so the GPU is never synchronised per batch.
A corrupt image drops its row from the batch before the model sees it, so embeddings and metadata
always stay aligned.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing as mp
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from clipsearch import storage
from clipsearch.distribute import UnitResult, assigned_gpu, distribute, report_failures
from clipsearch.embed import readers, writer
from clipsearch.embed.config import EmbedConfig
from clipsearch.embed.preprocess import ImagePreprocessor, decode_batch
from clipsearch.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_IMAGES_PER_PART = 10_000
DEFAULT_SAMPLES_PER_SHARD = 10_000  # when a download shard has no stats file
COUNT_KEYS = (
    "corrupt_images",
    "missing_captions",
    "unexpected_members",
    "missing_images",
    "failed_downloads",
    "bad_metadata",
)


@dataclass(frozen=True)
class EmbedUnit:
    """One output part: the input shards (or, for a plain image folder, a slice of its images)."""

    part: int
    format: str
    inputs: tuple[str, ...]
    captions: tuple[str | None, ...] = ()  # images format: the .txt beside each image, or None
    root: str = ""  # images format: the folder keys are relative to
    size_hint: int | None = None
    extra_counts: tuple[tuple[str, int], ...] = ()  # counted while planning (files that are not images)

    @property
    def name(self) -> str:
        return f"{self.part:05d}"

    def describe_inputs(self) -> list[str]:
        if self.format == "images":
            return [f"{self.root} ({len(self.inputs)} images from {self.inputs[0].rsplit('/', 1)[-1]})"]
        return list(self.inputs)


# ---------------------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------------------
def plan_units(cfg: EmbedConfig, fmt: str) -> list[EmbedUnit]:
    if fmt == "images":
        pairs, other = readers.plan_image_folder(cfg.input_dataset)
        if not pairs:
            raise InputError(f"no image files in {cfg.input_dataset}", hint="--input-dataset")
        per = cfg.write_batch_size or DEFAULT_IMAGES_PER_PART
        units = []
        for i in range(0, len(pairs), per):
            chunk = pairs[i : i + per]
            units.append(
                EmbedUnit(
                    part=i // per,
                    format=fmt,
                    inputs=tuple(p for p, _ in chunk),
                    captions=tuple(c for _, c in chunk),
                    root=cfg.input_dataset,
                    size_hint=len(chunk),
                    extra_counts=tuple(other.items()) if i == 0 else (),
                )
            )
        return units
    shards = readers.list_shards(cfg.input_dataset, fmt)
    if not shards:
        raise InputError(f"no {fmt} shards in {cfg.input_dataset}", hint="--input-dataset or --input-format")
    hints = [readers.shard_size_hint(s) for s in shards]
    groups: list[list[int]] = []
    if cfg.write_batch_size:
        cur: list[int] = []
        total = 0
        for i, h in enumerate(hints):
            cur.append(i)
            total += h if h is not None else DEFAULT_SAMPLES_PER_SHARD
            if total >= cfg.write_batch_size:
                groups.append(cur)
                cur, total = [], 0
        if cur:
            groups.append(cur)
    else:
        groups = [
            list(range(i, min(i + cfg.shards_per_part, len(shards))))
            for i in range(0, len(shards), cfg.shards_per_part)
        ]
    units = []
    for part, g in enumerate(groups):
        known = [hints[i] for i in g]
        units.append(
            EmbedUnit(
                part=part,
                format=fmt,
                inputs=tuple(shards[i] for i in g),
                size_hint=sum(known) if all(h is not None for h in known) else None,  # type: ignore[misc]
            )
        )
    return units


def iter_unit(unit: EmbedUnit, counts: readers.ReadCounts) -> Iterator[readers.RawSample]:
    if unit.format == "images":
        yield from readers.read_image_list(unit.inputs, unit.captions, unit.root)
        return
    read = {
        "webdataset": readers.read_webdataset,
        "parquet": readers.read_parquet,
        "files": readers.read_files,
        "tfrecord": readers.read_tfrecord,
    }[unit.format]
    for shard in unit.inputs:
        yield from read(shard, counts)


# ---------------------------------------------------------------------------------------------------------
# process-wide resources: the model and the decode pool are reused by every unit a process runs
# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cached_encoder(
    model: str, device: str, precision: str, compile: bool, backend: str = "torch", threads: int = 0
) -> Any:
    from clipsearch.embed.models import load_clip

    enc = load_clip(
        model, device=device, precision=precision, compile=compile, backend=backend, threads=threads
    )
    # torch on CPU: `auto` is decided by timing the first batches (PrecisionTuner)
    enc.tune_precision = (
        enc.backend == "torch"
        and precision == "auto"
        and device == "cpu"
        and enc.n_params >= PRECISION_TUNE_MIN_PARAMS
    )
    if enc.tune_precision:
        enc.precision = "fp32"
        enc.tuner = PrecisionTuner(enc)  # one per process: its schedule may span several small parts
    return enc


PRECISION_TUNE_MIN_PARAMS = 20_000_000  # smaller models: fp32, the difference would be lost in overheads


class PrecisionTuner:
    """`--precision auto` on CPU is measured on the real work, not assumed.

    The first four batches (of the process) run fp32, bf16, bf16, fp32 (ABBA, so drift in the machine's load cancels) and are
    timed per sample; bf16 autocast is kept only if it is >10% faster. No compute is spent on probing, and a
    batch's embeddings are valid either way (bf16 vs fp32 cosine > 0.99). Whether bf16 pays depends on the
    CPU (AMX, avx512_bf16), the torch build and the load: docs/bench-embed.md has measurements.
    """

    SCHEDULE = ("fp32", "bf16", "bf16", "fp32")

    def __init__(self, enc: Any):
        self.enc = enc
        self.i = 0
        self.secs: dict[str, float] = {"fp32": 0.0, "bf16": 0.0}
        self.samples: dict[str, int] = {"fp32": 0, "bf16": 0}

    @property
    def active(self) -> bool:
        return bool(self.enc.tune_precision) and self.i < len(self.SCHEDULE)

    def start(self) -> float:
        self.enc.precision = self.SCHEDULE[self.i]
        return time.perf_counter()

    def stop(self, t0: float, n: int) -> None:
        prec = self.SCHEDULE[self.i]
        self.secs[prec] += time.perf_counter() - t0
        self.samples[prec] += n
        self.i += 1
        if self.i == len(self.SCHEDULE):
            rates = {p: round(self.samples[p] / self.secs[p], 2) for p in self.secs if self.secs[p] > 0}
            choice = "bf16" if rates.get("bf16", 0.0) > 1.1 * rates.get("fp32", 0.0) else "fp32"
            self.enc.precision, self.enc.precision_probe = choice, rates
            self.enc.tune_precision = False
            logger.info("precision auto on CPU: %s (samples/s measured: %s)", choice, rates)

    def abandon(self) -> None:
        """The part ended before a decision: fp32 meanwhile; the next part goes on with the schedule."""
        if self.enc.tune_precision:
            self.enc.precision = "fp32"


class DecodePool:
    """Decode processes that survive a crashing decoder.

    spawn: workers import only numpy and Pillow (clipsearch.embed.preprocess), never torch or the parent's
    threads. If a worker dies (a decoder segfault on a hostile file), the executor is broken: it is
    restarted, and the batches that were in flight are decoded again once; a batch that kills a worker
    twice is counted as corrupt images.
    """

    def __init__(self, n: int):
        self.n = n
        self._lock = threading.Lock()
        self._ex = self._new()
        atexit.register(self.shutdown)

    def _new(self) -> ProcessPoolExecutor:
        ex = ProcessPoolExecutor(max_workers=self.n, mp_context=mp.get_context("spawn"))
        for _ in range(self.n):  # start the workers now: they boot while the model loads
            ex.submit(int)
        return ex

    def submit(self, pp: ImagePreprocessor, images: list[bytes | None]) -> Future:
        with self._lock:
            ex = self._ex
        try:
            return ex.submit(decode_batch, pp, images)
        except BrokenProcessPool:
            self.restart(ex)
            with self._lock:
                return self._ex.submit(decode_batch, pp, images)

    def restart(self, broken: ProcessPoolExecutor | None = None) -> None:
        with self._lock:
            if broken is not None and broken is not self._ex:
                return  # someone restarted it already
            logger.warning("a decode worker died; restarting the decode pool")
            self._ex.shutdown(wait=False, cancel_futures=True)
            self._ex = self._new()

    def decode(self, pp: ImagePreprocessor, images: list[bytes | None], fut: Future) -> Any:
        """The result of `fut`, re-decoding once on a fresh pool if its worker died."""
        try:
            return fut.result()
        except BrokenProcessPool:
            self.restart()
        try:
            return self.submit(pp, images).result()
        except BrokenProcessPool:
            self.restart()
            h, w = pp.output_hw
            return np.zeros((0, h, w, 3), np.uint8), [], [(i, "decoder crashed") for i in range(len(images))]

    def shutdown(self) -> None:
        # wait for the (idle) workers to take their sentinel and exit: without waiting, a process that
        # ends right after (the demo's server on SIGTERM, at exit) leaves them orphaned
        self._ex.shutdown(wait=True, cancel_futures=True)


_POOL: DecodePool | None = None  # kept for the next embed run of this process (pipeline --watch)
_POOL_LOCK = threading.Lock()


def _decode_pool(n: int) -> DecodePool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.n != n:
            if _POOL is not None:
                _POOL.shutdown()
            _POOL = DecodePool(n)
        return _POOL


def close_decode_pool() -> None:
    """Stop the kept decode workers (a process that goes on to serve, like the demo, has no use for them)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown()
            _POOL = None


def _unit_device(cfg: EmbedConfig, part: int = 0) -> str:
    """The device a unit runs on: Spark's assigned GPU, else with several local processes one GPU per part."""
    from clipsearch.embed.models import resolve_device

    dev = resolve_device(cfg.device)
    if dev == "cuda":
        import torch

        gpu = assigned_gpu()
        n = torch.cuda.device_count()
        if gpu is None and cfg.distributor.processes > 1 and n > 1:  # pragma: no cover - needs several GPUs
            gpu = part % n
        if gpu is not None:
            dev = f"cuda:{gpu}"
    return dev


# ---------------------------------------------------------------------------------------------------------
# one unit
# ---------------------------------------------------------------------------------------------------------
class _Done:
    pass


@dataclass
class _Failed:
    error: BaseException


class _Ready(Future):
    """An already-computed result (decoding in the reader thread)."""

    def __init__(self, value: Any):
        super().__init__()
        self.set_result(value)


def _producer(
    unit: EmbedUnit,
    pp: ImagePreprocessor | None,
    pool: DecodePool | None,
    batch_size: int,
    out: queue.Queue,
    counts: readers.ReadCounts,
    stop: threading.Event,
) -> None:
    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def submit(batch: list[readers.RawSample]) -> bool:
        images = [s.image for s in batch]
        for s in batch:
            s.image = None  # kept once, in `images`, until the batch is decoded (for a re-decode)
        if pp is None:
            fut: Future | None = None
        elif pool is None:
            fut = _Ready(decode_batch(pp, images))
        else:
            fut = pool.submit(pp, images)
        return put((fut, batch, images))

    try:
        batch: list[readers.RawSample] = []
        for s in iter_unit(unit, counts):
            if stop.is_set():
                return
            batch.append(s)
            if len(batch) >= batch_size:
                if not submit(batch):
                    return
                batch = []
        if batch and not submit(batch):
            return
        put(_Done())
    except BaseException as e:  # handed to the main thread, which fails the unit with it
        put(_Failed(e))


_ADDRESS = re.compile(r" ?<[^>]* at 0x[0-9a-f]+>")  # "<_io.BytesIO object at 0x7f..>": same error, one entry


def _row(s: readers.RawSample) -> dict[str, Any]:
    row: dict[str, Any] = {"key": s.key, "url": s.meta.get("url"), "caption": s.caption}
    for k, v in s.meta.items():
        if k not in row:
            row[k] = v
    return row


def run_unit(unit: EmbedUnit, cfg: EmbedConfig) -> UnitResult:
    """Embed one part. Skips a part whose stats file exists; writes the stats file last."""
    import torch

    paths = writer.part_paths(cfg.output_folder, unit.name)
    if storage.exists(paths["stats"]):
        st = storage.read_json(paths["stats"])
        return UnitResult(unit=unit.name, skipped=True, counts={"rows": int(st.get("rows", 0))})
    t0 = time.perf_counter()
    start_time = time.time()
    device = _unit_device(cfg, unit.part)
    enc = _encoder(cfg, device)
    if device == "cpu":
        torch.set_num_threads(cfg.resolved_threads())
    cuda = device.startswith("cuda")
    batch_size = cfg.resolved_batch_size(device)
    workers = cfg.resolved_workers(device)
    pp = enc.preprocessor if cfg.enable_image else None
    pool = _decode_pool(workers) if (workers > 0 and pp is not None) else None
    tuner: PrecisionTuner | None = getattr(enc, "tuner", None)

    counts = readers.ReadCounts()
    for k, v in unit.extra_counts:
        counts.counts[k] += v
    errors: Counter[str] = Counter()
    # enough batches in flight to keep every decode worker busy, and no more (decoded batches cost memory)
    q: queue.Queue = queue.Queue(maxsize=workers + 2)
    stop = threading.Event()
    reader = threading.Thread(
        target=_producer,
        args=(unit, pp, pool, batch_size, q, counts, stop),
        name=f"embed-read-{unit.name}",
        daemon=True,
    )
    img_chunks: list[torch.Tensor] = []
    txt_chunks: list[torch.Tensor] = []
    rows: list[dict[str, Any]] = []
    seen = 0
    from tqdm.auto import tqdm

    bar = tqdm(
        total=unit.size_hint,
        desc=f"embed part {unit.name}",
        unit="img",
        disable=not cfg.progress,
        leave=False,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    reader.start()
    t_loop = time.perf_counter()
    model_s = 0.0  # time in the model: the encoder is busy this share of the loop (docs/bench-embed.md)
    try:
        while True:
            item = q.get()
            if isinstance(item, _Done):
                break
            if isinstance(item, _Failed):
                raise item.error
            fut, batch, images = item
            seen += len(batch)
            pix = None
            if fut is not None:
                arr, ok, bad = pool.decode(pp, images, fut) if pool is not None else fut.result()  # type: ignore[arg-type]
                del images
                for i, msg in bad:
                    counts.add("corrupt_images", batch[i].key)
                    errors[_ADDRESS.sub("", msg)[:80]] += 1
                good = [batch[i] for i in ok]
                if good:
                    pix = torch.from_numpy(arr)
                    if cuda:
                        pix = pix.pin_memory()
            else:
                good = batch
            if not good:
                bar.update(len(batch))
                continue
            t_tune = tuner.start() if tuner is not None and tuner.active else None
            t_model = time.perf_counter()
            if pix is not None:
                img_chunks.append(enc.image_features(pix).to(torch.float16))
            if cfg.enable_text:
                txt_chunks.append(enc.text_features([s.caption or "" for s in good]).to(torch.float16))
            model_s += time.perf_counter() - t_model
            if t_tune is not None:
                tuner.stop(t_tune, len(good))  # type: ignore[union-attr]
            for s in good:
                if s.caption is None:
                    counts.add("missing_captions", s.key)
                rows.append(_row(s))
            bar.update(len(batch))
    finally:
        loop_s = time.perf_counter() - t_loop
        stop.set()
        bar.close()
        if tuner is not None:
            tuner.abandon()
        reader.join(timeout=10)

    def stack(chunks: list[torch.Tensor]) -> Any:
        if not chunks:
            return torch.zeros((0, enc.dim), dtype=torch.float16).numpy()
        return torch.cat(chunks).cpu().numpy()

    img = stack(img_chunks) if cfg.enable_image else None
    txt = stack(txt_chunks) if cfg.enable_text else None
    duration = time.perf_counter() - t0
    c = {k: int(counts.counts.get(k, 0)) for k in COUNT_KEYS}
    stats = {
        "part": unit.name,
        "rows": len(rows),
        "samples": seen,
        **c,
        "samples_per_s": round(seen / duration, 2) if duration > 0 else None,
        "duration_s": round(duration, 3),
        "start_time": start_time,
        "end_time": time.time(),
        "inputs": unit.describe_inputs(),
        "model": cfg.clip_model,
        "dim": enc.dim,
        "modalities": _modalities(cfg),
        "device": device,
        "backend": enc.backend,
        "precision": "auto (measuring: fp32 and bf16 batches)"
        if getattr(enc, "tune_precision", False)
        else enc.precision,
        "precision_probe": getattr(enc, "precision_probe", {}),
        "batch_size": batch_size,
        "num_prepro_workers": workers,
        "model_s": round(model_s, 3),
        "encoder_busy": round(model_s / loop_s, 3) if loop_s > 0 else None,
        "top_errors": errors.most_common(10),
        "examples": {k: v for k, v in counts.examples.items() if k in COUNT_KEYS},
    }
    writer.write_part(cfg.output_folder, unit.name, img, txt, rows, stats)
    return UnitResult(
        unit=unit.name,
        counts={"rows": len(rows), "samples": seen, **c},
        duration_s=duration,
        extra={"samples_per_s": stats["samples_per_s"]},
    )


def _encoder(cfg: EmbedConfig, device: str) -> Any:
    return cached_encoder(
        cfg.clip_model, device, cfg.precision, cfg.compile, cfg.backend, cfg.resolved_threads()
    )


def _manifest_encoder(info: dict[str, Any]) -> dict[str, Any]:
    """What ran the model, and why, for manifest.json (without the machine-local cache path)."""
    keep = ("backend", "precision", "reason", "versions", "worst_cosine_vs_torch_fp32")
    return {k: info[k] for k in keep if k in info}


def _modalities(cfg: EmbedConfig) -> list[str]:
    return [m for m, on in (("image", cfg.enable_image), ("text", cfg.enable_text)) if on]


# ---------------------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------------------
def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Embed every part of `cfg.input_dataset` into `cfg.output_folder`; resume what an earlier run finished.

    Everything that can be wrong with the options, the input or the model fails here, before any work.
    """
    t0 = time.perf_counter()
    fmt = cfg.input_format or readers.detect_format(cfg.input_dataset)
    if cfg.input_format is None:
        logger.info("input format: %s (detected)", fmt)
    cfg = replace(cfg, input_format=fmt)
    modalities = _modalities(cfg)
    resuming = writer.check_output_folder(cfg.output_folder, cfg.clip_model, modalities)
    units = plan_units(cfg, fmt)

    # load the model now: a bad model fails before any work, and an inline run reuses this instance
    from clipsearch.embed.models import load_clip

    if cfg.distributor.processes == 1 and cfg.distributor.distributor == "local":
        workers = cfg.resolved_workers(_unit_device(cfg))
        if workers > 0 and cfg.enable_image:
            _decode_pool(workers)  # decode workers start now, while the model loads
        enc = _encoder(cfg, _unit_device(cfg))
        backend_info = dict(enc.backend_info)
    else:  # the workers load their own; here only the dimension, and what they will pick
        from clipsearch.embed.backends import choose_backend

        enc = load_clip(cfg.clip_model, device="cpu", precision="fp32")
        backend_info = choose_backend(cfg.backend, cfg.precision, _unit_device(cfg)).as_dict()
    dim = enc.dim
    del enc
    logger.info(
        "embed: model runs on %s %s (%s)",
        backend_info.get("backend"),
        backend_info.get("precision"),
        backend_info.get("reason"),
    )

    writer.make_folders(cfg.output_folder, image=cfg.enable_image, text=cfg.enable_text)
    done = {s["part"] for s in writer.read_part_stats(cfg.output_folder)} if resuming else set()
    todo = [u for u in units if u.name not in done]
    if done:
        logger.info("resuming: %d of %d parts already done", len(units) - len(todo), len(units))

    def progress(r: UnitResult) -> None:
        if r.ok and not r.skipped:
            c = r.counts
            logger.info(
                "part %s: %d rows, %.1f samples/s; %d corrupt images, %d missing captions, "
                "%d unexpected members, %d failed downloads",
                r.unit,
                c.get("rows", 0),
                r.extra.get("samples_per_s") or 0.0,
                c.get("corrupt_images", 0),
                c.get("missing_captions", 0),
                c.get("unexpected_members", 0),
                c.get("failed_downloads", 0),
            )

    fn = functools.partial(run_unit, cfg=cfg)
    results = distribute(fn, todo, cfg.distributor, progress=progress)
    manifest = writer.write_manifest(
        cfg.output_folder, cfg.clip_model, dim, modalities, encoder=_manifest_encoder(backend_info)
    )
    duration = time.perf_counter() - t0
    totals: Counter[str] = Counter()
    for r in results:
        if r.ok:
            totals.update(r.counts)
    samples = totals.get("samples", 0)
    report = {
        "output_folder": cfg.output_folder,
        "input_format": fmt,
        "model": cfg.clip_model,
        "dim": dim,
        "parts": len(units),
        "parts_done": sum(1 for r in results if r.ok and not r.skipped),
        "parts_skipped": len(units) - len(todo) + sum(1 for r in results if r.skipped),
        "parts_failed": [r.unit for r in results if not r.ok],
        "rows": manifest["total_rows"],
        "counts": {k: int(totals.get(k, 0)) for k in ("rows", "samples", *COUNT_KEYS)},
        "samples_per_s": round(samples / duration, 2) if duration > 0 else None,
        "duration_s": round(duration, 3),
    }
    logger.info(
        "embed: %d rows in %d parts (%d new), %.1f samples/s",
        report["rows"],
        report["parts"],
        report["parts_done"],
        report["samples_per_s"] or 0.0,
    )
    report_failures(results, "embed")
    return report
