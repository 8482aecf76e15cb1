"""The planner's choices at several sizes and budgets, and its errors."""

from __future__ import annotations

import pytest

from clipsearch.errors import ConfigError, IndexBuildError
from clipsearch.index.config import IndexConfig, parse_memory
from clipsearch.index.plan import pick_nlist, plan_index, train_points


@pytest.mark.parametrize(
    "n,budget,kind,prefix",
    [
        (5_000, "4G", "flat", "Flat"),
        (15_000, "4G", "flat", "Flat"),
        (50_000, "4G", "hnsw", "HNSW32"),
        (200_000, "4G", "hnsw", "HNSW32"),
        (200_000, "200M", "hnsw", "HNSW32_SQ8"),
        (200_000, "64M", "other", "PQ128x4fs,Refine(PQ256x8)"),
        (200_000, "72M", "other", "PQ128x4fs,Refine(PQ256x9)"),
        (1_000_000, "256M", "ivf", "IVF2048,SQ4"),
        (3_000_000, "1G", "ivf", "IVF4096,PQ64x4fsr,Refine(SQ4)"),
        (1_000_000, "300M", "other", "PQ64x4fs,Refine(SQ4)"),
        (3_000_000, "1500M", "ivf", "IVF4096,PQ64x4fsr,Refine(SQ6)"),
        (10_000_000, "4G", "ivf", "IVF8192_HNSW32,"),
    ],
)
def test_plan_choices(n, budget, kind, prefix):
    p = plan_index(n, 512, parse_memory(budget), 10.0)
    assert p.kind == kind
    assert p.factory.startswith(prefix), p.factory
    assert p.memory_bytes <= parse_memory(budget)
    assert p.reason


def test_plan_memory_mappable_uses_on_disk_codes():
    p = plan_index(200_000, 512, 64 << 20, mmap=True)
    assert p.kind == "ivf" and p.mmap
    assert "fs" not in p.factory and "HNSW" not in p.factory.split(",")[0] and "Refine" not in p.factory
    big = plan_index(200_000, 512, 4 << 30, mmap=True)
    assert big.factory.endswith(",SQ8")


def test_budget_too_small_names_the_smallest_that_works():
    with pytest.raises(IndexBuildError) as e:
        plan_index(1_000_000, 512, 1 << 20)
    msg = e.value.one_line()
    assert "smallest that works is" in msg and "--max-index-memory-usage" in msg
    need = msg.split("smallest that works is ")[1].split()[0].rstrip(";")
    plan_index(1_000_000, 512, int(parse_memory(need) * 1.06))  # that budget does work


def test_forced_key():
    p = plan_index(1000, 32, 1 << 30, index_key="IVF16,PQ8x4fsr,Refine(SQ8)")
    assert p.kind == "ivf" and p.reason.startswith("forced")
    with pytest.raises(ConfigError):
        plan_index(1000, 32, 1 << 30, index_key="NotAFactory")


def test_training_sample_grows_with_the_lists_within_a_memory_cap():
    small = plan_index(200_000, 512, parse_memory("64M"))  # no IVF
    assert train_points(small, 512) == 100_000
    assert train_points(plan_index(1_000_000, 512, parse_memory("256M")), 512) == 64 * 2048
    forced = plan_index(10**8, 512, 1 << 40, index_key="OPQ64_256,IVF65536_HNSW32,PQ64x4fsr")
    assert train_points(forced, 512) == (512 << 20) // (4 * 512)  # 64 x 65536 would be 8 GiB
    assert train_points(forced, 64) == (512 << 20) // (4 * 64)
    assert train_points(plan_index(10**8, 64, 1 << 40, index_key="IVF16384,PQ32x4fs"), 64) == 64 * 16384


def test_nlist_and_memory_parsing():
    assert pick_nlist(200_000) == 1024
    assert pick_nlist(1_000) <= 25
    assert parse_memory("64M") == 64 << 20 and parse_memory("4GB") == 4 << 30 and parse_memory("1.5k") == 1536
    with pytest.raises(ConfigError):
        parse_memory("lots")


@pytest.mark.parametrize(
    "kw,hint",
    [
        ({"max_index_memory_usage": "0"}, "--max-index-memory-usage"),
        ({"min_recall": 1.5}, "--min-recall"),
        ({"metric_type": "l2"}, "--metric-type ip"),
        ({"input_format": "csv"}, "--input-format auto|embeddings|npy|parquet"),
        ({"rotation": "opq"}, "--rotation auto|none|pca-balanced"),
        ({"tuning_queries": "q.txt"}, "--tuning-queries FILE.npy"),
    ],
)
def test_config_validation(kw, hint):
    with pytest.raises(ConfigError) as e:
        IndexConfig("in", "out", **kw)
    assert e.value.hint == hint
