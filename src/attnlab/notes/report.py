"""What ``attnlab check`` found in a note, and how it is shown: text, JSON, and an offline HTML page of
the note with each finding highlighted at its line (in the look of attnlab's report)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["Finding", "NotesReport", "Unchecked", "render_html", "render_json", "render_text"]


@dataclass
class Finding:
    """One error at ``line``: what was written, the right value, the named mistake (a CATALOGUE id of
    :mod:`attnlab.explain.mistakes`, or ``code``/``output`` for code that cannot compute what the note
    prints and saved outputs the code does not print), and the later lines that follow from it."""

    line: int
    what: str  # e.g. "k_sat"
    written: str
    right: str
    mistake: str | None
    message: str
    fix: str = ""
    follows: list[int] = field(default_factory=list)  # later lines whose numbers follow from this error
    follows_right: dict[int, str] = field(default_factory=dict)  # line -> the right numbers there


@dataclass
class Unchecked:
    line: int
    text: str
    why: str


@dataclass
class NotesReport:
    path: str
    findings: list[Finding] = field(default_factory=list)
    unchecked: list[Unchecked] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)  # lines with numbers that were checked and are right
    notes: list[tuple[int, str]] = field(default_factory=list)  # (line, remark): right, but worth saying

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:  # a JSON object
        return {"file": self.path, "ok": self.ok, "findings": [asdict(f) for f in self.findings],
                "notes": [{"line": ln, "text": t} for ln, t in self.notes],
                "checked_lines": sorted(set(self.checked)),
                "not_checked": [asdict(u) for u in self.unchecked]}


def render_text(reports: list[NotesReport]) -> str:
    out: list[str] = []
    for rep in reports:
        n = len(rep.findings)
        out.append(f"{rep.path}: {'all checked numbers are right' if rep.ok else f'{n} finding' + ('s' if n > 1 else '')}"
                   f" ({_lines(len(set(rep.checked)))} checked, {len(rep.unchecked)} not checked)")
        for f in rep.findings:
            out.append(f"{rep.path}:{f.line}: ✗ {f.what}: you wrote {f.written}, right: {f.right}")
            mistake = f" ({f.mistake})" if f.mistake else ""
            out.append(f"    mistake{mistake}: {f.message}")
            if f.fix:
                out.append(f"    fix: {f.fix}")
            for ln in f.follows:
                right = f"; right: {f.follows_right[ln]}" if ln in f.follows_right else ""
                out.append(f"    {rep.path}:{ln}: follows from it{right}")
        for ln, text in rep.notes:
            out.append(f"{rep.path}:{ln}: note: {text}")
        for u in rep.unchecked:
            out.append(f"{rep.path}:{u.line}: not checked ({u.why}): {u.text.strip()[:80]}")
    return "\n".join(out) + "\n"


def render_json(reports: list[NotesReport]) -> str:
    return json.dumps({"format": "attnlab.check", "version": 1, "files": [r.to_dict() for r in reports]},
                      indent=2, ensure_ascii=False)


def render_html(rep: NotesReport, text: str) -> str:
    """The note, line by line, each finding's line highlighted with the finding beside it; offline
    (the CSS is inlined, nothing is fetched)."""
    css = resources.files("attnlab.report").joinpath("report.css").read_text(encoding="utf-8")
    css = css.replace("#attnlab-root", "#attnlab-check")
    by_line = {f.line: f for f in rep.findings}
    follows = {ln: f.line for f in rep.findings for ln in f.follows}
    unchecked = {u.line: u.why for u in rep.unchecked}
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        cls, aside = "", ""
        if i in by_line:
            f = by_line[i]
            cls = "ck-error"
            aside = (f"<div class='ck-finding'>✗ {html.escape(f.what)}: you wrote {html.escape(f.written)}, right: "
                     f"{html.escape(f.right)}<br>{html.escape(f.message)}"
                     + (f"<br>fix: {html.escape(f.fix)}" if f.fix else "") + "</div>")
        elif i in follows:
            cls = "ck-follows"
            aside = f"<div class='ck-note'>follows from line {follows[i]}</div>"
        elif i in unchecked:
            cls = "ck-unchecked"
            aside = f"<div class='ck-note'>not checked: {html.escape(unchecked[i])}</div>"
        rows.append(f"<tr id='L{i}' class='{cls}'><td class='ck-n'>{i}</td><td><code>{html.escape(line)}</code>"
                    f"{aside}</td></tr>")
    title = html.escape(Path(rep.path).name)
    summary = "all checked numbers are right" if rep.ok else f"{len(rep.findings)} finding(s)"
    extra = ("#attnlab-check table{border-collapse:collapse;width:100%}#attnlab-check td{vertical-align:top;"
             "padding:1px 6px}#attnlab-check .ck-n{color:var(--ar-muted);text-align:right;user-select:none}"
             "#attnlab-check code{white-space:pre-wrap}#attnlab-check .ck-error{background:#fde8ef}"
             "#attnlab-check .ck-follows{background:#fff4e0}#attnlab-check .ck-unchecked{background:var(--ar-card)}"
             "#attnlab-check .ck-finding{color:var(--ar-accent);font-weight:600;margin:2px 0 6px}"
             "#attnlab-check .ck-note{color:var(--ar-muted);font-size:0.9em}")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>attnlab check: "
            f"{title}</title>\n<style>{css}\n{extra}</style></head>\n<body><div id='attnlab-check'>"
            f"<h1>{title}</h1><p class='ar-sub'>attnlab check: {summary}</p><table>{''.join(rows)}</table>"
            "</div></body></html>\n")


def _lines(n: int) -> str:
    return f"{n} line" if n == 1 else f"{n} lines"
