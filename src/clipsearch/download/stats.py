"""Counts per shard and per run, the live progress bar, and optional Weights & Biases logging."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from clipsearch.errors import ConfigError

logger = logging.getLogger(__name__)

STATUSES = ("success", "failed_to_download", "failed_to_resize", "failed_to_blur", "opted_out", "duplicate")
TOP_ERRORS = 20


class ShardTally:
    """Counts of one shard as its samples complete."""

    def __init__(self) -> None:
        self.status: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def add(self, status: str, error: str | None) -> None:
        self.status[status] += 1
        if error:
            self.errors[error] += 1

    def to_json(self, shard: int, start: float, end: float) -> dict[str, Any]:
        count = sum(self.status.values())
        return {
            "shard": shard,
            "count": count,
            "successes": self.status.get("success", 0),
            "status": {s: self.status.get(s, 0) for s in STATUSES if self.status.get(s, 0)},
            "top_errors": [[e, n] for e, n in self.errors.most_common(TOP_ERRORS)],
            "duration_s": round(end - start, 3),
            "start_time": start,
            "end_time": end,
        }


def merge(stats: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum shard stats into run totals."""
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    shards = count = 0
    for s in stats:
        shards += 1
        count += s.get("count", 0)
        status.update(s.get("status", {}))
        errors.update({e: n for e, n in s.get("top_errors", [])})
    return {
        "shards": shards,
        "count": count,
        "successes": status.get("success", 0),
        "status": dict(status),
        "top_errors": [[e, n] for e, n in errors.most_common(TOP_ERRORS)],
    }


def summary_lines(stats: dict[str, Any]) -> list[str]:
    """A human summary of run stats, a few lines."""
    t = stats["this_run"]
    lines = [
        f"{t['count']} samples in {t['duration_s']:.1f}s ({t['images_per_s']:.1f} images/s) over "
        f"{t['shards']} shards ({stats['skipped_shards']} already done)",
        "status: " + ", ".join(f"{k}={v}" for k, v in sorted(t["status"].items(), key=lambda kv: -kv[1])),
    ]
    if t["top_errors"]:
        lines.append("top errors: " + "; ".join(f"{e} ({n})" for e, n in t["top_errors"][:5]))
    tot = stats["total"]
    lines.append(f"output: {tot['count']} samples, {tot['successes']} images in {tot['shards']} shards")
    return lines


class Progress:
    """Consumes (done, successes) deltas from workers; drives a tqdm bar and, optionally, wandb."""

    def __init__(self, total: int, enabled: bool, wandb_run: Any = None):
        self.total = total
        self.done = self.successes = 0
        self.wandb_run = wandb_run
        self._t0 = time.perf_counter()
        self._last_log = 0.0
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1, desc="download")
        self.queue: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def update(self, done: int, successes: int) -> None:
        self.done += done
        self.successes += successes
        if self._bar is not None:
            self._bar.update(done)
            rate = self.successes / self.done if self.done else 0.0
            self._bar.set_postfix_str(f"success {rate:.1%}", refresh=False)
        now = time.perf_counter()
        if self.wandb_run is not None and now - self._last_log >= 2.0:
            self._last_log = now
            el = now - self._t0
            self.wandb_run.log(
                {
                    "images_done": self.done,
                    "successes": self.successes,
                    "success_rate": self.successes / self.done if self.done else 0.0,
                    "images_per_s": self.done / el if el else 0.0,
                }
            )

    def listen(self, q: Any) -> None:
        """Drain `q` in a background thread until close()."""
        self.queue = q

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    d, s = q.get(timeout=0.2)
                except queue.Empty:
                    continue
                except (EOFError, OSError, BrokenPipeError):
                    return
                self.update(d, s)

        self._thread = threading.Thread(target=loop, name="download-progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._bar is not None:
            self._bar.close()


def init_wandb(project: str, config: dict[str, Any]) -> Any:
    """Start a wandb run; wandb is an optional extra."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(
            "--enable-wandb needs Weights & Biases: pip install 'clipsearch[wandb]'", hint="--enable-wandb"
        ) from e
    return wandb.init(project=project, config=config, job_type="download")
