"""ALiBi through the positional hook: slopes as the paper and BLOOM define them, the module equal to a
float64 reference (outputs and gradients) on every backend that reads a score bias, decoding with a cache
equal to the full forward, and clear refusals where a bias has no meaning."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab import backends
from attnlab.alibi import ALiBi, ALiBiBias, alibi_slopes
from attnlab.errors import AttnlabInputError
from attnlab.modules import MultiHeadAttention
from attnlab.rope import SCHEMES, make_positional, register_scheme
from tolerances import assert_close

D_IN, D_OUT, HEADS = 12, 24, 6


def test_slopes_are_the_papers_for_a_power_of_two():
    for h in (1, 2, 8, 16):
        want = torch.tensor([2.0 ** (-8.0 * i / h) for i in range(1, h + 1)], dtype=torch.float64)
        assert torch.equal(alibi_slopes(h), want)  # exact: the same powers of two
    assert alibi_slopes(8).tolist() == [1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256]


@pytest.mark.parametrize("heads", [1, 3, 5, 6, 12, 97])
def test_slopes_equal_blooms(heads):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom", reason="reference implementation (attnlab[dev])")
    t = 4
    alibi = bloom.build_alibi_tensor(torch.ones(1, t, dtype=torch.long), heads, torch.float64)  # (H, 1, T)
    # BLOOM's bias is slope * position (softmax cannot tell it from -slope * (i - j) under a causal mask).
    assert_close(alibi_slopes(heads), alibi[:, 0, 1], dtype=torch.float32, n=1)  # BLOOM computes in float32
    assert_close(alibi[:, 0, 3] - alibi[:, 0, 1], 2 * alibi_slopes(heads), dtype=torch.float32, n=2)


def test_score_bias_is_minus_slope_times_distance():
    alibi = ALiBi(4)
    q_pos, k_pos = torch.tensor([[0, 5, 9]]), torch.tensor([[0, 1, 2, 3, 9]])
    got = alibi.score_bias(q_pos, k_pos).dense(3, 5)  # (1, 4, 3, 5)
    slopes = alibi_slopes(4)
    want = torch.empty(1, 4, 3, 5, dtype=torch.float64)
    for h in range(4):
        for i, qi in enumerate(q_pos[0].tolist()):
            for j, kj in enumerate(k_pos[0].tolist()):
                want[0, h, i, j] = -float(slopes[h]) * abs(qi - kj)
    assert got.shape == (1, 4, 3, 5) and got.dtype == torch.float32
    assert_close(got, want, dtype=torch.float32, n=1)


def _reference(m: MultiHeadAttention, x: torch.Tensor, *, causal: bool = True, window: int | None = None) -> torch.Tensor:
    """The module's function in float64 from its weights: projections, -m_h |i - j| added, masked softmax."""
    xd = x.double()
    w = {name: getattr(m, name).weight.double() for name in ("W_query", "W_key", "W_value", "out_proj")}
    b, t, _ = x.shape
    hd = m.head_dim
    q = (xd @ w["W_query"].T).view(b, t, m.num_heads, hd).transpose(1, 2)  # (B, H, T, hd)
    k = (xd @ w["W_key"].T).view(b, t, m.num_kv_groups, hd).transpose(1, 2)  # (B, H_kv, T, hd)
    v = (xd @ w["W_value"].T).view(b, t, m.num_kv_groups, hd).transpose(1, 2)  # (B, H_kv, T, hd)
    groups = m.num_heads // m.num_kv_groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T, hd)
    pos = torch.arange(t, dtype=torch.float64)
    distance = (pos[:, None] - pos[None, :]).abs()  # (T, T)
    bias = -alibi_slopes(m.num_heads)[:, None, None] * distance  # (H, T, T)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias  # (B, H, T, T)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = torch.ones(t, t, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    scores = scores.masked_fill(~allowed, -math.inf)
    ctx = torch.softmax(scores, dim=-1) @ v  # (B, H, T, hd)
    out = ctx.transpose(1, 2).reshape(b, t, m.inner_dim) @ w["out_proj"].T  # (B, T, d_out)
    return out + m.out_proj.bias.double()


