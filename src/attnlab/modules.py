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

from typing import Any, cast

import torch
from torch import Tensor, nn

from attnlab import backends
from attnlab import functional as F
from attnlab.alibi import ALiBiBias
from attnlab.cache import CacheStep, KVCache, RollingKVCache, step_spec
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.masks import MaskSpec, flags_spec
from attnlab.rope import PositionalEncoding, make_positional, score_bias_of

__all__ = [
    "SelfAttention_v1",
    "SelfAttention_v2",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "BOOK_MASK_LIMIT",
    "positions_within_documents",
    "token_positions",
    "attend",
]


# --------------------------------------------------------------------------------------------------
# Argument checks: every message names the argument, the expected and the actual value
# --------------------------------------------------------------------------------------------------


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttnlabInputError(f"{name} must be a positive int, got {value!r}")


def check_dropout(dropout: object) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AttnlabInputError(f"dropout must be a float in [0, 1), got {dropout!r}")


def check_heads(d_out: int, num_heads: int) -> None:
    check_positive_int("num_heads", num_heads)
    if d_out % num_heads != 0:
        raise AttnlabInputError(
            f"d_out must be divisible by num_heads, got d_out={d_out} and num_heads={num_heads} "
            f"(try num_heads in {[h for h in range(1, d_out + 1) if d_out % h == 0]})"
        )


_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_takes(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether autocast, enabled for x's device, casts between x's dtype and the parameters' (as
    ``nn.Linear`` then accepts, e.g. a bfloat16 x into a float32 module); float64 is never cast."""
    return x.dtype in _AUTOCAST_DTYPES and dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled(x.device.type)


def check_x(
    x: Tensor, d_in: int, ranks: tuple[int, ...], context_length: int | None = None, *, dtype: torch.dtype
) -> None:
    if not isinstance(x, Tensor):
        raise AttnlabInputTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise AttnlabInputTypeError(f"x must be a floating-point tensor, got dtype {x.dtype} (convert it with x.float())")
    if x.dtype != dtype and not _autocast_takes(x, dtype):
        raise AttnlabInputTypeError(
            f"x has dtype {x.dtype} but the module's parameters are {dtype}: convert one to the other, "
            f"e.g. x.to({dtype}) or module.to({x.dtype}), or run under torch.autocast"
        )
    layouts = {2: "(num_tokens, d_in)", 3: "(batch, num_tokens, d_in)"}
    if x.dim() not in ranks:
        want = " or ".join(f"{r} {layouts[r]}" for r in ranks)
        raise AttnlabInputError(f"x must have {want} dimensions, got {x.dim()} with shape {tuple(x.shape)}")
    if x.shape[-1] != d_in:
        raise AttnlabInputError(f"x must have d_in={d_in} features in its last dimension, got {x.shape[-1]}")
    if context_length is not None and x.shape[-2] > context_length:
        raise AttnlabInputError(
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
        check_positive_int("d_in", d_in)
        check_positive_int("d_out", d_out)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: Tensor) -> Tensor:
        check_x(x, self.d_in, (2, 3), dtype=self.W_key.dtype)
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
        check_positive_int("d_in", d_in)
        check_positive_int("d_out", d_out)
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        check_x(x, self.d_in, (2, 3), dtype=self.W_key.weight.dtype)
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
            check_positive_int(name, value)
        check_dropout(dropout)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.mask: Tensor  # (context_length, context_length), 1 = future (masked)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: Tensor) -> Tensor:
        check_x(x, self.d_in, (3,), self.context_length, dtype=self.W_key.weight.dtype)
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
        check_positive_int("num_heads", num_heads)
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)  # (B, T, H * d_out)


# --------------------------------------------------------------------------------------------------
# 5. Multi-head attention with split weights (3.6.2), hardened for use
# --------------------------------------------------------------------------------------------------


BOOK_MASK_LIMIT = 1024
"""Largest ``context_length`` whose ``state_dict`` carries the book's full (T, T) causal ``mask`` (4 MiB in
float32 at the book's GPT-2 context of 1024): what the book's classes load. Above it the saved ``mask`` is
an empty (0, 0) tensor, so a 128k-token layer's checkpoint holds no 64 GiB matrix."""


