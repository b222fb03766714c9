"""The ``attnlab`` command: argument parsing and dispatch only, no math.

Each subcommand lives in its own module here and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returning the exit code).

What :func:`main` does with an exception that escapes a subcommand:

- :class:`~attnlab.errors.AttnlabInputError` (the user's input is wrong; :class:`UsageError` is one): one line
  ``attnlab COMMAND: error: ...`` on stderr, exit code 2. A file the user named that cannot be read or written
  is turned into one where the command opens it (naming the option and the path), never by catching every
  ``OSError`` here.
- ``KeyboardInterrupt``: ``attnlab: interrupted``, exit code 130.
- anything else is a bug in attnlab, not the user's fault: one line ``attnlab COMMAND: internal error: ...``
  that asks for a report, exit code 3. ``--debug`` (before or after the subcommand) or ``ATTNLAB_DEBUG=1``
  prints the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from attnlab.errors import AttnlabInputError

__all__ = ["EXIT_INPUT", "EXIT_INTERNAL", "UsageError", "build_parser", "debug_requested", "first_line", "main"]

# Subcommand modules, in the order they appear in ``attnlab --help``.
_SUBCOMMANDS = ("explain", "heatmap", "report", "bench", "check")

EXIT_INPUT = 2  # the user's input is wrong (one line on stderr)
EXIT_INTERNAL = 3  # a bug in attnlab (one line on stderr; the traceback with --debug)
DEBUG_ENV = "ATTNLAB_DEBUG"
_DEBUG_HELP = f"on an internal error, print the Python traceback too (or set {DEBUG_ENV}=1)"


class UsageError(AttnlabInputError):
    """A mistake in what the user typed on the command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line on stderr and exit code 2 (no usage dump), and no prefix
    matching of long options (``--head`` is never taken as ``--heads``): every parser of the command,
    subcommands' included (``add_subparsers(parser_class=_Parser)``, inherited by nested ones), is one.
    Each subcommand's parser also takes ``--debug`` (the top-level parser has its own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"attnlab: error: {message} (see: {self.prog} --help)\n")
        raise SystemExit(EXIT_INPUT)


def _add_debug_option(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--debug``: the top-level parser's default is False; a subcommand's sets it only when given
    (``argparse.SUPPRESS``), so ``attnlab --debug explain`` is not undone by the subcommand."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help=_DEBUG_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnlab",
        description="Learn, check, see and measure the attention mechanism of chapter 3.",
    )
    from attnlab import __version__

    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    _add_debug_option(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(f"attnlab.cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built yet in this tree
            if exc.name != f"attnlab.cli.{name}":
                raise
            continue
        module.register(subparsers)
    for sub in subparsers.choices.values():
        _add_debug_option(sub, top=False)
    return parser


def debug_requested(argv: Sequence[str] = (), args: argparse.Namespace | None = None) -> bool:
    """``--debug`` given (in the parsed ``args``, or anywhere before ``--`` in ``argv`` when parsing did
    not finish) or ``ATTNLAB_DEBUG`` set to anything but empty, 0, false, no or off."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    if args is not None:
        return bool(getattr(args, "debug", False))
    words = list(argv)
    return "--debug" in (words[: words.index("--")] if "--" in words else words)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what one error line shows."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _prefix(command: str) -> str:
    return f"attnlab {command}" if command else "attnlab"


def _input_error(command: str, exc: AttnlabInputError, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"{_prefix(command)}: error: {first_line(exc)}\n")
    return EXIT_INPUT


def _internal_error(command: str, exc: BaseException, debug: bool) -> int:
    """One line that says attnlab failed (not the user), how to report it and how to see the traceback."""
    if debug:
        traceback.print_exc()
    how = "the traceback is above" if debug else f"run it again with --debug or {DEBUG_ENV}=1 for the traceback"
    sys.stderr.write(f"{_prefix(command)}: internal error: {type(exc).__name__}: {first_line(exc)} (this is a bug "
                     f"in attnlab, not a mistake in your input: please report it with the command you ran; {how})\n")
    return EXIT_INTERNAL


def _broken_pipe() -> int:
    """stdout was closed by the reader (``attnlab explain | head``): stop quietly, as a shell tool does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit must not fail again
    except (OSError, ValueError):
        pass
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if w in _SUBCOMMANDS), "")  # until parsing says
    debug = debug_requested(words)
    try:
        parser = build_parser()
        args = parser.parse_args(words)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_INPUT
        command = args.command
        debug = debug_requested(args=args)
        return int(args.func(args) or 0)
    except AttnlabInputError as exc:
        return _input_error(command, exc, debug)
    except KeyboardInterrupt:
        sys.stderr.write("attnlab: interrupted\n")
        return 130
    except BrokenPipeError:
        return _broken_pipe()
    except Exception as exc:  # noqa: BLE001 -- everything else is a bug in attnlab: say so, exit 3
        return _internal_error(command, exc, debug)
