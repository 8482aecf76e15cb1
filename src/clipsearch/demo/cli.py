"""Build the embedded sample end to end (generate -> serve over HTTP -> pipeline) and serve it.

A second run reuses what is built: the sample, the finished shards/parts and the index.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

INDEX_NAME = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8000, help="port of the web page and API")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--data-dir", default="demo-data", help="where the sample and its index are built")
    parser.add_argument("--num-images", type=int, default=3000, help="images in the generated sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated sample")
    parser.add_argument("--no-serve", action="store_true", help="build only; do not start the server")


def _write_url_list(rows: list[dict], base_url: str, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "url": [f"{base_url}/sample/{r['file']}" for r in rows],
        "caption": [r["caption"] for r in rows],
        "color": [r["color"] for r in rows],
        "shape": [r["shape"] for r in rows],
        "background": [r["background"] for r in rows],
    }
    pq.write_table(pa.table(cols), path)


def build(data_dir: Path, num_images: int, seed: int, host: str, port: int) -> Path:
    """Generate the sample, serve it on host:port, and run the pipeline. Returns the index folder."""
    from clipsearch import pipeline as pl
    from clipsearch.demo.sample import generate_sample
    from clipsearch.demo.server import serve_directory

    sample_dir = data_dir / "sample"
    marker = sample_dir / "sample.jsonl"
    if marker.exists():
        rows = [json.loads(line) for line in marker.read_text().splitlines() if line.strip()]
        logger.info("demo: reusing %d generated images in %s", len(rows), sample_dir)
    else:
        logger.info("demo: generating %d images in %s", num_images, sample_dir)
        rows = generate_sample(sample_dir, num_images, seed=seed)
    build_dir = data_dir / "build"
    index_dir = build_dir / "index"
    if (index_dir / "index.json").exists():
        logger.info("demo: reusing the index in %s", index_dir)
        return index_dir
    # The URLs name the port the web page will be served on, so the result grid can show the images.
    url_list = data_dir / "urls.parquet"
    _write_url_list(rows, f"http://{host}:{port}", url_list)
    cfg = pl.config_from_argv(
        ["--url-list", str(url_list), "--output-folder", str(build_dir), "--caption-col", "caption", "--save-additional-columns",
         "color", "shape", "background"]
    )  # fmt: skip
    with serve_directory(data_dir, host=host, port=port):
        pl.pipeline(cfg)
    return index_dir


def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    index_dir = build(data_dir, args.num_images, args.seed, args.host, args.port)
    if args.no_serve:
        logger.info("demo: built %s", index_dir)
        return 0
    import uvicorn
    from fastapi.staticfiles import StaticFiles

    from clipsearch.serve import ServeConfig
    from clipsearch.serve.app import create_app

    app = create_app(ServeConfig(indices={INDEX_NAME: str(index_dir)}, host=args.host, port=args.port))
    app.mount("/sample", StaticFiles(directory=data_dir / "sample"), name="sample")
    logger.info("demo: open http://%s:%d/ (Ctrl-C stops)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
