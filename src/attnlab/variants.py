"""The efficient family: one registry of multi-head attention modules that all compute the same function.

Every entry of :data:`VARIANTS` is a module class with the chapter's constructor,
``(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False)`` (``d_out`` is the *total* output
width, split into ``num_heads`` heads of ``d_out // num_heads``), and
``forward(x: (B, T, d_in)) -> (B, T, d_out)``, causal. They differ only in how they get there (one fused
projection or three, einsum or matmul, PyTorch's kernels or attnlab's), which is what
``attnlab bench`` times. The variants follow the book's bonus notebook on efficient multi-head
attention (``ch03/02_bonus_efficient-multihead-attention``):

==========================  ================================================================================
``ch03_wrapper``            ``num_heads`` :class:`~attnlab.modules.CausalAttention` heads of width
                            ``d_out // num_heads``, concatenated, then an output projection
                            (the notebook's ``Ch03_MHA_Wrapper``).
``ch03``                    the chapter's :class:`~attnlab.modules.MultiHeadAttention`, eager math.
``combined_qkv``            one fused ``Linear(d_in, 3 * d_out)`` for queries, keys and values; eager math.
``einsum``                  projections, scores and context vectors written with ``torch.einsum``.
``sdpa``                    fused QKV + ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``.
``sdpa_no_flash``           the same with an explicit boolean causal mask instead of ``is_causal``
                            (PyTorch cannot use its flash kernel for an arbitrary mask on CUDA).
``torch_mha``               ``torch.nn.MultiheadAttention`` with a causal ``attn_mask``, ``need_weights=True``.
``torch_mha_no_weights``    the same with ``need_weights=False`` (lets PyTorch use its fused kernel).
``flex``                    fused QKV + PyTorch FlexAttention with a causal block mask.
``flash``                   the :class:`~attnlab.modules.MultiHeadAttention` layout + attnlab's own
                            blocked kernel :func:`attnlab.flash.flash_attention`.
``attnlab``                 :class:`~attnlab.modules.MultiHeadAttention` with its defaults
                            (``backend="auto"``), what a user of attnlab gets.
==========================  ================================================================================

:func:`from_reference` builds any variant carrying the weights of an :class:`attnlab.MultiHeadAttention`,
so that the two compute the same function (tested in ``tests/test_variants.py``).

A variant that cannot run in this environment raises :class:`VariantUnavailableError` with the reason;
nothing ever falls back silently to another implementation. On torch 2.13 for CPU, ``flex`` runs the
forward pass (eagerly: PyTorch's unfused implementation, which materialises the scores; under
``torch.compile``: a fused C++ kernel) but PyTorch has no FlexAttention backward on CPU, so a ``flex``
forward that autograd would have to differentiate raises :class:`VariantUnavailableError`.

Shape letters: B batch, T num_tokens, d_in input width, d_out output width, H num_heads,
hd head_dim = d_out / H.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from attnlab import backends
from attnlab import functional as F
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.masks import causal_mask
from attnlab.modules import (
    CausalAttention,
    MultiHeadAttention,
    check_dropout,
    check_heads,
    check_positive_int,
    check_x,
)

if TYPE_CHECKING:  # imported where used: some torch builds lack FlexAttention
    from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "SDPAMHA",
    "VARIANTS",
    "AttnlabMHA",
    "Ch03MHA",
    "Ch03Wrapper",
    "CombinedQKV",
    "EinsumMHA",
    "FlashMHA",
    "FlexMHA",
    "SDPANoFlashMHA",
    "TorchMHA",
    "TorchMHANoWeights",
    "VariantUnavailableError",
    "from_reference",
    "variant_names",
]


class VariantUnavailableError(RuntimeError):
    """A variant cannot run in this environment (missing PyTorch feature, device, ...); the message
    says which variant and why."""


class _Variant(nn.Module):
    """What every registered class is: an ``nn.Module`` with the reference's constructor ``(d_in, d_out,
    context_length, dropout, num_heads, qkv_bias=False)``, ``forward(x)`` (B, T, d_in) -> (B, T, d_out), and
    :meth:`load_reference`."""

    variant_name: ClassVar[str]  # the registry name, set by @_register

    def load_reference(self, mha: MultiHeadAttention) -> None:
        """Copy the weights of the reference ``mha`` into this layout (then both compute the same function)."""
        raise NotImplementedError


_V = TypeVar("_V", bound=_Variant)

VARIANTS: dict[str, type[_Variant]] = {}


def _register(name: str) -> Callable[[type[_V]], type[_V]]:
    def add(cls: type[_V]) -> type[_V]:
        if name in VARIANTS:
            raise AttnlabInputError(f"variant {name!r} is already registered")
        cls.variant_name = name
        VARIANTS[name] = cls
        return cls

    return add


def variant_names() -> list[str]:
    """The registered names, in registry (teaching) order."""
    return list(VARIANTS)


def _check_args(d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int) -> None:
    for name, value in (("d_in", d_in), ("d_out", d_out), ("context_length", context_length)):
        check_positive_int(name, value)
    check_dropout(dropout)
    check_heads(d_out, num_heads)


def _split_heads(t: Tensor, num_heads: int) -> Tensor:
    b, num_tokens, d_out = t.shape  # (B, T, d_out)
    return t.view(b, num_tokens, num_heads, d_out // num_heads).transpose(1, 2)  # (B, H, T, hd)


def _merge_heads(t: Tensor) -> Tensor:
    b, num_heads, num_tokens, head_dim = t.shape  # (B, H, T, hd)
    return t.transpose(1, 2).contiguous().view(b, num_tokens, num_heads * head_dim)  # (B, T, d_out)


# --------------------------------------------------------------------------------------------------
# The chapter's own classes
# --------------------------------------------------------------------------------------------------


@_register("ch03_wrapper")
class Ch03Wrapper(_Variant):
    """``num_heads`` independent causal heads of width ``d_out // num_heads`` (each a
    :class:`~attnlab.modules.CausalAttention` with its own three projections), concatenated, then an
    output projection ``Linear(d_out, d_out)`` (the bonus notebook's ``Ch03_MHA_Wrapper``).

    x: (B, T, d_in)   ->   (B, T, d_out)
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        _check_args(d_in, d_out, context_length, dropout, num_heads)
        self.d_in, self.d_out, self.num_heads = d_in, d_out, num_heads
        head_dim = d_out // num_heads
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, head_dim, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        context = torch.cat([head(x) for head in self.heads], dim=-1)  # H x (B, T, hd) -> (B, T, d_out)
        return self.out_proj(context)  # (B, T, d_out)

    def load_reference(self, mha: MultiHeadAttention) -> None:
        hd = self.d_out // self.num_heads
        for h, head in enumerate(self.heads):
            rows = slice(h * hd, (h + 1) * hd)  # head h's output features in the reference
            for name in ("W_query", "W_key", "W_value"):
                ref, mine = getattr(mha, name), getattr(head, name)
                mine.weight.copy_(ref.weight[rows])  # (hd, d_in)
                if ref.bias is not None:
                    mine.bias.copy_(ref.bias[rows])  # (hd,)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())


class _MHALayout(MultiHeadAttention, _Variant):
    """A :class:`MultiHeadAttention` with a fixed backend and the variants' constructor."""

    backend_name = "auto"

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias, backend=self.backend_name)

    def load_reference(self, mha: MultiHeadAttention) -> None:
        self.load_state_dict(mha.state_dict())


