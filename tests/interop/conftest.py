"""Foreign index layouts built here with faiss + pyarrow exactly as the real tools write them, and a tiny
random CLIP model (16-dimensional embeddings) for the model checks. No network.

- clip-retrieval (`clip-retrieval index`): image.index, image.json (autofaiss index_infos), text.index,
  text.json, metadata/metadata_N.parquet (clip-retrieval inference columns: image_path, caption, url, ...;
  rows concatenated in file-name order are the faiss ids).
- autofaiss (`build_index(..., id_columns=["url"], ids_path=...)`, Fondant's datacomp-small-clip): a `faiss`
  file, index_infos.json, id_mapping/part-XXXXXXXX-UUID.parquet with columns `url` then `i`, rows of a part
  not in id order.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

DIM = 16
N = 600


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def embeddings(n: int = N, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, dim))
    return unit(centers[rng.integers(0, 12, n)] + 0.6 * rng.standard_normal((n, dim)))


def build_faiss(x: np.ndarray, factory: str, param: str | None = None) -> faiss.Index:
    """Like autofaiss: index_factory with inner product, train, add, then set the tuned parameters."""
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    if param:
        faiss.ParameterSpace().set_index_parameters(index, param)
    return index


def infos(factory: str, param: str | None, n: int) -> dict:
    return {
        "index_key": factory,
        "index_param": param or "",
        "index_path": "/somewhere/knn.index",
        "size in bytes": 1234,
        "avg_search_speed_ms": 0.1,
        "99p_search_speed_ms": 0.3,
        "reconstruction error %": 0.0,
        "nb vectors": n,
        "vectors dimension": DIM,
        "compression ratio": 1.0,
    }


def rows(n: int) -> dict[str, list]:
    return {
        "image_path": [f"/data/images/{i:05d}.jpg" for i in range(n)],
        "caption": [f"caption number {i} of a {['red', 'green', 'blue'][i % 3]} thing" for i in range(n)],
        "url": [f"http://img.example/{i}.jpg" for i in range(n)],
        "key": [f"{i:09d}" for i in range(n)],
        "status": ["success"] * n,
        "width": [256 + i % 7 for i in range(n)],
    }


def make_clip_retrieval(
    root: Path,
    *,
    n: int = N,
    factory: str = "IVF16,Flat",
    param: str | None = "nprobe=4",
    parts: int = 3,
    text: bool = True,
    meta_rows: int | None = None,
) -> Path:
    """A folder as `clip-retrieval index` leaves it."""
    root.mkdir(parents=True, exist_ok=True)
    img = embeddings(n, seed=1)
    faiss.write_index(build_faiss(img, factory, param), str(root / "image.index"))
    (root / "image.json").write_text(json.dumps(infos(factory, param, n)))
    if text:
        txt = embeddings(n, seed=2)
        faiss.write_index(build_faiss(txt, factory, param), str(root / "text.index"))
        (root / "text.json").write_text(json.dumps(infos(factory, param, n)))
    meta = root / "metadata"
    meta.mkdir()
    m = meta_rows if meta_rows is not None else n
    cols = rows(m)
    bounds = np.linspace(0, m, parts + 1).astype(int)
    width = len(str(parts))
    for k in range(parts):
        a, b = bounds[k], bounds[k + 1]
        t = pa.table({c: v[a:b] for c, v in cols.items()})
        if k == 1:  # pandas leaves its index as a column when it is not a RangeIndex
            t = t.append_column("__index_level_0__", pa.array(range(a, b), pa.int64()))
        pq.write_table(t, meta / f"metadata_{str(k).zfill(width)}.parquet")
    return root


def make_autofaiss(
    root: Path,
    *,
    n: int = N,
    factory: str = "HNSW16",
    param: str | None = "efSearch=40",
    parts: int = 3,
    index_name: str = "faiss",
    ids_dir: str | None = "id_mapping",
    drop_ids: tuple[int, ...] = (),
    interleave: bool = False,
    dim: int = DIM,
) -> Path:
    """Fondant's datacomp-small-clip layout (autofaiss build_index with id_columns=["url"])."""
    root.mkdir(parents=True, exist_ok=True)
    x = embeddings(n, dim=dim, seed=3)
    faiss.write_index(build_faiss(x, factory, param), str(root / index_name))
    (root / "index_infos.json").write_text(json.dumps(infos(factory, param, n)))
    if ids_dir:
        d = root / ids_dir
        d.mkdir()
        ids = np.array([i for i in range(n) if i not in drop_ids], dtype=np.int64)
        rng = np.random.default_rng(7)
        groups = [ids[k::parts] for k in range(parts)] if interleave else np.array_split(ids, parts)
        for batch_id, g in enumerate(groups):
            g = rng.permutation(g)  # rows of a part are not in id order
            t = pa.table({"url": [f"http://img.example/{i}.jpg" for i in g], "i": pa.array(g, pa.int64())})
            pq.write_table(t, d / f"part-{batch_id:08d}-{uuid.uuid1()}.parquet")
    return root


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def build_tiny_clip(out: Path, dim: int = DIM) -> Path:
    """A random CLIPModel (projection_dim = dim) with a byte-level BPE tokenizer, saved like a hub model."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )  # fmt: skip
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim)).save_pretrained(out)
    tok.save_pretrained(out)
    pp = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pp))
    return out


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_16")))


@pytest.fixture(scope="session")
def tiny_clip_24(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_24"), dim=24))
