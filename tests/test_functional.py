"""attnlab.functional against the book's printed numbers, PyTorch's own SDPA and float64 math."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab
from attnlab import functional as F
from attnlab.masks import causal_mask
from tolerances import assert_close, attention_scale, printed_atol, tols

INPUTS = attnlab.book_inputs()
QUERY = INPUTS[1]  # "journey"


def close(actual, expected, n=6):
    """Against the book's printed 4-decimal numbers: half a unit of the 4th decimal plus our float32 bound
    (n = the longest reduction: 6 tokens of d = 3)."""
    expected = torch.tensor(expected, dtype=torch.float64)
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(torch.as_tensor(actual).double(), expected,
                               atol=printed_atol(4, torch.float32, n, scale=scale), rtol=0)


# -- the book's simplified self-attention (3.3) ---------------------------------------------------


def test_scores_of_journey_book_values_loop_and_matrix():
    expected = [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865]
    close(F.dot_scores_loop(QUERY, INPUTS), expected)
    close(F.dot_scores(QUERY, INPUTS), expected)
    assert_close(F.dot_scores_loop(QUERY, INPUTS), F.dot_scores(QUERY, INPUTS), n=3)  # d = 3


def test_dot_product_written_out():
    # The chapter checks torch.dot against the element-wise loop: 0.9544.
    res = sum(INPUTS[0][i] * QUERY[i] for i in range(3))
    close(res, 0.9544)


def test_normalisations_book_values():
    scores = F.dot_scores(QUERY, INPUTS)
    by_sum = F.normalize_by_sum(scores)
    close(by_sum, [0.1455, 0.2278, 0.2249, 0.1285, 0.1077, 0.1656])
    close(by_sum.sum(), 1.0)
    expected_softmax = [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581]
    close(F.softmax_naive(scores), expected_softmax)
    close(F.softmax(scores), expected_softmax)
    assert_close(F.softmax(scores), torch.softmax(scores, dim=0), n=6, scale=float(scores.abs().max()))


def test_context_vector_book_values_loop_and_matrix():
    weights = F.softmax(F.dot_scores(QUERY, INPUTS))
    close(F.context_vector_loop(weights, INPUTS), [0.4419, 0.6515, 0.5683])
    close(F.context_vectors(weights, INPUTS), [0.4419, 0.6515, 0.5683])


def test_context_vector_with_divide_by_sum_weights_seed_note():
    # seeds/002 uses the divide-by-sum weights for its context vector: [0.4355, 0.6451, 0.5680].
    weights = F.normalize_by_sum(F.dot_scores(QUERY, INPUTS))
    close(F.context_vector_loop(weights, INPUTS), [0.4355, 0.6451, 0.5680])


BOOK_SCORES = [
    [0.9995, 0.9544, 0.9422, 0.4753, 0.4576, 0.6310],
    [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865],
    [0.9422, 1.4754, 1.4570, 0.8296, 0.7154, 1.0605],
    [0.4753, 0.8434, 0.8296, 0.4937, 0.3474, 0.6565],
    [0.4576, 0.7070, 0.7154, 0.3474, 0.6654, 0.2935],
    [0.6310, 1.0865, 1.0605, 0.6565, 0.2935, 0.9450],
]
BOOK_WEIGHTS = [
    [0.2098, 0.2006, 0.1981, 0.1242, 0.1220, 0.1452],
    [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581],
    [0.1390, 0.2369, 0.2326, 0.1242, 0.1108, 0.1565],
    [0.1435, 0.2074, 0.2046, 0.1462, 0.1263, 0.1720],
    [0.1526, 0.1958, 0.1975, 0.1367, 0.1879, 0.1295],
    [0.1385, 0.2184, 0.2128, 0.1420, 0.0988, 0.1896],
]
BOOK_CONTEXT = [
    [0.4421, 0.5931, 0.5790],
    [0.4419, 0.6515, 0.5683],
    [0.4431, 0.6496, 0.5671],
    [0.4304, 0.6298, 0.5510],
    [0.4671, 0.5910, 0.5266],
    [0.4177, 0.6503, 0.5645],
]


def test_all_tokens_book_matrices():
    scores = F.all_pair_scores(INPUTS)
    close(scores, BOOK_SCORES)
    weights = F.softmax(scores, dim=-1)
    close(weights, BOOK_WEIGHTS)
    close(weights.sum(dim=-1), [1.0] * 6)
    close(F.context_vectors(weights, INPUTS), BOOK_CONTEXT)


def test_batched_head_scores_book_example():
    # 3.6.2: a @ a.transpose(2, 3) on a (1, 2, 3, 4) tensor.
    a = torch.tensor([[[[0.2745, 0.6584, 0.2775, 0.8573],
                        [0.8993, 0.0390, 0.9268, 0.7388],
                        [0.7179, 0.7058, 0.9156, 0.4340]],
                       [[0.0772, 0.3565, 0.1479, 0.5331],
                        [0.4066, 0.2318, 0.4545, 0.9737],
                        [0.4606, 0.5159, 0.4220, 0.5786]]]])
    close(F.all_pair_scores(a), [[[[1.3208, 1.1631, 1.2879], [1.1631, 2.2150, 1.8424], [1.2879, 1.8424, 2.0402]],
                                  [[0.4391, 0.7003, 0.5903], [0.7003, 1.3737, 1.0620], [0.5903, 1.0620, 0.9912]]]])


# -- softmax: stability and masking --------------------------------------------------------------


def test_naive_softmax_overflows_stable_does_not():
    big = torch.tensor([1000.0, 1001.0, 999.0])
    assert torch.isnan(F.softmax_naive(big)).any()
    assert_close(F.softmax(big), torch.softmax(big, dim=0), n=3)  # big - max(big) is exact: scale 1


def test_softmax_fully_masked_row_is_zero_with_zero_grad():
    scores = torch.tensor([[1.0, 2.0], [float("-inf"), float("-inf")]], requires_grad=True)
    w = F.softmax(scores)
    assert torch.equal(w[1], torch.zeros(2))  # exact: a fully masked row is 0 by definition, not by rounding
    (w * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[1], torch.zeros(2))  # exact: no gradient flows into a masked row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_half_scores_in_the_thousands(dtype):
    scores = torch.tensor([3000.0, 3001.0, 2990.0, -3000.0]).to(dtype)
    w = F.softmax(scores)
    assert w.dtype == dtype and torch.isfinite(w).all()
    ref = torch.softmax(scores.double(), dim=0)
    # float32 math, one rounding to the half dtype: eps(dtype) covers it (the float32 part is 2^-13 smaller)
    torch.testing.assert_close(w.double(), ref, **tols(dtype, n=0, ops=1))


# -- the two causal masking methods agree (3.5.1) --------------------------------------------------


@pytest.mark.parametrize("t_q,t_k", [(6, 6), (1, 1), (3, 7), (97, 97), (5, 3)])
def test_causal_two_ways_agree(t_q, t_k):
    torch.manual_seed(0)
    scores = torch.randn(2, t_q, t_k, dtype=torch.float64)
    allowed = causal_mask(t_q, t_k)
    after = F.mask_after_softmax(F.softmax(scores), allowed)
    before = F.softmax(F.mask_before_softmax(scores, allowed))
    assert_close(after, before, n=t_k, scale=float(scores.abs().max()))
    rows_with_keys = allowed.any(-1)
    assert_close(before.sum(-1)[:, rows_with_keys], torch.ones(2, int(rows_with_keys.sum()), dtype=torch.float64), n=t_k)


def test_causal_mask_book_row():
    # Renormalised causal row of "journey" from the SelfAttention_v2 (seed 789) weights: 0.5517 0.4483.
    torch.manual_seed(789)
    sa = attnlab.SelfAttention_v2(3, 2)
    q, k = sa.W_query(INPUTS), sa.W_key(INPUTS)
    weights = F.softmax(F.all_pair_scores(q, k) / math.sqrt(2))
    close(weights[0], [0.1921, 0.1646, 0.1652, 0.1550, 0.1721, 0.1510])
    renorm = F.mask_after_softmax(weights, causal_mask(6))
    close(renorm[1, :2], [0.5517, 0.4483])
    close(renorm[2, :3], [0.3800, 0.3097, 0.3103])
    close(renorm[5], [0.1935, 0.1663, 0.1666, 0.1542, 0.1666, 0.1529])
    masked_scores = F.mask_before_softmax(F.all_pair_scores(q, k), causal_mask(6))
    close(masked_scores[1, :2], [0.4656, 0.1723])
    assert torch.isneginf(masked_scores[1, 2:]).all()


def test_dropout_book_values():
    torch.manual_seed(123)
    dropped = torch.nn.functional.dropout(torch.ones(6, 6), p=0.5, training=True)
    expected = torch.tensor([[2., 2., 0., 2., 2., 0.], [0., 0., 0., 2., 0., 2.], [2., 2., 2., 2., 0., 2.],
                             [0., 2., 2., 0., 0., 2.], [0., 2., 0., 2., 0., 2.], [0., 2., 2., 2., 2., 0.]])
    assert torch.equal(dropped, expected)  # exact: dropout writes 0 or 1 / (1 - p) = 2, both exact floats


# -- scaled dot-product attention vs PyTorch ------------------------------------------------------


def torch_reference(q, k, v, mask, causal, scale):
    t_q, t_k = q.shape[-2], k.shape[-2]
    if causal:
        c = causal_mask(t_q, t_k)
        mask = c if mask is None else (mask & c if mask.dtype == torch.bool else mask.masked_fill(~c, float("-inf")))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    t_q=st.sampled_from([1, 2, 3, 5, 17, 97]),
    t_k=st.sampled_from([1, 3, 4, 17, 97]),
    d_k=st.sampled_from([1, 3, 8]),
    d_v=st.sampled_from([1, 2, 5]),
    causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "float"]),
    use_scale=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sdpa_matches_torch(batch, t_q, t_k, d_k, d_v, causal, mask_kind, use_scale, seed):
    g = torch.Generator().manual_seed(seed)
    shape = tuple(batch)
    q = torch.randn(*shape, t_q, d_k, generator=g, dtype=torch.float64)
    k = torch.randn(*shape, t_k, d_k, generator=g, dtype=torch.float64)
    v = torch.randn(*shape, t_k, d_v, generator=g, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(*shape, t_q, t_k, generator=g) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(*shape, t_q, t_k, generator=g, dtype=torch.float64)
        mask = mask.masked_fill(torch.rand(*shape, t_q, t_k, generator=g) > 0.7, float("-inf"))
    scale = 0.37 if use_scale else None
    ours = F.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)
    ref = torch_reference(q, k, v, mask, causal, scale)
    # Rows whose keys are all masked out: ours gives zeros, PyTorch NaN or garbage; compare the others.
    allowed = torch.ones(*shape, t_q, t_k, dtype=torch.bool)
    if causal:
        allowed = allowed & causal_mask(t_q, t_k)
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else ~torch.isneginf(mask))
    live = allowed.any(-1)
    terms = attention_scale(q, k, v, scale=scale if use_scale else None, bias=mask)
    assert_close(ours[live], ref[live], n=d_k + t_k, scale=terms)  # float64 bound
    assert torch.equal(ours[~live], torch.zeros_like(ours[~live]))  # exact: no keys gives 0 by definition
    # float32 agrees within the float32 bound.
    ours32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask=mask if mask is None or mask.dtype == torch.bool else mask.float(), causal=causal, scale=scale)
    assert_close(ours32[live], ref[live], n=d_k + t_k, scale=terms)


@pytest.mark.parametrize("t", [1, 3, 97, 257])
def test_sdpa_odd_lengths_float32(t):
    torch.manual_seed(t)
    q, k, v = (torch.randn(2, 3, t, 16) for _ in range(3))
    ours = F.scaled_dot_product_attention(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(ours, ref, n=16 + t, scale=attention_scale(q, k, v))


def test_sdpa_returns_weights():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, dtype=torch.float64) for _ in range(3))
    out, w = F.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
    assert_close(w.sum(-1), torch.ones(2, 5, dtype=torch.float64), n=5)
    assert torch.equal(w.triu(1), torch.zeros_like(w))  # exact: masked weights are 0 by definition
    assert_close(out, w @ v, n=5, scale=attention_scale(q, k, v))


def test_sdpa_fully_masked_rows_zero_output_and_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 2] = False  # query 2 may attend nothing
    out = F.scaled_dot_product_attention(q, k, v, mask=mask)
    assert torch.equal(out[0, 2], torch.zeros(3, dtype=torch.float64))  # exact: no keys gives 0 by definition
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, 2], torch.zeros(3, dtype=torch.float64))  # exact: nothing flows back


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_half_precision_large_scores(dtype):
    torch.manual_seed(0)
    q = (torch.randn(2, 7, 8) * 30).to(dtype)  # scores in the thousands
    k = (torch.randn(2, 7, 8) * 30).to(dtype)
    v = torch.randn(2, 7, 8).to(dtype)
    out = F.scaled_dot_product_attention(q, k, v, causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), causal=True)
    # float32 math on scores in the thousands (n = d + T), then one rounding of the output to the half dtype
    terms = attention_scale(q.double(), k.double(), v.double())
    bound = tols(torch.float32, 8 + 7, scale=terms)["atol"] + tols(dtype, 0, ops=1, scale=float(v.abs().max()))["atol"]
    torch.testing.assert_close(out.double(), ref, atol=bound, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(causal, masked):
    torch.manual_seed(1)
    q = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(2, 4, 5) > 0.4
        mask[:, :, -1] = True  # every query keeps at least its last key
    assert torch.autograd.gradcheck(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask=mask, causal=causal), (q, k, v)
    )


def test_dropout_in_sdpa_draws_like_nn_dropout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 2) for _ in range(3))
    torch.manual_seed(123)
    _, w = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, return_weights=True)
    torch.manual_seed(123)
    ref = torch.nn.Dropout(0.5)(F.softmax(q @ k.T / math.sqrt(2)))
    assert_close(w, ref, n=2 + 6, scale=2 * attention_scale(q, k))  # dropout doubles the kept weights
    # training=False: no dropout.
    out_eval = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, training=False)
    assert_close(out_eval, F.scaled_dot_product_attention(q, k, v), n=2 + 6, scale=attention_scale(q, k, v))


# -- errors ---------------------------------------------------------------------------------------


def test_errors_name_argument_expected_and_actual():
    q = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match=r"q must be a floating-point tensor, got dtype torch.int64"):
        F.scaled_dot_product_attention(q.long(), q, q)
    with pytest.raises(ValueError, match=r"q and k must have the same last dimension d_k, got 4 and 5"):
        F.scaled_dot_product_attention(q, torch.randn(2, 3, 5), q)
    with pytest.raises(ValueError, match=r"k and v must have the same number of tokens, got 3 and 2"):
        F.scaled_dot_product_attention(q, q, torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"mask must broadcast to \(\.\.\., 3, 3\).*got shape \(3, 4\)"):
        F.scaled_dot_product_attention(q, q, q, mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be bool .* or float .*got dtype torch.int64"):
        F.scaled_dot_product_attention(q, q, q, mask=torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"query has 3 elements but inputs rows have 4"):
        F.dot_scores(torch.randn(3), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"inputs must have 2 dimensions \(num_tokens, d\), got shape \(4,\)"):
        F.dot_scores_loop(torch.randn(4), torch.randn(4))


def test_mask_leading_dimensions_must_fit_the_batch():
    q = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"mask leading dimensions \(3,\) must broadcast to the batch/head dimensions \(2,\)"):
        F.scaled_dot_product_attention(q, q, q, mask=torch.ones(3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask leading dimensions \(4, 2\) must broadcast"):
        F.scaled_dot_product_attention(q, q, q, mask=torch.ones(4, 2, 5, 5, dtype=torch.bool))
    out = F.scaled_dot_product_attention(q, q, q, mask=torch.ones(1, 5, 5, dtype=torch.bool))
    assert out.shape == (2, 5, 4)


def test_no_keys_gives_zeros_and_zero_grads_like_torch_math():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 3, 5, 8, requires_grad=True)
    k, v = torch.randn(2, 3, 0, 8, requires_grad=True), torch.randn(2, 3, 0, 8, requires_grad=True)
    out = F.scaled_dot_product_attention(q, k, v, causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))  # exact: no keys, both 0
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))  # exact: no keys, nothing flows back
    assert F.softmax(torch.randn(3, 0)).shape == (3, 0)


def test_grouped_query_is_repeat_interleave_of_the_key_value_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 4, 5), torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 2)
    assert F.kv_groups(q, k) == 2
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    terms = attention_scale(q, k, v)
    assert_close(F.scaled_dot_product_attention(q, k, v), expected, n=5 + 7, scale=terms)
    assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True), expected, n=5 + 7,
                 scale=terms)


def test_broadcast_shape_agrees_with_torch():
    for shapes in [((2, 3), (3,)), ((2, 1), (1, 4)), ((), (5,)), ((2, 3), (4, 3)), ((1,), (1, 1, 1))]:
        try:
            expected = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            expected = None
        assert F.broadcast_shape(*shapes) == expected


def test_rank_is_checked_before_shapes_are_read():
    with pytest.raises(ValueError, match=r"scores must have at least 1 dimension"):
        F.softmax(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"weights must have at least 1 dimension .* and values at least 2"):
        F.context_vectors(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"q must have at least 2 dimensions"):
        F.scaled_dot_product_attention(torch.ones(3), torch.ones(3, 2), torch.ones(3, 2))
