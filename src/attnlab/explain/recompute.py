"""A step recomputed from other numbers than the recorded ones: its operands as shown (rounded) for
``--expect``'s rounding-aware check, or the learner's own earlier numbers to see whether an error is
carried over. Every operation is :mod:`attnlab.functional`'s, run in float64; the recorded walkthrough
itself is never changed.

Only steps whose :class:`~attnlab.explain.steps.How` is an operation on recorded operands can be
recomputed (projections, dot products, scaling, softmax, weighted sums, masks, dropout, linear layers);
steps made by one of the chapter's classes (``module``) or read from the input return None.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from attnlab import functional as F
from attnlab.explain.steps import Step, Walkthrough

__all__ = ["RECOMPUTABLE", "recompute", "rounded"]

RECOMPUTABLE = ("project", "dot", "scale", "divide_by_sum", "softmax", "softmax_naive", "weighted_sum",
                "mask_zero", "mask_after", "mask_before", "dropout", "linear")


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def rounded(values: np.ndarray, decimals: int) -> np.ndarray:
    """``values`` as shown with ``decimals`` decimals (infinities kept)."""
    out = np.asarray(values, dtype=np.float64).copy()
    finite = np.isfinite(out)
    out[finite] = np.round(out[finite], decimals)
    return out


def recompute(walk: Walkthrough, step: Step, operands: Mapping[str, np.ndarray] | None = None) -> np.ndarray | None:
    """``step``'s values (float64, the step's shape) computed by its operation from ``operands``
    (step id -> values; operands not given are the recorded ones); None when the step is not an
    operation on recorded operands (see the module docstring)."""
    how = step.how
    if how is None or how.kind not in RECOMPUTABLE or any(o not in walk for o in how.operands):
        return None
    given = operands or {}
    ops = [_t(given[o]) if o in given else _t(walk.step(o).values) for o in how.operands]
    kind, params = how.kind, how.params
    with torch.no_grad():
        if kind == "project":
            out = ops[0] @ ops[1]  # (T, d_in) @ (d_in, d_out) -> (T, d_out)
        elif kind == "dot":
            if step.values.ndim == 1:
                row = int(params.get("row", walk.query))
                out = F.dot_scores(ops[0][row], ops[1])  # (T,)
            else:
                out = F.all_pair_scores(ops[0], ops[1])  # (..., T, T)
        elif kind == "scale":
            out = ops[0] / float(params.get("divisor", 1.0))
        elif kind == "divide_by_sum":
            out = F.normalize_by_sum(ops[0])
        elif kind in ("softmax", "softmax_naive"):
            out = F.softmax(ops[0], dim=-1)
        elif kind == "weighted_sum":
            w, v = ops
            out = w @ v if w.dim() == 1 else F.context_vectors(w, v)  # (d,) or (..., T, d)
        elif kind == "mask_zero":
            out = ops[0] * ops[1]
        elif kind == "mask_after":
            allowed = _t(walk.step("causal.mask").values) > 0 if "causal.mask" in walk else ops[0] != 0
            out = F.mask_after_softmax(ops[0], allowed)
        elif kind == "mask_before":
            out = F.mask_before_softmax(ops[0], ops[1] > 0)
        elif kind == "dropout":
            if not ops:
                return None
            keep = _t(step.values) != 0  # the entries this dropout kept (the seeded draw)
            out = ops[0] * keep / (1.0 - float(params.get("p", 0.0)))
        else:  # linear
            bias = params.get("bias")
            out = ops[0] @ ops[1] + (_t(np.asarray(bias)) if bias is not None else 0.0)
    result = out.numpy()
    return result if result.shape == step.values.shape else None
