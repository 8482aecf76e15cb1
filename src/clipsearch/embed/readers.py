"""Read image shards: the download stage's webdataset, parquet and files outputs, or a plain image folder.

A reader streams `RawSample`s (key, image bytes, caption, metadata) from one input and counts what it
could not use (unexpected members, samples without an image, failed downloads) in a `ReadCounts`. It never
decodes images: that is the decode workers' job. Any fsspec URL works; nothing is loaded whole.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clipsearch import storage
from clipsearch.errors import InputError

logger = logging.getLogger(__name__)

FORMATS = ("webdataset", "parquet", "files", "tfrecord", "images")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "img")
_TEXT_EXTS = ("txt",)
_META_EXTS = ("json",)


@dataclass
class RawSample:
    """One sample before decoding. `meta` holds the download-metadata row (without the image bytes)."""

    key: str
    image: bytes | None
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadCounts:
    """What a reader skipped, per reason, with a few example names for the stats file."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str = "") -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if example and len(ex) < 5:
            ex.append(example)


# ---------------------------------------------------------------------------------------------------------
# format detection and listing
# ---------------------------------------------------------------------------------------------------------
def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _is_shard_name(name: str) -> bool:
    return name.split(".", 1)[0].isdigit()


def _parquet_image_column(path: str) -> str | None:
    import pyarrow.parquet as pq

    fs, p = storage.get_fs(path)
    with fs.open(p, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def _subdirs(path: str) -> list[str]:
    fs, p = storage.get_fs(path)
    proto = path.split("://", 1)[0] + "://" if "://" in path else ""
    return sorted(proto + d["name"] for d in fs.ls(p, detail=True) if d.get("type") == "directory")


def list_image_files(path: str) -> list[str]:
    """Every file under `path` (recursive), sorted; hidden files and folders are left out."""
    fs, p = storage.get_fs(path)
    proto = path.split("://", 1)[0] + "://" if "://" in path else ""
    base = p.rstrip("/")
    out = []
    for f in fs.find(p):
        rel = f[len(base) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        out.append(proto + f)
    return sorted(out)


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in _basename(name) else ""


def detect_format(input_dataset: str) -> str:
    """Guess the input format from what the folder holds: tars, parquet with image bytes, NNNNN/ folders, images."""
    fs, p = storage.get_fs(input_dataset)
    if not fs.exists(p):
        raise InputError(f"input dataset {input_dataset} does not exist", hint="--input-dataset")
    if fs.isfile(p):
        name = _basename(p)
        if name.endswith(".tar"):
            return "webdataset"
        if name.endswith(".parquet"):
            return "parquet"
        if name.endswith(".tfrecord"):
            return "tfrecord"
        raise InputError(
            f"{input_dataset} is a file but not a .tar or .parquet shard",
            hint="--input-dataset with a folder",
        )
    if storage.listdir(input_dataset, ".tar"):
        return "webdataset"
    if storage.listdir(input_dataset, ".tfrecord"):
        return "tfrecord"
    parquets = storage.listdir(input_dataset, ".parquet")
    if parquets and _parquet_image_column(parquets[0]):
        return "parquet"
    if any(_is_shard_name(_basename(d)) for d in _subdirs(input_dataset)):
        return "files"
    if any(_ext(f) in IMAGE_EXTS for f in list_image_files(input_dataset)):
        return "images"
    raise InputError(
        f"found no image shards in {input_dataset}: expected NNNNN.tar (webdataset), NNNNN.parquet with a "
        "jpg column, NNNNN/ folders (files), or image files",
        hint="--input-dataset",
    )


def list_shards(input_dataset: str, fmt: str) -> list[str]:
    """The input shards of a download-stage folder, in shard order (a single shard file is its own list)."""
    fs, p = storage.get_fs(input_dataset)
    if fs.isfile(p):
        return [input_dataset]
    if fmt == "webdataset":
        shards = storage.listdir(input_dataset, ".tar")
    elif fmt == "parquet":
        shards = [s for s in storage.listdir(input_dataset, ".parquet") if not _basename(s).startswith(".")]
    elif fmt == "files":
        shards = [d for d in _subdirs(input_dataset) if _is_shard_name(_basename(d))]
    elif fmt == "tfrecord":
        shards = storage.listdir(input_dataset, ".tfrecord")
    else:
        raise ValueError(fmt)
    return [s for s in shards if not _basename(s).startswith(".")]


def shard_size_hint(shard: str) -> int | None:
    """Successful samples of a download shard, from its `NNNNN.stats.json`, when it has one."""
    stem = shard.rstrip("/")
    for suffix in (".tar", ".parquet", ".tfrecord"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    try:
        st = storage.read_json(stem + ".stats.json")
        return int(st.get("successes", st.get("count")))
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------
def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _sibling_parquet_meta(shard: str) -> dict[str, dict[str, Any]] | None:
    """The download stage's `NNNNN.parquet` beside a tar or folder: metadata rows by key (for samples
    whose `.json` member is missing)."""
    import pyarrow.parquet as pq

    base = shard.rstrip("/")
    if base.endswith(".tar"):
        base = base[:-4]
    path = base + ".parquet"
    if not storage.exists(path):
        return None
    fs, p = storage.get_fs(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in pf.schema_arrow.names if c not in IMAGE_COLUMNS]
        table = pf.read(columns=cols)
    if "key" not in table.column_names:
        return None
    return {str(r["key"]): r for r in table.to_pylist()}


class _GroupAssembler:
    """Turns (key, ext, data) members into RawSamples; shared by the tar and files readers."""

    def __init__(self, shard: str, counts: ReadCounts):
        self.shard = shard
        self.counts = counts
        self._parquet_meta: dict[str, dict[str, Any]] | None | bool = False  # False: not loaded yet

    def _fallback_meta(self, key: str) -> dict[str, Any]:
        if self._parquet_meta is False:
            self._parquet_meta = _sibling_parquet_meta(self.shard)
        if isinstance(self._parquet_meta, dict):
            return dict(self._parquet_meta.get(key, {}))
        return {}

    def sample(self, key: str, members: dict[str, bytes]) -> RawSample | None:
        image_ext = next((e for e in members if e in IMAGE_EXTS), None)
        for ext in members:
            if ext != image_ext and ext not in _TEXT_EXTS and ext not in _META_EXTS:
                self.counts.add("unexpected_members", f"{key}.{ext}" if ext else key)
        if image_ext is None:
            if any(e in _TEXT_EXTS or e in _META_EXTS for e in members):
                self.counts.add("missing_images", key)
            return None
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError):
                self.counts.add("bad_metadata", f"{key}.json")
                meta = {}
        if not meta:
            meta = self._fallback_meta(_basename(key))
        caption: str | None = None
        if "txt" in members:
            caption = members["txt"].decode("utf-8", errors="replace")
        elif isinstance(meta.get("caption"), str):
            caption = meta["caption"]
        out_key = str(meta.get("key") or _basename(key))
        return RawSample(key=out_key, image=members[image_ext], caption=caption, meta=meta)


def read_webdataset(shard: str, counts: ReadCounts) -> Iterator[RawSample]:
    """Stream a tar shard: consecutive members sharing a key form a sample."""
    fs, p = storage.get_fs(shard)
    asm = _GroupAssembler(shard, counts)
    cur_key: str | None = None
    members: dict[str, bytes] = {}
    with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for ti in tar:
            if not ti.isfile():
                continue
            key, ext = _split_member(ti.name)
            if posixpath.basename(ti.name).startswith(".") or not ext:
                counts.add("unexpected_members", ti.name)
                continue
            if key != cur_key:
                if cur_key is not None:
                    s = asm.sample(cur_key, members)
                    if s is not None:
                        yield s
                cur_key, members = key, {}
            fobj = tar.extractfile(ti)
            data = fobj.read() if fobj is not None else b""
            if ext in members:
                counts.add("unexpected_members", ti.name)  # a duplicate member
                continue
            members[ext] = data
        if cur_key is not None:
            s = asm.sample(cur_key, members)
            if s is not None:
                yield s


def read_files(shard: str, counts: ReadCounts) -> Iterator[RawSample]:
    """A `NNNNN/` folder of `{key}.{jpg,txt,json}` files."""
    fs, p = storage.get_fs(shard)
    asm = _GroupAssembler(shard, counts)
    groups: dict[str, dict[str, str]] = {}
    for name in sorted(fs.ls(p, detail=False)):
        base = _basename(name)
        if base.startswith(".") or not fs.isfile(name):
            continue
        key, ext = _split_member(base)
        if not ext:
            counts.add("unexpected_members", base)
            continue
        groups.setdefault(key, {})[ext] = name
    for key, files in groups.items():
        members: dict[str, bytes] = {}
        for ext, name in files.items():
            if ext in IMAGE_EXTS or ext in _TEXT_EXTS or ext in _META_EXTS:
                with fs.open(name, "rb") as f:
                    members[ext] = f.read()
            else:
                members[ext] = b""  # only counted as unexpected; never read
        s = asm.sample(key, members)
        if s is not None:
            yield s


def read_parquet(shard: str, counts: ReadCounts, batch_rows: int = 256) -> Iterator[RawSample]:
    """A parquet shard with image bytes in a `jpg` (or png/webp/image) column, streamed in row batches."""
    import pyarrow.parquet as pq

    fs, p = storage.get_fs(shard)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        img_col = next((c for c in IMAGE_COLUMNS if c in names), None)
        if img_col is None:
            raise InputError(
                f"{shard} has no image column ({', '.join(IMAGE_COLUMNS)})", hint="--input-format"
            )
        for batch in pf.iter_batches(batch_size=batch_rows):
            for i, row in enumerate(batch.to_pylist()):
                data = row.pop(img_col)
                for c in IMAGE_COLUMNS:
                    row.pop(c, None)
                key = str(row.get("key") if row.get("key") is not None else f"{_basename(shard)}:{i}")
                if data is None:
                    status = row.get("status")
                    if status is not None and status != "success":
                        counts.add("failed_downloads", key)
                    else:
                        counts.add("missing_images", key)
                    continue
                if isinstance(data, dict):  # e.g. HF datasets' Image feature: {"bytes": ..., "path": ...}
                    data = data.get("bytes")
                cap = row.get("caption")
                yield RawSample(
                    key=key, image=bytes(data), caption=cap if isinstance(cap, str) else None, meta=row
                )


# -- tfrecord: tf.train.Example records, parsed without TensorFlow (the download stage writes them so) ----
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message; length-delimited values as bytes."""
    i, n = 0, len(buf)
    while i < n:
        tag, i = _varint(buf, i)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i : i + 8], i + 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            v, i = buf[i : i + ln], i + ln
        elif wt == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, v


def _feature_value(buf: bytes) -> Any:
    import struct

    for kind, _, lst in _fields(buf):
        vals: list[Any] = []
        for _, wt, v in _fields(lst):
            if kind == 1:  # BytesList
                vals.append(bytes(v))
            elif kind == 2:  # FloatList (packed or not)
                vals += list(struct.unpack(f"<{len(v) // 4}f", v)) if wt == 2 else [struct.unpack("<f", v)[0]]
            elif kind == 3:  # Int64List (packed or not)
                raw: list[int] = []
                if wt == 2:
                    j = 0
                    while j < len(v):
                        x, j = _varint(v, j)
                        raw.append(x)
                else:
                    raw.append(v)
                vals += [x - (1 << 64) if x >= 1 << 63 else x for x in raw]
        return vals[0] if len(vals) == 1 else vals
    return None


def parse_example(record: bytes) -> dict[str, Any]:
    """A serialized tf.train.Example -> {feature name: value} (single values unwrapped, bytes kept)."""
    out: dict[str, Any] = {}
    for num, _, features in _fields(record):
        if num != 1:
            continue
        for fnum, _, entry in _fields(features):
            if fnum != 1:
                continue
            key, value = None, None
            for enum, _, ev in _fields(entry):
                if enum == 1:
                    key = bytes(ev).decode("utf-8")
                elif enum == 2:
                    value = _feature_value(ev)
            if key is not None:
                out[key] = value
    return out


def read_tfrecord(shard: str, counts: ReadCounts) -> Iterator[RawSample]:
    """A `NNNNN.tfrecord` of tf.train.Example: `key`, the image under its extension, `txt`, metadata."""
    import struct

    fs, p = storage.get_fs(shard)
    with fs.open(p, "rb") as f:
        n = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise InputError(f"{shard}: truncated tfrecord after {n} records")
            (length,) = struct.unpack("<Q", head[:8])
            data = f.read(length + 4)
            if len(data) < length + 4:
                raise InputError(f"{shard}: truncated tfrecord after {n} records")
            n += 1
            try:
                ex = parse_example(data[:length])
            except (ValueError, IndexError, UnicodeDecodeError, struct.error):
                counts.add("bad_metadata", f"record {n}")
                continue
            image_ext = next((e for e in IMAGE_EXTS if isinstance(ex.get(e), bytes)), None)
            meta: dict[str, Any] = {}
            for k, v in ex.items():
                if k in IMAGE_EXTS or k == "txt":
                    continue
                meta[k] = v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v
            key = str(meta.get("key") or f"{_basename(shard)}:{n - 1}")
            if image_ext is None or not ex[image_ext]:
                counts.add("missing_images", key)
                continue
            cap = meta.get("caption")
            yield RawSample(
                key=key, image=ex[image_ext], caption=cap if isinstance(cap, str) else None, meta=meta
            )


def read_image_list(
    paths: tuple[str, ...], captions: tuple[str | None, ...], root: str
) -> Iterator[RawSample]:
    """A slice of a plain image folder: each image with its same-stem `.txt` caption, when there is one."""
    base = storage.get_fs(root)[1].rstrip("/")
    for path, cap_path in zip(paths, captions, strict=True):
        fs, p = storage.get_fs(path)
        with fs.open(p, "rb") as f:
            data = f.read()
        caption = None
        if cap_path is not None:
            cfs, cp = storage.get_fs(cap_path)
            with cfs.open(cp, "rb") as f:
                caption = f.read().decode("utf-8", errors="replace").strip()
        rel = p[len(base) :].lstrip("/") if p.startswith(base) else _basename(p)
        key = rel.rsplit(".", 1)[0]
        yield RawSample(
            key=key, image=data, caption=caption, meta={"key": key, "url": path, "caption": caption}
        )


def plan_image_folder(root: str) -> tuple[list[tuple[str, str | None]], Counter[str]]:
    """Pair each image under `root` with its `.txt` caption; count the files that are neither."""
    files = list_image_files(root)
    txt = {f.rsplit(".", 1)[0]: f for f in files if _ext(f) == "txt"}
    pairs: list[tuple[str, str | None]] = []
    other: Counter[str] = Counter()
    used_txt = set()
    for f in files:
        ext = _ext(f)
        if ext in IMAGE_EXTS:
            stem = f.rsplit(".", 1)[0]
            pairs.append((f, txt.get(stem)))
            used_txt.add(stem)
        elif ext != "txt":
            other["unexpected_members"] += 1
    other["unexpected_members"] += sum(1 for s in txt if s not in used_txt)
    return pairs, other
