"""Shard writers, one per output format, all following `ShardWriter`, picked from `WRITERS`.

Every file is written under a hidden temporary name and renamed by `close()`; `abort()` removes the
temporaries. The metadata parquet `{shard:05d}.parquet` holds one row per input URL, successful or not.
The stats file is not written here: the runner writes it last, after `close()`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch import storage
from clipsearch.download.config import DownloadConfig

logger = logging.getLogger(__name__)

#: tar member time: fixed, so that a shard's bytes depend on its content only
TAR_MTIME = 0


@dataclass
class Sample:
    """One input row's outcome: its metadata row (contract column order) and the stored image, if any."""

    key: str
    meta: dict[str, Any]
    image: bytes | None = None


def meta_schema(cfg: DownloadConfig, extras: pa.Schema | None) -> pa.Schema:
    """The `{shard}.parquet` columns, in contract order, then the carried-through input columns."""
    s, i = pa.string(), pa.int32()
    fields = [
        pa.field("key", s),
        pa.field("url", s),
        pa.field("caption", s),
        pa.field("status", s),
        pa.field("error_message", s),
        pa.field("width", i),
        pa.field("height", i),
        pa.field("original_width", i),
        pa.field("original_height", i),
        pa.field("sha256", s),
        pa.field("url_hash", s),
    ]
    if cfg.extract_exif:
        fields.append(pa.field("exif", s))
    if cfg.compute_hash in ("md5", "sha512"):
        fields.append(pa.field(cfg.compute_hash, s))
    if extras is not None:
        fields += [f for f in extras if f.name not in ("url", "caption")]
    return pa.schema(fields)


class _AtomicFile:
    """A file on any fsspec filesystem, written under a temporary name until commit()."""

    def __init__(self, path: str):
        self.path = path
        self.fs, self._final = storage.get_fs(path)
        self._tmp = storage.tmp_name(self._final)
        self.f = self.fs.open(self._tmp, "wb")

    def commit(self) -> None:
        self.f.close()
        if storage.is_local(self.path):
            os.replace(self._tmp, self._final)
        else:
            self.fs.mv(self._tmp, self._final)

    def abort(self) -> None:
        try:
            self.f.close()
        except Exception:
            logger.debug("close failed on abort of %s", self.path)
        try:
            if self.fs.exists(self._tmp):
                self.fs.rm(self._tmp)
        except Exception:
            logger.debug("could not remove %s", self._tmp)


class ShardWriter(Protocol):
    def write(self, sample: Sample) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def __enter__(self) -> ShardWriter: ...
    def __exit__(self, *exc: object) -> None: ...


class _Spool:
    """Payloads by key in a local temporary file."""

    def __init__(self) -> None:
        self._f = tempfile.TemporaryFile(prefix="clipsearch-shard-")
        self._at: dict[str, tuple[int, int]] = {}
        self._end = 0

    def __contains__(self, key: str) -> bool:
        return key in self._at

    def put(self, key: str, data: bytes) -> None:
        self._f.seek(self._end)
        self._f.write(data)
        self._at[key] = (self._end, len(data))
        self._end += len(data)

    def pop(self, key: str) -> bytes:
        at = self._at.pop(key)
        self._f.seek(at[0])
        return self._f.read(at[1])

    def close(self) -> None:
        self._f.close()


