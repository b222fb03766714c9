"""A step recomputed from other numbers than the recorded ones, as an interval.

Used by ``--expect`` and ``attnlab check`` to judge a learner's numbers: the step's operands are taken
*as the learner had them* (rounded to the decimals shown or written, or the learner's own earlier
numbers), and the step's operation is applied to them. The recorded walkthrough is never changed.

Interval arithmetic. A value is an :class:`Interval`: a centre (float64, computed by
:mod:`attnlab.functional`'s own operations, so the math lives once) and a radius >= 0 bounding how far
the true result can be from the centre when each operand lies anywhere within its own radius. A
number the learner *wrote* with ``d`` decimals stands for every value that rounds to it, so it enters
with radius ``0.5·10⁻ᵈ``; a number read from the walkthrough (rounded to the shown precision, or to the
learner's decimals) enters as a point, radius 0. Each operation bounds its result rigorously:

    x @ W, q·k, Σ w v     |A|·r_B + r_A·|B| + r_A·r_B        (products of intervals, summed)
    ÷ c, × mask, dropout  r / |c|, r × |mask|, r × keep / (1 − p)
    softmax               exp(hi_i) / (exp(hi_i) + Σ_{j≠i} exp(lo_j)), and the same for the lower end
    ÷ Σ (all positive)    hi_i / (hi_i + Σ_{j≠i} lo_j), and the same for the lower end; with signs
                          mixed, the first-order bound Σ_j |∂w_i/∂a_j| r_j doubled
    concat, masks         the radius moves with its number

A hypothesis of how the learner worked (right, a named mistake, see :mod:`.mistakes`) is a function
that overrides some steps' operations; :func:`evaluate` runs the chain of steps from the learner's
numbers (or the recorded ones) down to one step, recomputing every step on the way that the
hypothesis changes or whose operands changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from attnlab import functional as F
from attnlab.explain.steps import Step, Walkthrough

__all__ = ["RECOMPUTABLE", "Interval", "Override", "ancestors", "evaluate", "mha_attention", "operate", "recompute", "rounded"]

RECOMPUTABLE = ("project", "dot", "scale", "divide_by_sum", "softmax", "softmax_naive", "weighted_sum",
                "mask_zero", "mask_after", "mask_before", "dropout", "linear", "concat")


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


Override = Callable[[Walkthrough, Step, list[Interval], Mapping[str, Interval]], "Interval | None"]


def operate(walk: Walkthrough, step: Step, ops: list[Interval]) -> Interval | None:
    """``step``'s own operation on ``ops`` (its operands, in the order of ``step.how.operands``); None
    when the step is not an operation on recorded operands (inputs, weights, the classes' outputs)."""
    how = step.how
    if how is None or how.kind not in RECOMPUTABLE:
        return None
    kind, params = how.kind, how.params
    if kind == "project":
        out = matmul(ops[0], ops[1])  # (T, d_in) @ (d_in, d_out) -> (T, d_out)
    elif kind == "dot":
        if step.values.ndim == 1:
            row = int(params.get("row", walk.query))
            query = Interval(ops[0].mid[row][None, :], ops[0].rad[row][None, :])  # (1, d)
            whole = scores(query, ops[1])  # (1, T)
            out = Interval(whole.mid[0], whole.rad[0])  # (T,)
        else:
            out = scores(ops[0], ops[1])  # (..., T, T)
    elif kind == "scale":
        out = scale(ops[0], float(params.get("divisor", 1.0)))
    elif kind == "divide_by_sum":
        out = by_sum(ops[0])
    elif kind in ("softmax", "softmax_naive"):
        out = softmax(ops[0])
    elif kind == "weighted_sum":
        w = ops[0]
        if w.mid.ndim == 1:
            w2 = w.reshape(1, -1)  # (T,) -> (1, T)
            res = matmul(w2, ops[1])  # (1, d)
            out = res.reshape(-1)  # (1, d) -> (d,)
        else:
            out = matmul(w, ops[1])  # (..., T, d)
    elif kind == "mask_zero":
        out = times(ops[0], ops[1].mid)
    elif kind == "mask_after":
        allowed = walk.step("causal.mask").values if "causal.mask" in walk else (ops[0].mid != 0)
        out = mask_renormalise(ops[0], np.asarray(allowed, dtype=np.float64))
    elif kind == "mask_before":
        out = mask_fill(ops[0], ops[1].mid)
    elif kind == "dropout":
        if not ops:
            return None
        keep = (step.values != 0).astype(np.float64)  # the entries this dropout kept (the seeded draw)
        out = times(ops[0], keep / (1.0 - float(params.get("p", 0.0))))
    elif kind == "concat":
        if ops[0].mid.ndim != 3:
            return None
        out = merge_heads(ops[0])  # (H, T, hd) -> (T, d_out)
    else:  # linear
        bias = params.get("bias")
        res = matmul(ops[0], ops[1])
        out = Interval(res.mid + (np.asarray(bias, dtype=np.float64) if bias is not None else 0.0), res.rad)
    return out if out.mid.shape == step.values.shape else None


def ancestors(walk: Walkthrough, target: str, stop: frozenset[str] = frozenset()) -> dict[str, int]:
    """Steps ``target`` is computed from (through ``How.operands``), with their distance in operations
    (``target`` itself 0); the search does not go past the steps in ``stop`` (numbers the learner gave)."""
    dist = {target: 0}
    todo = [target]
    while todo:
        sid = todo.pop(0)
        if sid in stop and sid != target:
            continue
        how = walk.step(sid).how
        for op in () if how is None else how.operands:
            if op in walk and op not in dist:
                dist[op] = dist[sid] + 1
                todo.append(op)
    return dist


def evaluate(walk: Walkthrough, target: str, *, given: Mapping[str, Interval] | None = None,
             basis: int | None = None, override: Override | None = None,
             extra: Mapping[str, Interval] | None = None) -> Interval | None:
    """``target`` computed through the chain of steps it depends on.

    given     the learner's own numbers of earlier steps (step id -> Interval): used as they are, and
              nothing behind them is recomputed
    basis     decimals the recorded numbers are read with (None: exact; e.g. 4 as the tables show them)
    override  a hypothesis: ``override(walk, step, operands, values)`` returns the step's numbers the
              hypothesis's way, or None to compute it the right way
    extra     numbers of steps that are not recorded (e.g. a note's own definitions): used as given

    Every step between the learner's numbers and ``target`` that the hypothesis changes, or whose
    operands changed, is recomputed; ``target`` always is. Others are the recorded numbers, read at
    ``basis``. None when ``target`` cannot be recomputed."""
    given = dict(given or {})
    stop = frozenset(given) - {target}
    dist = ancestors(walk, target, stop)
    order = [s for s in walk.step_ids if s in dist]
    values: dict[str, Interval] = dict(extra or {})
    changed: set[str] = set()
    for sid in order:
        step = walk.step(sid)
        if sid in given and sid != target:
            values[sid] = given[sid]
            changed.add(sid)
            continue
        how = step.how
        ops_ids = () if how is None else how.operands
        if sid != target and how is not None and how.kind == "dropout" and not ops_ids:
            values[sid] = Interval.point(step.values)
            continue
        ops = [values[o] if o in values else Interval.point(rounded(walk.step(o).values, basis)) for o in ops_ids]
        out = override(walk, step, ops, values) if override is not None else None
        if out is None and (sid == target or changed.intersection(ops_ids)):
            out = operate(walk, step, ops)
            if out is None and sid == target:
                return None
        if out is None:
            if sid not in values:
                values[sid] = Interval.point(rounded(step.values, basis))
            continue
        values[sid] = out if sid == target else out.rounded(basis)
        changed.add(sid)
    return values.get(target)


def recompute(walk: Walkthrough, step: Step, operands: Mapping[str, np.ndarray] | None = None) -> np.ndarray | None:
    """``step``'s values (float64, the step's shape) computed by its operation from ``operands`` (step
    id -> values; operands not given are the recorded ones); None when the step is not an operation on
    recorded operands."""
    how = step.how
    if how is None or how.kind not in RECOMPUTABLE or any(o not in walk for o in how.operands):
        return None
    given = operands or {}
    ops = [Interval.point(given[o] if o in given else walk.step(o).values) for o in how.operands]
    out = operate(walk, step, ops)
    return None if out is None else out.mid


# (id(walk), split, divisor) -> (walk, result): the walk is kept, so its id cannot be reused while cached
_MHA_CACHE: dict[tuple[int, str, str], tuple[Walkthrough, tuple[np.ndarray, np.ndarray]]] = {}


def mha_attention(walk: Walkthrough, *, split: str = "right",
                  divisor: str = "head") -> tuple[np.ndarray, np.ndarray] | None:
    """MultiHeadAttention's weights (H, T, T) and context vectors (H, T, d_head) of the multihead
    section, computed here from its projections (rebuilt as :mod:`attnlab.explain.build` builds them:
    seeded, or the given W_query/W_key/W_value), so that a wrong head split (``split="wrong"``:
    ``view(H, T, d_head)``) or another divisor (``"d_model"``: √d_out, ``"d_in"``: √d_in) can be made.
    None when the walkthrough has no multihead section."""
    if "multihead.mha_weights" not in walk or "input.embeddings" not in walk:
        return None
    key = (id(walk), split, divisor)
    if key in _MHA_CACHE and _MHA_CACHE[key][0] is walk:
        return _MHA_CACHE[key][1]
    from attnlab.modules import MultiHeadAttention

    st = walk.settings
    x = torch.from_numpy(walk.step("input.embeddings").values.astype(np.float64))  # (T, d_in)
    t, h = x.shape[0], walk.step("multihead.mha_weights").shape[0]
    hd = st.d_out // h
    if st.weights == "given":
        src = next((s for s in ("trainable", "causal") if f"{s}.W_query" in walk), None)
        if src is None:
            return None
        w = {n: torch.from_numpy(walk.step(f"{src}.{n}").values.astype(np.float64))
             for n in ("W_query", "W_key", "W_value")}  # (d_in, d_out) each
    else:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(st.seed)
            mha = MultiHeadAttention(st.d_in, st.d_out, t, 0.0, num_heads=h)
            w = {n: getattr(mha, n).weight.detach().T.double() for n in ("W_query", "W_key", "W_value")}

    def heads(m: torch.Tensor) -> torch.Tensor:  # (T, d_out) -> (H, T, hd)
        if split == "wrong":
            return m.reshape(h, t, hd)  # (H, T, hd): the memory of (T, d_out) read as heads-first
        return m.reshape(t, h, hd).transpose(0, 1)  # (T, H, hd) -> (H, T, hd)

    q, k, v = (heads(x @ w[n]) for n in ("W_query", "W_key", "W_value"))  # (H, T, hd) each
    by = {"head": math.sqrt(hd), "d_model": math.sqrt(st.d_out), "d_in": math.sqrt(st.d_in)}[divisor]
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))  # (T, T)
    weights = F.softmax(F.mask_before_softmax(F.all_pair_scores(q, k) / by, allowed), dim=-1)  # (H, T, T)
    ctx = F.context_vectors(weights, v)  # (H, T, hd)
    out = (weights.numpy(), ctx.numpy())
    if len(_MHA_CACHE) > 64:
        _MHA_CACHE.clear()
    _MHA_CACHE[key] = (walk, out)
    return out
