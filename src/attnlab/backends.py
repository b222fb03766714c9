"""Attention backends: one signature, a table of implementations.

Modules project, split and merge heads; the attention itself is one call,
``attention(q, k, v, mask=..., causal=..., window=..., scale=..., dropout_p=..., training=..., backend=...)``.
Every backend computes the same function as the eager reference
:func:`attnlab.functional.scaled_dot_product_attention` (tested), with the package's mask convention
(bool True = may attend; float = added to the scores), bottom-right causal alignment, sliding windows
(``window``, which implies causal) and grouped-query key/value heads (k, v with ``H_kv`` heads,
``H % H_kv == 0``; query head ``h`` uses key/value head ``h // (H // H_kv)``).

- ``"eager"``: the reference, from scratch (the chapter's math; can return the weights).
- ``"torch"``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's fused kernels).
- ``"flash"``: attnlab's own blocked, online-softmax kernel (:mod:`attnlab.flash`). It never builds a
  ``T_q x T_k`` matrix, so it takes the masks that say which *keys* each batch element may use (a
  padding mask (B, 1, 1, T_k) and its broadcast forms), plus ``causal`` and ``window``.
- ``"auto"``: the fastest path that gives the reference's numbers: ``"eager"`` when the call needs the
  weights, or needs dropout drawn like ``torch.nn.Dropout`` on a device where PyTorch's fused kernel
  draws it differently (see :data:`SDPA_DROPOUT_LIKE_NN_DROPOUT`); ``"torch"`` otherwise.
- anything added with :func:`register` (check it with :func:`attnlab.testing.assert_same_function`).

The mask of a call is one description, :class:`attnlab.masks.MaskSpec` (``mask=`` takes one; the keywords
``mask`` as a tensor, ``causal``, ``window`` and ``document_ids`` build one), plus an optional score bias
(``bias=``, or a float ``mask``). Each backend converts it once: ``eager``/``torch``/registered ones get one
dense mask (causal/window stay flags when aligned by index), ``flash`` its tile plan; :data:`TAKES` says
what each backend reads, and ``auto`` never picks a backend that cannot take the call.

Packed sequences: ``document_ids=`` (integer, (B, T) or (T,), ``T_q == T_k``, B = ``q.shape[0]``) lets a
query attend only the keys of its own document. It is a part of the call's description: ``flash`` passes
it to its kernel (which skips the tiles of other documents); every other backend gets it in the one dense
mask of :meth:`attnlab.masks.MaskSpec.dense` (``doc_q == doc_k`` AND the rest; -inf in a float mask).

``return_lse=True`` also returns the natural-log log-sum-exp of each query row's masked, scaled scores
(FlashAttention's convention: shape (..., H, T_q), i.e. ``out.shape[:-1]``; ``-inf`` for a row with no
allowed key; in the compute dtype: float32 for float16/bfloat16/float32 inputs, float64 for float64).
``flash`` returns the kernel's own statistic (no gradient flows through it); the other backends compute it
exactly as ``torch.logsumexp`` of :func:`attnlab.functional.masked_scores` (differentiable; it costs one
``T_q x T_k`` score matrix more).

Non-finite inputs: a NaN or inf in one position's query, key or value makes the scores of that key NaN
for every query that may attend it, so every output row that may see that position becomes NaN (with
``causal=False`` and no mask: every row), on every backend, as in ``torch.nn.MultiheadAttention``; on
``flash`` also the rows of the same tile that the mask hides from it (the mask is added to the scores).
Check your inputs (``torch.isfinite``) upstream; attention does not clean them.

Nothing here reads tensor *values* to decide a path (no host sync), so every backend traces under
``torch.compile(fullgraph=True)`` and ``torch.export``; sizes may be symbolic (``torch.SymInt``).
A query whose keys are all masked out gets zeros on every backend.

Shape letters: B batch, H query heads, H_kv key/value heads, T_q / T_k query / key tokens,
d_k / d_v head sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast, overload

import torch
from torch import Tensor

from attnlab import functional as F
from attnlab.alibi import ALiBiBias
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.masks import MaskSpec, index_mask

__all__ = ["AttentionFn", "BACKENDS", "TAKES", "Takes", "ScoreBias", "takes", "dense_bias", "attention", "register", "unregister", "resolve"]

AttentionFn = Callable[..., Tensor]

# Device types on which torch's scaled_dot_product_attention with dropout_p > 0 draws the dropout mask
# exactly as torch.nn.Dropout does on the attention weights (same generator, same number of draws, same
# shape), so that "auto" may use it in training. Checked by tests/test_backends.py, not assumed: on CPU,
# PyTorch 2.13 runs dropout through its math kernel (aten::dropout on the weights). On CUDA the fused
# kernels draw with their own Philox stream, so there "auto" keeps the eager path in training with dropout
# (ask for backend="torch" to trade identical draws for speed).
SDPA_DROPOUT_LIKE_NN_DROPOUT: frozenset[str] = frozenset({"cpu"})

# Device types on which torch's scaled_dot_product_attention returns zeros (and zero, finite gradients)
# for a query whose keys are all masked out, as the reference does. Checked by tests/test_backends.py on
# CPU; elsewhere the torch backend makes such rows safe itself (see _torch_sdpa), without a host sync.
SDPA_ZEROS_FOR_EMPTY_ROWS: frozenset[str] = frozenset({"cpu"})

_BUILTIN = ("eager", "torch", "flash")


# --------------------------------------------------------------------------------------------------
# The backends
# --------------------------------------------------------------------------------------------------


def _eager(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, mask=mask, causal=causal, window=window, scale=scale, dropout_p=dropout_p, training=training
    )  # (..., T_q, d_v)


def _torch_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    return _torch_sdpa_grouped(q, k, v, F.kv_groups(q, k), mask=mask, causal=causal, window=window, scale=scale,
                               dropout_p=dropout_p, training=training)  # (..., T_q, d_v)


def _torch_sdpa_grouped(q: Tensor, k: Tensor, v: Tensor, groups: int, *, mask: Tensor | None, causal: bool,
                        window: int | None, scale: float | None, dropout_p: float, training: bool) -> Tensor:
    """:func:`_torch_sdpa` with ``groups = kv_groups(q, k)`` already known (:func:`attention` has it from
    its checks)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    enable_gqa = groups > 1 and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
    if groups > 1 and not enable_gqa:
        k, v = F.repeat_kv(k, groups), F.repeat_kv(v, groups)  # (..., H, T_k, d)
    # torch's is_causal is top-left aligned; it equals ours when T_q == T_k. (An `if`, not bool(...):
    # with symbolic sizes the comparison is a SymBool, which an `if` turns into a guard.)
    is_causal = False
    if causal and window is None and mask is None and t_q == t_k:
        is_causal = True
    attn_mask = mask
    if not is_causal:
        structure = index_mask(t_q, t_k, causal=causal, window=window, device=q.device)  # (T_q, T_k) or None
        if structure is not None:
            if attn_mask is None or attn_mask.dtype == torch.bool:
                attn_mask = structure if attn_mask is None else structure & attn_mask  # (..., T_q, T_k)
            else:
                attn_mask = F.mask_before_softmax(attn_mask, structure)  # (..., T_q, T_k)
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)  # torch wants a float mask in the query's dtype
    keep_rows = None
    if attn_mask is not None and q.device.type not in SDPA_ZEROS_FOR_EMPTY_ROWS:
        # Make rows with no allowed key safe on any kernel, without a host sync: let them attend every
        # key (a finite, harmless softmax), then zero their output (their gradients are then zero).
        allowed = attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)
        keep_rows = allowed.any(dim=-1, keepdim=True)  # (..., T_q, 1)
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask | ~keep_rows  # (..., T_q, T_k)
        else:
            attn_mask = attn_mask.masked_fill(~keep_rows, 0.0)  # (..., T_q, T_k)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p if training else 0.0, is_causal=is_causal,
        scale=scale, enable_gqa=enable_gqa,
    )  # (..., T_q, d_v)
    if keep_rows is not None:
        out = out * keep_rows.to(out.dtype)  # (..., T_q, d_v)
    return out


