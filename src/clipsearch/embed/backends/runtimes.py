"""Convert a model's two towers to OpenVINO IR or ONNX, and run them.

Each tower is a torch module with one input: the image tower takes normalised pixels [n, 3, H, W] float32,
the text tower token ids [n, L] int64 (no attention mask: CLIP's causal mask makes right padding inert and
it pools the first end-of-text token; SigLIP is trained without a mask). Batch size and text length stay
dynamic. OpenVINO converts from torch directly (`ov.convert_model`) and takes the precision as an inference
hint (bf16) or int8: the text tower fully int8 (NNCF post-training quantisation of weights and activations,
calibrated on built-in synthetic captions: `calibration_texts`), the image tower int8 weights (NNCF weight
compression: calibrating it would need real photos); ONNX Runtime runs `torch.onnx.export`'s graph, int8
through its dynamic quantisation (weights int8 per channel, activations per batch).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.embed.backends.choice import cpu_bf16, cpu_int8_dot
from clipsearch.errors import ModelLoadError

logger = logging.getLogger(__name__)

TOWERS = ("image", "text")
INPUTS = {"image": "pixel_values", "text": "input_ids"}
Runner = Callable[[np.ndarray], np.ndarray]


class ConversionError(ModelLoadError):
    """A model (one tower, one layer or op of it) that a backend cannot convert or run faithfully."""

    def __init__(self, message: str, *, hint: str | None = None, tower: str = "", ops: tuple[str, ...] = ()):
        super().__init__(message, hint=hint)
        self.tower = tower
        self.ops = ops


_OP_PATTERNS = (
    re.compile(r"\b((?:aten|prim|onnx|torchvision)::[A-Za-z_][\w.]*)"),
    re.compile(r"operator '?([\w:.]+)'? to ONNX"),
    re.compile(r"[Nn]o conversion rule found for operations?:?\s*([^\n]+)"),
)


def failing_ops(error: BaseException) -> tuple[str, ...]:
    """The layer or op names an exporter's error mentions (aten::foo, prim::bar, ...), in order, unique."""
    text = "\n".join(f"{type(e).__name__}: {e}" for e in _chain(error))
    found: list[str] = []
    for pat in _OP_PATTERNS:
        for m in pat.finditer(text):
            for name in re.split(r"[,\s]+", m.group(1)):
                name = name.strip(" '\"`.;")
                if name and name not in found and "::" in name:
                    found.append(name)
    return tuple(found[:5])


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(out) < 6:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def conversion_error(model: str, backend: str, tower: str, error: BaseException) -> ConversionError:
    ops = failing_ops(error)
    if len(ops) == 1:
        what = f"op {ops[0]} has no {backend} conversion"
    elif ops:
        what = f"ops {', '.join(ops)} have no {backend} conversion"
    else:
        what = " ".join(str(error).split())[:240]
    return ConversionError(
        f"model {model!r} will not convert to {backend}: in its {tower} tower, {what}",
        hint="--backend torch",
        tower=tower,
        ops=ops,
    )


# ---------------------------------------------------------------------------------------------------------
# OpenVINO
# ---------------------------------------------------------------------------------------------------------
#: words of the synthetic captions that calibrate the int8 text tower's activation ranges: common caption
#: vocabulary (objects, colours, places, styles), none of it from a benchmark's or a test's queries
_CALIBRATION_WORDS = (
    "a an the of in on with and at by near under over two three four many old young new red green white "
    "black blue yellow orange purple brown pink gray golden small large tall tiny huge wooden glass stone "
    "metal dog cat horse bird fish cow car bus train boat plane bicycle truck man woman child girl boy "
    "people family crowd house building street road bridge city village beach forest mountain river lake "
    "field desert island kitchen room table chair bed sofa window door flower tree grass garden sky cloud "
    "sunset sunrise snow rain night light shadow water fire food cake pizza bread fruit apple coffee wine "
    "book phone laptop computer screen painting drawing photo picture portrait illustration logo icon map "
    "chart diagram poster sign text shirt dress shoe hat bag jacket wedding party concert game football "
    "sport running sitting standing walking playing eating holding looking smiling vintage modern "
    "abstract cartoon sketch watercolor 3d render closeup aerial view background pattern texture"
).split()


def calibration_texts(n: int = 160, seed: int = 0) -> list[str]:
    """Synthetic captions of 1-16 words (and an empty one): they set the int8 text tower's activation
    ranges, so they span the lengths and word mix of real queries without being anyone's evaluation data."""
    rng = np.random.default_rng(seed)
    words = np.array(_CALIBRATION_WORDS)
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 17)))) for _ in range(n - 2)]
    return ["", "Zürich 2024 — ビル, photo no. 123!", *texts]


