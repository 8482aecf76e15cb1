"""End-to-end download runs against the local test server: formats, hostile servers, resume, S3."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_units import parse_example, read_tfrecords

from clipsearch.distribute import DistributorConfig
from clipsearch.download import DownloadConfig, download
from clipsearch.download.__main__ import main as cli_main
from clipsearch.errors import OutputExistsError

# the bomb fixtures trip Pillow's own warning before our check refuses them
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

INPUTS = ["txt", "csv", "tsv", "json", "jsonl", "parquet", "csv.gz", "jsonl.gz"]
OUTPUTS = ["webdataset", "parquet", "files", "tfrecord"]


def write_input(path: Path, fmt: str, rows: list[dict]) -> str:
    """Write rows (dicts with url, caption, extra) as a URL list in `fmt` (suffix .gz: gzipped)."""
    base = fmt.removesuffix(".gz")
    name = str(path / f"urls.{fmt}")
    if base == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), name, row_group_size=3)
        return name
    if base == "txt":
        text = "".join(r["url"] + "\n" for r in rows)
    elif base in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="," if base == "csv" else "\t")
        w.writeheader()
        w.writerows(rows)
        text = buf.getvalue()
    elif base == "json":
        text = json.dumps(rows, indent=1)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    data = text.encode()
    Path(name).write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    return name


def read_output(folder: Path, fmt: str) -> tuple[dict[str, dict], dict[str, bytes]]:
    """(metadata rows by key, stored image bytes by key) of a download output folder."""
    meta, images = {}, {}
    for f in sorted(folder.glob("[0-9]*.parquet")):
        for r in pq.read_table(f).to_pylist():
            img = r.pop("jpg", None)
            meta[r["key"]] = r
            if fmt == "parquet" and img is not None:
                images[r["key"]] = img
    if fmt == "webdataset":
        for t in sorted(folder.glob("*.tar")):
            with tarfile.open(t) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar}
            for name, data in members.items():
                key, ext = name.split(".", 1)
                if ext == "jpg":
                    images[key] = data
                    assert json.loads(members[f"{key}.json"])["key"] == key
                    assert members[f"{key}.txt"].decode() == (meta[key]["caption"] or "")
    elif fmt == "files":
        for p in folder.glob("*/*.jpg"):
            images[p.stem] = p.read_bytes()
            assert json.loads(p.with_suffix(".json").read_text())["status"] == "success"
    elif fmt == "tfrecord":
        for t in sorted(folder.glob("*.tfrecord")):
            for rec in read_tfrecords(t.read_bytes()):
                ex = parse_example(rec)
                images[ex["key"].decode()] = ex["jpg"]
                assert ex["width"] == 256
    return dict(sorted(meta.items())), images


def cfg(tmp_path: Path, url_list: str, **kw) -> DownloadConfig:
    kw.setdefault("distributor", DistributorConfig(processes=1))
    kw.setdefault("progress", False)
    kw.setdefault("output_folder", str(tmp_path / "out"))
    return DownloadConfig(url_list=url_list, **kw)


@pytest.mark.parametrize("out_fmt", OUTPUTS)
@pytest.mark.parametrize("in_fmt", INPUTS)
def test_formats_roundtrip(server, tmp_path, in_fmt, out_fmt):
    paths = ["/img/big.jpg", "/404", "/img/alpha.png", "/robots/noai", "/img/pic.webp", "/redirect"]
    rows = [{"url": server.url(p), "caption": f"caption {i}", "extra": f"x{i}"} for i, p in enumerate(paths)]
    url_list = write_input(tmp_path, in_fmt, rows)
    has_cols = not in_fmt.startswith("txt")
    c = cfg(
        tmp_path,
        url_list,
        output_format=out_fmt,
        number_sample_per_shard=4,
        caption_col="caption" if has_cols else None,
        save_additional_columns=("extra",) if has_cols else (),
    )
    st = download(c)
    out = tmp_path / "out"
    assert st["this_run"]["status"] == {"success": 4, "failed_to_download": 1, "opted_out": 1}
    assert sorted(p.name for p in out.glob("*.stats.json")) == ["00000.stats.json", "00001.stats.json"]
    assert json.loads((out / "run_stats.json").read_text())["total"]["successes"] == 4
    assert not (out / "_inputs").exists() and not list(out.glob(".*.tmp"))
    meta, images = read_output(out, out_fmt)
    assert list(meta) == ["000000000", "000000001", "000000002", "000000003", "000010000", "000010001"]
    assert set(images) == {k for k, r in meta.items() if r["status"] == "success"}
    for k, r in meta.items():
        i = int(k[5:]) + 4 * int(k[:5])
        assert r["url"] == rows[i]["url"]
        assert r["caption"] == (rows[i]["caption"] if has_cols else None)
        if has_cols:
            assert r["extra"] == rows[i]["extra"]
        if r["status"] == "success":
            assert Image.open(io.BytesIO(images[k])).size == (256, 256) == (r["width"], r["height"])
            assert r["sha256"] and len(r["url_hash"]) == 16 and r["error_message"] is None
    assert meta["000000001"]["error_message"] == "HTTP 404"
    assert meta["000000003"]["status"] == "opted_out"
    assert "000000003" not in images  # an opted-out image is never stored
    assert meta["000000000"]["original_width"] == 1024


def test_webdataset_matches_contract(server, tmp_path):
    url_list = write_input(
        tmp_path, "parquet", [{"url": server.url("/img/big.jpg"), "caption": "a red thing"}]
    )
    download(cfg(tmp_path, url_list, caption_col="caption"))
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".clipsearch-download.json",
        "00000.parquet",
        "00000.stats.json",
        "00000.tar",
        "run_stats.json",
    ]
    with tarfile.open(out / "00000.tar") as tar:
        assert tar.getnames() == ["000000000.jpg", "000000000.txt", "000000000.json"]
    cols = pq.read_schema(out / "00000.parquet").names
    assert cols == [
        "key",
        "url",
        "caption",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "sha256",
        "url_hash",
    ]
    stats = json.loads((out / "00000.stats.json").read_text())
    assert stats["shard"] == 0 and stats["count"] == 1 and stats["successes"] == 1
    assert {"status", "top_errors", "duration_s", "start_time", "end_time"} <= set(stats)
    assert (out / "00000.stats.json").stat().st_mtime_ns >= (out / "00000.tar").stat().st_mtime_ns


HOSTILE = {
    "/404": ("failed_to_download", "HTTP 404"),
    "/err500": ("success", None),
    "/always500": ("failed_to_download", "HTTP 500"),
    "/r429": ("success", None),
    "/slow": ("failed_to_download", "timeout"),
    "/endless": ("failed_to_download", "larger than max_bytes"),
    "/gzipbomb": ("failed_to_download", "larger than max_bytes"),
    "/html": ("failed_to_download", "Content-Type text/html"),
    "/octet": ("success", None),
    "/redirect": ("success", None),
    "/loop": ("failed_to_download", "too many redirects"),
    "/robots/noai": ("opted_out", "X-Robots-Tag noai"),
    "/robots/noindex": ("opted_out", "noindex"),
    "/robots/otherbot": ("success", None),
    "/robots/ours": ("opted_out", "clipsearch: noimageai"),
    "/robots/none": ("success", None),
    "/img/bomb.png": ("failed_to_resize", "decompression bomb"),
    "/img/hugebomb.png": ("failed_to_resize", "decompression bomb"),
    "/img/trunc.jpg": ("failed_to_resize", "decode failed"),
    "/img/notimage.jpg": ("failed_to_resize", "not a decodable image"),
    "not a url": ("failed_to_download", "unsupported URL scheme"),
    "http://127.0.0.1:9/refused.jpg": ("failed_to_download", "connection failed"),
}


def test_hostile_servers_cost_one_sample_each(server, tmp_path):
    urls = [p if "://" in p or " " in p else server.url(p + "?hostile") for p in HOSTILE]
    url_list = write_input(tmp_path, "parquet", [{"url": u} for u in urls])
    # a deadline local answers meet at any load; /slow drips for 30 s, past both attempts
    st = download(cfg(tmp_path, url_list, retries=1, timeout=4, max_bytes=4 << 20))
    meta, _ = read_output(tmp_path / "out", "webdataset")
    by_url = {r["url"]: r for r in meta.values()}
    for u, (path, (status, err)) in zip(urls, HOSTILE.items(), strict=True):
        r = by_url[u]
        assert r["status"] == status, (path, r)
        if err:
            assert err in r["error_message"], (path, r)
    assert sum(st["this_run"]["status"].values()) == len(HOSTILE)
    assert dict(st["this_run"]["top_errors"])["decompression bomb"] == 1


def test_retry_after_and_user_agent(server, tmp_path):
    url_list = write_input(tmp_path, "txt", [{"url": server.url("/r429?ua")}])
    t0 = time.monotonic()
    download(cfg(tmp_path, url_list, retries=2, user_agent_token="mybot"))
    assert time.monotonic() - t0 >= 0.9  # waited for Retry-After: 1
    assert server.state.hits["/r429ua"] == 2
    assert any("mybot" in ua and ua.startswith("clipsearch/") for ua in server.state.user_agents)


def test_scoped_opt_out_for_custom_token(server, tmp_path):
    url_list = write_input(tmp_path, "txt", [{"url": server.url("/robots/mybot")}])
    st = download(cfg(tmp_path, url_list, user_agent_token="mybot"))
    assert st["this_run"]["status"] == {"opted_out": 1}
    st = download(
        cfg(tmp_path, url_list, output_folder=str(tmp_path / "o2"), disallowed_header_directives=())
    )
    assert st["this_run"]["status"] == {"success": 1}


def test_dedup_and_hashes(server, tmp_path):
    urls = [server.url(f"/img/other.jpg?i={i}") for i in range(3)] + [server.url("/img/big.jpg")]
    url_list = write_input(tmp_path, "txt", [{"url": u} for u in urls])
    st = download(cfg(tmp_path, url_list, dedup=True, number_sample_per_shard=2))
    assert st["this_run"]["status"] == {"success": 2, "duplicate": 2}
    meta, images = read_output(tmp_path / "out", "webdataset")
    assert len(images) == 2
    dups = [r for r in meta.values() if r["status"] == "duplicate"]
    assert all(r["error_message"].startswith("same content as ") for r in dups)
    st = download(cfg(tmp_path, url_list, output_folder=str(tmp_path / "o2"), compute_hash="md5"))
    meta, _ = read_output(tmp_path / "o2", "webdataset")
    assert all(len(r["md5"]) == 32 and r["sha256"] is None for r in meta.values())


def test_exif_column(server, tmp_path):
    url_list = write_input(tmp_path, "txt", [{"url": server.url("/img/exif.jpg")}])
    download(cfg(tmp_path, url_list, extract_exif=True))
    meta, _ = read_output(tmp_path / "out", "webdataset")
    assert json.loads(meta["000000000"]["exif"])["Model"] == "Model 1"


@pytest.mark.parametrize("out_fmt", OUTPUTS)
def test_retry_failed_fetches_only_failed_rows(server, tmp_path, out_fmt):
    urls = [server.url("/img/big.jpg")] + [server.url(f"/flaky/{i}?{out_fmt}") for i in range(3)]
    url_list = write_input(tmp_path, "txt", [{"url": u} for u in urls])
    c = cfg(tmp_path, url_list, output_format=out_fmt, number_sample_per_shard=2)
    st = download(c)
    assert st["this_run"]["status"] == {"success": 1, "failed_to_download": 3}
    st = download(DownloadConfig(**{**c.__dict__, "retry_failed": True}))
    assert st["this_run"]["processed"] == 3
    assert st["total"]["status"] == {"success": 4}
    meta, images = read_output(tmp_path / "out", out_fmt)
    assert len(meta) == 4 and len(images) == 4
    assert all(r["status"] == "success" for r in meta.values())
    st = download(DownloadConfig(**{**c.__dict__, "retry_failed": True}))  # nothing left to retry
    assert st["this_run"]["processed"] == 0 and st["total"]["successes"] == 4


def test_resume_after_kill(server, tmp_path):
    """Killed with shards 0-1 written and shards 2-5 waiting on URLs the server holds back (an event, not a
    race against the clock), the rerun keeps shards 0-1 byte for byte and fetches only the rest."""
    server.state.gate.clear()
    urls = [server.url(f"/img/small.jpg?k={i}") for i in range(8)]
    urls += [server.url(f"/gated?k={i}") for i in range(8, 24)]
    url_list = write_input(tmp_path, "txt", [{"url": u} for u in urls])
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "clipsearch.download",
        "-q",
        "--url-list",
        url_list,
        "--output-folder",
        str(out),
        "--processes-count",
        "1",
        "--thread-count",
        "2",
        "--number-sample-per-shard",
        "4",
        "--timeout",
        "300",  # the held-back requests wait for the kill, never time out
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("*.stats.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p.name: p.read_bytes() for p in out.glob("*.stats.json")}
    assert sorted(done) == ["00000.stats.json", "00001.stats.json"], proc.stderr.read().decode()[-2000:]
    server.state.gate.set()
    assert not (out / "run_stats.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for name, data in done.items():  # finished shards were not redone
        assert (out / name).read_bytes() == data
    run = json.loads((out / "run_stats.json").read_text())
    assert run["skipped_shards"] == len(done)
    assert run["this_run"]["processed"] == 24 - 4 * len(done)
    assert run["total"]["successes"] == 24
    assert len(list(out.glob("*.stats.json"))) == 6 and not list(out.glob(".*.tmp"))
    for t in out.glob("*.tar"):
        with tarfile.open(t) as tar:
            assert len(tar.getnames()) == 12
    # the resumed folder holds the same bytes as a run that was never killed
    clean = tmp_path / "clean"
    clean_cmd = [str(clean) if a == str(out) else a for a in cmd] + ["--thread-count", "8"]
    r = subprocess.run(clean_cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

    def shards(folder: Path) -> dict[str, bytes]:
        return {
            p.name: p.read_bytes() for p in folder.iterdir() if p.name[0].isdigit() and "stats" not in p.name
        }

    assert shards(out) == shards(clean) and len(shards(out)) == 12


@pytest.mark.parametrize("live", [True, False], ids=["progress+dedup", "quiet"])
def test_multiprocess_run(server, tmp_path, live):
    urls = [server.url(f"/img/other.jpg?mp={i}") for i in range(12)]
    url_list = write_input(tmp_path, "csv", [{"url": u, "caption": "c"} for u in urls])
    c = cfg(
        tmp_path,
        url_list,
        caption_col="caption",
        number_sample_per_shard=4,
        progress=live,
        dedup=live,
        distributor=DistributorConfig(processes=2),
    )
    st = download(c)
    # with dedup, duplicates are found across the worker processes
    assert st["this_run"]["status"] == ({"success": 1, "duplicate": 11} if live else {"success": 12})
    assert st["total"]["shards"] == 3


def test_wandb_is_optional_and_logs(server, tmp_path, monkeypatch):
    url_list = write_input(tmp_path, "txt", [{"url": server.url("/img/big.jpg")}])
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(Exception, match="wandb"):
        download(cfg(tmp_path, url_list, enable_wandb=True))
    assert not (tmp_path / "out").exists()  # failed before any work

    logged = []

    class Run:
        def log(self, d):
            logged.append(d)

        def finish(self):
            logged.append("finished")

    fake = type(sys)("wandb")
    fake.init = lambda **kw: Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    download(cfg(tmp_path, url_list, enable_wandb=True))
    assert logged[-1] == "finished" and any("final/images_per_s" in d for d in logged[:-1])


# ---------------------------------------------------------------- bad input: one line, exit 2, no work


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli_main(["-q", *argv, "--no-progress", "--processes-count", "1"])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (None, ["--url-list", "{tmp}/nope.parquet"], "does not exist"),
        ("garbage", ["--url-list", "{tmp}/bad.parquet"], "cannot read URL list"),
        ("nourl", ["--url-list", "{tmp}/in.csv"], "column 'url' not found"),
        (
            "nourl",
            ["--url-list", "{tmp}/in.csv", "--url-col", "link", "--caption-col", "cap"],
            "column 'cap'",
        ),
        (
            "nourl",
            ["--url-list", "{tmp}/in.csv", "--url-col", "link", "--resize-mode", "stretch"],
            "resize mode",
        ),
        ("nourl", ["--url-list", "{tmp}/in.csv", "--url-col", "link", "--image-size", "big"], "image_size"),
        (
            "nourl",
            ["--url-list", "{tmp}/in.csv", "--url-col", "link", "--input-format", "xml"],
            "input format",
        ),
        ("nourl", ["--url-list", "{tmp}/in.unknown"], "does not exist"),
        ("badjson", ["--url-list", "{tmp}/in.jsonl"], "bad JSON"),
    ],
)
def test_bad_input_fails_fast(capsys, tmp_path, setup, args, message):
    if setup == "garbage":
        (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    elif setup == "nourl":
        (tmp_path / "in.csv").write_text("link,caption\nhttp://127.0.0.1/a.jpg,x\n")
    elif setup == "badjson":
        (tmp_path / "in.jsonl").write_text('{"url": "http://127.0.0.1/a.jpg"\n')
    out = tmp_path / "out"
    code, err = run_cli(
        capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args], "--output-folder", str(out)
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_foreign_output_folder_is_refused(capsys, tmp_path, server):
    url_list = write_input(tmp_path, "txt", [{"url": server.url("/img/big.jpg")}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    code, err = run_cli(capsys, "--url-list", url_list, "--output-folder", str(out))
    assert code == 2 and "not a clipsearch download" in err and len(err.strip().splitlines()) == 1
    code, err = run_cli(
        capsys, "--url-list", url_list, "--output-folder", str(out), "--incremental-mode", "overwrite"
    )
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == ["thesis.docx"]
    with pytest.raises(OutputExistsError):
        download(cfg(tmp_path, url_list))


def test_previous_run_resumes_or_is_overwritten(capsys, tmp_path, server):
    url_list = write_input(tmp_path, "txt", [{"url": server.url("/img/big.jpg")}])
    out = str(tmp_path / "out")
    assert run_cli(capsys, "--url-list", url_list, "--output-folder", out)[0] == 0
    st = download(cfg(tmp_path, url_list))
    assert st["skipped_shards"] == 1 and st["this_run"]["processed"] == 0
    code, err = run_cli(capsys, "--url-list", url_list, "--output-folder", out, "--output-format", "parquet")
    assert code == 2 and "overwrite" in err
    st = download(cfg(tmp_path, url_list, incremental_mode="overwrite", output_format="parquet"))
    assert st["this_run"]["processed"] == 1 and not (tmp_path / "out" / "00000.tar").exists()


def test_top_level_cli(capsys, tmp_path, server):
    from clipsearch.cli import main

    url_list = write_input(tmp_path, "txt", [{"url": server.url("/img/big.jpg")}])
    assert (
        main(
            [
                "-q",
                "download",
                "--url-list",
                url_list,
                "--output-folder",
                str(tmp_path / "o"),
                "--processes-count",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "download",
                "--url-list",
                url_list,
                "--output-folder",
                str(tmp_path / "o2"),
                "--encode-format",
                "gif",
            ]
        )
        == 2
    )


# ---------------------------------------------------------------- S3 against moto on loopback


@pytest.fixture
def s3(monkeypatch):
    import fsspec.config
    import moto.server as moto_server
    import s3fs

    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(
        fsspec.config.conf,
        "s3",
        {"client_kwargs": {"endpoint_url": endpoint}, "key": "testing", "secret": "testing"},
    )
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, key="testing", secret="testing")
    bucket = f"b{uuid.uuid4().hex[:12]}"  # moto's state outlives the server: a fresh bucket per test
    fs.mkdir(bucket)
    yield fs, bucket
    s3fs.S3FileSystem.clear_instance_cache()
    srv.stop()


@pytest.mark.parametrize("in_fmt", ["parquet", "jsonl.gz"])
def test_s3_input_and_output(server, tmp_path, s3, in_fmt):
    s3, bucket = s3
    rows = [{"url": server.url(p), "caption": p} for p in ["/img/big.jpg", "/404", "/img/tall.jpg"]]
    local = write_input(tmp_path, in_fmt, rows)
    s3.put(local, f"{bucket}/in/urls.{in_fmt}")
    c = DownloadConfig(
        url_list=f"s3://{bucket}/in/",
        output_folder=f"s3://{bucket}/images",
        caption_col="caption",
        number_sample_per_shard=2,
        progress=False,
        distributor=DistributorConfig(processes=1),
    )
    st = download(c)
    assert st["total"]["successes"] == 2
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{bucket}/images"))
    assert names == [
        ".clipsearch-download.json",
        "00000.parquet",
        "00000.stats.json",
        "00000.tar",
        "00001.parquet",
        "00001.stats.json",
        "00001.tar",
        "run_stats.json",
    ]
    with s3.open(f"{bucket}/images/00000.tar", "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
        assert tar.getnames() == ["000000000.jpg", "000000000.txt", "000000000.json"]
    st = download(c)  # resume: nothing to do
    assert st["skipped_shards"] == 2 and st["this_run"]["processed"] == 0


def test_verify_hash(server, tmp_path):
    import hashlib

    from dl_assets import ASSETS

    good = hashlib.sha256(ASSETS["big.jpg"][1]).hexdigest()
    rows = [{"url": server.url("/img/big.jpg"), "h": good}, {"url": server.url("/img/tall.jpg"), "h": good}]
    url_list = write_input(tmp_path, "csv", rows)
    st = download(cfg(tmp_path, url_list, verify_hash=("h", "sha256")))
    assert st["this_run"]["status"] == {"success": 1, "failed_to_download": 1}
    assert dict(st["this_run"]["top_errors"]) == {"sha256 mismatch": 1}


def test_per_host_concurrency_cap(server, tmp_path):
    url_list = write_input(tmp_path, "txt", [{"url": server.url(f"/conc?{i}")} for i in range(12)])
    st = download(cfg(tmp_path, url_list, thread_count=8, max_connections_per_host=2, timeout=5))
    assert st["this_run"]["status"] == {"success": 12}
    assert 1 <= server.state.max_in_flight <= 2


@pytest.mark.parametrize("column, expected", [("caption", "a red thing"), ("text", None)])
def test_caption_column_defaults_to_caption(server, tmp_path, column, expected):
    """Without --caption-col, a list's `caption` column is the caption; a list without one has none."""
    url_list = write_input(tmp_path, "parquet", [{"url": server.url("/img/big.jpg"), column: "a red thing"}])
    download(cfg(tmp_path, url_list))
    meta = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert meta[0]["status"] == "success" and meta[0]["caption"] == expected
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert tar.extractfile("000000000.txt").read().decode() == (expected or "")


