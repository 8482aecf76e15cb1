import os
import sys

import pytest

from clipsearch.distribute import DistributorConfig, UnitResult, distribute
from clipsearch.errors import ConfigError, UnitFailedError


def square_unit(x: int) -> UnitResult:
    if x == 3:
        raise ValueError("three is bad")
    return UnitResult(unit=f"u{x}", counts={"value": x * x})


def flaky_unit(path: str) -> UnitResult:
    """Fails on its first attempt (recorded in a file), succeeds on the retry."""
    if not os.path.exists(path):
        open(path, "w").close()
        raise OSError("transient")
    return UnitResult(unit=os.path.basename(path), counts={"ok": 1})


@pytest.mark.parametrize("processes", [1, 2])
def test_local_results_in_order_and_failures_named(processes):
    res = distribute(square_unit, [1, 2, 3, 4], DistributorConfig(processes=processes, max_retries=1))
    assert [r.counts.get("value") for r in res] == [1, 4, None, 16]
    bad = res[2]
    assert not bad.ok and "three is bad" in bad.error and bad.extra["attempts"] == 2
    from clipsearch.distribute import report_failures

    with pytest.raises(UnitFailedError, match="1 of 4 units failed.*3"):
        report_failures(res, "test")


def test_local_retry_recovers_transient_failure(tmp_path):
    res = distribute(flaky_unit, [str(tmp_path / "a")], DistributorConfig(max_retries=2))
    assert res[0].ok and res[0].extra["attempts"] == 2


def test_bad_distributor_config():
    with pytest.raises(ConfigError, match="unknown distributor"):
        DistributorConfig(distributor="ray")
    with pytest.raises(ConfigError):
        DistributorConfig(processes=0)


@pytest.mark.spark
def test_spark_backend_matches_local(tmp_path):
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = DistributorConfig(distributor="spark", spark_master="local[2]", max_retries=1)
    res = distribute(square_unit, [1, 2, 3, 4], cfg)
    assert [r.counts.get("value") for r in res] == [1, 4, None, 16]
    assert not res[2].ok and "three is bad" in res[2].error
    res = distribute(flaky_unit, [str(tmp_path / "b")], cfg)
    assert res[0].ok and res[0].extra["attempts"] == 2


@pytest.mark.parametrize(("retries", "attempts"), [("0", 1), ("3", 4)])
def test_max_retries_option(retries, attempts):
    """--max-retries N (every stage's distributor option): a unit that always fails is tried N+1 times."""
    import argparse

    from clipsearch import distribute as dist

    p = argparse.ArgumentParser()
    dist.add_arguments(p)
    cfg = dist.config_from_args(p.parse_args(["--max-retries", retries]), processes=1)
    res = distribute(square_unit, [3], cfg)
    assert not res[0].ok and res[0].extra["attempts"] == attempts
