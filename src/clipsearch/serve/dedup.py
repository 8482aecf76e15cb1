"""Near-duplicate collapsing of a result list by embedding similarity."""

from __future__ import annotations

import numpy as np


def near_duplicates(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of the rows to drop: a row whose cosine similarity to an earlier kept row is >= threshold.

    Rows are assumed to be in rank order (best first) and L2-normalised, so the best of each group stays.
    """
    n = len(vectors)
    drop = np.zeros(n, dtype=bool)
    if n < 2:
        return drop
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = v / np.maximum(norms, 1e-12)
    sims = v @ v.T
    for i in range(1, n):
        earlier_kept = ~drop[:i]
        if earlier_kept.any() and (sims[i, :i][earlier_kept] >= threshold).any():
            drop[i] = True
    return drop
