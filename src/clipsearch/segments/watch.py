"""`pipeline --watch SOURCE`: streaming ingestion of new URL files.

SOURCE is a folder or an fsspec prefix (`s3://bucket/incoming/`) that receives URL files (the formats
`download` reads). Every `--watch-interval` seconds it is listed; each new file is downloaded into
`OUT/images/{name}/`, embedded into `OUT/embeddings/{name}/` and appended to `OUT/index/` as a new
segment (the first file builds the index). A running `clipsearch serve OUT/index` picks the segment up
without a restart (hot reload), so a small file is searchable seconds after it lands.

Files are taken in name order. Names starting with `.` or `_` and names ending in `.tmp`, `.part` or
`.crdownload` are ignored, so a writer that writes under such a name and renames when done is never
read half-written; a file still growing (its size changes within `SETTLE_S`) waits for the next poll.
Once MERGE_AFTER small segments have piled up, they are merged into one (`index --compact`'s default
policy: it reads only them). `OUT/.watch-state.json` records each processed file (size, mtime, outcome, timings), so a restarted
watcher does not redo them; a file that failed is retried only when its size or mtime change. A file
interrupted mid-way is redone on restart, and every stage resumes what it had finished (append skips
parts already in the index).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import replace
from typing import Any

from clipsearch import storage
from clipsearch.errors import ClipsearchError

logger = logging.getLogger(__name__)

STATE_FILE = ".watch-state.json"
URL_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet")
IGNORED_SUFFIXES = (".tmp", ".part", ".crdownload", ".swp")
SETTLE_S = 0.2
# merge the small appended segments once there are this many (search fans out over every segment; the
# merge reads only them, so it costs in proportion to the appended rows, never the base)
MERGE_AFTER = 8


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def is_url_file(name: str) -> bool:
    if name.startswith((".", "_")) or name.endswith(IGNORED_SUFFIXES):
        return False
    base = name[:-3] if name.endswith(".gz") else name
    return base.endswith(URL_SUFFIXES)


def folder_name(name: str) -> str:
    """The per-file subfolder name: the file name without its suffixes, made filesystem-safe."""
    base = name[:-3] if name.endswith(".gz") else name
    base = base.rsplit(".", 1)[0] or base
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", base).strip("._") or "file"


class Watcher:
    """Follows SOURCE and feeds each new URL file through download -> embed -> append."""

    def __init__(self, cfg: Any, source: str, interval: float = 2.0):
        from clipsearch.errors import ConfigError

        if interval <= 0:
            raise ConfigError(f"the watch interval must be > 0, got {interval}", hint="--watch-interval 2")
        if not storage.exists(source):
            raise ConfigError(f"the watched source {source} does not exist", hint="--watch FOLDER_OR_PREFIX")
        self.cfg = cfg
        self.source = source.rstrip("/")
        self.interval = interval
        self.out = cfg.output_folder.rstrip("/")
        self.index_folder = storage.join(self.out, "index")
        self.state_path = storage.join(self.out, STATE_FILE)
        storage.makedirs(self.out)
        self.state: dict[str, Any] = (
            storage.read_json(self.state_path) if storage.exists(self.state_path) else {"files": {}}
        )
        self._sizes: dict[str, tuple[int, float]] = {}

    # ------------------------------------------------------------------ listing
    def pending(self) -> list[tuple[str, int, float]]:
        """(path, size, mtime) of the new, settled URL files, in name order."""
        fs, p = storage.get_fs(self.source)
        proto = self.source.split("://", 1)[0] + "://" if "://" in self.source else ""
        out = []
        for entry in sorted(fs.ls(p, detail=True), key=lambda e: e["name"]):
            if entry.get("type") != "file":
                continue
            name = _name(entry["name"])
            if not is_url_file(name):
                continue
            size = int(entry.get("size") or 0)
            mtime = _mtime(entry)
            seen = self.state["files"].get(name)
            if seen and (seen.get("status") == "done" or (seen["size"], seen["mtime"]) == (size, mtime)):
                continue
            full = entry["name"] if not proto or "://" in entry["name"] else proto + entry["name"]
            out.append((full, size, mtime))
        return out

    def _settled(self, path: str, size: int, mtime: float) -> bool:
        """A file whose size changed within SETTLE_S is still being written: wait for the next poll."""
        if size == 0:
            return False
        if time.time() - mtime > 1.0:
            return True
        time.sleep(SETTLE_S)
        fs, p = storage.get_fs(path)
        info = fs.info(p)
        return int(info.get("size") or 0) == size and _mtime(info) == mtime

    # ------------------------------------------------------------------ one file
    def process(self, path: str, size: int, mtime: float) -> dict[str, Any]:
        from clipsearch.download import download
        from clipsearch.embed import embed
        from clipsearch.index import build_index
        from clipsearch.segments.append import append_segment

        name = _name(path)
        sub = folder_name(name)
        images = storage.join(self.out, "images", sub)
        embeddings = storage.join(self.out, "embeddings", sub)
        rec: dict[str, Any] = {"size": size, "mtime": mtime, "folder": sub, "started": time.time()}
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            dl = download(replace(self.cfg.download, url_list=path, output_folder=images))
            timings["download_s"] = time.perf_counter() - t0
            t = time.perf_counter()
            embed(replace(self.cfg.embed, input_dataset=images, output_folder=embeddings))
            timings["embed_s"] = time.perf_counter() - t
            rec["downloaded"] = dl.get("successes") if isinstance(dl, dict) else None
            t = time.perf_counter()
            if not _has_rows(embeddings):
                rec.update(status="empty", rows=0)
                logger.warning("watch: %s gave no image; nothing to index", name)
            elif not storage.exists(storage.join(self.index_folder, "index.json")):
                info = build_index(
                    replace(self.cfg.index, embeddings_folder=embeddings, index_folder=self.index_folder)
                )
                rec.update(status="done", rows=int(info["count"]), segment="base")
            else:
                rep = append_segment(
                    replace(self.cfg.index, embeddings_folder=embeddings, index_folder=self.index_folder)
                )
                rec.update(status="done", rows=int(rep["appended"]), segment=rep["segment"])
                merged = self._merge_small_segments()
                if merged:
                    rec["merged"] = merged
            timings["index_s"] = time.perf_counter() - t
        except ClipsearchError as e:
            rec.update(status="failed", error=e.one_line())
            logger.error("watch: %s failed: %s", name, e.one_line())
        timings["total_s"] = time.perf_counter() - t0
        rec["timings"] = {k: round(v, 3) for k, v in timings.items()}
        rec["finished"] = time.time()
        self.state["files"][name] = rec
        storage.write_json_atomic(self.state_path, self.state)
        logger.info(
            "watch: %s -> %s (%s) in %.2f s", name, rec["status"], rec.get("segment"), timings["total_s"]
        )
        return rec

    def _merge_small_segments(self) -> list[str] | None:
        from clipsearch.segments import layout
        from clipsearch.segments.compact import CompactConfig, compact

        m = layout.read_manifest(self.index_folder)
        largest = max((s.count for s in m.segments), default=0)
        small = [s for s in m.segments if s.count < 0.5 * largest]
        if len(small) < MERGE_AFTER:
            return None
        rep = compact(CompactConfig(self.index_folder, nb_cores=self.cfg.index.nb_cores))
        return rep.get("merged")

    # ------------------------------------------------------------------ the loop
    def poll(self) -> list[dict[str, Any]]:
        """Process every new settled file once; returns their records."""
        done = []
        for path, size, mtime in self.pending():
            if self._settled(path, size, mtime):
                done.append(self.process(path, size, mtime))
        return done

    def run(self, stop: threading.Event | None = None, max_polls: int | None = None) -> dict[str, Any]:
        stop = stop or threading.Event()
        logger.info("watching %s every %.1f s -> %s", self.source, self.interval, self.index_folder)
        polls = 0
        while not stop.is_set():
            self.poll()
            polls += 1
            if max_polls is not None and polls >= max_polls:
                break
            stop.wait(self.interval)
        return self.state


def _mtime(entry: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = entry.get(key)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return 0.0


def _has_rows(embeddings: str) -> bool:
    path = storage.join(embeddings, "manifest.json")
    if not storage.exists(path):
        return False
    return int(storage.read_json(path).get("total_rows") or 0) > 0


def watch(
    cfg: Any, source: str, interval: float = 2.0, stop: threading.Event | None = None
) -> dict[str, Any]:
    """Run the watcher until `stop` is set (or interrupted). `cfg` is a pipeline.PipelineConfig."""
    w = Watcher(cfg, source, interval)
    if getattr(cfg, "serve", None) is not None:
        threading.Thread(target=_serve_when_built, args=(w, cfg.serve, stop), daemon=True).start()
    return w.run(stop)


def _serve_when_built(w: Watcher, serve_cfg: Any, stop: threading.Event | None) -> None:
    """`--watch --serve`: serve the index as soon as the first file has built it (hot reload after)."""
    while not storage.exists(storage.join(w.index_folder, "index.json")):
        if stop is not None and stop.is_set():
            return
        time.sleep(0.2)
    from clipsearch.serve import serve

    serve(serve_cfg)
