"""The per-call fast paths (issue 23, point 4) accept exactly what the full checks accept, and give the same
numbers: ``functional.check_qkv``'s shortcut against ``functional._check_qkv_all`` (the full check) over a
sweep of layouts, ``backends._check_call``'s shortcut against bad arguments, ``backends.attention``'s direct
"torch" path against the registered backend, and ``attnlab.hf.attention_forward``'s short path against the
eager reference. No timing here: the speed is in benchmarks/RESULTS.md (``bench_hf.py --calls``)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from attnlab import backends, masks
from attnlab import functional as F
from tolerances import assert_close


def _outcome(fn, *args):
    """(returned value, None) or (None, (exception type, message))."""
    try:
        return fn(*args), None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        return None, (type(exc), str(exc))


_LEADS = [(), (3,), (1,), (2, 8), (2, 2), (2, 1), (1, 8), (2, 3), (1, 2), (2, 4), (3, 8), (2, 0), (2, 5)]


def test_fast_check_agrees_with_the_full_check():
    accepted = 0
    for q_lead, k_lead, v_lead in itertools.product(_LEADS, repeat=3):  # every layout, valid or not
        q, k, v = torch.zeros(*q_lead, 1, 4), torch.zeros(*k_lead, 3, 4), torch.zeros(*v_lead, 3, 5)
        fast, full = _outcome(F.check_qkv, q, k, v), _outcome(F._check_qkv_all, q, k, v)
        assert fast == full, (q_lead, k_lead, v_lead)
        if full[1] is None:
            accepted += 1
            assert fast[0] == F.kv_groups(q, k), (q_lead, k_lead, v_lead)  # the group count is kv_groups's
    assert 0 < accepted < len(_LEADS) ** 3  # the sweep holds both valid and invalid layouts


@pytest.mark.parametrize("case", ["int_q", "int_k", "dtype", "d_k", "tokens", "rank_q", "rank_v", "list_k"])
def test_fast_check_raises_what_the_full_check_raises(case):
    q, k, v = torch.zeros(2, 8, 1, 4), torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4)
    bad = {
        "int_q": (q.long(), k, v), "int_k": (q, k.long(), v), "dtype": (q, k, v.double()),
        "d_k": (q, k[..., :3], v), "tokens": (q, k, v[..., :2, :]), "rank_q": (q[0, 0, 0], k, v),
        "rank_v": (q, k, v[0, 0, 0]), "list_k": (q, [1.0], v),
    }[case]
    fast, full = _outcome(F.check_qkv, *bad), _outcome(F._check_qkv_all, *bad)
    assert fast[1] is not None and fast == full


@pytest.mark.parametrize("kwargs,error", [
    ({"dropout_p": False}, "dropout_p must be a float in [0, 1)"),
    ({"dropout_p": 1.0}, "dropout_p must be a float in [0, 1)"),
    ({"dropout_p": float("nan")}, "dropout_p must be a float in [0, 1)"),
    ({"window": True}, "window must be None or an int >= 1"),
    ({"window": 0}, "window must be None or an int >= 1"),
    ({"window": 2.0}, "window must be None or an int >= 1"),
    ({"causal": np.bool_(True)}, "causal must be a bool"),
    ({"causal": 1}, "causal must be a bool"),
])
def test_attention_still_refuses_bad_arguments(kwargs, error):
    q, k, v = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    with pytest.raises((TypeError, ValueError), match=error.replace("[", r"\[").replace(")", r"\)")):
        backends.attention(q, k, v, **kwargs)


def test_valid_arguments_of_other_types_still_pass():
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    ref = backends.attention(q, k, v, backend="eager")  # (1, 2, 1, 4)
    # int dropout 0 and a numpy float take the full check and are accepted as before; same ops, same numbers
    for kwargs in ({"dropout_p": 0}, {"dropout_p": np.float64(0.0)}, {"window": 3, "causal": True}):
        out = backends.attention(q, k, v, backend="eager", **kwargs)
        assert torch.equal(out, ref)  # exact: identical eager operations


def test_resolve_reads_the_device_as_before():
    assert backends.resolve("auto", dropout_p=0.1, device=torch.device("cpu")) == "torch"
    assert backends.resolve("auto", dropout_p=0.1, device=torch.device("cuda")) == "eager"
    assert backends.resolve("auto", dropout_p=0.1, device="cuda:0") == "eager"
    with pytest.raises(RuntimeError):
        backends.resolve("auto", device="not-a-device")  # a malformed device string is still refused


@pytest.mark.parametrize("t_q,t_k,causal,window,masked", [
    (1, 1, False, None, False), (1, 97, True, None, False), (3, 3, True, None, False), (3, 257, True, 5, False),
    (97, 97, True, 16, True), (1, 0, False, None, False), (3, 7, False, None, True),
])
def test_direct_torch_path_equals_the_torch_backend(t_q, t_k, causal, window, masked):
    gen = torch.Generator().manual_seed(t_q * 1000 + t_k)
    q = torch.randn(2, 8, t_q, 16, generator=gen)  # (B, H, T_q, d)
    k, v = torch.randn(2, 2, t_k, 16, generator=gen), torch.randn(2, 2, t_k, 16, generator=gen)  # (B, H_kv, T_k, d)
    mask = torch.rand(2, 1, 1, t_k, generator=gen) > 0.3 if masked else None  # (B, 1, 1, T_k)
    out = backends.attention(q, k, v, mask=mask, causal=causal, window=window, backend="torch")
    same = backends.BACKENDS["torch"](q, k, v, mask=mask, causal=causal, window=window)
    assert torch.equal(out, same)  # exact: the same SDPA call on the same tensors
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask=mask, causal=causal,
                                         window=window)  # (B, H, T_q, d), float64 reference
    assert_close(out, ref.float(), n=max(t_k, 16))


def test_hf_short_path_equals_the_eager_reference():
    hf = pytest.importorskip("attnlab.hf")
    pytest.importorskip("transformers")

    class Attn(torch.nn.Module):
        num_key_value_groups = 4
        is_causal = True

    gen = torch.Generator().manual_seed(3)
    for t_k in (1, 3, 97, 257):
        q = torch.randn(1, 8, 1, 32, generator=gen)  # (B, H, 1, d)
        k, v = torch.randn(1, 2, t_k, 32, generator=gen), torch.randn(1, 2, t_k, 32, generator=gen)  # (B, H_kv, T, d)
        mask = hf.AttentionMask(1, 1, t_k, causal=True)
        out, weights = hf.attention_forward(Attn(), q, k, v, mask, scaling=0.2, backend="auto", position_ids=None)
        slow, slow_weights = hf.attention_forward(Attn(), q, k, v, mask, scaling=0.2, backend="eager")
        assert weights is None and slow_weights is not None
        assert out.shape == (1, 1, 8, 32)
        assert_close(out, slow, n=t_k)
        with pytest.raises(ValueError, match="attention sinks"):
            hf.attention_forward(Attn(), q, k, v, mask, backend="auto", sinks=torch.zeros(8))


@pytest.mark.parametrize("t_q,t_k", [(0, 0), (0, 3), (3, 0), (1, 1), (1, 97), (3, 3), (97, 97), (97, 257), (257, 97)])
@pytest.mark.parametrize("window", [None, 1, 3, 97, 300])
def test_structure_mask_equals_the_mask_builders(t_q, t_k, window):
    from attnlab.masks import causal_mask, window_mask

    got = masks.index_mask(t_q, t_k, causal=True, window=window, device=torch.device("cpu"))  # (T_q, T_k)
    want = causal_mask(t_q, t_k) if window is None else window_mask(t_q, t_k, window=window)  # (T_q, T_k)
    assert got is not None and got.dtype == torch.bool
    assert torch.equal(got, want)  # exact: booleans
    assert masks.index_mask(t_q, t_k, causal=False, window=None, device=torch.device("cpu")) is None
