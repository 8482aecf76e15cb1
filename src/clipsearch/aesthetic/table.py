"""The aesthetic embeddings table: one vector per score 0..9, and the nudge that uses it.

Formats read (`load_table`):
- `.npy` holding float [10, dim] (clipsearch's own, written by `save_table`): row s is the mean of the
  L2-normalised image embeddings rated s;
- `.npz` with arrays `rating0` ... `rating9` (each [dim] or [1, dim]), or one array `embeddings` [10, dim];
- a folder with `rating0.npy` ... `rating9.npy` (LAION's aesthetic-predictor `*_embeddings/` layout, which
  clip back downloads for ViT-B/32 and ViT-L/14).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from clipsearch.errors import InputError

NUM_SCORES = 10
#: the table's name in an index folder (written by `clipsearch aesthetic`) or a model folder
TABLE_FILE = "aesthetic_embeddings.npy"


def _check(table: np.ndarray, where: str) -> np.ndarray:
    t = np.asarray(table, dtype=np.float32)
    if t.ndim != 2 or t.shape[0] != NUM_SCORES:
        raise InputError(f"{where}: an aesthetic table must be [{NUM_SCORES}, dim], got shape {t.shape}")
    if not np.isfinite(t).all():
        raise InputError(f"{where}: the aesthetic table holds non-finite values")
    return t


def load_table(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a table in any of the module's formats; raises InputError naming what is wrong."""
    p = Path(path)
    if p.is_dir():
        rows = []
        for s in range(NUM_SCORES):
            f = p / f"rating{s}.npy"
            if not f.exists():
                raise InputError(f"{p} has no rating{s}.npy (a folder needs rating0.npy ... rating9.npy)")
            rows.append(np.load(f, allow_pickle=False).reshape(-1))
        return _check(np.stack(rows), str(p))
    if not p.exists():
        raise InputError(f"aesthetic embeddings file {p} does not exist")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{p} is not a readable .npy/.npz file: {e}") from e
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            if "embeddings" in data.files:
                return _check(data["embeddings"], str(p))
            missing = [s for s in range(NUM_SCORES) if f"rating{s}" not in data.files]
            if missing:
                raise InputError(f"{p} has neither 'embeddings' nor rating{missing[0]}")
            return _check(np.stack([data[f"rating{s}"].reshape(-1) for s in range(NUM_SCORES)]), str(p))
    return _check(data, str(p))


def save_table(path: str | os.PathLike[str], table: np.ndarray) -> None:
    """Write a [10, dim] float32 .npy atomically."""
    t = _check(table, str(path))
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, t)
    os.replace(tmp, path)


def find_table(index_folder: str | None, model_folder: str | None = None) -> str | None:
    """Where a served index's table is, if anywhere: the index folder's, else the model folder's."""
    for folder in (index_folder, model_folder):
        if folder and "://" not in folder:
            f = os.path.join(folder, TABLE_FILE)
            if os.path.exists(f):
                return f
    return None


def check_request(score: object, weight: object, *, score_field: str, weight_field: str) -> None:
    """Score in 0..9 and a finite weight, else InputError naming the field."""
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, int) or not (0 <= score < NUM_SCORES):
            raise InputError(f"{score_field} must be an integer from 0 to 9, got {score!r}")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise InputError(f"{weight_field} must be a finite number, got {weight!r}")


def nudge(vec: np.ndarray, table: np.ndarray, score: int, weight: float) -> np.ndarray:
    """clip back's rule: normalize(q + weight * table[score]), q first normalised (clipsearch's queries
    always are). A zero result (weight cancelling q exactly) leaves q unchanged."""
    q = np.asarray(vec, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(q))
    if n > 0:
        q = q / n
    out = q + np.float32(weight) * table[int(score)]
    norm = float(np.linalg.norm(out))
    if not math.isfinite(norm) or norm < 1e-12:
        return q
    return (out / norm).astype(np.float32)
