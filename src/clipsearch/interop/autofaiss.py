"""autofaiss output: one faiss index file plus the ids parquet that maps each faiss id to its row.

`autofaiss.build_index(embeddings=..., index_path=..., index_infos_path=..., id_columns=[...],
ids_path=...)` writes:

    knn.index (any name)      the faiss index; autofaiss sets its tuned nprobe/efSearch before saving
    index_infos.json          index_key, index_param ("nprobe=..,efSearch=..,ht=.."), metrics
    ids_path/part-XXXXXXXX-UUID.parquet
                              one row per vector: the id columns (e.g. `url`) and `i`, its faiss id;
                              rows need not be in id order

Fondant's Datacomp-12M index on the Hub (`datasets/fondant-ai/datacomp-small-clip`) is this layout:
`faiss` (the index file), `id_mapping/` (the ids parquet, columns `url` and `i`) and `data/` (the
embedded dataset, not needed to serve).
"""

from __future__ import annotations

import logging

from clipsearch import storage
from clipsearch.errors import InputError
from clipsearch.interop.common import ForeignIndex, Plan, find_files, kind_of, list_entries, read_json_or_none
from clipsearch.interop.faissio import read_header
from clipsearch.interop.metadata import ConcatSource, IdsParquetSource, MetadataSource, _file_schema

logger = logging.getLogger(__name__)

LAYOUT = "autofaiss"
#: index file names autofaiss users and Fondant use, besides any *.index
INDEX_NAMES = ("faiss", "knn.index", "populated.index")
#: ids folders: autofaiss' ids_path as Fondant and the autofaiss docs name it
IDS_DIRS = ("id_mapping", "ids", "id_mappings", "ids_path")
INFOS_NAMES = ("index_infos.json", "infos.json")


def _index_candidates(entries: dict[str, str]) -> list[str]:
    return sorted(n for n, k in entries.items() if k == "file" and (n.endswith(".index") or n in INDEX_NAMES))


def looks_like(path: str, entries: dict[str, str] | None = None) -> bool:
    if kind_of(path) == "file":
        try:
            read_header(path)
            return True
        except InputError:
            return False
    entries = list_entries(path) if entries is None else entries
    return bool(_index_candidates(entries)) and any(entries.get(d) == "directory" for d in IDS_DIRS)


def _ids_files(path: str) -> list[str]:
    kind = kind_of(path)
    if kind == "file":
        return [path]
    if kind == "missing":
        raise InputError(f"ids parquet {path} does not exist", hint="--id-mapping PATH")
    files = find_files(path, (".parquet",)) or find_files(path, (".parquet",), recursive=True)
    if not files:
        raise InputError(
            f"{path} holds no .parquet files", hint="--id-mapping must be autofaiss' ids_path folder"
        )
    return files


def metadata_source(
    files: list[str], url_column: str | None, caption_column: str | None, notes: list[str]
) -> MetadataSource:
    with_i = [f for f in files if "i" in _file_schema(f).names]
    if with_i and len(with_i) != len(files):
        missing = [f for f in files if f not in with_i]
        raise InputError(
            f"{len(missing)} of {len(files)} ids parquet files have no 'i' (faiss id) column, e.g. {missing[0]}",
            hint="--id-mapping must hold only the ids parquet files autofaiss wrote",
        )
    if with_i:
        return IdsParquetSource(files, url_column=url_column, caption_column=caption_column)
    notes.append(
        "the ids parquet has no 'i' column: its rows, in file-name order, are taken as faiss ids 0..n-1"
    )
    return ConcatSource(files, url_column=url_column, caption_column=caption_column)


def plan(
    source: str,
    *,
    id_mapping: str | None = None,
    modality: str = "image",
    url_column: str | None = None,
    caption_column: str | None = None,
) -> Plan:
    notes: list[str] = []
    kind = kind_of(source)
    if kind == "missing":
        raise InputError(f"{source} does not exist", hint="--source PATH")
    if kind == "file":
        index_path = source
        folder = source.rsplit("/", 1)[0] if "/" in source else "."
        entries = list_entries(folder)
    else:
        folder = source
        entries = list_entries(folder)
        candidates = _index_candidates(entries)
        if not candidates:
            raise InputError(
                f"{folder} is not an autofaiss output folder: no faiss index file (*.index or 'faiss') in it "
                f"(found: {', '.join(sorted(entries)) or 'nothing'})",
                hint="--source FOLDER_OR_INDEX_FILE",
            )
        if len(candidates) > 1:
            raise InputError(
                f"{folder} holds several index files ({', '.join(candidates)}); say which one to import",
                hint=f"--source {storage.join(folder, candidates[0])}",
            )
        index_path = storage.join(folder, candidates[0])
    stem = index_path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    infos, infos_path = None, None
    for name in (*INFOS_NAMES, f"{stem}.json", f"{stem}_infos.json"):
        if entries.get(name) == "file":
            infos_path = storage.join(folder, name)
            infos = read_json_or_none(infos_path)
            if infos is not None:
                break
            infos_path = None
    if id_mapping is None:
        for d in IDS_DIRS:
            if entries.get(d) == "directory":
                id_mapping = storage.join(folder, d)
                notes.append(f"ids parquet found in {d}/")
                break
    if id_mapping is None:
        raise InputError(
            f"no ids parquet for {index_path}: autofaiss writes it when given id_columns=[...] and ids_path=...; "
            f"looked for {', '.join(d + '/' for d in IDS_DIRS)} next to the index",
            hint="--id-mapping PATH (a parquet file or folder with the 'i' column and the id columns)",
        )
    files = _ids_files(id_mapping)
    metadata = metadata_source(files, url_column, caption_column, notes)
    indices = {modality: ForeignIndex(modality, index_path, infos, infos_path)}
    return Plan(LAYOUT, source, indices, metadata, notes=notes)
