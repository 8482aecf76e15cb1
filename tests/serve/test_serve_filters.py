from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipsearch.serve.filters import FilterCache, FilterError, compute_bitmap, parse_filter


class Table:
    """Minimal stand-in for MetadataTable: schema + batches()."""

    def __init__(self, table: pa.Table, chunk: int = 3):
        self.t = table
        self.schema = table.schema
        self.num_rows = table.num_rows
        self.chunk = chunk

    def batches(self):
        start = 0
        for b in self.t.to_batches(max_chunksize=self.chunk):
            yield start, b
            start += b.num_rows


T = Table(
    pa.table(
        {
            "caption": ["A Dog on grass", "a cat", None, "dogs and cats", "bird", "Hot DOG"],
            "width": pa.array([640, 320, 1024, 512, None, 800], pa.int32()),
            "score": [0.1, 0.5, 0.9, 0.3, 0.7, 0.2],
            "status": ["success", "success", "failed", "success", "success", "success"],
            "nsfw": [False, False, True, False, False, True],
        }
    )
)


def ids(expr: str) -> list[int]:
    return np.flatnonzero(compute_bitmap(expr, T).mask).tolist()


@pytest.mark.parametrize(
    "expr,expected",
    [
        ('caption contains "dog"', [0, 3, 5]),
        ('caption contains "dog" and width >= 512', [0, 3, 5]),
        ('caption contains "dog" and width > 640', [5]),
        ("width between 500 and 700", [0, 3]),
        ('status in ("failed")', [2]),
        ('status not in ["failed"]', [0, 1, 3, 4, 5]),
        ("status == 'success' and not nsfw == true", [0, 1, 3, 4]),
        ('(caption contains "cat" or caption startswith "bird") and score >= 0.3', [1, 3, 4]),
        ("width is null", [4]),
        ("caption is not null and score < 0.25", [0, 5]),
        ('caption endswith "dog"', [5]),
        ("score != 0.5", [0, 2, 3, 4, 5]),
        ('CAPTION contains "x"' if False else 'caption CONTAINS "DOG" OR width = 320', [0, 1, 3, 5]),
        ("`width` >= 1000", [2]),
    ],
)
def test_filter_semantics(expr, expected):
    assert ids(expr) == expected


@pytest.mark.parametrize(
    "expr,message",
    [
        ("", "empty"),
        ("width >=", "ended"),
        ("nosuch == 1", "unknown column"),
        ('width contains "3"', "needs a text column"),
        ('width >= "big"', "cannot compare"),
        ("caption == 3", "cannot compare"),
        ("width >= 3 and", "ended"),
        ("(width >= 3", "')'"),
        ("width ~ 3", "unexpected character"),
        ("width in (1, 2", "','"),
        ("nsfw > true", "does not apply"),
        ("width >= 3 width", "'and', 'or'"),
    ],
)
def test_filter_errors_are_clear(expr, message):
    with pytest.raises(FilterError, match=None) as e:
        compute_bitmap(expr, T)
    assert message in str(e.value) or message in e.value.one_line()


def test_bitmap_packing_matches_faiss_layout():
    import faiss

    bm = compute_bitmap('caption contains "dog"', T)
    sel = bm.selector()
    assert [sel.is_member(i) for i in range(6)] == [True, False, False, True, False, True]
    assert bm.count == 3 and bm.ids.tolist() == [0, 3, 5]
    assert isinstance(sel, faiss.IDSelectorBitmap)


def test_cache_is_keyed_by_canonical_expression():
    cache = FilterCache(T, size=2)
    a = cache.get('caption contains "dog"')
    b = cache.get('caption   CONTAINS "dog"')
    assert a is b and cache.hits == 1
    cache.get("width >= 1")
    cache.get("width >= 2")
    assert cache.get('caption contains "dog"') is not a  # evicted (LRU of 2)


def test_parse_tree_is_printable():
    assert "and" in str(parse_filter('a == 1 and b contains "x"'))


@pytest.mark.parametrize("chunk", [1, 5, 8, 13, 1000])
def test_bitmap_matches_numpy_across_unaligned_batches(chunk):
    rng = np.random.default_rng(chunk)
    w = rng.integers(0, 100, 517)
    t = Table(pa.table({"w": w}), chunk=chunk)
    bm = compute_bitmap("w < 30 or w == 77", t)
    expected = (w < 30) | (w == 77)
    assert (bm.mask == expected).all() and bm.count == expected.sum()
    assert bm.ids.tolist() == np.flatnonzero(expected).tolist()
