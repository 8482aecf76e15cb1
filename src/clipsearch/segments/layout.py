"""The segmented index layout: the manifest, the tombstones, the writer lock and crash safety.

```
INDEX/
  index.json image.index text.index metadata.arrow {m}.trained.index   the base (segment 0), as built
  segments.json                  the manifest: the visible segments, in id order (absent = the base only)
  segments/00001/                an appended or compacted segment: index.json image.index text.index
                                 metadata.arrow segment.json (a valid index folder on its own)
  tombstones/000007.npy          sorted int64 global ids of deleted rows (named by the manifest)
```

Global id = segment offset + local id (the row in the segment's metadata.arrow). Offsets are dense: a
segment starts where the previous one ends. Every visible change (append, delete, compact) writes its
files first, then replaces `segments.json` in one atomic rename (temporary file, fsync, os.replace,
fsync of the folder). A segment folder or tombstone file the manifest does not name is invisible and is
removed by the next writer (`cleanup`). Writers serialise their commits on `INDEX/.segments.lock`
(fcntl); readers never lock: they read the manifest, then the files it names, which are never modified
in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from clipsearch import storage
from clipsearch.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

MANIFEST = "segments.json"
SEGMENTS_DIR = "segments"
TOMBSTONES_DIR = "tombstones"
LOCK = ".segments.lock"
SEGMENT_JSON = "segment.json"
BASE_PATH = "."
# what a base segment holds besides index.json and the trained indices (removed once compacted away)
BASE_DATA_FILES = (
    "image.index",
    "image.ivfdata",
    "text.index",
    "text.ivfdata",
    "metadata.arrow",
    "image.vectors.npy",
    "text.vectors.npy",
)
CRASH_ENV = "CLIPSEARCH_CRASH_AT"
_SEGMENT_NAME = re.compile(r"^\d{5,}$")
_TMP_NAME = re.compile(r"^\.tmp-(\d+)-[0-9a-f]+$")


def crash_point(name: str) -> None:
    """Test hook: when CLIPSEARCH_CRASH_AT names this point, the process kills itself (SIGKILL) here."""
    if os.environ.get(CRASH_ENV) == name:
        logger.warning("crash point %s: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class SegmentEntry:
    """One visible segment: where its files are (relative to INDEX) and which global ids it holds."""

    name: str  # "base" or "00001"
    path: str  # "." or "segments/00001"
    offset: int
    count: int
    uid: str  # changes whenever the files change (a compaction writes a new folder with a new uid)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "offset": self.offset,
            "count": self.count,
            "uid": self.uid,
        }

    @property
    def end(self) -> int:
        return self.offset + self.count


@dataclass(frozen=True)
class Manifest:
    generation: int
    segments: tuple[SegmentEntry, ...]
    tombstones: str | None = None  # relative path of the sorted deleted ids, None = nothing deleted
    deleted: int = 0
    # modality -> {"file": trained empty index appends copy, "factory", "search_params"}
    trained: dict[str, dict[str, Any]] = field(default_factory=dict)
    explicit: bool = True  # False: no segments.json yet (a plain index folder)
    updated: float = 0.0

    @property
    def count(self) -> int:
        """The id space: every id ever visible in this generation, deleted or not."""
        return self.segments[-1].end if self.segments else 0

    @property
    def live(self) -> int:
        return self.count - self.deleted

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "clipsearch.segments",
            "version": 1,
            "generation": self.generation,
            "count": self.count,
            "deleted": self.deleted,
            "segments": [s.to_json() for s in self.segments],
            "tombstones": self.tombstones,
            "trained": self.trained,
            "updated": self.updated,
        }

    def with_segments(self, segments: list[SegmentEntry]) -> Manifest:
        """Same manifest with these segments, offsets made dense in the given order."""
        out, off = [], 0
        for s in segments:
            out.append(replace(s, offset=off))
            off += s.count
        return replace(self, segments=tuple(out))


def read_info(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "index.json")
    if not os.path.exists(path):
        raise InputError(
            f"{folder} is not an index folder (no index.json)",
            hint="--index-folder pointing to a folder written by `clipsearch index`",
        )
    try:
        info = storage.read_json(path)
    except Exception as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(info, dict) or info.get("format") != "clipsearch.index":
        raise InputError(f"{path} is not a clipsearch index description (format != clipsearch.index)")
    return info


def implicit_manifest(folder: str, info: dict[str, Any] | None = None) -> Manifest:
    """The manifest a plain index folder stands for: its base as segment 0, nothing deleted."""
    info = info if info is not None else read_info(folder)
    entries = info.get("indices") or {}
    trained: dict[str, dict[str, Any]] = {}
    for m, e in entries.items():
        if not isinstance(e, dict):
            continue
        tf = e.get("trained_file") or f"{m}.trained.index"
        trained[m] = {
            "file": tf if os.path.exists(os.path.join(folder, tf)) else None,
            "factory": e.get("factory"),
            "search_params": dict(e.get("search_params") or {}),
        }
    count = int(info.get("count") or 0)
    base = SegmentEntry("base", BASE_PATH, 0, count, "base")
    return Manifest(0, (base,), None, 0, trained, explicit=False)


def read_manifest(folder: str) -> Manifest:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode())
    except FileNotFoundError:
        return implicit_manifest(folder)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not a readable segment manifest: {e}") from e
    if not isinstance(data, dict) or data.get("format") != "clipsearch.segments":
        raise InputError(f"{path} is not a clipsearch segment manifest (format != clipsearch.segments)")
    segs = tuple(
        SegmentEntry(str(s["name"]), str(s["path"]), int(s["offset"]), int(s["count"]), str(s["uid"]))
        for s in data.get("segments") or []
    )
    return Manifest(
        int(data["generation"]),
        segs,
        data.get("tombstones"),
        int(data.get("deleted") or 0),
        dict(data.get("trained") or {}),
        explicit=True,
        updated=float(data.get("updated") or 0.0),
    )


def manifest_signature(folder: str) -> tuple[int, int, int] | None:
    """What changes on every commit (the rename gives a new inode); None without a manifest."""
    try:
        st = os.stat(os.path.join(folder, MANIFEST))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically and durably: temporary file, fsync, rename, fsync the folder."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(folder)


def write_manifest(folder: str, manifest: Manifest) -> None:
    """The commit: one atomic rename makes the new generation visible."""
    body = replace(manifest, explicit=True, updated=time.time()).to_json()
    write_durable(os.path.join(folder, MANIFEST), (json.dumps(body, indent=1) + "\n").encode())


def sync_tree(path: str) -> None:
    """fsync every file of a freshly written segment folder (before the manifest names it)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


