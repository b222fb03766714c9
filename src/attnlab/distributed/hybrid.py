"""Hybrid attention over a 2-D process mesh: Ulysses inside a group of ``U`` ranks, a ring across ``R`` of them.

Ulysses alone is limited by the head count (P must divide H); a ring alone sends every key/value
block ``P - 1`` times. The hybrid runs Ulysses over consecutive ranks (usually one node: fast links,
a group size that divides the heads) and ring attention between those groups: the all-to-all turns the
``U`` sequence slices of a ring chunk into H / U heads of the whole chunk, and the ring over the ``R``
ranks that hold the same heads does the rest. The layout is :class:`~attnlab.distributed.layout.Layout`
``(ring=R, ulysses=U, order=layout)``; with ``R = 1`` it is Ulysses, with ``U = 1`` the ring.

``layout`` says how the ring chunks are dealt ("zigzag": ring rank i holds chunks i and 2R-1-i, balanced under
a causal mask; "contiguous": chunk i); as for :func:`~attnlab.distributed.ring_attention`, the default is
"zigzag" where the answer depends on it (causal, or ``seq_len`` padding), as ``ContextParallel.shard`` cuts:
**shards cut any other way must say** ``layout="contiguous"``, since the shards cannot tell. Inside a ring chunk, Ulysses rank j holds the j-th of U slices.

Shape letters: B batch, H heads, T_l local tokens, d head size.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attnlab.distributed import comm
from attnlab.distributed.layout import Layout
from attnlab.distributed.ring import check_inputs, resolve_layout, ring_attention
from attnlab.distributed.ulysses import Attended, ulysses_attention
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError

__all__ = ["Mesh", "choose_ulysses_size", "hybrid_attention", "make_mesh"]


@dataclass(frozen=True)
class Mesh:
    """The two process groups of this rank: ``inner`` (Ulysses, U ranks) and ``outer`` (ring, R ranks)."""

    inner: dist.ProcessGroup
    outer: dist.ProcessGroup
    ring: int  # R
    ulysses: int  # U

    @property
    def layout(self) -> Layout:
        """The zigzag layout of this mesh (see :meth:`layout_for` for another order)."""
        return Layout(ring=self.ring, ulysses=self.ulysses)

    def layout_for(self, order: str) -> Layout:
        return Layout(ring=self.ring, ulysses=self.ulysses, order=order)


def choose_ulysses_size(world: int) -> int:
    """The Ulysses group size for a mesh of ``world`` ranks when none is given.

    ``LOCAL_WORLD_SIZE`` (set by torchrun: the processes on this node) when it divides ``world`` -- Ulysses
    inside a node, the ring across nodes; otherwise the largest divisor of ``world`` that is at most
    ``sqrt(world)``, so the ring is at least as long as the Ulysses group (4 -> 2 x 2, 8 -> ring 4 x Ulysses 2;
    a prime: a ring).
    """
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and 1 <= int(local) <= world and world % int(local) == 0:
        return int(local)
    return max(u for u in range(1, world + 1) if world % u == 0 and u * u <= world)


def make_mesh(group: dist.ProcessGroup | None = None, ulysses_size: int | None = None) -> Mesh:
    """Split ``group`` into Ulysses groups of ``ulysses_size`` consecutive ranks and rings across them.

    Every rank of ``group`` must call it (it creates two process groups with ``torch.distributed.new_group``).
    """
    group, rank, world = comm.resolve_group(group)
    u = choose_ulysses_size(world) if ulysses_size is None else ulysses_size
    if not isinstance(u, int) or u < 1 or world % u:
        divisors = [x for x in range(1, world + 1) if world % x == 0]
        raise AttnlabInputError(f"ulysses_size must divide the group size {world}: one of {divisors}, got {ulysses_size!r}")
    ranks = dist.get_process_group_ranks(group)
    i, j = divmod(rank, u)
    r = world // u
    inner_ranks = [ranks[i * u + x] for x in range(u)]
    outer_ranks = [ranks[y * u + j] for y in range(r)]
    inner = dist.new_group(inner_ranks, use_local_synchronization=True)
    outer = dist.new_group(outer_ranks, use_local_synchronization=True)
    return Mesh(inner, outer, r, u)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mesh: Mesh,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    seq_len: int | None = None,
    block_size: int | None = None,
    layout: str | None = None,
    document_ids: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence split over ``mesh`` (layout ``Layout(mesh.ring, mesh.ulysses, layout)``).

    q: (B, H, T_l, d), k: (B, H_kv, T_l, d), v: (B, H_kv, T_l, d_v) -> (B, H, T_l, d_v), or ``(out, lse)`` with
    ``return_lse`` (lse (B, H, T_l) in this rank's local token order); ``mesh.ulysses`` must divide H and H_kv.
    ``layout`` ("zigzag", the default with ``causal=True`` or ``seq_len`` padding, or "contiguous": shards not
    cut by ``ContextParallel.shard`` must say which), ``document_ids``
    and the other arguments as in :func:`attnlab.distributed.ring_attention`. A NaN or inf in one position's
    input spreads to every row that may attend it.
    """
    if not isinstance(mesh, Mesh):
        raise AttnlabInputTypeError(f"mesh must be an attnlab.distributed.Mesh (see make_mesh), got {type(mesh).__name__}")
    check_inputs(q, k, v, key_padding_mask, document_ids)
    t_pad = q.shape[-2] * mesh.ring * mesh.ulysses
    full = _full(seq_len, q, mesh)
    order = resolve_layout(layout, bool(causal), t_pad if full is None else full, t_pad, "hybrid_attention")
    ring = functools.partial(_ring_over, group=mesh.outer, block_size=block_size, layout=order)
    return ulysses_attention(q, k, v, group=mesh.inner, causal=causal, key_padding_mask=key_padding_mask,
                             scale=scale, seq_len=full, attend=ring, document_ids=document_ids,
                             return_lse=return_lse, _call="hybrid_attention", _layout=order)


def _full(seq_len: int | None, q: torch.Tensor, mesh: Mesh) -> int | None:
    """The global length bound Ulysses checks: one Ulysses group sees a ring chunk of U * T_l tokens."""
    if seq_len is None:
        return None
    t_pad = q.shape[-2] * mesh.ring * mesh.ulysses
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 0 <= seq_len <= t_pad:
        raise AttnlabInputError(f"seq_len must be an int in [0, world size x local tokens = {t_pad}], got {seq_len!r}")
    return seq_len


def _ring_over(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
              key_padding_mask: torch.Tensor | None, scale: float | None, seq_len: int | None,
              group: dist.ProcessGroup, block_size: int | None, layout: str,
              document_ids: torch.Tensor | None = None, return_lse: bool = False) -> Attended:
    return ring_attention(q, k, v, group=group, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                          seq_len=seq_len, block_size=block_size, layout=layout, document_ids=document_ids,
                          return_lse=return_lse)
