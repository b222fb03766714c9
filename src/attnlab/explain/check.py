"""``--expect STEP=VALUES``: check a hand calculation against the walkthrough and name every mistake.

VALUES are the user's numbers, comma-separated, rows separated by ``;``. One row is compared with the
query's row of the step (or the whole step when it is a vector); several rows with the whole matrix.
(:mod:`attnlab.notes` gives explicit positions instead, e.g. one score.)

Fitting at the learner's decimals. Every way of working is a *hypothesis* (:mod:`.mistakes`): right;
right from the learner's own earlier numbers; each named mistake; and any of these with a slip in one
number. A hypothesis gives each number as an interval (:mod:`.recompute`, interval arithmetic): its
operands are taken as the learner had them — the learner's own earlier numbers (each standing for
everything that rounds to it; whole numbers and numbers equal to the right value stand for themselves), or the recorded numbers read exactly, as the tables show them
(``precision`` decimals), or rounded to the learner's own decimals (2 or more) — and propagated through
the step. A written number *fits* when it lies within half a unit of its last decimal of that interval.

The rule that chooses. Among the hypotheses, the one that leaves the fewest numbers unexplained (slips)
wins; then the simplest (right, or right from the learner's numbers, before a named mistake); then the
mistake whose operation is nearest the step (its own operation before an earlier one). A named mistake
with a slip on top is accepted only when it explains at least two numbers the right way does not. When
two mistakes are still equal, both are said ("either … or …"), with a row of the step where they give
different numbers when the compared row cannot tell them apart. A mistake is only a candidate when its
operation lies on the way from the learner's numbers to the step (see :mod:`.mistakes`).

Every error. Steps are judged in the walkthrough's order; a later step is judged against the learner's
own earlier numbers *and* checked for an error of its own: numbers that merely follow from an earlier
error are marked so (``follows_from``), and a new slip or mistake on top of them is named.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnlab.errors import AttnlabInputError
from attnlab.explain.mistakes import CATALOGUE, Hypothesis, hypotheses
from attnlab.explain.recompute import Interval, Override, ancestors, evaluate
from attnlab.explain.steps import Step, Walkthrough, fmt

__all__ = ["ExpectResult", "Expectation", "Mismatch", "check", "format_results", "parse_expect"]


@dataclass(frozen=True)
class Expectation:
    """One ``--expect``: the step id, the user's numbers (rows) and how many decimals each was written
    with; ``positions`` (optional) the index into the step of each number, row by row (one tuple per
    number), instead of the query's row or the whole step."""

    step_id: str
    rows: tuple[tuple[float, ...], ...]
    decimals: tuple[tuple[int | None, ...], ...]  # None: written with an exponent, compare at full precision
    texts: tuple[tuple[str, ...], ...]
    positions: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class Mismatch:
    index: tuple[int, ...]  # into the step's values
    expected: float  # the user's number
    expected_text: str
    actual: float
    decimals: int  # compared at this many decimals


