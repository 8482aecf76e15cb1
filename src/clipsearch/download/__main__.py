"""`python -m clipsearch.download ...`: the download command alone, same options and error handling as
`clipsearch download` (handy when the other stages' dependencies are not installed)."""

from __future__ import annotations

import argparse
import sys

from clipsearch.download import cli


def main(argv: list[str] | None = None) -> int:
    from clipsearch.cli import setup_logging
    from clipsearch.errors import ClipsearchError

    parser = argparse.ArgumentParser(
        prog="clipsearch download",
        description=(cli.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return cli.run(args)
    except ClipsearchError as e:
        print(f"clipsearch download: error: {e.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipsearch download: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
