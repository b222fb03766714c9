"""Names and numbers as the walkthrough writes them: one cell's name, one row's name, and numbers inside
written-out working.

The lowest layer of "how one number is made" (:mod:`attnlab.explain.kinds` writes each kind's working with
these; :mod:`attnlab.explain.cells` and the report use the names). Printed working adds up as printed: every
intermediate on a line is computed from the operands *as printed*, and the operands get more decimals than
the tables (up to ``EXTRA`` more) until the line's arithmetic, done on the printed numbers, gives the result
shown (``0.24473×2 + 0.66524×1 + 0.09003×1 = 1.2447``, never ``0.2447×2 + 0.6652×1 + 0.09×1 = 1.2447``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from attnlab.errors import AttnlabInputError
from attnlab.explain import formatting as _steps

if TYPE_CHECKING:
    from attnlab.explain.steps import Step, Walkthrough

__all__ = ["EXTRA", "MAX_TERMS", "MAX_VECTOR", "axis_prefix", "cell_name", "dot_printed", "enough", "factor", "fmt",
           "fmt_vector", "printed", "row_name", "same", "signed_sum", "value_text"]

MAX_TERMS = 8  # sums with more terms are not written out term by term
EXTRA = 4  # operands get at most this many more decimals than the result for the line to add up


def printed(value: float, d: int) -> float:
    """A number as printed with ``d`` decimals (trailing zeros dropped), read back."""
    return float(_steps.fmt(value, d, integral=False))


def same(a: float, b: float, p: int) -> bool:
    """Whether ``a`` and ``b`` are shown alike with ``p`` decimals."""
    return _steps.fmt(a, p, integral=False) == _steps.fmt(b, p, integral=False)


def enough(p: int, works: Callable[[int], bool]) -> int:
    """The fewest decimals ``d >= p`` for which ``works(d)``: the line's arithmetic on numbers printed
    with ``d`` decimals gives the result shown at ``p``."""
    for d in range(p, p + EXTRA + 1):
        if works(d):
            return d
    return p + EXTRA


def dot_printed(a: Iterable[float], b: Iterable[float], d: int) -> float:
    """``a · b`` computed on the numbers as printed with ``d`` decimals."""
    return sum(printed(x, d) * printed(y, d) for x, y in zip(a, b))


def fmt(value: float, precision: int = 4, *, integral: bool | None = None) -> str:
    """Numbers in written-out formulas: trailing zeros dropped (``0.55``), negatives in parentheses
    where they follow an operator (see :func:`factor`)."""
    return _steps.fmt(value, precision, integral=integral, trim=True)


MAX_VECTOR = 8  # wider vectors are shown as [first 3, …, last] (n numbers)


def fmt_vector(values: Iterable[float], precision: int = 4) -> str:
    """A vector inside written-out working (trailing zeros dropped, at most ``MAX_VECTOR`` numbers)."""
    return _steps.fmt_vector(values, precision, trim=True, limit=MAX_VECTOR)


def value_text(value: float, precision: int = 4) -> str:
    """A result, shown as in the tables (fixed decimals)."""
    return _steps.fmt(value, precision)


def factor(text: str) -> str:
    """A number's text as a factor: a negative one in parentheses."""
    return f"({text})" if text.startswith("-") else text


def signed_sum(texts: list[str]) -> str:
    """``a + b - c`` from term texts (a negative term is subtracted, not added)."""
    out = texts[0] if texts else "0"
    for t in texts[1:]:
        out += f" − {t[1:]}" if t.startswith("-") else f" + {t}"
    return out


def axis_prefix(step: Step, index: tuple[int, ...], inner: int) -> str:
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
    pre = axis_prefix(step, index, 1)
    if last_two == ("query", "key"):
        return f"{pre}{sym}({row}, ·)"
    if last_two == ("token", "dim"):
        return f"{pre}{sym}_{row}"
    return f"{pre}{sym}[{row}, ·]"


def cell_name(walk: Walkthrough, step: Step, index: tuple[int, ...]) -> str:
    """The name of one number: ``score(The, sat)``, ``q_The[2]``, ``W_key[3, 1]``, ``head 2: weight(..)``."""
    axes, sym = step.axes, step.symbol
    if len(index) != len(axes):
        raise AttnlabInputError(f"index {index} must have one entry per axis of {step.id} {axes}")
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
    pre = axis_prefix(step, index, 2)
    last_two = axes[-2:]
    if last_two == ("query", "key"):
        return f"{pre}{sym}({row}, {col})"
    if last_two == ("token", "dim"):
        return f"{pre}{sym}_{row}[{col}]"
    return f"{pre}{sym}[{row}, {col}]"
