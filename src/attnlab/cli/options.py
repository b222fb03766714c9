"""Command-line options shared by the subcommands, in one place: the same names, help and checks everywhere.

Used by ``attnlab heatmap`` and ``attnlab report``, and written so that ``attnlab explain`` can use it too:

- :func:`add_model_arguments`: ``--model``, ``--text``, ``--layer``, ``--head`` (1-based), a pretrained model
  instead of the toy input (``--query``, the toy's input option, picks the followed token in both);
- :func:`add_section_argument` and :func:`sections_from_args`: ``--section`` with the walkthrough's canonical
  names (:data:`attnlab.explain.SECTIONS`), old ones (``simplified``, ...) accepted with a one-line note;
- :func:`add_output_arguments`: ``--out`` / ``-o`` and ``--force`` (never overwrite unasked);
- :func:`attention_maps_from_args`: the command line's one place that loads a model, through
  :func:`attnlab.explain.model.attention_maps`; the pictures (:mod:`attnlab.heatmap`, :mod:`attnlab.report`)
  only read what it returns.

Every parser of ``attnlab`` refuses abbreviated options (``allow_abbrev=False`` in
:class:`attnlab.cli._Parser`): ``--head`` is never read as ``--heads``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from attnlab.cli import UsageError

__all__ = [
    "INSTALL_HINT",
    "add_model_arguments",
    "missing_model_package",
    "check_writable",
    "add_output_arguments",
    "add_section_argument",
    "attention_maps_from_args",
    "note",
    "sections_from_args",
]

INSTALL_HINT = "pip install 'attnlab[models]'"


def note(args: argparse.Namespace, text: str, kind: str = "note") -> None:
    """One ``attnlab COMMAND: note: ...`` line on stderr."""
    command = getattr(args, "command", None) or "attnlab"
    sys.stderr.write(f"attnlab {command}: {kind}: {text.splitlines()[0]}\n")


def check_writable(path: str | Path, option: str, *, force: bool = False,
                   formats: dict[str, str] | None = None) -> Path:
    """:func:`attnlab.maps.check_output_path` for a command-line option: before any work, one UsageError line
    naming ``option`` when the file cannot be written (or exists and ``force`` is False)."""
    from attnlab.maps import check_output_path

    try:
        return check_output_path(path, force=force, formats=formats)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{option}: {str(exc).splitlines()[0]}") from None


def missing_model_package(exc: ImportError) -> UsageError:
    """The one-line error for ``--model`` without its optional packages, with the install command that helps."""
    name = getattr(exc, "name", None)
    missing = f" ({name} is missing)" if name else ""
    hint = "pip install transformers" if name == "transformers" else INSTALL_HINT
    return UsageError(f"--model needs the optional model packages{missing}: {hint}")


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    what: str = "every layer x head of its attention on --text",
    layer_help: str = "only layer N (1-based; 1..6 for minilm; default every layer)",
    head_help: str = "only head N (1-based; 1..12 for minilm; default every head)",
) -> argparse._ArgumentGroup:
    """``--model``, ``--text``, ``--layer``, ``--head``; returns the group (a command adds its own there).
    ``--head`` also serves the toy input's multi-head section where a command says so in ``head_help``."""
    from attnlab.explain.model import DEFAULT_MODEL

    g = parser.add_argument_group(f"a pretrained model instead (needs {INSTALL_HINT})")
    g.add_argument("--model", default=None, metavar="NAME|DIR",
                   help=f"{DEFAULT_MODEL} (all-MiniLM-L6-v2), or a local Hugging Face model directory (encoder "
                        f"or decoder: config.json, weights and tokenizer from save_pretrained; needs transformers)"
                        f": {what}")
    g.add_argument("--text", default=None, metavar="TEXT",
                   help="the sentence for --model (cut at the model's 256-token limit, with a warning)")
    g.add_argument("--layer", type=int, default=None, metavar="N", help=f"with --model: {layer_help}")
    g.add_argument("--head", type=int, default=None, metavar="N", help=head_help)
    return g


def add_section_argument(group: argparse._ArgumentGroup, *, many: bool, dest: str = "section",
                         default: str | None = None, help_tail: str = "") -> None:
    """``--section``: one name (``many=False``) or several, as ``attnlab explain`` spells them."""
    from attnlab.explain import ALL_SECTIONS, SECTION_ALIASES

    names = ", ".join(ALL_SECTIONS)
    old = ", ".join(sorted(SECTION_ALIASES))
    if many:
        group.add_argument("--section", dest=dest, nargs="+", metavar="NAME", default=default,
                           help=f"only these sections: {names} (default all; old names {old} are accepted)"
                                + help_tail)
    else:
        group.add_argument("--section", dest=dest, metavar="NAME", default=default,
                           help=f"one of {names} (default {default or 'all'}; old names {old} are accepted)" + help_tail)


def sections_from_args(args: argparse.Namespace, values: str | list[str] | None) -> tuple[str, ...] | None:
    """``--section`` values -> canonical sections (chapter order); a note per old name; UsageError naming
    the valid ones for an unknown name."""
    if values is None or values == []:
        return None
    from attnlab.explain import resolve_sections

    try:
        chosen, notices = resolve_sections(values)
    except ValueError as exc:
        raise UsageError(f"--section: {str(exc).splitlines()[0]}") from None
    for text in notices:
        note(args, text)
    return chosen


def add_output_arguments(group: argparse._ArgumentGroup, *, default: str, formats: str) -> None:
    """``--out`` / ``-o`` FILE and ``--force``."""
    group.add_argument("--out", "-o", default=default, metavar="FILE",
                       help=f"output file; {formats} (default {default})")
    group.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def attention_maps_from_args(args: argparse.Namespace, toy_only: tuple[tuple[str, str, Any], ...] = ()) -> Any:
    """:func:`attnlab.explain.model.attention_maps` of ``--model`` on ``--text``: every layer's and head's
    weights. UsageError (one line) for bad input, a missing optional package, or a toy-input option given
    too (``attnlab explain``'s, plus ``toy_only`` as (dest, flag, default)), checked before loading.
    A text cut at the model's token limit: one ``attnlab COMMAND: warning: ...`` line on stderr."""
    from attnlab.cli.explain import check_model_options, report_warnings

    check_model_options(args, toy_only)
    try:
        from attnlab.explain.model import attention_maps

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            maps = attention_maps(args.text, model=args.model)
    except ImportError as exc:
        raise missing_model_package(exc) from None
    except (ValueError, TypeError, OSError) as exc:
        message = str(exc).splitlines()[0]
        for name in ("model", "text"):  # the library names its arguments; here they are options
            if message.startswith(f"{name} "):
                message = f"--{message}"
        raise UsageError(message) from None
    report_warnings(args, caught)
    return maps
