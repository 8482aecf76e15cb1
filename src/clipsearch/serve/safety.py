"""Zero-shot safety filter: CLIP text embeddings of unsafe and safe prompts, compared with result vectors.

A result is unsafe when its best similarity to an unsafe prompt beats its best similarity to a safe prompt
by more than `threshold`. The prompts are encoded with the serving model's text encoder on first use, so
nothing is downloaded and startup stays fast.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class SafetyFilter:
    def __init__(
        self, encoder: Any, unsafe_prompts: Sequence[str], safe_prompts: Sequence[str], threshold: float
    ):
        self.encoder = encoder
        self.unsafe_prompts = list(unsafe_prompts)
        self.safe_prompts = list(safe_prompts)
        self.threshold = float(threshold)
        self._lock = threading.Lock()
        self._unsafe: np.ndarray | None = None
        self._safe: np.ndarray | None = None

    def _embeddings(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._unsafe is None:
            with self._lock:
                if self._unsafe is None:
                    emb = np.asarray(
                        self.encoder.encode_text(self.unsafe_prompts + self.safe_prompts), np.float32
                    )
                    self._safe = emb[len(self.unsafe_prompts) :] if self.safe_prompts else None
                    self._unsafe = emb[: len(self.unsafe_prompts)]
                    logger.info(
                        "safety filter ready: %d unsafe, %d safe prompts",
                        len(self.unsafe_prompts),
                        len(self.safe_prompts),
                    )
        return self._unsafe, self._safe

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """Unsafe margin of each vector: max sim to unsafe prompts minus max sim to safe prompts."""
        unsafe, safe = self._embeddings()
        v = np.asarray(vectors, dtype=np.float32)
        if len(v) == 0:
            return np.zeros(0, dtype=np.float32)
        s_unsafe = (v @ unsafe.T).max(axis=1)
        s_safe = (v @ safe.T).max(axis=1) if safe is not None and len(safe) else 0.0
        return (s_unsafe - s_safe).astype(np.float32)

    def unsafe(self, vectors: np.ndarray, threshold: float | None = None) -> np.ndarray:
        t = self.threshold if threshold is None else float(threshold)
        return self.scores(vectors) > t
