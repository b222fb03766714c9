"""How one number of a step is made, written out from recorded numbers only.

Used by ``--expect`` diagnoses, by the detail lines of the walkthrough and by the HTML report's hover
text (through :meth:`attnlab.explain.steps.Walkthrough.explain_cell`). Nothing here computes attention:
the values shown are the recorded ones; only the arithmetic of one line (``2×1 + 1×1``) is spelled out.

Printed working adds up as printed: every intermediate on a line is computed from the operands *as
printed*, and the operands get more decimals than the tables (up to ``_EXTRA`` more) until the line's
arithmetic, done on the printed numbers, gives the result shown (``0.24473×2 + 0.66524×1 + 0.09003×1 =
1.2447``, never ``0.2447×2 + 0.6652×1 + 0.09×1 = 1.2447``).
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
_EXTRA = 4  # operands get at most this many more decimals than the result for the line to add up


def _printed(value: float, d: int) -> float:
    """A number as printed with ``d`` decimals (trailing zeros dropped), read back."""
    return float(_steps.fmt(value, d, integral=False))


def _same(a: float, b: float, p: int) -> bool:
    return _steps.fmt(a, p, integral=False) == _steps.fmt(b, p, integral=False)


def _enough(p: int, works) -> int:
    """The fewest decimals ``d >= p`` for which ``works(d)``: the line's arithmetic on numbers printed
    with ``d`` decimals gives the result shown at ``p``."""
    for d in range(p, p + _EXTRA + 1):
        if works(d):
            return d
    return p + _EXTRA


def _dot_printed(a, b, d: int) -> float:
    return sum(_printed(x, d) * _printed(y, d) for x, y in zip(a, b))


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


def _sum_of_products(a: np.ndarray, b: np.ndarray, value: float, p: int, d: int | None = None) -> str | None:
    """``= 2×1 + 1×1 = 2 + 1 = 3`` for short vectors, the products those of the printed numbers (with
    ``d`` decimals, default: enough for the sum of the printed products to give the result)."""
    if len(a) > _MAX_TERMS:
        return None
    if d is None:
        d = _enough(p, lambda d: _same(_dot_printed(a, b, d), value, p) and _same(
            sum(_printed(_printed(x, d) * _printed(y, d), d) for x, y in zip(a, b)), value, p))
    ia, ib = fmt_vector(a, d), fmt_vector(b, d)  # decide whole-number display per vector
    int_a, int_b = "." not in ia, "." not in ib
    prods = [_printed(x, d) * _printed(y, d) for x, y in zip(a, b)]
    terms = _signed_sum([f"{fmt(x, d, integral=int_a)}×{_factor(fmt(y, d, integral=int_b))}" for x, y in zip(a, b)])
    int_p = int_a and int_b
    sums = _signed_sum([fmt(v, d, integral=int_p) for v in prods])
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
    def parts(d: int) -> tuple[list[float], float, float]:
        exps = [_printed(math.exp(_printed(v, d)), d) if math.isfinite(v) else 0.0 for v in row]
        total = _printed(sum(exps), d)
        return exps, total, (exps[j] / total if total else math.nan)

    def adds_up(d: int) -> bool:
        exact = [math.exp(_printed(v, d)) if math.isfinite(v) else 0.0 for v in row]
        return _same(parts(d)[2], value, p) and _same(exact[j] / sum(exact), value, p)

    d = _enough(p, adds_up) if len(row) <= _MAX_TERMS else p
    exps, total, _ = parts(d)
    listed = (
        " + ".join(f"exp({fmt(v, d)})" for v in row) if len(row) <= _MAX_TERMS else f"Σ of {len(row)} exps"
    )
    return (
        f"{name} = exp({src_name}) / Σ_k exp(row k) = exp({fmt(row[j], d)}) / ({listed}) "
        f"= {fmt(exps[j], d)} / {fmt(total, d)} = {_val(value, p)}"
    )


def _attn_score_lines(walk: Walkthrough, step: Step, index: tuple[int, ...], ops: list[Step],
                      params: dict, name: str, value: float, p: int) -> list[str]:
    """``score = q · k / √hd`` for the opt-in sections' scores (per head; a grouped-query head reads its
    group's keys; -inf said in words: an empty cache slot, outside the window, or after the query)."""
    q_step, k_step = ops
    lead, i, j = index[:-2], index[-2], index[-1]
    q_lab, k_lab = step.labels[-2][i], step.labels[-1][j]
    if math.isinf(value):
        mask = params.get("mask")
        why = {"cache": f"at step {i + 1} the cache holds tokens 1..{i + 1}, and {k_lab} is not written yet",
               "window": f"{k_lab} is outside {q_lab}'s window of {params.get('window')}" if j <= i else
               f"{k_lab} comes after {q_lab}"}.get(str(mask), f"{k_lab} comes after {q_lab}")
        return [f"{name} = -inf: {why}, so exp(-inf) = 0 gives it weight 0"]
    kv_of = params.get("kv_head_of")
    k_lead = tuple(lead)
    if kv_of is not None and lead:
        k_lead = (int(kv_of[lead[0]]),) + tuple(lead[1:])
    qv, kv = q_step.values[lead + (i,)], k_step.values[k_lead + (j,)]
    scale = float(params.get("scale", 1.0))
    d = _enough(p, lambda d: _same(_dot_printed(qv, kv, d) / scale, value, p))
    k_name = row_name(walk, k_step, k_lead + (j,)).rpartition(": ")[2]  # the head is said once, in name
    q_name = row_name(walk, q_step, lead + (i,)).rpartition(": ")[2]
    via = f" of key/value head {k_lead[0] + 1}" if kv_of is not None and lead else ""
    return [(f"{name} = {q_name} · {k_name}{via} / √hd = "
             f"{fmt_vector(qv, d)} · {fmt_vector(kv, d)} / {fmt(scale, d)} = {_val(value, p)}")]


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
        d = _enough(p, lambda d: _same(_dot_printed(x_step.values[i], col, d), value, p))
        lines = [
            (f"{name} = {x_name} · {w_step.symbol}[:, {step.labels[-1][j]}] = "
            f"{fmt_vector(x_step.values[i], d)} · {fmt_vector(col, d)} = {_val(value, p)}"),
            (f"  {row_name(walk, step, index[:-1])} = {x_name} @ {w_step.symbol} = "
            f"{fmt_vector(x_step.values[i], p)} @ {w_step.symbol} = {fmt_vector(step.values[index[:-1]], p)}"),
        ]
        return lines

    if kind == "dot" and len(ops) == 2:
        a_step, b_step = ops
        a_row: tuple[int, ...]
        b_row: tuple[int, ...]
        if step.values.ndim == 1:
            i, j = int(params.get("row", walk.query)), index[0]
            a_row, b_row = (i,) if a_step.values.ndim == 2 else (), (j,)
        else:
            i, j = index[-2], index[-1]
            a_row, b_row = index[:-2] + (i,), index[:-2] + (j,)
        av, bv = a_step.values[a_row], b_step.values[b_row]
        a_name, b_name = row_name(walk, a_step, a_row), row_name(walk, b_step, b_row)
        d = _enough(p, lambda d: _same(_dot_printed(av, bv, d), value, p) and (len(av) > _MAX_TERMS or _same(
            sum(_printed(_printed(x, d) * _printed(y, d), d) for x, y in zip(av, bv)), value, p)))
        lines = [f"{name} = {a_name} · {b_name} = {fmt_vector(av, d)} · {fmt_vector(bv, d)} = {_val(value, p)}"]
        written = _sum_of_products(av, bv, value, p, d)
        if written:
            lines.append(written)
        lines += _made_from(walk, a_step, a_row, p)
        if (b_step.id, b_row) != (a_step.id, a_row):
            lines += _made_from(walk, b_step, b_row, p)
        return lines

    if kind == "scale" and ops:
        src = ops[0]
        divisor = params.get("divisor_text", fmt(params.get("divisor", 1.0), p))
        sv, dv = float(src.values[index]), float(params.get("divisor", 1.0))
        d = _enough(p, lambda d: _same(_printed(sv, d) / _printed(dv, d), value, p))
        return [
            (f"{name} = {cell_name(walk, src, index)} / {divisor} = {fmt(sv, d)} / "
            f"{fmt(dv, d)} = {_val(value, p)}")
        ]

    if kind in ("softmax", "softmax_naive") and ops:
        src = ops[0]
        row = src.values[index[:-1]]
        return [_softmax_line(name, cell_name(walk, src, index), row, index[-1], value, p)]

    if kind == "divide_by_sum" and ops:
        src = ops[0]
        row = src.values[index[:-1]]
        top, total = float(row[index[-1]]), float(row.astype(np.float64).sum())
        d = _enough(p, lambda d: _same(_printed(top, d) / _printed(total, d), value, p))
        return [
            (f"{name} = {cell_name(walk, src, index)} / Σ_k {src.symbol}(·, k) = {fmt(top, d)} / "
            f"{fmt(total, d)} = {_val(value, p)}")
        ]

    if kind == "weighted_sum" and len(ops) == 2:
        w_step, v_step = ops
        d = index[-1]
        if step.values.ndim == 1:
            wrow, vcol, q = w_step.values, v_step.values[:, d], walk.query_label
        else:
            lead, i = index[:-2], index[-2]
            wrow, vcol, q = w_step.values[lead + (i,)], np.take(v_step.values[lead], d, axis=-1), step.labels[-2][i]
        keys = w_step.labels[-1]
        dim = step.labels[-1][d]
        lines = [f"{name} = Σ_j {w_step.symbol}({q}, j) × {v_step.symbol}_j[{dim}]"]
        if len(wrow) <= _MAX_TERMS * 2:
            d = _enough(p, lambda d: _same(_dot_printed(wrow, vcol, d), value, p))
            terms = _signed_sum([f"{fmt(w, d)}×{_factor(fmt(v, d))}" for w, v in zip(wrow, vcol)])
            lines[0] += f" = {terms}"
            lines.append("  (" + ", ".join(f"j = {k}" for k in keys) + ")")
        lines[0] += f" = {_val(value, p)}"
        return lines

    if kind == "attn_scores" and len(ops) == 2:
        return _attn_score_lines(walk, step, index, ops, params, name, value, p)

    if kind == "mask" and ("window" in params or "cache" in params):
        qi, kj = index[-2], index[-1]
        q, k = step.labels[-2][qi], step.labels[-1][kj]
        if "cache" in params:
            state = "holds" if value else "does not hold yet"
            return [(f"{name} = {_val(value, p)}: once {q} (token {qi + 1}) is written, the cache {state} "
                     f"{k} (token {kj + 1}); it holds tokens 1..{qi + 1}")]
        w = int(params["window"])
        lo = max(qi - w + 1, 0)
        where = ("after" if kj > qi else "inside the window of" if kj > qi - w else
                 f"{qi - kj} tokens before, outside the window of")
        return [(f"{name} = {_val(value, p)}: {k} (position {kj + 1}) is {where} {q} (position {qi + 1}); "
                 f"with window {w}, {q} sees positions {lo + 1}..{qi + 1}")]

    if kind == "out_of_window":
        qi, kj = index[-2], index[-1]
        q, k = step.labels[-2][qi], step.labels[-1][kj]
        if value:
            return [f"{name} = 1: {k} is before {q} (causal allows it) but outside the window of {params.get('window')}"]
        why = "after it (the causal mask hides it anyway)" if kj > qi else "inside the window"
        return [f"{name} = 0: {k} is {why}"]

    if kind == "gqa_share":
        h, g = index[-2], index[-1]
        per = int(params.get("per", 1))
        verdict = "uses" if value else "does not use"
        return [(f"{name} = {_val(value, p)}: query head {h + 1} {verdict} key/value head {g + 1} "
                 f"(query head h uses key/value head h // {per}, counting from 0: {h} // {per} = {h // per})")]

    if kind == "rope_angle":
        i, d = index[-2], index[-1]
        theta = params.get("theta", [1.0])
        half = len(theta)
        th = float(theta[d % half]) if half else 1.0
        fn = params.get("fn", "cos")
        return [(f"{name} = {fn}(position × θ_{d % half + 1}) = {fn}({i} × {fmt(th, p)}) = "
                 f"{fn}({fmt(i * th, p)}) = {_val(value, p)}")]

    if kind == "rope" and len(ops) == 3:
        src, cos_s, sin_s = ops
        lead, d = index[:-1], index[-1]
        i = index[-2]
        vec = src.values[lead]
        half = len(vec) // 2
        other = -vec[d + half] if d < half else vec[d - half]
        c, s_ = float(cos_s.values[i, d]), float(sin_s.values[i, d])
        pair = f"-{src.symbol}[{d + half + 1}]" if d < half else f"{src.symbol}[{d - half + 1}]"
        return [(f"{name} = {src.symbol}[{d + 1}] × cos + {pair} × sin = {fmt(float(vec[d]), p)} × {fmt(c, p)} "
                 f"+ {_factor(fmt(float(other), p))} × {fmt(s_, p)} = {_val(value, p)}")]

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
        top, total = float(row[index[-1]]), float(row.astype(np.float64).sum())
        d = _enough(p, lambda d: _same(_printed(top, d) / _printed(total, d), value, p))
        return [(f"{name} = {cell_name(walk, z_step, index)} / Σ_k {z_step.symbol}(·, k) = "
                f"{fmt(top, d)} / {fmt(total, d)} = {_val(value, p)}")]

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
        d = _enough(p, lambda d: _same(_printed(sv, d) * _printed(factor, d), value, p))
        line = f"{name} = {cell_name(walk, src, index)} × 1/(1 − p) = {fmt(sv, d)} × {fmt(factor, d)}"
        return [f"{line} = {_val(value, p)}"]

    if kind == "linear" and len(ops) == 2:
        x_step, w_step = ops
        row, j = index[:-1], index[-1]
        bias = params.get("bias")
        b = float(bias[j]) if bias is not None else 0.0
        xr, wc = x_step.values[row], w_step.values[:, j]
        d = p
        if len(xr) <= _MAX_TERMS * 2:
            d = _enough(p, lambda d: _same(_dot_printed(xr, wc, d) + _printed(b, d), value, p))
        return [
            (f"{name} = {row_name(walk, x_step, row)} · {w_step.symbol}[:, {step.labels[-1][j]}] + b[{step.labels[-1][j]}]"
            f" = {fmt_vector(xr, d)} · {fmt_vector(wc, d)} {'−' if b < 0 else '+'} {fmt(abs(b), d)} "
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
