"""The modern family against its plain references (attnlab.variants.MODERN): every backend equals the
book-style code in outputs and gradients, at odd lengths, windows shorter and longer than the text, groups
of 1 / 2 / all heads, cached decoding one token at a time and in chunks; the combinations Llama and
Mistral use; cross-attention; the context-parallel wiring; book-compatible defaults; defined errors."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab import MultiHeadAttention, backends
from attnlab.variants import MODERN, build_modern, plain_reference
from tolerances import assert_close, tols

BACKENDS = ["eager", "torch", "flash", "auto"]
EXPLICIT = ["eager", "torch", "flash"]  # "auto" runs one of the first two (tested in test_backends.py)
D_IN, D_OUT, HEADS = 8, 16, 4


def module_n(num_tokens):
    """n of tests/tolerances.py for one of these modules' outputs: the projections (d_in, and d_out more for
    mla's latent), the scores (head dim <= d_out), the T_k weighted sum and out_proj (d_out)."""
    return D_IN + 3 * D_OUT + num_tokens


def check_same_function(module, x):
    """Outputs and gradients (input and every parameter) of ``module`` equal its plain reference's
    (a parameter gradient also sums over every token of every sequence: n grows by B * T)."""
    ref = plain_reference(module)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = module(x1), ref(x2)
    n = module_n(x.shape[1])
    assert_close(out, expected, n=n)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out)
    assert_close(x1.grad, x2.grad, n=2 * n)  # back through the transposes of the same reductions
    for (name, p), (name_ref, p_ref) in zip(module.named_parameters(), ref.named_parameters()):
        assert name == name_ref
        assert_close(p.grad, p_ref.grad, n=2 * n + x.shape[0] * x.shape[1], msg=name)


def test_registry_names():
    assert list(MODERN) == ["gqa", "mqa", "swa", "rope", "mla", "cached"]


@pytest.mark.parametrize("num_tokens", [1, 3, 97, 257])
@pytest.mark.parametrize("backend", EXPLICIT)
@pytest.mark.parametrize("name", ["gqa", "mqa", "swa", "rope", "mla"])
def test_every_backend_equals_the_plain_reference(name, backend, num_tokens):
    torch.manual_seed(num_tokens)
    m = build_modern(name, D_IN, D_OUT, 300, 0.0, HEADS, True, backend=backend)
    check_same_function(m, torch.randn(1 if num_tokens > 3 else 2, num_tokens, D_IN))


@pytest.mark.parametrize("groups", [1, 2, HEADS])
@pytest.mark.parametrize("window", [None, 1, 5, 400])  # 400: longer than the text, the plain causal mask
@pytest.mark.parametrize("backend", EXPLICIT)
def test_groups_windows_and_rope_combine(groups, window, backend):
    torch.manual_seed(groups)
    m = MultiHeadAttention(D_IN, D_OUT, 300, 0.0, HEADS, backend=backend, num_kv_groups=groups,
                           window_size=window, rope=True, rope_base=500.0)
    check_same_function(m, torch.randn(2, 19, D_IN))


def test_window_longer_than_the_text_is_causal_and_window_one_is_the_value():
    torch.manual_seed(0)
    causal = MultiHeadAttention(D_IN, D_OUT, 64, 0.0, HEADS)
    long = MultiHeadAttention(D_IN, D_OUT, 64, 0.0, HEADS, window_size=64)
    long.load_state_dict(causal.state_dict())
    x = torch.randn(2, 20, D_IN)
    assert_close(long(x), causal(x), n=module_n(20))
    one = MultiHeadAttention(D_IN, D_OUT, 64, 0.0, HEADS, window_size=1)
    one.load_state_dict(causal.state_dict())
    assert_close(one(x), one.out_proj(one.W_value(x)), n=module_n(1))  # sees itself only


