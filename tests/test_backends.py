"""attnlab.backends: one signature, a table of implementations that compute the same function."""

from __future__ import annotations

import pytest
import torch

from attnlab import backends, testing
from attnlab import functional as F
from attnlab.masks import window_mask
from tolerances import assert_close, attention_scale

BACKEND_NAMES = ("eager", "torch", "flash", "auto")
SMALL = ((1, 1), (3, 3), (5, 9), (9, 5), (4, 0))  # (T_q, T_k)  # harness sizes kept small for the test suite's time


def auto(q, k, v, **kw):
    return backends.attention(q, k, v, backend="auto", **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t_q,t_k", [(1, 1), (3, 3), (5, 9), (97, 97)])
def test_backends_equal_the_eager_reference(causal, t_q, t_k):
    torch.manual_seed(t_q * 100 + t_k)
    q = torch.randn(2, 3, t_q, 8)
    k = torch.randn(2, 3, t_k, 8)
    v = torch.randn(2, 3, t_k, 5)
    pad = torch.rand(2, t_k) < 0.2
    pad[:, -1] = False  # every query keeps its last key
    mask = (~pad)[:, None, None, :]  # (B, 1, 1, T_k), True = may attend
    ref = F.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal)
    for name in BACKEND_NAMES:
        out = backends.attention(q, k, v, mask=mask, causal=causal, backend=name)
        assert_close(out, ref, n=8 + t_k, scale=attention_scale(q, k, v), msg=f"backend {name}")  # d, T_k


# -- the equality harness on every backend: masks, causal, window, grouped-query, gradients -----------


@pytest.mark.parametrize("name", ["eager", "torch"])
def test_harness_passes_for_eager_and_torch(name):
    assert testing.assert_same_function(name, sizes=SMALL) > 100


def test_harness_passes_for_auto():
    assert testing.assert_same_function(auto, sizes=SMALL) > 100


def test_harness_passes_for_flash_with_the_masks_it_takes():
    # Needs flash_attention's window= and grouped-query k/v (issue 11, kernel helper).
    n = testing.assert_same_function("flash", sizes=SMALL, masks=("none", "padding", "padding_broadcast"))
    assert n > 50


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["eager", "torch"])
def test_harness_low_precision_within_twice_plain_math(name, dtype):
    n = testing.assert_same_function(name, dtype=dtype, sizes=((9, 5), (33, 33)), grad=False, gqa=False)
    assert n > 10


