"""Tests for attnlab.flash: tiled online-softmax attention against torch's float64 reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.flash import count_tiles, flash_attention, tile_plan
from tolerances import abs_tol, assert_close, tols

SMALL_BLOCKS = {"block_q": 16, "block_k": 32}
DEFAULT_BLOCKS: dict[str, int] = {}


# --------------------------------------------------------------------------------------------------
# Reference: torch SDPA in float64 with an explicit boolean mask
# --------------------------------------------------------------------------------------------------


def allowed_mask(t_q, t_k, lead, causal, key_padding_mask=None):
    """Bool (..., T_q, T_k): True where query i may attend key j."""
    allowed = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(diagonal=t_k - t_q)  # bottom-right aligned
    allowed = allowed.expand(*lead, t_q, t_k)
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if kpm.dim() == 2 and len(lead) > 1:
            kpm = kpm.reshape(kpm.shape[0], *([1] * (len(lead) - 1)), kpm.shape[-1])
        allowed = allowed & ~kpm.unsqueeze(-2)
    return allowed


def reference(q, k, v, grad_out, *, causal=False, key_padding_mask=None, scale=None):
    """SDPA output and grads; rows without any allowed key are returned as zeros with no gradient.

    Torch gives NaN for such rows, so the reference lets them see every key (finite values) and
    zeroes both their output and their incoming gradient: they then contribute nothing to dk/dv.
    """
    lead = q.shape[:-2]
    allowed = allowed_mask(q.shape[-2], k.shape[-2], lead, causal, key_padding_mask)
    has_key = allowed.any(-1)  # (..., T_q)
    safe = allowed | ~has_key.unsqueeze(-1)
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
    out = out * has_key.unsqueeze(-1)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out.double())
    return out.detach(), dq, dk, dv, has_key


def run_flash(q, k, v, grad_out, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out.detach(), dq, dk, dv


def reduction_lengths(q, k, v):
    """(n for the output, n for the gradients) in tests/tolerances.py's bound: the output sums d (scores),
    then T_k (softmax sum, weighted sum); the backward adds d_v (dP = dO V^T, D = rowsum(dO * O)) and T_q
    (dK, dV sum over the queries)."""
    d, d_v, t_q, t_k = q.shape[-1], v.shape[-1], q.shape[-2], k.shape[-2]
    return d + t_k, d + d_v + t_q + t_k


def make_inputs(lead, t_q, t_k, d=16, d_v=12, dtype=torch.float64, seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(*lead, t_q, d, generator=g, dtype=torch.float64) * std).to(dtype)
    k = (torch.randn(*lead, t_k, d, generator=g, dtype=torch.float64) * std).to(dtype)
    v = torch.randn(*lead, t_k, d_v, generator=g, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(*lead, t_q, d_v, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, grad_out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Correctness does not depend on threads; one thread keeps the many small tiles fast on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LENGTHS = [(1, 1), (3, 3), (97, 97), (257, 257), (1000, 1000), (97, 257), (257, 97), (1, 97), (97, 1)]


@pytest.mark.parametrize("blocks", ["small", "default"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("t_q", "t_k"), LENGTHS)
def test_matches_float64_sdpa(t_q, t_k, causal, padded, blocks):
    """Small blocks: 16 x 32 tiles (64 x 128 at T = 1000, still 16 x 8 tiles, to keep the suite fast)."""
    if blocks == "small":
        blocks = SMALL_BLOCKS if max(t_q, t_k) < 1000 else {"block_q": 64, "block_k": 128}
    else:
        blocks = DEFAULT_BLOCKS
    lead = (2, 3)
    q, k, v, go = make_inputs(lead, t_q, t_k, seed=t_q * 7 + t_k)
    kpm = None
    if padded:
        kpm = torch.rand(2, t_k, generator=torch.Generator().manual_seed(1)) < 0.3
        kpm[1] = True  # batch element 1: every key is padding -> its rows are fully masked
    ref_out, ref_dq, ref_dk, ref_dv, has_key = reference(q, k, v, go, causal=causal, key_padding_mask=kpm)
    out, dq, dk, dv = run_flash(q, k, v, go, causal=causal, key_padding_mask=kpm, **blocks)

    assert out.shape == (*lead, t_q, 12) and out.dtype == torch.float64
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    # rows with at least one allowed key: equal to torch
    n_out, n_grad = reduction_lengths(q, k, v)  # float64 bounds
    assert_close(out[has_key], ref_out[has_key], n=n_out)
    assert_close(dq[has_key], ref_dq[has_key], n=n_grad)
    assert_close(dk, ref_dk, n=n_grad)
    assert_close(dv, ref_dv, n=n_grad)
    # rows with no allowed key: exactly zero output and zero gradient (exact: 0 by definition, not rounding)
    assert torch.equal(out[~has_key], torch.zeros_like(out[~has_key]))
    assert torch.equal(dq[~has_key], torch.zeros_like(dq[~has_key]))
    if padded:
        assert not has_key[1].any()
        assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    if causal and t_q > t_k:
        assert (~has_key).sum() > 0  # the first T_q - T_k rows see nothing


@settings(max_examples=25, deadline=None)
@given(
    t_q=st.integers(1, 70),
    t_k=st.integers(1, 70),
    block_q=st.integers(1, 40),
    block_k=st.integers(1, 40),
    causal=st.booleans(),
    per_head_mask=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_blocks(t_q, t_k, block_q, block_k, causal, per_head_mask, seed):
    lead = (2, 2)
    q, k, v, go = make_inputs(lead, t_q, t_k, d=8, d_v=5, seed=seed)
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, t_k) if per_head_mask else (2, t_k)
    kpm = torch.rand(shape, generator=g) < 0.4
    ref_out, ref_dq, ref_dk, ref_dv, has_key = reference(q, k, v, go, causal=causal, key_padding_mask=kpm)
    out, dq, dk, dv = run_flash(q, k, v, go, causal=causal, key_padding_mask=kpm,
                                block_q=block_q, block_k=block_k)
    n_out, n_grad = reduction_lengths(q, k, v)  # float64 bounds
    assert_close(out, ref_out, n=n_out)
    for got, want in ((dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
        assert_close(got, want, n=n_grad)
    assert torch.equal(out[~has_key], torch.zeros_like(out[~has_key]))  # exact: no keys gives 0 by definition


def test_custom_scale_and_no_leading_dims():
    q, k, v, go = make_inputs((), 37, 53, d=8, d_v=4, seed=3)  # plain (T, d) tensors
    ref_out, ref_dq, ref_dk, ref_dv, _ = reference(q, k, v, go, scale=0.37)
    out, dq, dk, dv = run_flash(q, k, v, go, scale=0.37, block_q=8, block_k=16)
    assert out.shape == (37, 4)
    n_out, n_grad = reduction_lengths(q, k, v)  # float64 bounds
    for got, want, n in ((out, ref_out, n_out), (dq, ref_dq, n_grad), (dk, ref_dk, n_grad), (dv, ref_dv, n_grad)):
        assert_close(got, want, n=n)


def test_padding_mask_broadcasts_over_three_leading_dims():
    lead = (2, 3, 2)
    q, k, v, go = make_inputs(lead, 20, 30, seed=5)
    kpm = torch.zeros(2, 30, dtype=torch.bool)
    kpm[0, 25:] = True
    kpm[1, :7] = True
    ref_out, *_ = reference(q, k, v, go, key_padding_mask=kpm)
    out = flash_attention(q, k, v, key_padding_mask=kpm, block_q=8, block_k=8)
    assert_close(out, ref_out, n=reduction_lengths(q, k, v)[0])
    full = kpm.reshape(2, 1, 1, 30).expand(*lead, 30)
    # exact: the broadcast mask and the expanded one select the same tiles, same operations in the same order
    assert torch.equal(flash_attention(q, k, v, key_padding_mask=full, block_q=8, block_k=8), out)


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_float32_close_to_float64(causal):
    q, k, v, go = make_inputs((2, 4), 300, 300, d=64, d_v=64, seed=11)
    ref_out, ref_dq, ref_dk, ref_dv, _ = reference(q, k, v, go, causal=causal)
    out, dq, dk, dv = run_flash(q.float(), k.float(), v.float(), go.float(), causal=causal)
    assert out.dtype == dq.dtype == torch.float32
    n_out, n_grad = reduction_lengths(q, k, v)  # float32 bounds (the float64 reference's error is negligible)
    assert_close(out, ref_out, n=n_out)
    for got, want in ((dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
        assert_close(got, want, n=n_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_with_huge_scores_stays_finite(dtype, causal):
    # q, k ~ N(0, 40^2), d = 64: scores ~ 40*40*sqrt(64)/8 = 1600 typical, thousands at the tails;
    # exp() of these would overflow any dtype without the running-max subtraction.
    q, k, v, go = make_inputs((1, 4), 200, 200, d=64, d_v=32, dtype=dtype, seed=13, std=40.0)
    scores = (q.double() @ k.double().transpose(-1, -2)) / 8.0
    assert scores.abs().max() > 2000
    ref_out, _, _, ref_dv, _ = reference(q, k, v, go, causal=causal)
    out, dq, dk, dv = run_flash(q, k, v, go, causal=causal, block_q=64, block_k=64)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == dtype
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    # Scores in the thousands make the weights one-hot, so the float32 math's error is relative to the size
    # of the result (n = d + T_k, or T_q for dv); then one rounding of the float32 result to dtype.
    n_out, _ = reduction_lengths(q, k, v)
    for got, want, n in ((out, ref_out, n_out), (dv, ref_dv, q.shape[-2])):
        size = max(1.0, float(want.abs().max()))
        bound = abs_tol(torch.float32, n, scale=size) + abs_tol(dtype, 0, ops=1, scale=size)
        torch.testing.assert_close(got.double(), want, rtol=tols(dtype, 0, ops=1)["rtol"], atol=bound)


# --------------------------------------------------------------------------------------------------
# Tiling: causal tiles above the diagonal are skipped
# --------------------------------------------------------------------------------------------------


def test_causal_skips_about_half_of_the_tiles():
    q, k, v, go = make_inputs((1, 2), 1024, 1024, d=8, d_v=8, dtype=torch.float32)
    counts = {}
    for causal in (False, True):
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        with count_tiles() as c:
            flash_attention(q_, k_, v_, causal=causal, block_q=128, block_k=128).backward(go)
        counts[causal] = c
    assert counts[False] == {"forward": 64, "backward": 64}  # 8 x 8 tiles
    assert counts[True] == {"forward": 36, "backward": 36}  # 8 * 9 / 2: on or below the diagonal
    assert len(tile_plan(1024, 1024, causal=True, block_q=128, block_k=128)) == 36
    masked = [t for t in tile_plan(1024, 1024, causal=True, block_q=128, block_k=128) if t.needs_mask]
    assert len(masked) == 8  # only the diagonal tiles get an elementwise mask


@settings(max_examples=200, deadline=None)
@given(
    t_q=st.integers(1, 60), t_k=st.integers(1, 60), block_q=st.integers(1, 25),
    block_k=st.integers(1, 25), causal=st.booleans(),
)
def test_tile_plan_is_minimal_and_complete(t_q, t_k, block_q, block_k, causal):
    allowed = allowed_mask(t_q, t_k, (), causal)
    covered = torch.zeros(t_q, t_k, dtype=torch.int64)
    plan = tile_plan(t_q, t_k, causal=causal, block_q=block_q, block_k=block_k)
    for tile in plan:
        sub = allowed[tile.q_start:tile.q_end, tile.k_start:tile.k_end]
        assert sub.any(), f"{tile} has no allowed entry: it should have been skipped"
        assert tile.needs_mask == bool((~sub).any())
        covered[tile.q_start:tile.q_end, tile.k_start:tile.k_end] += 1
    assert covered.max() <= 1
    assert bool((covered[allowed] == 1).all()), "every allowed (query, key) pair lies in a computed tile"


# --------------------------------------------------------------------------------------------------
# Determinism, dropout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_bit_identical_over_runs(dropout_p):
    q, k, v, go = make_inputs((2, 3), 333, 300, d=32, d_v=32, dtype=torch.float32, seed=21)
    kpm = torch.rand(2, 300, generator=torch.Generator().manual_seed(2)) < 0.2
    runs = [run_flash(q, k, v, go, causal=True, key_padding_mask=kpm, dropout_p=dropout_p, seed=7)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # exact: what is tested is bit-for-bit determinism (same inputs, same seed)


def _dropout_mask(t_q, t_k, lead, p, seed, causal=False, **blocks):
    """Recover the kept-entries mask: with v = I the output is exactly P * keep / (1 - p)."""
    q = torch.zeros(*lead, t_q, 4, dtype=torch.float64)  # uniform probabilities, all > 0
    k = torch.zeros(*lead, t_k, 4, dtype=torch.float64)
    eye = torch.eye(t_k, dtype=torch.float64).expand(*lead, t_k, t_k)
    z = flash_attention(q, k, eye, causal=causal, dropout_p=p, seed=seed, **blocks)
    return z


def test_dropout_rate_scaling_and_reproducibility():
    p, t = 0.3, 512
    z = _dropout_mask(t, t, (4,), p, seed=123)  # 4 * 512 * 512 ~ 1M probabilities
    kept = z != 0
    assert abs((~kept).double().mean().item() - p) < 0.01
    # every kept probability 1/512 is scaled by 1/(1-p)
    assert_close(z[kept], torch.full_like(z[kept], 1 / (t * (1 - p))), n=t, scale=0.0)  # float64, T_k = t
    assert torch.equal(z, _dropout_mask(t, t, (4,), p, seed=123))  # exact: same seed, same computation
    assert not torch.equal(z, _dropout_mask(t, t, (4,), p, seed=124))
    # seed=None draws from torch's global generator
    torch.manual_seed(0)
    a = _dropout_mask(64, 64, (2,), p, seed=None)
    torch.manual_seed(0)
    assert torch.equal(a, _dropout_mask(64, 64, (2,), p, seed=None))  # exact: same seed, same computation


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_and_backward_use_the_same_mask(causal):
    lead, t_q, t_k, p, seed = (2, 2), 70, 90, 0.25, 99
    blocks = {"block_q": 16, "block_k": 32}
    keep = _dropout_mask(t_q, t_k, lead, p, seed, causal=causal, **blocks) != 0  # (2, 2, 70, 90)
    q, k, v, go = make_inputs(lead, t_q, t_k, seed=4)
    # dense float64 reference with that mask
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    allowed = allowed_mask(t_q, t_k, lead, causal)
    s = (qr @ kr.transpose(-1, -2) / 4.0).masked_fill(~allowed, -math.inf)
    ref = (torch.softmax(s, dim=-1) * keep / (1 - p)) @ vr
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), go)
    out, *grads = run_flash(q, k, v, go, causal=causal, dropout_p=p, seed=seed, **blocks)
    n_out, n_grad = reduction_lengths(q, k, v)  # float64 bounds
    assert_close(out, ref.detach(), n=n_out, scale=1 / (1 - p))  # the kept weights are scaled by 1 / (1 - p)
    for got, want in zip(grads, ref_grads):
        assert_close(got, want, n=n_grad, scale=max(1.0, float(want.abs().max())) / (1 - p))


# --------------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gradcheck(causal, padded):
    q, k, v, _ = make_inputs((2, 2), 5, 7, d=3, d_v=4, seed=17)
    kpm = torch.tensor([[False, True, False, False, True, False, False], [True] * 7]) if padded else None
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, key_padding_mask=kpm, block_q=2, block_k=3),
        inputs,
    )


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _qkv():
    q = torch.randn(2, 3, 8, 4)
    return q, torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 5)


KPM = "key_padding_mask"
VALIDATION_CASES = [
    # (change the (q, k, v) inputs, extra kwargs, error type, message pattern)
    (lambda q, k, v: ([[1.0]], k, v), {}, TypeError, r"q must be a torch.Tensor, got list"),
    (lambda q, k, v: (q.long(), k, v), {}, TypeError, r"q must be a floating-point .* got dtype torch.int64"),
    (lambda q, k, v: (q, k.int(), v), {}, TypeError, r"k must be a floating-point .* got dtype torch.int32"),
    (lambda q, k, v: (q, k, v.double()), {}, TypeError,
     r"v must have the same dtype as q \(torch.float32\), got torch.float64"),
    (lambda q, k, v: (q[0, 0, 0], k, v), {}, ValueError, r"q must have at least 2 dims .* got shape \(4,\)"),
    (lambda q, k, v: (q, torch.cat([k, k[:1]]), v), {}, ValueError,  # batch 3 vs 2 (batch 1 broadcasts)
     r"k must have the leading dims of q, expected \(2, 3\) .* got \(3, 3\) \(k.shape=\(3, 3, 9, 4\), q.shape"),
    (lambda q, k, v: (q, k[..., :3], v), {}, ValueError,
     r"k must have the feature dim of q, expected k.shape\[-1\]=4, got 3"),
    (lambda q, k, v: (q, k, v[..., :5, :]), {}, ValueError,
     r"v must have as many rows as k, expected v.shape\[-2\]=9, got 5"),
    (None, {"causal": 1}, TypeError, r"causal must be a bool, got int"),
    (None, {"scale": float("nan")}, ValueError, r"scale must be a finite real number or None, got nan"),
    (None, {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    (None, {"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
    (None, {"dropout_p": "0.1"}, TypeError, r"dropout_p must be a float in \[0, 1\), got str"),
    (None, {"dropout_p": 0.1, "seed": 1.5}, TypeError, r"seed must be an int, an int64 tensor or None, got float"),
    (None, {"block_q": 0}, ValueError, r"block_q must be a positive int, got 0"),
    (None, {"block_k": 16.0}, ValueError, r"block_k must be a positive int, got 16.0"),
    (None, {KPM: torch.zeros(2, 9)}, TypeError,
     r"key_padding_mask must have dtype torch.bool \(True = padding\), got torch.float32"),
    (None, {KPM: torch.zeros(2, 8, dtype=torch.bool)}, ValueError,
     r"key_padding_mask must have shape \(2, 9\) or \(2, 3, 9\) \(T_k=9\), got \(2, 8\)"),
    (None, {KPM: torch.zeros(3, 9, dtype=torch.bool)}, ValueError,
     r"key_padding_mask must have shape \(2, 9\) or \(2, 3, 9\) \(T_k=9\), got \(3, 9\)"),
    (None, {KPM: [[True]]}, TypeError, r"key_padding_mask must be a bool torch.Tensor or None, got list"),
]


@pytest.mark.parametrize(("change", "kwargs", "error", "match"), VALIDATION_CASES)
def test_validation_errors(change, kwargs, error, match):
    q, k, v = _qkv()
    if change is not None:
        q, k, v = change(q, k, v)
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, **kwargs)



# --------------------------------------------------------------------------------------------------
# Memory: O(T), not O(T^2)
# --------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, torch
    from attnlab.flash import flash_attention

    def status_mib(field):  # from /proc/self/status, in KiB there
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith(field + ":")) / 1024

    torch.set_num_threads(1)  # two threads on a busy 2-core machine can be 20x slower
    T, d = int(sys.argv[1]), 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, d, generator=g).requires_grad_() for _ in range(3))
    go = torch.randn(1, 1, T, d, generator=g)
    # Warm up on tiles of the same shapes, so that the code pages of the kernels used (part of
    # the RSS) are already mapped when the baseline is taken.
    w = [t[..., :2048, :].detach().requires_grad_() for t in (q, k, v)]
    flash_attention(*w, causal=True).backward(go[..., :2048, :])
    del w
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    base = status_mib("VmRSS")
    t0 = time.perf_counter()
    out = flash_attention(q, k, v, causal=True)
    out.backward(go)
    seconds = time.perf_counter() - t0
    after = status_mib("VmHWM")
    finite = all(bool(torch.isfinite(t).all()) for t in (out, q.grad, k.grad, v.grad))
    big = torch.ones(64 * 2**20)  # calibration: a 256 MiB tensor must show up in the same probe
    calib = status_mib("VmHWM")
    print(json.dumps({"base": base, "after": after, "calib": calib, "seconds": seconds, "finite": finite}))
    """
)


