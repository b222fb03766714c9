"""Shared pieces of the context-parallel tests: hand-made shards and a reference that owes nothing to attnlab.

The shards are cut the way the upstream projects cut them (ring-flash-attention / yunchang): contiguous
(rank r holds chunk r of P) and zigzag (the sequence in 2P chunks, rank r holds chunks r and 2P-1-r). The
reference is float64 ``torch.nn.functional.scaled_dot_product_attention`` with an explicit bool mask and
``torch.logsumexp`` of the masked scaled scores.
"""

from __future__ import annotations

import math

import torch

TIMEOUT = 60.0  # seconds: the process group's timeout; run_local kills what is left soon after


def contiguous_index(rank: int, world: int, t: int) -> torch.Tensor:
    """Global positions of rank ``rank``'s tokens: chunk ``rank`` of ``world`` (T divisible by world)."""
    c = t // world
    return torch.arange(rank * c, (rank + 1) * c)


def zigzag_index(rank: int, world: int, t: int) -> torch.Tensor:
    """Chunks ``rank`` and ``2 world - 1 - rank`` of ``2 world`` (T divisible by 2 world)."""
    chunks = torch.arange(t).chunk(2 * world)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]])


def explicit_allowed(t: int, *, causal: bool, docs: torch.Tensor | None = None,
                     kpm: torch.Tensor | None = None) -> torch.Tensor:
    """bool (B|1, 1, T, T), True = may attend: causal AND same document AND key not padding."""
    i = torch.arange(t)
    allowed = (i[None, :] <= i[:, None]) if causal else torch.ones(t, t, dtype=torch.bool)  # (T, T)
    allowed = allowed[None, None]  # (1, 1, T, T)
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])  # (B, 1, T, T)
    if kpm is not None:
        allowed = allowed & ~kpm[:, None, None, :]  # (B, 1, T, T)
    return allowed


def reference(q, k, v, allowed, scale=None):
    """``(out, lse)`` of full-sequence attention in float64; GQA by repeating K/V; empty rows give 0 / -inf."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, H, T, d)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)  # (B, H, T, T)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, T)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    out = out.masked_fill(torch.isneginf(lse)[..., None], 0.0)  # (B, H, T, d_v)
    return out, lse


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to max(1, largest |want|); -inf entries must coincide (else inf)."""
    got, want = got.detach().double(), want.detach().double()
    inf_g, inf_w = torch.isneginf(got), torch.isneginf(want)
    if not torch.equal(inf_g, inf_w):
        return math.inf
    diff = (got - want).masked_fill(inf_w, 0.0).abs()
    scale = max(1.0, float(want.masked_fill(inf_w, 0.0).abs().max())) if want.numel() else 1.0
    return float(diff.max()) / scale if diff.numel() else 0.0
