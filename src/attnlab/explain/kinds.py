"""The step kinds of the walkthrough (``How.kind``), in one table: what each kind means everywhere.

Every recorded step says how its numbers were made with a kind (``project``, ``dot``, ``softmax``, ...).
:data:`KINDS` maps each kind to a :class:`StepKind` that says, for that kind:

    working     how one number's working is written (``explain_cell``, ``--expect`` diagnoses, the
                walkthrough's detail lines and the small report's hover text)
    recompute   how its numbers are recomputed from its operands, as intervals (``attnlab check`` and
                ``--expect``, :mod:`attnlab.explain.recompute`)
    template    the report's hover text for large maps: per step, cases of ``[test, lines]`` whose
                ``{placeholders}`` the page fills from the numbers it already holds (see below)
    and how the pictures read it (``cellwise``, ``hides``, ``masked_holds``, ``binary``, ...).

The readers (:mod:`.cells`, :mod:`.recompute`, :mod:`attnlab.maps`, :mod:`attnlab.heatmap` and the report)
look a step's kind up here (:func:`kind_of`) and never branch on its name. A new kind is one new entry.

Hover templates. A template is a list of cases ``[test, [line, ...]]``: the first case whose test holds
for the cell is written. Step-level words (symbols, divisors, the formula) are already in the text; the
page fills the rest per cell. Literal braces are doubled (``{{``). ``src`` is ``a``, ``b`` or ``c`` (the
step's operands in order) or nothing (the step itself); ``i``/``j`` are the cell's row and column (for a
step that is the query's own row, ``i`` is the query):

    {src.cell}   the cell's name              {src.num}     its number, trailing zeros dropped
    {text}       the cell's number as shown   {src.exp}     exp of the number (0 for -inf)
    {q} {k}      the row's and column's labels, {qpos} {kpos} their 1-based positions
    {src.rowq} {src.rowk}   the name of the operand's row i (j)    {src.vecq} {src.veck}  its numbers
    {src.sum} {src.expsum}  Σ of the cell's row (of its exps)      {src.exps}  "exp(x) + exp(y) + ..."
    {terms}      Σ_j a(i, j) × b(j, col) written out term by term
    tests (joined by &, ! negates): src.inf (the number is -inf), src.zero, src.big (its row's largest
    finite number is above 80: exp would overflow), src.cols<=N (its rows hold at most N numbers), after
    (j > i)

:func:`render_template` is the Python twin of the page's filler (``report.js``), as
:func:`attnlab.report.codec.decode` is of its decoder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any

import numpy as np

from attnlab.explain import words as w
from attnlab.explain.interval import (
    Interval,
    by_sum,
    mask_fill,
    mask_renormalise,
    matmul,
    merge_heads,
    scale,
    scores,
    softmax,
    times,
)

if TYPE_CHECKING:  # the steps module reads this table (explain_cell): only the types come from it
    from attnlab.explain.steps import Step, Walkthrough

__all__ = ["KINDS", "PLAIN", "Cell", "StepKind", "Template", "explain_cell", "hover_lines", "kind_of", "js_trimmed", "linear_row", "module_template",
           "operate", "render_template"]

# One case of a hover template: [test, [line, ...]] (see the module docstring).
Template = list[list[Any]]


@dataclass(frozen=True)
class Cell:
    """One number of a recorded step, with what every kind's working reads."""

    walk: Walkthrough
    step: Step
    index: tuple[int, ...]
    precision: int
    ops: tuple[Step, ...]  # the recorded operands, in the order of the formula
    params: Mapping[str, Any]

    @property
    def value(self) -> float:
        return float(self.step.values[self.index])

    @property
    def name(self) -> str:
        return w.cell_name(self.walk, self.step, self.index)

    @property
    def shown(self) -> str:
        """The number as the tables show it."""
        return w.value_text(self.value, self.precision)


Working = Callable[[Cell], "list[str] | None"]
Recompute = Callable[["Walkthrough", "Step", list[Interval]], "Interval | None"]
MakeTemplate = Callable[["Walkthrough", "Step"], Template]


@dataclass(frozen=True)
class StepKind:
    """What one step kind means to every reader of the walkthrough.

    name          the kind, as in ``How.kind``
    what          the operation, in a few words
    working       ``working(cell)``: the lines saying how one number is made, or None when this step
                  lacks what they need (the plain line ``name = value (formula)`` is written instead)
    recompute     ``recompute(walk, step, operands)``: the step's numbers from its operands' intervals (None:
                  the kind is not an operation on recorded numbers: inputs, weights, the classes' outputs)
    template      ``template(walk, step)``: the report's hover text for one step (see the module docstring)
    cellwise      cell (i, j) is made from the same cell of the first operand (hover text follows it back)
    hides         how a map of this kind marks hidden cells: "nonfinite" (-inf scores), "zeros" (a mask's
                  0s) or "content" (the map's values are its subject: only the causal future is hidden)
    may_be_causal a class's output: recorded without its mask, so exact zeros after the diagonal are read
                  as a causal mask
    masked_holds  the pictures' words for what a masked cell of this kind holds, by reason ("" any reason)
    binary        a 0/1 map: its colour scale runs from 0 to 1
    drawn         a random draw: with no operands its numbers are taken as recorded, never re-rounded
    spelled_out   the report writes each number of a followed token's row out (a short row)
    adds_formula  the hover text ends with the step's formula (``where ...``)
    holds_neg_inf its masked cells hold -inf (the one infinity finite input may give: masked scores)
    """

    name: str
    what: str
    working: Working | None = None
    recompute: Recompute | None = None
    template: MakeTemplate | None = None
    cellwise: bool = False
    hides: str = "nonfinite"
    may_be_causal: bool = False
    masked_holds: Mapping[str, str] = field(default_factory=lambda: {"": "weight 0"})
    binary: bool = False
    drawn: bool = False
    spelled_out: bool = False
    adds_formula: bool = False
    holds_neg_inf: bool = False

    def masked_words(self, reason: str) -> str:
        """What a masked cell of this kind holds, for the pictures' legends."""
        return self.masked_holds.get(reason, self.masked_holds[""])

    def hover_template(self, walk: Walkthrough, step: Step) -> Template:
        """The report's hover template of ``step`` (the plain line when the kind has none)."""
        return (self.template or _plain_template)(walk, step)


