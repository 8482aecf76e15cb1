"""Aesthetic nudging of query vectors (clipsearch.aesthetic) for the served indices.

Each index gets the table given by `aesthetic_embeddings` (one file for the served model), else the index
folder's own `aesthetic_embeddings.npy` (`clipsearch aesthetic`), else the model folder's; an index
without one answers a native /knn request that asks for nudging with a 400 (clip back's API ignores it,
as clip back does for models without aesthetic embeddings).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from clipsearch.aesthetic.table import check_request, find_table, load_table, nudge
from clipsearch.errors import ConfigError, InputError
from clipsearch.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT = 0.5


def load_tables(settings: ServeSettings, searchers: dict[str, Any], encoder: Any) -> dict[str, np.ndarray]:
    model_folder = getattr(encoder, "resolved", None)
    model_folder = model_folder if isinstance(model_folder, str) and os.path.isdir(model_folder) else None
    out: dict[str, np.ndarray] = {}
    for name, s in searchers.items():
        path = settings.aesthetic_embeddings or find_table(settings.indices[name], model_folder)
        if path is None:
            continue
        try:
            table = load_table(path)
        except InputError as e:
            raise ConfigError(str(e), hint="--aesthetic-embeddings FILE, or `clipsearch aesthetic`") from None
        if table.shape[1] != s.dim:
            raise ConfigError(
                f"aesthetic embeddings {path} are {table.shape[1]}-d but index {name!r} holds {s.dim}-d vectors",
                hint="--aesthetic-embeddings made for the index's model",
            )
        logger.info("index %s: aesthetic nudging with %s", name, path)
        out[name] = table
    return out


def apply(
    vec: np.ndarray,
    table: np.ndarray | None,
    score: int | None,
    weight: float | None,
    *,
    index: str,
    score_field: str = "aesthetic_score",
    weight_field: str = "aesthetic_weight",
    strict: bool = True,
) -> np.ndarray:
    """The nudged query, or `vec` when no score is asked (or, not strict, when the index has no table)."""
    check_request(score, weight, score_field=score_field, weight_field=weight_field)
    if score is None:
        return vec
    if table is None:
        if not strict:
            return vec
        raise InputError(
            f"{score_field}: index {index!r} has no aesthetic embeddings",
            hint="run `clipsearch aesthetic --index DIR --predictor FILE`, or serve --aesthetic-embeddings FILE",
        )
    return nudge(vec, table, score, DEFAULT_WEIGHT if weight is None else weight)
