"""attnlab's attention inside any Hugging Face transformers model.

::

    import attnlab.hf
    attnlab.hf.register()
    model = AutoModelForCausalLM.from_pretrained("./my-model", attn_implementation="attnlab")

:func:`register` adds one attention function per backend of :func:`attnlab.backends.attention` to
transformers' ``AttentionInterface`` (and a mask builder to its ``AttentionMaskInterface``) under these
names (none contains the word "flash": transformers fetches any such name from its kernel hub)::

    "attnlab"        backend "auto"  (the fastest exact one; "eager" when weights are asked for)
    "attnlab_eager"  backend "eager" (the from-scratch reference; returns the attention weights, as HF's eager)
    "attnlab_torch"  backend "torch" (torch.nn.functional.scaled_dot_product_attention)
    "attnlab_tiles"  backend "flash" (attnlab's tiled, online-softmax kernel, which skips hidden tiles)

The attention function takes what HF hands every implementation: q (B, H, T_q, d) and k, v (B, H_kv, T_k, d)
after RoPE and after HF's cache update, the mask, ``scaling``, ``dropout``, ``sliding_window``, ``softcap``
and the module (``num_key_value_groups`` for grouped-query attention, ``is_causal``), and returns
``(out (B, T_q, H, d_v), weights (B, H, T_q, T_k) or None)``.

Masks, one description converted at the edge
    HF builds a layer's mask from small functions (causal, sliding window, padding, packed sequences read from
    ``position_ids``). The mask builder registered here reads that composition and returns an
    :class:`AttentionMask` -- ``causal``, ``window``, ``key_padding`` (B, T_k) and ``document_ids`` (B, T) --
    instead of a (B, 1, T_q, T_k) matrix, so the tiled kernel skips the tiles that a window or a document
    boundary hides. Where the composition is one it does not know (an ``or_mask_function``, chunked or
    block-wise attention, a static cache whose queries do not end at the last key), it returns HF's own dense
    bool mask: slower, never wrong. The tiled kernel cannot read a dense mask, so there it raises.

A query with no key to attend (a left-padding token under a causal mask) gets zeros, as PyTorch's CPU SDPA
gives; HF's eager path gives such rows the mean of the values instead. Real tokens never see them.

transformers is an optional dependency (``pip install transformers``): this module imports it only inside
:func:`register` and the mask builder.

Shape letters: B batch, H query heads, H_kv key/value heads, T_q / T_k query / key tokens, d head size.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnlab import backends
from attnlab.errors import AttnlabInputError
from attnlab.masks import MaskSpec

__all__ = ["BACKEND_OF", "INSTALL_HINT", "AttentionMask", "attention_forward", "mask_builder",
           "RecordedAttention", "record_attention", "register", "unregister"]

INSTALL_HINT = "pip install transformers"

#: Registered name -> attnlab backend.
BACKEND_OF: dict[str, str] = {
    "attnlab": "auto",
    "attnlab_eager": "eager",
    "attnlab_torch": "torch",
    "attnlab_tiles": "flash",
}

# Keyword arguments that some HF models hand the attention function and that change the math in ways
# attnlab's attention does not do: refused with a clear error rather than ignored.
_UNSUPPORTED = {
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias (T5-style position_bias)",
    "head_mask": "a head mask",
}

_RECORDERS: list[list[RecordedAttention]] = []  # open record_attention() lists, innermost last


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"attnlab.hf needs the optional dependency 'transformers' ({exc}); install it with: {INSTALL_HINT}",
            name="transformers",
        ) from exc


# --------------------------------------------------------------------------------------------------
# The mask: HF's composition of mask functions, read into attnlab's terms
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AttentionMask:
    """What the mask builder hands HF: attnlab's mask description (:attr:`spec`, a
    :class:`attnlab.masks.MaskSpec`) with the sizes HF reads off a mask (``shape``), never a T_q x T_k matrix.

    causal        query i sees key j only if j <= i + (T_k - T_q) (bottom-right aligned, as HF's cache is)
    window        None or w >= 1 (with causal): also j > i + (T_k - T_q) - w
    key_padding   None or bool (B, T_k), True = padding (the keys HF's 2-D attention_mask hides, cut to this
                  layer's keys), as :class:`attnlab.masks.MaskSpec` and ``key_padding_mask`` say it
    document_ids  None or int64 (B, T) with T = T_q = T_k: packed sequences, a token sees its own document only
    """

    batch_size: int
    q_length: int
    kv_length: int
    causal: bool = False
    window: int | None = None
    key_padding: Tensor | None = None
    document_ids: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the dense mask this stands for: (B, 1, T_q, T_k)."""
        return (self.batch_size, 1, self.q_length, self.kv_length)

    @functools.cached_property
    def spec(self) -> MaskSpec:
        """The description itself, as every backend receives it."""
        return MaskSpec(causal=self.causal, window=self.window, document_ids=self.document_ids,
                        key_padding=self.key_padding)

    def dense(self, device: torch.device | str | None = None) -> Tensor:
        """The same mask as a bool (B, 1, T_q, T_k) tensor, True = may attend (for checks and pictures)."""
        if device is None:
            device = next((t.device for t in (self.key_padding, self.document_ids) if t is not None), "cpu")
        spec = self.spec
        if spec.document_ids is not None or spec.key_padding is not None:
            spec = MaskSpec(causal=spec.causal, window=spec.window,
                            document_ids=None if spec.document_ids is None else spec.document_ids.to(device),
                            key_padding=None if spec.key_padding is None else spec.key_padding.to(device))
        out = torch.ones(self.shape, dtype=torch.bool, device=device)  # (B, 1, T_q, T_k)
        part = spec.dense(self.q_length, self.kv_length, device=device)  # (B|1, 1, T_q, T_k) or None
        return out if part is None else out & part


def _closure(fn: Callable) -> dict[str, Any]:
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells, strict=True)}


