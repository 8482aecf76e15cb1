"""Planning a 12.8M-row URL list in many parquet files: time and memory, without reading the rows.

    .venv/bin/python benchmarks/download_plan.py [--files 128] [--rows 100000] [--out results.json]

Writes (once, cached in --lists) a DataComp-small-like list: `--files` parquet files of `--rows` rows with
uid, url, text and face_bboxes (a third of the rows with 1-3 boxes). Then, each in a fresh process:
- `plan`: what `clipsearch download` does before the first download (list the files, check every file's
  columns, plan the shards) over the folder, and over a glob of it;
- `shard`: what one worker reads for one 10,000-row shard in the middle of the list;
- `all rows`: for contrast, reading the url/text/uid/face_bboxes columns of every file into memory,
  which is what a planner that counted rows by reading them would hold.
Reports wall time and peak RSS (ru_maxrss) of each, and the RSS of the bare imports.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_lists(folder: Path, files: int, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12)
    for f in range(files):
        path = folder / f"{f:04d}{rng.bytes(8).hex()}.parquet"
        base = f * rows
        uid = [f"{x:032x}" for x in rng.integers(0, 2**63, rows)]
        url = [f"https://images.example-{i % 997}.com/photos/{base + i}/full.jpg" for i in range(rows)]
        text = [f"a photo of item {base + i} on a table" for i in range(rows)]
        n_boxes = np.where(rng.random(rows) < 1 / 3, rng.integers(1, 4, rows), 0)
        offsets = np.concatenate([[0], np.cumsum(n_boxes)]).astype(np.int32)
        coords = rng.random((int(offsets[-1]), 4)) * 0.5
        coords[:, 2:] += coords[:, :2]
        inner = pa.ListArray.from_arrays(np.arange(0, coords.size + 1, 4, dtype=np.int32), coords.ravel())
        boxes = pa.ListArray.from_arrays(offsets, inner)
        table = pa.table({"uid": uid, "url": url, "text": text, "face_bboxes": boxes})
        pq.write_table(table, path, row_group_size=20_000)
    (folder / "_done").write_text(json.dumps({"files": files, "rows": rows}))


def child(what: str, lists: str, out: str) -> None:
    """Runs in a fresh process; prints one JSON line."""
    t0 = time.perf_counter()
    import clipsearch.download.runner as runner  # noqa: F401 - the imports a download pays anyway
    from clipsearch.download import DownloadConfig, reader

    t_import = time.perf_counter() - t0
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    cfg = DownloadConfig(
        url_list=lists,
        output_folder=out,
        caption_col="text",
        save_additional_columns=("uid",),
        bbox_col="face_bboxes",
        oom_shard_count=8,
        progress=False,
    )
    t0 = time.perf_counter()
    res: dict = {"what": what}
    if what in ("plan", "plan-glob"):
        files, fmt, cfg, footers = runner.validate(cfg)
        todo, n_shards, n_rows = reader.plan_shards(cfg, files, fmt, set(), footers=footers)
        res.update(
            files=len(files), rows=n_rows, shards=n_shards, segments=sum(len(s.segments) for s in todo)
        )
    elif what == "shard":
        files, fmt, cfg, footers = runner.validate(cfg)
        todo, n_shards, _ = reader.plan_shards(cfg, files, fmt, set(), footers=footers)
        t0 = time.perf_counter()
        table = reader.read_shard(todo[n_shards // 2], cfg)
        res.update(rows=table.num_rows, columns=table.column_names)
    else:  # all rows
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = sorted(str(p) for p in Path(lists).glob("*.parquet"))
        tables = [pq.read_table(p, columns=["url", "text", "uid", "face_bboxes"]) for p in files]
        res.update(rows=sum(t.num_rows for t in tables), arrow_mb=round(pa.total_allocated_bytes() / 2**20))
    res.update(
        seconds=round(time.perf_counter() - t0, 2),
        import_seconds=round(t_import, 2),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        rss_after_imports_mb=rss_import,
    )
    print(json.dumps(res))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=128)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--lists", default="/tmp/clipsearch-bench-plan")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return 0
    lists = Path(a.lists)
    done = lists / "_done"
    if not done.exists() or json.loads(done.read_text()) != {"files": a.files, "rows": a.rows}:
        t0 = time.perf_counter()
        write_lists(lists, a.files, a.rows)
        print(f"wrote {a.files} x {a.rows:,} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    size = sum(p.stat().st_size for p in lists.glob("*.parquet"))
    results = {
        "files": a.files,
        "rows": a.files * a.rows,
        "list_mb": round(size / 2**20),
        "uptime": os.popen("uptime").read().strip(),
        "runs": [],
    }
    for what, url_list in (
        ("plan", str(lists)),
        ("plan-glob", f"{lists}/*.parquet"),
        ("shard", str(lists)),
        ("all rows", str(lists)),
    ):
        cmd = [sys.executable, __file__, "--child", what, url_list, f"/tmp/plan-bench-out-{os.getpid()}"]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results["runs"].append(res)
        print(json.dumps(res), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
