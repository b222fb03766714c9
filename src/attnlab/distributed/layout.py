"""Which global token positions each rank holds: the sequence layout shared by ring, Ulysses and hybrid.

The processes form a ``R x U`` mesh: rank ``g`` has ring index ``i = g // U`` and Ulysses index
``j = g % U`` (consecutive ranks, usually one node, share a Ulysses group; the ring runs across).

* ``order="zigzag"`` (the default): the padded sequence (``T_pad``, see :meth:`Layout.padded_length`) is
  cut into ``2R`` equal chunks and ring index ``i`` owns chunks ``i`` and ``2R - 1 - i``: under a causal
  mask every ring rank then does the same work (an early chunk sees few keys, its partner chunk many).
  With ``R = 1`` the two chunks are simply the whole sequence in order.
* ``order="contiguous"``: the padded sequence is cut into ``R`` equal chunks and ring index ``i`` owns
  chunk ``i`` (ring-flash-attention's plain ring, yunchang's basic layout). Exact under a causal mask too,
  but unbalanced: the last rank's queries see every key, the first rank's only its own.

For P = 2, T = 8 (one Ulysses rank per ring rank)::

    zigzag      rank 0: 0 1 6 7    rank 1: 2 3 4 5
    contiguous  rank 0: 0 1 2 3    rank 1: 4 5 6 7

* Inside a ring rank's ``2c`` tokens (its *ring chunk*), Ulysses index ``j`` holds the ``j``-th of ``U``
  equal contiguous slices; an all-to-all over the Ulysses group puts the ring chunk back together.

Each rank's local sequence is a few *runs* of consecutive global positions (two for the zigzag,
one for the contiguous layout), in increasing order; the block planner in :mod:`attnlab.distributed.ring` relies on that.
Sequences of any length are padded at the end to ``T_pad`` (the padding is never attended to; see
``seq_len`` in :func:`attnlab.distributed.ring_attention`).

Shape letters: B batch, T global tokens, T_l tokens on this rank, P = R * U processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnlab.errors import AttnlabInputError

__all__ = ["LAYOUTS", "Layout", "Run"]

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Run:
    """``length`` consecutive tokens: local rows ``[local, local + length)`` hold global positions
    ``[start, start + length)``."""

    local: int
    start: int
    length: int


@dataclass(frozen=True)
class Layout:
    """The sequence layout of an ``R x U`` process mesh (``ring`` x ``ulysses``)."""

    ring: int = 1  # R: ranks in the ring dimension
    ulysses: int = 1  # U: ranks in the Ulysses (all-to-all) dimension
    order: str = "zigzag"  # how the ring chunks are dealt: "zigzag" (balanced under causal) or "contiguous"

    def __post_init__(self) -> None:
        for name in ("ring", "ulysses"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AttnlabInputError(f"Layout.{name} must be an int >= 1, got {value!r}")
        if self.order not in LAYOUTS:
            raise AttnlabInputError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {self.order!r}")

    @property
    def zigzag(self) -> bool:
        """Whether ring ranks hold two chunks each (the zigzag with more than one ring rank)."""
        return self.order == "zigzag" and self.ring > 1

    @property
    def world(self) -> int:
        return self.ring * self.ulysses

    @property
    def multiple(self) -> int:
        """``T_pad`` is a multiple of this: ``2P`` with a zigzag ring, ``P`` otherwise."""
        return 2 * self.world if self.zigzag else self.world

    def padded_length(self, seq_len: int) -> int:
        """The smallest multiple of :attr:`multiple` that is >= ``seq_len`` (at least one)."""
        m = self.multiple
        return max(1, -(-seq_len // m)) * m

    def local_length(self, seq_len: int) -> int:
        return self.padded_length(seq_len) // self.world

    def ring_runs(self, ring_index: int, chunk_tokens: int) -> list[Run]:
        """The runs of a ring rank that holds ``chunk_tokens`` tokens (its whole ring chunk)."""
        if not self.zigzag:
            return [Run(0, ring_index * chunk_tokens, chunk_tokens)]
        if chunk_tokens % 2:
            raise AttnlabInputError(
                f"a zigzag ring rank holds two equal chunks, so its token count must be even, got {chunk_tokens}; "
                "shard the sequence with ContextParallel.shard (it pads to a multiple of 2 x world size), or use "
                "layout='contiguous'"
            )
        c = chunk_tokens // 2
        return [Run(0, ring_index * c, c), Run(c, (2 * self.ring - 1 - ring_index) * c, c)]

    def runs(self, rank: int, t_local: int) -> list[Run]:
        """The runs of mesh rank ``rank`` holding ``t_local`` tokens (in increasing global position)."""
        if not 0 <= rank < self.world:
            raise AttnlabInputError(f"rank must be in [0, {self.world}), got {rank}")
        i, j = divmod(rank, self.ulysses)
        lo, hi = j * t_local, (j + 1) * t_local  # this rank's rows of the ring chunk
        out = []
        for run in self.ring_runs(i, t_local * self.ulysses):
            a, b = max(lo, run.local), min(hi, run.local + run.length)
            if a < b:
                out.append(Run(a - lo, run.start + a - run.local, b - a))
        return out

    def positions(self, rank: int, t_local: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions of the ``t_local`` tokens of ``rank``: LongTensor (T_l,)."""
        parts = [torch.arange(r.start, r.start + r.length, device=device) for r in self.runs(rank, t_local)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)  # (T_l,)
