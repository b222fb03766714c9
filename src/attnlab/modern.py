"""The modern family: grouped-query, multi-query, sliding-window, rotary, latent and cached attention,
each with a reference written the plain way.

Each entry of :data:`MODERN` names an attnlab module configuration (``MultiHeadAttention`` options, or
:class:`~attnlab.latent.MultiHeadLatentAttention`) and the plain reference it must equal:

==========  =====================================================================================
``gqa``     ``num_kv_groups = num_heads // 2`` (or 1 for one head): grouped-query attention.
``mqa``     ``num_kv_groups = 1``: multi-query attention, one key/value head for all.
``swa``     ``window_size`` (default 64): sliding-window attention, itself + 63 keys before.
``rope``    ``rope=True``: rotary position embeddings (Llama's rotate-half), base 10000.
``mla``     :class:`~attnlab.latent.MultiHeadLatentAttention`, ``latent_dim = max(16, d_out // 8)``.
``cached``  the chapter's ``MultiHeadAttention`` decoding through a static :class:`~attnlab.cache.KVCache`.
==========  =====================================================================================

The references, :class:`PlainAttention` and :class:`PlainLatentAttention`, are written like the book's
bonus code (``ch04/03_kv-cache``, ``04_gqa``, ``05_mla``, ``06_swa``, ``ch05/07_gpt_to_llama``): the
key/value heads repeated with ``repeat_interleave``, the window and the causal mask as a ``masked_fill``
of a boolean matrix, RoPE as the book's ``compute_rope``, the cache as ``torch.cat`` onto the previous
keys and values plus a position pointer. Their parameters have the attnlab modules' names, so
``reference.load_state_dict(module.state_dict())`` carries the weights over (see :func:`plain_reference`).

Shape letters: B batch, T new tokens, T_k all keys, H heads, H_kv key/value heads, hd head_dim, L latent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.cache import KVCache, LayerCaches, RollingKVCache
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.latent import MultiHeadLatentAttention
from attnlab.modules import MultiHeadAttention
from attnlab.rope import RotaryEmbedding

__all__ = [
    "DecoderConfig",
    "MODERN",
    "ModernVariant",
    "PlainAttention",
    "PlainLatentAttention",
    "TinyDecoder",
    "book_compute_rope",
    "book_precompute_rope_params",
    "build_modern",
    "plain_reference",
]

DEFAULT_WINDOW = 64


# --------------------------------------------------------------------------------------------------
# The book's RoPE (ch05/07_gpt_to_llama), verbatim apart from names of the arguments
# --------------------------------------------------------------------------------------------------


def book_precompute_rope_params(
    head_dim: int, theta_base: float = 10_000, context_length: int = 4096
) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (theta_base ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
    positions = torch.arange(context_length)
    angles = positions[:, None] * inv_freq[None, :]  # (context_length, hd / 2)
    angles = torch.cat([angles, angles], dim=1)  # (context_length, hd)
    return torch.cos(angles), torch.sin(angles)


def book_compute_rope(x: Tensor, cos: Tensor, sin: Tensor, offset: int = 0) -> Tensor:
    _batch_size, _num_heads, seq_len, head_dim = x.shape
    x1 = x[..., : head_dim // 2]  # first half
    x2 = x[..., head_dim // 2 :]  # second half
    cos = cos[offset : offset + seq_len, :].unsqueeze(0).unsqueeze(0)  # (1, 1, T, hd)
    sin = sin[offset : offset + seq_len, :].unsqueeze(0).unsqueeze(0)  # (1, 1, T, hd)
    rotated = torch.cat((-x2, x1), dim=-1)
    x_rotated = (x * cos) + (rotated * sin)
    return x_rotated.to(dtype=x.dtype)


# --------------------------------------------------------------------------------------------------
# Plain references
# --------------------------------------------------------------------------------------------------


class PlainAttention(nn.Module):
    """Multi-head attention with grouped key/value heads, a sliding window, RoPE and a KV cache, the
    plain way (the book's bonus code combined in one readable class; ``forward(x, use_cache=...)``,
    ``reset_cache()``)."""

    # Declared for the type checker: the buffers (cos and sin only with rope_base) and the cache.
    mask: Tensor  # (context_length, context_length)
    cos: Tensor  # (4 * context_length, hd)
    sin: Tensor  # (4 * context_length, hd)
    cache_k: Tensor | None  # (B, H_kv, T_k, hd)
    cache_v: Tensor | None  # (B, H_kv, T_k, hd)
    ptr_current_pos: int

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, *, num_kv_groups: int | None = None, window_size: int | None = None,
                 rope_base: float | None = None) -> None:
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.num_kv_groups = num_heads if num_kv_groups is None else num_kv_groups
        self.group_size = num_heads // self.num_kv_groups
        self.window_size = window_size
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, self.num_kv_groups * self.head_dim, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, self.num_kv_groups * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        self.rope = rope_base is not None
        if rope_base is not None:
            cos, sin = book_precompute_rope_params(self.head_dim, rope_base, 4 * context_length)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        self.cache_k, self.cache_v, self.ptr_current_pos = None, None, 0

    def reset_cache(self) -> None:
        self.cache_k, self.cache_v, self.ptr_current_pos = None, None, 0

    def forward(self, x: Tensor, use_cache: bool = False, key_padding_mask: Tensor | None = None) -> Tensor:
        b, num_tokens, _ = x.shape
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = self.W_key(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_kv_groups, self.head_dim).transpose(1, 2)

        start = self.ptr_current_pos if use_cache else 0
        if self.rope:
            queries = book_compute_rope(queries, self.cos, self.sin, offset=start)
            keys = book_compute_rope(keys, self.cos, self.sin, offset=start)
        if use_cache:
            if self.cache_k is not None:
                assert self.cache_v is not None  # the two caches are set together
                keys = torch.cat([self.cache_k, keys], dim=2)  # (B, H_kv, T_k, hd)
                values = torch.cat([self.cache_v, values], dim=2)  # (B, H_kv, T_k, hd)
            self.cache_k, self.cache_v = keys, values
            self.ptr_current_pos += num_tokens

        keys = keys.repeat_interleave(self.group_size, dim=1)  # (B, H, T_k, hd)
        values = values.repeat_interleave(self.group_size, dim=1)  # (B, H, T_k, hd)
        attn_scores = queries @ keys.transpose(2, 3)  # (B, H, T, T_k)

        num_keys = keys.shape[2]
        q_pos = torch.arange(start, start + num_tokens)[:, None]  # (T, 1)
        k_pos = torch.arange(num_keys)[None, :]  # (1, T_k)
        masked = k_pos > q_pos  # the future
        if self.window_size is not None:
            masked = masked | (k_pos <= q_pos - self.window_size)  # further back than the window
        masked = masked.to(x.device)
        if key_padding_mask is not None:  # (B, T_k), True = padding
            masked = masked[None, None] | key_padding_mask[:, None, None, :]  # (B, 1, T, T_k)
        attn_scores = attn_scores.masked_fill(masked, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = torch.nan_to_num(attn_weights, nan=0.0)  # a query with every key masked: zeros
        attn_weights = self.dropout(attn_weights)
        context_vec = (attn_weights @ values).transpose(1, 2)  # (B, T, H, hd)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)  # (B, T, d_out)
        return self.out_proj(context_vec)


class PlainLatentAttention(nn.Module):
    """Multi-head latent attention the plain way (the book's MLA bonus): the cache holds the latents."""

    cache_c_kv: Tensor | None  # (B, T_k, L)
    ptr_current_pos: int

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, *, latent_dim: int | None = None) -> None:
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.latent_dim = latent_dim if latent_dim is not None else max(16, d_out // 8)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_DKV = nn.Linear(d_in, self.latent_dim, bias=qkv_bias)
        self.W_UK = nn.Linear(self.latent_dim, d_out, bias=qkv_bias)
        self.W_UV = nn.Linear(self.latent_dim, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.cache_c_kv, self.ptr_current_pos = None, 0

    def reset_cache(self) -> None:
        self.cache_c_kv, self.ptr_current_pos = None, 0

    def forward(self, x: Tensor, use_cache: bool = False) -> Tensor:
        b, num_tokens, _ = x.shape
        queries = self.W_query(x)  # (B, T, d_out)
        latent_new = self.W_DKV(x)  # (B, T, L)
        start = self.ptr_current_pos if use_cache else 0
        if use_cache:
            latent = latent_new if self.cache_c_kv is None else torch.cat([self.cache_c_kv, latent_new], dim=1)
            self.cache_c_kv = latent  # (B, T_k, L)
            self.ptr_current_pos += num_tokens
        else:
            latent = latent_new
        keys = self.W_UK(latent)  # (B, T_k, d_out)
        values = self.W_UV(latent)  # (B, T_k, d_out)
        num_keys = keys.shape[1]
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        keys = keys.view(b, num_keys, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_keys, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)  # (B, H, T, T_k)
        q_pos = torch.arange(start, start + num_tokens)[:, None]
        k_pos = torch.arange(num_keys)[None, :]
        attn_scores = attn_scores.masked_fill((k_pos > q_pos).to(x.device), -torch.inf)
        attn_weights = self.dropout(torch.softmax(attn_scores / self.head_dim**0.5, dim=-1))
        context_vec = (attn_weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModernVariant:
    """One entry: ``options(num_heads)`` gives the attnlab module's keyword options; ``latent`` says it is
    :class:`MultiHeadLatentAttention` instead of :class:`MultiHeadAttention`; ``cached`` that it decodes
    through a cache."""

    name: str
    summary: str
    options: Callable[[int], dict[str, Any]]
    latent: bool = False
    cached: bool = False


MODERN: dict[str, ModernVariant] = {
    v.name: v
    for v in (
        ModernVariant("gqa", "grouped-query attention, num_heads // 2 key/value heads",
                      lambda h: {"num_kv_groups": max(h // 2, 1) if h % 2 == 0 else 1}),
        ModernVariant("mqa", "multi-query attention, one key/value head", lambda h: {"num_kv_groups": 1}),
        ModernVariant("swa", f"sliding-window attention, window {DEFAULT_WINDOW}",
                      lambda h: {"window_size": DEFAULT_WINDOW}),
        ModernVariant("rope", "rotary position embeddings (rotate-half), base 10000", lambda h: {"rope": True}),
        ModernVariant("mla", "multi-head latent attention, latent max(16, d_out // 8)", lambda h: {}, latent=True),
        ModernVariant("cached", "multi-head attention decoding through a static KV cache", lambda h: {},
                      cached=True),
    )
}


def build_modern(
    name: str, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
    qkv_bias: bool = False, **overrides: Any,
) -> nn.Module:
    """The attnlab module of entry ``name`` (``overrides`` replace the entry's options, e.g.
    ``window_size=``, ``num_kv_groups=``, ``backend=``, ``latent_dim=``)."""
    if name not in MODERN:
        raise AttnlabInputError(f"unknown modern variant {name!r}; valid names: {', '.join(MODERN)}")
    entry = MODERN[name]
    options = {**entry.options(num_heads), **overrides}
    cls = MultiHeadLatentAttention if entry.latent else MultiHeadAttention
    return cls(d_in, d_out, context_length, dropout, num_heads, qkv_bias, **options)


def plain_reference(module: MultiHeadAttention | MultiHeadLatentAttention) -> nn.Module:
    """The plain reference computing the same function as ``module`` (a :class:`MultiHeadAttention` with
    any of the modern options, or a :class:`MultiHeadLatentAttention`), carrying its weights, on its device
    and dtype, in its train/eval mode."""
    qkv_bias = module.W_query.bias is not None
    args = (module.d_in, module.d_out, module.context_length, module.dropout.p, module.num_heads, qkv_bias)
    ref: nn.Module
    if isinstance(module, MultiHeadLatentAttention):
        ref = PlainLatentAttention(*args, latent_dim=module.latent_dim)
    elif isinstance(module, MultiHeadAttention):
        if module.rope is not None and not isinstance(module.rope, RotaryEmbedding):
            raise AttnlabInputError("plain_reference knows the built-in RotaryEmbedding only, not a custom rope= hook")
        if not module.causal:
            raise AttnlabInputError("plain_reference needs a causal module")
        ref = PlainAttention(
            *args, num_kv_groups=module.num_kv_groups, window_size=module.window_size,
            rope_base=None if module.rope is None else module.rope.base,
        )
    else:
        raise AttnlabInputTypeError(f"module must be a MultiHeadAttention or MultiHeadLatentAttention, got {type(module).__name__}")
    weight = module.W_query.weight
    ref.to(device=weight.device, dtype=weight.dtype)
    ref.load_state_dict(module.state_dict(), strict=True)
    ref.train(module.training)
    return ref



# --------------------------------------------------------------------------------------------------
# A small reference decoder for attnlab.generate (Llama-shaped: RMSNorm, RoPE attention, SwiGLU)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderConfig:
    """The shape of :class:`TinyDecoder`; defaults make a model of about 0.2M parameters."""

    vocab_size: int = 97  # tokens
    d_model: int = 32  # width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (grouped-query)
    context_length: int = 256  # longest sequence
    window_size: int | None = None  # sliding-window attention (its layers then decode through rolling caches)
    latent_dim: int | None = None  # not None: multi-head latent attention with this latent (no RoPE)
    backend: str = "auto"  # attention backend of every layer


class _DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.att: MultiHeadAttention | MultiHeadLatentAttention
        if cfg.latent_dim is not None:
            self.att = MultiHeadLatentAttention(d, d, cfg.context_length, 0.0, cfg.n_heads, latent_dim=cfg.latent_dim,
                                                backend=cfg.backend)
        else:
            self.att = MultiHeadAttention(d, d, cfg.context_length, 0.0, cfg.n_heads, num_kv_groups=cfg.n_kv_heads,
                                          window_size=cfg.window_size, rope=True, out_bias=False, backend=cfg.backend)
        self.gate, self.up = nn.Linear(d, 4 * d, bias=False), nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: Tensor, cache: KVCache | RollingKVCache | None, position_ids: Tensor | None,
                key_padding_mask: Tensor | None) -> Tensor:
        h = self.norm1(x)  # (B, T, d)
        if isinstance(self.att, MultiHeadLatentAttention):
            attended = self.att(h, cache=cache, position_ids=position_ids if cache is not None else None,
                                key_padding_mask=key_padding_mask)
        else:
            attended = self.att(h, cache=cache, position_ids=position_ids, key_padding_mask=key_padding_mask)
        x = x + attended  # (B, T, d)
        h = self.norm2(x)  # (B, T, d)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))  # (B, T, d)


class TinyDecoder(nn.Module):
    """A Llama-shaped decoder built from attnlab's attention, the reference model of :func:`attnlab.generate`:
    token embeddings, ``n_layers`` pre-RMSNorm blocks (RoPE grouped-query attention, or latent attention; a
    SwiGLU feed-forward), a final norm and an output head.

    ``forward(idx, caches=None, *, position_ids=None, key_padding_mask=None)``: idx (B, T) token ids ->
    logits (B, T, vocab); ``caches`` a :class:`attnlab.cache.LayerCaches` from :meth:`new_caches`."""

    def __init__(self, cfg: DecoderConfig = DecoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([_DecoderBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.out_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def new_caches(self, batch_size: int, max_tokens: int, *, dtype: torch.dtype | None = None) -> LayerCaches:
        """One cache per layer (rolling for sliding-window layers shorter than ``max_tokens``)."""
        return LayerCaches.for_model(self, batch_size, max_tokens, dtype=dtype)

    def forward(
        self, idx: Tensor, caches: LayerCaches | None = None, *, position_ids: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        x = self.tok_emb(idx)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i], position_ids, key_padding_mask)  # (B, T, d)
        return self.out_head(self.final_norm(x))  # (B, T, vocab)