@dataclass
class ExpectResult:
    """The outcome of one expectation.

    mismatches      the numbers that the right computation does not give (at the learner's decimals)
    mistake         a CATALOGUE id naming the error of this step; ``either`` the other ids (with the
                    token for ``another_query``) that fit equally well
    follows_from    the earlier step whose wrong numbers (the learner's own) this step's numbers follow
                    from; with ``mistake`` set too, the step has an error of its own on top
    slips           the numbers that no way of working gives (one_wrong_number: the one slip)
    own_values      what the step gives from the learner's own earlier numbers, at the mismatches
    tell_apart      for a tie: where the tied mistakes give different numbers
    inherited_from  the nearest earlier failing step this one is computed from; ``inherits`` the later
                    steps that inherit this one's error
    """

    expectation: Expectation
    scope: str  # "query" (the query's row), "all", or "cells" (positions given)
    compared: int
    mismatches: list[Mismatch] = field(default_factory=list)
    explanation: list[str] = field(default_factory=list)
    inherits: list[str] = field(default_factory=list)
    inherited_from: str | None = None
    basis: str = "exact"  # "exact", "rounded" (from the operands as shown), or "own" (from your numbers)
    basis_note: str = ""  # e.g. "computed from the rounded weights shown above (trainable.weights at 4 decimals)"
    mistake: str | None = None  # a CATALOGUE id when the mismatch is a known mistake
    mistake_name: str = ""  # one line naming it
    fix: str = ""
    either: list[str] = field(default_factory=list)
    follows_from: str | None = None
    slips: list[tuple[int, ...]] = field(default_factory=list)
    own_values: dict[tuple[int, ...], float] = field(default_factory=dict)
    tell_apart: str = ""

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def own_error(self) -> bool:
        """Whether this step has an error of its own (not only numbers that follow from earlier ones)."""
        return not self.ok and self.mistake not in (None, "follows_from_yours") or (
            not self.ok and self.mistake is None)

    def to_dict(self) -> dict[str, Any]:  # a JSON object
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
            "either": self.either,
            "follows_from": self.follows_from,
            "own_error": self.own_error,
            "slips": [list(i) for i in self.slips],
            "tell_apart": self.tell_apart or None,
        }


def _num(v: float) -> float | str:
    return v if math.isfinite(v) else ("-inf" if v < 0 else ("inf" if v > 0 else "nan"))


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$|^[+-]?inf$", re.IGNORECASE)
def parse_expect(text: str, valid_steps: Sequence[str]) -> Expectation:
    """Parse ``STEP=VALUES``; ValueError (one line) for an unknown step or malformed numbers."""
    if "=" not in text:
        raise AttnlabInputError(f"--expect must be STEP=VALUES, e.g. trainable.scores=4,5,3; got {text!r}")
    step_id, _, values = text.partition("=")
    step_id = step_id.strip()
    if step_id not in valid_steps:
        raise AttnlabInputError(f"--expect: unknown step {step_id!r}; valid steps: {', '.join(valid_steps)}")
    body = values.strip().strip("[]()").replace("],", ";").replace("[", "").replace("]", "")
    if not body.strip():
        raise AttnlabInputError(f"--expect {step_id}: no values given; write them as 0.1,0.2 (rows separated by ;)")
    rows, decs, texts = [], [], []
    for r, row_text in enumerate(body.split(";")):
        cells = [c for c in re.split(r"[,\s]+", row_text.strip()) if c]
        if not cells:
            raise AttnlabInputError(f"--expect {step_id}: row {r + 1} is empty")
        row, dec = [], []
        for c in cells:
            if not _NUMBER.match(c):
                raise AttnlabInputError(f"--expect {step_id}: {c!r} is not a number")
            row.append(float(c))
            mantissa = c.lower().split("e")[0]
            dec.append(None if "e" in c.lower() else (len(mantissa.split(".")[1]) if "." in mantissa else 0))
        rows.append(tuple(row))
        decs.append(tuple(dec))
        texts.append(tuple(cells))
    width = len(rows[0])
    for r, parsed in enumerate(rows):
        if len(parsed) != width:
            raise AttnlabInputError(
                f"--expect {step_id}: rows must have the same length, row 1 has {width} and row {r + 1} {len(parsed)}"
            )
    return Expectation(step_id, tuple(rows), tuple(decs), tuple(texts))


def _as_rows(a: np.ndarray) -> np.ndarray:
    return a.reshape(1, 1) if a.ndim == 0 else a.reshape(-1, a.shape[-1])


# Plural words for an operand's symbol, for "computed from the rounded weights shown above".
_PLURAL = {"weight": "weights", "score": "scores", "scaled": "scaled scores", "q": "queries", "k": "keys",
           "v": "values", "x": "embeddings", "zeroed": "zeroed weights", "masked": "masked scores",
           "c": "merged context vectors", "z": "context vectors", "dropped": "weights"}
