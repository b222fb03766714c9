"""attnlab.backends: one signature, a table of implementations that compute the same function."""

from __future__ import annotations

import pytest
import torch

from attnlab import backends
from attnlab import functional as F


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
    for name in ("eager", "torch", "flash", "auto"):
        out = backends.attention(q, k, v, mask=mask, causal=causal, backend=name)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"backend {name}")


def test_auto_picks_eager_when_it_must():
    m = torch.zeros(4, 4)
    kw = {"causal": False, "t_q": 4, "t_k": 4, "dropout_p": 0.0, "training": True, "need_weights": False}
    assert backends.resolve("auto", mask=None, **kw) == "torch"
    assert backends.resolve("auto", mask=None, **{**kw, "need_weights": True}) == "eager"
    assert backends.resolve("auto", mask=None, **{**kw, "dropout_p": 0.1}) == "eager"
    assert backends.resolve("auto", mask=None, **{**kw, "dropout_p": 0.1, "training": False}) == "torch"
    empty_row = torch.ones(4, 4, dtype=torch.bool)
    empty_row[2] = False
    assert backends.resolve("auto", mask=empty_row, **kw) == "eager"
    # A float mask whose only allowed key of row 0 is removed by the causal mask: row 0 is empty.
    float_mask = m.clone()
    float_mask[0, 0] = float("-inf")
    assert backends.resolve("auto", mask=float_mask, **{**kw, "causal": True}) == "eager"
    assert backends.resolve("auto", mask=float_mask, **kw) == "torch"


def test_auto_gives_zeros_for_an_empty_row_of_a_float_mask_under_causal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 3, requires_grad=True) for _ in range(3))
    float_mask = torch.zeros(4, 4)
    float_mask[0, 0] = float("-inf")
    out = backends.attention(q, k, v, mask=float_mask, causal=True)
    assert torch.equal(out[0, 0], torch.zeros(3))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_errors():
    q = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'eager', 'torch', 'flash'\], got 'cuda'"):
        backends.attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match=r"the flash backend takes a key padding mask of shape \(batch, 1, 1, num_keys\) only"):
        backends.attention(q, q, q, mask=torch.ones(2, 2, dtype=torch.bool), backend="flash")
