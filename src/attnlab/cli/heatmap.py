"""``attnlab heatmap``: argument parsing only; the picture is :func:`attnlab.heatmap.walkthrough_figure`
of the walkthrough that ``attnlab explain`` computes on the same inputs, or
:func:`attnlab.heatmap.maps_figure` of a pretrained model's attention maps (loaded here, by
:func:`attnlab.cli.explain.attention_maps_from_args`; the picture itself loads nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from attnlab.cli import UsageError, first_line
from attnlab.cli.options import about_output_file, check_output_option, output_file_error
from attnlab.errors import AttnlabInputError

__all__ = ["register", "run"]

# Options of this command that only the toy input uses (dest, flag, default), besides explain's.
_TOY_ONLY = (("map_section", "--section", None), ("step", "--step", None))
_DEFAULT_SECTION = "all"


def _section(args: argparse.Namespace) -> str:
    """The one section drawn (canonical name); old names with a note; several at once is a mistake."""
    from attnlab.cli.options import sections_from_args

    chosen = sections_from_args(args, args.map_section or _DEFAULT_SECTION) or (_DEFAULT_SECTION,)
    if len(chosen) > 1 and chosen == ("simple", "all"):  # "simplified" = 3.3: its matrix is section all
        return "all"
    if len(chosen) > 1:
        raise UsageError(f"--section takes one section to draw, got {', '.join(chosen)}")
    return chosen[0]


def _step_sections(args: argparse.Namespace) -> list[str] | None:
    """The sections to explain for ``--step ID``: the step's own section (``window.mask`` -> window, opt-in
    ones included), which ``--section``, when given too, must name; None (the default sections) for an id
    whose first part is no section (the picture then lists the valid steps)."""
    from attnlab.explain import ALL_SECTIONS

    own = args.step.partition(".")[0].strip()
    if args.map_section is None:
        return [own] if own in ALL_SECTIONS else None
    chosen = _section(args)
    if own in ALL_SECTIONS and own != chosen:
        raise UsageError(f"--step {args.step} is a step of section {own}, but --section selects {chosen}: "
                         f"use --section {own} (or leave out --section)")
    return [chosen]


def _save(fig: Any, out: Path, force: bool) -> None:
    """:func:`attnlab.heatmap.save_figure` to ``--out``; a file system error there is the user's file."""
    from attnlab.heatmap import save_figure

    try:
        save_figure(fig, out, force=force)
    except OSError as exc:
        if not about_output_file(exc, out):
            raise
        raise output_file_error(exc, out, "--out") from None


def run(args: argparse.Namespace) -> int:
    from attnlab.cli.explain import walkthrough_from_args
    from attnlab.heatmap import FORMATS, walkthrough_figure

    # before any work: extension, folder, overwrite
    out = check_output_option(args.out, "--out", force=args.force, formats=FORMATS)
    if args.model is not None or args.text is not None:
        return _run_model(args, out)
    if args.layer is not None:
        raise UsageError('--layer applies to a pretrained model only, e.g. --model minilm --text "The cat sat."')
    section = _section(args) if args.step is None else None
    if args.head is not None and section != "multihead" and args.step is None:
        raise UsageError(f"--head applies to --section multihead only (got --section {section})")
    if section is not None:
        args.section = [section]  # explain only the section drawn
    else:
        args.section = _step_sections(args)
    walk = walkthrough_from_args(args)
    try:
        fig = walkthrough_figure(walk, section or _DEFAULT_SECTION, head=args.head, step=args.step,
                                 annotate=False if args.no_values else None)
    except AttnlabInputError as exc:
        raise UsageError(first_line(exc)) from None
    _save(fig, out, args.force)
    sys.stdout.write(f"wrote {out}\n")
    return 0


def _run_model(args: argparse.Namespace, out: Path) -> int:
    from attnlab import heatmap
    from attnlab.cli.explain import attention_maps_from_args

    maps = attention_maps_from_args(args, _TOY_ONLY)
    try:
        fig = heatmap.maps_figure(maps, layer=args.layer, head=args.head, query=args.query,
                                  annotate=False if args.no_values else None)
    except AttnlabInputError as exc:
        message = first_line(exc)
        raise UsageError(f"--{message}" if message.startswith("query ") else message) from None
    _save(fig, out, args.force)
    sys.stdout.write(f"wrote {out}\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from attnlab.cli.explain import add_input_arguments
    from attnlab.cli.options import add_model_arguments, add_output_arguments, add_section_argument

    parser = subparsers.add_parser(
        "heatmap",
        help="a picture of attention weights (PNG, SVG or PDF) with token labels and a colour bar",
        description="Draw the attention weights that `attnlab explain` records, on the same inputs: "
                    "tokens on both axes (rows: queries, columns: keys), a colour bar, the values in the "
                    "cells when they fit, masked (future) cells in grey. Headless: needs no display. "
                    "Long inputs stay at most 4000 pixels on a side (thinned labels, no values in cells).",
        allow_abbrev=False,
    )
    add_input_arguments(parser)
    out = parser.add_argument_group("picture")
    add_section_argument(out, many=False, dest="map_section", default=None,
                         help_tail=": that section's attention weights (simple: the query's row)")
    out.add_argument("--step", default=None, metavar="ID",
                     help="draw this recorded query x key step instead, e.g. causal.scores_masked "
                          "(ids as in `attnlab explain --format json`)")
    add_model_arguments(
        parser,
        what="draw its attention on --text: every layer x head, or one --layer and/or --head; with "
             "--query TOKEN, that token's row in every layer and head",
        head_help="with --model: only head N (1-based); with the toy input and --section multihead: only "
                  "head N (default: all heads side by side)",
    )
    add_output_arguments(out, default="heatmap.png", formats=".png, .svg or .pdf")
    out.add_argument("--no-values", action="store_true", help="do not write the values in the cells")
    parser.set_defaults(func=run)
