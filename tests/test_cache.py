"""KV caches: cached decoding equals recomputing the whole sequence (1e-5, float32) token by token and in
chunks, on every backend; padding on either side; reset and reuse; the rolling cache's cap; memory as the
formula; no recompilation per token under torch.compile; gradients through the cache; defined errors."""

from __future__ import annotations

import pytest
import torch

from attnlab import MultiHeadAttention
from attnlab.cache import KVCache, RollingKVCache, step_mask
from attnlab.latent import MultiHeadLatentAttention
from tolerances import assert_close

BACKENDS = ["eager", "torch", "auto", "flash"]
CONFIGS = {
    "mha": {},
    "gqa": {"num_kv_groups": 2},
    "mqa_rope": {"num_kv_groups": 1, "rope": True},
    "llama": {"num_kv_groups": 2, "rope": True},
    "mistral_small_window": {"num_kv_groups": 2, "rope": True, "window_size": 3},
    "window_longer_than_text": {"window_size": 50},
}


def decode(module, x, chunks, cache, **kw):
    """Feed x (B, T, d) through the cache in chunks of the given sizes; concatenated outputs."""
    outs, start = [], 0
    for size in chunks:
        outs.append(module(x[:, start : start + size], cache=cache, **kw))
        start += size
    assert start == x.shape[1]
    return torch.cat(outs, dim=1)


def make(backend="auto", **options):
    torch.manual_seed(0)
    return MultiHeadAttention(8, 16, 64, 0.0, 4, backend=backend, **options).eval()


def module_n(num_tokens):
    """n of tests/tolerances.py for these modules' outputs: the projections (d_in 8, and 16 more through
    a latent), the scores (head dim <= 16), the T_k weighted sum and out_proj (16)."""
    return 8 + 3 * 16 + num_tokens


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cached_decoding_equals_recomputing(config, backend):
    m = make(backend, **CONFIGS[config])
    x = torch.randn(2, 13, 8)
    with torch.no_grad():
        full = m(x)
        for chunks in ([4] + [1] * 9, [5, 3, 5], [13]):
            cache = m.new_cache(2, 20)
            assert_close(decode(m, x, chunks, cache), full, n=module_n(13))
            assert cache.length == 13


def test_new_cache_kind_and_memory_formula():
    m = make(num_kv_groups=2, window_size=6)
    rolling, static = m.new_cache(3, 100), m.new_cache(3, 6)
    assert isinstance(rolling, RollingKVCache) and rolling.window_size == 6
    assert isinstance(static, KVCache) and static.max_tokens == 6
    # bytes per token = 2 (keys and values) * H_kv * head_dim * bytes per number, per sequence in the batch
    assert rolling.bytes_per_token == 3 * 2 * 2 * 4 * 4
    assert rolling.nbytes == 6 * rolling.bytes_per_token  # capped at the window
    x = torch.randn(3, 40, 8)
    with torch.no_grad():
        decode(m, x, [10] + [1] * 30, rolling)
    assert rolling.nbytes == 6 * rolling.bytes_per_token and rolling.length == 40
    latent = MultiHeadLatentAttention(8, 16, 64, 0.0, 4, latent_dim=5).new_cache(1, 10)
    assert latent.bytes_per_token == 5 * 4 and latent.values is None
    half = make().new_cache(1, 7, dtype=torch.bfloat16)
    assert half.nbytes == 7 * 2 * 4 * 4 * 2


@pytest.mark.parametrize("backend", ["eager", "torch", "flash"])
def test_latent_cache_equals_recomputing(backend):
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(8, 16, 64, 0.0, 4, latent_dim=6, backend=backend).eval()
    x = torch.randn(2, 11, 8)
    with torch.no_grad():
        full = m(x)
        for chunks in ([3] + [1] * 8, [6, 5]):
            assert_close(decode(m, x, chunks, m.new_cache(2, 16)), full, n=module_n(11))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "config, backend", [("mha", "auto"), ("llama", "auto"), ("mistral_small_window", "auto"),
                        ("mistral_small_window", "flash")]
)
def test_padded_batch_equals_recomputing_the_padded_batch(side, config, backend):
    m = make(backend, **CONFIGS[config])
    lengths = [7, 4, 1]
    prompt_len, new = 7, 5
    x = torch.randn(3, prompt_len + new, 8)
    pad = torch.zeros(3, prompt_len + new, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "left":
            pad[b, : prompt_len - n] = True
        else:
            pad[b, n:prompt_len] = True
    with torch.no_grad():
        full = m(x, key_padding_mask=pad)
        cache = m.new_cache(3, 16)
        outs = [m(x[:, :prompt_len], cache=cache, key_padding_mask=pad[:, :prompt_len])]
        outs += [m(x[:, t : t + 1], cache=cache) for t in range(prompt_len, prompt_len + new)]
        got = torch.cat(outs, dim=1)
    real = ~pad  # padding rows are meaningless: compare the real tokens
    assert_close(got[real], full[real], n=module_n(x.shape[1]))
    assert torch.isfinite(got).all()  # padding queries see themselves: no NaN anywhere


def test_left_padding_with_rope_equals_each_sequence_alone():
    m = make("auto", **CONFIGS["llama"])
    x = torch.randn(2, 9, 8)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, :3] = True  # the second prompt is 3 tokens shorter
    with torch.no_grad():
        cache = m.new_cache(2, 12)
        out = [m(x[:, :6], cache=cache, key_padding_mask=pad[:, :6])]
        out += [m(x[:, t : t + 1], cache=cache) for t in range(6, 9)]
        got = torch.cat(out, dim=1)
        alone = m(x[1:, 3:])  # the same tokens, unpadded, positions from 0
    # RoPE scores depend on relative positions only, so the shift by the padding changes nothing.
    assert_close(got[1, 3:], alone[0], n=module_n(9))


