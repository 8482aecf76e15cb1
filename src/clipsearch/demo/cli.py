"""Build the embedded sample end to end (generate -> serve over HTTP -> pipeline) and serve it.

A second run reuses what is built: the sample, the finished shards/parts and the index.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from clipsearch.errors import ConfigError

logger = logging.getLogger(__name__)

INDEX_NAME = "demo"
#: share of the sample that is blurred or noisy: the quality attribute aesthetic nudging acts on
DEGRADED = 0.4
#: the quality predictor shipped beside the tiny CLIP (scripts/train_tiny_aesthetic.py)
PREDICTOR = "aesthetic_predictor.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8000, help="port of the web page and API")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--data-dir", default="demo-data", help="where the sample and its index are built")
    parser.add_argument("--num-images", type=int, default=3000, help="images in the generated sample")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated sample")
    parser.add_argument(
        "--degraded",
        type=float,
        default=DEGRADED,
        help="share of the sample's images that are blurred or noisy (their 'quality' column; aesthetic "
        "nudging with the shipped predictor favours the sharp ones)",
    )
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
        "quality": [r.get("quality", "sharp") for r in rows],
    }
    pq.write_table(pa.table(cols), path)


def build(
    data_dir: Path, num_images: int, seed: int, host: str, port: int, degraded: float = DEGRADED
) -> Path:
    """Generate the sample, serve it on host:port, run the pipeline, and rate the images with the shipped
    quality predictor (the aesthetic table). Returns the index folder."""
    from clipsearch import pipeline as pl
    from clipsearch.demo.sample import generate_sample
    from clipsearch.demo.server import serve_directory

    sample_dir = data_dir / "sample"
    rows = _sample(sample_dir, num_images, seed, degraded)
    if rows is None:
        logger.info(
            "demo: generating %d images in %s (%.0f%% blurred or noisy)",
            num_images,
            sample_dir,
            100 * degraded,
        )
        if (sample_dir / "sample.jsonl").exists():  # an older sample (never a folder the demo did not make)
            shutil.rmtree(sample_dir, ignore_errors=True)
        shutil.rmtree(data_dir / "build", ignore_errors=True)  # built from an older sample
        rows = generate_sample(sample_dir, num_images, seed=seed, degraded=degraded)
        _params(sample_dir).write_text(json.dumps(_wanted(num_images, seed, degraded)))
    else:
        logger.info("demo: reusing %d generated images in %s", len(rows), sample_dir)
    build_dir = data_dir / "build"
    index_dir = build_dir / "index"
    # The URLs name the address the web page will be served on, so the result grid can show the images:
    # an index built for another address would show broken images, so it is built again.
    origin = f"http://{host}:{port}"
    if (index_dir / "index.json").exists():
        built_for = _origin(build_dir)
        if built_for == origin:
            logger.info("demo: reusing the index in %s", index_dir)
            _rate(index_dir)
            return index_dir
        logger.info("demo: the index in %s names images at %s; building it again for %s", index_dir,
                    built_for or "another address", origin)  # fmt: skip
        shutil.rmtree(build_dir, ignore_errors=True)
    url_list = data_dir / "urls.parquet"
    _write_url_list(rows, origin, url_list)
    cfg = pl.config_from_argv(
        ["--url-list", str(url_list), "--output-folder", str(build_dir), "--caption-col", "caption", "--save-additional-columns",
         "color", "shape", "background", "quality"]
    )  # fmt: skip
    with serve_directory(data_dir, host=host, port=port):
        pl.pipeline(cfg)
    from clipsearch.embed.runner import close_decode_pool

    close_decode_pool()  # the server that follows decodes no shards
    _rate(index_dir)
    (build_dir / ORIGIN_FILE).write_text(origin)
    return index_dir


ORIGIN_FILE = "origin.txt"  # the address the index's image URLs name


def _origin(build_dir: Path) -> str | None:
    try:
        return (build_dir / ORIGIN_FILE).read_text().strip()
    except OSError:
        return None


def _params(sample_dir: Path) -> Path:
    return sample_dir / "params.json"


def _wanted(num_images: int, seed: int, degraded: float) -> dict:
    return {"num_images": num_images, "seed": seed, "degraded": degraded}


def _sample(sample_dir: Path, num_images: int, seed: int, degraded: float) -> list[dict] | None:
    """The rows of a sample generated earlier with the same --num-images, --seed and --degraded, else None
    (a sample made with other settings, or by a version that wrote no params.json, is made again)."""
    marker = sample_dir / "sample.jsonl"
    try:
        made = json.loads(_params(sample_dir).read_text())
        rows = [json.loads(line) for line in marker.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if made != _wanted(num_images, seed, degraded) or len(rows) != num_images:
        return None
    return rows


def _rate(index_dir: Path) -> None:
    """The aesthetic table of the demo index, from the quality predictor shipped with the tiny CLIP."""
    from clipsearch.aesthetic.cli import AestheticConfig, rate_index
    from clipsearch.aesthetic.table import TABLE_FILE
    from clipsearch.embed.models import tiny_model_path

    if (index_dir / TABLE_FILE).exists():
        return
    rate_index(AestheticConfig(index=str(index_dir), predictor=str(tiny_model_path() / PREDICTOR)))


def run(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    if not (0.0 <= args.degraded <= 1.0):
        raise ConfigError(f"--degraded must be between 0 and 1, got {args.degraded}", hint="--degraded 0.4")
    data_dir.mkdir(parents=True, exist_ok=True)
    index_dir = build(data_dir, args.num_images, args.seed, args.host, args.port, args.degraded)
    if args.no_serve:
        logger.info("demo: built %s", index_dir)
        return 0
    import uvicorn

    app = demo_app(index_dir, data_dir, args.host, args.port)
    logger.info("demo: open http://%s:%d/ (Ctrl-C stops)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def demo_app(index_dir: Path, data_dir: Path, host: str = "127.0.0.1", port: int = 8000):
    """The app the demo serves: its index with the tiny CLIP, the tiny multilingual encoder, the page, and
    the sample's images under /sample (the URLs the index holds)."""
    from fastapi.staticfiles import StaticFiles

    from clipsearch.embed.multilingual import TINY_MULTILINGUAL
    from clipsearch.serve import ServeConfig
    from clipsearch.serve.app import create_app

    settings = ServeConfig(
        indices={INDEX_NAME: str(index_dir)},
        host=host,
        port=port,
        multilingual_models=(TINY_MULTILINGUAL,),  # queries in French, German, Spanish, Chinese
    )
    app = create_app(settings)
    app.mount("/sample", StaticFiles(directory=data_dir / "sample"), name="sample")
    return app
