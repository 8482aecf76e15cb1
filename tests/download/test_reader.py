"""Streaming URL lists: format detection, incremental JSON, parquet row ranges, planning into shards."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsearch.download import reader
from clipsearch.download.config import DownloadConfig
from clipsearch.errors import InputError


def cfg(tmp_path, url_list, **kw) -> DownloadConfig:
    return DownloadConfig(url_list=str(url_list), output_folder=str(tmp_path / "out"), **kw)


@pytest.mark.parametrize(
    "name,fmt",
    [("a.parquet", "parquet"), ("a.csv.gz", "csv"), ("a.TSV", "tsv"), ("a.ndjson", "jsonl"), ("a.bin", None)],
)
def test_detect_format(name, fmt):
    assert reader.detect_format(f"s3://b/{name}") == fmt


def test_json_array_is_streamed_across_chunk_boundaries(tmp_path, monkeypatch):
    rows = [
        {"url": f"http://127.0.0.1/{i}.jpg", "caption": "x" * (i % 50), "n": i * 1.5} for i in range(3000)
    ]
    p = tmp_path / "big.json.gz"
    p.write_bytes(gzip.compress(json.dumps(rows).encode()))
    got = list(reader._iter_json_records(str(p), "json"))
    assert got == rows


def test_json_lines_under_json_extension(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('{"url": "u1"}\n\n{"url": "u2"}\n')
    assert [r["url"] for r in reader._iter_json_records(str(p), "json")] == ["u1", "u2"]


def test_parquet_shards_span_files_and_read_only_their_rows(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    n = 0
    for f, rows in enumerate([7, 5, 9]):
        urls = [f"http://127.0.0.1/{n + i}.jpg" for i in range(rows)]
        pq.write_table(
            pa.table({"url": urls, "k": list(range(n, n + rows))}), d / f"{f}.parquet", row_group_size=2
        )
        n += rows
    (d / "_SUCCESS").write_text("")  # ignored
    c = cfg(tmp_path, d, number_sample_per_shard=4, save_additional_columns=("k",))
    files, fmt = reader.list_input_files(c.url_list, None)
    assert fmt == "parquet" and len(files) == 3
    todo, n_shards, total = reader.plan_shards(c, files, fmt, done={1})
    assert (n_shards, total) == (6, 21)
    assert [s.shard_id for s in todo] == [0, 2, 3, 4, 5]
    seen = []
    for s in todo:
        t = reader.read_shard(s, c)
        assert t.column_names == ["url", "k"]
        seen += t.column("k").to_pylist()
    assert seen == [0, 1, 2, 3] + list(range(8, 21))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "txt"])
def test_text_inputs_are_sliced_into_shard_files(tmp_path, fmt):
    p = tmp_path / f"in.{fmt}"
    urls = [f"http://127.0.0.1/{i}.jpg" for i in range(10)]
    if fmt == "csv":
        p.write_text("\ufeffurl,caption\n" + "".join(f'{u},"cap, {i}"\n' for i, u in enumerate(urls)))
    elif fmt == "jsonl":
        p.write_text(
            "".join(json.dumps({"url": u, "caption": f"cap, {i}"}) + "\n" for i, u in enumerate(urls))
        )
    else:
        p.write_text("\n".join(urls) + "\n\n")
    c = cfg(tmp_path, p, number_sample_per_shard=4, caption_col=None if fmt == "txt" else "caption")
    reader.check_columns(str(p), fmt, c)  # a UTF-8 BOM is not part of the first column name
    todo, n_shards, total = reader.plan_shards(c, [str(p)], fmt, done={0})
    assert (n_shards, total) == (3, 10) and [s.shard_id for s in todo] == [1, 2]
    assert sorted(x.name for x in (tmp_path / "out" / "_inputs").iterdir()) == [
        "00001.parquet",
        "00002.parquet",
    ]
    t = reader.read_shard(todo[1], c)
    assert t.column("url").to_pylist() == urls[8:]
    if fmt != "txt":
        assert t.column("caption").to_pylist() == ["cap, 8", "cap, 9"]


def test_missing_columns_and_files(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"link": "u"}\n')
    with pytest.raises(InputError, match="column 'url' not found") as e:
        reader.check_columns(str(p), "jsonl", cfg(tmp_path, p))
    assert e.value.hint == "--url-col"
    with pytest.raises(InputError, match="does not exist"):
        reader.list_input_files(str(tmp_path / "nope.csv"), None)
    (tmp_path / "other.csv").write_text("url\nu\n")
    with pytest.raises(InputError, match="input format"):
        reader.list_input_files(str(tmp_path), None)  # a folder of mixed formats
    assert reader.list_input_files(str(tmp_path), "csv") == ([str(tmp_path / "other.csv")], "csv")
