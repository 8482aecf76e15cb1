"""The shared CLIP loader: Hugging Face CLIP/SigLIP (transformers) and open_clip models behind one interface.

    enc = load_clip("clipsearch-tiny")            # or a hub name, a local folder, "open_clip:ViT-B-32/openai"
    enc.encode_text(["a cat"])                    # float32 [1, dim], L2-normalised
    enc.encode_images([pil_image])                # float32 [1, dim], L2-normalised

`make_preprocessor(name)` returns the model's image preprocessing as a light picklable callable, so worker
processes can decode and resize images without loading the model. Loading a local folder never touches the
network. A model that cannot be loaded raises ModelLoadError saying why (offline, wrong name, not CLIP).

`load_clip(..., backend=)` runs the same model on torch, OpenVINO or ONNX Runtime (`clipsearch.embed.backends`):
every backend gets the same tokenizer and image preprocessing from here and serves the same interface; the
converted towers are cached on disk, so only the first start converts.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipsearch.embed.preprocess import ImagePreprocessor, preprocessor_from_hf_config
from clipsearch.errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "clipsearch-tiny"
OPEN_CLIP_PREFIX = "open_clip:"
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DEVICES = ("auto", "cpu", "cuda")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def tiny_model_path() -> Path:
    """The shipped tiny CLIP (`clipsearch-tiny`): src/clipsearch/demo/tiny_clip/."""
    import clipsearch

    return Path(clipsearch.__file__).resolve().parent / "demo" / "tiny_clip"


def resolve_model(name_or_path: str) -> str:
    """`clipsearch-tiny` -> the shipped folder; an existing local folder -> its absolute path; else as given."""
    if name_or_path == DEFAULT_MODEL:
        return str(tiny_model_path())
    if name_or_path.startswith(OPEN_CLIP_PREFIX):
        return name_or_path
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p.resolve())
    return name_or_path


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.sep + os.sep in name or name.count("/") > 1


def _offline_env() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available", hint="--device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"unknown device {device!r}", hint="--device auto|cpu|cuda")
    return device


@functools.cache
def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 (or fp16) autocast on GPU; on CPU fp32 unless the CPU has AMX.

    This is the static rule (serve and query use it). On an avx512_bf16 CPU without AMX, bf16 autocast was
    measured both slower and faster than fp32 depending on torch build and load, so the embed stage
    measures instead (`runner.probe_cpu_precision`); see docs/bench-embed.md.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", hint="--precision " + "|".join(PRECISIONS))
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if _cpu_has_amx() else "fp32"


_SMALL_WORK = 2e8  # tokens x parameters below which one CPU thread beats several


@contextlib.contextmanager
def _one_thread() -> Any:
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _features(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled
    return out[0]


class ClipEncoder:
    """A loaded CLIP-like model: image and text towers that give L2-normalised float32 numpy embeddings."""

    def __init__(
        self,
        *,
        name: str,
        resolved: str,
        device: str,
        precision: str,
        preprocessor: ImagePreprocessor,
        image_fn: Callable[[torch.Tensor], torch.Tensor],
        text_fn: Callable[[list[str]], torch.Tensor],
        model: torch.nn.Module | None,
        model_type: str,
        backend: str = "torch",
        n_params: int = 0,
    ):
        self.name = name
        self.resolved = resolved
        self.device = device
        self.precision = precision
        self.preprocessor = preprocessor
        self.model = model
        self.model_type = model_type
        self.backend = backend
        #: what load_clip picked and why: backend, precision, reason, and for converted models the cache entry
        self.backend_info: dict[str, Any] = {"backend": backend, "precision": precision}
        self._image_fn = image_fn
        self._text_fn = text_fn
        #: texts -> token ids (the model's own tokenizer); hybrid search asks it which words the model knows
        self.tokenize: Callable[[list[str]], np.ndarray] | None = None
        self.precision_probe: dict[str, float] = {}  # images/s per precision, when `auto` was measured
        self.n_params = (
            sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else int(n_params)
        )
        self.dim = int(self.text_features([""]).shape[1])

    def __repr__(self) -> str:
        return (
            f"ClipEncoder({self.name!r}, dim={self.dim}, device={self.device!r}, backend={self.backend!r}, "
            f"precision={self.precision!r})"
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32" or self.backend != "torch":
            return contextlib.nullcontext()
        dev_type = "cuda" if self.device.startswith("cuda") else "cpu"
        return torch.autocast(device_type=dev_type, dtype=_DTYPES[self.precision])

    def _threads(self, work_items: int) -> contextlib.AbstractContextManager[Any]:
        """Run small CPU calls (a few short queries to a small model) on one thread.

        Several threads' synchronisation costs more than such calls themselves, and on a loaded machine it
        is 10x slower (measured: 43 vs 620 single queries/s with the tiny model). torch's thread count is
        process-wide, so this is a performance choice only, never a correctness one.
        """
        if (
            self.backend != "torch"
            or self.device != "cpu"
            or work_items * max(self.n_params, 1) > _SMALL_WORK
        ):
            return contextlib.nullcontext()
        return _one_thread()

    # -- tensors in, normalised float32 tensors out (on the model's device) ------------------------------
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] float (normalised) or uint8 (raw, normalised here on the device) -> [n, dim]."""
        if pixels.shape[0] == 0:
            return torch.zeros((0, getattr(self, "dim", 0)), dtype=torch.float32)
        cuda = self.device.startswith("cuda")
        if pixels.dtype == torch.uint8:
            pixels = self.preprocessor.normalize(pixels.to(self.device, non_blocking=cuda))
        else:
            pixels = pixels.to(self.device, non_blocking=cuda)
        if cuda:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        else:
            pixels = pixels.contiguous()
        with torch.inference_mode(), self._autocast(), self._threads(pixels.shape[0] * 50):
            feats = self._image_fn(pixels)
        return F.normalize(feats.float(), dim=-1)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        texts = ["" if t is None else str(t) for t in texts]
        if not texts:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        work = sum(len(t) for t in texts) // 3 + 2 * len(texts)  # ~tokens, without tokenising twice
        with torch.inference_mode(), self._autocast(), self._threads(work):
            feats = self._text_fn(texts)
        return F.normalize(feats.float(), dim=-1)

    # -- the public numpy interface ----------------------------------------------------------------------
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> float32 [n, 3, H, W] on CPU (the model's own size, crop, mean and std)."""
        return self.preprocessor(images)

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return self.image_features(pixels).cpu().numpy()

    def encode_images(self, images: list[Image.Image], batch_size: int = 64) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [
            self.encode_pixels(self.preprocess(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out)

    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Captions or queries -> float32 [n, dim]; batches pad to their longest text, not to 77 tokens."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [
            self.text_features(texts[i : i + batch_size]).cpu().numpy()
            for i in range(0, len(texts), batch_size)
        ]
        return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face (transformers)
# ---------------------------------------------------------------------------------------------------------
def _hf_kwargs(resolved: str) -> dict[str, Any]:
    """A local folder, or HF_HUB_OFFLINE read now (huggingface_hub reads it once, at import): no network."""
    return {"local_files_only": True} if Path(resolved).is_dir() or _offline_env() else {}


def _hub_error(name: str, e: BaseException) -> ModelLoadError:
    """Turn whatever transformers/huggingface_hub raised into a ModelLoadError that says why."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(f"{type(c).__name__}: {c}" for c in chain)
    low = text.lower()
    first = " ".join(str(e).split())[:300]
    if "repositorynotfound" in low or "not a valid model identifier" in low or "404" in low:
        return ModelLoadError(
            f"model {name!r} was not found: not a local folder and not a Hugging Face hub model ({first})",
            hint="--clip-model with a hub name like openai/clip-vit-base-patch32, a local folder, or clipsearch-tiny",
        )
    if _offline_env() or any(
        s in low
        for s in ("offline", "couldn't connect", "connection", "localentrynotfound", "name resolution")
    ):
        why = "HF_HUB_OFFLINE is set" if _offline_env() else "the hub cannot be reached (no network)"
        return ModelLoadError(
            f"model {name!r} is not in the local Hugging Face cache and {why}; "
            "download it where there is network, or check the name",
            hint="--clip-model with a local folder, or clipsearch-tiny",
        )
    if "unrecognized model" in low or "model_type" in low:
        return ModelLoadError(
            f"{name!r} is not a CLIP model transformers knows ({first})",
            hint="--clip-model with a CLIP or SigLIP model",
        )
    return ModelLoadError(f"could not load model {name!r}: {first}", hint="--clip-model")


PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _hf_preprocessor_config(resolved: str, model_type: str) -> dict[str, Any]:
    """The image processor's settings: `preprocessor_config.json`, or the `image_processor` block of
    `processor_config.json`, which is where transformers >= 5 saves them."""
    local = Path(resolved)
    if local.is_dir():
        for name in PREPROCESSOR_FILES:
            if (local / name).exists():
                return _image_processor_block(local / name)
        raise ModelLoadError(
            f"model folder {resolved} has neither preprocessor_config.json nor processor_config.json, "
            "so its image preprocessing is unknown",
            hint="--clip-model with a folder saved by CLIPModel/AutoProcessor.save_pretrained",
        )
    from transformers.utils import cached_file

    for name in PREPROCESSOR_FILES:
        try:
            f = cached_file(
                resolved, name, **_hf_kwargs(resolved), _raise_exceptions_for_missing_entries=False
            )
        except Exception as e:
            raise _hub_error(resolved, e) from e
        if f is not None:
            return _image_processor_block(Path(f))
    raise ModelLoadError(
        f"model {resolved!r} has neither preprocessor_config.json nor processor_config.json",
        hint="--clip-model",
    )


def _image_processor_block(path: Path) -> dict[str, Any]:
    cfg = json.loads(path.read_text())
    if path.name == "processor_config.json":
        if not isinstance(cfg.get("image_processor"), dict):
            raise ModelLoadError(f"{path} has no image_processor settings", hint="--clip-model")
        return cfg["image_processor"]
    return cfg


def _check_hf_source(name: str, resolved: str) -> None:
    p = Path(resolved)
    if p.is_dir():
        if not (p / "config.json").exists():
            if name == DEFAULT_MODEL:
                raise ModelLoadError(
                    f"the shipped tiny model is missing from {p} (a broken install?)",
                    hint="--clip-model with another model, or reinstall clipsearch",
                )
            raise ModelLoadError(
                f"{resolved} has no config.json: not a Hugging Face model folder",
                hint="--clip-model with a folder saved by CLIPModel.save_pretrained",
            )
        return
    if p.exists():
        raise ModelLoadError(f"{resolved} is a file, not a model folder", hint="--clip-model")
    if name == DEFAULT_MODEL:
        raise ModelLoadError(
            f"the shipped tiny model is missing from {p} (a broken install?)",
            hint="--clip-model with another model, or reinstall clipsearch",
        )
    if _looks_like_path(name):
        raise ModelLoadError(f"model folder {name!r} does not exist", hint="--clip-model")


def make_preprocessor(name_or_path: str = DEFAULT_MODEL) -> ImagePreprocessor:
    """The model's image preprocessing as a light picklable callable, without loading the model."""
    resolved = resolve_model(name_or_path)
    if resolved.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_preprocessor(resolved)
    _check_hf_source(name_or_path, resolved)
    model_type = ""
    cfg_file = Path(resolved) / "config.json"
    if cfg_file.exists():
        model_type = str(json.loads(cfg_file.read_text()).get("model_type", ""))
    return preprocessor_from_hf_config(_hf_preprocessor_config(resolved, model_type), model_type)


@dataclass
class ModelSource:
    """A model without its weights: what every backend shares (tokenizer, image preprocessing), plus how to
    load the weights as two torch towers (`load`) when torch runs it or a converter needs it."""

    name: str
    resolved: str
    model_type: str
    preprocessor: ImagePreprocessor
    #: texts -> int64 token ids [n, L] (CLIP: padded to the longest; SigLIP: to its trained length)
    tokenize: Callable[[list[str]], np.ndarray]
    load: Callable[[str], LoadedTowers]
    fingerprint: str


@dataclass
class LoadedTowers:
    model: torch.nn.Module
    image: torch.nn.Module  # normalised pixels [n, 3, H, W] -> features [n, dim]
    text: torch.nn.Module  # token ids [n, L] -> features [n, dim] (no mask: see backends/runtimes.py)
    text_fn: Callable[[list[str]], torch.Tensor]  # the torch path's own (CLIP: with the attention mask)


class _Tower(torch.nn.Module):
    def __init__(self, fn: Callable[[Any, torch.Tensor], Any], model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _features(self._fn(self.model, x))


def _folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _hf_fingerprint(resolved: str) -> str:
    """A local folder: its files' names, sizes and times. A hub model: the cached snapshot (commit)."""
    p = Path(resolved)
    if p.is_dir():
        return "dir:" + _folder_fingerprint(p)
    from transformers.utils import cached_file

    try:
        f = cached_file(resolved, "config.json", **_hf_kwargs(resolved))
    except Exception:
        return "hub:?"
    return "hub:" + (Path(f).parent.name if f else "?")


def _hf_source(name: str, resolved: str) -> ModelSource:
    from transformers import AutoConfig, AutoTokenizer

    _check_hf_source(name, resolved)
    kw = _hf_kwargs(resolved)
    try:
        config = AutoConfig.from_pretrained(resolved, **kw)
    except Exception as e:
        raise _hub_error(name, e) from e
    model_type = str(getattr(config, "model_type", "?"))
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise ModelLoadError(
            f"{name!r} is a {model_type} model, not a CLIP model: it needs an image tower and a text tower",
            hint="--clip-model with a CLIP or SigLIP model",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, **kw)
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer of {name!r}: {e}", hint="--clip-model") from e
    preprocessor = preprocessor_from_hf_config(_hf_preprocessor_config(resolved, model_type), model_type)
    max_len = int(getattr(config.text_config, "max_position_embeddings", 77) or 77)
    # SigLIP pools the last token and was trained on max_length padding without a mask: keep that exact.
    siglip = "siglip" in model_type
    tok_kw: dict[str, Any] = (
        {"padding": "max_length", "max_length": max_len, "truncation": True}
        if siglip
        else {"padding": "longest", "max_length": max_len, "truncation": True}
    )

    def tokenize(texts: list[str]) -> np.ndarray:
        return np.asarray(tokenizer(texts, return_tensors="np", **tok_kw)["input_ids"], dtype=np.int64)

    def load(device: str) -> LoadedTowers:
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(resolved, **kw)
        except Exception as e:
            raise _hub_error(name, e) from e
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ModelLoadError(
                f"{name!r} is a {model_type} model ({type(model).__name__}), not a CLIP model: "
                "it has no get_image_features/get_text_features",
                hint="--clip-model with a CLIP or SigLIP model",
            )
        model = model.eval().to(device)
        if device.startswith("cuda"):
            model = model.to(memory_format=torch.channels_last)

        def text_fn(texts: list[str]) -> torch.Tensor:
            enc = tokenizer(texts, return_tensors="pt", **tok_kw)
            ids = enc["input_ids"].to(device)
            if siglip:
                return _features(model.get_text_features(input_ids=ids))
            mask = enc["attention_mask"].to(device)
            return _features(model.get_text_features(input_ids=ids, attention_mask=mask))

        return LoadedTowers(
            model=model,
            image=_Tower(lambda m, x: m.get_image_features(pixel_values=x), model),
            text=_Tower(lambda m, x: m.get_text_features(input_ids=x), model),
            text_fn=text_fn,
        )

    return ModelSource(
        name=name,
        resolved=resolved,
        model_type=model_type,
        preprocessor=preprocessor,
        tokenize=tokenize,
        load=load,
        fingerprint=_hf_fingerprint(resolved),
    )


def _torch_encoder(src: ModelSource, device: str) -> ClipEncoder:
    towers = src.load(device)
    image = towers.image

    def image_fn(pixels: torch.Tensor) -> torch.Tensor:
        return image(pixels)

    return ClipEncoder(
        name=src.name,
        resolved=src.resolved,
        device=device,
        precision="fp32",
        preprocessor=src.preprocessor,
        image_fn=image_fn,
        text_fn=towers.text_fn,
        model=towers.model,
        model_type=src.model_type,
    )


# ---------------------------------------------------------------------------------------------------------
# open_clip (optional extra): "open_clip:ARCH/PRETRAINED", e.g. open_clip:ViT-B-32/laion2b_s34b_b79k
# ---------------------------------------------------------------------------------------------------------
def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise ModelLoadError(
            f"open_clip models need the open_clip extra ({e})",
            hint="pip install 'clipsearch[open_clip]'",
        ) from e
    return open_clip


def _split_open_clip(spec: str) -> tuple[str, str | None]:
    body = spec[len(OPEN_CLIP_PREFIX) :]
    arch, _, pretrained = body.partition("/")
    if not arch:
        raise ModelLoadError(f"bad open_clip model {spec!r}", hint="--clip-model open_clip:ARCH/PRETRAINED")
    return arch, (pretrained or None)


def _open_clip_preprocessor(spec: str) -> ImagePreprocessor:
    open_clip = _import_open_clip()
    arch, pretrained = _split_open_clip(spec)
    mcfg = open_clip.get_model_config(arch)
    if mcfg is None:
        raise ModelLoadError(
            f"open_clip has no architecture {arch!r}", hint="--clip-model open_clip:ARCH/PRETRAINED"
        )
    size = mcfg.get("vision_cfg", {}).get("image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    pcfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    mean = tuple(pcfg.get("mean") or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(pcfg.get("std") or (0.26862954, 0.26130258, 0.27577711))
    resample = 2 if pcfg.get("interpolation") == "bilinear" else 3
    if pcfg.get("resize_mode") == "squash":
        return ImagePreprocessor(mode="fixed", size=(h, w), crop=None, resample=resample, mean=mean, std=std)
    return ImagePreprocessor(
        mode="shortest_edge", size=(min(h, w),) * 2, crop=(h, w), resample=resample, mean=mean, std=std
    )


def _open_clip_source(name: str, spec: str) -> ModelSource:
    open_clip = _import_open_clip()
    arch, pretrained = _split_open_clip(spec)
    preprocessor = _open_clip_preprocessor(spec)
    tokenizer = open_clip.get_tokenizer(arch)

    def tokenize(texts: list[str]) -> np.ndarray:
        return np.asarray(tokenizer(texts).numpy(), dtype=np.int64)

    def load(device: str) -> LoadedTowers:
        try:
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
        except Exception as e:
            low = str(e).lower()
            if "unknown model" in low or "not found" in low or "invalid" in low:
                raise ModelLoadError(
                    f"open_clip cannot find {spec!r}: {e}", hint="--clip-model open_clip:ARCH/PRETRAINED"
                ) from e
            raise _hub_error(name, e) from e
        model = model.eval()
        text = _Tower(lambda m, x: m.encode_text(x), model)
        return LoadedTowers(
            model=model,
            image=_Tower(lambda m, x: m.encode_image(x), model),
            text=text,
            text_fn=lambda texts: text(tokenizer(texts).to(device)),
        )

    return ModelSource(
        name=name,
        resolved=spec,
        model_type="open_clip",
        preprocessor=preprocessor,
        tokenize=tokenize,
        load=load,
        fingerprint=f"open_clip:{getattr(open_clip, '__version__', '?')}",
    )


def model_source(name_or_path: str = DEFAULT_MODEL) -> ModelSource:
    """The model's tokenizer and preprocessing, checked, without loading its weights."""
    resolved = resolve_model(name_or_path)
    if resolved.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_source(name_or_path, resolved)
    return _hf_source(name_or_path, resolved)


def load_clip(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "cpu",
    precision: str = "auto",
    *,
    compile: bool = False,
    backend: str = "torch",
    threads: int = 0,
    streams: int = 1,
    lazy_towers: tuple[str, ...] = (),
) -> ClipEncoder:
    """Load a CLIP-like model for inference. Raises ModelLoadError (with the reason) before any work starts.

    backend: torch, openvino, onnx, or auto (the fastest installed for the device: `backends.choose_backend`).
    threads, streams: for openvino/onnx, threads per call and calls that run at once (serve's encoder
    workers); torch's threads are process-wide and set by the caller.
    lazy_towers: for openvino/onnx, towers ("image", "text") compiled on their first call instead of now
    (serve: text queries never load the image tower).
    """
    from clipsearch.embed.backends import choose_backend

    dev = resolve_device(device)
    choice = choose_backend(backend, precision, dev)
    src = model_source(name_or_path)
    if choice.backend != "torch":
        from clipsearch.embed.backends.loader import load_converted

        try:
            enc = load_converted(src, choice, threads=threads, streams=streams, lazy_towers=lazy_towers)
        except ModelLoadError as e:
            if backend != "auto":
                raise
            logger.warning("%s; backend auto falls back to torch", e.one_line())
            choice = choice.fallback(f"{choice.backend} failed: {e}")
        else:
            enc.tokenize = src.tokenize
            logger.info(
                "loaded %r (%s) with %s %s (%s), dim %d",
                name_or_path,
                enc.model_type,
                choice.backend,
                choice.precision,
                choice.reason,
                enc.dim,
            )
            return enc
    prec = resolve_precision(choice.precision, dev)
    enc = _torch_encoder(src, dev)
    enc.tokenize = src.tokenize
    enc.precision = prec
    enc.backend_info = {**choice.as_dict(), "precision": prec}
    if compile:
        try:
            enc._image_fn = torch.compile(enc._image_fn)
        except Exception as e:  # compile support varies by platform; eager still works
            logger.warning("torch.compile unavailable (%s); running eagerly", e)
    logger.info(
        "loaded %r (%s) on %s with torch %s (%s), dim %d",
        name_or_path,
        enc.model_type,
        dev,
        prec,
        choice.reason,
        enc.dim,
    )
    return enc
