"""The opt-in sections beyond chapter 3: the attention of modern LLMs, step by step.

    cache    the KV cache growing token by token; each new query's row against the cached keys;
             equal to recomputing the whole sequence           (attnlab.cache.KVCache)
    gqa      grouped-query attention: which query heads share which key/value head; the weights per head
             (MultiHeadAttention(num_kv_groups=...))
    window   sliding-window attention: the band mask and what each token can still see
             (attnlab.masks.window_mask, MultiHeadAttention(window_size=...))
    rope     rotary position embeddings: q and k rotated by position; a score depends only on the
             relative position            (attnlab.rope.rope_angles / apply_rope, MultiHeadAttention(rope=True))

Every section builds one seeded ``MultiHeadAttention`` (``torch.manual_seed(seed)`` first, as the chapter's
classes) on the eager backend, records what the library's pieces return, and checks them against the
module's own output (the agreement is recorded in ``extra`` and shown in the detail lines). None of the
attention math is written here: projections are the module's ``nn.Linear`` layers, scores and softmax are
:mod:`attnlab.functional`, masks :mod:`attnlab.masks`, the cache :mod:`attnlab.cache`, rotations
:mod:`attnlab.rope`.

Shape letters: T tokens, H query heads, G key/value heads (groups), hd head size, D = H * hd.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from attnlab import functional as F
from attnlab.cache import KVCache
from attnlab.errors import AttnlabInputError
from attnlab.explain.steps import How
from attnlab.masks import causal_mask, window_mask
from attnlab.modules import MultiHeadAttention
from attnlab.rope import apply_rope, rope_angles

__all__ = ["MODERN_DEFAULTS", "ModernOptions", "add_modern_details", "build_modern", "modern_options"]

_QK = ("head", "query", "key")
_HTD = ("head", "token", "dim")

# Defaults of each section when --heads / --d-out / --kv-groups / --window-size are not given.
MODERN_DEFAULTS = {
    "cache": {"heads": 1},
    "gqa": {"heads": 4, "kv_groups": 2, "head_dim": 2},
    "window": {"heads": 1, "window_size": 3},
    "rope": {"heads": 1, "head_dim": 2, "shift": 10},
}


@dataclass(frozen=True)
class ModernOptions:
    """The modern sections' configuration (one per section that is selected; see :func:`modern_options`).

    heads, d_out   the module's query heads and width (head size d_out / heads)
    kv_groups      key/value heads of the gqa section     window_size   the window section's window
    rope_base      base of the rotary angles              rope_shift    positions added in rope.scores_shifted
    """

    heads: int
    d_out: int
    kv_groups: int | None = None
    window_size: int | None = None
    rope_base: float = 10000.0
    rope_shift: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_out // self.heads

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"heads": self.heads, "d_out": self.d_out, "head_dim": self.head_dim}
        if self.kv_groups is not None:
            out["kv_groups"] = self.kv_groups
        if self.window_size is not None:
            out["window_size"] = self.window_size
        if self.rope_shift:
            out["rope_base"], out["rope_shift"] = self.rope_base, self.rope_shift
        return out


# Positions are float32 in the rotary angles (attnlab.rope.rope_angles): every integer up to 2**24 is exact
# there, larger ones are rounded (16777217 becomes 16777216), so the shifted scores would differ for a
# reason that is not RoPE's. --rope-shift is kept below that.
MAX_EXACT_POSITION = 2**24
# A window longer than the sequence is the causal mask; beyond this it is only a number to overflow.
MAX_WINDOW = 2048


def _int(name: str, value: object, low: int = 1, high: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise AttnlabInputError(f"{name} must be an int >= {low}, got {value!r}")
    if high is not None and value > high:
        raise AttnlabInputError(f"{name} must be from {low} to {high}{why}, got {value!r}")
    return int(value)


def modern_options(
    section: str, *, heads: int | None, d_out: int | None, kv_groups: int | None, window_size: int | None,
    rope_base: float, rope_shift: int | None, max_heads: int, max_d_out: int, num_tokens: int = 1,
) -> ModernOptions:
    """The configuration of one modern section from the user's options (None = the section's default,
    :data:`MODERN_DEFAULTS`); ValueError naming the option and its allowed range for a bad or contradictory
    value. ``num_tokens``: the sequence length (the rope shift must keep every position exact in float32)."""
    dflt = MODERN_DEFAULTS[section]
    h = _int("heads", heads) if heads is not None else dflt["heads"]
    if h > max_heads:
        raise AttnlabInputError(f"heads must be at most {max_heads} for a step-by-step walkthrough, got {h}")
    if d_out is None:
        d = h * dflt.get("head_dim", 2)
    else:
        d = _int("d_out", d_out)
    if d > max_d_out:
        raise AttnlabInputError(f"d_out must be at most {max_d_out} for a step-by-step walkthrough, got {d}")
    if d % h:
        raise AttnlabInputError(f"heads must divide d_out in section {section!r}: got d_out={d} and heads={h}")
    opts = ModernOptions(heads=h, d_out=d)
    if section == "gqa":
        g = _int("kv_groups", kv_groups) if kv_groups is not None else min(dflt["kv_groups"], h)
        if h % g:
            divisors = [n for n in range(1, h + 1) if h % n == 0]
            raise AttnlabInputError(f"kv_groups must divide heads: got kv_groups={g} and heads={h} (try {divisors})")
        opts = ModernOptions(heads=h, d_out=d, kv_groups=g)
    elif section == "window":
        w = _int("window_size", window_size, high=MAX_WINDOW,
                 why=" (a window at least as long as the sequence is the causal mask)") \
            if window_size is not None else dflt["window_size"]
        opts = ModernOptions(heads=h, d_out=d, window_size=w)
    elif section == "rope":
        if (d // h) % 2:
            raise AttnlabInputError(f"rope needs an even head size (d_out / heads): got d_out={d} and heads={h}, "
                             f"head size {d // h}; give an even --d-out")
        if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)) or not 1.0 < rope_base < math.inf:
            raise AttnlabInputError(f"rope_base must be a number > 1 (and finite), got {rope_base!r}")
        top = MAX_EXACT_POSITION - (num_tokens - 1)  # the last token's position p + shift stays exact
        s = _int("rope_shift", rope_shift, low=1, high=top,
                 why=f" (the positions p + shift of the {num_tokens} tokens are float32 in the rotation angles, "
                     f"exact only up to 2^24 = {MAX_EXACT_POSITION})") if rope_shift is not None else dflt["shift"]
        opts = ModernOptions(heads=h, d_out=d, rope_base=float(rope_base), rope_shift=s)
    return opts


def _dims(n: int) -> tuple[str, ...]:
    return tuple(str(i + 1) for i in range(n))


def _module(d_in: int, t: int, o: ModernOptions, seed: int, given: Mapping[str, np.ndarray] | None,
            **modern: Any) -> tuple[MultiHeadAttention, str]:
    """The seeded module (and its constructor as text) with the given W_query/W_key/W_value, if any."""
    torch.manual_seed(seed)
    mha = MultiHeadAttention(d_in, o.d_out, t, 0.0, num_heads=o.heads, backend="eager", **modern)
    opts = "".join(f", {k}={v!r}" for k, v in modern.items())
    text = f"MultiHeadAttention({d_in}, {o.d_out}, {t}, 0.0, num_heads={o.heads}{opts})"
    if given:
        for name in ("W_query", "W_key", "W_value"):
            layer = getattr(mha, name)
            want = tuple(layer.weight.T.shape)
            if tuple(given[name].shape) != want:
                raise AttnlabInputError(f"weights: {name} must be {want[0]} x {want[1]} for {text}, got "
                                 f"{given[name].shape[0]} x {given[name].shape[1]}; leave out --weights for "
                                 "seeded ones")
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(given[name].T)))
    return mha, text


def _split(t: Tensor, heads: int) -> Tensor:
    """(T, heads * hd) -> (heads, T, hd), the module's split into heads."""
    n = t.shape[0]
    return t.view(n, heads, -1).transpose(0, 1)  # (heads, T, hd)


