"""``attnlab heatmap``: argument parsing only; the picture is :func:`attnlab.heatmap.walkthrough_figure`
of the walkthrough that ``attnlab explain`` computes on the same inputs.

Shared with ``attnlab report``: :func:`model_maps_from_args`, the attention maps of ``--model`` on
``--text`` (toy-input options refused in one line, as ``attnlab explain --model`` does; the long-text
warning as one stderr line).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from attnlab.cli import UsageError

__all__ = ["model_maps_from_args", "register", "run"]

# Options of this command that only the toy input uses (dest, flag, default), besides explain's.
_TOY_ONLY = (("query", "--query", None), ("map_section", "--section", "simplified"), ("step", "--step", None))


def model_maps_from_args(args: argparse.Namespace, toy_only: tuple[tuple[str, str, Any], ...] = ()) -> Any:
    """:func:`attnlab.report.data.model_attention` of ``--model`` on ``--text``; UsageError (one line) for
    bad input or for a toy-input option given too (``attnlab explain``'s options, plus ``toy_only``).
    A text cut at the model's token limit: one ``attnlab COMMAND: warning: ...`` line on stderr."""
    from attnlab.cli.explain import check_model_options, report_warnings
    from attnlab.report.data import model_attention

    check_model_options(args, toy_only)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            maps = model_attention(args.model, args.text)
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    report_warnings(args, caught)
    return maps

_SECTION_HELP = ("simplified: all tokens' weights, no trainable weights (3.3.2); trainable (3.4); "
                 "causal (3.5); multihead: each head (3.6)")


def run(args: argparse.Namespace) -> int:
    from attnlab.cli.explain import walkthrough_from_args
    from attnlab.heatmap import check_output_path, save_figure, walkthrough_figure
    from attnlab.report.data import HEATMAP_SECTIONS

    try:
        out = check_output_path(args.out, force=args.force)  # before any work: extension, overwrite
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    if args.model is not None or args.text is not None:
        return _run_model(args, out)
    if args.layer is not None:
        raise UsageError("--layer applies to a pretrained model only (--model minilm --text ...)")
    if args.head is not None and args.map_section != "multihead" and args.step is None:
        raise UsageError(f"--head applies to --section multihead only (got --section {args.map_section})")
    if args.step is None:
        args.section = [HEATMAP_SECTIONS[args.map_section]]  # explain only the section drawn
    walk = walkthrough_from_args(args)
    try:
        fig = walkthrough_figure(walk, args.map_section, head=args.head, step=args.step,
                                 annotate=False if args.no_values else None)
        save_figure(fig, out, force=args.force)
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    sys.stdout.write(f"wrote {out}\n")
    return 0


def _run_model(args: argparse.Namespace, out) -> int:
    from attnlab.heatmap import maps_figure, save_figure

    maps = model_maps_from_args(args, _TOY_ONLY)
    try:
        fig = maps_figure(maps, layer=args.layer, head=args.head, annotate=False if args.no_values else None)
        save_figure(fig, out, force=args.force)
    except ValueError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    sys.stdout.write(f"wrote {out}\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from attnlab.cli.explain import add_input_arguments

    parser = subparsers.add_parser(
        "heatmap",
        help="a picture of attention weights (PNG, SVG or PDF) with token labels and a colour bar",
        description="Draw the attention weights that `attnlab explain` records, on the same inputs: "
                    "tokens on both axes (rows: queries, columns: keys), a colour bar, the values in the "
                    "cells when they fit, masked (future) cells in grey. Headless: needs no display.",
    )
    add_input_arguments(parser)
    out = parser.add_argument_group("picture")
    out.add_argument("--section", dest="map_section", default="simplified",
                     choices=("simplified", "trainable", "causal", "multihead"),
                     help=f"which weights (default simplified): {_SECTION_HELP}")
    out.add_argument("--head", type=int, default=None, metavar="N",
                     help="with --section multihead: only head N (1-based; default: all heads side by side)")
    out.add_argument("--step", default=None, metavar="ID",
                     help="draw this recorded query x key step instead, e.g. causal.scores_masked "
                          "(ids as in `attnlab explain --format json`)")
    model = parser.add_argument_group("a pretrained model instead (needs attnlab[models])")
    model.add_argument("--model", default=None, metavar="NAME",
                       help="minilm (all-MiniLM-L6-v2): draw its attention on --text, every layer x head "
                            "(or one --layer and/or --head, 1-based)")
    model.add_argument("--text", default=None, metavar="TEXT", help="the sentence for --model")
    model.add_argument("--layer", type=int, default=None, metavar="N", help="with --model: only layer N")
    out.add_argument("--out", "-o", default="heatmap.png", metavar="FILE",
                     help="output file; .png, .svg or .pdf (default heatmap.png)")
    out.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    out.add_argument("--no-values", action="store_true", help="do not write the values in the cells")
    parser.set_defaults(func=run)
