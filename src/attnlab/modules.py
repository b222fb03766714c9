"""The chapter's classes, in teaching order, each adding one idea to the last.

1. :class:`SelfAttention_v1` — trainable query/key/value weight matrices (``nn.Parameter``, ``x @ W``).
2. :class:`SelfAttention_v2` — the same with ``nn.Linear`` layers (better initialisation, optional bias).
3. :class:`CausalAttention` — a causal mask (a buffer) and dropout on the weights, over a batch.
4. :class:`MultiHeadAttentionWrapper` — several causal heads side by side, outputs concatenated.
5. :class:`MultiHeadAttention` — one module with split weights, an output projection, and (beyond the
   book) bidirectional mode, padding masks, returned weights and fast backends.

Constructor signatures, the order in which parameters are created, and parameter/buffer names are
the book's, so ``torch.manual_seed(123)`` gives the book's numbers and a ``state_dict`` saved from the
book's classes loads with ``strict=True``. The math is :mod:`attnlab.functional` (through
:mod:`attnlab.backends`); these modules only project, split and merge heads.

Shape letters: B batch, T num_tokens, d_in input width, d_out output width, H num_heads,
hd head_dim = d_out / H.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab import backends
from attnlab import functional as F
from attnlab.masks import and_masks, padding_mask

__all__ = [
    "SelfAttention_v1",
    "SelfAttention_v2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "SelfAttentionV1",
    "SelfAttentionV2",
]


# --------------------------------------------------------------------------------------------------
# Argument checks: every message names the argument, the expected and the actual value
# --------------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_dropout(dropout: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")


def _check_heads(d_out: int, num_heads: int) -> None:
    _check_positive_int("num_heads", num_heads)
    if d_out % num_heads != 0:
        raise ValueError(
            f"d_out must be divisible by num_heads, got d_out={d_out} and num_heads={num_heads} "
            f"(try num_heads in {[h for h in range(1, d_out + 1) if d_out % h == 0]})"
        )


def _check_x(
    x: Tensor, d_in: int, ranks: tuple[int, ...], context_length: int | None = None, *, dtype: torch.dtype
) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype} (convert it with x.float())")
    if x.dtype != dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but the module's parameters are {dtype}: convert one to the other, "
            f"e.g. x.to({dtype}) or module.to({x.dtype})"
        )
    layouts = {2: "(num_tokens, d_in)", 3: "(batch, num_tokens, d_in)"}
    if x.dim() not in ranks:
        want = " or ".join(f"{r} {layouts[r]}" for r in ranks)
        raise ValueError(f"x must have {want} dimensions, got {x.dim()} with shape {tuple(x.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x must have d_in={d_in} features in its last dimension, got {x.shape[-1]}")
    if context_length is not None and x.shape[-2] > context_length:
        raise ValueError(
            f"x has num_tokens={x.shape[-2]}, longer than context_length={context_length}; "
            f"build the module with context_length >= {x.shape[-2]} or shorten the input"
        )


# --------------------------------------------------------------------------------------------------
# 1-2. Self-attention with trainable weights (3.4)
# --------------------------------------------------------------------------------------------------


class SelfAttention_v1(nn.Module):
    """Self-attention with trainable weight matrices, ``queries = x @ W_query`` (chapter 3.4.2).

    x: (T, d_in) or (B, T, d_in)   ->   context vectors: (T, d_out) or (B, T, d_out)
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        _check_positive_int("d_in", d_in)
        _check_positive_int("d_out", d_out)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.d_in, (2, 3), dtype=self.W_key.dtype)
        keys = x @ self.W_key  # (..., T, d_out)
        queries = x @ self.W_query  # (..., T, d_out)
        values = x @ self.W_value  # (..., T, d_out)
        return F.scaled_dot_product_attention(queries, keys, values)  # (..., T, d_out)


class SelfAttention_v2(nn.Module):
    """Self-attention with ``nn.Linear`` projections (chapter 3.4.2). Its weights are the transposes of
    :class:`SelfAttention_v1`'s: ``W_query.weight = v1.W_query.T``.

    x: (T, d_in) or (B, T, d_in)   ->   context vectors: (T, d_out) or (B, T, d_out)
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False) -> None:
        super().__init__()
        _check_positive_int("d_in", d_in)
        _check_positive_int("d_out", d_out)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.d_in, (2, 3), dtype=self.W_key.weight.dtype)
        keys = self.W_key(x)  # (..., T, d_out)
        queries = self.W_query(x)  # (..., T, d_out)
        values = self.W_value(x)  # (..., T, d_out)
        return F.scaled_dot_product_attention(queries, keys, values)  # (..., T, d_out)


# --------------------------------------------------------------------------------------------------
# 3. Causal attention with dropout, batched, mask as a buffer (3.5)
# --------------------------------------------------------------------------------------------------


class CausalAttention(nn.Module):
    """Single-head causal self-attention with dropout on the weights (chapter 3.5.3).

    The causal mask is the buffer ``mask`` (``triu(ones, 1)``: 1 = future, masked), so it follows
    ``.to(device)`` / ``.to(dtype)`` and is saved in the ``state_dict`` as in the book.

    x: (B, T, d_in) with T <= context_length   ->   context vectors: (B, T, d_out)
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("context_length", context_length)):
            _check_positive_int(name, value)
        _check_dropout(dropout)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.d_in, (3,), self.context_length, dtype=self.W_key.weight.dtype)
        num_tokens = x.shape[1]
        keys = self.W_key(x)  # (B, T, d_out)
        queries = self.W_query(x)  # (B, T, d_out)
        values = self.W_value(x)  # (B, T, d_out)
        allowed = self.mask[:num_tokens, :num_tokens] == 0  # (T, T), True = may attend
        return F.scaled_dot_product_attention(
            queries, keys, values, mask=allowed, dropout_p=self.dropout.p, training=self.training
        )  # (B, T, d_out)


