"""``attnlab check NOTES``: read a learner's own notes and check every number in them.

    from attnlab.notes import check_notes
    report = check_notes("my_notes.md")        # run=False reads only, never runs the note's code
    report.findings                            # each at its line: written, right, named mistake, what follows

:mod:`.parse` reads .md/.txt/.ipynb into prose, code and output blocks; :mod:`.numbers` reads numbers as
written; :mod:`.run` runs the note's code in a separate process; :mod:`.judge` checks outputs and claims
with attnlab's walkthrough and :func:`attnlab.explain.check.check`; :mod:`.report` shows the findings.
"""

from __future__ import annotations

from pathlib import Path

from attnlab.notes.judge import judge_note
from attnlab.notes.parse import read_note
from attnlab.notes.report import Finding, NotesReport, Unchecked, render_html, render_json, render_text

__all__ = ["Finding", "NotesReport", "Unchecked", "check_notes", "render_html", "render_json", "render_text"]


def check_notes(path: str | Path, *, run: bool = True) -> NotesReport:
    """Check one note (see the module docstring); ``run=False`` never runs its code."""
    return judge_note(read_note(path), run=run)