@pytest.mark.parametrize(("t", "bound_mib"), [(32768, 512)])
def test_memory_forward_backward_is_linear(t, bound_mib):
    """Extra peak RSS of a fresh process for causal forward + backward at T tokens, 1 head, d = 64.

    Method: the kernel's peak-RSS counter ``VmHWM`` is reset to the current resident set
    (``/proc/self/clear_refs``) just before the run and read after it (``ru_maxrss`` is no good
    here: Linux carries the parent's peak over into a spawned child).  A 256 MiB allocation
    afterwards checks that the probe sees big allocations.
    The subprocess uses one thread (fast and repeatable on a shared 2-core CPU).

    At T = 32768 a dense float32 score matrix alone would be 4 GiB; the bound is 512 MiB and the
    tiled kernel measures about 50 MiB (inputs, outputs, gradients and one tile at a time).  The
    run takes ~20 s on one thread of the 2-core test machine (more when it is busy).
    """
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(t)], capture_output=True, text=True,
                          env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["finite"]
    assert r["after"] - r["base"] < bound_mib, json.dumps(r)
    assert r["calib"] - r["base"] >= 250, r  # the probe does see a 256 MiB allocation


def test_batch_split_over_threads_matches_single_thread():
    """With several torch threads the N rows are split between worker threads; same numbers."""
    q, k, v, go = make_inputs((2, 3), 97, 130, seed=8)
    kpm = torch.rand(2, 130, generator=torch.Generator().manual_seed(3)) < 0.3
    kwargs = {"causal": True, "key_padding_mask": kpm, "block_q": 32, "block_k": 32}
    single = run_flash(q, k, v, go, **kwargs)
    torch.set_num_threads(2)
    try:
        with count_tiles() as counts:
            split = run_flash(q, k, v, go, **kwargs)
        assert torch.get_num_threads() == 2  # restored after the workers set their own to 1
    finally:
        torch.set_num_threads(1)
    n_tiles = len(tile_plan(97, 130, causal=True, block_q=32, block_k=32))
    assert counts == {"forward": n_tiles, "backward": n_tiles}  # each tile counted once
    n_out, n_grad = reduction_lengths(q, k, v)  # float64 bounds
    for a, b, n in zip(single, split, (n_out, n_grad, n_grad, n_grad)):
        assert_close(b, a, n=n)
        assert not b.requires_grad  # the workers record no autograd graph
    ref = reference(q, k, v, go, causal=True, key_padding_mask=kpm)
    for got, want, n in zip(split, ref[:4], (n_out, n_grad, n_grad, n_grad)):
        assert_close(got, want, n=n)


