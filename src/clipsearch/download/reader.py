"""Read URL lists as a stream and cut them into shards of `number_sample_per_shard` rows.

Parquet inputs are sharded from their footers alone: a shard is a list of (file, first row, row count)
segments and each worker reads only its rows. Other formats (txt, csv, tsv, json, jsonl, gzipped or not)
cannot be seeked by row, so the parent streams them once and writes each unfinished shard's rows to
`OUTPUT/_inputs/{shard:05d}.parquet`, which is on the same (possibly remote) filesystem as the output and
so visible to every worker. Either way the parent holds at most one shard of rows at a time.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from clipsearch import storage
from clipsearch.download.config import INPUT_FORMATS, DownloadConfig
from clipsearch.errors import InputError

logger = logging.getLogger(__name__)
DEFAULT_CAPTION_COL = "caption"

INPUTS_DIR = "_inputs"
_BATCH_ROWS = 8192


@dataclass(frozen=True)
class Segment:
    """Rows [start, start + count) of one parquet file."""

    path: str
    start: int
    count: int


@dataclass(frozen=True)
class Shard:
    """One unit of work: read these segments, download them, write shard `shard_id` into `output_folder`."""

    shard_id: int
    segments: tuple[Segment, ...]
    count: int
    output_folder: str
    #: True: the shard is complete; fetch again only its failed rows (--retry-failed)
    retry: bool = False
    #: digits of the shard's name (--oom-shard-count)
    digits: int = 5

    @property
    def name(self) -> str:
        return f"{self.shard_id:0{self.digits}d}"

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------- discovery and checks


def detect_format(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(".gz"):
        name = name[:-3]
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext == "ndjson":
        return "jsonl"
    return ext if ext in INPUT_FORMATS else None


def _is_glob(path: str) -> bool:
    return any(ch in path.split("://", 1)[-1] for ch in "*?[")


def _glob(url_list: str) -> list[str]:
    """The files matching a glob (`hf://datasets/ORG/NAME/data/*.parquet`, `s3://b/urls/**.csv`), sorted,
    with the URL's protocol kept so that workers open them the same way."""
    fs, p = storage.get_fs(url_list)
    proto = url_list.split("://", 1)[0] + "://" if "://" in url_list else ""
    return sorted(proto + f for f in fs.glob(p) if fs.isfile(f))


def list_input_files(url_list: str, input_format: str | None) -> tuple[list[str], str]:
    """The input files (a file, every matching file of a folder, or of a glob; sorted) and their format."""
    glob = _is_glob(url_list)
    try:
        if glob:
            matched = _glob(url_list)
            exists, isdir = bool(matched), True
        else:
            fs, p = storage.get_fs(url_list)
            exists = fs.exists(p)
            isdir = exists and fs.isdir(p)
    except Exception as e:  # bad protocol, unreachable bucket or hub, permissions...
        raise InputError(
            f"cannot read URL list {url_list}: {type(e).__name__}: {e}", hint="--url-list"
        ) from e
    if not exists:
        what = "no file matches" if glob else "does not exist"
        raise InputError(
            f"URL list {url_list}: {what}" if glob else f"URL list {url_list} {what}", hint="--url-list PATH"
        )
    if isdir:
        found = matched if glob else storage.listdir(url_list)
        files = [f for f in found if not f.rsplit("/", 1)[-1].startswith((".", "_"))]
        if input_format is None:
            fmts = {detect_format(f) for f in files} - {None}
            if len(fmts) != 1:
                raise InputError(
                    f"cannot tell the input format of folder {url_list} (found {sorted(fmts) or 'none'})",
                    hint="--input-format",
                )
            input_format = fmts.pop()
        files = [f for f in files if detect_format(f) == input_format]
        if not files:
            where = "files matching" if glob else "folder"
            raise InputError(
                f"{where} {url_list} hold no {input_format} files"
                if glob
                else f"folder {url_list} holds no {input_format} files",
                hint="--url-list or --input-format",
            )
    else:
        files = [url_list]
        if input_format is None:
            input_format = detect_format(url_list)
            if input_format is None:
                raise InputError(
                    f"cannot tell the input format of {url_list} from its extension", hint="--input-format"
                )
    return files, input_format  # type: ignore[return-value]


def wanted_columns(cfg: DownloadConfig) -> list[str]:
    cols = [cfg.url_col]
    if cfg.caption_col:
        cols.append(cfg.caption_col)
    cols += [c for c in cfg.carried_columns if c not in cols]
    if cfg.verify_hash and cfg.verify_hash[0] not in cols:
        cols.append(cfg.verify_hash[0])
    return cols


