"""`clipsearch import` options run through the command, each checked by its effect on the written folder
and on what the imported index serves."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from clipsearch.cli import main
from clipsearch.search.searcher import IndexSearcher

from .conftest import N, make_clip_retrieval
from .test_import import assert_same, queries


def imported(tmp_path, src, tiny_clip, *opts: str, out: str = "index") -> dict:
    argv = ["-q", "import", "--source", str(src), "--index-folder", str(tmp_path / out), "--clip-model", tiny_clip,
            "--no-progress", *opts]  # fmt: skip
    assert main(argv) == 0
    return json.loads((tmp_path / out / "index.json").read_text())


def test_indice_name_picks_the_back_configs_entry(tmp_path, tiny_clip, capsys):
    a = make_clip_retrieval(tmp_path / "a", factory="Flat", param=None, text=False)
    b = make_clip_retrieval(tmp_path / "b", n=300, factory="Flat", param=None, text=False)
    cfg = tmp_path / "indices_paths.json"
    cfg.write_text(json.dumps({"first": str(a), "second": {"indice_folder": str(b)}}))
    code = main(["-q", "import", "--source", str(cfg), "--index-folder", str(tmp_path / "x"), "--clip-model",
                 tiny_clip])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--indice-name" in err and not (tmp_path / "x").exists()  # two entries: which one?
    info = imported(tmp_path, cfg, tiny_clip, "--indice-name", "second")
    assert info["count"] == 300 and IndexSearcher(str(tmp_path / "index")).count == 300
    assert_same(IndexSearcher(str(tmp_path / "index")), "image", b / "image.index", queries())


def test_transfer_and_mmap(tmp_path, tiny_clip):
    """--transfer symlink links the source file, copy writes its own; --mmap / --no-mmap decide how the
    server opens it."""
    src = make_clip_retrieval(tmp_path / "cr", factory="IVF16,Flat", param="nprobe=5", text=False)
    info = imported(tmp_path, src, tiny_clip, "--transfer", "symlink", "--mmap", out="linked")
    assert os.path.islink(tmp_path / "linked" / "image.index")
    assert os.path.realpath(tmp_path / "linked" / "image.index") == os.path.realpath(src / "image.index")
    assert (
        info["indices"]["image"]["mmap"] is True
        and IndexSearcher(str(tmp_path / "linked")).indices["image"].mmap
    )
    info = imported(tmp_path, src, tiny_clip, "--transfer", "copy", "--no-mmap", out="copied")
    copied = tmp_path / "copied" / "image.index"
    assert not os.path.islink(copied) and os.stat(copied).st_ino != os.stat(src / "image.index").st_ino
    assert copied.read_bytes() == (src / "image.index").read_bytes()
    s = IndexSearcher(str(tmp_path / "copied"))
    assert info["indices"]["image"]["mmap"] is False and not s.indices["image"].mmap
    assert_same(s, "image", src / "image.index", queries())


def test_url_and_caption_columns(tmp_path, tiny_clip):
    """Metadata whose URL and caption columns have other names (link, alt): --url-column / --caption-column
    make them the served url and caption."""
    src = make_clip_retrieval(tmp_path / "cr", factory="Flat", param=None, text=False)
    for f in sorted((src / "metadata").glob("*.parquet")):
        t = pq.read_table(f)
        names = {"url": "link", "caption": "alt"}
        pq.write_table(t.rename_columns([names.get(c, c) for c in t.column_names]), f)
    imported(tmp_path, src, tiny_clip, "--url-column", "link", "--caption-column", "alt")
    s = IndexSearcher(str(tmp_path / "index"))
    ids = s.search(queries()[:1], 10).ids[0]
    got = s.rows(ids, ["url", "caption"])
    assert [r["url"] for r in got] == [f"http://img.example/{i}.jpg" for i in ids]
    assert all(r["caption"].startswith(f"caption number {i} of a") for r, i in zip(got, ids, strict=True))
    assert s.count == N


def test_modality_and_device(tmp_path, tiny_clip, capsys):
    """autofaiss `--modality text`: the index is served as the text index; `--device` is where the model
    checks the dimension (cuda without a GPU: a one-line error, nothing written)."""
    import torch

    from .conftest import make_autofaiss

    src = make_autofaiss(tmp_path / "af", factory="IVF8,Flat", param="nprobe=3", index_name="knn.index")
    info = imported(tmp_path, src / "knn.index", tiny_clip, "--from", "autofaiss", "--modality", "text",
                    "--device", "cpu")  # fmt: skip
    assert list(info["indices"]) == ["text"]
    assert_same(IndexSearcher(str(tmp_path / "index")), "text", src / "knn.index", queries())
    argv = ["-q", "import", "--source", str(src / "knn.index"), "--from", "autofaiss", "--index-folder",
            str(tmp_path / "gpu"), "--clip-model", tiny_clip, "--device", "cuda", "--no-progress"]  # fmt: skip
    code = main(argv)
    if torch.cuda.is_available():
        assert code == 0
    else:
        errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert code == 2 and len(errors) == 1 and "cuda" in errors[0].lower(), errors
        assert not (tmp_path / "gpu").exists() or not any((tmp_path / "gpu").iterdir())
