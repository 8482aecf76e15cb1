"""Incremental updates of an index folder: append segments, delete rows (tombstones), compact, and the
segment-aware searcher with hot reload that `serve` and `query` use. See docs/formats.md section 3b."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipsearch.segments.append import append_segment
    from clipsearch.segments.compact import CompactConfig, compact
    from clipsearch.segments.delete import DeleteConfig, delete_rows

__all__ = ["append_segment", "compact", "CompactConfig", "delete_rows", "DeleteConfig"]

_LAZY = {
    "append_segment": "clipsearch.segments.append",
    "compact": "clipsearch.segments.compact",
    "CompactConfig": "clipsearch.segments.compact",
    "delete_rows": "clipsearch.segments.delete",
    "DeleteConfig": "clipsearch.segments.delete",
}


def __getattr__(name: str) -> Any:  # heavy modules (faiss) load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