def _flash(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    """The table's entry for ``"flash"`` in the keyword style of every backend (a padding-style bool mask)."""
    spec, bias = MaskSpec.describe(mask, causal=causal, window=window)
    return _flash_with_lse(q, k, v, spec, bias, scale=scale, dropout_p=dropout_p, training=training)[0]


ScoreBias = Tensor | ALiBiBias  # a float tensor added to the scores, or a description with a dense form


def dense_bias(bias: ScoreBias | None, t_q: int, t_k: int, device: torch.device) -> Tensor | None:
    """A score bias as the float tensor it stands for (a tensor is itself)."""
    if bias is None or isinstance(bias, Tensor):
        return bias
    return bias.dense(t_q, t_k, device=device)  # (1|B, H, T_q, T_k)


def _flash_with_lse(
    q: Tensor, k: Tensor, v: Tensor, spec: MaskSpec, bias: ScoreBias | None, *, scale: float | None,
    dropout_p: float, training: bool,
) -> tuple[Tensor, Tensor]:
    """The flash kernel's ``(out, lse)`` for a mask description: its parts go to the kernel as they are
    (it turns them into its tile plan and skips hidden tiles); what has no tile form is refused here."""
    from attnlab.flash import flash_attention

    slopes, positions = None, None
    if isinstance(bias, ALiBiBias):  # per tile, from its slopes and positions
        slopes = bias.slopes.to(q.device)
        if bias.query_positions is not None and bias.key_positions is not None:
            positions = (bias.query_positions, bias.key_positions)
    elif bias is not None:
        raise AttnlabInputError(
            f"the flash backend takes no dense score bias (a float mask; got one of shape {tuple(bias.shape)}), "
            f"only ALiBi's slopes: use backend='eager', 'torch' or 'auto' ({_TAKES_NOTE})")
    if spec.query_positions is not None:
        raise AttnlabInputError(
            "the flash backend aligns causal/window by index and takes no query/key positions: put the keys in "
            f"position order (see CacheStep.ordered), or use backend='eager', "
            f"'torch' or 'auto' ({_TAKES_NOTE})")
    padding = spec.key_padding
    if spec.allowed is not None:
        F.check_mask(spec.allowed, q.shape[-2], k.shape[-2])
        from_mask = _key_padding_from_mask(spec.allowed, q, k)  # (B, T_k), True = padding
        padding = from_mask if padding is None else padding | from_mask  # (B, T_k)
    causal, window = spec.by_index
    return cast(tuple[Tensor, Tensor], flash_attention(
        q, k, v, causal=causal, window=window, scale=scale, key_padding_mask=padding,
        dropout_p=dropout_p if training else 0.0, document_ids=spec.document_ids, return_lse=True,
        alibi_slopes=slopes, alibi_positions=positions,
    ))  # (..., T_q, d_v), (..., T_q)


def _key_padding_from_mask(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """A padding-style attention mask, bool True = may attend, broadcastable to (B, 1, 1, T_k) — e.g.
    (B, 1, 1, T_k), (1, 1, 1, T_k), (B, 1, 1, 1), (1, T_k) — as the kernel's key padding mask (B, T_k),
    True = padding. Any other mask is refused with what the flash backend takes."""
    t_k = k.shape[-2]
    what = (
        "the flash backend takes a bool mask that only says which keys each batch element may attend "
        "(a key padding mask of shape (batch, 1, 1, num_keys), or a form of it that broadcasts, such as "
        "(1, 1, 1, num_keys) or (batch, 1, 1, 1)), together with causal= and window=; "
    )
    if not isinstance(mask, Tensor):
        raise AttnlabInputTypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise AttnlabInputError(
            what + f"got a {mask.dtype} mask of shape {tuple(mask.shape)}; pass a bool mask "
            "(True = may attend), or use backend='eager', 'torch' or 'auto' for float masks"
        )
    if q.dim() != 4 or mask.dim() > 4 or mask.dim() < 1:
        raise AttnlabInputError(
            what + f"got a mask of shape {tuple(mask.shape)} for q of shape {tuple(q.shape)} "
            "(the flash backend takes masks with 4-D q of shape (batch, heads, num_queries, d))"
        )
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (B|1, H|1, T_q|1, T_k|1)
    if m.shape[1] != 1 or m.shape[2] != 1 or m.shape[3] not in (1, t_k) or m.shape[0] not in (1, q.shape[0]):
        raise AttnlabInputError(
            what + f"got a mask of shape {tuple(mask.shape)} (batch={q.shape[0]}, num_keys={t_k}), which "
            "varies over heads or queries; use backend='eager', 'torch' or 'auto' for such masks"
        )
    return (~m[:, 0, 0, :]).expand(q.shape[0], t_k)  # (B, T_k), True = padding


BACKENDS: dict[str, AttentionFn] = {
    "eager": _eager,
    "torch": _torch_sdpa,
    "flash": _flash,
}


@dataclass(frozen=True)
class Takes:
    """What a backend reads besides q, k, v, causal, window and a key padding mask.

    general_masks  any bool mask (T_q x T_k), query/key positions and a dense score bias (a float mask):
                   the mask description is handed over as one dense tensor (:meth:`MaskSpec.dense`);
                   False: only the parts that have a tile form (the flash kernel's tile plan);
    linear_bias    ALiBi's bias (:class:`attnlab.alibi.ALiBiBias`): densely, or per tile from its slopes;
    weights        ``need_weights=True``;
    softcap        ``softcap=`` (a score mod).
    """

    general_masks: bool = True
    linear_bias: bool = True
    weights: bool = False
    softcap: bool = False


#: What each backend takes; "auto" picks among the ones that take the call (never "flash", whose speed is
#: in skipped tiles, not in what a dense call offers). Registered backends take what "torch" takes.
TAKES: dict[str, Takes] = {
    "eager": Takes(weights=True, softcap=True),
    "torch": Takes(),
    "flash": Takes(general_masks=False),
}
_TAKES_NOTE = "attnlab.backends.TAKES lists what each backend takes"


def takes(backend: str) -> Takes:
    """What ``backend`` reads (:data:`TAKES`; a registered backend takes what ``"torch"`` takes)."""
    return TAKES.get(backend, _REGISTERED)


_REGISTERED = Takes()


def _taking(what: str) -> str:
    """The backends that take ``what``, for a message: ``'eager'`` (or ``'a' or 'b'``)."""
    return " or ".join(repr(name) for name, t in TAKES.items() if getattr(t, what))


def register(name: str, fn: AttentionFn, *, replace: bool = False) -> None:
    """Add a backend: ``fn(q, k, v, *, mask, causal, window, scale, dropout_p, training) -> out``, with
    q (B, H, T_q, d_k), k (B, H_kv, T_k, d_k), v (B, H_kv, T_k, d_v) and out (B, H, T_q, d_v); mask bool
    (True = may attend) or float (added to the scores), broadcastable to (B|1, H|1, T_q|1, T_k) or None;
    causal bottom-right aligned; window None or an int >= 1 (implies causal). Afterwards
    ``backend=name`` works in :func:`attention` and in ``MultiHeadAttention``. Check the function first
    with :func:`attnlab.testing.assert_same_function`. ``replace=True`` replaces a backend registered
    before under the same name (the built-in ones cannot be replaced)."""
    if not isinstance(name, str) or not name or name == "auto":
        raise AttnlabInputError(f"name must be a non-empty str other than 'auto', got {name!r}")
    if not callable(fn):
        raise AttnlabInputTypeError(f"fn must be callable, got {type(fn).__name__}")
    if name in _BUILTIN:
        raise AttnlabInputError(f"{name!r} is a built-in backend and cannot be replaced; register under another name")
    if name in BACKENDS and not replace:
        raise AttnlabInputError(f"a backend named {name!r} is already registered; pass replace=True to replace it")
    BACKENDS[name] = fn


def unregister(name: str) -> None:
    """Remove a backend added with :func:`register`."""
    if name in _BUILTIN:
        raise AttnlabInputError(f"{name!r} is a built-in backend and cannot be removed")
    if name not in BACKENDS:
        raise AttnlabInputError(f"no backend named {name!r} is registered; registered: {sorted(BACKENDS)}")
    del BACKENDS[name]


# --------------------------------------------------------------------------------------------------
# Choosing and calling a backend
# --------------------------------------------------------------------------------------------------


def resolve(
    backend: str,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    need_weights: bool = False,
    device: torch.device | str | None = None,
    **_ignored: object,
) -> str:
    """The backend that runs a call: ``backend`` itself, or for ``"auto"`` the fastest exact one
    (see the module docstring). ``device`` is the device of the call (default CPU). The choice depends on
    the call's arguments and device only, never on tensor values. (The keywords of earlier versions,
    ``mask``, ``causal``, ``t_q``, ``t_k``, are still accepted and no longer matter.)"""
    if backend not in BACKENDS and backend != "auto":
        raise AttnlabInputError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
    if need_weights:
        if backend != "auto" and not takes(backend).weights:
            raise AttnlabInputError(f"need_weights=True needs backend={_taking('weights')} or 'auto', got {backend!r}")
        return "eager"  # the weights come from the eager reference (the one backend that takes them)
    if backend != "auto":
        return backend
    if device is None:
        device_type = "cpu"
    elif isinstance(device, torch.device):
        device_type = device.type
    else:
        device_type = torch.device(device).type  # also what refuses a malformed device string
    if dropout_p > 0.0 and training and device_type not in SDPA_DROPOUT_LIKE_NN_DROPOUT:
        return "eager"
    return "torch"


def _check_call(q: object, k: object, v: object, causal: object, window: object, dropout_p: object) -> None:
    if (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor) and q.dim() >= 2
            and k.dim() >= 2 and v.dim() >= 2 and (causal is True or causal is False)
            and (window is None or (type(window) is int and window >= 1))
            and type(dropout_p) is float and 0.0 <= dropout_p < 1.0):
        return  # the usual call, valid: skip the checks below, which say what is wrong
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise AttnlabInputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise AttnlabInputError(
                f"{name} must have at least 2 dimensions (..., num_tokens, d), e.g. (batch, heads, "
                f"num_tokens, head_dim), got shape {tuple(t.shape)}"
            )
    if not isinstance(causal, bool):
        raise AttnlabInputTypeError(f"causal must be a bool, got {type(causal).__name__} ({causal!r})")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise AttnlabInputError(f"window must be None or an int >= 1, got {window!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise AttnlabInputError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _check_documents(document_ids: Tensor, q: Tensor, k: Tensor) -> None:
    """``document_ids`` of a call: integer (B, T) / (1, T) / (T,), T = T_q = T_k, on q's device."""
    if not isinstance(document_ids, Tensor):
        raise AttnlabInputTypeError(f"document_ids must be an integer torch.Tensor or None, got {type(document_ids).__name__}")
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise AttnlabInputTypeError(f"document_ids must have an integer dtype, got {document_ids.dtype}")
    if document_ids.device != q.device:
        raise AttnlabInputError(f"document_ids must be on the device of q ({q.device}), got {document_ids.device}")
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q != t_k:
        raise AttnlabInputError(f"document_ids need as many queries as keys (self-attention), got T_q={t_q}, T_k={t_k}")
    batch = q.shape[0] if q.dim() >= 3 else 1
    shape = tuple(document_ids.shape)
    if shape not in ((batch, t_q), (1, t_q), (t_q,)):
        raise AttnlabInputError(f"document_ids must have shape ({batch}, {t_q}) (batch, tokens) or ({t_q},), got {shape}")


def _dense(spec: MaskSpec, bias: Tensor | None, q: Tensor, k: Tensor) -> tuple[Tensor | None, bool, int | None]:
    """A mask description (and score bias) as the ``(mask, causal, window)`` of a backend that reads a dense
    mask: causal/window stay flags when aligned by index (the kernels build or skip them), the rest is one
    bool mask, or with a bias one float mask (-inf where hidden). Checked once here."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    causal, window = spec.by_index
    if spec.document_ids is not None:
        _check_documents(spec.document_ids, q, k)
    if spec.allowed is not None:
        F.check_mask(spec.allowed, t_q, t_k)
    if bias is not None:
        F.check_mask(bias, t_q, t_k, name="bias")
    allowed = None
    if spec.has_tensors:
        allowed = spec.dense(t_q, t_k, lead=max(q.dim(), k.dim()) - 2, device=q.device, flags=False)
    if bias is None or allowed is None:
        return (bias if allowed is None else allowed), causal, window
    return F.mask_before_softmax(bias, allowed), causal, window  # (..., T_q, T_k) float


def _reference_lse(q: Tensor, k: Tensor, *, mask: Tensor | None, causal: bool, window: int | None,
                   scale: float | None, out_shape: tuple[int, ...]) -> Tensor:
    """The exact natural-log log-sum-exp of each row's masked scaled scores: (..., T_q), -inf where no key."""
    scores = F.masked_scores(q, k, mask=mask, causal=causal, window=window, scale=scale)  # (..., T_q, T_k)
    return torch.logsumexp(scores, dim=-1).expand(out_shape)  # (..., T_q)


def _softcap_backend(backend: str, softcap: object, return_lse: bool) -> str:
    """The backend for a call with ``softcap``: "eager" (also for "auto"); a clear error otherwise."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0.0 < softcap < float("inf"):
        raise AttnlabInputError(f"softcap must be None or a positive finite float, got {softcap!r}")
    if (backend != "auto" and not takes(backend).softcap) or return_lse:
        raise AttnlabInputError(f"softcap (score capping, softcap * tanh(score / softcap)) is computed by backend="
                                f"{_taking('softcap')} only (and 'auto', which picks it), without return_lse; got "
                                f"backend={backend!r}"
                         + (", return_lse=True" if return_lse else ""))
    return "eager"


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | MaskSpec | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: Literal[False] = False,
    document_ids: Tensor | None = None,
    softcap: float | None = None,
    return_lse: Literal[False] = False,
    bias: ScoreBias | None = None,
) -> Tensor: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | MaskSpec | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: Literal[True],
    document_ids: Tensor | None = None,
    softcap: float | None = None,
    return_lse: Literal[False] = False,
    bias: ScoreBias | None = None,
) -> tuple[Tensor, Tensor]: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | MaskSpec | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: Literal[False] = False,
    document_ids: Tensor | None = None,
    softcap: float | None = None,
    return_lse: Literal[True],
    bias: ScoreBias | None = None,
) -> tuple[Tensor, Tensor]: ...


@overload
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | MaskSpec | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: bool = False,
    document_ids: Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    bias: ScoreBias | None = None,
) -> Tensor | tuple[Tensor, Tensor]: ...


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | MaskSpec | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    need_weights: bool = False,
    document_ids: Tensor | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    bias: ScoreBias | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention through the chosen backend. q (B, H, T_q, d_k), k (B, H_kv, T_k, d_k),
    v (B, H_kv, T_k, d_v); any other leading layout that broadcasts works too, on every backend (e.g. K/V
    of batch 1 shared by every query batch row, or 3-D (B, T, d) tensors). Returns ``out``
    (..., T_q, d_v); ``(out, weights)`` with weights (..., T_q, T_k) when ``need_weights`` (eager only);
    ``(out, lse)`` with lse (..., T_q) when ``return_lse`` (see the module docstring).

    mask: None; a bool tensor (True = may attend) or a float one (added to the scores), broadcastable to
    (..., T_q, T_k); or an :class:`attnlab.masks.MaskSpec`, the mask description (AND'ed with ``causal``,
    ``window`` and ``document_ids``). bias: None, a float tensor added to the scores, broadcastable to
    (..., T_q, T_k), or an :class:`attnlab.alibi.ALiBiBias` (ALiBi; ``flash`` computes it per tile).

    document_ids: None, or integer ids of the packed documents, shape (B, T) or (T,) with
    ``T = T_q = T_k`` and ``B = q.shape[0]``: a query attends only the keys of its own document (AND'ed
    with ``mask``, ``causal`` and ``window``; causal inside each document with ``causal=True``).

    A NaN or inf in one position's input spreads to every output row that may attend that position
    (every row without a mask), as in ``torch.nn.MultiheadAttention``."""
    _check_call(q, k, v, causal, window, dropout_p)
    if not isinstance(return_lse, bool):
        raise AttnlabInputTypeError(f"return_lse must be a bool, got {type(return_lse).__name__} ({return_lse!r})")
    if need_weights and return_lse:
        raise AttnlabInputError("need_weights=True and return_lse=True cannot be combined; ask for one of them "
                                "(the lse is torch.logsumexp of the masked scores the weights come from)")
    name = resolve(backend, dropout_p=dropout_p, training=training, need_weights=need_weights, device=q.device)
    if softcap is not None:  # a score mod only the eager reference has ("auto" picks it)
        name = _softcap_backend(backend, softcap, return_lse)
    spec, dense, float_mask = None, None, None
    if mask is not None or document_ids is not None or bias is not None:  # else the common call: flags only
        spec, float_mask = MaskSpec.describe(mask, causal=causal, window=window, document_ids=document_ids)
        if float_mask is not None:
            F.check_mask(float_mask, q.shape[-2], k.shape[-2])
            given = dense_bias(bias, q.shape[-2], k.shape[-2], q.device)
            bias = float_mask if given is None else float_mask + given
    if name == "flash":
        F.check_qkv(q, k, v)
        if float_mask is not None:
            _key_padding_from_mask(float_mask, q, k)  # refuses it, saying which masks the kernel takes
        out, lse = _flash_with_lse(q, k, v, spec or MaskSpec(causal=causal, window=window), bias, scale=scale,
                                   dropout_p=dropout_p, training=training)
        return (out, lse) if return_lse else out
    if spec is not None:  # the description, converted once for a backend that reads a dense mask
        dense, causal, window = _dense(spec, dense_bias(bias, q.shape[-2], k.shape[-2], q.device), q, k)
    if need_weights or softcap is not None:
        return F.scaled_dot_product_attention(
            q, k, v, mask=dense, causal=causal, window=window, scale=scale, dropout_p=dropout_p,
            training=training, return_weights=need_weights, softcap=softcap,
        )
    if name == "torch":  # the common path: checked once here, then straight to the kernel
        groups = F.check_qkv(q, k, v)  # kv_groups(q, k)
        out = _torch_sdpa_grouped(q, k, v, groups, mask=dense, causal=causal, window=window, scale=scale,
                                  dropout_p=dropout_p, training=training)  # (..., T_q, d_v)
    else:
        if name != "eager":
            F.check_qkv(q, k, v)  # the eager reference checks its own inputs
        out = BACKENDS[name](
            q, k, v, mask=dense, causal=causal, window=window, scale=scale, dropout_p=dropout_p, training=training
        )  # (..., T_q, d_v)
    if not return_lse:
        return out
    return out, _reference_lse(q, k, mask=dense, causal=causal, window=window, scale=scale,
                               out_shape=tuple(out.shape[:-1]))  # (..., T_q)
