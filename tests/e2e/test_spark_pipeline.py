"""`pipeline` on Spark local[2] gives the same output as the local process pool."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipsearch.cli import main
from clipsearch.demo.sample import generate_sample
from clipsearch.demo.server import serve_directory

pytestmark = pytest.mark.spark  # Java comes from make system-deps: none is a failure, never a skip


def _tar_members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def test_spark_pipeline_equals_local(tmp_path):
    rows = generate_sample(tmp_path / "www", 60, seed=7)
    outs = {}
    with serve_directory(tmp_path / "www") as base:
        urls = tmp_path / "urls.parquet"
        pq.write_table(
            pa.table({"url": [f"{base}/{r['file']}" for r in rows], "caption": [r["caption"] for r in rows]}),
            urls,
        )
        for dist in ("local", "spark"):
            out = tmp_path / dist
            argv = ["-q", "pipeline", "--url-list", str(urls), "--output-folder", str(out),
                    "--caption-col", "caption", "--number-sample-per-shard", "20", "--distributor", dist, "--spark-master", "local[2]"]  # fmt: skip
            assert main(argv) == 0
            outs[dist] = out
    a, b = outs["local"], outs["spark"]
    tars = sorted(p.name for p in (a / "images").glob("*.tar"))
    assert tars == sorted(p.name for p in (b / "images").glob("*.tar")) and len(tars) == 3
    for name in tars:
        assert _tar_members(a / "images" / name) == _tar_members(b / "images" / name)
        pa_, pb_ = (pq.read_table(x / "images" / name.replace(".tar", ".parquet")) for x in (a, b))
        assert pa_.drop_columns([c for c in pa_.column_names if "time" in c]).equals(
            pb_.drop_columns([c for c in pb_.column_names if "time" in c])
        )

    # the same samples with the same embeddings (rows are aligned with metadata/*.parquet by key)
    def by_key(out, sub):
        keys = [k for p in sorted((out / "embeddings" / "metadata").glob("*.parquet"))
                for k in pq.read_table(p).column("key").to_pylist()]  # fmt: skip
        emb = np.concatenate([np.load(p) for p in sorted((out / "embeddings" / sub).glob("*.npy"))])
        assert len(keys) == len(emb) == 60
        return dict(zip(keys, emb, strict=True))

    for sub in ("img_emb", "text_emb"):
        ea, eb = by_key(a, sub), by_key(b, sub)
        assert ea.keys() == eb.keys()
        assert all(np.allclose(ea[k], eb[k], atol=2e-3) for k in ea)
    ma, mb = (json.loads((x / "index" / "index.json").read_text()) for x in (a, b))
    assert ma["count"] == mb["count"] == 60
    assert ma["indices"]["image"]["factory"] == mb["indices"]["image"]["factory"]