def _qkv(mha: MultiHeadAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The module's queries (H, T, hd), keys and values (G, T, hd) for x (T, d_in)."""
    return (_split(mha.W_query(x), mha.num_heads), _split(mha.W_key(x), mha.num_kv_groups),
            _split(mha.W_value(x), mha.num_kv_groups))  # (H, T, hd), (G, T, hd), (G, T, hd)


def _diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def build_modern(rec: Any, section: str, x: Tensor, labels: tuple[str, ...], o: ModernOptions, seed: int,
                 given: Mapping[str, np.ndarray] | None) -> None:
    """Record one modern section into ``rec`` (the walkthrough's recorder)."""
    {"cache": _cache, "gqa": _gqa, "window": _window, "rope": _rope}[section](rec, x, labels, o, seed, given)


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


def _cache(rec: Any, x: Tensor, labels: tuple[str, ...], o: ModernOptions, seed: int,
           given: Mapping[str, np.ndarray] | None) -> None:
    sec = "cache"
    t, d_in = x.shape
    mha, mod = _module(d_in, t, o, seed, given)
    h, hd = o.heads, o.head_dim
    heads, qk = _dims(h), (_dims(h), labels, labels)
    q_all, k_all, v_all = _qkv(mha, x)  # (H, T, hd) each
    cache = KVCache(1, t, h, hd)  # the library's static cache: T slots, slot p holds token p
    filled = torch.zeros(t, t)  # (T, T): row i = the slots filled once token i is written
    scores = torch.full((h, t, t), float("-inf"))  # (H, T, T): row i = the new query i against the slots
    sizes = []
    for i in range(t):  # one decoding step per token: its key and value are cached, its query attends
        step = cache.update(k_all[None, :, i:i + 1], v_all[None, :, i:i + 1])  # keys (1, H, T, hd)
        filled[i] = (step.key_positions >= 0).float()  # (T,)
        row = F.all_pair_scores(q_all[:, i:i + 1], step.keys[0]) / math.sqrt(hd)  # (H, 1, T)
        scores[:, i] = F.mask_before_softmax(row, step.mask[0])[:, 0]  # (H, T), -inf for empty slots
        sizes.append(cache.length * cache.bytes_per_token)
    cache_name = f"KVCache(batch_size=1, max_tokens={t}, num_kv_heads={h}, head_dim={hd})"
    rec.add(sec, "filled", filled, title="The cache growing token by token",
            why="generating text, each new token's key and value are written once into the cache; "
                "later tokens read them instead of recomputing them",
            formula=f"cached(i, j) = 1 if slot j holds a key once token i is written ({cache_name})",
            axes=("query", "key"), labels=(labels, labels), symbol="cached", query_axis=0,
            how=How("mask", params={"cache": True}),
            extra={"bytes_per_token": cache.bytes_per_token, "bytes": sizes})
    rec.add(sec, "keys", step.keys[0], title="The cached keys (one slot per token)",
            why="slot j holds k_j = x_j @ W_key, written when token j arrived and never computed again",
            formula=f"cache.keys after the last token (k = x @ W_key of {mod}, split into heads)",
            axes=_HTD, labels=(heads, labels, _dims(hd)), symbol="k", query_axis=1,
            how=How("module", params={"module": cache_name}), depends=("input.embeddings",))
    rec.add(sec, "values", cast(Tensor, cache.values)[0], title="The cached values",
            why="the values are cached beside the keys: the new query's weights multiply them",
            formula="cache.values after the last token (v = x @ W_value, split into heads)",
            axes=_HTD, labels=(heads, labels, _dims(hd)), symbol="v", query_axis=1,
            how=How("module", params={"module": cache_name}), depends=("input.embeddings",))
    rec.add(sec, "queries", q_all, title="The new query of each step",
            why="only the newest token's query is computed at each step: earlier queries are never needed again",
            formula="q_i = x_i @ W_query, split into heads (computed at step i)",
            axes=_HTD, labels=(heads, labels, _dims(hd)), symbol="q", query_axis=1,
            how=How("module", params={"module": mod}), depends=("input.embeddings",))
    rec.add(sec, "scores", scores, title="Each new query's row against the cached keys",
            why="at step i the cache holds tokens 1..i: slots not yet written are masked (-inf)",
            formula=f"score(i, j) = q_i · k_j / √hd at step i, -inf for empty slots (hd = {hd})",
            axes=_QK, labels=qk, symbol="score", query_axis=1,
            how=How("attn_scores", ("cache.queries", "cache.keys"), {"scale": math.sqrt(hd), "mask": "cache"}),
            depends=("cache.queries", "cache.keys"))
    weights = F.softmax(scores, dim=-1)  # (H, T, T)
    cache2 = mha.new_cache(batch_size=1, max_tokens=t)
    outs, mod_w = [], torch.zeros(h, t, t)
    for i in range(t):  # the module itself, decoding with a cache of its own
        out_i, w_i = mha(x[None, i:i + 1], cache=cache2, need_weights=True)  # (1, 1, D), (1, H, 1, T)
        outs.append(out_i[0, 0])
        mod_w[:, i] = w_i[0, :, 0]  # (H, T)
    cached_out = torch.stack(outs)  # (T, D)
    full_out, full_w = mha(x[None], need_weights=True)  # (1, T, D), (1, H, T, T): recomputed at once
    rec.add(sec, "weights", weights, title="Attention weights of each step (softmax of each row)",
            why="the new query's weights over the tokens cached so far: the rows of causal attention",
            formula="weights = softmax(scores, dim=-1)", axes=_QK, labels=qk, symbol="weight", query_axis=1,
            how=How("softmax", ("cache.scores",)), depends=("cache.scores",),
            extra={"max_abs_diff_to_module": _diff(weights, mod_w),
                   "max_abs_diff_to_recomputed": _diff(weights, full_w[0])})
    rec.add(sec, "output", cached_out, title="The module's output, one token at a time with the cache",
            why="MultiHeadAttention(x_i, cache=cache) for i = 1..T: each call sees one new token",
            formula=f"torch.manual_seed({seed}); mha = {mod}; cache = mha.new_cache(1, {t}); "
                    "[mha(x[:, i:i+1], cache=cache) for i in range(T)]",
            axes=("token", "dim"), labels=(labels, _dims(o.d_out)), symbol="out", query_axis=0,
            how=How("module", params={"module": mod}), depends=("input.embeddings",))
    rec.add(sec, "recomputed", full_out[0], title="Recomputing the whole sequence at once",
            why="without a cache, all tokens are recomputed at every step: the same numbers, much more work",
            formula="mha(x)  # the whole sequence, causal mask, no cache", axes=("token", "dim"),
            labels=(labels, _dims(o.d_out)), symbol="out", query_axis=0,
            how=How("module", params={"module": mod}), depends=("input.embeddings",),
            extra={"max_abs_diff_to_cached": _diff(cached_out, full_out[0])})


# --------------------------------------------------------------------------------------------------
# gqa
# --------------------------------------------------------------------------------------------------


def _gqa(rec: Any, x: Tensor, labels: tuple[str, ...], o: ModernOptions, seed: int,
         given: Mapping[str, np.ndarray] | None) -> None:
    sec = "gqa"
    t, d_in = x.shape
    g = o.kv_groups or o.heads
    mha, mod = _module(d_in, t, o, seed, given, num_kv_groups=g)
    h, hd = o.heads, o.head_dim
    per = h // g  # query heads per key/value head
    kv_of = torch.arange(h) // per  # (H,): query head h uses key/value head h // (H / G)
    share = (kv_of[:, None] == torch.arange(g)[None, :]).float()  # (H, G)
    rec.add(sec, "sharing", share, title=f"Which query heads share which key/value head ({h} query, {g} key/value)",
            why=f"grouped-query attention keeps only {g} key/value head{'s' if g > 1 else ''}: each serves "
                f"{per} query head{'s' if per > 1 else ''}, so the cache stores {h // g}× fewer keys and values",
            formula=f"shared(h, g) = 1 if g = h // (H / G) = h // {per}   (num_kv_groups={g})",
            axes=("head", "kv_head"), labels=(_dims(h), _dims(g)), symbol="shared",
            how=How("gqa_share", params={"per": per}),
            extra={"kv_head_of": [int(v) + 1 for v in kv_of],
                   "kv_bytes_per_token": 2 * g * hd * 4, "mha_kv_bytes_per_token": 2 * h * hd * 4})
    q, k, v = _qkv(mha, x)  # (H, T, hd), (G, T, hd), (G, T, hd)
    rec.add(sec, "queries", q, title=f"Queries of the {h} heads", why="every query head has its own W_query columns",
            formula="queries = x @ W_query, split into H heads", axes=_HTD, labels=(_dims(h), labels, _dims(hd)),
            symbol="q", query_axis=1, how=How("module", params={"module": mod}), depends=("input.embeddings",))
    rec.add(sec, "keys", k, title=f"Keys of the {g} key/value heads",
            why=f"W_key is d_in × {g * hd} instead of d_in × {h * hd}: fewer key projections",
            formula="keys = x @ W_key, split into G key/value heads", axes=("kv_head", "token", "dim"),
            labels=(_dims(g), labels, _dims(hd)), symbol="k", query_axis=1,
            how=How("module", params={"module": mod}), depends=("input.embeddings",))
    rec.add(sec, "values", v, title=f"Values of the {g} key/value heads",
            why="the values are shared by the same groups", formula="values = x @ W_value, split into G heads",
            axes=("kv_head", "token", "dim"), labels=(_dims(g), labels, _dims(hd)), symbol="v", query_axis=1,
            how=How("module", params={"module": mod}), depends=("input.embeddings",))
    k_rep = F.repeat_kv(k, per)  # (H, T, hd): key/value head of each query head
    scores = F.all_pair_scores(q, k_rep) / math.sqrt(hd)  # (H, T, T)
    allowed = causal_mask(t)  # (T, T)
    masked = F.mask_before_softmax(scores, allowed)  # (H, T, T)
    qk = (_dims(h), labels, labels)
    rec.add(sec, "scores", masked, title="Scores of each query head against its group's keys",
            why="query heads of one group compare their own queries with the same keys",
            formula=f"score_h(i, j) = q_h,i · k_g(h),j / √hd with g(h) = h // {per}, -inf after i",
            axes=_QK, labels=qk, symbol="score", query_axis=1,
            how=How("attn_scores", ("gqa.queries", "gqa.keys"),
                    {"scale": math.sqrt(hd), "mask": "causal", "kv_head_of": [int(n) for n in kv_of]}),
            depends=("gqa.queries", "gqa.keys"))
    weights = F.softmax(masked, dim=-1)  # (H, T, T)
    out, mod_w = mha(x[None], need_weights=True)  # (1, T, D), (1, H, T, T)
    ref = F.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)  # torch-free reference
    rec.add(sec, "weights", weights, title="Attention weights per query head",
            why="heads of one group share keys but not queries, so their weights still differ",
            formula="weights_h = softmax(score_h, dim=-1)", axes=_QK, labels=qk, symbol="weight", query_axis=1,
            how=How("softmax", ("gqa.scores",)), depends=("gqa.scores",),
            extra={"max_abs_diff_to_module": _diff(weights, mod_w[0]),
                   "max_abs_diff_to_reference": _diff(weights, ref[1])})
    ctx = F.context_vectors(weights, F.repeat_kv(v, per))  # (H, T, hd)
    rec.add(sec, "context", ctx, title="Context vectors of each query head",
            why="each query head's weighted sum of its group's values", formula="context_h = weights_h @ values_g(h)",
            axes=_HTD, labels=(_dims(h), labels, _dims(hd)), symbol="z", query_axis=1,
            how=How("module", params={"module": mod}), depends=("gqa.weights", "gqa.values"))
    # The proof: ordinary multi-head attention whose key/value heads are the groups' copies.
    torch.manual_seed(seed)
    full = MultiHeadAttention(d_in, o.d_out, t, 0.0, num_heads=h, backend="eager")
    full.W_query.weight.copy_(mha.W_query.weight)
    full.out_proj.load_state_dict(mha.out_proj.state_dict())
    for name in ("W_key", "W_value"):
        w = getattr(mha, name).weight.view(g, hd, d_in)  # (G, hd, d_in)
        getattr(full, name).weight.copy_(w.repeat_interleave(per, dim=0).reshape(h * hd, d_in))  # (H*hd, d_in)
    same = full(x[None])  # (1, T, D)
    rec.add(sec, "output", out[0], title="MultiHeadAttention(num_kv_groups=...): the output",
            why="the same function as multi-head attention whose key/value heads are copies of the groups'",
            formula=f"torch.manual_seed({seed}); {mod}(x)", axes=("token", "dim"),
            labels=(labels, _dims(o.d_out)), symbol="out", query_axis=0,
            how=How("module", params={"module": mod}), depends=("gqa.context",),
            extra={"max_abs_diff_to_mha_with_copies": _diff(out[0], same[0])})


