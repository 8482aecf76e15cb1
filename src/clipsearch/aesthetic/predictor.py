"""Linear aesthetic predictors: image embedding -> score, read from the files people have.

A predictor is a chain of linear layers with nothing non-linear between them, so it folds into one
`score = w . x + b` over the L2-normalised image embedding x:
- LAION's linear predictor (`sa_0_4_vit_b_32_linear.pth`: a `torch.nn.Linear(dim, 1)` state dict,
  keys `weight` [1, dim] and `bias` [1]);
- LAION's "improved" predictor (`sac+logos+ava1-l14-linearMSE.pth`: `layers.0`, `layers.2`, ... `layers.7`
  Linear layers of an MLP whose ReLUs are commented out, i.e. a linear map);
- the same keys in `.safetensors` or `.npz` (clipsearch ships its tiny model's predictor as safetensors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsearch.errors import InputError


@dataclass(frozen=True)
class LinearPredictor:
    weight: np.ndarray  # [dim]
    bias: float

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return (v @ self.weight + self.bias).astype(np.float32)


def _read_arrays(p: Path) -> dict[str, np.ndarray]:
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(p)))
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix in (".pth", ".pt", ".bin", ".ckpt"):
            import torch

            obj = torch.load(str(p), map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if not isinstance(obj, dict):
                raise InputError(f"{p} holds a {type(obj).__name__}, not a state dict of linear layers")
            return {k: v.detach().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{p} could not be read as a predictor: {type(e).__name__}: {e}") from e
    raise InputError(f"{p}: unknown predictor format {suffix!r} (use .pth, .pt, .safetensors or .npz)")


def _layers(arrays: dict[str, np.ndarray], where: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight [out, in], bias [out]) of each linear layer, in order."""
    weights = {k[: -len("weight")]: v for k, v in arrays.items() if k.endswith("weight")}
    if not weights:
        raise InputError(f"{where} has no '*weight' array: not a linear predictor")

    def order(prefix: str) -> tuple[int, ...]:
        nums = re.findall(r"\d+", prefix)
        return tuple(int(n) for n in nums) if nums else (-1,)

    out = []
    for prefix in sorted(weights, key=order):
        w = np.asarray(weights[prefix], dtype=np.float64)
        if w.ndim == 1:
            w = w[None, :]
        if w.ndim != 2:
            raise InputError(f"{where}: {prefix}weight has shape {w.shape}, not a linear layer's")
        b = arrays.get(prefix + "bias")
        b = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
        if b.shape[0] != w.shape[0]:
            raise InputError(f"{where}: {prefix}bias has {b.shape[0]} values for {w.shape[0]} outputs")
        out.append((w, b))
    return out


def load_predictor(path: str) -> LinearPredictor:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"predictor file {p} does not exist", hint="--predictor FILE")
    layers = _layers(_read_arrays(p), str(p))
    w, b = layers[0]
    for w2, b2 in layers[1:]:
        if w2.shape[1] != w.shape[0]:
            raise InputError(
                f"{p}: layer shapes do not chain ({w.shape[0]} outputs into {w2.shape[1]} inputs)"
            )
        w, b = w2 @ w, w2 @ b + b2
    if w.shape[0] != 1:
        raise InputError(f"{p}: the predictor gives {w.shape[0]} outputs, not one score")
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise InputError(f"{p}: the predictor holds non-finite weights")
    return LinearPredictor(w[0].astype(np.float32), float(b[0]))
