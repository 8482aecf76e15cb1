"""Inference backends behind the one model loader (`clipsearch.embed.models.load_clip`).

`torch` runs the model as loaded; `openvino` and `onnx` (ONNX Runtime) run a converted copy of its two towers,
cached on disk (`cache.py`). `choice.choose_backend` turns `--backend`/`--precision` into what runs, and says
why. See docs/embed.md, "Backends".
"""

from clipsearch.embed.backends.choice import (
    BACKEND_PRECISIONS,
    BACKENDS,
    PRECISIONS,
    BackendChoice,
    backend_available,
    choose_backend,
)

__all__ = [
    "BACKENDS",
    "BACKEND_PRECISIONS",
    "PRECISIONS",
    "BackendChoice",
    "backend_available",
    "choose_backend",
]