# --------------------------------------------------------------------------------------------------
# 4. Multi-head attention as a wrapper of causal heads (3.6.1)
# --------------------------------------------------------------------------------------------------


class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent :class:`CausalAttention` heads, their outputs concatenated
    (chapter 3.6.1; no output projection). Here ``d_out`` is each head's width, as in the book, so the
    output is ``num_heads * d_out`` wide.

    x: (B, T, d_in)   ->   (B, T, num_heads * d_out)
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("num_heads", num_heads)
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, H * d_out)


# --------------------------------------------------------------------------------------------------
# 5. Multi-head attention with split weights (3.6.2), hardened for use
# --------------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Multi-head attention with one projection per query/key/value split into heads, and an output
    projection (chapter 3.6.2).

    Beyond the book:
      causal=False         bidirectional attention (as in encoders such as BERT);
      backend="auto"       how attention runs: "auto" (fastest exact path), "eager" (the chapter's
                           math), "torch" (PyTorch's fused kernel) or "flash" (attnlab's own kernel);
                           see :mod:`attnlab.backends`. All give the same function.
    forward(x, *, key_padding_mask=None, attn_mask=None, need_weights=False):
      key_padding_mask     (B, T) bool, **True = padding** (that key is ignored), as in
                           ``torch.nn.MultiheadAttention``;
      attn_mask            bool, **True = may attend** (the package convention), or float added to the
                           scores; shape (T, T), (B, T, T) or (B, H, T, T); composes with the causal
                           mask and the padding mask;
      need_weights         also return the attention weights (B, H, T, T) (the eager path).
    A query whose keys are all masked out gets a context vector of zeros (before ``out_proj``).

    x: (B, T, d_in) with T <= context_length   ->   (B, T, d_out)
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        *,
        causal: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("context_length", context_length)):
            _check_positive_int(name, value)
        _check_dropout(dropout)
        _check_heads(d_out, num_heads)
        backends.resolve(backend, mask=None, causal=False, t_q=1, t_k=1, dropout_p=0.0, training=False,
                         need_weights=False)  # validates the name
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.causal = causal
        self.backend = backend
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, causal={self.causal}, backend={self.backend!r}"

    def _allowed(self, b: int, t: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None):
        """The mask handed to the backend (bool True = may attend, or float; None for none) and whether
        the backend applies the causal mask itself. Padding alone stays a (B, 1, 1, T) mask and causality
        a flag, which every backend (the flash kernel included) takes as they are; an ``attn_mask`` is
        combined with the causal mask (the ``mask`` buffer) and the padding into one mask."""
        pad = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor):
                raise TypeError(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(
                    f"key_padding_mask must be a bool tensor (True = padding), got dtype {key_padding_mask.dtype}"
                )
            if tuple(key_padding_mask.shape) != (b, t):
                raise ValueError(
                    f"key_padding_mask must have shape (batch, num_tokens) = {(b, t)}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            pad = padding_mask(key_padding_mask)  # (B, 1, 1, T)
        if attn_mask is None:
            return pad, self.causal
        if isinstance(attn_mask, Tensor) and attn_mask.dim() == 3:
            attn_mask = attn_mask[:, None]  # (B, 1, T, T)
        if isinstance(attn_mask, Tensor) and attn_mask.dim() > 4:
            raise ValueError(
                f"attn_mask must have shape (T, T), (batch, T, T) or (batch, num_heads, T, T), "
                f"got {tuple(attn_mask.shape)}"
            )
        F.check_mask(attn_mask, t, t, name="attn_mask", batch_shape=(b, self.num_heads))
        causal = self.mask[:t, :t] == 0 if self.causal else None  # (T, T), from the buffer
        if attn_mask.dtype != torch.bool:
            bool_part = and_masks(causal, pad)
            if bool_part is not None:
                attn_mask = F.mask_before_softmax(attn_mask, bool_part)  # (B|1, H|1, T, T)
            return attn_mask, False
        return and_masks(causal, pad, attn_mask), False

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        _check_x(x, self.d_in, (3,), self.context_length, dtype=self.W_key.weight.dtype)
        b, num_tokens, _ = x.shape
        queries = self.W_query(x)  # (B, T, d_out)
        keys = self.W_key(x)  # (B, T, d_out)
        values = self.W_value(x)  # (B, T, d_out)

        # Split d_out into heads, then put heads before tokens.
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

        mask, causal = self._allowed(b, num_tokens, key_padding_mask, attn_mask)
        result = backends.attention(
            queries, keys, values, mask=mask, causal=causal, dropout_p=self.dropout.p,
            training=self.training, backend=self.backend, need_weights=need_weights,
        )
        context, weights = result if need_weights else (result, None)  # (B, H, T, hd)

        # Merge heads back: (B, H, T, hd) -> (B, T, H, hd) -> (B, T, d_out).
        context = context.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)  # (B, T, d_out)
        out = self.out_proj(context)  # (B, T, d_out)
        return (out, weights) if need_weights else out


# PEP 8 aliases.
SelfAttentionV1 = SelfAttention_v1
SelfAttentionV2 = SelfAttention_v2
