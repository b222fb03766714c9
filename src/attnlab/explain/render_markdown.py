"""The walkthrough as Markdown (GitHub tables), e.g. to paste into notes next to a hand calculation."""

from __future__ import annotations

from collections.abc import Sequence

from attnlab.explain.layout import header_line, settings_line, tables
from attnlab.explain.steps import Walkthrough

__all__ = ["to_markdown"]


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(walk: Walkthrough, *, precision: int = 4, max_cols: int = 12, max_rows: int = 24,
                checks: Sequence[str] = ()) -> str:
    """One ``##`` heading per section, one ``###`` per step with its why, formula, shape, table(s) and
    detail lines."""
    out = ["# attnlab explain", "", f"{_escape(header_line(walk))}  ", f"{_escape(getattr(walk, 'settings_text', None) or settings_line(walk))}", ""]
    for section in walk.sections:
        out += [f"## {walk.section_titles.get(section, section)}", ""]
        for step in walk.section_steps(section):
            out += [f"### {_escape(step.title)}", "",
                    f"`{step.id}` · shape `{step.shape}`  ",
                    f"*Why:* {_escape(step.why)}  ",
                    f"*Formula:* `{step.formula}`", ""]
            for tab in tables(walk, step, precision, max_cols=max_cols, max_rows=max_rows):
                if tab.caption:
                    out += [f"*{tab.caption}*", ""]
                out.append("| " + " | ".join(_escape(c) for c in [tab.corner, *tab.columns]) + " |")
                out.append("|---|" + "---:|" * len(tab.columns))
                for label, cells, is_query in tab.rows:
                    shown = f"**{_escape(label)}**" if is_query else _escape(label)
                    out.append("| " + " | ".join([shown, *cells]) + " |")
                out.append("")
            if step.detail:
                out += ["```text", *step.detail, "```", ""]
    if checks:
        out += ["## Your numbers (--expect)", "", "```text", *checks, "```", ""]
    return "\n".join(out)
