"""The ``attnlab`` command: argument parsing and dispatch only, no math.

Each subcommand lives in its own module here and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returning the exit code).

User mistakes never show a traceback: a subcommand raises :class:`UsageError` (or the library raises
``ValueError``/``TypeError``/``OSError`` about user input) and :func:`main` prints one line on stderr
and exits with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order they appear in ``attnlab --help``.
_SUBCOMMANDS = ("explain", "heatmap", "report", "bench", "check")


class UsageError(Exception):
    """A mistake in what the user gave: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line on stderr and exit code 2 (no usage dump), and no prefix
    matching of long options (``--head`` is never taken as ``--heads``): every parser of the command,
    subcommands' included (``add_subparsers(parser_class=_Parser)``, inherited by nested ones), is one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"attnlab: error: {message} (see: {self.prog} --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnlab",
        description="Learn, check, see and measure the attention mechanism of chapter 3.",
    )
    from attnlab import __version__

    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"attnlab.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built yet in this tree
            if exc.name != f"attnlab.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        sys.stderr.write(f"attnlab {args.command}: error: {exc}\n")
        return 2
    except (ValueError, TypeError, OSError) as exc:
        # Raised by the library about the user's input (shapes, files, values): one line, exit 2.
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        sys.stderr.write(f"attnlab {args.command}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("attnlab: interrupted\n")
        return 130
