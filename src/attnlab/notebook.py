"""How attnlab's results show themselves in a Jupyter notebook, without importing a layer above them.

A recorded walkthrough (:class:`attnlab.explain.Walkthrough`) and a pretrained model's attention maps
(:class:`attnlab.pretrained.AttentionMaps`) are data; the interactive page that a notebook shows for them is
drawn by :mod:`attnlab.report`, a higher layer that reads them. So their ``_repr_html_`` asks :func:`to_html`
here, and the report's renderer is registered by the package's top (``attnlab/__init__.py`` calls
:func:`register_html` with :func:`attnlab.report.render_html`), which runs before any attnlab module is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["register_html", "to_html"]

_html_renderer: Callable[[Any], str] | None = None


def register_html(render: Callable[[Any], str]) -> None:
    """Use ``render(obj)`` for every attnlab object's notebook view (the last one registered wins)."""
    global _html_renderer
    _html_renderer = render


def to_html(obj: Any) -> str | None:
    """``obj``'s notebook view as HTML, or None (the notebook then shows its text form) when no renderer is
    registered."""
    return None if _html_renderer is None else _html_renderer(obj)
