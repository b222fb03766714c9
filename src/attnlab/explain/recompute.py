"""A step recomputed from other numbers than the recorded ones, as an interval.

Used by ``--expect`` and ``attnlab check`` to judge a learner's numbers: the step's operands are taken
*as the learner had them* (rounded to the decimals shown or written, or the learner's own earlier
numbers), and the step's operation is applied to them. The recorded walkthrough is never changed.

Each step kind's operation is an entry of the one table of step kinds (:data:`attnlab.explain.kinds.KINDS`,
applied by :func:`operate`); the interval arithmetic it uses is :mod:`attnlab.explain.interval` (its
names are importable from here too). A number the learner *wrote* with ``d`` decimals stands for every
value that rounds to it, so it enters with radius ``0.5·10⁻ᵈ``; a number read from the walkthrough
(rounded to the shown precision, or to the learner's decimals) enters as a point, radius 0.

A hypothesis of how the learner worked (right, a named mistake, see :mod:`.mistakes`) is a function
that overrides some steps' operations; :func:`evaluate` runs the chain of steps from the learner's
numbers (or the recorded ones) down to one step, recomputing every step on the way that the
hypothesis changes or whose operands changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from attnlab import functional as F
from attnlab.explain.interval import (
    Interval,
    by_sum,
    mask_fill,
    mask_renormalise,
    matmul,
    merge_heads,
    rounded,
    scale,
    scores,
    softmax,
    times,
)
from attnlab.explain.kinds import KINDS, kind_of, operate
from attnlab.explain.steps import Step, Walkthrough

__all__ = ["RECOMPUTABLE", "Interval", "Override", "ancestors", "by_sum", "evaluate", "mask_fill",
           "mask_renormalise", "matmul", "merge_heads", "mha_attention", "operate", "recompute", "rounded", "scale",
           "scores", "softmax", "times"]

# The kinds whose numbers are an operation on recorded operands (the table's entries with a recomputation).
RECOMPUTABLE = tuple(name for name, kind in KINDS.items() if kind.recompute is not None)


Override = Callable[[Walkthrough, Step, list[Interval], Mapping[str, Interval]], "Interval | None"]


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
        if sid != target and kind_of(step).drawn and not ops_ids:  # a random draw: exact as recorded
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
    if how is None or kind_of(step).recompute is None or any(o not in walk for o in how.operands):
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
