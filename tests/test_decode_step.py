"""The trimmed cached step (issue 20, point 4): while every row of a KVCache holds the same number of tokens
at the default positions with no padding, MultiHeadAttention's decoding step attends over the filled slots
only (views of the cache, no mask), as a hand-written SDPA loop does. Checked here: it gives the function of
the full-sequence computation in float64 at odd sizes, it is taken exactly when it is exact (and the masked
step otherwise), it reads nothing from the device on the host, and its lazily built mask is the masked
step's."""

from __future__ import annotations

import pytest
import torch

from attnlab import MultiHeadAttention
from attnlab.cache import KVCache, step_mask
from attnlab.modules import attend_cached
from tolerances import assert_close

D, D_OUT, HEADS = 12, 24, 4


def make(**options) -> MultiHeadAttention:
    torch.manual_seed(0)
    return MultiHeadAttention(D, D_OUT, 512, 0.0, HEADS, **options).eval()


def bound(t_k: int) -> int:
    """Longest reductions of a layer's output: d_in (projection), head_dim (score), T_k (softmax and the
    weighted sum), inner width (out_proj); chained errors add."""
    return D + D_OUT // HEADS + t_k + D_OUT


CONFIGS = {"mha": {}, "gqa": {"num_kv_groups": 2}, "mqa_rope": {"num_kv_groups": 1, "rope": True},
           "window": {"num_kv_groups": 2, "window_size": 5}, "flash": {"num_kv_groups": 2, "backend": "flash"}}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("prompt", [1, 3, 97])
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_steps_equal_the_full_sequence_in_float64(config, prompt, batch):
    """A prompt of 1, 3 or 97 tokens, then single tokens and a chunk of 3: every output equals the float64
    module run on the whole sequence without a cache (the last rows)."""
    m = make(**CONFIGS[config])
    ref = make(**CONFIGS[config]).double()
    new = [1, 1, 3, 1]
    total = prompt + sum(new)
    x = torch.randn(batch, total, D)
    with torch.no_grad():
        expected = ref(x.double())  # (B, total, d_out)
        cache = m.new_cache(batch, total + 2, rolling=False)
        got = [m(x[:, :prompt], cache=cache)]
        start = prompt
        for t in new:
            got.append(m(x[:, start:start + t], cache=cache))
            start += t
    assert_close(torch.cat(got, dim=1), expected, n=bound(total), dtype=torch.float32)


