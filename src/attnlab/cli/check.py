"""``attnlab check NOTES``: argument parsing only; the checking is :mod:`attnlab.notes`.

Exit codes: 0 every checked number is right, 1 findings, 2 a note that cannot be read (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnlab.cli import UsageError
from attnlab.cli.options import check_output_option, write_output

_SUFFIXES = (".md", ".txt", ".ipynb", ".markdown")


def _check_readable(path: Path) -> None:
    """A note the user named: a file that can be read (before any work), else one UsageError line."""
    if not path.is_file():
        raise UsageError(f"NOTES: {path} is not a file (expected a .md, .txt or .ipynb note)")
    try:
        path.read_bytes()  # notes are small; what cannot be read here is the user's to fix
    except OSError as exc:
        raise UsageError(f"NOTES: cannot read {path}: {exc.strerror or exc}") from None


def _run(args: argparse.Namespace) -> int:
    from attnlab.notes import check_notes, render_html, render_json, render_text

    paths = [Path(p) for p in args.notes]
    for p in paths:
        _check_readable(p)
    html = None
    if args.html is not None:
        if len(paths) != 1:
            raise UsageError(f"--html writes one note's page: give one note, got {len(paths)}")
        if Path(args.html).exists():
            raise UsageError(f"--html: {args.html} exists; choose a new file name (it is never overwritten)")
        html = check_output_option(args.html, "--html")  # before any work: a folder that takes a new file
    reports = [check_notes(p, run=not args.no_run) for p in paths]
    sys.stdout.write(render_json(reports) + "\n" if args.format == "json" else render_text(reports))
    if html is not None:
        page = render_html(reports[0], paths[0].read_text(encoding="utf-8"))
        write_output(html, "--html", lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return 0 if all(r.ok for r in reports) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check", help="check every number in your own notes (.md, .txt, .ipynb)",
        description="Read your notes, recompute their numbers with attnlab's walkthrough, and report each error "
                    "at FILE:LINE with the right value, the named mistake and the later lines that follow from it. "
                    "Exit 0 when every checked number is right, 1 with findings, 2 for a note that cannot be read.")
    p.add_argument("notes", nargs="+", metavar="NOTES", help="note files: .md, .txt (also notebook exports) or .ipynb")
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    p.add_argument("--no-run", action="store_true",
                   help="read only: never run the note's code (by default it runs in a separate process, in a "
                        "temporary directory, with a time limit)")
    p.add_argument("--html", metavar="FILE", help="also write the note as an offline HTML page with each finding "
                                                  "highlighted at its line (never overwrites a file)")
    p.set_defaults(func=_run)