# --------------------------------------------------------------------------------------------------
# Working: how one number is made, from recorded numbers only
# --------------------------------------------------------------------------------------------------


def _plain_line(c: Cell) -> list[str]:
    return [f"{c.name} = {c.shown} ({c.step.formula})"]


def _sum_of_products(a: np.ndarray, b: np.ndarray, value: float, p: int, d: int) -> str | None:
    """``= 2×1 + 1×1 = 2 + 1 = 3`` for short vectors, the products those of the numbers printed with ``d``
    decimals."""
    if len(a) > w.MAX_TERMS:
        return None
    ia, ib = w.fmt_vector(a, d), w.fmt_vector(b, d)  # decide whole-number display per vector
    int_a, int_b = "." not in ia, "." not in ib
    prods = [w.printed(x, d) * w.printed(y, d) for x, y in zip(a, b)]
    terms = w.signed_sum([f"{w.fmt(x, d, integral=int_a)}×{w.factor(w.fmt(y, d, integral=int_b))}"
                          for x, y in zip(a, b)])
    sums = w.signed_sum([w.fmt(v, d, integral=int_a and int_b) for v in prods])
    return f"  = {terms} = {sums} = {w.value_text(value, p)}"


def _made_from(walk: Walkthrough, step: Step, row: tuple[int, ...], p: int) -> list[str]:
    """How a row of an operand was made, when it is a projection ``x @ W``."""
    if step.how is None or step.how.kind != "project":
        return []
    x_step, w_step = (walk.step(o) for o in step.how.operands)
    x_name = w.row_name(walk, x_step, (row[-1],))
    return [(f"  {w.row_name(walk, step, row)} = {x_name} @ {w_step.symbol} = "
             f"{w.fmt_vector(x_step.values[row[-1]], p)} @ {w_step.symbol} = {w.fmt_vector(step.values[row], p)}")]


def _working_project(c: Cell) -> list[str] | None:
    if len(c.ops) != 2:
        return None
    x_step, w_step = c.ops
    p, value = c.precision, c.value
    i, j = c.index[-2], c.index[-1]
    x_name = w.row_name(c.walk, x_step, (i,))
    col = w_step.values[:, j]
    d = w.enough(p, lambda d: w.same(w.dot_printed(x_step.values[i], col, d), value, p))
    return [
        (f"{c.name} = {x_name} · {w_step.symbol}[:, {c.step.labels[-1][j]}] = "
         f"{w.fmt_vector(x_step.values[i], d)} · {w.fmt_vector(col, d)} = {c.shown}"),
        (f"  {w.row_name(c.walk, c.step, c.index[:-1])} = {x_name} @ {w_step.symbol} = "
         f"{w.fmt_vector(x_step.values[i], p)} @ {w_step.symbol} = {w.fmt_vector(c.step.values[c.index[:-1]], p)}"),
    ]


def _working_dot(c: Cell) -> list[str] | None:
    if len(c.ops) != 2:
        return None
    a_step, b_step = c.ops
    p, value = c.precision, c.value
    a_row: tuple[int, ...]
    b_row: tuple[int, ...]
    if c.step.values.ndim == 1:
        i, j = int(c.params.get("row", c.walk.query)), c.index[0]
        a_row, b_row = (i,) if a_step.values.ndim == 2 else (), (j,)
    else:
        i, j = c.index[-2], c.index[-1]
        a_row, b_row = c.index[:-2] + (i,), c.index[:-2] + (j,)
    av, bv = a_step.values[a_row], b_step.values[b_row]
    a_name, b_name = w.row_name(c.walk, a_step, a_row), w.row_name(c.walk, b_step, b_row)
    d = w.enough(p, lambda d: w.same(w.dot_printed(av, bv, d), value, p) and (len(av) > w.MAX_TERMS or w.same(
        sum(w.printed(w.printed(x, d) * w.printed(y, d), d) for x, y in zip(av, bv)), value, p)))
    lines = [f"{c.name} = {a_name} · {b_name} = {w.fmt_vector(av, d)} · {w.fmt_vector(bv, d)} = {c.shown}"]
    written = _sum_of_products(av, bv, value, p, d)
    if written:
        lines.append(written)
    lines += _made_from(c.walk, a_step, a_row, p)
    if (b_step.id, b_row) != (a_step.id, a_row):
        lines += _made_from(c.walk, b_step, b_row, p)
    return lines


def _working_scale(c: Cell) -> list[str] | None:
    if not c.ops:
        return None
    src, p = c.ops[0], c.precision
    divisor = c.params.get("divisor_text", w.fmt(c.params.get("divisor", 1.0), p))
    sv, dv = float(src.values[c.index]), float(c.params.get("divisor", 1.0))
    d = w.enough(p, lambda d: w.same(w.printed(sv, d) / w.printed(dv, d), c.value, p))
    return [f"{c.name} = {w.cell_name(c.walk, src, c.index)} / {divisor} = {w.fmt(sv, d)} / {w.fmt(dv, d)} = {c.shown}"]


