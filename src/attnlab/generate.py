"""``attnlab.generate``: decode a batch of prompts of different lengths through per-layer KV caches.

::

    from attnlab import generate
    from attnlab.modern import TinyDecoder
    model = TinyDecoder().eval()
    out = generate(model, [torch.tensor([5, 7, 1]), torch.tensor([3])], max_new_tokens=8)   # greedy
    out = generate(model, prompts, 8, temperature=0.8, top_k=50, top_p=0.95, stop_tokens=[2],
                   generator=torch.Generator().manual_seed(0))

The model is any module with ``new_caches(batch_size, max_tokens)`` returning a
:class:`attnlab.cache.LayerCaches` and ``forward(idx, caches, *, position_ids=, key_padding_mask=)``
returning logits (B, T, vocab), such as :class:`attnlab.modern.TinyDecoder`.

How the batch is laid out. The prompts are padded on the left to a common length (rounded up to a
multiple of ``prompt_bucket``: one compiled prefill per bucket, not per length), with a
``key_padding_mask`` and ``position_ids = (cumsum(~pad) - 1).clamp(0)``: each row's real tokens take
positions 0, 1, ... as if it were alone, so every row decodes what it decodes alone (tested: prompts of
1, 7 and 33 tokens, static and rolling caches, latent attention). The caches then give each row its next
position; every step is one token per row.

It runs under ``torch.no_grad()`` (and under a caller's ``torch.inference_mode()``): a cache written with
gradients enabled would be copied at every step. ``compile=True`` compiles the prefill and the step with
``torch.compile(fullgraph=True, dynamic=False)``: one graph per prompt bucket and one for the step (tested
with dynamo's counters). The cache's room is checked before the compiled region.

Shape letters: B prompts, P padded prompt length, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from attnlab.errors import AttnlabInputError, AttnlabInputTypeError

__all__ = ["generate", "sample_next"]


def sample_next(
    logits: Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token of each row from its logits (B, V) -> LongTensor (B,): the argmax when
    ``temperature == 0`` (greedy), else a draw from ``softmax(logits / temperature)`` restricted to the
    ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    scores = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, -math.inf)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # (B, V)
        before = sorted_scores.softmax(dim=-1).cumsum(dim=-1) - sorted_scores.softmax(dim=-1)  # (B, V)
        drop_sorted = before >= top_p  # the mass before a token already reaches top_p; the first never drops
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (B, V)
        scores = scores.masked_fill(drop, -math.inf)  # (B, V)
    probs = scores.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def _check(prompts: object, max_new_tokens: object, temperature: object, top_k: object, top_p: object,
           prompt_bucket: object, stop_tokens: object = ()) -> list[Tensor]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise AttnlabInputError(f"prompts as a tensor must be (batch, tokens), got shape {tuple(prompts.shape)}")
        prompts = list(prompts)
    if not isinstance(prompts, Sequence) or not prompts:
        raise AttnlabInputTypeError(f"prompts must be a non-empty list of 1-D token tensors or a (batch, tokens) tensor, got "
                        f"{type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor) or p.dim() != 1 or p.numel() < 1 or p.dtype not in (torch.int32, torch.int64):
            raise AttnlabInputError(f"prompts[{i}] must be a non-empty 1-D integer tensor of token ids, got "
                             f"{getattr(p, 'dtype', type(p).__name__)} {tuple(getattr(p, 'shape', ()))}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise AttnlabInputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature < math.inf:
        raise AttnlabInputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise AttnlabInputError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise AttnlabInputError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if (top_k is not None or top_p is not None) and temperature == 0.0:
        raise AttnlabInputError("top_k / top_p restrict sampling: give a temperature > 0 too (temperature=0 is greedy)")
    if isinstance(prompt_bucket, bool) or not isinstance(prompt_bucket, int) or prompt_bucket < 1:
        raise AttnlabInputError(f"prompt_bucket must be a positive int, got {prompt_bucket!r}")
    if (not isinstance(stop_tokens, Sequence) or isinstance(stop_tokens, str)
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_tokens)):
        raise AttnlabInputTypeError(f"stop_tokens must be a sequence of token ids (ints >= 0), e.g. [2] or (), got {stop_tokens!r}")
    return list(prompts)


def _left_pad(prompts: list[Tensor], length: int, pad_id: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(idx (B, P), key_padding_mask (B, P) True = padding, position_ids (B, P))."""
    b = len(prompts)
    idx = torch.full((b, length), pad_id, dtype=torch.long, device=device)  # (B, P)
    pad = torch.ones(b, length, dtype=torch.bool, device=device)  # (B, P)
    for row, p in enumerate(prompts):
        idx[row, length - p.numel():] = p.to(device)
        pad[row, length - p.numel():] = False
    positions = ((~pad).long().cumsum(dim=1) - 1).clamp(min=0)  # (B, P): 0, 1, ... over the real tokens
    return idx, pad, positions


