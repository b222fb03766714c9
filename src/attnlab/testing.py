"""A test harness for attention backends: is a function the same function as attnlab's reference?

:func:`assert_same_function` runs an attention function with the package signature (the one
:func:`attnlab.backends.register` takes) on a grid of cases — odd sizes, fewer keys than queries and the
reverse, bool and float masks in every broadcast form, causal, sliding window, grouped-query heads — and
compares its outputs and gradients with the eager reference computed in float64. Use it on your own
backend before registering it (a FlexAttention ``score_mod``, a vendor kernel)::

    from attnlab import backends, testing

    def my_attention(q, k, v, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0,
                     training=True):
        ...

    testing.assert_same_function(my_attention)        # raises AssertionError naming the failing case
    backends.register("mine", my_attention)

A backend that takes only some masks says so with ``masks=``; lower precision is checked with the rule of
flash-attention's own tests: the error against float64 is at most twice that of plain PyTorch math in the
same dtype.

Shape letters: B batch, H query heads, H_kv key/value heads, T_q / T_k tokens, d head size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from attnlab import functional as F
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError

__all__ = ["MASK_KINDS", "Case", "assert_same_function", "cases"]

# The masks the harness tries (bool True = may attend unless said otherwise):
MASK_KINDS = (
    "none",  # no mask
    "padding",  # (B, 1, 1, T_k) bool: a key padding mask in the package convention
    "padding_broadcast",  # (1, 1, 1, T_k) and (B, 1, 1, 1) bool
    "full",  # (B, H, T_q, T_k) bool, some rows fully masked
    "float",  # (1, H, T_q, T_k) float, added to the scores, with -inf entries
)


@dataclass(frozen=True)
class Case:
    """One call of the harness: sizes and options."""

    t_q: int
    t_k: int
    heads: int
    kv_heads: int
    causal: bool
    window: int | None
    mask: str
    d: int = 8
    batch: int = 2

    def __str__(self) -> str:
        return (
            f"T_q={self.t_q}, T_k={self.t_k}, H={self.heads}, H_kv={self.kv_heads}, causal={self.causal}, "
            f"window={self.window}, mask={self.mask!r}, d={self.d}, batch={self.batch}"
        )


def cases(
    *,
    sizes: Sequence[tuple[int, int]] = ((1, 1), (3, 3), (5, 9), (9, 5), (97, 97), (4, 0)),
    masks: Iterable[str] = MASK_KINDS,
    causal: bool = True,
    window: bool = True,
    gqa: bool = True,
) -> list[Case]:
    """The grid of cases :func:`assert_same_function` runs (4 query heads; with ``gqa`` also 2 and 1
    key/value heads; with ``window`` a window of 2 and 5, which imply causal)."""
    masks = tuple(masks)
    for m in masks:
        if m not in MASK_KINDS:
            raise AttnlabInputError(f"masks must be among {MASK_KINDS}, got {m!r}")
    structures: list[tuple[bool, int | None]] = [(False, None)]
    if causal:
        structures.append((True, None))
    if window:
        structures += [(True, 2), (True, 5)]
    kv_heads = (4, 2, 1) if gqa else (4,)
    out = []
    for (t_q, t_k), (is_causal, win), m in itertools.product(sizes, structures, masks):
        out.append(Case(t_q, t_k, 4, 4, is_causal, win, m))
    for (t_q, t_k), h_kv in itertools.product(sizes[:4], kv_heads[1:]):
        for is_causal, win in structures:
            out.append(Case(t_q, t_k, 4, h_kv, is_causal, win, masks[min(1, len(masks) - 1)]))
    return out


def _inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    b, h, h_kv, d = case.batch, case.heads, case.kv_heads, case.d
    q = torch.randn(b, h, case.t_q, d, generator=g, dtype=torch.float64)  # (B, H, T_q, d)
    k = torch.randn(b, h_kv, case.t_k, d, generator=g, dtype=torch.float64)  # (B, H_kv, T_k, d)
    v = torch.randn(b, h_kv, case.t_k, d, generator=g, dtype=torch.float64)  # (B, H_kv, T_k, d)
    grad = torch.randn(b, h, case.t_q, d, generator=g, dtype=torch.float64)  # (B, H, T_q, d)
    return tuple(t.to(device) for t in (q, k, v, grad))


def _masks(case: Case, device: torch.device, seed: int) -> list[Tensor | None]:
    """The masks of one case (bool True = may attend, or float), float64 where float."""
    g = torch.Generator().manual_seed(seed + 1)
    b, h, t_q, t_k = case.batch, case.heads, case.t_q, case.t_k
    if case.mask == "none":
        return [None]
    if case.mask == "padding":
        keep = torch.rand(b, t_k, generator=g) > 0.3  # (B, T_k)
        if t_k:
            keep[0, -1] = True
            keep[1, :] = False  # the second batch element has no key at all: rows of zeros
        return [keep[:, None, None, :].to(device)]  # (B, 1, 1, T_k)
    if case.mask == "padding_broadcast":
        keys = (torch.rand(1, 1, 1, t_k, generator=g) > 0.3).to(device)  # (1, 1, 1, T_k)
        per_batch = torch.tensor([True, False]).reshape(b, 1, 1, 1).to(device)  # (B, 1, 1, 1)
        return [keys, per_batch]
    if case.mask == "full":
        full = torch.rand(b, h, t_q, t_k, generator=g) > 0.4  # (B, H, T_q, T_k)
        if t_q:
            full[:, :, 0, :] = False  # a fully masked row
        return [full.to(device)]
    add = torch.randn(1, h, t_q, t_k, generator=g, dtype=torch.float64)  # (1, H, T_q, T_k)
    add = add.masked_fill(torch.rand(1, h, t_q, t_k, generator=g) < 0.3, float("-inf"))
    return [add.to(device)]


def _run(
    fn: Callable[..., Tensor],
    case: Case,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad: Tensor,
    mask: Tensor | None,
    dtype: torch.dtype,
    check_grad: bool,
) -> tuple[Tensor, ...]:
    qi, ki, vi = (t.detach().to(dtype).requires_grad_(check_grad) for t in (q, k, v))
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    out = fn(qi, ki, vi, mask=m, causal=case.causal, window=case.window, scale=None, dropout_p=0.0, training=True)
    if not isinstance(out, Tensor):
        raise AssertionError(  # noqa: TRY004  (the harness reports every failure as an AssertionError)
            f"[{case}] the function returned {type(out).__name__}, not a Tensor"
        )
    if tuple(out.shape) != tuple(q.shape[:-1]) + (v.shape[-1],):
        raise AssertionError(
            f"[{case}] output shape {tuple(out.shape)}, expected {tuple(q.shape[:-1]) + (v.shape[-1],)}"
        )
    if not check_grad:
        return (out.detach().double(),)
    if not out.requires_grad:
        raise AssertionError(f"[{case}] the output has no gradient: it must be differentiable in q, k and v")
    (dq, dk, dv) = torch.autograd.grad(out, (qi, ki, vi), grad.to(out.dtype), allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip((dq, dk, dv), (qi, ki, vi)))
    return (out.detach().double(), *(g.double() for g in grads))


def _plain_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, case: Case) -> Tensor:
    """Plain PyTorch math in q's dtype (the low-precision yardstick of the tolerance rule)."""
    groups = F.kv_groups(q, k)
    k, v = F.repeat_kv(k, groups), F.repeat_kv(v, groups)  # (B, H, T_k, d)
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5  # (B, H, T_q, T_k)
    allowed = None
    if case.window is not None:
        from attnlab.masks import window_mask

        allowed = window_mask(case.t_q, case.t_k, window=case.window, device=q.device)
    elif case.causal:
        from attnlab.masks import causal_mask

        allowed = causal_mask(case.t_q, case.t_k, device=q.device)
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask if allowed is None else allowed & mask
    elif mask is not None:
        scores = scores + mask.to(scores.dtype)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0) if case.t_k else scores  # (B, H, T_q, T_k)
    return weights @ v  # (B, H, T_q, d)


