"""`clipsearch import` builds the caption keyword index too (ids = the faiss ids), unless --no-text-index."""

from __future__ import annotations

import json
import os

import pyarrow as pa

from clipsearch.cli import main
from clipsearch.keywords.query import parse
from clipsearch.search.searcher import IndexSearcher

from .conftest import make_clip_retrieval


def test_import_builds_the_keyword_index(tmp_path, tiny_clip):
    src = make_clip_retrieval(tmp_path / "cr", factory="Flat", param=None)
    out = tmp_path / "index"
    assert (
        main(
            [
                "import",
                "--source",
                str(src),
                "--index-folder",
                str(out),
                "--clip-model",
                tiny_clip,
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((out / "index.json").read_text())["keywords"]["count"] > 0
    s = IndexSearcher(str(out))
    try:
        with pa.memory_map(str(out / "metadata.arrow")) as f:
            caps = pa.ipc.open_file(f).read_all().column("caption").to_pylist()
        row = 17
        ids, _ = s.keyword_search(parse(f'"{caps[row]}"'), 50)
        assert row in ids.tolist() and all(caps[i] == caps[row] for i in ids.tolist())
    finally:
        s.close()
    plain = tmp_path / "plain"
    assert main(["import", "--source", str(src), "--index-folder", str(plain), "--clip-model", tiny_clip, "--no-progress",
                 "--no-text-index"]) == 0  # fmt: skip
    assert json.loads((plain / "index.json").read_text())["keywords"] is None
    assert not os.path.exists(plain / "keywords")