def _working_softmax(c: Cell) -> list[str] | None:
    if not c.ops:
        return None
    src, p, value, j = c.ops[0], c.precision, c.value, c.index[-1]
    row = src.values[c.index[:-1]]
    src_name = w.cell_name(c.walk, src, c.index)
    finite = row[np.isfinite(row)]
    if finite.size and float(finite.max()) > 80.0:  # exp would overflow on display: say it in words
        return [f"{c.name} = exp({src_name}) / Σ_k exp(row k) = {c.shown}"]

    def parts(d: int) -> tuple[list[float], float, float]:
        exps = [w.printed(math.exp(w.printed(v, d)), d) if math.isfinite(v) else 0.0 for v in row]
        total = w.printed(sum(exps), d)
        return exps, total, (exps[j] / total if total else math.nan)

    def adds_up(d: int) -> bool:
        exact = [math.exp(w.printed(v, d)) if math.isfinite(v) else 0.0 for v in row]
        return w.same(parts(d)[2], value, p) and w.same(exact[j] / sum(exact), value, p)

    d = w.enough(p, adds_up) if len(row) <= w.MAX_TERMS else p
    exps, total, _ = parts(d)
    listed = " + ".join(f"exp({w.fmt(v, d)})" for v in row) if len(row) <= w.MAX_TERMS else f"Σ of {len(row)} exps"
    return [(f"{c.name} = exp({src_name}) / Σ_k exp(row k) = exp({w.fmt(row[j], d)}) / ({listed}) "
             f"= {w.fmt(exps[j], d)} / {w.fmt(total, d)} = {c.shown}")]


def _working_by_sum(c: Cell) -> list[str] | None:
    """``divide_by_sum`` and ``mask_after``: the cell over its row's sum."""
    if not c.ops:
        return None
    src, p = c.ops[0], c.precision
    row = src.values[c.index[:-1]]
    top, total = float(row[c.index[-1]]), float(row.astype(np.float64).sum())
    d = w.enough(p, lambda d: w.same(w.printed(top, d) / w.printed(total, d), c.value, p))
    return [(f"{c.name} = {w.cell_name(c.walk, src, c.index)} / Σ_k {src.symbol}(·, k) = {w.fmt(top, d)} / "
             f"{w.fmt(total, d)} = {c.shown}")]


def _working_weighted_sum(c: Cell) -> list[str] | None:
    if len(c.ops) != 2:
        return None
    w_step, v_step = c.ops
    p, col = c.precision, c.index[-1]
    if c.step.values.ndim == 1:
        wrow, vcol, q = w_step.values, v_step.values[:, col], c.walk.query_label
    else:
        lead, i = c.index[:-2], c.index[-2]
        wrow, vcol, q = w_step.values[lead + (i,)], np.take(v_step.values[lead], col, axis=-1), c.step.labels[-2][i]
    keys = w_step.labels[-1]
    line = f"{c.name} = Σ_j {w_step.symbol}({q}, j) × {v_step.symbol}_j[{c.step.labels[-1][col]}]"
    extra = []
    if len(wrow) <= w.MAX_TERMS * 2:
        d = w.enough(p, lambda d: w.same(w.dot_printed(wrow, vcol, d), c.value, p))
        line += " = " + w.signed_sum([f"{w.fmt(a, d)}×{w.factor(w.fmt(b, d))}" for a, b in zip(wrow, vcol)])
        extra.append("  (" + ", ".join(f"j = {k}" for k in keys) + ")")
    return [f"{line} = {c.shown}", *extra]


def _working_attn_scores(c: Cell) -> list[str] | None:
    """``score = q · k / √hd`` for the opt-in sections' scores (per head; a grouped-query head reads its
    group's keys; -inf said in words: an empty cache slot, outside the window, or after the query)."""
    if len(c.ops) != 2:
        return None
    q_step, k_step = c.ops
    p, value = c.precision, c.value
    lead, i, j = c.index[:-2], c.index[-2], c.index[-1]
    q_lab, k_lab = c.step.labels[-2][i], c.step.labels[-1][j]
    if math.isinf(value):
        return [f"{c.name} = -inf: {_why_minus_inf(c.params, q_lab, k_lab, i, j)}, so exp(-inf) = 0 gives it weight 0"]
    kv_of = c.params.get("kv_head_of")
    k_lead = tuple(lead)
    if kv_of is not None and lead:
        k_lead = (int(kv_of[lead[0]]),) + tuple(lead[1:])
    qv, kv = q_step.values[lead + (i,)], k_step.values[k_lead + (j,)]
    by = float(c.params.get("scale", 1.0))
    d = w.enough(p, lambda d: w.same(w.dot_printed(qv, kv, d) / by, value, p))
    k_name = w.row_name(c.walk, k_step, k_lead + (j,)).rpartition(": ")[2]  # the head is said once, in name
    q_name = w.row_name(c.walk, q_step, lead + (i,)).rpartition(": ")[2]
    via = f" of key/value head {k_lead[0] + 1}" if kv_of is not None and lead else ""
    return [(f"{c.name} = {q_name} · {k_name}{via} / √hd = "
             f"{w.fmt_vector(qv, d)} · {w.fmt_vector(kv, d)} / {w.fmt(by, d)} = {c.shown}")]


def _why_minus_inf(params: Mapping[str, Any], q_lab: str, k_lab: str, i: int, j: int) -> str:
    mask = str(params.get("mask"))
    if mask == "cache":
        return f"at step {i + 1} the cache holds tokens 1..{i + 1}, and {k_lab} is not written yet"
    if mask == "window" and j <= i:
        return f"{k_lab} is outside {q_lab}'s window of {params.get('window')}"
    return f"{k_lab} comes after {q_lab}"


