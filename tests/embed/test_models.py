from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from clipsearch.embed.models import (
    DEFAULT_MODEL,
    ClipEncoder,
    load_clip,
    make_preprocessor,
    resolve_model,
    tiny_model_path,
)
from clipsearch.errors import ConfigError, ModelLoadError


@pytest.fixture(scope="module")
def enc(tiny_clip: str) -> ClipEncoder:
    return load_clip(tiny_clip)


def _img(seed: int, size: tuple[int, int] = (61, 47)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_resolve_default_alias() -> None:
    assert resolve_model(DEFAULT_MODEL) == str(tiny_model_path())
    assert tiny_model_path().parts[-2:] == ("demo", "tiny_clip")
    assert resolve_model("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    assert resolve_model("open_clip:ViT-B-32/openai") == "open_clip:ViT-B-32/openai"


def test_encode_text_and_images(enc: ClipEncoder, tiny_clip: str) -> None:
    assert enc.name == tiny_clip and enc.dim == 16
    t = enc.encode_text(["the cat", "a dog is here", ""])
    assert t.shape == (3, 16) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    ims = [_img(0), _img(1, (20, 90)).convert("L"), _img(2).convert("RGBA")]
    v = enc.encode_images(ims)
    assert v.shape == (3, 16) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(enc.encode_pixels(enc.preprocess(ims)), v, atol=1e-6)
    assert enc.encode_text([]).shape == (0, 16) and enc.encode_images([]).shape == (0, 16)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_padding_to_longest_matches_single(tiny_clip: str, precision: str) -> None:
    """Batched texts pad to the longest one; each row equals the text encoded alone (in fp32 to float
    rounding; under bf16 autocast, `auto`'s pick on an AMX CPU, to bf16 rounding)."""
    enc = load_clip(tiny_clip, precision=precision)
    texts = ["a", "the cat sat on the mat with a very long caption indeed"]
    batch = enc.encode_text(texts)
    for i, t in enumerate(texts):
        alone = enc.encode_text([t])[0]
        if precision == "fp32":
            np.testing.assert_allclose(batch[i], alone, atol=1e-5)
        else:
            assert float(batch[i] @ alone) > 0.999


def test_preprocessor_matches_transformers(tiny_clip: str) -> None:
    from transformers import AutoImageProcessor

    hf = AutoImageProcessor.from_pretrained(tiny_clip)
    ours = make_preprocessor(tiny_clip)
    pickle.loads(pickle.dumps(ours))  # workers get it by pickle
    ims = [_img(3), _img(4, (33, 70)), _img(5, (32, 32))]
    a = hf(images=ims, return_tensors="pt")["pixel_values"].numpy()
    b = ours(ims).numpy()
    assert a.shape == b.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_uint8_path_equals_float_path(enc: ClipEncoder) -> None:
    import torch

    ims = [_img(6), _img(7)]
    raw = torch.from_numpy(np.stack([enc.preprocessor.to_array(i) for i in ims]))
    np.testing.assert_allclose(enc.encode_pixels(raw.permute(0, 3, 1, 2)), enc.encode_images(ims), atol=1e-5)


def test_siglip(tiny_siglip: str) -> None:
    enc = load_clip(tiny_siglip)
    assert enc.model_type == "siglip" and enc.dim == 32
    assert enc.preprocessor.mode == "fixed" and enc.preprocessor.crop is None
    t = enc.encode_text(["the cat", "blue sky over the sea"])
    v = enc.encode_images([_img(8), _img(9)])
    assert t.shape == v.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


def test_bf16_autocast_close_to_fp32(tiny_clip: str, enc: ClipEncoder) -> None:
    bf = load_clip(tiny_clip, precision="bf16")
    assert bf.precision == "bf16"
    ims = [_img(10), _img(11)]
    assert (bf.encode_images(ims) * enc.encode_images(ims)).sum(1).min() > 0.98


def test_errors(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_clip("./no/such/model")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_clip("someone/not-cached-clip")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    with pytest.raises(ModelLoadError, match="not a CLIP model"):
        load_clip(str(tmp_path / "bert"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_clip(str(tmp_path / "empty"))
    with pytest.raises(ConfigError):
        load_clip("clipsearch-tiny", precision="fp8")


def test_open_clip_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import fails like an absent extra
    with pytest.raises(ModelLoadError, match="open_clip extra"):
        load_clip("open_clip:ViT-B-32/openai")


def test_single_query_is_fast(enc: ClipEncoder) -> None:
    import time

    enc.encode_text(["warm up"])
    t0 = time.process_time()  # CPU time, which other processes' load does not inflate (wall time does)
    for _ in range(50):
        enc.encode_text(["a photo of a cat"])
    assert 50 / (time.process_time() - t0) > 50  # hundreds/s of this process' CPU


def test_shipped_tiny_model_is_the_offline_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_clip()  # DEFAULT_MODEL
    assert enc.name == DEFAULT_MODEL and enc.dim > 0
    t = enc.encode_text(["a red circle", "a blue square"])
    assert t.shape == (2, enc.dim)
    v = enc.encode_images([_img(12, (64, 64))])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert make_preprocessor(DEFAULT_MODEL) == enc.preprocessor


def test_folder_saved_by_transformers_5_keeps_its_image_settings(tiny_clip: str, tmp_path) -> None:
    """transformers >= 5 saves the image processor inside processor_config.json, with no
    preprocessor_config.json beside it: the loader reads it there."""
    import json
    import shutil

    new = tmp_path / "saved_by_v5"
    shutil.copytree(tiny_clip, new)
    pp = json.loads((new / "preprocessor_config.json").read_text())
    (new / "preprocessor_config.json").unlink()
    (new / "processor_config.json").write_text(
        json.dumps({"image_processor": pp, "processor_class": "CLIPProcessor"})
    )
    ims = [_img(7), _img(8, (90, 30))]
    np.testing.assert_allclose(
        load_clip(str(new), precision="fp32").encode_images(ims),
        load_clip(tiny_clip, precision="fp32").encode_images(ims),
        atol=1e-6,
    )
    (new / "processor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="image preprocessing is unknown"):
        load_clip(str(new))
