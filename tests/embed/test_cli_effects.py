"""`clipsearch embed` options, each run through the command and checked by what it changes: the files
written, the batches and threads the model sees, the numbers against transformers' own CLIPModel."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from clipsearch.cli import main
from clipsearch.embed import models, runner

from .conftest import make_samples, write_image_folder, write_webdataset


@pytest.fixture
def calls(monkeypatch):
    """What the image tower is given: (batch rows, torch threads, device) per call."""
    seen: list[tuple[int, int, str]] = []
    image_features = models.ClipEncoder.image_features

    def spy(self, pixels):
        seen.append((int(pixels.shape[0]), torch.get_num_threads(), str(self.device)))
        return image_features(self, pixels)

    monkeypatch.setattr(models.ClipEncoder, "image_features", spy)
    threads = torch.get_num_threads()
    yield seen
    torch.set_num_threads(threads)


def reference_image_embeddings(model_dir: str, images: list[bytes]) -> np.ndarray:
    """transformers' CLIPModel in fp32 with its own image processor: the independent reference."""
    from transformers import AutoImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    pixels = AutoImageProcessor.from_pretrained(model_dir)(
        images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels)
    # transformers 5 returns an output object whose pooler_output is the projected embedding
    feats = getattr(feats, "pooler_output", feats)
    return torch.nn.functional.normalize(feats.float(), dim=-1).numpy()


def embed_cli(inp: Path, out: Path, model: str, *opts: str) -> int:
    return main(["-q", "embed", "--input-dataset", str(inp), "--output-folder", str(out),
                 "--clip-model", model, "--no-progress", *opts])  # fmt: skip


def test_cli_options_take_effect(tmp_path, tiny_clip, calls, monkeypatch):
    """--no-enable-text --enable-image --batch-size --num-prepro-workers --device --backend --precision fp32
    --shards-per-part --num-threads, on three webdataset shards of 4 good samples each."""
    pools: list[int] = []
    decode_pool = runner._decode_pool
    monkeypatch.setattr(runner, "_decode_pool", lambda n: pools.append(n) or decode_pool(n))
    wds = write_webdataset(tmp_path / "wds", shards=3)
    out = tmp_path / "emb"
    assert embed_cli(wds, out, tiny_clip, "--no-enable-text", "--enable-image", "--batch-size", "3",
                     "--num-prepro-workers", "2", "--device", "cpu", "--backend", "torch", "--precision", "fp32",
                     "--shards-per-part", "2", "--num-threads", "1") == 0  # fmt: skip
    assert not (out / "text_emb").exists()  # no empty folder for the disabled modality
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [
        "00000.npy",
        "00001.npy",
    ]  # 3 shards, 2 a part
    assert max(n for n, _, _ in calls) == 3  # --batch-size 3
    assert {(t, d) for _, t, d in calls} == {(1, "cpu")}  # --num-threads 1, --device cpu
    assert pools and set(pools) == {2}  # --num-prepro-workers 2: decode pools of 2 processes
    # --precision fp32 --backend torch: transformers' fp32 numbers (stored as float16)
    for part in ("00000", "00001"):
        keys = pq.read_table(out / "metadata" / f"{part}.parquet").column("key").to_pylist()
        by_key = {r["key"]: r["_image"] for s in range(3) for r in make_samples(s) if r.get("_image")}
        want = reference_image_embeddings(tiny_clip, [by_key[k] for k in keys])
        got = np.load(out / "img_emb" / f"{part}.npy").astype(np.float32)
        np.testing.assert_allclose(got, want, atol=3e-3)
    # --precision bf16: the same run in bf16 autocast is close, but not the fp32 numbers
    bf = tmp_path / "bf16"
    assert embed_cli(wds, bf, tiny_clip, "--no-enable-text", "--backend", "torch", "--precision", "bf16",
                     "--shards-per-part", "3", "--num-prepro-workers", "0") == 0  # fmt: skip
    a = np.concatenate([np.load(out / "img_emb" / f"{p}.npy") for p in ("00000", "00001")]).astype(np.float32)
    b = np.load(bf / "img_emb" / "00000.npy").astype(np.float32)
    assert (a * b).sum(1).min() > 0.98 and np.abs(a - b).max() > 2e-3


def test_text_only_and_write_batch_size(tmp_path, tiny_clip, calls):
    """--enable-text --no-enable-image: captions only, the image tower never runs; --write-batch-size 10 cuts
    the 15 captioned samples of 3 shards into parts of 10 and 5 (instead of one part per shard)."""
    wds = write_webdataset(tmp_path / "wds", shards=3)
    out = tmp_path / "emb"
    assert embed_cli(wds, out, tiny_clip, "--enable-text", "--no-enable-image", "--write-batch-size", "10",
                     "--num-prepro-workers", "0") == 0  # fmt: skip
    assert calls == [] and not (out / "img_emb").exists()
    rows = [len(np.load(p)) for p in sorted((out / "text_emb").iterdir())]
    assert rows == [10, 5]


def test_compile_wraps_the_image_tower(tmp_path, tiny_clip, monkeypatch):
    """--compile hands the image tower to torch.compile (a recording stand-in: a real compile takes
    minutes on CPU); without it torch.compile is never called."""
    compiled: list[object] = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or fn)
    runner.cached_encoder.cache_clear()  # the encoder a process reuses: built afresh here, dropped after
    folder = write_image_folder(tmp_path / "imgs")
    assert (
        embed_cli(folder, tmp_path / "plain", tiny_clip, "--num-prepro-workers", "0", "--backend", "torch")
        == 0
    )
    assert compiled == []
    assert embed_cli(folder, tmp_path / "c", tiny_clip, "--num-prepro-workers", "0", "--backend", "torch",
                     "--compile") == 0  # fmt: skip
    assert len(compiled) == 1 and callable(compiled[0])
    runner.cached_encoder.cache_clear()
    np.testing.assert_allclose(
        np.load(tmp_path / "c" / "img_emb" / "00000.npy").astype(np.float32),
        np.load(tmp_path / "plain" / "img_emb" / "00000.npy").astype(np.float32),
        atol=1e-3,
    )


def test_device_option(tmp_path, tiny_clip, calls, capsys):
    """--device cuda: on a GPU the model runs there with the CPU's numbers; without one, a one-line error
    and nothing written. --device cpu keeps it on the CPU either way."""
    folder = write_image_folder(tmp_path / "imgs")
    opts = ("--precision", "fp32", "--backend", "torch", "--num-prepro-workers", "0")
    assert embed_cli(folder, tmp_path / "cpu", tiny_clip, "--device", "cpu", *opts) == 0
    assert calls and all(d == "cpu" for _, _, d in calls)
    calls.clear()
    code = embed_cli(folder, tmp_path / "gpu", tiny_clip, "--device", "cuda", *opts)
    if not torch.cuda.is_available():
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # (after progress bars)
        assert code == 2 and len(err) == 1 and "cuda" in err[0].lower() and "--device cpu" in err[0], err
        assert calls == [] and not list((tmp_path / "gpu").glob("*_emb/*.npy"))
        return
    assert code == 0 and calls and all(d.startswith("cuda") for _, _, d in calls)
    for d in ("img_emb", "text_emb"):
        np.testing.assert_allclose(
            np.load(tmp_path / "gpu" / d / "00000.npy").astype(np.float32),
            np.load(tmp_path / "cpu" / d / "00000.npy").astype(np.float32),
            atol=3e-3,
        )
