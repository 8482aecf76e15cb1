"""Crash safety: append, compact and delete killed (SIGKILL) at several points lose nothing committed,
leave no half-visible segment, and a re-run completes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from clipsearch.search.live import SegmentedSearcher, open_index
from clipsearch.segments import layout
from clipsearch.segments.append import append_segment
from clipsearch.segments.compact import CompactConfig, compact
from clipsearch.segments.delete import DeleteConfig, delete_rows

from .helpers import index_cfg

SCRIPT = """
import sys
import faiss
faiss.omp_set_num_threads(1)
op, folder = sys.argv[1], sys.argv[2]
if op == "append":
    from clipsearch.index import IndexConfig
    from clipsearch.segments.append import append_segment
    append_segment(IndexConfig(embeddings_folder=sys.argv[3], index_folder=folder, nb_cores=1, progress=False))
elif op == "compact":
    from clipsearch.segments.compact import CompactConfig, compact
    compact(CompactConfig(folder, all_segments=True, nb_cores=1))
else:
    from clipsearch.segments.delete import DeleteConfig, delete_rows
    delete_rows(DeleteConfig(folder, ids=(1, 2, 2005)))
"""


def _state(folder, q):
    s = open_index(folder)
    assert isinstance(s, SegmentedSearcher)
    m = layout.read_manifest(folder)
    # every segment the manifest names is complete and opens; nothing else is searched
    assert [seg.entry.uid for seg in s.segments] == [e.uid for e in m.segments]
    assert s.count == m.count == sum(seg.searcher.count for seg in s.segments)
    res = s.search(q, 5)
    urls = [[r["url"] for r in s.rows(row, ["url"])] for row in res.ids]
    return m.generation, s.live, urls


def _leftovers(folder):
    m = layout.read_manifest(folder)
    on_disk = set(os.listdir(os.path.join(folder, "segments")))
    return on_disk - {e.name for e in m.segments}


@pytest.mark.parametrize(
    "op, point",
    [
        ("append", "append:segment-written"),
        ("append", "append:before-manifest"),
        ("append", "append:after-manifest"),
        ("compact", "compact:before-manifest"),
        ("compact", "compact:after-manifest"),
        ("delete", "delete:before-manifest"),
    ],
)
def test_killed_writer_loses_nothing(corpus, flat_index, op, point):
    data, emb = corpus["data"], corpus["emb"]
    append_segment(index_cfg(emb["new1"], flat_index))
    delete_rows(DeleteConfig(flat_index, ids=(4, 2002)))
    q = np.concatenate([data["base"]["image"][:4], data["new1"]["image"][:4], data["new2"]["image"][:4]])
    gen0, live0, urls0 = _state(flat_index, q)
    env = {**os.environ, layout.CRASH_ENV: point}
    args = [sys.executable, "-c", SCRIPT, op, flat_index] + ([emb["new2"]] if op == "append" else [])
    proc = subprocess.run(args, env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]

    gen1, live1, urls1 = _state(flat_index, q)
    committed = point.endswith("after-manifest")
    assert gen1 == gen0 + (1 if committed else 0)
    if not committed:  # nothing visible changed
        assert (live1, urls1) == (live0, urls0)
    elif op == "append":
        assert live1 == live0 + 300 and [u[0] for u in urls1[8:]] == data["new2"]["urls"][:4]
    elif op == "compact":
        assert live1 == live0 and urls1 == urls0 and len(layout.read_manifest(flat_index).segments) == 1

    # the same command again completes, exactly once
    if op == "append":
        append_segment(index_cfg(emb["new2"], flat_index))
        _, live2, urls2 = _state(flat_index, q)
        assert live2 == live0 + 300 and [u[0] for u in urls2[8:]] == data["new2"]["urls"][:4]
        assert [u[0] for u in urls2[:8]] == [u[0] for u in urls0[:8]]
    elif op == "compact":
        compact(CompactConfig(flat_index, all_segments=True, nb_cores=1))
        _, live2, urls2 = _state(flat_index, q)
        assert live2 == live0 and urls2 == urls0 and len(layout.read_manifest(flat_index).segments) == 1
    else:
        delete_rows(DeleteConfig(flat_index, ids=(1, 2, 2005)))
        _, live2, _ = _state(flat_index, q)
        assert live2 == live0 - 3
    assert not _leftovers(flat_index)  # the next writer removed what the killed one left behind
