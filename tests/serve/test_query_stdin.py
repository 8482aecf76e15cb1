"""`clipsearch query` reading prompts (and embeddings) from standard input and from pipes, as a user types it,
and its multilingual and aesthetic options."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipsearch.aesthetic.table import save_table
from clipsearch.embed.models import load_clip

from .helpers import build_index

CLI = [sys.executable, "-m", "clipsearch.cli", "-q", "query"]


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    enc = load_clip("clipsearch-tiny", backend="torch")
    folder = str(tmp_path_factory.mktemp("q") / "index")
    build_index(
        folder, n=300, dim=enc.dim, encoder=enc, model="clipsearch-tiny", text_factory=None, noise=0.2
    )
    return folder


def shell(cmd: str) -> subprocess.CompletedProcess:
    """A command line as a user types it in bash (process substitution, FIFOs)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(["bash", "-c", cmd], capture_output=True, env=env, timeout=300)


class Done:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr.encode()


@pytest.fixture
def run(monkeypatch, capsys):
    """`clipsearch query ARGS` in this process (clipsearch.cli.main: one-line errors, exit codes), with
    `stdin` as its standard input."""
    from clipsearch.cli import main

    def go(args: list[str], stdin: bytes = b"") -> Done:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        capsys.readouterr()
        rc = main(["-q", "query", *args])
        return Done(rc, capsys.readouterr().err)

    return go


def test_prompts_from_stdin_and_pipes(tiny_index, tmp_path, run):
    out = tmp_path / "a.parquet"
    p = run(["--index", tiny_index, "--prompts", "-", "-k", "3", "-o", str(out), "--backend", "torch"],
            stdin=b"a red circle\n\na blue star\n")  # fmt: skip
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    rows = pq.read_table(out).to_pylist()
    assert [r["query"] for r in rows] == ["a red circle"] * 3 + ["a blue star"] * 3
    assert rows[0]["caption"].startswith("a red")
    # process substitution: a pipe that cannot seek
    out2 = tmp_path / "b.parquet"
    cmd = (
        " ".join(CLI)
        + f" --index {tiny_index} --prompts <(printf 'a red circle\\na blue star\\n') -k 3 -o {out2} --backend torch"
    )
    p = shell(cmd)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert pq.read_table(out2).to_pylist() == rows
    # a named pipe (FIFO) as a file
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    cmd = (
        f"(printf 'a red circle\\na blue star\\n' > {fifo} &); "
        + " ".join(CLI)
        + f" --index {tiny_index} --prompts {fifo} -k 3 -o {tmp_path / 'c.parquet'} --backend torch"
    )
    p = shell(cmd)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert pq.read_table(tmp_path / "c.parquet").to_pylist() == rows


def test_a_prompt_given_as_the_prompts_file_is_one_line_with_the_pipe_to_use(tiny_index, tmp_path, run):
    out = tmp_path / "t.parquet"
    p = run(["--index", tiny_index, "--prompts", "a red circle", "-o", str(out), "--backend", "torch"])
    err = p.stderr.decode().strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert (
        "prompts file a red circle does not exist" in err
        and "echo 'a red circle' | clipsearch query --prompts -" in err
    )
    p = run(["--index", tiny_index, "--prompts", str(tmp_path / "missing.txt"), "-o", str(out)])
    assert p.returncode == 2 and "echo" not in p.stderr.decode()  # a path: no such hint


def test_embeddings_from_stdin_and_errors(tiny_index, tmp_path, run):
    enc = load_clip("clipsearch-tiny", backend="torch")
    buf = io.BytesIO()
    np.save(buf, enc.encode_text(["a red circle"]))
    out = tmp_path / "e.parquet"
    p = run(["--index", tiny_index, "--embeddings", "-", "-k", "2", "-o", str(out)], stdin=buf.getvalue())
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert pq.read_table(out).num_rows == 2
    p = run(["--index", tiny_index, "--prompts", "-", "-o", str(out)], stdin=b"\n\n")
    err = p.stderr.decode().strip()
    assert p.returncode == 2 and "standard input holds no prompt" in err and "Traceback" not in err
    p = run(["--index", tiny_index, "--prompts", str(tmp_path), "-o", str(out)])
    assert p.returncode == 2 and "is a folder" in p.stderr.decode()


def test_query_aesthetic_and_multilingual_options(tiny_index, tmp_path, run):
    enc = load_clip("clipsearch-tiny", backend="torch")
    idx = tmp_path / "idx"
    shutil.copytree(tiny_index, idx)
    table = np.repeat(enc.encode_text(["a green square"]), 10, axis=0)
    save_table(idx / "aesthetic_embeddings.npy", table)
    base, nudged = tmp_path / "base.parquet", tmp_path / "nudged.parquet"
    args = ["--index", str(idx), "--prompts", "-", "-k", "10", "--backend", "torch"]
    assert run([*args, "-o", str(base)], stdin=b"a red circle\n").returncode == 0
    p = run(
        [*args, "-o", str(nudged), "--aesthetic-score", "9", "--aesthetic-weight", "3"],
        stdin=b"a red circle\n",
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    green = lambda f: sum("green" in c for c in pq.read_table(f).column("caption").to_pylist())  # noqa: E731
    assert green(nudged) > green(base)
    for bad, word in (
        (["--aesthetic-score", "12"], "--aesthetic-score"),
        (["--aesthetic-weight", "nan", "--aesthetic-score", "3"], "--aesthetic-weight"),
    ):
        p = run([*args, "-o", str(nudged), *bad], stdin=b"a red circle\n")
        assert p.returncode == 2 and word in p.stderr.decode(), p.stderr.decode()
    p = run(
        ["--index", tiny_index, "--prompts", "-", "-o", str(nudged), "--aesthetic-score", "3"], stdin=b"x\n"
    )
    assert p.returncode == 2 and "aesthetic" in p.stderr.decode()
    fr = tmp_path / "fr.parquet"
    p = run([*args, "-o", str(fr), "--multilingual-model", "clipsearch-tiny-multilingual"],
            stdin="un cercle rouge\n一个蓝色的正方形\n".encode())  # fmt: skip
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    rows = pq.read_table(fr).to_pylist()
    english = sum("red circle" in c for c in pq.read_table(base).column("caption").to_pylist())
    assert english >= 6  # the same query in English, through the tiny CLIP itself
    assert sum("red circle" in r["caption"] for r in rows[:10]) >= english - 1
    assert sum("blue square" in r["caption"] for r in rows[10:]) >= 6
    p = run([*args, "-o", str(nudged), "--multilingual-model", "/nonexistent/model"], stdin=b"x\n")
    assert p.returncode == 2 and "--multilingual-model" in p.stderr.decode()
