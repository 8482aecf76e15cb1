"""Reading foreign faiss index files without loading them: header, structure, stored search parameters,
and copying (or linking) them into an index folder with a progress bar.

`read_header` reads the first bytes of the file through fsspec, so a 100 GB index on s3:// or the Hub is
checked (dimension, vector count, metric) before anything is downloaded or written.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

import faiss

from clipsearch import storage
from clipsearch.errors import InputError

logger = logging.getLogger(__name__)

#: an index file larger than this is opened memory-mapped (and recorded as mmap) unless told otherwise
LARGE_INDEX_BYTES = 1 << 30
COPY_CHUNK = 8 << 20

METRICS = {0: "inner_product", 1: "l2"}

# Every faiss float index file starts with a 4-byte type code followed by the common header written by
# faiss' write_index_header: d (int32), ntotal (int64), two int64 placeholders, is_trained (uint8),
# metric_type (int32).
_HEADER = struct.Struct("<4siqqqBi")
_BINARY_PREFIXES = (b"IB",)  # binary indices (IBxF, IBHf, IBwF...): a different header, not CLIP floats


@dataclass(frozen=True)
class FaissHeader:
    path: str
    fourcc: str
    dim: int
    ntotal: int
    metric: str
    size_bytes: int


def read_header(path: str) -> FaissHeader:
    """The dimension, vector count and metric of a faiss index file, from its first 37 bytes."""
    fs, p = storage.get_fs(path)
    try:
        size = int(fs.size(p) or 0)
        with fs.open(p, "rb") as f:
            raw = f.read(_HEADER.size)
    except FileNotFoundError as e:
        raise InputError(f"faiss index {path} does not exist") from e
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read faiss index {path}: {e}") from e
    if len(raw) < _HEADER.size:
        raise InputError(f"{path} is not a faiss index: only {len(raw)} bytes")
    fourcc, d, ntotal, dummy1, dummy2, _trained, metric = _HEADER.unpack(raw)
    if fourcc.startswith(_BINARY_PREFIXES):
        raise InputError(f"{path} is a binary faiss index ({fourcc!r}); CLIP indices hold float vectors")
    if not re.fullmatch(rb"[A-Za-z0-9_]{4}", fourcc) or dummy1 != 1 << 20 or dummy2 != 1 << 20 or d <= 0:
        raise InputError(
            f"{path} is not a faiss index file (it starts with {raw[:8]!r})",
            hint="--source must point at a file written by faiss.write_index (autofaiss, clip-retrieval)",
        )
    return FaissHeader(
        path=path,
        fourcc=fourcc.decode("ascii"),
        dim=int(d),
        ntotal=int(ntotal),
        metric=METRICS.get(int(metric), f"metric_{metric}"),
        size_bytes=size,
    )


def open_index(path: str, *, mmap: bool, header: FaissHeader | None = None) -> Any:
    """Open a local faiss index file; with `mmap`, the vectors stay on disk (page cache) instead of RAM.

    Inverted lists are mapped with IO_FLAG_MMAP, flat codes (Flat, HNSW storage) with IO_FLAG_MMAP_IFC;
    an index type that supports neither is read normally. On-disk inverted lists (`.ivfdata`) are looked
    up next to the index file.
    """
    fourcc = header.fourcc if header else ""
    attempts: list[int] = []
    if mmap:
        if fourcc.startswith(("IxF", "IHN")):
            attempts.append(faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_ONDISK_SAME_DIR)
        attempts.append(faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR)
    attempts.append(faiss.IO_FLAG_ONDISK_SAME_DIR)
    last: Exception | None = None
    for flags in attempts:
        try:
            index = faiss.read_index(path, flags)
            if mmap:
                logger.debug("opened %s memory-mapped (flags %#x)", path, flags)
            return index
        except RuntimeError as e:
            last = e
    msg = str(last).strip().splitlines()[-1] if last and str(last).strip() else repr(last)
    raise InputError(f"{path} is not a readable faiss index: {msg}") from last


def ondisk_lists(index: Any) -> Any | None:
    """The OnDiskInvertedLists of an IVF index whose lists live in a separate .ivfdata file, else None."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    il = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(il, faiss.OnDiskInvertedLists) and il.filename:
        return il
    return None


