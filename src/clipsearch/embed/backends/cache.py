"""Converted models on disk, keyed by model, backend, precision and library versions.

    <root>/<model-slug>--<backend>-<precision>--<hash of the key>/
        meta.json          the key, and the sha256 of every file (written last: its presence marks the entry done)
        image.* text.*     the converted towers

<root> is $CLIPSEARCH_CACHE_DIR, else $XDG_CACHE_HOME/clipsearch, else ~/.cache/clipsearch; then models/.
An entry is checked before use (every file present, same size and sha256 as written); a corrupt one is
rebuilt, not trusted. An entry for the same model, backend and precision made with other library versions
is said in one line and replaced. Conversion takes a lock per entry, so processes that start together
convert once; the entry is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

META = "meta.json"
FORMAT = 4  # bump when what the converters write changes (2: ONNX int8 keeps layer 0 and the projection fp32;
#            3: the OpenVINO int8 text tower quantises activations too; 4: its first layer as well)


def cache_root() -> Path:
    env = os.environ.get("CLIPSEARCH_CACHE_DIR")
    if env:
        base = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "clipsearch"
    return base / "models"


def _slug(model: str) -> str:
    tail = "/".join(Path(model.rstrip("/")).parts[-2:]) if model.startswith("/") else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tail).strip("_")[:80] or "model"


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def entry_name(key: dict[str, Any]) -> str:
    return f"{_slug(key['model'])}--{key['backend']}-{key['precision']}--{key_hash(key)}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_entry(path: Path) -> str | None:
    """None if the entry is whole; else why not (missing meta, a missing file, a size or checksum mismatch)."""
    meta_file = path / META
    try:
        meta = json.loads(meta_file.read_text())
        files = dict(meta["files"])
    except FileNotFoundError:
        return "it has no meta.json (an interrupted conversion?)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its meta.json is unreadable ({type(e).__name__})"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != int(info["size"]):
            return f"{name} has {f.stat().st_size} bytes, {info['size']} were written"
        if sha256_file(f) != info["sha256"]:
            return f"{name}'s checksum differs from the one written"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _other_versions(root: Path, key: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """Entries for the same model, backend and precision whose key differs (library versions, format)."""
    prefix = f"{_slug(key['model'])}--{key['backend']}-{key['precision']}--"
    out = []
    for p in sorted(root.glob(prefix + "*")) if root.is_dir() else []:
        if p.name == entry_name(key) or not p.is_dir():
            continue
        try:
            other = read_meta(p)["key"]
        except Exception:
            continue
        if other.get("model") == key["model"] and other.get("fingerprint") == key.get("fingerprint"):
            out.append((p, other))
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = old.get("versions", {}), new.get("versions", {})
    diffs = [f"{k} {a.get(k)} (now {b.get(k)})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if old.get("format") != new.get("format"):
        diffs.append(f"cache format {old.get('format')} (now {new.get('format')})")
    return ", ".join(diffs) or "other settings"


def get_or_build(key: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """The path of a whole entry for `key`, building it with `build(folder) -> extra meta` when missing.

    Returns (path, built). `build` writes its files into the folder it is given.
    """
    key = {**key, "format": FORMAT}
    root = cache_root()
    name = entry_name(key)
    path = root / name
    with _lock(root, name):
        if path.is_dir():
            why = check_entry(path)
            if why is None:
                return path, False
            logger.warning("converted model cache entry %s is corrupt (%s): rebuilding it", path, why)
            shutil.rmtree(path, ignore_errors=True)
        for old, old_key in _other_versions(root, key):
            logger.warning(
                "the cached %s %s model %s was converted with %s: converting it again",
                key["backend"],
                key["precision"],
                key["model"],
                _differences(old_key, key),
            )
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            extra = build(tmp)
            files = {
                f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)}
                for f in sorted(tmp.iterdir())
                if f.is_file()
            }
            meta = {"key": key, "files": files, **extra}
            (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path, True


def invalidate(path: Path, why: str) -> None:
    """An entry that checked whole but would not load: drop it, so the next start rebuilds it."""
    logger.warning("converted model cache entry %s does not load (%s): removing it", path, why)
    shutil.rmtree(path, ignore_errors=True)
