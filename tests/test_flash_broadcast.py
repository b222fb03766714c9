"""The flash backend takes every leading layout that broadcasts, return_lse and document ids on every backend.

References are independent of attnlab: float64 ``torch.nn.functional.scaled_dot_product_attention`` with an
explicit bool mask (K/V expanded with ``expand``/``repeat_interleave``), and ``torch.logsumexp`` of the masked
scaled scores for the log-sum-exp. Tolerances from ``tolerances`` (bound = (n + ops) * eps(dtype), n = T_k).
"""

from __future__ import annotations

import math

import pytest
import torch

from attnlab import backends
from attnlab.flash import flash_attention
from attnlab.masks import document_mask
from tolerances import assert_close

BACKENDS = ("eager", "torch", "flash", "auto")


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def torch_reference(q, k, v, allowed=None, scale=None):
    """PyTorch's own SDPA on the broadcast (B..., H, T, d) tensors, float64, and torch.logsumexp of the masked
    scores: ``(out, lse)``. ``allowed``: bool, broadcastable to (..., T_q, T_k), True = may attend."""
    q, k, v = (t.double() for t in (q, k, v))
    if k.dim() >= 3 and q.dim() >= 3 and 1 < k.shape[-3] < q.shape[-3]:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)  # (..., H, T_k, d)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q = q.expand(*lead, *q.shape[-2:])
    k = k.expand(*lead, *k.shape[-2:])
    v = v.expand(*lead, *v.shape[-2:])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale  # (..., T_q, T_k)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # (..., T_q)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    if allowed is not None:  # rows with no allowed key: zeros (attnlab's convention)
        out = out.masked_fill(~allowed.expand(scores.shape).any(-1, keepdim=True), 0.0)
    return out, lse


def causal(t_q, t_k):
    return torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)  # (T_q, T_k) bottom-right


# --------------------------------------------------------------------------------------------------
# 1. flash accepts every broadcasting layout (issue 22, repro 1)
# --------------------------------------------------------------------------------------------------


def test_issue_repro_flash_with_kv_batch_one():
    q = _randn(3, 4, 8, 16, seed=1, dtype=torch.float32)
    k = v = _randn(1, 4, 8, 16, seed=2, dtype=torch.float32)
    got = backends.attention(q, k, v, causal=True, backend="flash")  # raised "k must have the same leading dims"
    want, _ = torch_reference(q, k, v, causal(8, 8))
    assert got.shape == (3, 4, 8, 16)
    assert_close(got, want, n=8, dtype=torch.float32)


LAYOUTS = [  # (q shape, k shape, v shape) with T_q = T_k = T and d = 8
    ((3, 4, "T", 8), (1, 4, "T", 8), (1, 4, "T", 8)),  # K/V batch 1 shared by every query batch row
    ((3, 4, "T", 8), (1, 2, "T", 8), (1, 2, "T", 8)),  # ... and grouped-query heads
    ((3, 4, "T", 8), (1, 1, "T", 8), (1, 1, "T", 8)),  # ... and one key/value head (multi-query)
    ((2, 1, "T", 8), (2, 4, "T", 8), (2, 4, "T", 8)),  # one query head against 4 key/value heads
    ((1, 4, "T", 8), (3, 4, "T", 8), (3, 4, "T", 8)),  # a query of batch 1 against 3 K/V batch rows
    ((2, 3, 2, "T", 8), (1, 1, 2, "T", 8), (1, 1, 2, "T", 8)),  # two batch dims, K/V shared
    ((2, 3, 2, "T", 8), (2, 1, 2, "T", 8), (2, 1, 2, "T", 8)),  # K/V shared over the second batch dim only
    ((3, "T", 8), (1, "T", 8), (1, "T", 8)),  # 3-D (B, T, d), K/V batch 1
    (("T", 8), (3, "T", 8), (3, "T", 8)),  # a 2-D query against 3-D K/V
    ((4, "T", 8), (2, "T", 8), (2, "T", 8)),  # 3-D with grouped heads (dim -3 = heads)
]


@pytest.mark.parametrize("shapes", LAYOUTS, ids=lambda s: "-".join("x".join(map(str, x)) for x in s))
@pytest.mark.parametrize("t", [1, 97])
@pytest.mark.parametrize("is_causal", [False, True])
def test_flash_matches_torch_on_every_broadcasting_layout(shapes, t, is_causal):
    q, k, v = (_randn(*(t if s == "T" else s for s in shape), seed=i).requires_grad_()
               for i, shape in enumerate(shapes))
    got = backends.attention(q, k, v, causal=is_causal, backend="flash")
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    want, _ = torch_reference(q2, k2, v2, causal(t, t) if is_causal else None)
    assert got.shape == want.shape
    assert_close(got, want, n=t, dtype=torch.float64)
    go = _randn(*want.shape, seed=9)
    got.backward(go)
    want.backward(go)
    for a, b in ((q, q2), (k, k2), (v, v2)):  # K/V of batch 1: the gradient summed over the batch rows
        assert a.grad.shape == a.shape
        assert_close(a.grad, b.grad, n=3 * t, dtype=torch.float64)
    # the same on the other backends (the docstring's promise)
    for name in ("eager", "torch"):
        assert_close(backends.attention(q, k, v, causal=is_causal, backend=name), want, n=t, dtype=torch.float64)


