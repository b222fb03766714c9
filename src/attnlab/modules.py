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

from typing import cast

import torch
from torch import Tensor, nn

from attnlab import backends
from attnlab import functional as F
from attnlab.cache import CacheStep, KVCache, RollingKVCache
from attnlab.masks import and_masks, padding_mask, window_mask
from attnlab.rope import PositionalEncoding, RotaryEmbedding

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


_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_takes(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether autocast, enabled for x's device, casts between x's dtype and the parameters' (as
    ``nn.Linear`` then accepts, e.g. a bfloat16 x into a float32 module); float64 is never cast."""
    return x.dtype in _AUTOCAST_DTYPES and dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled(x.device.type)


def _check_x(
    x: Tensor, d_in: int, ranks: tuple[int, ...], context_length: int | None = None, *, dtype: torch.dtype
) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype} (convert it with x.float())")
    if x.dtype != dtype and not _autocast_takes(x, dtype):
        raise TypeError(
            f"x has dtype {x.dtype} but the module's parameters are {dtype}: convert one to the other, "
            f"e.g. x.to({dtype}) or module.to({x.dtype}), or run under torch.autocast"
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
        self.mask: Tensor  # (context_length, context_length), 1 = future (masked)
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
      num_kv_groups=None   grouped-query attention: H_kv key/value heads (a divisor of num_heads),
                           query head h uses key/value head h // (num_heads // H_kv) (the book's GQA
                           bonus); 1 = multi-query attention; None = num_heads (the chapter's MHA);
      window_size=None     sliding-window attention (needs causal=True): a query attends to itself and
                           the window_size - 1 keys before it (the book's sliding-window bonus);
      rope=None            True: rotary position embeddings on queries and keys (Llama's rotate-half,
                           base rope_base; :mod:`attnlab.rope`); or any callable
                           ``rope(queries, keys, positions) -> (queries, keys)``, the hook for another
                           positional scheme (see :mod:`attnlab.rope`);
      context_parallel     an object whose ``.attention(q, k, v, causal=, key_padding_mask=, scale=)``
                           attends this rank's shard of the sequence against the whole (and whose
                           ``.positions(T, device)`` gives its tokens' global positions, for RoPE), such
                           as :class:`attnlab.distributed.ContextParallel`; forward then calls it instead
                           of :func:`attnlab.backends.attention`.
      These combine freely: Llama is ``num_kv_groups`` + ``rope``, Mistral adds ``window_size``.
    forward(x, context=None, *, key_padding_mask=None, attn_mask=None, need_weights=False, cache=None):
      context              (B, T_k, d_in): cross-attention, keys and values from ``context`` (an
                           encoder's output) instead of ``x``; needs causal=False; key_padding_mask
                           then masks the context's tokens, (B, T_k);
      key_padding_mask     (B, T) bool, **True = padding** (that key is ignored), as in
                           ``torch.nn.MultiheadAttention``; with a cache, (B, T) for the new tokens;
      attn_mask            bool, **True = may attend** (the package convention), or float added to the
                           scores; shape (T, T), (B, T, T) or (B, H, T, T); composes with the causal
                           mask and the padding mask;
      need_weights         also return the attention weights (B, H, T, T) (the eager path);
      cache                a :class:`attnlab.cache.KVCache` / :class:`~attnlab.cache.RollingKVCache`
                           (from :meth:`new_cache`): x holds the *new* tokens, which attend to the cached
                           ones and are added to them (decoding; needs causal=True).
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
        num_kv_groups: int | None = None,
        window_size: int | None = None,
        rope: bool | PositionalEncoding | None = None,
        rope_base: float = 10000.0,
        context_parallel: object | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("context_length", context_length)):
            _check_positive_int(name, value)
        _check_dropout(dropout)
        _check_heads(d_out, num_heads)
        backends.resolve(backend)  # validates the name
        num_kv_groups = _check_modern_options(num_heads, causal, num_kv_groups, window_size, context_parallel)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.num_kv_groups = num_kv_groups
        self.window_size = window_size
        self.causal = causal
        self.backend = backend
        self.context_parallel = context_parallel
        kv_out = num_kv_groups * self.head_dim  # d_out unless grouped-query
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, kv_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, kv_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.mask: Tensor  # (context_length, context_length), 1 = future (masked)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        self.rope = _make_rope(rope, self.head_dim, rope_base)  # no parameters, no saved buffers

    def extra_repr(self) -> str:
        extra = "" if self.num_kv_groups == self.num_heads else f", num_kv_groups={self.num_kv_groups}"
        extra += "" if self.window_size is None else f", window_size={self.window_size}"
        return f"num_heads={self.num_heads}{extra}, causal={self.causal}, backend={self.backend!r}"

    def new_cache(
        self, batch_size: int, max_tokens: int, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache | RollingKVCache:
        """An empty cache for this layer: a :class:`~attnlab.cache.RollingKVCache` of ``window_size``
        slots for a sliding-window layer whose window is shorter than ``max_tokens``, else a static
        :class:`~attnlab.cache.KVCache` of ``max_tokens``; the module's dtype and device by default."""
        dtype = self.W_key.weight.dtype if dtype is None else dtype
        device = self.W_key.weight.device if device is None else device
        if self.window_size is not None and self.window_size < max_tokens:
            return RollingKVCache(batch_size, self.window_size, self.num_kv_groups, self.head_dim, dtype=dtype,
                                  device=device)
        return KVCache(batch_size, max_tokens, self.num_kv_groups, self.head_dim, dtype=dtype, device=device)

    def _allowed(
        self, b: int, t: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None, t_k: int | None = None
    ):
        """The mask handed to the backend (bool True = may attend, or float; None for none) and whether
        the backend applies the causal mask itself. Padding alone stays a (B, 1, 1, T) mask and causality
        a flag, which every backend (the flash kernel included) takes as they are; an ``attn_mask`` is
        combined with the causal mask (the ``mask`` buffer, or the sliding window) and the padding into one
        mask. ``t_k``: the number of keys (the context's tokens in cross-attention; default ``t``)."""
        t_k = t if t_k is None else t_k
        pad = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor):
                raise TypeError(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
            if key_padding_mask.dtype != torch.bool:
                raise TypeError(
                    f"key_padding_mask must be a bool tensor (True = padding), got dtype {key_padding_mask.dtype}"
                )
            if tuple(key_padding_mask.shape) != (b, t_k):
                raise ValueError(
                    f"key_padding_mask must have shape (batch, num_tokens) = {(b, t_k)}, "
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
        F.check_mask(attn_mask, t, t_k, name="attn_mask", batch_shape=(b, self.num_heads))
        causal = self.mask[:t, :t] == 0 if self.causal else None  # (T, T), from the buffer
        if self.window_size is not None:
            causal = window_mask(t, t, window=self.window_size, device=self.W_query.weight.device)  # (T, T)
        if attn_mask.dtype != torch.bool:
            bool_part = and_masks(causal, pad)
            if bool_part is not None:
                attn_mask = F.mask_before_softmax(attn_mask, bool_part)  # (B|1, H|1, T, T)
            return attn_mask, False
        return and_masks(causal, pad, attn_mask), False

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
        cache: KVCache | RollingKVCache | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        _check_x(x, self.d_in, (3,), self.context_length, dtype=self.W_key.weight.dtype)
        self._check_forward_options(x, context, attn_mask, need_weights, cache)
        b, num_tokens, _ = x.shape
        source = x if context is None else context  # where keys and values come from
        t_k = source.shape[1]
        queries = self.W_query(x)  # (B, T, d_out)
        keys = self.W_key(source)  # (B, T_k, H_kv * hd)
        values = self.W_value(source)  # (B, T_k, H_kv * hd)

        # Split d_out into heads, then put heads before tokens.
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        keys = keys.view(b, t_k, self.num_kv_groups, self.head_dim).transpose(1, 2)  # (B, H_kv, T_k, hd)
        values = values.view(b, t_k, self.num_kv_groups, self.head_dim).transpose(1, 2)  # (B, H_kv, T_k, hd)

        if self.rope is not None:  # rotate by absolute position: after the cache's, or this rank's
            queries, keys = self.rope(queries, keys, self._positions(num_tokens, x.device, cache))

        weights = None
        if self.context_parallel is not None:
            context_vectors = self.context_parallel.attention(  # type: ignore[attr-defined]
                queries, keys, values, causal=self.causal, key_padding_mask=key_padding_mask, scale=None
            )  # (B, H, T, hd)
        elif cache is not None:
            step = cache.update(keys, values, key_padding_mask, window=self.window_size)
            result = attend_cached(
                queries, step, window=self.window_size, dropout_p=self.dropout.p, training=self.training,
                backend=self.backend, need_weights=need_weights,
            )
            context_vectors, weights = result if isinstance(result, tuple) else (result, None)  # (B, H, T, hd)
        else:
            mask, causal = self._allowed(b, num_tokens, key_padding_mask, attn_mask, t_k)
            result = backends.attention(
                queries, keys, values, mask=mask, causal=causal,
                window=self.window_size if attn_mask is None else None,  # else: inside the mask
                dropout_p=self.dropout.p, training=self.training, backend=self.backend, need_weights=need_weights,
            )
            context_vectors, weights = result if isinstance(result, tuple) else (result, None)  # (B, H, T, hd)

        # Merge heads back: (B, H, T, hd) -> (B, T, H, hd) -> (B, T, d_out).
        context_vectors = context_vectors.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)  # (B, T, d_out)
        out = self.out_proj(context_vectors)  # (B, T, d_out)
        return (out, weights) if weights is not None else out

    def _positions(self, num_tokens: int, device: torch.device, cache) -> Tensor:
        """Absolute positions of the new tokens (T,): after the cached ones, this rank's global ones with
        context parallelism, else 0..T-1."""
        if cache is not None:
            return cache.positions(num_tokens)  # (T,)
        if self.context_parallel is not None:
            return self.context_parallel.positions(num_tokens, device)  # type: ignore[attr-defined]
        return torch.arange(num_tokens, device=device)  # (T,)

    def _check_forward_options(self, x: Tensor, context, attn_mask, need_weights: bool, cache) -> None:
        """Combinations of forward's options that have no meaning, each a ValueError/TypeError saying why."""
        if context is not None:
            if not isinstance(context, Tensor):
                raise TypeError(f"context must be a torch.Tensor (batch, num_tokens, d_in), got {type(context).__name__}")
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.d_in:
                raise ValueError(
                    f"context must have shape (batch, num_context_tokens, d_in) = ({x.shape[0]}, T_k, {self.d_in}), "
                    f"got {tuple(context.shape)}"
                )
            if context.dtype != x.dtype:
                raise TypeError(f"context has dtype {context.dtype}, x has {x.dtype}: give both the same dtype")
            if self.causal:
                raise ValueError(
                    "cross-attention (context given) needs a module built with causal=False: the causal mask "
                    "orders the tokens of one sequence, and the context is another"
                )
            if self.rope is not None:
                raise ValueError("cross-attention (context given) does not take rope: queries and the context's "
                                 "keys have no common positions; build the module with rope=None")
        if cache is not None:
            if not isinstance(cache, (KVCache, RollingKVCache)):
                raise TypeError(f"cache must be an attnlab.cache.KVCache or RollingKVCache (see "
                                f"MultiHeadAttention.new_cache), got {type(cache).__name__}")
            if not self.causal or context is not None or attn_mask is not None:
                raise ValueError("a cache is for causal self-attention decoding: it takes no context and no "
                                 "attn_mask, and needs causal=True")
            if isinstance(cache, RollingKVCache) and (self.window_size is None or self.window_size > cache.window_size):
                raise ValueError(
                    f"a RollingKVCache of window_size={cache.window_size} keeps only that many tokens; this layer "
                    f"has window_size={self.window_size}: use a KVCache or a rolling cache at least as long"
                )
        if self.context_parallel is not None and (
            cache is not None or context is not None or attn_mask is not None or need_weights
        ):
            raise ValueError("context_parallel takes no cache, context, attn_mask or need_weights: the sequence "
                             "is split over ranks and each rank attends its shard against the whole")


def attend_cached(
    queries: Tensor,
    step: CacheStep,
    keys: Tensor | None = None,
    values: Tensor | None = None,
    *,
    window: int | None,
    dropout_p: float,
    training: bool,
    backend: str,
    need_weights: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """The new queries (B, H, T, hd) against a cache step (keys/values default to the step's; a latent
    cache passes its up-projected ones, laid out over the same slots). Bool mask of the step's positions
    for every backend, except ``"flash"``, which takes no general mask: there the slots are put in
    position order and the step is the plain causal (bottom-right) + window + key padding call."""
    keys = step.keys if keys is None else keys
    values = step.values if values is None else values
    if values is None:
        raise ValueError("attend_cached needs values: pass the up-projected values of a keys-only cache")
    if backend == "flash":
        keys, ordered_values, padding = step.ordered(keys, values)  # (B, H_kv, S, d), (B, H_kv, S, d_v), (B, S)
        return backends.attention(
            queries, keys, cast(Tensor, ordered_values),  # values were given, so they come back
            mask=padding_mask(padding), causal=True, window=window,
            dropout_p=dropout_p, training=training, backend=backend, need_weights=need_weights,
        )
    return backends.attention(
        queries, keys, values, mask=step.mask, causal=False, dropout_p=dropout_p, training=training,
        backend=backend, need_weights=need_weights,
    )


def _check_modern_options(
    num_heads: int, causal: bool, num_kv_groups: object, window_size: object, context_parallel: object
) -> int:
    """Validate MultiHeadAttention's options beyond the book; returns the number of key/value heads."""
    if num_kv_groups is None:
        num_kv_groups = num_heads
    if isinstance(num_kv_groups, bool) or not isinstance(num_kv_groups, int) or num_kv_groups < 1 or (
        num_heads % num_kv_groups
    ):
        raise ValueError(
            f"num_kv_groups must be a positive divisor of num_heads={num_heads} (1 = multi-query, "
            f"{num_heads} = multi-head), got {num_kv_groups!r}; try one of "
            f"{[g for g in range(1, num_heads + 1) if num_heads % g == 0]}"
        )
    if window_size is not None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be None or a positive int, got {window_size!r}")
        if not causal:
            raise ValueError("window_size (a sliding window over the previous tokens) needs causal=True")
    if context_parallel is not None:
        missing = [name for name in ("attention", "positions") if not callable(getattr(context_parallel, name, None))]
        if missing:
            raise TypeError(f"context_parallel must have .attention(...) and .positions(...) methods "
                            f"(see attnlab.distributed.ContextParallel); {type(context_parallel).__name__} lacks "
                            f"{', '.join(missing)}")
        if window_size is not None:
            raise ValueError("context_parallel takes no window_size: its ranks attend causally or bidirectionally")
    return num_kv_groups


def _make_rope(rope: object, head_dim: int, rope_base: float) -> nn.Module | PositionalEncoding | None:
    """``rope=None/False`` nothing, ``True`` the built-in rotary embeddings, a callable: the user's scheme."""
    if rope is None or rope is False:
        return None
    if rope is True:
        return RotaryEmbedding(head_dim, rope_base)
    if callable(rope):
        return rope
    raise TypeError(f"rope must be None, True or a callable (queries, keys, positions) -> (queries, keys), "
                    f"got {type(rope).__name__}")


# PEP 8 aliases.
SelfAttentionV1 = SelfAttention_v1
SelfAttentionV2 = SelfAttention_v2
