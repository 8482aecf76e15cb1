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
import time
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch import storage
from clipsearch.download.config import DownloadConfig

logger = logging.getLogger(__name__)


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


class _Base:
    """Buffers metadata rows (small) and writes `{shard}.parquet` sorted by key on close."""

    def __init__(self, folder: str, shard_id: int, cfg: DownloadConfig, extras: pa.Schema | None):
        self.folder, self.shard_id, self.cfg = folder, shard_id, cfg
        self.name = f"{shard_id:05d}"
        self.schema = meta_schema(cfg, extras)
        self.ext = cfg.encode_format
        self.rows: list[dict[str, Any]] = []
        self._files: list[_AtomicFile] = []

    def _open(self, name: str) -> _AtomicFile:
        f = _AtomicFile(storage.join(self.folder, name))
        self._files.append(f)
        return f

    def write(self, sample: Sample) -> None:
        self.rows.append(sample.meta)
        if sample.image is not None:
            self._write_image(sample)

    def _write_image(self, sample: Sample) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def carry_over(self, rows: list[dict[str, Any]], redo: set[str]) -> None:
        """--retry-failed: keep these metadata rows of the previous version of this shard, and its stored
        images except those of the `redo` keys (which are being fetched again)."""
        self.rows.extend(rows)

    def _previous(self, suffix: str) -> tuple[Any, str]:
        return storage.get_fs(storage.join(self.folder, f"{self.name}{suffix}"))

    def _finish(self) -> None:
        """Flush format-specific files (before the metadata parquet is written)."""

    def close(self) -> None:
        try:
            self._finish()
            self._write_meta()
        except BaseException:
            self.abort()
            raise
        for f in self._files:
            f.commit()

    def _write_meta(self) -> None:
        self.rows.sort(key=lambda r: r["key"])
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        f = self._open(f"{self.name}.parquet")
        pq.write_table(table, f.f, compression="zstd")

    def abort(self) -> None:
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
    """`{shard}.tar` with `{key}.{ext}`, `{key}.txt`, `{key}.json` per successful sample."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self._tarfile = self._open(f"{self.name}.tar")
        self._tar = tarfile.open(fileobj=self._tarfile.f, mode="w", format=tarfile.USTAR_FORMAT)
        self._mtime = int(time.time())

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = self._mtime
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def _write_image(self, sample: Sample) -> None:
        self._add(f"{sample.key}.{self.ext}", sample.image or b"")
        self._add(f"{sample.key}.txt", (sample.meta.get("caption") or "").encode())
        self._add(f"{sample.key}.json", _json_meta(sample.meta))

    def carry_over(self, rows: list[dict[str, Any]], redo: set[str]) -> None:
        super().carry_over(rows, redo)
        fs, p = self._previous(".tar")
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|") as old:
            for m in old:
                if m.isfile() and m.name.split(".", 1)[0] not in redo:
                    self._tar.addfile(m, old.extractfile(m))

    def _finish(self) -> None:
        self._tar.close()

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:
            logger.debug("tar close failed on abort")
        super().abort()


class FilesWriter(_Base):
    """`{shard}/{key}.{ext,txt,json}`; each file committed as it is written."""

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self._written: list[str] = []
        storage.makedirs(storage.join(self.folder, self.name))

    def _write_image(self, sample: Sample) -> None:
        for name, data in (
            (f"{sample.key}.{self.ext}", sample.image or b""),
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
    """`{shard}.parquet` with the metadata columns and the image bytes in a `{ext}` binary column.

    Rows are streamed in row groups in completion order (the images are not held in memory).
    """

    _GROUP = 256

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.schema = self.schema.append(pa.field(self.ext, pa.binary()))
        self._pf = self._open(f"{self.name}.parquet")
        self._pw = pq.ParquetWriter(self._pf.f, self.schema, compression="zstd")

    def write(self, sample: Sample) -> None:
        row = dict(sample.meta)
        row[self.ext] = sample.image
        self.rows.append(row)
        if len(self.rows) >= self._GROUP:
            self._flush()

    def carry_over(self, rows: list[dict[str, Any]], redo: set[str]) -> None:
        for r in rows:
            image = r.pop(self.ext, None)
            self.write(Sample(r["key"], r, image))

    def _flush(self) -> None:
        if self.rows:
            self._pw.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

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
    """`{shard}.tfrecord` of tf.train.Example records, encoded here without TensorFlow.

    Features: `key`, `{ext}` (image bytes), `txt` (caption) and every metadata field
    (strings as bytes_list, integers as int64_list, floats as float_list; nulls left out).
    """

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self._tf = self._open(f"{self.name}.tfrecord")

    def carry_over(self, rows: list[dict[str, Any]], redo: set[str]) -> None:
        super().carry_over(rows, redo)
        fs, p = self._previous(".tfrecord")  # failed rows have no record: copy every one
        with fs.open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                self._tf.f.write(chunk)

    def _write_image(self, sample: Sample) -> None:
        feats: dict[str, Any] = {self.ext: sample.image or b"", "txt": sample.meta.get("caption") or ""}
        for k, v in sample.meta.items():
            if v is not None and k not in feats:
                feats[k] = v
        write_tfrecord(self._tf.f, encode_example(feats))


WRITERS: dict[str, type[_Base]] = {
    "webdataset": WebDatasetWriter,
    "parquet": ParquetWriter,
    "files": FilesWriter,
    "tfrecord": TFRecordWriter,
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
