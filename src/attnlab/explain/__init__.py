"""``attnlab explain``: chapter 3 computed live, every intermediate recorded as data.

    from attnlab.explain import explain
    walk = explain("The cat ran", [[0.2, 0.1, 0.5], [0.9, 0.1, 0.3], [0.4, 0.8, 0.2]], query="ran")
    walk.step("simple.weights").values        # array([0.2465, 0.3133, 0.4402])
    walk.explain_cell("all.scores", (2, 0))   # how one number is made
    walk.to_json()                            # the documented JSON format (docs/explain.md)

Steps as data first (:mod:`.steps`), computed by :mod:`.build`; renderers (:mod:`.render_text`,
:mod:`.render_markdown`, :mod:`.render_json`, and the HTML report) only read them.
"""

from typing import TYPE_CHECKING, Any

from attnlab.explain.build import explain
from attnlab.explain.check import Expectation, ExpectResult, check, parse_expect
from attnlab.explain.steps import (
    ALL_SECTIONS,
    MODERN_SECTIONS,
    OPTIONAL_STEPS,
    SECTION_ALIASES,
    SECTION_TITLES,
    SECTIONS,
    How,
    Settings,
    Step,
    Walkthrough,
    resolve_sections,
)

if TYPE_CHECKING:
    from attnlab.explain.model import ModelWalkthrough


def explain_model(*args: Any, **kwargs: Any) -> "ModelWalkthrough":
    """One head of a real pretrained model, step by step: see :func:`attnlab.explain.model.explain_model`
    (imported on first use: it needs the ``attnlab[models]`` extra)."""
    from attnlab.explain.model import explain_model as _explain_model

    return _explain_model(*args, **kwargs)


__all__ = [
    "ALL_SECTIONS",
    "MODERN_SECTIONS",
    "OPTIONAL_STEPS",
    "SECTIONS",
    "SECTION_ALIASES",
    "SECTION_TITLES",
    "ExpectResult",
    "Expectation",
    "How",
    "Settings",
    "Step",
    "Walkthrough",
    "check",
    "explain",
    "explain_model",
    "parse_expect",
    "resolve_sections",
]
