"""FlashAttention-2 on plain PyTorch tensor ops: attention without the N x N matrix.

Exact softmax attention ``softmax(q k^T * scale + mask) v`` computed tile by tile with an
*online softmax*: for one block of queries we walk over the blocks of keys, keeping per query row

* ``m`` -- the largest score seen so far (the running max),
* ``l`` -- the sum of ``exp(score - m)`` seen so far (the running denominator),
* ``acc`` -- the sum of ``exp(score - m) * v`` seen so far (the unnormalised output).

When a new key block raises the max from ``m_old`` to ``m_new``, everything accumulated so far is
rescaled by ``alpha = exp(m_old - m_new)``.  After the last key block ``out = acc / l``.  Only the
output and one number per query row, the log-sum-exp ``lse = m + log(l)``, are kept for the backward
pass, so the extra memory is O(T) rather than O(T_q * T_k): no ``T_q x T_k`` matrix ever exists,
only one ``block_q x block_k`` tile (per batch/head) at a time.

The backward pass recomputes each tile's probabilities from ``q``, ``k`` and the saved ``lse`` --
``P = exp(q k^T * scale - lse)`` -- and then applies the FlashAttention-2 gradient formulas::

    D  = rowsum(dO * O)              # (N, T_q)   one number per query row
    dP = dO V^T                      # per tile
    dS = P * (dP - D)                # softmax backward without the full row of P
    dQ += dS K * scale,   dK += dS^T Q * scale,   dV += P^T dO

Masks: a description, not a matrix
    Which (query, key) pairs may attend is described by a small :class:`TileMask` -- the parts
    ``causal`` (bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + (T_k - T_q)``),
    ``window`` (a sliding window, implies causal: ``i + (T_k - T_q) - window < j``), ``document_ids``
    (packed sequences: a token sees only keys of its own document) and ``padding`` (True = that key
    is padding).  The parts compose by AND, like FlexAttention's ``and_masks``; its
    :meth:`TileMask.allowed` is the elementwise rule (a ``mask_mod``) and its tile classification
    the block mask: every (query block, key block) tile is *skipped* (no allowed pair: never
    computed, in forward and backward), *full* (every pair allowed: no elementwise mask at all) or
    *partial* (the elementwise mask enters the score matmul as an additive 0/-inf bias, so it costs
    no extra pass).  See :func:`tile_plan` and :func:`count_tiles`.  A query row with no allowed key
    at all gets an output of zeros and zero gradients (never NaN).

Grouped-query heads
    k and v may have fewer heads than q (``H % H_kv == 0``; query head ``h`` uses key/value head
    ``h // (H // H_kv)``, as ``repeat_interleave`` and torch's ``enable_gqa``).  K/V are never
    repeated: the ``G = H / H_kv`` query heads that share a key/value head are stacked as the rows of
    one tile (row ``t * G + g`` is position ``t`` of group member ``g``), so one key tile serves all
    of them -- a larger, faster matmul -- and dK, dV sum over the group for free.

An operator
    :func:`flash_attention` checks its inputs (shape checks only, symbolic sizes welcome) and calls
    the custom operator ``torch.ops.attnlab.flash_attention`` (``torch.library.custom_op`` with a
    fake implementation and a registered autograd formula, whose backward is the operator
    ``attnlab::flash_attention_backward``), so ``torch.compile(fullgraph=True)`` and ``torch.export``
    see one node with known output shapes; every decision that depends on tensor values (which
    tiles have padding or document boundaries, the dropout seed, the worker threads) is made inside
    the operator, never in the traced code.  Under ``torch.autocast`` the inputs are cast to the
    autocast dtype (as torch does for ``scaled_dot_product_attention``) and the kernel itself runs
    with autocast off, in float32 for half-precision inputs.

Speed
    All leading dims are processed together in every tile (one batched matmul over N).  Scores are
    computed in base 2 (``log2(e)`` is folded into the scale of ``q``) so every exponential is an
    ``exp2``; the statistic kept between the passes is ``lse2 = lse * log2(e)``.  Temporaries are
    updated in place.  With several torch threads and dropout off, the N rows are split between
    worker threads that each run single-threaded ops (see :func:`_in_parallel`); the pool is
    recreated in a forked child (``os.register_at_fork``).

Dropout
    ``dropout_p > 0`` drops attention probabilities (after the softmax) with probability
    ``dropout_p`` and scales the kept ones by ``1 / (1 - dropout_p)``.  The mask of every tile is
    regenerated from a per-tile seed derived from ``seed`` and the tile's block indices, so the
    forward and backward passes use the same mask without storing it, and the same ``seed`` (with
    the same shapes and block sizes) gives bit-identical results.  ``seed=None`` draws a seed tensor
    from torch's global generator (so ``torch.manual_seed`` makes it reproducible too).

Precision
    float32 and float64 inputs are computed in their own dtype; float16 and bfloat16 inputs are
    computed (matmuls and softmax statistics) in float32 and the result is cast back.

Shape legend
    B    -- batch (all leading dims before the head dim, flattened)
    H    -- query heads, H_kv -- key/value heads, G = H // H_kv query heads per key/value head
    N    -- B * H_kv rows of the kernel's batched matmuls
    T_q  -- number of queries,  T_k -- number of keys/values
    R    -- T_q * G tile rows per kernel batch row (query positions times group members)
    d    -- query/key feature dim,  d_v -- value feature dim
    bq   -- query positions in the current block (<= block_q); bq * G rows
    bk   -- keys in the current key block (<= block_k)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.functional import broadcast_shape, compute_dtype

__all__ = ["TileMask", "Tile", "count_tiles", "flash_attention", "forward_with_lse", "backward_with_lse",
           "tile_plan"]

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOG2E = math.log2(math.e)
_ACTIVE_COUNTERS: list[dict[str, int]] = []  # filled only inside ``count_tiles()``
# The kernel's document ids: None, (B, T), or a pair ((B, T_q), (B, T_k)) of a block of a longer sequence.
_KernelDocs = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None

SKIP, FULL, PARTIAL = 0, 1, 2  # the three kinds of tile


# --------------------------------------------------------------------------------------------------
# The mask description and its tile classification
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileMask:
    """Which (query, key) pairs may attend, as parts that compose by AND (never a T x T tensor).

    causal: query ``i`` sees key ``j`` only if ``j <= i + offset``;
    window: None or w >= 1 (with causal): also ``j > i + offset - w``;
    offset: ``T_k - T_q`` (the bottom-right alignment of the diagonal);
    document_ids: None or int64 (N, T) -- query ``i`` sees key ``j`` only if their ids are equal;
    padding: None or bool (N, T_k) -- True = the key is padding, seen by nobody in that row;
    key_document_ids: None or int64 (N, T_k) -- the keys' ids when they differ from the queries'
        (a block of a longer sequence, as ring attention computes); ``document_ids`` are then the queries'.
    linear_bias: None or a :class:`LinearBias` -- not a mask but what is added to every allowed score
        (ALiBi), kept here so that it is sliced with the rows; it skips no tile.
    """

    causal: bool = False
    window: int | None = None
    offset: int = 0
    document_ids: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    key_document_ids: torch.Tensor | None = None
    linear_bias: LinearBias | None = None

    @property
    def key_docs(self) -> torch.Tensor | None:
        """The keys' document ids (N, T_k): ``key_document_ids``, or ``document_ids`` for self-attention."""
        return self.document_ids if self.key_document_ids is None else self.key_document_ids

    def allowed(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The elementwise rule (a FlexAttention ``mask_mod``): query positions ``rows`` (bq,), key
        positions ``cols`` (bk,) -> bool (1 or N, bq, bk), True = may attend."""
        ok = torch.ones(1, rows.numel(), cols.numel(), dtype=torch.bool, device=cols.device)  # (1, bq, bk)
        last = rows.unsqueeze(1) + self.offset  # (bq, 1)   the last key each row may see
        if self.causal:
            ok = ok & (cols.unsqueeze(0) <= last)
        if self.window is not None:
            ok = ok & (cols.unsqueeze(0) > last - self.window)
        key_docs = self.key_docs
        if self.document_ids is not None and key_docs is not None:
            ok = ok & (self.document_ids[:, rows].unsqueeze(2) == key_docs[:, cols].unsqueeze(1))  # (N, bq, bk)
        if self.padding is not None:
            ok = ok & ~self.padding[:, cols].unsqueeze(1)  # (N, bq, bk)
        return ok

    def key_range(self, q_start: int, q_end: int, t_k: int) -> tuple[int, int]:
        """``[lo, hi)``: the keys that the causal/window parts let some row of the block see."""
        hi = min(t_k, q_end + self.offset) if self.causal else t_k
        lo = max(0, q_start + self.offset - self.window + 1) if self.window is not None else 0
        return lo, hi

    def position_kind(self, q_start: int, q_end: int, k_start: int, k_end: int) -> int:
        """FULL or PARTIAL for a tile inside :meth:`key_range` (positions only)."""
        if self.causal and k_end - 1 > q_start + self.offset:
            return PARTIAL  # the first row does not see the last key
        if self.window is not None and k_start <= q_end - 1 + self.offset - self.window:
            return PARTIAL  # the last row does not see the first key
        return FULL

    def rows(self, sl: slice) -> TileMask:
        """The same mask restricted to the kernel rows ``sl`` (for the worker threads)."""
        return dataclasses.replace(
            self,
            document_ids=None if self.document_ids is None else self.document_ids[sl],
            padding=None if self.padding is None else self.padding[sl],
            key_document_ids=None if self.key_document_ids is None else self.key_document_ids[sl],
            linear_bias=None if self.linear_bias is None else self.linear_bias.rows(sl),
        )


class LinearBias(NamedTuple):
    """ALiBi on the kernel rows: ``-slope * |query position - key position|`` added to the scores.

    slopes: (N, G), the slope of each kernel row's G query heads, already times ``-log2(e)`` (the kernel's
    scores are in base-2 units); query_positions (N, T_q) and key_positions (N, T_k), long.
    """

    slopes: torch.Tensor
    query_positions: torch.Tensor
    key_positions: torch.Tensor

    def rows(self, sl: slice) -> LinearBias:
        return LinearBias(self.slopes[sl], self.query_positions[sl], self.key_positions[sl])

    def tile(self, q_start: int, q_end: int, k_start: int, k_end: int) -> torch.Tensor:
        """The bias of one tile, (N, bq * G, bk), rows interleaved as the kernel's (row t * G + g)."""
        q = self.query_positions[:, q_start:q_end, None]  # (N, bq, 1)
        k = self.key_positions[:, None, k_start:k_end]  # (N, 1, bk)
        distance = (q - k).abs().to(self.slopes.dtype)  # (N, bq, bk)
        bias = distance[:, :, None, :] * self.slopes[:, None, :, None]  # (N, bq, G, bk)
        return bias.reshape(bias.shape[0], -1, bias.shape[-1])  # (N, bq * G, bk)


