"""`--backend auto|torch|openvino|onnx` and `--precision`: what runs the model, and why (no torch import here).

`auto` on a GPU is torch (autocast). On a CPU it is the fastest backend measured on this kind of machine
(docs/bench-embed.md, "Backends"): OpenVINO in bf16 where the CPU has avx512_bf16 or AMX (2.4-6x torch fp32),
OpenVINO fp32 elsewhere; ONNX Runtime fp32 when only that extra is installed; torch when neither is, which
is said once per process.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass

from clipsearch.errors import ConfigError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino", "onnx")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
#: what each backend runs. int8 is offered only where it kept retrieval's top-10 overlap >= 0.95 against torch
#: fp32 (docs/embed.md, "Quality").
BACKEND_PRECISIONS = {
    "torch": ("fp32", "bf16", "fp16"),
    "openvino": ("fp32", "bf16", "int8"),
    "onnx": ("fp32", "int8"),
}
#: the module each backend imports, and the extra that installs it
MODULES = {"openvino": "openvino", "onnx": "onnxruntime"}
EXTRAS = {"openvino": "openvino", "onnx": "onnx"}


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    precision: str  # torch keeps "auto" (decided later: statically, or measured by the embed stage)
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "precision": self.precision, "reason": self.reason}

    def fallback(self, why: str) -> BackendChoice:
        """torch instead (backend auto, when the converted model failed)."""
        prec = self.precision if self.precision in BACKEND_PRECISIONS["torch"] else "auto"
        return BackendChoice("torch", prec, why)


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16() -> str | None:
    """The CPU feature that makes bf16 fast (AMX first), or None."""
    flags = cpu_flags()
    for f in ("amx_bf16", "avx512_bf16"):
        if f in flags:
            return f
    return None


def cpu_int8_dot() -> bool:
    """Whether the CPU multiplies int8 without saturating (VNNI or AMX). Without it (AVX2 alone) the
    u8 x s8 pair products saturate at 16 bits, and int8 models need 7-bit weights (nncf's overflow fix)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def backend_available(backend: str) -> tuple[bool, str]:
    """(importable, why not). torch is always there."""
    mod = MODULES.get(backend)
    if mod is None:
        return True, ""
    try:
        importlib.import_module(mod)
        if backend == "onnx":
            importlib.import_module("onnx")  # the exporter writes ONNX files with it
    except Exception as e:  # ImportError, or a broken install that fails on import
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def not_installed_error(backend: str, why: str) -> ConfigError:
    return ConfigError(
        f"backend {backend} is not installed ({why})",
        hint=f"pip install 'clipsearch[{EXTRAS[backend]}]', or --backend torch",
    )


@functools.cache
def _say_once(message: str) -> None:
    logger.warning(message)


def choose_backend(backend: str = "auto", precision: str = "auto", device: str = "cpu") -> BackendChoice:
    """Validate the pair and resolve `auto`. Raises ConfigError (exit 2) for a pair that cannot run."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}", hint="--backend " + "|".join(BACKENDS))
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint="--precision " + "|".join(PRECISIONS))
    gpu = device.startswith("cuda")
    if backend == "auto":
        return _auto(precision, gpu)
    if backend != "torch":
        if gpu:
            raise ConfigError(
                f"backend {backend} runs on the CPU here; on a GPU use torch",
                hint="--backend torch (or --device cpu)",
            )
        ok, why = backend_available(backend)
        if not ok:
            raise not_installed_error(backend, why)
    if precision == "auto":
        if backend == "torch":
            return BackendChoice("torch", "auto", "asked for (--backend torch)")
        prec = "bf16" if backend == "openvino" and cpu_bf16() else "fp32"
        return BackendChoice(
            backend, prec, f"asked for; {prec}" + (f" (CPU has {cpu_bf16()})" if prec == "bf16" else "")
        )
    if precision not in BACKEND_PRECISIONS[backend]:
        others = [b for b, ps in BACKEND_PRECISIONS.items() if precision in ps]
        raise ConfigError(
            f"backend {backend} does not run {precision} (it runs {', '.join(BACKEND_PRECISIONS[backend])})",
            hint=f"--precision {BACKEND_PRECISIONS[backend][0]}, or --backend {others[0] if others else 'auto'}",
        )
    if backend == "torch" and precision == "int8":  # pragma: no cover - excluded above
        raise ConfigError("torch does not run int8", hint="--backend openvino")
    return BackendChoice(backend, precision, "asked for")


def check_pair(backend: str, precision: str) -> None:
    """The device-free part of choose_backend's checks, for configs to fail at once."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}", hint="--backend " + "|".join(BACKENDS))
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint="--precision " + "|".join(PRECISIONS))
    if backend in BACKEND_PRECISIONS and precision != "auto" and precision not in BACKEND_PRECISIONS[backend]:
        others = [b for b, ps in BACKEND_PRECISIONS.items() if precision in ps]
        raise ConfigError(
            f"backend {backend} does not run {precision} (it runs {', '.join(BACKEND_PRECISIONS[backend])})",
            hint=f"--precision {BACKEND_PRECISIONS[backend][0]}, or --backend {others[0] if others else 'auto'}",
        )


def _auto(precision: str, gpu: bool) -> BackendChoice:
    if gpu:
        if precision == "int8":
            raise ConfigError("int8 runs on the CPU backends only", hint="--precision auto, or --device cpu")
        return BackendChoice("torch", precision, "a GPU: torch with autocast")
    if precision == "fp16":
        return BackendChoice("torch", "fp16", "fp16 on CPU is torch's autocast only")
    have_ov, why_ov = backend_available("openvino")
    have_ort, why_ort = backend_available("onnx")
    feature = cpu_bf16()
    if have_ov:
        if precision == "auto":
            if feature:
                return BackendChoice(
                    "openvino", "bf16", f"CPU with {feature}: OpenVINO bf16 is the fastest measured here"
                )
            return BackendChoice("openvino", "fp32", "CPU without bf16 support: OpenVINO fp32")
        return BackendChoice("openvino", precision, f"OpenVINO runs {precision} fastest here")
    if have_ort and precision in ("auto", "fp32", "int8"):
        prec = "fp32" if precision == "auto" else precision
        _say_once(f"backend auto: OpenVINO is not installed ({why_ov}); using ONNX Runtime {prec}")
        return BackendChoice("onnx", prec, f"OpenVINO not installed; ONNX Runtime {prec}")
    if precision == "int8":
        raise not_installed_error("openvino", why_ov)
    _say_once(
        "backend auto: neither OpenVINO nor ONNX Runtime is installed, so the model runs on torch, "
        "2-6x slower on this CPU (pip install 'clipsearch[openvino]')"
    )
    return BackendChoice(
        "torch", precision, f"OpenVINO ({why_ov}) and ONNX Runtime ({why_ort}) not installed"
    )
