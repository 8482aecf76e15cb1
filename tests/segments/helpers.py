"""Small embedding folders (docs/formats.md section 2), index builds and a fake encoder for the segment tests."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch.index import IndexConfig, build_index

D = 32
N_CLUSTERS = 40


def clip_like(n: int, d: int, seed: int, centers_seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) L2-normalised pairs: clustered images, captions shifted by a shared modality gap."""
    centers = np.random.default_rng(centers_seed).standard_normal((N_CLUSTERS, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    img = centers[rng.integers(0, N_CLUSTERS, n)] + 0.15 * rng.standard_normal((n, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    gap = np.random.default_rng(99).standard_normal(d).astype(np.float32)
    gap /= np.linalg.norm(gap)
    txt = 0.6 * img + 0.5 * gap + 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


def make_embeddings(
    root: str,
    sizes: list[int],
    *,
    tag: str,
    d: int = D,
    seed: int = 0,
    model: str = "test-model",
    centers_seed=7,
) -> dict[str, Any]:
    """An embed-stage folder whose keys and URLs are unique to `tag`. Returns vectors, keys and URLs."""
    for sub in ("img_emb", "text_emb", "metadata", "stats"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    imgs, txts, keys, urls, parts = [], [], [], [], []
    for p, n in enumerate(sizes):
        img, txt = clip_like(n, d, seed * 100 + p, centers_seed)
        name = f"{p:05d}"
        np.save(os.path.join(root, "img_emb", f"{name}.npy"), img.astype(np.float16))
        np.save(os.path.join(root, "text_emb", f"{name}.npy"), txt.astype(np.float16))
        k = [f"{tag}-{p:03d}-{i:05d}" for i in range(n)]
        u = [f"http://img.invalid/{x}.jpg" for x in k]
        table = pa.table(
            {
                "key": k,
                "url": u,
                "caption": [f"caption of {x}" for x in k],
                "group": pa.array(np.arange(n) % 10, pa.int64()),
            }
        )
        pq.write_table(table, os.path.join(root, "metadata", f"{name}.parquet"))
        with open(os.path.join(root, "stats", f"{name}.json"), "w") as f:
            json.dump({"rows": n}, f)
        imgs.append(img.astype(np.float16).astype(np.float32))
        txts.append(txt.astype(np.float16).astype(np.float32))
        keys += k
        urls += u
        parts.append({"name": name, "rows": n, "inputs": []})
    manifest = {
        "format": "clipsearch.embeddings", "version": 1, "model": model, "dim": d, "dtype": "float16",
        "normalized": True, "modalities": ["image", "text"], "parts": parts, "total_rows": sum(sizes),
    }  # fmt: skip
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return {"image": np.concatenate(imgs), "text": np.concatenate(txts), "keys": keys, "urls": urls}


def build(emb: str, index: str, index_key: str | None = None, **kw: Any) -> dict:
    cfg = IndexConfig(
        embeddings_folder=emb, index_folder=index, index_key=index_key, nb_cores=1, progress=False, **kw
    )
    return build_index(cfg)


def index_cfg(emb: str, index: str) -> IndexConfig:
    return IndexConfig(embeddings_folder=emb, index_folder=index, nb_cores=1, progress=False)


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class FakeEncoder:
    """The encoder interface the app needs (text -> hashed directions); queries here are embeddings."""

    def __init__(self, dim: int = D, name: str = "test-model"):
        self.dim = dim
        self.name = name

    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            out.append(np.random.default_rng(seed).standard_normal(self.dim))
        return unit(np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim))

    def encode_images(self, images: list[Any], batch_size: int = 64) -> np.ndarray:
        return self.encode_text([str(i) for i in range(len(images))])


def folder_files(folder: str) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to check that nothing changed)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out