def describe(index: Any) -> tuple[str, dict[str, Any]]:
    """(factory string, search parameters stored in the file) of an opened index.

    The parameters are the ones the index was saved with (autofaiss sets its tuned nprobe/efSearch before
    writing): nprobe of an IVF, efSearch of an HNSW, k_factor of a refine stage.
    """
    try:
        from faiss.contrib.factory_tools import reverse_index_factory

        factory = reverse_index_factory(index)
    except Exception:  # not every structure has a factory string (e.g. custom quantizers)
        factory = type(faiss.downcast_index(index)).__name__
    params: dict[str, Any] = {}
    idx = faiss.downcast_index(index)
    while True:
        if isinstance(idx, faiss.IndexPreTransform):
            idx = faiss.downcast_index(idx.index)
        elif isinstance(idx, faiss.IndexRefine):
            params["k_factor"] = float(idx.k_factor)
            idx = faiss.downcast_index(idx.base_index)
        elif isinstance(idx, faiss.IndexIDMap):
            idx = faiss.downcast_index(idx.index)
        else:
            break
    if isinstance(idx, faiss.IndexIVF):
        params["nprobe"] = int(idx.nprobe)
        q = faiss.downcast_index(idx.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            params["quantizer_efSearch"] = int(q.hnsw.efSearch)
    elif isinstance(idx, faiss.IndexHNSW):
        params["efSearch"] = int(idx.hnsw.efSearch)
    return factory, params


def parse_param_string(s: str | None) -> dict[str, Any]:
    """autofaiss' ParameterSpace string ("nprobe=16,efSearch=32,ht=2048") as a dict."""
    out: dict[str, Any] = {}
    for part in (s or "").split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        try:
            out[name] = int(value)
        except ValueError:
            try:
                out[name] = float(value)
            except ValueError:
                out[name] = value
    return out


# ---------------------------------------------------------------------------------------------- transfer
TRANSFERS = ("copy", "hardlink", "symlink")


def transfer(src: str, dst: str, mode: str = "copy", *, progress: bool = True) -> str:
    """Put `src` at `dst` (a temporary name chosen by the caller) by copy, hard link or symlink.

    Links need both ends local; a hard link across filesystems falls back to a copy. Returns the mode used.
    """
    if mode != "copy" and storage.is_local(src) and storage.is_local(dst):
        s, d = _local(src), _local(dst)
        try:
            if mode == "hardlink":
                os.link(s, d)
            else:
                os.symlink(os.path.abspath(s), d)
            logger.info("%s %s -> %s", mode, src, dst)
            return mode
        except OSError as e:
            logger.warning("cannot %s %s into %s (%s); copying instead", mode, src, dst, e)
    elif mode != "copy":
        logger.warning("--transfer %s needs a local source and destination; copying %s instead", mode, src)
    copy_with_progress(src, dst, progress=progress)
    return "copy"


def copy_with_progress(src: str, dst: str, *, progress: bool = True) -> int:
    """Stream `src` to `dst` (any fsspec paths) in 8 MiB chunks with a tqdm bar; returns the bytes copied."""
    from tqdm.auto import tqdm

    sfs, sp = storage.get_fs(src)
    dfs, dp = storage.get_fs(dst)
    total = int(sfs.size(sp) or 0)
    done = 0
    name = os.path.basename(sp.rstrip("/"))
    with (
        sfs.open(sp, "rb", block_size=COPY_CHUNK) as fin,
        dfs.open(dp, "wb") as fout,
        tqdm(
            total=total or None, unit="B", unit_scale=True, desc=f"copy {name}", disable=not progress
        ) as bar,
    ):
        while True:
            chunk = fin.read(COPY_CHUNK)
            if not chunk:
                break
            fout.write(chunk)
            done += len(chunk)
            bar.update(len(chunk))
    return done


def _local(path: str) -> str:
    return path.split("://", 1)[1] if path.startswith("file://") else path