def _read_mask_function(fn: Callable, mu: Any) -> dict[str, Any] | None:
    """HF's mask function as attnlab's parts ``{"causal", "window", "documents", "padding"}``, or None
    when it contains a piece that is not one of the known ones (then the caller builds the dense mask)."""
    parts: dict[str, Any] = {"causal": False, "window": None, "documents": None, "padding": None, "remap": False}

    def walk(f: Callable) -> bool:
        if f is mu.causal_mask_function:
            parts["causal"] = True
            return True
        if f is mu.bidirectional_mask_function:
            return True
        if getattr(f, "__module__", None) != mu.__name__ or not hasattr(f, "__code__"):
            return False
        name, free = f.__qualname__, _closure(f)
        if name == "and_masks.<locals>.and_mask":
            return all(walk(g) for g in free["mask_functions"])
        if name == "sliding_window_overlay.<locals>.inner_mask" and parts["window"] is None:
            parts["window"] = int(free["sliding_window"])
            return True
        if name == "packed_sequence_mask_function.<locals>.inner_mask" and parts["documents"] is None:
            parts["documents"] = free["packed_sequence_mask"]
            return True
        if name == "padding_mask_function.<locals>.inner_mask" and parts["padding"] is None:
            parts["padding"] = free["padding_mask"]
            return True
        if name == "remap_positions_for_packed_sequence.<locals>.inner_mask":
            # Positions restart at each document and grow by exactly 1 inside one (that is how HF finds the
            # documents), so comparing positions equals comparing indices once documents are kept apart.
            parts["remap"] = True
            return walk(free["mask_function"])
        return False

    if not walk(fn):
        return None
    if parts["remap"] and parts["documents"] is None:
        return None
    if parts["window"] is not None and (not parts["causal"] or parts["window"] < 1):
        return None  # a window without causality: not one of attnlab's parts
    return parts


