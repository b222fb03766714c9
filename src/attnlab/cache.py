"""Key/value caches for decoding: a static cache of ``max_tokens`` and a rolling cache of ``window_size``.

Generating text one token at a time, a causal attention layer would recompute the keys and values of
every earlier token at every step. A cache keeps them: the new token's query attends to the cached keys
and its own (the book's KV-cache bonus, ``ch04/03_kv-cache``). Two kinds:

- :class:`KVCache` (static): buffers of ``max_tokens`` slots allocated once; token ``p`` is written in
  place into slot ``p``. Nothing changes shape from one token to the next, so a ``torch.compile``-d
  decoding step does not recompile per token (tested with dynamo's counters). Attention runs over all
  ``max_tokens`` slots with a mask that allows only the filled ones (the idea of Hugging Face's
  ``StaticCache``).
- :class:`RollingKVCache`: ``window_size`` slots for a sliding-window layer; token ``p`` goes into slot
  ``p % window_size``, overwriting the token that has left every later query's window, so its memory
  stops growing at the window.

Every slot remembers the position of its token (``key_positions``, -1 = empty) and whether it is padding
(``key_padding``), so the mask of a step is built from position tensors alone (:func:`step_mask`): query
at position ``i`` may attend key at position ``j`` iff ``j <= i`` (the causal mask, bottom-right aligned:
the new queries come after every cached key), ``j > i - window`` for a sliding window, and the key is not
padding. Positions count slots, as when the padded batch is recomputed in full: a batch padded on the
left or on the right gives what ``MultiHeadAttention(x, key_padding_mask=...)`` gives on the whole padded
batch (tested). A padding query attends to itself only, so no row is empty and no backend sees NaN.

Usage (one cache per attention layer)::

    cache = mha.new_cache(batch_size=1, max_tokens=1024)   # or KVCache(...) / RollingKVCache(...)
    out = mha(prompt, cache=cache)                          # prefill: all prompt tokens at once
    out = mha(next_token, cache=cache)                      # then one token (or a chunk) at a time
    cache.reset()                                           # reuse for the next sequence

Shape letters: B batch, H_kv key/value heads, S slots, T new tokens, d key size, d_v value size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CacheStep", "KVCache", "RollingKVCache", "step_mask"]


def step_mask(
    query_positions: Tensor, key_positions: Tensor, key_padding: Tensor, *, window: int | None = None
) -> Tensor:
    """The attention mask of one cached step, bool True = may attend, (B, 1, T, S).

    query_positions (T,) long; key_positions (S,) long, -1 = empty slot; key_padding (B, S) bool,
    True = padding. Query ``i`` sees key ``j`` iff the slot is filled, ``j <= i``, ``j > i - window``
    (when ``window``) and the key is not padding; and every query sees itself (so that a padding query has
    one key and no backend returns NaN for it; a real query sees itself anyway).
    """
    q = query_positions[:, None]  # (T, 1)
    k = key_positions[None, :]  # (1, S)
    allowed = (k >= 0) & (k <= q)  # (T, S)
    if window is not None:
        allowed = allowed & (k > q - window)  # (T, S)
    allowed = allowed[None] & ~key_padding[:, None, :]  # (B, T, S)
    allowed = allowed | (k == q)[None]  # (B, T, S)
    return allowed[:, None]  # (B, 1, T, S)


@dataclass
class CacheStep:
    """What a cache hands to attention for one step.

    keys (B, H_kv, S, d), values (B, H_kv, S, d_v) or None (a latent cache stores keys only),
    mask (B, 1, T, S) bool True = may attend, positions (T,) the new tokens' positions,
    key_positions (S,) (-1 = empty) and key_padding (B, S) True = padding, in slot order.
    """

    keys: Tensor
    values: Tensor | None
    mask: Tensor
    positions: Tensor
    key_positions: Tensor
    key_padding: Tensor

    def ordered(
        self, keys: Tensor | None = None, values: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Keys and values (default: this step's; or tensors laid out along the same S slots, such as a
        latent cache's up-projected keys) sorted by position, empty slots first:
        ``(keys, values, key_padding_mask)`` with key_padding_mask (B, S) True = padding or empty.

        The filled keys are then consecutive positions ending at the last new query, so the plain
        ``causal=True`` (bottom-right) and ``window`` flags plus a key padding mask describe the step: what a
        kernel that takes no general mask (the ``"flash"`` backend) needs. A copy of the slots; the ``mask``
        path needs none."""
        keys = self.keys if keys is None else keys
        values = self.values if values is None else values
        order = torch.sort(self.key_positions, stable=True).indices  # (S,), empty (-1) slots first
        keys = keys.index_select(2, order)  # (B, H_kv, S, d)
        values = None if values is None else values.index_select(2, order)  # (B, H_kv, S, d_v)
        padding = self.key_padding.index_select(1, order) | (self.key_positions[order] < 0)[None]  # (B, S)
        return keys, values, padding


