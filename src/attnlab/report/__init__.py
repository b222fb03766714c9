"""The visual report: one self-contained, interactive HTML page of a recorded walkthrough or of a
pretrained model's attention maps.

``render_html(walkthrough)`` is what ``Walkthrough._repr_html_`` shows in a notebook; ``render_page`` and
``write_report`` make the stand-alone file of ``attnlab report --out FILE.html``. Nothing here loads a
model: give it :class:`~attnlab.explain.Walkthrough` or :class:`~attnlab.pretrained.AttentionMaps`.
"""

from attnlab.report.html import model_report_data, render_html, render_page, report_data, write_report

__all__ = ["model_report_data", "render_html", "render_page", "report_data", "write_report"]
