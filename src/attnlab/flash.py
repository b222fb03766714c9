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

The backward pass (a custom :class:`torch.autograd.Function`) recomputes each tile's probabilities
from ``q``, ``k`` and the saved ``lse`` -- ``P = exp(q k^T * scale - lse)`` -- and then applies the
FlashAttention-2 gradient formulas::

    D  = rowsum(dO * O)              # (N, T_q)   one number per query row
    dP = dO V^T                      # per tile
    dS = P * (dP - D)                # softmax backward without the full row of P
    dQ += dS K * scale,   dK += dS^T Q * scale,   dV += P^T dO

Masking
    ``causal=True`` uses the *bottom-right* aligned causal mask (query ``i`` may see key ``j`` iff
    ``j <= i + (T_k - T_q)``), like ``torch.nn.attention.bias.causal_lower_right``.  Tiles wholly
    above the diagonal are skipped (never computed), only tiles crossing the diagonal get an
    elementwise mask; see :func:`tile_plan` and :func:`count_tiles`.  ``key_padding_mask`` (True =
    padding, as in :class:`torch.nn.MultiheadAttention`) removes keys.  A mask enters a tile as an
    additive 0/-inf bias of the score matmul (``baddbmm``), so it costs no extra pass.  A query row
    with no allowed key at all gets an output of zeros and zero gradients (never NaN).

Speed
    All leading dims are processed together in every tile (one batched matmul over N).  Scores are
    computed in base 2 (``log2(e)`` is folded into the scale of ``q``) so every exponential is an
    ``exp2``, which is cheaper than ``exp`` on CPUs; the saved statistic is ``lse2 = lse * log2(e)``.
    Temporaries are updated in place (``sub_``, ``exp2_``, ``baddbmm_``).  Default tiles are
    256 x 256, the best of a sweep on a 2-core CPU (see ``benchmarks/RESULTS.md``).  With
    several torch threads and dropout off, the N rows are split between worker threads that each
    run single-threaded ops (see :func:`_in_parallel`); this changes only which thread computes which rows.

Dropout
    Implemented.  ``dropout_p > 0`` drops attention probabilities (after the softmax) with
    probability ``dropout_p`` and scales the kept ones by ``1 / (1 - dropout_p)``.  The mask of every
    tile is regenerated from a per-tile seed derived from ``seed`` and the tile's block indices, so
    the forward and backward passes use the same mask without storing it, and the same ``seed``
    (with the same shapes and block sizes) gives bit-identical results.  ``seed=None`` draws a seed
    from torch's global generator (so ``torch.manual_seed`` makes it reproducible too).

Precision
    float32 and float64 inputs are computed in their own dtype; float16 and bfloat16 inputs are
    computed (matmuls and softmax statistics) in float32 and the result is cast back.

Shape legend
    N    -- all leading (batch, head, ...) dims flattened into one batch dim
    T_q  -- number of queries,  T_k -- number of keys/values
    d    -- query/key feature dim,  d_v -- value feature dim
    bq   -- rows in the current query block (<= block_q)
    bk   -- columns in the current key block (<= block_k)
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from attnlab.functional import compute_dtype

__all__ = ["FlashAttentionFunction", "Tile", "count_tiles", "flash_attention", "tile_plan"]

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOG2E = math.log2(math.e)
_ACTIVE_COUNTERS: list[dict[str, int]] = []  # filled only inside ``count_tiles()``


# --------------------------------------------------------------------------------------------------
# Tile planning: which (query block, key block) pairs have to be computed at all
# --------------------------------------------------------------------------------------------------


class Tile(NamedTuple):
    """One ``[q_start, q_end) x [k_start, k_end)`` tile of the score matrix that gets computed."""

    q_start: int
    q_end: int
    k_start: int
    k_end: int
    needs_causal_mask: bool  # True only for tiles crossing the causal diagonal


