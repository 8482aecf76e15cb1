"""Small embeddings folders per docs/formats.md, made on the fly."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def clip_like(n: int, d: int, seed: int, n_clusters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) float32 L2-normalised pairs: clustered images, captions shifted by a modality gap."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    lab = rng.integers(0, n_clusters, n)
    img = centers[lab] + 0.08 * rng.standard_normal((n, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    gap = np.random.default_rng(99).standard_normal(d).astype(np.float32)
    gap /= np.linalg.norm(gap)
    txt = 0.6 * img + 0.5 * gap + 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


def make_embeddings_folder(root: str, sizes: list[int], d: int = 32, seed: int = 0) -> dict:
    """An embed-stage folder: img_emb/, text_emb/, metadata/, manifest.json. Returns the full arrays."""
    for sub in ("img_emb", "text_emb", "metadata", "stats"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    imgs, txts, parts = [], [], []
    for p, n in enumerate(sizes):
        img, txt = clip_like(n, d, seed * 1000 + p)
        name = f"{p:05d}"
        np.save(os.path.join(root, "img_emb", f"{name}.npy"), img.astype(np.float16))
        np.save(os.path.join(root, "text_emb", f"{name}.npy"), txt.astype(np.float16))
        keys = [f"{p:05d}{i:04d}" for i in range(n)]
        table = pa.table(
            {
                "key": keys,
                "url": [f"http://x/{k}.jpg" for k in keys],
                "caption": [f"caption {k}" for k in keys],
            }
        )
        pq.write_table(table, os.path.join(root, "metadata", f"{name}.parquet"))
        with open(os.path.join(root, "stats", f"{name}.json"), "w") as f:
            json.dump({"rows": n}, f)
        imgs.append(img.astype(np.float16).astype(np.float32))
        txts.append(txt.astype(np.float16).astype(np.float32))
        parts.append({"name": name, "rows": n, "inputs": []})
    manifest = {
        "format": "clipsearch.embeddings",
        "version": 1,
        "model": "test-model",
        "dim": d,
        "dtype": "float16",
        "normalized": True,
        "modalities": ["image", "text"],
        "parts": parts,
        "total_rows": sum(sizes),
    }
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return {"image": np.concatenate(imgs), "text": np.concatenate(txts)}


@pytest.fixture
def emb_folder(tmp_path):
    root = str(tmp_path / "embeddings")
    arrays = make_embeddings_folder(root, [3000, 2000, 2500], d=32)
    return root, arrays
