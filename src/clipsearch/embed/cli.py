"""Compute CLIP image and caption embeddings of image shards (webdataset, parquet, files, or an image folder).

Options keep clip-retrieval's names in kebab-case. See docs/embed.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from clipsearch import distribute
from clipsearch.embed.backends.choice import BACKENDS, PRECISIONS
from clipsearch.embed.config import DEFAULT_MODEL, DEVICES, INPUT_FORMATS, EmbedConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser, *, pipeline: bool = False) -> None:
    """The embed options. With pipeline=True the input/output folders, the input format and the
    distributor options are left to `pipeline`, which supplies them."""
    g = parser.add_argument_group("embed")
    if not pipeline:
        g.add_argument(
            "--input-dataset", required=True, help="download output folder, a shard, or an image folder"
        )
        g.add_argument(
            "--output-folder", required=True, help="where img_emb/, text_emb/, metadata/ are written"
        )
        g.add_argument(
            "--input-format",
            choices=INPUT_FORMATS,
            default=None,
            help="input layout; detected from the folder when not given",
        )
    g.add_argument(
        "--clip-model",
        default=DEFAULT_MODEL,
        help="Hugging Face CLIP/SigLIP hub name or local folder, open_clip:ARCH/PRETRAINED, or the shipped "
        "clipsearch-tiny",
    )
    g.add_argument(
        "--batch-size", type=int, default=0, help="images per model call (0: 256 on GPU, 64 on CPU)"
    )
    g.add_argument(
        "--num-prepro-workers",
        type=int,
        default=None,
        help="image decode processes (default: 1 per 4 cores on CPU, cores-1 on GPU; 0 decodes in a thread)",
    )
    g.add_argument("--device", choices=DEVICES, default="auto", help="where the model runs")
    add_backend_arguments(g)
    g.add_argument(
        "--enable-text",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="embed the captions too",
    )
    g.add_argument(
        "--enable-image",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="embed the images",
    )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the image tower (slow start, faster run)"
    )
    g.add_argument("--shards-per-part", type=int, default=1, help="input shards per output part")
    g.add_argument(
        "--write-batch-size",
        type=int,
        default=None,
        help="samples per output part instead of --shards-per-part (shards grouped by their download stats; "
        "an image folder cut into parts of this many images)",
    )
    g.add_argument("--num-threads", type=int, default=0, help="torch threads on CPU (0: every core)")
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=True, help="no progress bar"
    )
    if not pipeline:
        g.add_argument(
            "--processes-count",
            type=int,
            default=0,
            help="model processes (0: one per visible GPU with --device cuda, else 1)",
        )
        distribute.add_arguments(parser)


def add_backend_arguments(g: Any, default: str | None = "auto") -> None:
    """--backend and --precision: shared by embed, serve and query (serve: None = from its settings)."""
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default=default,
        help="what runs the model: auto picks the fastest installed for the device (OpenVINO bf16 on a CPU with "
        "avx512_bf16 or AMX, OpenVINO fp32 on other CPUs, torch on a GPU) and logs why; openvino and onnx "
        "need the extras clipsearch[openvino] / clipsearch[onnx] and convert the model once (cached)",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help="fp32, bf16 (OpenVINO, or torch autocast), int8 (OpenVINO, ONNX Runtime), fp16 (torch on GPU); "
        "auto: the backend's fastest faithful one (torch on CPU measures fp32 against bf16 autocast)",
    )


def _processes(args: Any, pipeline: bool) -> int:
    """Model processes: --processes-count, else one per visible GPU (pipeline's --processes-count is the
    download's, so there embed always picks by itself)."""
    n = 0 if pipeline else int(getattr(args, "processes_count", 0) or 0)
    if n > 0:
        return n
    if args.device == "cpu":
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def config_from_args(args: argparse.Namespace, **overrides: Any) -> EmbedConfig:
    """Build the EmbedConfig from parsed options; `overrides` (pipeline) win over them."""
    pipeline = "input_dataset" in overrides
    values: dict[str, Any] = {
        "input_dataset": getattr(args, "input_dataset", None),
        "output_folder": getattr(args, "output_folder", None),
        "input_format": getattr(args, "input_format", None),
        "clip_model": args.clip_model,
        "batch_size": args.batch_size,
        "num_prepro_workers": args.num_prepro_workers,
        "device": args.device,
        "precision": args.precision,
        "backend": args.backend,
        "enable_text": args.enable_text,
        "enable_image": args.enable_image,
        "compile": args.compile,
        "shards_per_part": args.shards_per_part,
        "write_batch_size": args.write_batch_size,
        "num_threads": args.num_threads,
        "progress": args.progress,
    }
    values["distributor"] = distribute.config_from_args(args, processes=_processes(args, pipeline))
    values.update(overrides)
    return EmbedConfig(**values)


def run(args: argparse.Namespace) -> int:
    from clipsearch.embed.runner import embed

    report = embed(config_from_args(args))
    logger.info("embed report: %s", json.dumps(report, default=str))
    return 0
