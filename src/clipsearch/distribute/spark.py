"""Spark backend: each unit of work is one Spark task. Needs the `spark` extra (pyspark) and Java 17.

Retries: an exception inside a unit is retried in the task (up to max_retries) with the same
idempotent unit code, so a unit that fails every retry comes back as a failed UnitResult naming it
and the rest of the job still completes. A lost executor is rescheduled by Spark itself
(spark.task.maxFailures); units write atomically, so a re-run attempt is harmless.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from clipsearch.distribute import DistributorConfig, UnitResult, run_with_retries
from clipsearch.errors import ConfigError

logger = logging.getLogger(__name__)

GPU_ENV = "CLIPSEARCH_ASSIGNED_GPU"


def _task(
    fn: Callable[[Any], UnitResult], max_retries: int
) -> Callable[[tuple[int, Any]], tuple[int, UnitResult]]:
    def run(item: tuple[int, Any]) -> tuple[int, UnitResult]:
        i, unit = item
        _expose_assigned_gpu()
        return i, run_with_retries(fn, unit, max_retries)

    return run


def _expose_assigned_gpu() -> None:
    """Tell the unit which GPU Spark's resource scheduling gave this task (spark.task.resource.gpu.amount)."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        gpus = ctx.resources().get("gpu") if ctx is not None else None
        if gpus is not None and gpus.addresses:
            os.environ[GPU_ENV] = gpus.addresses[0]
    except Exception:  # not in a task, or an old pyspark: nothing assigned
        return


def get_session(master: str) -> tuple[Any, bool]:
    """Reuse the active SparkSession if there is one; else create one. Returns (session, created)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as e:
        raise ConfigError("--distributor spark needs pyspark", hint="pip install 'clipsearch[spark]'") from e
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    if master.startswith("local"):
        # local executors must run this interpreter (and so this installed clipsearch); on a cluster the
        # packed environment shipped with --archives sets PYSPARK_PYTHON instead (docs/spark.md)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (
        SparkSession.builder.master(master)
        .appName("clipsearch")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.task.maxFailures", "4")
        .config("spark.python.worker.reuse", "true")
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark, True


def run_spark(
    fn: Callable[[Any], UnitResult],
    units: Sequence[Any],
    cfg: DistributorConfig,
    progress: Callable[[UnitResult], None] | None = None,
) -> list[UnitResult]:
    spark, created = get_session(cfg.spark_master)
    try:
        sc = spark.sparkContext
        rdd = sc.parallelize(list(enumerate(units)), numSlices=len(units))
        out = dict(rdd.map(_task(fn, cfg.max_retries)).collect())
    finally:
        if created:
            spark.stop()
    results = [out[i] for i in range(len(units))]
    if progress:
        for r in results:
            progress(r)
    return results