# --------------------------------------------------------------------------------------------------
# Block-sparse masks: sliding window, packed documents, grouped-query heads (issue 11 / issue 10)
# --------------------------------------------------------------------------------------------------


def explicit_allowed(t_q, t_k, *, b, h, causal=False, window=None, docs=None, kpm=None):
    """The mask written the plain way, as a bool (B, H, T_q, T_k) matrix (True = may attend)."""
    i = torch.arange(t_q).unsqueeze(1) + (t_k - t_q)  # (T_q, 1)   last key each query may see
    j = torch.arange(t_k).unsqueeze(0)  # (1, T_k)
    allowed = torch.ones(t_q, t_k, dtype=torch.bool)
    if causal or window is not None:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
    allowed = allowed.expand(b, h, t_q, t_k)
    if docs is not None:  # (B, T)
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    if kpm is not None:  # (B, T_k) True = padding
        allowed = allowed & ~kpm[:, None, None, :]
    return allowed


def reference_masked(q, k, v, grad_out, allowed):
    """float64 SDPA with the explicit mask, K/V repeated per query head; empty rows give zeros."""
    g = q.shape[1] // k.shape[1]
    has_key = allowed.any(-1)  # (B, H, T_q)
    safe = allowed | ~has_key.unsqueeze(-1)
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=safe)
    out = out * has_key.unsqueeze(-1)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out.double())
    return out.detach(), dq, dk, dv


