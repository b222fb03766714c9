"""``--expect STEP=VALUES``: check a hand calculation against the walkthrough and explain a mismatch.

VALUES are the user's numbers, comma-separated, rows separated by ``;``. One row is compared with the
query's row of the step (or the whole step when it is a vector); several rows with the whole matrix.
Each number is compared at the shown precision, or at the number of decimals the user wrote when that is
coarser (``0.27`` matches 0.2689): it matches when it is within half a unit of its last decimal.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from attnlab.explain.steps import Walkthrough, fmt

__all__ = ["ExpectResult", "Expectation", "Mismatch", "check", "format_results", "parse_expect"]


@dataclass(frozen=True)
class Expectation:
    """One ``--expect``: the step id, the user's numbers (rows) and how many decimals each was written with."""

    step_id: str
    rows: tuple[tuple[float, ...], ...]
    decimals: tuple[tuple[int | None, ...], ...]  # None: written with an exponent, compare at full precision
    texts: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Mismatch:
    index: tuple[int, ...]  # into the step's values
    expected: float  # the user's number
    expected_text: str
    actual: float
    decimals: int  # compared at this many decimals


@dataclass
class ExpectResult:
    """The outcome of one expectation. ``explanation`` (how the first mismatching number is made) and
    ``inherits`` (later steps that inherit the error) are filled when it does not match;
    ``inherited_from`` names an earlier failing step this one is computed from."""

    expectation: Expectation
    scope: str  # "query" (the query's row) or "all"
    compared: int
    mismatches: list[Mismatch] = field(default_factory=list)
    explanation: list[str] = field(default_factory=list)
    inherits: list[str] = field(default_factory=list)
    inherited_from: str | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict:
        first = self.mismatches[0] if self.mismatches else None
        return {
            "step": self.expectation.step_id,
            "ok": self.ok,
            "scope": self.scope,
            "compared": self.compared,
            "mismatches": len(self.mismatches),
            "first_mismatch": None if first is None else {
                "index": list(first.index), "expected": first.expected, "actual": _num(first.actual),
                "decimals": first.decimals,
            },
            "explanation": self.explanation,
            "inherits": self.inherits,
            "inherited_from": self.inherited_from,
        }


def _num(v: float) -> float | str:
    return v if math.isfinite(v) else ("-inf" if v < 0 else ("inf" if v > 0 else "nan"))


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$|^[+-]?inf$", re.IGNORECASE)


def parse_expect(text: str, valid_steps: Sequence[str]) -> Expectation:
    """Parse ``STEP=VALUES``; ValueError (one line) for an unknown step or malformed numbers."""
    if "=" not in text:
        raise ValueError(f"--expect must be STEP=VALUES, e.g. trainable.scores=4,5,3; got {text!r}")
    step_id, _, values = text.partition("=")
    step_id = step_id.strip()
    if step_id not in valid_steps:
        raise ValueError(f"--expect: unknown step {step_id!r}; valid steps: {', '.join(valid_steps)}")
    body = values.strip().strip("[]()").replace("],", ";").replace("[", "").replace("]", "")
    if not body.strip():
        raise ValueError(f"--expect {step_id}: no values given; write them as 0.1,0.2 (rows separated by ;)")
    rows, decs, texts = [], [], []
    for r, row_text in enumerate(body.split(";")):
        cells = [c for c in re.split(r"[,\s]+", row_text.strip()) if c]
        if not cells:
            raise ValueError(f"--expect {step_id}: row {r + 1} is empty")
        row, dec = [], []
        for c in cells:
            if not _NUMBER.match(c):
                raise ValueError(f"--expect {step_id}: {c!r} is not a number")
            row.append(float(c))
            mantissa = c.lower().split("e")[0]
            dec.append(None if "e" in c.lower() else (len(mantissa.split(".")[1]) if "." in mantissa else 0))
        rows.append(tuple(row))
        decs.append(tuple(dec))
        texts.append(tuple(cells))
    width = len(rows[0])
    for r, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"--expect {step_id}: rows must have the same length, row 1 has {width} and row {r + 1} {len(row)}"
            )
    return Expectation(step_id, tuple(rows), tuple(decs), tuple(texts))


def _as_rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(1, 1) if a.ndim == 0 else a.reshape(-1, a.shape[-1])


