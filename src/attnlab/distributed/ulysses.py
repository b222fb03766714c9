"""Ulysses attention: trade the sequence split for a head split, attend locally, trade back.

Each rank holds all H heads of its T_l tokens. One all-to-all over ``group`` gives every rank H / P
heads of *all* P * T_l tokens; attention then runs locally through any attnlab backend
(:func:`attnlab.backends.attention`), or through any function of the same keyword signature (the
hybrid method passes ring attention over a second group here); one all-to-all brings the context
vectors back to the sequence split. Exact, and the communication per rank is ``(P - 1) / P`` of its q,
k, v and output shards, whatever P is; the limit is that P must divide the number of heads (use
``ring_attention``, or the hybrid, when it does not).

Layout: rank ``r`` holds the contiguous tokens ``[r T_l, (r + 1) T_l)`` (``layout="contiguous"``, the only one:
the all-to-all puts them back in order). Packed sequences (``document_ids``): the ids of every rank are
gathered and the local attention gets them (the flash backend skips the tiles of other documents).
A NaN or inf in one position's input spreads to every output row that may attend that position.

Shape letters: B batch, H query heads, H_kv key/value heads, T_l local tokens, T = P * T_l tokens,
d head size, P processes in the group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from attnlab import backends
from attnlab.distributed import comm
from attnlab.distributed.ring import check_inputs, gather_docs, gather_masks
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.masks import padding_mask

__all__ = ["ulysses_attention"]

# What a local attention function returns: out, or (out, lse) when called with return_lse=True.
Attended = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class _SeqToHeads(torch.autograd.Function):
    """(B, H, T_l, d) on each rank -> (B, H / P, P * T_l, d): my heads of everyone's tokens, in rank order."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, world: int, what: str) -> torch.Tensor:
        ctx.group, ctx.world, ctx.what = group, world, what
        return _seq_to_heads(x, group, world, what)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _heads_to_seq(grad, ctx.group, ctx.world, ctx.what), None, None, None


