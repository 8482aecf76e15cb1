"""`python -m clipsearch.embed ...`: the embed command alone (same options as `clipsearch embed`)."""

import argparse
import sys

from clipsearch.cli import setup_logging
from clipsearch.embed import cli
from clipsearch.errors import ClipsearchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipsearch.embed", description=(cli.__doc__ or "").splitlines()[0]
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return cli.run(args)
    except ClipsearchError as e:
        print(f"clipsearch embed: error: {e.one_line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