def check_columns(path: str, fmt: str, cfg: DownloadConfig) -> DownloadConfig:
    """Fail before any work if the first file is unreadable or lacks a requested column. Returns `cfg`
    with the caption column resolved: without --caption-col, a list's `caption` column is the caption
    (a list with captions is what this tool is for); a list without one is downloaded without captions."""
    names = _names_or_fail(path, fmt)
    if names is None:  # txt, or an empty json file: one url column
        if cfg.caption_col or cfg.carried_columns:
            raise InputError(
                f"{path} is a plain URL list with no columns", hint="--input-format csv|jsonl|parquet"
            )
        return cfg
    if not cfg.caption_col and DEFAULT_CAPTION_COL in names and DEFAULT_CAPTION_COL != cfg.url_col:
        logger.info("captions from the %r column (--caption-col to choose another)", DEFAULT_CAPTION_COL)
        cfg = dataclasses.replace(cfg, caption_col=DEFAULT_CAPTION_COL)
    require_columns(path, names, cfg)
    return cfg


def _names_or_fail(path: str, fmt: str) -> list[str] | None:
    try:
        return _column_names(path, fmt)
    except InputError:
        raise
    except Exception as e:
        raise InputError(
            f"cannot read URL list {path} as {fmt}: {type(e).__name__}: {e}", hint="--input-format"
        ) from e


def require_columns(path: str, names: list[str], cfg: DownloadConfig) -> None:
    """InputError naming the first requested column that `names` (the file's columns) lacks."""
    hints = {cfg.url_col: "--url-col", cfg.caption_col: "--caption-col"}
    if cfg.bbox_col:
        hints.setdefault(cfg.bbox_col, "--bbox-col")
    if cfg.verify_hash:
        hints.setdefault(cfg.verify_hash[0], "--verify-hash")
    for c in wanted_columns(cfg):
        if c not in names:
            raise InputError(
                f"column {c!r} not found in {path} (columns: {', '.join(names[:20])})",
                hint=hints.get(c, "--save-additional-columns"),
            )


def _column_names(path: str, fmt: str) -> list[str] | None:
    if fmt == "txt":
        with _open_text(path) as f:
            f.readline()
        return None
    if fmt == "parquet":
        with _open_bin(path) as f:
            return pq.ParquetFile(f).schema_arrow.names
    if fmt in ("csv", "tsv"):
        with _open_text(path) as f:
            header = next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), None)
        if not header:
            raise InputError(f"{path} is empty: no header row", hint="--url-list")
        return header
    # json / jsonl: the keys of the first record
    for rec in _iter_json_records(path, fmt):
        if not isinstance(rec, dict):
            raise InputError(
                f"{path}: records must be JSON objects, got {type(rec).__name__}", hint="--input-format"
            )
        return list(rec)
    raise InputError(f"{path} holds no records", hint="--url-list")


# ---------------------------------------------------------------- streaming rows


def _open_bin(path: str):
    fs, p = storage.get_fs(path)
    f = fs.open(p, "rb")
    if p.endswith(".gz"):
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def _open_text(path: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(_open_bin(path), encoding="utf-8-sig", errors="replace", newline="")


def _iter_json_records(path: str, fmt: str) -> Iterator[object]:
    """Records of a JSON array or of JSON lines, parsed incrementally either way."""
    with _open_text(path) as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head != "[":
            if fmt == "json" and head and head != "{":
                raise InputError(f"{path} is not a JSON array or JSON lines", hint="--input-format")
            first = head + f.readline()
            for n, line in enumerate(_chain([first], f), 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}: bad JSON on line {n}: {e.msg}", hint="--url-list") from e
            return
        yield from _iter_json_array(f, path)


def _chain(first: list[str], rest: Iterable[str]) -> Iterator[str]:
    yield from first
    yield from rest


def _iter_json_array(f: io.TextIOWrapper, path: str) -> Iterator[object]:
    """Stream the elements of a top-level JSON array (the opening '[' already consumed)."""
    dec = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    while True:
        # skip separators
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] == ","):
                pos += 1
            if pos < len(buf) or eof:
                break
            chunk = f.read(1 << 16)
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk
        if pos >= len(buf):
            raise InputError(f"{path}: JSON array is not closed", hint="--url-list")
        if buf[pos] == "]":
            return
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof:
                    raise InputError(f"{path}: bad JSON: {e.msg}", hint="--url-list") from e
                chunk = f.read(1 << 16)
                buf, pos, eof = buf[pos:] + chunk, 0, not chunk
                continue
            # a number at the very end of the buffer might be cut: make sure something follows it
            if end == len(buf) and not eof:
                chunk = f.read(1 << 16)
                buf, pos, eof = buf[pos:] + chunk, 0, not chunk
                continue
            yield obj
            pos = end
            break


