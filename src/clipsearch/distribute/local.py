"""Local backend: a process pool (or inline when processes == 1, which keeps debugging easy)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from clipsearch.distribute import DistributorConfig, UnitResult, run_with_retries


def run_local(
    fn: Callable[[Any], UnitResult],
    units: Sequence[Any],
    cfg: DistributorConfig,
    progress: Callable[[UnitResult], None] | None = None,
) -> list[UnitResult]:
    results: list[UnitResult | None] = [None] * len(units)
    if cfg.processes == 1 or len(units) == 1:
        for i, u in enumerate(units):
            results[i] = run_with_retries(fn, u, cfg.max_retries)
            if progress:
                progress(results[i])
        return results  # type: ignore[return-value]
    # spawn: children must not inherit torch/faiss thread pools or open sockets from the parent
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(cfg.processes, len(units)), mp_context=ctx) as ex:
        futs = {ex.submit(run_with_retries, fn, u, cfg.max_retries): i for i, u in enumerate(units)}
        for fut in as_completed(futs):
            i = futs[fut]
            try:
                results[i] = fut.result()
            except Exception as e:  # the worker process itself died
                results[i] = UnitResult(unit=str(units[i]), ok=False, error=f"worker died: {e}")
            if progress:
                progress(results[i])
    return results  # type: ignore[return-value]
