#!/usr/bin/env python
"""Fit the linear quality ("aesthetic") predictor shipped for the tiny CLIP, and measure nudging on the demo.

The demo sample has a visible quality attribute (`clipsearch.demo.sample`: sharp, blurred or noisy images).
This script, seeded, on CPU, offline:

1. generates `--train-n` images with their own seed (never the demo's), half of them degraded, passes them
   through a simulated download (256 px border, JPEG 90) and embeds them with the tiny CLIP's image tower;
2. fits a ridge regression from the L2-normalised embedding to a score (sharp 9, degraded 0) and saves it
   as a linear layer (`weight` [1, 64], `bias` [1]) in `tiny_clip/aesthetic_predictor.safetensors`, the
   format `clipsearch aesthetic --predictor` reads (as LAION's linear predictors);
3. measures, on the demo's own sample (seed 0, 3,000 images, 40 % degraded: held out from the fit), what
   `aesthetic_score=9` does at each `aesthetic_weight`: the mean quality (share of sharp images) of the top 24
   of the 48 colour+shape queries, and their colour+shape precision@24, with the table `clipsearch aesthetic`
   writes (`direction`, the default, and LAION-style `bins`).

Usage::

    .venv/bin/python scripts/train_tiny_aesthetic.py
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipsearch.aesthetic.cli import build_table  # noqa: E402
from clipsearch.aesthetic.predictor import LinearPredictor, load_predictor  # noqa: E402
from clipsearch.aesthetic.table import nudge  # noqa: E402
from clipsearch.demo.sample import COLORS, SHAPES, degrade, make_image, sample_attributes, sample_quality  # noqa: E402

DEFAULT_OUT = ROOT / "src" / "clipsearch" / "demo" / "tiny_clip" / "aesthetic_predictor.safetensors"


def _download(img):
    """The demo's download, simulated: keep ratio into a 256 px square with a black border, JPEG 90."""
    from PIL import Image

    w, h = img.size
    k = 256 / max(w, h)
    img = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (256, 256))
    out.paste(img, ((256 - img.size[0]) // 2, (256 - img.size[1]) // 2))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=90)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def images(n: int, seed: int, degraded: float):
    imgs, attrs = [], []
    for i in range(n):
        c, s, b, rng = sample_attributes(i, seed)
        q, qrng = sample_quality(i, seed, degraded)
        imgs.append(_download(degrade(make_image(c, s, b, rng), q, qrng)))
        attrs.append((c, s, q))
    return imgs, attrs


def measure(img_emb, attrs, queries, pairs, table, weights, k=24):
    out = {}
    for w in weights:
        q = np.stack([nudge(v, table, 9, w) for v in queries]) if w else queries
        top = np.argsort(-(q @ img_emb.T), axis=1)[:, :k]
        prec = float(np.mean([[attrs[j][:2] == p for j in row] for row, p in zip(top, pairs, strict=True)]))
        qual = float(np.mean([[attrs[j][2] == "sharp" for j in row] for row in top]))
        out[str(w)] = {"precision@24": round(prec, 4), "quality@24": round(qual, 4)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=77, help="seed of the training images (the demo's is 0)")
    p.add_argument("--train-n", type=int, default=1200)
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--demo-n", type=int, default=3000)
    p.add_argument("--demo-degraded", type=float, default=0.4)
    args = p.parse_args(argv)

    import torch
    from safetensors.numpy import save_file

    from clipsearch.embed.models import load_clip

    torch.set_num_threads(1)
    t0 = time.time()
    enc = load_clip("clipsearch-tiny", backend="torch")
    imgs, attrs = images(args.train_n, args.seed, 0.5)
    x = enc.encode_images(imgs)
    y = np.array([9.0 if a[2] == "sharp" else 0.0 for a in attrs])
    x1 = np.hstack([x, np.ones((len(x), 1))])
    reg = args.ridge * np.eye(x1.shape[1])
    reg[-1, -1] = 0.0  # the bias is not shrunk
    coef = np.linalg.solve(x1.T @ x1 + reg, x1.T @ y)
    save_file(
        {"weight": coef[:-1][None].astype(np.float32), "bias": coef[-1:].astype(np.float32)},
        str(args.out),
        metadata={"what": "tiny CLIP image embedding -> quality score (sharp 9, blurred or noisy 0)"},
    )
    predictor = load_predictor(str(args.out))
    train_acc = float(np.mean((predictor(x) > 4.5) == (y > 4.5)))
    print(f"predictor: train accuracy {train_acc:.3f} ({time.time() - t0:.0f}s)", flush=True)

    demo_imgs, demo_attrs = images(args.demo_n, 0, args.demo_degraded)
    demo_x = enc.encode_images(demo_imgs)
    sharp = np.array([a[2] == "sharp" for a in demo_attrs])
    demo_acc = float(np.mean((predictor(demo_x) > 4.5) == sharp))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    queries = enc.encode_text([f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in pairs])
    weights = (0.0, 0.25, 0.5, 1.0, 2.0)
    report = {
        "seed": args.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "train_accuracy": round(train_acc, 4),
        "demo_accuracy": round(demo_acc, 4),
        "demo_sharp_share": round(float(sharp.mean()), 4),
        "nudging": {},
    }
    for method in ("direction", "bins"):
        table, summary = build_table(
            [demo_x], LinearPredictor(predictor.weight, predictor.bias), method=method
        )
        report["nudging"][method] = measure(demo_x, demo_attrs, queries, pairs, table, weights)
        report["nudging"][method]["table"] = {k: v for k, v in summary.items() if k != "score_quantiles"}
    report["seconds"] = round(time.time() - t0, 1)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
