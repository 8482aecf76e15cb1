"""Load a model on OpenVINO or ONNX Runtime: from the cache, or converted from torch on the first start.

A fresh conversion is checked against torch fp32 on probe texts and pixels before it is cached (worst
cosine per tower, recorded in the entry's meta.json); one that disagrees is refused, naming the tower.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipsearch.embed.backends import cache, runtimes
from clipsearch.embed.backends.choice import BackendChoice
from clipsearch.embed.backends.runtimes import ConversionError
from clipsearch.errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from clipsearch.embed.models import ClipEncoder, ModelSource

logger = logging.getLogger(__name__)

#: worst cosine to torch fp32 a fresh conversion must reach on the probe inputs
MIN_COSINE = {"fp32": 0.999, "bf16": 0.98, "int8": 0.9}
PROBE_TEXTS = [
    "",
    "a photo of a cat",
    "two dogs playing in the snow in front of a small red wooden house near the mountains at sunset",
    "Zürich 2024 — ビル, 123!",
]


def cache_key(src: ModelSource, choice: BackendChoice) -> dict[str, Any]:
    return {
        "model": src.resolved,
        "fingerprint": src.fingerprint,
        "backend": choice.backend,
        "precision": choice.precision,
        "versions": runtimes.library_versions(choice.backend, choice.precision),
    }


def _probe_pixels(src: ModelSource, n: int) -> np.ndarray:
    h, w = src.preprocessor.output_hw
    return np.random.RandomState(0).standard_normal((n, 3, h, w)).astype(np.float32)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(1).min())


def convert(src: ModelSource, choice: BackendChoice, folder: Path) -> dict[str, Any]:
    """Convert both towers into `folder` with a progress bar, then check them against torch fp32."""
    import torch
    from tqdm.auto import tqdm

    backend, precision = choice.backend, choice.precision
    t0 = time.perf_counter()
    n_steps = 2 + 2 * len(runtimes.TOWERS) + (len(runtimes.TOWERS) if precision == "int8" else 0)
    logger.info(
        "converting %s to %s %s (once: it is cached in %s)", src.name, backend, precision, cache.cache_root()
    )
    bar = tqdm(total=n_steps, desc=f"converting to {backend} {precision}", unit="step", leave=False)

    def step(what: str) -> None:
        bar.set_postfix_str(what, refresh=False)
        bar.update(1)
        logger.debug("conversion: %s", what)

    try:
        step("loading the torch model")
        towers = src.load("cpu")
        examples = {
            "image": torch.from_numpy(_probe_pixels(src, 2)),
            "text": torch.from_numpy(src.tokenize(PROBE_TEXTS[1:3])),
        }
        calibration = None
        if precision == "int8" and backend == "openvino":  # activation ranges of its fully int8 text tower
            calibration = {"text": [src.tokenize([t]) for t in runtimes.calibration_texts()]}
        with torch.no_grad():
            runtimes.CONVERTERS[backend](
                src.name,
                {"image": towers.image, "text": towers.text},
                examples,
                precision,
                folder,
                step,
                calibration=calibration,
            )
        step("checking against torch fp32")
        runners = runtimes.LOADERS[backend](folder, precision, 0, 1)
        pixels = _probe_pixels(src, 3)  # another batch size than the trace's: the batch axis is dynamic
        with torch.inference_mode():
            ref = {
                "image": towers.image(torch.from_numpy(pixels)).float().numpy(),
                "text": towers.text_fn(PROBE_TEXTS).float().numpy(),  # torch's own path, with its mask
            }
        got = {"image": runners["image"](pixels), "text": runners["text"](src.tokenize(PROBE_TEXTS))}
        check = {t: round(_min_cosine(ref[t], got[t]), 6) for t in runtimes.TOWERS}
        n_params = sum(p.numel() for p in towers.model.parameters())
    finally:
        bar.close()
    for tower, c in check.items():
        if not c >= MIN_COSINE[precision]:
            raise ConversionError(
                f"model {src.name!r} does not convert faithfully to {backend} {precision}: its {tower} tower "
                f"gives cosine {c:.4f} to torch fp32 on probe inputs (at least {MIN_COSINE[precision]} expected)",
                hint="--backend torch" if precision != "int8" else "--precision fp32 or bf16",
                tower=tower,
            )
    secs = time.perf_counter() - t0
    logger.info(
        "converted %s to %s %s in %.1fs (worst cosine to torch fp32: image %.5f, text %.5f)",
        src.name,
        backend,
        precision,
        secs,
        check["image"],
        check["text"],
    )
    return {"check": check, "n_params": int(n_params), "convert_s": round(secs, 1)}


def load_converted(
    src: ModelSource,
    choice: BackendChoice,
    *,
    threads: int = 0,
    streams: int = 1,
    lazy_towers: tuple[str, ...] = (),
) -> ClipEncoder:
    """The converted model, ready to run; the towers in `lazy_towers` are compiled on their first call."""
    import torch

    from clipsearch.embed.models import ClipEncoder

    key = cache_key(src, choice)
    for attempt in (1, 2):
        path, built = cache.get_or_build(key, lambda folder: convert(src, choice, folder))
        try:
            runners = runtimes.LOADERS[choice.backend](
                path, choice.precision, threads, streams, lazy=lazy_towers
            )
            break
        except Exception as e:
            if attempt == 2:
                raise ModelLoadError(
                    f"the {choice.backend} model converted from {src.name!r} does not load: {e}",
                    hint="--backend torch",
                ) from e
            cache.invalidate(path, f"{type(e).__name__}: {e}")
    meta = cache.read_meta(path)
    run_image, run_text, tokenize = runners["image"], runners["text"], src.tokenize

    def image_fn(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run_image(pixels.numpy()))

    def text_fn(texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(run_text(tokenize(texts)))

    enc = ClipEncoder(
        name=src.name,
        resolved=src.resolved,
        device="cpu",
        precision=choice.precision,
        preprocessor=src.preprocessor,
        image_fn=image_fn,
        text_fn=text_fn,
        model=None,
        model_type=src.model_type,
        backend=choice.backend,
        n_params=int(meta.get("n_params", 0)),
    )
    enc.runners = runners  # the towers as compiled (a lazy one says whether it is loaded yet)
    enc.backend_info = {
        **choice.as_dict(),
        "versions": key["versions"],
        "cache_entry": str(path),
        "converted_now": built,
        "worst_cosine_vs_torch_fp32": meta.get("check", {}),
    }
    return enc