def mask_builder(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int | Tensor = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> AttentionMask | Tensor:
    """What ``AttentionMaskInterface`` calls for the attnlab names: an :class:`AttentionMask` when HF's
    ``mask_function`` is made of known parts and the queries end at the last key (as with no cache or HF's
    dynamic cache), else HF's dense bool mask (B, 1, T_q, T_k) (True = may attend)."""
    mu = importlib.import_module("transformers.masking_utils")
    if mask_function is None:
        mask_function = mu.causal_mask_function
    parts = _read_mask_function(mask_function, mu)
    static = isinstance(q_offset, Tensor) or isinstance(kv_offset, Tensor)
    aligned = not static and q_offset + q_length == kv_offset + kv_length
    if parts is None or static or (parts["causal"] and not aligned) or (
            parts["documents"] is not None and (q_length != kv_length or attention_mask is not None)) or (
            parts["padding"] is not None and attention_mask is not None):
        return mu.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False, use_vmap=kwargs.get("use_vmap", False), device=device,
        )  # (B, 1, T_q, T_k) bool
    padding = attention_mask if attention_mask is not None else parts["padding"]
    key_padding = None
    if padding is not None:
        padding = mu.prepare_padding_mask(padding.to(device=device, dtype=torch.bool), kv_length, kv_offset)
        key_padding = ~padding[:, kv_offset:kv_offset + kv_length].expand(batch_size, kv_length)  # (B, T_k)
        if not torch.compiler.is_compiling() and not bool(key_padding.any()):
            key_padding = None  # nothing is padding: the kernels need no mask at all
    docs = parts["documents"]
    if docs is not None:
        docs = docs.to(device=device).expand(batch_size, q_length)  # (B, T)
    return AttentionMask(batch_size, q_length, kv_length, causal=parts["causal"], window=parts["window"],
                         key_padding=key_padding, document_ids=docs)


# --------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedAttention:
    """One attention call seen inside :func:`record_attention`."""

    weights: Tensor  # (B, H, T_q, T_k), detached: the weights that multiplied the values
    allowed: Tensor  # (B, 1|H, T_q, T_k) bool: True where the call's mask let the query see the key
    # What the call was handed (detached; the same tensors, no copy): q (B, H, T_q, d) and k, v
    # (B, H_kv, T_k, d) after RoPE and the cache update, the scale the scores were multiplied by, the
    # softcap (None: none) and the attention module that made the call (its projections, its head counts).
    query: Tensor | None = None
    key: Tensor | None = None
    value: Tensor | None = None
    scaling: float | None = None
    softcap: float | None = None
    module: torch.nn.Module | None = None


@contextlib.contextmanager
def record_attention() -> Iterator[list[RecordedAttention]]:
    """Inside ``with record_attention() as calls:``, every call of an attnlab attention function appends a
    :class:`RecordedAttention` in call order (layer after layer); its weights come from the eager reference."""
    recorded: list[RecordedAttention] = []
    _RECORDERS.append(recorded)
    try:
        yield recorded
    finally:
        _RECORDERS.remove(recorded)