def generate(
    model: nn.Module,
    prompts: Sequence[Tensor] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    prompt_bucket: int = 16,
    max_tokens: int | None = None,
    compile: bool | str = False,
) -> list[Tensor]:
    """Generate up to ``max_new_tokens`` tokens after each prompt; returns one LongTensor per prompt with
    its new tokens (ending at the first stop token, which is included).

    temperature 0 (default) is greedy; above 0 the tokens are sampled (``generator`` makes it repeatable),
    restricted by ``top_k`` / ``top_p``. ``stop_tokens``: a row stops at the first one it generates (the
    loop ends when every row has stopped). ``max_tokens``: cache slots per layer (default: the padded
    prompt length + max_new_tokens). ``compile``: True (inductor) or a ``torch.compile`` backend name, see the
    module docstring."""
    prompts = _check(prompts, max_new_tokens, temperature, top_k, top_p, prompt_bucket, stop_tokens)
    new_caches = getattr(model, "new_caches", None)
    if not callable(new_caches):
        raise AttnlabInputTypeError(f"model must have new_caches(batch_size, max_tokens) (e.g. attnlab.modern.TinyDecoder), "
                        f"{type(model).__name__} has none")
    device = next(model.parameters()).device
    longest = max(p.numel() for p in prompts)
    padded = -(-longest // prompt_bucket) * prompt_bucket  # P, a multiple of the bucket
    needed = padded + max_new_tokens
    max_tokens = needed if max_tokens is None else max_tokens
    if max_tokens < needed:  # checked here, before any compiled region
        raise AttnlabInputError(f"max_tokens={max_tokens} cannot hold the padded prompt ({padded} tokens) and "
                         f"max_new_tokens={max_new_tokens}; give max_tokens >= {needed}")
    with torch.no_grad():
        caches = new_caches(len(prompts), max_tokens)
        idx, pad, positions = _left_pad(prompts, padded, pad_id, device)  # (B, P) each
        prefill: Callable[..., Tensor] = lambda i, c, pos, kpm: model(i, c, position_ids=pos, key_padding_mask=kpm)
        step: Callable[..., Tensor] = lambda i, c: model(i, c)
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            prefill = torch.compile(prefill, backend=backend, fullgraph=True, dynamic=False)
            step = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
        stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)  # (n_stop,)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # (B,)
        produced: list[Tensor] = []
        logits = prefill(idx, caches, positions, pad)[:, -1]  # (B, V)
        for n in range(max_new_tokens):
            token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B,)
            token = token.masked_fill(finished, pad_id)  # (B,)
            produced.append(torch.where(finished, -1, token))  # (B,), -1 after a row's stop
            if stops.numel():
                finished = finished | torch.isin(token, stops)  # (B,)
                if bool(finished.all()):  # one read per token, only when there are stop tokens
                    break
            if n + 1 < max_new_tokens:
                logits = step(token[:, None], caches)[:, -1]  # (B, V)
    table = torch.stack(produced, dim=1) if produced else torch.empty(len(prompts), 0, dtype=torch.long)  # (B, N)
    return [row[row >= 0].cpu() for row in table]