def test_reset_and_reuse():
    m = make("auto", **CONFIGS["mistral_small_window"])
    cache = m.new_cache(1, 30)
    a, b = torch.randn(1, 8, 8), torch.randn(1, 5, 8)
    with torch.no_grad():
        decode(m, a, [8], cache)
        cache.reset()
        assert cache.length == 0
        assert_close(decode(m, b, [2, 1, 1, 1], cache), m(b), n=module_n(5))


def test_gradients_flow_through_the_cache():
    m = make("eager", num_kv_groups=2, rope=True)
    m.train()
    x = torch.randn(2, 6, 8, requires_grad=True)
    full = m(x)
    grads_full = torch.autograd.grad(full.square().sum(), [x, m.W_key.weight])
    cached = decode(m, x, [3, 1, 2], m.new_cache(2, 8))
    grads_cached = torch.autograd.grad(cached.square().sum(), [x, m.W_key.weight])
    for g_full, g_cached in zip(grads_full, grads_cached):
        # back through the same reductions, and W_key's gradient sums over B * T = 12 tokens
        assert_close(g_cached, g_full, n=2 * module_n(6) + 12)


@pytest.mark.parametrize("kind", ["static", "rolling"])
def test_compiled_decoding_does_not_recompile_per_token(kind):
    from torch._dynamo.utils import counters

    m = make("torch", **({"window_size": 4, "num_kv_groups": 2, "rope": True} if kind == "rolling" else {"rope": True}))
    cache = m.new_cache(1, 24)
    assert isinstance(cache, RollingKVCache if kind == "rolling" else KVCache)
    x = torch.randn(1, 24, 8)
    torch._dynamo.reset()
    counters.clear()
    # Dynamo alone (backend="eager"): what decides recompilation is the same; inductor's code generation
    # is left out to keep the test quick (attnlab bench --decode --compile runs the full compiler).
    step = torch.compile(lambda t: m(t, cache=cache), backend="eager", fullgraph=True)
    with torch.no_grad():
        outs = [m(x[:, :4], cache=cache)]
        outs += [step(x[:, t : t + 1]) for t in range(4, 24)]
        expected = m(x)
    assert_close(torch.cat(outs, dim=1), expected, n=module_n(24))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert counters["stats"]["calls_captured"] > 0


def test_step_mask_is_bottom_right_causal_with_window_and_padding():
    q = torch.tensor([3, 4])
    k = torch.tensor([0, 1, 2, 3, 4, -1])
    pad = torch.tensor([[False, True, False, False, False, False]])
    mask = step_mask(q, k, pad, window=3)[0, 0]
    assert mask.tolist() == [
        [False, False, True, True, False, False],  # query 3: keys 1..3 by window, key 1 is padding
        [False, False, True, True, True, False],  # query 4: keys 2..4
    ]


def test_errors_name_the_problem():
    m = make()
    cache = m.new_cache(2, 4)
    with torch.no_grad():
        m(torch.randn(2, 3, 8), cache=cache)
        with pytest.raises(ValueError, match="the cache is full: 3 tokens cached \\+ 2 new > max_tokens=4"):
            m(torch.randn(2, 2, 8), cache=cache)
        with pytest.raises(ValueError, match="keys must have shape"):
            m(torch.randn(3, 1, 8), cache=cache)
        with pytest.raises(ValueError, match="new tokens only"):
            m(torch.randn(2, 1, 8), cache=cache, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
        with pytest.raises(TypeError, match="dtype"):
            m(torch.randn(2, 1, 8), cache=m.new_cache(2, 4, dtype=torch.float64))
        with pytest.raises(ValueError, match="window_size=None"):
            m(torch.randn(2, 1, 8), cache=RollingKVCache(2, 4, 4, 4))
        with pytest.raises(TypeError, match="cache must be"):
            m(torch.randn(2, 1, 8), cache=object())
        with pytest.raises(ValueError, match="causal"):
            MultiHeadAttention(8, 16, 64, 0.0, 4, causal=False)(torch.randn(2, 1, 8), cache=cache)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_tokens"):
            KVCache(1, bad, 1, 4)
        with pytest.raises(ValueError, match="window_size"):
            RollingKVCache(1, bad, 1, 4)
    with pytest.raises(ValueError, match="serves windows of at most 4"):
        RollingKVCache(1, 4, 1, 2).update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), window=5)
