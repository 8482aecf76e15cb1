"""Download images from URL lists (txt/csv/tsv/json/jsonl/parquet) into webdataset, parquet, files or tfrecord shards."""

from __future__ import annotations

import argparse
import ast
import logging
import os
from typing import Any

from clipsearch import distribute
from clipsearch.download.config import (
    BLUR_STRENGTHS,
    DEFAULT_DIRECTIVES,
    ENCODE_FORMATS,
    HASHES,
    INCREMENTAL_MODES,
    INPUT_FORMATS,
    INTERPOLATIONS,
    OUTPUT_FORMATS,
    RESIZE_MODES,
    DownloadConfig,
)
from clipsearch.errors import ConfigError

logger = logging.getLogger(__name__)


def _choices(values: tuple[str, ...]) -> str:
    return "|".join(values)


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _boolean(value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE or v in _FALSE:
        return v in _TRUE
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _flag(g: Any, name: str, help: str) -> None:
    """A switch that also takes img2dataset's explicit value: `--skip-reencode`, `--skip-reencode True`,
    `--extract-exif False`."""
    g.add_argument(name, nargs="?", const=True, default=False, type=_boolean, metavar="BOOL", help=help)


#: img2dataset's --distributor values, and ours
_DISTRIBUTORS = {"local": "local", "multiprocessing": "local", "spark": "spark", "pyspark": "spark"}


def add_arguments(parser: argparse.ArgumentParser, *, pipeline: bool = False) -> None:
    """The download options. With pipeline=True, --output-folder is left to the pipeline."""
    g = parser.add_argument_group("download: input")
    g.add_argument("--url-list", required=True, help="URL file or folder of files; any fsspec path")
    g.add_argument(
        "--input-format",
        default=None,
        metavar=_choices(INPUT_FORMATS),
        help="input format (also .gz); guessed from the extension when not given",
    )
    g.add_argument("--url-col", default="url", help="column holding the image URL")
    g.add_argument(
        "--caption-col",
        default=None,
        help="column holding the caption (default: `caption` when the list has one)",
    )
    g.add_argument(
        "--save-additional-columns",
        nargs="+",
        default=[],
        metavar="COL",
        help="input columns carried into the output metadata",
    )
    g.add_argument(
        "--bbox-col",
        default=None,
        metavar="COL",
        help="column of boxes to blur (faces): a list of relative [x0, y0, x1, y1] per sample, as in "
        "DataComp's face_bboxes; a sample with malformed boxes gets status failed_to_blur",
    )
    g.add_argument(
        "--blur-strength",
        default="datacomp",
        metavar=_choices(BLUR_STRENGTHS),
        help="datacomp: sigma = 10%% of the longest box side (DataComp's blurrer as first written); "
        "img2dataset-1.47: the weaker kernel img2dataset 1.47 applies, for a byte-level match",
    )
    g = parser.add_argument_group("download: output")
    if not pipeline:
        g.add_argument("--output-folder", required=True, help="output folder; any fsspec path")
    g.add_argument(
        "--output-format", default="webdataset", metavar=_choices(OUTPUT_FORMATS), help="shard format"
    )
    g.add_argument("--number-sample-per-shard", default="10000", metavar="N", help="input rows per shard")
    g.add_argument(
        "--oom-shard-count",
        default="5",
        metavar="N",
        help="digits of shard names and of the shard part of keys (DataComp uses 8)",
    )
    g.add_argument(
        "--incremental-mode",
        default="incremental",
        metavar=_choices(INCREMENTAL_MODES),
        help="incremental: resume a previous run in the output folder; overwrite: start over; "
        "extend: add this list as new shards after the existing ones",
    )
    _flag(g, "--retry-failed", "fetch again the failed rows of finished shards (and finish unfinished ones)")
    g = parser.add_argument_group("download: images")
    g.add_argument("--image-size", default="256", metavar="PX", help="target size in pixels")
    g.add_argument("--resize-mode", default="border", metavar=_choices(RESIZE_MODES), help="how to resize")
    _flag(g, "--resize-only-if-bigger", "never upscale")
    g.add_argument(
        "--upscale-interpolation",
        default="lanczos",
        metavar=_choices(INTERPOLATIONS),
        help="resampling filter when an image is enlarged",
    )
    g.add_argument(
        "--downscale-interpolation",
        default="area",
        metavar=_choices(INTERPOLATIONS),
        help="resampling filter when an image is shrunk",
    )
    g.add_argument(
        "--min-image-size", default="0", metavar="PX", help="reject images whose smaller side is below"
    )
    g.add_argument("--max-image-area", default=None, metavar="PIXELS", help="reject images with more pixels")
    g.add_argument(
        "--max-aspect-ratio", default=None, metavar="R", help="reject images more elongated than R"
    )
    g.add_argument(
        "--encode-format", default="jpg", metavar=_choices(ENCODE_FORMATS), help="stored image format"
    )
    g.add_argument(
        "--encode-quality",
        default=None,
        metavar="Q",
        help="jpg/webp quality 1-100 (default 95); png compression level 0-9 (default 6)",
    )
    _flag(
        g,
        "--skip-reencode",
        "store the original bytes when no resize is needed and the format already matches "
        "(never for a sample with boxes to blur)",
    )
    _flag(
        g,
        "--disable-all-reencoding",
        "store every downloaded file as is, without decoding or checking it (except samples with boxes to blur)",
    )
    _flag(g, "--extract-exif", "save EXIF tags as JSON in an exif column")
    g.add_argument(
        "--compute-hash",
        default="sha256",
        metavar=_choices(HASHES),
        help="hash of the stored image bytes (sha256 goes in the sha256 column)",
    )
    g.add_argument(
        "--verify-hash",
        nargs="+",
        default=None,
        metavar="COL ALGO",
        help="input column holding the expected md5|sha256|sha512 of the downloaded bytes; mismatches fail",
    )
    _flag(
        g, "--dedup", "skip (status duplicate) a sample whose downloaded bytes were already seen in the run"
    )
    g = parser.add_argument_group("download: HTTP")
    g.add_argument(
        "--processes-count",
        default=str(os.cpu_count() or 1),
        metavar="N",
        help="worker processes (shards run in parallel)",
    )
    g.add_argument("--thread-count", default="64", metavar="N", help="concurrent requests per process")
    g.add_argument("--decode-threads", default="4", metavar="N", help="decode/resize threads per process")
    g.add_argument(
        "--max-connections-per-host", default="32", metavar="N", help="concurrent requests per host"
    )
    g.add_argument(
        "--timeout", default="10", metavar="S", help="total deadline of one request attempt, seconds"
    )
    g.add_argument("--max-bytes", default=str(32 * 1024 * 1024), metavar="B", help="largest body accepted")
    g.add_argument(
        "--retries",
        default="0",
        metavar="N",
        help="retries after a timeout, a 5xx or a 429 (exponential backoff, Retry-After honoured)",
    )
    g.add_argument(
        "--user-agent-token",
        default=None,
        help="your token, added to the User-Agent; X-Robots-Tag rules scoped to it apply",
    )
    g.add_argument(
        "--disallowed-header-directives",
        nargs="*",
        default=list(DEFAULT_DIRECTIVES),
        metavar="DIRECTIVE",
        help="X-Robots-Tag directives that opt a sample out (none: ignore them)",
    )
    g = parser.add_argument_group("download: reporting")
    _flag(g, "--enable-wandb", "log metrics to Weights & Biases (wandb extra)")
    g.add_argument("--wandb-project", default="clipsearch", help="W&B project name")
    if "--no-progress" not in parser._option_string_actions:  # pipeline: one flag shared by the stages
        g.add_argument("--no-progress", action="store_true", help="no progress bar")
    if not pipeline:
        distribute.add_arguments(parser)
        # img2dataset's names: --distributor multiprocessing|pyspark, --max-shard-retry, --subjob-size
        parser._option_string_actions["--distributor"].choices = None
        parser._option_string_actions["--distributor"].metavar = "local|spark"
        g = parser.add_argument_group("download: img2dataset's distribution options")
        g.add_argument(
            "--max-shard-retry",
            default=None,
            metavar="N",
            help="retries of a crashed shard (the same as --max-retries)",
        )
        g.add_argument(
            "--subjob-size",
            default="0",
            metavar="N",
            help="with --distributor spark, submit the shards in Spark jobs of N (0: one job)",
        )


def _num(args: Any, name: str, kind: type, optional: bool = False) -> Any:
    raw = getattr(args, name)
    if raw is None and optional:
        return None
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}",
            hint="--" + name.replace("_", "-"),
        ) from None


