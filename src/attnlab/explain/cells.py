"""How one number of a step is made, written out from recorded numbers only.

Used by ``--expect`` diagnoses, by the detail lines of the walkthrough and by the HTML report's hover
text (through :meth:`attnlab.explain.steps.Walkthrough.explain_cell`). Nothing here computes attention:
the values shown are the recorded ones; only the arithmetic of one line (``2×1 + 1×1``) is spelled out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from attnlab.explain import steps as _steps

if TYPE_CHECKING:
    from attnlab.explain.steps import Step, Walkthrough

__all__ = ["cell_name", "explain_cell", "row_name"]

_MAX_TERMS = 8  # sums with more terms are not written out term by term


def fmt(value: float, precision: int = 4, *, integral: bool | None = None) -> str:
    """Numbers in written-out formulas: trailing zeros dropped (``0.55``), negatives in parentheses
    where they follow an operator (see :func:`_factor`)."""
    return _steps.fmt(value, precision, integral=integral, trim=True)


_MAX_VECTOR = 8  # wider vectors are shown as [first 3, …, last] (n numbers)


def fmt_vector(values, precision: int = 4) -> str:
    return _steps.fmt_vector(values, precision, trim=True, limit=_MAX_VECTOR)


def _val(value: float, precision: int = 4) -> str:
    """A result, shown as in the tables (fixed decimals)."""
    return _steps.fmt(value, precision)


def _factor(text: str) -> str:
    return f"({text})" if text.startswith("-") else text


def _signed_sum(texts: list[str]) -> str:
    """``a + b - c`` from term texts (a negative term is subtracted, not added)."""
    out = texts[0] if texts else "0"
    for t in texts[1:]:
        out += f" − {t[1:]}" if t.startswith("-") else f" + {t}"
    return out


def _prefix(step: Step, index: tuple[int, ...], inner: int) -> str:
    """``head 1: `` / ``batch 2: `` for the leading axes beyond the ``inner`` last ones."""
    parts = [f"{step.axes[a]} {step.labels[a][index[a]]}" for a in range(len(index) - inner)]
    return (", ".join(parts) + ": ") if parts else ""


def row_name(walk: Walkthrough, step: Step, index: tuple[int, ...]) -> str:
    """The name of one row of a step (``index`` has every axis but the last): ``q_The``,
    ``score(The, ·)``, ``W_key[2, ·]``."""
    axes, sym = step.axes, step.symbol
    if len(axes) == 1:
        return f"{sym}_{walk.query_label}" if axes[0] == "dim" else f"{sym}({walk.query_label}, ·)"
    last_two = axes[-2:]
    row = step.labels[-2][index[-1]]
    pre = _prefix(step, index, 1)
    if last_two == ("query", "key"):
        return f"{pre}{sym}({row}, ·)"
    if last_two == ("token", "dim"):
        return f"{pre}{sym}_{row}"
    return f"{pre}{sym}[{row}, ·]"


def cell_name(walk: Walkthrough, step: Step, index: tuple[int, ...]) -> str:
    """The name of one number: ``score(The, sat)``, ``q_The[2]``, ``W_key[3, 1]``, ``head 2: weight(..)``."""
    axes, sym = step.axes, step.symbol
    if len(index) != len(axes):
        raise ValueError(f"index {index} must have one entry per axis of {step.id} {axes}")
    if not axes:
        return sym
    col = step.labels[-1][index[-1]]
    if len(axes) == 1:
        if axes[0] == "dim":
            return f"{sym}_{walk.query_label}[{col}]"
        if axes[0] == "key":
            return f"{sym}({walk.query_label}, {col})"
        return f"{sym}[{col}]"
    row = step.labels[-2][index[-2]]
    pre = _prefix(step, index, 2)
    last_two = axes[-2:]
    if last_two == ("query", "key"):
        return f"{pre}{sym}({row}, {col})"
    if last_two == ("token", "dim"):
        return f"{pre}{sym}_{row}[{col}]"
    return f"{pre}{sym}[{row}, {col}]"


def _sum_of_products(a: np.ndarray, b: np.ndarray, value: float, p: int) -> str | None:
    """``= 2×1 + 1×1 = 2 + 1 = 3`` for short vectors."""
    if len(a) > _MAX_TERMS:
        return None
    ia, ib = fmt_vector(a, p), fmt_vector(b, p)  # decide whole-number display per vector
    int_a, int_b = "." not in ia, "." not in ib
    prods = [float(x) * float(y) for x, y in zip(a, b)]
    terms = _signed_sum([f"{fmt(x, p, integral=int_a)}×{_factor(fmt(y, p, integral=int_b))}" for x, y in zip(a, b)])
    int_p = int_a and int_b
    sums = _signed_sum([fmt(v, p, integral=int_p) for v in prods])
    return f"  = {terms} = {sums} = {_val(value, p)}"


def _made_from(walk: Walkthrough, step: Step, row: tuple[int, ...], p: int) -> list[str]:
    """How a row of an operand was made, when it is a projection ``x @ W``."""
    if step.how is None or step.how.kind != "project":
        return []
    x_step, w_step = (walk.step(o) for o in step.how.operands)
    i = row[-1]
    x_name = row_name(walk, x_step, (i,))
    return [
        (f"  {row_name(walk, step, row)} = {x_name} @ {w_step.symbol} = {fmt_vector(x_step.values[i], p)} "
        f"@ {w_step.symbol} = {fmt_vector(step.values[row], p)}")
    ]


def _softmax_line(name: str, src_name: str, row: np.ndarray, j: int, value: float, p: int) -> str:
    finite = row[np.isfinite(row)]
    if finite.size and float(finite.max()) > 80.0:  # exp would overflow on display: say it in words
        return f"{name} = exp({src_name}) / Σ_k exp(row k) = {_val(value, p)}"
    exps = [math.exp(float(v)) if math.isfinite(v) or v < 0 else math.inf for v in row]
    total = sum(exps)
    listed = (
        " + ".join(f"exp({fmt(v, p)})" for v in row) if len(row) <= _MAX_TERMS else f"Σ of {len(row)} exps"
    )
    return (
        f"{name} = exp({src_name}) / Σ_k exp(row k) = exp({fmt(row[j], p)}) / ({listed}) "
        f"= {fmt(exps[j], p)} / {fmt(total, p)} = {_val(value, p)}"
    )


def explain_cell(walk: Walkthrough, step_id: str, index: tuple[int, ...], precision: int = 4) -> list[str]:
    """Lines saying how ``walk.step(step_id).values[index]`` is made (see ``Walkthrough.explain_cell``)."""
    step = walk.step(step_id)
    if len(index) != step.values.ndim or any(
        not 0 <= i < n for i, n in zip(index, step.values.shape)
    ):
        raise IndexError(f"index {index} is outside {step_id} of shape {step.shape}")
    p = precision
    value = float(step.values[index])
    name = cell_name(walk, step, index)
    how = step.how
    kind = how.kind if how is not None else ""
    ops = [walk.step(o) for o in how.operands if o in walk] if how is not None else []
    params = dict(how.params) if how is not None else {}

    if kind == "project" and len(ops) == 2:
        x_step, w_step = ops
        i, j = index[-2], index[-1]
        x_name = row_name(walk, x_step, (i,))
        col = w_step.values[:, j]
        lines = [
            (f"{name} = {x_name} · {w_step.symbol}[:, {step.labels[-1][j]}] = "
            f"{fmt_vector(x_step.values[i], p)} · {fmt_vector(col, p)} = {_val(value, p)}"),
            (f"  {row_name(walk, step, index[:-1])} = {x_name} @ {w_step.symbol} = "
            f"{fmt_vector(x_step.values[i], p)} @ {w_step.symbol} = {fmt_vector(step.values[index[:-1]], p)}"),
        ]
        return lines

    if kind == "dot" and len(ops) == 2:
        a_step, b_step = ops
        if step.values.ndim == 1:
            i, j = int(params.get("row", walk.query)), index[0]
            a_row, b_row = (i,) if a_step.values.ndim == 2 else (), (j,)
        else:
            i, j = index[-2], index[-1]
            a_row, b_row = index[:-2] + (i,), index[:-2] + (j,)
        av, bv = a_step.values[a_row], b_step.values[b_row]
        a_name, b_name = row_name(walk, a_step, a_row), row_name(walk, b_step, b_row)
        lines = [f"{name} = {a_name} · {b_name} = {fmt_vector(av, p)} · {fmt_vector(bv, p)} = {_val(value, p)}"]
        written = _sum_of_products(av, bv, value, p)
        if written:
            lines.append(written)
        lines += _made_from(walk, a_step, a_row, p)
        if (b_step.id, b_row) != (a_step.id, a_row):
            lines += _made_from(walk, b_step, b_row, p)
        return lines

    if kind == "scale" and ops:
        src = ops[0]
        divisor = params.get("divisor_text", fmt(params.get("divisor", 1.0), p))
        sv = float(src.values[index])
        return [
            (f"{name} = {cell_name(walk, src, index)} / {divisor} = {fmt(sv, p)} / "
            f"{fmt(params.get('divisor', 1.0), p)} = {_val(value, p)}")
        ]

    if kind in ("softmax", "softmax_naive") and ops:
        src = ops[0]
        row = src.values[index[:-1]]
        return [_softmax_line(name, cell_name(walk, src, index), row, index[-1], value, p)]

    if kind == "divide_by_sum" and ops:
        src = ops[0]
        row = src.values[index[:-1]]
        return [
            (f"{name} = {cell_name(walk, src, index)} / Σ_k {src.symbol}(·, k) = {fmt(row[index[-1]], p)} / "
            f"{fmt(float(row.sum()), p)} = {_val(value, p)}")
        ]

    if kind == "weighted_sum" and len(ops) == 2:
        w_step, v_step = ops
        d = index[-1]
        if step.values.ndim == 1:
            wrow, vcol, q = w_step.values, v_step.values[:, d], walk.query_label
        else:
            lead, i = index[:-2], index[-2]
            wrow, vcol, q = w_step.values[lead + (i,)], v_step.values[lead + (slice(None), d)], step.labels[-2][i]
        keys = w_step.labels[-1]
        dim = step.labels[-1][d]
        lines = [f"{name} = Σ_j {w_step.symbol}({q}, j) × {v_step.symbol}_j[{dim}]"]
        if len(wrow) <= _MAX_TERMS * 2:
            terms = _signed_sum([f"{fmt(w, p)}×{_factor(fmt(v, p))}" for w, v in zip(wrow, vcol)])
            lines[0] += f" = {terms}"
            lines.append("  (" + ", ".join(f"j = {k}" for k in keys) + ")")
        lines[0] += f" = {_val(value, p)}"
        return lines

    if kind == "mask":
        q, k = step.labels[-2][index[-2]], step.labels[-1][index[-1]]
        where = "at or before" if index[-1] <= index[-2] else "after"
        verdict = "may attend" if value else "masked out"
        return [(f"{name} = {_val(value, p)}: {k} (position {index[-1] + 1}) is {where} {q} "
                f"(position {index[-2] + 1}), so {q} {verdict} {k}")]

    if kind == "mask_zero" and len(ops) == 2:
        w_step, m_step = ops
        return [(f"{name} = {cell_name(walk, w_step, index)} × mask = {fmt(w_step.values[index], p)} × "
                f"{fmt(m_step.values[index], p)} = {_val(value, p)}")]

    if kind == "mask_after" and ops:
        z_step = ops[0]
        row = z_step.values[index[:-1]]
        return [(f"{name} = {cell_name(walk, z_step, index)} / Σ_k {z_step.symbol}(·, k) = "
                f"{fmt(row[index[-1]], p)} / {fmt(float(row.sum()), p)} = {_val(value, p)}")]

    if kind == "mask_before" and ops:
        src = ops[0]
        if math.isinf(value):
            return [(f"{name} = -inf: {step.labels[-1][index[-1]]} comes after {step.labels[-2][index[-2]]}, "
                    "so exp(-inf) = 0 gives it weight 0")]
        return [f"{name} = {cell_name(walk, src, index)} = {_val(value, p)} (kept)"]

    if kind == "dropout" and ops:
        src = ops[0]
        rate = float(params.get("p", 0.0))
        sv = float(src.values[index])
        if value == 0.0 and sv != 0.0:
            return [f"{name} = 0: dropped (each weight is dropped with probability p = {rate:g})"]
        factor = 1.0 / (1.0 - rate)
        return [f"{name} = {cell_name(walk, src, index)} × 1/(1 − p) = {fmt(sv, p)} × {factor:g} = {_val(value, p)}"]

    if kind == "linear" and len(ops) == 2:
        x_step, w_step = ops
        row, j = index[:-1], index[-1]
        bias = params.get("bias")
        b = float(bias[j]) if bias is not None else 0.0
        return [
            (f"{name} = {row_name(walk, x_step, row)} · {w_step.symbol}[:, {step.labels[-1][j]}] + b[{step.labels[-1][j]}]"
            f" = {fmt_vector(x_step.values[row], p)} · {fmt_vector(w_step.values[:, j], p)} {'−' if b < 0 else '+'} {fmt(abs(b), p)} "
            f"= {_val(value, p)}")
        ]

    if kind == "input":
        return [f"{name} = {_val(value, p)} ({params.get('source', 'input')})"]
    if kind == "weights":
        return [f"{name} = {_val(value, p)} ({params.get('source', 'weights')})"]
    if kind == "module":
        return [f"{name} = {_val(value, p)}, computed by {params.get('module', 'the module')}"]
    if kind == "concat" and ops:
        return [f"{name} = {_val(value, p)}: the heads' context vectors side by side ({step.formula})"]
    return [f"{name} = {_val(value, p)} ({step.formula})"]
