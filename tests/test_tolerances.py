"""The tolerance policy (tests/tolerances.py) is neither too tight nor vacuous.

Too tight would mean a correct float32 computation done in another order (another SIMD kernel, thread
count or blocking) fails; vacuous would mean a real error passes. Both are checked on the operation the
policy is about: a reduction of n terms, here a matmul with inner length n, summed in three orders.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from attnlab import functional as F
from tolerances import DEFAULT_OPS, abs_tol, assert_close, eps, printed_atol, rel_tol, tols

SIZES = [1, 3, 97, 257, 1023]


def _operands(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, n, generator=g), torch.randn(n, 7, generator=g)  # (5, n) @ (n, 7)


def _blocked(a: torch.Tensor, b: torch.Tensor, block: int) -> torch.Tensor:
    """float32 sum of per-block matmuls: another order of the same additions."""
    out = torch.zeros(a.shape[0], b.shape[1])  # (5, 7)
    for s in range(0, a.shape[1], block):
        out = out + a[:, s : s + block] @ b[s : s + block]
    return out


def _sequential(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 one term at a time, last index first: the order farthest from a SIMD tree sum."""
    out = torch.zeros(a.shape[0], b.shape[1])  # (5, 7)
    for i in reversed(range(a.shape[1])):
        out = out + a[:, i : i + 1] * b[i : i + 1]  # (5, 1) * (1, 7) -> (5, 7)
    return out


def test_formula():
    assert eps(torch.float32) == 2.0**-23 and eps(torch.float64) == 2.0**-52
    assert eps(torch.float16) == 2.0**-10 and eps(torch.bfloat16) == 2.0**-7
    assert rel_tol(torch.float32, 100) == (100 + DEFAULT_OPS) * 2.0**-23
    assert rel_tol(torch.float64, 5, ops=0) == 5 * 2.0**-52
    assert tols(torch.float32, 10, scale=4.0) == {"rtol": rel_tol(torch.float32, 10),
                                                  "atol": 4.0 * rel_tol(torch.float32, 10)}
    assert abs_tol(torch.float32, 10, scale=4.0) == tols(torch.float32, 10, scale=4.0)["atol"]
    assert printed_atol(4, torch.float32, 3) == 0.5e-4 + rel_tol(torch.float32, 3)


@pytest.mark.parametrize("n", SIZES)
def test_not_too_tight_three_summation_orders(n):
    a, b = _operands(n, seed=n)
    scale = float((a.abs() @ b.abs()).max())  # sum |terms|: what the bound is relative to
    exact = a.double() @ b.double()
    orders = {"matmul": a @ b, "blocked": _blocked(a, b, block=7), "sequential": _sequential(a, b)}
    for name, got in orders.items():
        assert got.dtype == torch.float32
        assert_close(got, exact, n=n, scale=scale, msg=name)  # each order against the exact value
        assert_close(got, orders["matmul"], n=n, scale=scale, msg=name)  # and against each other
    torch.testing.assert_close(orders["blocked"], orders["sequential"], **tols(torch.float32, n, scale=scale))


@pytest.mark.parametrize("n", SIZES)
def test_not_vacuous_a_real_error_is_caught(n):
    a, b = _operands(n, seed=n)
    scale = float((a.abs() @ b.abs()).max())
    got = a @ b
    wrong = got.clone()
    wrong[2, 3] += 100 * eps(torch.float32) * n * scale  # 100 x eps x n: an error no reordering makes
    with pytest.raises(AssertionError):
        assert_close(wrong, a.double() @ b.double(), n=n, scale=scale)
    # and the bound stays far below the size of the values it compares
    assert abs_tol(torch.float32, n, scale=scale) < 1e-3 * scale


def test_attention_float32_against_float64_within_the_bound():
    """An attention layer chains reductions of d (scores) and T_k (softmax sum, weighted sum): n = d + T_k."""
    torch.manual_seed(0)
    t, d = 257, 16
    q, k, v = (torch.randn(2, t, d, dtype=torch.float64) for _ in range(3))
    ref, ref_w = F.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
    out, w = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), causal=True, return_weights=True)
    score_scale = float((q.abs() @ k.abs().transpose(-1, -2)).max()) / math.sqrt(d)
    assert_close(w, ref_w, n=d + t, scale=score_scale)
    assert_close(out, ref, n=d + t, scale=score_scale * float(v.abs().max()))
    bad = out.clone()
    bad[0, 100, 3] += 0.01  # a wrong context vector element
    with pytest.raises(AssertionError):
        assert_close(bad, ref, n=d + t, scale=score_scale * float(v.abs().max()))


def test_printed_precision():
    x = torch.tensor([0.95443, 1.49497, 0.00004])  # values the book prints as 0.9544, 1.4950, 0.0000
    torch.testing.assert_close(x.double(), torch.tensor([0.9544, 1.4950, 0.0], dtype=torch.float64),
                               atol=printed_atol(4, torch.float32, 1), rtol=0)
    with pytest.raises(AssertionError):  # a whole unit of the last printed place off is caught
        torch.testing.assert_close(x.double(), torch.tensor([0.9545, 1.4950, 0.0], dtype=torch.float64) + 1e-4,
                                   atol=printed_atol(4, torch.float32, 1), rtol=0)


def test_numpy_lists_nan_and_mixed_dtypes():
    import numpy as np

    assert_close(np.array([1.0, 2.0], dtype=np.float32), [1.0, 2.0])
    assert_close(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]), equal_nan=True)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    with pytest.raises(AssertionError):  # a shape mismatch is a failure, not a broadcast
        assert_close(torch.ones(2, 3), torch.ones(3))
    # mixed float32 / float64: the float32 bound applies (the less precise side)
    x = torch.tensor([1.0 + 2.0**-20], dtype=torch.float64)
    assert_close(x.float(), x)
    with pytest.raises(AssertionError):
        assert_close(x + 1e-3, x)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n": -1}, "n and ops must be >= 0, got n=-1"),
    ({"n": 1, "ops": -2}, "got n=1, ops=-2"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rel_tol(torch.float32, **kwargs)


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_bad_scale_raises_value_error(scale):
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        tols(torch.float32, 3, scale=scale)


def test_thread_setting_from_the_environment_is_applied(monkeypatch):
    """tests/conftest.py applies ATTNLAB_TEST_THREADS (the thread axis of the matrix) and refuses a bad value."""
    import conftest

    before = torch.get_num_threads()
    raw = os.environ.get("ATTNLAB_TEST_THREADS")
    if raw:  # a matrix run: the setting is in force for the whole session
        assert before == int(raw)
    try:
        for n in (1, 3):
            monkeypatch.setenv("ATTNLAB_TEST_THREADS", str(n))
            conftest.pytest_configure(None)
            assert torch.get_num_threads() == n
        monkeypatch.setenv("ATTNLAB_TEST_THREADS", "zero")
        with pytest.raises(pytest.UsageError, match="ATTNLAB_TEST_THREADS must be a positive integer, got 'zero'"):
            conftest.pytest_configure(None)
    finally:
        torch.set_num_threads(before)