_SLACK = 1e-7  # float32 recordings: a number exactly on a rounding boundary is not decided by float error


@dataclass
class _Compared:
    """The user's numbers and where they are in the step."""

    user: np.ndarray  # (n,) the numbers, row by row
    decimals: np.ndarray  # (n,) compared at this many decimals
    pos: list[tuple[int, ...]]  # index of each number into the step's values
    texts: list[str]

    def take(self, a: np.ndarray) -> np.ndarray:
        return np.array([a[p] for p in self.pos], dtype=np.float64)

    def fits(self, iv: Interval) -> np.ndarray:
        """Which numbers lie within half a unit of their last decimal of the interval."""
        mid, rad = self.take(iv.mid), self.take(iv.rad)
        half = 0.5 * np.power(10.0, -self.decimals.astype(np.float64))
        with np.errstate(invalid="ignore"):
            close = np.abs(self.user - mid) <= rad + half + _SLACK * np.maximum(1.0, np.abs(np.nan_to_num(mid)))
        inf = ~np.isfinite(mid) | ~np.isfinite(self.user)
        return np.where(inf, self.user == mid, close)

    def given(self, walk: Walkthrough, step_id: str) -> Interval:
        """The learner's numbers as operands of later steps: the recorded step, with every number the
        learner wrote replaced by the interval of what rounds to it."""
        rec = walk.step(step_id).values.astype(np.float64)
        mid, rad = rec.copy(), np.zeros_like(rec)
        written = Interval.written(self.user, self.decimals)
        for i, p in enumerate(self.pos):
            # whole numbers, and numbers that are exactly the right value, were had exactly (no rounding)
            exact = self.decimals[i] == 0 or abs(self.user[i] - rec[p]) <= 1e-9 * max(1.0, abs(rec[p]))
            mid[p], rad[p] = written.mid[i], 0.0 if exact else written.rad[i]
        return Interval(mid, rad)


@dataclass
class _Try:
    """One hypothesis tried on one step: how many numbers it leaves unexplained at its best basis."""

    hyp: Hypothesis
    own: bool  # from the learner's own earlier numbers
    misfit: np.ndarray  # (n,) bool at the best basis
    basis: int | None
    value: Interval  # the whole step at the best basis
    distance: int  # operations between the overridden step and this one (0 for the right way)

    @property
    def slips(self) -> int:
        return int(self.misfit.sum())

    def key(self) -> tuple[int, int, int, int]:
        return self.slips, 0 if self.hyp.mistake is None else 1, self.distance, 0 if self.own else 1


def _try(walk: Walkthrough, sid: str, cmp: _Compared, hyp: Hypothesis, given: Mapping[str, Interval],
         bases: Sequence[int | None], own: bool) -> _Try | None:
    """``hyp`` on step ``sid``: None when it overrides nothing on the way (the step lacks its operation)."""
    best: _Try | None = None
    dist = ancestors(walk, sid, frozenset(given) - {sid})
    for basis in bases:
        hit: list[str] = []
        override: Override | None = None
        if hyp.override is not None:
            inner = hyp.override

            def counting(w: Walkthrough, step: Step, ops: list[Interval], values: Mapping[str, Interval],
                         inner: Override = inner, hit: list[str] = hit) -> Interval | None:
                out = inner(w, step, ops, values)
                if out is not None:
                    hit.append(step.id)
                return out
            override = counting
        value = evaluate(walk, sid, given=given, basis=basis, override=override)
        if value is None or (hyp.override is not None and not hit):
            return None
        distance = min((dist.get(h, 99) for h in hit), default=0)
        t = _Try(hyp, own, ~cmp.fits(value), basis, value, distance)
        if best is None or t.slips < best.slips:
            best = t
    return best


def _bases(cmp: _Compared, precision: int) -> list[int | None]:
    own = sorted({int(d) for d in cmp.decimals if 2 <= d < precision}, reverse=True)
    return [None, precision, *own]


