"""Download, embed and index in one go (then optionally serve): OUT/images, OUT/embeddings, OUT/index.

The options are the stages' own options, so `pipeline --image-size 224 --clip-model X` means what it
means for `download` and `embed`. All configs are built and validated before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any

from clipsearch import distribute, storage
from clipsearch.errors import OutputExistsError

logger = logging.getLogger(__name__)

STAGE_FOLDERS = ("images", "embeddings", "index")
# the stages share a few flags (--no-progress): the pipeline's own definition, added last, wins
CONFLICT_HANDLER = "resolve"


@dataclass(frozen=True)
class PipelineConfig:
    """The three stages' configs, plus a serve config when the pipeline ends by serving."""

    output_folder: str
    download: Any  # clipsearch.download.DownloadConfig
    embed: Any  # clipsearch.embed.EmbedConfig
    index: Any  # clipsearch.index.IndexConfig
    serve: Any = None  # clipsearch.serve.ServeConfig | None

    def __post_init__(self) -> None:
        check_output_folder(self.output_folder)


def check_output_folder(folder: str) -> None:
    """Refuse an output folder that holds something other than a previous pipeline run."""
    if storage.folder_state(folder) != "nonempty":
        return
    fs, p = storage.get_fs(folder)
    names = {n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(p, detail=False)}
    foreign = sorted(n for n in names if n not in STAGE_FOLDERS and not n.startswith("."))
    if foreign:
        raise OutputExistsError(
            f"output folder {folder} exists and holds other files ({', '.join(foreign[:3])}); "
            "refusing to write into it",
            hint="--output-folder pointing to a new or empty folder, or a previous pipeline output to resume",
        )


def pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run download -> embed -> index; each stage resumes what a previous run finished."""
    from clipsearch.download import download
    from clipsearch.embed import embed
    from clipsearch.index import build_index

    report: dict[str, Any] = {}
    for name, fn, stage_cfg in (
        ("download", download, cfg.download),
        ("embed", embed, cfg.embed),
        ("index", build_index, cfg.index),
    ):
        if name == "index" and _index_up_to_date(cfg.index.index_folder, cfg.embed.output_folder):
            report[name] = storage.read_json(storage.join(cfg.index.index_folder, "index.json"))
            continue
        t0 = time.perf_counter()
        logger.info("pipeline: %s", name)
        report[name] = fn(stage_cfg)
        logger.info("pipeline: %s done in %.1fs", name, time.perf_counter() - t0)
    if cfg.serve is not None:
        from clipsearch.serve import serve

        serve(cfg.serve)
    return report


def _index_up_to_date(index_folder: str, embeddings_folder: str) -> bool:
    """A finished index over exactly the current embeddings needs no rebuild on a re-run."""
    info_path = storage.join(index_folder, "index.json")
    if not storage.exists(info_path):
        return False
    info = storage.read_json(info_path)
    manifest = storage.read_json(storage.join(embeddings_folder, "manifest.json"))
    indexed = int(info.get("count", -1)) + int((info.get("skipped") or {}).get("samples", 0))
    if indexed != int(manifest.get("total_rows", -2)):
        raise OutputExistsError(
            f"the index in {index_folder} covers {indexed} rows but the embeddings now hold "
            f"{manifest.get('total_rows')}; a finished index is never rebuilt in place",
            hint=f"clipsearch index --append --embeddings-folder NEW_PARTS --index-folder {index_folder}",
        )
    logger.info("pipeline: index in %s is up to date (%d rows)", index_folder, indexed)
    return True


# --- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from clipsearch.download import cli as download_cli
    from clipsearch.embed import cli as embed_cli
    from clipsearch.index import cli as index_cli

    parser.add_argument(
        "--output-folder",
        required=True,
        help="where images/, embeddings/ and index/ are written (a previous run's folder resumes)",
    )
    download_cli.add_arguments(parser, pipeline=True)
    embed_cli.add_arguments(parser, pipeline=True)
    index_cli.add_arguments(parser, pipeline=True)
    distribute.add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, in every stage")
    g = parser.add_argument_group("serving")
    g.add_argument("--serve", action="store_true", help="serve the index over HTTP when the pipeline is done")
    g.add_argument("--host", default="127.0.0.1", help="address to serve on (with --serve)")
    g.add_argument("--port", type=int, default=8000, help="port to serve on (with --serve)")
    g.add_argument("--index-name", default="default", help="name of the served index (with --serve)")
    w = parser.add_argument_group("streaming (clipsearch.segments.watch)")
    w.add_argument(
        "--watch",
        default=None,
        metavar="SOURCE",
        help="follow a folder or fsspec prefix of URL files: each new file is downloaded, embedded and appended "
        "to OUT/index as a new segment (replaces --url-list)",
    )
    w.add_argument(
        "--watch-interval", type=float, default=2.0, help="seconds between two listings of --watch"
    )
    for action in parser._actions:  # --watch supplies the URL files
        if action.dest == "url_list":
            action.required = False


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    from clipsearch.download import cli as download_cli
    from clipsearch.embed import cli as embed_cli
    from clipsearch.index import cli as index_cli

    args.progress = not args.no_progress  # the embed stage's spelling of the shared flag
    if getattr(args, "watch", None) and not args.url_list:
        args.url_list = args.watch  # validated as a folder of URL files; each file is its own run
    out = args.output_folder.rstrip("/")
    images, embeddings, index = (storage.join(out, f) for f in STAGE_FOLDERS)
    d = download_cli.config_from_args(args, output_folder=images)
    e = embed_cli.config_from_args(
        args, input_dataset=images, output_folder=embeddings, input_format=d.output_format
    )
    i = index_cli.config_from_args(
        args, embeddings_folder=embeddings, index_folder=index, input_format="embeddings"
    )
    s = None
    if args.serve:
        from clipsearch.serve import ServeConfig

        s = ServeConfig(
            indices={args.index_name: index},
            host=args.host,
            port=args.port,
            backend=args.backend,  # the embed options' --backend/--precision serve the queries too
            precision=args.precision,
        )
    return PipelineConfig(output_folder=out, download=d, embed=e, index=i, serve=s)


def config_from_argv(argv: list[str]) -> PipelineConfig:
    """A PipelineConfig from command-line style options, with the CLI's defaults (used by `demo`)."""
    parser = argparse.ArgumentParser(prog="clipsearch pipeline", conflict_handler=CONFLICT_HANDLER)
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if getattr(args, "watch", None):
        from clipsearch.segments.watch import watch

        watch(config_from_args(args), args.watch, args.watch_interval)
        return 0
    pipeline(config_from_args(args))
    return 0
