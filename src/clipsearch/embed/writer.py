"""Write embedding parts and the manifest (docs/formats.md section 2).

A part is `img_emb/N.npy`, `text_emb/N.npy` and `metadata/N.parquet`, row-aligned, each written under a
temporary name and renamed; `stats/N.json` comes last and marks the part complete.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch import storage
from clipsearch.errors import OutputExistsError

logger = logging.getLogger(__name__)

SUBFOLDERS = ("img_emb", "text_emb", "metadata", "stats")
OURS = {*SUBFOLDERS, "manifest.json"}
FIRST_COLUMNS = ("key", "url", "caption")
#: documented types of the download-metadata columns (docs/formats.md section 1)
KNOWN_TYPES: dict[str, pa.DataType] = {
    "key": pa.string(),
    "url": pa.string(),
    "caption": pa.string(),
    "status": pa.string(),
    "error_message": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
    "sha256": pa.string(),
    "url_hash": pa.string(),
    "exif": pa.string(),
}


def part_paths(output_folder: str, name: str) -> dict[str, str]:
    return {
        "img_emb": storage.join(output_folder, "img_emb", f"{name}.npy"),
        "text_emb": storage.join(output_folder, "text_emb", f"{name}.npy"),
        "metadata": storage.join(output_folder, "metadata", f"{name}.parquet"),
        "stats": storage.join(output_folder, "stats", f"{name}.json"),
    }


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def metadata_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> a table with `key`, `url`, `caption` first, then every other column in first-seen order.

    Columns with documented types get them; a column that is null in every row becomes string (so parts
    concatenate); other types are inferred.
    """
    cols: list[str] = list(FIRST_COLUMNS)
    seen = set(cols)
    for r in rows:
        for c in r:
            if c not in seen:
                seen.add(c)
                cols.append(c)
    arrays = []
    fields = []
    for c in cols:
        values = [r.get(c) for r in rows]
        typ = KNOWN_TYPES.get(c)
        try:
            arr = pa.array(values, type=typ) if typ is not None else pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arr = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        if pa.types.is_null(arr.type):
            arr = arr.cast(pa.string())
        arrays.append(arr)
        fields.append(pa.field(c, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def make_folders(output_folder: str, *, image: bool, text: bool) -> None:
    """The output's subfolders; a disabled modality gets none (readers take an empty folder for a modality)."""
    skip = ({"img_emb"} if not image else set()) | ({"text_emb"} if not text else set())
    for sub in SUBFOLDERS:
        if sub not in skip:
            storage.makedirs(storage.join(output_folder, sub))


def write_part(
    output_folder: str,
    name: str,
    img: np.ndarray | None,
    text: np.ndarray | None,
    rows: list[dict[str, Any]],
    stats: dict[str, Any],
) -> None:
    """Write one part; every file atomically, the stats file last."""
    n = len(rows)
    for arr in (img, text):
        if arr is not None and arr.shape[0] != n:  # pragma: no cover - a bug, never bad input
            raise RuntimeError(f"part {name}: {arr.shape[0]} embeddings for {n} metadata rows")
    paths = part_paths(output_folder, name)
    # a unit may run where embed() never ran (a Spark executor's local disk)
    make_folders(output_folder, image=img is not None, text=text is not None)
    if img is not None:
        storage.write_bytes_atomic(paths["img_emb"], _npy_bytes(img.astype(np.float16)))
    if text is not None:
        storage.write_bytes_atomic(paths["text_emb"], _npy_bytes(text.astype(np.float16)))
    buf = io.BytesIO()
    pq.write_table(metadata_table(rows), buf)
    storage.write_bytes_atomic(paths["metadata"], buf.getvalue())
    storage.write_json_atomic(paths["stats"], stats)


def read_part_stats(output_folder: str) -> list[dict[str, Any]]:
    """The stats of every finished part, in part order."""
    out = []
    for path in storage.listdir(storage.join(output_folder, "stats"), ".json"):
        if path.rsplit("/", 1)[-1].startswith("."):
            continue
        try:
            out.append(storage.read_json(path))
        except Exception as e:  # a corrupt stats file means an unfinished part: redo it
            logger.warning("ignoring unreadable %s: %s", path, e)
    return sorted(out, key=lambda s: s["part"])


def check_output_folder(output_folder: str, model: str, modalities: list[str]) -> bool:
    """Refuse a folder that holds anything but our own earlier output for the same model and modalities.

    Returns True when there is earlier output to resume.
    """
    state = storage.folder_state(output_folder)
    if state != "nonempty":
        return False
    fs, p = storage.get_fs(output_folder)
    if not fs.isdir(p):
        raise OutputExistsError(f"output folder {output_folder} is a file", hint="--output-folder")
    names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(p, detail=False)}
    foreign = sorted(n for n in names if n not in OURS and not n.startswith("."))
    if foreign:
        raise OutputExistsError(
            f"output folder {output_folder} exists and holds other files ({', '.join(foreign[:3])}); "
            "refusing to write into it",
            hint="--output-folder pointing to a new or empty folder, or an earlier embed output to resume",
        )
    previous: dict[str, Any] | None = None
    manifest = storage.join(output_folder, "manifest.json")
    if storage.exists(manifest):
        previous = storage.read_json(manifest)
    else:
        parts = read_part_stats(output_folder)
        previous = parts[0] if parts else None
    if previous is not None:
        if previous.get("model") != model:
            raise OutputExistsError(
                f"output folder {output_folder} holds embeddings of model {previous.get('model')!r}, "
                f"not {model!r}; refusing to mix them",
                hint="--output-folder pointing to a new folder, or --clip-model "
                + str(previous.get("model")),
            )
        prev_mod = previous.get("modalities")
        if prev_mod is not None and sorted(prev_mod) != sorted(modalities):
            raise OutputExistsError(
                f"output folder {output_folder} holds {'+'.join(prev_mod)} embeddings, this run makes "
                f"{'+'.join(modalities)}",
                hint="--output-folder pointing to a new folder, or the same --enable-text/--enable-image",
            )
    return True


def write_manifest(
    output_folder: str, model: str, dim: int, modalities: list[str], encoder: dict[str, Any] | None = None
) -> dict[str, Any]:
    parts = read_part_stats(output_folder)
    manifest = {
        "format": "clipsearch.embeddings",
        "version": 1,
        "model": model,
        "dim": dim,
        "dtype": "float16",
        "normalized": True,
        "modalities": modalities,
        "parts": [{"name": s["part"], "rows": s["rows"], "inputs": s.get("inputs", [])} for s in parts],
        "total_rows": sum(int(s["rows"]) for s in parts),
    }
    if encoder:
        manifest["encoder"] = encoder  # what ran the model (backend, precision) and why
    storage.write_json_atomic(storage.join(output_folder, "manifest.json"), manifest)
    return manifest
