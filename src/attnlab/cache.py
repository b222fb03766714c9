"""Key/value caches for decoding: a static cache of ``max_tokens`` and a rolling cache of ``window_size``.

Generating text one token at a time, a causal attention layer would recompute the keys and values of
every earlier token at every step. A cache keeps them: the new token's query attends to the cached keys
and its own (the book's KV-cache bonus, ``ch04/03_kv-cache``). Two kinds:

- :class:`KVCache` (static): buffers of ``max_tokens`` slots per row allocated once; a row's tokens are
  written in place into its next free slots. Nothing changes shape from one token to the next, so a
  ``torch.compile``-d decoding step does not recompile per token (tested with dynamo's counters).
  Attention runs over all ``max_tokens`` slots with a mask that allows only the filled ones (the idea of
  Hugging Face's ``StaticCache``) -- or, in eager decoding while every row holds the same number of
  tokens at the default positions with no padding (known on the host from the calls alone), over the
  filled slots only with no mask at all, as a hand-written loop does (``update(..., trim=True)``, what
  :class:`~attnlab.modules.MultiHeadAttention` asks for).
- :class:`RollingKVCache`: ``window_size`` slots per row for a sliding-window layer; a row's ``n``-th
  token goes into slot ``n % window_size``, overwriting a token that has left every later query's window,
  so its memory stops growing at the window.

Per-row state. Every row of the batch has its own ``lengths[b]`` (slots written, padding included) and
``next_positions[b]`` (the position its next token takes); every slot remembers its token's position
(``key_positions`` (B, S), -1 = empty) and whether it is padding (``key_padding`` (B, S)). The mask of a
step is built from these position tensors alone (:func:`step_mask`): a query at position ``i`` may attend
a key at position ``j`` iff ``j <= i`` (causal), ``j > i - window`` (sliding window), the key is not
padding, and (optionally) the step's ``attn_mask`` allows it among the new tokens. Nothing in
:meth:`KVCache.update` reads a tensor's value on the host (no ``int(tensor)``, no ``.item()``).

- Positions default to ``next_positions[b] + 0, 1, ...``; with a ``key_padding_mask`` and no positions,
  padding tokens take positions too (as when the padded batch is recomputed in full). Give
  ``positions=`` (``position_ids`` in ``MultiHeadAttention.forward``), e.g. ``(cumsum(~pad) - 1).clamp(0)``,
  and each row is positioned as if it were alone: left or right padding then decode exactly as each
  prompt alone (:func:`attnlab.generate` does this).
- :meth:`KVCache.truncate` keeps the first ``n`` tokens of each row (an int, or a (B,) tensor: per-row
  rollback for speculative decoding, or dropping a right-padded prompt's padding), and the next position
  of each row follows its last kept token.
- ``attn_mask`` (T, T) or (B, T, T), bool True = may attend, restricts how the *new* tokens see each other
  (a tree of draft tokens); the cached tokens stay visible by position.

One cache belongs to one layer: the first :class:`~attnlab.modules.MultiHeadAttention` that uses it owns
it and a second layer is refused (use :class:`LayerCaches` for a model: one cache per layer).

The caches are ``nn.Module``s whose tensors are buffers. Put them in a wrapper module (e.g. a
:class:`LayerCaches` attribute) to ``torch.export`` a decoding step: the export then sees the writes as
buffer mutations of the exported program, and the tracing never writes into the user's tensors.

Usage (one cache per attention layer)::

    cache = mha.new_cache(batch_size=1, max_tokens=1024)   # or KVCache(...) / RollingKVCache(...)
    out = mha(prompt, cache=cache)                          # prefill: all prompt tokens at once
    out = mha(next_token, cache=cache)                      # then one token (or a chunk) at a time
    cache.reset()                                           # reuse for the next sequence

Shape letters: B batch, H_kv key/value heads, S slots, T new tokens, d key size, d_v value size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.masks import MaskSpec, flags_spec

__all__ = ["CacheStep", "KVCache", "LayerCaches", "RollingKVCache", "step_mask", "step_spec"]


def step_mask(
    query_positions: Tensor, key_positions: Tensor, key_padding: Tensor, *, window: int | None = None
) -> Tensor:
    """The attention mask of one cached step, bool True = may attend, (B, 1, T, S): the dense form of
    :func:`step_spec` (which is what the cache hands to attention).

    query_positions (T,) or (B, T) long; key_positions (S,) or (B, S) long, -1 = empty slot; key_padding
    (B, S) bool, True = padding. Query ``i`` sees key ``j`` iff the slot is filled, ``j <= i``,
    ``j > i - window`` (when ``window``) and the key is not padding. A query that sees no key (a padding
    query at the start of a left-padded row) gets a context vector of zeros from every backend.
    """
    spec = step_spec(query_positions, key_positions, key_padding, window=window)
    return cast(Tensor, spec.dense(query_positions.shape[-1], key_positions.shape[-1]))  # (B, 1, T, S)


def step_spec(
    query_positions: Tensor, key_positions: Tensor, key_padding: Tensor, *, window: int | None = None,
    allowed: Tensor | None = None,
) -> MaskSpec:
    """The mask description of one cached step: causal (and ``window``) by position, empty slots and
    padding hidden, and ``allowed`` (B|1, 1, T, S) among the new tokens when a step gives one."""
    return MaskSpec(causal=True, window=window, query_positions=query_positions, key_positions=key_positions,
                    key_padding=key_padding, allowed=allowed)


@dataclass
class CacheStep:
    """What a cache hands to attention for one step.

    keys (B, H_kv, S, d), values (B, H_kv, S, d_v) or None (a latent cache stores keys only),
    spec the step's :class:`~attnlab.masks.MaskSpec` (``mask`` its dense form (B, 1, T, S), bool True =
    may attend), positions (B, T) the new tokens' positions, key_positions (B, S) (-1 = empty) and
    key_padding (B, S) True = padding, in slot order.

    ``prefix=True`` (a trimmed step, ``KVCache.update(..., trim=True)``): S is the number of filled
    slots, every row's keys are its tokens in position order with no padding, and the mask is exactly
    causal (bottom-right) among the T new tokens: ``spec`` is ``MaskSpec(causal=T > 1)``, no tensor, which
    is what attention is handed. ``mask``, ``key_positions`` and ``key_padding`` are then views of the
    cache's bookkeeping made (the mask built) only when read. Of every step, ``spec`` and ``mask`` read
    the cache's bookkeeping (``key_positions``, ``key_padding``) when used, as ``keys`` and ``values`` are
    the cache's buffers: read them before the cache changes again (attention does, in the same call).
    """

    keys: Tensor
    values: Tensor | None
    spec: MaskSpec
    positions: Tensor
    _key_positions: Tensor  # prefix: the cache's (B, max_tokens) buffer, cut to the step's S slots on read
    _key_padding: Tensor
    prefix: bool = False
    _mask: Tensor | None = None

    @property
    def key_positions(self) -> Tensor:
        """(B, S) long, -1 = empty slot."""
        return self._key_positions.narrow(1, 0, self.keys.shape[2]) if self.prefix else self._key_positions

    @property
    def key_padding(self) -> Tensor:
        """(B, S) bool, True = padding."""
        return self._key_padding.narrow(1, 0, self.keys.shape[2]) if self.prefix else self._key_padding

    @property
    def mask(self) -> Tensor:
        """(B, 1, T, S) bool, True = may attend."""
        if self._mask is None:
            spec = step_spec(self.positions, self.key_positions, self.key_padding) if self.prefix else self.spec
            self._mask = cast(Tensor, spec.dense(self.positions.shape[-1], self.keys.shape[2]))  # (B, 1, T, S)
        return self._mask

    def order(self) -> Tensor:
        """(B, S) long: each row's slots sorted by position (empty slots first; a padding key before a real
        key of the same position), the permutation :meth:`ordered` applies."""
        empty = self.key_positions < 0  # (B, S)
        rank = torch.where(empty, -2, 2 * self.key_positions + (~self.key_padding).long())  # (B, S)
        return torch.sort(rank, dim=1, stable=True).indices  # (B, S)

    def ordered(
        self, keys: Tensor | None = None, values: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Keys and values (default: this step's; or tensors laid out along the same S slots, such as a
        latent cache's up-projected keys) sorted per row by position (empty slots first; a padding key before
        a real key of the same position): ``(keys, values, key_padding_mask)`` with key_padding_mask (B, S)
        True = padding or empty.

        When a row's positions are consecutive (the default positions, padding included; or left padding
        whose padding repeats position 0), its keys then end at the last new query, so the plain
        ``causal=True`` (bottom-right) and ``window`` flags plus a key padding mask describe the step: what a
        kernel that takes no general mask (the ``"flash"`` backend) needs. A copy of the slots; the ``mask``
        path needs none."""
        keys = self.keys if keys is None else keys
        values = self.values if values is None else values
        empty = self.key_positions < 0  # (B, S)
        order = self.order()  # (B, S)
        index = order[:, None, :, None]  # (B, 1, S, 1)
        keys = keys.gather(2, index.expand(-1, keys.shape[1], -1, keys.shape[3]))  # (B, H_kv, S, d)
        if values is not None:
            values = values.gather(2, index.expand(-1, values.shape[1], -1, values.shape[3]))  # (B, H_kv, S, d_v)
        hidden = self.key_padding | empty  # (B, S)
        return keys, values, hidden.gather(1, order)  # (B, S)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttnlabInputError(f"{name} must be a positive int, got {value!r}")
    return value