def _book_mask(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The chapter's causal ``mask``: ``triu(ones(n, n), 1)``, 1 = future (masked). Shape (n, n)."""
    return torch.ones(n, n, dtype=dtype, device=device).triu(1)


def _is_causal_mask(saved: Tensor) -> bool:
    """Whether a saved ``mask`` is the chapter's ``triu(ones(n, n), 1)`` (any n, the empty one included)."""
    if saved.dim() != 2 or saved.shape[0] != saved.shape[1]:
        return False
    n = saved.shape[0]
    return bool(torch.equal(saved != 0, _book_mask(n, torch.bool, saved.device)))


def _save_book_mask(module: Any, state_dict: dict, prefix: str, local_metadata: object) -> None:
    """state_dict post-hook: the chapter's ``mask`` entry, first among the module's own keys (the book's
    order), built at save time (the module holds no T x T matrix)."""
    n, like = module.context_length, module._mask_like
    saved = _book_mask(n, like.dtype, like.device) if n <= BOOK_MASK_LIMIT else like.new_zeros(0, 0)  # (n, n) | (0, 0)
    own = [(k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)]]
    state_dict[prefix + "mask"] = saved
    state_dict.update(own)


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
                           base rope_base, a finite number > 1; :mod:`attnlab.rope`); or any callable
                           ``rope(queries, keys, positions) -> (queries, keys)``, the hook for another
                           positional scheme, which may also add a per-head score bias (its
                           ``score_bias(query_positions, key_positions)``); or a scheme's name:
                           ``rope="alibi"`` is ALiBi (:mod:`attnlab.alibi`; see :mod:`attnlab.rope`);
      context_parallel     an object whose ``.attention(q, k, v, causal=, key_padding_mask=, scale=)``
                           attends this rank's shard of the sequence against the whole (and whose
                           ``.positions(T, device)`` gives its tokens' global positions, for RoPE), such
                           as :class:`attnlab.distributed.ContextParallel`; forward then calls it instead
                           of :func:`attnlab.backends.attention`.
      The shapes of real checkpoints (see :meth:`from_hf`):
      head_dim=None        each head's width; None = d_out // num_heads (the chapter). Given, the queries
                           are num_heads * head_dim wide and out_proj maps that back to d_out (Qwen3:
                           16 heads of 128 in a 1024-wide model);
      out_bias=True        whether out_proj has a bias (the chapter's has; Llama's, Mistral's and Qwen's
                           o_proj do not);
      qk_norm=None         an RMSNorm eps: RMS-normalise each head's queries and keys (``q_norm``,
                           ``k_norm``, weights of head_dim) before RoPE, as Qwen3 does.
      These combine freely: Llama is ``num_kv_groups`` + ``rope`` + ``out_bias=False``, Mistral adds
      ``window_size``, Qwen2 ``qkv_bias=True``, Qwen3 ``head_dim`` and ``qk_norm``.
    forward(x, context=None, *, key_padding_mask=None, attn_mask=None, need_weights=False, cache=None,
            position_ids=None, document_ids=None):
      context              (B, T_k, d_in): cross-attention, keys and values from ``context`` (an
                           encoder's output) instead of ``x``; needs causal=False; key_padding_mask
                           then masks the context's tokens, (B, T_k);
      key_padding_mask     (B, T) bool, **True = padding** (that key is ignored), as in
                           ``torch.nn.MultiheadAttention``; with a cache, (B, T) for the new tokens;
      attn_mask            bool, **True = may attend** (the package convention), or float added to the
                           scores; shape (T, T), (B, T, T) or (B, H, T, T); composes with the causal
                           mask and the padding mask; with a cache, bool (T, T) or (B, T, T): how the
                           new tokens see each other (a tree of draft tokens), the cached ones by position;
      need_weights         also return the attention weights (B, H, T, T) (the eager path);
      cache                a :class:`attnlab.cache.KVCache` / :class:`~attnlab.cache.RollingKVCache`
                           (from :meth:`new_cache`): x holds the *new* tokens, which attend to the cached
                           ones and are added to them (decoding; needs causal=True). The first layer that
                           uses a cache owns it: one cache per layer (:class:`attnlab.cache.LayerCaches`);
      position_ids         integer (B, T) or (T,): the tokens' positions for RoPE and, with a cache, for
                           the causal mask (default: 0..T-1, after the cached tokens, or within each
                           document when document_ids are given);
      document_ids         integer (B, T) or (T,): packed sequences, a token attends only the tokens of
                           its own document (the flash kernel skips the other documents' tiles); RoPE
                           positions restart at each document unless position_ids are given.
    A query whose keys are all masked out gets a context vector of zeros (before ``out_proj``). A NaN or
    inf in one position's input turns every output that attends that position into NaN (with the causal
    mask: that position's and every later one's; without a mask: every position's), as in
    ``torch.nn.MultiheadAttention``.

    The chapter's ``mask`` buffer is built on first use of ``module.mask`` (the book's code paths), not at
    construction: building allocates nothing quadratic in context_length. The ``state_dict`` still starts
    with ``mask``: the book's (context_length, context_length) matrix up to :data:`BOOK_MASK_LIMIT` tokens
    (so the book's class loads it), an empty one above. Loading accepts any causal ``mask`` (the book's
    classes' state_dicts at any context_length, with ``strict=True``) or none.

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
        rope: bool | str | PositionalEncoding | None = None,
        rope_base: float = 10000.0,
        context_parallel: object | None = None,
        head_dim: int | None = None,
        out_bias: bool = True,
        qk_norm: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("context_length", context_length)):
            check_positive_int(name, value)
        check_dropout(dropout)
        if head_dim is None:
            check_heads(d_out, num_heads)
        else:
            check_positive_int("num_heads", num_heads)
            check_positive_int("head_dim", head_dim)
        if not isinstance(out_bias, bool):
            raise AttnlabInputTypeError(f"out_bias must be a bool, got {type(out_bias).__name__} ({out_bias!r})")
        if qk_norm is not None and (isinstance(qk_norm, bool) or not isinstance(qk_norm, (int, float))
                                    or not 0.0 < qk_norm < 1.0):
            raise AttnlabInputError(f"qk_norm must be None or an RMSNorm eps in (0, 1), e.g. 1e-6, got {qk_norm!r}")
        backends.resolve(backend)  # validates the name
        num_kv_groups = _check_modern_options(num_heads, causal, num_kv_groups, window_size, context_parallel)
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads if head_dim is None else head_dim
        self.inner_dim = num_heads * self.head_dim  # d_out unless head_dim is given
        self.num_kv_groups = num_kv_groups
        self.window_size = window_size
        self.causal = causal
        self.backend = backend
        self.context_parallel = context_parallel
        kv_out = num_kv_groups * self.head_dim  # inner_dim unless grouped-query
        self.W_query = nn.Linear(d_in, self.inner_dim, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, kv_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, kv_out, bias=qkv_bias)
        self.out_proj = nn.Linear(self.inner_dim, d_out, bias=out_bias)
        self.dropout = nn.Dropout(dropout)
        # The dtype and device of the chapter's mask (follows .to()); the (T, T) matrix is built on use.
        self._mask_like: Tensor
        self.register_buffer("_mask_like", torch.zeros(0), persistent=False)
        self.register_state_dict_post_hook(_save_book_mask)
        self.rope = make_positional(rope, head_dim=self.head_dim, num_heads=num_heads, base=rope_base)
        _check_scheme(self.rope, backend, context_parallel)
        self.q_norm = self.k_norm = None
        if qk_norm is not None:
            self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim, eps=qk_norm), nn.RMSNorm(self.head_dim, eps=qk_norm)

    @property
    def mask(self) -> Tensor:
        """The chapter's causal mask (context_length, context_length), 1 = future (masked), in the module's
        dtype and device: built on first use and kept (the book's code paths read ``self.mask``)."""
        like, n = self._mask_like, self.context_length
        built = self.__dict__.get("_mask_built")
        if built is None or built.dtype != like.dtype or built.device != like.device:
            built = _book_mask(n, like.dtype, like.device)  # (T, T)
            self.__dict__["_mask_built"] = built
        return built

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        saved = state_dict.pop(prefix + "mask", None)  # any causal mask, any context_length, or none
        if saved is not None and not _is_causal_mask(saved):
            error_msgs.append(f"{prefix}mask: expected the chapter's causal mask triu(ones(n, n), 1) (any n), got a "
                              f"tensor of shape {tuple(saved.shape)} that is not one; this module always attends "
                              "causally or bidirectionally (causal=), so a custom mask would be lost: pass it as "
                              "attn_mask= instead")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        extra = "" if self.num_kv_groups == self.num_heads else f", num_kv_groups={self.num_kv_groups}"
        extra += "" if self.window_size is None else f", window_size={self.window_size}"
        extra += "" if self.inner_dim == self.d_out else f", head_dim={self.head_dim}"
        return f"num_heads={self.num_heads}{extra}, causal={self.causal}, backend={self.backend!r}"

    def new_cache(
        self, batch_size: int, max_tokens: int, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, rolling: bool | None = None,
    ) -> KVCache | RollingKVCache:
        """An empty cache for this layer: a :class:`~attnlab.cache.RollingKVCache` of ``window_size``
        slots for a sliding-window layer whose window is shorter than ``max_tokens`` (``rolling=False``: a
        static one anyway, e.g. for speculative decoding's rollback), else a static
        :class:`~attnlab.cache.KVCache` of ``max_tokens``. Dtype: the autocast dtype under
        ``torch.autocast`` (what the keys then are), else the module's; the module's device by default."""
        device = self.W_key.weight.device if device is None else device
        if dtype is None:
            device_type = torch.device(device).type
            dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else self.W_key.weight.dtype)
        use_rolling = self.window_size is not None and self.window_size < max_tokens if rolling is None else rolling
        if use_rolling:
            if self.window_size is None:
                raise AttnlabInputError("rolling=True needs a sliding-window layer (window_size=...); this one has none")
            return RollingKVCache(batch_size, self.window_size, self.num_kv_groups, self.head_dim, dtype=dtype,
                                  device=device)
        return KVCache(batch_size, max_tokens, self.num_kv_groups, self.head_dim, dtype=dtype, device=device)

    def _mask(
        self, x: Tensor, t_k: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None,
        document_ids: Tensor | None, cache: KVCache | RollingKVCache | None,
    ) -> tuple[MaskSpec, Tensor | None]:
        """The mask description of a call and its score bias (a float ``attn_mask``): causal (or the sliding
        window), key padding, a bool ``attn_mask`` and the documents, composed by AND; checked here once."""
        if key_padding_mask is None and attn_mask is None and document_ids is None:
            return flags_spec(self.causal, self.window_size), None  # no tensors: causal / window alone
        b, t = x.shape[0], x.shape[1]
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor):
                raise AttnlabInputTypeError(
                    f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
            if key_padding_mask.dtype != torch.bool:
                raise AttnlabInputTypeError("key_padding_mask must be a bool tensor (True = padding), got dtype "
                                            f"{key_padding_mask.dtype}")
        if key_padding_mask is not None and cache is None and tuple(key_padding_mask.shape) != (b, t_k):
            raise AttnlabInputError(f"key_padding_mask must have shape (batch, num_tokens) = {(b, t_k)}, "
                                    f"got {tuple(key_padding_mask.shape)}")
        bias = None
        if attn_mask is not None and cache is not None:
            attn_mask = cache.check_attn_mask(attn_mask, t)  # bool (B|1, 1, T, T), among the new tokens
        elif attn_mask is not None:
            if isinstance(attn_mask, Tensor) and attn_mask.dim() > 4:
                raise AttnlabInputError(f"attn_mask must have shape (T, T), (batch, T, T) or (batch, num_heads, T, "
                                    f"T), got {tuple(attn_mask.shape)}")
            if isinstance(attn_mask, Tensor) and attn_mask.dim() == 3:
                attn_mask = attn_mask[:, None]  # (B, 1, T, T)
            F.check_mask(attn_mask, t, t_k, name="attn_mask", batch_shape=(b, self.num_heads))
            if attn_mask.dtype != torch.bool:
                attn_mask, bias = None, attn_mask  # a float mask is added to the scores
        if document_ids is not None:
            document_ids = document_ids.to(x.device)  # (T,) or (B, T)
        return MaskSpec(causal=self.causal, window=self.window_size, key_padding=key_padding_mask,
                    allowed=attn_mask, document_ids=document_ids), bias

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
        cache: KVCache | RollingKVCache | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_x(x, self.d_in, (3,), self.context_length, dtype=self.W_key.weight.dtype)
        self._check_forward_options(x, context, attn_mask, need_weights, cache, position_ids, document_ids)
        b, num_tokens, _ = x.shape
        source = x if context is None else context  # where keys and values come from
        queries = self._heads(self.W_query(x), self.num_heads, self.q_norm)  # (B, H, T, hd)
        keys = self._heads(self.W_key(source), self.num_kv_groups, self.k_norm)  # (B, H_kv, T_k, hd)
        values = self._heads(self.W_value(source), self.num_kv_groups, None)  # (B, H_kv, T_k, hd)
        if position_ids is not None:
            position_ids = position_ids.to(device=x.device, dtype=torch.long)  # (T,) or (B, T)
        positions = None
        if self.rope is not None:  # absolute positions: after the cache's, this rank's, within documents
            positions = token_positions(num_tokens, x.device, cache, position_ids, document_ids, self.context_parallel)
            queries, keys = self.rope(queries, keys, positions)  # rotated (or as they were, for a bias scheme)
        mask, bias = self._mask(x, keys.shape[2], key_padding_mask, attn_mask, document_ids, cache)
        context_vectors, weights = attend(
            queries, keys, values, mask, bias=bias, positions=positions, scheme=self.rope, cache=cache,
            position_ids=position_ids, context_parallel=self.context_parallel, dropout_p=self.dropout.p,
            training=self.training, backend=self.backend, need_weights=need_weights,
        )  # (B, H, T, hd), (B, H, T, T_k) or None
        # Merge heads back: (B, H, T, hd) -> (B, T, H, hd) -> (B, T, H * hd).
        context_vectors = context_vectors.transpose(1, 2).reshape(b, num_tokens, self.inner_dim)  # (B, T, H * hd)
        out = self.out_proj(context_vectors)  # (B, T, d_out)
        return (out, weights) if weights is not None else out

    def _heads(self, projected: Tensor, heads: int, norm: nn.Module | None) -> Tensor:
        """Split (B, T, heads * hd) into heads before tokens, (B, heads, T, hd), RMS-normed per head if asked."""
        b, t, _ = projected.shape
        split = projected.view(b, t, heads, self.head_dim)  # (B, T, heads, hd)
        if norm is not None:
            split = norm(split)  # (B, T, heads, hd)
        return split.transpose(1, 2)  # (B, heads, T, hd)

    def _check_forward_options(
        self, x: Tensor, context: Tensor | None, attn_mask: Tensor | None, need_weights: bool,
        cache: KVCache | RollingKVCache | None, position_ids: Tensor | None, document_ids: Tensor | None,
    ) -> None:
        """Combinations of forward's options that have no meaning, each a ValueError/TypeError saying why."""
        b, t = x.shape[0], x.shape[1]
        for name, ids in (("position_ids", position_ids), ("document_ids", document_ids)):
            _check_ids(name, ids, b, t)
        if context is not None:
            if not isinstance(context, Tensor):
                raise AttnlabInputTypeError(f"context must be a torch.Tensor (batch, num_tokens, d_in), got {type(context).__name__}")
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.d_in:
                raise AttnlabInputError(
                    f"context must have shape (batch, num_context_tokens, d_in) = ({x.shape[0]}, T_k, {self.d_in}), "
                    f"got {tuple(context.shape)}"
                )
            if context.dtype != x.dtype:
                raise AttnlabInputTypeError(f"context has dtype {context.dtype}, x has {x.dtype}: give both the same dtype")
            if self.causal:
                raise AttnlabInputError(
                    "cross-attention (context given) needs a module built with causal=False: the causal mask "
                    "orders the tokens of one sequence, and the context is another"
                )
            if self.rope is not None:
                raise AttnlabInputError("cross-attention (context given) does not take rope: queries and the context's "
                                 "keys have no common positions; build the module with rope=None")
            if document_ids is not None:
                raise AttnlabInputError("cross-attention (context given) takes no document_ids: they pair the queries "
                                 "with keys of the same sequence")
        if cache is not None:
            if not isinstance(cache, (KVCache, RollingKVCache)):
                raise AttnlabInputTypeError(f"cache must be an attnlab.cache.KVCache or RollingKVCache (see "
                                f"MultiHeadAttention.new_cache), got {type(cache).__name__}")
            if not self.causal or context is not None:
                raise AttnlabInputError("a cache is for causal self-attention decoding: it takes no context, and needs "
                                 "causal=True")
            if document_ids is not None:
                raise AttnlabInputError("a cache takes no document_ids: each batch row decodes one sequence")
            if attn_mask is not None and not backends.takes(self.backend).general_masks:
                raise AttnlabInputError("with a cache, attn_mask needs a backend that reads a general mask: the flash "
                                 "kernel takes none; use backend='auto', 'torch' or 'eager'")
            if isinstance(cache, RollingKVCache) and (self.window_size is None or self.window_size > cache.window_size):
                raise AttnlabInputError(
                    f"a RollingKVCache of window_size={cache.window_size} keeps only that many tokens; this layer "
                    f"has window_size={self.window_size}: use a KVCache or a rolling cache at least as long"
                )
            cache.claim(self)
        if self.context_parallel is not None and (
            cache is not None or context is not None or attn_mask is not None or need_weights
            or document_ids is not None
        ):
            raise AttnlabInputError("context_parallel takes no cache, context, attn_mask, document_ids or need_weights: "
                             "the sequence is split over ranks and each rank attends its shard against the whole")

    # -- Hugging Face layers -----------------------------------------------------------------------

    @classmethod
    def from_hf(cls, layer: nn.Module, *, context_length: int | None = None, backend: str = "auto") -> MultiHeadAttention:
        """The attnlab module equal to a Hugging Face attention layer (Llama, Mistral, Qwen2, Qwen3:
        ``q_proj``/``k_proj``/``v_proj``/``o_proj``; GPT-2: ``c_attn``/``c_proj``), weights copied (on the
        layer's device and dtype). ``context_length`` defaults to the config's ``max_position_embeddings``
        (GPT-2: ``n_positions``). Refused with a ValueError: RoPE scaling other than the default, partial
        rotary embeddings, GPT-2's per-layer score scaling or attention softcapping."""
        return _mha_from_hf(cls, layer, context_length=context_length, backend=backend)

    def to_hf(self, layer: nn.Module) -> nn.Module:
        """Copy this module's weights into a Hugging Face attention layer of the same shape (built from a
        config, e.g. ``LlamaAttention(config, layer_idx=0)``); returns ``layer``. The inverse of :meth:`from_hf`."""
        return to_hf(self, layer)


def _check_ids(name: str, ids: object, b: int, t: int) -> None:
    """position_ids / document_ids: None or an integer tensor of shape (T,) or (B, T)."""
    if ids is None:
        return
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise AttnlabInputTypeError(f"{name} must be an integer torch.Tensor of shape (batch, T) or (T,), got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) not in ((t,), (b, t)):
        raise AttnlabInputError(f"{name} must have shape (batch, T) = {(b, t)} or (T,) = ({t},), got {tuple(ids.shape)}")


def positions_within_documents(document_ids: Tensor) -> Tensor:
    """Each token's position inside its document, for packed sequences: (T,) or (B, T) integer ids ->
    LongTensor of the same shape, restarting at 0 wherever the id changes. No host sync."""
    t = document_ids.shape[-1]
    index = torch.arange(t, device=document_ids.device).expand(document_ids.shape)  # (..., T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)  # (..., T)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]  # (..., T)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values  # (..., T)
    return index - first  # (..., T)


def token_positions(
    num_tokens: int, device: torch.device, cache: KVCache | RollingKVCache | None = None,
    position_ids: Tensor | None = None, document_ids: Tensor | None = None, context_parallel: object | None = None,
) -> Tensor:
    """Absolute positions of the new tokens, (T,) or (B, T): the given ``position_ids``; after the cached
    ones (per row); this rank's global ones with context parallelism; within each document; else 0..T-1."""
    if position_ids is not None:
        return position_ids.to(device=device, dtype=torch.long)  # (T,) or (B, T)
    if cache is not None:
        return cache.positions(num_tokens)  # (B, T)
    if context_parallel is not None:
        return cast(Tensor, context_parallel.positions(num_tokens, device))  # type: ignore[attr-defined]
    if document_ids is not None:
        return positions_within_documents(document_ids.to(device))  # (T,) or (B, T)
    return torch.arange(num_tokens, device=device)  # (T,)


def attend(
    queries: Tensor, keys: Tensor, values: Tensor, mask: MaskSpec, *, bias: backends.ScoreBias | None = None,
    positions: Tensor | None = None, scheme: object | None = None, cache: KVCache | RollingKVCache | None = None,
    position_ids: Tensor | None = None, context_parallel: object | None = None, dropout_p: float = 0.0,
    training: bool = False, backend: str = "auto", need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The one attention call of a layer: q (B, H, T, hd), k, v (B, H_kv, T_k, hd) and the call's mask
    description -> (out (B, H, T, hd), weights (B, H, T, T_k) or None).

    With ``context_parallel``, this rank's shard attends the whole sequence through it (causal and this
    rank's key padding: the parts the ranks share; anything else is refused). With a ``cache``, the new
    keys/values are written into it and the new queries attend its slots (at ``position_ids``, default:
    after each row's cached tokens; trimmed to the filled slots when the cache allows, unless the weights
    over all slots are asked for): ``mask.key_padding`` and ``mask.allowed`` are then the *new* tokens'
    (B, T) and (B|1, 1, T, T), and the cache's step description is the call's. Else
    :func:`attnlab.backends.attention`. ``bias`` (float, added to the scores) and a positional ``scheme``
    with a ``score_bias`` (ALiBi) add up; the scheme's is taken for the queries at ``positions`` (default
    0..T-1) and the keys as attended (the cache's slots)."""
    score_bias = score_bias_of(scheme)
    if context_parallel is not None:
        _check_context_parallel_call(mask, bias, score_bias)
        return context_parallel.attention(  # type: ignore[attr-defined]
            queries, keys, values, causal=mask.is_causal, key_padding_mask=mask.key_padding, scale=None), None
    if cache is not None:
        step = cache.update(keys, values, mask.key_padding, window=mask.window, positions=position_ids,
                            attn_mask=mask.allowed, trim=not need_weights)
        if score_bias is not None:
            bias = _add(bias, score_bias(step.positions, step.key_positions), queries, step.keys)  # (1|B, H, T, S)
        return _as_pair(attend_cached(queries, step, window=mask.window, dropout_p=dropout_p, training=training,
                                      backend=backend, need_weights=need_weights, bias=bias))
    if score_bias is not None:
        if positions is None:
            positions = torch.arange(queries.shape[-2], device=queries.device)  # (T,)
        bias = _add(bias, score_bias(positions, positions), queries, keys)  # (1|B, H, T, T): self-attention
    if bias is None and not mask.has_tensors:  # causal / window alone: the flags they are
        return _as_pair(backends.attention(queries, keys, values, causal=mask.causal, window=mask.window,
                                           dropout_p=dropout_p, training=training, backend=backend,
                                           need_weights=need_weights))
    return _as_pair(backends.attention(queries, keys, values, mask=mask, bias=bias, dropout_p=dropout_p,
                                       training=training, backend=backend, need_weights=need_weights))


def _check_context_parallel_call(mask: MaskSpec, bias: object, score_bias: object) -> None:
    """The context-parallel protocol carries causal and key padding only: refuse a call that has more."""
    extra = [name for name in ("window", "query_positions", "document_ids", "allowed") if getattr(mask, name) is not None]
    extra += ["a score bias"] if bias is not None or score_bias is not None else []
    if extra:
        raise AttnlabInputError(f"context_parallel takes causal and key padding only; this call also has "
                                f"{', '.join(extra)}, which the ranks do not share")


def _add(bias: backends.ScoreBias | None, positional: backends.ScoreBias, queries: Tensor,
         keys: Tensor) -> backends.ScoreBias:
    """A given bias plus a scheme's (a description stays one when it is alone)."""
    if bias is None:
        return positional
    t_q, t_k = queries.shape[-2], keys.shape[-2]
    return cast(Tensor, backends.dense_bias(bias, t_q, t_k, queries.device)) + cast(
        Tensor, backends.dense_bias(positional, t_q, t_k, queries.device))  # (1|B, H, T, T_k)


def _as_pair(result: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    return result if isinstance(result, tuple) else (result, None)


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
    bias: backends.ScoreBias | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The new queries (B, H, T, hd) against a cache step (keys/values default to the step's; a latent
    cache passes its up-projected ones, laid out over the same slots), with the step's mask description
    (``step.spec``) and an optional score ``bias`` (1|B, H, T, S), or ALiBi's description. A trimmed step (``step.prefix``: the
    filled slots in position order, no padding) is ``causal`` (bottom-right) among the new tokens, nothing
    for one new token, on any backend. For ``"flash"``, which aligns causal/window by index, the slots are
    put in position order first (:meth:`CacheStep.ordered`)."""
    keys = step.keys if keys is None else keys
    values = step.values if values is None else values
    if values is None:
        raise AttnlabInputError("attend_cached needs values: pass the up-projected values of a keys-only cache")
    if step.prefix and bias is None:
        causal = queries.shape[-2] > 1
        name = backends.resolve(backend, dropout_p=dropout_p, training=training, need_weights=need_weights,
                                device=queries.device)
        if name == "torch":  # the table's entry itself: these q, k, v were checked when the layer was built
            return backends.BACKENDS[name](queries, keys, values, causal=causal, dropout_p=dropout_p, training=training)
        return backends.attention(queries, keys, values, causal=causal, dropout_p=dropout_p, training=training,
                                  backend=backend, need_weights=need_weights)
    spec = step_spec(step.positions, step.key_positions, step.key_padding, window=window) if step.prefix else step.spec
    if backend == "flash":
        keys, ordered_values, padding = step.ordered(keys, values)  # (B, H_kv, S, d), (B, H_kv, S, d_v), (B, S)
        values, spec = cast(Tensor, ordered_values), MaskSpec(causal=True, window=window, key_padding=padding)
        if isinstance(bias, ALiBiBias):  # its key positions follow the keys into position order
            bias = bias.reorder_keys(step.order())
    return backends.attention(queries, keys, values, mask=spec, bias=bias, dropout_p=dropout_p, training=training,
                              backend=backend, need_weights=need_weights)


def _check_scheme(scheme: object, backend: str, context_parallel: object | None) -> None:
    """A positional scheme with a score bias (ALiBi) needs a backend that reads a float mask and no context
    parallelism (whose ranks exchange no bias)."""
    if score_bias_of(scheme) is None:
        return
    takes = backends.takes(backend)
    linear = getattr(type(scheme), "score_bias_form", "dense") == "linear"  # ALiBi: slopes of a distance
    if not (takes.general_masks or (linear and takes.linear_bias)):
        raise AttnlabInputError(f"a positional scheme with a score bias ({type(scheme).__name__}) needs a backend that "
                                f"reads a float mask; backend={backend!r} takes none: use 'auto', 'torch' or 'eager' "
                                "(attnlab.backends.TAKES lists what each backend takes)")
    if context_parallel is not None:
        raise AttnlabInputError(f"context_parallel takes no score bias ({type(scheme).__name__}): its ranks attend "
                                "causally or bidirectionally; use rope=True or no positional scheme")


def _check_modern_options(
    num_heads: int, causal: bool, num_kv_groups: object, window_size: object, context_parallel: object
) -> int:
    """Validate MultiHeadAttention's options beyond the book; returns the number of key/value heads."""
    if num_kv_groups is None:
        num_kv_groups = num_heads
    if isinstance(num_kv_groups, bool) or not isinstance(num_kv_groups, int) or num_kv_groups < 1 or (
        num_heads % num_kv_groups
    ):
        raise AttnlabInputError(
            f"num_kv_groups must be a positive divisor of num_heads={num_heads} (1 = multi-query, "
            f"{num_heads} = multi-head), got {num_kv_groups!r}; try one of "
            f"{[g for g in range(1, num_heads + 1) if num_heads % g == 0]}"
        )
    if window_size is not None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise AttnlabInputError(f"window_size must be None or a positive int, got {window_size!r}")
        if not causal:
            raise AttnlabInputError("window_size (a sliding window over the previous tokens) needs causal=True")
    if context_parallel is not None:
        missing = [name for name in ("attention", "positions") if not callable(getattr(context_parallel, name, None))]
        if missing:
            raise AttnlabInputTypeError(f"context_parallel must have .attention(...) and .positions(...) methods "
                            f"(see attnlab.distributed.ContextParallel); {type(context_parallel).__name__} lacks "
                            f"{', '.join(missing)}")
        if window_size is not None:
            raise AttnlabInputError("context_parallel takes no window_size: its ranks attend causally or bidirectionally")
    return num_kv_groups


# --------------------------------------------------------------------------------------------------
# Hugging Face attention layers <-> MultiHeadAttention (one to one: the same weights, the same function)
# --------------------------------------------------------------------------------------------------


def _hf_rope_base(config: Any) -> float:
    """The default RoPE's base of a Hugging Face config (transformers 5's ``rope_parameters`` or the older
    ``rope_theta``/``rope_scaling``); anything but the default rotation is refused."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        params = {**(getattr(config, "rope_scaling", None) or {}), "rope_theta": getattr(config, "rope_theta", 10000.0)}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise AttnlabInputError(f"from_hf supports the default RoPE only, the layer's config has rope_type={rope_type!r} "
                         "(scaled RoPE such as llama3 or yarn changes the frequencies)")
    if float(getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise AttnlabInputError("from_hf supports RoPE over the whole head only, the config has partial_rotary_factor="
                         f"{config.partial_rotary_factor}")
    return float(params["rope_theta"])


def _hf_window(layer: Any, config: Any) -> int | None:
    """Qwen2/3 say per layer (``layer.sliding_window``), Mistral in the config."""
    window = layer.sliding_window if hasattr(layer, "sliding_window") else getattr(config, "sliding_window", None)
    return None if window is None else int(window)


def _copy(target: Tensor | None, source: Tensor | None, name: str) -> None:
    if (target is None) != (source is None):
        raise AttnlabInputError(f"{name}: one side has it and the other does not (e.g. a bias); build both alike")
    if target is None or source is None:
        return
    if target.shape != source.shape:
        raise AttnlabInputError(f"{name}: shape {tuple(source.shape)} does not fit {tuple(target.shape)}; build both "
                         "from the same sizes")
    target.copy_(source)


def _mha_from_hf(cls: type[MultiHeadAttention], layer: Any, *, context_length: int | None,
                 backend: str) -> MultiHeadAttention:
    config = getattr(layer, "config", None)
    if config is None:
        raise AttnlabInputTypeError(f"layer must be a Hugging Face attention layer with a .config, got {type(layer).__name__}")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise AttnlabInputError("from_hf: attention softcapping (attn_logit_softcapping) has no equivalent here")
    weight = None
    if hasattr(layer, "c_attn"):  # GPT-2: fused Conv1D (y = x @ W + b), W (d, 3d)
        if getattr(layer, "is_cross_attention", False) or not config.scale_attn_weights or \
                config.scale_attn_by_inverse_layer_idx:
            raise AttnlabInputError("from_hf takes GPT-2 self-attention with scale_attn_weights=True and "
                             "scale_attn_by_inverse_layer_idx=False (the 1/sqrt(head_dim) scaling)")
        d = layer.embed_dim
        module = cls(d, d, context_length or config.n_positions, float(config.attn_pdrop), layer.num_heads,
                     True, backend=backend)
        w, b = layer.c_attn.weight, layer.c_attn.bias  # (d, 3d), (3d,)
        with torch.no_grad():
            for i, proj in enumerate((module.W_query, module.W_key, module.W_value)):
                _copy(proj.weight, w[:, i * d:(i + 1) * d].T, "c_attn.weight")
                _copy(proj.bias, b[i * d:(i + 1) * d], "c_attn.bias")
            _copy(module.out_proj.weight, layer.c_proj.weight.T, "c_proj.weight")
            _copy(module.out_proj.bias, layer.c_proj.bias, "c_proj.bias")
        weight = layer.c_attn.weight
    elif all(hasattr(layer, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
        biases = {p.bias is not None for p in (layer.q_proj, layer.k_proj, layer.v_proj)}
        if len(biases) != 1:
            raise AttnlabInputError("from_hf: q_proj, k_proj and v_proj must all have a bias or none")
        head_dim = int(layer.head_dim)
        if abs(float(layer.scaling) - head_dim ** -0.5) > 1e-12 * head_dim ** -0.5:
            raise AttnlabInputError(f"from_hf: the layer scales scores by {layer.scaling}, not 1/sqrt(head_dim={head_dim})")
        hidden, num_heads = layer.q_proj.in_features, layer.q_proj.out_features // head_dim
        q_norm = getattr(layer, "q_norm", None)
        eps = None if q_norm is None else float(getattr(q_norm, "variance_epsilon", getattr(q_norm, "eps", 1e-6)))
        module = cls(
            hidden, layer.o_proj.out_features, context_length or config.max_position_embeddings,
            float(getattr(config, "attention_dropout", 0.0)), num_heads, biases.pop(), backend=backend,
            num_kv_groups=layer.k_proj.out_features // head_dim, window_size=_hf_window(layer, config), rope=True,
            rope_base=_hf_rope_base(config), head_dim=None if num_heads * head_dim == hidden else head_dim,
            out_bias=layer.o_proj.bias is not None, qk_norm=eps,
        )
        to_hf(module, layer, _reverse=True)
        weight = layer.q_proj.weight
    else:
        raise AttnlabInputTypeError(f"from_hf knows Llama/Mistral/Qwen2/Qwen3 (q_proj, k_proj, v_proj, o_proj) and GPT-2 (c_attn, "
                        f"c_proj) attention layers, got {type(layer).__name__}")
    return module.to(device=weight.device, dtype=weight.dtype).train(layer.training)


def to_hf(module: MultiHeadAttention, layer: Any, *, _reverse: bool = False) -> nn.Module:
    """Copy ``module``'s weights into the Hugging Face ``layer`` (``_reverse``: the layer's into the module)."""
    pairs: list[tuple[Tensor | None, Tensor | None, str]]
    if hasattr(layer, "c_attn"):
        d = module.d_out
        w, b = layer.c_attn.weight, layer.c_attn.bias  # (d, 3d), (3d,)
        projections = (module.W_query, module.W_key, module.W_value)
        pairs = [(w[:, i * d:(i + 1) * d], p.weight.T, "c_attn.weight") for i, p in enumerate(projections)]
        pairs += [(b[i * d:(i + 1) * d], p.bias, "c_attn.bias") for i, p in enumerate(projections)]
        pairs += [(layer.c_proj.weight, module.out_proj.weight.T, "c_proj.weight"),
                  (layer.c_proj.bias, module.out_proj.bias, "c_proj.bias")]
    elif hasattr(layer, "q_proj"):
        pairs = []
        for hf_name, ours in (("q_proj", module.W_query), ("k_proj", module.W_key), ("v_proj", module.W_value),
                              ("o_proj", module.out_proj)):
            hf = getattr(layer, hf_name)
            pairs += [(hf.weight, ours.weight, f"{hf_name}.weight"), (hf.bias, ours.bias, f"{hf_name}.bias")]
        for name in ("q_norm", "k_norm"):
            hf_norm, our_norm = getattr(layer, name, None), getattr(module, name)
            pairs.append((None if hf_norm is None else hf_norm.weight, None if our_norm is None else our_norm.weight,
                          f"{name}.weight"))
    else:
        raise AttnlabInputTypeError(f"to_hf knows Llama/Mistral/Qwen2/Qwen3 and GPT-2 attention layers, got {type(layer).__name__}")
    with torch.no_grad():
        for hf_tensor, our_tensor, name in pairs:
            if _reverse:
                _copy(our_tensor, hf_tensor, name)
            else:
                _copy(hf_tensor, our_tensor, name)
    return layer


# PEP 8 aliases.
SelfAttentionV1 = SelfAttention_v1
SelfAttentionV2 = SelfAttention_v2
