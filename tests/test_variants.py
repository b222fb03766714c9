"""Every registered variant computes the chapter's MultiHeadAttention, weights copied by from_reference.

Compared against attnlab.MultiHeadAttention(backend="eager"), float32: outputs, input gradients and
parameter gradients (mapped back to the reference's layout) within tests/tolerances.py's relative bound
(max abs error / max abs value <= (n + ops) * eps), on odd lengths and widths, with and without qkv_bias.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from attnlab import MultiHeadAttention
from attnlab import variants as V
from attnlab.variants import VARIANTS, VariantUnavailableError, from_reference
from tolerances import rel_tol


def out_tol(d_in, d_out, num_tokens, dtype=torch.float32):
    """rel_tol of an output: the projection (d_in), the scores (head dim <= d_out), T_k, out_proj (d_out)."""
    return rel_tol(dtype, d_in + d_out + num_tokens + d_out)


def grad_tol(d_in, d_out, batch, num_tokens):
    """rel_tol of a gradient: back through the same reductions, and a weight's sums over every token."""
    return rel_tol(torch.float32, 2 * (d_in + d_out + num_tokens + d_out) + batch * num_tokens)

REQUIRED = {
    "ch03_wrapper", "ch03", "combined_qkv", "einsum", "sdpa", "sdpa_no_flash", "torch_mha",
    "torch_mha_no_weights", "flex", "flash", "attnlab",
}
NEEDS_SQUARE = {"torch_mha", "torch_mha_no_weights"}  # nn.MultiheadAttention: d_in must equal d_out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (actual - expected).abs().max().item() / scale


def flex_backward_unavailable(device: torch.device) -> bool:
    return V._flex_backward_unavailable_reason(device) is not None


def reference(d_in: int, d_out: int, heads: int, bias: bool, seed: int = 0) -> MultiHeadAttention:
    torch.manual_seed(seed)
    ref = MultiHeadAttention(d_in, d_out, 300, 0.0, heads, bias, backend="eager")
    with torch.no_grad():  # non-zero biases, so that a bias copied to the wrong place shows
        for p in ref.parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5)
    return ref


def qkv_weight_grad(name: str, m: torch.nn.Module) -> torch.Tensor:
    """Gradient of the query/key/value weights in the reference's layout: [W_query; W_key; W_value],
    (3 * d_out, d_in)."""
    if name in ("ch03", "flash", "attnlab"):
        return torch.cat([m.W_query.weight.grad, m.W_key.weight.grad, m.W_value.weight.grad])
    if name == "ch03_wrapper":
        return torch.cat([
            torch.cat([getattr(h, w).weight.grad for h in m.heads]) for w in ("W_query", "W_key", "W_value")
        ])
    if name == "einsum":
        return torch.cat([m.W_query.grad.T, m.W_key.grad.T, m.W_value.grad.T])
    if name in NEEDS_SQUARE:
        return m.attn.in_proj_weight.grad
    return m.qkv.weight.grad  # combined_qkv, sdpa, sdpa_no_flash, flex


def out_proj_weight_grad(name: str, m: torch.nn.Module) -> torch.Tensor:
    return m.attn.out_proj.weight.grad if name in NEEDS_SQUARE else m.out_proj.weight.grad


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


def test_registry_has_the_required_names():
    assert REQUIRED <= set(VARIANTS)
    assert V.variant_names() == list(VARIANTS)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_same_constructor_in_the_same_order(name):
    params = list(inspect.signature(VARIANTS[name]).parameters.values())
    assert [p.name for p in params] == ["d_in", "d_out", "context_length", "dropout", "num_heads", "qkv_bias"]
    assert params[-1].default is False


# --------------------------------------------------------------------------------------------------
# Equivalence with the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "qkv_bias"])
@pytest.mark.parametrize("num_tokens", [1, 3, 97, 257])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_same_function_as_reference(name, num_tokens, bias):
    d_in, d_out, heads = 12, 12, 3
    ref = reference(d_in, d_out, heads, bias)
    variant = from_reference(name, ref)
    torch.manual_seed(1)
    x = torch.randn(2, num_tokens, d_in)
    grad_out = torch.randn(2, num_tokens, d_out)

    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    y_ref.backward(grad_out)

    if name == "flex" and flex_backward_unavailable(x.device):
        with torch.no_grad():
            y = variant(x)
        assert y.shape == (2, num_tokens, d_out)
        assert rel_err(y, y_ref.detach()) <= out_tol(d_in, d_out, num_tokens)
        with pytest.raises(VariantUnavailableError, match="no backward pass on CPU"):
            variant(x.clone().requires_grad_(True))
        return

    x_var = x.clone().requires_grad_(True)
    y = variant(x_var)
    y.backward(grad_out)
    assert y.shape == (2, num_tokens, d_out)
    assert rel_err(y, y_ref) <= out_tol(d_in, d_out, num_tokens)
    assert rel_err(x_var.grad, x_ref.grad) <= grad_tol(d_in, d_out, 2, num_tokens)
    ref_qkv = torch.cat([ref.W_query.weight.grad, ref.W_key.weight.grad, ref.W_value.weight.grad])
    assert rel_err(qkv_weight_grad(name, variant), ref_qkv) <= grad_tol(d_in, d_out, 2, num_tokens)
    assert rel_err(out_proj_weight_grad(name, variant), ref.out_proj.weight.grad) <= grad_tol(d_in, d_out, 2, num_tokens)


