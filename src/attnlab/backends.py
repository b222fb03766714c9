"""Attention backends: one signature, a table of implementations.

Modules project, split and merge heads; the attention itself is one call,
``attention(q, k, v, mask=..., causal=..., scale=..., dropout_p=..., training=..., backend=...)``.
Every backend computes the same function as the eager reference
:func:`attnlab.functional.scaled_dot_product_attention` (tested), with the package's mask convention
(bool True = may attend; float = added to the scores) and bottom-right causal alignment.

- ``"eager"``: the reference, from scratch (the chapter's math; can return the weights).
- ``"torch"``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's fused kernels).
- ``"flash"``: attnlab's own blocked, online-softmax kernel (:mod:`attnlab.flash`).
- ``"auto"``: the fastest exact path for the call: ``"torch"`` unless the call needs the weights,
  dropout drawn like ``torch.nn.Dropout`` (so the chapter's seeds reproduce), or has a query whose keys
  are all masked out (PyTorch gives NaN there); then ``"eager"``.

Shape letters: B batch, H heads, T_q / T_k query / key tokens, d_k / d_v head sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from attnlab import functional as F
from attnlab.masks import and_masks, causal_mask

AttentionFn = Callable[..., Tensor]


def _torch_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    t_q, t_k = q.shape[-2], k.shape[-2]
    is_causal = causal and mask is None and t_q == t_k
    if causal and not is_causal:  # torch's is_causal is top-left aligned: build ours explicitly
        causal_allowed = causal_mask(t_q, t_k, device=q.device)  # (T_q, T_k)
        if mask is None or mask.dtype == torch.bool:
            mask = and_masks(causal_allowed, mask)
        else:
            mask = F.mask_before_softmax(mask, causal_allowed)  # (..., T_q, T_k)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p if training else 0.0, is_causal=is_causal, scale=scale
    )  # (..., T_q, d_v)


def _flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    from attnlab.flash import flash_attention

    key_padding_mask = None
    if mask is not None:
        # The kernel never builds a T_q x T_k matrix, so it takes padding masks only: (B, 1, 1, T_k).
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
            raise ValueError(
                "the flash backend takes a key padding mask of shape (batch, 1, 1, num_keys) only, "
                f"got a {mask.dtype} mask of shape {tuple(mask.shape)}; use backend='eager' or 'torch'"
            )
        key_padding_mask = ~mask[:, 0, 0, :]  # (B, T_k), True = padding
    return flash_attention(
        q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
        dropout_p=dropout_p if training else 0.0,
    )


BACKENDS: dict[str, AttentionFn] = {
    "eager": F.scaled_dot_product_attention,
    "torch": _torch_sdpa,
    "flash": _flash,
}


def _has_empty_rows(mask: Tensor | None, causal: bool, t_q: int, t_k: int) -> bool:
    """Whether some query would have no key to attend to (then the eager path gives zeros)."""
    if causal and t_q > t_k:
        return True
    if mask is None:
        return False
    if mask.dtype != torch.bool:
        mask = ~torch.isneginf(mask)  # a float mask allows what it does not set to -inf
    if causal:
        mask = and_masks(causal_mask(t_q, t_k, device=mask.device), mask)
    return not bool(mask.any(dim=-1).all())


def resolve(
    backend: str,
    *,
    mask: Tensor | None,
    causal: bool,
    t_q: int,
    t_k: int,
    dropout_p: float,
    training: bool,
    need_weights: bool,
) -> str:
    """The backend that runs a call: ``backend`` itself, or for ``"auto"`` the fastest exact one."""
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
    if need_weights:
        if backend not in ("auto", "eager"):
            raise ValueError(f"need_weights=True needs backend='eager' or 'auto', got {backend!r}")
        return "eager"
    if backend != "auto":
        return backend
    if dropout_p > 0.0 and training:
        return "eager"
    if _has_empty_rows(mask, causal, t_q, t_k):
        return "eager"
    return "torch"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention through the chosen backend. Returns ``out`` (..., T_q, d_v), or ``(out, weights)``
    with weights (..., T_q, T_k) when ``need_weights`` (eager only)."""
    name = resolve(
        backend, mask=mask, causal=causal, t_q=q.shape[-2], t_k=k.shape[-2],
        dropout_p=dropout_p, training=training, need_weights=need_weights,
    )
    if need_weights:
        return F.scaled_dot_product_attention(
            q, k, v, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p, training=training,
            return_weights=True,
        )
    return BACKENDS[name](
        q, k, v, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p, training=training
    )
