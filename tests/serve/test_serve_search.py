from __future__ import annotations

import json
import os
import shutil

import faiss
import numpy as np
import pytest

from clipsearch.errors import ClipsearchError, InputError
from clipsearch.search.searcher import IndexSearcher, SearchParams

from .helpers import FakeEncoder, build_index


def recall(
    found: np.ndarray, truth: np.ndarray, vecs: np.ndarray | None = None, q: np.ndarray | None = None
) -> float:
    """Share of the exact top-k found; with vectors, a hit tied with the k-th exact score also counts."""
    if vecs is None:
        hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth, strict=True))
        return hits / max(1, int((truth >= 0).sum()))
    hits = 0
    for f, t, qq in zip(found, truth, q, strict=True):
        kth = float(vecs[t[-1]] @ qq)
        hits += int(sum(float(vecs[i] @ qq) >= kth - 1e-5 for i in f if i >= 0))
    return hits / max(1, int((truth >= 0).sum()))


def queries(encoder: FakeEncoder, n: int = 50) -> np.ndarray:
    from .helpers import COLORS, SHAPES

    rng = np.random.default_rng(7)
    return encoder.encode_text([f"a {COLORS[rng.integers(8)]} {SHAPES[rng.integers(8)]}" for _ in range(n)])


def exact_topk(vecs: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The reference: faiss' brute-force inner product over the given rows (not the module under test)."""
    flat = faiss.IndexFlatIP(vecs.shape[1])
    flat.add(np.ascontiguousarray(vecs, dtype=np.float32))
    _, pos = flat.search(np.ascontiguousarray(q, dtype=np.float32), k)
    return np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)


