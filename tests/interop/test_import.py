"""`clipsearch import`: foreign layouts -> index folders that the serve searcher opens with identical results."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsearch.cli import main
from clipsearch.errors import ConfigError, InputError, OutputExistsError
from clipsearch.interop import ImportConfig, import_index
from clipsearch.interop.faissio import open_index, read_header
from clipsearch.search.searcher import IndexSearcher

from .conftest import DIM, N, embeddings, make_autofaiss, make_clip_retrieval


def queries(n: int = 20, seed: int = 9) -> np.ndarray:
    return embeddings(n, seed=seed)


def raw_search(path: Path, q: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    return index.search(q, k)


def assert_same(searcher, modality: str, raw_path: Path, q: np.ndarray) -> None:
    d0, i0 = raw_search(raw_path, q)
    res = searcher.search(q, 10, modality=modality)
    np.testing.assert_array_equal(res.ids, i0)
    np.testing.assert_allclose(res.distances, d0, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- clip-retrieval
@pytest.mark.parametrize(
    ("factory", "param", "expected"),
    [
        ("Flat", None, {}),
        ("IVF16,Flat", "nprobe=4", {"nprobe": 4}),
        ("HNSW16", "efSearch=40", {"efSearch": 40}),
    ],
)
def test_clip_retrieval_folder(tmp_path, tiny_clip, factory, param, expected):
    src = make_clip_retrieval(tmp_path / "cr", factory=factory, param=param)
    out = tmp_path / "index"
    info = import_index(
        ImportConfig(str(src), str(out), from_layout="clip-retrieval", clip_model=tiny_clip, progress=False)
    )

    assert sorted(os.listdir(out)) == [
        "image.index",
        "index.json",
        "keywords",
        "metadata.arrow",
        "text.index",
    ]
    written = json.loads((out / "index.json").read_text())
    assert written == json.loads(json.dumps(info))
    assert (written["format"], written["model"], written["dim"], written["count"]) == (
        "clipsearch.index",
        tiny_clip,
        DIM,
        N,
    )
    assert written["metric"] == "inner_product"
    for m in ("image", "text"):
        e = written["indices"][m]
        assert e["file"] == f"{m}.index" and e["factory"] == factory
        assert e["search_params"] == expected and e["curve"] == [] and e["mmap"] is False
        assert "no held-out queries" in e["reason"] and e["autofaiss"]["index_key"] == factory
        assert (out / f"{m}.index").read_bytes() == (src / f"{m}.index").read_bytes()  # reused as is
    assert written["source"]["layout"] == "clip-retrieval"

    s = IndexSearcher(str(out))
    q = queries()
    assert_same(s, "image", src / "image.index", q)
    assert_same(s, "text", src / "text.index", q)
    # metadata row i = faiss id i, in clip-retrieval's (file-name) order; pandas' index column dropped
    ids = s.search(q[:1], 10).ids[0]
    got = s.rows(ids, ["url", "caption", "image_path"])
    assert [r["url"] for r in got] == [f"http://img.example/{i}.jpg" for i in ids]
    assert [r["image_path"] for r in got] == [f"/data/images/{i:05d}.jpg" for i in ids]
    assert "__index_level_0__" not in s.metadata.columns
    # filters run inside the search on the imported metadata, as on a native index
    res = s.search(q, 10, filter='caption contains "red"')
    allowed = [i for i in ids if i >= 0]
    assert allowed and all(i % 3 == 0 for i in res.ids.ravel() if i >= 0)
    s.close()


def test_clip_retrieval_back_config_records_model(tmp_path, tiny_clip):
    src = make_clip_retrieval(tmp_path / "cr", factory="Flat", param=None, text=False)
    cfg = tmp_path / "indices_paths.json"
    cfg.write_text(
        json.dumps({"my_index": {"indice_folder": str(src), "clip_model": f"hf_clip:{tiny_clip}"}})
    )
    info = import_index(ImportConfig(str(cfg), str(tmp_path / "index"), progress=False))  # no --clip-model
    assert info["model"] == tiny_clip
    assert list(info["indices"]) == ["image"]
    assert "clip_model" in info["source"]["model_recorded_in"]


def test_ondisk_ivfdata_layout(tmp_path, tiny_clip):
    """LAION-style: image.index/ is a folder with populated.index + the merged .ivfdata it points to."""
    from faiss.contrib.ondisk import merge_ondisk

    src = make_clip_retrieval(tmp_path / "cr", factory="IVF16,Flat", param="nprobe=4", text=False)
    x = embeddings(N, seed=1)
    trained = faiss.index_factory(DIM, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(x)
    parts = []
    for k in range(2):
        ix = faiss.clone_index(trained)
        ix.add_with_ids(x[k * 300 : (k + 1) * 300], np.arange(k * 300, (k + 1) * 300))
        parts.append(str(tmp_path / f"block{k}.index"))
        faiss.write_index(ix, parts[-1])
    os.remove(src / "image.index")
    (src / "image.index").mkdir()
    merged = faiss.clone_index(trained)
    merge_ondisk(merged, parts, str(src / "image.index" / "merged_index.ivfdata"))
    merged.nprobe = 4
    faiss.write_index(merged, str(src / "image.index" / "populated.index"))

    out = tmp_path / "index"
    info = import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip, progress=False))
    e = info["indices"]["image"]
    assert e["ivfdata"] == "image.ivfdata" and e["mmap"] is False and e["search_params"] == {"nprobe": 4}
    assert (out / "image.ivfdata").read_bytes() == (src / "image.index" / "merged_index.ivfdata").read_bytes()
    s = IndexSearcher(str(out))
    assert_same(s, "image", src / "image.index" / "populated.index", queries())


# ----------------------------------------------------------------------------------------- autofaiss
@pytest.mark.parametrize("interleave", [False, True])
def test_autofaiss_fondant_layout(tmp_path, tiny_clip, interleave):
    src = make_autofaiss(tmp_path / "hub", interleave=interleave)
    out = tmp_path / "index"
    info = import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip, progress=False))
    assert info["source"]["layout"] == "autofaiss"
    assert info["source"]["metadata"]["kind"] == "ids-parquet"
    e = info["indices"]["image"]
    assert e["factory"] == "HNSW16" and e["search_params"] == {"efSearch": 40}
    assert e["autofaiss"]["index_param"] == "efSearch=40"
    s = IndexSearcher(str(out))
    assert s.metadata.columns == ["url"]  # `i` is the row number now
    urls = [r["url"] for r in s.rows(np.arange(N), ["url"])]
    assert urls == [f"http://img.example/{i}.jpg" for i in range(N)]
    assert_same(s, "image", src / "faiss", queries())


def test_autofaiss_index_file_with_explicit_id_mapping(tmp_path, tiny_clip):
    src = make_autofaiss(
        tmp_path / "af", factory="IVF8,Flat", param="nprobe=3", index_name="knn.index", ids_dir="my_ids"
    )
    out = tmp_path / "index"
    info = import_index(
        ImportConfig(
            str(src / "knn.index"), str(out), from_layout="autofaiss", clip_model=tiny_clip,
            id_mapping=str(src / "my_ids"), modality="text", progress=False,
        )
    )  # fmt: skip
    assert list(info["indices"]) == ["text"] and info["indices"]["text"]["search_params"] == {"nprobe": 3}
    assert_same(IndexSearcher(str(out)), "text", src / "knn.index", queries())


def test_remote_fsspec_source(tmp_path, tiny_clip):
    """Any fsspec source: here memory://, streamed with a progress bar."""
    local = make_autofaiss(tmp_path / "hub")
    fs = fsspec.filesystem("memory")
    for p in local.rglob("*"):
        if p.is_file():
            fs.pipe(f"/hubcopy/{p.relative_to(local)}", p.read_bytes())
    out = tmp_path / "index"
    import_index(ImportConfig("memory://hubcopy", str(out), clip_model=tiny_clip, progress=True))
    assert_same(IndexSearcher(str(out)), "image", local / "faiss", queries())
    fs.rm("/hubcopy", recursive=True)