def _working_mask(c: Cell) -> list[str] | None:
    qi, kj = c.index[-2], c.index[-1]
    q, k = c.step.labels[-2][qi], c.step.labels[-1][kj]
    if "cache" in c.params:
        state = "holds" if c.value else "does not hold yet"
        return [(f"{c.name} = {c.shown}: once {q} (token {qi + 1}) is written, the cache {state} "
                 f"{k} (token {kj + 1}); it holds tokens 1..{qi + 1}")]
    if "window" in c.params:
        win = int(c.params["window"])
        lo = max(qi - win + 1, 0)
        where = ("after" if kj > qi else "inside the window of" if kj > qi - win else
                 f"{qi - kj} tokens before, outside the window of")
        return [(f"{c.name} = {c.shown}: {k} (position {kj + 1}) is {where} {q} (position {qi + 1}); "
                 f"with window {win}, {q} sees positions {lo + 1}..{qi + 1}")]
    where = "at or before" if kj <= qi else "after"
    verdict = "may attend" if c.value else "masked out"
    return [(f"{c.name} = {c.shown}: {k} (position {kj + 1}) is {where} {q} "
             f"(position {qi + 1}), so {q} {verdict} {k}")]


def _working_out_of_window(c: Cell) -> list[str] | None:
    qi, kj = c.index[-2], c.index[-1]
    q, k = c.step.labels[-2][qi], c.step.labels[-1][kj]
    if c.value:
        return [f"{c.name} = 1: {k} is before {q} (causal allows it) but outside the window of {c.params.get('window')}"]
    why = "after it (the causal mask hides it anyway)" if kj > qi else "inside the window"
    return [f"{c.name} = 0: {k} is {why}"]


def _working_gqa_share(c: Cell) -> list[str] | None:
    h, g = c.index[-2], c.index[-1]
    per = int(c.params.get("per", 1))
    verdict = "uses" if c.value else "does not use"
    return [(f"{c.name} = {c.shown}: query head {h + 1} {verdict} key/value head {g + 1} "
             f"(query head h uses key/value head h // {per}, counting from 0: {h} // {per} = {h // per})")]


def _working_rope_angle(c: Cell) -> list[str] | None:
    i, d = c.index[-2], c.index[-1]
    theta = c.params.get("theta", [1.0])
    half = len(theta)
    th = float(theta[d % half]) if half else 1.0
    fn, p = c.params.get("fn", "cos"), c.precision
    return [(f"{c.name} = {fn}(position × θ_{d % half + 1}) = {fn}({i} × {w.fmt(th, p)}) = "
             f"{fn}({w.fmt(i * th, p)}) = {c.shown}")]


def _working_rope(c: Cell) -> list[str] | None:
    if len(c.ops) != 3:
        return None
    src, cos_s, sin_s = c.ops
    p, lead, d, i = c.precision, c.index[:-1], c.index[-1], c.index[-2]
    vec = src.values[lead]
    half = len(vec) // 2
    other = -vec[d + half] if d < half else vec[d - half]
    cos, sin = float(cos_s.values[i, d]), float(sin_s.values[i, d])
    pair = f"-{src.symbol}[{d + half + 1}]" if d < half else f"{src.symbol}[{d - half + 1}]"
    return [(f"{c.name} = {src.symbol}[{d + 1}] × cos + {pair} × sin = {w.fmt(float(vec[d]), p)} × {w.fmt(cos, p)} "
             f"+ {w.factor(w.fmt(float(other), p))} × {w.fmt(sin, p)} = {c.shown}")]


def _working_mask_zero(c: Cell) -> list[str] | None:
    if len(c.ops) != 2:
        return None
    w_step, m_step = c.ops
    p = c.precision
    return [(f"{c.name} = {w.cell_name(c.walk, w_step, c.index)} × mask = {w.fmt(w_step.values[c.index], p)} × "
             f"{w.fmt(m_step.values[c.index], p)} = {c.shown}")]


def _working_mask_before(c: Cell) -> list[str] | None:
    if not c.ops:
        return None
    if math.isinf(c.value):
        return [(f"{c.name} = -inf: {c.step.labels[-1][c.index[-1]]} comes after {c.step.labels[-2][c.index[-2]]}, "
                 "so exp(-inf) = 0 gives it weight 0")]
    return [f"{c.name} = {w.cell_name(c.walk, c.ops[0], c.index)} = {c.shown} (kept)"]


def _working_dropout(c: Cell) -> list[str] | None:
    if not c.ops:
        return None
    src, p = c.ops[0], c.precision
    rate = float(c.params.get("p", 0.0))
    sv = float(src.values[c.index])
    if c.value == 0.0 and sv != 0.0:
        return [f"{c.name} = 0: dropped (each weight is dropped with probability p = {rate:g})"]
    keep = 1.0 / (1.0 - rate)
    d = w.enough(p, lambda d: w.same(w.printed(sv, d) * w.printed(keep, d), c.value, p))
    return [f"{c.name} = {w.cell_name(c.walk, src, c.index)} × 1/(1 − p) = {w.fmt(sv, d)} × {w.fmt(keep, d)} = {c.shown}"]


def _working_linear(c: Cell) -> list[str] | None:
    if len(c.ops) != 2:
        return None
    x_step, w_step = c.ops
    p, row, j = c.precision, c.index[:-1], c.index[-1]
    bias = c.params.get("bias")
    b = float(bias[j]) if bias is not None else 0.0
    xr, wc = x_step.values[row], w_step.values[:, j]
    d = p
    if len(xr) <= w.MAX_TERMS * 2:
        d = w.enough(p, lambda d: w.same(w.dot_printed(xr, wc, d) + w.printed(b, d), c.value, p))
    col = c.step.labels[-1][j]
    return [(f"{c.name} = {w.row_name(c.walk, x_step, row)} · {w_step.symbol}[:, {col}] + b[{col}]"
             f" = {w.fmt_vector(xr, d)} · {w.fmt_vector(wc, d)} {'−' if b < 0 else '+'} {w.fmt(abs(b), d)} "
             f"= {c.shown}")]