class _SlotCache(nn.Module):
    """Shared storage: key/value slots, their positions and padding, and each row's length and next
    position (buffers, so that the cache follows ``.to(device)`` and exports as state)."""

    keys: Tensor
    key_positions: Tensor
    key_padding: Tensor
    lengths: Tensor
    next_positions: Tensor

    def __init__(
        self,
        batch_size: int,
        slots: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            _positive_int(name, value)
        if value_dim is not None and (isinstance(value_dim, bool) or not isinstance(value_dim, int) or value_dim < 0):
            raise AttnlabInputError(f"value_dim must be None (= head_dim), 0 (no values) or a positive int, got {value_dim!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise AttnlabInputTypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        value_dim = head_dim if value_dim is None else value_dim
        self.batch_size, self.num_kv_heads, self.head_dim, self.value_dim = batch_size, num_kv_heads, head_dim, value_dim
        b = batch_size
        # Zeros, not empty: an empty slot is masked out, but 0 * NaN garbage would still be NaN.
        self.register_buffer("keys", torch.zeros(b, num_kv_heads, slots, head_dim, dtype=dtype, device=device))
        self.values: Tensor | None
        self.register_buffer(
            "values", torch.zeros(b, num_kv_heads, slots, value_dim, dtype=dtype, device=device) if value_dim else None
        )  # (B, H_kv, S, d_v)
        self.register_buffer("key_positions", torch.full((b, slots), -1, dtype=torch.long, device=device))  # (B, S)
        self.register_buffer("key_padding", torch.zeros(b, slots, dtype=torch.bool, device=device))  # (B, S)
        self.register_buffer("lengths", torch.zeros(b, dtype=torch.long, device=device))  # (B,)
        self.register_buffer("next_positions", torch.zeros(b, dtype=torch.long, device=device))  # (B,)
        self._host_length = 0  # an upper bound of lengths.max(), kept on the host (no device read)
        self._host_exact = True  # False after compiled steps, which cannot count on the host
        # True while every row holds the same _host_length tokens at positions 0, 1, ... in slots 0, 1, ...
        # with no padding (after reset(), default positions, no key_padding_mask, eager steps): a step then
        # needs no mask (KVCache.update(..., trim=True)). Kept on the host from the calls alone.
        self._plain = True
        # lengths' version counter when the host last counted: a write the host did not see (an exported or
        # compiled program's step, a user's own write) changes it, and the host flags are then dropped.
        self._seen = _version(self.lengths)
        self.owner: int | None = None  # id() of the layer that uses this cache (one layer per cache)

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    @property
    def length(self) -> int:
        """The longest row's tokens (slots) written since the last reset (a Python int: reads the device)."""
        return int(self.lengths.max())

    @property
    def next_position(self) -> Tensor:
        """The next position of the longest row, a 0-d tensor (kept for code written for one shared position)."""
        return self.next_positions.max()

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value storage (what grows with the context; bookkeeping excluded)."""
        total = self.keys.numel() * self.keys.element_size()
        if self.values is not None:
            total += self.values.numel() * self.values.element_size()
        return total

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached token takes: ``batch * num_kv_heads * (head_dim + value_dim) * element_size``."""
        return self.nbytes // self.slots

    def reset(self) -> None:
        """Forget every token (keeps the buffers and the owning layer): ready for a new sequence."""
        self.key_positions.fill_(-1)
        self.key_padding.fill_(False)
        self.lengths.zero_()
        self.next_positions.zero_()
        self._host_length, self._host_exact, self._plain = 0, True, True
        self._seen = _version(self.lengths)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_exact = self._plain = False  # the loaded counts are unknown on the host

    def positions(self, num_tokens: int) -> Tensor:
        """Positions the next ``num_tokens`` tokens of each row will take, LongTensor (B, T) (the RoPE offset)."""
        return self.next_positions[:, None] + torch.arange(num_tokens, device=self.keys.device)  # (B, T)

    def claim(self, layer: object) -> None:
        """Bind this cache to ``layer`` (done by the layer's forward); a second layer is refused."""
        if self.owner is None:
            self.owner = id(layer)
        elif self.owner != id(layer):
            raise AttnlabInputError(
                f"this {type(self).__name__} already belongs to another layer: a cache holds one layer's keys and "
                "values, so give every layer its own (attnlab.cache.LayerCaches.for_model(model, batch_size, "
                "max_tokens) makes one per attention layer)"
            )

    def _check(
        self, keys: Tensor, values: Tensor | None, key_padding_mask: Tensor | None, positions: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Validate the new tokens; returns their padding (B, T) and positions (B, T)."""
        self._check_kv(keys, values)
        b, t = self.batch_size, keys.shape[-2]
        if key_padding_mask is None:
            pad = torch.zeros(b, t, dtype=torch.bool, device=keys.device)  # (B, T)
        elif not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise AttnlabInputTypeError("key_padding_mask must be a bool tensor (True = padding), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        elif tuple(key_padding_mask.shape) != (b, t):
            raise AttnlabInputError(f"with a cache, key_padding_mask covers the new tokens only: shape (batch, T) = "
                             f"{(b, t)}, got {tuple(key_padding_mask.shape)}")
        else:
            pad = key_padding_mask
        if positions is None:
            return pad, self.positions(t)  # (B, T)
        if not isinstance(positions, Tensor) or positions.dtype not in (torch.int32, torch.int64):
            raise AttnlabInputTypeError("position_ids must be an integer tensor (batch, T) or (T,), got "
                            f"{getattr(positions, 'dtype', type(positions).__name__)}")
        if positions.dim() == 1:
            positions = positions[None].expand(b, -1)  # (B, T)
        if tuple(positions.shape) != (b, t):
            raise AttnlabInputError(f"position_ids must have shape (batch, T) = {(b, t)} or (T,), got {tuple(positions.shape)}")
        return pad, positions.to(device=keys.device, dtype=torch.long)  # (B, T)

    def _check_kv(self, keys: Tensor, values: Tensor | None) -> None:
        """Validate the new keys (B, H_kv, T, d) and values (B, H_kv, T, d_v) against the cache."""
        b, h = self.batch_size, self.num_kv_heads
        t = keys.shape[-2] if isinstance(keys, Tensor) and keys.dim() == 4 else 0
        if not isinstance(keys, Tensor) or tuple(keys.shape) != (b, h, t, self.head_dim) or t < 1:
            got = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
            raise AttnlabInputError(f"keys must have shape (batch, num_kv_heads, T >= 1, head_dim) = ({b}, {h}, T, "
                             f"{self.head_dim}) for this cache, got {got}")
        if keys.dtype != self.keys.dtype or keys.device != self.keys.device:
            advice = f"new_cache(..., dtype={keys.dtype})" if keys.device == self.keys.device else "the module's device"
            raise AttnlabInputTypeError(f"keys are {keys.dtype} on {keys.device}, the cache holds {self.keys.dtype} on "
                            f"{self.keys.device}: build the cache with the dtype the keys have (under autocast: "
                            f"the autocast dtype), e.g. {advice}")
        if (values is None) != (self.values is None):
            raise AttnlabInputError(f"this cache {'stores' if self.values is not None else 'does not store'} values "
                             f"(value_dim={self.value_dim}), got values={'None' if values is None else 'a tensor'}")
        if values is not None and tuple(values.shape) != (b, h, t, self.value_dim):
            raise AttnlabInputError(f"values must have shape {(b, h, t, self.value_dim)}, got {tuple(values.shape)}")

    def check_attn_mask(self, attn_mask: Tensor | None, t: int) -> Tensor | None:
        """attn_mask among the ``t`` new tokens, bool (T, T), (B, T, T) or (B, 1, T, T), as (B|1, 1, T, T)."""
        if attn_mask is None:
            return None
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype != torch.bool:
            raise AttnlabInputTypeError("with a cache, attn_mask must be a bool tensor (True = may attend) among the new tokens, "
                            f"got {getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
        if attn_mask.dim() == 4 and attn_mask.shape[1] == 1:
            attn_mask = attn_mask[:, 0]  # (B|1, T, T)
        if attn_mask.dim() == 2:
            attn_mask = attn_mask[None]  # (1, T, T)
        if attn_mask.dim() != 3 or attn_mask.shape[1:] != (t, t) or attn_mask.shape[0] not in (1, self.batch_size):
            raise AttnlabInputError(f"with a cache, attn_mask says how the {t} new tokens see each other: shape (T, T) or "
                             f"(batch, T, T) = ({self.batch_size}, {t}, {t}) (or (batch, 1, T, T)), got "
                             f"{tuple(attn_mask.shape)}")
        return attn_mask[:, None]  # (B|1, 1, T, T)

    def _check_room(self, t: int) -> None:
        """Refuse a write past the last slot: a ValueError in eager mode (from a host-side count, reading the
        device only when that bound says the cache may be full); under torch.compile/export an assertion
        inside the program with the same message (not an index error from generated code)."""
        if torch.compiler.is_compiling():
            torch._assert_async((self.lengths + t <= self.slots).all(), self._full_message("some row's", t))
            return
        self._drop_stale_counts()
        if not self._host_exact or self._host_length + t > self.slots:
            self._host_length = int(self.lengths.max())  # loose after a per-row truncate, stale after compiled steps
            self._host_exact = True
            if self._host_length + t > self.slots:
                raise AttnlabInputError(self._full_message(self._host_length, t))

    def _full_message(self, cached: object, t: int) -> str:
        return (f"the cache is full: {cached} tokens cached + {t} new > max_tokens={self.slots}; build it with a "
                "larger max_tokens or call reset() / truncate()")

    @staticmethod
    def _write(buffer: Tensor, index: Tensor, source: Tensor) -> Tensor:
        """``buffer[b, :, index[b, t]] = source[b, :, t]`` (index (B, T)): in place (no new tensor, what a
        compiled decoding loop needs) unless autograd must see the write (then out of place, so gradients
        flow to earlier steps). An out-of-place write cannot be traced into a program that runs later (the
        program would keep the traced tensor), so under torch.compile/export it is refused."""
        idx = index[:, None, :, None].expand(-1, source.shape[1], -1, source.shape[3])  # (B, H_kv, T, d)
        if torch.is_grad_enabled() and source.requires_grad:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "a cached decoding step was compiled or exported with gradients enabled: the cache would be "
                    "written out of place (for autograd) and the program would not update it; run the step "
                    "under torch.no_grad() or torch.inference_mode() (attnlab.generate does)"
                )
            return buffer.scatter(2, idx, source)
        return buffer.scatter_(2, idx, source)

    def _record(self, slots: Tensor, positions: Tensor, pad: Tensor, t: int) -> None:
        self.key_positions.scatter_(1, slots, positions)  # (B, S)
        self.key_padding.scatter_(1, slots, pad)  # (B, S)
        self.lengths.add_(t)
        self.next_positions.copy_(positions.max(dim=1).values + 1)  # (B,)
        self._count_on_host(t)

    def _count_on_host(self, t: int) -> None:
        # Not while compiling: reading the int would make the compiled step depend on its value (a
        # recompilation per token); there the program's own assertion guards the slots (_check_room).
        if torch.compiler.is_compiling():
            self._host_exact = False  # a write, no read: the next eager check reads the device once
            self._plain = False  # the host no longer knows the length: later eager steps take the masked path
        else:
            self._host_length += t
            self._seen = _version(self.lengths)

    def _drop_stale_counts(self) -> None:
        """Forget the host-side counts when ``lengths`` was written by something the host did not count
        (an exported or compiled program's step, a direct write): the next step reads the device once and
        takes the masked path, which is right for any state."""
        if _version(self.lengths) != self._seen:
            self._host_exact = self._plain = False
            self._seen = _version(self.lengths)

    def truncate(self, n: int | Tensor) -> None:
        """Keep the first ``n`` tokens (slots) of each row and forget the rest: ``n`` an int (every row) or a
        LongTensor (B,) (per row: speculative decoding's rollback of the rejected draft tokens, or dropping a
        right-padded prompt's padding). A row's next position follows its last kept token."""
        b = self.batch_size
        if isinstance(n, Tensor):
            if n.dtype not in (torch.int32, torch.int64) or tuple(n.shape) not in ((b,), ()):
                raise AttnlabInputError(f"n must be an int or an integer tensor of shape (batch,) = ({b},), got "
                                 f"{n.dtype} {tuple(n.shape)}")
            keep = n.to(device=self.keys.device, dtype=torch.long).expand(b)  # (B,)
            if bool((keep < 0).any()):
                raise AttnlabInputError(f"n must be >= 0 in every row, got {n.tolist()}")
            self._plain = False  # rows may now differ in length
        elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise AttnlabInputError(f"n must be an int >= 0 or a (batch,) tensor, got {n!r}")
        else:
            keep = torch.full((b,), n, dtype=torch.long, device=self.keys.device)  # (B,)
            self._host_length = min(self._host_length, n)
        self._truncate(torch.minimum(keep, self.lengths))

    def _truncate(self, keep: Tensor) -> None:
        slot = torch.arange(self.slots, device=self.keys.device)  # (S,)
        self.key_positions.masked_fill_(slot[None] >= keep[:, None], -1)  # (B, S)
        self.lengths.copy_(keep)
        self.next_positions.copy_(self.key_positions.max(dim=1).values.clamp(min=-1) + 1)  # (B,)
        self._seen = _version(self.lengths)

    def rollback(self, count: int | Tensor) -> None:
        """Forget the last ``count`` tokens of each row (an int or a (B,) tensor): ``truncate(lengths - count)``."""
        if isinstance(count, Tensor):
            self.truncate((self.lengths - count.to(self.lengths.device)).clamp(min=0))
        else:
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise AttnlabInputError(f"count must be an int >= 0 or a (batch,) tensor, got {count!r}")
            if self._plain:  # every row holds _host_length tokens: the same cut, known on the host
                self.truncate(max(self._host_length - count, 0))
            else:
                self.truncate((self.lengths - count).clamp(min=0))


class KVCache(_SlotCache):
    """A static cache of ``max_tokens`` slots per row; a row's ``n``-th token is written into its slot ``n``.

    ``update(keys, values, key_padding_mask=None, *, window=None, positions=None, attn_mask=None,
    trim=False)`` writes the new tokens (B, H_kv, T, d) in place and returns a :class:`CacheStep` over all
    ``max_tokens`` slots. ``value_dim=0`` stores keys only (a latent cache,
    :class:`attnlab.latent.MultiHeadLatentAttention`).

    ``trim=True`` (what :class:`~attnlab.modules.MultiHeadAttention` asks for): when every row holds the
    same number of tokens at the default positions with no padding (known on the host from the calls made
    since :meth:`reset`, never by reading the device), the step covers the filled slots only, as views of
    the buffers (``CacheStep.prefix``): attention then needs no mask, as in a hand-written decoding loop.
    Otherwise (per-row lengths, ``positions``, a ``key_padding_mask``, an ``attn_mask``, a ``window``
    shorter than the filled slots, a write autograd must see, under ``torch.compile``) the usual step over
    all slots with its mask; both describe the same attention.
    """

    def __init__(
        self,
        batch_size: int,
        max_tokens: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        _positive_int("max_tokens", max_tokens)
        super().__init__(batch_size, max_tokens, num_kv_heads, head_dim, value_dim=value_dim, dtype=dtype,
                         device=device)
        self.max_tokens = max_tokens

    def extra_repr(self) -> str:
        return (f"batch_size={self.batch_size}, max_tokens={self.max_tokens}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, value_dim={self.value_dim}, dtype={self.keys.dtype}")

    def update(
        self, keys: Tensor, values: Tensor | None = None, key_padding_mask: Tensor | None = None, *,
        window: int | None = None, positions: Tensor | None = None, attn_mask: Tensor | None = None,
        trim: bool = False,
    ) -> CacheStep:
        if not torch.compiler.is_compiling():  # (compiled: _plain is neither read, which would guard on it, nor kept)
            self._drop_stale_counts()
            if trim and self._plain and positions is None and key_padding_mask is None and attn_mask is None:
                step = self._append(keys, values, window)
                if step is not None:
                    return step
            self._plain = self._plain and positions is None and key_padding_mask is None
        pad, positions = self._check(keys, values, key_padding_mask, positions)  # (B, T), (B, T)
        t = keys.shape[-2]
        among_new = self.check_attn_mask(attn_mask, t)  # (B|1, 1, T, T) or None
        self._check_room(t)
        slots = self.lengths[:, None] + torch.arange(t, device=keys.device)  # (B, T)
        written = self._write(self.keys, slots, keys)  # (B, H_kv, S, d)
        if written is not self.keys:  # out of place (autograd): the step's tensor from now on
            self.keys = written
        if values is not None and self.values is not None:
            written = self._write(self.values, slots, values)  # (B, H_kv, S, d_v)
            if written is not self.values:
                self.values = written
        self._record(slots, positions, pad, t)
        allowed = None
        if among_new is not None:  # how the new tokens see each other, in their slots
            b, s = self.key_positions.shape
            allowed = torch.ones(b, 1, t, s, dtype=torch.bool, device=keys.device)  # (B, 1, T, S)
            index = slots[:, None, None, :].expand(-1, 1, t, -1)  # (B, 1, T, T)
            allowed = allowed.scatter(3, index, among_new.expand(b, -1, -1, -1))  # (B, 1, T, S)
        spec = step_spec(positions, self.key_positions, self.key_padding, window=window, allowed=allowed)
        return CacheStep(self.keys, self.values, spec, positions, self.key_positions, self.key_padding)

    def _append(self, keys: Tensor, values: Tensor | None, window: int | None) -> CacheStep | None:
        """``update``'s trimmed step (the cache is plain: every row holds ``_host_length`` tokens at positions
        0, 1, ... in slots 0, 1, ..., no padding): the new tokens go into the next slots by a slice copy and
        the step is the first ``n`` slots, views, with no mask. None where that step would not be exact
        (a window shorter than n, or a write autograd must see; ``update`` never calls it under
        torch.compile, where the host count would make the program depend on it); ``update`` then takes its
        general path (nothing written yet). Every decoding step of every layer runs this: it reads the
        buffers once (``_buffers``, not nn.Module's attribute lookup) and checks with plain comparisons,
        the full messages coming from ``_check_kv`` only when something is wrong."""
        buffers = self._buffers
        cache_keys, cache_values = cast(Tensor, buffers["keys"]), buffers["values"]
        if not (isinstance(keys, Tensor) and keys.dim() == 4 and keys.shape[:2] == cache_keys.shape[:2]
                and keys.shape[3] == cache_keys.shape[3] and keys.shape[2] >= 1 and keys.dtype == cache_keys.dtype
                and keys.device == cache_keys.device and (values is None) == (cache_values is None)
                and (values is None or values.shape == (*keys.shape[:3], self.value_dim))):
            self._check_kv(keys, values)  # raises, naming what is wrong
        t = keys.shape[2]
        start = self._host_length  # exact while plain (no device read)
        n = start + t
        if window is not None and window < n:
            return None  # the oldest keys leave the window: the mask says which
        if (keys.requires_grad or (values is not None and values.requires_grad)) and torch.is_grad_enabled():
            return None  # autograd must see the write (out of place, in _write)
        if n > cache_keys.shape[2]:
            self._check_room(t)  # raises
        cache_keys.narrow(2, start, t).copy_(keys)  # (B, H_kv, T, d) into slots start..n-1
        if values is not None and cache_values is not None:
            cache_values.narrow(2, start, t).copy_(values)  # (B, H_kv, T, d_v)
        key_positions = cast(Tensor, buffers["key_positions"])
        positions = key_positions.narrow(1, start, t)  # (B, T), a view of the new tokens' slots
        if t == 1:
            positions.fill_(start)
        else:
            positions.copy_(torch.arange(start, n, device=positions.device))  # (T,) into (B, T)
        torch._foreach_add_([cast(Tensor, buffers["lengths"]), cast(Tensor, buffers["next_positions"])], t)
        # next_positions == lengths == n: a plain cache's next position is its length. (Into __dict__: an int,
        # which nn.Module.__setattr__ would only look up in its parameter/buffer/module tables first.)
        self.__dict__["_host_length"] = n
        self.__dict__["_seen"] = _version(cast(Tensor, buffers["lengths"]))
        return CacheStep(
            cache_keys.narrow(2, 0, n),  # (B, H_kv, n, d)
            None if cache_values is None else cache_values.narrow(2, 0, n),  # (B, H_kv, n, d_v)
            flags_spec(t > 1, None), positions, key_positions, cast(Tensor, buffers["key_padding"]), prefix=True,
        )


class RollingKVCache(_SlotCache):
    """A rolling cache of ``window_size`` slots per row for a sliding-window layer: a row's ``n``-th token
    is kept in slot ``n % window_size``, so the cache never holds more than the window (memory capped there).

    ``update(keys, values, key_padding_mask=None, *, window=None, positions=None, attn_mask=None)`` attends
    the new tokens over the ``window_size`` slots *and* the new tokens themselves (S = window_size + T keys,
    a fixed shape for a fixed T), then keeps the last ``window_size`` tokens of each row. ``window``
    (default: ``window_size``) must not exceed ``window_size``. :meth:`truncate` works while no row has
    wrapped around (an overwritten token cannot come back): for speculative decoding with a sliding
    window, use a :class:`KVCache`. ``trim`` is accepted and changes nothing (the step carries its mask).
    """

    def __init__(
        self,
        batch_size: int,
        window_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        value_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        _positive_int("window_size", window_size)
        super().__init__(batch_size, window_size, num_kv_heads, head_dim, value_dim=value_dim, dtype=dtype,
                         device=device)
        self.window_size = window_size

    def extra_repr(self) -> str:
        return (f"batch_size={self.batch_size}, window_size={self.window_size}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, value_dim={self.value_dim}, dtype={self.keys.dtype}")

    def _check_room(self, t: int) -> None:  # a rolling cache never fills up
        pass

    def _truncate(self, keep: Tensor) -> None:
        if bool((self.lengths > self.window_size).any()):
            raise AttnlabInputError(
                f"a RollingKVCache cannot roll back once a row has more than window_size={self.window_size} "
                "tokens (the older ones are overwritten); use a KVCache (new_cache(..., rolling=False)) for "
                "speculative decoding with a sliding window"
            )
        super()._truncate(keep)

    def update(
        self, keys: Tensor, values: Tensor | None = None, key_padding_mask: Tensor | None = None, *,
        window: int | None = None, positions: Tensor | None = None, attn_mask: Tensor | None = None,
        trim: bool = False,
    ) -> CacheStep:
        pad, positions = self._check(keys, values, key_padding_mask, positions)  # (B, T), (B, T)
        window = self.window_size if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= self.window_size:
            raise AttnlabInputError(f"a RollingKVCache of window_size={self.window_size} serves windows of at most "
                             f"{self.window_size} tokens, got window={window!r}")
        t = keys.shape[-2]
        among_new = self.check_attn_mask(attn_mask, t)  # (B|1, 1, T, T) or None
        all_keys = torch.cat((self.keys, keys), dim=2)  # (B, H_kv, S + T, d)
        all_values = (
            None if values is None or self.values is None else torch.cat((self.values, values), dim=2)
        )  # (B, H_kv, S + T, d_v)
        key_positions = torch.cat((self.key_positions, positions), dim=1)  # (B, S + T)
        key_padding = torch.cat((self.key_padding, pad), dim=1)  # (B, S + T)
        allowed = None
        if among_new is not None:  # how the new tokens see each other: the last T of the S + T keys
            b = key_positions.shape[0]
            old = torch.ones(b, 1, t, self.window_size, dtype=torch.bool, device=keys.device)  # (B, 1, T, S)
            allowed = torch.cat((old, among_new.expand(b, -1, -1, -1)), dim=-1)  # (B, 1, T, S + T)
        spec = step_spec(positions, key_positions, key_padding, window=window, allowed=allowed)

        keep = slice(max(t - self.window_size, 0), t)  # the newest tokens that fit
        slots = (self.lengths[:, None] + torch.arange(keep.start, t, device=keys.device)) % self.window_size  # (B, kept)
        self.keys = self._write(self.keys, slots, keys[:, :, keep])  # (B, H_kv, S, d)
        if values is not None and self.values is not None:
            self.values = self._write(self.values, slots, values[:, :, keep])  # (B, H_kv, S, d_v)
        self.key_positions.scatter_(1, slots, positions[:, keep])  # (B, S)
        self.key_padding.scatter_(1, slots, pad[:, keep])  # (B, S)
        self.lengths.add_(t)
        self.next_positions.copy_(positions.max(dim=1).values + 1)  # (B,)
        self._count_on_host(t)
        return CacheStep(all_keys, all_values, spec, positions, key_positions, key_padding)


def _version(t: Tensor) -> int:
    """``t``'s in-place write counter (-1 for an inference-mode tensor, which keeps none)."""
    return -1 if t.is_inference() else t._version


class LayerCaches(nn.ModuleList):
    """One cache per attention layer of a model, in the order of ``model.modules()``:
    ``caches = LayerCaches.for_model(model, batch_size, max_tokens)``; ``caches[i]`` is layer ``i``'s.
    ``reset()``, ``truncate(n)`` and ``rollback(count)`` apply to every layer. An ``nn.Module``: make it an
    attribute of an export wrapper and the caches are the exported program's state."""

    def __init__(self, caches: Iterable[_SlotCache] = ()) -> None:
        super().__init__(list(caches))
        for i, cache in enumerate(self):
            if not isinstance(cache, _SlotCache):
                raise AttnlabInputTypeError(f"LayerCaches holds KVCache / RollingKVCache objects, item {i} is {type(cache).__name__}")

    @classmethod
    def for_model(
        cls, model: nn.Module, batch_size: int, max_tokens: int, *, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LayerCaches:
        """A cache for every submodule of ``model`` that has ``new_cache`` (attnlab's attention layers)."""
        layers = [m for m in model.modules() if callable(getattr(m, "new_cache", None)) and m is not model]
        if not layers:
            raise AttnlabInputError(f"{type(model).__name__} has no attention layer with new_cache(); nothing to cache")
        return cls(m.new_cache(batch_size, max_tokens, dtype=dtype, device=device) for m in layers)  # type: ignore[operator]

    def __iter__(self) -> Iterator[_SlotCache]:
        return super().__iter__()  # type: ignore[return-value]

    def reset(self) -> None:
        for cache in self:
            cache.reset()

    def truncate(self, n: int | Tensor) -> None:
        for cache in self:
            cache.truncate(n)

    def rollback(self, count: int | Tensor) -> None:
        for cache in self:
            cache.rollback(count)
