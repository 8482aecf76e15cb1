"""Strict metadata filters: a small expression language, compiled to an id bitmap with pyarrow.compute.

Grammar (keywords are case-insensitive)::

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | "(" expr ")" | comparison
    comparison := column "contains" STRING | column "startswith" STRING | column "endswith" STRING
                | column ("=="|"="|"!="|"<"|"<="|">"|">=") literal
                | column ["not"] "in" "(" literal ("," literal)* ")"      (or [ ... ])
                | column "between" NUMBER "and" NUMBER
                | column "is" ["not"] "null"
    column     := NAME | `any name`
    literal    := "string" | 'string' | NUMBER | true | false

Example: ``caption contains "dog" and width >= 512 and status in ("success")``.
Text matching (`contains`, `startswith`, `endswith`) ignores case; `==` is exact. A comparison with a null
value is false. The bitmap is computed over the memory-mapped Arrow columns batch by batch (vectorised),
then packed little-endian, the layout faiss's `IDSelectorBitmap` reads.

Limits (bad or costly input gets a FilterError, a 400, never a crash): at most `MAX_DEPTH` levels of
parentheses and `not`, at most `MAX_TERMS` comparisons, and a wall-clock budget for evaluating a new filter
over the metadata columns (`FilterCache(budget_s=...)`, checked between record batches). Bitmaps are cached
by the filter's canonical parsed form (`canonical`), so texts that differ only in spacing, keyword case,
term order or double negation share one entry.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsearch.errors import InputError

logger = logging.getLogger(__name__)


KEEP_IDS_MAX = 100_000  # keep the id list of a filter allowing at most this many ids
MAX_DEPTH = 32  # nesting levels of parentheses and `not` (the parser and evaluator recurse per level)
MAX_TERMS = 64  # comparisons in one expression (each is one vectorised pass over its column)
MAX_IN_VALUES = 1000  # values in one `in (...)` list
PARSE_CACHE = 1024  # filter texts whose parsed form is kept
EVAL_ROWS = 65_536  # rows evaluated between two checks of the time budget


class FilterError(InputError):
    """A filter expression that does not parse or does not fit the metadata columns."""


class FilterBudgetError(FilterError):
    """Evaluating a new filter over the metadata took longer than the per-request budget."""


# ----------------------------------------------------------------------------------------------- AST
@dataclass(frozen=True)
class Cmp:
    column: str
    op: str  # contains startswith endswith == != < <= > >= in notin between isnull notnull
    value: Any = None

    def __str__(self) -> str:
        return f"({self.column!r} {self.op} {self.value!r})"


@dataclass(frozen=True)
class BoolOp:
    op: str  # and / or
    items: tuple[Any, ...]

    def __str__(self) -> str:
        return "(" + f" {self.op} ".join(str(i) for i in self.items) + ")"


@dataclass(frozen=True)
class Not:
    item: Any

    def __str__(self) -> str:
        return f"(not {self.item})"


# ------------------------------------------------------------------------------------------- lexer
_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<quoted>`[^`]+`)
  | (?P<number>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<op>==|!=|<=|>=|=|<|>|\(|\)|\[|\]|,)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.\-]*)
    """,
    re.VERBOSE,
)
_KEYWORDS = {
    "and",
    "or",
    "not",
    "in",
    "contains",
    "startswith",
    "endswith",
    "between",
    "is",
    "null",
    "true",
    "false",
}


@dataclass
class _Tok:
    kind: str  # string number op name kw quoted
    text: str
    value: Any
    pos: int


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s[1:-1])


def tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            snippet = text[pos : pos + 12]
            raise FilterError(f"filter: unexpected character at position {pos}: {snippet!r}")
        kind = m.lastgroup or ""
        raw = m.group(0)
        pos = m.end()
        if kind == "ws":
            continue
        if kind == "string":
            toks.append(_Tok("string", raw, _unescape(raw), m.start()))
        elif kind == "quoted":
            toks.append(_Tok("name", raw, raw[1:-1], m.start()))
        elif kind == "number":
            val: Any = float(raw) if any(c in raw for c in ".eE") else int(raw)
            toks.append(_Tok("number", raw, val, m.start()))
        elif kind == "name" and raw.lower() in _KEYWORDS:
            toks.append(_Tok("kw", raw, raw.lower(), m.start()))
        else:
            toks.append(_Tok(kind, raw, raw, m.start()))
    return toks


