"""Mask builders that compose.

One convention for the whole package, the one of ``torch.nn.functional.scaled_dot_product_attention``:
a boolean mask is **True where a query may attend to a key**. (A *padding* mask, as taken by
``MultiHeadAttention.forward`` and ``torch.nn.MultiheadAttention``, says the opposite — True = padding —
and :func:`padding_mask` turns it into this convention.) Masks combine with :func:`and_masks` /
:func:`or_masks`, so causal + padding is ``and_masks(causal_mask(T, T), padding_mask(pad))``.

The package's one mask *description* is :class:`MaskSpec` (causal with its alignment, window, document
ids, key padding, an explicit bool mask; composed by AND): ``MultiHeadAttention``, the caches, the
context-parallel ranks and every backend receive it, and each backend converts it once -- ``eager`` /
``torch`` to one dense bool mask (:meth:`MaskSpec.dense`: the index-aligned causal / window part from
:func:`index_mask`, the other parts compared where they are), ``flash`` to its tile plan.

Shape letters: B batch, H heads, T_q query length, T_k key length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.errors import AttnlabInputError, AttnlabInputTypeError

__all__ = ["MaskSpec", "flags_spec", "causal_mask", "document_mask", "padding_mask", "and_masks", "or_masks", "window_mask", "index_mask", "to_additive"]


def _check_length(name: str, value: object) -> None:
    """A length is a non-negative int, or a symbolic size: a ``torch.SymInt`` under compile/export, a
    0-d integer tensor under ``torch.jit.trace``."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool:
        return
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise AttnlabInputTypeError(f"{name} must be a non-negative int, got {type(value).__name__} ({value!r})")
    if isinstance(value, int) and value < 0:
        raise AttnlabInputError(f"{name} must be a non-negative int, got {value!r}")


def causal_mask(t_q: int, t_k: int | None = None, *, device: torch.device | str | None = None) -> Tensor:
    """Boolean causal mask, True where query ``i`` may attend key ``j``.  Shape (T_q, T_k).

    Aligned bottom-right when ``t_q != t_k`` (as ``torch.nn.attention.bias.causal_lower_right`` and
    FlashAttention do): the last query sees every key, so query ``i`` may attend key ``j`` iff
    ``j <= i + (t_k - t_q)``. For ``t_q == t_k`` this is the chapter's lower triangle.
    ``t_q`` / ``t_k`` may be symbolic sizes (``torch.SymInt``), so the mask traces under
    ``torch.compile(dynamic=True)`` and ``torch.export`` without fixing the length.
    """
    t_k = t_q if t_k is None else t_k
    _check_length("t_q", t_q)
    _check_length("t_k", t_k)
    if _concrete(t_q, t_k):
        return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril_(t_k - t_q)  # (T_q, T_k)
    i = torch.arange(t_q, device=device)[:, None]  # (T_q, 1)
    j = torch.arange(t_k, device=device)[None, :]  # (1, T_k)
    return j <= i + (t_k - t_q)  # (T_q, T_k)


def _concrete(t_q: object, t_k: object) -> bool:
    """Plain int sizes outside torch.compile: the masks are then built by ``tril_`` / ``triu_`` on a matrix
    of ones (one pass each, ~5x faster than comparing two aranges at 2,048 tokens); symbolic sizes keep the
    arange comparison, which traces without fixing the length. Both give the same mask (tested)."""
    return type(t_q) is int and type(t_k) is int and not torch.compiler.is_compiling()