def _quantize_text_int8(m: Any, calibration: list[np.ndarray]) -> Any:
    """Weights and activations of the text tower's MatMuls in int8, except the attention output projections
    and the final projection. Measured: quantising every MatMul gave a ViT-B/32 worst cosine 0.9966 to fp32;
    the attention output projections (their input, the attention's output, does not suit one activation scale
    per tensor) alone cost the shipped tiny model 5 % of its text-only top-10 overlap (0.945 -> 0.995 without
    them); SmoothQuant made it worse (0.929). Keeping the first layer too (as ONNX Runtime int8 does) changed
    the overlap by 0.001 and cost 8 % more time per query (ViT-B/32: 4.65 vs 4.28 ms at batch 8)."""
    import nncf
    from nncf.quantization.advanced_parameters import OverflowFix

    matmuls = [op.get_friendly_name() for op in m.get_ordered_ops() if op.get_type_name() == "MatMul"]
    # also the attention's own products (q.k and weights.v: ops right under `self_attn/`, not its
    # projections), which recent exports give as MatMuls rather than one attention op: quantised, the
    # causal mask's large negative scores wreck long texts (tiny model, 20 words: cosine 0.11 to fp32)
    ignored = nncf.IgnoredScope(
        names=matmuls[-1:],
        patterns=[r".*out_proj.*", r".*self_attn/.*"],
        validate=False,
    )
    return nncf.quantize(
        m,
        nncf.Dataset(calibration),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
        ignored_scope=ignored,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1),
            # AVX2 without VNNI: 8-bit weights saturate the u8 x s8 products (measured on an AMD EPYC
            # with AVX2 only: the tiny model's text tower at cosine 0.60 to fp32); 7-bit weights do not
            overflow_fix=OverflowFix.FIRST_LAYER if cpu_int8_dot() else OverflowFix.ENABLE,
        ),
    )


