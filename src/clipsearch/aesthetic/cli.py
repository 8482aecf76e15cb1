"""Rate an index's images with a linear aesthetic predictor and write its aesthetic embeddings table.

`clipsearch aesthetic --index DIR --predictor FILE` scores every image embedding of the index, puts each
image in the bin of its rounded score (0..9, clipped), and writes `DIR/aesthetic_embeddings.npy`: row s
is the mean of the L2-normalised image embeddings rated s (an empty bin takes the linear interpolation of
its nearest non-empty neighbours). `serve` then nudges queries with it (`aesthetic_score`,
`aesthetic_weight`). A summary (`aesthetic_embeddings.json`) records the predictor, the bins' counts and the
score distribution.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.aesthetic.predictor import LinearPredictor, load_predictor
from clipsearch.aesthetic.table import NUM_SCORES, TABLE_FILE, save_table
from clipsearch.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

CHUNK = 65_536


@dataclass(frozen=True)
class AestheticConfig:
    index: str
    predictor: str
    output: str | None = None  # default: INDEX/aesthetic_embeddings.npy
    #: score = scale * prediction + shift, before binning (a predictor on another scale, e.g. 1..10)
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if "://" in self.index:
            raise ConfigError("--index must be a local index folder", hint="--index DIR")
        if not os.path.exists(os.path.join(self.index, "index.json")):
            raise ConfigError(f"{self.index} is not an index folder (no index.json)", hint="--index DIR")
        if self.output is not None and not self.output.endswith(".npy"):
            raise ConfigError(f"output {self.output} must end with .npy", hint="--output FILE.npy")
        if not (np.isfinite(self.scale) and np.isfinite(self.shift)) or self.scale == 0:
            raise ConfigError("--scale must be finite and non-zero, --shift finite")


def build_table(
    vectors_chunks: Any, predictor: LinearPredictor, scale: float = 1.0, shift: float = 0.0
) -> tuple[np.ndarray, dict[str, Any]]:
    """(table [10, dim], summary) from an iterable of [n, dim] image-vector chunks."""
    dim = predictor.dim
    sums = np.zeros((NUM_SCORES, dim), np.float64)
    counts = np.zeros(NUM_SCORES, np.int64)
    all_scores = []
    for chunk in vectors_chunks:
        v = np.asarray(chunk, dtype=np.float32)
        if v.shape[1] != dim:
            raise InputError(f"the predictor takes {dim}-d embeddings but the index holds {v.shape[1]}-d")
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        s = predictor(v) * scale + shift
        all_scores.append(s)
        bins = np.clip(np.rint(s), 0, NUM_SCORES - 1).astype(np.int64)
        np.add.at(sums, bins, v)
        counts += np.bincount(bins, minlength=NUM_SCORES)
    if counts.sum() == 0:
        raise InputError("the index holds no image embedding to rate")
    filled = np.flatnonzero(counts)
    table = np.zeros((NUM_SCORES, dim), np.float64)
    table[filled] = sums[filled] / counts[filled, None]
    for s in range(NUM_SCORES):  # empty bins: interpolate between the nearest filled ones
        if counts[s]:
            continue
        lo, hi = filled[filled < s], filled[filled > s]
        if len(lo) and len(hi):
            a, b = lo[-1], hi[0]
            t = (s - a) / (b - a)
            table[s] = (1 - t) * table[a] + t * table[b]
        else:
            table[s] = table[lo[-1] if len(lo) else hi[0]]
    scores = np.concatenate(all_scores)
    summary = {
        "counts": counts.tolist(),
        "interpolated": [int(s) for s in range(NUM_SCORES) if counts[s] == 0],
        "score_mean": float(scores.mean()),
        "score_quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.01", "0.5", "0.99")},
    }
    return table.astype(np.float32), summary


def _image_vectors(index: str) -> tuple[Any, int]:
    from clipsearch.search.live import open_index

    s = open_index(index)
    if "image" not in s.indices:
        s.close()
        raise InputError(f"{index} has no image index: the predictor rates image embeddings")

    def chunks():
        try:
            for start in range(0, s.count, CHUNK):
                yield s.vectors(np.arange(start, min(s.count, start + CHUNK)), "image")
        finally:
            s.close()

    return chunks(), s.dim


def rate_index(cfg: AestheticConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    predictor = load_predictor(cfg.predictor)
    chunks, dim = _image_vectors(cfg.index)
    if predictor.dim != dim:
        raise InputError(
            f"the predictor takes {predictor.dim}-d embeddings but {cfg.index} holds {dim}-d",
            hint="--predictor made for the index's model",
        )
    table, summary = build_table(chunks, predictor, cfg.scale, cfg.shift)
    out = cfg.output or os.path.join(cfg.index, TABLE_FILE)
    save_table(out, table)
    summary = {
        "format": "clipsearch.aesthetic",
        "predictor": os.path.abspath(cfg.predictor),
        "scale": cfg.scale,
        "shift": cfg.shift,
        **summary,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    meta = out[: -len(".npy")] + ".json"
    tmp = meta + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, meta)
    logger.info("aesthetic: %s written (images per score 0..9: %s)", out, summary["counts"])
    return {"output": out, **summary}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index", required=True, metavar="DIR", help="the index/ folder whose images to rate"
    )
    parser.add_argument(
        "--predictor",
        required=True,
        metavar="FILE",
        help="linear aesthetic predictor over the index's image embeddings (.pth, .safetensors or .npz; "
        "LAION's linear and improved predictors load as they are)",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="FILE.npy",
        help="where to write the table (default: DIR/" + TABLE_FILE + ")",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="score = scale * prediction + shift")
    parser.add_argument("--shift", type=float, default=0.0, help="score = scale * prediction + shift")


def run(args: argparse.Namespace) -> int:
    res = rate_index(
        AestheticConfig(
            index=args.index, predictor=args.predictor, output=args.output, scale=args.scale, shift=args.shift
        )
    )
    print(json.dumps({k: res[k] for k in ("output", "counts", "score_mean")}))
    return 0
