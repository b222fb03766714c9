"""Per-row cache state: each row its own length and positions (right or left padding decode as each prompt
alone), truncate / per-row rollback (speculative decoding), attn_mask with a cache (a tree of draft tokens),
one cache per layer, no host sync in update, clear errors for a full cache under torch.compile, and cached
steps that torch.compile / torch.export cannot get silently wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnlab import MultiHeadAttention
from attnlab.cache import KVCache, LayerCaches, RollingKVCache
from attnlab.latent import MultiHeadLatentAttention
from tolerances import assert_close

D = 8
N = D + 16 + 40  # longest reductions: d_in, d_out, keys


def make(**options):
    torch.manual_seed(0)
    return MultiHeadAttention(D, 16, 64, 0.0, 4, **options).eval()


def alone(m, x):
    """Each row alone, no cache: the reference."""
    return m(x)


CONFIGS = {"mha": {}, "llama": {"num_kv_groups": 2, "rope": True},
           "mistral": {"num_kv_groups": 2, "rope": True, "window_size": 3}}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prompts_decode_as_each_prompt_alone(config, side):
    """Prompts of 7, 4 and 1 tokens in one batch of 7, padded on either side: with position_ids counting
    the real tokens, and (right padding) truncate(lengths) dropping the padding, every row's outputs equal
    its prompt and continuation run alone. (A rolling cache cannot drop padding it has already rolled past:
    right padding takes a static cache, left padding either kind.)"""
    m = make(**CONFIGS[config])
    lengths, width, new = [7, 4, 1], 7, 5
    seqs = [torch.randn(1, n + new, D) for n in lengths]
    x = torch.zeros(3, width, D)
    pad = torch.ones(3, width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        where = slice(width - n, width) if side == "left" else slice(0, n)
        x[b, where], pad[b, where] = seqs[b][0, :n], False
    positions = ((~pad).long().cumsum(1) - 1).clamp(min=0)  # (B, P)
    with torch.no_grad():
        cache = m.new_cache(3, 16, rolling=False if side == "right" else None)
        prompt_out = m(x, cache=cache, key_padding_mask=pad, position_ids=positions)
        if side == "right":
            cache.truncate(torch.tensor(lengths))
        assert cache.next_positions.tolist() == lengths
        steps = [m(torch.stack([s[0, n + i] for s, n in zip(seqs, lengths)])[:, None], cache=cache)
                 for i in range(new)]
        got = torch.cat(steps, dim=1)  # (B, new, d_out)
        for b, n in enumerate(lengths):
            ref = alone(m, seqs[b])  # (1, n + new, d_out)
            assert_close(prompt_out[b][~pad[b]], ref[0, :n], n=N)
            assert_close(got[b], ref[0, n:], n=N)


def test_rows_keep_their_own_lengths_and_rollback_per_row():
    """Speculative decoding: every row takes 4 draft tokens, rows keep 1, 4 and 0 of them (rollback 3, 0,
    4), then continue: the same outputs as a cache that only ever saw the kept tokens."""
    m = make(num_kv_groups=2, rope=True)
    x = torch.randn(3, 12, D)
    keep = torch.tensor([1, 4, 0])
    with torch.no_grad():
        cache = m.new_cache(3, 20)
        m(x[:, :5], cache=cache)
        m(x[:, 5:9], cache=cache)  # the drafts
        cache.rollback(4 - keep)
        assert cache.lengths.tolist() == (5 + keep).tolist() and cache.next_positions.tolist() == (5 + keep).tolist()
        nxt = torch.randn(3, 2, D)
        got = m(nxt, cache=cache)
        for b in range(3):
            kept = torch.cat([x[b:b + 1, : 5 + int(keep[b])], nxt[b:b + 1]], dim=1)
            assert_close(got[b], alone(m, kept)[0, -2:], n=N)
        cache.truncate(2)  # an int keeps the first 2 tokens of every row
        assert cache.lengths.tolist() == [2, 2, 2]
        assert_close(m(nxt[:, :1], cache=cache), alone(m, torch.cat([x[:, :2], nxt[:, :1]], 1))[:, -1:], n=N)


def test_attn_mask_with_a_cache_attends_a_tree_of_draft_tokens():
    """A tree of 4 draft tokens after a 5-token prefix: a (root), b and c (children of a), d (child of b).
    With the tree's mask and depth positions, each draft token's output equals its path decoded alone."""
    m = make(num_kv_groups=2, rope=True, backend="torch")
    prefix, drafts = torch.randn(1, 5, D), torch.randn(1, 4, D)
    parents = [None, 0, 0, 1]
    tree = torch.eye(4, dtype=torch.bool)
    depth = [0] * 4
    for i, p in enumerate(parents):
        while p is not None:
            tree[i, p] = True
            depth[i] += 1
            p = parents[p]
    with torch.no_grad():
        cache = m.new_cache(1, 16)
        m(prefix, cache=cache)
        out = m(drafts, cache=cache, attn_mask=tree, position_ids=5 + torch.tensor(depth))
        for i in range(4):
            path = [j for j in range(4) if tree[i, j]]  # ancestors and itself, in depth order
            ref = alone(m, torch.cat([prefix, drafts[:, path]], dim=1))
            assert_close(out[0, i], ref[0, -1], n=N)
    with pytest.raises(ValueError, match="attn_mask says how the 4 new tokens see each other"):
        m(drafts, cache=m.new_cache(1, 16), attn_mask=torch.ones(3, 3, dtype=torch.bool))


def test_rolling_cache_rows_and_its_rollback_limit():
    m = make(num_kv_groups=2, rope=True, window_size=3)
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        cache = m.new_cache(2, 50)
        assert isinstance(cache, RollingKVCache)
        m(x[:, :2], cache=cache)
        m(x[:, 2:3], cache=cache)
        cache.rollback(torch.tensor([1, 0]))  # nothing overwritten yet: allowed
        out = m(x[:, 3:4], cache=cache)
        assert_close(out[0], alone(m, torch.cat([x[:1, :2], x[:1, 3:4]], 1))[0, -1:], n=N)
        assert_close(out[1], alone(m, x[1:, :4])[0, -1:], n=N)
        m(x[:, 4:9], cache=cache)
        with pytest.raises(ValueError, match="cannot roll back once a row has more than window_size=3"):
            cache.rollback(1)
    assert isinstance(m.new_cache(2, 50, rolling=False), KVCache)


def test_one_cache_per_layer_and_layer_caches():
    model = nn.Sequential(make(), make(rope=True), MultiHeadLatentAttention(D, 16, 64, 0.0, 4))
    with torch.no_grad():
        cache = model[0].new_cache(1, 8)
        model[0](torch.randn(1, 2, D), cache=cache)
        with pytest.raises(ValueError, match="already belongs to another layer"):
            model[1](torch.randn(1, 2, D), cache=cache)
        caches = LayerCaches.for_model(model, 2, 8)
        assert len(caches) == 3 and caches[2].value_dim == 0
        x = torch.randn(2, 3, D)
        for layer, c in zip(model, caches):
            layer(x, cache=c)
        assert [int(c.lengths.max()) for c in caches] == [3, 3, 3]
        caches.rollback(1)
        caches.reset()
        assert all(int(c.lengths.max()) == 0 for c in caches)
    with pytest.raises(TypeError, match="LayerCaches holds KVCache"):
        LayerCaches([nn.Linear(1, 1)])


def test_update_keeps_positions_as_tensors_without_host_sync():
    """A host sync (int(tensor), .item()) would break the graph: fullgraph=True compiles only without one."""
    cache = KVCache(2, 8, 2, 4)
    update = torch.compile(lambda k, v, p: cache.update(k, v, p).mask, backend="eager", fullgraph=True)
    k = torch.randn(2, 2, 3, 4)
    pad = torch.tensor([[True, False, False], [False, False, False]])
    mask = update(k, k, pad)
    assert isinstance(cache.next_positions, torch.Tensor) and cache.next_positions.tolist() == [3, 3]
    assert mask.shape == (2, 1, 3, 8) and not mask[0, 0, :, 0].any()  # the padding key is never seen


def test_a_full_cache_under_torch_compile_is_a_clear_error():
    m = make(rope=True)
    cache = m.new_cache(1, 4)
    step = torch.compile(lambda t: m(t, cache=cache), backend="eager", fullgraph=True)
    with torch.no_grad():
        for _ in range(4):
            step(torch.randn(1, 1, D))
        with pytest.raises(RuntimeError, match="the cache is full: some row's tokens cached \\+ 1 new > max_tokens=4"):
            step(torch.randn(1, 1, D))
        with pytest.raises(ValueError, match="the cache is full: 4 tokens cached \\+ 1 new > max_tokens=4"):
            m(torch.randn(1, 1, D), cache=cache)  # eager: a ValueError before anything is written


class _Step(nn.Module):
    """What one exports: the layer and its cache as submodules (the cache is the program's state)."""

    def __init__(self, layer, cache):
        super().__init__()
        self.layer, self.cache = layer, cache

    def forward(self, x):
        return self.layer(x, cache=self.cache)


def test_export_and_compile_with_gradients_are_refused_and_export_leaves_the_cache_alone():
    m = make(num_kv_groups=2, rope=True)
    cache = m.new_cache(1, 16)
    with torch.no_grad():
        m(torch.randn(1, 3, D), cache=cache)
    before = {k: v.clone() for k, v in cache.state_dict().items()}
    x = torch.randn(1, 1, D)
    with pytest.raises(RuntimeError, match="compiled or exported with gradients enabled"):
        torch.export.export(_Step(m, cache), (x,))
    with pytest.raises(RuntimeError, match="compiled or exported with gradients enabled"):
        torch.compile(lambda t: m(t, cache=cache), backend="eager", fullgraph=True)(x)
    with torch.no_grad():
        program = torch.export.export(_Step(m, cache), (x,))
    for name, value in cache.state_dict().items():  # exact: the export call wrote nothing
        assert torch.equal(value, before[name]), name

    fresh = m.new_cache(1, 16)
    with torch.no_grad():
        program = torch.export.export(_Step(m, fresh), (x,)).module()
        xs = torch.randn(1, 6, D)
        steps = torch.cat([program(xs[:, i:i + 1]) for i in range(6)], dim=1)  # the program updates its cache
        assert_close(steps, m(xs), n=N)


def test_autocast_cache_takes_the_autocast_dtype_and_errors_advise_it():
    m = make(rope=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        cache = m.new_cache(1, 8)
        assert cache.keys.dtype == torch.bfloat16
        out = m(torch.randn(1, 3, D), cache=cache)
        assert out.dtype == torch.bfloat16
        wrong = m.new_cache(1, 8, dtype=torch.float32)
        with pytest.raises(TypeError, match=r"new_cache\(\.\.\., dtype=torch.bfloat16\)"):
            m(torch.randn(1, 3, D), cache=wrong)


def test_eager_steps_after_an_exported_step_see_what_the_program_wrote():
    """An exported decoding step writes the cache's buffers without the host counting it; the next eager
    step must notice (the buffers' write counter moved) and take the masked path, not append at a stale slot."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 8, context_length=64, num_heads=2, dropout=0.0).eval()
    x = torch.randn(1, 8, 8)

    class Step(nn.Module):
        def __init__(self, cache: KVCache) -> None:
            super().__init__()
            self.mha, self.caches = mha, LayerCaches([cache])

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.mha(t, cache=self.caches[0])

    with torch.no_grad():
        full = mha(x)  # (1, 8, 8): every position at once, the reference
        cache = mha.new_cache(batch_size=1, max_tokens=16)
        mha(x[:, :5], cache=cache)
        program = torch.export.export(Step(cache), (x[:, 5:6],)).module()
        outs = [program(x[:, 5:6]), mha(x[:, 6:7], cache=cache), mha(x[:, 7:8], cache=cache)]
    assert cache.lengths.tolist() == [8]
    assert_close(torch.cat(outs, dim=1), full[:, 5:], n=N)