def _label_text(walk: Walkthrough, hyp: Hypothesis) -> tuple[str, str]:
    assert hyp.mistake is not None
    return CATALOGUE[hyp.mistake].text(walk, **dict(hyp.words))


def _name(walk: Walkthrough, res: ExpectResult, mistake_id: str, **extra: str) -> None:
    res.mistake = mistake_id
    res.mistake_name, res.fix = CATALOGUE[mistake_id].text(walk, **extra)


def _tell_apart(walk: Walkthrough, sid: str, tied: Sequence[_Try], cmp: _Compared) -> str:
    """Where the tied hypotheses give different numbers (a row of the step), for a tie."""
    step = walk.step(sid)
    d = int(cmp.decimals.min()) if len(cmp.decimals) else 4
    a, b = tied[0].value.mid, tied[1].value.mid
    with np.errstate(invalid="ignore"):
        differ = ~np.isclose(np.nan_to_num(a, neginf=-1e30), np.nan_to_num(b, neginf=-1e30),
                             atol=10.0 ** (-d), rtol=0)
    rows = sorted({p[0] for p in zip(*np.nonzero(differ))}) if differ.ndim == 2 else []
    seen = {p[0] for p in cmp.pos} if step.values.ndim == 2 else set()
    other = [r for r in rows if r not in seen]
    if step.values.ndim == 2 and other:
        label = step.labels[0][other[0]]
        return (f"the numbers you gave cannot tell them apart; the row of {label} can: check that row "
                f"(or the whole matrix) too")
    return ""


def _diagnose(walk: Walkthrough, res: ExpectResult, cmp: _Compared, given: Mapping[str, Interval],
              failing_given: Sequence[str], precision: int, right: _Try) -> None:
    """Name this step's error (fills ``res.mistake*``, ``follows_from``, ``slips``)."""
    sid = res.expectation.step_id
    bases = _bases(cmp, precision)
    qa = walk.step(sid).query_axis
    query_row = res.scope == "query" or walk.step(sid).values.ndim == 1 or (
        res.scope == "cells" and qa is not None and all(p[qa] == walk.query for p in cmp.pos))
    tries: list[_Try] = [right]
    own_base: _Try | None = None
    if failing_given:
        own_base = _try(walk, sid, cmp, Hypothesis(None), given, bases, own=True)
        if own_base is not None:
            tries.append(own_base)
    for hyp in hypotheses(walk, query_row=query_row):
        for own, src in ((False, {}), (True, given)) if failing_given else ((False, {}),):
            t = _try(walk, sid, cmp, hyp, src, bases, own)
            if t is None:
                continue
            base = own_base if own and own_base is not None else right
            if not (t.misfit != base.misfit).any() and np.array_equal(t.value.mid, base.value.mid):
                continue  # gives the base's numbers here: nothing to tell apart
            tries.append(t)
    tries.sort(key=_Try.key)
    best = tries[0]
    res.own_values = {cmp.pos[i]: float(cmp.take((own_base or right).value.mid)[i])
                      for i in range(len(cmp.pos))} if own_base is not None else {}
    if best.hyp.mistake is not None and best.slips > 0:
        base = own_base if best.own and own_base is not None else right
        if base.slips - best.slips < 2 or best.slips > 1:
            best = min((t for t in tries if t.hyp.mistake is None), key=_Try.key)
    earlier = failing_given[-1] if failing_given else ""
    if best.own and own_base is not None:
        res.follows_from = earlier
    if best.hyp.mistake is None:
        if best.slips == 0 and best.own:
            _name(walk, res, "follows_from_yours", earlier=earlier)
        elif best.slips == 1:
            i = int(np.argmax(best.misfit))
            res.slips = [cmp.pos[i]]
            _name(walk, res, "one_wrong_number", earlier=walk.cell_name(sid, cmp.pos[i]))
        elif best.own and best.slips < len(cmp.pos):
            res.slips = [cmp.pos[i] for i in np.nonzero(best.misfit)[0]]
        return
    tied = [t for t in tries if t.key()[:3] == best.key()[:3] and t.hyp.mistake is not None]
    labels: list[str] = []
    unique: list[_Try] = []
    for t in tied:
        if t.hyp.label not in labels:
            labels.append(t.hyp.label)
            unique.append(t)
    res.slips = [cmp.pos[i] for i in np.nonzero(best.misfit)[0]]
    res.mistake = best.hyp.mistake
    res.either = labels[1:]
    texts = [_label_text(walk, t.hyp) for t in unique]
    if len(unique) == 1:
        res.mistake_name, res.fix = texts[0]
    else:
        res.mistake_name = "either " + ", or ".join(n for n, _ in texts)
        res.fix = " — or, if that was it: ".join(f for _, f in texts)
        res.tell_apart = _tell_apart(walk, sid, unique, cmp)
    if res.slips:
        res.mistake_name += f"; and one more number is off: {walk.cell_name(sid, res.slips[0])}"