class _HeadsToSeq(torch.autograd.Function):
    """The inverse: (B, H / P, P * T_l, d) -> (B, H, T_l, d)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, world: int, what: str) -> torch.Tensor:
        ctx.group, ctx.world, ctx.what = group, world, what
        return _heads_to_seq(x, group, world, what)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _seq_to_heads(grad, ctx.group, ctx.world, ctx.what), None, None, None


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup, world: int, what: str) -> torch.Tensor:
    b, h, t_l, d = x.shape
    send = x.reshape(b, world, h // world, t_l, d).transpose(0, 1)  # (P, B, H/P, T_l, d)   slice i to rank i
    got = comm.all_to_all(send, group, what)  # (P, B, H/P, T_l, d)   slice i from rank i
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * t_l, d)  # (B, H/P, P*T_l, d)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, world: int, what: str) -> torch.Tensor:
    b, hp, t, d = x.shape
    send = x.reshape(b, hp, world, t // world, d).permute(2, 0, 1, 3, 4)  # (P, B, H/P, T_l, d)   tokens of rank i
    got = comm.all_to_all(send, group, what)  # (P, B, H/P, T_l, d)   heads of rank i
    return got.transpose(0, 1).reshape(b, world * hp, t // world, d)  # (B, H, T_l, d)


def _local_attention(backend: str) -> Callable[..., Attended]:
    """Attention over the whole (gathered) sequence on this rank, through an attnlab backend."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               key_padding_mask: torch.Tensor | None, scale: float | None, seq_len: int,
               document_ids: torch.Tensor | None = None, return_lse: bool = False) -> Attended:
        t = q.shape[-2]
        # The layout's padding sits at the end: attend over the true length only, zeros for the rest.
        q_, k_, v_ = q[:, :, :seq_len], k[:, :, :seq_len], v[:, :, :seq_len]  # (B, h, T_true, d)
        mask = None if key_padding_mask is None else padding_mask(key_padding_mask[:, :seq_len])  # (B, 1, 1, T_true)
        docs = None if document_ids is None else document_ids[:, :seq_len]  # (B, T_true)
        if k_.shape[1] != q_.shape[1]:  # grouped-query: query head h uses key/value head h // groups
            g = q_.shape[1] // k_.shape[1]
            k_, v_ = k_.repeat_interleave(g, dim=1), v_.repeat_interleave(g, dim=1)  # (B, h, T_true, d)
        out, lse = backends.attention(q_, k_, v_, mask=mask, causal=causal, scale=scale, backend=backend,
                                      document_ids=docs, return_lse=True)  # (B, h, T_true, d_v), (B, h, T_true)
        if seq_len < t:
            out = torch.cat([out, out.new_zeros(*out.shape[:2], t - seq_len, out.shape[-1])], dim=2)  # (B, h, T, d_v)
            lse = torch.cat([lse, lse.new_full((*lse.shape[:2], t - seq_len), -math.inf)], dim=2)  # (B, h, T)
        return (out, lse.detach()) if return_lse else out

    return attend


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    seq_len: int | None = None,
    backend: str = "auto",
    attend: Callable[..., Attended] | None = None,
    document_ids: torch.Tensor | None = None,
    return_lse: bool = False,
    _call: str = "ulysses_attention",
    _layout: str = "contiguous",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the sequence shared by the ranks of ``group``, by all-to-all head exchange.

    q: (B, H, T_l, d), k: (B, H_kv, T_l, d), v: (B, H_kv, T_l, d_v) -- this rank's contiguous slice of the
    sequence (rank r holds tokens [r T_l, (r + 1) T_l), as ``ContextParallel(group, "ulysses").shard`` makes)
    -> (B, H, T_l, d_v). The group size must divide H and H_kv.

    causal, key_padding_mask ((B, T_l) bool, True = padding), scale: as in :func:`attnlab.backends.attention`;
    document_ids: (B, T_l) or (T_l,) integer ids of this rank's tokens' documents (packed sequences): a query
    sees only keys of its own document;
    return_lse: also return this rank's rows' log-sum-exp, (B, H, T_l), natural log, compute dtype, local token
    order, -inf for rows with no key; no gradient;
    seq_len: the true global length (positions >= seq_len are padding; default P * T_l); with ``attend`` it is
    passed on unchecked;
    backend: the attnlab backend for the local attention;
    attend: instead of a backend, a function ``attend(q, k, v, *, causal, key_padding_mask, scale, seq_len)``
    over the head-split tensors (B, H/P, P T_l, d) (the hybrid method passes ring attention here); it also gets
    ``document_ids=`` (B, P T_l) when given and ``return_lse=True`` when asked (then it returns ``(out, lse)``).

    Every rank must make the same call (checked: the same ``ValueError`` on every rank otherwise). A NaN or inf
    in one position's input spreads to every row that may attend it.
    """
    group, _rank, world = comm.resolve_group(group)
    try:  # this rank's own checks: a refusal is told to the other ranks (comm.refuse), never a hang
        check_inputs(q, k, v, key_padding_mask, document_ids)
        if not isinstance(return_lse, bool):
            raise AttnlabInputTypeError(f"return_lse must be a bool, got {type(return_lse).__name__} ({return_lse!r})")
        b, h, t_l, d = q.shape
        h_kv = k.shape[1]
        if h % world:
            raise AttnlabInputError(
                f"ulysses attention splits the heads over the {world} ranks of the group, but {h} query heads do not "
                f"divide evenly; use method='ring' (ring_attention works for any head count) or method='hybrid' with a "
                f"Ulysses size that divides the heads"
            )
        if h_kv % world:  # grouped-query with fewer key/value heads than ranks: give every query head its own
            k, v = k.repeat_interleave(h // h_kv, dim=1), v.repeat_interleave(h // h_kv, dim=1)  # (B, H, T_l, d)
        if attend is None:
            t = t_l * world
            seq_len = t if seq_len is None else seq_len
            if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 <= seq_len <= t:
                raise AttnlabInputError(f"seq_len must be an int in [0, world size x local tokens = {t}], got {seq_len!r}")
            attend = _local_attention(backend)
    except (ValueError, TypeError) as exc:
        comm.refuse(group, q, _call, exc)
    comm.check_same(group, q, _call, batch=b, heads=h, kv_heads=h_kv, local_tokens=t_l, head_dim=d,
                    value_dim=v.shape[-1], dtype=comm.DTYPE_IDS[q.dtype], causal=int(bool(causal)),
                    layout=comm.LAYOUT_IDS[_layout], has_key_padding_mask=int(key_padding_mask is not None),
                    has_document_ids=int(document_ids is not None), seq_len=-1 if seq_len is None else seq_len)
    masks = gather_masks(key_padding_mask, group, world, q, _call)
    full_mask = None if key_padding_mask is None else torch.cat([m for m in masks if m is not None], dim=1)  # (B, T)
    docs = gather_docs(document_ids, group, world, b, q, _call)
    extra: dict[str, torch.Tensor | bool] = {}
    if document_ids is not None:
        extra["document_ids"] = torch.cat([x for x in docs if x is not None], dim=1)  # (B, T) in sequence order
    if return_lse:
        extra["return_lse"] = True
    what = f"{_call}: the sequence-to-heads exchange"
    q_h = _SeqToHeads.apply(q, group, world, what)  # (B, H/P, T, d)
    k_h = _SeqToHeads.apply(k, group, world, what)  # (B, H_kv/P, T, d)
    v_h = _SeqToHeads.apply(v, group, world, what)  # (B, H_kv/P, T, d_v)
    got = attend(q_h, k_h, v_h, causal=causal, key_padding_mask=full_mask, scale=scale, seq_len=seq_len, **extra)
    out_h, lse_h = got if return_lse else (got, None)  # (B, H/P, T, d_v), (B, H/P, T)
    out = _HeadsToSeq.apply(out_h, group, world, f"{_call}: the heads-to-sequence exchange")  # (B, H, T_l, d_v)
    if lse_h is None:
        return out
    with torch.no_grad():
        lse = _heads_to_seq(lse_h.unsqueeze(-1), group, world, f"{_call}: the lse exchange")  # (B, H, T_l, 1)
    return out, lse.squeeze(-1)  # (B, H, T_l, d_v), (B, H, T_l)