# ------------------------------------------------------------------------------------------ parser
class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.depth = 0
        self.terms = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self, what: str) -> _Tok:
        t = self.peek()
        if t is None:
            raise FilterError(f"filter: expected {what} but the expression ended")
        self.i += 1
        return t

    def accept_kw(self, *kws: str) -> bool:
        t = self.peek()
        if t is not None and t.kind == "kw" and t.value in kws:
            self.i += 1
            return True
        return False

    def accept_op(self, op: str) -> bool:
        t = self.peek()
        if t is not None and t.kind == "op" and t.value == op:
            self.i += 1
            return True
        return False

    def fail(self, t: _Tok | None, what: str) -> FilterError:
        if t is None:
            return FilterError(f"filter: expected {what} but the expression ended")
        return FilterError(f"filter: expected {what} at position {t.pos}, found {t.text!r}")

    def parse(self) -> Any:
        if not self.toks:
            raise FilterError("filter: the expression is empty")
        node = self.expr()
        t = self.peek()
        if t is not None:
            raise self.fail(t, "'and', 'or' or the end")
        return node

    def expr(self) -> Any:
        items = [self.and_expr()]
        while self.accept_kw("or"):
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    def and_expr(self) -> Any:
        items = [self.not_expr()]
        while self.accept_kw("and"):
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def not_expr(self) -> Any:
        t = self.peek()
        if self.accept_kw("not"):
            with self.nested(t):
                return Not(self.not_expr())
        if self.accept_op("("):
            with self.nested(t):
                node = self.expr()
            if not self.accept_op(")"):
                raise self.fail(self.peek(), "')'")
            return node
        return self.comparison()

    def nested(self, t: _Tok | None) -> _Nesting:
        return _Nesting(self, t)

    def literal(self) -> Any:
        t = self.next("a value")
        if t.kind in ("string", "number"):
            return t.value
        if t.kind == "kw" and t.value in ("true", "false"):
            return t.value == "true"
        raise self.fail(t, "a value (a quoted string, a number, true or false)")

    def comparison(self) -> Cmp:
        t = self.next("a column name")
        if t.kind != "name":
            raise self.fail(t, "a column name")
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise FilterError(
                f"filter: more than {MAX_TERMS} comparisons (the limit) at position {t.pos}; "
                "combine values with 'in (...)'"
            )
        col = t.value
        op = self.next("an operator")
        if op.kind == "kw" and op.value in ("contains", "startswith", "endswith"):
            v = self.next("a quoted string")
            if v.kind != "string":
                raise self.fail(v, f"a quoted string after {op.value!r}")
            return Cmp(col, op.value, v.value)
        if op.kind == "op" and op.value in ("==", "=", "!=", "<", "<=", ">", ">="):
            val = self.literal()
            return Cmp(col, "==" if op.value == "=" else op.value, val)
        if op.kind == "kw" and op.value == "not":
            if not self.accept_kw("in"):
                raise self.fail(self.peek(), "'in' after 'not'")
            return Cmp(col, "notin", self.value_list())
        if op.kind == "kw" and op.value == "in":
            return Cmp(col, "in", self.value_list())
        if op.kind == "kw" and op.value == "between":
            lo = self.literal()
            if not self.accept_kw("and"):
                raise self.fail(self.peek(), "'and' in 'between X and Y'")
            hi = self.literal()
            return Cmp(col, "between", (lo, hi))
        if op.kind == "kw" and op.value == "is":
            negate = self.accept_kw("not")
            if not self.accept_kw("null"):
                raise self.fail(self.peek(), "'null'")
            return Cmp(col, "notnull" if negate else "isnull")
        raise self.fail(
            op, "an operator (contains, startswith, endswith, ==, !=, <, <=, >, >=, in, between, is null)"
        )

    def value_list(self) -> tuple[Any, ...]:
        if self.accept_op("("):
            close = ")"
        elif self.accept_op("["):
            close = "]"
        else:
            return (self.literal(),)
        vals = [self.literal()]
        while self.accept_op(","):
            vals.append(self.literal())
            if len(vals) > MAX_IN_VALUES:
                raise FilterError(f"filter: more than {MAX_IN_VALUES} values (the limit) in one 'in' list")
        if not self.accept_op(close):
            raise self.fail(self.peek(), f"',' or '{close}'")
        return tuple(vals)


