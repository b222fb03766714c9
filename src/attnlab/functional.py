"""The attention math, written once, from scratch on PyTorch tensors.

Every module, the explain walkthrough and the report build on these functions; nothing else in attnlab
computes scores, weights or context vectors on its own. Functions come in the chapter's order:
scores of one query (an explicit loop, then the matrix form), all-pairs scores, normalisations,
context vectors, the two ways of causal masking, and scaled dot-product attention.

Shape letters:
    T    number of tokens (inputs)          d    embedding size of one token
    T_q  number of queries                  T_k  number of keys (= values)
    d_k  size of a query/key vector         d_v  size of a value vector
    ...  any leading batch / head dimensions

Mask convention (the one of ``torch.nn.functional.scaled_dot_product_attention``, see
:mod:`attnlab.masks`): a boolean mask is True where a query **may attend** a key; a float mask is
added to the scores (0 = keep, ``-inf`` = masked out).

A query whose keys are all masked out gets weights of zeros, hence a context vector of zeros and zero
gradients, never NaN.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.masks import and_masks, index_mask

__all__ = [
    "dot_scores_loop",
    "dot_scores",
    "all_pair_scores",
    "normalize_by_sum",
    "softmax_naive",
    "softmax",
    "context_vector_loop",
    "context_vectors",
    "mask_after_softmax",
    "mask_before_softmax",
    "compute_dtype",
    "masked_scores",
    "scaled_dot_product_attention",
    "kv_groups",
    "repeat_kv",
    "check_qkv",
]


# --------------------------------------------------------------------------------------------------
# Checks shared by the functions below
# --------------------------------------------------------------------------------------------------


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise AttnlabInputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise AttnlabInputTypeError(
            f"{name} must be a floating-point tensor, got dtype {t.dtype} (convert it with {name}.float())"
        )


def _check_rank(name: str, t: Tensor, ranks: tuple[int, ...], layout: str) -> None:
    if t.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise AttnlabInputError(f"{name} must have {want} dimensions {layout}, got shape {tuple(t.shape)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float16/bfloat16 are accumulated in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------------------------------
# Simplified self-attention: scores, normalisations, context vectors (chapter 3.3)
# --------------------------------------------------------------------------------------------------


def dot_scores_loop(query: Tensor, inputs: Tensor) -> Tensor:
    """Attention scores of one query against every input, one dot product at a time (as the chapter
    first writes it): ``scores[i] = query · inputs[i]``.

    query: (d,)   inputs: (T, d)   ->   scores: (T,)
    """
    _check_float("query", query)
    _check_float("inputs", inputs)
    _check_rank("query", query, (1,), "(d,)")
    _check_rank("inputs", inputs, (2,), "(num_tokens, d)")
    if inputs.shape[1] != query.shape[0]:
        raise AttnlabInputError(
            f"query has {query.shape[0]} elements but inputs rows have {inputs.shape[1]}: they must match"
        )
    scores = torch.empty(inputs.shape[0], dtype=query.dtype, device=query.device)  # (T,)
    for i, x_i in enumerate(inputs):
        scores[i] = torch.dot(x_i, query)
    return scores


def dot_scores(query: Tensor, inputs: Tensor) -> Tensor:
    """The same scores as :func:`dot_scores_loop` in matrix form: ``inputs @ query``.

    query: (d,)   inputs: (T, d)   ->   scores: (T,)
    """
    _check_float("query", query)
    _check_float("inputs", inputs)
    _check_rank("query", query, (1,), "(d,)")
    _check_rank("inputs", inputs, (2,), "(num_tokens, d)")
    if inputs.shape[1] != query.shape[0]:
        raise AttnlabInputError(
            f"query has {query.shape[0]} elements but inputs rows have {inputs.shape[1]}: they must match"
        )
    return inputs @ query  # (T,)


def all_pair_scores(queries: Tensor, keys: Tensor | None = None) -> Tensor:
    """Scores of every query against every key: ``queries @ keys^T``. With ``keys=None`` the inputs
    attend to themselves (the chapter's ``inputs @ inputs.T``).

    queries: (..., T_q, d_k)   keys: (..., T_k, d_k)   ->   scores: (..., T_q, T_k)
    """
    keys = queries if keys is None else keys
    _check_float("queries", queries)
    _check_float("keys", keys)
    if queries.dim() < 2 or keys.dim() < 2:
        raise AttnlabInputError(
            f"queries and keys must have at least 2 dimensions (..., num_tokens, d), got shapes "
            f"{tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if queries.shape[-1] != keys.shape[-1]:
        raise AttnlabInputError(
            f"queries and keys must have the same last dimension d_k, got {queries.shape[-1]} and "
            f"{keys.shape[-1]}"
        )
    return queries @ keys.transpose(-2, -1)  # (..., T_q, T_k)


def normalize_by_sum(scores: Tensor, dim: int = -1) -> Tensor:
    """Divide-by-sum normalisation, ``scores / scores.sum()``: sums to 1 but, unlike softmax, can give
    negative or infinite weights when scores are negative. Shape unchanged."""
    _check_float("scores", scores)
    return scores / scores.sum(dim=dim, keepdim=True)


def softmax_naive(scores: Tensor, dim: int = -1) -> Tensor:
    """The textbook softmax, ``exp(x) / sum(exp(x))``: overflows for scores above ~88 in float32
    (exp(89) = inf), which is why :func:`softmax` exists. Shape unchanged."""
    _check_float("scores", scores)
    e = torch.exp(scores)
    return e / e.sum(dim=dim, keepdim=True)


def softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Numerically stable softmax: subtract the row maximum before ``exp`` (the result is the same
    mathematically, and no ``exp`` ever overflows). ``-inf`` scores get weight 0; a row that is all
    ``-inf`` (every key masked out) gets weights of 0 — not NaN — and zero gradients.
    float16/bfloat16 scores are computed in float32 and returned in their own dtype. Shape unchanged."""
    _check_float("scores", scores)
    if scores.dim() == 0:
        raise AttnlabInputError("scores must have at least 1 dimension (a row of scores), got a 0-d tensor")
    x = scores.to(compute_dtype(scores.dtype))
    if x.shape[dim] == 0:  # no keys at all: nothing to normalise (and amax has nothing to reduce)
        return scores.clone()
    row_max = x.detach().amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # all -inf rows
    e = torch.exp(x - row_max)
    total = e.sum(dim=dim, keepdim=True)
    total = torch.where(total > 0, total, torch.ones_like(total))  # 0 / 1 = 0 for fully masked rows
    return (e / total).to(scores.dtype)


def context_vector_loop(weights: Tensor, inputs: Tensor) -> Tensor:
    """A context vector as the chapter first writes it: ``sum_i weights[i] * inputs[i]``, one term at a
    time.

    weights: (T,)   inputs: (T, d)   ->   context: (d,)
    """
    _check_float("weights", weights)
    _check_float("inputs", inputs)
    _check_rank("weights", weights, (1,), "(num_tokens,)")
    _check_rank("inputs", inputs, (2,), "(num_tokens, d)")
    if weights.shape[0] != inputs.shape[0]:
        raise AttnlabInputError(
            f"weights has {weights.shape[0]} entries but inputs has {inputs.shape[0]} rows: they must match"
        )
    context = torch.zeros(inputs.shape[1], dtype=inputs.dtype, device=inputs.device)  # (d,)
    for i, x_i in enumerate(inputs):
        context = context + weights[i] * x_i
    return context


def context_vectors(weights: Tensor, values: Tensor) -> Tensor:
    """Context vectors as attention-weighted sums of the values, in matrix form: ``weights @ values``.

    weights: (..., T_q, T_k)   values: (..., T_k, d_v)   ->   context: (..., T_q, d_v)
    """
    _check_float("weights", weights)
    _check_float("values", values)
    if weights.dim() < 1 or values.dim() < 2:
        raise AttnlabInputError(
            f"weights must have at least 1 dimension (..., T_k) and values at least 2 (..., T_k, d_v), got "
            f"shapes {tuple(weights.shape)} and {tuple(values.shape)}"
        )
    if weights.shape[-1] != values.shape[-2]:
        raise AttnlabInputError(
            f"weights has {weights.shape[-1]} keys but values has {values.shape[-2]} rows: they must match"
        )
    return weights @ values  # (..., T_q, d_v)


# --------------------------------------------------------------------------------------------------
# Causal masking, both ways the chapter shows (3.5.1)
# --------------------------------------------------------------------------------------------------


def mask_after_softmax(weights: Tensor, allowed: Tensor) -> Tensor:
    """First way: zero the weights of masked pairs *after* softmax, then renormalise each row to sum
    to 1. A row with nothing left stays all zeros.

    weights: (..., T_q, T_k)   allowed: bool, broadcastable to weights   ->   (..., T_q, T_k)
    """
    masked = weights * allowed  # (..., T_q, T_k)
    total = masked.sum(dim=-1, keepdim=True)
    return masked / torch.where(total > 0, total, torch.ones_like(total))


def mask_before_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """Second way: set the scores of masked pairs to ``-inf`` *before* softmax, so that they get weight
    exp(-inf) = 0 and the softmax normalises over the allowed keys only.

    scores: (..., T_q, T_k)   allowed: bool, broadcastable to scores   ->   (..., T_q, T_k)
    """
    return scores.masked_fill(~allowed, float("-inf"))


# --------------------------------------------------------------------------------------------------
# Scaled dot-product attention (3.4 onwards): the reference every backend is compared against
# --------------------------------------------------------------------------------------------------


def broadcast_shape(*shapes: tuple[int, ...] | torch.Size) -> tuple[int, ...] | None:
    """The shape the given shapes broadcast to, or None if they do not (``torch.broadcast_shapes``
    without its cost, which dominates a small layer's forward; works on symbolic sizes)."""
    out: list[int] = []
    for dims in zip(*(((1,) * (max(map(len, shapes)) - len(s))) + tuple(s) for s in shapes)):
        size = 1
        for d in dims:
            if d != 1:
                if size != 1 and d != size:
                    return None
                size = d
        out.append(size)
    return tuple(out)


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> int:
    """Validate q (..., T_q, d_k), k (..., T_k, d_k), v (..., T_k, d_v) (see :func:`_check_qkv_all`) and
    return :func:`kv_groups` ``(q, k)``.

    A fast path first, since every attention call runs this: it returns at once for the layouts attention
    is called with (float tensors of one dtype, equal leading dims, or 4-D grouped-query heads with equal
    batches). Anything else, valid or not, goes through the full check, which raises the same errors."""
    if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor):
        qs, ks, vs = q.shape, k.shape, v.shape
        n = len(qs)
        dtype = q.dtype
        if (n >= 2 and len(ks) >= 2 and len(vs) >= 2 and k.dtype == dtype and v.dtype == dtype
                and q.is_floating_point() and qs[-1] == ks[-1] and ks[-2] == vs[-2]):
            if qs[:-2] == ks[:-2] == vs[:-2]:
                return 1  # the same batch/head dims: nothing to broadcast, no head groups
            if n == 4 and len(ks) == 4 and len(vs) == 4 and qs[0] == ks[0] == vs[0] and ks[1] == vs[1]:
                h, h_kv = qs[1], ks[1]
                if h_kv == 1:
                    return 1  # one key/value head, broadcast over the query heads
                if h != 1 and h % h_kv == 0:
                    return h // h_kv  # grouped-query heads (B, H, ., .) with (B, H_kv, ., .)
    return _check_qkv_all(q, k, v)