# --------------------------------------------------------------------------------------------------
# window
# --------------------------------------------------------------------------------------------------


def _window(rec: Any, x: Tensor, labels: tuple[str, ...], o: ModernOptions, seed: int,
            given: Mapping[str, np.ndarray] | None) -> None:
    sec = "window"
    t, d_in = x.shape
    w = o.window_size or t
    mha, mod = _module(d_in, t, o, seed, given, window_size=w)
    h, hd = o.heads, o.head_dim
    qk = (labels, labels)
    band = window_mask(t, window=w)  # (T, T) bool, True = may attend
    causal = causal_mask(t)  # (T, T)
    rec.add(sec, "mask", band.float(), title=f"The sliding-window mask (window = {w})",
            why=f"each token attends to itself and the {w - 1} token{'s' if w != 2 else ''} before it: a band "
                "below the diagonal instead of the whole lower triangle",
            formula=f"mask(i, j) = 1 if i - {w} < j <= i else 0   (attnlab.masks.window_mask({t}, window={w}))",
            axes=("query", "key"), labels=qk, symbol="mask", query_axis=0, how=How("mask", params={"window": w}),
            extra={"visible": [int(n) for n in band.sum(dim=-1)]})
    hidden = (causal & ~band).float()  # (T, T)
    rec.add(sec, "out_of_window", hidden, title="Earlier tokens the window hides",
            why="what causal attention would still see but the window no longer does: a token's view stops "
                f"growing at {w}, and so does a cache of its keys",
            formula="causal mask and not window mask", axes=("query", "key"), labels=qk, symbol="hidden",
            query_axis=0, how=How("out_of_window", ("window.mask",), {"window": w}), depends=("window.mask",))
    q, k, _ = _qkv(mha, x)  # (H, T, hd) each
    for name, sym, val, wname in (("queries", "q", q, "W_query"), ("keys", "k", k, "W_key")):
        rec.add(sec, name, val, title=f"{name.capitalize()} of each head",
                why="projections as in multi-head attention: the window changes only the mask",
                formula=f"{name} = x @ {wname}, split into heads", axes=_HTD, labels=(_dims(h), labels, _dims(hd)),
                symbol=sym, query_axis=1, how=How("module", params={"module": mod}), depends=("input.embeddings",))
    scores = F.mask_before_softmax(F.all_pair_scores(q, k) / math.sqrt(hd), band)  # (H, T, T)
    hq = (_dims(h), labels, labels)
    rec.add(sec, "scores", scores, title="Scores inside the window (-inf outside)",
            why="keys outside the band get -inf, so softmax gives them weight 0",
            formula=f"score(i, j) = q_i · k_j / √hd inside the window, -inf outside (hd = {hd})",
            axes=_QK, labels=hq, symbol="score", query_axis=1,
            how=How("attn_scores", ("window.queries", "window.keys"),
                    {"scale": math.sqrt(hd), "mask": "window", "window": w}),
            depends=("window.queries", "window.keys", "window.mask"))
    weights = F.softmax(scores, dim=-1)  # (H, T, T)
    out, mod_w = mha(x[None], need_weights=True)  # (1, T, D), (1, H, T, T)
    torch.manual_seed(seed)
    plain, _ = _module(d_in, t, o, seed, given)  # the same weights, no window_size
    composed = plain(x[None], attn_mask=band)  # (1, T, D): the window as a custom mask on causal attention
    rec.add(sec, "weights", weights, title="Sliding-window attention weights",
            why="each row spreads over at most window tokens, however long the sequence",
            formula="weights = softmax(scores, dim=-1)", axes=_QK, labels=hq, symbol="weight", query_axis=1,
            how=How("softmax", ("window.scores",)), depends=("window.scores",),
            extra={"max_abs_diff_to_module": _diff(weights, mod_w[0])})
    rec.add(sec, "output", out[0], title="MultiHeadAttention(window_size=...): the output",
            why="the module's output; the same as causal attention with the band as attn_mask",
            formula=f"torch.manual_seed({seed}); {mod}(x)", axes=("token", "dim"),
            labels=(labels, _dims(o.d_out)), symbol="out", query_axis=0,
            how=How("module", params={"module": mod}), depends=("window.weights",),
            extra={"max_abs_diff_to_attn_mask": _diff(out[0], composed[0])})