def _compared(walk: Walkthrough, exp: Expectation, precision: int) -> tuple[str, _Compared]:
    step = walk.step(exp.step_id)
    user = np.asarray(exp.rows, dtype=np.float64)  # (R, C)
    decimals = np.array([[precision if d is None else min(d, precision) for d in row] for row in exp.decimals])
    texts = [t for row in exp.texts for t in row]
    if exp.positions is not None:
        if len(exp.positions) != user.size:
            raise AttnlabInputError(f"{exp.step_id}: {user.size} numbers but {len(exp.positions)} positions")
        for p in exp.positions:
            if len(p) != step.values.ndim or any(not 0 <= i < n for i, n in zip(p, step.shape)):
                raise AttnlabInputError(f"{exp.step_id}: position {list(p)} is outside the step's shape {list(step.shape)}")
        return "cells", _Compared(user.ravel(), decimals.ravel(), [tuple(p) for p in exp.positions], texts)
    positions = np.stack(np.meshgrid(*[np.arange(n) for n in step.shape], indexing="ij"), axis=-1) \
        if step.values.ndim else np.zeros((1, 1, 0), dtype=int)  # (*shape, ndim)
    candidates = []
    if step.query_axis is not None:
        candidates.append(("query", step.query_values(walk.query), np.take(positions, walk.query, axis=step.query_axis)))
    candidates.append(("all", step.values, positions))
    for scope, vals, pos in candidates:
        if _as_rows(vals).shape == user.shape:
            flat = [tuple(int(i) for i in p) for p in pos.reshape(-1, max(step.values.ndim, 0))]
            return scope, _Compared(user.ravel(), decimals.ravel(), flat, texts)
    want = " or ".join(
        f"{_as_rows(v).shape[0]} row(s) of {_as_rows(v).shape[1]}"
        + (f" (the row of the query {walk.query_label})" if s == "query" else " (the whole step)")
        for s, v, _ in candidates
    )
    raise AttnlabInputError(f"--expect {exp.step_id}: expected {want}, got {user.shape[0]} row(s) of {user.shape[1]}")


def _basis_note(walk: Walkthrough, sid: str, basis: int | None, own: Sequence[str]) -> tuple[str, str]:
    if own:
        return "own", f"computed from your own {', '.join(own)}"
    step = walk.step(sid)
    if basis is None or step.how is None:
        return "exact", ""
    changed = [o for o in step.how.operands if o in walk and not np.array_equal(
        np.round(walk.step(o).values.astype(np.float64), basis), walk.step(o).values.astype(np.float64))]
    words = " and ".join(_PLURAL.get(walk.step(o).symbol, o) for o in changed) or "numbers"
    at = ", ".join(changed) or "the operands"
    return "rounded", f"computed from the rounded {words} shown above ({at} at {basis} decimals)"


