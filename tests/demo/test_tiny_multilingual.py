"""The shipped tiny multilingual encoder: loads offline as an M-CLIP model, and colour+shape queries in French,
German, Spanish and Chinese find held-out images as well as English ones do (the issue's goal: >= 0.9x)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from clipsearch.demo.languages import LANGUAGES, canonical, held_out
from clipsearch.demo.sample import COLORS, SHAPES, make_image, sample_attributes
from clipsearch.embed.models import load_clip
from clipsearch.embed.multilingual import TINY_MULTILINGUAL, load_text_encoder, tiny_multilingual_path

PAIRS = [(c, s) for c in COLORS for s in SHAPES]


@pytest.fixture(scope="module")
def heldout():
    """288 images (6 per colour+shape pair) with a seed neither model trained on, through a simulated
    download (256 px border, JPEG 90), embedded by the tiny CLIP."""
    clip = load_clip("clipsearch-tiny", backend="torch")
    imgs, attrs = [], []
    for i in range(288):
        c, s, b, rng = sample_attributes(i, 31337)
        img = make_image(c, s, b, rng, size=(int(rng.integers(200, 400)), int(rng.integers(200, 400))))
        w, h = img.size
        k = 256 / max(w, h)
        img = img.resize((round(w * k), round(h * k)))
        canvas = Image.new("RGB", (256, 256))
        canvas.paste(img, ((256 - img.size[0]) // 2, (256 - img.size[1]) // 2))
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=90)
        imgs.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        attrs.append((c, s))
    return clip, clip.encode_images(imgs), attrs


def p_at_5(q: np.ndarray, img: np.ndarray, attrs) -> float:
    top = np.argsort(-(q @ img.T), axis=1)[:, :5]
    return float(np.mean([[attrs[j] == p for j in row] for row, p in zip(top, PAIRS, strict=True)]))


def test_precision_per_language_is_at_least_0_9_of_english(heldout):
    clip, img, attrs = heldout
    enc = load_text_encoder(TINY_MULTILINGUAL)
    assert enc.kind == "m-clip" and enc.dim == clip.dim == 64
    english = p_at_5(clip.encode_text([canonical("en", c, s) for c, s in PAIRS]), img, attrs)
    assert english >= 0.8
    figures = {}
    for lang in LANGUAGES:
        figures[lang] = p_at_5(enc.encode_text([canonical(lang, c, s) for c, s in PAIRS]), img, attrs)
        figures[lang + "*"] = p_at_5(enc.encode_text([held_out(lang, c, s) for c, s in PAIRS]), img, attrs)
    assert all(v >= 0.9 * english for v in figures.values()), (english, figures)
    # a random direction would find the right pair 1 time in 48
    rnd = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)
    assert p_at_5(rnd / np.linalg.norm(rnd, axis=1, keepdims=True), img, attrs) < 0.2


def test_files_tokenizer_and_anything_encodes():
    from transformers import AutoTokenizer

    folder = tiny_multilingual_path()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "M-CLIP" and cfg["numDims"] == 64 and "transformerConfig" in cfg
    assert sum(f.stat().st_size for f in folder.iterdir()) < 4_000_000
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("un cercle rouge")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    enc = load_text_encoder(TINY_MULTILINGUAL)
    weird = ["", "🙂🙂", "Ünïcödé ÇA", "красный круг", "x" * 5000, "赤い丸"]
    v = enc.encode_text(weird)
    assert v.shape == (len(weird), 64) and np.isfinite(v).all()
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
