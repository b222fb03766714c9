"""The one merge step: two partial attention results over disjoint key sets become one, exactly.

A partial result for a set of query rows is ``(out, lse)``: the softmax-weighted context vectors over
*its* keys and the natural-log log-sum-exp of those rows' scaled scores (``-inf`` for a row that saw no
key; its ``out`` is 0). It is the flash kernel's online softmax (:mod:`attnlab.flash`) one level up:
there the running max and sum are rescaled when a new key tile arrives, here a whole block's result is::

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

Ring and hybrid attention call :func:`merge_into` for every block of keys that arrives.
"""

from __future__ import annotations

import math

import torch

__all__ = ["merge_into"]


def merge_into(out: torch.Tensor, lse: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """Fold the block result ``(out_blk, lse_blk)`` into the running ``(out, lse)``, in place.

    out, out_blk: (..., T_q, d_v); lse, lse_blk: (..., T_q). ``out`` and ``lse`` may be views (rows of
    a larger result); ``out_blk`` is overwritten.
    """
    new = torch.logaddexp(lse, lse_blk)  # (..., T_q)
    # A row with no key in either part keeps lse = -inf and out = 0 (weights 0, never NaN).
    ref = new.masked_fill(new == -math.inf, 0.0)  # (..., T_q)
    out.mul_((lse - ref).exp_().unsqueeze(-1))
    out.add_(out_blk.mul_((lse_blk - ref).exp_().unsqueeze(-1)))  # (..., T_q, d_v)
    lse.copy_(new)