def iter_tables(path: str, fmt: str, cfg: DownloadConfig) -> Iterator[pa.Table]:
    """Stream one input file as tables with columns url, [caption], extras (names as configured)."""
    cols = wanted_columns(cfg)
    if fmt == "txt":
        with _open_text(path) as f:
            batch: list[str] = []
            for line in f:
                u = line.strip()
                if u:
                    batch.append(u)
                    if len(batch) >= _BATCH_ROWS:
                        yield pa.table({cfg.url_col: batch})
                        batch = []
            if batch:
                yield pa.table({cfg.url_col: batch})
    elif fmt == "parquet":
        with _open_bin(path) as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, columns=cols):
                yield pa.Table.from_batches([b])
    elif fmt in ("csv", "tsv"):
        from pyarrow import csv as pacsv

        with _open_bin(path) as f:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=1 << 20),
                parse_options=pacsv.ParseOptions(
                    delimiter="," if fmt == "csv" else "\t", newlines_in_values=True
                ),
                convert_options=pacsv.ConvertOptions(
                    include_columns=cols,
                    column_types={c: pa.string() for c in cols},
                    strings_can_be_null=True,
                ),
            )
            for b in reader:
                yield pa.Table.from_batches([b])
    else:
        rows: list[dict] = []
        for rec in _iter_json_records(path, fmt):
            if not isinstance(rec, dict):
                raise InputError(f"{path}: records must be JSON objects", hint="--input-format")
            rows.append({c: rec.get(c) for c in cols})
            if len(rows) >= _BATCH_ROWS:
                yield _rows_table(rows, cols)
                rows = []
        if rows:
            yield _rows_table(rows, cols)


def _rows_table(rows: list[dict], cols: list[str]) -> pa.Table:
    data = {c: [r[c] for r in rows] for c in cols}
    arrays = {}
    for c, vals in data.items():
        try:
            arrays[c] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them as JSON text
            arrays[c] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in vals])
    return pa.table(arrays)


def normalize(table: pa.Table, cfg: DownloadConfig) -> pa.Table:
    """Rename the configured url/caption columns to `url`/`caption` and cast them to strings."""
    cols = {cfg.url_col: "url"}
    if cfg.caption_col:
        cols[cfg.caption_col] = "caption"
    out = {}
    for src, dst in cols.items():
        col = table.column(src)
        out[dst] = col if col.type == pa.string() else _to_str(col)
    for c in wanted_columns(cfg):
        if c not in cols:
            out[c] = table.column(c)
    return pa.table(out)


def _to_str(col: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.chunked_array(
            [pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())]
        )


# ---------------------------------------------------------------- planning and worker-side reading


Footers = list[tuple[int, list[str]]]


def check_files(files: list[str], fmt: str, cfg: DownloadConfig) -> Footers | None:
    """Check that every input file has the requested columns (a folder whose 40th file lacks the bbox
    column fails here, before the output folder is touched). Parquet: from the footers, which are
    returned for planning; other formats: from each file's header or first record."""
    if fmt == "parquet":
        footers = read_footers(files, cfg)
        for path, (_, names) in zip(files, footers, strict=True):
            require_columns(path, names, cfg)
        return footers
    if fmt != "txt":
        for path in files[1:]:  # the first one was checked by check_columns()
            names = _names_or_fail(path, fmt)
            if names is not None:
                require_columns(path, names, cfg)
    return None


def plan_shards(
    cfg: DownloadConfig,
    files: list[str],
    fmt: str,
    done: set[int],
    first: int = 0,
    footers: Footers | None = None,
) -> tuple[list[Shard], int, int]:
    """Cut the input into shards numbered from `first`. Returns (shards still to do, number of shards,
    number of rows). `footers`: those check_files() read, if any."""
    if fmt == "parquet":
        return _plan_parquet(cfg, files, done, first, footers)
    n = cfg.number_sample_per_shard
    todo: list[Shard] = []
    pending: list[pa.Table] = []
    pending_rows = 0
    shard_id = first
    total = 0

    storage.makedirs(storage.join(cfg.output_folder, INPUTS_DIR))

    def emit(tables: list[pa.Table], count: int) -> None:
        nonlocal shard_id
        if shard_id not in done:
            table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
            path = storage.join(cfg.output_folder, INPUTS_DIR, f"{cfg.shard_name(shard_id)}.parquet")
            with storage.atomic_open(path, "wb") as f:
                pq.write_table(table, f, compression="zstd")
            todo.append(_shard(cfg, shard_id, (Segment(path, 0, count),), count))
        shard_id += 1

    for path in files:
        for t in iter_tables(path, fmt, cfg):
            t = normalize(t, cfg)
            total += t.num_rows
            while t.num_rows:
                take = min(n - pending_rows, t.num_rows)
                pending.append(t.slice(0, take))
                pending_rows += take
                t = t.slice(take)
                if pending_rows == n:
                    emit(pending, pending_rows)
                    pending, pending_rows = [], 0
    if pending_rows:
        emit(pending, pending_rows)
    return todo, shard_id - first, total


