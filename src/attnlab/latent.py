"""Multi-head latent attention (MLA): keys and values compressed into one small latent per token.

DeepSeek-V2's idea, as in the book's MLA bonus (``ch04/05_mla``): instead of keys and values of
``num_heads * head_dim`` features each, a token is projected *down* to a latent vector of
``latent_dim`` features (``W_DKV``), and the keys and values of every head are projected back *up* from
the latent (``W_UK``, ``W_UV``). The cache stores the latent only, ``latent_dim`` numbers per token
instead of ``2 * d_out``: ``2 * d_out / latent_dim`` times less memory (16x for the default
``latent_dim = d_out // 8``). Queries are per head as usual (``W_query``), and the output projection is
the chapter's. (Without the book's variant's simplifications DeepSeek also compresses the queries and
carries a separate rotary part; not here.)

Shape letters: B batch, T new tokens, S cached slots, d_in input width, d_out output width, H num_heads,
hd head_dim = d_out / H, L latent_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab import backends
from attnlab.cache import KVCache
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.masks import MaskSpec
from attnlab.modules import attend_cached, check_dropout, check_heads, check_positive_int, check_x

__all__ = ["MultiHeadLatentAttention"]


class MultiHeadLatentAttention(nn.Module):
    """Multi-head attention whose keys and values come from a per-token latent of ``latent_dim`` features.

    ``MultiHeadLatentAttention(d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, *,
    latent_dim=None, causal=True, backend="auto")`` (the chapter's arguments first, in the chapter's
    order); ``latent_dim`` defaults to ``max(16, d_out // 8)`` as in the book's bonus code.

    forward(x, *, key_padding_mask=None, need_weights=False, cache=None, position_ids=None): as
    :meth:`attnlab.MultiHeadAttention.forward` (``position_ids`` with a cache only: the causal mask's
    positions, as the module has no rotary embeddings); the cache (:meth:`new_cache`, a
    :class:`~attnlab.cache.KVCache` with ``value_dim=0``) holds the latents, and the keys and values of
    all cached tokens are projected up from them at each step.

    A NaN or inf in one position's input turns every output that attends that position into NaN, as in
    ``torch.nn.MultiheadAttention``.

    x: (B, T, d_in)   ->   (B, T, d_out)
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
        latent_dim: int | None = None,
        causal: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("context_length", context_length)):
            check_positive_int(name, value)
        check_dropout(dropout)
        check_heads(d_out, num_heads)
        latent_dim = max(16, d_out // 8) if latent_dim is None else latent_dim
        check_positive_int("latent_dim", latent_dim)
        backends.resolve(backend)  # validates the name
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads, self.head_dim, self.latent_dim = num_heads, d_out // num_heads, latent_dim
        self.causal, self.backend = causal, backend
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)  # per-head queries
        self.W_DKV = nn.Linear(d_in, latent_dim, bias=qkv_bias)  # down: token -> latent
        self.W_UK = nn.Linear(latent_dim, d_out, bias=qkv_bias)  # up: latent -> every head's key
        self.W_UV = nn.Linear(latent_dim, d_out, bias=qkv_bias)  # up: latent -> every head's value
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, latent_dim={self.latent_dim}, causal={self.causal}, "
                f"backend={self.backend!r}")

    def new_cache(
        self, batch_size: int, max_tokens: int, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty latent cache: ``latent_dim`` numbers per token (keys only, ``value_dim=0``)."""
        return KVCache(
            batch_size, max_tokens, 1, self.latent_dim, value_dim=0,
            dtype=self.W_DKV.weight.dtype if dtype is None else dtype,
            device=self.W_DKV.weight.device if device is None else device,
        )

    def _heads(self, t: Tensor) -> Tensor:
        b, num_tokens, _ = t.shape  # (B, T, d_out)
        return t.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(
        self,
        x: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        cache: KVCache | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_x(x, self.d_in, (3,), self.context_length, dtype=self.W_query.weight.dtype)
        b, num_tokens, _ = x.shape
        queries = self._heads(self.W_query(x))  # (B, H, T, hd)
        latent = self.W_DKV(x)  # (B, T, L)

        if cache is not None:
            if not isinstance(cache, KVCache) or cache.value_dim != 0 or cache.head_dim != self.latent_dim:
                raise AttnlabInputTypeError("cache must be a latent KVCache from MultiHeadLatentAttention.new_cache "
                                f"(keys only, head_dim={self.latent_dim}), got {cache!r}")
            if not self.causal:
                raise AttnlabInputError("a cache is for causal decoding: build the module with causal=True")
            cache.claim(self)
            step = cache.update(latent[:, None], None, key_padding_mask, positions=position_ids)  # (B, 1, S, L)
            all_latent = step.keys[:, 0]  # (B, S, L)
            keys = self._heads(self.W_UK(all_latent))  # (B, H, S, hd)
            values = self._heads(self.W_UV(all_latent))  # (B, H, S, hd)
            result = attend_cached(
                queries, step, keys, values, window=None, dropout_p=self.dropout.p, training=self.training,
                backend=self.backend, need_weights=need_weights,
            )
        else:
            if position_ids is not None:
                raise AttnlabInputError("position_ids are for a cache (its causal mask): without one, a module with no "
                                 "rotary embeddings has no use for positions")
            keys = self._heads(self.W_UK(latent))  # (B, H, T, hd)
            values = self._heads(self.W_UV(latent))  # (B, H, T, hd)
            if key_padding_mask is not None:
                if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                    raise AttnlabInputTypeError("key_padding_mask must be a bool tensor (True = padding)")
                if tuple(key_padding_mask.shape) != (b, num_tokens):
                    raise AttnlabInputError(f"key_padding_mask must have shape (batch, num_tokens) = {(b, num_tokens)}, "
                                     f"got {tuple(key_padding_mask.shape)}")
            result = backends.attention(
                queries, keys, values, mask=MaskSpec(causal=self.causal, key_padding=key_padding_mask),
                dropout_p=self.dropout.p, training=self.training, backend=self.backend, need_weights=need_weights,
            )
        context_vectors, weights = result if isinstance(result, tuple) else (result, None)  # (B, H, T, hd)
        context_vectors = context_vectors.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)  # (B, T, d_out)
        out = self.out_proj(context_vectors)  # (B, T, d_out)
        return (out, weights) if weights is not None else out
