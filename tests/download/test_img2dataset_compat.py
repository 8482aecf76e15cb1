"""img2dataset's command lines and DataComp's download, end to end against the local server: --bbox-col
face blurring, --oom-shard-count, --incremental-mode extend, --max-shard-retry, --subjob-size, the dummy
output, boolean option values, and shards that are the same bytes on every run."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_download import cfg, read_output, run_cli, write_input

from clipsearch.distribute import DistributorConfig
from clipsearch.download import DownloadConfig, cli, download, runner

FACE = [[0.1, 0.2, 0.35, 0.55]]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def bbox_rows(server, tag: str) -> list[dict]:
    u = lambda name, i: server.url(f"/counted/{name}?{tag}={i}")  # noqa: E731
    return [
        {"url": u("face.jpg", 0), "caption": "one face", "uid": "a", "face_bboxes": FACE},
        {"url": u("face.jpg", 1), "caption": "no box", "uid": "b", "face_bboxes": None},
        {"url": u("face.jpg", 2), "caption": "empty", "uid": "c", "face_bboxes": []},
        {"url": u("face.jpg", 3), "caption": "two", "uid": "d", "face_bboxes": [[0.6, 0.1, 0.9, 0.4], *FACE]},
        {"url": u("face.jpg", 4), "caption": "x1<x0", "uid": "e", "face_bboxes": [[0.5, 0.2, 0.3, 0.4]]},
        {
            "url": u("face.jpg", 5),
            "caption": "nan",
            "uid": "f",
            "face_bboxes": [[0.1, float("nan"), 0.3, 0.4]],
        },
        {"url": u("face.jpg", 6), "caption": "pixels", "uid": "g", "face_bboxes": [[10.0, 20.0, 50.0, 90.0]]},
        {"url": u("face.jpg", 7), "caption": "flat", "uid": "h", "face_bboxes": [0.1, 0.2, 0.3, 0.4]},
    ]


def write_parquet(path: Path, rows: list[dict]) -> str:
    """A list typed like DataComp's: face_bboxes is list<list<double>>."""
    schema = pa.schema(
        [
            ("url", pa.string()),
            ("caption", pa.string()),
            ("uid", pa.string()),
            ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=3)
    return str(path)


def test_bbox_col_blurs_the_boxes_and_fails_malformed_ones(server, tmp_path):
    rows = [r for r in bbox_rows(server, "t1") if r["caption"] != "flat"]
    url_list = write_parquet(tmp_path / "urls.parquet", rows)
    c = cfg(tmp_path, url_list, bbox_col="face_bboxes", save_additional_columns=("uid",), resize_mode="no")
    st = download(c)
    assert st["this_run"]["status"] == {"success": 4, "failed_to_blur": 3}
    meta, images = read_output(tmp_path / "out", "webdataset")
    by_uid = {m["uid"]: m for m in meta.values()}
    assert "x1 < x0" in by_uid["e"]["error_message"]
    assert "NaN" in by_uid["f"]["error_message"]
    assert "outside [0, 1]" in by_uid["g"]["error_message"]
    for uid in "efg":  # never stored, not even fetched
        assert by_uid[uid]["status"] == "failed_to_blur" and by_uid[uid]["key"] not in images
        assert server.state.hits.get(f"/counted/face.jpg?t1={'abcdefg'.index(uid)}") is None
    # the boxes are carried into the metadata, as img2dataset does
    assert by_uid["a"]["face_bboxes"] == FACE and by_uid["b"]["face_bboxes"] is None
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        j = json.loads(tar.extractfile(f"{by_uid['d']['key']}.json").read())
    assert j["face_bboxes"] == [[0.6, 0.1, 0.9, 0.4], *FACE] and j["uid"] == "d"

    # against the same list without --bbox-col: only the boxes changed
    plain = download(
        cfg(
            tmp_path,
            url_list,
            output_folder=str(tmp_path / "plain"),
            resize_mode="no",
            save_additional_columns=("uid",),
        )
    )
    assert plain["this_run"]["status"] == {"success": 7}
    pmeta, pimages = read_output(tmp_path / "plain", "webdataset")
    key = {m["uid"]: k for k, m in pmeta.items()}
    for uid in "bc":  # no boxes: not blurred, same bytes as without --bbox-col
        assert images[by_uid[uid]["key"]] == pimages[key[uid]]
    a, p = pixels(images[by_uid["a"]["key"]]), pixels(pimages[key["a"]])
    diff = np.abs(a - p).max(axis=2)
    # face.jpg is 640x480: the box is x 64..224, y 96..264; the blur stays near it
    assert diff[120:240, 90:200].mean() > 40
    assert diff[:, 330:].max() <= 8 and diff[400:, :].max() <= 8  # far away: JPEG noise only
    d = pixels(images[by_uid["d"]["key"]])
    assert np.abs(d - p).max(axis=2)[60:170, 420:560].mean() > 40  # the second box too


def test_bbox_from_csv_json_text_and_flat_boxes(server, tmp_path):
    rows = bbox_rows(server, "t2")
    for r in rows:
        r["face_bboxes"] = json.dumps(r["face_bboxes"]) if r["face_bboxes"] is not None else ""
    url_list = write_input(tmp_path, "csv", rows)
    st = download(cfg(tmp_path, url_list, bbox_col="face_bboxes", number_sample_per_shard=3))
    assert st["total"]["status"] == {"success": 4, "failed_to_blur": 4}
    meta, _ = read_output(tmp_path / "out", "webdataset")
    flat = next(m for m in meta.values() if m["caption"] == "flat")
    assert "is not [x0, y0, x1, y1]" in flat["error_message"]


def test_missing_bbox_column_fails_before_any_download(capsys, server, tmp_path):
    rows = [{"url": server.url("/counted/face.jpg?t3=0"), "caption": "c"}]
    url_list = write_input(tmp_path, "parquet", rows)
    out = tmp_path / "out"
    code, err = run_cli(
        capsys, "--url-list", url_list, "--output-folder", str(out), "--bbox-col", "face_bboxes"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "column 'face_bboxes' not found" in err and "--bbox-col" in err
    assert not out.exists()
    # a folder whose second file lacks it: refused before the output folder is touched
    folder = tmp_path / "lists"
    folder.mkdir()
    write_parquet(folder / "a.parquet", [dict(r, url=rows[0]["url"]) for r in bbox_rows(server, "t3")[:2]])
    pq.write_table(pa.Table.from_pylist(rows), folder / "b.parquet")
    code, err = run_cli(
        capsys, "--url-list", str(folder), "--output-folder", str(out), "--bbox-col", "face_bboxes"
    )
    assert code == 2 and "b.parquet" in err and "face_bboxes" in err and not out.exists()
    for fmt in ("csv", "jsonl"):  # the same for formats read as a stream
        d = tmp_path / f"lists_{fmt}"
        d.mkdir()
        write_input(d, fmt, [{"url": rows[0]["url"], "face_bboxes": "[]"}])
        (d / "urls.csv").rename(d / "a.csv") if fmt == "csv" else (d / "urls.jsonl").rename(d / "a.jsonl")
        write_input(d, fmt, rows)
        code, err = run_cli(
            capsys, "--url-list", str(d), "--output-folder", str(out), "--bbox-col", "face_bboxes"
        )
        assert code == 2 and f"urls.{fmt}" in err and not out.exists(), err
    assert not any(k.startswith("/counted/face.jpg?t3") for k in server.state.hits)


def test_datacomp_command_line_with_dashes(capsys, server, tmp_path):
    """DataComp's download_upstream options, spelled the way an img2dataset user writes them."""
    rows = [r for r in bbox_rows(server, "t4") if r["caption"] in ("one face", "no box", "two")]
    for r in rows:
        r["text"] = r.pop("caption")
    url_list = str(tmp_path / "pool.parquet")
    pq.write_table(pa.Table.from_pylist(rows), url_list)
    out = tmp_path / "shards"
    # fmt: off
    argv = [
        "--url-list", url_list, "--input-format", "parquet", "--url-col", "url", "--caption-col", "text",
        "--output-format", "webdataset", "--output-folder", str(out), "--processes-count", "1",
        "--thread-count", "4", "--resize-mode", "keep_ratio", "--resize-only-if-bigger", "False",
        "--image-size", "128", "--skip-reencode", "True", "--save-additional-columns", "uid",
        "--enable-wandb", "False", "--oom-shard-count", "8", "--retries", "3", "--bbox-col", "face_bboxes",
        "--distributor", "multiprocessing", "--max-shard-retry", "1", "--number-sample-per-shard", "2",
        "--extract-exif", "False", "--compute-hash", "sha256", "--incremental-mode", "incremental",
        "--max-image-area", "inf", "--max-aspect-ratio", "inf", "--subjob-size", "1000",
        "--disallowed-header-directives", "noai", "noindex",
    ]
    # fmt: on
    code, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000000.tar", "00000001.tar"]
    meta, images = read_output(out, "webdataset")
    assert sorted(meta) == ["000000000000", "000000000001", "000000010000"]
    assert {m["uid"] for m in meta.values()} == {"a", "b", "d"}
    assert len(images) == 3 and all(m["status"] == "success" for m in meta.values())
    # the same command again resumes (nothing to do); another --oom-shard-count is refused
    assert run_cli(capsys, *argv)[0] == 0
    code, err = run_cli(capsys, *[("5" if a == "8" else a) for a in argv])
    assert code == 2 and "oom_shard_count=8" in err


def test_boolean_values_and_img2dataset_spellings():
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    base = ["--url-list", "u.csv.gz", "--output-folder", "o"]
    args = parser.parse_args(
        base
        + ["--skip-reencode", "--extract-exif", "False", "--dedup", "true", "--input-format", "csv.gz"]
        + ["--compute-hash", "None", "--distributor", "pyspark", "--max-shard-retry", "5", "--dedup", "no"]
    )
    c = cli.config_from_args(args)
    assert c.skip_reencode is True and c.extract_exif is False and c.dedup is False  # the last one wins
    assert c.input_format == "csv" and c.compute_hash == "none"
    assert c.distributor.distributor == "spark" and c.distributor.max_retries == 5
    c = cli.config_from_args(parser.parse_args([*base, "--distributor", "multiprocessing"]))
    assert c.distributor.distributor == "local" and c.distributor.max_retries == 2
    with pytest.raises(Exception, match="Ray is not supported"):
        cli.config_from_args(parser.parse_args([*base, "--distributor", "ray"]))
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--skip-reencode", "maybe"])


def test_dummy_output_stores_no_images(server, tmp_path):
    url_list = write_input(tmp_path, "txt", [{"url": server.url(f"/img/big.jpg?d={i}")} for i in range(3)])
    st = download(cfg(tmp_path, url_list, output_format="dummy"))
    assert st["this_run"]["status"] == {"success": 3}
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "00000.parquet",
        "00000.stats.json",
        "run_stats.json",
    ]
    assert pq.read_table(tmp_path / "out" / "00000.parquet").num_rows == 3


def shard_bytes(folder: Path) -> dict[str, bytes]:
    """Every shard file but the stats (which hold timings)."""
    return {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if p.name[0].isdigit() and not p.name.endswith(".stats.json")
    }


@pytest.mark.parametrize("out_fmt", ["webdataset", "parquet", "tfrecord"])
def test_shards_are_the_same_bytes_on_every_run(server, tmp_path, out_fmt):
    urls = [
        server.url(f"/img/{n}?r={i}") for i, n in enumerate(["big.jpg", "404", "tall.jpg", "face.jpg"] * 4)
    ]
    url_list = write_input(tmp_path, "txt", [{"url": u} for u in urls])
    outs = []
    for run in range(2):
        out = tmp_path / f"o{run}"
        download(
            cfg(tmp_path, url_list, output_folder=str(out), output_format=out_fmt, thread_count=8 - 6 * run)
        )
        outs.append(shard_bytes(out))
    assert outs[0] == outs[1] and len(outs[0]) >= 1


def test_incremental_mode_extend_appends_and_resumes(server, tmp_path):
    first = write_input(tmp_path, "txt", [{"url": server.url(f"/img/big.jpg?e={i}")} for i in range(5)])
    more_dir = tmp_path / "more"
    more_dir.mkdir()
    second = write_input(more_dir, "txt", [{"url": server.url(f"/img/tall.jpg?e={i}")} for i in range(3)])
    out = tmp_path / "out"
    base = dict(output_folder=str(out), number_sample_per_shard=2)
    download(cfg(tmp_path, first, **base))  # shards 0-2
    st = download(cfg(tmp_path, second, incremental_mode="extend", **base))
    assert st["input"]["shards"] == 2 and st["this_run"]["processed"] == 3
    assert sorted(p.name for p in out.glob("*.tar")) == [f"0000{i}.tar" for i in range(5)]
    meta, _ = read_output(out, "webdataset")
    assert [m["url"].split("/")[-1] for m in meta.values()] == [f"big.jpg?e={i}" for i in range(5)] + [
        f"tall.jpg?e={i}" for i in range(3)
    ]
    assert st["total"]["count"] == 8
    # a killed extension (its last shard unfinished) resumes in place, to the same bytes
    before = shard_bytes(out)
    marker = json.loads((out / runner.MARKER).read_text())
    marker["runs"][-1]["complete"] = False
    (out / runner.MARKER).write_text(json.dumps(marker))
    (out / "00004.stats.json").unlink()
    st = download(cfg(tmp_path, second, incremental_mode="extend", **base))
    assert st["this_run"]["processed"] == 1 and st["skipped_shards"] == 1
    assert shard_bytes(out) == before
    # a finished extension extended again appends a second copy (img2dataset's extend)
    st = download(cfg(tmp_path, second, incremental_mode="extend", **base))
    assert sorted(p.name for p in out.glob("*.tar"))[-1] == "00006.tar" and st["total"]["count"] == 11
    # and the base list rerun in incremental mode still finds its shards done
    st = download(cfg(tmp_path, first, **base))
    assert st["this_run"]["processed"] == 0 and st["skipped_shards"] == 3


def test_subjob_size_submits_spark_jobs_in_batches(server, tmp_path, monkeypatch):
    url_list = write_input(tmp_path, "txt", [{"url": server.url(f"/img/small.jpg?s={i}")} for i in range(7)])
    batches = []

    def fake_distribute(fn, units, dist, progress=None):  # stands in for Spark: runs inline
        batches.append([u.shard_id for u in units])
        results = [fn(u) for u in units]
        for r in results:
            progress(r)
        return results

    monkeypatch.setattr(runner, "distribute", fake_distribute)
    c = cfg(
        tmp_path,
        url_list,
        number_sample_per_shard=1,
        subjob_size=3,
        distributor=DistributorConfig(distributor="spark", processes=1),
    )
    st = download(c)
    assert batches == [[0, 1, 2], [3, 4, 5], [6]] and st["total"]["successes"] == 7
    batches.clear()
    download(DownloadConfig(**{**c.__dict__, "output_folder": str(tmp_path / "o2"), "subjob_size": 0}))
    assert batches == [list(range(7))]


def test_shard_names_of_any_width_are_ours():
    """Shard names of any width are ours; other names in an output folder are still refused."""
    assert runner._OURS.match("00000000.tar") and runner._OURS.match("123.stats.json")
    assert not runner._OURS.match(f"notes-{uuid.uuid4().hex[:4]}.txt")


def test_blur_strength_option(capsys, server, tmp_path):
    rows = [r for r in bbox_rows(server, "t5") if r["caption"] == "one face"]
    url_list = write_parquet(tmp_path / "urls.parquet", rows)
    stored = {}
    for strength in ("datacomp", "img2dataset-1.47"):
        out = tmp_path / strength
        argv = ["--url-list", url_list, "--output-folder", str(out), "--bbox-col", "face_bboxes"]
        assert run_cli(capsys, *argv, "--blur-strength", strength, "--resize-mode", "no")[0] == 0
        (image,) = read_output(out, "webdataset")[1].values()
        stored[strength] = pixels(image)
    face = (slice(130, 230), slice(90, 200))  # inside the box, away from its rim
    detail = {s: a[face].std(axis=(0, 1)).mean() for s, a in stored.items()}
    assert detail["datacomp"] < 0.5 * detail["img2dataset-1.47"]
    assert np.abs(stored["datacomp"] - stored["img2dataset-1.47"])[:, 360:].max() <= 8  # the same elsewhere


def test_laion_list_values():
    """LAION's img2dataset commands pass lists the way fire reads them."""
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    base = ["--url-list", "laion.parquet", "--output-folder", "o"]
    c = cli.config_from_args(
        parser.parse_args(
            [*base, "--save-additional-columns", '["NSFW","similarity","LICENSE"]']
            + ["--disallowed-header-directives", "[]", "--verify-hash", "['sha256', 'sha256']"]
        )
    )
    assert c.save_additional_columns == ("NSFW", "similarity", "LICENSE")
    assert c.disallowed_header_directives == () and c.verify_hash == ("sha256", "sha256")
    c = cli.config_from_args(
        parser.parse_args([*base, "--save-additional-columns", "a", "b", "--verify-hash", "h", "md5"])
    )
    assert c.save_additional_columns == ("a", "b") and c.verify_hash == ("h", "md5")
    with pytest.raises(Exception, match="column and an algorithm"):
        cli.config_from_args(parser.parse_args([*base, "--verify-hash", "h"]))
