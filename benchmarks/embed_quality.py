"""Quality of every backend and precision against torch fp32 (issue 19): embeddings and retrieval.

    .venv/bin/python benchmarks/embed_quality.py [--vitb32 DIR] [--demo-n 3000] [--vit-demo-n 500] [--out F]

For the shipped tiny model (trained) and a ViT-B/32 (random weights, shared/bench/make_vitb32.py), on two
corpora (the demo sample, `generate_sample(n, seed=0)`, and the e2e test corpus, 300 images, seed 123):
  - worst and mean cosine between each image's (and each caption's) embedding and torch fp32's;
  - top-10 overlap of text -> image retrieval (exact search over the corpus' image embeddings): for each
    query, the share of torch fp32's top 10 that the backend's top 10 holds, averaged over the queries.
    Queries: every "a {colour} {shape}" of the sample's vocabulary, and 200 of the corpus' own captions.
Images go through the embed stage's own path (bytes -> decode workers' uint8 arrays -> the encoder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
    ("onnx", "fp32"),
    ("onnx", "int8"),
]


def corpus(folder: Path, n: int, seed: int) -> list[dict]:
    from clipsearch.demo.sample import generate_sample

    marker = folder / "sample.jsonl"
    if marker.exists():
        rows = [json.loads(ln) for ln in marker.read_text().splitlines() if ln.strip()]
        if len(rows) == n:
            return rows
    return generate_sample(folder, n, seed=seed)


_DECODED: dict = {}


def decoded(pp, folder: Path, rows: list[dict], batch: int) -> list[np.ndarray]:
    """The embed stage's decode (uint8 batches), done once per preprocessing and corpus: it is the same for
    every backend."""
    from clipsearch.embed.preprocess import decode_batch

    key = (pp, str(folder), len(rows))
    if key not in _DECODED:
        out = []
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            arr, ok, bad = decode_batch(pp, [(folder / r["file"]).read_bytes() for r in chunk])
            assert not bad and len(ok) == len(chunk), bad
            out.append(arr)
        _DECODED[key] = out
    return _DECODED[key]


def embed_corpus(enc, folder: Path, rows: list[dict], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    import torch

    imgs, txts = [], []
    for i, arr in enumerate(decoded(enc.preprocessor, folder, rows, batch)):
        chunk = rows[i * batch : (i + 1) * batch]
        imgs.append(enc.image_features(torch.from_numpy(arr)).numpy())
        txts.append(enc.encode_text([r["caption"] for r in chunk]))
    return np.concatenate(imgs), np.concatenate(txts)


def queries(rows: list[dict]) -> list[str]:
    from clipsearch.demo.sample import COLORS, SHAPES

    rng = random.Random(5)
    caps = [r["caption"] for r in rng.sample(rows, min(200, len(rows)))]
    return [f"a {c} {s}" for c in COLORS for s in SHAPES] + caps


def top10(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]


def cos_stats(a: np.ndarray, b: np.ndarray) -> dict:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    c = (a * b).sum(1)
    return {"worst": round(float(c.min()), 5), "mean": round(float(c.mean()), 6)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vitb32", default="/tmp/clipsearch-bench-embed/vitb32")
    ap.add_argument("--demo-n", type=int, default=3000, help="demo sample size for the tiny model")
    ap.add_argument(
        "--vit-demo-n", type=int, default=500, help="demo sample images for ViT-B/32 (its first N)"
    )
    ap.add_argument("--work", default="/tmp/clipsearch-bench-quality")
    ap.add_argument("--configs", default=",".join(f"{b}:{p}" for b, p in CONFIGS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("CLIPSEARCH_CACHE_DIR", str(Path(a.work) / "model-cache"))
    from clipsearch.embed.models import load_clip

    work = Path(a.work)
    demo = corpus(work / "demo", a.demo_n, 0)
    e2e = corpus(work / "e2e", 300, 123)
    configs = [tuple(c.split(":")) for c in a.configs.split(",")]
    models = [("clipsearch-tiny", {"demo": demo, "e2e": e2e})]
    if a.vitb32 and Path(a.vitb32, "config.json").exists():
        models.append((a.vitb32, {"demo": demo[: a.vit_demo_n], "e2e": e2e}))
    folders = {"demo": work / "demo", "e2e": work / "e2e"}
    results: dict = {"load_start": open("/proc/loadavg").read().split()[:3], "models": {}}
    for model, corpora in models:
        label = "ViT-B/32 (random)" if model != "clipsearch-tiny" else model
        res: dict = {}
        ref: dict = {}
        for backend, precision in configs:
            t0 = time.perf_counter()
            try:
                enc = load_clip(model, backend=backend, precision=precision)
            except Exception as e:  # a configuration that does not run here is reported, not fatal
                res[f"{backend} {precision}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            load_s = time.perf_counter() - t0
            entry: dict = {"load_s": round(load_s, 1)}
            for name, rows in corpora.items():
                img, txt = embed_corpus(enc, folders[name], rows)
                q = enc.encode_text(queries(rows))
                if (backend, precision) == ("torch", "fp32"):
                    ref[name] = (img, txt, q, top10(q, img))
                r_img, r_txt, r_q, r_top = ref[name]
                got = top10(q, img)
                overlap = np.mean([len(set(got[i]) & set(r_top[i])) / 10 for i in range(len(got))])
                entry[name] = {
                    "images": len(rows),
                    "queries": len(q),
                    "image_cosine": cos_stats(img, r_img),
                    "text_cosine": cos_stats(np.concatenate([txt, q]), np.concatenate([r_txt, r_q])),
                    "top10_overlap": round(float(overlap), 4),
                }
            res[f"{backend} {precision}"] = entry
            print(label, backend, precision, json.dumps(entry), flush=True)
            del enc
        results["models"][label] = res
    results["load_end"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(results, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
