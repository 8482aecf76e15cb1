"""Rate an index's images with a linear aesthetic predictor and write its aesthetic embeddings table.

`clipsearch aesthetic --index DIR --predictor FILE` scores every image embedding of the index (L2-normalised)
and writes `DIR/aesthetic_embeddings.npy`, the [10, dim] table `serve` nudges queries with
(`aesthetic_score`, `aesthetic_weight`). Two ways to make the row of score s:

- `direction` (default): `A[s] = (s - m) / max(9 - m, m) x g x u`, where u is the predictor's own direction
  (its weight vector, normalised), m the index's mean score, and g = sigma_pair / (4 sigma_u): sigma_u is the
  spread of the images along u and sigma_pair that of the similarities between random pairs of the index's
  images. So a weight of 1 toward score 9 adds, to an image one standard deviation higher along u, a quarter
  of the index's typical similarity spread. Only the quality direction moves the query: nothing pulls it
  toward the content that happens to be rated high.
- `bins`: row s is the mean of the images rated s (their rounded, clipped score), as LAION's `rating*.npy`
  tables that clip back downloads are; an empty bin takes the interpolation of its nearest filled neighbours.
  Those means mostly point at the average image and at whatever content the predictor likes, so they shift
  content more than quality (measured on the demo: docs/serve.md, Aesthetic nudging).

A summary (`aesthetic_embeddings.json`) records the predictor, the method, the counts per score and the
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
METHODS = ("direction", "bins")
PAIRS = 20_000  # random pairs that measure the index's similarity spread


@dataclass(frozen=True)
class AestheticConfig:
    index: str
    predictor: str
    output: str | None = None  # default: INDEX/aesthetic_embeddings.npy
    #: score = scale * prediction + shift, before binning (a predictor on another scale, e.g. 1..10)
    scale: float = 1.0
    shift: float = 0.0
    method: str = "direction"  # direction | bins

    def __post_init__(self) -> None:
        if "://" in self.index:
            raise ConfigError("--index must be a local index folder", hint="--index DIR")
        if not os.path.exists(os.path.join(self.index, "index.json")):
            raise ConfigError(f"{self.index} is not an index folder (no index.json)", hint="--index DIR")
        if self.output is not None and not self.output.endswith(".npy"):
            raise ConfigError(f"output {self.output} must end with .npy", hint="--output FILE.npy")
        if not (np.isfinite(self.scale) and np.isfinite(self.shift)) or self.scale == 0:
            raise ConfigError("--scale must be finite and non-zero, --shift finite")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}", hint="--method " + "|".join(METHODS))


def build_table(
    vectors_chunks: Any,
    predictor: LinearPredictor,
    scale: float = 1.0,
    shift: float = 0.0,
    method: str = "direction",
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(table [10, dim], summary) from an iterable of [n, dim] image-vector chunks."""
    dim = predictor.dim
    u = predictor.weight.astype(np.float64) * np.sign(scale)
    u /= max(float(np.linalg.norm(u)), 1e-12)
    sums = np.zeros((NUM_SCORES, dim), np.float64)
    counts = np.zeros(NUM_SCORES, np.int64)
    all_scores, proj, sample = [], [], []
    rng = np.random.default_rng(seed)
    for chunk in vectors_chunks:
        v = np.asarray(chunk, dtype=np.float32)
        if v.shape[1] != dim:
            raise InputError(f"the predictor takes {dim}-d embeddings but the index holds {v.shape[1]}-d")
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        s = predictor(v) * scale + shift
        all_scores.append(s)
        proj.append(v @ u)
        bins = np.clip(np.rint(s), 0, NUM_SCORES - 1).astype(np.int64)
        np.add.at(sums, bins, v)
        counts += np.bincount(bins, minlength=NUM_SCORES)
        sample.append(v[rng.random(len(v)) < min(1.0, 4096 / max(1, len(v)))])
    if counts.sum() == 0:
        raise InputError("the index holds no image embedding to rate")
    scores = np.concatenate(all_scores)
    summary: dict[str, Any] = {
        "method": method,
        "counts": counts.tolist(),
        "score_mean": float(scores.mean()),
        "score_quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.01", "0.5", "0.99")},
    }
    if method == "direction":
        m = float(np.clip(scores.mean(), 0, NUM_SCORES - 1))
        sigma_u = float(np.concatenate(proj).std())
        pool = np.concatenate(sample)
        i, j = rng.integers(0, len(pool), PAIRS), rng.integers(0, len(pool), PAIRS)
        sigma_pair = float(np.einsum("ij,ij->i", pool[i], pool[j]).std()) if len(pool) > 1 else 0.0
        gain = sigma_pair / (4.0 * sigma_u) if sigma_u > 1e-9 and sigma_pair > 0 else 1.0
        span = max(NUM_SCORES - 1 - m, m, 1e-6)
        table = np.stack([(s - m) / span * gain * u for s in range(NUM_SCORES)])
        summary.update({"sigma_u": sigma_u, "sigma_pair": sigma_pair, "gain": gain})
        return table.astype(np.float32), summary
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
    summary["interpolated"] = [int(s) for s in range(NUM_SCORES) if counts[s] == 0]
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
    table, summary = build_table(chunks, predictor, cfg.scale, cfg.shift, cfg.method)
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
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="direction",
        help="direction: rows along the predictor's direction (moves quality, not content); bins: the mean "
        "image of each score, as LAION's rating*.npy tables",
    )


def run(args: argparse.Namespace) -> int:
    res = rate_index(
        AestheticConfig(
            index=args.index,
            predictor=args.predictor,
            output=args.output,
            scale=args.scale,
            shift=args.shift,
            method=args.method,
        )
    )
    print(json.dumps({k: res[k] for k in ("output", "method", "counts", "score_mean")}))
    return 0
