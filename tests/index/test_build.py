"""End-to-end index builds on small embeddings folders, checked against exact search."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsearch.errors import IndexBuildError, InputError, OutputExistsError
from clipsearch.index import IndexConfig, build_index
from clipsearch.index.build import apply_search_params, read_index

from .conftest import clip_like


def cfg(src, out, **kw):
    kw.setdefault("nb_cores", 1)
    kw.setdefault("n_tuning_queries", 100)
    kw.setdefault("progress", False)
    return IndexConfig(src, out, **kw)


def recall(index, xb, q, k=10):
    _, gt = faiss.knn(q, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    _, ids = index.search(q, k)
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, gt, strict=True)])


def test_small_set_is_exact_with_metadata_aligned(emb_folder, tmp_path):
    src, arrays = emb_folder
    out = str(tmp_path / "index")
    info = build_index(cfg(src, out))
    with open(os.path.join(out, "index.json")) as f:
        assert json.load(f) == json.loads(json.dumps(info))
    assert info["count"] == 7500 and info["dim"] == 32 and info["model"] == "test-model"
    assert set(info["indices"]) == {"image", "text"}
    img = info["indices"]["image"]
    assert img["factory"] == "Flat" and img["curve"] and "recall_at_10_text" in img["curve"][0]
    assert sorted(os.listdir(out)) == [
        "image.index",
        "image.trained.index",
        "index.json",
        "keywords",  # the caption keyword index (clipsearch.keywords)
        "metadata.arrow",
        "text.index",
        "text.trained.index",
    ]
    index = read_index(os.path.join(out, "image.index"))
    assert recall(index, arrays["image"], arrays["text"][:50]) == 1.0
    with pa.memory_map(os.path.join(out, "metadata.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.num_rows == 7500
    # id i = row i: the nearest image of image row 4321 is itself, and its key names part 1, row 1321
    _, ids = index.search(arrays["image"][4321:4322], 1)
    assert table.column("key")[int(ids[0, 0])].as_py() == "000011321"


def test_ivf_merged_on_disk_and_memory_mapped(emb_folder, tmp_path):
    src, arrays = emb_folder
    out = str(tmp_path / "index")
    info = build_index(cfg(src, out, index_key="IVF16,SQ8"))
    img = info["indices"]["image"]
    assert img["mmap"] is True and img["ivfdata"] == "image.ivfdata"
    assert os.path.getsize(os.path.join(out, "image.ivfdata")) > 7500 * 32
    # the folder can move: the .ivfdata is found beside the index
    moved = str(tmp_path / "moved")
    os.rename(out, moved)
    index = read_index(os.path.join(moved, "image.index"), mmap=True)
    assert type(faiss.extract_index_ivf(index).invlists).__name__ in ("OnDiskInvertedLists", "InvertedLists")
    apply_search_params(index, img["search_params"])
    assert index.ntotal == 7500
    assert recall(index, arrays["image"], arrays["text"][:100]) >= 0.9


def test_fast_scan_with_refine_meets_min_recall_on_text_queries(emb_folder, tmp_path):
    src, arrays = emb_folder
    out = str(tmp_path / "index")
    info = build_index(cfg(src, out, index_key="IVF16,PQ8x4fsr,Refine(SQ8)", min_recall=0.9))
    img = info["indices"]["image"]
    assert img["mmap"] is False and "k_factor" in img["search_params"] and "nprobe" in img["search_params"]
    index = read_index(os.path.join(out, "image.index"))
    apply_search_params(index, img["search_params"])
    # caption queries, mostly not among the 100 the tuner drew
    assert recall(index, arrays["image"], arrays["text"][::25]) >= 0.85
    chosen = [p for p in img["curve"] if p["params"] == img["search_params"]][0]
    assert chosen["recall_at_10_text"] >= 0.9


def test_wide_pq_refine_codes_train_with_bounded_settings(emb_folder, tmp_path):
    from clipsearch.index.build import WIDE_PQ_ITERATIONS, WIDE_PQ_SAMPLE, configure_training

    fresh = faiss.index_factory(32, "PQ8x4fs,Refine(PQ16x9)", faiss.METRIC_INNER_PRODUCT)
    configure_training(fresh)
    cp = faiss.downcast_index(fresh.refine_index).pq.cp
    # 512 centroids: 128 points each, not faiss's 256 (a bounded sample per sub-quantizer)
    assert (cp.niter, cp.max_points_per_centroid) == (WIDE_PQ_ITERATIONS, WIDE_PQ_SAMPLE // 512) == (25, 128)
    assert cp.min_points_per_centroid <= 8
    assert not faiss.downcast_index(fresh.refine_index).do_polysemous_training  # hours on wide codes
    plain = faiss.index_factory(32, "PQ8x8", faiss.METRIC_INNER_PRODUCT)
    configure_training(plain)
    default = faiss.ClusteringParameters()
    assert plain.pq.cp.min_points_per_centroid == default.min_points_per_centroid  # 4-d x8: faiss's own
    ivfpq = faiss.index_factory(32, "IVF4,PQ16x10", faiss.METRIC_INNER_PRODUCT)
    assert ivfpq.do_polysemous_training  # what index_factory sets
    configure_training(ivfpq)
    assert not ivfpq.do_polysemous_training and ivfpq.pq.cp.max_points_per_centroid == 64

    src, arrays = emb_folder
    out = str(tmp_path / "index")
    info = build_index(cfg(src, out, index_key="PQ8x4fs,Refine(PQ16x9)", min_recall=0.9))
    img = info["indices"]["image"]
    index = read_index(os.path.join(out, "image.index"))
    refine = faiss.downcast_index(index.refine_index)
    assert isinstance(refine, faiss.IndexPQ) and refine.pq.nbits == 9 and refine.sa_code_size() == 18
    apply_search_params(index, img["search_params"])
    assert recall(index, arrays["image"], arrays["text"][::25]) >= 0.85


def test_plain_npy_folder_with_tuning_queries_and_bad_rows(tmp_path):
    folder = tmp_path / "npy"
    folder.mkdir()
    a, t = clip_like(3000, 16, seed=1)
    b, _ = clip_like(2000, 16, seed=2)
    a[10] = np.nan
    b[5] = 0
    np.save(folder / "b.npy", b)
    np.save(folder / "a.npy", a.astype(np.float16))
    np.save(tmp_path / "q.npy", t[:200])
    out = str(tmp_path / "index")
    info = build_index(cfg(str(folder), out, input_format="npy", tuning_queries=str(tmp_path / "q.npy")))
    assert info["count"] == 4998 and info["skipped"] == {"nan": 1, "zero": 1, "samples": 2}
    assert set(info["indices"]) == {"image"}
    assert info["indices"]["image"]["tuning"]["text_like_source"] == "--tuning-queries"
    table = pa.ipc.open_file(pa.memory_map(os.path.join(out, "metadata.arrow"))).read_all()
    assert table.column_names == ["part", "row"] and table.num_rows == 4998
    # ids are row numbers in file-name order, bad rows left out
    assert table.slice(10, 1).to_pylist() == [{"part": "a", "row": 11}]
    assert table.slice(2999 + 5, 1).to_pylist() == [{"part": "b", "row": 6}]
    index = read_index(os.path.join(out, "image.index"))
    _, ids = index.search(np.ascontiguousarray(b[6:7]), 1)
    assert ids[0, 0] == 2999 + 5


def test_parquet_folder(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for i in range(2):
        x, _ = clip_like(1000, 8, seed=i)
        pq.write_table(
            pa.table({"id": np.arange(1000) + 1000 * i, "emb": list(x)}), folder / f"part{i}.parquet"
        )
    out = str(tmp_path / "index")
    info = build_index(cfg(str(folder), out, input_format="parquet", embedding_column="emb"))
    assert info["count"] == 2000
    table = pa.ipc.open_file(pa.memory_map(os.path.join(out, "metadata.arrow"))).read_all()
    assert table.column_names == ["part", "row", "id"]
    assert table.column("id").to_pylist() == list(range(2000))


def test_bad_inputs_fail_before_any_work(tmp_path):
    out = str(tmp_path / "index")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no embeddings"):
        build_index(cfg(str(empty), out))
    with pytest.raises(InputError, match="no .npy"):
        build_index(cfg(str(empty), out, input_format="npy"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.ones((10, 8), np.float32))
    np.save(mixed / "b.npy", np.ones((10, 9), np.float32))
    with pytest.raises(InputError, match="mismatched dimensions"):
        build_index(cfg(str(mixed), out, input_format="npy"))
    zeros = tmp_path / "zeros"
    zeros.mkdir()
    np.save(zeros / "a.npy", np.zeros((10, 8), np.float32))
    with pytest.raises(InputError, match="NaN or all-zero"):
        build_index(cfg(str(zeros), out, input_format="npy"))
    assert not os.path.exists(out)


def test_budget_error_before_reading_data(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    # a large .npy whose data is never read: the plan fails on the header's shape
    arr = np.lib.format.open_memmap(folder / "a.npy", mode="w+", dtype=np.float16, shape=(200_000, 64))
    del arr
    out = str(tmp_path / "index")
    with pytest.raises(IndexBuildError, match="smallest that works is"):
        build_index(cfg(str(folder), out, input_format="npy", max_index_memory_usage="1M"))
    assert not os.path.exists(os.path.join(out, "image.trained.index"))


def test_output_folder_holding_something_else(emb_folder, tmp_path):
    src, _ = emb_folder
    out = tmp_path / "index"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError):
        build_index(cfg(src, str(out)))
    assert os.listdir(out) == ["precious.txt"]


def test_cli(emb_folder, tmp_path, capsys):
    from clipsearch.cli import main

    src, _ = emb_folder
    out = str(tmp_path / "index")
    rc = main(
        ["-q", "index", "--embeddings-folder", src, "--index-folder", out, "--nb-cores", "1", "--no-progress"]
    )
    assert rc == 0 and os.path.exists(os.path.join(out, "index.json"))
    rc = main(["-q", "index", "--embeddings-folder", src, "--index-folder", out])
    assert rc == 2 and "already holds" in capsys.readouterr().err


def test_part_units_are_picklable_and_run_in_a_process_pool(emb_folder, tmp_path):
    import pickle

    from clipsearch.distribute import DistributorConfig
    from clipsearch.index.build import PartUnit
    from clipsearch.index.readers import open_source

    src, arrays = emb_folder
    source = open_source(src, "embeddings")
    unit = PartUnit("00000", source.parts[0], source, ("image", "text"), ("ivf", "ivf"), 0, "/x", 1000, 1)
    assert pickle.loads(pickle.dumps(unit)) == unit
    out = str(tmp_path / "index")
    info = build_index(
        cfg(src, out, index_key="IVF16,Flat", distributor=DistributorConfig(processes=2), nb_cores=2)
    )
    index = read_index(os.path.join(out, "image.index"), mmap=True)
    apply_search_params(index, info["indices"]["image"]["search_params"])
    assert index.ntotal == 7500 and recall(index, arrays["image"], arrays["text"][:50]) >= 0.9


@pytest.mark.parametrize("key", ["IVF16,PQ8x4fs", "IVF8,PQ16x4fsr"])
def test_fast_scan_lists_merge_like_one_add(key):
    """Merging many fast-scan parts (list sizes crossing block boundaries) gives the same index as adding
    all vectors to one: faiss's own merge_from corrupts the heap in this case."""
    from clipsearch.index.build import merge_block_lists

    rng = np.random.default_rng(0)
    x = rng.standard_normal((24_000, 16)).astype(np.float32)
    trained = faiss.index_factory(16, key, faiss.METRIC_INNER_PRODUCT)
    trained.train(x[:4000])
    whole = faiss.clone_index(trained)
    whole.add(x)
    parts = []
    for i in range(12):
        part = faiss.clone_index(trained)
        part.add_with_ids(x[i * 2000 : (i + 1) * 2000], np.arange(i * 2000, (i + 1) * 2000))
        parts.append(part)
    merged = faiss.clone_index(trained)
    merge_block_lists(faiss.extract_index_ivf(merged), parts)
    assert merged.ntotal == whole.ntotal == 24_000
    for index in (whole, merged):
        faiss.extract_index_ivf(index).nprobe = 4
    d1, i1 = whole.search(x[:100], 10)
    d2, i2 = merged.search(x[:100], 10)
    assert np.array_equal(i1, i2) and np.allclose(d1, d2)
    with pytest.raises(IndexBuildError, match="empty target"):
        merge_block_lists(faiss.extract_index_ivf(merged), parts[:1])


def test_clean_normalises_and_flags_bad_rows():
    """NaN/inf rows and all-zero rows are flagged and zeroed; huge finite values still normalise."""
    import warnings

    from clipsearch.index.build import clean

    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float16)
    x[1] = np.nan
    x[2] = 0
    x[3, 4] = np.inf
    big = x.astype(np.float32)
    big[4] *= np.float32(1e20)  # squares overflow float32
    for batch in (x, big):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, nan, zero = clean(batch)
        assert out.dtype == np.float32 and nan.tolist() == [False, True, False, True, False, False]
        assert zero.tolist() == [False, False, True, False, False, False]
        assert (out[[1, 2, 3]] == 0).all() and np.isfinite(out).all()
        ref = batch[[0, 4, 5]].astype(np.float64)
        assert np.allclose(out[[0, 4, 5]], ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    assert batch.dtype == np.float32 and np.isnan(x[1]).all()  # the input is not modified
    assert clean(np.zeros((0, 8), np.float32))[0].shape == (0, 8)