@pytest.mark.parametrize("backend", ["eager", "torch", "auto", "flash"])
@pytest.mark.parametrize("t", [1, 3, 97])
@pytest.mark.parametrize("options", [{}, {"num_kv_groups": 2}, {"causal": False}, {"window_size": 5}])
def test_module_with_alibi_equals_the_float64_reference(backend, t, options):
    torch.manual_seed(t)
    m = MultiHeadAttention(D_IN, D_OUT, 128, 0.0, HEADS, rope="alibi", backend=backend, **options)
    x = torch.randn(2, t, D_IN, requires_grad=True)
    out = m(x)
    want = _reference(m, x.detach(), causal=options.get("causal", True), window=options.get("window_size"))
    n = D_IN + D_OUT // HEADS + t + D_OUT
    assert_close(out, want, dtype=torch.float32, n=n, scale=float(want.abs().max()) + t)
    # gradients: against autograd through the float64 reference
    go = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, go)
    x64 = x.detach().double().requires_grad_(True)
    m64 = MultiHeadAttention(D_IN, D_OUT, 128, 0.0, HEADS, rope="alibi", backend="eager", **options).double()
    m64.load_state_dict(m.state_dict())
    (want_grad,) = torch.autograd.grad(m64(x64), x64, go.double())
    assert_close(grad, want_grad, dtype=torch.float32, n=2 * n, scale=float(want_grad.abs().max()) + t)


def test_alibi_differs_from_no_positions():
    torch.manual_seed(0)
    plain = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS)
    alibi = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, rope="alibi")
    alibi.load_state_dict(plain.state_dict())  # the same state_dict: ALiBi saves nothing
    assert list(alibi.state_dict()) == list(plain.state_dict())
    x = torch.randn(1, 6, D_IN)
    assert (alibi(x) - plain(x)).abs().max() > 1e-3  # the bias changes the function


@pytest.mark.parametrize("backend", ["auto", "flash"])
@pytest.mark.parametrize("rolling", [False, True])
def test_decoding_with_a_cache_equals_the_full_forward(rolling, backend):
    torch.manual_seed(1)
    window = 4 if rolling else None
    m = MultiHeadAttention(D_IN, D_OUT, 64, 0.0, HEADS, rope="alibi", num_kv_groups=3, window_size=window,
                           backend=backend).eval()
    x = torch.randn(2, 11, D_IN)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 16, rolling=rolling)
        steps = [m(x[:, :5], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(5, 11)]
    got = torch.cat(steps, dim=1)  # (B, T, d_out)
    assert_close(got, full, dtype=torch.float32, n=D_IN + D_OUT + 11)


class _DenseBias(torch.nn.Module):
    """A scheme whose score bias is a plain tensor (no tile form)."""

    def forward(self, queries, keys, positions):
        return queries, keys

    def score_bias(self, query_positions, key_positions):
        return torch.zeros(query_positions.shape[-1], key_positions.shape[-1])


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match="score bias .*backend='flash' takes none"):
        MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, rope=_DenseBias(), backend="flash")
    MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, rope="alibi", backend="flash")  # ALiBi: per tile
    with pytest.raises(ValueError, match="context_parallel takes no score bias"):
        MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, rope="alibi",
                           context_parallel=type("CP", (), {"attention": len, "positions": len})())
    with pytest.raises(AttnlabInputError, match=r"a scheme's name, one of \['alibi', 'rope'\]"):
        MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, rope="nope")
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="flash backend takes no dense score bias"):
        backends.attention(q, q, q, bias=torch.zeros(1, 2, 3, 3), backend="flash")
    assert not backends.TAKES["flash"].general_masks and backends.TAKES["torch"].general_masks
    assert backends.TAKES["flash"].linear_bias


def test_registration_adds_a_scheme_by_name():
    calls = []

    def factory(head_dim, num_heads, base):
        calls.append((head_dim, num_heads, base))
        return ALiBi(num_heads)

    register_scheme("alibi_test", factory)
    try:
        m = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, rope="alibi_test", rope_base=500.0)
        assert calls == [(D_OUT // HEADS, HEADS, 500.0)] and isinstance(m.rope, ALiBi)
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("alibi_test", factory)
    finally:
        SCHEMES.pop("alibi_test")
    assert isinstance(make_positional(True, head_dim=4, num_heads=2, base=10.0), torch.nn.Module)


def test_alibi_with_padding_a_float_mask_and_documents_equals_the_reference():
    torch.manual_seed(5)
    t = 9
    m = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, rope="alibi", causal=False)
    x = torch.randn(2, t, D_IN)
    pad = torch.zeros(2, t, dtype=torch.bool)
    pad[1, :3] = True
    float_mask = torch.randn(t, t)
    docs = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))])  # restart in each document
    for backend in ("eager", "torch", "auto"):
        m.backend = backend
        got = m(x, key_padding_mask=pad, attn_mask=float_mask, document_ids=docs)
        # the reference: the plain module (no positions) handed the ALiBi bias as part of its float mask
        plain = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, causal=False, backend="eager")
        plain.load_state_dict(m.state_dict())
        bias = ALiBi(HEADS).score_bias(positions, positions).dense(t, t) + float_mask  # (B, H, T, T)
        want = plain(x, key_padding_mask=pad, attn_mask=bias, document_ids=docs)
        assert_close(got, want, n=D_IN + D_OUT + t, msg=backend)