# ---------------------------------------------------------------- options run through the CLI, by effect


def _palette_png(path: Path, size: tuple[int, int]) -> set[tuple[int, int, int]]:
    """A lossless image of 6 flat colours in 4-pixel blocks; returns the colours."""
    import numpy as np

    palette = np.array(
        [(230, 20, 20), (20, 200, 40), (30, 40, 220), (250, 250, 250), (0, 0, 0), (240, 200, 0)]
    )
    rng = np.random.default_rng(5)
    w, h = size
    blocks = rng.integers(0, len(palette), (h // 4 + 1, w // 4 + 1))
    px = palette[np.kron(blocks, np.ones((4, 4), int))[:h, :w]].astype(np.uint8)
    Image.fromarray(px).save(path)
    return {tuple(c) for c in palette.tolist()}


def _stored_colours(folder: Path) -> dict[str, set[tuple[int, int, int]]]:
    """Colours of each stored image of a `files` output, by original file name."""
    out = {}
    for meta in folder.glob("*/*.json"):
        row = json.loads(meta.read_text())
        if row["status"] == "success":
            im = Image.open(next(meta.parent.glob(meta.stem + ".png"))).convert("RGB")
            out[row["url"].rsplit("/", 1)[1]] = {c for _, c in im.getcolors(1 << 20)}
    return out


def test_interpolation_options(tmp_path, capsys):
    """--upscale-interpolation / --downscale-interpolation: nearest only ever copies source pixels (the output
    holds the palette's colours and no other); lanczos and area blend them into new ones."""
    from clipsearch.demo.server import serve_directory

    www = tmp_path / "www"
    www.mkdir()
    palette = _palette_png(www / "small.png", (24, 20)) | _palette_png(www / "big.png", (400, 300))
    with serve_directory(www) as base:
        url_list = write_input(tmp_path, "txt", [{"url": f"{base}/small.png"}, {"url": f"{base}/big.png"}])
        for up, down in (("nearest", "nearest"), ("lanczos", "area")):
            out = tmp_path / up
            code, err = run_cli(capsys, "--url-list", url_list, "--output-folder", str(out), "--output-format",
                                "files", "--image-size", "64", "--resize-mode", "keep_ratio", "--encode-format",
                                "png", "--upscale-interpolation", up, "--downscale-interpolation", down)  # fmt: skip
            assert code == 0, err
            colours = _stored_colours(out)
            assert set(colours) == {"small.png", "big.png"}
            for name, got in colours.items():
                if up == "nearest":
                    assert got <= palette, name
                else:
                    assert len(got - palette) > 10, name  # blended colours


def test_size_and_byte_limits(server, tmp_path, capsys):
    """--min-image-size rejects the 40x30 image at 35 px; --max-bytes rejects the body above it."""
    from dl_assets import ASSETS

    big = len(ASSETS["big.jpg"][1])
    assert len(ASSETS["tall.jpg"][1]) < big
    urls = [server.url(f"/img/{n}?limits") for n in ("small.jpg", "big.jpg", "tall.jpg")]
    url_list = write_input(tmp_path, "txt", [{"url": u} for u in urls])
    code, err = run_cli(capsys, "--url-list", url_list, "--output-folder", str(tmp_path / "out"),
                        "--output-format", "parquet", "--min-image-size", "35", "--max-bytes", str(big - 1))  # fmt: skip
    assert code == 0, err
    meta, _ = read_output(tmp_path / "out", "parquet")
    by_name = {r["url"].split("/img/")[1].split("?")[0]: r for r in meta.values()}
    assert by_name["tall.jpg"]["status"] == "success"
    assert (
        by_name["small.jpg"]["status"] == "failed_to_resize"
        and "too small" in by_name["small.jpg"]["error_message"]
    )
    assert by_name["big.jpg"]["status"] == "failed_to_download"
    assert "larger than max_bytes" in by_name["big.jpg"]["error_message"]


def test_disable_all_reencoding_keeps_the_served_bytes(server, tmp_path, capsys):
    from dl_assets import ASSETS

    url_list = write_input(tmp_path, "txt", [{"url": server.url("/img/other.jpg")}])
    stored = {}
    for flag in ([], ["--disable-all-reencoding"]):
        out = tmp_path / ("raw" if flag else "resized")
        code, err = run_cli(
            capsys, "--url-list", url_list, "--output-folder", str(out), "--image-size", "64", *flag
        )
        assert code == 0, err
        stored[bool(flag)] = next(iter(read_output(out, "webdataset")[1].values()))
    assert stored[True] == ASSETS["other.jpg"][1]  # as served: 600x600, not 64x64
    assert Image.open(io.BytesIO(stored[False])).size == (64, 64)


def test_decode_threads_size_the_decode_pool(server, tmp_path, capsys, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from clipsearch.download import runner

    sizes: list[int] = []

    class Recording(ThreadPoolExecutor):
        def __init__(self, max_workers=None, thread_name_prefix="", **kw):
            if thread_name_prefix == "decode":
                sizes.append(max_workers)
            super().__init__(max_workers, thread_name_prefix, **kw)

    monkeypatch.setattr(runner, "ThreadPoolExecutor", Recording)
    url_list = write_input(tmp_path, "txt", [{"url": server.url(f"/img/tall.jpg?d{i}")} for i in range(6)])
    code, err = run_cli(capsys, "--url-list", url_list, "--output-folder", str(tmp_path / "out"),
                        "--decode-threads", "3")  # fmt: skip
    assert code == 0, err
    assert sizes == [3]
    assert run_cli(capsys, "--url-list", url_list, "--output-folder", str(tmp_path / "o2"),
                   "--decode-threads", "0")[0] == 2  # fmt: skip


def test_max_connections_per_host_option(server, tmp_path, capsys):
    url_list = write_input(tmp_path, "txt", [{"url": server.url(f"/conc?cli{i}")} for i in range(10)])
    with server.state.lock:
        server.state.in_flight = server.state.max_in_flight = 0
    code, err = run_cli(capsys, "--url-list", url_list, "--output-folder", str(tmp_path / "out"),
                        "--thread-count", "8", "--max-connections-per-host", "1")  # fmt: skip
    assert code == 0, err
    assert server.state.max_in_flight == 1


def test_retry_failed_option(server, tmp_path, capsys):
    urls = [server.url("/img/big.jpg")] + [server.url(f"/flaky/{i}?cli") for i in range(3)]
    url_list = write_input(tmp_path, "txt", [{"url": u} for u in urls])
    args = ["--url-list", url_list, "--output-folder", str(tmp_path / "out"), "--retries", "0"]
    assert run_cli(capsys, *args)[0] == 0
    assert run_cli(capsys, *args, "--retry-failed")[0] == 0
    run = json.loads((tmp_path / "out" / "run_stats.json").read_text())
    assert run["this_run"]["processed"] == 3 and run["total"]["status"] == {"success": 4}


def test_wandb_project_reaches_wandb(server, tmp_path, capsys, monkeypatch):
    """--enable-wandb --wandb-project P: a run is started in project P and the run's figures are logged to it
    (a stand-in wandb module: no account, no network)."""
    import types

    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, data, **kw):
            calls["log"].append(data)

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    url_list = write_input(tmp_path, "txt", [{"url": server.url(f"/img/small.jpg?w{i}")} for i in range(3)])
    code, err = run_cli(capsys, "--url-list", url_list, "--output-folder", str(tmp_path / "out"),
                        "--enable-wandb", "--wandb-project", "my-crawl")  # fmt: skip
    assert code == 0, err
    assert [c["project"] for c in calls["init"]] == ["my-crawl"]
    assert any(d.get("final/successes") == 3 for d in calls["log"]) and calls["finish"] == [True]