class Tile(NamedTuple):
    """One ``[q_start, q_end) x [k_start, k_end)`` tile of the score matrix that gets computed."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    needs_mask: bool  # False for a full tile: every pair allowed, no elementwise mask


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (N, T) cut into blocks, the last one completed with copies of the last column: (N, n_blocks, block)."""
    t = x.shape[-1]
    n_blocks = -(-t // block)
    x = torch.cat([x, x[:, -1:].expand(x.shape[0], n_blocks * block - t)], dim=1)  # (N, n_blocks * block)
    return x.reshape(x.shape[0], n_blocks, block)  # (N, n_blocks, block)


def _plan(mask: TileMask, t_q: int, t_k: int, block_q: int, block_k: int) -> list[tuple[int, int, list]]:
    """``[(q_start, q_end, [(k_start, k_end, needs_mask), ...]), ...]``: the tiles to compute.

    Key blocks lie on the ``block_k`` grid.  A tile is skipped when the positions (causal/window)
    leave it no pair, when no row has a document in common with any of its keys, or when all its
    keys are padding in every row; it needs the elementwise mask unless all three parts allow it whole.
    """
    doc_overlap = doc_full = None
    key_docs = mask.key_docs
    if mask.document_ids is not None and key_docs is not None and t_q > 0 and t_k > 0:
        q_blocks, k_blocks = _blocks(mask.document_ids, block_q), _blocks(key_docs, block_k)  # (N, nq|nk, block)
        q_min, q_max = q_blocks.amin(-1), q_blocks.amax(-1)  # (N, nq)
        k_min, k_max = k_blocks.amin(-1), k_blocks.amax(-1)  # (N, nk)
        q_min, q_max, k_min, k_max = q_min[:, :, None], q_max[:, :, None], k_min[:, None], k_max[:, None]
        overlap = (q_min <= k_max) & (k_min <= q_max)  # (N, nq, nk)  id ranges meet: some pair may match
        single = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)  # (N, nq, nk)  one shared document
        doc_overlap, doc_full = overlap.any(0).tolist(), single.all(0).tolist()
    pad_any = pad_all = None
    if mask.padding is not None and t_k > 0:
        blocks = _blocks(mask.padding, block_k)  # (N, nk, block_k)
        pad_all = blocks.all(-1).all(0).tolist()  # (nk,)   every key padding in every row
        pad_any = blocks.any(-1).any(0).tolist()  # (nk,)

    plan = []
    for qi, q_start in enumerate(range(0, t_q, block_q)):
        q_end = min(q_start + block_q, t_q)
        lo, hi = mask.key_range(q_start, q_end, t_k)
        key_blocks = []
        for k_start in range((lo // block_k) * block_k, max(hi, 0), block_k):
            kj = k_start // block_k
            k_end = min(k_start + block_k, t_k)
            full = mask.position_kind(q_start, q_end, k_start, k_end) == FULL
            if doc_overlap is not None and doc_full is not None:
                if not doc_overlap[qi][kj]:
                    continue
                full = full and doc_full[qi][kj]
            if pad_all is not None and pad_any is not None:
                if pad_all[kj]:
                    continue
                full = full and not pad_any[kj]
            key_blocks.append((k_start, k_end, not full))
        plan.append((q_start, q_end, key_blocks))
    return plan


def tile_plan(
    t_q: int,
    t_k: int,
    *,
    causal: bool = False,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> list[Tile]:
    """List the tiles :func:`flash_attention` computes (forward and backward), in loop order.

    Non-causal attention computes all ``ceil(T_q/block_q) * ceil(T_k/block_k)`` tiles; causal
    attention skips the tiles wholly above the diagonal (about half), a window of w keys leaves
    about ``T/block * (w/block + 1)``, documents only the blocks on the diagonal of each document.
    ``document_ids``: (T,) or (N, T) integer ids (T = T_q = T_k).
    """
    docs = None
    if document_ids is not None:
        docs = document_ids.reshape(-1, document_ids.shape[-1]).long()  # (N, T)
    mask = TileMask(causal=causal or window is not None, window=window, offset=t_k - t_q, document_ids=docs)
    return [
        Tile(q_start, q_end, k_start, k_end, needs_mask)
        for q_start, q_end, key_blocks in _plan(mask, t_q, t_k, block_q, block_k)
        for k_start, k_end, needs_mask in key_blocks
    ]


@contextlib.contextmanager
def count_tiles() -> Iterator[dict[str, int]]:
    """Count the score tiles the kernels actually compute inside the ``with`` block.

    >>> q = k = v = torch.randn(2, 1024, 16)
    >>> with count_tiles() as counts:
    ...     out = flash_attention(q, k, v, causal=True, block_q=128, block_k=128)
    >>> counts  # 36 of the 8 x 8 = 64 tiles: the diagonal and below
    {'forward': 36, 'backward': 0}
    """
    counts = {"forward": 0, "backward": 0}
    _ACTIVE_COUNTERS.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE_COUNTERS.remove(counts)


def _count(kind: str, n: int) -> None:
    for counts in _ACTIVE_COUNTERS:
        counts[kind] += n


# --------------------------------------------------------------------------------------------------
# Tile pieces: the mask bias, the scores, the dropout mask
# --------------------------------------------------------------------------------------------------


def _tile_bias(mask: TileMask, q_start: int, q_end: int, k_start: int, k_end: int, group: int,
               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask of one partial tile, 0 where allowed and -inf where not: (1 or N, bq * G, bk).

    The bias enters the score matmul itself (``baddbmm(bias, q, k^T)`` writes ``bias + q k^T``),
    so masking costs no extra pass over the tile.
    """
    rows = torch.arange(q_start, q_end, device=device)  # (bq,)
    cols = torch.arange(k_start, k_end, device=device)  # (bk,)
    blocked = ~mask.allowed(rows, cols)  # (1 or N, bq, bk)
    if group > 1:
        blocked = blocked.repeat_interleave(group, dim=1)  # (1 or N, bq * G, bk)   row t * G + g
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill_(blocked, -math.inf)


class _Biases:
    """The partial tiles' biases of one call.  With positions only (causal / window), a tile's bias depends
    only on its shape and its distance from the diagonal, so the tiles along a diagonal share one."""

    def __init__(self, mask: TileMask, group: int, dtype: torch.dtype, device: torch.device):
        self.mask, self.group, self.dtype, self.device = mask, group, dtype, device
        self.shared = mask.document_ids is None and mask.padding is None and mask.key_document_ids is None
        self.cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def __call__(self, q_start: int, q_end: int, k_start: int, k_end: int,
                 needs_mask: bool = True) -> torch.Tensor | None:
        """The tile's additive bias: its mask (partial tiles) plus the linear bias (every tile); None for
        a full tile without one."""
        masked = self.masked(q_start, q_end, k_start, k_end) if needs_mask else None
        if self.mask.linear_bias is None:
            return masked
        linear = self.mask.linear_bias.tile(q_start, q_end, k_start, k_end)  # (N, bq * G, bk)
        return linear if masked is None else linear + masked  # (N, bq * G, bk)

    def masked(self, q_start: int, q_end: int, k_start: int, k_end: int) -> torch.Tensor:
        if not self.shared:
            return _tile_bias(self.mask, q_start, q_end, k_start, k_end, self.group, self.dtype, self.device)
        key = (k_start - q_start, q_end - q_start, k_end - k_start)
        if key not in self.cache:
            self.cache[key] = _tile_bias(self.mask, q_start, q_end, k_start, k_end, self.group, self.dtype,
                                         self.device)
        return self.cache[key]


def _scores(q_blk: torch.Tensor, k_t_blk: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Score tile ``bias + q_blk @ k_t_blk``: q_blk (N, rows, d), k_t_blk (N, d, bk) -> (N, rows, bk)."""
    if bias is None:
        return torch.bmm(q_blk, k_t_blk)  # (N, rows, bk)
    return torch.baddbmm(bias, q_blk, k_t_blk)  # (N, rows, bk)


def _mix_seed(seed: int, q_block: int, k_block: int) -> int:
    """A per-tile seed: a splitmix64-style hash of (seed, query block index, key block index)."""
    mask64 = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15 * (1 + q_block) + 0xD1B54A32D192ED03 * (1 + k_block)) & mask64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _dropout_keep_scale(
    seed: int, q_block: int, k_block: int, shape: tuple[int, ...], p: float, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``keep / (1 - p)`` for one tile, regenerated identically in forward and backward."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix_seed(seed, q_block, k_block))
    keep = torch.rand(shape, generator=gen, device=device) >= p  # (N, rows, bk)
    return keep.to(dtype).mul_(1.0 / (1.0 - p))  # (N, rows, bk)


# --------------------------------------------------------------------------------------------------
# Forward and backward kernels on the kernel layout: q (N, R = T_q * G, d), k (N, T_k, d)
# --------------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """What the kernels need besides the tensors (the same for every worker thread)."""

    tiles: list  # from _plan
    group: int
    scale: float
    dropout_p: float
    seed: int
    block_q: int
    block_k: int


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: TileMask, plan: _Plan,
                   count: bool = True, out: torch.Tensor | None = None,
                   lse2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled online-softmax forward.

    q: (N, R, d), k: (N, T_k, d), v: (N, T_k, d_v), all in the compute dtype.
    Returns ``out`` (N, R, d_v) and ``lse2`` (N, R), the row log-sum-exp in base 2, -inf for rows
    with no allowed key (written into ``out`` / ``lse2`` when given: the worker threads fill their
    rows of one shared result, no concatenation).

    Scores are kept in base-2 units, ``s2 = s * log2(e)``, so that every exponential is an ``exp2``
    (cheaper than ``exp`` on CPUs): ``exp(s - m) == exp2(s2 - m2)``.  The factor is folded into the
    scale of q, so it costs nothing per tile.
    """
    n, r, _ = q.shape
    d_v, g = v.shape[2], plan.group
    q2 = q * (plan.scale * _LOG2E)  # (N, R, d)   scale folded into q once, not into every tile
    k_t = k.transpose(1, 2).contiguous()  # (N, d, T_k)   one copy: bmm is faster on it than on a view
    lowest = torch.finfo(q.dtype).min
    biases = _Biases(mask, g, q.dtype, q.device)

    out = q.new_empty(n, r, d_v) if out is None else out  # (N, R, d_v)
    lse2 = q.new_empty(n, r) if lse2 is None else lse2  # (N, R)
    for q_start, q_end, key_blocks in plan.tiles:
        if not key_blocks:  # no key visible to any row of this block: output 0, lse -inf
            out[:, q_start * g:q_end * g] = 0.0
            lse2[:, q_start * g:q_end * g] = -math.inf
            continue
        q_blk = q2[:, q_start * g:q_end * g]  # (N, bq * G, d)
        rows = q_blk.shape[1]
        m = q.new_full((n, rows), -math.inf)  # (N, rows)   running row max (base-2 units)
        l = q.new_zeros(n, rows)  # (N, rows)   running row sum of exp2(s2 - m)
        acc = q.new_zeros(n, rows, d_v)  # (N, rows, d_v)   running unnormalised output
        for k_start, k_end, needs_mask in key_blocks:
            if count:
                _count("forward", 1)
            bias = biases(q_start, q_end, k_start, k_end, needs_mask)
            s = _scores(q_blk, k_t[:, :, k_start:k_end], bias)  # (N, rows, bk)
            # New running max.  A row that has seen only masked keys would have m = -inf, and
            # -inf - (-inf) = NaN; clamping to the lowest finite number keeps exp2(-inf - m) = 0.
            m_new = torch.maximum(m, s.amax(dim=-1)).clamp_(min=lowest)  # (N, rows)
            alpha = (m - m_new).exp2_()  # (N, rows)   rescales the old statistics to the new max
            p = s.sub_(m_new.unsqueeze(-1)).exp2_()  # (N, rows, bk)   unnormalised probabilities
            l.mul_(alpha).add_(p.sum(dim=-1))
            if plan.dropout_p > 0.0:
                p.mul_(_dropout_keep_scale(plan.seed, q_start // plan.block_q, k_start // plan.block_k,
                                           tuple(p.shape), plan.dropout_p, p.dtype, p.device))
            acc.mul_(alpha.unsqueeze(-1)).baddbmm_(p, v[:, k_start:k_end])  # (N, rows, d_v)
            m = m_new
        # Rows with no allowed key have l = 0 and acc = 0: divide by 1 so they stay 0 (not NaN);
        # their lse2 = m + log2(0) = -inf tells the backward pass that they have no probabilities.
        out[:, q_start * g:q_end * g] = acc.div_(l.masked_fill(l == 0, 1.0).unsqueeze(-1))
        lse2[:, q_start * g:q_end * g] = m + l.log2()
    return out, lse2


def _flash_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse2: torch.Tensor, mask: TileMask, plan: _Plan,
                    count: bool = True, grads: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward; recomputes each tile's probabilities from q, k and ``lse2``.

    grad_out, out: (N, R, d_v); q: (N, R, d); k: (N, T_k, d); v: (N, T_k, d_v); lse2: (N, R).
    Returns dq (N, R, d), dk (N, T_k, d), dv (N, T_k, d_v) (written into ``grads`` when given).
    """
    g, scale = plan.group, plan.scale
    q2 = q * (scale * _LOG2E)  # (N, R, d)   base-2 scores, as in the forward pass
    q_scaled = q * scale  # (N, R, d)
    k_t = k.transpose(1, 2).contiguous()  # (N, d, T_k)
    v_t = v.transpose(1, 2).contiguous()  # (N, d_v, T_k)
    # Rows without any allowed key have lse2 = -inf; using +inf there makes P = exp2(s2 - inf) = 0
    # for every entry, masked (-inf) or not, so those rows contribute nothing to any gradient.
    biases = _Biases(mask, g, q.dtype, q.device)
    lse2_use = lse2.masked_fill(lse2 == -math.inf, math.inf)  # (N, R)
    delta = (grad_out * out).sum(dim=-1)  # (N, R)   D = rowsum(dO * O)

    if grads is None:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)  # (N, R, d), (N, T_k, d), ..
    else:
        dq, dk, dv = (g.zero_() for g in grads)
    for q_start, q_end, key_blocks in plan.tiles:
        rs = slice(q_start * g, q_end * g)
        q_blk, qs_blk, do_blk = q2[:, rs], q_scaled[:, rs], grad_out[:, rs]  # (N, rows, d), .., (N, rows, d_v)
        lse_blk = lse2_use[:, rs].unsqueeze(-1)  # (N, rows, 1)
        delta_blk = delta[:, rs].unsqueeze(-1)  # (N, rows, 1)
        dq_blk = dq[:, rs]  # (N, rows, d)   a view: accumulate in place
        for k_start, k_end, needs_mask in key_blocks:
            if count:
                _count("backward", 1)
            bias = biases(q_start, q_end, k_start, k_end, needs_mask)
            s = _scores(q_blk, k_t[:, :, k_start:k_end], bias)  # (N, rows, bk)
            p = s.sub_(lse_blk).exp2_()  # (N, rows, bk)   the forward's normalised probabilities
            dp = torch.bmm(do_blk, v_t[:, :, k_start:k_end])  # (N, rows, bk)   dP = dO V^T
            if plan.dropout_p > 0.0:
                keep_scale = _dropout_keep_scale(plan.seed, q_start // plan.block_q, k_start // plan.block_k,
                                                 tuple(p.shape), plan.dropout_p, p.dtype, p.device)
                dv[:, k_start:k_end].baddbmm_((p * keep_scale).transpose(1, 2), do_blk)  # (N, bk, d_v)
                dp.mul_(keep_scale)  # gradient w.r.t. the probabilities before dropout
            else:
                dv[:, k_start:k_end].baddbmm_(p.transpose(1, 2), do_blk)  # (N, bk, d_v)
            ds = dp.sub_(delta_blk).mul_(p)  # (N, rows, bk)   dS = P * (dP - D)
            dq_blk.baddbmm_(ds, k[:, k_start:k_end])  # (N, rows, d)   scaled once at the end
            dk[:, k_start:k_end].baddbmm_(ds.transpose(1, 2), qs_blk)  # (N, bk, d)
    dq.mul_(scale)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Worker threads
# --------------------------------------------------------------------------------------------------


_POOL: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    """In a forked child the parent's worker threads do not exist: start a new pool when needed."""
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _in_parallel(n: int, dropout_p: float, fn: Callable[[slice, bool], tuple]) -> list[tuple]:
    """Run ``fn(rows, count_tiles)`` on contiguous slices of the N kernel rows, in parallel.

    Each torch op parallelises internally (OpenMP), but a tile loop issues thousands of small ops,
    and each one ends in a barrier where all threads wait for the slowest; on a busy CPU that wait
    dominates.  So instead, like torch's own fused kernel, we split the *batch* between
    ``torch.get_num_threads()`` Python threads (torch releases the GIL inside ops), each running
    its tiles with one intra-op thread.  Not done with dropout, whose per-tile masks are drawn for
    all N rows at once (so that they do not depend on the number of threads).
    """
    global _POOL
    workers = min(torch.get_num_threads(), n) if dropout_p == 0.0 else 1
    if workers <= 1:
        return [fn(slice(0, n), True)]
    bounds = [n * i // workers for i in range(workers + 1)]
    slices = [slice(bounds[i], bounds[i + 1]) for i in range(workers)]
    if _POOL is None or _POOL._max_workers < workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attnlab-flash")

    def task(i: int) -> tuple:
        torch.set_num_threads(1)  # this worker's ops run single-threaded
        # Grad mode and autocast are per thread: the worker must record no autograd graph (it would
        # save every tile) and must not cast the tiles to half precision.
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return fn(slices[i], i == 0)  # tiles are counted once, by the first worker

    threads = torch.get_num_threads()
    try:
        return list(_POOL.map(task, range(workers)))
    finally:
        torch.set_num_threads(threads)  # the BLAS thread setting is process-wide: restore it


# --------------------------------------------------------------------------------------------------
# From the caller's layout (B, H, T, d) to the kernel's (N, T * G, d) and back
# --------------------------------------------------------------------------------------------------


def _to_rows(x: torch.Tensor, h_kv: int, cdtype: torch.dtype) -> torch.Tensor:
    """(B, H, T, f) -> (B * H_kv, T * G, f): the G query heads of a group interleaved by position."""
    b, h, t, f = x.shape
    g = h // h_kv
    x = x.reshape(b, h_kv, g, t, f).transpose(2, 3)  # (B, H_kv, T, G, f)
    return x.reshape(b * h_kv, t * g, f).to(cdtype).contiguous()  # (N, T * G, f)


def _from_rows(x: torch.Tensor, b: int, h: int, t: int) -> torch.Tensor:
    """(B * H_kv, T * G, f) -> (B, H, T, f); the inverse of :func:`_to_rows`."""
    n, _, f = x.shape
    h_kv = n // b
    x = x.reshape(b, h_kv, t, h // h_kv, f).transpose(2, 3)  # (B, H_kv, G, T, f)
    return x.reshape(b, h, t, f)  # (B, H, T, f)


_Alibi = tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # slopes (H,), q positions (B, T_q), k (B, T_k)


def _alibi(slopes: torch.Tensor | None, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None) -> _Alibi:
    """The operator's three optional ALiBi tensors as one (or None)."""
    if slopes is None or q_pos is None or k_pos is None:
        return None
    return slopes, q_pos, k_pos


def _kernel_mask(padding: torch.Tensor | None, document_ids: _KernelDocs, causal: bool,
                 window: int | None, t_q: int, t_k: int, h_kv: int, alibi: _Alibi = None,
                 cdtype: torch.dtype = torch.float32) -> TileMask:
    """The TileMask of the kernel rows from the operator's padding (B, H_kv, T_k) and documents: (B, T), or
    a pair ((B, T_q), (B, T_k)) of the queries' and the keys' ids (a block of a longer sequence); with
    ``alibi`` = (slopes (H,), query positions (B, T_q), key positions (B, T_k)), its linear bias."""
    pad = None
    if padding is not None and bool(padding.any()):
        pad = padding.reshape(-1, t_k).contiguous()  # (N, T_k)
    docs = key_docs = None
    if isinstance(document_ids, tuple):
        docs = document_ids[0].long().repeat_interleave(h_kv, dim=0).contiguous()  # (N, T_q)
        key_docs = document_ids[1].long().repeat_interleave(h_kv, dim=0).contiguous()  # (N, T_k)
    elif document_ids is not None:
        docs = document_ids.long().repeat_interleave(h_kv, dim=0).contiguous()  # (N, T)
    linear = None
    if alibi is not None:
        slopes, q_pos, k_pos = alibi
        b = q_pos.shape[0]
        rows = slopes.double().reshape(h_kv, -1).repeat(b, 1) * -_LOG2E  # (N, G): row n = (b, kv head), G heads
        linear = LinearBias(rows.to(cdtype), q_pos.repeat_interleave(h_kv, dim=0),  # (N, G), (N, T_q)
                            k_pos.repeat_interleave(h_kv, dim=0))  # (N, T_k)
    return TileMask(causal=causal, window=window, offset=t_k - t_q, document_ids=docs, padding=pad,
                    key_document_ids=key_docs, linear_bias=linear)


def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None,
                  document_ids: _KernelDocs, seed: torch.Tensor | None, causal: bool, window: int | None,
                  scale: float, dropout_p: float, block_q: int, block_k: int, alibi: _Alibi = None,
                  count: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T_q, d), k (B, H_kv, T_k, d), v (B, H_kv, T_k, d_v) -> out (B, H, T_q, d_v) and the
    natural-log lse (B, H, T_q), both in the compute dtype."""
    b, h, t_q, _ = q.shape
    h_kv, t_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    cdtype = compute_dtype(q.dtype)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:  # no rows, no keys: zeros, lse = -inf
        return q.new_zeros(b, h, t_q, d_v, dtype=cdtype), q.new_full((b, h, t_q), -math.inf, dtype=cdtype)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        qr = _to_rows(q, h_kv, cdtype)  # (N, R, d)
        kr = k.reshape(b * h_kv, t_k, -1).to(cdtype).contiguous()  # (N, T_k, d)
        vr = v.reshape(b * h_kv, t_k, d_v).to(cdtype).contiguous()  # (N, T_k, d_v)
        mask = _kernel_mask(padding, document_ids, causal, window, t_q, t_k, h_kv, alibi, cdtype)
        plan = _Plan(_plan(mask, t_q, t_k, block_q, block_k), h // h_kv, scale, dropout_p,
                     int(seed.item()) if seed is not None else 0, block_q, block_k)
        out = qr.new_empty(b * h_kv, qr.shape[1], d_v)  # (N, R, d_v)
        lse2 = qr.new_empty(b * h_kv, qr.shape[1])  # (N, R)
        _in_parallel(
            b * h_kv, dropout_p,
            lambda sl, first: _flash_forward(qr[sl], kr[sl], vr[sl], mask.rows(sl), plan, count and first,
                                             out[sl], lse2[sl]),
        )
        lse = _from_rows(lse2.unsqueeze(-1), b, h, t_q).squeeze(-1) / _LOG2E  # (B, H, T_q)
        return _from_rows(out, b, h, t_q), lse  # (B, H, T_q, d_v), (B, H, T_q)


def _backward_impl(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, padding: torch.Tensor | None, document_ids: _KernelDocs,
                   seed: torch.Tensor | None, causal: bool, window: int | None, scale: float, dropout_p: float,
                   block_q: int, block_k: int, alibi: _Alibi = None,
                   count: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (dq, dk, dv) in the compute dtype, shapes of q, k, v; ``lse`` natural-log (B, H, T_q)."""
    b, h, t_q, d = q.shape
    h_kv, t_k, d_v = k.shape[1], k.shape[2], v.shape[3]
    cdtype = compute_dtype(q.dtype)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return (q.new_zeros(q.shape, dtype=cdtype), k.new_zeros(k.shape, dtype=cdtype),
                v.new_zeros(v.shape, dtype=cdtype))
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        qr = _to_rows(q, h_kv, cdtype)  # (N, R, d)
        gr = _to_rows(grad_out, h_kv, cdtype)  # (N, R, d_v)
        outr = _to_rows(out, h_kv, cdtype)  # (N, R, d_v)
        lse2 = _to_rows(lse.unsqueeze(-1), h_kv, cdtype).squeeze(-1) * _LOG2E  # (N, R)
        kr = k.reshape(b * h_kv, t_k, d).to(cdtype).contiguous()  # (N, T_k, d)
        vr = v.reshape(b * h_kv, t_k, d_v).to(cdtype).contiguous()  # (N, T_k, d_v)
        mask = _kernel_mask(padding, document_ids, causal, window, t_q, t_k, h_kv, alibi, cdtype)
        plan = _Plan(_plan(mask, t_q, t_k, block_q, block_k), h // h_kv, scale, dropout_p,
                     int(seed.item()) if seed is not None else 0, block_q, block_k)
        dq, dk, dv = torch.empty_like(qr), torch.empty_like(kr), torch.empty_like(vr)  # (N, R, d), ..
        _in_parallel(
            b * h_kv, dropout_p,
            lambda sl, first: _flash_backward(gr[sl], qr[sl], kr[sl], vr[sl], outr[sl], lse2[sl], mask.rows(sl),
                                              plan, count and first, (dq[sl], dk[sl], dv[sl])),
        )
        return (_from_rows(dq, b, h, t_q), dk.reshape(b, h_kv, t_k, d),  # (B, H, T_q, d), (B, H_kv, T_k, d)
                dv.reshape(b, h_kv, t_k, d_v))  # (B, H_kv, T_k, d_v)


# --------------------------------------------------------------------------------------------------
# The operator: one node for torch.compile / torch.export, with its fake implementation and autograd
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("attnlab::flash_attention", mutates_args=())
def _flash_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None,
              document_ids: torch.Tensor | None, seed: torch.Tensor | None, causal: bool, window: int | None,
              scale: float, dropout_p: float, block_q: int, block_k: int,
              alibi_slopes: torch.Tensor | None = None, alibi_q_positions: torch.Tensor | None = None,
              alibi_k_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, T_q, d_v) in q's dtype, lse (B, H, T_q) natural-log in the compute dtype."""
    out, lse = _forward_impl(q, k, v, padding, document_ids, seed, causal, window, scale, dropout_p,
                             block_q, block_k, _alibi(alibi_slopes, alibi_q_positions, alibi_k_positions))
    return out.to(q.dtype).contiguous(), lse.contiguous()


@_flash_op.register_fake
def _flash_op_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None,
                   document_ids: torch.Tensor | None, seed: torch.Tensor | None, causal: bool, window: int | None,
                   scale: float, dropout_p: float, block_q: int,
                   block_k: int, alibi_slopes: torch.Tensor | None = None,
                   alibi_q_positions: torch.Tensor | None = None,
                   alibi_k_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, t_q, _ = q.shape
    out = q.new_empty(b, h, t_q, v.shape[3])  # (B, H, T_q, d_v)
    return out, q.new_empty((b, h, t_q), dtype=compute_dtype(q.dtype))  # (B, H, T_q)


@torch.library.custom_op("attnlab::flash_attention_backward", mutates_args=())
def _flash_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, padding: torch.Tensor | None,
                       document_ids: torch.Tensor | None, seed: torch.Tensor | None, causal: bool,
                       window: int | None, scale: float, dropout_p: float, block_q: int,
                       block_k: int, alibi_slopes: torch.Tensor | None = None,
                       alibi_q_positions: torch.Tensor | None = None,
                       alibi_k_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the dtypes of q, k, v."""
    dq, dk, dv = _backward_impl(grad_out, q, k, v, out, lse, padding, document_ids, seed, causal, window,
                                scale, dropout_p, block_q, block_k,
                                _alibi(alibi_slopes, alibi_q_positions, alibi_k_positions))
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()


@_flash_backward_op.register_fake
def _flash_backward_op_fake(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, padding: torch.Tensor | None,
                            document_ids: torch.Tensor | None, seed: torch.Tensor | None, causal: bool,
                            window: int | None, scale: float, dropout_p: float, block_q: int,
                            block_k: int, alibi_slopes: torch.Tensor | None = None,
                            alibi_q_positions: torch.Tensor | None = None,
                            alibi_k_positions: torch.Tensor | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # contiguous, as the real implementation returns them (not empty_like: q may be a strided view)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, padding, document_ids, seed, causal, window, scale, dropout_p, block_q, block_k, *alibi = inputs
    alibi = (alibi + [None, None, None])[:3]  # slopes, query positions, key positions (absent: None)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, padding, document_ids, seed, *alibi)
    ctx.args = (causal, window, scale, dropout_p, block_q, block_k)
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, grad_out: torch.Tensor,
              grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, padding, document_ids, seed, slopes, q_pos, k_pos = ctx.saved_tensors
    dq, dk, dv = _flash_backward_op(grad_out.contiguous(), q, k, v, out, lse, padding, document_ids, seed,
                                    *ctx.args, slopes, q_pos, k_pos)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None


_flash_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Public entry point: input checks (shapes only, symbolic sizes welcome), then the operator
# --------------------------------------------------------------------------------------------------


class _Inputs(NamedTuple):
    q: torch.Tensor  # (B, H, T_q, d), or (1, H_kv * B * G, T_q, d) when folded
    k: torch.Tensor  # (B, H_kv, T_k, d), or (1, H_kv, T_k, d) when folded
    v: torch.Tensor  # (B, H_kv, T_k, d_v), or (1, H_kv, T_k, d_v) when folded
    padding: torch.Tensor | None  # bool (B, H_kv, T_k), True = padding
    document_ids: torch.Tensor | None  # int (B, T)
    lead: tuple  # the output's leading dims, in the caller's layout (the broadcast of q's, k's and v's)
    causal: bool
    window: int | None
    scale: float
    fold: tuple[int, int, int] | None  # (B, H_kv, G) when K/V of batch 1 serve every query batch row


def _check_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise AttnlabInputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED:
        raise AttnlabInputTypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {t.dtype}")
    if t.dim() < 2:
        raise AttnlabInputError(f"{name} must have at least 2 dims (..., T, d), got shape {tuple(t.shape)}")


def _autocast(q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under torch.autocast, attention runs in the autocast dtype (as torch's own SDPA does)."""
    device = q.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def _prepare_alibi(slopes: object, positions: object, x: _Inputs, q: torch.Tensor) -> _Alibi:
    """``alibi_slopes`` (H,) and ``alibi_positions`` checked, as the operator's slopes (H,) and
    positions (B, T_q), (B, T_k) long (default: bottom-right by index, ``i + T_k - T_q`` and ``j``)."""
    if slopes is None:
        if positions is not None:
            raise AttnlabInputError("alibi_positions are the positions of alibi_slopes' bias: give alibi_slopes too")
        return None
    b, h, t_q = x.q.shape[:3]
    t_k = x.k.shape[2]
    if q.dim() != 4:
        raise AttnlabInputError(f"alibi_slopes need q of shape (batch, heads, num_queries, d), got {tuple(q.shape)}")
    if not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point():
        raise AttnlabInputTypeError(f"alibi_slopes must be a float tensor (one slope per query head), got "
                                    f"{getattr(slopes, 'dtype', type(slopes).__name__)}")
    if tuple(slopes.shape) != (h,) or slopes.device != q.device:
        raise AttnlabInputError(f"alibi_slopes must have shape ({h},) (one per query head) on {q.device}, got "
                                f"{tuple(slopes.shape)} on {slopes.device}")
    if positions is None:
        q_pos = torch.arange(t_q, device=q.device) + (t_k - t_q)  # (T_q,): bottom-right, as the causal mask
        k_pos = torch.arange(t_k, device=q.device)  # (T_k,)
    elif isinstance(positions, tuple) and len(positions) == 2:
        q_pos, k_pos = positions
    else:
        raise AttnlabInputTypeError("alibi_positions must be None or a pair (query positions, key positions), got "
                                    f"{type(positions).__name__}")
    out = []
    for name, pos, t in (("query positions", q_pos, t_q), ("key positions", k_pos, t_k)):
        _check_document_ids(f"alibi_positions' {name}", pos, q.device)  # integer ids on q's device
        if tuple(pos.shape) not in ((t,), (1, t), (b, t)):
            raise AttnlabInputError(f"alibi_positions' {name} must have shape ({t},) or ({b}, {t}), got "
                                    f"{tuple(pos.shape)}")
        lead = 1 if pos.dim() == 1 else pos.shape[0]
        out.append(pos.long().reshape(lead, t).expand(b, t).contiguous())  # (B, T)
    return slopes.contiguous(), out[0], out[1]


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
             document_ids: torch.Tensor | None, key_padding_mask: torch.Tensor | None, scale: float | None,
             broadcast: bool = True, may_fold: bool = True) -> _Inputs:
    """Check the inputs and bring them to the operator's layout (views where possible; a K/V of batch 1
    against a larger query batch is folded into the query rows instead of being copied per batch row)."""
    _check_tensor("q", q)
    _check_tensor("k", k)
    _check_tensor("v", v)
    q, k, v = _autocast(q, k, v)
    shapes = {"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape)}
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise AttnlabInputTypeError(f"{name} must have the same dtype as q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise AttnlabInputError(f"{name} must be on the same device as q ({q.device}), got {t.device}")
    if k.shape[-1] != q.shape[-1]:
        raise AttnlabInputError(f"k must have the feature dim of q, expected k.shape[-1]={q.shape[-1]}, "
                         f"got {k.shape[-1]} (q.shape={shapes['q']}, k.shape={shapes['k']})")
    if v.shape[-2] != k.shape[-2]:
        raise AttnlabInputError(f"v must have as many rows as k, expected v.shape[-2]={k.shape[-2]}, "
                         f"got {v.shape[-2]} (k.shape={shapes['k']}, v.shape={shapes['v']})")
    if q.shape[-1] == 0:
        raise AttnlabInputError("q must have a feature dim d >= 1, got d=0")
    if not isinstance(causal, bool):
        raise AttnlabInputTypeError(f"causal must be a bool, got {type(causal).__name__} ({causal!r})")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise AttnlabInputError(f"window must be None or an int >= 1 (keys seen by each query), got {window!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise AttnlabInputError(f"scale must be a finite real number or None, got {scale!r}")

    n = max(q.dim(), k.dim(), v.dim())
    hq, hk, hv = (t.shape[-3] if t.dim() >= 3 else 1 for t in (q, k, v))
    grouped = 1 < hk < hq and hk == hv and hq % hk == 0
    has_heads = n >= 4 or (n == 3 and grouped)  # else a 2-D/3-D call: dim -3 is the batch, one head per row
    views = []
    for t in (q, k, v):
        lead = (1,) * (max(n, 3) - t.dim()) + tuple(t.shape[:-2])  # leading dims padded to the same count
        if not has_heads:
            lead = lead + (1,)  # a heads dim of 1 after the batch
        views.append(t.reshape(lead + tuple(t.shape[-2:])))  # (*batch, heads, T, f)
    qc, kc, vc = views
    bq, bk, bv = (tuple(t.shape[:-3]) for t in views)
    hq, hk, hv = (t.shape[-3] for t in views)  # 1 when dim -3 is the batch

    def refuse(name: str) -> ValueError:
        lead_q = shapes["q"][:-2]
        return AttnlabInputError(
            f"{name} must have the leading dims of q, expected {lead_q} or a number of key/value heads dividing "
            f"H={hq} (grouped-query attention)" + (" or sizes of 1 that broadcast" if broadcast else "")
            + f", got {shapes[name][:-2]} ({name}.shape={shapes[name]}, q.shape={shapes['q']})")

    if not broadcast:  # the block primitives: same leading dims, or grouped heads
        for name, b_, h_ in (("k", bk, hk), ("v", bv, hv)):
            if b_ != bq or not (h_ == hq or (grouped and has_heads)):
                raise refuse(name)
    # Heads: equal, grouped (H % H_kv == 0, K/V never repeated; H_kv = 1 is multi-query), or one query head
    # against several key/value heads (the query is expanded: it is the small side).
    if hk != hv:
        raise refuse("v" if hk == hq or hk == 1 else "k")
    if hk == hq or hk == 1 or hq % hk == 0:
        h = hq
    elif hq == 1:
        h = hk
        qc = qc.expand(bq + (hk,) + tuple(qc.shape[-2:]))  # (*batch, H_kv, T_q, d)
    else:
        raise refuse("k")
    batch = broadcast_shape(bq, bk, bv)
    if batch is None:
        raise refuse("k" if broadcast_shape(bq, bk) is None else "v")
    t_q, t_k = q.shape[-2], k.shape[-2]
    b = math.prod(batch)
    out_lead = (batch + (h,)) if has_heads else batch
    out_lead = out_lead[len(out_lead) - (n - 2):] if n > 2 else ()  # the caller's layout: eager's output dims
    padding, pad_per_batch = _prepare_padding(key_padding_mask, q.device, out_lead, t_k, b, h, hk, has_heads)
    docs = _prepare_documents(document_ids, q.device, out_lead, t_q, t_k, b, has_heads)
    doc_per_batch = document_ids is not None and document_ids.dim() == 2 and document_ids.shape[0] > 1
    q4 = qc.expand(batch + tuple(qc.shape[-3:])).reshape(b, h, t_q, q.shape[-1])  # (B, H, T_q, d)
    fold = None
    if may_fold and b > 1 and math.prod(bk) == 1 and math.prod(bv) == 1 and not pad_per_batch and not doc_per_batch:
        # K/V shared by every batch row: stack the B batch rows as more rows of each key/value head's tiles
        # (like the G query heads of a group), so K/V are read once and never copied per batch row.
        g = h // hk
        q4 = q4.reshape(b, hk, g, t_q, q.shape[-1]).transpose(0, 1)  # (H_kv, B, G, T_q, d)
        q4 = q4.reshape(1, hk * b * g, t_q, q.shape[-1])  # (1, H_kv * B * G, T_q, d)
        k4 = kc.reshape(1, hk, t_k, k.shape[-1])  # (1, H_kv, T_k, d)
        v4 = vc.reshape(1, hk, t_k, v.shape[-1])  # (1, H_kv, T_k, d_v)
        padding = None if padding is None else padding[:1]  # (1, H_kv, T_k)
        docs = None if docs is None else docs[:1]  # (1, T)
        fold = (b, hk, g)
    else:
        k4 = kc.expand(batch + tuple(kc.shape[-3:])).reshape(b, hk, t_k, k.shape[-1])  # (B, H_kv, T_k, d)
        v4 = vc.expand(batch + tuple(vc.shape[-3:])).reshape(b, hk, t_k, v.shape[-1])  # (B, H_kv, T_k, d_v)
    return _Inputs(q4, k4, v4, padding, docs, out_lead, causal or window is not None, window, float(scale), fold)


def _unfold(x: torch.Tensor, fold: tuple[int, int, int] | None) -> torch.Tensor:
    """The kernel's (1, H_kv * B * G, T_q, ...) back to (B, H, T_q, ...) (no-op when not folded)."""
    if fold is None:
        return x
    b, h_kv, g = fold
    rest = tuple(x.shape[2:])
    x = x.reshape((h_kv, b, g) + rest).transpose(0, 1)  # (B, H_kv, G, T_q, ...)
    return x.reshape((b, h_kv * g) + rest)  # (B, H, T_q, ...)


def _prepare_padding(mask: torch.Tensor | None, device: torch.device, lead: tuple, t_k: int, b: int, h: int,
                     h_kv: int, has_heads: bool) -> tuple[torch.Tensor | None, bool]:
    """Validate ``key_padding_mask`` and bring it to (B, H_kv, T_k) (an expanded view); also say whether it
    varies over the batch (then K/V of batch 1 cannot be folded into the query rows)."""
    if mask is None:
        return None, False
    if not isinstance(mask, torch.Tensor):
        raise AttnlabInputTypeError(f"key_padding_mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise AttnlabInputTypeError(f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}")
    if mask.device != device:
        raise AttnlabInputError(f"key_padding_mask must be on the device of q ({device}), got {mask.device}")
    full = lead + (t_k,)
    per_batch = (lead[0], t_k) if lead else (t_k,)
    m = mask
    if len(lead) > 1 and m.dim() == 2 and m.shape[0] in (lead[0], 1):
        m = m.reshape(m.shape[:1] + (1,) * (len(lead) - 1) + m.shape[1:])  # (B0|1, 1, ..., T_k|1)
    elif m.dim() == len(lead) + 2 and m.shape[-2] == 1:
        m = m.squeeze(-2)  # the attention-mask form (..., H|1, 1, T_k|1)
    if m.dim() != len(full) or any(s != 1 and s != f for s, f in zip(m.shape, full)):
        expected = f"{per_batch}" if per_batch == full else f"{per_batch} or {full}"
        raise AttnlabInputError(f"key_padding_mask must have shape {expected} (T_k={t_k}), got {tuple(mask.shape)} "
                         f"(sizes of 1 broadcast; the attention-mask form {lead + (1, t_k)} is accepted too)")
    batch_dims = len(lead) - 1 if has_heads else len(lead)
    varies = any(s != 1 for s in m.shape[:batch_dims])
    if h != h_kv:
        if has_heads and m.shape[-2] != 1:
            raise AttnlabInputError(
                f"key_padding_mask must be the same for every head with grouped-query attention "
                f"(H={h}, H_kv={h_kv}): give shape {per_batch}, got {tuple(mask.shape)}")
        m = m.expand(full[:-2] + (1, t_k)).reshape(b, 1, t_k).expand(b, h_kv, t_k)  # (B, H_kv, T_k)
        return m, varies
    return m.expand(full).reshape(b, h, t_k), varies  # (B, H, T_k)


def _check_document_ids(name: str, ids: object, device: torch.device) -> None:
    if not isinstance(ids, torch.Tensor):
        raise AttnlabInputTypeError(f"{name} must be an integer torch.Tensor or None, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise AttnlabInputTypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.device != device:
        raise AttnlabInputError(f"{name} must be on the device of q ({device}), got {ids.device}")


def _document_rows(document_ids: torch.Tensor, name: str, lead: tuple, t: int, b: int,
                   has_heads: bool) -> torch.Tensor:
    """Ids (B0, T), (1, T) or (T,) with B0 the caller's batch -> the kernel's (B, T) (an expanded view)."""
    batch = lead[0] if len(lead) >= (2 if has_heads else 1) else 1
    shape = tuple(document_ids.shape)
    if shape not in ((batch, t), (1, t), (t,)):
        raise AttnlabInputError(f"{name} must have shape ({batch}, {t}) (batch, tokens) or ({t},), got {shape}")
    docs = document_ids.reshape(-1, 1, t)  # (B0|1, 1, T)
    return docs.expand(batch, b // batch, t).reshape(b, t)  # (B, T)


def _prepare_documents(document_ids: torch.Tensor | None, device: torch.device, lead: tuple, t_q: int, t_k: int,
                       b: int, has_heads: bool) -> torch.Tensor | None:
    """Validate ``document_ids`` and bring them to (B, T)."""
    if document_ids is None:
        return None
    _check_document_ids("document_ids", document_ids, device)
    if t_q != t_k:
        raise AttnlabInputError(f"document_ids need as many queries as keys (self-attention), got T_q={t_q}, T_k={t_k}")
    return _document_rows(document_ids, "document_ids", lead, t_q, b, has_heads)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | torch.Tensor | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    return_lse: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    alibi_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact scaled dot-product attention, computed in tiles without the ``T_q x T_k`` matrix.

    Args:
        q: queries, (..., H, T_q, d); floating point.
        k: keys, (..., H_kv, T_k, d); same dtype as ``q``; leading dims equal to q's or broadcasting with
            them (sizes of 1, e.g. K/V of batch 1 shared by every query batch row: read once, never copied
            per batch row); ``H_kv == H`` or ``H % H_kv == 0`` (grouped-query attention: query head ``h``
            uses key/value head ``h // (H // H_kv)``; K/V are never repeated in memory), or a query of one
            head against ``H_kv`` heads (broadcast).
        v: values, (..., H_kv, T_k, d_v).
        causal: bottom-right aligned causal mask: query ``i`` sees key ``j`` iff
            ``j <= i + (T_k - T_q)``.
        window: None or an int >= 1: sliding window, implies causal: query ``i`` sees key ``j`` iff
            ``i + (T_k - T_q) - window < j <= i + (T_k - T_q)`` (itself and the window - 1 before it).
        document_ids: integer (B, T) (or (T,)) with T = T_q = T_k: packed sequences, a token sees only
            the tokens of its own document (causal inside with ``causal=True``).  B = ``q.shape[0]``.
        key_padding_mask: bool, True = padding (key ignored).  Shape (B, T_k) with ``B = q.shape[0]``
            (broadcast over heads), ``q.shape[:-2] + (T_k,)``, or any shape that broadcasts to it,
            also in the attention-mask form (B|1, H|1, 1, T_k|1).
        scale: multiplies the scores; default ``1 / sqrt(d)``.
        dropout_p: probability of dropping an attention probability, in [0, 1).
        seed: seed of the dropout mask (only used when ``dropout_p > 0``): an int or an int64 tensor of
            one element; None draws one from torch's global generator (as a tensor, so compiled code
            draws a fresh one per call).
        block_q, block_k: tile sizes (query positions, key columns).  Any sequence length works; the
            results do not depend on them beyond floating-point rounding (the dropout mask does).

        return_lse: also return the log-sum-exp of each query row (FlashAttention's convention:
            natural log, shape (..., H, T_q), float32 for float16/bfloat16/float32 inputs and float64 for
            float64; ``-inf`` for a row with no allowed key).  It carries no gradient.
        alibi_slopes: None or float (H,): ALiBi, ``-slope_h * |i' - j'|`` added to every score of head ``h``
            (FlashAttention-2's ``alibi_slopes``), computed per tile (no ``T_q x T_k`` bias); needs q of
            shape (B, H, T_q, d).
        alibi_positions: None, or ``(query positions, key positions)``, integer (T_q,) / (B, T_q) and
            (T_k,) / (B, T_k): the ``i'`` and ``j'`` of the bias (a cache's slots); default bottom-right by
            index, ``i' = i + T_k - T_q`` and ``j' = j``.

    Returns:
        (..., H, T_q, d_v), dtype of ``q`` (the autocast dtype under ``torch.autocast``), the broadcast of
        the leading dims of q, k and v; ``(out, lse)`` with ``return_lse``.  Rows with no allowed key are
        zeros.  Empty inputs (T_q = 0 or T_k = 0) give empty / zero outputs and zero gradients.  A NaN or
        inf in one position's q, k or v spreads to every row that may attend that position (every row
        without a mask), as in ``torch.nn.MultiheadAttention``, and to the rows of the same tile that a
        mask hides from it (the mask is added to the tile's scores, and -inf + NaN is NaN).
    """
    x = _prepare(q, k, v, causal=causal, window=window, document_ids=document_ids,
                 key_padding_mask=key_padding_mask, scale=scale, may_fold=alibi_slopes is None)
    alibi = _prepare_alibi(alibi_slopes, alibi_positions, x, q)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise AttnlabInputTypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__} ({dropout_p!r})")
    if not 0.0 <= dropout_p < 1.0:
        raise AttnlabInputError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if seed is not None and not isinstance(seed, torch.Tensor) and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise AttnlabInputTypeError(f"seed must be an int, an int64 tensor or None, got {type(seed).__name__} ({seed!r})")
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise AttnlabInputError(f"{name} must be a positive int, got {value!r}")
    seed_t = None
    if dropout_p > 0.0:
        if seed is None:
            seed_t = torch.randint(0, 2**62, (1,))  # drawn in the traced code, not inside the operator
        elif isinstance(seed, torch.Tensor):
            seed_t = seed.reshape(1).long()
        else:
            seed_t = torch.tensor([int(seed)], dtype=torch.int64)
    if not isinstance(return_lse, bool):
        raise AttnlabInputTypeError(f"return_lse must be a bool, got {type(return_lse).__name__} ({return_lse!r})")
    out, lse = _flash_op(x.q, x.k, x.v, x.padding, x.document_ids, seed_t, x.causal, x.window, x.scale,
                         float(dropout_p), int(block_q), int(block_k),
                         *(alibi or (None, None, None)))  # (B, H, T_q, d_v), (B, H, T_q)
    out = _unfold(out, x.fold).reshape(*x.lead, out.shape[-2], out.shape[-1])  # (..., H, T_q, d_v)
    if not return_lse:
        return out
    return out, _unfold(lse, x.fold).reshape(*x.lead, lse.shape[-1])  # (..., H, T_q)


# --------------------------------------------------------------------------------------------------
# Block primitives with the log-sum-exp, for callers that merge partial results (attnlab.distributed)
# --------------------------------------------------------------------------------------------------


def forward_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: int | None = None,
    document_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of attention without autograd: ``(out, lse)``.

    q: (..., T_q, d), k: (..., T_k, d), v: (..., T_k, d_v)  ->  out (..., T_q, d_v) in the compute dtype
    (float32 for fp16/bf16 input) and lse (..., T_q), the natural-log log-sum-exp of each row's scaled
    scores (-inf for a row with no allowed key, whose out is 0). Two blocks over disjoint keys merge
    exactly: ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``.
    Grouped-query k/v and ``window`` (implies causal) as in :func:`flash_attention`; the leading dims of
    q, k and v must be equal (no broadcasting here).  ``document_ids``: None or the pair
    ``(query ids (B, T_q), key ids (B, T_k))`` of a block of a packed sequence: a query sees only keys of
    its own document, and the tiles with no shared document are skipped.
    """
    x = _prepare(q, k, v, causal=causal, window=window, document_ids=None, key_padding_mask=key_padding_mask,
                 scale=scale, broadcast=False)
    docs = _block_documents(document_ids, x, q)
    out, lse = _forward_impl(x.q, x.k, x.v, x.padding, docs, None, x.causal, x.window, x.scale, 0.0,
                             DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K, count=False)  # (B, H, T_q, d_v), (B, H, T_q)
    return out.reshape(*x.lead, out.shape[-2], out.shape[-1]), lse.reshape(*x.lead, lse.shape[-1])


def backward_with_lse(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: int | None = None,
    document_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of one block given the *final* (merged) ``out`` and ``lse`` of its query rows:
    ``(dq, dk, dv)`` in the compute dtype, the block's contribution (sum them over blocks).

    grad_out, out: (..., T_q, d_v); q: (..., T_q, d); k: (..., T_k, d); v: (..., T_k, d_v); lse: (..., T_q).
    """
    x = _prepare(q, k, v, causal=causal, window=window, document_ids=None, key_padding_mask=key_padding_mask,
                 scale=scale, broadcast=False)
    docs = _block_documents(document_ids, x, q)
    b, h, t_q = x.q.shape[:3]
    d_v = x.v.shape[-1]
    dq, dk, dv = _backward_impl(
        grad_out.reshape(b, h, t_q, d_v), x.q, x.k, x.v, out.reshape(b, h, t_q, d_v), lse.reshape(b, h, t_q),
        x.padding, docs, None, x.causal, x.window, x.scale, 0.0, DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K, count=False,
    )
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def _block_documents(document_ids: tuple[torch.Tensor, torch.Tensor] | None, x: _Inputs,
                     q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The block primitives' ``(query ids (B0, T_q), key ids (B0, T_k))`` as the kernel's (B, T_q), (B, T_k)."""
    if document_ids is None:
        return None
    if not isinstance(document_ids, tuple) or len(document_ids) != 2:
        raise AttnlabInputTypeError("document_ids must be None or a pair (query ids (B, T_q), key ids (B, T_k)), got "
                        f"{type(document_ids).__name__}")
    b, t_q, t_k = x.q.shape[0], x.q.shape[2], x.k.shape[2]
    has_heads = q.dim() >= 4 or x.q.shape[1] != x.k.shape[1]
    pairs = (("query document ids", document_ids[0], t_q), ("key document ids", document_ids[1], t_k))
    for name, ids, _t in pairs:
        _check_document_ids(name, ids, q.device)
    dq, dk = (_document_rows(ids, name, x.lead, t, b, has_heads) for name, ids, t in pairs)  # (B, T_q), (B, T_k)
    return dq, dk