class _InOrder:
    """Releases payloads in key order, whatever order the downloads complete in, so that a shard is the
    same bytes on every run (and after a resume). Rows are fetched in order, so few wait: those that do
    are kept in memory up to `cap` bytes, the rest (behind a slow server, say) in a spool file."""

    def __init__(self, emit: Any, cap: int = 64 << 20, emit_none: bool = False):
        self._emit = emit
        self._cap = cap
        self._emit_none = emit_none  # also release rows without a payload (parquet output: every row)
        self._order: list[str] = []
        self._pos = 0
        self._mem: dict[str, bytes | None] = {}
        self._mem_bytes = 0
        self._spool: _Spool | None = None

    def expect(self, keys: list[str]) -> None:
        """The shard's keys, all of them (each is then `put` once, with a payload or None)."""
        self._order = sorted(keys)
        self._release()

    def put(self, key: str, payload: bytes | None) -> None:
        self._mem[key] = payload
        self._mem_bytes += len(payload or b"")
        self._release()
        while self._mem_bytes > self._cap:  # spill the one that will be released last
            far = max(k for k, v in self._mem.items() if v is not None)
            data = self._mem.pop(far) or b""
            self._mem_bytes -= len(data)
            if self._spool is None:
                self._spool = _Spool()
            self._spool.put(far, data)

    def _take(self, key: str) -> tuple[bool, bytes | None]:
        if key in self._mem:
            data = self._mem.pop(key)
            self._mem_bytes -= len(data or b"")
            return True, data
        if self._spool is not None and key in self._spool:
            return True, self._spool.pop(key)
        return False, None

    def _release(self) -> None:
        while self._pos < len(self._order):
            found, data = self._take(self._order[self._pos])
            if not found:
                return
            if data is not None or self._emit_none:
                self._emit(self._order[self._pos], data)
            self._pos += 1

    def finish(self) -> None:
        """Release what is left, in key order (keys never put are skipped)."""
        rest = set(self._order[self._pos :]) | set(self._mem)
        if self._spool is not None:
            rest |= set(self._spool._at)
        for key in sorted(rest):
            found, data = self._take(key)
            if found and (data is not None or self._emit_none):
                self._emit(key, data)
        self._pos = len(self._order)
        self.close()

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


class _Base:
    """Buffers metadata rows (small) and writes `{shard}.parquet` sorted by key on close. Formats that
    store payloads get them in key order through `_InOrder` (call `expect` with the shard's keys)."""

    #: whether the format stores payloads in order (the dummy and files outputs do not need to)
    _ordered = True
    #: whether every row, stored image or not, goes through `_emit` (parquet output)
    _every_row = False

    def __init__(self, folder: str, shard_id: int, cfg: DownloadConfig, extras: pa.Schema | None):
        self.folder, self.shard_id, self.cfg = folder, shard_id, cfg
        self.name = cfg.shard_name(shard_id)
        self.schema = meta_schema(cfg, extras)
        self.ext = cfg.encode_format
        self.rows: list[dict[str, Any]] = []
        self._meta: dict[str, dict[str, Any]] = {}
        self._files: list[_AtomicFile] = []
        self._order = _InOrder(self._emit, emit_none=self._every_row) if self._ordered else None

    def _open(self, name: str) -> _AtomicFile:
        f = _AtomicFile(storage.join(self.folder, name))
        self._files.append(f)
        return f

    def expect(self, keys: list[str]) -> None:
        if self._order is not None:
            self._order.expect(keys)

    def write(self, sample: Sample) -> None:
        self.rows.append(sample.meta)
        if self._order is not None:
            self._meta[sample.key] = sample.meta
            self._order.put(sample.key, None if sample.image is None else self._payload(sample))

    def _payload(self, sample: Sample) -> bytes:
        """What is kept for a stored sample until its turn (the image bytes unless a format says otherwise)."""
        return sample.image or b""

    def _emit(self, key: str, payload: bytes) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def carry_over(self, rows: list[dict[str, Any]], redo: set[str]) -> None:
        """--retry-failed: keep these metadata rows of the previous version of this shard, and its stored
        images except those of the `redo` keys (which are being fetched again)."""
        self.rows.extend(rows)
        for r in rows:
            self._meta[r["key"]] = r

    def _previous(self, suffix: str) -> tuple[Any, str]:
        return storage.get_fs(storage.join(self.folder, f"{self.name}{suffix}"))

    def _finish(self) -> None:
        """Complete the format-specific files (before the metadata parquet is written)."""

    def close(self) -> None:
        self.rows.sort(key=lambda r: r["key"])
        try:
            if self._order is not None:
                self._order.finish()
            self._finish()
            self._write_meta()
        except BaseException:
            self.abort()
            raise
        for f in self._files:
            f.commit()

    def _write_meta(self) -> None:
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        f = self._open(f"{self.name}.parquet")
        pq.write_table(table, f.f, compression="zstd")

    def abort(self) -> None:
        if self._order is not None:
            self._order.close()
        for f in self._files:
            f.abort()

    def __enter__(self) -> _Base:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _json_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, default=str, ensure_ascii=False).encode()


