"""Attention backends: one signature, a table of implementations.

Modules project, split and merge heads; the attention itself is one call,
``attention(q, k, v, mask=..., causal=..., window=..., scale=..., dropout_p=..., training=..., backend=...)``.
Every backend computes the same function as the eager reference
:func:`attnlab.functional.scaled_dot_product_attention` (tested), with the package's mask convention
(bool True = may attend; float = added to the scores), bottom-right causal alignment, sliding windows
(``window``, which implies causal) and grouped-query key/value heads (k, v with ``H_kv`` heads,
``H % H_kv == 0``; query head ``h`` uses key/value head ``h // (H // H_kv)``).

- ``"eager"``: the reference, from scratch (the chapter's math; can return the weights).
- ``"torch"``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's fused kernels).
- ``"flash"``: attnlab's own blocked, online-softmax kernel (:mod:`attnlab.flash`). It never builds a
  ``T_q x T_k`` matrix, so it takes the masks that say which *keys* each batch element may use (a
  padding mask (B, 1, 1, T_k) and its broadcast forms), plus ``causal`` and ``window``.
- ``"auto"``: the fastest path that gives the reference's numbers: ``"eager"`` when the call needs the
  weights, or needs dropout drawn like ``torch.nn.Dropout`` on a device where PyTorch's fused kernel
  draws it differently (see :data:`SDPA_DROPOUT_LIKE_NN_DROPOUT`); ``"torch"`` otherwise.
- anything added with :func:`register` (check it with :func:`attnlab.testing.assert_same_function`).

Nothing here reads tensor *values* to decide a path (no host sync), so every backend traces under
``torch.compile(fullgraph=True)`` and ``torch.export``; sizes may be symbolic (``torch.SymInt``).
A query whose keys are all masked out gets zeros on every backend.

Shape letters: B batch, H query heads, H_kv key/value heads, T_q / T_k query / key tokens,
d_k / d_v head sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import torch
from torch import Tensor

from attnlab import functional as F
from attnlab.masks import causal_mask, window_mask

__all__ = ["AttentionFn", "BACKENDS", "attention", "register", "unregister", "resolve"]

AttentionFn = Callable[..., Tensor]

# Device types on which torch's scaled_dot_product_attention with dropout_p > 0 draws the dropout mask
# exactly as torch.nn.Dropout does on the attention weights (same generator, same number of draws, same
# shape), so that "auto" may use it in training. Checked by tests/test_backends.py, not assumed: on CPU,
# PyTorch 2.13 runs dropout through its math kernel (aten::dropout on the weights). On CUDA the fused
# kernels draw with their own Philox stream, so there "auto" keeps the eager path in training with dropout
# (ask for backend="torch" to trade identical draws for speed).
SDPA_DROPOUT_LIKE_NN_DROPOUT: frozenset[str] = frozenset({"cpu"})

# Device types on which torch's scaled_dot_product_attention returns zeros (and zero, finite gradients)
# for a query whose keys are all masked out, as the reference does. Checked by tests/test_backends.py on
# CPU; elsewhere the torch backend makes such rows safe itself (see _torch_sdpa), without a host sync.
SDPA_ZEROS_FOR_EMPTY_ROWS: frozenset[str] = frozenset({"cpu"})

_BUILTIN = ("eager", "torch", "flash")


# --------------------------------------------------------------------------------------------------
# The backends
# --------------------------------------------------------------------------------------------------


def _eager(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout_p=dropout_p, training=training
    )  # (..., T_q, d_v)


def _structure_mask(t_q: int, t_k: int, causal: bool, window: int | None, device: torch.device) -> Tensor | None:
    """The causal / sliding-window part of the mask as a bool (T_q, T_k) matrix, or None."""
    if window is not None:
        return window_mask(t_q, t_k, window=window, device=device)  # (T_q, T_k)
    if causal:
        return causal_mask(t_q, t_k, device=device)  # (T_q, T_k)
    return None


def _torch_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    t_q, t_k = q.shape[-2], k.shape[-2]
    groups = F.kv_groups(q, k)
    enable_gqa = groups > 1 and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
    if groups > 1 and not enable_gqa:
        k, v = F.repeat_kv(k, groups), F.repeat_kv(v, groups)  # (..., H, T_k, d)
    # torch's is_causal is top-left aligned; it equals ours when T_q == T_k. (An `if`, not bool(...):
    # with symbolic sizes the comparison is a SymBool, which an `if` turns into a guard.)
    is_causal = False
    if causal and window is None and mask is None and t_q == t_k:
        is_causal = True
    attn_mask = mask
    if not is_causal:
        structure = _structure_mask(t_q, t_k, causal, window, q.device)  # (T_q, T_k) or None
        if structure is not None:
            if attn_mask is None or attn_mask.dtype == torch.bool:
                attn_mask = structure if attn_mask is None else structure & attn_mask  # (..., T_q, T_k)
            else:
                attn_mask = F.mask_before_softmax(attn_mask, structure)  # (..., T_q, T_k)
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)  # torch wants a float mask in the query's dtype
    keep_rows = None
    if attn_mask is not None and q.device.type not in SDPA_ZEROS_FOR_EMPTY_ROWS:
        # Make rows with no allowed key safe on any kernel, without a host sync: let them attend every
        # key (a finite, harmless softmax), then zero their output (their gradients are then zero).
        allowed = attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)
        keep_rows = allowed.any(dim=-1, keepdim=True)  # (..., T_q, 1)
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask | ~keep_rows  # (..., T_q, T_k)
        else:
            attn_mask = attn_mask.masked_fill(~keep_rows, 0.0)  # (..., T_q, T_k)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p if training else 0.0, is_causal=is_causal,
        scale=scale, enable_gqa=enable_gqa,
    )  # (..., T_q, d_v)
    if keep_rows is not None:
        out = out * keep_rows.to(out.dtype)  # (..., T_q, d_v)
    return out


def _flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    from attnlab.flash import flash_attention

    key_padding_mask = None if mask is None else _key_padding_from_mask(mask, q, k)
    return flash_attention(
        q, k, v, causal=causal, window=window, scale=scale, key_padding_mask=key_padding_mask,
        dropout_p=dropout_p if training else 0.0,
    )  # (..., T_q, d_v)


def _key_padding_from_mask(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """A padding-style attention mask, bool True = may attend, broadcastable to (B, 1, 1, T_k) — e.g.
    (B, 1, 1, T_k), (1, 1, 1, T_k), (B, 1, 1, 1), (1, T_k) — as the kernel's key padding mask (B, T_k),
    True = padding. Any other mask is refused with what the flash backend takes."""
    t_k = k.shape[-2]
    what = (
        "the flash backend takes a bool mask that only says which keys each batch element may attend "
        "(a key padding mask of shape (batch, 1, 1, num_keys), or a form of it that broadcasts, such as "
        "(1, 1, 1, num_keys) or (batch, 1, 1, 1)), together with causal= and window=; "
    )
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(
            what + f"got a {mask.dtype} mask of shape {tuple(mask.shape)}; pass a bool mask "
            "(True = may attend), or use backend='eager', 'torch' or 'auto' for float masks"
        )
    if q.dim() != 4 or mask.dim() > 4 or mask.dim() < 1:
        raise ValueError(
            what + f"got a mask of shape {tuple(mask.shape)} for q of shape {tuple(q.shape)} "
            "(the flash backend takes masks with 4-D q of shape (batch, heads, num_queries, d))"
        )
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (B|1, H|1, T_q|1, T_k|1)
    if m.shape[1] != 1 or m.shape[2] != 1 or m.shape[3] not in (1, t_k) or m.shape[0] not in (1, q.shape[0]):
        raise ValueError(
            what + f"got a mask of shape {tuple(mask.shape)} (batch={q.shape[0]}, num_keys={t_k}), which "
            "varies over heads or queries; use backend='eager', 'torch' or 'auto' for such masks"
        )
    return (~m[:, 0, 0, :]).expand(q.shape[0], t_k)  # (B, T_k), True = padding


BACKENDS: dict[str, AttentionFn] = {
    "eager": _eager,
    "torch": _torch_sdpa,
    "flash": _flash,
}


def register(name: str, fn: AttentionFn, *, replace: bool = False) -> None:
    """Add a backend: ``fn(q, k, v, *, mask, causal, window, scale, dropout_p, training) -> out``, with
    q (B, H, T_q, d_k), k (B, H_kv, T_k, d_k), v (B, H_kv, T_k, d_v) and out (B, H, T_q, d_v); mask bool
    (True = may attend) or float (added to the scores), broadcastable to (B|1, H|1, T_q|1, T_k) or None;
    causal bottom-right aligned; window None or an int >= 1 (implies causal). Afterwards
    ``backend=name`` works in :func:`attention` and in ``MultiHeadAttention``. Check the function first
    with :func:`attnlab.testing.assert_same_function`. ``replace=True`` replaces a backend registered
    before under the same name (the built-in ones cannot be replaced)."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name must be a non-empty str other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in backend and cannot be replaced; register under another name")
    if name in BACKENDS and not replace:
        raise ValueError(f"a backend named {name!r} is already registered; pass replace=True to replace it")
    BACKENDS[name] = fn


