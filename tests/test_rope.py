"""Rotary position embeddings: the book's compute_rope, a float64 rotation per feature pair, relative
positions, the hook for another positional scheme, and MultiHeadAttention(rope=...)."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab import MultiHeadAttention
from attnlab.modern import book_compute_rope, book_precompute_rope_params
from attnlab.rope import RotaryEmbedding, apply_rope, rope_angles, rotate_half
from tolerances import abs_tol, assert_close, tols


def rotate_pairs_float64(x, positions, base=10000.0):
    """The definition, one 2-D rotation per feature pair (i, i + hd/2), in float64 loops."""
    out = torch.empty_like(x, dtype=torch.float64)
    hd = x.shape[-1]
    for t, p in enumerate(positions.tolist()):
        for i in range(hd // 2):
            theta = p * base ** (-2 * i / hd)
            a, b = x[..., t, i].double(), x[..., t, i + hd // 2].double()
            out[..., t, i] = a * math.cos(theta) - b * math.sin(theta)
            out[..., t, i + hd // 2] = a * math.sin(theta) + b * math.cos(theta)
    return out


def test_rotation_is_the_definition_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 7, 30, 1000])
    q, k = RotaryEmbedding(8)(x, x[:, :1], positions)
    # a two-term rotation of an angle as large as the position (its rounding grows with it): n = 2 + 1000
    n, size = 2 + int(positions.max()), float(x.abs().max())
    assert_close(q, rotate_pairs_float64(x, positions), n=n, scale=size)
    assert_close(k, rotate_pairs_float64(x[:, :1], positions), n=n, scale=size)


@pytest.mark.parametrize("offset", [0, 3, 97])
def test_equals_the_books_compute_rope(offset):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 7, 16)
    cos, sin = book_precompute_rope_params(16, 10000, 256)
    expected = book_compute_rope(x, cos, sin, offset=offset)
    got, _ = RotaryEmbedding(16)(x, x, torch.arange(offset, offset + 7))
    assert_close(got, expected, n=2 + offset + 7, scale=float(x.abs().max()))  # rotation, angle <= position


def test_scores_depend_on_relative_position_only():
    torch.manual_seed(2)
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)
    rope = RotaryEmbedding(32, base=500.0)

    def score(m, n):
        qm, _ = rope(q, q, torch.tensor([m]))
        _, kn = rope(k, k, torch.tensor([n]))
        return (qm * kn).sum().item()

    size = float(q.norm() * k.norm())  # sum |q_i k_i| <= |q| |k|
    # a 32-term dot product of vectors rotated by angles up to 105 (their rounding grows with the angle)
    assert score(5, 2) == pytest.approx(score(105, 102), abs=abs_tol(torch.float64, 32 + 2 + 105, scale=size))
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=abs_tol(torch.float64, 32, scale=size))  # no rotation
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # and it does depend on the distance (1e10 x the bounds above)


def test_rotate_half_and_batched_positions():
    x = torch.arange(4.0)
    assert rotate_half(x).tolist() == [-2.0, -3.0, 0.0, 1.0]
    torch.manual_seed(3)
    x = torch.randn(2, 2, 3, 4)
    positions = torch.tensor([[0, 1, 2], [5, 6, 7]])  # (B, T): one row of positions per sequence
    cos, sin = rope_angles(positions, 4)
    got = apply_rope(x, cos, sin)
    for b in range(2):
        c, s = rope_angles(positions[b], 4)
        assert_close(got[b : b + 1], apply_rope(x[b : b + 1], c, s), n=2 + 7)  # rotation, angle <= 7


def test_half_precision_keeps_dtype():
    x = torch.randn(1, 1, 3, 8, dtype=torch.bfloat16)
    q, k = RotaryEmbedding(8)(x, x, torch.arange(3))
    assert q.dtype == k.dtype == torch.bfloat16
    # float32 math (2^-16 smaller), one rounding of the result to bfloat16
    assert_close(q, rotate_pairs_float64(x.float(), torch.arange(3)), n=0, ops=1, dtype=torch.bfloat16,
                 scale=float(x.abs().max()))


@pytest.mark.parametrize("bad, match", [(3, "even head_dim"), (0, "even head_dim"), (True, "even head_dim")])
def test_bad_head_dim(bad, match):
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(bad)


def test_bad_base_and_mismatched_head_dim():
    with pytest.raises(ValueError, match="rope_base"):
        RotaryEmbedding(8, base=1.0)
    with pytest.raises(ValueError, match="head_dim=8"):
        RotaryEmbedding(8)(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.arange(2))


def test_module_rope_leaves_the_state_dict_unchanged():
    torch.manual_seed(123)
    plain = MultiHeadAttention(6, 8, 16, 0.0, 2)
    torch.manual_seed(123)
    rotary = MultiHeadAttention(6, 8, 16, 0.0, 2, rope=True, rope_base=500.0)
    assert plain.state_dict().keys() == rotary.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, rotary.state_dict()[name])  # exact: same seed, same draws, same init ops
    x = torch.randn(1, 5, 6)
    n = 6 + 4 + 5 + 8  # d_in, head dim, T, out_proj
    assert not torch.allclose(plain(x), rotary(x), **tols(torch.float32, n))  # positions now matter ...
    assert_close(plain(x[:, :1]), rotary(x[:, :1]), n=n)  # ... except at position 0 alone


def test_hook_for_another_positional_scheme():
    calls = []

    def scale_by_position(queries, keys, positions):  # a made-up scheme, shape-preserving
        calls.append((tuple(queries.shape), tuple(keys.shape), positions.tolist()))
        factor = (1.0 + positions.to(queries.dtype))[:, None]  # (T, 1)
        return queries * factor, keys * factor

    torch.manual_seed(0)
    m = MultiHeadAttention(6, 8, 16, 0.0, 4, num_kv_groups=2, rope=scale_by_position, backend="eager")
    x = torch.randn(2, 3, 6)
    out = m(x)
    assert calls == [((2, 4, 3, 2), (2, 2, 3, 2), [0, 1, 2])]
    # The same function by hand: scaled queries/keys through the eager math.
    q = m.W_query(x).view(2, 3, 4, 2).transpose(1, 2) * torch.tensor([1.0, 2.0, 3.0])[:, None]
    k = m.W_key(x).view(2, 3, 2, 2).transpose(1, 2) * torch.tensor([1.0, 2.0, 3.0])[:, None]
    v = m.W_value(x).view(2, 3, 2, 2).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(2)).masked_fill(torch.ones(3, 3).triu(1).bool(), -torch.inf)
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 3, 8)
    assert_close(out, m.out_proj(ctx), n=6 + 2 + 3 + 8)  # d_in, head dim, T, out_proj
    with pytest.raises(TypeError, match="rope must be None, True or a callable"):
        MultiHeadAttention(6, 8, 16, 0.0, 4, rope="llama")
