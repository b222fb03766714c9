"""The suite's one tolerance policy: a float comparison's bound comes from the dtype and the reductions.

Why: which SIMD kernel PyTorch picks (``ATEN_CPU_CAPABILITY``: default / avx2 / avx512), how many threads
it uses and how it blocks a matmul change the order of float additions, so float32 results differ between
machines by a few units in the last place per term summed. A bare ``atol=1e-6`` passes on one CPU and
fails on another; a bound derived from the arithmetic holds on all of them.

The formula (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1): a sum or dot product of
``n`` terms computed in floating point with unit roundoff ``u = eps / 2`` is within ``gamma_n * sum|x_i|``
of the exact value, ``gamma_n = n u / (1 - n u) ≈ n u``, whatever the order of the additions. Two
implementations (ours and a reference, or one kernel on two machines) are each within that bound of the
exact value, so they differ by at most ``2 n u = n eps`` relative to the size of the terms. Each further
elementwise step (scale, exp, subtract the max, divide by the row sum) adds at most a few ``u``; ``ops``
counts them (8 by default: the softmax chain plus the scaling). Hence::

    rel_tol(dtype, n, ops) = (n + ops) * eps(dtype)

and a comparison of values whose terms are of size ``scale`` (e.g. the largest |x|·|w| product, or
simply the magnitude of the result when the terms do not cancel) uses
``rtol = rel_tol`` and ``atol = rel_tol * scale``.

``n`` is the length of the longest reduction that feeds the compared number: ``d_in`` for a projection,
``d_k`` for a score, ``T_k`` for a context vector (softmax sum and weighted sum), the product of the
chained reductions' lengths is *not* needed: errors of chained steps add (first order), so pass the sum
of the lengths (e.g. ``d_in + d_k + T_k`` for a whole attention layer).

What ``scale`` is, per compared quantity (the bound is on ``sum |terms|``, so pass the size of the terms):

* a projection ``x @ W`` or a score ``q . k``: the largest ``sum_i |x_i w_i|`` (``|x| @ |W|``), or the largest
  |result| when the terms are all of one sign;
* attention weights: a change ``ds`` in the scores moves ``softmax`` by at most ``2 max|ds|`` (and by
  ``w_j * 2 max|ds|`` per weight), so the scale of a weight comparison is the largest |score| term sum, times
  the softmax scale -- at least 1;
* a context vector ``sum_j w_j v_j`` with ``w >= 0, sum w = 1``: ``max |v|`` (the default ``max|expected|``
  is that or less, so pass it when the context cancels).

``attention_scale(q, k, v)`` computes the last two from the inputs (|q| |k| * softmax scale, times max|v|).
The suite is checked under every kernel and thread count: ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` with
``ATTNLAB_TEST_THREADS=1|2|4`` (tests/conftest.py); ``make test-matrix`` runs a fast subset.

A comparison against a float64 reference of a float32 result uses the float32 bound (the reference's own
error is 2^-29 times smaller). Half precision (float16 / bfloat16) on CPU accumulates in float32 and rounds
the result once: compare with ``rel_tol(half, n=0, ops=...)`` counting one rounding per half-precision
input and output (plus ``rel_tol(float32, n)`` for the float32 accumulation, which is far smaller).

A number printed with ``d`` decimals (the book's tables) is the exact value rounded once: it is within
``0.5 * 10^-d`` of the exact value, so the comparison is ``printed_atol(d, ...)`` = that plus our own float
bound. An exact comparison (``torch.equal``) is right only where the two sides do
the same operations in the same order on the same kernel (a copy, a cache write, the same function called
twice); such a test says so in a comment.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_OPS", "eps", "rel_tol", "tols", "abs_tol", "printed_atol", "attention_scale", "assert_close"]

# Elementwise steps after the longest reduction: scaling, max-subtraction, exp, sum, division, masking,
# plus slack for libm's exp (within 1 ulp on every x86 / ARM libm torch ships).
DEFAULT_OPS = 8


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (float16 2^-10, bfloat16 2^-7, float32 2^-23, float64 2^-52)."""
    return float(torch.finfo(dtype).eps)


def rel_tol(dtype: torch.dtype, n: int = 1, ops: int = DEFAULT_OPS) -> float:
    """``(n + ops) * eps(dtype)``: the relative bound between two computations of a result whose longest
    reduction has ``n`` terms followed by ``ops`` elementwise steps (see the module docstring)."""
    if n < 0 or ops < 0:
        raise ValueError(f"n and ops must be >= 0, got n={n}, ops={ops}")
    return (n + ops) * eps(dtype)