def test_the_step_is_trimmed_views_with_no_mask_built():
    m = make(num_kv_groups=2)
    cache = m.new_cache(2, 40)
    x = torch.randn(2, 9, D)
    keys = torch.randn(2, 2, 1, D_OUT // HEADS)
    with torch.no_grad():
        m(x, cache=cache)
        step = cache.update(keys, keys.clone(), trim=True)
    assert step.prefix and step._mask is None  # nothing built on the way
    assert step.keys.shape == (2, 2, 10, D_OUT // HEADS)
    assert step.keys.data_ptr() == cache.keys.data_ptr()  # a view of the buffer, not a copy
    assert torch.equal(step.keys[:, :, 9:], keys)  # exact: the slice copy of the same values
    assert step.positions.tolist() == [[9], [9]]
    assert cache.lengths.tolist() == [10, 10] and cache.next_positions.tolist() == [10, 10]
    assert cache.key_positions[:, :11].tolist() == [list(range(10)) + [-1]] * 2


def test_lazy_mask_is_the_masked_steps_mask():
    """Read, the trimmed step's mask is step_mask over its slots, and the first n columns of the masked
    (untrimmed) step of an identical cache; the masked step's other columns are all False (empty slots)."""
    hd = 3
    a, b = KVCache(2, 16, 1, hd), KVCache(2, 16, 1, hd)
    torch.manual_seed(1)
    for t in (4, 1, 3):
        k, v = torch.randn(2, 1, t, hd), torch.randn(2, 1, t, hd)
        trimmed, full = a.update(k, v, trim=True), b.update(k, v)
        n = trimmed.keys.shape[2]
        assert trimmed.prefix and not full.prefix
        assert torch.equal(trimmed.mask, full.mask[..., :n])  # exact: bools from the same positions
        assert not full.mask[..., n:].any()
        assert torch.equal(trimmed.mask, step_mask(trimmed.positions, trimmed.key_positions, trimmed.key_padding))
        assert torch.equal(trimmed.keys, full.keys[:, :, :n])  # exact: the same values written twice


def test_attend_cached_trimmed_equals_masked():
    """The two descriptions of one step give the same attention (both backends that read masks, and flash)."""
    torch.manual_seed(2)
    hd = 4
    for backend in ("torch", "eager", "flash"):
        a, b = KVCache(3, 200, 2, hd), KVCache(3, 200, 2, hd)
        for t in (97, 1, 3):
            k, v, q = torch.randn(3, 2, t, hd), torch.randn(3, 2, t, hd), torch.randn(3, 4, t, hd)
            trimmed, full = a.update(k, v, trim=True), b.update(k, v)
            got = attend_cached(q, trimmed, window=None, dropout_p=0.0, training=False, backend=backend,
                                need_weights=False)
            want = attend_cached(q, full, window=None, dropout_p=0.0, training=False, backend="eager",
                                 need_weights=False)
            assert_close(got, want, n=hd + full.keys.shape[2], dtype=torch.float32)


def _steps(m, cache, xs, **kwargs):
    return [m(x, cache=cache, **kwargs) for x in xs]


@pytest.mark.parametrize("why", ["position_ids", "key_padding_mask", "per_row_truncate", "loaded"])
def test_masked_step_wherever_the_cache_is_not_plain(why):
    """Explicit positions, padding, rows of different lengths, or counts loaded from a state_dict: the
    host no longer knows that the slots are the positions, so every later step is the masked one (until
    reset), and the outputs still equal the float64 full-sequence reference."""
    m = make(num_kv_groups=2)
    ref = make(num_kv_groups=2).double()
    x = torch.randn(2, 8, D)
    with torch.no_grad():
        cache = m.new_cache(2, 20)
        if why == "position_ids":
            m(x[:, :5], cache=cache, position_ids=torch.arange(5))
        elif why == "key_padding_mask":
            m(x[:, :5], cache=cache, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
        elif why == "per_row_truncate":
            m(x[:, :6], cache=cache)
            cache.truncate(torch.tensor([5, 5]))
        else:
            m(x[:, :5], cache=cache)
            state = cache.state_dict()
            cache = m.new_cache(2, 20)
            cache.load_state_dict(state)
        assert not cache._plain
        step = cache.update(torch.zeros(2, 2, 1, D_OUT // HEADS), torch.zeros(2, 2, 1, D_OUT // HEADS), trim=True)
        assert not step.prefix and step.keys.shape[2] == 20
        cache.rollback(1)
        got = torch.cat(_steps(m, cache, x[:, 5:].split(1, dim=1)), dim=1)
        assert_close(got, ref(x.double())[:, 5:], n=bound(8), dtype=torch.float32)
        cache.reset()
        assert cache._plain


def test_truncate_and_rollback_by_int_keep_the_trimmed_step():
    """Rolling every row back by the same count (speculative decoding at batch 1) keeps the cache plain:
    the next steps are trimmed and equal the reference of the kept sequence."""
    m = make(rope=True)
    ref = make(rope=True).double()
    x, drafts = torch.randn(1, 9, D), torch.randn(1, 3, D)
    with torch.no_grad():
        cache = m.new_cache(1, 20)
        m(x[:, :6], cache=cache)
        m(drafts, cache=cache)  # three draft tokens, all rejected
        cache.rollback(3)
        assert cache._plain and cache.lengths.tolist() == [6] and cache.next_positions.tolist() == [6]
        m(x[:, 6:7], cache=cache)
        cache.truncate(7)
        got = torch.cat(_steps(m, cache, x[:, 7:].split(1, dim=1)), dim=1)
        assert cache._plain
    assert_close(got, ref(x.double())[:, 7:], n=bound(9), dtype=torch.float32)


def test_window_shorter_than_the_cache_takes_the_masked_step():
    m = make(window_size=4)
    with torch.no_grad():
        cache = m.new_cache(1, 30, rolling=False)
        m(torch.randn(1, 3, D), cache=cache)
        k = torch.zeros(1, HEADS, 1, D_OUT // HEADS)
        assert cache.update(k, k.clone(), window=4, trim=True).prefix  # 4 keys: all inside the window
        assert not cache.update(k, k.clone(), window=4, trim=True).prefix  # 5 keys: the first has left it
        assert cache._plain  # the stored tokens are still plain


def test_grad_enabled_steps_write_out_of_place_and_backpropagate():
    """With gradients, the cache must be written out of place (autograd sees the write): the masked path.
    Gradients of a cached step equal those of the uncached full sequence."""
    m = make(num_kv_groups=2)
    x = torch.randn(1, 5, D, requires_grad=True)
    cache = m.new_cache(1, 8)
    out = torch.cat([m(x[:, :4], cache=cache), m(x[:, 4:], cache=cache)], dim=1)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(m(x2).square().sum(), x2)
    assert_close(grad, want, n=bound(5) * 2, dtype=torch.float32)


def test_need_weights_keeps_weights_over_every_slot():
    m = make(backend="eager")
    with torch.no_grad():
        cache = m.new_cache(1, 10)
        m(torch.randn(1, 3, D), cache=cache)
        _, weights = m(torch.randn(1, 1, D), cache=cache, need_weights=True)
    assert weights.shape == (1, HEADS, 1, 10)
    assert_close(weights.sum(-1), torch.ones(1, HEADS, 1), n=10, dtype=torch.float32)
    assert not weights[..., 4:].any()  # empty slots get no weight


def test_trimmed_steps_read_nothing_on_the_host(monkeypatch):
    """No int(tensor), .item(), bool(tensor) or .tolist() during decoding steps (a host sync per layer per
    token on a GPU)."""
    m = make(num_kv_groups=2, rope=True)
    cache = m.new_cache(2, 40)
    with torch.no_grad():
        m(torch.randn(2, 5, D), cache=cache)

        def refuse(*args, **kwargs):
            raise AssertionError("a decoding step read a tensor's value on the host")

        for name in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        for _ in range(3):
            m(torch.randn(2, 1, D), cache=cache)
        monkeypatch.undo()
    assert cache.lengths.tolist() == [8, 8]


def test_full_cache_is_refused_on_the_trimmed_path():
    m = make()
    with torch.no_grad():
        cache = m.new_cache(1, 4)
        m(torch.randn(1, 4, D), cache=cache)
        with pytest.raises(ValueError, match="the cache is full: 4 tokens cached"):
            m(torch.randn(1, 1, D), cache=cache)


def test_trimmed_path_validates_keys():
    cache = KVCache(2, 8, 2, 4)
    with pytest.raises(ValueError, match=r"keys must have shape \(batch, num_kv_heads, T >= 1, head_dim\)"):
        cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), trim=True)  # batch 1 would broadcast
    with pytest.raises(TypeError, match="keys are torch.float64"):
        cache.update(torch.zeros(2, 2, 1, 4, dtype=torch.float64), torch.zeros(2, 2, 1, 4), trim=True)
    with pytest.raises(ValueError, match="values must have shape"):
        cache.update(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 2, 4), trim=True)
    assert cache.lengths.tolist() == [0, 0]
