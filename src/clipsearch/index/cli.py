"""Build faiss indices (image, text) from embeddings under a memory and query-time budget.

Options keep autofaiss's names in kebab-case. See docs/index.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from clipsearch import distribute
from clipsearch.index.config import INPUT_FORMATS, ROTATIONS, IndexConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, *, pipeline: bool = False) -> None:
    """The index options. With pipeline=True the folders, the input format and the distributor
    options are left to `pipeline`, which supplies them."""
    g = parser.add_argument_group("index")
    if not pipeline:
        g.add_argument(
            "--embeddings-folder",
            default=None,
            help="embed output folder, or a folder of .npy / parquet (required, except with --compact)",
        )
        g.add_argument(
            "--index-folder", required=True, help="where image.index, text.index, metadata.arrow go"
        )
        g.add_argument(
            "--input-format",
            choices=INPUT_FORMATS,
            default="auto",
            help="auto: detected from the folder; embeddings: the embed stage's folder; npy / parquet: plain "
            "files, ids = rows in file-name order",
        )
    g.add_argument("--max-index-memory-usage", default="4G", help="size budget of each index (e.g. 64M, 4G)")
    g.add_argument("--max-index-query-time-ms", type=float, default=10.0, help="single-query latency budget")
    g.add_argument(
        "--min-recall",
        type=float,
        default=None,
        help="tune for the lowest latency reaching this recall@10 on text-like queries, instead of the best "
        "recall within --max-index-query-time-ms",
    )
    g.add_argument(
        "--index-key", default=None, help="force a faiss factory string, e.g. 'IVF1024,PQ64x4fsr,RFlat'"
    )
    g.add_argument(
        "--embedding-column",
        default=None,
        help="embedding column of parquet input (default: `embedding`, else the files' one list column)",
    )
    g.add_argument(
        "--metric-type", choices=["ip"], default="ip", help="inner product on L2-normalised vectors"
    )
    g.add_argument("--nb-cores", type=int, default=None, help="faiss threads (default: all cores)")
    g.add_argument(
        "--max-train-points",
        type=int,
        default=None,
        help="training sample size, drawn across parts (default: 100k, 64 per IVF list beyond that, at most 512 MiB)",
    )
    g.add_argument(
        "--tuning-queries",
        default=None,
        help="a .npy of text-like queries (e.g. caption embeddings) to tune plain npy/parquet input on",
    )
    if not pipeline:  # in `pipeline`, embed's --clip-model is the model, and the manifest says so
        g.add_argument(
            "--clip-model",
            default=None,
            help="the CLIP model that made the embeddings (hub name, path, open_clip:ARCH/PRETRAINED), when the "
            "folder does not say (bare .npy / parquet): its text tower encodes shipped prompts into text-like "
            "tuning queries",
        )
    g.add_argument(
        "--should-be-memory-mappable",
        action="store_true",
        help="only indices whose lists stay on disk (.ivfdata), so serving needs little RAM",
    )
    g.add_argument(
        "--rotation",
        choices=ROTATIONS,
        default="auto",
        help="rotate before product quantization: auto decides on the training sample whether the balanced "
        "PCA rotation raises recall (docs/index.md); none; pca-balanced",
    )
    g.add_argument("--no-progress", action="store_true", help="no per-part progress lines")
    g.add_argument(
        "--no-text-index",
        action="store_true",
        help="build no keyword index of the captions (then serve and query answer only mode=semantic)",
    )
    if not pipeline:
        distribute.add_arguments(parser)
        from clipsearch.segments.cli import add_index_arguments

        add_index_arguments(parser)


def config_from_args(args: Any, **overrides: Any) -> IndexConfig:
    kw: dict[str, Any] = dict(
        embeddings_folder=getattr(args, "embeddings_folder", None),
        index_folder=getattr(args, "index_folder", None),
        input_format=getattr(args, "input_format", "auto"),
        max_index_memory_usage=args.max_index_memory_usage,
        max_index_query_time_ms=args.max_index_query_time_ms,
        min_recall=args.min_recall,
        index_key=args.index_key,
        embedding_column=args.embedding_column,
        metric_type=args.metric_type,
        nb_cores=args.nb_cores,
        max_train_points=args.max_train_points,
        tuning_queries=args.tuning_queries,
        clip_model=getattr(args, "clip_model", None),
        should_be_memory_mappable=args.should_be_memory_mappable,
        rotation=args.rotation,
        progress=not args.no_progress,
        text_index=not getattr(args, "no_text_index", False),
    )
    if hasattr(args, "distributor"):
        kw["distributor"] = distribute.config_from_args(args)
    kw.update(overrides)
    return IndexConfig(**kw)


def run(args: Any) -> int:
    from clipsearch.index import build_index
    from clipsearch.segments.cli import run_index

    if (rc := run_index(args)) is not None:  # --append / --compact
        return rc
    info = build_index(config_from_args(args))
    summary = {
        m: {k: v[k] for k in ("factory", "search_params", "memory_bytes")} for m, v in info["indices"].items()
    }
    logger.info("index.json: %s", json.dumps(summary))
    return 0