def _listed(values: list[str] | None) -> list[str]:
    """Option values, with img2dataset's list spelling expanded: `--save-additional-columns
    '["NSFW","similarity","LICENSE"]'` (LAION's command lines) means three columns, `'[]'` none."""
    values = list(values or ())
    if len(values) == 1 and values[0].strip().startswith("["):
        try:
            parsed = ast.literal_eval(values[0].strip())
        except (ValueError, SyntaxError):
            parsed = None
        if isinstance(parsed, list | tuple) and all(isinstance(v, str) for v in parsed):
            return list(parsed)
    return values


def _verify_hash(values: list[str] | None) -> tuple[str, str] | None:
    if not values:
        return None
    got = _listed(values)
    if len(got) != 2:
        raise ConfigError(
            f"verify_hash takes a column and an algorithm, got {values!r}",
            hint="--verify-hash COL md5|sha256|sha512",
        )
    return got[0], got[1]


def config_from_args(args: Any, **overrides: Any) -> DownloadConfig:
    processes = _num(args, "processes_count", int)
    if hasattr(args, "distributor"):
        name = str(args.distributor).lower()
        if name == "ray":
            raise ConfigError(
                "Ray is not supported: use --distributor spark for a cluster",
                hint="--distributor local|spark",
            )
        if name not in _DISTRIBUTORS:
            raise ConfigError(f"unknown distributor {args.distributor!r}", hint="--distributor local|spark")
        if getattr(args, "max_shard_retry", None) is not None:
            args.max_retries = _num(args, "max_shard_retry", int)
        args.distributor = _DISTRIBUTORS[name]
        dist = distribute.config_from_args(args, processes=processes)
    else:
        dist = distribute.DistributorConfig(processes=processes)
    kw: dict[str, Any] = dict(
        url_list=args.url_list,
        output_folder=getattr(args, "output_folder", None) or "",
        input_format=args.input_format,
        url_col=args.url_col,
        caption_col=args.caption_col,
        save_additional_columns=tuple(_listed(args.save_additional_columns)),
        bbox_col=args.bbox_col,
        blur_strength=args.blur_strength,
        output_format=args.output_format,
        oom_shard_count=_num(args, "oom_shard_count", int),
        image_size=_num(args, "image_size", int),
        resize_mode=args.resize_mode,
        resize_only_if_bigger=args.resize_only_if_bigger,
        upscale_interpolation=args.upscale_interpolation,
        downscale_interpolation=args.downscale_interpolation,
        min_image_size=_num(args, "min_image_size", int),
        max_image_area=_num(args, "max_image_area", float, optional=True),
        max_aspect_ratio=_num(args, "max_aspect_ratio", float, optional=True),
        encode_format=args.encode_format,
        encode_quality=_num(args, "encode_quality", int, optional=True),
        skip_reencode=args.skip_reencode,
        disable_all_reencoding=args.disable_all_reencoding,
        number_sample_per_shard=_num(args, "number_sample_per_shard", int),
        thread_count=_num(args, "thread_count", int),
        decode_threads=_num(args, "decode_threads", int),
        max_connections_per_host=_num(args, "max_connections_per_host", int),
        timeout=_num(args, "timeout", float),
        max_bytes=_num(args, "max_bytes", int),
        retries=_num(args, "retries", int),
        user_agent_token=args.user_agent_token,
        disallowed_header_directives=tuple(_listed(args.disallowed_header_directives)),
        incremental_mode=args.incremental_mode,
        retry_failed=args.retry_failed,
        compute_hash=args.compute_hash,
        verify_hash=_verify_hash(args.verify_hash),
        dedup=args.dedup,
        extract_exif=args.extract_exif,
        enable_wandb=args.enable_wandb,
        wandb_project=args.wandb_project,
        progress=not getattr(args, "no_progress", False) and getattr(args, "progress", True) is not False,
        distributor=dist,
        subjob_size=_num(args, "subjob_size", int) if hasattr(args, "subjob_size") else 0,
    )
    kw.update(overrides)
    return DownloadConfig(**kw)


def run(args: Any) -> int:
    from clipsearch.download.runner import download

    download(config_from_args(args))
    return 0