@_register("ch03")
class Ch03MHA(_MHALayout):
    """The chapter's :class:`~attnlab.modules.MultiHeadAttention` with the eager (from-scratch) math."""

    backend_name = "eager"


# --------------------------------------------------------------------------------------------------
# One fused projection for queries, keys and values
# --------------------------------------------------------------------------------------------------


class _FusedQKV(_Variant):
    """Shared layout: ``qkv = Linear(d_in, 3 * d_out)`` (rows: queries, then keys, then values) and
    ``out_proj = Linear(d_out, d_out)``; subclasses say how attention runs (:meth:`attend`)."""

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        _check_args(d_in, d_out, context_length, dropout, num_heads)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads, self.head_dim = num_heads, d_out // num_heads
        self.dropout_p = float(dropout)
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # (B, H, T, hd) x3 -> (B, H, T, hd)
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        check_x(x, self.d_in, (3,), self.context_length, dtype=self.qkv.weight.dtype)
        b, num_tokens, _ = x.shape
        qkv = self.qkv(x)  # (B, T, 3 * d_out)
        qkv = qkv.view(b, num_tokens, 3, self.num_heads, self.head_dim)  # (B, T, 3, H, hd)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        queries, keys, values = qkv.unbind(0)  # 3 x (B, H, T, hd)
        context = self.attend(queries, keys, values)  # (B, H, T, hd)
        return self.out_proj(_merge_heads(context))  # (B, T, d_out)

    def load_reference(self, mha: MultiHeadAttention) -> None:
        self.qkv.weight.copy_(
            torch.cat([mha.W_query.weight, mha.W_key.weight, mha.W_value.weight], dim=0)  # (3 * d_out, d_in)
        )
        if mha.W_query.bias is not None:
            self.qkv.bias.copy_(torch.cat([mha.W_query.bias, mha.W_key.bias, mha.W_value.bias]))  # (3*d_out,)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())