def _query_blocks(
    t_q: int, t_k: int, block_q: int, block_k: int, causal: bool
) -> Iterator[tuple[int, int, list[tuple[int, int, bool]]]]:
    """Yield ``(q_start, q_end, [(k_start, k_end, needs_causal_mask), ...])`` per query block.

    With ``causal`` the last key a query row ``i`` may see is ``i + (T_k - T_q)``; key blocks that
    start after the last key visible to the block's *last* row are skipped entirely, and only blocks
    that end after the last key visible to the block's *first* row need an elementwise mask.
    """
    offset = t_k - t_q  # bottom-right alignment of the causal diagonal
    for q_start in range(0, t_q, block_q):
        q_end = min(q_start + block_q, t_q)
        k_stop = min(t_k, q_end + offset) if causal else t_k  # keys >= k_stop are unseen by all rows
        key_blocks = []
        for k_start in range(0, max(k_stop, 0), block_k):
            k_end = min(k_start + block_k, t_k)
            needs_mask = causal and (k_end - 1 > q_start + offset)
            key_blocks.append((k_start, k_end, needs_mask))
        yield q_start, q_end, key_blocks


def tile_plan(
    t_q: int,
    t_k: int,
    *,
    causal: bool = False,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> list[Tile]:
    """List the tiles :func:`flash_attention` computes (forward and backward), in loop order.

    Non-causal attention computes all ``ceil(T_q/block_q) * ceil(T_k/block_k)`` tiles; causal
    attention skips the tiles wholly above the diagonal, i.e. about half of them.
    """
    return [
        Tile(q_start, q_end, k_start, k_end, needs_mask)
        for q_start, q_end, key_blocks in _query_blocks(t_q, t_k, block_q, block_k, causal)
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
# Masks
# --------------------------------------------------------------------------------------------------


def _tile_bias(
    q_start: int,
    q_end: int,
    k_start: int,
    k_end: int,
    needs_causal_mask: bool,
    offset: int,
    padding: torch.Tensor | None,
    padded_block: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive mask of one tile, 0 where allowed and -inf where not; None if nothing is masked.

    The bias enters the score matmul itself (``baddbmm(bias, q, k^T)`` writes ``bias + q k^T``),
    so masking costs no extra pass over the tile.  Returns (bq, bk), (N or 1, 1, bk) or (N, bq, bk).
    """
    bias = None
    if needs_causal_mask:
        rows = torch.arange(q_start, q_end, device=device).unsqueeze(1)  # (bq, 1)
        cols = torch.arange(k_start, k_end, device=device).unsqueeze(0)  # (1, bk)
        future = cols > rows + offset  # (bq, bk)   key j comes after the last key query i may see
        bias = torch.zeros(future.shape, dtype=dtype, device=device).masked_fill_(future, -math.inf)
    if padded_block:
        pad = padding[:, :, k_start:k_end]  # (N or 1, 1, bk)
        pad_bias = torch.zeros(pad.shape, dtype=dtype, device=device).masked_fill_(pad, -math.inf)
        bias = pad_bias if bias is None else bias + pad_bias  # (N, bq, bk) when both
    return bias


def _scores(q_blk: torch.Tensor, k_t_blk: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Score tile ``bias + q_blk @ k_t_blk``: q_blk (N, bq, d), k_t_blk (N, d, bk) -> (N, bq, bk)."""
    if bias is None:
        return torch.bmm(q_blk, k_t_blk)  # (N, bq, bk)
    return torch.baddbmm(bias, q_blk, k_t_blk)  # (N, bq, bk)


def _mix_seed(seed: int, q_block: int, k_block: int) -> int:
    """A per-tile seed: a splitmix64-style hash of (seed, query block index, key block index)."""
    mask64 = (1 << 64) - 1
    z = (seed + 0x9E3779B97F4A7C15 * (1 + q_block) + 0xD1B54A32D192ED03 * (1 + k_block)) & mask64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _dropout_keep_scale(
    seed: int, q_block: int, k_block: int, shape: tuple[int, int, int], p: float, dtype, device
) -> torch.Tensor:
    """``keep / (1 - p)`` for one tile, regenerated identically in forward and backward."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix_seed(seed, q_block, k_block))
    keep = torch.rand(shape, generator=gen, device=device) >= p  # (N, bq, bk)
    return keep.to(dtype).mul_(1.0 / (1.0 - p))  # (N, bq, bk)


# --------------------------------------------------------------------------------------------------
# Forward and backward kernels on flattened (N, T, d) tensors
# --------------------------------------------------------------------------------------------------


def _flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    padding: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
    block_q: int,
    block_k: int,
    count: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled online-softmax forward.

    q: (N, T_q, d), k: (N, T_k, d), v: (N, T_k, d_v), all in the compute dtype;
    padding: None or bool (N or 1, 1, T_k), True = ignore that key.
    Returns ``out`` (N, T_q, d_v) and ``lse2`` (N, T_q), the row log-sum-exp in base 2 (see below);
    ``lse2`` is -inf for rows with no allowed key.

    Scores are kept in base-2 units, ``s2 = s * log2(e)``, so that every exponential is an ``exp2``
    (cheaper than ``exp`` on CPUs): ``exp(s - m) == exp2(s2 - m2)``.  The factor is folded into the
    scale of q, so it costs nothing per tile.
    """
    n, t_q, _ = q.shape
    t_k, d_v = v.shape[1], v.shape[2]
    offset = t_k - t_q
    q2 = q * (scale * _LOG2E)  # (N, T_q, d)   scale folded into q once, not into every tile
    k_t = k.transpose(1, 2)  # (N, d, T_k)   a view; bmm reads it transposed
    padded_blocks = _padded_key_blocks(padding, t_k, block_k)
    lowest = torch.finfo(q.dtype).min

    out = q.new_zeros(n, t_q, d_v)  # (N, T_q, d_v)
    lse2 = q.new_full((n, t_q), -math.inf)  # (N, T_q)
    for q_start, q_end, key_blocks in _query_blocks(t_q, t_k, block_q, block_k, causal):
        if not key_blocks:
            continue  # no key visible to any row of this block: output stays 0
        q_blk = q2[:, q_start:q_end]  # (N, bq, d)
        bq = q_end - q_start
        m = q.new_full((n, bq), -math.inf)  # (N, bq)   running row max (base-2 units)
        l = q.new_zeros(n, bq)  # (N, bq)   running row sum of exp2(s2 - m)
        acc = q.new_zeros(n, bq, d_v)  # (N, bq, d_v)   running unnormalised output
        for k_start, k_end, needs_mask in key_blocks:
            if count:
                _count("forward", 1)
            bias = _tile_bias(q_start, q_end, k_start, k_end, needs_mask, offset, padding,
                              padded_blocks[k_start // block_k], q.dtype, q.device)
            s = _scores(q_blk, k_t[:, :, k_start:k_end], bias)  # (N, bq, bk)
            # New running max.  A row that has seen only masked keys would have m = -inf, and
            # -inf - (-inf) = NaN; clamping to the lowest finite number keeps exp2(-inf - m) = 0.
            m_new = torch.maximum(m, s.amax(dim=-1)).clamp_(min=lowest)  # (N, bq)
            alpha = (m - m_new).exp2_()  # (N, bq)   rescales the old statistics to the new max
            p = s.sub_(m_new.unsqueeze(-1)).exp2_()  # (N, bq, bk)   unnormalised probabilities
            l.mul_(alpha).add_(p.sum(dim=-1))
            if dropout_p > 0.0:
                p.mul_(_dropout_keep_scale(seed, q_start // block_q, k_start // block_k, p.shape,
                                           dropout_p, p.dtype, p.device))
            acc.mul_(alpha.unsqueeze(-1)).baddbmm_(p, v[:, k_start:k_end])  # (N, bq, d_v)
            m = m_new
        # Rows with no allowed key have l = 0 and acc = 0: divide by 1 so they stay 0 (not NaN);
        # their lse2 = m + log2(0) = -inf tells the backward pass that they have no probabilities.
        out[:, q_start:q_end] = acc.div_(l.masked_fill(l == 0, 1.0).unsqueeze(-1))
        lse2[:, q_start:q_end] = m + l.log2()
    return out, lse2


def _flash_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse2: torch.Tensor,
    padding: torch.Tensor | None,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: int,
    block_q: int,
    block_k: int,
    count: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward; recomputes each tile's probabilities from q, k and ``lse2``.

    grad_out, out: (N, T_q, d_v); q: (N, T_q, d); k: (N, T_k, d); v: (N, T_k, d_v); lse2: (N, T_q).
    Returns dq (N, T_q, d), dk (N, T_k, d), dv (N, T_k, d_v).
    """
    t_q, t_k = q.shape[1], k.shape[1]
    offset = t_k - t_q
    q2 = q * (scale * _LOG2E)  # (N, T_q, d)   base-2 scores, as in the forward pass
    k_t = k.transpose(1, 2)  # (N, d, T_k)
    v_t = v.transpose(1, 2)  # (N, d_v, T_k)
    padded_blocks = _padded_key_blocks(padding, t_k, block_k)
    # Rows without any allowed key have lse2 = -inf; using +inf there makes P = exp2(s2 - inf) = 0
    # for every entry, masked (-inf) or not, so those rows contribute nothing to any gradient.
    lse2_use = lse2.masked_fill(lse2 == -math.inf, math.inf)  # (N, T_q)
    delta = (grad_out * out).sum(dim=-1)  # (N, T_q)   D = rowsum(dO * O)

    dq = torch.zeros_like(q)  # (N, T_q, d)
    dk = torch.zeros_like(k)  # (N, T_k, d)
    dv = torch.zeros_like(v)  # (N, T_k, d_v)
    for q_start, q_end, key_blocks in _query_blocks(t_q, t_k, block_q, block_k, causal):
        q_blk = q2[:, q_start:q_end]  # (N, bq, d)
        q_scaled = q[:, q_start:q_end] * scale  # (N, bq, d)
        do_blk = grad_out[:, q_start:q_end]  # (N, bq, d_v)
        lse_blk = lse2_use[:, q_start:q_end].unsqueeze(-1)  # (N, bq, 1)
        delta_blk = delta[:, q_start:q_end].unsqueeze(-1)  # (N, bq, 1)
        dq_blk = dq[:, q_start:q_end]  # (N, bq, d)   a view: accumulate in place
        for k_start, k_end, needs_mask in key_blocks:
            if count:
                _count("backward", 1)
            bias = _tile_bias(q_start, q_end, k_start, k_end, needs_mask, offset, padding,
                              padded_blocks[k_start // block_k], q.dtype, q.device)
            s = _scores(q_blk, k_t[:, :, k_start:k_end], bias)  # (N, bq, bk)
            p = s.sub_(lse_blk).exp2_()  # (N, bq, bk)   the forward's normalised probabilities
            dp = torch.bmm(do_blk, v_t[:, :, k_start:k_end])  # (N, bq, bk)   dP = dO V^T
            if dropout_p > 0.0:
                keep_scale = _dropout_keep_scale(seed, q_start // block_q, k_start // block_k,
                                                 p.shape, dropout_p, p.dtype, p.device)  # (N, bq, bk)
                dv[:, k_start:k_end].baddbmm_((p * keep_scale).transpose(1, 2), do_blk)  # (N, bk, d_v)
                dp.mul_(keep_scale)  # gradient w.r.t. the probabilities before dropout
            else:
                dv[:, k_start:k_end].baddbmm_(p.transpose(1, 2), do_blk)  # (N, bk, d_v)
            ds = dp.sub_(delta_blk).mul_(p)  # (N, bq, bk)   dS = P * (dP - D)
            dq_blk.baddbmm_(ds, k[:, k_start:k_end])  # (N, bq, d)   scaled once at the end
            dk[:, k_start:k_end].baddbmm_(ds.transpose(1, 2), q_scaled)  # (N, bk, d)
    dq.mul_(scale)
    return dq, dk, dv


def _padded_key_blocks(padding: torch.Tensor | None, t_k: int, block_k: int) -> list[bool]:
    """For each key block: does it contain any padded key (so its tiles need the padding mask)?"""
    n_blocks = -(-t_k // block_k)
    if padding is None:
        return [False] * n_blocks
    return [bool(padding[..., i * block_k:(i + 1) * block_k].any()) for i in range(n_blocks)]


# --------------------------------------------------------------------------------------------------
# Autograd wrapper and public entry point
# --------------------------------------------------------------------------------------------------


_POOL: ThreadPoolExecutor | None = None


def _rows(padding: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    """The rows ``sl`` of a (N, 1, T_k) padding mask."""
    return None if padding is None else padding[sl]


def _in_parallel(n: int, dropout_p: float, fn: Callable[[slice, bool], tuple]) -> list[tuple]:
    """Run ``fn(rows, count_tiles)`` on contiguous slices of the N (batch x head) rows, in parallel.

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
        # Grad mode is per thread and on by default: without no_grad the worker would record an
        # autograd graph (saving every tile!) for ops on saved outputs that require grad.
        with torch.no_grad():
            return fn(slices[i], i == 0)  # tiles are counted once, by the first worker

    threads = torch.get_num_threads()
    try:
        return list(_POOL.map(task, range(workers)))
    finally:
        torch.set_num_threads(threads)  # the BLAS thread setting is process-wide: restore it


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd function: saves ``q, k, v, out, lse`` (no attention matrix) and recomputes tiles."""

    @staticmethod
    def forward(ctx, q, k, v, padding, causal, scale, dropout_p, seed, block_q, block_k):
        """q: (..., T_q, d), k: (..., T_k, d), v: (..., T_k, d_v) -> (..., T_q, d_v)."""
        lead = q.shape[:-2]
        n = math.prod(lead)
        t_q, d = q.shape[-2], q.shape[-1]
        t_k, d_v = v.shape[-2], v.shape[-1]
        cdtype = compute_dtype(q.dtype)
        qc = q.reshape(n, t_q, d).to(cdtype).contiguous()  # (N, T_q, d)
        kc = k.reshape(n, t_k, d).to(cdtype).contiguous()  # (N, T_k, d)
        vc = v.reshape(n, t_k, d_v).to(cdtype).contiguous()  # (N, T_k, d_v)
        args = (causal, scale, dropout_p, seed, block_q, block_k)
        parts = _in_parallel(
            n, dropout_p,
            lambda sl, count: _flash_forward(qc[sl], kc[sl], vc[sl], _rows(padding, sl), *args, count=count),
        )
        out = torch.cat([o for o, _ in parts]) if len(parts) > 1 else parts[0][0]  # (N, T_q, d_v)
        lse2 = torch.cat([lse for _, lse in parts]) if len(parts) > 1 else parts[0][1]  # (N, T_q)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.padding = padding
        ctx.args = args
        return out.reshape(*lead, t_q, d_v).to(q.dtype)  # (..., T_q, d_v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse2 = ctx.saved_tensors
        lead = q.shape[:-2]
        n = math.prod(lead)
        t_q, d = q.shape[-2], q.shape[-1]
        t_k, d_v = v.shape[-2], v.shape[-1]
        cdtype = out.dtype
        go = grad_out.reshape(n, t_q, d_v).to(cdtype).contiguous()  # (N, T_q, d_v)
        qc = q.reshape(n, t_q, d).to(cdtype).contiguous()  # (N, T_q, d)
        kc = k.reshape(n, t_k, d).to(cdtype).contiguous()  # (N, T_k, d)
        vc = v.reshape(n, t_k, d_v).to(cdtype).contiguous()  # (N, T_k, d_v)
        parts = _in_parallel(
            n, ctx.args[2],
            lambda sl, count: _flash_backward(go[sl], qc[sl], kc[sl], vc[sl], out[sl], lse2[sl],
                                              _rows(ctx.padding, sl), *ctx.args, count=count),
        )
        dq, dk, dv = (torch.cat(g) if len(parts) > 1 else g[0] for g in zip(*parts))
        return (
            dq.reshape(q.shape).to(q.dtype),  # (..., T_q, d)
            dk.reshape(k.shape).to(k.dtype),  # (..., T_k, d)
            dv.reshape(v.shape).to(v.dtype),  # (..., T_k, d_v)
            None, None, None, None, None, None, None,
        )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> torch.Tensor:
    """Exact scaled dot-product attention, computed in tiles without the ``T_q x T_k`` matrix.

    Args:
        q: queries, (..., T_q, d); floating point.
        k: keys, (..., T_k, d); same leading dims and dtype as ``q``.
        v: values, (..., T_k, d_v); same leading dims and dtype as ``q``.
        causal: bottom-right aligned causal mask: query ``i`` sees key ``j`` iff
            ``j <= i + (T_k - T_q)``.
        scale: multiplies the scores; default ``1 / sqrt(d)``.
        key_padding_mask: bool, True = padding (key ignored).  Shape (B, T_k) with
            ``B = q.shape[0]`` (broadcast over the other leading dims, e.g. heads), or
            ``q.shape[:-2] + (T_k,)``.
        dropout_p: probability of dropping an attention probability, in [0, 1).
        seed: seed of the dropout mask (only used when ``dropout_p > 0``); None draws one from
            torch's global generator.
        block_q, block_k: tile sizes (query rows, key columns).  Any sequence length works; the
            results do not depend on them beyond floating-point rounding (the dropout mask does).

    Returns:
        (..., T_q, d_v), dtype of ``q``.  Rows with no allowed key are zeros.
    """
    _check_tensor("q", q)
    _check_tensor("k", k)
    _check_tensor("v", v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the same dtype as q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the same device as q ({q.device}), got {t.device}")
        if t.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"{name} must have the same leading dims as q, expected {tuple(q.shape[:-2])}, "
                f"got {tuple(t.shape[:-2])} ({name}.shape={tuple(t.shape)})"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the feature dim of q, expected k.shape[-1]={q.shape[-1]}, "
                         f"got {k.shape[-1]}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many rows as k, expected v.shape[-2]={k.shape[-2]}, "
                         f"got {v.shape[-2]}")
    if q.shape[-1] == 0:
        raise ValueError("q must have a feature dim d >= 1, got d=0")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} ({causal!r})")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number or None, got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__} ({dropout_p!r})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} ({seed!r})")
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    padding = _prepare_padding(key_padding_mask, q, k.shape[-2])
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return FlashAttentionFunction.apply(
        q, k, v, padding, causal, float(scale), float(dropout_p), int(seed or 0), int(block_q), int(block_k)
    )


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., T, d), got shape {tuple(t.shape)}")


def _prepare_padding(mask: torch.Tensor | None, q: torch.Tensor, t_k: int) -> torch.Tensor | None:
    """Validate ``key_padding_mask`` and bring it to (N, 1, T_k) (or (1, 1, T_k)); None if no padding."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on the device of q ({q.device}), got {mask.device}")
    lead = tuple(q.shape[:-2])
    full = lead + (t_k,)
    per_batch = (lead[0], t_k) if lead else (t_k,)
    shape = tuple(mask.shape)
    if shape == full:
        expanded = mask  # (..., T_k)
    elif shape == per_batch:
        expanded = mask.reshape(per_batch[:1] + (1,) * (len(lead) - 1) + (t_k,)).expand(full)  # (..., T_k)
    else:
        expected = f"{per_batch}" if per_batch == full else f"{per_batch} or {full}"
        raise ValueError(f"key_padding_mask must have shape {expected} (T_k={t_k}), got {shape}")
    if not bool(expanded.any()):
        return None
    return expanded.reshape(math.prod(lead), 1, t_k).contiguous()  # (N, 1, T_k)