def test_harness_catches_a_wrong_function():
    def top_left_causal(q, k, v, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0,
                        training=True):
        k, v = (F.repeat_kv(t, F.kv_groups(q, t)) for t in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    with pytest.raises(AssertionError, match=r"T_q=5, T_k=9, .*causal=True.* differs from the float64 reference"):
        testing.assert_same_function(top_left_causal, sizes=((5, 9),), masks=("none",), gqa=False, window=False)

    def no_grad_fn(q, k, v, **kw):
        return backends.attention(q, k, v, backend="eager", **kw).detach()

    with pytest.raises(AssertionError, match=r"the output has no gradient"):
        testing.assert_same_function(no_grad_fn, sizes=((3, 3),), masks=("none",), causal=False, window=False)


# -- register: a user's backend, checked by the harness, usable everywhere ---------------------------


def test_register_a_custom_backend_and_use_it_in_the_module():
    calls = []

    def blocked(q, k, v, *, mask=None, causal=False, window=None, scale=None, dropout_p=0.0, training=True):
        calls.append(1)
        return backends.BACKENDS["torch"](
            q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout_p=dropout_p, training=training
        )

    backends.register("mine", blocked)
    try:
        assert testing.assert_same_function("mine", sizes=((3, 3), (5, 9))) > 20
        from attnlab import MultiHeadAttention

        torch.manual_seed(0)
        m = MultiHeadAttention(6, 6, 8, 0.0, 2, backend="mine")
        ref = MultiHeadAttention(6, 6, 8, 0.0, 2, backend="eager")
        ref.load_state_dict(m.state_dict())
        x = torch.randn(2, 5, 6)
        n = len(calls)
        assert_close(m(x), ref(x), n=6 + 3 + 5 + 6)  # d_in, head dim, T, out_proj
        assert len(calls) == n + 1
        with pytest.raises(ValueError, match=r"already registered; pass replace=True"):
            backends.register("mine", blocked)
        backends.register("mine", blocked, replace=True)
    finally:
        backends.unregister("mine")
    assert "mine" not in backends.BACKENDS


def test_register_errors():
    with pytest.raises(ValueError, match=r"'torch' is a built-in backend and cannot be replaced"):
        backends.register("torch", lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"name must be a non-empty str other than 'auto', got 'auto'"):
        backends.register("auto", lambda *a, **k: None)
    with pytest.raises(TypeError, match=r"fn must be callable, got int"):
        backends.register("x", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no backend named 'nope' is registered"):
        backends.unregister("nope")


# -- auto: the choice, and the facts about torch's kernel it rests on (checked, not assumed) ----------


def test_auto_resolves_by_arguments_and_device_only():
    assert backends.resolve("auto") == "torch"
    assert backends.resolve("auto", need_weights=True) == "eager"
    assert backends.resolve("auto", dropout_p=0.1, training=False) == "torch"
    assert backends.resolve("auto", dropout_p=0.1, device="cpu") == "torch"  # CPU: draws like nn.Dropout
    assert backends.resolve("auto", dropout_p=0.1, device="cuda") == "eager"  # fused kernels draw their own
    assert backends.resolve("torch", dropout_p=0.1, device="cuda") == "torch"  # the explicit choice
    with pytest.raises(ValueError, match=r"need_weights=True needs backend='eager' or 'auto', got 'torch'"):
        backends.resolve("torch", need_weights=True)


@pytest.mark.parametrize("shape_q,shape_k", [((2, 3, 37, 16), (2, 3, 37, 16)), ((2, 4, 5, 8), (2, 2, 9, 8))])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_sdpa_on_cpu_draws_dropout_exactly_like_nn_dropout(shape_q, shape_k, causal):
    """The fact behind SDPA_DROPOUT_LIKE_NN_DROPOUT: on CPU, torch's scaled_dot_product_attention with
    dropout gives bit-for-bit the eager reference's numbers (dropout through nn.Dropout's draws) for the
    same seed, and leaves the global generator in the same state."""
    assert "cpu" in backends.SDPA_DROPOUT_LIKE_NN_DROPOUT
    torch.manual_seed(0)
    q, k, v = torch.randn(shape_q), torch.randn(shape_k), torch.randn(shape_k)
    pad = torch.rand(shape_q[0], 1, 1, shape_k[2]) > 0.2  # (B, 1, 1, T_k)
    torch.manual_seed(7)
    ref = F.scaled_dot_product_attention(q, k, v, mask=pad, causal=causal, dropout_p=0.3)
    after_ref = torch.rand(3)
    torch.manual_seed(7)
    out = backends.attention(q, k, v, mask=pad, causal=causal, dropout_p=0.3, backend="torch")
    after_out = torch.rand(3)
    n, terms = q.shape[-1] + k.shape[-2], attention_scale(q, k, v) / (1 - 0.3)  # d, T_k; dropout scales up
    assert_close(out, ref, n=n, scale=terms)
    assert torch.equal(after_ref, after_out)  # exact: the same generator state gives the same draws
    torch.manual_seed(7)
    assert backends.resolve("auto", dropout_p=0.3, device=q.device) == "torch"
    assert_close(backends.attention(q, k, v, mask=pad, causal=causal, dropout_p=0.3), ref, n=n, scale=terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("float_mask", [False, True])
def test_torch_sdpa_on_cpu_gives_zeros_for_fully_masked_rows(dtype, float_mask):
    """The fact behind SDPA_ZEROS_FOR_EMPTY_ROWS (torch 2.13 CPU): zeros and finite gradients, as the
    reference, so auto needs no host-syncing check for such rows."""
    assert "cpu" in backends.SDPA_ZEROS_FOR_EMPTY_ROWS
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    allowed = torch.rand(2, 2, 5, 5) > 0.3
    allowed[:, :, 1] = False  # row 1 has no key
    allowed[:, :, 0, 0] = True
    mask = F.mask_before_softmax(torch.zeros(allowed.shape, dtype=dtype), allowed) if float_mask else allowed
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))  # exact: what is checked is the 0 itself
    ref = F.scaled_dot_product_attention(q, k, v, mask=mask)
    if dtype == torch.float32:
        assert_close(out, ref, n=8 + 5, scale=attention_scale(q, k, v))  # d, T_k
    else:  # both do float32 math; torch rounds the weights and the output to dtype, the reference the output
        assert_close(out, ref, n=0, ops=2, dtype=dtype, scale=float(v.detach().abs().max()))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))  # exact: nothing flows back


def test_torch_backend_guard_for_kernels_that_give_nan_on_empty_rows(monkeypatch):
    """Off CPU the torch backend lets empty rows attend every key and zeroes them after; the same code
    run on CPU (by pretending CPU's kernel gave NaN) is exact, in values and gradients."""
    monkeypatch.setattr(backends, "SDPA_ZEROS_FOR_EMPTY_ROWS", frozenset())
    assert testing.assert_same_function("torch", sizes=((3, 3), (5, 9), (9, 5)), gqa=False) > 20


