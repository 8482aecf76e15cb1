"""The shipped tiny CLIP: loads offline with plain transformers, tokenizes anything, and retrieves
the right images for colour+shape queries on held-out generated images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import clipsearch
from clipsearch.demo.sample import COLORS, SHAPES, make_image, sample_attributes

MODEL_DIR = Path(
    os.environ.get("CLIPSEARCH_TINY_CLIP_DIR") or Path(clipsearch.__file__).parent / "demo" / "tiny_clip"
)


@pytest.fixture(autouse=True, scope="module")
def offline():
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    m = transformers.CLIPModel.from_pretrained(MODEL_DIR)
    return m.eval()


@pytest.fixture(scope="module")
def processor():
    return transformers.CLIPProcessor.from_pretrained(MODEL_DIR)


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


def test_files_and_size():
    names = {p.name for p in MODEL_DIR.iterdir()}
    for f in (
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    ):
        assert f in names
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total < 6_000_000


def test_loads_with_auto_classes(model):
    assert model.dtype == torch.float32
    auto = transformers.AutoModel.from_pretrained(MODEL_DIR)
    assert type(auto).__name__ == "CLIPModel"
    proc = transformers.AutoProcessor.from_pretrained(MODEL_DIR)
    assert hasattr(proc, "tokenizer") and hasattr(proc, "image_processor")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    assert tok("a red circle")["input_ids"][0] == tok.bos_token_id
    assert tok("a red circle")["input_ids"][-1] == tok.eos_token_id
    assert model.config.text_config.eos_token_id == tok.eos_token_id


def test_slow_and_fast_tokenizers_agree():
    fast = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    # built from vocab.json + merges.txt only (no tokenizer.json): the CLIP-style files are usable alone
    files = transformers.CLIPTokenizer(
        vocab=str(MODEL_DIR / "vocab.json"), merges=str(MODEL_DIR / "merges.txt")
    )
    for text in ("a photo of a red circle on grass", "Purple STARS in the sky!", "zebra 🦓 naïve"):
        assert fast(text)["input_ids"] == files(text)["input_ids"]


def test_tokenizer_caption_words_are_single_tokens(processor):
    tok = processor.tokenizer
    words = [
        *COLORS,
        *SHAPES,
        "grass",
        "sand",
        "water",
        "wood",
        "brick",
        "sky",
        "snow",
        "photo",
        "picture",
        "on",
    ]
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (w, tok.convert_ids_to_tokens(ids))
    text = "a photo of a red circle on grass"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("text", ["zyxwvut qqq", "🦓 emoji ✨", "naïve café Straße", "日本語", "", "!!!?"])
def test_tokenizer_handles_unknown_text(processor, model, text):
    tok = processor.tokenizer
    enc = tok(text, padding=True, return_tensors="pt")
    unk = tok.unk_token_id
    inner = enc["input_ids"][0, 1:-1].tolist()
    assert unk not in inner  # byte-level fallback: never <unk>
    if text.strip():
        assert len(inner) > 0
        assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == text.lower()
    with torch.no_grad():
        emb = _features(model.get_text_features(**enc))
    assert torch.isfinite(emb).all()


def test_long_text_truncates(processor, model):
    enc = processor.tokenizer(["red " * 200], padding=True, truncation=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] <= model.config.text_config.max_position_embeddings
    with torch.no_grad():
        model.get_text_features(**enc)


def _download_like(img: Image.Image, canvas: int = 256) -> Image.Image:
    """What the download stage does: keep-ratio resize into a square with a border, JPEG re-encode."""
    w, h = img.size
    k = canvas / max(w, h)
    img = img.resize((round(w * k), round(h * k)), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (canvas, canvas))
    out.paste(img, ((canvas - img.width) // 2, (canvas - img.height) // 2))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_retrieval_colour_shape_recall_at_5(model, processor):
    """~300 held-out images (6 of each colour+shape pair): for "a red circle", >= 80% of the top 5
    images must be red circles, averaged over all 48 colour+shape queries."""
    n = 6 * len(COLORS) * len(SHAPES)
    imgs, attrs = [], []
    for i in range(n):
        color, shape, bg, rng = sample_attributes(i, seed=4242)
        w = int(rng.integers(200, 321))
        h = int(rng.integers(200, 321))
        imgs.append(_download_like(make_image(color, shape, bg, rng, size=(w, h))))
        attrs.append((color, shape))
    with torch.no_grad():
        px = processor(images=imgs, return_tensors="pt")["pixel_values"]
        img_emb = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=px)), dim=-1)
        queries = [(c, s) for c in COLORS for s in SHAPES]
        texts = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in queries]
        enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
        txt_emb = torch.nn.functional.normalize(_features(model.get_text_features(**enc)), dim=-1)
        top = (txt_emb @ img_emb.T).topk(5, dim=1).indices.tolist()
        # the same objects asked for on a background: the object must still come first
        enc = processor.tokenizer(
            [f"{c} {s} on grass" for c, s in queries], padding=True, return_tensors="pt"
        )
        bg_emb = torch.nn.functional.normalize(_features(model.get_text_features(**enc)), dim=-1)
        top_bg = (bg_emb @ img_emb.T).topk(5, dim=1).indices.tolist()
    per_query = [np.mean([attrs[j] == q for j in top[k]]) for k, q in enumerate(queries)]
    colour_ok = np.mean([np.mean([attrs[j][0] == q[0] for j in top[k]]) for k, q in enumerate(queries)])
    recall = float(np.mean(per_query))
    assert colour_ok >= 0.9, f"colour alone {colour_ok:.3f}"
    assert recall >= 0.8, f"colour+shape recall@5 {recall:.3f} (colour alone {colour_ok:.3f})"
    with_bg = float(np.mean([np.mean([attrs[j] == q for j in top_bg[k]]) for k, q in enumerate(queries)]))
    assert with_bg >= 0.7, (
        f"'<colour> <shape> on grass' returns that colour+shape in {with_bg:.3f} of its top 5"
    )