# ----------------------------------------------------------------------------------------- mmap, links
def test_mmap_and_hardlink(tmp_path, tiny_clip):
    src = make_clip_retrieval(tmp_path / "cr", factory="IVF16,Flat", param="nprobe=5", text=False)
    out = tmp_path / "index"
    info = import_index(
        ImportConfig(str(src), str(out), clip_model=tiny_clip, mmap=True, transfer="hardlink", progress=False)
    )
    e = info["indices"]["image"]
    assert e["mmap"] is True and e["transfer"] == "hardlink"
    assert os.stat(out / "image.index").st_ino == os.stat(src / "image.index").st_ino
    s = IndexSearcher(str(out))
    assert s.indices["image"].mmap
    assert_same(s, "image", src / "image.index", queries())


def test_open_index_mmap_keeps_lists_on_disk(tmp_path):
    src = make_clip_retrieval(tmp_path / "cr", factory="IVF16,Flat", text=False)
    path = str(src / "image.index")
    mapped = open_index(path, mmap=True, header=read_header(path))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)  # read from the mapped file, not copied to RAM
    loaded = open_index(path, mmap=False)
    assert isinstance(
        faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded).invlists), faiss.ArrayInvertedLists
    )


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF4,Flat", "IVF4,SQ8", "PCA8,Flat", "IDMap,Flat"])
def test_header_matches_faiss(tmp_path, factory):
    x = embeddings(300, seed=4)
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, np.arange(300)) if factory.startswith("IDMap") else index.add(x)
    faiss.write_index(index, str(tmp_path / "a.index"))
    h = read_header(str(tmp_path / "a.index"))
    assert (h.dim, h.ntotal, h.metric) == (DIM, 300, "inner_product")