def convert_openvino(
    model: str,
    towers: dict[str, Any],
    examples: dict[str, Any],
    precision: str,
    folder: Path,
    step: Callable,
    calibration: dict[str, list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    import openvino as ov

    for tower in TOWERS:
        step(f"{tower} tower: tracing and converting")
        try:
            with warnings.catch_warnings(), _keep_root_logger():
                warnings.simplefilter("ignore")  # TracerWarnings about branches that are constant for CLIP
                m = ov.convert_model(towers[tower], example_input=(examples[tower],))
        except Exception as e:
            raise conversion_error(model, "openvino", tower, e) from e
        m.inputs[0].get_tensor().set_names({INPUTS[tower]})
        shape = list(examples[tower].shape)
        dims = [-1] + shape[1:] if tower == "image" else [-1, -1]
        m.reshape({m.inputs[0]: ov.PartialShape(dims)})
        if precision == "int8":
            import nncf
            from nncf.common.logging.logger import set_log_level

            set_log_level(logging.ERROR)  # its statistics table goes to stdout otherwise
            if tower == "text" and calibration and calibration.get("text"):
                step("text tower: int8 weights and activations (calibrating)")
                with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars (rich) draw on stdout
                    m = _quantize_text_int8(m, calibration["text"])
            else:
                step(f"{tower} tower: int8 weights")
                with contextlib.redirect_stdout(
                    sys.stderr
                ):  # int8 weights per output channel, no data needed
                    m = nncf.compress_weights(m)
        step(f"{tower} tower: saving")
        ov.save_model(m, str(folder / f"{tower}.xml"), compress_to_fp16=precision == "bf16")
    return {}


def load_openvino(
    folder: Path, precision: str, threads: int, streams: int, lazy: tuple[str, ...] = ()
) -> dict[str, Runner]:
    import openvino as ov

    core = ov.Core()
    hint = "bf16" if precision == "bf16" or (precision == "int8" and cpu_bf16()) else "f32"
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": hint,
        "PERFORMANCE_HINT": "LATENCY" if streams <= 1 else "THROUGHPUT",
        "NUM_STREAMS": max(1, streams),
        # pinned threads fight with every other process on a shared machine
        "ENABLE_CPU_PINNING": False,
    }
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads * max(1, streams)
    # a lazy tower is read now (its weights memory-mapped: ~10 MB) and compiled on its first call, so the
    # cache entry may change or go meanwhile
    models = {t: core.read_model(str(folder / f"{t}.xml")) for t in TOWERS}

    def compile_tower(tower: str) -> Runner:
        return _OVRunner(core.compile_model(models.pop(tower), "CPU", config))

    return {t: _LazyRunner(compile_tower, t) if t in lazy else compile_tower(t) for t in TOWERS}


class _LazyRunner:
    """A tower compiled on its first call (serve's image tower: text queries never pay its memory)."""

    def __init__(self, build: Callable[[str], Runner], tower: str):
        self._build = build
        self._tower = tower
        self._run: Runner | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._run is not None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        run = self._run
        if run is None:
            with self._lock:
                if self._run is None:
                    logger.info("loading the %s tower on its first use", self._tower)
                    self._run = self._build(self._tower)
                run = self._run
        return run(x)


class _OVRunner:
    """One infer request per calling thread: requests from several threads run on separate streams."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self._local = threading.local()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        req = getattr(self._local, "req", None)
        if req is None:
            req = self._local.req = self.compiled.create_infer_request()
        out = req.infer([np.ascontiguousarray(x)], share_inputs=True)
        return np.array(out[0], dtype=np.float32, copy=True)  # the request reuses its output buffer


# ---------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------
def convert_onnx(
    model: str,
    towers: dict[str, Any],
    examples: dict[str, Any],
    precision: str,
    folder: Path,
    step: Callable,
    calibration: dict[str, list[np.ndarray]] | None = None,  # dynamic quantisation needs none
) -> dict[str, Any]:
    import torch

    for tower in TOWERS:
        step(f"{tower} tower: exporting to ONNX")
        name = INPUTS[tower]
        axes = {0: "batch"} if tower == "image" else {0: "batch", 1: "tokens"}
        out = folder / (f"{tower}.fp32.onnx" if precision == "int8" else f"{tower}.onnx")
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    towers[tower],
                    (examples[tower],),
                    str(out),
                    input_names=[name],
                    output_names=["embeds"],
                    dynamic_axes={name: axes, "embeds": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
        except Exception as e:
            raise conversion_error(model, "onnx", tower, e) from e
        if precision == "int8":
            step(f"{tower} tower: int8 dynamic quantisation")
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # MatMul only: quantising the embedding Gather too was measured to wreck a small text tower.
            # The first transformer layer and the final projection stay fp32 (measured on the shipped tiny
            # model's image tower: worst cosine 0.9984 -> 0.9992, mean 0.99987 -> 0.99994).
            with _quiet_root_logger():
                quantize_dynamic(
                    str(out),
                    str(folder / f"{tower}.onnx"),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    op_types_to_quantize=["MatMul"],
                    nodes_to_exclude=_int8_sensitive_matmuls(out),
                )
            out.unlink()
    return {}


def load_onnx(
    folder: Path, precision: str, threads: int, streams: int, lazy: tuple[str, ...] = ()
) -> dict[str, Runner]:
    import onnxruntime as ort

    # a lazy tower's file is opened now and read on its first call, so the cache entry may change or go meanwhile
    files = {t: open(folder / f"{t}.onnx", "rb") for t in TOWERS}  # noqa: SIM115 (closed once read)

    def session(tower: str) -> Runner:
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(0, threads)  # 0: ONNX Runtime's default (every core)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        with files.pop(tower) as f:
            data = f.read()
        sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        return _ORTRunner(sess, INPUTS[tower])

    return {t: _LazyRunner(session, t) if t in lazy else session(t) for t in TOWERS}


class _ORTRunner:
    def __init__(self, sess: Any, name: str):
        self.sess = sess
        self.name = name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.sess.run(None, {self.name: np.ascontiguousarray(x)})[0], dtype=np.float32)


_FIRST_LAYER = re.compile(r"(?:layers|resblocks|layer|blocks)\.0/")


def _int8_sensitive_matmuls(path: Path) -> list[str]:
    """The MatMuls of the first transformer layer and the last MatMul (the projection) of an exported tower."""
    import onnx

    names = [
        n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMul"
    ]
    keep = [n for n in names if _FIRST_LAYER.search(n)]
    return keep + names[-1:]


@contextlib.contextmanager
def _keep_root_logger() -> Iterator[None]:
    """ov.convert_model sets the root logger to ERROR and, when the conversion fails, leaves it so, which would
    silence every later log line (the fallback's included)."""
    root = logging.getLogger()
    state = (root.level, list(root.filters), list(root.handlers))
    try:
        yield
    finally:
        root.setLevel(state[0])
        root.filters = state[1]
        root.handlers = state[2]


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ONNX Runtime's quantiser logs one INFO line per tensor on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


CONVERTERS = {"openvino": convert_openvino, "onnx": convert_onnx}
LOADERS = {"openvino": load_openvino, "onnx": load_onnx}


def library_versions(backend: str, precision: str) -> dict[str, str]:
    import torch
    import transformers

    v = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    if backend == "openvino":
        import openvino

        v["openvino"] = openvino.__version__.split("-")[0]
        if precision == "int8":
            import nncf

            v["nncf"] = nncf.__version__
            v["int8_dot"] = "vnni" if cpu_int8_dot() else "avx2"  # the overflow fix differs (above)
    else:
        import onnx
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
        v["onnx"] = onnx.__version__
    return v