@_register("combined_qkv")
class CombinedQKV(_FusedQKV):
    """Fused QKV projection, then the eager (from-scratch) attention math."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return backends.attention(
            q, k, v, causal=True, dropout_p=self.dropout_p, training=self.training, backend="eager"
        )  # (B, H, T, hd)


# --------------------------------------------------------------------------------------------------
# einsum
# --------------------------------------------------------------------------------------------------


@_register("einsum")
class EinsumMHA(_Variant):
    """Projections, scores and context vectors as ``torch.einsum`` contractions (the notebook's
    ``MHAEinsum``); the causal mask and the softmax are the shared ones of :mod:`attnlab.functional`.
    Weights are ``(d_in, d_out)`` parameters (``x @ W``, as ``SelfAttention_v1``), initialised like
    ``nn.Linear``.

    x: (B, T, d_in)   ->   (B, T, d_out)
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        _check_args(d_in, d_out, context_length, dropout, num_heads)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads, self.head_dim = num_heads, d_out // num_heads
        self.W_query = nn.Parameter(torch.empty(d_in, d_out))
        self.W_key = nn.Parameter(torch.empty(d_in, d_out))
        self.W_value = nn.Parameter(torch.empty(d_in, d_out))
        if qkv_bias:
            self.bias_q = nn.Parameter(torch.zeros(d_out))
            self.bias_k = nn.Parameter(torch.zeros(d_out))
            self.bias_v = nn.Parameter(torch.zeros(d_out))
        else:
            self.register_parameter("bias_q", None)
            self.register_parameter("bias_k", None)
            self.register_parameter("bias_v", None)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.d_in)
        for w in (self.W_query, self.W_key, self.W_value):
            nn.init.kaiming_uniform_(w.T, a=math.sqrt(5))  # as nn.Linear on the (d_out, d_in) view
        for bias in (self.bias_q, self.bias_k, self.bias_v):
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        check_x(x, self.d_in, (3,), self.context_length, dtype=self.W_query.dtype)
        num_tokens = x.shape[1]
        queries = torch.einsum("btd,de->bte", x, self.W_query)  # (B, T, d_out)
        keys = torch.einsum("btd,de->bte", x, self.W_key)  # (B, T, d_out)
        values = torch.einsum("btd,de->bte", x, self.W_value)  # (B, T, d_out)
        if self.bias_q is not None:
            queries, keys, values = queries + self.bias_q, keys + self.bias_k, values + self.bias_v
        queries = _split_heads(queries, self.num_heads)  # (B, H, T, hd)
        keys = _split_heads(keys, self.num_heads)  # (B, H, T, hd)
        values = _split_heads(values, self.num_heads)  # (B, H, T, hd)

        scores = torch.einsum("bhqd,bhkd->bhqk", queries, keys) / math.sqrt(self.head_dim)  # (B, H, T, T)
        allowed = causal_mask(num_tokens, num_tokens, device=x.device)  # (T, T)
        weights = F.softmax(F.mask_before_softmax(scores, allowed), dim=-1)  # (B, H, T, T)
        weights = self.dropout(weights)  # (B, H, T, T)
        context = torch.einsum("bhqk,bhkd->bhqd", weights, values)  # (B, H, T, hd)
        return self.out_proj(_merge_heads(context))  # (B, T, d_out)

    def load_reference(self, mha: MultiHeadAttention) -> None:
        for mine, ref in ((self.W_query, mha.W_query), (self.W_key, mha.W_key), (self.W_value, mha.W_value)):
            mine.copy_(ref.weight.T)  # (d_in, d_out)
        if mha.W_query.bias is not None:
            self.bias_q.copy_(mha.W_query.bias)
            self.bias_k.copy_(mha.W_key.bias)
            self.bias_v.copy_(mha.W_value.bias)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())


# --------------------------------------------------------------------------------------------------
# PyTorch's scaled_dot_product_attention
# --------------------------------------------------------------------------------------------------


@_register("sdpa")
class SDPAMHA(_FusedQKV):
    """Fused QKV + ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)`` (the
    notebook's ``MHAPyTorchScaledDotProduct``), through the ``"torch"`` backend."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return backends.attention(
            q, k, v, causal=True, dropout_p=self.dropout_p, training=self.training, backend="torch"
        )  # (B, H, T, hd)


@_register("sdpa_no_flash")
class SDPANoFlashMHA(_FusedQKV):
    """Fused QKV + ``scaled_dot_product_attention`` with an explicit boolean causal mask
    (``attn_mask``, True = may attend) instead of ``is_causal`` (the notebook's
    ``MHAPyTorchSDPAWithoutFlash``: on CUDA an arbitrary mask rules out the flash kernel)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        allowed = causal_mask(q.shape[-2], k.shape[-2], device=q.device)  # (T, T)
        return backends.attention(
            q, k, v, mask=allowed, causal=False, dropout_p=self.dropout_p, training=self.training,
            backend="torch",
        )  # (B, H, T, hd)


