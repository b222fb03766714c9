"""Rotary position embeddings (RoPE), Llama's rotate-half convention.

RoPE encodes a token's position by rotating its query and key vectors: the feature pairs
``(x[i], x[i + hd/2])`` of a head are turned by the angle ``position * base ** (-2i / hd)``. A score
``q_m . k_n`` then depends on the positions only through ``m - n`` (tested), which is why a cache can
store already-rotated keys and new queries only need their own position (the *offset*).

This is the convention of Llama (Hugging Face ``rotate_half``) and of the book's Llama-from-scratch
bonus code (``compute_rope``): ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = (-x2, x1)``.

The hook for another positional scheme
--------------------------------------
:class:`~attnlab.modules.MultiHeadAttention` calls whatever it is given as ``rope=`` as::

    queries, keys = rope(queries, keys, positions)

with ``queries`` (B, H, T_q, hd), ``keys`` (B, H_kv, T_q, hd) (the *new* tokens' keys, before they are
cached) and ``positions`` a LongTensor (T_q,), or (B, T_q) when each row has its own (with a cache, or
``position_ids`` of shape (B, T)), of the tokens' absolute positions (counted from 0 at the start of the
sequence; with a cache, the cached tokens come first; with context parallelism, the rank's global
positions; with ``document_ids``, from 0 in each document). Any callable (or ``nn.Module``) with this signature and shape-preserving results is a
positional scheme (:class:`PositionalEncoding`); :class:`RotaryEmbedding` is the built-in one.

A scheme may also bias the scores: when it has a method
``score_bias(query_positions, key_positions)`` returning a float tensor broadcastable to (B, H, T_q, T_k)
(or a description with ``dense(t_q, t_k, device=)``, as :class:`attnlab.alibi.ALiBiBias`), the module adds
it to every score (the positions of the keys as attended: with a cache, the cached tokens' ones).
:class:`attnlab.alibi.ALiBi` is one (it rotates nothing). Schemes by name,
``MultiHeadAttention(rope="alibi")``, come from :data:`SCHEMES` (:func:`register_scheme` adds one);
``rope=True`` is ``rope="rope"``. A dense score bias needs a backend that reads a float mask; ALiBi's
also runs on ``"flash"`` (per tile). Context parallelism takes no score bias.

Shape letters: B batch, H query heads, H_kv key/value heads, T tokens, hd head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn

from attnlab.alibi import ALiBi
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError

__all__ = ["PositionalEncoding", "RotaryEmbedding", "SCHEMES", "apply_rope", "make_positional", "register_scheme",
           "rope_angles", "rotate_half", "score_bias_of"]


@runtime_checkable
class PositionalEncoding(Protocol):
    """What ``MultiHeadAttention(rope=...)`` calls: ``(queries, keys, positions) -> (queries, keys)``."""

    def __call__(self, queries: Tensor, keys: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]: ...


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` on the last dimension split in halves.  (..., hd) -> (..., hd)"""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (..., hd/2)
    return torch.cat((-x2, x1), dim=-1)  # (..., hd)


