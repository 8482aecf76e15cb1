"""Test helpers: a deterministic fake CLIP encoder and small index folders built per the formats.md contract."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from clipsearch.keywords.writer import build_keyword_index

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "dog", "cat", "house", "tree"]
RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (250, 140, 30),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
}


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class FakeEncoder:
    """Same interface as clipsearch.embed.models.ClipEncoder; text words map to fixed random directions,
    images map to the direction of their dominant colour word. Deterministic, no torch."""

    def __init__(self, dim: int = 32, name: str = "fake-clip"):
        self.dim = dim
        self.name = name
        self.calls: list[int] = []  # batch sizes seen by encode_text
        self._words: dict[str, np.ndarray] = {}

    def word(self, w: str) -> np.ndarray:
        w = w.lower()
        v = self._words.get(w)
        if v is None:
            seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            if len(self._words) < 100_000:
                self._words[w] = v
        return v

    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        self.calls.append(len(texts))
        out = []
        for t in texts:
            words = [
                w
                for w in t.lower().replace(",", " ").split()
                if w not in ("a", "an", "the", "of", "on", "photo")
            ]
            v = sum((self.word(w) for w in words), np.zeros(self.dim, np.float32)) if words else self.word("")
            out.append(v)
        return _unit(np.stack(out)) if out else np.zeros((0, self.dim), np.float32)

    def encode_images(self, images: list[Any], batch_size: int = 64) -> np.ndarray:
        out = []
        for img in images:
            px = np.asarray(img.convert("RGB").resize((8, 8))).reshape(-1, 3).mean(axis=0)
            name = min(RGB, key=lambda c: float(np.sum((np.array(RGB[c]) - px) ** 2)))
            out.append(self.word(name))
        return _unit(np.stack(out))


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"a {COLORS[rng.integers(len(COLORS))]} {SHAPES[rng.integers(len(SHAPES))]}" for _ in range(n)]


def build_index(
    folder: str,
    n: int = 2000,
    dim: int = 32,
    *,
    image_factory: str = "Flat",
    text_factory: str | None = "HNSW16,Flat",
    encoder: FakeEncoder | None = None,
    seed: int = 0,
    search_params: dict[str, Any] | None = None,
    vectors_file: bool = False,
    duplicates: int = 0,
    url_base: str = "http://images.invalid",
    mmap: bool = False,
    model: str = "fake-clip",
    noise: float = 0.6,
    caption_list: list[str] | None = None,
    vector_captions: list[str] | None = None,
    keywords: bool = False,
) -> dict[str, Any]:
    """Write index/ (image.index, text.index, metadata.arrow, index.json) and return the vectors used."""
    os.makedirs(folder, exist_ok=True)
    enc = encoder or FakeEncoder(dim)
    rng = np.random.default_rng(seed)
    caps = caption_list if caption_list is not None else captions(n, seed)
    # vector_captions: what the vectors are made of, when the stored captions say more than "CLIP" knows
    text_vecs = enc.encode_text(vector_captions if vector_captions is not None else caps)
    img_vecs = _unit(text_vecs + noise * _unit(rng.standard_normal((n, dim)).astype(np.float32)))
    if duplicates:  # rows 0..duplicates-1 are the same image
        img_vecs[1:duplicates] = img_vecs[0]
    meta = pa.table(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "url": [f"{url_base}/{i}.png" for i in range(n)],
            "caption": caps,
            "width": pa.array(rng.integers(64, 1024, n), pa.int32()),
            "height": pa.array(rng.integers(64, 1024, n), pa.int32()),
            "bucket": pa.array(np.arange(n) % 1000, pa.int64()),  # bucket == b: 0.1 % of the rows
            "shard": pa.array(np.arange(n) % 100, pa.int64()),  # shard == s: 1 %
            "status": ["success"] * n,
        }
    )
    with pa.OSFile(os.path.join(folder, "metadata.arrow"), "wb") as f:
        # several record batches, as a real merged index has
        with pa.ipc.new_file(f, meta.schema) as w:
            for b in meta.to_batches(max_chunksize=max(1, n // 4)):
                w.write_batch(b)
    entries: dict[str, Any] = {}
    for modality, factory, vecs in (("image", image_factory, img_vecs), ("text", text_factory, text_vecs)):
        if factory is None:
            continue
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vecs)
        index.add(vecs)
        faiss.write_index(index, os.path.join(folder, f"{modality}.index"))
        if vectors_file:
            np.save(os.path.join(folder, f"{modality}.vectors.npy"), vecs.astype(np.float16))
        entries[modality] = {
            "file": f"{modality}.index",
            "factory": factory,
            "reason": "test fixture",
            "search_params": dict(search_params or {}),
            "mmap": mmap,
            "memory_bytes": 0,
            "curve": [],
        }
    info = {
        "format": "clipsearch.index",
        "version": 1,
        "model": model,
        "dim": dim,
        "metric": "inner_product",
        "count": n,
        "indices": entries,
        "keywords": build_keyword_index(folder) if keywords else None,
    }
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump(info, f)
    return {"image": img_vecs, "text": text_vecs, "captions": caps, "meta": meta}
