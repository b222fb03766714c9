"""``--expect STEP=VALUES``: check a hand calculation against the walkthrough and explain a mismatch.

VALUES are the user's numbers, comma-separated, rows separated by ``;``. One row is compared with the
query's row of the step (or the whole step when it is a vector); several rows with the whole matrix.
Each number is compared at the shown precision, or at the number of decimals the user wrote when that is
coarser (``0.27`` matches 0.2689): it matches when it is within half a unit of its last decimal.

Rounding-aware: a learner computes from the numbers shown, which are rounded. A value that differs from
the exact one is still accepted when it is what the step gives from its operands *as shown* (rounded to
the shown precision, or to the learner's own decimals), and the verdict says so ("matches, computed from
the rounded weights shown above").

Named mistakes: when the numbers do not match, they are tested against the known wrong computations of
the step (:mod:`.mistakes`) and the one that fits is named, with its stable id in ``ExpectResult.mistake``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnlab.explain.mistakes import CATALOGUE, mistake_configs, wrong_values
from attnlab.explain.recompute import recompute, rounded
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
    basis: str = "exact"  # "exact", or "rounded": matches only when computed from the operands as shown
    basis_note: str = ""  # e.g. "computed from the rounded weights shown above (trainable.weights at 4 decimals)"
    mistake: str | None = None  # a CATALOGUE id when the mismatch is a known mistake
    mistake_name: str = ""  # one line naming it
    fix: str = ""

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
            "basis": self.basis,
            "basis_note": self.basis_note,
            "mistake": self.mistake,
            "mistake_name": self.mistake_name or None,
            "fix": self.fix or None,
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
    for r, parsed in enumerate(rows):
        if len(parsed) != width:
            raise ValueError(
                f"--expect {step_id}: rows must have the same length, row 1 has {width} and row {r + 1} {len(parsed)}"
            )
    return Expectation(step_id, tuple(rows), tuple(decs), tuple(texts))


def _as_rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(1, 1) if a.ndim == 0 else a.reshape(-1, a.shape[-1])


def _matches(user: float, actual: float, decimals: int, units: float = 0.5) -> bool:
    """``user`` (written with ``decimals`` decimals) is ``actual`` within ``units`` of its last decimal."""
    if math.isinf(user) or math.isinf(actual) or math.isnan(actual):
        return user == actual
    return abs(user - actual) <= units * 10.0 ** (-decimals) + 1e-6 * max(1.0, abs(actual)) * 10.0 ** (-decimals)


# Plural words for an operand's symbol, for "computed from the rounded weights shown above".
_PLURAL = {"weight": "weights", "score": "scores", "scaled": "scaled scores", "q": "queries", "k": "keys",
           "v": "values", "x": "embeddings", "zeroed": "zeroed weights", "masked": "masked scores",
           "c": "merged context vectors", "z": "context vectors", "dropped": "weights"}


@dataclass
class _Compared:
    """The user's numbers against one array of the step's shape, at the chosen scope."""

    user: np.ndarray  # (R, C)
    decimals: np.ndarray  # (R, C) int: compared at this many decimals
    pos: np.ndarray  # (R * C, ndim) index of each user number into the step's values

    def values(self, array: np.ndarray) -> np.ndarray:
        return np.array([array[tuple(p)] for p in self.pos], dtype=np.float64).reshape(self.user.shape)

    def fits(self, array: np.ndarray, units: float = 0.5) -> np.ndarray:
        vals = self.values(array)
        return np.array([[_matches(float(self.user[r, c]), float(vals[r, c]), int(self.decimals[r, c]), units)
                          for c in range(self.user.shape[1])] for r in range(self.user.shape[0])], dtype=bool)


def _rounding_basis(walk: Walkthrough, step_id: str, cmp: _Compared, exact_ok: np.ndarray,
                    precision: int) -> str | None:
    """When every number the user has matches either the exact value or the step computed from its
    operands rounded as shown (to ``precision``, or to the user's decimals): the note saying so."""
    step = walk.step(step_id)
    if step.how is None:
        return None
    # the shown precision, or the user's own decimals (2 or more: coarser roundings change too much)
    for r in sorted({precision, *(int(d) for d in cmp.decimals.ravel() if d >= 2)}, reverse=True):
        ops = {o: rounded(walk.step(o).values, r) for o in step.how.operands if o in walk}
        changed = [o for o in ops if not np.array_equal(ops[o], walk.step(o).values.astype(np.float64),
                                                        equal_nan=True)]
        if not changed:
            continue
        again = recompute(walk, step, ops)
        if again is not None and (exact_ok | cmp.fits(again)).all():
            words = " and ".join(_PLURAL.get(walk.step(o).symbol, o) for o in changed)
            at = ", ".join(changed)
            return f"computed from the rounded {words} shown above ({at} at {r} decimals)"
    return None


def _own_numbers(walk: Walkthrough, step_id: str, earlier: ExpectResult, cmp: _Compared) -> bool:
    """Whether the user's numbers are what the step gives from the user's own numbers of ``earlier``
    (a direct operand of this step)."""
    step = walk.step(step_id)
    src_id = earlier.expectation.step_id
    if step.how is None or src_id not in step.how.operands:
        return False
    src = walk.step(src_id)
    theirs = walk.step(src_id).values.astype(np.float64).copy()
    user = np.asarray(earlier.expectation.rows, dtype=np.float64)
    if earlier.scope == "all" or src.query_axis is None:
        theirs = user.reshape(theirs.shape)
    else:
        index: list[Any] = [slice(None)] * theirs.ndim
        index[src.query_axis] = walk.query
        theirs[tuple(index)] = user.reshape(theirs[tuple(index)].shape)
    again = recompute(walk, step, {src_id: theirs})
    return again is not None and bool(cmp.fits(again, units=1.0).all())


def _diagnose(walk: Walkthrough, res: ExpectResult, cmp: _Compared, right: np.ndarray,
              failing: Sequence[ExpectResult], cache: dict[tuple[str, Any], dict[str, np.ndarray]]) -> None:
    """Name the mistake that gives the user's numbers, if a known one does (fills ``res.mistake*``)."""
    sid = res.expectation.step_id
    section = sid.partition(".")[0]
    if res.inherited_from is not None:
        earlier = res.inherited_from
        prior = next((r for r in failing if r.expectation.step_id == earlier), None)
        if prior is not None and _own_numbers(walk, sid, prior, cmp):
            _name(walk, res, "follows_from_yours", earlier=earlier)
            return
    for mistake_id, cfg in mistake_configs(walk, section):
        if (section, cfg) not in cache:  # one section's wrong numbers serve every failing step of one check()
            cache[section, cfg] = wrong_values(walk, section, cfg)
        wrong = cache[section, cfg].get(sid)
        if wrong is None or wrong.shape != right.shape:
            continue
        if cmp.fits(wrong, units=1.0).all() and not cmp.fits(right).all():
            _name(walk, res, mistake_id)
            return
    if len(res.mismatches) == 1:
        _name(walk, res, "one_wrong_number", earlier=walk.cell_name(sid, res.mismatches[0].index))


def _name(walk: Walkthrough, res: ExpectResult, mistake_id: str, **extra: str) -> None:
    res.mistake = mistake_id
    res.mistake_name, res.fix = CATALOGUE[mistake_id].text(walk, **extra)


def check(walk: Walkthrough, expectations: Sequence[Expectation], precision: int = 4) -> list[ExpectResult]:
    """Compare each expectation with the walkthrough (rounding-aware, see the module docstring); for a
    failing one name the mistake when a known one fits, and explain how its first wrong number is made."""
    results = []
    compared: dict[int, tuple[_Compared, np.ndarray]] = {}
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
                chosen = scope, pos.reshape(-1, max(step.values.ndim, 0))
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
        scope, pos = chosen
        decimals = np.array([[precision if d is None else min(d, precision) for d in row] for row in exp.decimals])
        cmp = _Compared(user, decimals, pos)
        right = step.values.astype(np.float64)
        res = ExpectResult(exp, scope, user.size)
        exact_ok = cmp.fits(right)
        if not exact_ok.all():
            note = _rounding_basis(walk, exp.step_id, cmp, exact_ok, precision)
            if note is not None:
                res.basis, res.basis_note = "rounded", note
            else:
                actual = cmp.values(right)
                for r, c in zip(*np.nonzero(~exact_ok)):
                    index = tuple(int(i) for i in pos[r * user.shape[1] + c])
                    res.mismatches.append(Mismatch(index, float(user[r, c]), exp.texts[r][c], float(actual[r, c]),
                                                   int(decimals[r, c])))
        results.append(res)
        compared[id(res)] = (cmp, right)

    order = {sid: i for i, sid in enumerate(walk.step_ids)}
    failing = sorted((r for r in results if not r.ok), key=lambda r: order[r.expectation.step_id])
    cache: dict[tuple[str, Any], dict[str, np.ndarray]] = {}
    for res in failing:
        sid = res.expectation.step_id
        earlier = [f.expectation.step_id for f in failing if order[f.expectation.step_id] < order[sid]]
        res.inherited_from = next((e for e in reversed(earlier) if sid in walk.dependents(e)), None)  # nearest
        res.inherits = walk.dependents(sid)
        _diagnose(walk, res, *compared[id(res)], failing, cache)
        first = res.mismatches[0]
        name = walk.cell_name(sid, first.index)
        coarse, shown = fmt(first.actual, first.decimals), fmt(first.actual, precision)
        res.explanation = [
            f"{name}: you have {first.expected_text}, attnlab has {coarse}"
            + (f" ({shown})" if shown != coarse else "")
        ] + walk.explain_cell(sid, first.index, precision)
    return results


def format_results(results: Sequence[ExpectResult], precision: int = 4) -> list[str]:
    """Plain lines: one verdict per expectation, then for a mismatch the mistake when known (its name
    and the fix), how the right number is made, and which later steps inherit the error."""
    lines: list[str] = []
    for res in results:
        sid = res.expectation.step_id
        decs = {m for row in res.expectation.decimals for m in row}
        used = sorted({precision if d is None else min(d, precision) for d in decs})
        at = f"at {used[0]} decimals" if len(used) == 1 else "at the decimals you wrote"
        scope = "the query's row" if res.scope == "query" else "every value"
        if res.ok:
            how = f", {res.basis_note}" if res.basis == "rounded" else ""
            lines.append(f"✓ {sid}: matches{how} ({res.compared} values, {scope}, {at})")
            continue
        n = len(res.mismatches)
        lines.append(f"✗ {sid}: {n} of {res.compared} values differ{'s' if n == 1 else ''} ({scope}, {at})")
        if res.inherited_from and res.mistake != "follows_from_yours":
            lines.append(f"    inherits the error in {res.inherited_from}")
        if res.mistake:
            lines.append(f"    mistake ({res.mistake}): {res.mistake_name}")
        lines.append("    " + res.explanation[0])
        if res.fix:
            lines.append(f"    fix: {res.fix}")
        lines += ["    " + line for line in res.explanation[1:]]
        if res.inherits:
            lines.append(f"    later steps that inherit this error: {', '.join(res.inherits)}")
    return lines