def _check_qkv_all(q: Tensor, k: Tensor, v: Tensor) -> int:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise AttnlabInputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise AttnlabInputError(f"{name} must have at least 2 dimensions (..., num_tokens, d), got {tuple(t.shape)}")
        _check_float(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise AttnlabInputTypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise AttnlabInputError(f"q and k must have the same last dimension d_k, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise AttnlabInputError(
            f"k and v must have the same number of tokens, got {k.shape[-2]} and {v.shape[-2]}"
        )
    groups = kv_groups(q, k)
    k_lead = k.shape[:-2] if groups == 1 else (*k.shape[:-3], q.shape[-3])
    v_lead = v.shape[:-2] if groups == 1 or v.dim() < 3 else (*v.shape[:-3], v.shape[-3] * groups)
    if broadcast_shape(q.shape[:-2], k_lead, v_lead) is None:
        raise AttnlabInputError(
            f"q, k and v leading (batch/head) dimensions must broadcast, got {tuple(q.shape[:-2])}, "
            f"{tuple(k.shape[:-2])} and {tuple(v.shape[:-2])}"
        )
    return groups


def kv_groups(q: Tensor, k: Tensor) -> int:
    """How many query heads share one key/value head (grouped-query attention): ``H // H_kv`` when
    q is (..., H, T_q, d) and k is (..., H_kv, T_k, d) with ``1 < H_kv < H`` and ``H % H_kv == 0``;
    1 when the head dims are equal or broadcast (``H_kv == 1``). Query head ``h`` uses key/value head
    ``h // (H // H_kv)``, the grouping of ``repeat_interleave`` and of torch's ``enable_gqa``."""
    if q.dim() < 3 or k.dim() < 3:
        return 1
    h, h_kv = q.shape[-3], k.shape[-3]
    if h_kv == h or h_kv == 1 or h == 1:
        return 1
    if h % h_kv != 0:
        raise AttnlabInputError(
            f"the number of query heads must be a multiple of the number of key/value heads "
            f"(grouped-query attention), got {h} query heads (q.shape[-3]) and {h_kv} key/value heads "
            f"(k.shape[-3])"
        )
    return h // h_kv


def repeat_kv(t: Tensor, groups: int) -> Tensor:
    """Key/value heads repeated for grouped-query attention: (..., H_kv, T, d) -> (..., H_kv * groups, T, d),
    each head ``groups`` times in a row (``repeat_interleave``)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=-3)  # (..., H, T, d)


def check_mask(mask: Tensor, t_q: int, t_k: int, *, name: str = "mask", batch_shape: tuple[int, ...] | None = None) -> None:
    """Validate that ``mask`` is a bool or float tensor broadcastable to (..., T_q, T_k), and, given the
    leading (batch/head) shape of the scores, to ``batch_shape + (T_q, T_k)`` without enlarging it."""
    if not isinstance(mask, Tensor):
        raise AttnlabInputTypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise AttnlabInputTypeError(
            f"{name} must be bool (True = may attend) or float (added to the scores), got dtype {mask.dtype}"
        )
    if mask.dim() < 2 or mask.shape[-2] not in (1, t_q) or mask.shape[-1] not in (1, t_k):
        raise AttnlabInputError(
            f"{name} must broadcast to (..., {t_q}, {t_k}) (num_queries, num_keys), got shape {tuple(mask.shape)}"
        )
    if batch_shape is not None:
        lead = tuple(mask.shape[:-2])
        if broadcast_shape(lead, tuple(batch_shape)) != tuple(batch_shape):
            raise AttnlabInputError(
                f"{name} leading dimensions {lead} must broadcast to the batch/head dimensions "
                f"{tuple(batch_shape)} of the scores, got mask shape {tuple(mask.shape)}"
            )


def masked_scores(
    q: Tensor,
    k: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    batch_shape: tuple[int, ...] | None = None,
    softcap: float | None = None,
) -> Tensor:
    """The scaled scores ``q k^T * scale`` with the masks applied (masked pairs ``-inf``, a float mask
    added), in the compute dtype: what the softmax of :func:`scaled_dot_product_attention` normalises.
    ``torch.logsumexp(masked_scores(...), -1)`` is the natural-log log-sum-exp of each query row
    (``-inf`` for a row with no allowed key), the statistic FlashAttention returns.

    q: (..., T_q, d_k)   k: (..., T_k, d_k) (grouped-query k is repeated)   ->   (..., T_q, T_k)
    """
    k = repeat_kv(k, kv_groups(q, k))  # (..., H, T_k, d_k)
    t_q, t_k = q.shape[-2], k.shape[-2]
    if mask is not None:
        check_mask(mask, t_q, t_k, batch_shape=batch_shape)
    work = compute_dtype(q.dtype)
    q, k = q.to(work), k.to(work)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = all_pair_scores(q, k) * scale  # (..., T_q, T_k)
    if softcap is not None:  # Gemma 2's score cap, before any mask: softcap * tanh(score / softcap)
        scores = torch.tanh(scores / softcap) * softcap  # (..., T_q, T_k)
    allowed = index_mask(t_q, t_k, causal=causal, window=window, device=q.device)  # (T_q, T_k) or None
    if mask is not None and mask.dtype == torch.bool:
        allowed = and_masks(allowed, mask)  # (..., T_q, T_k)
    elif mask is not None:
        scores = scores + mask.to(work)  # (..., T_q, T_k)
    if allowed is not None:
        scores = mask_before_softmax(scores, allowed)  # (..., T_q, T_k)
    return scores


@overload
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    return_weights: Literal[False] = False,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor: ...


@overload
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    return_weights: Literal[True],
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]: ...


@overload
def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    return_weights: bool = False,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]: ...


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    return_weights: bool = False,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, the eager reference.

    q: (..., T_q, d_k)   k: (..., T_k, d_k)   v: (..., T_k, d_v)   ->   out: (..., T_q, d_v)
    (grouped-query: q (..., H, T_q, d_k) with k, v (..., H_kv, T_k, d), ``H % H_kv == 0``, see
    :func:`kv_groups`) and, with ``return_weights=True``, the attention weights (..., T_q, T_k) that multiplied ``v``
    (after dropout, if any).

    mask:      bool (True = may attend) or float (added to the scores), broadcastable to (..., T_q, T_k).
    causal:    query i may attend key j iff ``j <= i + (T_k - T_q)`` (aligned bottom-right, as
               ``torch.nn.attention.bias.causal_lower_right``); combines with ``mask``.
    window:    None or an int >= 1: sliding window, implies causal: query i sees key j iff
               ``i + (T_k - T_q) - window < j <= i + (T_k - T_q)`` (:func:`attnlab.masks.window_mask`).
    scale:     multiplies the scores; default ``1 / sqrt(d_k)``.
    softcap:   None or c > 0: the scaled scores become ``c * tanh(score / c)`` before the masks (Gemma 2).
    dropout_p: dropout on the weights (scaled by ``1 / (1 - p)``), only when ``training``; it draws
               from torch's global RNG exactly as ``torch.nn.Dropout`` does, so the chapter's seeds work.

    float16/bfloat16 inputs are computed in float32 (scores, softmax, weighted sum) and the result is
    returned in the input dtype. Fully masked query rows give zeros, not NaN; no keys at all
    (``T_k = 0``) gives zeros too, with zero gradients, as PyTorch's math kernel does.
    """
    groups = check_qkv(q, k, v)  # kv_groups(q, k)
    if not 0.0 <= dropout_p < 1.0:
        raise AttnlabInputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise AttnlabInputError(f"window must be None or an int >= 1, got {window!r}")
    v = repeat_kv(v, groups)  # (..., H, T_k, d_v)
    out_dtype = q.dtype
    k_lead = tuple(k.shape[:-2]) if groups == 1 else (*k.shape[:-3], k.shape[-3] * groups)
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0.0 < softcap < math.inf):
        raise AttnlabInputError(f"softcap must be None or a positive finite float, got {softcap!r}")
    scores = masked_scores(q, k, mask=mask, causal=causal, window=window, scale=scale, softcap=softcap,
                           batch_shape=broadcast_shape(q.shape[:-2], k_lead, v.shape[:-2]))  # (..., T_q, T_k)
    v = v.to(scores.dtype)
    weights = softmax(scores, dim=-1)  # (..., T_q, T_k)
    if dropout_p > 0.0 and training:
        weights = torch.nn.functional.dropout(weights, p=dropout_p, training=True)
    out = context_vectors(weights, v).to(out_dtype)  # (..., T_q, d_v)
    if return_weights:
        return out, weights.to(out_dtype)
    return out
