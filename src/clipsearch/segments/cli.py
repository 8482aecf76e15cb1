"""The segment options of `clipsearch index` (--append, --compact) and their dispatch."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

logger = logging.getLogger(__name__)


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("incremental updates (segments, see docs/formats.md 3b)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--append",
        action="store_true",
        help="add the new parts of --embeddings-folder to the existing index as a new segment, reusing "
        "its trained quantizer (nothing already there is rebuilt)",
    )
    mode.add_argument(
        "--compact",
        action="store_true",
        help="merge small segments, drop deleted rows; retrain only if text-query recall drifted below target",
    )
    mode.add_argument(
        "--text-index-only",
        action="store_true",
        help="add the keyword index of the captions to an index folder built without one (--no-text-index "
        "or an older clipsearch), to every segment; restart a running server afterwards",
    )
    g.add_argument("--compact-all", action="store_true", help="with --compact: merge every segment into one")
    g.add_argument(
        "--target-recall",
        type=float,
        default=None,
        help="with --compact: retrain below this recall@10 on text-like queries (default: --min-recall of "
        "the build, else the tuned recall minus 0.02)",
    )


def run_index(args: Any) -> int | None:
    """Run --append / --compact when asked; None means a plain build."""
    if getattr(args, "compact", False):
        from clipsearch.segments.compact import CompactConfig, compact

        if not getattr(args, "index_folder", None):
            from clipsearch.errors import ConfigError

            raise ConfigError("an index folder is required", hint="--index-folder")
        report = compact(
            CompactConfig(
                index_folder=args.index_folder,
                all_segments=args.compact_all,
                target_recall=args.target_recall,
                nb_cores=args.nb_cores,
                max_train_points=args.max_train_points,
                max_index_query_time_ms=args.max_index_query_time_ms,
            )
        )
        logger.info("compact: %s", json.dumps(report, default=str))
        return 0
    if getattr(args, "text_index_only", False):
        from clipsearch.segments.text_index import add_text_index

        report = add_text_index(args.index_folder, threads=args.nb_cores or 1)
        logger.info("text index: %s", json.dumps(report, default=str))
        return 0
    if getattr(args, "append", False):
        from clipsearch.index.cli import config_from_args
        from clipsearch.segments.append import append_segment

        report = append_segment(config_from_args(args))
        logger.info("append: %s", json.dumps(report, default=str))
        return 0
    return None