def _working_scaled_dot(c: Cell) -> list[str] | None:
    """A pretrained head's ``q · k / √d_head`` and how its q and k rows were made (``x @ W + b``)."""
    if len(c.ops) != 2 or len(c.index) != 2:
        return None
    q_step, k_step = c.ops
    p, (i, j) = c.precision, c.index
    divisor = c.params.get("divisor_text", w.value_text(c.params.get("divisor", 1.0), p))
    lines = [(f"{c.name} = {w.row_name(c.walk, q_step, (i,))} · {w.row_name(c.walk, k_step, (j,))} / {divisor} = "
              f"{w.fmt_vector(q_step.values[i], p)} · {w.fmt_vector(k_step.values[j], p)} / {divisor} = {c.shown}")]
    for operand, row in ((q_step, i), (k_step, j)):
        lines += linear_row(c.walk, operand, row, p)
    return lines


def linear_row(walk: Walkthrough, step: Step, row: int, p: int,
               vector: Callable[[Any, int], str] = w.fmt_vector) -> list[str]:
    """``q_cat = x_cat @ W_query + b_query = [..] @ W_query + b_query = [..]`` from recorded numbers
    (``vector`` writes a row of numbers); nothing for a step that is not a projection."""
    if step.how is None or step.how.kind != "linear":
        return []
    x_step, w_step = (walk.step(o) for o in step.how.operands)
    x_name = w.row_name(walk, x_step, (row,))
    plus = f" + {step.how.params.get('bias_name', 'b')}" if step.how.params.get("bias", ()) is not None else ""
    return [(f"  {w.row_name(walk, step, (row,))} = {x_name} @ {w_step.symbol}{plus} = "
             f"{vector(x_step.values[row], p)} @ {w_step.symbol}{plus} = {vector(step.values[row], p)}")]


def _working_source(default: str) -> Working:
    """``input`` and ``weights``: the number and where it came from."""
    def working(c: Cell) -> list[str]:
        return [f"{c.name} = {c.shown} ({c.params.get('source', default)})"]
    return working


def _working_module(c: Cell) -> list[str] | None:
    return [f"{c.name} = {c.shown}, computed by {c.params.get('module', 'the module')}"]


def _working_concat(c: Cell) -> list[str] | None:
    if not c.ops:
        return None
    return [f"{c.name} = {c.shown}: the heads' context vectors side by side ({c.step.formula})"]


# --------------------------------------------------------------------------------------------------
# Recomputation: a step's numbers from its operands' intervals
# --------------------------------------------------------------------------------------------------


def _recompute_dot(walk: Walkthrough, step: Step, ops: list[Interval]) -> Interval | None:
    if step.values.ndim != 1:
        return scores(ops[0], ops[1])  # (..., T, T)
    row = int(step.how.params.get("row", walk.query)) if step.how is not None else walk.query
    query = Interval(ops[0].mid[row][None, :], ops[0].rad[row][None, :])  # (1, d)
    whole = scores(query, ops[1])  # (1, T)
    return Interval(whole.mid[0], whole.rad[0])  # (T,)


def _recompute_weighted_sum(walk: Walkthrough, step: Step, ops: list[Interval]) -> Interval | None:
    if ops[0].mid.ndim != 1:
        return matmul(ops[0], ops[1])  # (..., T, d)
    res = matmul(ops[0].reshape(1, -1), ops[1])  # (T,) -> (1, T); (1, T) @ (T, d) -> (1, d)
    return res.reshape(-1)  # (1, d) -> (d,)


def _recompute_mask_after(walk: Walkthrough, step: Step, ops: list[Interval]) -> Interval | None:
    allowed = walk.step("causal.mask").values if "causal.mask" in walk else (ops[0].mid != 0)
    return mask_renormalise(ops[0], np.asarray(allowed, dtype=np.float64))


def _recompute_dropout(walk: Walkthrough, step: Step, ops: list[Interval]) -> Interval | None:
    if not ops:
        return None
    keep = (step.values != 0).astype(np.float64)  # the entries this dropout kept (the seeded draw)
    rate = float(step.how.params.get("p", 0.0)) if step.how is not None else 0.0
    return times(ops[0], keep / (1.0 - rate))


def _recompute_concat(walk: Walkthrough, step: Step, ops: list[Interval]) -> Interval | None:
    return merge_heads(ops[0]) if ops[0].mid.ndim == 3 else None  # (H, T, hd) -> (T, d_out)


def _recompute_linear(walk: Walkthrough, step: Step, ops: list[Interval]) -> Interval | None:
    bias = step.how.params.get("bias") if step.how is not None else None
    res = matmul(ops[0], ops[1])  # (T, d_in) @ (d_in, d_out) -> (T, d_out)
    return Interval(res.mid + (np.asarray(bias, dtype=np.float64) if bias is not None else 0.0), res.rad)


def _param(step: Step, name: str, default: float) -> float:
    return float(step.how.params.get(name, default)) if step.how is not None else default


# --------------------------------------------------------------------------------------------------
# Hover templates of the report (filled by report.js, or by render_template)
# --------------------------------------------------------------------------------------------------


def _esc(text: object) -> str:
    """Words put into a template as they are (braces doubled)."""
    return str(text).replace("{", "{{").replace("}", "}}")