# --------------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# --------------------------------------------------------------------------------------------------


@_register("torch_mha")
class TorchMHA(_Variant):
    """``torch.nn.MultiheadAttention(batch_first=True)`` with a causal ``attn_mask`` and
    ``need_weights=True`` (it also computes the head-averaged attention weights, which are discarded).

    Its ``in_proj_weight`` is the reference's ``[W_query; W_key; W_value]`` and its own ``out_proj`` is the
    output projection (the notebook adds a second projection after it; here the function is exactly the
    chapter's). ``in_proj_bias`` exists only with ``qkv_bias=True``; ``out_proj`` always has a bias.
    ``nn.MultiheadAttention`` projects queries from ``embed_dim`` features, so ``d_in`` must equal ``d_out``.
    Note ``nn.MultiheadAttention``'s boolean ``attn_mask`` convention is the opposite of attnlab's:
    True = *not* allowed.

    x: (B, T, d_in = d_out)   ->   (B, T, d_out)
    """

    need_weights = True
    mask: Tensor  # buffer (T_max, T_max), True = masked (torch's convention)

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        _check_args(d_in, d_out, context_length, dropout, num_heads)
        if d_in != d_out:
            raise AttnlabInputError(
                f"{self.variant_name} needs d_in == d_out (torch.nn.MultiheadAttention projects queries "
                f"from embed_dim = d_out features), got d_in={d_in} and d_out={d_out}"
            )
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads = num_heads
        self.attn = nn.MultiheadAttention(d_out, num_heads, dropout=dropout, bias=True, batch_first=True)
        if not qkv_bias:
            self.attn.register_parameter("in_proj_bias", None)  # out_proj keeps its bias, as the reference's
        future = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", future, persistent=False)  # (T_max, T_max), True = masked (torch's)

    def forward(self, x: Tensor) -> Tensor:
        check_x(x, self.d_in, (3,), self.context_length, dtype=self.attn.out_proj.weight.dtype)
        num_tokens = x.shape[1]
        out, _ = self.attn(
            x, x, x, attn_mask=self.mask[:num_tokens, :num_tokens], need_weights=self.need_weights
        )  # (B, T, d_out)
        return out

    def load_reference(self, mha: MultiHeadAttention) -> None:
        self.attn.in_proj_weight.copy_(
            torch.cat([mha.W_query.weight, mha.W_key.weight, mha.W_value.weight], dim=0)  # (3 * d_out, d_in)
        )
        if mha.W_query.bias is not None:
            self.attn.in_proj_bias.copy_(torch.cat([mha.W_query.bias, mha.W_key.bias, mha.W_value.bias]))
        self.attn.out_proj.weight.copy_(mha.out_proj.weight)
        self.attn.out_proj.bias.copy_(mha.out_proj.bias)


@_register("torch_mha_no_weights")
class TorchMHANoWeights(TorchMHA):
    """:class:`TorchMHA` with ``need_weights=False``: PyTorch skips the averaged weights and can use its
    fused scaled-dot-product kernel."""

    need_weights = False


# --------------------------------------------------------------------------------------------------
# FlexAttention
# --------------------------------------------------------------------------------------------------


def _causal_mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """FlexAttention ``mask_mod``: True where query ``q_idx`` may attend key ``kv_idx`` (T_q == T_k)."""
    return q_idx >= kv_idx


