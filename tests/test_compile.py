"""attnlab where PyTorch's tools go: torch.compile (no graph break), torch.export and torch.jit.trace
with a dynamic length, torch.autocast. Small models: the point is that each tool works and gives the
eager numbers, not speed (benchmarks/bench_train.py times training)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn
from torch.export import Dim, export

from attnlab import MultiHeadAttention, backends
from attnlab import functional as F
from tolerances import abs_tol, assert_close


def two_layers_n(t):
    """tests/tolerances.py's n for TwoLayers' output: per layer the projection (16), the scores (head dim 8),
    the T_k weighted sum and out_proj (16)."""
    return 2 * (16 + 8 + t + 16)

BACKEND_NAMES = ("eager", "torch", "auto", "flash")
CONTEXT = 12


class TwoLayers(nn.Module):
    """Two attention layers with a residual, the smallest model with layers that talk to each other."""

    def __init__(self, backend: str, causal: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.a = MultiHeadAttention(16, 16, CONTEXT, dropout, 2, causal=causal, backend=backend)
        self.b = MultiHeadAttention(16, 16, CONTEXT, dropout, 2, causal=causal, backend=backend)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.a(x, key_padding_mask=key_padding_mask)  # (B, T, 16)
        return h + self.b(h, key_padding_mask=key_padding_mask)  # (B, T, 16)


def padding(b: int, t: int) -> torch.Tensor:
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[-1, t // 2 :] = True  # the last sequence is half padding
    return pad


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# -- torch.compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("causal,padded", [(True, True), (False, False)])
def test_no_graph_break(backend, causal, padded):
    torch.manual_seed(0)
    model = TwoLayers(backend, causal)
    args = (torch.randn(2, 7, 16), padding(2, 7)) if padded else (torch.randn(2, 7, 16),)
    explained = torch._dynamo.explain(model)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_compiled_training_step_equals_eager(backend):
    """fullgraph=True through AOTAutograd (forward + backward traced), with a padding mask; the
    gradients are those of the uncompiled model."""
    torch.manual_seed(0)
    model = TwoLayers(backend).train()
    x, pad = torch.randn(2, 7, 16), padding(2, 7)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x, pad).square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x, pad).square().sum().backward()
    for n, p in model.named_parameters():
        # back through the transposes of the same reductions; a weight's gradient also sums over B * T = 14
        assert_close(got[n], p.grad, n=2 * two_layers_n(7) + 14, msg=n)


def test_compiled_training_with_dropout_has_no_graph_break():
    torch.manual_seed(0)
    model = TwoLayers("auto", dropout=0.1).train()
    explained = torch._dynamo.explain(model)(torch.randn(2, 7, 16), padding(2, 7))
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(torch.randn(2, 7, 16)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_generation_with_changing_lengths_compiles_once(backend):
    """dynamic=True: lengths 2..CONTEXT run one graph (no recompile per length), equal to eager."""
    torch.manual_seed(0)
    model = TwoLayers(backend).eval()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for t in range(2, CONTEXT + 1):
            x = torch.randn(1, t, 16)
            assert_close(compiled(x), model(x), n=two_layers_n(t))
    assert counter.frame_count == 1


def test_compile_under_autocast_has_no_graph_break():
    model = TwoLayers("auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(torch.randn(2, 7, 16).bfloat16(), padding(2, 7))
    assert explained.graph_break_count == 0, explained.break_reasons


# -- torch.export and torch.jit.trace -----------------------------------------------------------------


@pytest.mark.parametrize("backend,padded", [*((b, True) for b in BACKEND_NAMES), ("auto", False)])
def test_export_with_a_dynamic_length(backend, padded):
    torch.manual_seed(0)
    model = TwoLayers(backend).eval()
    t = Dim("T", max=CONTEXT)
    if padded:
        program = export(model, (torch.randn(2, 5, 16), padding(2, 5)), dynamic_shapes=({1: t}, {1: t}))
    else:
        program = export(model, (torch.randn(2, 5, 16),), dynamic_shapes=({1: t},))
    exported = program.module()
    for length in (2, 7, CONTEXT):
        args = (torch.randn(2, length, 16), padding(2, length)) if padded else (torch.randn(2, length, 16),)
        assert_close(exported(*args), model(*args), n=two_layers_n(length))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_jit_trace(backend):
    torch.manual_seed(0)
    model = TwoLayers(backend).eval()
    traced = torch.jit.trace(model, (torch.randn(2, 5, 16),))
    for length in (5, 9):
        x = torch.randn(2, length, 16)
        assert_close(traced(x), model(x), n=two_layers_n(length))


# -- torch.autocast -----------------------------------------------------------------------------------


class BookMHA(nn.Module):
    """The book's MultiHeadAttention (chapter 3.6.2): plain PyTorch math, the autocast yardstick."""

    def __init__(self, d, context, heads):
        super().__init__()
        self.num_heads, self.head_dim, self.d_out = heads, d // heads, d
        self.W_query, self.W_key, self.W_value = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.out_proj = nn.Linear(d, d)
        self.register_buffer("mask", torch.triu(torch.ones(context, context), diagonal=1))

    def forward(self, x):
        b, t, _ = x.shape
        keys = self.W_key(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        scores = queries @ keys.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:t, :t], -torch.inf)
        weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
        return self.out_proj((weights @ values).transpose(1, 2).contiguous().view(b, t, self.d_out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_module_under_autocast_within_twice_plain_math(backend, dtype):
    """Under torch.autocast("cpu", dtype) the module takes float32 and low-precision inputs (as
    nn.Linear does) and its error against float64 is at most twice the book's class's in the same
    autocast, forward and input gradient."""
    torch.manual_seed(0)
    ours = MultiHeadAttention(32, 32, 40, 0.0, 4, backend=backend)
    book = BookMHA(32, 40, 4)
    book.load_state_dict(ours.state_dict())
    ref = MultiHeadAttention(32, 32, 40, 0.0, 4, backend="eager").double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 37, 32) * 2
    expected = ref(x.double())
    for x_in in (x, x.to(dtype)):
        with torch.autocast("cpu", dtype=dtype):
            out = ours(x_in)
            plain = book(x_in)
        assert out.dtype == plain.dtype
        err = (out.double() - expected).abs().max().item()
        plain_err = (plain.double() - expected).abs().max().item()
        assert torch.isfinite(out).all()
        # twice the plain math's own error in dtype, plus the float32 bound (d_in, head dim, T, out_proj)
        slack = abs_tol(torch.float32, 32 + 8 + 37 + 32, scale=max(1.0, expected.abs().max().item()))
        assert err <= 2 * plain_err + slack, (err, plain_err)
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        ours(xg).float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_backends_under_autocast_within_twice_plain_math(backend, dtype):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 33, 16, dtype=torch.float64) for _ in range(3))
    pad = torch.rand(2, 1, 1, 33) > 0.2
    pad[..., 0] = True  # every query keeps a key (plain math would give NaN for a row without)
    expected = F.scaled_dot_product_attention(q, k, v, mask=pad, causal=True)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) / 4.0
    scores = scores.masked_fill(~(pad & torch.ones(33, 33, dtype=torch.bool).tril()), float("-inf"))
    plain = torch.softmax(scores, dim=-1) @ v.to(dtype)
    plain_err = (plain.double() - expected).abs().max().item()
    with torch.autocast("cpu", dtype=dtype):
        out = backends.attention(q.float(), k.float(), v.float(), mask=pad, causal=True, backend=backend)
    err = (out.double() - expected).abs().max().item()
    # twice the plain math's own error in dtype, plus the float32 bound (d = 16, T_k = 33)
    assert err <= 2 * plain_err + abs_tol(torch.float32, 16 + 33, scale=max(1.0, expected.abs().max().item())), (
        err, plain_err)


def test_autocast_still_refuses_real_mistakes():
    m = MultiHeadAttention(4, 4, 8, 0.0, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
            m(torch.ones(1, 3, 4, dtype=torch.long))
        with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the module's parameters are torch.float32"):
            m(torch.ones(1, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x has dtype torch.bfloat16 but the module's parameters are torch.float32"):
        m(torch.ones(1, 3, 4, dtype=torch.bfloat16))  # outside autocast: a mistake, as before
