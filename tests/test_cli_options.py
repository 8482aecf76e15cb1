"""Every option of every `clipsearch` subcommand is documented in `--help` and run by some test.

The help check reads the printed `--help` (what a user sees), the coverage check reads the test files:
an option string has to appear quoted (as an argv element: "--opt" or "--opt=value") in a test file
other than this one. Options that `pipeline` shares with a stage are covered by the stage's tests (the
same add_arguments and config_from_args)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from clipsearch.cli import COMMANDS, build_parser, main

TESTS = Path(__file__).parent


def subparser(cmd: str) -> argparse.ArgumentParser:
    parser = build_parser(cmd)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[cmd]


def option_strings(cmd: str) -> list[str]:
    return [o for a in subparser(cmd)._actions for o in a.option_strings if o not in ("-h", "--help")]


def bare_options(help_text: str) -> list[str]:
    """Option entries of an argparse help text that carry no help: argparse prints the invocation alone,
    followed by the next entry, a blank line or a group title instead of an indented help line."""
    lines = help_text.splitlines()
    bare = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-\S.*?)(\s{2,}\S.*)?$", line)
        if not m or m.group(2):
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        indent = len(nxt) - len(nxt.lstrip())
        if not nxt.strip() or indent <= 2 or nxt.lstrip().startswith("-"):
            bare.append(m.group(1))
    return bare


def test_bare_option_detection():
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("--documented", help="does a thing")
    p.add_argument("--a-very-long-option-name-that-wraps", metavar="SOMETHING_LONG", help="wrapped help")
    p.add_argument("--bare-one")
    p.add_argument("--bare-last", metavar="V")
    assert bare_options(p.format_help()) == ["--bare-one BARE_ONE", "--bare-last V"]


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_help_documents_every_option(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: clipsearch " + cmd)
    assert "(default: None)" not in out  # an unset default says nothing, not "None"
    assert bare_options(out) == [], f"{cmd}: options without help text"
    options = option_strings(cmd)
    assert options
    missing = [o for o in options if not re.search(re.escape(o) + r"(?![\w-])", out)]
    assert missing == [], f"{cmd}: options hidden from --help"


def _test_sources() -> str:
    me = Path(__file__).resolve()
    return "\n".join(p.read_text() for p in sorted(TESTS.rglob("*.py")) if p.resolve() != me)


def untested(cmd: str, sources: str) -> list[str]:
    return [o for o in option_strings(cmd) if not re.search(rf"[\"']{re.escape(o)}[\"'=]", sources)]


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_every_option_is_run_by_a_test(cmd):
    missing = untested(cmd, _test_sources())
    assert missing == [], f"`clipsearch {cmd}` options that no test runs: give each a test of its effect"