# --------------------------------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------------------------------


def _rope(rec: Any, x: Tensor, labels: tuple[str, ...], o: ModernOptions, seed: int,
          given: Mapping[str, np.ndarray] | None) -> None:
    sec = "rope"
    t, d_in = x.shape
    mha, mod = _module(d_in, t, o, seed, given, rope=True, rope_base=o.rope_base)
    h, hd, s = o.heads, o.head_dim, o.rope_shift
    dims, pos_labels = _dims(hd), tuple(f"p{i}" for i in range(t))
    positions = torch.arange(t)  # (T,)
    cos, sin = rope_angles(positions, hd, o.rope_base)  # (T, hd) each
    theta = [o.rope_base ** (-2 * i / hd) for i in range(hd // 2)]
    rec.add(sec, "cos", cos, title="cos of the rotation angle of each position and feature pair",
            why="RoPE turns each feature pair (d, d + hd/2) of q and k by the angle position × θ_d",
            formula=f"cos(p θ_d), θ_d = {o.rope_base:g}^(-2d/hd)   (attnlab.rope.rope_angles)",
            axes=("token", "dim"), labels=(labels, dims), symbol="cos", query_axis=0,
            how=How("rope_angle", params={"fn": "cos", "theta": theta}), extra={"theta": theta})
    rec.add(sec, "sin", sin, title="sin of the rotation angle", why="with cos, the rotation of each pair",
            formula=f"sin(p θ_d), θ_d = {o.rope_base:g}^(-2d/hd)", axes=("token", "dim"), labels=(labels, dims),
            symbol="sin", query_axis=0, how=How("rope_angle", params={"fn": "sin", "theta": theta}))
    q, k, _ = _qkv(mha, x)  # (H, T, hd) each, before rotation
    hl = _dims(h)
    for name, sym, val in (("queries", "q", q), ("keys", "k", k)):
        rec.add(sec, name, val, title=f"{name.capitalize()} before rotation",
                why="the module's projections, as in multi-head attention",
                formula=f"{name} = x @ W_{'query' if name == 'queries' else 'key'}, split into heads",
                axes=_HTD, labels=(hl, labels, dims), symbol=sym, query_axis=1,
                how=How("module", params={"module": mod}), depends=("input.embeddings",))
    q_rot, k_rot = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (H, T, hd) each
    for name, sym, val in (("queries_rotated", "q'", q_rot), ("keys_rotated", "k'", k_rot)):
        src = f"rope.{name.split('_')[0]}"
        rec.add(sec, name, val, title=f"{name.split('_')[0].capitalize()} rotated by their position",
                why="Llama's rotate-half: x' = x cos + rotate_half(x) sin, rotate_half(x1, x2) = (-x2, x1)",
                formula=f"{sym}_p = {sym[0]}_p cos(p θ) + rotate_half({sym[0]}_p) sin(p θ)   (attnlab.rope.apply_rope)",
                axes=_HTD, labels=(hl, labels, dims), symbol=sym, query_axis=1,
                how=How("rope", (src, "rope.cos", "rope.sin")), depends=(src, "rope.cos", "rope.sin"))
    scores = F.all_pair_scores(q_rot, k_rot) / math.sqrt(hd)  # (H, T, T)
    unrotated = (q * k).sum(dim=-1) / math.sqrt(hd)  # (H, T): each token with itself, before rotation
    hq = (hl, labels, labels)
    rec.add(sec, "scores", scores, title="Scores of the rotated queries and keys (before the causal mask)",
            why="the dot product of two vectors turned by angles mθ and nθ depends on (m − n)θ only",
            formula=f"score(i, j) = q'_i · k'_j / √hd   (hd = {hd})", axes=_QK, labels=hq, symbol="score",
            query_axis=1, how=How("attn_scores", ("rope.queries_rotated", "rope.keys_rotated"),
                                  {"scale": math.sqrt(hd), "mask": None}),
            depends=("rope.queries_rotated", "rope.keys_rotated"),
            extra={"max_abs_diff_diagonal_to_unrotated": _diff(scores.diagonal(dim1=-2, dim2=-1), unrotated)})
    cos_s, sin_s = rope_angles(positions + s, hd, o.rope_base)  # (T, hd): every position moved by s
    cos64, sin64 = rope_angles(positions + s, hd, o.rope_base, dtype=torch.float64)  # (T, hd): the same in float64
    rot_err = max(_diff(cos_s.double(), cos64), _diff(sin_s.double(), sin64))  # float32 angles' rounding
    shifted = F.all_pair_scores(apply_rope(q, cos_s, sin_s), apply_rope(k, cos_s, sin_s)) / math.sqrt(hd)  # (H, T, T)
    rec.add(sec, "scores_shifted", shifted, title=f"The same scores with every position moved by {s}",
            why="rotating q and k by positions p + s instead of p leaves every score as it was: only the distance "
                "between the tokens counts, so a cache can keep rotated keys",
            formula=f"score(i, j) = rot(q_i, i + {s}) · rot(k_j, j + {s}) / √hd", axes=_QK, labels=hq,
            symbol="score", query_axis=1, how=How("module", params={"module": f"rope_angles(positions + {s})"}),
            depends=("rope.queries", "rope.keys"),
            extra={"max_abs_diff_to_scores": _diff(shifted, scores), "max_rotation_error_float32": rot_err,
                   "largest_position": int(s + t - 1)})
    # One query vector and one key vector placed at every pair of positions: constant along diagonals.
    qi = min(1, t - 1)
    qv, kv = q[0, qi], k[0, qi]  # (hd,) each: the chapter's query token, head 1
    rot_q = apply_rope(qv.expand(1, t, hd), cos, sin)[0]  # (T, hd): q at positions 0..T-1
    rot_k = apply_rope(kv.expand(1, t, hd), cos, sin)[0]  # (T, hd)
    pair = F.all_pair_scores(rot_q, rot_k) / math.sqrt(hd)  # (T, T)
    diag = max((float(pair.diagonal(off).max() - pair.diagonal(off).min()) for off in range(-t + 1, t)), default=0.0)
    rec.add(sec, "relative", pair, title=f"One query and one key ({labels[qi]}'s, head 1) at every pair of positions",
            why="the same two vectors give the same score wherever they stand, as long as they are the same "
                "distance apart: every diagonal is constant",
            formula=f"score(m, n) = rot(q_{labels[qi]}, m) · rot(k_{labels[qi]}, n) / √hd",
            axes=("query", "key"), labels=(pos_labels, pos_labels), symbol="score",
            how=How("module", params={"module": "attnlab.rope.apply_rope"}), depends=("rope.queries", "rope.keys"),
            extra={"max_spread_along_diagonals": diag})
    out, mod_w = mha(x[None], need_weights=True)  # (1, T, D), (1, H, T, T)
    masked = F.mask_before_softmax(scores, causal_mask(t))  # (H, T, T)
    weights = F.softmax(masked, dim=-1)  # (H, T, T)
    rec.add(sec, "weights", weights, title="Causal attention weights with RoPE",
            why="the rotated scores go through the causal mask and softmax as before",
            formula="weights = softmax(scores masked after i, dim=-1)", axes=_QK, labels=hq, symbol="weight",
            query_axis=1, how=How("module", params={"module": mod}), depends=("rope.scores",),
            extra={"max_abs_diff_to_module": _diff(weights, mod_w[0])})
    rec.add(sec, "output", out[0], title="MultiHeadAttention(rope=True): the output",
            why="the module rotates q and k by position inside forward (attnlab.rope.RotaryEmbedding)",
            formula=f"torch.manual_seed({seed}); {mod}(x)", axes=("token", "dim"),
            labels=(labels, _dims(o.d_out)), symbol="out", query_axis=0,
            how=How("module", params={"module": mod}), depends=("rope.weights",))

# --------------------------------------------------------------------------------------------------
# Detail lines, written from the recorded steps
# --------------------------------------------------------------------------------------------------

_MAX_LISTED = 12


_SAME = 1e-5  # largest difference still called "equals" in the detail lines


def _agree(diff: float, what: str) -> str:
    return f"{'equals' if diff < _SAME else 'DIFFERS FROM'} {what} (largest difference {diff:.1e})"


def add_modern_details(walk: Any) -> None:
    """The detail lines of the opt-in sections (each only when its section was recorded)."""
    qi, lab = walk.query, walk.labels

    def det(step_id: str, lines: list[str]) -> None:
        if step_id in walk:
            walk.step(step_id).detail = tuple(lines)

    if "cache.filled" in walk:
        f = walk.step("cache.filled")
        per, sizes = f.extra["bytes_per_token"], f.extra["bytes"]
        det(f.id, [f"each cached token takes {per} bytes (its key and value in every key/value head, float32)"] +
            [f"after token {i + 1} ({lab[i]}): {i + 1} slot{'s' if i else ''} filled, {n} bytes"
             for i, n in enumerate(sizes[:_MAX_LISTED])])
        det("cache.scores", walk.explain_cell("cache.scores", (0, qi, 0)) +
            [f"row {lab[qi]} is step {qi + 1}: its query against the {qi + 1} cached key{'s' if qi else ''}"])
        w = walk.step("cache.weights")
        det(w.id, [_agree(w.extra["max_abs_diff_to_module"], "the module's own cached weights"),
                   _agree(w.extra["max_abs_diff_to_recomputed"], "causal attention recomputed on the whole sequence")])
        r = walk.step("cache.recomputed")
        det(r.id, [_agree(r.extra["max_abs_diff_to_cached"], "cache.output, token for token")])
    if "gqa.sharing" in walk:
        s = walk.step("gqa.sharing")
        groups: dict[int, list[int]] = {}
        for h, g in enumerate(s.extra["kv_head_of"]):
            groups.setdefault(g, []).append(h + 1)
        kv, full = s.extra["kv_bytes_per_token"], s.extra["mha_kv_bytes_per_token"]
        det(s.id, [f"query heads {', '.join(map(str, hs))} -> key/value head {g}" for g, hs in groups.items()] +
            [f"KV cache per token and layer: {kv} bytes instead of {full} (float32), {full / kv:g}× less"])
        h = s.values.shape[0] - 1
        det("gqa.scores", walk.explain_cell("gqa.scores", (h, qi, 0)))
        w = walk.step("gqa.weights")
        det(w.id, [_agree(w.extra["max_abs_diff_to_module"], "MultiHeadAttention(num_kv_groups=...)'s weights"),
                   _agree(w.extra["max_abs_diff_to_reference"], "attnlab.functional's grouped-query attention")])
        o = walk.step("gqa.output")
        det(o.id, [_agree(o.extra["max_abs_diff_to_mha_with_copies"],
                          "MultiHeadAttention with every group's key/value weights copied to its query heads")])
    if "window.mask" in walk:
        m = walk.step("window.mask")
        lines = [f"{lab[i]} sees {', '.join(lab[j] for j in range(len(lab)) if m.values[i, j])}"
                 for i in range(min(len(lab), _MAX_LISTED))]
        w = int(walk.settings.modern["window"]["window_size"])
        if w >= len(lab):
            lines.append(f"the window ({w}) is at least as long as the sequence ({len(lab)}): the causal mask")
        det(m.id, lines)
        det("window.scores", walk.explain_cell("window.scores", (0, qi, 0)))
        det("window.weights", [_agree(walk.step("window.weights").extra["max_abs_diff_to_module"],
                                      "MultiHeadAttention(window_size=...)'s weights")])
        det("window.output", [_agree(walk.step("window.output").extra["max_abs_diff_to_attn_mask"],
                                     "causal MultiHeadAttention with the band as attn_mask")])
    if "rope.cos" in walk:
        c = walk.step("rope.cos")
        thetas = c.extra["theta"]
        lines = ["θ = " + ", ".join(f"θ_{i + 1} = {t:.6g}" for i, t in enumerate(thetas)) +
                 " (one per feature pair; the first turns fastest)"]
        if len(thetas) == 1:
            lines.append(f"head size 2: one feature pair, whose θ_1 = base^0 = 1 for every base, so --rope-base "
                         f"({walk.settings.modern['rope'].get('rope_base', 10000.0):g}) changes none of these "
                         "numbers; --d-out 4 (head size 4 or more) adds slower pairs where it does")
        det(c.id, lines)
        det("rope.queries_rotated", walk.explain_cell("rope.queries_rotated", (0, qi, 0)))
        sc = walk.step("rope.scores")
        det(sc.id, walk.explain_cell(sc.id, (0, qi, 0)) + [
            "the diagonal (each token with itself, distance 0) "
            + _agree(sc.extra["max_abs_diff_diagonal_to_unrotated"], "q_i · k_i / √hd without rotation")
            + ": turning both vectors by the same angle keeps their dot product"])
        sh = walk.step("rope.scores_shifted")
        lines = [_agree(sh.extra["max_abs_diff_to_scores"], "rope.scores")]
        err = sh.extra.get("max_rotation_error_float32", 0.0)
        if sh.extra["max_abs_diff_to_scores"] >= _SAME and err > 1e-6:
            lines.append(f"float32, not RoPE: at positions up to {sh.extra['largest_position']} the angles p × θ keep "
                         f"only about 7 significant digits, so their cos and sin are off by up to {err:.1e} from "
                         "float64; a smaller --rope-shift shows the scores unchanged")
        det(sh.id, lines)
        r = walk.step("rope.relative")
        spread = r.extra["max_spread_along_diagonals"]
        det(r.id, [f"every diagonal is constant (largest spread {spread:.1e}): score(m, n) depends only on m − n"])
        det("rope.weights", [_agree(walk.step("rope.weights").extra["max_abs_diff_to_module"],
                                    "MultiHeadAttention(rope=True)'s weights")])