class _Nesting:
    """One level of parentheses or `not`: the depth limit keeps every recursive walk of the tree shallow."""

    def __init__(self, parser: _Parser, t: _Tok | None):
        self.parser, self.t = parser, t

    def __enter__(self) -> None:
        self.parser.depth += 1
        if self.parser.depth > MAX_DEPTH:
            pos = f" at position {self.t.pos}" if self.t is not None else ""
            raise FilterError(f"filter: nested more than {MAX_DEPTH} levels deep (the limit){pos}")

    def __exit__(self, *exc: object) -> None:
        self.parser.depth -= 1


def parse_filter(text: str) -> Any:
    """Parse a filter expression into an AST; raise FilterError with the position of the problem."""
    return _Parser(text).parse()


@functools.lru_cache(maxsize=PARSE_CACHE)
def parse_canonical(text: str) -> Any:
    """`canonical(parse_filter(text))`, remembered for recent texts (the tree is immutable, so shared)."""
    return canonical(parse_filter(text))


def _sort_key(v: Any) -> tuple[str, str]:
    return (type(v).__name__, repr(v))


def canonical(node: Any) -> Any:
    """The canonical form of a parsed filter: same rows <=> same form for the rewrites below.

    `not not x` -> x; nested and/or of the same kind are flattened; the terms of and/or and the values of
    `in` lists are sorted and deduplicated (and/or and set membership do not depend on order).
    """
    if isinstance(node, Not):
        inner = canonical(node.item)
        return inner.item if isinstance(inner, Not) else Not(inner)
    if isinstance(node, BoolOp):
        items: dict[str, Any] = {}
        for it in node.items:
            c = canonical(it)
            for sub in c.items if isinstance(c, BoolOp) and c.op == node.op else (c,):
                items.setdefault(str(sub), sub)
        ordered = tuple(items[k] for k in sorted(items))
        return ordered[0] if len(ordered) == 1 else BoolOp(node.op, ordered)
    if node.op in ("in", "notin"):
        return Cmp(node.column, node.op, tuple(sorted(set(node.value), key=_sort_key)))
    return node


# ------------------------------------------------------------------------------------- evaluation
def _columns_of(node: Any) -> set[str]:
    if isinstance(node, Cmp):
        return {node.column}
    if isinstance(node, Not):
        return _columns_of(node.item)
    return set().union(*(_columns_of(i) for i in node.items))


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "time"
    return "other"


def check_filter(node: Any, schema: pa.Schema) -> None:
    """Type-check an AST against the metadata columns; raise FilterError naming the problem."""
    if isinstance(node, BoolOp):
        for i in node.items:
            check_filter(i, schema)
        return
    if isinstance(node, Not):
        check_filter(node.item, schema)
        return
    if node.column not in schema.names:
        raise FilterError(
            f"filter: unknown column {node.column!r}",
            hint="columns: " + ", ".join(schema.names),
        )
    kind = _kind(schema.field(node.column).type)
    op = node.op
    if op in ("isnull", "notnull"):
        return
    if op in ("contains", "startswith", "endswith"):
        if kind != "string":
            raise FilterError(f"filter: {op!r} needs a text column, {node.column!r} is {kind}")
        return
    values = node.value if op in ("in", "notin", "between") else (node.value,)
    for v in values:
        vk = "bool" if isinstance(v, bool) else "number" if isinstance(v, int | float) else "string"
        ok = vk == kind or (kind == "time" and vk == "string")
        if not ok:
            raise FilterError(f"filter: column {node.column!r} is {kind}, cannot compare it with {v!r}")
        if isinstance(v, int) and not isinstance(v, bool) and not (-(2**63) <= v < 2**63):
            raise FilterError(f"filter: {v} is out of the 64-bit integer range (column {node.column!r})")
    if op in ("<", "<=", ">", ">=", "between") and kind == "bool":
        raise FilterError(f"filter: {op!r} does not apply to the true/false column {node.column!r}")


