"""`--url-list hf://datasets/ORG/NAME/...`: a file, a folder or a glob of parquet files, read through
fsspec. A local filesystem registered as `hf` stands in for the hub (no test touches the network), so the
paths go through exactly what HfFileSystem gives: `datasets/ORG/NAME/...` without the protocol."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from test_download import cfg, read_output

from clipsearch.download import download, reader
from clipsearch.errors import InputError


class LocalHub(DirFileSystem):
    """`hf://X` is ROOT/X on the local disk."""

    protocol = "hf"
    cachable = False
    root = ""

    def __init__(self, **kw):
        super().__init__(path=self.root, fs=LocalFileSystem())


@pytest.fixture
def hub(tmp_path):
    root = tmp_path / "hub"
    root.mkdir()
    original = fsspec.get_filesystem_class("hf")
    LocalHub.root = str(root)
    fsspec.register_implementation("hf", LocalHub, clobber=True)
    yield root
    fsspec.register_implementation("hf", original, clobber=True)


def make_pool(root: Path, server, files: int = 3, rows: int = 4) -> Path:
    """A DataComp-like repo: parquet files at the top (and in data/), .gitattributes, a README."""
    repo = root / "datasets" / "org" / "pool"
    (repo / "data").mkdir(parents=True)
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    (repo / "README.md").write_text("# pool\n")
    i = 0
    for f in range(files):
        recs = []
        for _ in range(rows):
            recs.append(
                {
                    "uid": f"{i:032x}",
                    "url": server.url(f"/img/face.jpg?hub={i}"),
                    "text": f"sample {i}",
                    "face_bboxes": [[0.1, 0.1, 0.3, 0.4]] if i % 3 == 0 else [],
                }
            )
            i += 1
        table = pa.Table.from_pylist(recs)
        pq.write_table(table, repo / f"{f:02d}{'abcdef'[f]}.parquet", row_group_size=2)
        pq.write_table(table, repo / "data" / f"train-{f:05d}.parquet", row_group_size=3)
    return repo


def test_hub_paths_resolve_as_file_folder_and_glob(hub, server):
    make_pool(hub, server)
    files, fmt = reader.list_input_files("hf://datasets/org/pool", None)  # the repo's top folder
    assert fmt == "parquet" and files == [
        f"hf://datasets/org/pool/{f:02d}{'abcdef'[f]}.parquet" for f in range(3)
    ]
    files, _ = reader.list_input_files("hf://datasets/org/pool/data/*.parquet", None)
    assert files == [f"hf://datasets/org/pool/data/train-{f:05d}.parquet" for f in range(3)]
    files, _ = reader.list_input_files("hf://datasets/org/pool/**/train-0000[02].parquet", None)
    assert files == [
        "hf://datasets/org/pool/data/train-00000.parquet",
        "hf://datasets/org/pool/data/train-00002.parquet",
    ]
    files, _ = reader.list_input_files("hf://datasets/org/pool/data/train-00001.parquet", None)
    assert files == ["hf://datasets/org/pool/data/train-00001.parquet"]
    with pytest.raises(InputError, match="no file matches"):
        reader.list_input_files("hf://datasets/org/pool/data/*.csv", None)
    with pytest.raises(InputError, match="does not exist"):
        reader.list_input_files("hf://datasets/org/other", None)


@pytest.mark.parametrize(
    "url_list", ["hf://datasets/org/pool", "hf://datasets/org/pool/data/train-*.parquet"]
)
def test_download_from_the_hub_with_blurring(hub, server, tmp_path, url_list):
    make_pool(hub, server)
    c = cfg(
        tmp_path,
        url_list,
        caption_col="text",
        save_additional_columns=("uid",),
        bbox_col="face_bboxes",
        number_sample_per_shard=5,
        oom_shard_count=8,
        skip_reencode=True,
    )
    st = download(c)
    assert st["input"] == {"files": 3, "format": "parquet", "rows": 12, "shards": 3}
    assert st["total"]["status"] == {"success": 12}
    meta, images = read_output(tmp_path / "out", "webdataset")
    assert [m["uid"] for m in meta.values()] == [f"{i:032x}" for i in range(12)]
    assert [m["caption"] for m in meta.values()] == [f"sample {i}" for i in range(12)]
    assert len(images) == 12 and sorted(p.name for p in (tmp_path / "out").glob("*.tar"))[0] == "00000000.tar"


def test_planning_reads_footers_only(hub, server, tmp_path, monkeypatch):
    """Shards of a list in many files are planned from the footers: no row is read by the planner."""
    repo = hub / "datasets" / "org" / "many"
    repo.mkdir(parents=True)
    n_files, rows = 40, 2500
    for f in range(n_files):
        urls = [f"http://127.0.0.1:9/{f}/{i}.jpg" for i in range(rows)]
        pq.write_table(
            pa.table({"url": urls, "caption": urls}), repo / f"part-{f:03d}.parquet", row_group_size=1000
        )

    def no_rows(*a, **kw):
        raise AssertionError("the planner read rows")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_rows)
    monkeypatch.setattr(pq.ParquetFile, "read", no_rows)
    monkeypatch.setattr(pq, "read_table", no_rows)
    c = cfg(tmp_path, "hf://datasets/org/many/*.parquet", number_sample_per_shard=7000)
    files, fmt = reader.list_input_files(c.url_list, None)
    footers = reader.check_files(files, fmt, c)
    todo, n_shards, n_rows = reader.plan_shards(c, files, fmt, done={3}, footers=footers)
    assert (
        n_rows == n_files * rows and n_shards == 15 and [s.shard_id for s in todo] == [0, 1, 2, *range(4, 15)]
    )
    # a shard spans files: rows [7000, 14000) are files 2..5
    s1 = todo[1]
    assert [(Path(g.path).name, g.start, g.count) for g in s1.segments] == [
        ("part-002.parquet", 2000, 500),
        ("part-003.parquet", 0, 2500),
        ("part-004.parquet", 0, 2500),
        ("part-005.parquet", 0, 1500),
    ]
    assert sum(s.count for s in todo) == n_rows - 7000