def test_no_host_sync_or_value_branch_in_auto_for_masks():
    """auto decides from arguments, not values: a mask whose rows are all empty gives zeros on the
    torch path (no check of the mask's values first)."""
    q = k = v = torch.randn(1, 1, 4, 3)
    out = backends.attention(q, k, v, mask=torch.zeros(1, 1, 1, 4, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))  # exact: no keys gives 0 by definition


# -- window and grouped-query attention on every backend -----------------------------------------------


@pytest.mark.parametrize("name", BACKEND_NAMES)
@pytest.mark.parametrize("h_kv", [4, 2, 1])
def test_window_and_grouped_query_equal_the_explicit_reference(name, h_kv):
    """Window w = the window_mask, grouped-query = repeat_interleave of the key/value heads (the book's
    GQA bonus), on every backend (flash needs the kernel's window/GQA arguments, issue 11)."""
    torch.manual_seed(h_kv)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    k = torch.randn(2, h_kv, 9, 8, dtype=torch.float64)
    v = torch.randn(2, h_kv, 9, 8, dtype=torch.float64)
    rep = 4 // h_kv
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T_k, d)
    scores = q @ kk.transpose(-2, -1) / 8**0.5
    scores = scores.masked_fill(~window_mask(6, 9, window=3), float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ vv
    out = backends.attention(q, k, v, window=3, backend=name)
    assert_close(out, expected, n=8 + 9, scale=attention_scale(q, k, v))  # d, T_k


# -- the flash adapter: every broadcast padding mask, and what it refuses ------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 1, 7), (1, 1, 1, 7), (2, 1, 1, 1), (1, 7), (1, 1, 1, 1)])
def test_flash_takes_every_broadcast_padding_mask(shape):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(shape) > 0.3
    mask.view(-1)[0] = True
    ref = F.scaled_dot_product_attention(q, k, v, mask=mask)
    for name in BACKEND_NAMES:
        assert_close(backends.attention(q, k, v, mask=mask, backend=name), ref, n=8 + 7, scale=attention_scale(q, k, v),
                     msg=name)


def test_flash_says_what_masks_it_takes():
    q = torch.randn(2, 3, 4, 8)
    what = r"the flash backend takes a bool mask that only says which keys each batch element may attend"
    with pytest.raises(ValueError, match=what + r".*got a mask of shape \(4, 4\).*varies over heads or queries"):
        backends.attention(q, q, q, mask=torch.ones(4, 4, dtype=torch.bool), backend="flash")
    with pytest.raises(ValueError, match=what + r".*got a torch.float32 mask of shape \(2, 1, 1, 4\)"):
        backends.attention(q, q, q, mask=torch.zeros(2, 1, 1, 4), backend="flash")
    with pytest.raises(ValueError, match=r"got a mask of shape \(2, 3, 1, 4\).*varies over heads"):
        backends.attention(q, q, q, mask=torch.ones(2, 3, 1, 4, dtype=torch.bool), backend="flash")


# -- edge cases: empty inputs, rank checks -------------------------------------------------------------


@pytest.mark.parametrize("name", BACKEND_NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_no_keys_or_no_queries_give_what_torch_math_gives(name, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for q_shape, kv_shape in (((2, 3, 5, 8), (2, 3, 0, 8)), ((2, 3, 0, 8), (2, 3, 4, 8)), ((2, 3, 0, 8),) * 2):
        q = torch.randn(q_shape, requires_grad=True)
        k, v = (torch.randn(kv_shape, requires_grad=True) for _ in range(2))
        with sdpa_kernel(SDPBackend.MATH):
            expected = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
        out = backends.attention(q, k, v, causal=causal, backend=name)
        assert out.shape == expected.shape
        assert torch.equal(out, expected)  # exact: empty, or no keys (0 by definition)
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_errors():
    q = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'eager', 'torch', 'flash'.*\], got 'cuda'"):
        backends.attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match=r"q must have at least 2 dimensions \(\.\.\., num_tokens, d\).*got shape \(3,\)"):
        backends.attention(torch.randn(3), q, q)
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got list"):
        backends.attention(q, [1.0], q)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"causal must be a bool, got int \(1\)"):
        backends.attention(q, q, q, causal=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"window must be None or an int >= 1, got 0"):
        backends.attention(q, q, q, window=0)
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\), got 1.0"):
        backends.attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"must be a multiple of the number of key/value heads.*got 4 query heads"):
        backends.attention(torch.randn(1, 4, 3, 2), torch.randn(1, 3, 3, 2), torch.randn(1, 3, 3, 2), backend="torch")
    with pytest.raises(ValueError, match=r"mask must broadcast to \(\.\.\., 2, 2\)"):
        backends.attention(q, q, q, mask=torch.ones(3, 3, dtype=torch.bool), backend="torch")