def rope_angles(
    positions: Tensor, head_dim: int, base: float = 10000.0, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of the rotation angles for ``positions`` (any shape P), in ``dtype``.

    Angle of feature pair ``i`` at position ``p``: ``p * base ** (-2i / head_dim)``, duplicated over the two
    halves (the rotate-half layout).  Returns two tensors of shape (*P, head_dim).
    """
    if head_dim % 2:
        raise AttnlabInputError(f"rotary embeddings need an even head_dim, got head_dim={head_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim))
    angles = positions.to(dtype)[..., None] * inv_freq  # (*P, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (*P, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` (B, H, T, hd) by ``cos``/``sin`` of shape (T, hd) or (B, T, hd); same dtype as ``x``
    (computed in float32 at least, as Llama does for half precision)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    work = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(work)
    rotated = xw * cos.to(work) + rotate_half(xw) * sin.to(work)  # (B, H, T, hd)
    return rotated.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings for queries and keys (Llama's rotate-half convention).

    ``RotaryEmbedding(head_dim, base=10000.0)(queries, keys, positions) -> (queries, keys)`` with
    queries (B, H, T, hd), keys (B, H_kv, T, hd) and positions a LongTensor (T,) or (B, T). Angles are
    computed from the positions on each call (no table, no maximum length, no shape that depends on the
    position: a compiled decoding step does not recompile as the position grows). No parameters and no
    saved buffers, so adding it leaves a ``state_dict`` unchanged.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise AttnlabInputError(f"rotary embeddings need an even head_dim >= 2, got head_dim={head_dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not 1.0 < base < math.inf:
            raise AttnlabInputError(f"rope_base must be a finite number > 1 (10000.0 in Llama 2, 500000.0 in Llama 3), "
                             f"got {base!r}")
        self.head_dim, self.base = head_dim, float(base)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"

    def forward(self, queries: Tensor, keys: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        if queries.shape[-1] != self.head_dim or keys.shape[-1] != self.head_dim:
            raise AttnlabInputError(
                f"RotaryEmbedding was built for head_dim={self.head_dim}, got queries {tuple(queries.shape)} "
                f"and keys {tuple(keys.shape)}"
            )
        dtype = torch.promote_types(queries.dtype, torch.float32)
        cos, sin = rope_angles(positions, self.head_dim, self.base, dtype=dtype)  # (T, hd) or (B, T, hd)
        return apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)  # (B, H, T, hd), (B, H_kv, T, hd)


# --------------------------------------------------------------------------------------------------
# Positional schemes by name: what ``MultiHeadAttention(rope=...)`` accepts
# --------------------------------------------------------------------------------------------------

#: Name -> ``factory(head_dim, num_heads, base)`` of a positional scheme.
SCHEMES: dict[str, Callable[[int, int, float], nn.Module]] = {
    "rope": lambda head_dim, num_heads, base: RotaryEmbedding(head_dim, base),
    "alibi": lambda head_dim, num_heads, base: ALiBi(num_heads),
}


def register_scheme(name: str, factory: Callable[[int, int, float], nn.Module], *, replace: bool = False) -> None:
    """Make ``MultiHeadAttention(rope=name)`` build ``factory(head_dim, num_heads, rope_base)``."""
    if not isinstance(name, str) or not name:
        raise AttnlabInputError(f"name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise AttnlabInputTypeError(f"factory must be callable, got {type(factory).__name__}")
    if name in SCHEMES and not replace:
        raise AttnlabInputError(f"a positional scheme named {name!r} is already registered; pass replace=True")
    SCHEMES[name] = factory


def make_positional(rope: object, *, head_dim: int, num_heads: int, base: float) -> nn.Module | PositionalEncoding | None:
    """``rope=None/False``: nothing; ``True``: rotary embeddings; a name of :data:`SCHEMES`; a callable: the
    user's scheme (kept as given)."""
    if rope is None or rope is False:
        return None
    if rope is True:
        rope = "rope"
    if isinstance(rope, str):
        if rope not in SCHEMES:
            raise AttnlabInputTypeError(f"rope must be None, True or a callable (queries, keys, positions) -> "
                                        f"(queries, keys), or a scheme's name, one of {sorted(SCHEMES)}; got {rope!r}")
        return SCHEMES[rope](head_dim, num_heads, base)
    if callable(rope):
        return rope
    raise AttnlabInputTypeError(f"rope must be None, True or a callable (queries, keys, positions) -> (queries, keys), "
                                f"got {type(rope).__name__}")


def score_bias_of(scheme: object) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The scheme's ``score_bias`` method, or None when it only rotates."""
    if not callable(getattr(type(scheme), "score_bias", None)):  # the class: no nn.Module attribute miss
        return None
    return cast(Callable[[Tensor, Tensor], Tensor], scheme.score_bias)  # type: ignore[attr-defined]