def _flex_unavailable_reason() -> str | None:
    """Why FlexAttention cannot be used at all here (None if it can). Monkeypatched by tests."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({exc})"
    return None


def _flex_backward_unavailable_reason(device: torch.device) -> str | None:
    """Why FlexAttention cannot be differentiated on ``device`` (None if it can)."""
    if device.type == "cpu":
        return (
            f"PyTorch FlexAttention has no backward pass on CPU (torch {torch.__version__}); "
            "run the forward only (torch.no_grad(), `attnlab bench --mode fwd`) or use a CUDA device"
        )
    return None


@_register("flex")
class FlexMHA(_FusedQKV):
    """Fused QKV + PyTorch FlexAttention (``torch.nn.attention.flex_attention``) with a causal
    ``BlockMask`` (built once per length and device). Called eagerly, PyTorch runs its unfused
    implementation (it materialises the scores and warns about it); under ``torch.compile`` it generates a
    fused kernel (C++ on CPU). On CPU only the forward pass exists: a forward that autograd would have to
    differentiate raises :class:`VariantUnavailableError`.

    Requires T_q == T_k (self-attention), as every variant here.
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        reason = _flex_unavailable_reason()
        if reason is not None:
            raise VariantUnavailableError(f"variant 'flex' is unavailable: {reason}")
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)
        if dropout > 0.0:
            raise AttnlabInputError(
                f"variant 'flex' does not support dropout on the attention weights, got dropout={dropout}; "
                "use dropout=0.0"
            )
        self._block_masks: dict[tuple[int, str], BlockMask] = {}

    def _block_mask(self, num_tokens: int, device: torch.device) -> BlockMask:
        from torch.nn.attention.flex_attention import create_block_mask

        key = (num_tokens, str(device))
        if key not in self._block_masks:
            self._block_masks[key] = create_block_mask(
                _causal_mask_mod, None, None, num_tokens, num_tokens, device=str(device)
            )  # covers (T, T), broadcast over B and H
        return self._block_masks[key]

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            reason = _flex_backward_unavailable_reason(q.device)
            if reason is not None:
                raise VariantUnavailableError(f"variant 'flex' is unavailable for training here: {reason}")
        return flex_attention(q, k, v, block_mask=self._block_mask(q.shape[-2], q.device))  # (B, H, T, hd)


# --------------------------------------------------------------------------------------------------
# attnlab's kernel and attnlab's default module
# --------------------------------------------------------------------------------------------------


def _flash_unavailable_reason() -> str | None:
    """Why attnlab's flash kernel cannot be used (None if it can). Monkeypatched by tests."""
    try:
        from attnlab.flash import flash_attention  # noqa: F401
    except ImportError as exc:
        return f"attnlab.flash.flash_attention cannot be imported ({exc})"
    return None


@_register("flash")
class FlashMHA(_MHALayout):
    """The :class:`~attnlab.modules.MultiHeadAttention` layout (three projections, split heads, output
    projection) with attention by attnlab's blocked, online-softmax kernel
    (:func:`attnlab.flash.flash_attention`, through the ``"flash"`` backend)."""

    backend_name = "flash"

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        reason = _flash_unavailable_reason()
        if reason is not None:
            raise VariantUnavailableError(f"variant 'flash' is unavailable: {reason}")
        super().__init__(d_in, d_out, context_length, dropout, num_heads, qkv_bias)


@_register("attnlab")
class AttnlabMHA(_MHALayout):
    """:class:`~attnlab.modules.MultiHeadAttention` with its default settings (``backend="auto"``): what
    ``attnlab.MultiHeadAttention(d_in, d_out, context_length, dropout, num_heads)`` runs."""

    backend_name = "auto"


# --------------------------------------------------------------------------------------------------
# Building a variant from the reference
# --------------------------------------------------------------------------------------------------


def from_reference(name: str, mha: MultiHeadAttention) -> nn.Module:
    """The variant ``name`` with the weights of ``mha`` (an :class:`attnlab.MultiHeadAttention`, causal),
    copied into the variant's own layout, on ``mha``'s device and dtype, in ``mha``'s train/eval mode:
    the two compute the same function.

    Raises ``ValueError`` for an unknown name or a bidirectional ``mha``, ``TypeError`` if ``mha`` is not a
    :class:`MultiHeadAttention`, :class:`VariantUnavailableError` if the variant cannot run here.
    """
    if name not in VARIANTS:
        raise AttnlabInputError(f"unknown variant {name!r}; valid names: {', '.join(VARIANTS)}")
    if not isinstance(mha, MultiHeadAttention):
        raise AttnlabInputTypeError(f"mha must be an attnlab.MultiHeadAttention, got {type(mha).__name__}")
    if not mha.causal:
        raise AttnlabInputError("from_reference needs a causal MultiHeadAttention (causal=True); every variant is causal")
    param = mha.W_query.weight
    variant = VARIANTS[name](
        mha.d_in, mha.d_out, mha.context_length, mha.dropout.p, mha.num_heads,
        mha.W_query.bias is not None,
    )
    variant.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        variant.load_reference(mha)
    variant.train(mha.training)
    return variant


# The modern family (grouped-query, multi-query, sliding-window, rotary, latent, cached), each with its
# plain reference: a registry of its own, since these are not the chapter's function (see attnlab.modern).
from attnlab.modern import MODERN, ModernVariant, build_modern, plain_reference  # noqa: F401 (re-exported)
