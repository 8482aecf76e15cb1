"""What a foreign index folder holds once recognised (`Plan`), and the listing helpers the layouts share."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from clipsearch import storage
from clipsearch.interop.metadata import MetadataSource

logger = logging.getLogger(__name__)

#: clip-retrieval / all_clip model names -> the name clipsearch's load_clip takes
OPENAI_CLIP_NAMES: dict[str, str] = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
#: open_clip pretrained tags whose weights are also published as Hugging Face CLIP models
OPEN_CLIP_HF: dict[str, str] = {
    "ViT-B-32/laion2b_s34b_b79k": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    "ViT-L-14/laion2b_s32b_b82k": "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
    "ViT-H-14/laion2b_s32b_b79k": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "ViT-g-14/laion2b_s34b_b88k": "laion/CLIP-ViT-g-14-laion2B-s34B-b88K",
    "ViT-bigG-14/laion2b_s39b_b160k": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
}


def model_from_clip_retrieval(name: str | None) -> str | None:
    """clip-retrieval's `clip_model` value ("ViT-B/32", "open_clip:ViT-B-32/laion2b_s34b_b79k",
    "hf_clip:org/name") as a clipsearch model name."""
    if not name:
        return None
    if name in OPENAI_CLIP_NAMES:
        return OPENAI_CLIP_NAMES[name]
    if name.startswith("hf_clip:"):
        return name.split(":", 1)[1]
    if name.startswith("open_clip:"):
        spec = name.split(":", 1)[1]
        return OPEN_CLIP_HF.get(spec, name)
    return name


@dataclass
class ForeignIndex:
    """One faiss index of the source: its file and, for on-disk inverted lists, the folder of its .ivfdata."""

    modality: str  # "image" or "text"
    path: str  # the faiss index file
    infos: dict[str, Any] | None = None  # autofaiss' index_infos json (index_key, index_param, metrics)
    infos_path: str | None = None


@dataclass
class Plan:
    """A recognised foreign index: what to copy, how to rebuild the metadata, which model it records."""

    layout: str  # "clip-retrieval" | "autofaiss"
    source: str
    indices: dict[str, ForeignIndex]
    metadata: MetadataSource
    model: str | None = None  # the model the source records, if any
    model_origin: str | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layout": self.layout,
            "path": self.source,
            "index_files": {m: fi.path for m, fi in self.indices.items()},
            "metadata": self.metadata.describe(),
        }
        infos = {m: fi.infos for m, fi in self.indices.items() if fi.infos}
        if infos:
            out["index_infos"] = infos
        if self.model_origin:
            out["model_recorded_in"] = self.model_origin
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def list_entries(path: str) -> dict[str, str]:
    """{name: "file" | "directory"} of the entries directly in folder `path` (any fsspec URL)."""
    fs, p = storage.get_fs(path)
    try:
        entries = fs.ls(p, detail=True)
    except FileNotFoundError:
        return {}
    out: dict[str, str] = {}
    for e in entries:
        name = str(e["name"]).rstrip("/").rsplit("/", 1)[-1]
        if name and not name.startswith("."):
            out[name] = "directory" if e.get("type") == "directory" else "file"
    return out


def find_files(path: str, suffixes: tuple[str, ...], recursive: bool = False) -> list[str]:
    """Files under folder `path` ending with one of `suffixes`, sorted by path (full fsspec URLs)."""
    fs, p = storage.get_fs(path)
    proto = path.split("://", 1)[0] + "://" if "://" in path else ""
    try:
        names = (
            fs.find(p)
            if recursive
            else [e["name"] for e in fs.ls(p, detail=True) if e.get("type") != "directory"]
        )
    except FileNotFoundError:
        return []
    base = p.rstrip("/")
    out = []
    for n in names:
        rel = str(n)[len(base) :].lstrip("/") if str(n).startswith(base) else str(n).rsplit("/", 1)[-1]
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if n.endswith(suffixes):
            out.append(proto + str(n) if proto and not str(n).startswith(proto) else str(n))
    return sorted(out)


def kind_of(path: str) -> str:
    """ "file", "directory" or "missing"."""
    fs, p = storage.get_fs(path)
    try:
        if fs.isdir(p):
            return "directory"
        if fs.isfile(p):
            return "file"
    except (OSError, ValueError):
        pass
    return "missing"


def read_json_or_none(path: str) -> dict[str, Any] | None:
    try:
        data = storage.read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, json.JSONDecodeError) as e:
        logger.warning("ignoring %s: not readable JSON (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None
