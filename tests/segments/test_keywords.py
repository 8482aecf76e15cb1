"""The keyword index stays in step with the segments: append, delete, compact, hot reload, and the
in-place --text-index-only; `clipsearch index --no-text-index` and batch `query --mode`."""

from __future__ import annotations

import json
import os
import time

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from clipsearch.cli import main
from clipsearch.errors import InputError
from clipsearch.keywords.query import parse
from clipsearch.search.live import open_index
from clipsearch.segments.append import append_segment
from clipsearch.segments.compact import CompactConfig, compact
from clipsearch.segments.delete import DeleteConfig, delete_rows
from clipsearch.serve import ServeConfig, create_app

from .helpers import FakeEncoder, index_cfg


def _kw(folder: str, key: str, k: int = 5) -> list[str]:
    """Keys of the keyword hits of a row's key (captions say `caption of KEY`)."""
    s = open_index(folder)
    try:
        ids, _ = s.keyword_search(parse(key), k)
        return [r["key"] for r in s.rows(ids, ["key"])]
    finally:
        s.close()


def test_build_writes_it_and_records_it(corpus):
    info = json.load(open(os.path.join(corpus["flat"], "index.json")))
    kw = info["keywords"]
    assert kw["dir"] == "keywords" and kw["count"] == 2000 and kw["documents"] == 2000
    assert kw["engine"].startswith("tantivy") and kw["analyzer"].startswith("clipsearch-multilingual")
    keys = corpus["data"]["base"]["keys"]
    assert _kw(corpus["flat"], keys[1234])[0] == keys[1234]  # ids equal the faiss ids / metadata rows


def test_no_text_index_option(corpus, tmp_path):
    out = str(tmp_path / "plain")
    rc = main(["index", "--embeddings-folder", corpus["emb"]["new1"], "--index-folder", out, "--no-text-index",
               "--nb-cores", "1", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert json.load(open(os.path.join(out, "index.json")))["keywords"] is None
    assert not os.path.exists(os.path.join(out, "keywords"))
    s = open_index(out)
    with pytest.raises(InputError, match="no keyword index") as e:
        s.keyword_search(parse("x"), 3)
    assert "--text-index-only" in (e.value.hint or "")
    s.close()
    # added in place afterwards
    assert main(["index", "--index-folder", out, "--text-index-only"]) == 0
    key = corpus["data"]["new1"]["keys"][7]
    assert _kw(out, key)[0] == key


def test_append_delete_compact_keep_it_in_step(corpus, flat_index):
    data = corpus["data"]
    append_segment(index_cfg(corpus["emb"]["new1"], flat_index))
    new_key = data["new1"]["keys"][42]
    assert _kw(flat_index, new_key)[0] == new_key  # the appended segment's own keyword index
    assert os.path.isdir(os.path.join(flat_index, "segments", "00001", "keywords"))
    gone, kept = data["base"]["keys"][5], data["base"]["keys"][6]
    delete_rows(DeleteConfig(flat_index, keys=(gone, new_key)))
    assert gone not in _kw(flat_index, gone) and new_key not in _kw(flat_index, new_key)  # tombstones
    compact(CompactConfig(flat_index, all_segments=True))
    assert _kw(flat_index, kept)[0] == kept and gone not in _kw(flat_index, gone)
    other = data["new1"]["keys"][43]
    assert _kw(flat_index, other)[0] == other  # ids renumbered by the compaction, keywords with them
    assert not os.path.exists(os.path.join(flat_index, "keywords"))  # the base's went with its files


def test_running_server_sees_appended_captions(corpus, flat_index):
    data = corpus["data"]
    app = create_app(ServeConfig(indices={"i": flat_index}), encoder=FakeEncoder())
    key = data["new2"]["keys"][250]

    def top():
        r = client.post("/knn", json={"text": key, "mode": "keyword", "k": 3})
        assert r.status_code == 200, r.text
        return [h["caption"] for h in r.json()["results"]]

    with TestClient(app) as client:
        assert f"caption of {key}" not in top()
        append_segment(index_cfg(corpus["emb"]["new2"], flat_index))
        t0 = time.perf_counter()
        while f"caption of {key}" not in top():
            assert time.perf_counter() - t0 < 60, (
                "the appended caption never became searchable"
            )  # load margin
            time.sleep(0.05)
        r = client.post("/knn", json={"text": key, "mode": "hybrid", "k": 3})
        assert r.json()["results"][0]["caption"] == f"caption of {key}"


def test_query_command_modes(corpus, tmp_path, monkeypatch):
    import clipsearch.embed.models as models

    monkeypatch.setattr(models, "load_clip", lambda *a, **k: FakeEncoder())  # the index's 32-d test model
    keys = corpus["data"]["base"]["keys"]
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{keys[10]}\n{keys[20]} extra words\n")
    for mode, fusion in (("keyword", "weighted"), ("hybrid", "weighted"), ("hybrid", "rrf")):
        out = str(tmp_path / f"{mode}-{fusion}.parquet")
        assert main(["query", "--index", corpus["flat"], "--prompts", str(prompts), "-k", "3", "-o", out,
                     "--mode", mode, "--fusion", fusion]) == 0  # fmt: skip
        t = pq.read_table(out).to_pylist()
        assert {"score", "keyword_score", "similarity"} <= set(t[0])
        first = {r["query"]: r for r in t if r["rank"] == 0}
        caps = {r["caption"] for r in t if r["query"] == keys[10]}
        assert f"caption of {keys[10]}" in caps
        if fusion == "weighted":  # the exact match first (rank fusion only ties it with CLIP's first)
            assert first[keys[10]]["caption"] == f"caption of {keys[10]}"
            assert first[f"{keys[20]} extra words"]["caption"] == f"caption of {keys[20]}"
        if mode == "keyword":
            assert all(r["similarity"] != r["similarity"] for r in t)  # NaN: no query vector
    emb = tmp_path / "q.npy"
    import numpy as np

    np.save(emb, corpus["data"]["base"]["image"][:2])
    rc = main(["query", "--index", corpus["flat"], "--embeddings", str(emb), "-o", str(tmp_path / "x.parquet"),
               "--mode", "keyword"])  # fmt: skip
    assert rc == 2
