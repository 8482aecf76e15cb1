"""Run a list of independent units of work on a backend: `local` (process pool) or `spark`.

Stage code only provides a picklable `fn(unit) -> UnitResult`; it never knows which backend runs it.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clipsearch.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributorConfig:
    """Where units run. `processes` applies to `local`; `spark_master` to `spark`."""

    distributor: str = "local"
    processes: int = 1
    spark_master: str = "local[*]"
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.distributor not in ("local", "spark"):
            raise ConfigError(f"unknown distributor {self.distributor!r}", hint="--distributor local|spark")
        if self.processes < 1:
            raise ConfigError(f"processes must be >= 1, got {self.processes}", hint="--processes-count")


@dataclass
class UnitResult:
    """What one unit reports back: its name, counts, a status histogram, timing and any error."""

    unit: str
    ok: bool = True
    skipped: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def guarded(fn: Callable[[Any], UnitResult], unit: Any) -> UnitResult:
    """Call fn(unit); a crash becomes a failed UnitResult naming the unit, never an escaped exception."""
    t0 = time.perf_counter()
    try:
        res = fn(unit)
    except Exception as e:  # unit boundary: the one place we catch broadly
        logger.error("unit %s failed: %s", _name(unit), e)
        return UnitResult(
            unit=_name(unit),
            ok=False,
            error=f"{type(e).__name__}: {e}",
            duration_s=time.perf_counter() - t0,
            extra={"traceback": traceback.format_exc(limit=5)},
        )
    return res


def run_with_retries(fn: Callable[[Any], UnitResult], unit: Any, max_retries: int) -> UnitResult:
    """guarded() plus retries: units are idempotent, so running one again is always safe."""
    res = guarded(fn, unit)
    attempt = 0
    while not res.ok and attempt < max_retries:
        attempt += 1
        logger.warning("retrying unit %s (attempt %d): %s", res.unit, attempt + 1, res.error)
        res = guarded(fn, unit)
    res.extra["attempts"] = attempt + 1
    return res


def _name(unit: Any) -> str:
    return str(getattr(unit, "name", None) or getattr(unit, "shard_id", None) or unit)


def distribute(
    fn: Callable[[Any], UnitResult],
    units: Sequence[Any],
    cfg: DistributorConfig,
    progress: Callable[[UnitResult], None] | None = None,
) -> list[UnitResult]:
    """Run fn over units on the configured backend; results come back in unit order."""
    if not units:
        return []
    if cfg.distributor == "spark":
        from clipsearch.distribute.spark import run_spark

        return run_spark(fn, units, cfg, progress)
    from clipsearch.distribute.local import run_local

    return run_local(fn, units, cfg, progress)


def add_arguments(parser: Any) -> None:
    """The distributor options, shared by every stage and by `pipeline`."""
    g = parser.add_argument_group("distribution")
    g.add_argument(
        "--distributor",
        choices=["local", "spark"],
        default="local",
        help="where units of work run: a local process pool, or Apache Spark (needs the spark extra)",
    )
    g.add_argument(
        "--spark-master",
        default="local[*]",
        help="Spark master URL for --distributor spark (local[*], spark://host:7077, yarn, k8s://...)",
    )
    g.add_argument(
        "--max-retries", type=int, default=2, help="retries of a failed unit of work before it is reported"
    )


def config_from_args(args: Any, processes: int = 1) -> DistributorConfig:
    return DistributorConfig(
        distributor=args.distributor,
        processes=processes,
        spark_master=args.spark_master,
        max_retries=args.max_retries,
    )


def assigned_gpu() -> int | None:
    """The GPU index a distributed backend assigned to the current unit, if any."""
    import os

    from clipsearch.distribute.spark import GPU_ENV

    v = os.environ.get(GPU_ENV)
    return int(v) if v is not None and v.isdigit() else None


def report_failures(results: list[UnitResult], stage: str) -> None:
    """Log each failed unit by name with its error; raise UnitFailedError naming them all."""
    from clipsearch.errors import UnitFailedError

    failed = [r for r in results if not r.ok]
    if not failed:
        return
    for r in failed:
        logger.error("%s: unit %s failed: %s", stage, r.unit, r.error)
    names = ", ".join(r.unit for r in failed[:10]) + (" ..." if len(failed) > 10 else "")
    raise UnitFailedError(
        f"{stage}: {len(failed)} of {len(results)} units failed every retry ({names}); "
        "the others completed, re-run the same command to resume",
    )