class _SlotCache:
    """Shared storage: key/value slots, their positions and padding, and the next position."""

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
        for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if value_dim is not None and (isinstance(value_dim, bool) or not isinstance(value_dim, int) or value_dim < 0):
            raise ValueError(f"value_dim must be None (= head_dim), 0 (no values) or a positive int, got {value_dim!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        value_dim = head_dim if value_dim is None else value_dim
        self.batch_size, self.num_kv_heads, self.head_dim, self.value_dim = batch_size, num_kv_heads, head_dim, value_dim
        # Zeros, not empty: an empty slot is masked out, but 0 * NaN garbage would still be NaN.
        self.keys = torch.zeros(batch_size, num_kv_heads, slots, head_dim, dtype=dtype, device=device)  # (B, H_kv, S, d)
        self.values = (
            torch.zeros(batch_size, num_kv_heads, slots, value_dim, dtype=dtype, device=device) if value_dim else None
        )  # (B, H_kv, S, d_v)
        self.key_positions = torch.full((slots,), -1, dtype=torch.long, device=device)  # (S,)
        self.key_padding = torch.zeros(batch_size, slots, dtype=torch.bool, device=device)  # (B, S)
        self.next_position = torch.zeros((), dtype=torch.long, device=self.keys.device)  # ()

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    @property
    def length(self) -> int:
        """Tokens written since the last reset (a Python int: reads the device)."""
        return int(self.next_position)

    @property
    def nbytes(self) -> int:
        """Bytes of the key/value storage (what grows with the context; bookkeeping excluded)."""
        total = self.keys.numel() * self.keys.element_size()
        if self.values is not None:
            total += self.values.numel() * self.values.element_size()
        return total

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached token takes: ``num_kv_heads * (head_dim + value_dim) * element_size``."""
        return self.nbytes // self.slots

    def reset(self) -> None:
        """Forget every token (keeps the buffers): the cache is ready for a new sequence."""
        self.key_positions.fill_(-1)
        self.key_padding.fill_(False)
        self.next_position.zero_()

    def positions(self, num_tokens: int) -> Tensor:
        """Positions the next ``num_tokens`` tokens will take, LongTensor (T,) (the RoPE offset)."""
        return self.next_position + torch.arange(num_tokens, device=self.keys.device)  # (T,)

    def _check(self, keys: Tensor, values: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        b, h = self.batch_size, self.num_kv_heads
        t = keys.shape[-2] if isinstance(keys, Tensor) and keys.dim() == 4 else 0
        if not isinstance(keys, Tensor) or tuple(keys.shape) != (b, h, t, self.head_dim) or t < 1:
            got = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
            raise ValueError(f"keys must have shape (batch, num_kv_heads, T >= 1, head_dim) = ({b}, {h}, T, "
                             f"{self.head_dim}) for this cache, got {got}")
        if keys.dtype != self.keys.dtype or keys.device != self.keys.device:
            raise TypeError(f"keys are {keys.dtype} on {keys.device}, the cache holds {self.keys.dtype} on "
                            f"{self.keys.device}: build the cache with the module's dtype and device")
        if (values is None) != (self.values is None):
            raise ValueError(f"this cache {'stores' if self.values is not None else 'does not store'} values "
                             f"(value_dim={self.value_dim}), got values={'None' if values is None else 'a tensor'}")
        if values is not None and tuple(values.shape) != (b, h, t, self.value_dim):
            raise ValueError(f"values must have shape {(b, h, t, self.value_dim)}, got {tuple(values.shape)}")
        if key_padding_mask is None:
            return torch.zeros(b, t, dtype=torch.bool, device=keys.device)  # (B, T)
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (b, t):
            raise ValueError(f"with a cache, key_padding_mask covers the new tokens only: shape (batch, T) = "
                             f"{(b, t)}, got {tuple(key_padding_mask.shape)}")
        return key_padding_mask

    @staticmethod
    def _write(buffer: Tensor, dim: int, index: Tensor, source: Tensor) -> Tensor:
        """``buffer[index] = source`` along ``dim``: in place (no new tensor, what a compiled decoding
        loop needs) unless autograd must see the write (then out of place, so gradients flow to earlier
        steps)."""
        if torch.is_grad_enabled() and source.requires_grad:
            return buffer.index_copy(dim, index, source)
        return buffer.index_copy_(dim, index, source)


class KVCache(_SlotCache):
    """A static cache of ``max_tokens`` slots; slot ``p`` holds the token at position ``p``.

    ``update(keys, values, key_padding_mask=None, *, window=None)`` writes the new tokens (B, H_kv, T, d)
    in place and returns a :class:`CacheStep` over all ``max_tokens`` slots. ``value_dim=0`` stores keys
    only (a latent cache, :class:`attnlab.latent.MultiHeadLatentAttention`).
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
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        super().__init__(batch_size, max_tokens, num_kv_heads, head_dim, value_dim=value_dim, dtype=dtype,
                         device=device)
        self.max_tokens = max_tokens

    def __repr__(self) -> str:
        return (f"KVCache(batch_size={self.batch_size}, max_tokens={self.max_tokens}, num_kv_heads="
                f"{self.num_kv_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, dtype={self.keys.dtype})")

    def update(
        self, keys: Tensor, values: Tensor | None = None, key_padding_mask: Tensor | None = None, *,
        window: int | None = None,
    ) -> CacheStep:
        pad = self._check(keys, values, key_padding_mask)  # (B, T)
        t = keys.shape[-2]
        if not torch.compiler.is_compiling() and self.length + t > self.max_tokens:
            raise ValueError(f"the cache is full: {self.length} tokens cached + {t} new > max_tokens="
                             f"{self.max_tokens}; build it with a larger max_tokens or call reset()")
        positions = self.positions(t)  # (T,)
        self.keys = self._write(self.keys, 2, positions, keys)  # (B, H_kv, S, d)
        if values is not None and self.values is not None:
            self.values = self._write(self.values, 2, positions, values)  # (B, H_kv, S, d_v)
        self.key_positions.index_copy_(0, positions, positions)
        self.key_padding.index_copy_(1, positions, pad)
        self.next_position.add_(t)
        mask = step_mask(positions, self.key_positions, self.key_padding, window=window)  # (B, 1, T, S)
        return CacheStep(self.keys, self.values, mask, positions, self.key_positions, self.key_padding)


class RollingKVCache(_SlotCache):
    """A rolling cache of ``window_size`` slots for a sliding-window layer: token ``p`` is kept in slot
    ``p % window_size``, so the cache never holds more than the window (its memory is capped there).

    ``update(keys, values, key_padding_mask=None, *, window=None)`` attends the new tokens over the
    ``window_size`` slots *and* the new tokens themselves (S = window_size + T keys, a fixed shape for a
    fixed T), then keeps the last ``window_size`` tokens. ``window`` (default: ``window_size``) must not
    exceed ``window_size``.
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
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {window_size!r}")
        super().__init__(batch_size, window_size, num_kv_heads, head_dim, value_dim=value_dim, dtype=dtype,
                         device=device)
        self.window_size = window_size

    def __repr__(self) -> str:
        return (f"RollingKVCache(batch_size={self.batch_size}, window_size={self.window_size}, num_kv_heads="
                f"{self.num_kv_heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, dtype={self.keys.dtype})")

    def update(
        self, keys: Tensor, values: Tensor | None = None, key_padding_mask: Tensor | None = None, *,
        window: int | None = None,
    ) -> CacheStep:
        pad = self._check(keys, values, key_padding_mask)  # (B, T)
        window = self.window_size if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= self.window_size:
            raise ValueError(f"a RollingKVCache of window_size={self.window_size} serves windows of at most "
                             f"{self.window_size} tokens, got window={window!r}")
        t = keys.shape[-2]
        positions = self.positions(t)  # (T,)
        all_keys = torch.cat((self.keys, keys), dim=2)  # (B, H_kv, S + T, d)
        all_values = (
            None if values is None or self.values is None else torch.cat((self.values, values), dim=2)
        )  # (B, H_kv, S + T, d_v)
        key_positions = torch.cat((self.key_positions, positions))  # (S + T,)
        key_padding = torch.cat((self.key_padding, pad), dim=1)  # (B, S + T)
        mask = step_mask(positions, key_positions, key_padding, window=window)  # (B, 1, T, S + T)

        keep = slice(max(t - self.window_size, 0), t)  # the newest tokens that fit
        kept = positions[keep]  # (min(T, S),)
        slots = kept % self.window_size  # (min(T, S),)
        self.keys = self._write(self.keys, 2, slots, keys[:, :, keep])  # (B, H_kv, S, d)
        if values is not None and self.values is not None:
            self.values = self._write(self.values, 2, slots, values[:, :, keep])  # (B, H_kv, S, d_v)
        self.key_positions.index_copy_(0, slots, kept)
        self.key_padding.index_copy_(1, slots, pad[:, keep])
        self.next_position.add_(t)
        return CacheStep(all_keys, all_values, mask, positions, key_positions, key_padding)