# ----------------------------------------------------------------------------------------- tuning
def _text_recall(folder: Path, texts: list[str], tiny_clip: str) -> float:
    """recall@10 of the imported index as served, against numpy's exact search over the generator's vectors."""
    from clipsearch.embed.models import load_clip

    q = load_clip(tiny_clip, device="cpu").encode_text(texts).astype(np.float32)
    truth = np.argsort(-(q @ embeddings(N, seed=1).T), axis=1)[:, :10]
    got = IndexSearcher(str(folder)).search(q, 10, modality="image").ids
    return float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)]))


def test_tuning_on_held_out_queries(tmp_path, tiny_clip):
    """`import --queries FILE --target-recall R`: the index as served reaches R on those queries (exact
    neighbours by numpy); --max-query-ms caps the sweep (3x the budget) so a tiny budget stops at nprobe=1."""
    src = make_clip_retrieval(tmp_path / "cr", factory="IVF16,Flat", param="nprobe=1", text=False)
    texts = [f"a photo of thing {i}" for i in range(30)]
    qfile = tmp_path / "queries.txt"
    qfile.write_text("\n".join(texts) + "\n")
    base = ["-q", "import", "--from", "clip-retrieval", "--source", str(src), "--clip-model", tiny_clip,
            "--queries", str(qfile), "--no-progress"]  # fmt: skip
    assert run_cli([*base, "--index-folder", str(tmp_path / "a"), "--target-recall", "0.95"]) == 0
    e = json.loads((tmp_path / "a" / "index.json").read_text())["indices"]["image"]
    assert "tuned on 30 held-out text queries" in e["reason"] and "reaches recall@10" in e["reason"]
    assert e["search_params"]["nprobe"] > 1  # the stored nprobe=1 does not reach it (below)
    assert _text_recall(tmp_path / "a", texts, tiny_clip) >= 0.95
    assert run_cli([*base, "--index-folder", str(tmp_path / "b"), "--target-recall", "0.95",
                    "--max-query-ms", "0.000001"]) == 0  # fmt: skip
    e = json.loads((tmp_path / "b" / "index.json").read_text())["indices"]["image"]
    assert [c["params"] for c in e["curve"]] == [{"nprobe": 1}] and "below the target" in e["reason"]
    assert _text_recall(tmp_path / "b", texts, tiny_clip) < 0.95


# ----------------------------------------------------------------------------------------- bad input
def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created: {list(out.iterdir()) if out.is_dir() else out}"


def test_unrecognised_folder(tmp_path, tiny_clip):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "notes.txt").write_text("hello")
    out = tmp_path / "index"
    with pytest.raises(
        InputError, match=r"not a recognised index layout.*notes\.txt.*image\.index.*metadata/"
    ):
        import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip))
    assert_nothing_written(out)


def test_clip_retrieval_without_metadata_folder(tmp_path, tiny_clip):
    src = make_clip_retrieval(tmp_path / "cr", factory="Flat", param=None, text=False)
    shutil.rmtree(src / "metadata")
    out = tmp_path / "index"
    with pytest.raises(InputError, match="has no metadata/ folder"):
        import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip))
    assert_nothing_written(out)