def _allowed(spec: MaskSpec, mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor:
    """The pairs a call lets attend, as one bool (B|1, 1|H, T_q, T_k) tensor (for the recorder only): the
    description's dense form AND a float mask's finite entries."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    allowed = torch.ones(1, 1, t_q, t_k, dtype=torch.bool, device=q.device)  # (1, 1, T_q, T_k)
    part = spec.dense(t_q, t_k, device=q.device)
    if part is not None:
        allowed = allowed & part  # (B|1, 1, T_q, T_k)
    if mask is not None:
        keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        allowed = allowed & keep  # (B|1, 1|H, T_q, T_k)
    return allowed


_UNMASKED = MaskSpec()


def _spec_of(module: torch.nn.Module, attention_mask: AttentionMask | Tensor | None, is_causal: bool | None,
             sliding_window: int | None, query: Tensor, key: Tensor) -> tuple[MaskSpec, Tensor | None]:
    """The call's mask as attnlab's description, or HF's dense mask (bool or additive float, cut to the keys)
    when the mask builder could not describe it: ``(spec, dense)``."""
    if isinstance(attention_mask, AttentionMask):
        spec = attention_mask.spec  # built once per mask object: every layer of a forward shares it
    elif attention_mask is None:
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        spec = MaskSpec(causal=causal, window=sliding_window if causal else None)
    else:
        return MaskSpec(), attention_mask[:, :, :, : key.shape[-2]]  # (B|1, 1|H, T_q, T_k): bool or float
    t_q, t_k = query.shape[-2], key.shape[-2]
    if spec.is_causal and spec.document_ids is None and t_q == 1 and (spec.window is None or t_k <= spec.window):
        spec = _UNMASKED if spec.key_padding is None else MaskSpec(key_padding=spec.key_padding)  # one query,
        # aligned with the last key: it sees every key (decoding)
    return spec, None


def attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: AttentionMask | Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    *,
    backend: str = "auto",
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """One HF attention call through :func:`attnlab.backends.attention` with ``backend``.

    query (B, H, T_q, d), key / value (B, H_kv, T_k, d) -> (out (B, T_q, H, d_v), weights (B, H, T_q, T_k)
    or None). Weights are returned by the eager backend (as HF's eager does), when HF asks for them
    (``output_attentions=True``) and inside :func:`record_attention`."""
    if kwargs and not _UNSUPPORTED.keys().isdisjoint(kwargs):
        for name, what in _UNSUPPORTED.items():
            if kwargs.get(name) is not None:
                raise AttnlabInputError(f"attnlab's attention does not support {what} (got {name}=...); load this model "
                                 f"with attn_implementation='eager' or 'sdpa'")
    groups = getattr(module, "num_key_value_groups", None)
    if groups is not None:
        h, h_kv = query.shape[1], key.shape[1]
        if h_kv * int(groups) != h:
            raise AttnlabInputError(f"module.num_key_value_groups={groups} does not match the heads handed over: "
                             f"{h} query heads and {h_kv} key/value heads")
    spec, mask = _spec_of(module, attention_mask, is_causal, sliding_window, query, key)
    if softcap is None and not _RECORDERS and backend in ("auto", "torch") and not kwargs.get("output_attentions"):
        # The usual call (every decode step): straight to backends.attention, no keyword dict built; a
        # description of causal/window alone goes as the flags it is.
        if mask is None and not spec.has_tensors:
            out = backends.attention(query, key, value, causal=spec.causal, window=spec.window, scale=scaling,
                                     dropout_p=float(dropout), training=True, backend=backend)  # (B, H, T_q, d_v)
        else:
            out = backends.attention(query, key, value, mask=spec if mask is None else mask, scale=scaling,
                                     dropout_p=float(dropout), training=True, backend=backend)  # (B, H, T_q, d_v)
        return out.transpose(1, 2).contiguous(), None  # (B, T_q, H, d_v)
    common: dict[str, Any] = {"mask": spec if mask is None else mask, "scale": scaling,
                              "dropout_p": float(dropout), "training": True,
                              "softcap": None if softcap is None else float(softcap)}
    asked = bool(kwargs.get("output_attentions")) and backend in ("auto", "eager")
    weights: Tensor | None = None
    if backend == "eager" or asked or _RECORDERS:  # the weights come from the eager reference
        out, weights = backends.attention(query, key, value, backend="eager", need_weights=True, **common)
        if _RECORDERS:
            call = RecordedAttention(
                weights.detach(), _allowed(spec, mask, query, key),
                query=query.detach(), key=key.detach(), value=value.detach(),
                scaling=float(scaling) if scaling is not None else query.shape[-1] ** -0.5,
                softcap=common["softcap"], module=module)
            for recorded in _RECORDERS:
                recorded.append(call)
    else:
        out = backends.attention(query, key, value, backend=backend, **common)  # (B, H, T_q, d_v)
    return out.transpose(1, 2).contiguous(), weights  # (B, T_q, H, d_v)


def _named(name: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    backend = BACKEND_OF[name]

    def forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                attention_mask: AttentionMask | Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        return attention_forward(module, query, key, value, attention_mask, backend=backend, **kwargs)

    forward.__name__ = forward.__qualname__ = f"{name}_attention_forward"
    forward.__doc__ = f"HF attention function {name!r}: :func:`attention_forward` with backend {backend!r}."
    return forward


def register() -> tuple[str, ...]:
    """Register attnlab's attention and mask builder with transformers under every name of
    :data:`BACKEND_OF`; afterwards ``from_pretrained(..., attn_implementation="attnlab")`` (or
    ``model.set_attn_implementation("attnlab_tiles")``) works. Calling it again is harmless. Returns the names.
    ModuleNotFoundError naming ``pip install transformers`` when transformers is missing."""
    _transformers()
    from transformers import AttentionInterface, AttentionMaskInterface

    for name in BACKEND_OF:
        AttentionInterface.register(name, _named(name))
        AttentionMaskInterface.register(name, mask_builder)
    return tuple(BACKEND_OF)


def unregister() -> None:
    """Remove the names :func:`register` added (models already loaded with them stop working)."""
    _transformers()
    from transformers import AttentionInterface, AttentionMaskInterface

    for name in BACKEND_OF:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
