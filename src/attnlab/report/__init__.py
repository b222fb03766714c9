"""The visual report: one self-contained, interactive HTML page of a recorded walkthrough.

``render_html(walkthrough)`` is what ``Walkthrough._repr_html_`` shows in a notebook; ``render_page`` and
``write_report`` make the stand-alone file of ``attnlab report --out FILE.html``.
"""

from attnlab.report.html import render_html, render_page, report_data, write_report

__all__ = ["render_html", "render_page", "report_data", "write_report"]