def js_trimmed(value: float) -> str:
    """A number as the page writes it inside working: 4 decimals, trailing zeros dropped (JavaScript's
    ``toFixed(4)``, which rounds a tie away from zero)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    if abs(value - round(value)) < 1e-9:
        return str(math.floor(value + 0.5))  # Math.round
    text = str(Decimal(value).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP))
    text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _plain_template(walk: Walkthrough, step: Step) -> Template:
    return [["", [f"{{cell}} = {{text}} ({_esc(step.formula)})"]]]


def _template_dot(walk: Walkthrough, step: Step) -> Template:
    return [["", ["{cell} = {a.rowq} · {b.rowk} = {a.vecq} · {b.veck} = {text}"]]]


def _template_scaled_dot(walk: Walkthrough, step: Step) -> Template:
    by = _esc(step.how.params.get("divisor_text", "")) if step.how is not None else ""
    return [["", [f"{{cell}} = {{a.rowq}} · {{b.rowk}} / {by} = {{a.vecq}} · {{b.veck}} / {by} = {{text}}"]]]


def _template_scale(walk: Walkthrough, step: Step) -> Template:
    divisor = _param(step, "divisor", 1.0)
    text = step.how.params.get("divisor_text", js_trimmed(divisor)) if step.how is not None else "1"
    return [["", [f"{{cell}} = {{a.cell}} / {_esc(text)} = {{a.num}} / {js_trimmed(divisor)} = {{text}}"]]]


def _template_softmax(walk: Walkthrough, step: Step) -> Template:
    head = "{cell} = exp({a.cell}) / Σ_k exp(row k) = "
    return [["a.big", [head + "{text}"]],
            ["", [head + "exp({a.num}) / ({a.exps}) = {a.exp} / {a.expsum} = {text}"]]]


def _template_by_sum(walk: Walkthrough, step: Step) -> Template:
    sym = _operand_symbol(walk, step, 0)
    return [["", [f"{{cell}} = {{a.cell}} / Σ_k {sym}(·, k) = {{a.num}} / {{a.sum}} = {{text}}"]]]


def _template_weighted_sum(walk: Walkthrough, step: Step) -> Template:
    head = f"{{cell}} = Σ_j {_operand_symbol(walk, step, 0)}({{q}}, j) × {_operand_symbol(walk, step, 1)}_j[{{k}}]"
    return [["a.cols<=16", [head + " = {terms} = {text}"]], ["", [head + " = {text}"]]]


def _template_mask(walk: Walkthrough, step: Step) -> Template:
    params = step.how.params if step.how is not None else {}
    if "cache" in params:
        line = "{cell} = {text}: once {q} (token {qpos}) is written, the cache %s {k} (token {kpos}); it holds tokens 1..{qpos}"
        return [["!zero", [line % "holds"]], ["", [line % "does not hold yet"]]]
    if "window" in params:
        tail = f"; with window {_esc(params['window'])}, {{q}} sees its last {_esc(params['window'])} positions"
        line = "{cell} = {text}: {k} (position {kpos}) is %s {q} (position {qpos})" + tail
        return [["after", [line % "after"]], ["!zero", [line % "inside the window of"]],
                ["", [line % "outside the window of"]]]
    line = "{cell} = {text}: {k} (position {kpos}) is %s {q} (position {qpos}), so {q} %s {k}"
    return [["after&!zero", [line % ("after", "may attend")]], ["after", [line % ("after", "masked out")]],
            ["!zero", [line % ("at or before", "may attend")]], ["", [line % ("at or before", "masked out")]]]


def _template_out_of_window(walk: Walkthrough, step: Step) -> Template:
    win = _esc(step.how.params.get("window") if step.how is not None else "")
    return [["!zero", [f"{{cell}} = 1: {{k}} is before {{q}} (causal allows it) but outside the window of {win}"]],
            ["after", ["{cell} = 0: {k} is after it (the causal mask hides it anyway)"]],
            ["", ["{cell} = 0: {k} is inside the window"]]]


def _template_attn_scores(walk: Walkthrough, step: Step) -> Template:
    params = step.how.params if step.how is not None else {}
    mask, win = str(params.get("mask")), _esc(params.get("window"))
    tail = ", so exp(-inf) = 0 gives it weight 0"
    cases: Template = []
    if mask == "cache":
        cases.append(["inf", ["{cell} = -inf: at step {qpos} the cache holds tokens 1..{qpos}, and {k} is not "
                              "written yet" + tail]])
    if mask == "window":
        cases.append(["inf&!after", [f"{{cell}} = -inf: {{k}} is outside {{q}}'s window of {win}" + tail]])
    cases.append(["inf", ["{cell} = -inf: {k} comes after {q}" + tail]])
    by = js_trimmed(float(params.get("scale", 1.0)))
    cases.append(["", [f"{{cell}} = {{a.rowq}} · k_{{k}} / √hd = {{a.vecq}} · k_{{k}} / {by} = {{text}}"]])
    return cases


def _template_mask_zero(walk: Walkthrough, step: Step) -> Template:
    return [["", ["{cell} = {a.cell} × mask = {a.num} × {b.num} = {text}"]]]


def _template_mask_before(walk: Walkthrough, step: Step) -> Template:
    return [["inf", ["{cell} = -inf: {k} comes after {q}, so exp(-inf) = 0 gives it weight 0"]],
            ["", ["{cell} = {a.cell} = {text} (kept)"]]]


def _template_dropout(walk: Walkthrough, step: Step) -> Template:
    if step.how is None or not step.how.operands:
        return _plain_template(walk, step)
    rate = _param(step, "p", 0.0)
    return [["zero&!a.zero", [f"{{cell}} = 0: dropped (each weight is dropped with probability p = {rate:g})"]],
            ["", [f"{{cell}} = {{a.cell}} × 1/(1 − p) = {{a.num}} × {js_trimmed(1.0 / (1.0 - rate))} = {{text}}"]]]


def _template_module(walk: Walkthrough, step: Step) -> Template:
    module = step.how.params.get("module", "the module") if step.how is not None else "the module"
    return module_template(str(module), step.formula)


def module_template(module: str, formula: str) -> Template:
    """The hover template of a class's (or a model's) output: the number, what computed it, its formula."""
    return [["", [f"{{cell}} = {{text}}, computed by {_esc(module)}", f"  where {_esc(formula)}"]]]


def _template_source(default: str) -> MakeTemplate:
    def template(walk: Walkthrough, step: Step) -> Template:
        source = step.how.params.get("source", default) if step.how is not None else default
        return [["", [f"{{cell}} = {{text}} ({_esc(source)})"]]]
    return template


def _template_concat(walk: Walkthrough, step: Step) -> Template:
    return [["", [f"{{cell}} = {{text}}: the heads' context vectors side by side ({_esc(step.formula)})"]]]


def _operand_symbol(walk: Walkthrough, step: Step, n: int) -> str:
    ops = [o for o in step.how.operands if o in walk] if step.how is not None else []
    return _esc(walk.step(ops[n]).symbol) if len(ops) > n else "?"


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

_NEG_INF = {"": "score set to −inf"}

KINDS: dict[str, StepKind] = {k.name: k for k in (
    StepKind("input", "the input (embeddings or hidden states)", _working_source("input"),
             template=_template_source("input")),
    StepKind("weights", "a weight matrix", _working_source("weights"), template=_template_source("weights")),
    StepKind("project", "x @ W", _working_project, lambda walk, s, ops: matmul(ops[0], ops[1])),
    StepKind("linear", "x @ W + b", _working_linear, _recompute_linear),
    StepKind("dot", "a_i · b_j for every pair (or the query's row)", _working_dot, _recompute_dot, _template_dot),
    StepKind("scaled_dot", "q_i · k_j / √d_head of a pretrained head", _working_scaled_dot,
             template=_template_scaled_dot),
    StepKind("attn_scores", "q · k / √hd per head, -inf where masked", _working_attn_scores,
             template=_template_attn_scores, masked_holds=_NEG_INF, holds_neg_inf=True),
    StepKind("scale", "scores ÷ a divisor", _working_scale,
             lambda walk, s, ops: scale(ops[0], _param(s, "divisor", 1.0)), _template_scale, cellwise=True),
    StepKind("divide_by_sum", "each row over its sum", _working_by_sum, lambda walk, s, ops: by_sum(ops[0]),
             _template_by_sum, cellwise=True),
    StepKind("softmax", "softmax of each row", _working_softmax, lambda walk, s, ops: softmax(ops[0]),
             _template_softmax, cellwise=True),
    StepKind("softmax_naive", "exp(x) / Σ exp(x), without subtracting the max", _working_softmax,
             lambda walk, s, ops: softmax(ops[0]), _template_softmax, cellwise=True),
    StepKind("weighted_sum", "Σ_j w_ij v_j", _working_weighted_sum, _recompute_weighted_sum, _template_weighted_sum,
             spelled_out=True),
    StepKind("mask", "1 where a query may attend to a key, 0 where not", _working_mask, template=_template_mask,
             hides="zeros", binary=True,
             masked_holds={"": "mask 0, may not attend", "cache": "slot still empty"}),
    StepKind("out_of_window", "1 for the earlier tokens a window hides", _working_out_of_window,
             template=_template_out_of_window, hides="content", binary=True,
             masked_holds={"": "not counted here"}),
    StepKind("mask_zero", "weights × mask", _working_mask_zero, lambda walk, s, ops: times(ops[0], ops[1].mid),
             _template_mask_zero, cellwise=True),
    StepKind("mask_after", "masked weights zeroed, each row renormalised", _working_by_sum, _recompute_mask_after,
             _template_by_sum, cellwise=True),
    StepKind("mask_before", "masked scores set to -inf before the softmax", _working_mask_before,
             lambda walk, s, ops: mask_fill(ops[0], ops[1].mid), _template_mask_before, cellwise=True,
             masked_holds=_NEG_INF, holds_neg_inf=True),
    StepKind("dropout", "weights dropped with probability p, the rest × 1/(1 − p)", _working_dropout,
             _recompute_dropout, _template_dropout, cellwise=True, drawn=True),
    StepKind("gqa_share", "1 where a query head reads a key/value head", _working_gqa_share),
    StepKind("rope_angle", "cos or sin of position × θ", _working_rope_angle),
    StepKind("rope", "a vector rotated pair by pair (RoPE)", _working_rope),
    StepKind("module", "the output of one of the chapter's classes (or a model's layer)", _working_module,
             template=_template_module, may_be_causal=True, adds_formula=True),
    StepKind("concat", "the heads' context vectors side by side", _working_concat, _recompute_concat,
             _template_concat),
)}

# A step with no How, or a kind this table does not know: the plain line, nothing recomputed.
PLAIN = StepKind("", "a recorded step")


def kind_of(step: Step) -> StepKind:
    """The table's entry of ``step``'s kind (:data:`PLAIN` for a step without one)."""
    return PLAIN if step.how is None else KINDS.get(step.how.kind, PLAIN)


# --------------------------------------------------------------------------------------------------
# The readers' entry points
# --------------------------------------------------------------------------------------------------


def explain_cell(walk: Walkthrough, step_id: str, index: tuple[int, ...], precision: int = 4) -> list[str]:
    """Lines saying how ``walk.step(step_id).values[index]`` is made (see ``Walkthrough.explain_cell``)."""
    step = walk.step(step_id)
    if len(index) != step.values.ndim or any(not 0 <= i < n for i, n in zip(index, step.values.shape)):
        raise IndexError(f"index {index} is outside {step_id} of shape {step.shape}")
    how = step.how
    ops = tuple(walk.step(o) for o in how.operands if o in walk) if how is not None else ()
    cell = Cell(walk, step, index, precision, ops, dict(how.params) if how is not None else {})
    working = kind_of(step).working
    return (working(cell) if working is not None else None) or _plain_line(cell)


def hover_lines(walk: Walkthrough, step: Step, index: tuple[int, ...]) -> list[str]:
    """The report's hover text of one cell, written in full: its working, and the formula where the kind
    adds it."""
    lines = walk.explain_cell(step.id, index)
    if kind_of(step).adds_formula and step.formula:
        lines = [*lines, f"  where {step.formula}"]
    return lines


def operate(walk: Walkthrough, step: Step, ops: list[Interval]) -> Interval | None:
    """``step``'s own operation on ``ops`` (its operands, in the order of ``step.how.operands``); None
    when the step is not an operation on recorded operands (inputs, weights, the classes' outputs) or the
    result does not have the step's shape."""
    recompute = kind_of(step).recompute
    out = recompute(walk, step, ops) if recompute is not None else None
    return out if out is not None and out.mid.shape == step.values.shape else None


# --------------------------------------------------------------------------------------------------
# The Python twin of report.js's template filler
# --------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(?:([abc])\.)?([a-z]+)\}")
PageNumbers = Callable[["Step"], "tuple[np.ndarray, int]"]


def render_template(walk: Walkthrough, step: Step, index: Sequence[int], page: PageNumbers) -> list[str]:
    """The hover lines the report writes for one cell from ``step``'s template, as ``report.js`` fills it.

    ``page(step)`` gives a step's numbers as the page holds them (its values rounded to the decimals it
    stores, and those decimals: see :mod:`attnlab.report.codec`)."""
    return _Filler(walk, step, tuple(int(i) for i in index), page).lines()


@dataclass
class _Filler:
    walk: Walkthrough
    step: Step
    index: tuple[int, ...]
    page: PageNumbers

    def __post_init__(self) -> None:
        how = self.step.how
        self.ops = [self.walk.step(o) for o in how.operands if o in self.walk] if how is not None else []
        one_row = self.step.values.ndim == 1
        self.lead = () if one_row else self.index[:-2]
        self.i = self.walk.query if one_row else self.index[-2]
        self.j = self.index[-1]

    def lines(self) -> list[str]:
        for test, lines in kind_of(self.step).hover_template(self.walk, self.step):
            if all(self._test(atom) for atom in test.split("&") if atom):
                return [_PLACEHOLDER.sub(self._fill, line) for line in lines]
        return []

    def _source(self, name: str | None) -> Step:
        return self.step if not name else self.ops["abc".index(name)]

    def _numbers(self, s: Step) -> np.ndarray:
        return np.asarray(self.page(s)[0], dtype=np.float64).reshape(s.values.shape)

    def _row(self, s: Step) -> np.ndarray:
        """The row of ``s`` holding this cell."""
        return self._numbers(s)[self.index[:-1]] if s.values.ndim > 1 else self._numbers(s)

    def _row_at(self, s: Step, r: int) -> tuple[int, ...]:
        return () if s.values.ndim == 1 else self.lead[: s.values.ndim - 2] + (r,)

    def _test(self, atom: str) -> bool:
        negate = atom.startswith("!")
        src, _, name = atom.lstrip("!").rpartition(".")
        s = self._source(src)
        if name == "inf":
            hit = self._numbers(s)[self.index] == -np.inf
        elif name == "zero":
            hit = self._numbers(s)[self.index] == 0
        elif name == "after":
            hit = self.j > self.i
        elif name == "big":
            row = self._row(s)
            finite = row[np.isfinite(row)]
            hit = bool(finite.size) and float(finite.max()) > 80
        else:  # cols<=N
            hit = s.values.shape[-1] <= int(name.partition("<=")[2])
        return bool(hit) != negate

    def _fill(self, match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        s, name = self._source(match.group(1)), match.group(2)
        labels = self.step.labels
        if name in ("q", "k", "qpos", "kpos"):
            q_label = self.walk.query_label if self.step.values.ndim == 1 else labels[-2][self.i]
            return {"q": q_label, "k": labels[-1][self.j], "qpos": str(self.i + 1), "kpos": str(self.j + 1)}[name]
        if name == "cell":
            return w.cell_name(self.walk, s, self.index)
        if name == "text":
            return _page_text(float(self._numbers(s)[self.index]), self.page(s)[1])
        if name in ("num", "exp"):
            value = float(self._numbers(s)[self.index])
            return js_trimmed(_exp(value) if name == "exp" else value)
        if name in ("rowq", "rowk", "vecq", "veck"):
            row = self._row_at(s, self.i if name.endswith("q") else self.j)
            if name.startswith("row"):
                return w.row_name(self.walk, s, row)
            return _js_vector(self._numbers(s)[row])
        row_values = self._row(s)
        if name == "sum":
            return js_trimmed(float(sum(float(v) for v in row_values)))
        if name == "expsum":
            return js_trimmed(float(sum(_exp(float(v)) for v in row_values)))
        if name == "exps":
            if len(row_values) > 8:
                return f"Σ of {len(row_values)} exps"
            return " + ".join(f"exp({js_trimmed(float(v))})" for v in row_values)
        return self._terms()

    def _terms(self) -> str:
        a, b = self._numbers(self.ops[0]), self._numbers(self.ops[1])
        weights = a if a.ndim == 1 else a[self.lead + (self.i,)]
        column = np.take(b[self.lead] if b.ndim > 2 else b, self.j, axis=-1)
        texts = [f"{js_trimmed(float(x))}×{w.factor(js_trimmed(float(y)))}" for x, y in zip(weights, column)]
        return w.signed_sum(texts)


def _page_text(value: float, dec: int) -> str:
    """A number as the page's tables show it: ``dec`` decimals, a whole number with none."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return str(round(value)) if dec == 0 else f"{value:.{dec}f}"


def _exp(value: float) -> float:
    return 0.0 if value == -math.inf else math.exp(value)


def _js_vector(values: np.ndarray) -> str:
    texts = [js_trimmed(float(v)) for v in values]
    if len(texts) > 8:
        return "[" + ", ".join([*texts[:3], "…", texts[-1]]) + f"] ({len(texts)} numbers)"
    return "[" + ", ".join(texts) + "]"
