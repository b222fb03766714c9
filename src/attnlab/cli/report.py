"""``attnlab report``: argument parsing only; the page is :func:`attnlab.report.write_report` of the
walkthrough that ``attnlab explain`` computes on the same inputs."""

from __future__ import annotations

import argparse
import sys

from attnlab.cli import UsageError

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from attnlab.cli.explain import walkthrough_from_args
    from attnlab.heatmap import check_output_path
    from attnlab.report import write_report

    html_formats = {".html": "html", ".htm": "html"}
    try:
        out = check_output_path(args.out, force=args.force, formats=html_formats)  # before any work
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from None
    if args.model is not None or args.text is not None:
        from attnlab.cli.heatmap import model_maps_from_args

        shown = model_maps_from_args(args, (("query", "--query", None),))  # --section: explain's toy option
    else:
        shown = walkthrough_from_args(args)
    path = write_report(shown, out, force=args.force)
    size_kb = path.stat().st_size / 1024
    url = path.resolve().as_uri()
    sys.stdout.write(f"wrote {path} ({size_kb:.0f} kB): open it in a browser, e.g. {url}\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from attnlab.cli.explain import add_input_arguments
    from attnlab.explain import SECTIONS

    parser = subparsers.add_parser(
        "report",
        help="one self-contained interactive HTML page of the walkthrough (heatmaps, hover, click a token)",
        description="Write the walkthrough of `attnlab explain` as one HTML file (data, CSS and JavaScript "
                    "inline; no network access when opened): every section as a panel, weight matrices as "
                    "heatmaps, hover or focus a cell to see how its number is made, click a token to follow "
                    "its computation.",
    )
    add_input_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--section", nargs="+", metavar="NAME",
                     help=f"only these sections: {', '.join(SECTIONS)} (default all)")
    model = parser.add_argument_group("a pretrained model instead (needs attnlab[models])")
    model.add_argument("--model", default=None, metavar="NAME",
                       help="minilm (all-MiniLM-L6-v2): every layer x head of its attention on --text")
    model.add_argument("--text", default=None, metavar="TEXT", help="the sentence for --model")
    out.add_argument("--out", "-o", default="report.html", metavar="FILE.html",
                     help="output file (default report.html)")
    out.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.set_defaults(func=run)