def exact_filtered(vecs: np.ndarray, mask: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    ids = np.flatnonzero(mask)
    return exact_topk(vecs[ids], ids, q, k)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_filtered_recall_at_0_1_percent(ivf_dir, encoder, modality):
    """0.1 % selectivity: the planner searches the subset exactly, recall 1.0 and always k results."""
    s = IndexSearcher(ivf_dir)
    vecs = np.load(os.path.join(ivf_dir, f"{modality}.vectors.npy")).astype(np.float32)
    q = queries(encoder)
    expr = "bucket == 7"  # 20 of 20,000 rows
    mask = s.filter_bitmap(expr).mask
    assert mask.sum() == 20
    res = s.search(q, 10, modality=modality, filter=expr)
    assert res.plan == "exact-subset"
    assert (res.ids >= 0).all()
    assert mask[res.ids].all()
    assert recall(res.ids, exact_filtered(vecs, mask, q, 10), vecs, q) == 1.0  # exact: ties aside, the same


@pytest.mark.parametrize("modality", ["image", "text"])  # IVF-PQ (re-ranked with vectors.npy) and IVF-Flat
def test_filtered_ann_path_recall_and_fallback(ivf_dir, encoder, modality):
    """Forcing the ANN path (exact_max=0): the selector filters inside the IVF scan; recall stays high."""
    s = IndexSearcher(ivf_dir, exact_max=0)
    vecs = np.load(os.path.join(ivf_dir, f"{modality}.vectors.npy")).astype(np.float32)
    q = queries(encoder)
    for expr in ("shard == 3", "bucket == 7"):  # 1 % and 0.1 %
        mask = s.filter_bitmap(expr).mask
        res = s.search(q, 10, modality=modality, filter=expr)
        assert res.plan.startswith("ann+filter")
        assert (res.ids >= 0).all(), "a filtered query must still return k results"
        assert mask[res.ids].all()
        assert recall(res.ids, exact_filtered(vecs, mask, q, 10), vecs, q) >= 0.95, expr


def test_params_are_per_call_and_never_mutate_the_index(ivf_dir, encoder):
    s = IndexSearcher(ivf_dir)
    ivf = faiss.extract_index_ivf(s.indices["text"].index)
    before = ivf.nprobe
    q = queries(encoder, 5)
    low = s.search(q, 10, modality="text", params=SearchParams(nprobe=1))
    high = s.search(q, 10, modality="text", params=SearchParams(nprobe=64))
    assert ivf.nprobe == before
    vecs = np.load(os.path.join(ivf_dir, "text.vectors.npy")).astype(np.float32)
    truth = exact_topk(vecs, np.arange(s.count), q, 10)
    assert recall(high.ids, truth, vecs, q) >= recall(low.ids, truth, vecs, q)
    assert recall(high.ids, truth, vecs, q) > 0.99


def test_concurrent_searches_with_different_nprobe(ivf_dir, encoder):
    from concurrent.futures import ThreadPoolExecutor

    s = IndexSearcher(ivf_dir)
    q = queries(encoder, 8)
    ref = {n: s.search(q, 10, modality="text", params=SearchParams(nprobe=n)).ids for n in (1, 64)}
    with ThreadPoolExecutor(8) as pool:
        futs = [
            (n, pool.submit(s.search, q, 10, modality="text", params=SearchParams(nprobe=n)))
            for n in (1, 64) * 20
        ]
        for n, f in futs:
            assert (f.result().ids == ref[n]).all()


def test_hnsw_and_vectors_back(index_dir, encoder):
    s = IndexSearcher(index_dir)
    q = queries(encoder, 5)
    res = s.search(q, 5, modality="text", params=SearchParams(efSearch=64))
    assert res.ids.shape == (5, 5) and (res.ids >= 0).all()
    v = s.vectors([3, 1], "text")
    assert v.shape == (2, 32)
    assert np.allclose(
        v, encoder.encode_text([s.rows([3])[0]["caption"], s.rows([1])[0]["caption"]]), atol=1e-5
    )


def test_ivf_without_vectors_file_reconstructs(tmp_path, encoder):
    folder = str(tmp_path / "i")
    data = build_index(
        folder,
        n=3000,
        encoder=encoder,
        image_factory="IVF16,Flat",
        text_factory=None,
        search_params={"nprobe": 4},
    )
    s = IndexSearcher(folder)
    assert s.modalities == ["image"]
    assert np.allclose(s.vectors([5, 7]), data["image"][[5, 7]], atol=1e-6)
    res = s.search(data["image"][:3], 5, filter="bucket == 5")  # 3 rows: exact over reconstructed vectors
    assert res.ids[0, 0] == -1 or (s.filter_bitmap("bucket == 5").mask[res.ids[res.ids >= 0]]).all()
    assert (res.ids[:, :3] >= 0).all() and (res.ids[:, 3:] == -1).all()


def test_empty_filter_and_metadata_rows(index_dir):
    s = IndexSearcher(index_dir)
    res = s.search(np.ones((1, 32), np.float32) / np.sqrt(32), 5, filter="width > 100000")
    assert res.plan == "empty-filter" and (res.ids == -1).all()
    rows = s.rows([1999, 0, 1000], ["key", "caption"])
    assert [r["key"] for r in rows] == ["000001999", "000000000", "000001000"]
    assert s.metadata.num_batches >= 4  # lookups cross record batches


def test_mmap_ondisk_ivf(tmp_path, encoder):
    """An index merged on disk (.ivfdata) is memory-mapped, as index.json's mmap: true asks."""
    from faiss.contrib.ondisk import merge_ondisk

    folder = str(tmp_path / "od")
    data = build_index(folder, n=3000, encoder=encoder, image_factory="Flat", text_factory=None)
    vecs = data["image"]
    trained = faiss.index_factory(32, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    trained.train(vecs)
    parts = []
    for i, (a, b) in enumerate(((0, 1500), (1500, 3000))):
        idx = faiss.clone_index(trained)
        idx.add_with_ids(vecs[a:b], np.arange(a, b))
        p = str(tmp_path / f"part{i}.index")
        faiss.write_index(idx, p)
        parts.append(p)
    merged = faiss.clone_index(trained)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        merge_ondisk(merged, parts, "image.ivfdata")
        faiss.write_index(merged, "image.index")
    finally:
        os.chdir(cwd)
    info = json.load(open(os.path.join(folder, "index.json")))
    info["indices"]["image"].update(factory="IVF16,Flat", mmap=True, search_params={"nprobe": 16})
    json.dump(info, open(os.path.join(folder, "index.json"), "w"))
    s = IndexSearcher(folder)
    res = s.search(vecs[:5], 3)
    assert res.ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert s.search(vecs[[1, 1001]], 3, filter="bucket == 1").ids[:, 0].tolist() == [1, 1001]
    assert s.indices["image"].mmap


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("missing", "does not exist"),
        ("no-json", "not an index folder"),
        ("bad-json", "not valid JSON"),
        ("bad-format", "format"),
        ("no-metadata", "metadata.arrow is missing"),
        ("bad-index-file", "not a readable faiss index"),
        ("count-mismatch", "rows"),
    ],
)
def test_bad_index_folders_fail_with_one_line(tmp_path, encoder, breakage, message):
    folder = str(tmp_path / "idx")
    build_index(folder, n=300, encoder=encoder, text_factory=None)
    if breakage == "missing":
        shutil.rmtree(folder)
    elif breakage == "no-json":
        os.remove(os.path.join(folder, "index.json"))
    elif breakage == "bad-json":
        open(os.path.join(folder, "index.json"), "w").write("{")
    elif breakage == "bad-format":
        json.dump({"format": "other"}, open(os.path.join(folder, "index.json"), "w"))
    elif breakage == "no-metadata":
        os.remove(os.path.join(folder, "metadata.arrow"))
    elif breakage == "bad-index-file":
        open(os.path.join(folder, "image.index"), "wb").write(b"garbage")
    elif breakage == "count-mismatch":
        build_index(str(tmp_path / "other"), n=299, encoder=encoder, text_factory=None)
        shutil.copy(str(tmp_path / "other" / "image.index"), os.path.join(folder, "image.index"))
    with pytest.raises(InputError) as e:
        IndexSearcher(folder)
    assert isinstance(e.value, ClipsearchError)
    assert message in e.value.one_line() and "\n" not in e.value.one_line()


