"""`clipsearch index --text-index-only`: add the keyword index to an index folder built without one.

Every visible segment (the base included) gets `keywords/` from its own metadata.arrow, and its index.json
names it; the root index.json says so too, so later appends and compactions build theirs. Under the
writers' lock. Segment files are otherwise never changed in place, so a running server keeps the
segments it has opened: restart it to serve keyword and hybrid queries.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from clipsearch import storage
from clipsearch.segments import layout

logger = logging.getLogger(__name__)


def add_text_index(index_folder: str, *, threads: int = 1) -> dict[str, Any]:
    from clipsearch.keywords.writer import build_keyword_index

    folder = layout.check_local_index(index_folder)
    built: list[str] = []
    with layout.writer_lock(folder):
        manifest = layout.read_manifest(folder)
        entry: dict[str, Any] | None = None
        for seg in manifest.segments:
            seg_dir = layout.segment_folder(folder, seg)
            info = layout.read_info(seg_dir)
            if isinstance(info.get("keywords"), dict) and os.path.isdir(os.path.join(seg_dir, "keywords")):
                entry = entry or info["keywords"]
                continue
            e = build_keyword_index(seg_dir, threads=threads)
            if e is None:
                continue
            info["keywords"] = entry = e
            storage.write_json_atomic(os.path.join(seg_dir, "index.json"), info)
            built.append(seg.name)
        root = layout.read_info(folder)
        if entry is not None and not isinstance(root.get("keywords"), dict):
            root["keywords"] = {
                k: v for k, v in entry.items() if k in ("dir", "engine", "analyzer", "column")
            }
            storage.write_json_atomic(os.path.join(folder, "index.json"), root)
    logger.info("keyword index built for %s", ", ".join(built) or "no segment (all had one)")
    return {"built": built, "segments": len(manifest.segments), "keywords": json.loads(json.dumps(entry))}
