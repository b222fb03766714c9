"""Statistics and FLOP counts for ``attnlab bench``: pure functions, no timing, no torch.

Spread is the inter-quartile range (IQR): the 75th minus the 25th percentile of the timed samples
(linear interpolation between order statistics, as ``numpy.percentile``'s default); min and max are kept
too. A benchmark reports the median and the IQR, never one run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from attnlab.errors import AttnlabInputError

__all__ = ["Summary", "attention_flops", "matmul_flops", "percentile", "summarize"]


@dataclass(frozen=True)
class Summary:
    """Summary of ``n`` timed samples, in seconds."""

    n: int
    median: float
    q1: float  # 25th percentile
    q3: float  # 75th percentile
    min: float
    max: float

    @property
    def iqr(self) -> float:
        """Inter-quartile range ``q3 - q1`` (the spread that ``attnlab bench`` reports)."""
        return self.q3 - self.q1

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "iqr": self.iqr}


def percentile(sorted_values: list[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of already sorted values, linear interpolation."""
    if not sorted_values:
        raise AttnlabInputError("percentile of no values")
    if not 0.0 <= p <= 100.0:
        raise AttnlabInputError(f"p must be in [0, 100], got {p}")
    pos = (len(sorted_values) - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: list[float]) -> Summary:
    """Median, quartiles, min and max of the samples (seconds)."""
    if not samples:
        raise AttnlabInputError("cannot summarize zero samples (use repeats >= 1)")
    s = sorted(samples)
    return Summary(
        n=len(s), median=percentile(s, 50), q1=percentile(s, 25), q3=percentile(s, 75), min=s[0], max=s[-1]
    )


def attention_flops(
    batch: int, tokens: int, d_in: int, d_out: int, heads: int, *, causal: bool = True, backward: bool = False
) -> int:
    """Useful floating-point operations of one multi-head attention call (a multiply-add counts 2).

    forward = projections + attention
      projections  = 2·B·T·d_in·d_out · 3   (queries, keys, values)   +   2·B·T·d_out·d_out   (out_proj)
      attention    = 2·B·H·P·hd   (scores q·k)   +   2·B·H·P·hd   (weights · values)   = 4·B·P·d_out
      with P the number of (query, key) pairs computed: T·(T+1)/2 when causal (the useful half), T² if not.
    forward + backward = 3 × forward (the backward of each matmul is two matmuls of the same size).

    Softmax, masking, scaling and bias additions are not counted (they are O(B·H·T²), not O(·hd)).
    """
    pairs = tokens * (tokens + 1) // 2 if causal else tokens * tokens
    projections = 2 * batch * tokens * d_in * d_out * 3 + 2 * batch * tokens * d_out * d_out
    attention = 4 * batch * pairs * d_out  # = 2·2·B·H·P·hd
    forward = projections + attention
    return 3 * forward if backward else forward


def matmul_flops(n: int) -> int:
    """Operations of one (n × n) @ (n × n) matrix multiply: 2·n³."""
    return 2 * n**3
