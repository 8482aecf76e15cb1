"""Every backend behind the one loader: OpenVINO and ONNX Runtime (fp32, bf16, int8) against torch fp32.

The converted models go to the suite's own cache (tests/conftest.py sets CLIPSEARCH_CACHE_DIR).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.cli import main
from clipsearch.embed import EmbedConfig
from clipsearch.embed.backends import choice, runtimes
from clipsearch.embed.backends.runtimes import ConversionError
from clipsearch.embed.models import load_clip
from clipsearch.errors import ConfigError

from .conftest import write_webdataset

#: (backend, precision, worst cosine to torch fp32 it must keep on the shipped tiny model)
CONVERTED = [
    ("openvino", "fp32", 0.9999),
    ("openvino", "bf16", 0.99),
    ("openvino", "int8", 0.95),
    ("onnx", "fp32", 0.9999),
    ("onnx", "int8", 0.97),
]
TEXTS = [
    "",
    "a red circle",
    "a small blue star on sand near the water",
    "a green heart on a brick wall at night",
]


def _images(n: int = 6) -> list[Image.Image]:
    from clipsearch.demo.sample import make_image, sample_attributes

    out = []
    for i in range(n):
        color, shape, background, rng = sample_attributes(i, seed=7)
        out.append(make_image(color, shape, background, rng))
    return out


@pytest.fixture(scope="module")
def torch_ref() -> tuple[np.ndarray, np.ndarray]:
    enc = load_clip("clipsearch-tiny", backend="torch", precision="fp32")
    return enc.encode_images(_images()), enc.encode_text(TEXTS)


@pytest.fixture(autouse=True)
def _fresh_availability():
    choice.backend_available.cache_clear()
    choice._say_once.cache_clear()
    yield
    choice.backend_available.cache_clear()


@pytest.mark.parametrize(("backend", "precision", "min_cos"), CONVERTED)
def test_backend_matches_torch(backend: str, precision: str, min_cos: float, torch_ref) -> None:
    enc = load_clip("clipsearch-tiny", backend=backend, precision=precision)
    assert (enc.backend, enc.precision, enc.model is None) == (backend, precision, True)
    img, txt = enc.encode_images(_images()), enc.encode_text(TEXTS)
    ref_img, ref_txt = torch_ref
    assert img.shape == ref_img.shape and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
    assert (img * ref_img).sum(1).min() >= min_cos
    assert (txt * ref_txt).sum(1).min() >= min_cos
    # a padded batch equals each text alone (no attention mask in the converted text tower)
    for i, t in enumerate(TEXTS):
        assert float(txt[i] @ enc.encode_text([t])[0]) > 0.9999
    # the uint8 path (the embed stage's) equals the PIL path
    import torch

    raw = torch.from_numpy(np.stack([enc.preprocessor.to_array(im) for im in _images()]))
    assert (enc.encode_pixels(raw) * img).sum(1).min() > 0.9999
    info = enc.backend_info
    assert info["backend"] == backend and min(info["worst_cosine_vs_torch_fp32"].values()) >= min_cos
    assert Path(info["cache_entry"]).is_dir() and backend in json.dumps(info["versions"])


def test_auto_picks_openvino_bf16_on_a_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(choice, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    c = choice.choose_backend("auto", "auto", "cpu")
    assert (c.backend, c.precision) == ("openvino", "bf16") and "avx512_bf16" in c.reason
    monkeypatch.setattr(choice, "cpu_flags", lambda: frozenset({"avx2"}))
    c = choice.choose_backend("auto", "auto", "cpu")
    assert (c.backend, c.precision) == ("openvino", "fp32") and "without bf16" in c.reason
    assert choice.choose_backend("auto", "auto", "cuda").backend == "torch"
    assert choice.choose_backend("auto", "int8", "cpu").as_dict()["precision"] == "int8"


def test_auto_without_the_extras_falls_back_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails like an absent extra
    c = choice.choose_backend("auto", "auto", "cpu")
    assert (c.backend, c.precision) == ("onnx", "fp32")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    choice.backend_available.cache_clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            c = choice.choose_backend("auto", "auto", "cpu")
            assert c.backend == "torch"
    said = [r for r in caplog.records if "neither OpenVINO nor ONNX Runtime" in r.getMessage()]
    assert len(said) == 1 and "clipsearch[openvino]" in said[0].getMessage()
    enc = load_clip("clipsearch-tiny", backend="auto")
    assert enc.backend == "torch" and "not installed" in enc.backend_info["reason"]


def test_named_backend_not_installed_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ConfigError, match=r"backend openvino is not installed"):
        load_clip("clipsearch-tiny", backend="openvino")
    data = write_webdataset(tmp_path / "wds")
    rc = main(
        [
            "embed",
            "--input-dataset",
            str(data),
            "--output-folder",
            str(tmp_path / "e"),
            "--backend",
            "openvino",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "clipsearch[openvino]" in err[0]


@pytest.mark.parametrize(
    ("backend", "precision", "match"),
    [
        ("onnx", "bf16", "does not run bf16"),
        ("torch", "int8", "does not run int8"),
        ("tensorrt", "auto", "backend"),
    ],
)
def test_impossible_pairs_are_refused_before_any_work(
    backend: str, precision: str, match: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(ConfigError, match=match):
        EmbedConfig(input_dataset="x", output_folder="y", backend=backend, precision=precision)
    argv = ["embed", "--input-dataset", "x", "--output-folder", str(tmp_path / "o"), "--backend", backend,
            "--precision", precision]  # fmt: skip
    if backend == "tensorrt":  # not among the choices: argparse says so
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "--backend" in capsys.readouterr().err
        return
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and not (tmp_path / "o").exists()


def test_cache_second_start_converts_nothing_and_corrupt_entries_are_rebuilt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CLIPSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    first = load_clip("clipsearch-tiny", backend="onnx", precision="fp32")
    assert first.backend_info["converted_now"] is True
    entry = Path(first.backend_info["cache_entry"])
    assert entry.parent.parent == tmp_path / "cache" and (entry / "meta.json").exists()
    again = load_clip("clipsearch-tiny", backend="onnx", precision="fp32")
    assert again.backend_info["converted_now"] is False
    # flip one byte of the weights: same size, different checksum -> rebuilt, not trusted
    f = entry / "image.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt = load_clip("clipsearch-tiny", backend="onnx", precision="fp32")
    assert rebuilt.backend_info["converted_now"] is True
    assert any("corrupt" in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)
    t = rebuilt.encode_text(TEXTS)
    np.testing.assert_allclose(t, first.encode_text(TEXTS), atol=1e-5)
    # an interrupted entry (no meta.json) is rebuilt too
    (entry / "meta.json").unlink()
    assert load_clip("clipsearch-tiny", backend="onnx").backend_info["converted_now"] is True


def test_entry_from_other_library_versions_is_said_and_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CLIPSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    real = runtimes.library_versions
    monkeypatch.setattr(runtimes, "library_versions", lambda b, p: {**real(b, p), "onnxruntime": "1.0.0"})
    old = Path(load_clip("clipsearch-tiny", backend="onnx").backend_info["cache_entry"])
    monkeypatch.setattr(runtimes, "library_versions", real)
    with caplog.at_level(logging.WARNING):
        new = load_clip("clipsearch-tiny", backend="onnx")
    said = [r.getMessage() for r in caplog.records if "converted with" in r.getMessage()]
    assert len(said) == 1 and "onnxruntime 1.0.0 (now " in said[0]
    assert new.backend_info["converted_now"] is True and not old.exists()


def _bessel_text_tower(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose text tower uses an op neither exporter converts (aten::special_bessel_j0)."""
    import torch

    from clipsearch.embed import models

    real = models._hf_source

    def source(name: str, resolved: str):
        src = real(name, resolved)
        load = src.load

        def patched(device: str):
            towers = load(device)
            text = towers.text

            class Odd(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.inner = text

                def forward(self, x):
                    return torch.special.bessel_j0(self.inner(x))

            towers.text = Odd()
            return towers

        src.load = patched
        src.fingerprint += "-odd"
        return src

    monkeypatch.setattr(models, "_hf_source", source)


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
def test_model_that_will_not_convert_names_the_op(
    backend: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CLIPSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    _bessel_text_tower(monkeypatch)
    with pytest.raises(ConversionError, match=r"text tower, op aten::special_bessel_j0 has no") as e:
        load_clip("clipsearch-tiny", backend=backend)
    assert e.value.hint == "--backend torch" and e.value.tower == "text"
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")]
    if backend == "openvino":  # auto: one line, then torch
        with caplog.at_level(logging.WARNING):
            enc = load_clip("clipsearch-tiny", backend="auto")
        assert enc.backend == "torch" and "special_bessel_j0" in enc.backend_info["reason"]
        assert sum("falls back to torch" in r.getMessage() for r in caplog.records) == 1


def test_failing_ops_parses_exporter_messages() -> None:
    e = RuntimeError("No conversion rule found for operations: aten::foo, aten::bar_baz")
    assert runtimes.failing_ops(e) == ("aten::foo", "aten::bar_baz")
    assert runtimes.failing_ops(RuntimeError("Exporting the operator 'aten::histc' to ONNX opset")) == (
        "aten::histc",
    )


@pytest.fixture(scope="module")
def e2e_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    from clipsearch.demo.sample import generate_sample

    folder = tmp_path_factory.mktemp("corpus") / "imgs"
    rows = generate_sample(folder, 300, seed=123)  # the e2e test's corpus
    for r in rows:
        (folder / r["file"]).with_suffix(".txt").write_text(r["caption"])
    return folder, rows


@pytest.mark.parametrize(("backend", "precision"), [(b, p) for b, p, _ in CONVERTED] + [("torch", "fp32")])
def test_embed_and_retrieval_on_every_backend(
    backend: str, precision: str, tmp_path: Path, e2e_corpus
) -> None:
    """The tiny model's text -> image retrieval on the e2e corpus (colour+shape recall@5) on every backend,
    through the embed stage (decode workers, uint8 batches), with what ran recorded in the manifest."""
    folder, rows = e2e_corpus
    out = tmp_path / "emb"
    rc = main(["-q", "embed", "--input-dataset", str(folder), "--output-folder", str(out),
               "--backend", backend, "--precision", precision, "--num-prepro-workers", "1"])  # fmt: skip
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"]["backend"] == backend and manifest["encoder"]["precision"] == precision
    assert manifest["encoder"]["reason"]
    stats = json.loads((out / "stats" / "00000.json").read_text())
    assert stats["backend"] == backend
    assert 0 < stats["model_s"] <= stats["duration_s"] and 0 < stats["encoder_busy"] <= 1
    import pyarrow.parquet as pq

    img = np.load(out / "img_emb" / "00000.npy").astype(np.float32)
    urls = pq.read_table(out / "metadata" / "00000.parquet").column("key").to_pylist()
    attrs = {r["file"].rsplit(".", 1)[0]: (r["color"], r["shape"]) for r in rows}
    got_attrs = [attrs[k] for k in urls]
    combos = [c for c, n in Counter(got_attrs).items() if n >= 5]
    assert len(combos) >= 10
    enc = load_clip("clipsearch-tiny", backend=backend, precision=precision)
    q = enc.encode_text([f"a {c} {s}" for c, s in combos])
    top = np.argsort(-(q @ img.T), axis=1)[:, :5]
    recall = np.mean([[got_attrs[j] == combos[i] for j in top[i]] for i in range(len(combos))])
    assert recall >= 0.8, f"{backend} {precision}: colour+shape recall@5 {recall:.2f}"


def test_query_and_serve_take_the_backend(
    tmp_path: Path, e2e_corpus, caplog: pytest.LogCaptureFixture
) -> None:
    """`query --backend/--precision` and `serve --backend/--precision` load the model on what they name,
    and their hits agree with torch fp32's."""
    import pyarrow.parquet as pq

    from clipsearch.serve import cli as serve_cli

    folder, _ = e2e_corpus
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    assert main(["-q", "embed", "--input-dataset", str(folder), "--output-folder", str(emb), "--backend", "torch",
                 "--precision", "fp32", "--num-prepro-workers", "0"]) == 0  # fmt: skip
    assert main(["-q", "index", "--embeddings-folder", str(emb), "--index-folder", str(idx)]) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue star\na green heart on grass\na yellow square\n")
    hits = {}
    for backend, precision in (("torch", "fp32"), ("onnx", "int8"), ("openvino", "bf16")):
        out = tmp_path / f"{backend}.parquet"
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(["query", "--index", str(idx), "--prompts", str(prompts), "-k", "10", "--output", str(out),
                         "--backend", backend, "--precision", precision]) == 0  # fmt: skip
        assert any(f"with {backend} {precision}" in r.getMessage() for r in caplog.records)
        rows = pq.read_table(out).to_pylist()
        hits[backend] = {(r["query"], r["id"]) for r in rows}
    for backend in ("onnx", "openvino"):
        assert len(hits[backend] & hits["torch"]) / len(hits["torch"]) >= 0.9

    parser = __import__("argparse").ArgumentParser()
    serve_cli.add_arguments(parser)
    settings = serve_cli.settings_from_args(
        parser.parse_args(["--index", f"x={idx}", "--backend", "onnx", "--precision", "int8"])
    )
    assert (settings.backend, settings.precision) == ("onnx", "int8")
    # serve loads the image tower on the first image query: text queries never pay for it
    from fastapi.testclient import TestClient

    from clipsearch.serve import create_app

    with TestClient(create_app(settings)) as c:
        enc = c.app.state.clipsearch.encoder
        assert (enc.backend, enc.precision) == ("onnx", "int8")
        assert not enc.runners["image"].loaded
        r = c.post("/knn", json={"text": "a red circle", "k": 5})
        assert r.status_code == 200 and r.json()["results"]
        assert not enc.runners["image"].loaded
        # the cache entry may go while the server runs (a cleanup, a rebuild): the lazy tower was opened at start
        __import__("shutil").rmtree(enc.backend_info["cache_entry"])
        buf = __import__("io").BytesIO()
        _images(1)[0].save(buf, "PNG")
        r = c.post("/knn", files={"image": ("q.png", buf.getvalue(), "image/png")}, data={"k": "5"})
        assert r.status_code == 200 and r.json()["results"], r.text
        assert enc.runners["image"].loaded
        want = load_clip("clipsearch-tiny", backend="onnx", precision="int8").encode_images(_images(1))[0]
        got = enc.encode_images(_images(1))[0]
        assert float(np.dot(want, got)) > 0.999  # the lazily loaded tower is the same model