@pytest.mark.parametrize("name", sorted(set(VARIANTS) - NEEDS_SQUARE))
def test_odd_widths_and_heads(name):
    ref = reference(7, 15, 5, True, seed=3)  # d_in 7, head_dim 3
    variant = from_reference(name, ref)
    x = torch.randn(3, 97, 7)
    with torch.no_grad():
        assert rel_err(variant(x), ref(x)) <= out_tol(7, 15, 97)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_float64_and_modes_follow_the_reference(name):
    ref = reference(12, 12, 3, False).double().eval()
    variant = from_reference(name, ref)
    assert not variant.training
    assert all(p.dtype == torch.float64 for p in variant.parameters())
    x = torch.randn(1, 5, 12, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(variant(x), ref(x)) <= out_tol(12, 12, 5, torch.float64)


def test_fresh_variants_have_independent_parameters():
    torch.manual_seed(0)
    for name, cls in VARIANTS.items():
        m = cls(8, 8, 16, 0.0, 2)
        assert sum(p.numel() for p in m.parameters()) == 4 * 8 * 8 + 8, name  # 3 projections + out_proj


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize(
    "args, match",
    [
        ((12, 12, 16, 0.0, 5), "divisible by num_heads"),
        ((12, 12, 16, 0.0, 0), "num_heads must be a positive int"),
        ((12, 12, 16, 1.5, 3), "dropout must be a float in"),
        ((0, 12, 16, 0.0, 3), "d_in must be a positive int"),
        ((12, 12, 0, 0.0, 3), "context_length must be a positive int"),
    ],
)
def test_constructor_errors(name, args, match):
    with pytest.raises(ValueError, match=match):
        VARIANTS[name](*args)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_input_longer_than_context_is_an_error(name):
    m = VARIANTS[name](8, 8, 4, 0.0, 2)
    with pytest.raises(ValueError, match="context_length"), torch.no_grad():
        m(torch.randn(1, 5, 8))


@pytest.mark.parametrize("name", sorted(NEEDS_SQUARE))
def test_torch_mha_needs_square_projection(name):
    with pytest.raises(ValueError, match="d_in == d_out"):
        VARIANTS[name](6, 12, 16, 0.0, 3)


def test_flex_rejects_dropout():
    with pytest.raises(ValueError, match="dropout"):
        VARIANTS["flex"](8, 8, 16, 0.1, 2)


def test_from_reference_errors():
    ref = reference(8, 8, 2, False)
    with pytest.raises(ValueError, match="unknown variant 'nope'; valid names: ch03_wrapper"):
        from_reference("nope", ref)
    with pytest.raises(TypeError, match="attnlab.MultiHeadAttention"):
        from_reference("sdpa", torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="causal=True"):
        from_reference("sdpa", MultiHeadAttention(8, 8, 16, 0.0, 2, causal=False))


# --------------------------------------------------------------------------------------------------
# Unavailable variants say so, never fall back
# --------------------------------------------------------------------------------------------------


def test_flex_unavailable_is_an_error_with_the_reason(monkeypatch):
    monkeypatch.setattr(V, "_flex_unavailable_reason", lambda: "simulated: this torch has no FlexAttention")
    with pytest.raises(VariantUnavailableError) as info:
        VARIANTS["flex"](8, 8, 16, 0.0, 2)
    assert str(info.value) == "variant 'flex' is unavailable: simulated: this torch has no FlexAttention"
    with pytest.raises(VariantUnavailableError, match="unavailable"):
        from_reference("flex", reference(8, 8, 2, False))


def test_flash_unavailable_is_an_error_with_the_reason(monkeypatch):
    monkeypatch.setattr(V, "_flash_unavailable_reason", lambda: "simulated: kernel missing")
    with pytest.raises(VariantUnavailableError, match="variant 'flash' is unavailable: simulated: kernel missing"):
        VARIANTS["flash"](8, 8, 16, 0.0, 2)


def test_flex_backward_on_cpu_is_reported_not_replaced():
    m = VARIANTS["flex"](8, 8, 16, 0.0, 2)
    x = torch.randn(1, 4, 8)
    if flex_backward_unavailable(x.device):
        with pytest.raises(VariantUnavailableError, match="variant 'flex' is unavailable for training"):
            m(x)
    with torch.no_grad():
        assert m(x).shape == (1, 4, 8)


def test_real_capability_checks_report_available_here():
    assert V._flash_unavailable_reason() is None
    assert V._flex_unavailable_reason() is None  # torch 2.13 ships FlexAttention
    assert V._flex_backward_unavailable_reason(torch.device("cuda")) is None
    assert "CPU" in V._flex_backward_unavailable_reason(torch.device("cpu"))
