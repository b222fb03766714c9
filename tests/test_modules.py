"""The chapter's classes: the book's numbers, the book's state_dicts, equivalences and defined errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnlab
from attnlab import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
)
from attnlab import functional as F
from tolerances import assert_close, printed_atol, rel_tol

INPUTS = attnlab.book_inputs()
BATCH = torch.stack((INPUTS, INPUTS), dim=0)  # (2, 6, 3)


def close(actual, expected, n=3 + 2 + 6 + 2):
    """Against the book's printed 4-decimal numbers: half a unit of the 4th decimal plus our float32 bound
    (n = the chained reductions: d_in 3, d_out 2, 6 tokens, out_proj 2)."""
    expected = torch.tensor(expected, dtype=torch.float64)
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.detach().double(), expected, atol=printed_atol(4, torch.float32, n, scale=scale),
                               rtol=0)


# -- the book's classes, verbatim from chapter 3: the independent reference ----------------------


class BookCausalAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.d_out = d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, d_in = x.shape
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        attn_scores = queries @ keys.transpose(1, 2)
        attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values


class BookMultiHeadAttentionWrapper(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.heads = nn.ModuleList(
            [BookCausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads], dim=-1)


class BookMultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, d_in = x.shape
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context_vec = (attn_weights @ values).transpose(1, 2)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


# -- the book's printed numbers ------------------------------------------------------------------


def test_self_attention_v1_book_values():
    torch.manual_seed(123)
    sa = SelfAttention_v1(3, 2)
    close(INPUTS[1] @ sa.W_query, [0.4306, 1.4551])
    close(sa(INPUTS), [[0.2996, 0.8053], [0.3061, 0.8210], [0.3058, 0.8203],
                       [0.2948, 0.7939], [0.2927, 0.7891], [0.2990, 0.8040]])


def test_trainable_step_by_step_book_values():
    torch.manual_seed(123)
    W_query, W_key, W_value = (torch.rand(3, 2) for _ in range(3))
    query_2 = INPUTS[1] @ W_query
    keys, values = INPUTS @ W_key, INPUTS @ W_value
    close(query_2, [0.4306, 1.4551])
    close(query_2 @ keys[1], 1.8524)
    scores = F.all_pair_scores(query_2[None], keys)[0]
    close(scores, [1.2705, 1.8524, 1.8111, 1.0795, 0.5577, 1.5440])
    weights = F.softmax(scores / 2**0.5)
    close(weights, [0.1500, 0.2264, 0.2199, 0.1311, 0.0906, 0.1820])
    close(F.context_vectors(weights, values), [0.3061, 0.8210])


def test_self_attention_v2_book_values():
    torch.manual_seed(789)
    close(SelfAttention_v2(3, 2)(INPUTS), [[-0.0739, 0.0713], [-0.0748, 0.0703], [-0.0749, 0.0702],
                                           [-0.0760, 0.0685], [-0.0763, 0.0679], [-0.0754, 0.0693]])


def test_causal_attention_book_values():
    torch.manual_seed(123)
    out = CausalAttention(3, 2, 6, 0.0)(BATCH)
    assert out.shape == (2, 6, 2)
    expected = [[-0.4519, 0.2216], [-0.5874, 0.0058], [-0.6300, -0.0632],
                [-0.5675, -0.0843], [-0.5526, -0.0981], [-0.5299, -0.1081]]
    close(out, [expected, expected])


def test_wrapper_book_values():
    torch.manual_seed(123)
    out = MultiHeadAttentionWrapper(3, 2, 6, 0.0, num_heads=2)(BATCH)
    assert out.shape == (2, 6, 4)
    expected = [[-0.4519, 0.2216, 0.4772, 0.1063], [-0.5874, 0.0058, 0.5891, 0.3257],
                [-0.6300, -0.0632, 0.6202, 0.3860], [-0.5675, -0.0843, 0.5478, 0.3589],
                [-0.5526, -0.0981, 0.5321, 0.3428], [-0.5299, -0.1081, 0.5077, 0.3493]]
    close(out, [expected, expected])


@pytest.mark.parametrize("backend", ["auto", "eager", "torch"])
def test_multihead_book_values(backend):
    torch.manual_seed(123)
    out = MultiHeadAttention(3, 2, 6, 0.0, num_heads=2, backend=backend)(BATCH)
    assert out.shape == (2, 6, 2)
    expected = [[0.3190, 0.4858], [0.2943, 0.3897], [0.2856, 0.3593],
                [0.2693, 0.3873], [0.2639, 0.3928], [0.2575, 0.4028]]
    close(out, [expected, expected])


def test_gpt2_size_parameter_count():
    assert sum(p.numel() for p in MultiHeadAttention(768, 768, 1024, 0.0, 12).parameters()) == 2_360_064


def test_causal_dropout_book_values():
    # 3.5.2: dropout(0.5) with seed 123 on the causal weights of SelfAttention_v2 (seed 789).
    torch.manual_seed(789)
    sa = SelfAttention_v2(3, 2)
    q, k = sa.W_query(INPUTS), sa.W_key(INPUTS)
    _, weights = F.scaled_dot_product_attention(q, k, k, causal=True, return_weights=True)
    torch.manual_seed(123)
    dropped = nn.Dropout(0.5)(weights)
    close(dropped[2], [0.7599, 0.6194, 0.6206, 0.0, 0.0, 0.0])
    close(dropped[5], [0.0, 0.3327, 0.3331, 0.3084, 0.3331, 0.0])


# -- the book's state_dicts load strictly, and give the same function ----------------------------


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_state_dicts_load_strict_and_match(qkv_bias):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    pairs = [
        (BookCausalAttention(5, 4, 9, 0.0, qkv_bias), CausalAttention(5, 4, 9, 0.0, qkv_bias)),
        (BookMultiHeadAttentionWrapper(5, 4, 9, 0.0, 3, qkv_bias), MultiHeadAttentionWrapper(5, 4, 9, 0.0, 3, qkv_bias)),
        (BookMultiHeadAttention(5, 6, 9, 0.0, 3, qkv_bias), MultiHeadAttention(5, 6, 9, 0.0, 3, qkv_bias)),
    ]
    for book, ours in pairs:
        assert list(book.state_dict()) == list(ours.state_dict())
        ours.load_state_dict(book.state_dict(), strict=True)
        assert_close(ours(x), book(x), n=5 + 6 + 7 + 6)  # d_in, d_out (>= head dim), T, out_proj


def test_same_seed_same_parameters_as_book():
    for make_book, make_ours in [
        (lambda: BookMultiHeadAttention(3, 4, 6, 0.0, 2), lambda: MultiHeadAttention(3, 4, 6, 0.0, 2)),
        (lambda: BookMultiHeadAttentionWrapper(3, 2, 6, 0.0, 2), lambda: MultiHeadAttentionWrapper(3, 2, 6, 0.0, 2)),
    ]:
        torch.manual_seed(5)
        book = make_book()
        torch.manual_seed(5)
        ours = make_ours()
        for (name_b, p_b), (name_o, p_o) in zip(book.state_dict().items(), ours.state_dict().items(), strict=True):
            assert name_b == name_o and torch.equal(p_b, p_o)  # exact: same seed, same draws, same init ops


# -- equivalences --------------------------------------------------------------------------------


def test_v1_with_v2_weights_transposed_equals_v2():
    torch.manual_seed(789)
    v2 = SelfAttention_v2(3, 2)
    v1 = SelfAttention_v1(3, 2)
    with torch.no_grad():
        v1.W_query.copy_(v2.W_query.weight.T)
        v1.W_key.copy_(v2.W_key.weight.T)
        v1.W_value.copy_(v2.W_value.weight.T)
    assert_close(v1(INPUTS), v2(INPUTS), n=3 + 2 + 6)  # d_in, d_out, T
    assert_close(v1(BATCH), v2(BATCH), n=3 + 2 + 6)


@pytest.mark.parametrize("t", [1, 3, 97])
def test_wrapper_heads_equal_multihead_with_same_per_head_weights(t):
    torch.manual_seed(t)
    d_in, head_dim, heads = 5, 3, 4
    wrapper = MultiHeadAttentionWrapper(d_in, head_dim, 128, 0.0, heads, qkv_bias=True)
    mha = MultiHeadAttention(d_in, head_dim * heads, 128, 0.0, heads, qkv_bias=True)
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            getattr(mha, name).weight.copy_(torch.cat([getattr(h, name).weight for h in wrapper.heads], dim=0))
            getattr(mha, name).bias.copy_(torch.cat([getattr(h, name).bias for h in wrapper.heads], dim=0))
        mha.out_proj.weight.copy_(torch.eye(head_dim * heads))
        mha.out_proj.bias.zero_()
    x = torch.randn(2, t, d_in)
    assert_close(mha(x), wrapper(x), n=d_in + head_dim + t + head_dim * heads)  # projections, scores, T, out_proj


@pytest.mark.parametrize("t", [1, 3, 97, 257])
@pytest.mark.parametrize("causal", [True, False])
def test_backends_agree_outputs_and_gradients(t, causal):
    torch.manual_seed(t)
    ref = MultiHeadAttention(12, 12, 300, 0.0, 3, qkv_bias=True, causal=causal, backend="eager")
    x = torch.randn(2, t, 12, requires_grad=True)
    out_ref = ref(x)
    (g_ref,) = torch.autograd.grad(out_ref.square().sum(), x)
    for backend in ("auto", "torch"):
        m = MultiHeadAttention(12, 12, 300, 0.0, 3, qkv_bias=True, causal=causal, backend=backend)
        m.load_state_dict(ref.state_dict())
        out = m(x)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        n = 12 + 4 + t + 12  # d_in, head dim, T, out_proj
        assert_close(out, out_ref, n=n)
        assert_close(g, g_ref, n=2 * n)  # backward runs through the transposes of the same reductions


# -- hardened behaviour --------------------------------------------------------------------------


def test_bidirectional_and_need_weights():
    torch.manual_seed(0)
    m = MultiHeadAttention(4, 4, 8, 0.0, 2, causal=False)
    x = torch.randn(1, 5, 4)
    out, w = m(x, need_weights=True)
    assert w.shape == (1, 2, 5, 5)
    assert (w.triu(1) > 0).any()  # sees the future
    assert_close(w.sum(-1), torch.ones(1, 2, 5), n=5)
    assert_close(out, m(x), n=4 + 2 + 5 + 4)  # d_in, head dim, T, out_proj
    causal = MultiHeadAttention(4, 4, 8, 0.0, 2)
    _, wc = causal(x, need_weights=True)
    assert torch.equal(wc.triu(1), torch.zeros_like(wc))  # exact: masked weights are 0 by definition


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_equals_running_without_the_padding(causal):
    torch.manual_seed(0)
    m = MultiHeadAttention(6, 6, 16, 0.0, 2, qkv_bias=True, causal=causal)
    short = torch.randn(1, 4, 6)
    padded = torch.cat([short, torch.randn(1, 3, 6)], dim=1)  # 3 junk tokens at the end
    pad = torch.tensor([[False] * 4 + [True] * 3])
    out, w = m(padded, key_padding_mask=pad, need_weights=True)
    assert_close(out[:, :4], m(short), n=6 + 3 + 7 + 6)  # d_in, head dim, T, out_proj
    assert torch.equal(w[..., 4:], torch.zeros_like(w[..., 4:]))  # exact: padding weights are 0 by definition
    assert_close(m(padded, key_padding_mask=pad), out, n=6 + 3 + 7 + 6)  # fast path agrees


def test_attn_mask_bool_and_float_compose_with_causal_and_padding():
    torch.manual_seed(0)
    m = MultiHeadAttention(4, 4, 8, 0.0, 2, backend="eager")
    x = torch.randn(2, 5, 4)
    band = torch.ones(5, 5, dtype=torch.bool).triu(-1)  # at most one step back
    pad = torch.tensor([[False] * 5, [False] * 4 + [True]])
    _, w = m(x, attn_mask=band, key_padding_mask=pad, need_weights=True)
    allowed = band & torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(w[0] > 0, allowed.expand(2, 5, 5))  # exact: masked weights are 0, kept ones exp(...) > 0
    assert torch.equal(w[1, :, :, 4], torch.zeros(2, 5))  # exact: a padded key's weight is 0 by definition
    additive = torch.zeros(5, 5).masked_fill(~band, float("-inf"))
    out_float = m(x, attn_mask=additive, key_padding_mask=pad)
    assert_close(out_float, m(x, attn_mask=band, key_padding_mask=pad), n=4 + 2 + 5 + 4)  # d_in, head, T, out
    m_fast = MultiHeadAttention(4, 4, 8, 0.0, 2)
    m_fast.load_state_dict(m.state_dict())
    assert_close(m_fast(x, attn_mask=band, key_padding_mask=pad), out_float, n=4 + 2 + 5 + 4)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_fully_masked_query_gives_zero_context_and_zero_grads(backend):
    torch.manual_seed(0)
    m = MultiHeadAttention(4, 4, 8, 0.0, 2, backend=backend)
    x = torch.randn(2, 5, 4, requires_grad=True)
    pad = torch.tensor([[True, False, False, False, False], [True] * 5])  # left padding; an empty sequence
    out, w = m(x, key_padding_mask=pad, need_weights=True)
    assert torch.isfinite(out).all()
    assert torch.equal(w[0, :, 0], torch.zeros(2, 5))  # exact (0 by definition): query 0 sees only padding
    assert torch.equal(w[1], torch.zeros(2, 5, 5))  # exact: 0 by definition
    # zero context -> the output is out_proj's bias alone
    assert_close(out[1], m.out_proj.bias.expand(5, 4), n=4)  # out_proj's reduction over a zero context
    out_fast = m(x, key_padding_mask=pad)
    assert_close(out_fast, out, n=4 + 2 + 5 + 4)  # d_in, head dim, T, out_proj
    out_fast.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[1], torch.zeros(5, 4))  # exact: nothing flows from an all-padding sequence


def test_mask_buffer_follows_to_and_is_saved():
    m = MultiHeadAttention(4, 4, 8, 0.5, 2)
    assert "mask" in m.state_dict()
    m = m.to(torch.float64)
    assert m.mask.dtype == torch.float64
    out = m(torch.randn(1, 3, 4, dtype=torch.float64))
    assert out.dtype == torch.float64
    ca = CausalAttention(4, 4, 8, 0.0).to(torch.float64)
    assert ca.mask.dtype == torch.float64
    assert ca(torch.randn(1, 3, 4, dtype=torch.float64)).dtype == torch.float64


def test_eval_switches_dropout_off():
    torch.manual_seed(0)
    for m in (MultiHeadAttention(4, 4, 8, 0.5, 2), CausalAttention(4, 4, 8, 0.5), MultiHeadAttentionWrapper(4, 2, 8, 0.5, 2)):
        x = torch.randn(2, 6, 4)
        m.train()
        assert not torch.equal(m(x), m(x))  # dropout draws differ
        m.eval()
        assert_close(m(x), m(x), n=4 + 4 + 6 + 4)  # d_in, d_out, T, out_proj


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_half_precision_large_scores_stay_finite_and_accurate(dtype, backend):
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 16, 32, 0.0, 2, backend=backend)
    with torch.no_grad():
        m.W_query.weight.mul_(40)  # scores in the thousands
        m.W_key.weight.mul_(40)
    x = torch.randn(2, 9, 16)
    ref = m.double()(x.double())
    m = m.to(dtype)
    out = m(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    _, w = m(x.to(dtype), need_weights=True)
    assert torch.isfinite(w).all()
    # Scores in the thousands make the weights one-hot (to exp(-gap)), so the output is the winning key's
    # value through the half roundings of x, W_value, v, the context, W_out and the output (6; the float32
    # accumulations are 2^-13 (float16) / 2^-16 (bfloat16) smaller), relative to the size of the output.
    torch.testing.assert_close(out.double(), ref, atol=rel_tol(dtype, n=0, ops=6) * ref.abs().max().item(), rtol=0)


# -- errors: each names the argument, the expected and the actual value --------------------------


def test_sequence_longer_than_context_length():
    m = MultiHeadAttention(3, 2, 6, 0.0, 2)
    with pytest.raises(ValueError, match=r"num_tokens=7, longer than context_length=6"):
        m(torch.randn(1, 7, 3))
    with pytest.raises(ValueError, match=r"num_tokens=9, longer than context_length=4"):
        CausalAttention(3, 2, 4, 0.0)(torch.randn(1, 9, 3))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"d_out must be divisible by num_heads, got d_out=10 and num_heads=3"):
        MultiHeadAttention(3, 10, 6, 0.0, 3)
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got 1.5"):
        MultiHeadAttention(3, 2, 6, 1.5, 2)
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got -0.1"):
        CausalAttention(3, 2, 6, -0.1)
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"):
        MultiHeadAttention(3, 2, 6, 0.0, 0)
    with pytest.raises(ValueError, match=r"d_in must be a positive int, got 0"):
        SelfAttention_v1(0, 2)
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'eager', 'torch', 'flash'\], got 'fast'"):
        MultiHeadAttention(3, 2, 6, 0.0, 2, backend="fast")


def test_forward_errors():
    m = MultiHeadAttention(3, 2, 6, 0.0, 2)
    with pytest.raises(ValueError, match=r"x must have 3 \(batch, num_tokens, d_in\) dimensions, got 2 with shape \(6, 3\)"):
        m(INPUTS)
    with pytest.raises(ValueError, match=r"x must have d_in=3 features in its last dimension, got 4"):
        m(torch.randn(1, 5, 4))
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        m(torch.ones(1, 5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        SelfAttention_v1(3, 2)(torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have 2 \(num_tokens, d_in\) or 3 .* dimensions, got 1"):
        SelfAttention_v2(3, 2)(torch.randn(3))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, num_tokens\) = \(1, 5\), got \(5,\)"):
        m(torch.randn(1, 5, 3), key_padding_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor \(True = padding\), got dtype torch.float32"):
        m(torch.randn(1, 5, 3), key_padding_mask=torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"attn_mask must broadcast to \(\.\.\., 5, 5\)"):
        m(torch.randn(1, 5, 3), attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"need_weights=True needs backend='eager' or 'auto', got 'torch'"):
        MultiHeadAttention(3, 2, 6, 0.0, 2, backend="torch")(torch.randn(1, 5, 3), need_weights=True)


@pytest.mark.parametrize("causal", [True, False])
def test_every_backend_takes_a_padding_mask(causal):
    torch.manual_seed(0)
    ref = MultiHeadAttention(8, 8, 16, 0.0, 2, qkv_bias=True, causal=causal, backend="eager")
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    expected = ref(x, key_padding_mask=pad)
    for backend in ("auto", "torch", "flash"):
        m = MultiHeadAttention(8, 8, 16, 0.0, 2, qkv_bias=True, causal=causal, backend=backend)
        m.load_state_dict(ref.state_dict())
        assert_close(m(x, key_padding_mask=pad), expected, n=8 + 4 + 5 + 8)  # d_in, head dim, T, out_proj


def test_attn_mask_of_the_wrong_batch_or_heads_is_named():
    m = MultiHeadAttention(4, 4, 8, 0.0, 2)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"attn_mask leading dimensions \(3, 1\) must broadcast to the batch/head dimensions \(2, 2\)"):
        m(x, attn_mask=torch.ones(3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask leading dimensions \(2, 3\) must broadcast"):
        m(x, attn_mask=torch.ones(2, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(T, T\), \(batch, T, T\) or \(batch, num_heads, T, T\)"):
        m(x, attn_mask=torch.ones(1, 2, 2, 5, 5, dtype=torch.bool))
    per_head = torch.ones(2, 2, 5, 5, dtype=torch.bool)
    assert m(x, attn_mask=per_head).shape == (2, 5, 4)


def test_input_dtype_must_match_the_parameters():
    for m, x in ((MultiHeadAttention(4, 4, 8, 0.0, 2), torch.randn(1, 3, 4)),
                 (SelfAttention_v1(4, 2), torch.randn(3, 4)),
                 (SelfAttention_v2(4, 2), torch.randn(3, 4)),
                 (CausalAttention(4, 2, 8, 0.0), torch.randn(1, 3, 4))):
        with pytest.raises(TypeError, match=r"x has dtype torch.float16 but the module's parameters are torch.float32"):
            m(x.half())


# -- what PyTorch's tools feed the chapter's classes: autocast, empty inputs ---------------------------


def chapter_modules():
    torch.manual_seed(0)
    return [
        (SelfAttention_v1(6, 4), None),
        (SelfAttention_v2(6, 4), None),
        (CausalAttention(6, 4, 8, 0.0), BookCausalAttention(6, 4, 8, 0.0)),
        (MultiHeadAttentionWrapper(6, 4, 8, 0.0, 2), BookMultiHeadAttentionWrapper(6, 4, 8, 0.0, 2)),
        *[(MultiHeadAttention(6, 4, 8, 0.0, 2, backend=b), BookMultiHeadAttention(6, 4, 8, 0.0, 2))
          for b in ("eager", "torch", "flash", "auto")],
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chapter_classes_take_what_autocast_feeds(dtype):
    """Under torch.autocast a float32 module takes float32 and low-precision x (as nn.Linear does) and
    computes what the book's class computes under the same autocast, to that dtype's rounding."""
    torch.manual_seed(1)
    x = torch.rand(2, 5, 6)
    for m, book in chapter_modules():
        if book is not None:
            book.load_state_dict(m.state_dict())
        for x_in in (x, x.to(dtype)):
            with torch.autocast("cpu", dtype=dtype):
                out = m(x_in)
                if book is not None:
                    # both sides round to the half dtype, at up to DEFAULT_OPS different points (projections,
                    # scores, weights, context, output): n = 0 half-precision reductions (float32 accumulate)
                    assert_close(out, book(x_in), n=0, dtype=dtype)
            assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(3, 0, 6), (0, 4, 6)])
def test_empty_inputs_give_empty_outputs_and_zero_grads(shape):
    """No tokens (or no sequences): an empty output of the right shape and zero gradients, as the book's
    classes and PyTorch's math kernel give."""
    for m, book in chapter_modules():
        x = torch.randn(shape, requires_grad=True)
        out = m(x)
        assert out.shape[:-1] == shape[:-1] and out.numel() == 0
        if book is not None:
            assert out.shape == book(x).shape
        out.sum().backward()
        grads = [p.grad for p in m.parameters()]
        assert all(g is None or not g.any() for g in grads)
        assert x.grad is not None and x.grad.shape == x.shape
    v1 = SelfAttention_v1(6, 4)
    assert v1(torch.randn(0, 6)).shape == (0, 4)