def test_kv_of_batch_one_is_not_copied_per_batch_row():
    """K/V of batch 1 are folded into the query rows: the kernel reads the caller's K/V storage."""
    from attnlab import flash

    q, k, v = _randn(5, 4, 16, 8), _randn(1, 2, 16, 8), _randn(1, 2, 16, 8)
    prepared = flash._prepare(q, k, v, causal=True, window=None, document_ids=None, key_padding_mask=None,
                              scale=None)  # private, on purpose: this test is about the kernel's layout
    assert prepared.k.shape == (1, 2, 16, 8) and prepared.k.data_ptr() == k.data_ptr()
    assert prepared.q.shape == (1, 2 * 5 * 2, 16, 8)  # (1, H_kv * B * G, T, d)
    # a key padding mask that differs per batch row cannot be folded: K/V are expanded, still exact
    kpm = torch.zeros(5, 16, dtype=torch.bool)
    kpm[1, 3:] = True
    got = flash_attention(q, k, v, key_padding_mask=kpm)
    want, _ = torch_reference(q, k, v, (~kpm)[:, None, None, :])
    assert_close(got, want, n=16)


@pytest.mark.parametrize(("q_shape", "k_shape", "v_shape", "match"), [
    ((3, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16),
     (r"k must have the leading dims of q, expected \(3, 4\) .* got \(2, 4\) \(k.shape=\(2, 4, 8, 16\), "
     r"q.shape=\(3, 4, 8, 16\)\)")),
    ((3, 6, 8, 16), (3, 4, 8, 16), (3, 4, 8, 16), r"dividing H=6 .*k.shape=\(3, 4, 8, 16\)"),
    ((3, 4, 8, 16), (1, 4, 8, 16), (2, 4, 8, 16), r"v must have the leading dims of q.*v.shape=\(2, 4, 8, 16\)"),
])
def test_flash_shape_errors_name_the_real_shapes(q_shape, k_shape, v_shape, match):
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v)


# --------------------------------------------------------------------------------------------------
# 4. return_lse on flash_attention and on every backend of backends.attention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_q,t_k", [(1, 1), (3, 3), (97, 97), (5, 40), (0, 4), (4, 0)])
def test_lse_equals_logsumexp_of_the_masked_scores_on_every_backend(t_q, t_k):
    b, h = 2, 3
    q, k, v = _randn(b, h, t_q, 8, seed=1), _randn(b, 1, t_k, 8, seed=2), _randn(b, 1, t_k, 8, seed=3)
    kpm = torch.rand(b, t_k, generator=torch.Generator().manual_seed(4)) < 0.3  # True = padding
    if t_k:
        kpm[0] = True  # batch row 0: every key is padding -> lse -inf, out 0
    allowed = causal(t_q, t_k) & (~kpm)[:, None, None, :]  # (B, 1, T_q, T_k)
    want_out, want_lse = torch_reference(q, k, v, allowed)
    for name in BACKENDS:
        out, lse = backends.attention(q, k, v, mask=(~kpm)[:, None, None, :], causal=True, backend=name,
                                      return_lse=True)
        assert lse.shape == (b, h, t_q) and lse.dtype == torch.float64, name
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)), name  # same rows empty, exactly
        finite = torch.isfinite(want_lse)
        assert_close(lse[finite], want_lse[finite], n=max(t_k, 1), msg=name)
        assert_close(out, want_out, n=max(t_k, 1), msg=name)


def test_lse_is_float32_for_half_and_single_precision_inputs_and_matches_flash_attention():
    q, k, v = (_randn(2, 2, 33, 8, seed=i, dtype=torch.float32) for i in range(3))
    _, want = torch_reference(q, k, v, causal(33, 33))
    for dtype in (torch.float32, torch.bfloat16):
        qd, kd, vd = (x.to(dtype) for x in (q, k, v))
        out, lse = flash_attention(qd, kd, vd, causal=True, window=None, return_lse=True, block_q=8, block_k=8)
        assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (2, 2, 33)
        _, eager_lse = backends.attention(qd, kd, vd, causal=True, backend="eager", return_lse=True)
        assert eager_lse.dtype == torch.float32
        # bfloat16 inputs round q and k (2^-8 relative): the bound is the input rounding times |score| terms
        assert_close(lse, want, n=8, dtype=dtype)
        assert_close(eager_lse, lse, n=8, dtype=dtype)
    with pytest.raises(ValueError, match="need_weights=True and return_lse=True"):
        backends.attention(q, k, v, need_weights=True, return_lse=True)
    with pytest.raises(TypeError, match="return_lse must be a bool, got int"):
        backends.attention(q, k, v, return_lse=1)


