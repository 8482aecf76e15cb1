"""Fixtures: a small base index (Flat) and embedding folders to append, built once and copied per test."""

from __future__ import annotations

import shutil

import faiss
import pytest

from .helpers import build, make_embeddings

# one OpenMP thread: on a shared 2-core machine, OpenMP spin-waiting makes small builds much slower
faiss.omp_set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A base embeddings folder (2 parts), two folders to append, and the base's Flat index."""
    root = tmp_path_factory.mktemp("corpus")
    data = {
        "base": make_embeddings(str(root / "emb-base"), [1200, 800], tag="b", seed=1),
        "new1": make_embeddings(str(root / "emb-new1"), [300], tag="n1", seed=2),
        "new2": make_embeddings(str(root / "emb-new2"), [200, 100], tag="n2", seed=3),
    }
    folders = {k: str(root / f"emb-{k}") for k in data}
    build(folders["base"], str(root / "index-flat"))
    return {"data": data, "emb": folders, "flat": str(root / "index-flat"), "root": root}


@pytest.fixture
def flat_index(corpus, tmp_path):
    """A private copy of the base Flat index."""
    dst = str(tmp_path / "index")
    shutil.copytree(corpus["flat"], dst)
    return dst
