"""Aesthetic predictors (LAION's files as torch saves them), tables in every format, `clipsearch aesthetic`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipsearch.aesthetic.cli import build_table
from clipsearch.aesthetic.predictor import load_predictor
from clipsearch.aesthetic.table import TABLE_FILE, load_table, nudge, save_table
from clipsearch.cli import main
from clipsearch.errors import InputError

from .helpers import build_index

DIM = 32


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_laion_linear_and_improved_predictors_fold_to_one_map(tmp_path):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(50, DIM), dim=-1)
    linear = torch.nn.Linear(DIM, 1)  # sa_0_4_vit_b_32_linear.pth: a bare Linear's state dict
    torch.save(linear.state_dict(), tmp_path / "linear.pth")
    # the "improved" predictor: Linear/Dropout stack without activations (keys layers.0 ... layers.7)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(DIM, 64), torch.nn.Dropout(0.2), torch.nn.Linear(64, 16), torch.nn.Dropout(0.1),
        torch.nn.Linear(16, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 4), torch.nn.Linear(4, 1),
    ).eval()  # fmt: skip

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = mlp

    torch.save(Holder().state_dict(), tmp_path / "improved.pth")
    with torch.no_grad():
        for name, model in (("linear.pth", linear), ("improved.pth", mlp)):
            p = load_predictor(str(tmp_path / name))
            np.testing.assert_allclose(p(x.numpy()), model(x)[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    np.savez(tmp_path / "p.npz", weight=linear.weight.detach().numpy(), bias=linear.bias.detach().numpy())
    assert np.allclose(load_predictor(str(tmp_path / "p.npz")).weight, linear.weight.detach().numpy()[0])
    with pytest.raises(InputError, match="does not exist"):
        load_predictor(str(tmp_path / "none.pth"))
    torch.save(torch.nn.Linear(DIM, 3).state_dict(), tmp_path / "three.pth")
    with pytest.raises(InputError, match="3 outputs"):
        load_predictor(str(tmp_path / "three.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(InputError, match="could not be read"):
        load_predictor(str(tmp_path / "junk.pth"))


def test_table_formats(tmp_path):
    t = _unit(np.random.default_rng(0).standard_normal((10, DIM))).astype(np.float32)
    save_table(tmp_path / "t.npy", t)
    assert np.array_equal(load_table(tmp_path / "t.npy"), t)
    np.savez(tmp_path / "r.npz", **{f"rating{s}": t[s][None] for s in range(10)})
    assert np.array_equal(load_table(tmp_path / "r.npz"), t)
    laion = tmp_path / "vit_b_32_embeddings"  # LAION's folder of rating0.npy ... rating9.npy
    laion.mkdir()
    for s in range(10):
        np.save(laion / f"rating{s}.npy", t[s][None])
    assert np.array_equal(load_table(laion), t)
    (laion / "rating4.npy").unlink()
    with pytest.raises(InputError, match="rating4"):
        load_table(laion)
    np.save(tmp_path / "bad.npy", t[:5])
    with pytest.raises(InputError, match=r"\[10, dim\]"):
        load_table(tmp_path / "bad.npy")
    q = _unit(np.ones(DIM, np.float32))
    assert np.allclose(nudge(q, t, 3, 0.0), q)
    out = nudge(q, t, 3, 0.5)
    assert np.isclose(np.linalg.norm(out), 1.0)
    assert np.allclose(out, _unit(q + 0.5 * t[3]), atol=1e-6)


def test_build_table_bins_and_interpolates():
    rng = np.random.default_rng(1)
    w = _unit(rng.standard_normal(DIM)).astype(np.float32)
    from clipsearch.aesthetic.predictor import LinearPredictor

    v = _unit(rng.standard_normal((4000, DIM))).astype(np.float32)
    pred = LinearPredictor(w * 20.0, 4.5)  # scores spread over about 0..9
    table, summary = build_table([v[:1500], v[1500:]], pred, method="bins")
    scores = np.clip(np.rint(pred(v)), 0, 9)
    for s in range(10):
        if summary["counts"][s]:
            assert np.allclose(table[s], v[scores == s].mean(0), atol=1e-5)
    assert sum(summary["counts"]) == 4000
    # only two bins filled: the others interpolate between them or copy the nearest
    table, summary = build_table([v], type(pred)(np.zeros(DIM, np.float32), 0.0), shift=3.0, method="bins")
    assert summary["counts"][3] == 4000 and summary["interpolated"] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert np.allclose(table[9], table[3])
    # direction: every row along the predictor's direction, signed by the score's side of the mean
    table, summary = build_table([v], pred)
    cos = table @ w / np.maximum(np.linalg.norm(table, axis=1), 1e-12)
    m = summary["score_mean"]
    assert all(
        (c > 0.999) if s > m + 0.5 else (c < -0.999) if s < m - 0.5 else True for s, c in enumerate(cos)
    )
    assert np.isclose(np.linalg.norm(table[9]) / np.linalg.norm(table[0]), (9 - m) / m, rtol=1e-3)


def test_aesthetic_command(tmp_path, capsys):
    folder = tmp_path / "index"
    vecs = build_index(str(folder), n=400, dim=DIM)["image"]
    w = torch.nn.Linear(DIM, 1)
    with torch.no_grad():
        w.weight.copy_(torch.from_numpy(vecs[0][None] * 9.0))
        w.bias.zero_()
    torch.save(w.state_dict(), tmp_path / "pred.pth")
    assert main(["-q", "aesthetic", "--index", str(folder), "--predictor", str(tmp_path / "pred.pth")]) == 0
    printed = json.loads(capsys.readouterr().out)
    table = load_table(folder / TABLE_FILE)
    summary = json.loads((folder / "aesthetic_embeddings.json").read_text())
    assert sum(summary["counts"]) == 400 and printed["counts"] == summary["counts"]
    # the images rated 9 are those closest to the predictor's direction
    assert float(table[9] @ vecs[0]) > float(table[0] @ vecs[0])
    # --method bins: row s is the mean of the images rated s
    argv = ["-q", "aesthetic", "--index", str(folder), "--predictor", str(tmp_path / "pred.pth")]
    assert main([*argv, "--method", "bins", "--output", str(tmp_path / "bins.npy")]) == 0
    bins = load_table(tmp_path / "bins.npy")
    assert json.loads(capsys.readouterr().out)["method"] == "bins" and summary["method"] == "direction"
    scores = np.clip(np.rint(vecs @ (vecs[0] * 9.0)), 0, 9)
    assert np.allclose(bins[9], vecs[scores == 9].mean(0), atol=1e-5) and not np.allclose(bins, table)
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main([*argv, "--method", "median"])
    assert e.value.code == 2 and "--method" in capsys.readouterr().err
    assert (
        main(
            ["-q", "aesthetic", "--index", str(tmp_path / "nope"), "--predictor", str(tmp_path / "pred.pth")]
        )
        == 2
    )
    torch.save(torch.nn.Linear(16, 1).state_dict(), tmp_path / "p16.pth")
    assert main(["-q", "aesthetic", "--index", str(folder), "--predictor", str(tmp_path / "p16.pth")]) == 2
    assert "16-d" in capsys.readouterr().err
