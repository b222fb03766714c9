"""ContextParallel: one object that splits a sequence over a process group and runs attention on the shards.

    cp = ContextParallel(group, method="ring")          # or "ulysses", "hybrid"
    x_local = cp.shard(x)                               # (B, T, ...) -> (B, T_l, ...) this rank's tokens
    y_local = model(x_local)                            # attention layers call cp.attention(q, k, v, ...)
    y = cp.gather(y_local)                              # (B, T_l, ...) -> (B, T, ...) on every rank

``cp.shard`` pads the sequence to a length every rank shares (a multiple of P, or 2P for the zigzag ring)
and remembers the true length, so that ``cp.attention`` never attends to the padding and ``cp.gather``
cuts it off again: results do not depend on how T divides. ``cp.positions(T_l)`` gives the global
positions of this rank's tokens (for positional embeddings and RoPE).

The layout (which tokens each rank holds) is chosen once, ``ContextParallel(..., layout=...)``, and carried
by the object: ``shard``, ``positions``, ``attention`` and ``gather`` all use it, so shards made by ``cp.shard``
always match what ``cp.attention`` assumes. ``"zigzag"`` (the default for ring and hybrid): rank r holds
chunks r and 2P-1-r of 2P, balanced under a causal mask; ``"contiguous"`` (the only one for Ulysses): rank r
holds chunk r of P (the plain ring under a causal mask: exact, but the last rank does P times the work of
the first). Shards made any other way must be passed to ``ring_attention`` / ``hybrid_attention`` with their
``layout=`` stated.

Packed sequences: shard the document ids like the tokens, ``cp.shard(doc_ids)`` ((B, T) -> (B, T_l)), and
pass them as ``cp.attention(..., document_ids=...)``. ``return_lse=True`` also returns the log-sum-exp of this
rank's query rows, (B, H, T_l), in the rank's local token order.

The object protocol :class:`attnlab.modules.MultiHeadAttention` uses (``context_parallel=cp``):
``attention(q, k, v, *, causal, key_padding_mask, scale, document_ids=None, return_lse=False)`` on this
rank's (B, H, T_l, d) shards and ``positions(t_local, device)``.

Shape letters: B batch, T global tokens, T_l local tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from attnlab.distributed import comm
from attnlab.distributed.hybrid import Mesh, hybrid_attention, make_mesh
from attnlab.distributed.layout import LAYOUTS, Layout
from attnlab.distributed.ring import ring_attention
from attnlab.distributed.ulysses import ulysses_attention
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.masks import MaskSpec

__all__ = ["METHODS", "ContextParallel"]

METHODS = ("ring", "ulysses", "hybrid")


class _Gather(torch.autograd.Function):
    """All ranks' shards, put back in sequence order; the backward sums the gradient over the ranks
    (each rank's loss may use the whole gathered tensor) and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, cp: ContextParallel, dim: int) -> torch.Tensor:
        ctx.cp, ctx.dim = cp, dim
        every = comm.all_gather(y, cp.group, "ContextParallel.gather")  # P x (..., T_l, ...)
        stacked = torch.cat(every, dim=dim)  # (..., T_pad, ...) in rank order
        order = torch.cat([cp.layout.positions(r, y.shape[dim], y.device) for r in range(cp.world)])  # (T_pad,)
        full = torch.empty_like(stacked).index_copy_(dim, order, stacked)  # (..., T_pad, ...) in sequence order
        return full.narrow(dim, 0, cp._true_length(full.shape[dim]))  # (..., T, ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cp, dim = ctx.cp, ctx.dim
        grad = grad.contiguous()
        if cp.world > 1:
            with comm._failures("ContextParallel.gather backward (all_reduce)", cp.group):
                dist.all_reduce(grad, group=cp.group)
        return cp.shard(grad, dim, remember=False), None, None


class ContextParallel:
    """Split sequences over ``group`` and compute exact attention on the shards.

    group        a torch.distributed process group (None: the default group); every rank constructs its
                 ContextParallel in the same order;
    method       "ring" (keys/values passed round a ring; any head count), "ulysses" (all-to-all head
                 exchange; the group size must divide the heads) or "hybrid" (Ulysses inside groups of
                 ``ulysses_size`` consecutive ranks, a ring across them);
    ulysses_size hybrid only: the Ulysses group size (default :func:`~attnlab.distributed.choose_ulysses_size`);
    block_size   ring and hybrid: tokens per travelling key/value piece (default
                 :data:`attnlab.distributed.ring.DEFAULT_BLOCK_SIZE`);
    backend      ulysses: the attnlab backend of the local attention (default "auto");
    layout       "zigzag" (default for ring and hybrid) or "contiguous" (the only one for ulysses): which
                 tokens each rank holds; carried from ``shard`` to ``attention`` and ``gather``.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, method: str = "ring", *,
                 ulysses_size: int | None = None, block_size: int | None = None, backend: str = "auto",
                 layout: str | None = None) -> None:
        if method not in METHODS:
            raise AttnlabInputError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        if ulysses_size is not None and method != "hybrid":
            raise AttnlabInputError(f"ulysses_size applies to method='hybrid' only, got method={method!r}")
        if layout is not None and layout not in LAYOUTS:
            raise AttnlabInputError(f"layout must be one of {', '.join(map(repr, LAYOUTS))} or None, got {layout!r}")
        if method == "ulysses" and layout == "zigzag":
            raise AttnlabInputError("method='ulysses' holds contiguous slices (its all-to-all puts them back in order): "
                             "use layout='contiguous' (or None), or method='ring' / 'hybrid' for the zigzag layout")
        order = layout if layout is not None else ("contiguous" if method == "ulysses" else "zigzag")
        self.group, self.rank, self.world = comm.resolve_group(group)
        self.method = method
        self.block_size = block_size
        self.backend = backend
        self.mesh: Mesh | None = None
        if method == "hybrid":
            self.mesh = make_mesh(self.group, ulysses_size)
            self.layout = self.mesh.layout_for(order)
        elif method == "ring":
            self.layout = Layout(ring=self.world, order=order)
        else:
            self.layout = Layout(ulysses=self.world, order=order)
        self.seq_len: int | None = None  # the true global length of the last sequence sharded

    def __repr__(self) -> str:
        return (f"ContextParallel(method={self.method!r}, layout={self.layout.order!r}, world={self.world}, "
                f"rank={self.rank}, mesh=(ring {self.layout.ring} x ulysses {self.layout.ulysses}))")

    def _true_length(self, t_pad: int) -> int:
        return t_pad if self.seq_len is None or self.seq_len > t_pad else self.seq_len

    # ----------------------------------------------------------------------------------------------
    # Sequence layout
    # ----------------------------------------------------------------------------------------------

    def shard(self, x: torch.Tensor, dim: int = 1, *, remember: bool = True) -> torch.Tensor:
        """This rank's tokens of ``x`` along ``dim`` (default 1: (B, T, ...)), padded internally so every rank
        holds the same number; records ``T`` as :attr:`seq_len` (the padding is never attended to)."""
        if not isinstance(x, torch.Tensor):
            raise AttnlabInputTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not -x.dim() <= dim < x.dim():
            raise AttnlabInputError(f"dim must index a dimension of x with shape {tuple(x.shape)}, got {dim}")
        dim = dim % x.dim()
        t = x.shape[dim]
        t_pad = self.layout.padded_length(t)
        if t_pad > t:
            pad_shape = list(x.shape)
            pad_shape[dim] = t_pad - t
            x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)  # (..., T_pad, ...)
        if remember:
            self.seq_len = t
        idx = self.layout.positions(self.rank, t_pad // self.world, x.device)  # (T_l,)
        return x.index_select(dim, idx)  # (..., T_l, ...)

    def gather(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's shard of ``y`` back in sequence order, the padding cut off: (..., T_l, ...) -> (..., T, ...).
        Differentiable (the gradient is summed over the ranks)."""
        if not isinstance(y, torch.Tensor):
            raise AttnlabInputTypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        return _Gather.apply(y, self, dim % y.dim())

    def positions(self, t_local: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions of this rank's ``t_local`` tokens: LongTensor (T_l,) (for RoPE / position embeddings)."""
        return self.layout.positions(self.rank, t_local, device)

    # ----------------------------------------------------------------------------------------------
    # Attention
    # ----------------------------------------------------------------------------------------------

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                  document_ids: torch.Tensor | None = None, return_lse: bool = False,
                  mask: MaskSpec | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Exact attention of this rank's (B, H, T_l, d) shards over the whole sequence -> (B, H, T_l, d_v),
        in this object's layout.

        key_padding_mask: (B, T_l) bool, True = padding (this rank's keys, sharded with :meth:`shard`);
        document_ids: (B, T_l) integer document ids of this rank's tokens (``cp.shard(doc_ids)``), packed sequences;
        return_lse: also return the log-sum-exp (B, H, T_l) of this rank's rows, in local token order;
        mask: the same as an :class:`attnlab.masks.MaskSpec` of this rank's shard (causal, key_padding,
        document_ids; the other parts have no sharded form and are refused), AND'ed with the keywords.
        A NaN or inf in one position's input spreads to every row that may attend it, on every rank."""
        if mask is not None:
            causal, key_padding_mask, document_ids = _sharded_parts(mask, causal, key_padding_mask, document_ids)
        t_pad = q.shape[-2] * self.world if isinstance(q, torch.Tensor) and q.dim() >= 2 else 0
        seq_len = None if self.seq_len is None else min(self.seq_len, t_pad)
        order = self.layout.order
        if self.method == "ring":
            return ring_attention(q, k, v, group=self.group, causal=causal, key_padding_mask=key_padding_mask,
                                  scale=scale, seq_len=seq_len, block_size=self.block_size, layout=order,
                                  document_ids=document_ids, return_lse=return_lse)
        if self.method == "ulysses":
            return ulysses_attention(q, k, v, group=self.group, causal=causal, key_padding_mask=key_padding_mask,
                                     scale=scale, seq_len=seq_len, backend=self.backend, document_ids=document_ids,
                                     return_lse=return_lse)
        if self.mesh is None:  # pragma: no cover - set in __init__
            raise RuntimeError("hybrid ContextParallel without a mesh")
        return hybrid_attention(q, k, v, mesh=self.mesh, causal=causal, key_padding_mask=key_padding_mask,
                                scale=scale, seq_len=seq_len, block_size=self.block_size, layout=order,
                                document_ids=document_ids, return_lse=return_lse)


def _sharded_parts(mask: MaskSpec, causal: bool, key_padding_mask: torch.Tensor | None,
                   document_ids: torch.Tensor | None) -> tuple[bool, torch.Tensor | None, torch.Tensor | None]:
    """A mask description of this rank's shard as the ranks' parts: (causal, key padding, document ids)."""
    if not isinstance(mask, MaskSpec):
        raise AttnlabInputTypeError(f"mask must be an attnlab.masks.MaskSpec or None, got {type(mask).__name__}")
    extra = [name for name in ("window", "query_positions", "allowed") if getattr(mask, name) is not None]
    if extra:
        raise AttnlabInputError(f"context parallelism takes causal, key_padding and document_ids of a mask description; "
                                f"{', '.join(extra)} have no sharded form here")
    both = (MaskSpec(causal=causal, key_padding=key_padding_mask, document_ids=document_ids) & mask)
    return both.causal, both.key_padding, both.document_ids
