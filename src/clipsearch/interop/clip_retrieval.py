"""clip-retrieval index folders, as written by `clip-retrieval index` and served by `clip-retrieval back`.

    INDEX_FOLDER/
      image.index      autofaiss-built faiss index of the image embeddings (or a folder holding
                       populated.index + *.ivfdata: the on-disk layout of the LAION indices)
      image.json       autofaiss' index_infos (index_key, index_param, metrics), when built by clip-retrieval
      text.index       the same over the caption embeddings (optional)
      text.json
      metadata/        metadata_00.parquet ...: concatenated in file-name order, row i = faiss id i
                       (or *.arrow files for `clip-retrieval back --use_arrow`)

`--source` may also be the JSON file given to `clip-retrieval back --indices-paths`, which names the
folder and, optionally, the `clip_model` it serves with.
"""

from __future__ import annotations

import logging
from typing import Any

from clipsearch import storage
from clipsearch.errors import ConfigError, InputError
from clipsearch.interop.common import (
    ForeignIndex,
    Plan,
    find_files,
    kind_of,
    list_entries,
    model_from_clip_retrieval,
    read_json_or_none,
)
from clipsearch.interop.metadata import ConcatSource

logger = logging.getLogger(__name__)

LAYOUT = "clip-retrieval"
MODALITIES = ("image", "text")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")


def looks_like(path: str, entries: dict[str, str] | None = None) -> bool:
    if path.endswith(".json"):
        return _read_back_config(path) is not None
    entries = list_entries(path) if entries is None else entries
    has_index = any(f"{m}.index" in entries for m in MODALITIES)
    return has_index and entries.get("metadata") == "directory"


def _read_back_config(path: str) -> dict[str, Any] | None:
    data = read_json_or_none(path)
    if not data or data.get("format") == "clipsearch.index":
        return None
    ok = all(isinstance(v, str) or (isinstance(v, dict) and "indice_folder" in v) for v in data.values())
    return data if ok and data else None


def resolve_back_config(path: str, indice_name: str | None) -> tuple[str, str | None, str]:
    """(index folder, clip_model or None, entry name) from a `clip-retrieval back` indices-paths JSON."""
    data = _read_back_config(path)
    if data is None:
        raise InputError(
            f"{path} is not a clip-retrieval back config: it should map index names to folders",
            hint='--source INDEX_FOLDER, or a JSON like {"laion5B": {"indice_folder": "...", "clip_model": "ViT-L/14"}}',
        )
    if indice_name is None:
        if len(data) > 1:
            raise ConfigError(
                f"{path} lists {len(data)} indices ({', '.join(data)}); say which one to import",
                hint="--indice-name NAME",
            )
        indice_name = next(iter(data))
    if indice_name not in data:
        raise ConfigError(
            f"{path} has no index named {indice_name!r} (it has {', '.join(data)})", hint="--indice-name NAME"
        )
    entry = data[indice_name]
    folder = entry if isinstance(entry, str) else entry["indice_folder"]
    model = None if isinstance(entry, str) else entry.get("clip_model")
    if "://" not in folder and "://" in path:  # a relative folder next to a remote config
        folder = storage.join(path.rsplit("/", 1)[0], folder)
    return folder, model, indice_name


def plan(
    source: str,
    *,
    indice_name: str | None = None,
    modalities: tuple[str, ...] = MODALITIES,
    url_column: str | None = None,
    caption_column: str | None = None,
) -> Plan:
    model: str | None = None
    origin: str | None = None
    notes: list[str] = []
    folder = source
    if source.endswith(".json") and kind_of(source) == "file":
        folder, raw_model, name = resolve_back_config(source, indice_name)
        if raw_model:
            model = model_from_clip_retrieval(raw_model)
            origin = f"{source} [{name}].clip_model = {raw_model!r}"
            if model != raw_model:
                notes.append(f"clip-retrieval model {raw_model!r} is {model!r} for clipsearch")
    entries = list_entries(folder)
    if not entries:
        raise InputError(
            f"clip-retrieval index folder {folder} does not exist or is empty", hint="--source INDEX_FOLDER"
        )
    indices: dict[str, ForeignIndex] = {}
    for m in modalities:
        name = f"{m}.index"
        if name not in entries:
            continue
        path = storage.join(folder, name)
        if entries[name] == "directory":  # the on-disk layout: image.index/populated.index + merged ivfdata
            inner = storage.join(path, "populated.index")
            if kind_of(inner) != "file":
                raise InputError(
                    f"{path} is a folder but holds no populated.index (clip-retrieval's on-disk index layout)"
                )
            path = inner
            notes.append(f"{m}: on-disk index {name}/populated.index (+ .ivfdata)")
        infos_path = storage.join(folder, f"{m}.json")
        infos = read_json_or_none(infos_path) if f"{m}.json" in entries else None
        indices[m] = ForeignIndex(m, path, infos, infos_path if infos else None)
    if not indices:
        raise InputError(
            f"{folder} is not a clip-retrieval index folder: it has no {' or '.join(f'{m}.index' for m in modalities)}"
            f" (found: {', '.join(sorted(entries)) or 'nothing'})",
            hint="--source must be the folder written by `clip-retrieval index`",
        )
    if entries.get("metadata") != "directory":
        raise InputError(
            f"{folder} has no metadata/ folder: clip-retrieval keeps one parquet row per faiss id there "
            f"(found: {', '.join(sorted(entries))})",
            hint="run `clip-retrieval index` with copy_metadata=True, or copy the embeddings' metadata/ folder in",
        )
    meta_dir = storage.join(folder, "metadata")
    files = find_files(meta_dir, (".parquet",))
    if not files:
        files = find_files(meta_dir, ARROW_SUFFIXES, recursive=True)
        if files:
            notes.append("metadata read from the Arrow files of `clip-retrieval back --use_arrow`")
    if not files:
        raise InputError(
            f"{meta_dir} holds no .parquet (nor .arrow) files",
            hint="copy clip-retrieval's metadata/metadata_XX.parquet files into it",
        )
    metadata = ConcatSource(files, url_column=url_column, caption_column=caption_column)
    return Plan(LAYOUT, source, indices, metadata, model=model, model_origin=origin, notes=notes)