def test_ids_parquet_missing_ids(tmp_path, tiny_clip):
    src = make_autofaiss(tmp_path / "hub", drop_ids=(5, 77))
    out = tmp_path / "index"
    with pytest.raises(
        InputError, match=r"does not cover every faiss id: 2 of 600 ids have no row, e\.g\. ids 5, 77"
    ):
        import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip))
    assert_nothing_written(out)


def test_ids_parquet_duplicate_and_out_of_range(tmp_path, tiny_clip):
    src = make_autofaiss(tmp_path / "hub")
    part = sorted((src / "id_mapping").iterdir())[0]
    pq.write_table(
        pa.table({"url": ["x"], "i": pa.array([N + 3], pa.int64())}),
        src / "id_mapping" / "part-extra.parquet",
    )
    with pytest.raises(InputError, match=r"outside the index"):
        import_index(ImportConfig(str(src), str(tmp_path / "o1"), clip_model=tiny_clip))
    (src / "id_mapping" / "part-extra.parquet").unlink()
    shutil.copy(part, src / "id_mapping" / "part-zz-copy.parquet")
    with pytest.raises(InputError, match=r"more than once"):
        import_index(ImportConfig(str(src), str(tmp_path / "o2"), clip_model=tiny_clip))
    assert_nothing_written(tmp_path / "o1")
    assert_nothing_written(tmp_path / "o2")


def test_autofaiss_without_ids(tmp_path, tiny_clip):
    src = make_autofaiss(tmp_path / "hub", ids_dir=None)
    with pytest.raises(InputError, match=r"no ids parquet.*id_mapping/") as e:
        import_index(ImportConfig(str(src / "faiss"), str(tmp_path / "index"), clip_model=tiny_clip))
    assert e.value.hint and "--id-mapping" in e.value.hint


def test_metadata_row_count_disagrees(tmp_path, tiny_clip):
    src = make_clip_retrieval(tmp_path / "cr", factory="Flat", param=None, meta_rows=N - 10)
    out = tmp_path / "index"
    with pytest.raises(
        InputError, match=r"metadata has 590 rows in 3 file\(s\) but the index holds 600 vectors"
    ):
        import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip))
    assert_nothing_written(out)


def test_model_required_when_not_recorded(tmp_path):
    src = make_autofaiss(tmp_path / "hub")
    with pytest.raises(ConfigError, match="does not record which CLIP model") as e:
        import_index(ImportConfig(str(src), str(tmp_path / "index")))
    assert "--clip-model" in e.value.hint
    assert_nothing_written(tmp_path / "index")


def test_dimension_mismatch_refused(tmp_path, tiny_clip_24):
    src = make_autofaiss(tmp_path / "hub")  # 16-dimensional vectors
    out = tmp_path / "index"
    with pytest.raises(
        ConfigError, match=r"makes 24-dimensional embeddings but the index .* holds 16-dimensional"
    ):
        import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip_24))
    assert_nothing_written(out)


def test_output_folder_not_empty(tmp_path, tiny_clip):
    src = make_autofaiss(tmp_path / "hub")
    out = tmp_path / "index"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):
        import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip))
    with pytest.raises(OutputExistsError, match="not a clipsearch index"):
        import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip, overwrite=True))
    assert os.listdir(out) == ["precious.txt"]
    (out / "precious.txt").unlink()
    import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip, progress=False))
    import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip, overwrite=True, progress=False))


def test_failure_midway_leaves_nothing(tmp_path, tiny_clip, monkeypatch):
    src = make_clip_retrieval(tmp_path / "cr", factory="Flat", param=None)
    out = tmp_path / "index"
    import clipsearch.interop.importer as imp

    def boom(*a, **k):
        raise InputError("disk on fire")

    monkeypatch.setattr(imp, "write_arrow", boom)
    with pytest.raises(InputError, match="disk on fire"):
        import_index(ImportConfig(str(src), str(out), clip_model=tiny_clip, progress=False))
    assert_nothing_written(out)


def test_config_validation():
    with pytest.raises(ConfigError, match="unknown source layout"):
        ImportConfig("a", "b", from_layout="lance")
    with pytest.raises(ConfigError):
        ImportConfig("a", "a")
    with pytest.raises(ConfigError, match="--id-mapping is for autofaiss"):
        ImportConfig("a", "b", from_layout="clip-retrieval", id_mapping="ids/")


