"""Numbers as every renderer of the walkthrough shows them: one number (:func:`fmt`), a vector
(:func:`fmt_vector`).

The lowest module of :mod:`attnlab.explain` (it imports nothing from attnlab): the data model
(:mod:`attnlab.explain.steps`, which re-exports :func:`fmt` and :func:`fmt_vector`), the written-out working
and the renderers all format numbers here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["fmt", "fmt_vector", "is_integral"]


def is_integral(values: Iterable[float]) -> bool:
    """Whether every value is a whole number (to 1e-6): such numbers are shown without decimals."""
    return all(math.isfinite(v) and abs(v - round(v)) < 1e-6 for v in values)


def fmt(value: float, precision: int = 4, *, integral: bool | None = None, trim: bool = False) -> str:
    """One number as shown: ``-inf`` for masked scores, a whole number without decimals when every
    number around it is whole (``integral``), else ``precision`` decimals (trailing zeros dropped with
    ``trim``, as in written-out formulas: ``0.55×0.43``)."""
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    if integral is None:
        integral = is_integral([value])
    if integral:
        return str(round(value))
    short = _float32_text(value)  # recorded numbers are float32: 0.3, not 0.30000001
    if short is not None and len(short.partition(".")[2]) <= precision:
        text = short if trim else f"{float(short):.{precision}f}"  # its digits, padded with zeros
    else:
        text = f"{value:.{precision}f}"
    if trim and "." in text:
        text = text.rstrip("0").rstrip(".")
    return text[1:] if text.startswith("-") and text.strip("-0.") == "" else text  # no "-0.0000"


_F32_MAX = float(np.finfo(np.float32).max)


def _float32_text(value: float) -> str | None:
    """The shortest decimal that reads back as the same float32 (``0.4935`` for 0.49350002: the digits
    beyond float32's ~7 significant ones are rounding noise), or None beyond float32's range."""
    if not abs(value) <= _F32_MAX:
        return None
    return str(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def fmt_vector(values: Iterable[float], precision: int = 4, *, integral: bool | None = None,
               trim: bool = False, limit: int | None = None) -> str:
    """A vector as ``[2, 1]`` or ``[0.4306, 1.4551]`` (whole numbers only when all are whole); longer
    than ``limit``: ``[0.1, 0.2, 0.3, …, 0.9] (40 numbers)``."""
    vals = [float(v) for v in values]
    integral = is_integral(vals) if integral is None else integral
    texts = [fmt(v, precision, integral=integral, trim=trim) for v in vals]
    if limit is not None and len(texts) > limit:
        return "[" + ", ".join([*texts[:3], "…", texts[-1]]) + f"] ({len(texts)} numbers)"
    return "[" + ", ".join(texts) + "]"
