"""fsspec helpers shared by every stage: URL -> filesystem, atomic writes, JSON manifests."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

logger = logging.getLogger(__name__)


def get_fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path-within-filesystem) for any fsspec URL or local path."""
    fs, p = url_to_fs(path)
    return fs, p


def is_local(path: str) -> bool:
    fs, _ = get_fs(path)
    return bool({"file", "local"} & set(_protocols(fs)))


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def exists(path: str) -> bool:
    fs, p = get_fs(path)
    return fs.exists(p)


def makedirs(path: str) -> None:
    fs, p = get_fs(path)
    fs.makedirs(p, exist_ok=True)


def listdir(path: str, suffix: str = "") -> list[str]:
    """Sorted full paths (with protocol) of the files directly in `path` ending with `suffix`."""
    fs, p = get_fs(path)
    if not fs.exists(p):
        return []
    names = sorted(fs.ls(p, detail=False))
    proto = _protocol_prefix(path)
    return [proto + n for n in names if n.endswith(suffix) and fs.isfile(n)]


def _protocol_prefix(path: str) -> str:
    return path.split("://", 1)[0] + "://" if "://" in path else ""


def tmp_name(path: str) -> str:
    """A hidden temporary sibling of `path`, unique per writer, so concurrent retries never collide."""
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.{uuid.uuid4().hex[:8]}.tmp" if head else f".{tail}.{uuid.uuid4().hex[:8]}.tmp"


@contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary name, then rename onto `path`. A half-written file is never visible."""
    fs, p = get_fs(path)
    tmp = tmp_name(p)
    try:
        with fs.open(tmp, mode) as f:
            yield f
        if {"file", "local"} & set(_protocols(fs)):
            os.replace(tmp, p)  # atomic on POSIX
        else:
            fs.mv(tmp, p)  # object stores: copy+delete; the final key appears whole
    except BaseException:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except Exception:  # pragma: no cover - best effort cleanup
            logger.debug("could not remove %s", tmp)
        raise


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: str) -> Any:
    fs, p = get_fs(path)
    with fs.open(p, "rb") as f:
        return json.loads(f.read().decode())


def folder_state(path: str) -> str:
    """'missing', 'empty' or 'nonempty' for an output folder."""
    fs, p = get_fs(path)
    if not fs.exists(p):
        return "missing"
    if not fs.isdir(p):
        return "nonempty"
    return "nonempty" if fs.ls(p, detail=False) else "empty"
