"""The walkthrough as JSON, the stable format for other tools (documented field by field in
docs/explain.md): ``Walkthrough.to_dict()`` plus, with ``--expect``, the checks."""

from __future__ import annotations

import json
from collections.abc import Sequence

from attnlab.explain.check import ExpectResult
from attnlab.explain.steps import Walkthrough

__all__ = ["to_json"]


def to_json(walk: Walkthrough, *, checks: Sequence[ExpectResult] | None = None, indent: int | None = 2) -> str:
    data = walk.to_dict()
    if checks is not None:
        data["checks"] = [c.to_dict() for c in checks]
    return json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False)
