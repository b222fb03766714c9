"""Interval arithmetic: numbers known to lie within a radius of a centre, and the operations of chapter 3 on them.

Used by :mod:`attnlab.explain.kinds` (each step kind's recomputation) and :mod:`attnlab.explain.recompute`
(judging a learner's numbers). A value is an :class:`Interval`: a centre (float64, computed by
:mod:`attnlab.functional`'s own operations, so the math lives once) and a radius >= 0 bounding how far the
true result can be from the centre when each operand lies anywhere within its own radius. A number the
learner *wrote* with ``d`` decimals stands for every value that rounds to it, so it enters with radius
``0.5·10⁻ᵈ``; a number read from the walkthrough enters as a point, radius 0. Each operation bounds its
result rigorously:

    x @ W, q·k, Σ w v     |A|·r_B + r_A·|B| + r_A·r_B        (products of intervals, summed)
    ÷ c, × mask, dropout  r / |c|, r × |mask|, r × keep / (1 − p)
    softmax               exp(hi_i) / (exp(hi_i) + Σ_{j≠i} exp(lo_j)), and the same for the lower end
    ÷ Σ (all positive)    hi_i / (hi_i + Σ_{j≠i} lo_j), and the same for the lower end; with signs
                          mixed, the first-order bound Σ_j |∂w_i/∂a_j| r_j doubled
    concat, masks         the radius moves with its number

Shapes: T tokens, d features, H heads, hd = d_out / H per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlab import functional as F

__all__ = ["Interval", "by_sum", "mask_fill", "mask_renormalise", "matmul", "merge_heads", "rounded", "scale",
           "scores", "softmax", "times"]


def rounded(values: np.ndarray, decimals: int | None) -> np.ndarray:
    """``values`` as shown with ``decimals`` decimals (infinities kept; None: unchanged)."""
    out = np.asarray(values, dtype=np.float64).copy()
    if decimals is None:
        return out
    finite = np.isfinite(out)
    out[finite] = np.round(out[finite], decimals)
    return out


@dataclass(frozen=True)
class Interval:
    """Every value within ``rad`` of ``mid`` (elementwise; ``mid`` may hold -inf with radius 0)."""

    mid: np.ndarray
    rad: np.ndarray

    @staticmethod
    def point(values: np.ndarray) -> Interval:
        mid = np.asarray(values, dtype=np.float64)
        return Interval(mid, np.zeros_like(mid))

    @staticmethod
    def written(values: np.ndarray, decimals: np.ndarray | int) -> Interval:
        """Numbers written with ``decimals`` decimals: each stands for everything that rounds to it."""
        mid = np.asarray(values, dtype=np.float64)
        rad = 0.5 * np.power(10.0, -np.asarray(decimals, dtype=np.float64)) * np.ones_like(mid)
        return Interval(mid, np.where(np.isfinite(mid), rad, 0.0))

    @property
    def lo(self) -> np.ndarray:
        return self.mid - self.rad

    @property
    def hi(self) -> np.ndarray:
        return self.mid + self.rad

    def rounded(self, decimals: int | None) -> Interval:
        return self if decimals is None else Interval(rounded(self.mid, decimals), self.rad)

    def reshape(self, *shape: int) -> Interval:
        return Interval(self.mid.reshape(*shape), self.rad.reshape(*shape))

    def transpose(self, *axes: int) -> Interval:
        return Interval(self.mid.transpose(*axes), self.rad.transpose(*axes))

    def swap_last(self) -> Interval:
        return Interval(np.swapaxes(self.mid, -1, -2), np.swapaxes(self.rad, -1, -2))


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _finite(a: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(a), a, 0.0)


def matmul(a: Interval, b: Interval) -> Interval:
    """``a @ b`` with the product bound (both may be batched)."""
    mid = (_t(a.mid) @ _t(b.mid)).numpy()
    am, bm = np.abs(_finite(a.mid)), np.abs(_finite(b.mid))
    rad = am @ b.rad + a.rad @ bm + a.rad @ b.rad
    return Interval(mid, rad)


def scores(a: Interval, b: Interval) -> Interval:
    """Every row of ``a`` against every row of ``b``: ``a @ bᵀ`` (:func:`attnlab.functional.all_pair_scores`)."""
    mid = F.all_pair_scores(_t(a.mid), _t(b.mid)).numpy()  # (..., T_q, T_k)
    return Interval(mid, matmul(a, b.swap_last()).rad)


def scale(a: Interval, divisor: float) -> Interval:
    return Interval(a.mid / divisor, a.rad / abs(divisor))


def times(a: Interval, factor: np.ndarray) -> Interval:
    """Elementwise by exact numbers (a mask, dropout's kept entries and rescaling)."""
    f = np.asarray(factor, dtype=np.float64)
    return Interval(a.mid * f, a.rad * np.abs(f))


def softmax(a: Interval, dim: int = -1) -> Interval:
    """:func:`attnlab.functional.softmax` with the exact bound of each weight over the box of scores."""
    mid = F.softmax(_t(a.mid), dim=dim).numpy()
    lo, hi = a.lo, a.hi
    top = np.max(np.where(np.isfinite(hi), hi, -np.inf), axis=dim, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e_lo, e_hi = np.exp(lo - top), np.exp(hi - top)
    s_lo, s_hi = e_lo.sum(axis=dim, keepdims=True), e_hi.sum(axis=dim, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        w_hi = e_hi / (e_hi + np.maximum(s_lo - e_lo, 0.0))
        w_lo = e_lo / (e_lo + np.maximum(s_hi - e_hi, 0.0))
    w_hi, w_lo = np.nan_to_num(w_hi, nan=0.0), np.nan_to_num(w_lo, nan=0.0)
    rad = np.maximum(np.maximum(w_hi - mid, mid - w_lo), 0.0)
    return Interval(mid, np.where(a.rad.max() == 0, 0.0, rad))


def by_sum(a: Interval, dim: int = -1) -> Interval:
    """``a / a.sum(dim)`` (:func:`attnlab.functional.normalize_by_sum`) with its bound."""
    mid = F.normalize_by_sum(_t(a.mid), dim=dim).numpy()
    if not a.rad.any():
        return Interval(mid, np.zeros_like(mid))
    lo, hi = a.lo, a.hi
    if (lo >= 0).all():
        s_lo, s_hi = lo.sum(axis=dim, keepdims=True), hi.sum(axis=dim, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            w_hi = hi / (hi + (s_lo - lo))
            w_lo = lo / (lo + (s_hi - hi))
        w_hi, w_lo = np.nan_to_num(w_hi, nan=0.0, posinf=np.inf), np.nan_to_num(w_lo, nan=0.0)
        return Interval(mid, np.maximum(np.maximum(w_hi - mid, mid - w_lo), 0.0))
    s = a.mid.sum(axis=dim, keepdims=True)
    total = a.rad.sum(axis=dim, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rad = 2.0 * (a.rad * np.abs(s - a.mid) + np.abs(a.mid) * (total - a.rad)) / (s * s)
    return Interval(mid, np.nan_to_num(rad, nan=np.inf))


def mask_renormalise(a: Interval, allowed: np.ndarray) -> Interval:
    """Zero the masked weights and renormalise each row (:func:`attnlab.functional.mask_after_softmax`)."""
    mid = F.mask_after_softmax(_t(a.mid), _t(allowed) > 0).numpy()
    return Interval(mid, by_sum(times(a, allowed > 0)).rad)


def mask_fill(a: Interval, allowed: np.ndarray) -> Interval:
    """Masked scores set to -inf (:func:`attnlab.functional.mask_before_softmax`)."""
    keep = np.asarray(allowed) > 0
    mid = F.mask_before_softmax(_t(a.mid), torch.from_numpy(keep)).numpy()
    return Interval(mid, np.where(keep, a.rad, 0.0))


def merge_heads(a: Interval) -> Interval:
    """(H, T, hd) -> (T, H·hd): the heads side by side, as ``transpose(1, 2).view(T, d_out)`` does."""
    h, t, hd = a.mid.shape
    return a.transpose(1, 0, 2).reshape(t, h * hd)  # (T, H, hd) -> (T, H * hd)
