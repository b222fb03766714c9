"""How one number of a step is made, written out from recorded numbers only.

Used by ``--expect`` diagnoses, by the detail lines of the walkthrough and by the HTML report's hover
text (through :meth:`attnlab.explain.steps.Walkthrough.explain_cell`). Nothing here computes attention:
the values shown are the recorded ones; only the arithmetic of one line (``2×1 + 1×1``) is spelled out.

Each step kind's working is an entry of the one table of step kinds, :data:`attnlab.explain.kinds.KINDS`;
the names of cells and rows and the written numbers are :mod:`attnlab.explain.words`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnlab.explain import kinds
from attnlab.explain.words import cell_name, fmt, fmt_vector, row_name

if TYPE_CHECKING:
    from attnlab.explain.steps import Walkthrough

__all__ = ["cell_name", "explain_cell", "fmt", "fmt_vector", "row_name"]


def explain_cell(walk: Walkthrough, step_id: str, index: tuple[int, ...], precision: int = 4) -> list[str]:
    """Lines saying how ``walk.step(step_id).values[index]`` is made (see ``Walkthrough.explain_cell``):
    the working of the step's kind (:func:`attnlab.explain.kinds.explain_cell`)."""
    return kinds.explain_cell(walk, step_id, index, precision)