# -------------------------------------------------------------------------------------- tombstones
def read_tombstones(folder: str, manifest: Manifest) -> np.ndarray:
    """Sorted unique int64 global ids deleted in this generation."""
    if not manifest.tombstones:
        return np.zeros(0, np.int64)
    path = os.path.join(folder, manifest.tombstones)
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{path} (named by {MANIFEST}) is not readable: {e}") from e
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def write_tombstones(folder: str, generation: int, ids: np.ndarray) -> str | None:
    """Write the deleted ids of a new generation; returns the relative path for the manifest."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if len(ids) == 0:
        return None
    rel = f"{TOMBSTONES_DIR}/{generation:06d}.npy"
    os.makedirs(os.path.join(folder, TOMBSTONES_DIR), exist_ok=True)
    import io

    buf = io.BytesIO()
    np.save(buf, ids)
    write_durable(os.path.join(folder, rel), buf.getvalue())
    return rel


def segment_deleted(deleted: np.ndarray, seg: SegmentEntry) -> np.ndarray:
    """Local ids of `seg` among the sorted global deleted ids."""
    lo, hi = np.searchsorted(deleted, [seg.offset, seg.end])
    return deleted[lo:hi] - seg.offset


def packed_alive(count: int, dead_local: np.ndarray) -> np.ndarray:
    """The little-endian packed bitmap (faiss IDSelectorBitmap layout) of the live local ids."""
    mask = np.ones(count, dtype=bool)
    mask[dead_local] = False
    return np.packbits(mask, bitorder="little")


# ------------------------------------------------------------------------------------- the lock
@contextlib.contextmanager
def writer_lock(folder: str, timeout_s: float = 600.0) -> Iterator[None]:
    """Exclusive lock for a commit (append, delete, compact). Local folders only (fcntl)."""
    path = os.path.join(folder, LOCK)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InputError(
                        f"another writer holds {path} for more than {timeout_s:.0f} s", hint="retry later"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_local_index(folder: str) -> str:
    """Writers need a local folder (faiss files, fcntl lock, atomic rename). Returns the local path."""
    if not storage.is_local(folder):
        raise ConfigError(
            f"{folder}: appends, deletes and compactions need a local index folder",
            hint="--index-folder on a local disk (copy the index, update it, copy it back)",
        )
    local = folder.split("://", 1)[1] if folder.startswith("file://") else folder
    read_info(local)
    return os.path.abspath(local)


# ------------------------------------------------------------------------------ segment folders
def new_tmp_segment(folder: str) -> str:
    """A private folder under segments/ to write a segment into (invisible until committed)."""
    d = os.path.join(folder, SEGMENTS_DIR, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(d)
    return d


def next_segment_name(folder: str, manifest: Manifest) -> str:
    nums = [int(s.name) for s in manifest.segments if _SEGMENT_NAME.match(s.name)]
    seg_dir = os.path.join(folder, SEGMENTS_DIR)
    if os.path.isdir(seg_dir):
        nums += [int(n) for n in os.listdir(seg_dir) if _SEGMENT_NAME.match(n)]
    return f"{max(nums, default=0) + 1:05d}"


def install_segment(folder: str, tmp: str, name: str) -> str:
    """Rename a written segment folder to its final name (still invisible: the manifest decides)."""
    rel = f"{SEGMENTS_DIR}/{name}"
    final = os.path.join(folder, rel)
    os.rename(tmp, final)
    fsync_dir(os.path.join(folder, SEGMENTS_DIR))
    return rel


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(folder: str, manifest: Manifest, *, keep_tmp: str | None = None) -> list[str]:
    """Remove what the manifest does not name: leftover segment folders, old tombstones, and the base's
    data files once a compaction has replaced the base. Call with the writer lock held."""
    removed: list[str] = []
    visible = {s.path for s in manifest.segments}
    seg_dir = os.path.join(folder, SEGMENTS_DIR)
    if os.path.isdir(seg_dir):
        for name in sorted(os.listdir(seg_dir)):
            path = os.path.join(seg_dir, name)
            rel = f"{SEGMENTS_DIR}/{name}"
            tmp = _TMP_NAME.match(name)
            if tmp:
                if path == keep_tmp or _pid_alive(int(tmp.group(1))):
                    continue  # a writer is still filling it
            elif not _SEGMENT_NAME.match(name) or rel in visible:
                continue
            if _trained_in(manifest, rel):
                continue  # a compacted-away segment whose trained index appends still use
            shutil.rmtree(path, ignore_errors=True)
            removed.append(rel)
    ts_dir = os.path.join(folder, TOMBSTONES_DIR)
    if os.path.isdir(ts_dir):
        for name in os.listdir(ts_dir):
            rel = f"{TOMBSTONES_DIR}/{name}"
            if rel != manifest.tombstones:
                os.remove(os.path.join(ts_dir, name))
                removed.append(rel)
    if manifest.explicit and BASE_PATH not in visible:
        for name in BASE_DATA_FILES:
            path = os.path.join(folder, name)
            if os.path.lexists(path):
                os.remove(path)
                removed.append(name)
        if os.path.isdir(os.path.join(folder, "keywords")):  # the base's keyword index
            shutil.rmtree(os.path.join(folder, "keywords"), ignore_errors=True)
            removed.append("keywords")
    for name in os.listdir(folder):
        if name.endswith(".trained.index") and not _trained_in(manifest, name):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    if removed:
        logger.info("removed what no manifest names: %s", ", ".join(removed[:8]))
    return removed


def _trained_in(manifest: Manifest, rel: str) -> bool:
    for t in manifest.trained.values():
        f = (t or {}).get("file") or ""
        if f == rel or f.startswith(rel.rstrip("/") + "/"):
            return True
    return False


def segment_folder(folder: str, seg: SegmentEntry) -> str:
    return folder if seg.path == BASE_PATH else os.path.join(folder, seg.path)


def read_segment_json(folder: str, seg: SegmentEntry) -> dict[str, Any]:
    """segment.json of an appended/compacted segment, or what the base's index.json says of its source."""
    if seg.path == BASE_PATH:
        info = read_info(folder)
        inp = info.get("input") or {}
        src = None
        if inp.get("folder"):
            src = {
                "folder": inp["folder"],
                "format": inp.get("format", "embeddings"),
                "column": inp.get("column", "embedding"),
                "modalities": sorted((info.get("indices") or {}).keys()),
                "parts": int(inp.get("parts") or 0),  # the first N parts of the folder, names unknown
                "skipped": int((info.get("skipped") or {}).get("samples") or 0),
            }
        return {"name": "base", "count": seg.count, "sources": [src] if src else None, "dropped": None}
    path = os.path.join(folder, seg.path, SEGMENT_JSON)
    try:
        return storage.read_json(path)
    except Exception as e:
        raise InputError(f"{path} is not readable: {e}") from e
