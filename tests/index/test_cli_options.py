"""`clipsearch index` options run through the command, each checked by its effect on the faiss files (read
back with faiss) and on recall against numpy's exact search over the generator's vectors."""

from __future__ import annotations

import json
import logging
import os

import faiss
import numpy as np
import pytest

from clipsearch.cli import main
from clipsearch.search.searcher import IndexSearcher

from .conftest import make_embeddings_folder


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("index-cli") / "embeddings")
    return root, make_embeddings_folder(root, [1500, 1500], d=32, seed=4)


def build(emb_root: str, out: str, *opts: str) -> dict:
    argv = ["index", "--embeddings-folder", emb_root, "--index-folder", out, "--nb-cores", "1", "--no-progress",
            "--no-text-index", *opts]  # fmt: skip
    assert main(argv) == 0
    return json.loads(open(os.path.join(out, "index.json")).read())


def text_recall(folder: str, arrays: dict) -> float:
    """recall@10 of the image index as served, for caption vectors as queries (numpy's exact top-10)."""
    q = np.ascontiguousarray(arrays["text"][::15])
    truth = np.argsort(-(q @ arrays["image"].T), axis=1)[:, :10]
    got = IndexSearcher(folder).search(q, 10, modality="image").ids
    return float(np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)]))


def test_index_key_metric_and_train_points(emb, tmp_path, caplog):
    root, arrays = emb
    caplog.set_level(logging.INFO, logger="clipsearch.index")
    info = build(
        root,
        str(tmp_path / "i"),
        "--index-key",
        "IVF16,Flat",
        "--metric-type",
        "ip",
        "--max-train-points",
        "1200",
    )
    assert "trained IVF16,Flat on 1200 vectors" in caplog.text  # not the 3000 there are
    assert info["indices"]["image"]["factory"] == "IVF16,Flat" and info["metric"] == "inner_product"
    index = faiss.read_index(str(tmp_path / "i" / "image.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nlist == 16 and index.metric_type == faiss.METRIC_INNER_PRODUCT and index.ntotal == 3000
    assert text_recall(str(tmp_path / "i"), arrays) >= 0.9
    with pytest.raises(SystemExit) as ex:  # inner product is the one metric CLIP vectors are searched with
        main(
            [
                "index",
                "--embeddings-folder",
                root,
                "--index-folder",
                str(tmp_path / "l2"),
                "--metric-type",
                "l2",
            ]
        )
    assert ex.value.code == 2 and not (tmp_path / "l2").exists()


def test_should_be_memory_mappable(emb, tmp_path):
    """In 150K the planner picks in-RAM PQ codes; with the option, an index whose lists stay on disk."""
    root, arrays = emb
    ram = build(root, str(tmp_path / "ram"), "--max-index-memory-usage", "150K")
    assert ram["indices"]["image"]["mmap"] is False and not list((tmp_path / "ram").glob("*.ivfdata"))
    mm = build(root, str(tmp_path / "mm"), "--max-index-memory-usage", "150K", "--should-be-memory-mappable")
    assert mm["indices"]["image"]["mmap"] is True
    index = faiss.read_index(
        str(tmp_path / "mm" / "image.index"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_ONDISK_SAME_DIR
    )
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    assert (tmp_path / "mm" / "image.ivfdata").stat().st_size > 0
    assert text_recall(str(tmp_path / "mm"), arrays) >= 0.5


def test_should_be_memory_mappable_flat(emb, tmp_path):
    """When exact search fits, the option keeps Flat, recorded as memory-mapped and served from a mapping of
    the file (faiss IO_FLAG_MMAP_IFC), with exact results."""
    root, arrays = emb
    plain = build(root, str(tmp_path / "plain"), "--max-index-memory-usage", "10M")
    assert plain["indices"]["image"]["factory"] == "Flat" and plain["indices"]["image"]["mmap"] is False
    info = build(
        root, str(tmp_path / "flat"), "--max-index-memory-usage", "10M", "--should-be-memory-mappable"
    )
    entry = info["indices"]["image"]
    assert entry["factory"] == "Flat" and entry["mmap"] is True and "memory-mapped" in entry["reason"]
    searcher = IndexSearcher(str(tmp_path / "flat"))
    assert searcher.indices["image"].mmap is True
    assert IndexSearcher(str(tmp_path / "plain")).indices["image"].mmap is False
    mapped = text_recall(str(tmp_path / "flat"), arrays)  # exact up to ties of the normalised fp16 rows
    assert mapped >= 0.99 and mapped == text_recall(str(tmp_path / "plain"), arrays)


def test_max_index_query_time_ms(emb, tmp_path):
    """The latency budget bounds the tuning: within 1000 ms the best recall is kept; at 1 ns no point fits,
    the sweep stops at its first (fastest) point and recall drops."""
    root, arrays = emb
    wide = build(
        root, str(tmp_path / "wide"), "--index-key", "IVF16,Flat", "--max-index-query-time-ms", "1000"
    )
    tight = build(
        root, str(tmp_path / "tight"), "--index-key", "IVF16,Flat", "--max-index-query-time-ms", "0.000001"
    )
    assert wide["budget"]["max_index_query_time_ms"] == 1000.0
    t = tight["indices"]["image"]
    assert "no point is faster than" in t["tuning"]["reason"] and len(t["curve"]) == 1
    assert t["search_params"]["nprobe"] < wide["indices"]["image"]["search_params"]["nprobe"]
    assert text_recall(str(tmp_path / "tight"), arrays) < text_recall(str(tmp_path / "wide"), arrays)


def test_rotation_option(emb, tmp_path):
    """--rotation pca-balanced puts a rotation in front of the PQ codes (faiss IndexPreTransform);
    --rotation none leaves the codes on the raw vectors."""
    root, arrays = emb
    for rotation in ("pca-balanced", "none"):
        out = tmp_path / rotation
        info = build(root, str(out), "--index-key", "IVF16,PQ8", "--rotation", rotation)
        assert info["indices"]["image"]["rotation"]["chosen"] == rotation
        index = faiss.read_index(str(out / "image.index"))
        assert isinstance(faiss.downcast_index(index), faiss.IndexPreTransform) == (rotation != "none")
        assert text_recall(str(out), arrays) >= 0.5
