"""Delete rows from a served index: mark them in the tombstones (no index file is touched).

`clipsearch delete --index-folder DIR (--key K | --url U | --ids-file F)`: the keys and URLs are
looked up in every segment's metadata, then the new tombstones and the manifest that names them are
written (one atomic rename). A running `serve` stops returning the rows at its next manifest check
(at most 0.5 s); `index --compact` drops them from the files. Ids in an ids file are the global ids
of the current generation (a compaction renumbers them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsearch.errors import ConfigError, InputError
from clipsearch.segments import layout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeleteConfig:
    index_folder: str
    keys: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(str(k) for k in self.keys))
        object.__setattr__(self, "urls", tuple(str(u) for u in self.urls))
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))
        if not self.index_folder:
            raise ConfigError("an index folder is required", hint="--index-folder")
        if not (self.keys or self.urls or self.ids):
            raise ConfigError("nothing to delete", hint="--key KEY, --url URL or --ids-file FILE")
        if any(i < 0 for i in self.ids):
            raise ConfigError("ids must be >= 0", hint="--ids-file")


def _match(folder: str, manifest: layout.Manifest, column: str, values: Sequence[str]) -> np.ndarray:
    """Global ids whose `column` is one of `values`, scanning each segment's metadata.arrow."""
    if not values:
        return np.zeros(0, np.int64)
    wanted = pa.array(list(values), pa.string())
    found = []
    for seg in manifest.segments:
        path = os.path.join(layout.segment_folder(folder, seg), "metadata.arrow")
        with pa.memory_map(path, "r") as src:
            reader = pa.ipc.open_file(src)
            if column not in reader.schema.names:
                continue
            start = 0
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                col = batch.column(batch.schema.get_field_index(column))
                if not pa.types.is_string(col.type):
                    col = col.cast(pa.string())
                hit = pc.fill_null(pc.is_in(col, value_set=wanted), False).to_numpy(zero_copy_only=False)
                found.append(np.flatnonzero(hit) + start + seg.offset)
                start += batch.num_rows
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)


def delete_rows(cfg: DeleteConfig) -> dict[str, Any]:
    """Tombstone the rows matching cfg's keys, URLs and ids. Returns what was found and deleted."""
    folder = layout.check_local_index(cfg.index_folder)
    with layout.writer_lock(folder):  # ids are resolved against the generation they are committed to
        manifest = layout.read_manifest(folder)
        dead = layout.read_tombstones(folder, manifest)
        by_key = _match(folder, manifest, "key", cfg.keys)
        by_url = _match(folder, manifest, "url", cfg.urls)
        ids = np.asarray(cfg.ids, dtype=np.int64)
        out_of_range = ids[(ids >= manifest.count)]
        ids = ids[ids < manifest.count]
        matched = np.unique(np.concatenate([by_key, by_url, ids]))
        new = np.setdiff1d(matched, dead, assume_unique=True)
        report: dict[str, Any] = {
            "matched": int(len(matched)),
            "deleted": int(len(new)),
            "already_deleted": int(len(matched) - len(new)),
            "keys_found": int(len(by_key)),
            "urls_found": int(len(by_url)),
            "ids_out_of_range": [int(i) for i in out_of_range[:20]],
        }
        if len(new) == 0:
            logger.info("delete: nothing new to delete (%s)", report)
            report["generation"] = manifest.generation
            return report
        gen = manifest.generation + 1
        all_dead = np.union1d(dead, new)
        rel = layout.write_tombstones(folder, gen, all_dead)
        layout.crash_point("delete:before-manifest")
        updated = replace(manifest, generation=gen, tombstones=rel, deleted=int(len(all_dead)))
        layout.write_manifest(folder, updated)
        layout.crash_point("delete:after-manifest")
        layout.cleanup(folder, updated)
    report["generation"] = gen
    report["total_deleted"] = int(len(all_dead))
    logger.info("deleted %d rows (%d deleted in all) -> generation %d", len(new), len(all_dead), gen)
    return report


def read_ids_file(path: str) -> list[int]:
    """Ids from a .npy array, or a text file with one id per line (or separated by commas/spaces)."""
    if not os.path.exists(path):
        raise InputError(f"ids file {path} does not exist", hint="--ids-file FILE")
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
        return [int(i) for i in np.asarray(arr).reshape(-1)]
    out = []
    with open(path) as f:
        for token in f.read().replace(",", " ").split():
            try:
                out.append(int(token))
            except ValueError:
                raise InputError(
                    f"{path}: {token!r} is not an id", hint="--ids-file with integer ids"
                ) from None
    return out


# ------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index-folder", required=True, help="the index folder (local)")
    parser.add_argument(
        "--key", action="append", default=[], metavar="K", help="delete the row with this key"
    )
    parser.add_argument(
        "--url", action="append", default=[], metavar="U", help="delete every row with this URL"
    )
    parser.add_argument(
        "--ids-file", default=None, metavar="F", help="ids to delete: .npy or text, one per line"
    )


def run(args: argparse.Namespace) -> int:
    ids: Iterable[int] = read_ids_file(args.ids_file) if args.ids_file else ()
    report = delete_rows(DeleteConfig(args.index_folder, tuple(args.key), tuple(args.url), tuple(ids)))
    logger.info("delete: %s", json.dumps(report))
    return 0