class WebDatasetWriter(_Base):
    """`{shard}.tar` with `{key}.{ext}`, `{key}.txt`, `{key}.json` per successful sample, in key order.
    Member times are fixed, so the same shard gives the same bytes."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self._tarfile = self._open(f"{self.name}.tar")
        self._tar = tarfile.open(fileobj=self._tarfile.f, mode="w", format=tarfile.USTAR_FORMAT)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = TAR_MTIME
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def _emit(self, key: str, image: bytes) -> None:
        meta = self._meta.pop(key)
        self._add(f"{key}.{self.ext}", image)
        self._add(f"{key}.txt", (meta.get("caption") or "").encode())
        self._add(f"{key}.json", _json_meta(meta))

    def carry_over(self, rows: list[dict[str, Any]], redo: set[str]) -> None:
        super().carry_over(rows, redo)
        assert self._order is not None
        kept = {r["key"] for r in rows}
        fs, p = self._previous(".tar")
        suffix = f".{self.ext}"
        seen = set()
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|") as old:
            for m in old:
                key = m.name.split(".", 1)[0]
                if m.isfile() and m.name.endswith(suffix) and key in kept:
                    data = old.extractfile(m)
                    self._order.put(key, data.read() if data else b"")
                    seen.add(key)
        for key in kept - seen:  # a failed row: nothing stored
            self._order.put(key, None)

    def _finish(self) -> None:
        self._tar.close()

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:
            logger.debug("tar close failed on abort")
        super().abort()


class FilesWriter(_Base):
    """`{shard}/{key}.{ext,txt,json}`; each file committed as it is written (order does not matter)."""

    _ordered = False

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self._written: list[str] = []
        storage.makedirs(storage.join(self.folder, self.name))

    def write(self, sample: Sample) -> None:
        super().write(sample)
        if sample.image is None:
            return
        for name, data in (
            (f"{sample.key}.{self.ext}", sample.image),
            (f"{sample.key}.txt", (sample.meta.get("caption") or "").encode()),
            (f"{sample.key}.json", _json_meta(sample.meta)),
        ):
            path = storage.join(self.folder, self.name, name)
            storage.write_bytes_atomic(path, data)
            self._written.append(path)

    def abort(self) -> None:
        super().abort()
        for path in self._written:
            try:
                fs, p = storage.get_fs(path)
                fs.rm(p)
            except Exception:
                logger.debug("could not remove %s", path)


class ParquetWriter(_Base):
    """`{shard}.parquet` with the metadata columns and the image bytes in a `{ext}` binary column, one row
    per input row in key order, streamed in row groups (the images are never all in memory)."""

    _GROUP = 256
    _every_row = True

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.schema = self.schema.append(pa.field(self.ext, pa.binary()))
        self._pf = self._open(f"{self.name}.parquet")
        self._pw = pq.ParquetWriter(self._pf.f, self.schema, compression="zstd")
        self._group: list[dict[str, Any]] = []

    def _emit(self, key: str, image: bytes | None) -> None:
        self._group.append({**self._meta.pop(key), self.ext: image})
        if len(self._group) >= self._GROUP:
            self._flush()

    def _flush(self) -> None:
        if self._group:
            self._pw.write_table(pa.Table.from_pylist(self._group, schema=self.schema))
            self._group = []

    def carry_over(self, rows: list[dict[str, Any]], redo: set[str]) -> None:
        assert self._order is not None
        for r in rows:
            image = r.pop(self.ext, None)
            self.rows.append(r)
            self._meta[r["key"]] = r
            self._order.put(r["key"], image)

    def _write_meta(self) -> None:
        self._flush()
        self._pw.close()

    def abort(self) -> None:
        try:
            self._pw.close()
        except Exception:
            logger.debug("parquet close failed on abort")
        super().abort()


class TFRecordWriter(_Base):
    """`{shard}.tfrecord` of tf.train.Example records in key order, encoded here without TensorFlow.

    Features: `key`, `{ext}` (image bytes), `txt` (caption) and every metadata field
    (strings as bytes_list, integers as int64_list, floats as float_list; nulls left out).
    """

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self._tf = self._open(f"{self.name}.tfrecord")

    def _payload(self, sample: Sample) -> bytes:
        feats: dict[str, Any] = {self.ext: sample.image or b"", "txt": sample.meta.get("caption") or ""}
        for k, v in sample.meta.items():
            if v is not None and k not in feats:
                feats[k] = v
        return encode_example(feats)

    def _emit(self, key: str, record: bytes) -> None:
        self._meta.pop(key, None)
        write_tfrecord(self._tf.f, record)

    def carry_over(self, rows: list[dict[str, Any]], redo: set[str]) -> None:
        super().carry_over(rows, redo)
        assert self._order is not None
        kept = {r["key"] for r in rows}
        fs, p = self._previous(".tfrecord")  # failed rows have no record
        with fs.open(p, "rb") as f:
            for record in read_tfrecords(f):
                key = example_key(record)
                if key in kept:
                    self._order.put(key, record)
                    kept.discard(key)
        for key in kept:
            self._order.put(key, None)


class DummyWriter(_Base):
    """img2dataset's `dummy` output: no images, only `{shard}.parquet` (and the stats file), to measure
    the download and decode path alone."""

    _ordered = False


WRITERS: dict[str, type[_Base]] = {
    "webdataset": WebDatasetWriter,
    "parquet": ParquetWriter,
    "files": FilesWriter,
    "tfrecord": TFRecordWriter,
    "dummy": DummyWriter,
}


def open_writer(cfg: DownloadConfig, shard_id: int, extras: pa.Schema | None) -> _Base:
    return WRITERS[cfg.output_format](cfg.output_folder, shard_id, cfg, extras)


# ---------------------------------------------------------------- tf.train.Example without TensorFlow


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _feature(v: Any) -> bytes:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int):  # Feature.int64_list = 3, Int64List.value = 1 (packed)
        return _field(3, _field(1, _varint(v)))
    if isinstance(v, float):  # Feature.float_list = 2, FloatList.value = 1 (packed)
        return _field(2, _field(1, struct.pack("<f", v)))
    if isinstance(v, str):
        v = v.encode()
    elif not isinstance(v, bytes):
        v = json.dumps(v, default=str).encode()
    return _field(1, _field(1, v))  # Feature.bytes_list = 1, BytesList.value = 1


def encode_example(features: dict[str, Any]) -> bytes:
    """Serialize a tf.train.Example {features: {feature: map<string, Feature>}}."""
    entries = b"".join(_field(1, _field(1, k.encode()) + _field(2, _feature(v))) for k, v in features.items())
    return _field(1, entries)


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def _crc32c_py(data: bytes) -> int:
    crc = 0xFFFFFFFF
    t = _TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _pick_crc32c():  # a C implementation when one is installed, else pure Python
    try:
        import google_crc32c

        return lambda d: google_crc32c.value(d)
    except ImportError:
        pass
    try:
        import crc32c

        return crc32c.crc32c
    except ImportError:
        return _crc32c_py


crc32c = _pick_crc32c()


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(f: Any, record: bytes) -> None:
    length = struct.pack("<Q", len(record))
    f.write(length + struct.pack("<I", masked_crc(length)) + record + struct.pack("<I", masked_crc(record)))


def read_tfrecords(f: Any) -> Iterator[bytes]:
    """The records of a TFRecord file object, CRCs checked."""
    while head := f.read(12):
        if len(head) < 12 or struct.unpack("<I", head[8:])[0] != masked_crc(head[:8]):
            raise ValueError("corrupt TFRecord length")
        (n,) = struct.unpack("<Q", head[:8])
        record = f.read(n)
        crc = f.read(4)
        if len(record) < n or len(crc) < 4 or struct.unpack("<I", crc)[0] != masked_crc(record):
            raise ValueError("corrupt TFRecord record")
        yield record


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    shift = val = 0
    while True:
        c = b[i]
        i += 1
        val |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return val, i


def _delimited(b: bytes) -> Iterator[tuple[int, bytes]]:
    """(field number, payload) of the length-delimited fields of a protobuf message."""
    i = 0
    while i < len(b):
        tag, i = _read_varint(b, i)
        if tag & 7 != 2:
            raise ValueError("unexpected protobuf wire type")
        n, i = _read_varint(b, i)
        yield tag >> 3, b[i : i + n]
        i += n


def example_key(record: bytes) -> str | None:
    """The `key` feature of a tf.train.Example written by encode_example."""
    for _, features in _delimited(record):
        for _, entry in _delimited(features):
            kv = dict(_delimited(entry))
            if kv.get(1) == b"key":
                for _, lst in _delimited(kv.get(2, b"")):
                    for _, value in _delimited(lst):
                        return value.decode()
    return None