def check(walk: Walkthrough, expectations: Sequence[Expectation], precision: int = 4) -> list[ExpectResult]:
    """Compare each expectation with the walkthrough at the learner's decimals and name every error
    (see the module docstring); results in the order of ``expectations``."""
    prepared = []
    for exp in expectations:
        scope, cmp = _compared(walk, exp, precision)
        prepared.append((ExpectResult(exp, scope, len(cmp.pos)), cmp))
    order = {sid: i for i, sid in enumerate(walk.step_ids)}
    given: dict[str, Interval] = {}
    failing: list[str] = []
    for res, cmp in sorted(prepared, key=lambda rc: order[rc[0].expectation.step_id]):
        sid = res.expectation.step_id
        bases = _bases(cmp, precision)
        right = _try(walk, sid, cmp, Hypothesis(None), {}, bases, own=False)
        if right is None:  # not an operation (inputs, weights, the classes' outputs): the recorded numbers
            value = Interval.point(walk.step(sid).values)
            right = _Try(Hypothesis(None), False, ~cmp.fits(value), None, value, 0)
        before = {g: v for g, v in given.items() if order[g] < order[sid]}
        mine = [g for g in ancestors(walk, sid, frozenset(before)) if g in before and g != sid]
        own_ok = None
        if right.slips and mine:
            own_ok = _try(walk, sid, cmp, Hypothesis(None), before, bases, own=True)
        failing_mine = [f for f in failing if f in mine]
        if right.slips == 0:
            res.basis, res.basis_note = _basis_note(walk, sid, right.basis, [])
        elif own_ok is not None and own_ok.slips == 0 and not failing_mine:
            res.basis, res.basis_note = _basis_note(walk, sid, own_ok.basis, mine)
        else:
            actual = cmp.take(walk.step(sid).values.astype(np.float64))
            for i in np.nonzero(right.misfit)[0]:
                res.mismatches.append(Mismatch(cmp.pos[i], float(cmp.user[i]), cmp.texts[i], float(actual[i]),
                                               int(cmp.decimals[i])))
            earlier_failing = [f for f in failing if order[f] < order[sid]]
            res.inherited_from = next((e for e in reversed(earlier_failing) if sid in walk.dependents(e)), None)
            res.inherits = walk.dependents(sid)
            _diagnose(walk, res, cmp, before, failing_mine, precision, right)
            first = res.mismatches[0]
            name = walk.cell_name(sid, first.index)
            coarse, shown = fmt(first.actual, first.decimals), fmt(first.actual, precision)
            line = f"{name}: you have {first.expected_text}, attnlab has {coarse}" + (
                f" ({shown})" if shown != coarse else "")
            if res.follows_from and first.index in res.own_values:
                line += f"; from your own {res.follows_from}: {fmt(res.own_values[first.index], first.decimals)}"
            res.explanation = [line] + walk.explain_cell(sid, first.index, precision)
            failing.append(sid)
        given[sid] = cmp.given(walk, sid)
    return [res for res, _ in prepared]


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
        if res.follows_from and res.mistake not in (None, "follows_from_yours"):
            lines.append(f"    built on your own {res.follows_from} (which is wrong), and with an error of its own:")
        elif res.inherited_from and res.mistake != "follows_from_yours":
            lines.append(f"    inherits the error in {res.inherited_from}")
        if res.mistake:
            lines.append(f"    mistake ({' or '.join([res.mistake, *res.either])}): {res.mistake_name}")
        if res.tell_apart:
            lines.append(f"    {res.tell_apart}")
        lines.append("    " + res.explanation[0])
        if res.fix:
            lines.append(f"    fix: {res.fix}")
        lines += ["    " + line for line in res.explanation[1:]]
        if res.inherits:
            lines.append(f"    later steps that inherit this error: {', '.join(res.inherits)}")
    return lines
