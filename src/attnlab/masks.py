"""Mask builders that compose.

One convention for the whole package, the one of ``torch.nn.functional.scaled_dot_product_attention``:
a boolean mask is **True where a query may attend to a key**. (A *padding* mask, as taken by
``MultiHeadAttention.forward`` and ``torch.nn.MultiheadAttention``, says the opposite — True = padding —
and :func:`padding_mask` turns it into this convention.) Masks combine with :func:`and_masks` /
:func:`or_masks`, so causal + padding is ``and_masks(causal_mask(T, T), padding_mask(pad))``.

Shape letters: B batch, H heads, T_q query length, T_k key length.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["causal_mask", "padding_mask", "and_masks", "or_masks", "window_mask", "to_additive"]


def _check_length(name: str, value: object) -> None:
    """A length is a non-negative int, or a symbolic size: a ``torch.SymInt`` under compile/export, a
    0-d integer tensor under ``torch.jit.trace``."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool:
        return
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} ({value!r})")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def causal_mask(t_q: int, t_k: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """Boolean causal mask, True where query ``i`` may attend key ``j``.  Shape (T_q, T_k).

    Aligned bottom-right when ``t_q != t_k`` (as ``torch.nn.attention.bias.causal_lower_right`` and
    FlashAttention do): the last query sees every key, so query ``i`` may attend key ``j`` iff
    ``j <= i + (t_k - t_q)``. For ``t_q == t_k`` this is the chapter's lower triangle.
    ``t_q`` / ``t_k`` may be symbolic sizes (``torch.SymInt``), so the mask traces under
    ``torch.compile(dynamic=True)`` and ``torch.export`` without fixing the length.
    """
    t_k = t_q if t_k is None else t_k
    _check_length("t_q", t_q)
    _check_length("t_k", t_k)
    i = torch.arange(t_q, device=device)[:, None]  # (T_q, 1)
    j = torch.arange(t_k, device=device)[None, :]  # (1, T_k)
    return j <= i + (t_k - t_q)  # (T_q, T_k)


def window_mask(
    t_q: int, t_k: int | None = None, *, window: int, device: torch.device | str | None = None
) -> Tensor:
    """Boolean sliding-window mask: query ``i`` may attend itself and the ``window - 1`` keys before it,
    ``i + (t_k - t_q) - window < j <= i + (t_k - t_q)`` (aligned bottom-right like :func:`causal_mask`,
    which it implies).  Shape (T_q, T_k)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    t_k = t_q if t_k is None else t_k
    _check_length("t_q", t_q)
    _check_length("t_k", t_k)
    i = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)  # (T_q, 1): the key aligned with query i
    j = torch.arange(t_k, device=device)[None, :]  # (1, T_k)
    return (j <= i) & (j > i - window)  # (T_q, T_k)


def padding_mask(key_padding_mask: Tensor) -> Tensor:
    """Turn a key padding mask (B, T_k), True = padding, into an attention mask (B, 1, 1, T_k),
    True = may attend, that broadcasts over heads and queries."""
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be a bool tensor (True = padding), got dtype {key_padding_mask.dtype}"
        )
    if key_padding_mask.dim() != 2:
        raise ValueError(
            f"key_padding_mask must have shape (batch, num_tokens), got shape {tuple(key_padding_mask.shape)}"
        )
    return (~key_padding_mask)[:, None, None, :]  # (B, 1, 1, T_k)


def and_masks(*masks: Tensor | None) -> Tensor | None:
    """Pairs allowed by every mask (broadcasting). ``None`` means "no restriction" and is skipped."""
    out: Tensor | None = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def or_masks(*masks: Tensor | None) -> Tensor | None:
    """Pairs allowed by any mask (broadcasting). ``None`` means "no restriction", so the result is None."""
    present = [m for m in masks if m is not None]
    if len(present) < len(masks) or not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out | m
    return out


def to_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean mask (True = may attend) to an additive float mask (0 where allowed, -inf elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