# ----------------------------------------------------------------------------------------- CLI
def run_cli(argv: list[str]) -> int:
    """`clipsearch ARGV` through the top-level command, as a user runs it."""
    return main(argv)


def test_cli(tmp_path, tiny_clip, capsys):
    src = make_clip_retrieval(tmp_path / "cr", text=False)
    out = tmp_path / "index"
    argv = ["-q", "import", "--from", "clip-retrieval", "--source", str(src), "--index-folder", str(out),
            "--clip-model", tiny_clip, "--no-progress"]  # fmt: skip
    assert run_cli(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == N and summary["indices"]["image"]["search_params"] == {"nprobe": 4}
    assert run_cli(argv) == 2  # the folder is no longer empty
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipsearch import: error:") and "--overwrite" in err and "\n" not in err


# ----------------------------------------------------------------------------------------- serve / query
def test_imported_index_serves_and_queries(tmp_path, tiny_clip):
    """The HTTP API (dedup, safety, filters) and batch query run on an imported index as on a native one."""
    from fastapi.testclient import TestClient

    from clipsearch.embed.models import load_clip
    from clipsearch.query import QueryConfig, query
    from clipsearch.serve import ServeSettings, create_app

    src = make_clip_retrieval(tmp_path / "cr", factory="HNSW16", param="efSearch=40")
    out = tmp_path / "index"
    import_index(ImportConfig(str(src) + "/", str(out), clip_model=tiny_clip, progress=False))
    enc = load_clip(tiny_clip)
    raw = faiss.read_index(str(src / "image.index"))
    q = enc.encode_text(["a red thing"])
    _, expected = raw.search(np.ascontiguousarray(q, dtype=np.float32), 10)

    with TestClient(create_app(ServeSettings(indices={"cr": str(out)}), encoder=enc)) as client:
        r = client.post("/knn", json={"embedding": q[0].tolist(), "k": 10, "deduplicate": False})
        assert r.status_code == 200, r.text
        assert [h["id"] for h in r.json()["results"]] == expected[0].tolist()
        r = client.post("/knn", json={"text": "a red thing", "k": 10, "deduplicate": False})
        assert r.status_code == 200 and len(r.json()["results"]) == 10
        assert r.json()["results"][0]["url"] == f"http://img.example/{expected[0][0]}.jpg"
        r = client.post(
            "/knn",
            json={
                "text": "a red thing",
                "k": 5,
                "deduplicate": True,
                "safety": True,
                "filter": 'caption contains "red"',
            },
        )
        assert r.status_code == 200, r.text
        assert all("red" in h["caption"] for h in r.json()["results"])
        r = client.post(
            "/knn", json={"text": "a thing", "modality": "text", "k": 3, "columns": ["image_path"]}
        )
        assert r.status_code == 200 and r.json()["results"][0]["image_path"].startswith("/data/images/")
        info = client.get("/indices").json()["indices"][0]
        assert info["count"] == N and info["modalities"]["image"]["search_params"] == {"efSearch": 40}

    np.save(tmp_path / "q.npy", np.asarray(q, dtype=np.float32))
    query(
        QueryConfig(
            index=str(out), output=str(tmp_path / "hits.parquet"), embeddings=str(tmp_path / "q.npy"), k=10
        )
    )
    hits = pq.read_table(tmp_path / "hits.parquet").to_pylist()
    assert [h["id"] for h in hits] == expected[0].tolist()
    assert hits[0]["url"] == f"http://img.example/{expected[0][0]}.jpg"


def test_remote_destination(tmp_path, tiny_clip):
    """An fsspec destination is staged locally and uploaded, index.json last; the searcher reads it back."""
    src = make_autofaiss(tmp_path / "hub", factory="Flat", param=None)
    fs = fsspec.filesystem("memory")
    info = import_index(
        ImportConfig(str(src), "memory://imported/index", clip_model=tiny_clip, progress=False)
    )
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/imported/index", detail=False)) == [
        "image.index",
        "index.json",
        "metadata.arrow",
    ]
    assert json.loads(fs.cat("/imported/index/index.json")) == json.loads(json.dumps(info))
    s = IndexSearcher("memory://imported/index", cache_dir=str(tmp_path))
    assert_same(s, "image", src / "faiss", queries())
    fs.rm("/imported", recursive=True)
