"""`clipsearch serve` options and startup errors; `clipsearch query` end to end."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipsearch.errors import ClipsearchError, ConfigError
from clipsearch.query import QueryConfig, query
from clipsearch.serve import cli as serve_cli
from clipsearch.serve.settings import ServeSettings, parse_index_specs


def main(argv: list[str]) -> int:
    """`clipsearch serve|query ...` as clipsearch.cli.main runs them (errors -> one line, exit 2), with only
    this stage's subcommands registered so that other stages' options do not matter here."""
    import sys

    from clipsearch.serve import query_cli

    parser = argparse.ArgumentParser(prog="clipsearch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in (("serve", serve_cli), ("query", query_cli)):
        p = sub.add_parser(name)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ClipsearchError as e:
        print(f"clipsearch {args.command}: error: {e.one_line()}", file=sys.stderr)
        return 2


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    return p.parse_args(argv)


def test_index_specs():
    assert parse_index_specs(["a=/x/idx", "/data/run1/index", "/y/shapes/"]) == {
        "a": "/x/idx",
        "run1": "/data/run1/index",
        "shapes": "/y/shapes/",
    }
    assert parse_index_specs(["s3://bucket/idx"]) == {"idx": "s3://bucket/idx"}
    with pytest.raises(ConfigError, match="twice"):
        parse_index_specs(["a=/x", "a=/y"])


def test_settings_from_args_and_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPSEARCH_SERVE_SETTINGS", raising=False)
    s = serve_cli.settings_from_args(
        parse(
            [
                "--index",
                "a=/x",
                "--index",
                "b=/y",
                "--port",
                "9000",
                "--allow-url-host",
                "127.0.0.1",
                "--clip-model",
                "m",
            ]
        )
    )
    assert s.indices == {"a": "/x", "b": "/y"} and s.port == 9000 and s.allow_url_hosts == ("127.0.0.1",)
    assert s.clip_model == "m" and s.host == "127.0.0.1"
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("indices:\n  c: /z\nport: 8123\ndedup_threshold: 0.9\nunsafe_prompts: [gore]\n")
    s = serve_cli.settings_from_args(parse(["--config", str(cfg), "--index", "a=/x"]))
    assert s.indices == {"c": "/z", "a": "/x"} and s.port == 8123 and s.dedup_threshold == 0.9
    assert s.unsafe_prompts == ("gore",)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"indices": {"a": "/x"}, "nope": 1}))
    with pytest.raises(ConfigError, match="unknown serve setting"):
        serve_cli.settings_from_args(parse(["--config", str(bad)]))


def test_settings_from_env():
    env = {
        "CLIPSEARCH_SERVE_INDICES": "a=/x,b=/y",
        "CLIPSEARCH_SERVE_PORT": "8500",
        "CLIPSEARCH_SERVE_WEB": "false",
    }
    s = ServeSettings.from_env(env)
    assert s.indices == {"a": "/x", "b": "/y"} and s.port == 8500 and s.web is False
    roundtrip = ServeSettings.from_env({"CLIPSEARCH_SERVE_SETTINGS": s.to_json()})
    assert roundtrip == s
    with pytest.raises(ConfigError, match="not a valid int"):
        ServeSettings.from_env({"CLIPSEARCH_SERVE_PORT": "eighty"})


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["serve"], "no index to serve"),
        (["serve", "--index", "x=/nonexistent/folder"], "does not exist"),
        (["serve", "--index", "x=/tmp"], "not an index folder"),
        (["serve", "--index", "bad name=/tmp"], "not valid"),
        (
            ["query", "--index", "/nonexistent", "--embeddings", "e.npy", "-o", "out.parquet"],
            "does not exist",
        ),
        (["query", "--index", "/tmp", "--prompts", "p.txt", "-o", "out.csv"], ".parquet"),
    ],
)
def test_cli_bad_input_is_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_model_dimension_mismatch_names_the_fix(index_dir, tmp_path, capsys):
    """The index records model fake-clip (32-d); the shipped tiny model differs -> a one-line error."""
    code = main(["serve", "--index", f"x={index_dir}", "--clip-model", "clipsearch-tiny", "--port", "1"])
    # (model loading may print progress lines first; the error itself is one line)
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert code == 2 and len(errors) == 1
    assert "--clip-model" in errors[0] and "32-d" in errors[0]


def test_query_by_embeddings_with_filter(index_dir, tmp_path, capsys):
    from .helpers import FakeEncoder

    enc = FakeEncoder(32)
    emb = enc.encode_text(["a red circle", "a blue dog"])
    np.save(tmp_path / "q.npy", emb)
    out = tmp_path / "hits.parquet"
    code = main(
        [
            "query",
            "--index",
            index_dir,
            "--embeddings",
            str(tmp_path / "q.npy"),
            "-k",
            "4",
            "-o",
            str(out),
            "--filter",
            "width >= 300",
            "--columns",
            "width",
        ]
    )
    assert code == 0, capsys.readouterr().err
    t = pq.read_table(out)
    assert t.column_names == ["query", "rank", "id", "url", "caption", "similarity", "width"]
    assert t.num_rows == 8
    rows = t.to_pylist()
    assert [r["query"] for r in rows] == ["0"] * 4 + ["1"] * 4 and [r["rank"] for r in rows[:4]] == [
        0,
        1,
        2,
        3,
    ]
    assert all(r["width"] >= 300 for r in rows) and rows[0]["caption"] == "a red circle"
    assert str(t.schema.field("id").type) == "int64" and str(t.schema.field("similarity").type) == "float"


def test_query_by_prompts(index_dir, tmp_path):
    from .helpers import FakeEncoder

    prompts = tmp_path / "p.txt"
    prompts.write_text("a green tree\n\na yellow star\n")
    out = str(tmp_path / "o.parquet")
    res = query(
        QueryConfig(index=index_dir, prompts=str(prompts), output=out, k=3, modality="text", batch_size=1),
        encoder=FakeEncoder(32),
    )
    assert res == {**res, "queries": 2, "hits": 6}
    rows = pq.read_table(out).to_pylist()
    assert rows[0]["query"] == "a green tree" and rows[0]["caption"] == "a green tree"
    assert rows[3]["query"] == "a yellow star"
    with pytest.raises(ConfigError, match="exactly one"):
        QueryConfig(index=index_dir, output=out)
    with pytest.raises(ConfigError, match="unknown column"):
        query(
            QueryConfig(index=index_dir, prompts=str(prompts), output=out, columns=("nope",)),
            encoder=FakeEncoder(32),
        )


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_no_docs_and_metrics_on_their_own_listener(tmp_path):
    """`serve --no-docs --metrics-host 127.0.0.1 --metrics-port M`: the API answers neither /docs nor
    /metrics; the metrics listener answers /metrics with live gauges."""
    import subprocess
    import sys
    import time

    from .conftest import free_port
    from .helpers import build_index

    folder = str(tmp_path / "index")
    build_index(folder, n=200, dim=64, model="clipsearch-tiny", text_factory=None)
    port, mport = free_port(), free_port()
    argv = ["--index", f"t={folder}", "--port", str(port), "--no-docs"]
    argv += ["--metrics-host", "127.0.0.1", "--metrics-port", str(mport)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipsearch", "serve", *argv], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                if _get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        for path in ("/docs", "/redoc", "/openapi.json", "/metrics"):
            assert _get(f"http://127.0.0.1:{port}{path}")[0] == 404, path
        code, text = _get(f"http://127.0.0.1:{mport}/metrics")
        assert code == 200
        assert 'clipsearch_index_vectors{index="t",modality="image"} 200.0' in text
        assert 'clipsearch_image_decodes{state="waiting"} 0.0' in text
        assert 'clipsearch_requests_total{endpoint="/healthz",status="200"}' in text
    finally:
        proc.terminate()
        proc.wait(30)


def test_metrics_options_in_settings(monkeypatch):
    monkeypatch.delenv("CLIPSEARCH_SERVE_SETTINGS", raising=False)
    s = serve_cli.settings_from_args(parse(["--index", "a=/x", "--metrics-host", "off", "--no-docs"]))
    assert s.docs is False and not s.metrics_on_api and not s.metrics_listener
    s = serve_cli.settings_from_args(parse(["--index", "a=/x"]))
    assert s.docs is True and s.metrics_on_api and s.metrics_port == 9464
    with pytest.raises(ConfigError, match="metrics listener serves one process") as e:
        ServeSettings(indices={"a": "/x"}, workers=2, metrics_host="127.0.0.1")
    assert "--workers 1 with --metrics-host" in e.value.one_line()
    ServeSettings(indices={"a": "/x"}, workers=2, metrics_host="off")  # nothing to listen on: fine


def test_metrics_port_taken_is_one_line(index_dir, encoder):
    import socket

    from clipsearch.serve import create_app
    from clipsearch.serve.metrics import start_metrics_server

    app = create_app(ServeSettings(indices={"x": index_dir}, metrics_host="off"), encoder=encoder)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="cannot listen for metrics") as e:
            start_metrics_server(app.state.clipsearch.metrics, "127.0.0.1", taken.getsockname()[1])
        assert "--metrics-port" in e.value.one_line()