def test_lse_with_window_and_documents_on_flash_and_eager():
    t = 40
    q, k, v = (_randn(2, 2, t, 8, seed=10 + i) for i in range(3))
    docs = torch.tensor([0] * 7 + [1] * 20 + [2] * 13).expand(2, t).clone()
    docs[1] = torch.arange(t) // 10
    allowed = causal(t, t) & (torch.arange(t)[:, None] - torch.arange(t)[None, :] < 6) \
        & document_mask(docs)  # (B, 1, T, T)
    want_out, want_lse = torch_reference(q, k, v, allowed)
    for name in BACKENDS:
        out, lse = backends.attention(q, k, v, window=6, document_ids=docs, backend=name, return_lse=True)
        assert_close(lse, want_lse, n=t, msg=name)
        assert_close(out, want_out, n=t, msg=name)


# --------------------------------------------------------------------------------------------------
# 5. document ids on backends.attention, every backend, outputs and gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 3, 97])
@pytest.mark.parametrize("per_batch", [False, True])
def test_document_ids_on_every_backend_equal_the_dense_document_mask(t, per_batch):
    gen = torch.Generator().manual_seed(t)
    starts = torch.rand(2, t, generator=gen) < 0.08
    starts[:, 0] = True
    docs = starts.long().cumsum(-1) if per_batch else starts[0].long().cumsum(-1)  # (B, T) or (T,)
    q, k, v = (_randn(2, 4, t, 8, seed=20 + i).requires_grad_() for i in range(3))
    kpm = torch.rand(2, t, generator=gen) < 0.2
    mask = (~kpm)[:, None, None, :]  # (B, 1, 1, T): composes with the documents
    allowed = causal(t, t) & document_mask(docs) & mask
    go = _randn(2, 4, t, 8, seed=30)
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    want, _ = torch_reference(q2, k2, v2, allowed)
    want.backward(go)
    for name in BACKENDS:
        for x in (q, k, v):
            x.grad = None
        got = backends.attention(q, k, v, mask=mask, causal=True, document_ids=docs, backend=name)
        got.backward(go)
        assert_close(got, want, n=t, msg=name)
        for a, b in ((q, q2), (k, k2), (v, v2)):
            assert_close(a.grad, b.grad, n=3 * t, msg=name)


def test_document_ids_with_a_float_mask_and_bad_ids():
    t = 12
    q, k, v = (_randn(1, 2, t, 4, seed=40 + i) for i in range(3))
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]])
    bias = _randn(1, 1, t, t, seed=44)  # a float mask: added to the scores
    scores = q @ k.transpose(-1, -2) / 2.0 + bias
    scores = scores.masked_fill(~document_mask(docs), -math.inf)
    want = torch.softmax(scores, -1) @ v
    for name in ("eager", "torch", "auto"):
        assert_close(backends.attention(q, k, v, mask=bias, document_ids=docs, backend=name), want, n=t, msg=name)
    with pytest.raises(TypeError, match="document_ids must have an integer dtype, got torch.float32"):
        backends.attention(q, k, v, document_ids=docs.float())
    with pytest.raises(ValueError, match=r"document_ids must have shape \(1, 12\) \(batch, tokens\) or \(12,\), "
                                         r"got \(1, 11\)"):
        backends.attention(q, k, v, document_ids=docs[:, :11])
    with pytest.raises(ValueError, match="document_ids need as many queries as keys .* T_q=5, T_k=12"):
        backends.attention(q[:, :, :5], k, v, document_ids=docs)


def test_document_mask_builder():
    ids = torch.tensor([0, 0, 1, 1, 1])
    assert torch.equal(document_mask(ids), torch.tensor([[a == b for b in ids] for a in ids]))
    two = torch.stack([ids, torch.arange(5)])
    m = document_mask(two)
    assert m.shape == (2, 1, 5, 5) and torch.equal(m[1, 0], torch.eye(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="doc_q must have an integer dtype"):
        document_mask(ids.float())


def test_nan_in_one_position_spreads_to_every_row_on_every_backend():
    """Documented behaviour (as torch.nn.MultiheadAttention): one NaN key poisons every row that may see it."""
    q, k, v = (_randn(1, 2, 6, 4, seed=50 + i) for i in range(3))
    k[0, :, 2] = float("nan")  # position 2 of every head
    for name in BACKENDS:
        out = backends.attention(q, k, v, backend=name)
        assert bool(out.isnan().all()), name
        out = backends.attention(q, k, v, causal=True, backend=name)
        assert bool(out[:, :, 2:].isnan().all()), name
        if name != "flash":  # flash adds the mask to the scores of a whole tile: -inf + NaN is NaN there too
            assert not bool(out[:, :, :2].isnan().any()), name
