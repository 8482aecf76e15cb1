"""Shared fixtures for the embed tests: tiny random CLIP and SigLIP models built offline, and input folders
in each download output format (webdataset, parquet, files) plus a plain image folder.

Every input holds, on purpose: a corrupt image, a sample without a caption, and (tar, files) an unexpected
member, so each test sees the bad-input paths.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

CAPTIONS = ["the cat", "a dog", "the red car", "blue sky", "a person on a bike", "green grass", "the sea"]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_tiny_clip(out: Path, image_size: int = 32) -> Path:
    """A random CLIPModel with a byte-level BPE tokenizer, saved like a hub model."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=16,
    )
    import torch

    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    pp = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    return out


def build_tiny_siglip(out: Path) -> Path:
    """A random SiglipModel with a real SentencePiece tokenizer trained offline on a few sentences."""
    import sentencepiece as spm
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((CAPTIONS + ["the quick brown fox jumps over the lazy dog"]) * 20),
        model_prefix=str(out / "spiece"),
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tok = SiglipTokenizer(vocab_file=str(out / "spiece.model"), model_max_length=16)
    cfg = SiglipConfig(
        text_config=dict(
            vocab_size=48,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    torch.manual_seed(0)
    SiglipModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    pp = {
        "image_processor_type": "SiglipImageProcessor",
        "size": {"height": 32, "width": 32},
        "resample": 3,
        "rescale_factor": 1 / 255,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("models") / "tiny_clip"))


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_siglip(tmp_path_factory.mktemp("models") / "tiny_siglip"))


# ---------------------------------------------------------------------------------------------------------
# inputs in the download stage's formats (docs/formats.md section 1)
# ---------------------------------------------------------------------------------------------------------
def image_bytes(i: int, fmt: str = "JPEG", size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.RandomState(i)
    arr = rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


CORRUPT = b"\xff\xd8\xff\xe0 this is not really a jpeg"


def make_samples(shard: int, n: int = 6) -> list[dict]:
    """Rows like the download stage writes. Row 2 has a corrupt image, row 3 no caption, row 5 failed."""
    rows = []
    for r in range(n):
        key = f"{shard:05d}{r:04d}"
        status = "failed_to_download" if r == 5 else "success"
        rows.append(
            {
                "key": key,
                "url": f"http://example.com/{key}.jpg",
                "caption": None if r == 3 else CAPTIONS[(shard + r) % len(CAPTIONS)],
                "status": status,
                "error_message": "HTTP 404" if status != "success" else None,
                "width": 48 if status == "success" else None,
                "height": 40 if status == "success" else None,
                "original_width": 96 if status == "success" else None,
                "original_height": 80 if status == "success" else None,
                "sha256": "ab" * 32 if status == "success" else None,
                "url_hash": f"{shard:08x}{r:08x}",
                "license": f"cc-by-{r}",  # an extra input column, carried through
                "_image": (CORRUPT if r == 2 else image_bytes(shard * 100 + r))
                if status == "success"
                else None,
            }
        )
    return rows


def _meta(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _stats(shard: int, rows: list[dict]) -> dict:
    ok = sum(r["status"] == "success" for r in rows)
    return {"shard": shard, "count": len(rows), "successes": ok, "status": {"success": ok}}


def _write_sibling_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist([_meta(r) for r in rows]), path)


def write_webdataset(folder: Path, shards: int = 2, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        rows = make_samples(s, n)
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:

            def add(name: str, data: bytes, tar: tarfile.TarFile = tar) -> None:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))

            for r in rows:
                if r["status"] != "success":
                    continue
                add(f"{r['key']}.jpg", r["_image"])
                if r["caption"] is not None:
                    add(f"{r['key']}.txt", r["caption"].encode())
                add(f"{r['key']}.json", json.dumps(_meta(r)).encode())
            add("README.md", b"an unexpected member")
        _write_sibling_parquet(folder / f"{s:05d}.parquet", rows)
        (folder / f"{s:05d}.stats.json").write_text(json.dumps(_stats(s, rows)))
    return folder


def write_parquet_format(folder: Path, shards: int = 2, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        rows = make_samples(s, n)
        recs = [{**_meta(r), "jpg": r["_image"]} for r in rows]
        schema = pa.Table.from_pylist(recs).schema.set(
            pa.Table.from_pylist(recs).schema.get_field_index("jpg"), pa.field("jpg", pa.binary())
        )
        pq.write_table(pa.Table.from_pylist(recs, schema=schema), folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}.stats.json").write_text(json.dumps(_stats(s, rows)))
    return folder


def write_files_format(folder: Path, shards: int = 2, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        rows = make_samples(s, n)
        d = folder / f"{s:05d}"
        d.mkdir()
        for r in rows:
            if r["status"] != "success":
                continue
            (d / f"{r['key']}.jpg").write_bytes(r["_image"])
            if r["caption"] is not None:
                (d / f"{r['key']}.txt").write_text(r["caption"])
            (d / f"{r['key']}.json").write_text(json.dumps(_meta(r)))
        (d / "notes.xyz").write_text("an unexpected member")
        _write_sibling_parquet(folder / f"{s:05d}.parquet", rows)
        (folder / f"{s:05d}.stats.json").write_text(json.dumps(_stats(s, rows)))
    return folder


def write_image_folder(folder: Path, n: int = 5) -> Path:
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = folder / "sub" if i % 2 else folder
        fmt, ext = ("PNG", "png") if i == 1 else ("JPEG", "jpg")
        (target / f"img{i}.{ext}").write_bytes(image_bytes(1000 + i, fmt))
        if i != 3:
            (target / f"img{i}.txt").write_text(CAPTIONS[i])
    (folder / "broken.jpg").write_bytes(CORRUPT)
    return folder


def write_tfrecord_format(folder: Path, shards: int = 2, n: int = 6) -> Path:
    """As the download stage writes it: successes only, caption in `txt` and in `caption` when not null."""
    from clipsearch.download.writers import encode_example, write_tfrecord

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        rows = make_samples(s, n)
        with open(folder / f"{s:05d}.tfrecord", "wb") as f:
            for r in rows:
                if r["status"] != "success":
                    continue
                feats = {"jpg": r["_image"], "txt": r["caption"] or ""}
                feats.update({k: v for k, v in _meta(r).items() if v is not None})
                write_tfrecord(f, encode_example(feats))
        _write_sibling_parquet(folder / f"{s:05d}.parquet", rows)
        (folder / f"{s:05d}.stats.json").write_text(json.dumps(_stats(s, rows)))
    return folder


WRITERS = {
    "webdataset": write_webdataset,
    "parquet": write_parquet_format,
    "files": write_files_format,
    "tfrecord": write_tfrecord_format,
}


@pytest.fixture(params=sorted(WRITERS))
def dataset(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    """(format, folder) for each download output format, 2 shards of 6 rows."""
    fmt = request.param
    return fmt, WRITERS[fmt](tmp_path / "images")