def test_flat_fast_scan_plan_serves_with_params_and_filters(tmp_path, encoder):
    """The planner's flat fast-scan plan (PQ..x4fs,Refine(SQ..)) takes no faiss SearchParameters at its
    base: k_factor still applies at the refine level, and filters are applied after the scan."""
    folder = str(tmp_path / "fs")
    data = build_index(
        folder,
        n=20_000,
        encoder=encoder,
        image_factory="PQ8x4fs,Refine(SQ8)",
        text_factory=None,
        search_params={"k_factor": 8},
        seed=3,
    )
    s = IndexSearcher(folder, exact_max=0)
    vecs = data["image"].astype(np.float32)
    q = queries(encoder)
    truth = exact_topk(vecs, np.arange(len(vecs)), q, 10)
    res = s.search(q, 10)
    assert res.plan == "ann"
    narrow = recall(res.ids, truth, vecs, q)
    wide = recall(s.search(q, 10, params=SearchParams(k_factor=64)).ids, truth, vecs, q)
    assert wide >= 0.9 and wide > narrow + 0.1, (narrow, wide)  # the request's k_factor reached faiss
    for expr in ("shard == 3", "bucket == 7"):  # 1 % and 0.1 %: post-filtered, then exact fallback
        mask = s.filter_bitmap(expr).mask
        got = s.search(q, 10, filter=expr)
        assert got.plan.startswith("ann+postfilter")
        assert (got.ids >= 0).all() and mask[got.ids].all()
        assert recall(got.ids, exact_filtered(vecs, mask, q, 10), vecs, q) >= 0.95, expr


def test_hnsw_quantizer_searched_as_tuned(tmp_path, encoder):
    """An IVF index with an HNSW coarse quantizer is served with the quantizer efSearch the tuner measured
    with (a stored efSearch of 16 found far fewer true lists: recall 0.16 instead of 0.35 at 50M)."""
    from clipsearch.index.build import apply_search_params

    folder = str(tmp_path / "hq")
    data = build_index(
        folder,
        n=20_000,
        encoder=encoder,
        image_factory="IVF1024_HNSW32,Flat",
        text_factory=None,
        search_params={"nprobe": 8},
        seed=5,
    )
    s = IndexSearcher(folder)
    ivf = faiss.extract_index_ivf(s.indices["image"].index)
    faiss.downcast_index(ivf.quantizer).hnsw.efSearch = 1  # a poor stored value must not matter
    q = queries(encoder)
    served = s.search(q, 10).ids
    tuned = faiss.read_index(os.path.join(folder, "image.index"))
    apply_search_params(tuned, {"nprobe": 8})
    assert np.array_equal(served, tuned.search(q, 10)[1])
    assert len(data["image"]) == 20_000


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_row_reader_matches_the_array(tmp_path, dtype):
    """Vectors are read with pread (runs of adjacent ids coalesced), not through the memory map."""
    from clipsearch.search.searcher import RowReader

    a = np.random.default_rng(0).standard_normal((1000, 7)).astype(dtype)
    path = str(tmp_path / "v.npy")
    np.save(path, a)
    r = RowReader(path, np.load(path, mmap_mode="r"))
    ids = np.array([5, 3, 4, 999, 0, 4, 500, 501, 502, 7], dtype=np.int64)  # runs, repeats, any order
    assert np.array_equal(r.take(ids), a[ids].astype(np.float32))
    assert r.take(np.zeros(0, np.int64)).shape == (0, 7)
    with pytest.raises(IndexError):
        r.take(np.array([1000]))


def test_large_vectors_files_are_read_with_pread(tmp_path, encoder, monkeypatch):
    from clipsearch.search import searcher as search

    folder = str(tmp_path / "pr")
    data = build_index(folder, n=3000, encoder=encoder, image_factory="IVF16,PQ8x4fsr", text_factory=None,
                       search_params={"nprobe": 4}, vectors_file=True)  # fmt: skip
    monkeypatch.setattr(search, "PREAD_MIN_BYTES", 0)
    s = IndexSearcher(folder)
    mi = s.indices["image"]
    assert isinstance(mi._rows, search.RowReader)
    ids = np.array([7, 3, 2999, 4, 3])
    stored = np.load(os.path.join(folder, "image.vectors.npy"))
    assert np.array_equal(s.vectors(ids), stored[ids].astype(np.float32))
    assert np.allclose(stored[ids], data["image"][ids], atol=1e-2)
    s.close()  # the file the rows were read from is closed with the searcher
    assert mi._rows._file.closed
    monkeypatch.setattr(search, "PREAD_MIN_BYTES", 1 << 40)
    assert IndexSearcher(folder).indices["image"]._rows is None  # small files stay on the map