def tols(dtype: torch.dtype, n: int = 1, *, ops: int = DEFAULT_OPS, scale: float = 1.0) -> dict[str, float]:
    """``{"rtol": ..., "atol": ...}`` for ``torch.testing.assert_close`` / ``numpy.testing.assert_allclose``:
    ``rtol = rel_tol(dtype, n, ops)``, ``atol = rtol * scale``."""
    r = rel_tol(dtype, n, ops)
    return {"rtol": r, "atol": r * _check_scale(scale)}


def abs_tol(dtype: torch.dtype, n: int = 1, *, ops: int = DEFAULT_OPS, scale: float = 1.0) -> float:
    """The absolute bound ``rel_tol(dtype, n, ops) * scale``, for ``max|a - b| <= abs_tol(...)`` checks."""
    return rel_tol(dtype, n, ops) * _check_scale(scale)


def printed_atol(
    decimals: int, dtype: torch.dtype = torch.float32, n: int = 1, *, ops: int = DEFAULT_OPS, scale: float = 1.0
) -> float:
    """Absolute bound against a number printed with ``decimals`` decimals (the book's 4-decimal tables):
    half a unit of the last printed place (the printed number is the exact one rounded once) plus our own
    float bound ``abs_tol(dtype, n, ops=ops, scale=scale)``."""
    if decimals < 0:
        raise ValueError(f"decimals must be >= 0, got {decimals}")
    return 0.5 * 10.0**-decimals + abs_tol(dtype, n, ops=ops, scale=scale)


def attention_scale(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> float:
    """The ``scale`` of an attention comparison (see the module docstring), from the inputs.

    A score's terms sum to at most ``|q_i| |k_j| * scale`` (Cauchy-Schwarz; ``scale`` defaults to
    ``1 / sqrt(d_k)``), plus ``max|bias|`` for an additive float mask (its finite part): that, at least 1,
    is the scale of the scores and of the attention weights. With ``v`` it is multiplied by ``max(1, max|v|)``:
    the scale of a context vector / attention output. Shapes need not match (GQA, caches): only norms are read.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] else 1.0
    norms = [float(t.detach().double().norm(dim=-1).max()) if t.numel() else 0.0 for t in (q, k)]
    s = norms[0] * norms[1] * abs(float(scale))
    if bias is not None and bias.is_floating_point() and bias.numel():
        finite = bias.detach()[torch.isfinite(bias.detach())]
        s += float(finite.abs().max()) if finite.numel() else 0.0
    out = max(1.0, s)
    if v is not None and v.numel():
        out *= max(1.0, float(v.detach().abs().max()))
    return out


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not scale >= 0 or scale == float("inf"):  # also rejects NaN
        raise ValueError(f"scale must be a finite number >= 0, got {scale}")
    return scale


def assert_close(
    actual: object,
    expected: object,
    *,
    n: int = 1,
    dtype: torch.dtype | None = None,
    ops: int = DEFAULT_OPS,
    scale: float | None = None,
    equal_nan: bool = False,
    msg: str | None = None,
) -> None:
    """``torch.testing.assert_close`` with the policy's bound.

    ``actual`` / ``expected``: tensors, NumPy arrays, lists or numbers (a shape mismatch fails).
    ``dtype`` is the precision the *less precise* side was computed in (default: the lower of the two
    tensors' float dtypes; float64 when neither is a float tensor); ``scale`` the size of the summed terms
    (default: max(1, max|expected|) over the finite values).
    The two sides may have different float dtypes: both are compared in float64.
    """
    actual = torch.as_tensor(actual).detach()
    expected = torch.as_tensor(expected).detach()
    if dtype is None:
        dtypes = [t.dtype for t in (actual, expected) if t.is_floating_point()]
        dtype = max(dtypes, key=eps) if dtypes else torch.float64  # the less precise side
    if scale is None:
        finite = expected[torch.isfinite(expected)] if expected.is_floating_point() else expected
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    kwargs = tols(dtype, n, ops=ops, scale=scale)
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected.to(torch.float64),
        rtol=kwargs["rtol"],
        atol=kwargs["atol"],
        equal_nan=equal_nan,
        msg=msg,
    )
