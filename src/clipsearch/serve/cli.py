"""Serve indices over HTTP: a REST API (/knn, /metadata, /indices, /healthz, /metrics) and a web page."""

from __future__ import annotations

import argparse
from typing import Any

from clipsearch.embed.cli import add_backend_arguments
from clipsearch.errors import ConfigError
from clipsearch.serve.settings import ServeSettings, parse_index_specs


def add_arguments(parser: argparse.ArgumentParser, *, pipeline: bool = False) -> None:
    g = parser.add_argument_group("serve") if pipeline else parser
    if not pipeline:
        g.add_argument(
            "--index",
            action="append",
            default=[],
            metavar="NAME=DIR",
            help="an index folder to serve, as NAME=DIR (repeatable); a bare DIR is named after its folder",
        )
        g.add_argument(
            "--config", metavar="FILE", help="JSON or YAML file of serve settings (indices, limits, ...)"
        )
    g.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="port to listen on (default 8000)")
    g.add_argument(
        "--clip-model",
        default=None,
        metavar="NAME_OR_PATH",
        help="CLIP model for queries (default: the model recorded in index.json)",
    )
    g.add_argument("--device", default=None, help="device for the model: cpu or cuda (default cpu)")
    g.add_argument(
        "--multilingual-model",
        action="append",
        default=[],
        metavar="[ALIAS=]NAME_OR_PATH",
        help="a multilingual text encoder aligned to the index's CLIP (M-CLIP, sentence-transformers or "
        "multilingual CLIP; clipsearch-tiny-multilingual for the demo model), for queries in many "
        "languages: /knn multilingual=true, clip back's use_mclip (repeatable; the first is the default)",
    )
    g.add_argument(
        "--aesthetic-embeddings",
        default=None,
        metavar="FILE",
        help="aesthetic embeddings for aesthetic_score nudging (default: each index folder's "
        "aesthetic_embeddings.npy, written by `clipsearch aesthetic`)",
    )
    if not pipeline:  # the pipeline's embed options carry them
        add_backend_arguments(g, default=None)
    g.add_argument("--workers", type=int, default=None, help="uvicorn worker processes (default 1)")
    g.add_argument(
        "--text-batch-max",
        type=int,
        default=None,
        metavar="N",
        help="most text queries encoded in one call of the model: concurrent queries share a call, each gets "
        "its own row (default 64)",
    )
    g.add_argument(
        "--text-batch-wait-ms",
        type=float,
        default=None,
        metavar="MS",
        help="how long a text query that finds the encoder idle waits for others to share its call, 0-50 "
        "(default 0: batches form from the queries that arrive while the encoder is busy)",
    )
    g.add_argument(
        "--encoder-workers",
        type=int,
        default=None,
        metavar="N",
        help="text encoder calls that run at once (default: by backend; OpenVINO one call of 2 threads per 2 "
        "cores, torch and ONNX Runtime 2 calls of 1 thread)",
    )
    g.add_argument(
        "--allow-url-host",
        action="append",
        default=[],
        metavar="HOST",
        help="let image_url fetch this host even if it resolves to a private or loopback address (repeatable)",
    )
    g.add_argument("--max-body-mb", type=float, default=None, help="request body limit in MB (default 16)")
    g.add_argument(
        "--max-image-mb", type=float, default=None, help="image upload / fetch limit in MB (default 10)"
    )
    g.add_argument("--no-web", action="store_true", help="serve the API only, not the web page")
    g.add_argument(
        "--no-docs", action="store_true", help="do not serve the API docs (/docs, /redoc, /openapi.json)"
    )
    g.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help="serve /metrics on its own listener at HOST (e.g. 127.0.0.1) instead of the API's address; "
        "'off' turns /metrics off",
    )
    g.add_argument(
        "--metrics-port", type=int, default=None, help="port of the --metrics-host listener (default 9464)"
    )


def settings_from_args(args: argparse.Namespace, indices: dict[str, str] | None = None) -> ServeSettings:
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "clip_model": args.clip_model,
        "device": args.device,
        "backend": getattr(args, "backend", None),
        "precision": getattr(args, "precision", None),
        "workers": args.workers,
    }
    for opt, name in (
        ("text_batch_max", "batch_max_size"),
        ("text_batch_wait_ms", "batch_wait_ms"),
        ("encoder_workers", "encoder_workers"),
    ):
        if getattr(args, opt, None) is not None:
            overrides[name] = getattr(args, opt)
    if getattr(args, "multilingual_model", None):
        overrides["multilingual_models"] = tuple(args.multilingual_model)
    if getattr(args, "aesthetic_embeddings", None):
        overrides["aesthetic_embeddings"] = args.aesthetic_embeddings
    if getattr(args, "allow_url_host", None):
        overrides["allow_url_hosts"] = tuple(args.allow_url_host)
    if getattr(args, "max_body_mb", None) is not None:
        overrides["max_body_bytes"] = int(args.max_body_mb * 1024 * 1024)
    if getattr(args, "max_image_mb", None) is not None:
        overrides["max_image_bytes"] = int(args.max_image_mb * 1024 * 1024)
    if getattr(args, "no_web", False):
        overrides["web"] = False
    if getattr(args, "no_docs", False):
        overrides["docs"] = False
    if getattr(args, "metrics_host", None) is not None:
        overrides["metrics_host"] = args.metrics_host
    if getattr(args, "metrics_port", None) is not None:
        overrides["metrics_port"] = args.metrics_port
    idx = dict(indices or {})
    idx.update(parse_index_specs(getattr(args, "index", None) or []))
    if idx:
        overrides["indices"] = idx
    config = getattr(args, "config", None)
    if config:
        return ServeSettings.from_file(config, **overrides)
    return ServeSettings.from_env(**overrides)


def run(args: argparse.Namespace) -> int:
    from clipsearch.serve import serve

    settings = settings_from_args(args)
    if not settings.indices:
        raise ConfigError("no index to serve", hint="--index NAME=DIR (repeatable) or --config FILE")
    serve(settings)
    return 0
