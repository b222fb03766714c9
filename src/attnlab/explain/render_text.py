"""The walkthrough in a terminal: tables labelled with the tokens, a heading per section, the why /
formula / shape of every step. Colour (rich) only in a terminal; plain text when piped or with NO_COLOR
(rich's own detection).

Tables are laid out here (fixed-width columns, numbers right-aligned) and styled with rich ``Text``:
one ``print`` for the whole walkthrough keeps long inputs fast.
"""

from __future__ import annotations

import io
import os
import re
import textwrap
from collections.abc import Sequence

import numpy as np
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from attnlab.explain.layout import Table, header_line, settings_line, tables
from attnlab.explain.steps import Step, Walkthrough, fmt

__all__ = ["render_text", "to_text"]

_INDENT = "  "
_QUERY_MARK = "▸ "


def _pad(text: str, width: int, right: bool = False) -> str:
    gap = " " * max(width - cell_len(text), 0)
    return gap + text if right else text + gap


def _wrapped(out: Text, key: str, value: str, width: int, style: str | None) -> None:
    """``  key      value`` with the value wrapped and its continuation lines indented."""
    lead = _INDENT + key.ljust(9)
    lines = textwrap.wrap(value, width=max(width - len(lead), 20), break_on_hyphens=False) or [""]
    for i, line in enumerate(lines):
        out.append(lead if i == 0 else " " * len(lead), style="dim")
        out.append(line + "\n", style=style)


_NBSP = "\u00a0"
_VECTOR = re.compile(r"\[[^\]]*\]")


def _detail(out: Text, line: str, width: int) -> None:
    """A detail line, wrapped between terms, never inside a vector ``[0.55, 0.87, 0.66]``."""
    body = line.lstrip(" ")
    lead = _INDENT + line[: len(line) - len(body)]
    glued = _VECTOR.sub(lambda m: m.group(0).replace(" ", _NBSP), body)
    wrapped = textwrap.wrap(glued, width=max(width - len(lead) - 2, 20), break_on_hyphens=False,
                            break_long_words=False) or [""]
    for i, part in enumerate(wrapped):
        out.append((lead if i == 0 else lead + "  ") + part.replace(_NBSP, " ") + "\n", style="dim")


def _table(out: Text, tab: Table) -> None:
    labels = [(_QUERY_MARK if is_q else "") + label for label, _, is_q in tab.rows]
    w0 = max([cell_len(tab.corner), *map(cell_len, labels)])
    widths = [max([cell_len(h), *(cell_len(cells[j]) for _, cells, _ in tab.rows)]) for j, h in
              enumerate(tab.columns)]
    if tab.caption:
        out.append(_INDENT + tab.caption + "\n", style="italic")
    header = _INDENT + _pad(tab.corner, w0) + "".join("  " + _pad(h, w, True) for h, w in zip(tab.columns, widths))
    out.append(header + "\n", style="bold")
    out.append(_INDENT + "─" * (cell_len(header) - len(_INDENT)) + "\n", style="dim")
    for label, (_, cells, is_q) in zip(labels, tab.rows):
        row = "".join("  " + _pad(c, w, True) for c, w in zip(cells, widths))
        if is_q:
            out.append(_INDENT + _pad(label, w0) + row + "\n", style="bold yellow")
        else:
            out.append(_INDENT)
            out.append(_pad(label, w0), style="bold")
            out.append(row + "\n")


def _step(out: Text, walk: Walkthrough, step: Step, precision: int, width: int) -> None:
    out.append(_QUERY_MARK, style="cyan")
    out.append(step.title, style="bold")
    shape = f"({step.shape[0]},)" if len(step.shape) == 1 else str(step.shape)
    tail = f"   {step.id}   shape {shape}"
    if cell_len(_QUERY_MARK + step.title + tail) > width:
        out.append("\n" + _INDENT[:-1])
    out.append(f"   {step.id}", style="cyan")
    out.append(f"   shape {shape}\n", style="dim")
    _wrapped(out, "why", step.why, width, None)
    _wrapped(out, "formula", step.formula, width, "green")
    label_width = min(max(cell_len(label) for label in walk.labels), 20) + len(_QUERY_MARK)
    finite = step.values[np.isfinite(step.values)]
    widest = max(len(fmt(v, precision, integral=False)) for v in (finite.min(), finite.max())) if finite.size else 4
    col_width = max(widest, min(max(map(cell_len, step.col_labels), default=1), 20)) + 2
    max_cols = max(3, (width - len(_INDENT) - max(label_width, 12) - 3) // col_width)
    for tab in tables(walk, step, precision, max_cols=max_cols, max_rows=24):
        _table(out, tab)
    for line in step.detail:
        _detail(out, line, width)
    out.append("\n")


def _rule(out: Text, title: str, width: int) -> None:
    out.append(f"── {title} " + "─" * max(width - cell_len(title) - 4, 3) + "\n\n", style="bold magenta")


def render_text(walk: Walkthrough, *, precision: int = 4, console: Console | None = None,
                checks: Sequence[str] = ()) -> None:
    """Print the walkthrough (and the ``--expect`` verdict lines) to ``console`` (default: stdout)."""
    if console is None:
        plain = bool(os.environ.get("NO_COLOR"))  # no-color.org: no colour and no styles at all
        console = Console(highlight=False, color_system=None if plain else "auto")
    width = max(console.width, 60)
    out = Text()
    out.append("attnlab explain\n", style="bold magenta")
    for line in textwrap.wrap(header_line(walk), width=width):
        out.append(line + "\n", style="bold")
    settings = getattr(walk, "settings_text", None) or settings_line(walk)  # a model walkthrough has its own
    for line in textwrap.wrap(settings, width=width):
        out.append(line + "\n", style="dim")
    out.append("\n")
    for section in walk.sections:
        _rule(out, walk.section_titles.get(section, section), width)
        for step in walk.section_steps(section):
            _step(out, walk, step, precision, width)
    if checks:
        _rule(out, "Your numbers (--expect)", width)
        for line in checks:
            style = "bold green" if line.startswith("✓") else "bold red" if line.startswith("✗") else None
            out.append(line + "\n", style=style)
    console.print(out, soft_wrap=True, end="")


def to_text(walk: Walkthrough, *, precision: int = 4, width: int = 100, checks: Sequence[str] = ()) -> str:
    """The plain-text rendering as a string (no colour)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, no_color=True, color_system=None, highlight=False,
                      force_terminal=False)
    render_text(walk, precision=precision, console=console, checks=checks)
    return buf.getvalue()