def test_slopes_stay_float32_when_the_module_changes_dtype():
    m = MultiHeadAttention(D_IN, D_OUT, 16, 0.0, HEADS, rope="alibi").to(torch.bfloat16)
    assert m.rope.slopes.dtype == torch.float32
    assert torch.equal(m.rope.slopes, alibi_slopes(HEADS).float())  # exact: the same float32 rounding


def test_attend_refuses_what_context_parallel_cannot_carry():
    from attnlab.masks import MaskSpec
    from attnlab.modules import attend

    class CP:
        def attention(self, q, k, v, *, causal, key_padding_mask, scale=None):
            return q

    q = torch.randn(1, 2, 3, 4)
    for mask, extra in ((MaskSpec(window=2), {}), (MaskSpec(allowed=torch.ones(3, 3, dtype=torch.bool)), {}),
                        (MaskSpec(causal=True), {"bias": torch.zeros(3, 3)}),
                        (MaskSpec(causal=True), {"scheme": ALiBi(2)})):
        with pytest.raises(ValueError, match="context_parallel takes causal and key padding only"):
            attend(q, q, q, mask, context_parallel=CP(), **extra)
    out, weights = attend(q, q, q, MaskSpec(causal=True), context_parallel=CP())
    assert out is q and weights is None


@pytest.mark.parametrize("t_q,t_k", [(0, 0), (1, 1), (3, 3), (1, 97), (97, 97), (97, 257), (257, 97)])
@pytest.mark.parametrize("parts", [{"causal": True}, {}, {"window": 5}])
def test_flash_kernel_takes_alibi_per_tile(t_q, t_k, parts):
    """flash_attention(alibi_slopes=) equals the float64 reference with the dense bias, out and gradients,
    across tile boundaries (blocks of 16), with grouped heads."""
    from attnlab import functional as F
    from attnlab.flash import flash_attention

    g = torch.Generator().manual_seed(t_q * 1000 + t_k)
    q, k, v = (torch.randn(2, h, t, 8, generator=g, dtype=torch.float64).requires_grad_(True)
               for h, t in ((6, t_q), (3, t_k), (3, t_k)))
    slopes = alibi_slopes(6)
    out = flash_attention(q, k, v, alibi_slopes=slopes, block_q=16, block_k=16, **parts)
    bias = ALiBiBias(slopes).dense(t_q, t_k).double()  # (1, H, T_q, T_k), bottom-right by index
    want = F.scaled_dot_product_attention(q, k, v, mask=bias, **parts)
    assert_close(out, want, dtype=torch.float64, n=t_k + 8, scale=1 + 0.5 * t_k)
    if out.numel():
        go = torch.randn(out.shape, generator=g, dtype=torch.float64)
        for got, expected in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(want, (q, k, v), go)):
            assert_close(got, expected, dtype=torch.float64, n=2 * (t_k + 8), scale=1 + 0.5 * t_k)


def test_flash_kernel_takes_alibi_positions_and_refuses_bad_ones():
    from attnlab.flash import flash_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, t, 8, generator=g) for t in (3, 7, 7))
    q_pos, k_pos = torch.tensor([[9, 10, 11], [4, 5, 6]]), torch.tensor([[0, 2, 4, 6, 8, 10, 11], [0, 1, 2, 3, 4, 5, 6]])
    slopes = alibi_slopes(4)
    got = flash_attention(q, k, v, alibi_slopes=slopes, alibi_positions=(q_pos, k_pos), block_q=2, block_k=2)
    want = backends.attention(q, k, v, bias=ALiBiBias(slopes, q_pos, k_pos), backend="eager")
    assert_close(got, want, n=7 + 8, scale=8.0)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(4,\)"):
        flash_attention(q, k, v, alibi_slopes=alibi_slopes(3))
    with pytest.raises(ValueError, match="alibi_positions' key positions must have shape"):
        flash_attention(q, k, v, alibi_slopes=slopes, alibi_positions=(q_pos, k_pos[:, :5]))
    with pytest.raises(ValueError, match="give alibi_slopes too"):
        flash_attention(q, k, v, alibi_positions=(q_pos, k_pos))
