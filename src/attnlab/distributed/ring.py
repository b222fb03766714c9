"""Ring attention: exact attention over a sequence split across processes, keys and values on the move.

Every rank keeps its queries; the key/value blocks travel around the ring (rank ``r`` sends to ``r + 1``
and receives from ``r - 1``), so after ``P`` steps every query has met every key. It is the flash
kernel's online softmax (:mod:`attnlab.flash`) with blocks that arrive over ``torch.distributed``
instead of from a loop: each arriving block gives a partial ``(out, lse)`` from
:func:`attnlab.flash.forward_with_lse`, folded into the running result by
:func:`attnlab.distributed.merge.merge_into`; the next block is already in flight while the current one
is computed (:class:`~attnlab.distributed.comm.RingShift`)::

    out, lse = 0, -inf
    for step in range(P):                      # the block of rank src = rank - step is here
        if step < P - 1: start sending it on, receiving the next one
        for each (query rows, key rows) pair the causal mask allows:
            merge_into(out[rows], lse[rows], *forward_with_lse(q[rows], k_blk[keys], v_blk[keys]))
        wait for the next block

The backward pass (a custom autograd function) sends the key/value blocks around the ring again,
each with its gradient accumulators ``dK, dV``: every rank adds its queries' contribution
(:func:`attnlab.flash.backward_with_lse` with the *final* ``out`` and ``lse``) and passes the
accumulator on; after ``P`` steps it is back with the rank that owns the block.

Layout: which global tokens this rank's shard holds is stated, never guessed (a guess is how contiguous
shards used to give silently wrong causal results). ``layout="zigzag"``: rank ``r`` holds chunks ``r`` and
``2P - 1 - r`` of ``2P`` (as ``ContextParallel(group, "ring").shard`` makes), so under a causal mask every rank
does the same work; ``layout="contiguous"``: rank ``r`` holds chunk ``r`` of ``P`` (the plain ring; exact, but
under a causal mask rank ``P - 1`` does ``P`` blocks of work while rank 0 does one). ``layout=None`` is
allowed only where the answer does not depend on positions (``causal=False`` and no ``seq_len`` padding:
then any split works, odd local lengths included); otherwise it is an error that names both choices.
:class:`~attnlab.distributed.ContextParallel` carries its layout from ``shard`` to ``attention`` and
``gather``, so its shards always match. Tiles the causal mask hides are never computed; the padding that
makes the length a multiple of ``2P`` (``seq_len``) is cut off the key (and query) ranges, so it costs
nothing and changes nothing.

Packed sequences: with ``document_ids`` (this rank's tokens' ids, (B, T_l)) a query sees only keys of its
own document. The ids of every rank are gathered once (a few bytes per token); a (query chunk, key piece)
block in which no query shares a document with any key is skipped, as the flash kernel skips tiles
(:func:`count_blocks` counts them), and inside a block the kernel skips the tiles of other documents.

Non-finite inputs: a NaN or inf in one position's q, k or v spreads to every output row that may attend
that position, on every rank (as in single-process attention and ``torch.nn.MultiheadAttention``).

Blocks: each rank's keys are split into pieces of at most ``block_size`` tokens that go around the
ring one after another (a ring pass per piece), and queries are processed in row chunks of the same
size: so the memory a rank needs beyond its own shards is a few pieces, not a second copy of its shard.

Shape letters: B batch, H query heads, H_kv key/value heads (H % H_kv == 0, grouped-query attention),
T_l local tokens, n tokens of one key piece, d head size (queries and keys), d_v value head size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from attnlab.distributed import comm
from attnlab.distributed.layout import LAYOUTS, Layout, Run
from attnlab.distributed.merge import merge_into
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.flash import backward_with_lse, forward_with_lse
from attnlab.functional import compute_dtype

__all__ = ["DEFAULT_BLOCK_SIZE", "count_blocks", "ring_attention"]

DEFAULT_BLOCK_SIZE = 512  # tokens per travelling key/value piece and per query row chunk (memory vs speed)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACTIVE_COUNTERS: list[dict[str, int]] = []


@contextlib.contextmanager
def count_blocks() -> Iterator[dict[str, int]]:
    """Count this rank's forward (query chunk, key piece) blocks inside the ``with`` block: ``computed``
    (the kernel ran) and ``skipped`` (the causal mask let some query see some key, but no query shares a
    document with any key: never computed, in the backward pass neither). Blocks the causal mask or the
    padding hides are neither: they are never even considered."""
    counts = {"computed": 0, "skipped": 0}
    _ACTIVE_COUNTERS.append(counts)
    try:
        yield counts
    finally:
        _ACTIVE_COUNTERS.remove(counts)


def _count(kind: str) -> None:
    for counts in _ACTIVE_COUNTERS:
        counts[kind] += 1


def _split(runs: list[Run], block: int) -> list[Run]:
    """Cut runs into pieces of at most ``block`` tokens (each piece stays inside one run)."""
    return [Run(r.local + a, r.start + a, min(block, r.length - a)) for r in runs for a in range(0, r.length, block)]


def _sub_blocks(
    q_chunk: Run, k_piece: Run, causal: bool, seq_len: int
) -> Iterator[tuple[int, int, int, int, bool]]:
    """The (query rows, key rows) sub-blocks of one query chunk and one key piece that have to be computed:
    yields ``(q_lo, q_hi, k_lo, k_hi, causal)`` in local row indices (keys relative to the piece).

    Global positions beyond ``seq_len`` (the layout's padding) are cut off; with ``causal`` a query at
    position p sees keys at positions <= p. Query rows that see the whole piece form one unmasked
    sub-block; rows that see part of it form one square-ish sub-block with the bottom-right aligned
    causal mask of :func:`attnlab.flash.forward_with_lse`; rows that see none of it are skipped.
    """
    qa, qn = q_chunk.start, min(q_chunk.length, seq_len - q_chunk.start)
    ka, kn = k_piece.start, min(k_piece.length, seq_len - k_piece.start)
    if qn <= 0 or kn <= 0:
        return
    ql = q_chunk.local
    if not causal:
        yield ql, ql + qn, 0, kn, False
        return
    s, e = max(qa, ka), min(qa + qn, ka + kn)  # rows whose diagonal crosses the piece
    if s < e:
        yield ql + s - qa, ql + e - qa, 0, e - ka, True  # row p sees keys ka .. p (bottom-right aligned)
    f = max(qa, ka + kn)  # rows at or after this position see the whole piece
    if f < qa + qn:
        yield ql + f - qa, ql + qn, 0, kn, False


@dataclass
class _Ring:
    """Everything one call needs besides the tensors."""

    shift: comm.RingShift
    layout: Layout
    rank: int
    world: int
    causal: bool
    scale: float
    seq_len: int
    block: int
    groups: int  # query heads per key/value head
    masks: list[torch.Tensor | None]  # per source rank: (B, T_l) bool, True = padding
    docs: list[torch.Tensor | None]  # per source rank: (B, T_l) int64 document ids

    def q_chunks(self, t_local: int) -> list[Run]:
        return _split(self.layout.runs(self.rank, t_local), self.block)

    def pieces(self, src: int, t_local: int) -> list[Run]:
        return _split(self.layout.runs(src, t_local), self.block)

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, n, d) -> (B, H, n, d): query head h uses key/value head h // groups."""
        return t if self.groups == 1 else t.repeat_interleave(self.groups, dim=1)  # (B, H, n, d)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, n, d) -> (B, H_kv, n, d): sum the gradients of the query heads sharing a key/value head."""
        if self.groups == 1:
            return t
        b, h, n, d = t.shape
        return t.view(b, h // self.groups, self.groups, n, d).sum(2)  # (B, H_kv, n, d)

    def key_mask(self, src: int, piece: Run, k_lo: int, k_hi: int) -> torch.Tensor | None:
        m = self.masks[src]
        return None if m is None else m[:, piece.local + k_lo:piece.local + k_hi]  # (B, k_hi - k_lo)

    def block_docs(
        self, src: int, piece: Run, q_lo: int, q_hi: int, k_lo: int, k_hi: int
    ) -> tuple[bool, tuple[torch.Tensor, torch.Tensor] | None]:
        """``(True, None)`` without documents; else ``(False, None)`` when no query of rows [q_lo, q_hi) shares
        a document with any key of the piece's rows [k_lo, k_hi) (skip the block), or ``(True, (ids_q, ids_k))``."""
        mine, theirs = self.docs[self.rank], self.docs[src]
        if mine is None or theirs is None:
            return True, None
        ids_q = mine[:, q_lo:q_hi]  # (B, rows)
        ids_k = theirs[:, piece.local + k_lo:piece.local + k_hi]  # (B, keys)
        if not bool((ids_q.unsqueeze(2) == ids_k.unsqueeze(1)).any()):  # (B, rows, keys) -> one bool
            return False, None
        return True, (ids_q, ids_k)


def _forward_piece(r: _Ring, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, src: int, piece: Run,
                   out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold one key/value piece of rank ``src`` into the running ``(out, lse)`` of every query row."""
    k_full, v_full = r.expand(kb), r.expand(vb)  # (B, H, n, d), (B, H, n, d_v)
    for chunk in r.q_chunks(q.shape[-2]):
        for q_lo, q_hi, k_lo, k_hi, causal in _sub_blocks(chunk, piece, r.causal, r.seq_len):
            needed, docs = r.block_docs(src, piece, q_lo, q_hi, k_lo, k_hi)
            _count("computed" if needed else "skipped")
            if not needed:
                continue
            o, l = forward_with_lse(
                q[:, :, q_lo:q_hi], k_full[:, :, k_lo:k_hi], v_full[:, :, k_lo:k_hi], causal=causal,
                scale=r.scale, key_padding_mask=r.key_mask(src, piece, k_lo, k_hi), document_ids=docs,
            )  # (B, H, rows, d_v), (B, H, rows)
            merge_into(out[:, :, q_lo:q_hi], lse[:, :, q_lo:q_hi], o, l)


def _backward_piece(r: _Ring, do: torch.Tensor, q: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, src: int, piece: Run, dq: torch.Tensor,
                    dkb: torch.Tensor, dvb: torch.Tensor) -> None:
    """Add this rank's queries' contribution to ``dq`` and to the piece's ``dkb, dvb`` accumulators."""
    k_full, v_full = r.expand(kb), r.expand(vb)  # (B, H, n, d), (B, H, n, d_v)
    for chunk in r.q_chunks(q.shape[-2]):
        for q_lo, q_hi, k_lo, k_hi, causal in _sub_blocks(chunk, piece, r.causal, r.seq_len):
            needed, docs = r.block_docs(src, piece, q_lo, q_hi, k_lo, k_hi)
            if not needed:
                continue
            rows = slice(q_lo, q_hi)
            dq_, dk_, dv_ = backward_with_lse(
                do[:, :, rows], q[:, :, rows], k_full[:, :, k_lo:k_hi], v_full[:, :, k_lo:k_hi],
                out[:, :, rows], lse[:, :, rows], causal=causal, scale=r.scale,
                key_padding_mask=r.key_mask(src, piece, k_lo, k_hi), document_ids=docs,
            )  # (B, H, rows, d), (B, H, keys, d), (B, H, keys, d_v)
            dq[:, :, rows] += dq_
            dkb[:, :, k_lo:k_hi] += r.reduce(dk_)
            dvb[:, :, k_lo:k_hi] += r.reduce(dv_)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: _Ring
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, t_l, _ = q.shape
        cdtype = compute_dtype(q.dtype)
        out = q.new_zeros(b, h, t_l, v.shape[-1], dtype=cdtype)  # (B, H, T_l, d_v)
        lse = q.new_full((b, h, t_l), -math.inf, dtype=cdtype)  # (B, H, T_l)
        for j, own in enumerate(r.pieces(r.rank, t_l)):
            kb, vb = k[:, :, own.local:own.local + own.length], v[:, :, own.local:own.local + own.length]
            for step in range(r.world):
                src = (r.rank - step) % r.world
                pending = r.shift.start([kb, vb], tag=0) if step < r.world - 1 else None
                _forward_piece(r, q, kb, vb, src, r.pieces(src, t_l)[j], out, lse)
                if pending is not None:
                    kb, vb = r.shift.wait(pending)  # (B, H_kv, n, d), (B, H_kv, n, d_v)
        ctx.ring = r
        ctx.save_for_backward(q, k, v, out, lse)
        lse_out = lse.clone()
        ctx.mark_non_differentiable(lse_out)
        return out.to(q.dtype), lse_out

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        r: _Ring = ctx.ring
        t_l = q.shape[-2]
        cdtype = out.dtype
        do = grad_out.to(cdtype)  # (B, H, T_l, d_v)
        dq = torch.zeros_like(q, dtype=cdtype)  # (B, H, T_l, d)
        dk = torch.zeros_like(k, dtype=cdtype)  # (B, H_kv, T_l, d)
        dv = torch.zeros_like(v, dtype=cdtype)  # (B, H_kv, T_l, d_v)
        for j, own in enumerate(r.pieces(r.rank, t_l)):
            rows = slice(own.local, own.local + own.length)
            kb, vb = k[:, :, rows], v[:, :, rows]
            grads = None  # the accumulator of the piece now here, travelling from rank - 1
            for step in range(r.world):
                src = (r.rank - step) % r.world
                pending = r.shift.start([kb, vb], tag=0) if step < r.world - 1 else None
                dkb = torch.zeros_like(kb, dtype=cdtype)  # (B, H_kv, n, d)
                dvb = torch.zeros_like(vb, dtype=cdtype)  # (B, H_kv, n, d_v)
                _backward_piece(r, do, q, kb, vb, out, lse, src, r.pieces(src, t_l)[j], dq, dkb, dvb)
                if grads is not None:  # add what the ranks before this one accumulated
                    dk_in, dv_in = r.shift.wait(grads)
                    dkb += dk_in
                    dvb += dv_in
                grads = r.shift.start([dkb, dvb], tag=2) if r.world > 1 else None
                if pending is not None:
                    kb, vb = r.shift.wait(pending)
            if grads is None:  # a single process: the piece never left
                dk[:, :, rows], dv[:, :, rows] = dkb, dvb
            else:  # the accumulator of this rank's own piece, home after a full turn
                dk[:, :, rows], dv[:, :, rows] = r.shift.wait(grads)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                  document_ids: torch.Tensor | None = None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise AttnlabInputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AttnlabInputError(f"{name} must have shape (batch, heads, local tokens, head dim), got {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise AttnlabInputTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise AttnlabInputTypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, t_l, d = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[2] != t_l or k.shape[3] != d:
        raise AttnlabInputError(
            f"k and v must have shape (B, H_kv, T_local, d) matching q {tuple(q.shape)}, got k {tuple(k.shape)} "
            f"and v {tuple(v.shape)}"
        )
    if h % k.shape[1]:
        raise AttnlabInputError(f"the number of query heads ({h}) must be a multiple of the key/value heads ({k.shape[1]})")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise AttnlabInputTypeError("key_padding_mask must be a bool tensor (True = padding) or None")
        if tuple(key_padding_mask.shape) != (b, t_l):
            raise AttnlabInputError(
                f"key_padding_mask must have shape (batch, local tokens) = {(b, t_l)}, got {tuple(key_padding_mask.shape)}"
            )
    if document_ids is not None:
        if not isinstance(document_ids, torch.Tensor):
            raise AttnlabInputTypeError(f"document_ids must be an integer torch.Tensor or None, got {type(document_ids).__name__}")
        if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
            raise AttnlabInputTypeError(f"document_ids must have an integer dtype, got {document_ids.dtype}")
        if tuple(document_ids.shape) not in ((b, t_l), (t_l,)):
            raise AttnlabInputError(
                f"document_ids must have shape (batch, local tokens) = {(b, t_l)} or ({t_l},): this rank's tokens' "
                f"ids, as ContextParallel.shard(ids) gives them; got {tuple(document_ids.shape)}"
            )


def resolve_layout(layout: str | None, causal: bool, seq_len: int, t_pad: int, what: str) -> str:
    """The layout name. ``None`` is "zigzag" where the answer depends on which tokens a rank holds (causal, or
    ``seq_len`` padding: zigzag is what ``ContextParallel.shard`` makes, the default as before), and
    "contiguous" where it does not (any split works, odd local lengths included)."""
    if layout is None:
        return "zigzag" if causal or seq_len < t_pad else "contiguous"
    if layout not in LAYOUTS:
        raise AttnlabInputError(f"{what}: layout must be one of {', '.join(map(repr, LAYOUTS))} or None, got {layout!r}")
    return layout


def gather_docs(document_ids: torch.Tensor | None, group: dist.ProcessGroup, world: int, b: int, like: torch.Tensor, what: str) -> list[torch.Tensor | None]:
    """Every rank's document ids as (B, T_l) int64 on ``like``'s device, or a list of None without ids."""
    if document_ids is None:
        return [None] * world
    ids = document_ids.reshape(-1, document_ids.shape[-1]).expand(b, document_ids.shape[-1]).long()  # (B, T_l)
    if world == 1:
        return [ids.to(like.device)]
    dev = comm._comm_device(group, like)
    every = comm.all_gather(ids.to(dev), group, f"{what}: gathering the document ids", control=True)  # P x (B, T_l)
    return [m.to(like.device) for m in every]


def gather_masks(key_padding_mask: torch.Tensor | None, group: dist.ProcessGroup, world: int, like: torch.Tensor, what: str) -> list[torch.Tensor | None]:
    """Every rank's key padding mask (B, T_l), or a list of None when no rank has one."""
    if key_padding_mask is None:
        return [None] * world
    if world == 1:
        return [key_padding_mask]
    dev = comm._comm_device(group, like)
    every = comm.all_gather(key_padding_mask.to(dev, torch.uint8), group, f"{what}: gathering the key padding masks",
                            control=True)  # P x (B, T_l)
    return [m.to(like.device).bool() for m in every]


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    seq_len: int | None = None,
    block_size: int | None = None,
    layout: str | None = None,
    document_ids: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the sequence shared by the ranks of ``group``, keys and values passed round a ring.

    q: (B, H, T_l, d), k: (B, H_kv, T_l, d), v: (B, H_kv, T_l, d_v) -- this rank's shard  ->  (B, H, T_l, d_v),
    this rank's rows of the result (or ``(out, lse)``, see ``return_lse``).

    layout            which global tokens the shards hold: "zigzag" (rank r: chunks r and 2P-1-r of 2P, as
                      ``ContextParallel(group, "ring").shard`` makes; balanced under a causal mask; the local
                      length must be even) or "contiguous" (rank r: chunk r of P, any length; under a causal mask
                      exact but unbalanced: rank P-1 computes P blocks, rank 0 one). Default (None): "zigzag"
                      where the answer depends on the layout (``causal=True`` or a ``seq_len`` shorter than
                      ``P * T_l``), any split otherwise. **The shards cannot tell which tokens they hold**: shards
                      cut any other way than ``ContextParallel.shard`` (e.g. rank r holding tokens
                      r*T/P ... (r+1)*T/P - 1) must say ``layout="contiguous"``, or the causal answer is wrong.
                      ``ContextParallel`` carries its layout from ``shard`` to ``attention`` and ``gather``;
    causal            query at global position p sees keys at positions <= p;
    key_padding_mask  (B, T_l) bool, True = padding (this rank's keys); a query with no key gets zeros;
    document_ids      (B, T_l) or (T_l,) integer ids of this rank's tokens' documents (packed sequences; shard
                      them like the tokens): a query sees only keys of its own document; blocks with no shared
                      document are skipped (:func:`count_blocks`);
    scale             default ``1 / sqrt(d)``;
    seq_len           the true global length: positions >= seq_len are the layout's padding, never attended
                      to (default: no padding, ``P * T_l``);
    block_size        tokens per travelling key/value piece and per query chunk (default
                      :data:`DEFAULT_BLOCK_SIZE`): smaller means less memory and more, smaller messages;
    return_lse        also return the log-sum-exp of this rank's query rows, (B, H, T_l), natural log, in the
                      compute dtype (float32 for half/float32 inputs, float64 for float64), in the rank's local
                      token order (the order of its shard), ``-inf`` for rows with no key; no gradient.

    Every rank must make the same call with shards of the same shape (checked with one fixed-size header:
    the same ``ValueError`` on every rank otherwise, naming both ranks' calls). A NaN or inf in one position's
    input spreads to every row that may attend it, on every rank.
    """
    group, rank, world = comm.resolve_group(group)
    try:  # this rank's own checks: a refusal is told to the other ranks (comm.refuse), never a hang
        check_inputs(q, k, v, key_padding_mask, document_ids)
        b, h, t_l, d = q.shape
        t_pad = t_l * world
        seq_len = t_pad if seq_len is None else seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 <= seq_len <= t_pad:
            raise AttnlabInputError(f"seq_len must be an int in [0, world size x local tokens = {t_pad}], got {seq_len!r}")
        block = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise AttnlabInputError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(return_lse, bool):
            raise AttnlabInputTypeError(f"return_lse must be a bool, got {type(return_lse).__name__} ({return_lse!r})")
        order = resolve_layout(layout, bool(causal), seq_len, t_pad, "ring_attention")
        lay = Layout(ring=world, order=order)
        if lay.zigzag and t_l % 2:
            raise AttnlabInputError(
                f"layout='zigzag' holds two equal chunks per rank, so the local length must be even, got {t_l}; split "
                "the sequence with ContextParallel(group, 'ring').shard, or pass layout='contiguous' for shards that hold "
                "one run of consecutive tokens (the plain ring)"
            )
    except (ValueError, TypeError) as exc:
        comm.refuse(group, q, "ring_attention", exc)
    comm.check_same(group, q, "ring_attention", batch=b, heads=h, kv_heads=k.shape[1], local_tokens=t_l, head_dim=d,
                    value_dim=v.shape[-1], dtype=comm.DTYPE_IDS[q.dtype], causal=int(bool(causal)),
                    layout=comm.LAYOUT_IDS[order], has_key_padding_mask=int(key_padding_mask is not None),
                    has_document_ids=int(document_ids is not None), seq_len=seq_len, block_size=block)
    masks = gather_masks(key_padding_mask, group, world, q, "ring_attention")
    docs = gather_docs(document_ids, group, world, b, q, "ring_attention")
    r = _Ring(comm.RingShift(group, rank, world), lay, rank, world, bool(causal),
              1.0 / math.sqrt(d) if scale is None else float(scale), seq_len, block, h // k.shape[1], masks, docs)
    out, lse = _RingAttention.apply(q, k, v, r)
    return (out, lse) if return_lse else out