def assert_same_function(
    fn: Callable[..., Tensor] | str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    sizes: Sequence[tuple[int, int]] = ((1, 1), (3, 3), (5, 9), (9, 5), (97, 97), (4, 0)),
    masks: Iterable[str] = MASK_KINDS,
    causal: bool = True,
    window: bool = True,
    gqa: bool = True,
    grad: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> int:
    """Check that ``fn(q, k, v, *, mask, causal, window, scale, dropout_p, training)`` computes the same
    function as :func:`attnlab.functional.scaled_dot_product_attention` in float64: outputs, and with
    ``grad`` the gradients of q, k and v, on every case of :func:`cases` (``sizes``: (T_q, T_k) pairs;
    ``masks``: which of :data:`MASK_KINDS` the function takes; ``causal`` / ``window`` / ``gqa``: whether
    to try those). ``fn`` may also be the name of a registered backend.

    Tolerance: float32 / float64 compare with ``atol`` / ``rtol`` (default 2e-5 / 2e-5 for float32,
    1e-10 for float64); float16 / bfloat16 pass when the largest error against float64 is at most twice
    that of plain PyTorch math in the same dtype (plus ``atol``, default 1e-3 of the reference's scale).
    Raises ``AssertionError`` naming the first case that differs; returns the number of calls checked."""
    if isinstance(fn, str):
        from attnlab import backends

        if fn not in backends.BACKENDS:
            raise AttnlabInputError(f"fn must be callable or a registered backend {sorted(backends.BACKENDS)}, got {fn!r}")
        fn = backends.BACKENDS[fn]
    if not callable(fn):
        raise AttnlabInputTypeError(f"fn must be callable or a backend name, got {type(fn).__name__}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise AttnlabInputTypeError(f"dtype must be a floating-point dtype, got {dtype}")
    low = dtype in (torch.float16, torch.bfloat16)
    if atol is None:
        atol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 1e-3)
    if rtol is None:
        rtol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 0.0)
    dev = torch.device(device)
    checked = 0
    for n, case in enumerate(cases(sizes=sizes, masks=masks, causal=causal, window=window, gqa=gqa)):
        q, k, v, g = _inputs(case, torch.float64, dev, seed + n)
        for mask in _masks(case, dev, seed + n):
            ref = _run(cast(Callable[..., Tensor], _reference), case, q, k, v, g, mask, torch.float64, grad)
            got = _run(fn, case, q, k, v, g, mask, dtype, grad)
            names = ("output", "grad of q", "grad of k", "grad of v")
            plain = None
            if low:
                qi, ki, vi = (t.to(dtype) for t in (q, k, v))
                m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
                plain = _plain_math(qi, ki, vi, m, case).double()
            for name, r, o in zip(names, ref, got):
                where = f"[{case}, mask shape {None if mask is None else tuple(mask.shape)}] {name}"
                if not torch.isfinite(o).all():
                    raise AssertionError(f"{where}: non-finite values from finite inputs")
                if low:
                    if name != "output":
                        continue  # the rule bounds outputs; gradients are checked in float32/64
                    assert plain is not None
                    bound = 2 * (plain - r).abs().max().item() + atol * max(1.0, r.abs().max().item())
                    err = (o - r).abs().max().item() if o.numel() else 0.0
                    if err > bound:
                        raise AssertionError(f"{where}: max error {err:.3g} > 2x plain {dtype} math ({bound:.3g})")
                else:
                    try:
                        torch.testing.assert_close(o, r, atol=atol, rtol=rtol)
                    except AssertionError as e:
                        raise AssertionError(f"{where} differs from the float64 reference: {e}") from None
            checked += 1
    return checked


def _reference(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    return cast(Tensor, F.scaled_dot_product_attention(q, k, v, **kw))  # **kw never holds return_weights