@pytest.mark.parametrize("backend", EXPLICIT)
@pytest.mark.parametrize("name", ["gqa", "mqa", "swa", "rope", "mla", "cached"])
def test_cached_decoding_equals_the_plain_cache(name, backend):
    torch.manual_seed(1)
    overrides = {"window_size": 4} if name == "swa" else {}
    m = build_modern(name, D_IN, D_OUT, 64, 0.0, HEADS, backend=backend, **overrides).eval()
    ref = plain_reference(m)
    x = torch.randn(2, 15, D_IN)
    with torch.no_grad():
        for chunks in ([5] + [1] * 10, [3, 4, 8]):
            cache = m.new_cache(2, 32)
            ref.reset_cache()
            start = 0
            for size in chunks:
                piece = x[:, start : start + size]
                assert_close(m(piece, cache=cache), ref(piece, use_cache=True), n=module_n(15))
                start += size


def test_padding_and_custom_masks_compose_with_the_window():
    torch.manual_seed(2)
    m = MultiHeadAttention(D_IN, D_OUT, 64, 0.0, HEADS, num_kv_groups=2, window_size=3, backend="eager")
    ref = plain_reference(m)
    x = torch.randn(2, 9, D_IN)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 2:4] = True
    expected = ref(x, key_padding_mask=pad)
    for backend in BACKENDS:
        m.backend = backend
        assert_close(m(x, key_padding_mask=pad), expected, n=module_n(9))
    # attn_mask (True = may attend) is and-ed with the window: forbid key 0 everywhere
    allowed = torch.ones(9, 9, dtype=torch.bool)
    allowed[:, 0] = False
    m.backend = "eager"
    out = m(x, attn_mask=allowed)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[:, 0] = False
    assert_close(out[:, 1:], ref(x, key_padding_mask=~keep)[:, 1:], n=module_n(9))


def test_gqa_shares_key_value_heads_in_the_books_grouping():
    torch.manual_seed(3)
    m = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, num_kv_groups=2, backend="eager")
    assert m.W_key.weight.shape == (2 * 4, D_IN) and m.W_value.weight.shape == (2 * 4, D_IN)
    x = torch.randn(1, 5, D_IN)
    _, weights = m(x, need_weights=True)
    # heads 0 and 1 share key head 0: with the same query weights they give the same attention weights
    with torch.no_grad():
        m.W_query.weight[4:8] = m.W_query.weight[0:4]
        m.W_query.weight[8:12] = m.W_query.weight[0:4]
    _, weights = m(x, need_weights=True)
    assert_close(weights[:, 1], weights[:, 0], n=D_IN + 4 + 5)  # d_in, head dim, T
    assert not torch.allclose(weights[:, 2], weights[:, 0], **tols(torch.float32, D_IN + 4 + 5))  # key head 1


def test_defaults_are_the_chapters_module():
    torch.manual_seed(123)
    book = MultiHeadAttention(3, 2, 6, 0.0, 2)
    torch.manual_seed(123)
    same = MultiHeadAttention(3, 2, 6, 0.0, 2, num_kv_groups=2, window_size=None, rope=None)
    assert list(book.state_dict()) == ["mask", "W_query.weight", "W_key.weight", "W_value.weight",
                                       "out_proj.weight", "out_proj.bias"]
    for (n1, a), (n2, b) in zip(book.state_dict().items(), same.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)  # exact: same seed, same draws, same init ops
    assert "num_kv_groups" not in repr(book) and "num_kv_groups=1" in repr(
        MultiHeadAttention(3, 2, 6, 0.0, 2, num_kv_groups=1)
    )


# -- cross-attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_reads_keys_and_values_from_the_context(backend):
    torch.manual_seed(4)
    m = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, causal=False, num_kv_groups=2, backend=backend)
    x, context = torch.randn(2, 3, D_IN), torch.randn(2, 7, D_IN)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    out = m(x, context, key_padding_mask=pad)
    # float64 by hand
    md = m.double()
    q = md.W_query(x.double()).view(2, 3, 4, 4).transpose(1, 2)
    k = md.W_key(context.double()).view(2, 7, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
    v = md.W_value(context.double()).view(2, 7, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(4)).masked_fill(pad[:, None, None, :], -torch.inf)
    expected = md.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, D_OUT))
    assert_close(out, expected, n=module_n(7))  # float32 against float64
    m.float()


