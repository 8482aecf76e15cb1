"""The index stage: embeddings -> searchable faiss indices under a memory budget. See docs/index.md."""

from __future__ import annotations

from clipsearch.index.config import IndexConfig
from clipsearch.index.runner import build_index

__all__ = ["IndexConfig", "build_index"]