def unregister(name: str) -> None:
    """Remove a backend added with :func:`register`."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in backend and cannot be removed")
    if name not in BACKENDS:
        raise ValueError(f"no backend named {name!r} is registered; registered: {sorted(BACKENDS)}")
    del BACKENDS[name]


# --------------------------------------------------------------------------------------------------
# Choosing and calling a backend
# --------------------------------------------------------------------------------------------------


def resolve(
    backend: str,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    need_weights: bool = False,
    device: torch.device | str | None = None,
    **_ignored: object,
) -> str:
    """The backend that runs a call: ``backend`` itself, or for ``"auto"`` the fastest exact one
    (see the module docstring). ``device`` is the device of the call (default CPU). The choice depends on
    the call's arguments and device only, never on tensor values. (The keywords of earlier versions,
    ``mask``, ``causal``, ``t_q``, ``t_k``, are still accepted and no longer matter.)"""
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
    if need_weights:
        if backend not in ("auto", "eager"):
            raise ValueError(f"need_weights=True needs backend='eager' or 'auto', got {backend!r}")
        return "eager"
    if backend != "auto":
        return backend
    device_type = torch.device(device).type if device is not None else "cpu"
    if dropout_p > 0.0 and training and device_type not in SDPA_DROPOUT_LIKE_NN_DROPOUT:
        return "eager"
    return "torch"


def _check_call(q: object, k: object, v: object, causal: object, window: object, dropout_p: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., num_tokens, d), e.g. (batch, heads, "
                f"num_tokens, head_dim), got shape {tuple(t.shape)}"
            )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} ({causal!r})")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: Literal[False] = False,
) -> Tensor: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: Literal[True],
) -> tuple[Tensor, Tensor]: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention through the chosen backend. q (B, H, T_q, d_k), k (B, H_kv, T_k, d_k),
    v (B, H_kv, T_k, d_v) (any other leading layout that broadcasts works too). Returns ``out``
    (..., T_q, d_v), or ``(out, weights)`` with weights (..., T_q, T_k) when ``need_weights`` (eager only)."""
    _check_call(q, k, v, causal, window, dropout_p)
    name = resolve(backend, dropout_p=dropout_p, training=training, need_weights=need_weights, device=q.device)
    if need_weights:
        return F.scaled_dot_product_attention(
            q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout_p=dropout_p,
            training=training, return_weights=True,
        )
    if name != "eager":
        F._check_qkv(q, k, v)  # the eager reference checks its own inputs
        if mask is not None:
            F.check_mask(mask, q.shape[-2], k.shape[-2])
    return BACKENDS[name](
        q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout_p=dropout_p, training=training
    )