def _eval(node: Any, batch: pa.RecordBatch) -> pa.Array:
    if isinstance(node, BoolOp):
        acc = _eval(node.items[0], batch)
        for item in node.items[1:]:
            nxt = _eval(item, batch)
            acc = pc.and_(acc, nxt) if node.op == "and" else pc.or_(acc, nxt)
        return acc
    if isinstance(node, Not):
        return pc.invert(_eval(node.item, batch))
    col = batch.column(node.column)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    op, v = node.op, node.value
    if op == "isnull":
        return pc.is_null(col)
    if op == "notnull":
        return pc.is_valid(col)
    if op == "contains":
        res = pc.match_substring(col, v, ignore_case=True)
    elif op == "startswith":
        res = pc.starts_with(col, v, ignore_case=True)
    elif op == "endswith":
        res = pc.ends_with(col, v, ignore_case=True)
    elif op in ("in", "notin"):
        try:
            value_set = pa.array(list(v)).cast(col.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError) as e:
            logger.info("filter values %r do not fit column %r: %s", list(v)[:20], node.column, e)
            raise FilterError(
                f"filter: the values of 'in' do not fit column {node.column!r} ({col.type})"
            ) from None
        res = pc.is_in(col, value_set=value_set)
        if op == "notin":
            res = pc.invert(res)
    elif op == "between":
        lo, hi = v
        res = pc.and_(pc.greater_equal(col, lo), pc.less_equal(col, hi))
    else:
        fn = {
            "==": pc.equal,
            "!=": pc.not_equal,
            "<": pc.less,
            "<=": pc.less_equal,
            ">": pc.greater,
            ">=": pc.greater_equal,
        }[op]
        scalar = pa.scalar(v)
        if _kind(col.type) == "time":
            scalar = pa.scalar(v).cast(col.type)
        res = fn(col, scalar)
    return pc.fill_null(res, False)


@dataclass
class FilterBitmap:
    """The ids a filter allows, kept as the packed bitmap faiss reads (n / 8 bytes) and their count."""

    expression: str
    n: int
    count: int
    packed: np.ndarray = field(repr=False)  # uint8 [(n + 7) // 8], little-endian bit order
    _ids: np.ndarray | None = field(default=None, repr=False)

    @property
    def mask(self) -> np.ndarray:
        """bool [n] (computed on demand; not kept, to keep the cache small)."""
        return np.unpackbits(self.packed, count=self.n, bitorder="little").astype(bool)

    @property
    def ids(self) -> np.ndarray:
        """Sorted allowed ids; kept after the first call only when few (the exact-search case)."""
        if self._ids is not None:
            return self._ids
        ids = np.flatnonzero(self.mask).astype(np.int64)
        if self.count <= KEEP_IDS_MAX:
            self._ids = ids
        return ids

    @property
    def selectivity(self) -> float:
        return self.count / max(1, self.n)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """bool array shaped like `ids`: whether each id is allowed (ids outside [0, n) are not)."""
        ids = np.asarray(ids, dtype=np.int64)
        valid = (ids >= 0) & (ids < self.n)
        safe = np.where(valid, ids, 0)
        bits = (self.packed[safe >> 3] >> (safe & 7).astype(np.uint8)) & 1
        return valid & bits.astype(bool)

    def selector(self) -> Any:
        """A fresh faiss IDSelectorBitmap over this bitmap (the bitmap stays alive with this object)."""
        import faiss

        sel = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(self.packed))
        sel._owner = self  # keep the numpy buffer alive as long as the selector
        return sel


