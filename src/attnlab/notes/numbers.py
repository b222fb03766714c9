"""Numbers as a note writes them: each with its value, the decimals written and its line."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Written", "numbers_in", "vectors_in"]

_NUM = re.compile(r"(?<![\w.^])[-−]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w^])")


@dataclass(frozen=True)
class Written:
    value: float
    decimals: int
    text: str
    line: int


def numbers_in(text: str, line: int = 0) -> list[Written]:
    """Every number in ``text`` (not parts of names like x^1, W_2 or 3.4.1 section numbers)."""
    out = []
    for m in _NUM.finditer(text):
        t = m.group(0).replace("−", "-")
        if re.match(r"\.\d", text[m.end():m.end() + 2]):
            continue  # 3.4.1
        mant = t.lower().split("e")[0]
        dec = len(mant.split(".")[1]) if "." in mant else 0
        if "e" in t.lower():
            dec = max(dec - int(t.lower().split("e")[1]), 0)
        out.append(Written(float(t), dec, t, line))
    return out


_VEC = re.compile(r"\[\s*[-−]?[\d.]+(?:\s*,\s*[-−]?[\d.]+)*\s*,?\s*\]")


def vectors_in(text: str, line: int = 0) -> list[list[Written]]:
    """The bracketed lists of numbers in ``text``: ``[2, 1]``, ``[0.27, 0.72, 0.01]``."""
    return [numbers_in(m.group(0), line) for m in _VEC.finditer(text)]
