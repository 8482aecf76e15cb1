from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipsearch.search.filters import FilterCache, FilterError, canonical, compute_bitmap, parse_filter


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


# ------------------------------------------------------------------ limits: depth, terms, budget
@pytest.mark.parametrize(
    "expr",
    [
        "(" * 340 + "width == 1" + ")" * 340,  # the review's 808 characters
        "not " * 500 + "width == 1",  # the review's 1,992 characters
        "(not " * 40 + "width == 1" + ")" * 40,
    ],
)
def test_deep_nesting_is_a_filter_error_naming_the_limit(expr):
    with pytest.raises(FilterError, match=r"nested more than 32 levels deep \(the limit\)"):
        parse_filter(expr)
    cache = FilterCache(T)
    assert cache.cached(expr)  # fails fast either way, no RecursionError
    with pytest.raises(FilterError, match="32 levels"):
        cache.get(expr)


def test_nesting_up_to_the_limit_works():
    expr = "(" * 31 + "not width >= 640" + ")" * 31
    assert ids(expr) == ids("not width >= 640") == [1, 3, 4]  # the null width compares false, then `not`


def test_too_many_terms_and_values():
    expr = " or ".join(f'caption contains "w{i}"' for i in range(65))
    with pytest.raises(FilterError, match="more than 64 comparisons"):
        parse_filter(expr)
    assert ids(
        " or ".join(f'caption contains "w{i}"' for i in range(63)) + ' or caption contains "bird"'
    ) == [4]
    with pytest.raises(FilterError, match="more than 1000 values"):
        parse_filter("width in (" + ",".join(["1"] * 1001) + ")")


def test_out_of_range_integer_is_a_clear_error():
    with pytest.raises(FilterError) as e:
        compute_bitmap("width == 99999999999999999999999", T)
    assert "64-bit integer range" in str(e.value) and "C long" not in str(e.value)


def test_evaluation_errors_carry_no_library_text():
    t = Table(pa.table({"t": pa.array([0, 1], pa.timestamp("s"))}))
    with pytest.raises(FilterError) as e:
        compute_bitmap('t >= "not a time"', t)
    assert "Arrow" not in str(e.value) and "cannot evaluate" in str(e.value)


def test_budget_stops_a_costly_new_filter_with_a_4xx_naming_the_limit():
    big = Table(pa.table({"caption": [f"caption {i}" for i in range(300_000)]}), chunk=300_000)
    expr = " or ".join(f'caption contains "x{i}"' for i in range(40))
    cache = FilterCache(big, budget_s=0.0)  # any evaluation is over a zero budget after its first slice
    with pytest.raises(FilterError, match=r"longer than the 0 s per-request budget \(filter_budget_s\)") as e:
        cache.get(expr)
    assert "65,536 of 300,000 rows" in str(e.value)  # big batches are evaluated in slices
    assert e.value.one_line()
    unlimited = FilterCache(big)
    assert unlimited.get(expr).count == 0


def test_cache_is_keyed_by_the_parsed_form():
    cache = FilterCache(T)
    a = cache.get('caption contains "dog" and width >= 512')
    for same in (
        'width >= 512 and caption contains "dog"',  # order of and-terms
        '(caption contains "dog") AND (width >= 512)',
        'not not (width >= 512 and caption contains "dog")',  # double negation
        'caption contains "dog" and (width >= 512 and width >= 512)',  # nested and, repeated term
    ):
        assert cache.get(same) is a, same
    assert cache.hits == 4 and cache.misses == 1
    assert cache.get('status in ("success", "failed")') is cache.get(
        "status in ('failed', 'success', 'failed')"
    )
    assert cache.get("width >= 513") is not a
    assert a.expression == str(canonical(parse_filter('width >= 512 and caption contains "dog"')))


@pytest.mark.parametrize(
    "a,b",
    [
        ('width >= 512 and caption contains "dog"', 'caption contains "dog" and width >= 512'),
        ('not (not caption contains "cat")', 'caption contains "cat"'),
        ("(width < 400 or score > 0.5) or nsfw == true", "nsfw == true or (score > 0.5 or width < 400)"),
        ("width in (320, 640, 640)", "width in (640, 320)"),
    ],
)
def test_canonical_forms_select_the_same_rows(a, b):
    assert canonical(parse_filter(a)) == canonical(parse_filter(b))
    assert ids(a) == ids(b)
