"""`clipsearch aesthetic --scale A --shift B`: every image's score is A * prediction + B, rounded into 0..9."""

from __future__ import annotations

import json

import numpy as np
import torch

from clipsearch.aesthetic.table import load_table
from clipsearch.cli import main

from .helpers import build_index


def test_scale_and_shift_map_predictions_to_scores(tmp_path, capsys):
    folder = tmp_path / "index"
    vecs = build_index(str(folder), n=400, dim=32)["image"].astype(np.float64)
    w = torch.nn.Linear(32, 1)
    with torch.no_grad():
        w.weight.copy_(torch.from_numpy(vecs[0][None] * 9.0))
        w.bias.zero_()
    torch.save(w.state_dict(), tmp_path / "pred.pth")
    prediction = vecs @ (vecs[0] * 9.0)  # the predictor, by hand
    argv = [
        "-q",
        "aesthetic",
        "--index",
        str(folder),
        "--predictor",
        str(tmp_path / "pred.pth"),
        "--method",
        "bins",
    ]
    counts = {}
    for scale, shift in (("1", "0"), ("0.4", "3"), ("-1", "9")):
        out = tmp_path / f"t{scale}_{shift}.npy"
        assert main([*argv, "--scale", scale, "--shift", shift, "--output", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out)
        scores = np.clip(np.rint(float(scale) * prediction + float(shift)), 0, 9).astype(int)
        want = np.bincount(scores, minlength=10)
        assert summary["counts"] == want.tolist(), (scale, shift)
        table = load_table(out)
        top = int(np.flatnonzero(want)[-1])
        np.testing.assert_allclose(table[top], vecs[scores == top].mean(0), atol=1e-4)
        counts[scale, shift] = summary["counts"]
    assert len({tuple(c) for c in counts.values()}) == 3  # each mapping rates the images differently