def _matches(user: float, actual: float, decimals: int) -> bool:
    if math.isinf(user) or math.isinf(actual) or math.isnan(actual):
        return user == actual
    return abs(user - actual) <= 0.5 * 10.0 ** (-decimals) + 1e-6 * max(1.0, abs(actual)) * 10.0 ** (-decimals)


def check(walk: Walkthrough, expectations: Sequence[Expectation], precision: int = 4) -> list[ExpectResult]:
    """Compare each expectation with the walkthrough; explain the first mismatch of each failing step."""
    results = []
    for exp in expectations:
        step = walk.step(exp.step_id)
        user = np.asarray(exp.rows, dtype=np.float64)  # (R, C)
        positions = np.stack(np.meshgrid(*[np.arange(n) for n in step.shape], indexing="ij"), axis=-1) \
            if step.values.ndim else np.zeros((1, 1, 0), dtype=int)  # (*shape, ndim)
        candidates = []
        if step.query_axis is not None:
            candidates.append(("query", step.query_values(walk.query),
                               np.take(positions, walk.query, axis=step.query_axis)))
        candidates.append(("all", step.values, positions))
        chosen = None
        for scope, vals, pos in candidates:
            if _as_rows(vals).shape == user.shape:
                chosen = scope, _as_rows(vals), pos.reshape(-1, max(step.values.ndim, 0))
                break
        if chosen is None:
            want = " or ".join(
                f"{_as_rows(v).shape[0]} row(s) of {_as_rows(v).shape[1]}"
                + (f" (the row of the query {walk.query_label})" if s == "query" else " (the whole step)")
                for s, v, _ in candidates
            )
            raise ValueError(
                f"--expect {exp.step_id}: expected {want}, got {user.shape[0]} row(s) of {user.shape[1]}"
            )
        scope, actual, pos = chosen
        res = ExpectResult(exp, scope, user.size)
        for r in range(user.shape[0]):
            for c in range(user.shape[1]):
                dec = exp.decimals[r][c]
                dec = precision if dec is None else min(dec, precision)
                a = float(actual[r, c])
                if not _matches(float(user[r, c]), a, dec):
                    index = tuple(int(i) for i in pos[r * user.shape[1] + c])
                    res.mismatches.append(Mismatch(index, float(user[r, c]), exp.texts[r][c], a, dec))
        results.append(res)

    order = {sid: i for i, sid in enumerate(walk.step_ids)}
    failing = sorted((r for r in results if not r.ok), key=lambda r: order[r.expectation.step_id])
    for res in failing:
        sid = res.expectation.step_id
        earlier = [f.expectation.step_id for f in failing if order[f.expectation.step_id] < order[sid]]
        res.inherited_from = next((e for e in earlier if sid in walk.dependents(e)), None)
        res.inherits = walk.dependents(sid)
        first = res.mismatches[0]
        name = walk.cell_name(sid, first.index)
        coarse, shown = fmt(first.actual, first.decimals), fmt(first.actual, precision)
        res.explanation = [
            f"{name}: you have {first.expected_text}, attnlab has {coarse}"
            + (f" ({shown})" if shown != coarse else "")
        ] + walk.explain_cell(sid, first.index)
    return results


def format_results(results: Sequence[ExpectResult], precision: int = 4) -> list[str]:
    """Plain lines: one verdict per expectation, then for a mismatch how the right number is made and
    which later steps inherit the error."""
    lines: list[str] = []
    for res in results:
        sid = res.expectation.step_id
        decs = {m for row in res.expectation.decimals for m in row}
        used = sorted({precision if d is None else min(d, precision) for d in decs})
        at = f"at {used[0]} decimals" if len(used) == 1 else "at the decimals you wrote"
        scope = "the query's row" if res.scope == "query" else "every value"
        if res.ok:
            lines.append(f"✓ {sid}: matches ({res.compared} values, {scope}, {at})")
            continue
        n = len(res.mismatches)
        lines.append(f"✗ {sid}: {n} of {res.compared} values differ{'s' if n == 1 else ''} ({scope}, {at})")
        if res.inherited_from:
            lines.append(f"    inherits the error in {res.inherited_from}")
        lines += ["    " + line for line in res.explanation]
        if res.inherits:
            lines.append(f"    later steps that inherit this error: {', '.join(res.inherits)}")
    return lines
