"""Near-duplicate collapsing of a result list by embedding similarity."""

from __future__ import annotations

import numpy as np

BLOCK = 256


def near_duplicates(vectors: np.ndarray, threshold: float, max_kept: int | None = None) -> np.ndarray:
    """Boolean mask of the rows to drop: a row whose cosine similarity to an earlier kept row is >= threshold.

    Rows are in rank order (best first), so the best of each group stays. Memory stays O(kept x dim):
    rows are compared block by block with the rows kept so far, then greedily inside the block. With
    `max_kept`, the rows after the block in which that many rows were kept are not examined (left False):
    a results page needs only its first rows, and the cost grows with rows x kept.
    """
    n = len(vectors)
    drop = np.zeros(n, dtype=bool)
    if n < 2:
        return drop
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    kept: list[np.ndarray] = []
    for start in range(0, n, BLOCK):
        block = v[start : start + BLOCK]
        bad = np.zeros(len(block), dtype=bool)
        if kept:
            prev = np.concatenate(kept)
            bad |= (block @ prev.T >= threshold).any(axis=1)
        inner = block @ block.T
        if not (np.triu(inner, 1) >= threshold).any() and not bad.any():  # the common case: no duplicates
            kept.append(block)
            if max_kept is not None and sum(len(k) for k in kept) >= max_kept:
                break
            continue
        for i in range(len(block)):
            if bad[i]:
                continue
            earlier = np.flatnonzero(~bad[:i])
            if len(earlier) and (inner[i, earlier] >= threshold).any():
                bad[i] = True
        drop[start : start + len(block)] = bad
        kept.append(block[~bad])
        if max_kept is not None and sum(len(k) for k in kept) >= max_kept:
            break
    return drop
