"""Multilingual text encoders whose output lives in an image CLIP's space (queries in many languages).

    enc = load_text_encoder("M-CLIP/XLM-Roberta-Large-Vit-B-32")   # or a folder, or clipsearch-tiny-multilingual
    enc.encode_text(["un cercle rouge", "红色的圆形"])                # float32 [2, dim], L2-normalised

Three layouts load:
- **M-CLIP** (`config.json` with `model_type: "M-CLIP"`, as `M-CLIP/XLM-Roberta-Large-Vit-B-32`): a
  transformers text model (`transformer.*` weights, architecture from `modelBase`) whose token states are
  mean-pooled under the attention mask, then a linear projection (`LinearTransformation`) into the CLIP space.
  The base architecture comes from `transformerConfig` inside config.json when present (clipsearch's shipped
  tiny encoder, so it loads offline), else from a `modelBase` folder beside the model, else from the hub.
- **sentence-transformers** (`modules.json`: Transformer, Pooling, Dense[, Normalize]), as
  `sentence-transformers/clip-ViT-B-32-multilingual-v1`.
- **multilingual CLIP models** that transformers or open_clip load (SigLIP multilingual,
  `open_clip:xlm-roberta-base-ViT-B-32/laion5b_s13b_b90k`, ...): their text tower, through `load_clip`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipsearch.embed.models import (
    DEFAULT_MODEL,
    OPEN_CLIP_PREFIX,
    _hf_kwargs,
    _hub_error,
    _looks_like_path,
    _offline_env,
    _one_thread,
    resolve_device,
)
from clipsearch.errors import ModelLoadError

logger = logging.getLogger(__name__)

TINY_MULTILINGUAL = "clipsearch-tiny-multilingual"
HINT = "--multilingual-model with an M-CLIP, sentence-transformers or multilingual CLIP model, a local folder, or clipsearch-tiny-multilingual"


def tiny_multilingual_path() -> Path:
    import clipsearch

    return Path(clipsearch.__file__).resolve().parent / "demo" / "tiny_multilingual"


class TextEncoder:
    """A text tower: `.name`, `.dim`, `.encode_text(texts)` -> L2-normalised float32 [n, dim]."""

    def __init__(self, name: str, kind: str, fn: Callable[[list[str]], torch.Tensor], device: str = "cpu"):
        self.name = name
        self.kind = kind  # m-clip | sentence-transformers | clip
        self.device = device
        self._fn = fn
        self.dim = int(self.encode_text([""]).shape[1])

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, {self.kind}, dim={self.dim})"

    def encode_text(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        texts = ["" if t is None else str(t) for t in texts]
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        out = []
        for i in range(0, len(texts), batch_size):
            with torch.inference_mode(), _one_thread():
                feats = self._fn(texts[i : i + batch_size])
            out.append(F.normalize(feats.float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32)


def _mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _read_weights(folder: Path, stem: str = "") -> dict[str, torch.Tensor]:
    """model.safetensors or pytorch_model.bin of a folder (sharded safetensors too)."""
    d = folder / stem if stem else folder
    st = d / "model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        return load_file(str(st))
    index = d / "model.safetensors.index.json"
    if index.exists():
        from safetensors.torch import load_file

        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(str(d / f)))
        return out
    pt = d / "pytorch_model.bin"
    if pt.exists():
        return torch.load(str(pt), map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{d} has no model.safetensors or pytorch_model.bin", hint=HINT)


def _tokenizer(folder: Path | str, name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), **_hf_kwargs(str(folder)))
    except Exception as e:
        raise ModelLoadError(f"could not load the tokenizer of {name!r}: {e}", hint=HINT) from e


def _max_len(tokenizer: Any, config: Any) -> int:
    n = int(getattr(config, "max_position_embeddings", 512) or 512)
    if getattr(config, "model_type", "") in ("xlm-roberta", "roberta", "camembert"):
        n -= 2  # RoBERTa's positions start after the padding index
    tok_max = getattr(tokenizer, "model_max_length", n) or n
    return int(min(n, tok_max if tok_max < 1_000_000 else n))


def _load_mclip(folder: Path, name: str, device: str) -> TextEncoder:
    from transformers import AutoConfig, AutoModel

    cfg = json.loads((folder / "config.json").read_text())
    try:
        in_dim, out_dim = int(cfg["transformerDimensions"]), int(cfg["numDims"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(
            f"{name!r}: an M-CLIP config.json needs transformerDimensions and numDims", hint=HINT
        ) from e
    if isinstance(cfg.get("transformerConfig"), dict):
        tc = dict(cfg["transformerConfig"])
        tconf = AutoConfig.for_model(tc.pop("model_type"), **tc)
    else:
        base = str(cfg.get("modelBase") or "")
        if not base:
            raise ModelLoadError(f"{name!r}: an M-CLIP config.json needs modelBase", hint=HINT)
        local = folder / base
        src = str(local) if local.is_dir() else base
        try:
            tconf = AutoConfig.from_pretrained(src, **_hf_kwargs(src))
        except Exception as e:
            raise _hub_error(base, e) from e
    transformer = AutoModel.from_config(tconf)
    state = _read_weights(folder)
    sub = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
    missing, unexpected = transformer.load_state_dict(sub, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.") and not k.endswith("position_ids")]
    if missing or not sub:
        raise ModelLoadError(
            f"{name!r}: the weights do not fit its {tconf.model_type} base (missing {missing[:3] or 'transformer.*'})",
            hint=HINT,
        )
    linear = torch.nn.Linear(in_dim, out_dim)
    try:
        linear.load_state_dict(
            {"weight": state["LinearTransformation.weight"], "bias": state["LinearTransformation.bias"]}
        )
    except (KeyError, RuntimeError) as e:
        raise ModelLoadError(
            f"{name!r}: no LinearTransformation of shape [{out_dim}, {in_dim}] ({e})", hint=HINT
        ) from e
    transformer.eval().to(device)
    linear.eval().to(device)
    tokenizer = _tokenizer(folder, name)
    max_len = _max_len(tokenizer, tconf)

    def fn(texts: list[str]) -> torch.Tensor:
        tok = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        mask = tok["attention_mask"].to(device)
        states = transformer(input_ids=tok["input_ids"].to(device), attention_mask=mask)[0]
        return linear(_mean_pool(states, mask))

    return TextEncoder(name, "m-clip", fn, device)


_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": torch.nn.Identity,
    "torch.nn.modules.activation.Tanh": torch.nn.Tanh,
}


def _load_sentence_transformers(folder: Path, name: str, device: str) -> TextEncoder:
    from transformers import AutoModel

    modules = json.loads((folder / "modules.json").read_text())
    steps: list[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = []
    tokenizer = None
    transformer = None
    max_len = 512
    for m in sorted(modules, key=lambda m: int(m.get("idx", 0))):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        sub = folder / str(m.get("path", ""))
        if kind == "Transformer":
            try:
                transformer = AutoModel.from_pretrained(str(sub), **_hf_kwargs(str(sub))).eval().to(device)
            except Exception as e:
                raise ModelLoadError(f"{name!r}: its Transformer module does not load: {e}", hint=HINT) from e
            tokenizer = _tokenizer(sub, name)
            st_cfg = sub / "sentence_bert_config.json"
            if st_cfg.exists():
                max_len = int(json.loads(st_cfg.read_text()).get("max_seq_length") or max_len)
            max_len = min(max_len, _max_len(tokenizer, transformer.config))
        elif kind == "Pooling":
            pc = json.loads((sub / "config.json").read_text())
            if pc.get("pooling_mode_mean_tokens"):
                steps.append(lambda f: {**f, "emb": _mean_pool(f["states"], f["mask"])})
            elif pc.get("pooling_mode_cls_token"):
                steps.append(lambda f: {**f, "emb": f["states"][:, 0]})
            else:
                raise ModelLoadError(f"{name!r}: pooling {pc} is not supported (mean or cls)", hint=HINT)
        elif kind == "Dense":
            dc = json.loads((sub / "config.json").read_text())
            layer = torch.nn.Linear(
                int(dc["in_features"]), int(dc["out_features"]), bias=bool(dc.get("bias", True))
            )
            w = _read_weights(sub)
            layer.load_state_dict({k.removeprefix("linear."): v for k, v in w.items()})
            act_name = str(dc.get("activation_function", "torch.nn.modules.linear.Identity"))
            if act_name not in _ACTIVATIONS:
                raise ModelLoadError(f"{name!r}: Dense activation {act_name} is not supported", hint=HINT)
            act = _ACTIVATIONS[act_name]()
            layer.eval().to(device)
            steps.append(lambda f, layer=layer, act=act: {**f, "emb": act(layer(f["emb"]))})
        elif kind == "Normalize":
            continue  # every encoder's output is normalised
        else:
            raise ModelLoadError(f"{name!r}: sentence-transformers module {kind} is not supported", hint=HINT)
    if transformer is None or tokenizer is None:
        raise ModelLoadError(f"{name!r}: modules.json names no Transformer module", hint=HINT)

    def fn(texts: list[str]) -> torch.Tensor:
        tok = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        mask = tok["attention_mask"].to(device)
        states = transformer(input_ids=tok["input_ids"].to(device), attention_mask=mask)[0]
        feats: dict[str, torch.Tensor] = {"states": states, "mask": mask}
        for step in steps:
            feats = step(feats)
        return feats["emb"]

    return TextEncoder(name, "sentence-transformers", fn, device)


def _folder_of(name: str) -> Path | None:
    """The local folder holding `name`: itself, the shipped tiny encoder, or a hub snapshot of an M-CLIP or
    sentence-transformers repository. None: a model for `load_clip` (CLIP, SigLIP, open_clip)."""
    if name == TINY_MULTILINGUAL:
        p = tiny_multilingual_path()
        if not (p / "config.json").exists():
            raise ModelLoadError(f"the shipped tiny multilingual encoder is missing from {p}", hint=HINT)
        return p
    if name.startswith(OPEN_CLIP_PREFIX) or name == DEFAULT_MODEL:
        return None  # load_clip knows them (the shipped tiny CLIP needs no hub look-up)
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise ModelLoadError(f"{name} is a file, not a model folder", hint=HINT)
    if _looks_like_path(name):
        raise ModelLoadError(f"multilingual model folder {name!r} does not exist", hint=HINT)
    from transformers.utils import cached_file

    kw = {"local_files_only": True} if _offline_env() else {}
    try:
        cfg = cached_file(name, "config.json", **kw, _raise_exceptions_for_missing_entries=False)
        mods = cached_file(name, "modules.json", **kw, _raise_exceptions_for_missing_entries=False)
    except Exception as e:
        raise _hub_error(name, e) from e
    kind = None
    if cfg and json.loads(Path(cfg).read_text()).get("model_type") == "M-CLIP":
        kind = "m-clip"
    elif mods:
        kind = "sentence-transformers"
    if kind is None:
        if cfg is None:
            raise ModelLoadError(f"multilingual model {name!r} was not found (no config.json)", hint=HINT)
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name,
                local_files_only=bool(kw),
                allow_patterns=[
                    "*.json",
                    "*.txt",
                    "*.model",
                    "*.safetensors",
                    "*pytorch_model.bin",
                    "*/*.json",
                ],
            )
        )
    except Exception as e:
        raise _hub_error(name, e) from e


def load_text_encoder(name_or_path: str, device: str = "cpu") -> TextEncoder | Any:
    """Load a multilingual text encoder. Raises ModelLoadError (saying why) before any request is served."""
    dev = resolve_device(device)
    folder = _folder_of(name_or_path)
    if folder is not None and (folder / "config.json").exists():
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{folder}/config.json is not valid JSON: {e}", hint=HINT) from e
        if model_type == "M-CLIP":
            enc = _load_mclip(folder, name_or_path, dev)
            logger.info("loaded multilingual text encoder %s (M-CLIP), dim %d", name_or_path, enc.dim)
            return enc
    if folder is not None and (folder / "modules.json").exists():
        enc = _load_sentence_transformers(folder, name_or_path, dev)
        logger.info(
            "loaded multilingual text encoder %s (sentence-transformers), dim %d", name_or_path, enc.dim
        )
        return enc
    from clipsearch.embed.models import load_clip

    try:
        clip = load_clip(str(folder) if folder is not None else name_or_path, device=dev, backend="torch")
    except ModelLoadError as e:
        raise ModelLoadError(
            f"{name_or_path!r} is neither an M-CLIP, a sentence-transformers nor a CLIP model: {e}", hint=HINT
        ) from e
    enc = TextEncoder(name_or_path, "clip", clip.text_features, dev)
    logger.info(
        "loaded multilingual text encoder %s (text tower of %s), dim %d",
        name_or_path,
        clip.model_type,
        enc.dim,
    )
    return enc