def test_cross_attention_errors():
    causal = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS)
    with pytest.raises(ValueError, match="causal=False"):
        causal(torch.randn(2, 3, D_IN), torch.randn(2, 5, D_IN))
    m = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, causal=False)
    with pytest.raises(ValueError, match="context must have shape"):
        m(torch.randn(2, 3, D_IN), torch.randn(3, 5, D_IN))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        m(torch.randn(2, 3, D_IN), torch.randn(2, 5, D_IN), key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        m(torch.randn(2, 3, D_IN), [1, 2])
    with pytest.raises(ValueError, match="rope"):
        MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, causal=False, rope=True)(
            torch.randn(2, 3, D_IN), torch.randn(2, 5, D_IN)
        )


# -- context parallelism: the wiring, with a single-process stand-in ------------------------------


class OneRankContextParallel:
    """A stand-in for attnlab.distributed.ContextParallel on one rank that holds tokens
    [offset, offset + T) of the sequence and (here) every key before them: attention by the backends."""

    def __init__(self, offset, keys_before=None, values_before=None):
        self.offset, self.calls = offset, []
        self.keys_before, self.values_before = keys_before, values_before

    def positions(self, t_local, device):
        return torch.arange(self.offset, self.offset + t_local, device=device)

    def attention(self, q, k, v, *, causal, key_padding_mask, scale=None):
        self.calls.append((tuple(q.shape), tuple(k.shape), causal, key_padding_mask))
        if self.keys_before is not None:
            k, v = torch.cat((self.keys_before, k), dim=2), torch.cat((self.values_before, v), dim=2)
            if key_padding_mask is not None:  # the earlier tokens are real
                before = torch.zeros(q.shape[0], self.keys_before.shape[2], dtype=torch.bool)
                key_padding_mask = torch.cat((before, key_padding_mask), dim=1)
        mask = None if key_padding_mask is None else (~key_padding_mask)[:, None, None, :]
        return backends.attention(q, k, v, mask=mask, causal=causal, scale=scale, backend="eager")


def test_context_parallel_calls_the_object_with_global_rope_positions():
    torch.manual_seed(5)
    full = MultiHeadAttention(D_IN, D_OUT, 32, 0.0, HEADS, num_kv_groups=2, rope=True)
    x = torch.randn(1, 10, D_IN)
    expected = full(x)
    # rank 1 of 2 holds tokens 4..9; it receives rank 0's (already rotated) keys and values
    with torch.no_grad():
        k0 = full.W_key(x[:, :4]).view(1, 4, 2, 4).transpose(1, 2)
        v0 = full.W_value(x[:, :4]).view(1, 4, 2, 4).transpose(1, 2)
        _, k0 = full.rope(k0, k0, torch.arange(4))
    cp = OneRankContextParallel(4, k0, v0)
    shard = MultiHeadAttention(D_IN, D_OUT, 32, 0.0, HEADS, num_kv_groups=2, rope=True, context_parallel=cp)
    shard.load_state_dict(full.state_dict())
    assert_close(shard(x[:, 4:]), expected[:, 4:], n=module_n(10))
    assert cp.calls == [((1, 4, 6, 4), (1, 2, 6, 4), True, None)]
    pad = torch.zeros(1, 6, dtype=torch.bool)
    pad[0, 5] = True  # the last token is padding: the others do not see it
    got = shard(x[:, 4:], key_padding_mask=pad)
    assert cp.calls[-1][3] is pad
    assert_close(got[:, :5], expected[:, 4:9], n=module_n(10))


def test_context_parallel_errors():
    with pytest.raises(TypeError, match="lacks positions"):
        MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, context_parallel=type("A", (), {"attention": len})())
    cp = OneRankContextParallel(0)
    with pytest.raises(ValueError, match="window_size"):
        MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, window_size=3, context_parallel=cp)
    m = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, context_parallel=cp)
    with pytest.raises(ValueError, match="context_parallel takes no cache"):
        m(torch.randn(1, 3, D_IN), cache=m.new_cache(1, 4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_kv_groups": 3}, "positive divisor of num_heads=4"),
        ({"num_kv_groups": 0}, "positive divisor"),
        ({"num_kv_groups": True}, "positive divisor"),
        ({"window_size": 0}, "window_size must be None or a positive int"),
        ({"window_size": 2.0}, "window_size must be None or a positive int"),
        ({"window_size": 4, "causal": False}, "needs causal=True"),
        ({"rope": True, "rope_base": 0.5}, "rope_base"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, **kwargs)
