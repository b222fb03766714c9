"""``attnlab report``: argument parsing only; the page is :func:`attnlab.report.write_report` of the
walkthrough that ``attnlab explain`` computes on the same inputs, or of a pretrained model's attention maps
(loaded here, by :func:`attnlab.cli.explain.attention_maps_from_args`; the report itself loads nothing)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from attnlab.cli import UsageError, first_line
from attnlab.cli.options import about_output_file, check_output_option, output_file_error
from attnlab.errors import AttnlabInputError

__all__ = ["register", "run"]

# With --model: the toy walkthrough's own options are refused (dest, flag, default), besides explain's.
_TOY_ONLY: tuple[tuple[str, str, Any], ...] = ()  # explain's own list (--tokens, ..., --section) covers it


def run(args: argparse.Namespace) -> int:
    from attnlab.cli.explain import attention_maps_from_args, walkthrough_from_args
    from attnlab.report import write_report
    from attnlab.report.html import HTML_FORMATS

    out = check_output_option(args.out, "--out", force=args.force, formats=HTML_FORMATS)  # before any work
    select: dict[str, Any] = {}
    if args.model is not None or args.text is not None:
        shown = attention_maps_from_args(args, _TOY_ONLY)
        select = {"layer": args.layer, "head": args.head, "query": args.query}
    else:
        if args.layer is not None:
            raise UsageError('--layer applies to a pretrained model only, e.g. --model minilm --text "The cat sat."')
        shown = walkthrough_from_args(args)
        if args.head is not None:
            if "multihead" not in shown.sections:
                raise UsageError("--head picks the head shown first in section multihead, which is not selected "
                                 "by --section")
            select = {"head": args.head}
    try:
        path = write_report(shown, out, force=args.force, **select)  # the page is built before the file opens
    except AttnlabInputError as exc:
        message = first_line(exc)
        for name in ("layer", "head", "query"):
            if message.startswith(f"{name} "):
                message = f"--{message}"
        raise UsageError(message) from None
    except OSError as exc:
        if not about_output_file(exc, out):  # a package file, a cache: not the user's
            raise
        raise output_file_error(exc, out, "--out") from None
    size_kb = path.stat().st_size / 1024
    url = path.resolve().as_uri()
    sys.stdout.write(f"wrote {path} ({size_kb:.0f} kB): open it in a browser, e.g. {url}\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from attnlab.cli.explain import add_input_arguments
    from attnlab.cli.options import add_model_arguments, add_output_arguments, add_section_argument

    parser = subparsers.add_parser(
        "report",
        help="one self-contained interactive HTML page of the walkthrough (heatmaps, hover, click a token)",
        description="Write the walkthrough of `attnlab explain` as one HTML file (data, CSS and JavaScript "
                    "inline; no network access when opened): every section as a panel, weight matrices as "
                    "heatmaps, hover or focus a cell to see how its number is made, click a token to follow "
                    "its computation. With --model: every layer x head of a pretrained model on --text, as "
                    "an overview grid, a focused head with zoom, and a token filter.",
        allow_abbrev=False,
    )
    add_input_arguments(parser)
    add_model_arguments(
        parser,
        what="every layer x head of its attention on --text (--query: the token followed first)",
        layer_help="only layer N in the file (1-based; 1..6 for minilm; default every layer)",
        head_help="with --model: only head N in the file (1-based; default every head); with the toy input: "
                  "the head of section multihead shown first",
    )
    out = parser.add_argument_group("output")
    add_section_argument(out, many=True)
    add_output_arguments(out, default="report.html", formats=".html or .htm")
    parser.set_defaults(func=run)