def compute_bitmap(
    expression: str | Any,
    table: Any,
    n: int | None = None,
    *,
    deadline: float | None = None,
    budget_s: float | None = None,
) -> FilterBitmap:
    """Evaluate `expression` (text or parsed form) over a MetadataTable (anything with .schema and
    .batches()). With `deadline` (a `time.monotonic()` value), FilterBudgetError once it has passed
    (`budget_s` is only quoted in the message)."""
    node = canonical(parse_filter(expression) if isinstance(expression, str) else expression)
    check_filter(node, table.schema)
    text = str(node)
    cols = sorted(_columns_of(node))
    total = table.num_rows if n is None else n
    packed = np.zeros((total + 7) // 8, dtype=np.uint8)
    count = 0
    for batch_start, batch in table.batches():
        if batch_start >= total:
            break
        # slices of at most EVAL_ROWS rows (zero-copy), so that the deadline is checked often enough
        for off in range(0, max(1, batch.num_rows), EVAL_ROWS):
            start = batch_start + off
            if start >= total:
                break
            sub = batch.slice(off, EVAL_ROWS).select(cols)
            try:
                res = _eval(node, sub)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError) as e:
                logger.info("filter %s could not be evaluated: %s", text, e)
                raise FilterError(
                    "filter: cannot evaluate it over the metadata columns (a value does not fit its column's type)"
                ) from None
            count += _pack_into(packed, start, res.to_numpy(zero_copy_only=False)[: total - start])
            done = start + sub.num_rows
            if deadline is not None and done < total and time.monotonic() > deadline:
                budget = f"{budget_s:g} s " if budget_s is not None else ""
                raise FilterBudgetError(
                    f"filter: evaluating this new filter took longer than the {budget}per-request budget "
                    f"(filter_budget_s) after {done:,} of {total:,} rows; use fewer or cheaper terms "
                    "(==, in and between cost less than contains, startswith and endswith)"
                )
    return FilterBitmap(text, total, count, packed)


def _pack_into(packed: np.ndarray, start: int, arr: np.ndarray) -> int:
    """OR the bits of bool `arr` into `packed` from bit `start` (which may fall mid-byte); returns the count."""
    arr = arr.astype(bool, copy=False)
    count = int(arr.sum())
    head = (-start) % 8  # bits until the next byte boundary
    if head:
        for j in range(min(head, len(arr))):
            if arr[j]:
                packed[(start + j) >> 3] |= np.uint8(1 << ((start + j) & 7))
        arr = arr[head:]
        start += head
    if len(arr):
        bits = np.packbits(arr, bitorder="little")
        packed[start >> 3 : (start >> 3) + len(bits)] |= bits
    return count


class FilterCache:
    """LRU of FilterBitmap per canonical parsed filter (thread-safe).

    Filter texts are parsed once (`parse_canonical` keeps recent ones), then bitmaps are looked up by their
    canonical form. A new filter is evaluated within `budget_s` seconds (None: no limit).
    """

    def __init__(self, table: Any, size: int = 64, n: int | None = None, budget_s: float | None = None):
        self.table = table
        self.size = size
        self.n = n
        self.budget_s = budget_s
        self._cache: OrderedDict[Any, FilterBitmap] = OrderedDict()
        self._lock = threading.Lock()
        self._flights: dict[Any, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def key(self, expression: str) -> Any:
        """The canonical parsed form of `expression` (FilterError when it does not parse)."""
        return parse_canonical(expression)

    def cached(self, expression: str) -> bool:
        try:
            key = self.key(expression)
        except FilterError:
            return True  # fails fast either way
        with self._lock:
            return key in self._cache

    def get(self, expression: str, deadline: float | None = None) -> FilterBitmap:
        key = self.key(expression)
        with self._lock:
            bm = self._cache.get(key)
            if bm is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return bm
        with self._lock:  # one computation per expression, however many requests ask at once
            flight = self._flights.setdefault(key, threading.Lock())
        with flight:
            with self._lock:
                bm = self._cache.get(key)
            if bm is not None:
                return bm
            if deadline is None and self.budget_s is not None:
                deadline = time.monotonic() + self.budget_s
            try:
                bm = compute_bitmap(key, self.table, self.n, deadline=deadline, budget_s=self.budget_s)
            finally:
                with self._lock:
                    self._flights.pop(key, None)
        with self._lock:
            self.misses += 1
            self._cache[key] = bm
            self._cache.move_to_end(key)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return bm
