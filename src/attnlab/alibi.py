"""ALiBi: attention with linear biases (Press, Smith & Lewis, 2022), as a positional scheme.

ALiBi adds no position embedding and rotates nothing: each head ``h`` adds ``-m_h * |i - j|`` to the
score of query position ``i`` and key position ``j``, a penalty that grows with the distance, with a
fixed slope ``m_h`` per head (for H a power of two, ``m_h = 2 ** (-8 h / H)``, h = 1..H: 1/2, 1/4, ...,
1/256 for 8 heads; otherwise BLOOM's interleaving, see :func:`alibi_slopes`). Under a causal mask
``|i - j| = i - j``, the paper's bias.

It plugs into the positional hook of :class:`~attnlab.modules.MultiHeadAttention`:
``MultiHeadAttention(..., rope="alibi")`` (or ``rope=ALiBi(num_heads)``). A scheme rotates queries and
keys when called and, when it has a ``score_bias(query_positions, key_positions)`` method, adds that to
the scores (see :mod:`attnlab.rope`). ALiBi's is a description, :class:`ALiBiBias` (slopes and
positions), which each backend converts once: ``"eager"`` / ``"torch"`` to a float mask
(:meth:`ALiBiBias.dense`), ``"flash"`` to a bias computed per tile (FlashAttention-2's ``alibi_slopes``), so
the kernel still never builds a T_q x T_k matrix and still skips hidden tiles.

Shape letters: B batch, H query heads, T_q / T_k query / key tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.errors import AttnlabInputError

__all__ = ["ALiBi", "ALiBiBias", "alibi_slopes"]


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi slope of each head, float64 (H,): ``2 ** (-8 h / n)`` for h = 1..n with n the largest power
    of two <= H; for the remaining H - n heads, the odd-numbered slopes of 2n heads (BLOOM's rule)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise AttnlabInputError(f"num_heads must be a positive int, got {num_heads!r}")
    n = 1 << (num_heads.bit_length() - 1)  # the largest power of two <= H
    slopes = [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]
    extra = [2.0 ** (-8.0 * h / (2 * n)) for h in range(1, 2 * (num_heads - n), 2)]
    return torch.tensor(slopes + extra, dtype=torch.float64)  # (H,)


@dataclass(frozen=True, eq=False)
class ALiBiBias:
    """What ALiBi adds to the scores, as a description: ``-slopes[h] * |i' - j'|``.

    slopes (H,) float; query_positions (T_q,) / (B, T_q) and key_positions (T_k,) / (B, T_k), integer, the
    ``i'`` and ``j'`` (None: bottom-right by index, ``i' = i + T_k - T_q``, ``j' = j``, as the causal mask).
    """

    slopes: Tensor
    query_positions: Tensor | None = None
    key_positions: Tensor | None = None

    def dense(self, t_q: int, t_k: int, *, device: torch.device | str | None = None) -> Tensor:
        """The bias as a float32 tensor (1|B, H, T_q, T_k)."""
        q_pos, k_pos = self.query_positions, self.key_positions
        if q_pos is None or k_pos is None:
            q_pos = torch.arange(t_q, device=device) + (t_k - t_q)  # (T_q,)
            k_pos = torch.arange(t_k, device=device)  # (T_k,)
        q = q_pos.reshape(_rows(q_pos), 1, q_pos.shape[-1], 1)  # (1|B, 1, T_q, 1)
        k = k_pos.reshape(_rows(k_pos), 1, 1, k_pos.shape[-1])  # (1|B, 1, 1, T_k)
        distance = (q - k).abs().to(torch.float32)  # (1|B, 1, T_q, T_k)
        slopes = self.slopes.to(device=distance.device, dtype=torch.float32)[None, :, None, None]  # (1, H, 1, 1)
        return -slopes * distance  # (1|B, H, T_q, T_k)

    def reorder_keys(self, order: Tensor) -> ALiBiBias:
        """The same bias for keys put in ``order`` (B, T_k) (a cache's slots sorted by position)."""
        k_pos = self.key_positions
        if k_pos is None:
            raise AttnlabInputError("keys can be reordered only when the bias carries their positions")
        return ALiBiBias(self.slopes, self.query_positions, k_pos.expand(order.shape).gather(1, order))


def _rows(positions: Tensor) -> int:
    """The batch rows of positions (T,) -> 1 or (B, T) -> B (also for T = 0)."""
    return 1 if positions.dim() == 1 else positions.shape[0]


class ALiBi(nn.Module):
    """Linear biases per head: ``score_bias(query_positions, key_positions)`` is ``-m_h * |i - j|`` (an
    :class:`ALiBiBias`); calling it leaves queries and keys as they are. No parameters, no saved
    buffers: adding it leaves a ``state_dict`` unchanged."""

    slopes: Tensor
    #: Its bias has a tile form (per-head slopes of a distance): the flash kernel takes it.
    score_bias_form = "linear"

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.register_buffer("slopes", alibi_slopes(num_heads).float(), persistent=False)  # (H,)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ALiBi:
        """``.to()``, ``.cuda()``, ``.half()``: follow the device, keep the slopes in float32 (a bfloat16 copy
        would round the slopes that are not powers of two, as BLOOM avoids too)."""
        super()._apply(fn, recurse)
        self.slopes = alibi_slopes(self.num_heads).to(device=self.slopes.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"

    def forward(self, queries: Tensor, keys: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return queries, keys  # ALiBi rotates nothing: its positions enter through score_bias

    def score_bias(self, query_positions: Tensor, key_positions: Tensor) -> ALiBiBias:
        """query_positions (T_q,) or (B, T_q), key_positions (T_k,) or (B, T_k) -> the bias's description
        (its ``dense`` form: float32 (1|B, H, T_q, T_k))."""
        return ALiBiBias(self.slopes, query_positions, key_positions)
