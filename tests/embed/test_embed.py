from __future__ import annotations

import argparse
import functools
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipsearch.embed import EmbedConfig, embed
from clipsearch.embed import cli as embed_cli
from clipsearch.embed.readers import detect_format
from clipsearch.embed.runner import _encoder, plan_units, run_unit
from clipsearch.errors import ConfigError, InputError, ModelLoadError, OutputExistsError

from .conftest import CORRUPT, make_samples, write_image_folder, write_webdataset


def _cfg(inp: Path | str, out: Path | str, model: str, **kw) -> EmbedConfig:
    kw.setdefault("num_prepro_workers", 0)
    return EmbedConfig(input_dataset=str(inp), output_folder=str(out), clip_model=model, progress=False, **kw)


def _load_part(out: Path, name: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    img = np.load(out / "img_emb" / f"{name}.npy")
    txt = np.load(out / "text_emb" / f"{name}.npy")
    meta = pq.read_table(out / "metadata" / f"{name}.parquet").to_pylist()
    return img, txt, meta


def test_formats_roundtrip_aligned(dataset, tmp_path: Path, tiny_clip: str) -> None:
    fmt, folder = dataset
    workers = 1 if fmt == "webdataset" else 0  # decode processes once; in the reader thread otherwise
    assert detect_format(str(folder)) == fmt
    out = tmp_path / "emb"
    cfg = _cfg(folder, out, tiny_clip, num_prepro_workers=workers)
    report = embed(cfg)
    assert report["input_format"] == fmt and report["parts"] == 2 and report["rows"] == 8
    enc = _encoder(cfg, "cpu")  # the one the run used (backend auto)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == tiny_clip and manifest["dim"] == 16 and manifest["dtype"] == "float16"
    assert manifest["normalized"] is True and manifest["total_rows"] == 8
    assert [p["name"] for p in manifest["parts"]] == ["00000", "00001"]
    for shard, part in enumerate(manifest["parts"]):
        img, txt, meta = _load_part(out, part["name"])
        assert img.dtype == txt.dtype == np.float16
        assert img.shape == txt.shape == (4, 16) and len(meta) == part["rows"] == 4
        np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
        rows = {r["key"]: r for r in make_samples(shard)}
        # rows 0,1,3,4 survive: 2 is corrupt, 5 failed to download
        assert [m["key"] for m in meta] == [f"{shard:05d}{r:04d}" for r in (0, 1, 3, 4)]
        assert list(meta[0])[:3] == ["key", "url", "caption"]
        for i, m in enumerate(meta):
            src = rows[m["key"]]
            assert (
                m["url"] == src["url"] and m["caption"] == src["caption"] and m["license"] == src["license"]
            )
            assert m["width"] == 48 and m["url_hash"] == src["url_hash"]
            # golden: the stored embeddings are the encoder's, row for row
            want_img = enc.encode_images([Image.open(io.BytesIO(src["_image"]))])[0]
            want_txt = enc.encode_text([src["caption"] or ""])[0]
            np.testing.assert_allclose(img[i].astype(np.float32), want_img, atol=3e-3)
            np.testing.assert_allclose(txt[i].astype(np.float32), want_txt, atol=3e-3)
        st = json.loads((out / "stats" / f"{part['name']}.json").read_text())
        assert st["rows"] == 4 and st["corrupt_images"] == 1 and st["missing_captions"] == 1
        assert st["unexpected_members"] == (1 if fmt in ("webdataset", "files") else 0)
        assert st["failed_downloads"] == (1 if fmt == "parquet" else 0)
        assert st["samples_per_s"] > 0


def test_image_folder(tmp_path: Path, tiny_clip: str) -> None:
    folder = write_image_folder(tmp_path / "imgs")
    (folder / "notes.csv").write_text("not an image")
    out = tmp_path / "emb"
    report = embed(_cfg(folder, out, tiny_clip, write_batch_size=4))
    assert report["input_format"] == "images" and report["parts"] == 2
    metas = [m for p in ("00000", "00001") for m in _load_part(out, p)[2]]
    keys = sorted(m["key"] for m in metas)
    assert keys == ["img0", "img2", "img4", "sub/img1", "sub/img3"]
    by_key = {m["key"]: m for m in metas}
    assert by_key["img0"]["caption"] == "the cat" and by_key["sub/img3"]["caption"] is None
    assert report["counts"]["corrupt_images"] == 1 and report["counts"]["missing_captions"] == 1
    assert report["counts"]["unexpected_members"] == 1


def test_resume_skips_finished_parts(tmp_path: Path, tiny_clip: str) -> None:
    folder = write_webdataset(tmp_path / "images", shards=3)
    out = tmp_path / "emb"
    embed(_cfg(folder, out, tiny_clip))
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    os.remove(out / "stats" / "00001.json")  # as if killed while writing part 1
    report = embed(_cfg(folder, out, tiny_clip))
    assert report["parts_done"] == 1 and report["parts_skipped"] == 2 and report["rows"] == 12
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    changed = sorted(p.name for p in after if after[p] != mtimes[p])
    assert changed == ["00001.npy", "00001.npy"]
    assert not list(out.rglob(".*.tmp"))


def test_refuses_foreign_or_other_model_output(tmp_path: Path, tiny_clip: str, tiny_siglip: str) -> None:
    folder = write_webdataset(tmp_path / "images", shards=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="precious.txt"):
        embed(_cfg(folder, foreign, tiny_clip))
    assert sorted(p.name for p in foreign.iterdir()) == ["precious.txt"]
    out = tmp_path / "emb"
    embed(_cfg(folder, out, tiny_clip))
    with pytest.raises(OutputExistsError, match="holds embeddings of model"):
        embed(_cfg(folder, out, tiny_siglip))
    with pytest.raises(OutputExistsError, match="image"):
        embed(_cfg(folder, out, tiny_clip, enable_text=False))


def test_bad_model_fails_before_work(tmp_path: Path) -> None:
    folder = write_webdataset(tmp_path / "images", shards=1)
    out = tmp_path / "emb"
    with pytest.raises(ModelLoadError, match="does not exist"):
        embed(_cfg(folder, out, str(tmp_path / "no-model")))
    assert not out.exists()


def test_bad_input(tmp_path: Path, tiny_clip: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image shards"):
        embed(_cfg(tmp_path / "empty", tmp_path / "o", tiny_clip))
    with pytest.raises(InputError, match="does not exist"):
        embed(_cfg(tmp_path / "nope", tmp_path / "o", tiny_clip))
    with pytest.raises(ConfigError):
        _cfg(tmp_path, tmp_path / "o", tiny_clip, enable_text=False, enable_image=False)
    with pytest.raises(ConfigError):
        _cfg(tmp_path, tmp_path / "o", tiny_clip, input_format="tfr")


def test_all_corrupt_shard_gives_empty_aligned_part(tmp_path: Path, tiny_clip: str) -> None:
    import tarfile

    folder = tmp_path / "images"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(3):
            ti = tarfile.TarInfo(f"0000000{i}.jpg")
            ti.size = len(CORRUPT)
            tar.addfile(ti, io.BytesIO(CORRUPT))
    out = tmp_path / "emb"
    report = embed(_cfg(folder, out, tiny_clip))
    img, txt, meta = _load_part(out, "00000")
    assert img.shape == txt.shape == (0, 16) and meta == []
    assert report["counts"]["corrupt_images"] == 3


def test_text_only_and_memory_filesystem(tiny_clip: str, tmp_path: Path) -> None:
    import fsspec

    folder = write_webdataset(tmp_path / "images", shards=1)
    fs = fsspec.filesystem("memory")
    fs.put(str(folder / "00000.tar"), "/in/00000.tar")
    report = embed(_cfg("memory://in", "memory://out", tiny_clip, enable_image=False))
    # without decoding, the corrupt image is not detected: 5 rows with an image member
    assert report["rows"] == 5
    assert fs.exists("/out/text_emb/00000.npy") and not fs.exists("/out/img_emb/00000.npy")
    manifest = json.loads(fs.cat("/out/manifest.json"))
    assert manifest["modalities"] == ["text"]


def test_unit_is_picklable(tmp_path: Path, tiny_clip: str) -> None:
    folder = write_webdataset(tmp_path / "images", shards=2)
    cfg = _cfg(folder, tmp_path / "emb", tiny_clip, input_format="webdataset", shards_per_part=2)
    units = plan_units(cfg, "webdataset")
    assert len(units) == 1 and len(units[0].inputs) == 2 and units[0].size_hint == 10
    fn = pickle.loads(pickle.dumps(functools.partial(run_unit, cfg=cfg)))
    res = fn(units[0])
    assert res.ok and res.counts["rows"] == 8


def test_pipeline_embed_options() -> None:
    """pipeline supplies the folders, the format and the distributor; embed's other options are shared (their
    effects: test_cli_effects.py)."""
    pp = argparse.ArgumentParser()
    embed_cli.add_arguments(pp, pipeline=True)
    opts = {o for a in pp._actions for o in a.option_strings}
    assert "--input-dataset" not in opts and "--distributor" not in opts and "--clip-model" in opts
    args = pp.parse_args(["--device", "cpu"])
    args.distributor, args.spark_master, args.max_retries = "local", "local[*]", 2
    cfg = embed_cli.config_from_args(args, input_dataset="a", output_folder="b", input_format="webdataset")
    assert cfg.input_dataset == "a" and cfg.input_format == "webdataset"