def gqa_inputs(b, h, h_kv, t_q, t_k, d=8, d_v=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t_q, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, t_k, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, t_k, d_v, generator=g, dtype=torch.float64)
    go = torch.randn(b, h, t_q, d_v, generator=g, dtype=torch.float64)
    return q, k, v, go


def random_documents(b, t, seed, max_len=40):
    """(B, T) ids of packed documents of random lengths (some of length 1)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        lengths = []
        while sum(lengths) < t:
            lengths.append(int(torch.randint(1, max_len, (1,), generator=g)) if torch.rand(1, generator=g) > 0.2 else 1)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:t]
        rows.append(ids)
    return torch.stack(rows)  # (B, T)


def assert_matches(got, want):
    """(out, dq, dk, dv) against the float64 reference: the output with n = d + T_k, the gradients with
    n = d + d_v + T_q + T_k (reduction_lengths; dk / dv have the shapes of k / v, so read them off got)."""
    d, t_q, d_v, t_k = got[1].shape[-1], got[1].shape[-2], got[3].shape[-1], got[2].shape[-2]  # dq: (.., T_q, d)
    for a, w, n in zip(got, want, (d + t_k, d + d_v + t_q + t_k, d + d_v + t_q + t_k, d + d_v + t_q + t_k)):
        assert torch.isfinite(a).all()
        assert_close(a, w, n=n)


MASK_CASES = [
    # (t_q, t_k, kwargs)
    (1, 1, {"window": 1}),
    (3, 3, {"window": 2}),
    (97, 97, {"window": 16}),
    (257, 257, {"window": 50}),
    (257, 257, {"window": 1000}),  # window larger than the sequence: plain causal
    (97, 257, {"window": 30}),  # fewer queries than keys: bottom-right aligned band
    (257, 97, {"window": 40}),  # the first 160 queries see nothing
    (97, 97, {"documents": True}),
    (257, 257, {"documents": True, "causal": True}),
    (257, 257, {"documents": True, "window": 20}),
    (97, 97, {"documents": True, "causal": True, "padded": True}),
    (257, 257, {"window": 64, "padded": True}),
    (3, 3, {"documents": True, "causal": True}),
    (1, 1, {"documents": True}),
]


@pytest.mark.parametrize("groups", ["mha", "gqa2", "mqa"])
@pytest.mark.parametrize(("t_q", "t_k", "case"), MASK_CASES)
def test_masks_match_float64_sdpa_with_the_explicit_mask(t_q, t_k, case, groups):
    b, h = 2, 4
    h_kv = {"mha": 4, "gqa2": 2, "mqa": 1}[groups]
    q, k, v, go = gqa_inputs(b, h, h_kv, t_q, t_k, seed=t_q + t_k)
    kwargs = {key: val for key, val in case.items() if key in ("window", "causal")}
    docs = random_documents(b, t_q, seed=t_q) if case.get("documents") else None
    kpm = None
    if case.get("padded"):
        kpm = torch.rand(b, t_k, generator=torch.Generator().manual_seed(5)) < 0.3
        kpm[1, : t_k // 2] = True
    allowed = explicit_allowed(t_q, t_k, b=b, h=h, docs=docs, kpm=kpm, **kwargs)
    want = reference_masked(q, k, v, go, allowed)
    got = run_flash(q, k, v, go, document_ids=docs, key_padding_mask=kpm, block_q=16, block_k=32, **kwargs)
    assert got[0].shape == (b, h, t_q, 6) and got[2].shape == k.shape and got[3].shape == v.shape
    assert_matches(got, want)
    empty = ~allowed.any(-1)  # (B, H, T_q)
    assert torch.equal(got[0][empty], torch.zeros_like(got[0][empty]))  # exact: no keys gives 0 by definition


@settings(max_examples=30, deadline=None)
@given(
    t=st.integers(1, 60), block_q=st.integers(1, 20), block_k=st.integers(1, 20),
    window=st.one_of(st.none(), st.integers(1, 70)), documents=st.booleans(), causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_masks_any_blocks(t, block_q, block_k, window, documents, causal, seed):
    q, k, v, go = gqa_inputs(2, 2, 1, t, t, d=4, d_v=3, seed=seed)
    docs = random_documents(2, t, seed=seed, max_len=12) if documents else None
    allowed = explicit_allowed(t, t, b=2, h=2, causal=causal, window=window, docs=docs)
    got = run_flash(q, k, v, go, causal=causal, window=window, document_ids=docs, block_q=block_q, block_k=block_k)
    assert_matches(got, reference_masked(q, k, v, go, allowed))


@settings(max_examples=150, deadline=None)
@given(
    t_q=st.integers(1, 50), t_k=st.integers(1, 50), block_q=st.integers(1, 16), block_k=st.integers(1, 16),
    window=st.one_of(st.none(), st.integers(1, 60)), documents=st.booleans(), seed=st.integers(0, 999),
)
def test_tile_plan_with_window_and_documents_is_minimal_and_complete(t_q, t_k, block_q, block_k, window,
                                                                     documents, seed):
    docs = random_documents(1, t_q, seed=seed, max_len=10) if documents and t_q == t_k else None
    allowed = explicit_allowed(t_q, t_k, b=1, h=1, causal=True, window=window, docs=docs)[0, 0]
    covered = torch.zeros(t_q, t_k, dtype=torch.int64)
    for tile in tile_plan(t_q, t_k, causal=True, window=window, document_ids=docs, block_q=block_q,
                          block_k=block_k):
        sub = allowed[tile.q_start:tile.q_end, tile.k_start:tile.k_end]
        assert sub.any(), f"{tile} has no allowed entry: it should have been skipped"
        if not tile.needs_mask:
            assert sub.all(), f"{tile} is marked full but has masked entries"
        if window is None and docs is None:
            assert tile.needs_mask == bool((~sub).any())
        covered[tile.q_start:tile.q_end, tile.k_start:tile.k_end] += 1
    assert covered.max() <= 1
    assert bool((covered[allowed] == 1).all()), "every allowed (query, key) pair lies in a computed tile"


def test_window_and_documents_skip_tiles_in_forward_and_backward():
    t, blocks = 1024, {"block_q": 64, "block_k": 64}
    q, k, v, go = make_inputs((1, 2), t, t, d=8, d_v=8, dtype=torch.float32)
    docs = torch.arange(t).div(128, rounding_mode="floor").unsqueeze(0)  # (1, T): 8 documents of 128
    for kwargs, expected in (({"window": 128}, 1 + 2 + 14 * 3), ({"document_ids": docs, "causal": True}, 8 * 3)):
        q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k, v))
        with count_tiles() as counts:
            flash_attention(q_, k_, v_, **kwargs, **blocks).backward(go)
        # window 128 = 2 blocks: each query block after the second meets 3 key blocks (136 causal);
        # documents of 2 blocks: each document's causal triangle is 3 tiles
        assert counts == {"forward": expected, "backward": expected}, kwargs
    plan = tile_plan(t, t, window=128, **blocks)
    assert sum(not tile.needs_mask for tile in plan) == 15  # the middle tile of each band row is full


def test_grouped_query_heads_never_repeat_k_v():
    """K/V of fewer heads are read as they are: their gradients come back with their own shape."""
    q, k, v, go = gqa_inputs(2, 6, 2, 33, 33, seed=3)
    ref = reference_masked(q, k, v, go, explicit_allowed(33, 33, b=2, h=6, causal=True))
    got = run_flash(q, k, v, go, causal=True, block_q=8, block_k=8)
    assert_matches(got, ref)
    with pytest.raises(ValueError, match=r"k must have the leading dims of q, expected \(2, 6\) or a number"):
        flash_attention(q, k[:, :1].expand(2, 4, 33, 8), v)
    with pytest.raises(ValueError, match=r"key_padding_mask must be the same for every head"):
        flash_attention(q, k, v, key_padding_mask=torch.zeros(2, 6, 33, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(2, 1, 1, 40), (1, 1, 1, 40), (2, 1, 1, 1), (1, 40), (2, 40), (2, 4, 40)])
def test_padding_mask_broadcast_forms(shape):
    q, k, v, go = gqa_inputs(2, 4, 4, 30, 40, seed=9)
    kpm = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.3
    full = kpm.reshape(kpm.shape[:-2] + (kpm.shape[-1],)) if len(shape) == 4 else kpm
    full = (full.reshape(full.shape[0], 1, full.shape[-1]) if full.dim() == 2 else full).expand(2, 4, 40)
    allowed = explicit_allowed(30, 40, b=2, h=4).clone() & ~full[:, :, None, :]
    got = run_flash(q, k, v, go, key_padding_mask=kpm, block_q=16, block_k=16)
    assert_matches(got, reference_masked(q, k, v, go, allowed))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"window": 0}, ValueError, r"window must be None or an int >= 1 .* got 0"),
    ({"window": True}, ValueError, r"window must be None or an int >= 1 .* got True"),
    ({"document_ids": torch.zeros(2, 9)}, TypeError, r"document_ids must have an integer dtype, got torch.float32"),
    ({"document_ids": torch.zeros(2, 7, dtype=torch.long)}, ValueError,
     r"document_ids must have shape \(2, 9\) \(batch, tokens\) or \(9,\), got \(2, 7\)"),
])
def test_mask_validation_errors(kwargs, error, match):
    q, k, v = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 5)
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match=r"document_ids need as many queries as keys .* T_q=8, T_k=9"):
        flash_attention(q[:, :, :8], k, v, document_ids=torch.zeros(9, dtype=torch.long))


def test_forward_with_lse_window_merges_to_the_whole():
    """Two key halves through forward_with_lse(window=...) merge to flash_attention over all keys."""
    from attnlab.flash import backward_with_lse, forward_with_lse

    q, k, v, go = gqa_inputs(1, 2, 2, 40, 40, seed=2)
    whole = flash_attention(q, k, v, window=12)
    out, lse = forward_with_lse(q, k, v, window=12)
    assert_close(out, whole, n=8 + 40)  # d, T_k
    ref = torch.logsumexp((q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(
        ~explicit_allowed(40, 40, b=1, h=2, window=12), -math.inf), dim=-1)
    assert_close(lse, ref, n=8 + 40)  # d, T_k
    dq, dk, dv = backward_with_lse(go, q, k, v, out, lse, window=12)
    want = reference_masked(q, k, v, go, explicit_allowed(40, 40, b=1, h=2, window=12))
    assert_matches((out, dq, dk, dv), want)


# --------------------------------------------------------------------------------------------------
# Empty inputs, autocast, the operator under torch.compile / torch.export, fork (issue 9)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("t_q", "t_k"), [(5, 0), (0, 5), (0, 0)])
def test_empty_inputs_give_zeros_and_zero_gradients(t_q, t_k):
    q, k, v, go = make_inputs((2, 3), t_q, t_k, d=8, d_v=8, dtype=torch.float32)
    for kwargs in ({}, {"causal": True}, {"window": 3}):
        out, dq, dk, dv = run_flash(q, k, v, go, **kwargs)
        want = F.scaled_dot_product_attention(q, k, v)  # torch's math kernel: zeros for no keys
        # exact below: empty inputs or no keys give 0 by definition
        assert out.shape == (2, 3, t_q, 8) and torch.equal(out, torch.zeros_like(out))
        assert torch.equal(out, torch.nan_to_num(want))
        for grad, x in ((dq, q), (dk, k), (dv, v)):
            assert grad.shape == x.shape and torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kwargs", [{"causal": True}, {"window": 20}])
def test_autocast(dtype, kwargs):
    """Under torch.autocast the inputs are cast like torch's SDPA; error at most 2x torch's own in that dtype."""
    q, k, v, go = gqa_inputs(2, 4, 2, 97, 97, d=32, d_v=32, seed=4)
    allowed = explicit_allowed(97, 97, b=2, h=4, **kwargs)
    ref = reference_masked(q, k, v, go, allowed)
    qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
    with torch.autocast("cpu", dtype=dtype):
        out = flash_attention(qf, kf, vf, **kwargs)
        torch_out = F.scaled_dot_product_attention(qf.to(dtype), kf.to(dtype).repeat_interleave(2, 1),
                                                   vf.to(dtype).repeat_interleave(2, 1), attn_mask=allowed)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (qf, kf, vf), go.to(dtype))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    err = (out.double() - ref[0]).abs().max()
    torch_err = (torch_out.double() - ref[0]).abs().max()
    assert err <= 2 * torch_err, (err, torch_err)
    # The gradients come back in float32 from a half-precision forward: the half roundings of q, k, v, the
    # scores and dO (and the weights) each move them by eps(dtype) relative (ops = 8, the policy's default),
    # n = 0 half-precision reductions (float32 accumulation, 2^-13 / 2^-16 smaller).
    for g, r in zip(grads, ref[1:]):
        assert_close(g, r, n=0, dtype=dtype, scale=max(1.0, float(r.abs().max())))


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.ModuleList(torch.nn.Linear(16, 3 * 16) for _ in range(2))

    def forward(self, x, kpm):
        b, t, _ = x.shape
        for proj in self.proj:
            q, k, v = proj(x).view(b, t, 3, 4, 4).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
            x = x + flash_attention(q, k[:, :2], v[:, :2], window=5, key_padding_mask=kpm,
                                    block_q=8, block_k=8).transpose(1, 2).reshape(b, t, 16)
        return x


def test_compile_fullgraph_is_one_node_without_graph_breaks():
    torch._dynamo.reset()
    model = _TwoLayers()
    x = torch.randn(2, 13, 16)
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[1, :3] = True
    explanation = torch._dynamo.explain(model)(x, kpm)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    targets = [str(node.target) for g in explanation.graphs for node in g.graph.nodes]
    assert sum("attnlab.flash_attention" in t for t in targets) == 2, targets
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for t in (13, 21):
        xt = torch.randn(2, t, 16, requires_grad=True)
        kt = torch.zeros(2, t, dtype=torch.bool)
        got = compiled(xt, kt)
        want = model(xt, kt)
        n = 2 * (16 + 4 + t)  # two layers of: projection d = 16, head dim 4, T_k
        assert_close(got, want, n=n)
        ga, = torch.autograd.grad(got.sum(), xt)
        gb, = torch.autograd.grad(want.sum(), xt)
        assert_close(ga, gb, n=2 * n + 2 * t)  # back through the same reductions, plus d_v and T_q per layer
    # dropout: the seed is drawn in the graph (a tensor), not by .item() or a torch.Generator
    drop = torch._dynamo.explain(lambda q: flash_attention(q, q, q, dropout_p=0.5))(torch.randn(1, 1, 16, 4))
    assert drop.graph_break_count == 0 and drop.graph_count == 1


def test_export_with_a_dynamic_length():
    torch._dynamo.reset()

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return flash_attention(q, k, v, causal=True, block_q=8, block_k=8)

    t = torch.export.Dim("T", min=2, max=64)
    args = tuple(torch.randn(1, 2, 10, 8) for _ in range(3))
    program = torch.export.export(Attn(), args, dynamic_shapes=({2: t}, {2: t}, {2: t}))
    for length in (3, 17, 64):
        q, k, v = (torch.randn(1, 2, length, 8) for _ in range(3))
        assert_close(program.module()(q, k, v), flash_attention(q, k, v, causal=True), n=8 + length)  # d, T_k


_FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from attnlab.flash import flash_attention
    torch.set_num_threads(2)
    q = torch.randn(4, 2, 300, 16)
    flash_attention(q, q, q, causal=True, block_q=64, block_k=64)  # the parent starts the worker pool
    pid = os.fork()
    if pid == 0:
        out = flash_attention(q, q, q, causal=True, block_q=64, block_k=64)
        os._exit(0 if torch.isfinite(out).all() else 3)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_does_not_hang():
    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
