"""Multi-head latent attention: the book's MLA layout and parameter names, the same function as its plain
reference with the same weights, a cache of latents only, and defined errors."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.latent import MultiHeadLatentAttention
from attnlab.modern import PlainLatentAttention
from tolerances import assert_close


def test_layout_is_the_books():
    m = MultiHeadLatentAttention(8, 32, 16, 0.0, 4)
    assert m.latent_dim == 16  # max(16, d_out // 8)
    assert MultiHeadLatentAttention(8, 256, 16, 0.0, 4).latent_dim == 32
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "W_query.weight": (32, 8), "W_DKV.weight": (16, 8), "W_UK.weight": (32, 16), "W_UV.weight": (32, 16),
        "out_proj.weight": (32, 32), "out_proj.bias": (32,),
    }
    ref = PlainLatentAttention(8, 32, 16, 0.0, 4)
    assert [n for n, _ in ref.named_parameters()] == list(shapes)


def test_equals_float64_math_by_hand():
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(6, 8, 16, 0.0, 2, latent_dim=3, backend="eager").double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    latent = x @ m.W_DKV.weight.T  # (B, T, L)
    q = (x @ m.W_query.weight.T).view(2, 5, 2, 4).transpose(1, 2)
    k = (latent @ m.W_UK.weight.T).view(2, 5, 2, 4).transpose(1, 2)
    v = (latent @ m.W_UV.weight.T).view(2, 5, 2, 4).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(4)).masked_fill(torch.ones(5, 5).triu(1).bool(), -torch.inf)
    expected = m.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 8))
    assert_close(m(x), expected, n=6 + 3 + 4 + 5 + 8)  # float64: d_in, latent, head dim, T, out_proj


def test_padding_and_bidirectional():
    torch.manual_seed(1)
    m = MultiHeadLatentAttention(6, 8, 16, 0.0, 2, causal=False, backend="eager")
    x = torch.randn(1, 4, 6)
    pad = torch.tensor([[False, False, True, True]])
    out = m(x, key_padding_mask=pad)
    assert_close(out[:, :2], m(x[:, :2]), n=6 + 8 + 4 + 4 + 8)  # padding keys change nothing


def test_cache_holds_latents_only():
    m = MultiHeadLatentAttention(8, 32, 16, 0.0, 4, latent_dim=5)
    cache = m.new_cache(2, 7)
    assert cache.values is None and tuple(cache.keys.shape) == (2, 1, 7, 5)
    assert cache.nbytes == 2 * 7 * 5 * 4  # vs 2 * 7 * 2 * 32 * 4 for multi-head keys and values


def test_errors():
    with pytest.raises(ValueError, match="latent_dim must be a positive int"):
        MultiHeadLatentAttention(8, 32, 16, 0.0, 4, latent_dim=0)
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadLatentAttention(8, 30, 16, 0.0, 4)
    m = MultiHeadLatentAttention(8, 32, 16, 0.0, 4)
    from attnlab import MultiHeadAttention

    with pytest.raises(TypeError, match="latent KVCache"):
        m(torch.randn(1, 2, 8), cache=MultiHeadAttention(8, 32, 16, 0.0, 4).new_cache(1, 4))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        m(torch.randn(1, 2, 8), key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))