def window_mask(
    t_q: int, t_k: int | None = None, *, window: int, device: torch.device | str | None = None
) -> Tensor:
    """Boolean sliding-window mask: query ``i`` may attend itself and the ``window - 1`` keys before it,
    ``i + (t_k - t_q) - window < j <= i + (t_k - t_q)`` (aligned bottom-right like :func:`causal_mask`,
    which it implies).  Shape (T_q, T_k)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise AttnlabInputError(f"window must be an int >= 1, got {window!r}")
    t_k = t_q if t_k is None else t_k
    _check_length("t_q", t_q)
    _check_length("t_k", t_k)
    if _concrete(t_q, t_k):
        offset = t_k - t_q  # the key aligned with query 0 (bottom-right)
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril_(offset)  # (T_q, T_k): j <= i + offset
        return allowed.triu_(offset - window + 1)  # (T_q, T_k): and j > i + offset - window
    i = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)  # (T_q, 1): the key aligned with query i
    j = torch.arange(t_k, device=device)[None, :]  # (1, T_k)
    return (j <= i) & (j > i - window)  # (T_q, T_k)


def index_mask(
    t_q: int, t_k: int, *, causal: bool, window: int | None, device: torch.device | str | None = None
) -> Tensor | None:
    """The causal / sliding-window part aligned by index (bottom-right), bool (T_q, T_k); None for neither.
    ``window`` implies causal."""
    if window is not None:
        return window_mask(t_q, t_k, window=window, device=device)  # (T_q, T_k)
    return causal_mask(t_q, t_k, device=device) if causal else None  # (T_q, T_k)


def document_mask(doc_q: Tensor, doc_k: Tensor | None = None) -> Tensor:
    """Boolean packed-sequence mask: a query may attend a key of its own document only.

    doc_q: integer document ids of the queries, (T_q,) or (B, T_q); doc_k: of the keys, (T_k,) or
    (B, T_k) (default: ``doc_q``, self-attention). Returns (T_q, T_k) for 1-D ids, else (B, 1, T_q, T_k),
    which broadcasts over the heads of (B, H, T_q, T_k) scores. Compose it with the others:
    ``and_masks(causal_mask(T), document_mask(ids))`` is causal attention inside each document.
    """
    doc_k = doc_q if doc_k is None else doc_k
    for name, ids in (("doc_q", doc_q), ("doc_k", doc_k)):
        if not isinstance(ids, Tensor):
            raise AttnlabInputTypeError(f"{name} must be an integer torch.Tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise AttnlabInputTypeError(f"{name} must have an integer dtype (document ids), got {ids.dtype}")
        if ids.dim() not in (1, 2):
            raise AttnlabInputError(f"{name} must have shape (num_tokens,) or (batch, num_tokens), got {tuple(ids.shape)}")
    if doc_q.dim() == 1 and doc_k.dim() == 1:
        return doc_q[:, None] == doc_k[None, :]  # (T_q, T_k)
    q2, k2 = doc_q.reshape(-1, doc_q.shape[-1]), doc_k.reshape(-1, doc_k.shape[-1])  # (B|1, T_q), (B|1, T_k)
    if q2.shape[0] != k2.shape[0] and 1 not in (q2.shape[0], k2.shape[0]):
        raise AttnlabInputError(f"doc_q and doc_k must have the same batch size, got {tuple(doc_q.shape)} and "
                         f"{tuple(doc_k.shape)}")
    return (q2[:, :, None] == k2[:, None, :]).unsqueeze(1)  # (B, 1, T_q, T_k)


def padding_mask(key_padding_mask: Tensor) -> Tensor:
    """Turn a key padding mask (B, T_k), True = padding, into an attention mask (B, 1, 1, T_k),
    True = may attend, that broadcasts over heads and queries."""
    if key_padding_mask.dtype != torch.bool:
        raise AttnlabInputTypeError(
            f"key_padding_mask must be a bool tensor (True = padding), got dtype {key_padding_mask.dtype}"
        )
    if key_padding_mask.dim() != 2:
        raise AttnlabInputError(
            f"key_padding_mask must have shape (batch, num_tokens), got shape {tuple(key_padding_mask.shape)}"
        )
    return (~key_padding_mask)[:, None, None, :]  # (B, 1, 1, T_k)


def and_masks(*masks: Tensor | None) -> Tensor | None:
    """Pairs allowed by every mask (broadcasting). ``None`` means "no restriction" and is skipped."""
    out: Tensor | None = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def or_masks(*masks: Tensor | None) -> Tensor | None:
    """Pairs allowed by any mask (broadcasting). ``None`` means "no restriction", so the result is None."""
    present = [m for m in masks if m is not None]
    if len(present) < len(masks) or not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out | m
    return out


def to_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Boolean mask (True = may attend) to an additive float mask (0 where allowed, -inf elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


# --------------------------------------------------------------------------------------------------
# The one mask description
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """Which keys each query may attend, as parts that compose by AND -- the one description that
    :class:`~attnlab.modules.MultiHeadAttention`, the caches, the context-parallel ranks and every backend
    receive (FlexAttention's ``mask_mod``, Hugging Face's mask functions). Never a T_q x T_k tensor until
    a backend that needs one asks for :meth:`dense`; the flash kernel turns the parts into its tile plan.

    causal             query i sees key j only if j <= i (by position), i.e. ``j <= i + (T_k - T_q)`` by
                       index when no positions are given (bottom-right aligned, as ``causal_mask``);
    window             None or w >= 1 (implies causal): also ``j > i - w``;
    query_positions    None, or long (T_q,) / (B, T_q): the queries' positions for ``causal``/``window``;
    key_positions      None, or long (T_k,) / (B, T_k), -1 = an empty slot nobody sees (a cache's slots);
                       given together with query_positions;
    document_ids       None, or integer (T,) / (B, T) with T = T_q = T_k: a query sees its own document only
                       (packed sequences);
    key_padding        None, or bool (B, T_k), **True = padding** (as ``key_padding_mask``): nobody sees it;
    allowed            None, or an explicit bool mask broadcastable to (B, H, T_q, T_k), True = may attend.

    A float mask is not a mask but a score bias: :func:`attnlab.backends.attention` takes it as ``bias=``
    (or a float ``mask=``), as FlexAttention keeps ``score_mod`` apart from ``mask_mod``.
    ``spec & other`` is the AND of two descriptions. Shape letters as in the module docstring.
    """

    causal: bool = False
    window: int | None = None
    query_positions: Tensor | None = None
    key_positions: Tensor | None = None
    document_ids: Tensor | None = None
    key_padding: Tensor | None = None
    allowed: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.query_positions is None and self.key_positions is None and self.document_ids is None
                and self.key_padding is None and self.allowed is None
                and (self.causal is True or self.causal is False)
                and (self.window is None or (type(self.window) is int and self.window >= 1))):
            return  # flags only, valid: the checks below say what is wrong otherwise
        if self.causal is not True and self.causal is not False:
            raise AttnlabInputTypeError(f"causal must be a bool, got {type(self.causal).__name__} ({self.causal!r})")
        window = self.window
        if window is not None and (type(window) is not int or window < 1):
            raise AttnlabInputError(f"window must be None or an int >= 1, got {window!r}")
        if (self.query_positions is None) != (self.key_positions is None):
            raise AttnlabInputError("query_positions and key_positions are given together (the causal part compares "
                                    "them), got only one")
        for name in ("query_positions", "key_positions", "document_ids"):
            ids = getattr(self, name)
            if ids is not None and not isinstance(ids, Tensor):
                raise AttnlabInputTypeError(f"{name} must be an integer torch.Tensor, got {type(ids).__name__}")
            if ids is not None and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
                raise AttnlabInputTypeError(f"{name} must have an integer dtype, got {ids.dtype}")
        for name in ("key_padding", "allowed"):
            mask = getattr(self, name)
            if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool):
                raise AttnlabInputTypeError(f"{name} must be a bool torch.Tensor, got "
                                            f"{getattr(mask, 'dtype', type(mask).__name__)}")

    @property
    def is_causal(self) -> bool:
        """Whether the causal part is on (``window`` implies it)."""
        return self.causal or self.window is not None

    @property
    def by_index(self) -> tuple[bool, int | None]:
        """``(causal, window)`` as the flags of a kernel that aligns them by index (bottom-right), or
        ``(False, None)`` when positions carry them (then :meth:`dense` includes them)."""
        if self.query_positions is not None:
            return False, None
        return self.is_causal, self.window

    @property
    def has_tensors(self) -> bool:
        """Whether any part besides the index-aligned causal/window flags is given."""
        return not (self.query_positions is None and self.document_ids is None and self.key_padding is None
                    and self.allowed is None)  # (no generator: read on every call of a decoding step)

    def __and__(self, other: MaskSpec) -> MaskSpec:
        if not isinstance(other, MaskSpec):
            return NotImplemented
        for by_index, by_position in ((self, other), (other, self)):
            if by_index.query_positions is None and by_position.query_positions is not None and by_index.is_causal:
                raise AttnlabInputError(
                    "cannot AND a causal/window part aligned by index with one aligned by query/key positions: give "
                    "the causal/window flags to the description that carries the positions")
        window = min((w for w in (self.window, other.window) if w is not None), default=None)
        pad = self.key_padding if other.key_padding is None else (
            other.key_padding if self.key_padding is None else self.key_padding | other.key_padding)
        return MaskSpec(
            causal=self.causal or other.causal, window=window,
            query_positions=_one("query_positions", self.query_positions, other.query_positions),
            key_positions=_one("key_positions", self.key_positions, other.key_positions),
            document_ids=_one("document_ids", self.document_ids, other.document_ids),
            key_padding=pad, allowed=and_masks(self.allowed, other.allowed),
        )

    def dense(self, t_q: int, t_k: int, *, lead: int = 2, device: torch.device | str | None = None,
              flags: bool = True) -> Tensor | None:
        """The description as one bool mask, True = may attend, broadcastable to scores with ``lead``
        leading dims (..., T_q, T_k): batch-wise parts come first, (B, 1, ..., T_q, T_k); None when nothing
        is restricted. ``flags=False`` leaves out the causal/window part when it is aligned by index (for a
        kernel that takes it as flags, see :attr:`by_index`)."""
        causal, window = self.by_index
        out = index_mask(t_q, t_k, causal=causal, window=window, device=device) if flags else None  # (T_q, T_k)
        if self.query_positions is not None and self.key_positions is not None:
            q = _batch_first(self.query_positions, lead)[..., :, None]  # (B|1, 1, ..., T_q, 1)
            k = _batch_first(self.key_positions, lead)[..., None, :]  # (B|1, 1, ..., 1, T_k)
            by_position = k >= 0  # (..., 1, T_k): a filled slot
            if self.is_causal:
                by_position = by_position & (k <= q)  # (..., T_q, T_k)
            if self.window is not None:
                by_position = by_position & (k > q - self.window)  # (..., T_q, T_k)
            out = and_masks(out, by_position)
        if self.document_ids is not None:
            docs = _batch_first(self.document_ids, lead)  # (B|1, 1, ..., T)
            same = docs[..., :, None] == docs[..., None, :]
            out = and_masks(out, same)  # (B|1, 1, ..., T_q, T_k)
        if self.key_padding is not None:
            out = and_masks(out, ~_batch_first(self.key_padding, lead)[..., None, :])  # (B, 1, ..., 1, T_k)
        return and_masks(out, self.allowed)

    @classmethod
    def describe(cls, mask: Tensor | MaskSpec | None = None, *, causal: bool = False, window: int | None = None,
                 document_ids: Tensor | None = None) -> tuple[MaskSpec, Tensor | None]:
        """The ``(spec, bias)`` of a call in the keyword style of :func:`attnlab.backends.attention`:
        a bool ``mask`` is the ``allowed`` part, a float one the score bias, a MaskSpec is AND'ed with the
        flags."""
        parts = cls(causal=causal, window=window, document_ids=document_ids)
        if mask is None:
            return parts, None
        if isinstance(mask, MaskSpec):
            return (mask if not (causal or window is not None or document_ids is not None) else mask & parts), None
        if not isinstance(mask, Tensor):
            raise AttnlabInputTypeError(f"mask must be a torch.Tensor, an attnlab.masks.MaskSpec or None, "
                                        f"got {type(mask).__name__}")
        if mask.dtype == torch.bool:
            return cls(causal=causal, window=window, document_ids=document_ids, allowed=mask), None
        if not mask.is_floating_point():
            raise AttnlabInputTypeError(
                f"mask must be bool (True = may attend) or float (added to the scores), got dtype {mask.dtype}")
        return parts, mask


def _one(name: str, a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The one of two optional parts that is given (both: only when they are the same tensor)."""
    if a is not None and b is not None and a is not b:
        raise AttnlabInputError(f"two mask descriptions both give {name}: compose them where they are built, "
                                "with one set of " + name)
    return a if a is not None else b


def _batch_first(t: Tensor, lead: int) -> Tensor:
    """Per-token ids/flags (T,) or (B, T) as (B|1, 1, ..., T) with ``lead`` leading dims in all."""
    if t.dim() == 1:
        return t.reshape((1,) * lead + tuple(t.shape)) if lead else t  # (1, ..., T)
    if lead == 0:
        if t.shape[0] != 1:
            raise AttnlabInputError(f"a per-batch mask part of shape {tuple(t.shape)} needs scores with a batch "
                                    "dimension (q of 3 or more dims)")
        return t[0]  # (T,)
    return t.reshape((t.shape[0],) + (1,) * (lead - 1) + (t.shape[-1],))  # (B, 1, ..., T)


def flags_spec(causal: bool, window: int | None) -> MaskSpec:
    """The description of causal / window alone: what a layer hands over on every call that gives no mask
    tensors (the window-less ones are shared constants, not built per call)."""
    if window is None and (causal is True or causal is False):
        return _FLAGS_ONLY[causal]
    return MaskSpec(causal=causal, window=window)


_FLAGS_ONLY = {False: MaskSpec(), True: MaskSpec(causal=True)}