def _shard(cfg: DownloadConfig, shard_id: int, segs: tuple[Segment, ...], count: int) -> Shard:
    return Shard(shard_id, segs, count, cfg.output_folder, digits=cfg.oom_shard_count)


def _footer(path: str) -> tuple[int, list[str]]:
    with _open_bin(path) as f:
        pf = pq.ParquetFile(f)
        return pf.metadata.num_rows, pf.schema_arrow.names


#: parquet footers read at once while planning (remote lists: one round trip or two each)
_FOOTER_THREADS = 16


def read_footers(files: list[str], cfg: DownloadConfig) -> Footers:
    """(rows, column names) of each parquet file, read a few at a time (remote lists: a round trip or
    two each)."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(min(_FOOTER_THREADS, len(files))) as pool:
            return list(pool.map(_footer, files))
    except Exception as e:
        raise InputError(
            f"cannot read a parquet footer of {cfg.url_list}: {type(e).__name__}: {e}", hint="--url-list"
        ) from e


def _plan_parquet(
    cfg: DownloadConfig, files: list[str], done: set[int], first: int = 0, footers: Footers | None = None
) -> tuple[list[Shard], int, int]:
    """Shards from the footers alone: a 12.8M-row list in 1,000 files costs 1,000 footer reads and a
    list of segments, never the rows."""
    if footers is None:
        footers = read_footers(files, cfg)
    n = cfg.number_sample_per_shard
    todo: list[Shard] = []
    segs: list[Segment] = []
    seg_rows = 0
    shard_id = first
    total = 0
    for path, (rows, _) in zip(files, footers, strict=True):
        total += rows
        start = 0
        while start < rows:
            take = min(n - seg_rows, rows - start)
            segs.append(Segment(path, start, take))
            seg_rows += take
            start += take
            if seg_rows == n:
                if shard_id not in done:
                    todo.append(_shard(cfg, shard_id, tuple(segs), seg_rows))
                shard_id += 1
                segs, seg_rows = [], 0
    if seg_rows:
        if shard_id not in done:
            todo.append(_shard(cfg, shard_id, tuple(segs), seg_rows))
        shard_id += 1
    return todo, shard_id - first, total


def read_shard(shard: Shard, cfg: DownloadConfig) -> pa.Table:
    """The shard's rows as one table with columns url, [caption], extras."""
    parts = []
    for seg in shard.segments:
        if seg.path.rsplit("/", 2)[-2:-1] == [INPUTS_DIR]:  # a slice written by plan_shards: already normal
            with _open_bin(seg.path) as f:
                parts.append(pq.read_table(f))
        else:
            parts.append(normalize(_read_rows(seg, wanted_columns(cfg)), cfg))
    return pa.concat_tables(parts, promote_options="permissive") if len(parts) > 1 else parts[0]


def _read_rows(seg: Segment, cols: list[str]) -> pa.Table:
    """Rows [start, start+count) of a parquet file, reading only the row groups that hold them."""
    with _open_bin(seg.path) as f:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        first, end = seg.start, seg.start + seg.count
        groups, offset, skip = [], 0, None
        for i in range(md.num_row_groups):
            rg = md.row_group(i).num_rows
            if offset + rg > first and offset < end:
                if skip is None:
                    skip = first - offset
                groups.append(i)
            offset += rg
        batches, got = [], 0
        for b in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=cols):
            if skip:
                drop = min(skip, b.num_rows)
                b, skip = b.slice(drop), skip - drop
            if not b.num_rows:
                continue
            b = b.slice(0, seg.count - got)
            batches.append(b)
            got += b.num_rows
            if got >= seg.count:
                break
        if not batches:
            return pf.schema_arrow.empty_table().select(cols)
        return pa.Table.from_batches(batches)
