"""The `clipsearch` command. Subcommands map 1:1 to library functions; each stage package owns its
options in `<stage>/cli.py` (add_arguments / config_from_args / run) so `pipeline` can reuse them."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from clipsearch import __version__
from clipsearch.errors import ClipsearchError

logger = logging.getLogger("clipsearch")

# subcommand -> module that defines add_arguments(parser) and run(args) -> int
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("clipsearch.download.cli", "download images from URL lists into shards"),
    "embed": ("clipsearch.embed.cli", "compute CLIP image and text embeddings of image shards"),
    "index": ("clipsearch.index.cli", "build faiss indices from embeddings under a memory budget"),
    "serve": ("clipsearch.serve.cli", "serve indices over HTTP: REST API and web page"),
    "query": ("clipsearch.serve.query_cli", "batch retrieval by prompts or embeddings into parquet"),
    "import": (
        "clipsearch.interop.cli",
        "convert a clip-retrieval or autofaiss index into a clipsearch index",
    ),
    "aesthetic": (
        "clipsearch.aesthetic.cli",
        "rate an index's images with an aesthetic predictor: the table behind aesthetic nudging",
    ),
    "delete": ("clipsearch.segments.delete", "delete rows (by key, URL or id) from an index, served or not"),
    "pipeline": ("clipsearch.pipeline", "download, embed and index in one go (then optionally serve)"),
    "demo": ("clipsearch.demo.cli", "build the embedded sample end to end and serve it"),
}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except where there is none (None) or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or "(default" in help_text:
            return help_text
        return super()._get_help_string(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (keeps start-up and --help fast)."""
    parser = argparse.ArgumentParser(
        prog="clipsearch",
        description="Turn lists of image URLs and captions into a CLIP semantic-search engine.",
    )
    parser.add_argument("--version", action="version", version=f"clipsearch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_text)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=help_text,
            description=(mod.__doc__ or help_text).strip().split("\n\n")[0],
            formatter_class=DefaultsHelpFormatter,
            conflict_handler=getattr(mod, "CONFLICT_HANDLER", "error"),
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _command_of(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if verbose < 2:
        for noisy in ("httpx", "urllib3", "py4j", "PIL", "transformers", "filelock", "fsspec", "faiss"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command_of(argv)
    parser = build_parser(command if command is not None else "")
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return int(args._run(args) or 0)
    except ClipsearchError as e:
        print(f"clipsearch {args.command}: error: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipsearch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
