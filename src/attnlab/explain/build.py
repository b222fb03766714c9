"""Run chapter 3 on one input and record every intermediate as a :class:`Step`.

All attention math is :mod:`attnlab.functional`, :mod:`attnlab.masks` and the chapter's classes in
:mod:`attnlab.modules`; this module only calls them in the chapter's order, with the chapter's seeds,
and records what they return.

Seeds (the chapter's, with the default ``seed=123``):
    trainable   torch.manual_seed(seed); SelfAttention_v1(d_in, d_out)  (torch.rand for W_query, W_key,
                W_value, in that order)
    v2/causal   torch.manual_seed(v2_seed = seed + 666 = 789); SelfAttention_v2(d_in, d_out); the causal
                section reuses its weights
    dropout     torch.manual_seed(seed) before nn.Dropout(p) on ones(T, T), and again before dropout on
                the causal attention weights
    classes     torch.manual_seed(seed) before CausalAttention(d_in, d_out, T, 0.0),
                MultiHeadAttentionWrapper(d_in, d_out, T, 0.0, heads) and
                MultiHeadAttention(d_in, d_out, T, 0.0, heads)
    random embeddings  a generator seeded with ``seed``: torch.rand(T, dim) rounded to 2 decimals

With given weights (``weights=``) W_query/W_key/W_value replace the seeded ones in the trainable section,
in SelfAttention_v1/v2, in the causal section (steps and CausalAttention) and in multi-head attention,
where head h uses columns ``h*d_out/heads .. (h+1)*d_out/heads`` (so the wrapper's heads and
MultiHeadAttention's heads are the same heads); only MultiHeadAttention's output projection stays seeded.
Shape letters: T num tokens, d_in embedding size, d_out query/key/value size, H heads, hd head size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from attnlab import functional as F
from attnlab.book import BOOK_TOKENS, book_inputs
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.explain.inputs import WEIGHT_NAMES, load_weights, parse_tokens, to_matrix, unique_labels
from attnlab.explain.kinds import kind_of
from attnlab.explain.modern import MODERN_DEFAULTS, add_modern_details, build_modern, modern_options
from attnlab.explain.steps import (
    SECTIONS,
    How,
    Settings,
    Step,
    Walkthrough,
    fmt,
    fmt_vector,
    resolve_sections,
)
from attnlab.masks import causal_mask
from attnlab.modules import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
)

__all__ = ["explain", "resolve_query"]

_MAX_LISTED = 12  # detail lines list at most this many tokens

# Caps for a step-by-step walkthrough, checked before anything is allocated: every section keeps
# (T, T) matrices, multi-head attention (H, T, T) ones, and the wrapper H heads of d_in x d_out weights.
MAX_TOKENS = 2048
MAX_DIM = 1024  # d_in: --dim, and the width of given embeddings
MAX_D_OUT = 1024
MAX_HEADS = 16


def _dims(n: int) -> tuple[str, ...]:
    return tuple(str(i + 1) for i in range(n))


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32).copy()


# torch seeds are unsigned 64-bit numbers, and SelfAttention_v2 uses seed + 666.
MAX_SEED = 2**64 - 1 - 666


def _check_int(name: str, value: object, low: int = 1, high: int | None = None,
               why: str = " for a step-by-step walkthrough") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise AttnlabInputError(f"{name} must be an int >= {low}, got {value!r}")
    if high is not None and value > high:
        raise AttnlabInputError(f"{name} must be at most {high}{why}, got {value}")
    return int(value)


def _check_count(name: str, what: str, count: int, limit: int) -> None:
    if count > limit:
        raise AttnlabInputError(f"{name} must have at most {limit} {what} for a step-by-step walkthrough, got {count}")


def _resolve_sections(sections: str | Iterable[str] | None) -> tuple[str, ...]:
    if sections is None:
        return SECTIONS
    return resolve_sections(sections)[0]


def _divisors(n: int) -> list[int]:
    return [h for h in range(1, min(n, MAX_HEADS) + 1) if n % h == 0]


def _choose_heads(heads: int, given_heads: bool, d_out: int, given_weights: bool) -> tuple[int, int, str]:
    """(wrapper heads, MultiHeadAttention heads, a note saying what was chosen and why, or "").

    MultiHeadAttention splits d_out into heads, so its head count must divide d_out; the wrapper with
    seeded weights has heads of width d_out each (any count works: exercise 3.2 is d_out=1, 2 heads),
    with given weights it splits their d_out columns too. Without ``--heads``: 2 where valid, else the
    smallest valid count above 1 (1 when d_out is 1)."""
    valid = _divisors(d_out)
    auto = next((h for h in valid if h >= 2), 1)
    if heads in valid:
        return heads, heads, ""
    if given_weights:
        if given_heads:
            raise AttnlabInputError(
                f"heads must divide d_out (the weights' width): got d_out={d_out} and heads={heads} "
                f"(try heads in {valid})"
            )
        return auto, auto, (f"heads = {auto}: the default 2 does not divide d_out = {d_out} (your weights' "
                            f"width); --heads N chooses another of {valid}")
    why = "the default 2" if not given_heads else f"--heads {heads}"
    return heads, auto, (f"MultiHeadAttention uses {auto} head{'s' if auto > 1 else ''}: its heads split d_out "
                         f"= {d_out}, which {why} does not divide (the wrapper keeps {heads} heads of width "
                         f"{d_out}); --heads N with N in {valid} makes them the same")


def resolve_query(query: str | int | None, tokens: Sequence[str], labels: Sequence[str]) -> int:
    """The 0-based index of the query: None (the second token, as the chapter), a 0-based int index, or text:
    a label, a token (refused when it appears twice) or a 1-based position. AttnlabInputError otherwise."""
    n = len(tokens)
    if query is None:
        return 1 if n >= 2 else 0  # the chapter's query is the second token, x^(2)
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
        if not 0 <= query < n:
            raise AttnlabInputError(f"query index must be in 0..{n - 1} (0-based), got {query}")
        return int(query)
    if not isinstance(query, str):
        raise AttnlabInputTypeError(f"query must be a token or a position, got {query!r}")
    q = query.strip()
    if q in labels:
        return labels.index(q)
    hits = [i for i, t in enumerate(tokens) if t == q]
    if len(hits) > 1:
        raise AttnlabInputError(
            f"query {q!r} appears {len(hits)} times (positions {', '.join(str(i + 1) for i in hits)}); "
            "give its position instead"
        )
    if hits:
        return hits[0]
    if q.isdigit():
        pos = int(q)
        if not 1 <= pos <= n:
            raise AttnlabInputError(f"query position must be in 1..{n}, got {pos}")
        return pos - 1
    shown = ", ".join(labels[:_MAX_LISTED]) + (", ..." if n > _MAX_LISTED else "")
    raise AttnlabInputError(f"query {q!r} is not one of the tokens ({shown}); give a token or a position 1..{n}")


def _resolve_inputs(tokens: str | Sequence[str] | None, embeddings: Any, dim: int | None,
                    seed: int) -> tuple[tuple[str, ...], np.ndarray, str]:
    toks = None if tokens is None else parse_tokens(tokens, what="tokens")
    if toks is not None:
        _check_count("tokens", "tokens", len(toks), MAX_TOKENS)
    if dim is not None and (toks is None or embeddings is not None):  # it would be silently ignored
        raise AttnlabInputError(f"dim sets the width of the random embeddings drawn for your tokens, so it needs tokens "
                         f"and no embeddings (got dim={dim!r} with "
                         f"{'embeddings' if embeddings is not None else 'the book embeddings'}): give tokens, or "
                         "leave out dim")
    if embeddings is None:
        if toks is None:
            return tuple(BOOK_TOKENS), _np(book_inputs()), "book"
        d = _check_int("dim", 3 if dim is None else dim, high=MAX_DIM)
        gen = torch.Generator().manual_seed(seed)
        drawn = torch.rand(len(toks), d, generator=gen)  # (T, dim), rounded for hand calculation
        return toks, np.round(_np(drawn), 2).astype(np.float32), "random"
    x = to_matrix(embeddings, "embeddings")
    _check_count("embeddings", "rows (tokens)", x.shape[0], MAX_TOKENS)
    _check_count("embeddings", "columns (d_in)", x.shape[1], MAX_DIM)
    if toks is None:
        toks = tuple(f"t{i + 1}" for i in range(x.shape[0]))
    elif len(toks) != x.shape[0]:
        raise AttnlabInputError(
            f"tokens and embeddings must have the same count: {len(toks)} tokens but {x.shape[0]} embedding rows"
        )
    return toks, x, "given"


def _resolve_weights(weights: str | Mapping[str, Any] | None, d_in: int, d_out: int | None) -> tuple[dict[str, np.ndarray] | None, int]:
    if weights is None:
        return None, 2 if d_out is None else _check_int("d_out", d_out, high=MAX_D_OUT)
    ws = load_weights(weights, what="weights")
    shape0 = ws["W_query"].shape
    _check_count("weights", "columns (d_out)", shape0[1], MAX_D_OUT)
    for name in WEIGHT_NAMES:
        w = ws[name]
        if w.shape[0] != d_in:
            raise AttnlabInputError(
                f"{name} must have d_in = {d_in} rows (one per embedding feature, x @ W), got shape "
                f"{w.shape[0]} x {w.shape[1]}"
            )
        if w.shape != shape0:
            raise AttnlabInputError(
                f"W_query, W_key and W_value must have the same shape, got W_query {shape0[0]} x {shape0[1]} "
                f"and {name} {w.shape[0]} x {w.shape[1]}"
            )
    if d_out is not None and d_out != shape0[1]:
        raise AttnlabInputError(f"d_out={d_out} does not match the weights, which are {shape0[0]} x {shape0[1]}")
    return ws, shape0[1]


class _Recorder:
    """Collects the steps of the sections it is given; only the selected sections' builders run."""

    def __init__(self, sections: tuple[str, ...]) -> None:
        self.sections = ("input",) + sections
        self.steps: list[Step] = []
        self.inputs: dict[str, float] = {}  # largest |number| of the embeddings (and given weights)
        self.absent: dict[str, str] = {}  # steps left out on this input -> why

    def add(self, section: str, name: str, values: Tensor | np.ndarray, **kw: Any) -> None:
        if section not in self.sections:  # a builder runs only for a selected section: never happens
            raise AssertionError(f"section {section!r} was not selected")
        step = Step(section=section, name=name, values=_np(values) if isinstance(values, Tensor) else values, **kw)
        _check_finite(step, self.steps, self.inputs)
        self.steps.append(step)


def _check_finite(step: Step, earlier: list[Step], inputs: Mapping[str, float]) -> None:
    """Finite input must give finite numbers: ValueError naming the step and the cause otherwise. The only
    infinities allowed are the -inf of masked scores (``mask_before``)."""
    bad = ~np.isfinite(step.values)
    if step.how is not None and kind_of(step).holds_neg_inf:
        bad &= ~np.isneginf(step.values)
    if not bad.any():
        return
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    got = fmt(float(step.values[where]))
    at = f" at {list(where)}" if where else ""
    if step.how is not None and step.how.kind == "divide_by_sum" and step.how.operands:
        src = next((s for s in earlier if s.id == step.how.operands[0]), None)
        if src is not None and abs(float(src.values.sum())) < 1e-30:
            raise AttnlabInputError(
                f"{step.id} is {got}{at}: the scores sum to 0, so dividing by their sum is undefined (one "
                "reason softmax is used instead); choose other embeddings, or leave out --section simple"
            )
    largest = max(inputs.values(), default=0.0)
    source = max(inputs, key=lambda k: inputs[k]) if inputs else "embeddings"
    raise AttnlabInputError(
        f"{step.id} is {got}{at}: overflow, its numbers exceed float32's range (±3.4e38) although the "
        f"input is finite (the largest |number| in your {source} is {largest:.3g}); scale the {source} "
        "down, e.g. to numbers below 1e3"
    )


def explain(
    tokens: str | Sequence[str] | None = None,
    embeddings: Any = None,
    *,
    query: str | int | None = None,
    weights: str | Mapping[str, Any] | None = None,
    d_out: int | None = None,
    heads: int | None = None,
    dropout: float = 0.5,
    seed: int = 123,
    scale: bool = True,
    sections: str | Iterable[str] | None = None,
    dim: int | None = None,
    v2_seed: int | None = None,
    kv_groups: int | None = None,
    window_size: int | None = None,
    rope_base: float = 10000.0,
    rope_shift: int | None = None,
) -> Walkthrough:
    """Compute chapter 3 on one input and return every intermediate as a :class:`Walkthrough`.

    tokens      whitespace-separated string or list of tokens; None with no embeddings: the book's six
    embeddings  (num_tokens, d_in) nested lists / numpy / tensor; None: the book's, or seeded random
                ones of width ``dim`` (default 3; rounded to 2 decimals) when tokens are given (``dim``
                without tokens, or with embeddings, is a ValueError: it would change nothing)
    query       a token, a 1-based position as text ("2"), or a 0-based int index; default the 2nd token
    weights     {"W_query", "W_key", "W_value"}, each d_in × d_out (x @ W), or a path to such a JSON file;
                replaces the seeded weights everywhere (see the module docstring)
    heads       heads of the multi-head section; None: 2 where that is valid, else a valid count, said in
                ``settings.heads_note`` (see :func:`_choose_heads`). Only checked when "multihead" is selected.
    d_out, dropout, seed, v2_seed (default seed + 666 = 789), scale (divide scores by √d_k in
    the trainable and causal steps), sections (a subset of ``SECTIONS`` or their old names, see
    :func:`attnlab.explain.steps.resolve_sections`; default all of chapter 3).

    The opt-in sections ``cache``, ``gqa``, ``window`` and ``rope`` (:mod:`attnlab.explain.modern`) are
    recorded only when named in ``sections``; ``heads`` and ``d_out`` apply to them too (default: each
    section's own, ``MODERN_DEFAULTS``), ``kv_groups`` to ``gqa`` (default 2), ``window_size`` to ``window``
    (default 3), ``rope_base`` and ``rope_shift`` (positions added to show that scores do not change,
    default 10) to ``rope``.

    Only the selected sections are computed. Sizes are capped for a step-by-step walkthrough (checked
    before anything is allocated): at most ``MAX_TOKENS`` tokens, ``MAX_DIM`` embedding numbers,
    ``MAX_D_OUT`` for d_out and ``MAX_HEADS`` heads.

    Raises ValueError / TypeError (one-line messages naming the argument) for bad input.
    """
    seed = _check_int("seed", seed, low=0, high=MAX_SEED,
                      why=" (torch seeds are 64-bit and SelfAttention_v2 uses seed + 666)")
    v2_seed = seed + 666 if v2_seed is None else _check_int("v2_seed", v2_seed, low=0, high=2**64 - 1,
                                                            why=" (torch seeds are 64-bit)")
    heads_given = heads is not None
    heads_asked, d_out_asked = heads, d_out
    heads = _check_int("heads", heads, high=MAX_HEADS) if heads_given else 2
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AttnlabInputError(f"dropout must be a number in [0, 1), got {dropout!r}")
    dropout = float(dropout)
    chosen = _resolve_sections(sections)
    toks, x_np, source = _resolve_inputs(tokens, embeddings, dim, seed)
    labels = unique_labels(toks)
    qi = resolve_query(query, toks, labels)
    d_in = x_np.shape[1]
    given, d_out = _resolve_weights(weights, d_in, d_out)
    heads, mha_heads, note = _choose_heads(heads, heads_given, d_out, given is not None) \
        if "multihead" in chosen else (heads, heads, "")
    for name, value, unset, sec in (("kv_groups", kv_groups, None, "gqa"), ("window_size", window_size, None, "window"),
                                    ("rope_base", rope_base, 10000.0, "rope"), ("rope_shift", rope_shift, None, "rope")):
        if value != unset and sec not in chosen:
            raise AttnlabInputError(f"{name} applies to section {sec!r} only, which is not selected: add it to sections "
                             f"(--section {sec})")
    if given and d_out_asked is None:
        d_out_asked = d_out  # the weights' width
    modern = {sec: modern_options(sec, heads=heads_asked, d_out=d_out_asked, kv_groups=kv_groups,
                                  window_size=window_size, rope_base=rope_base, rope_shift=rope_shift,
                                  max_heads=MAX_HEADS, max_d_out=MAX_D_OUT, num_tokens=len(toks))
              for sec in chosen if sec in MODERN_DEFAULTS}
    settings = Settings(
        d_in=d_in, d_out=d_out, heads=heads, dropout=dropout, seed=seed, v2_seed=v2_seed, scale=bool(scale),
        embeddings=source, weights="given" if given else "seeded", sections=chosen, mha_heads=mha_heads,
        heads_note=note, modern={sec: opts.to_dict() for sec, opts in modern.items()},
    )
    rec = _Recorder(chosen)
    x = torch.from_numpy(x_np)  # (T, d_in)
    # Each section needs only x, the labels and the settings (every seeded one sets its own seed), and
    # the detail lines read only their own section and input.embeddings: so only the selected ones run.
    builders = {
        "simple": lambda: _simple(rec, x, labels, qi),
        "all": lambda: _all(rec, x, labels),
        "trainable": lambda: _trainable(rec, x, labels, settings, given),
        "causal": lambda: _causal(rec, x, labels, settings, given),
        "multihead": lambda: _multihead(rec, x, labels, settings, given),
    }
    for sec, opts in modern.items():
        builders[sec] = partial(build_modern, rec, sec, x, labels, opts, seed, given)
    rec.inputs = {"embeddings": float(np.abs(x_np).max())}
    if given:
        rec.inputs["weights"] = max(float(np.abs(w).max()) for w in given.values())
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        _input(rec, x, labels, source)
        for name in chosen:
            builders[name]()
    walk = Walkthrough(tokens=toks, labels=labels, query=qi, settings=settings, steps=rec.steps, absent=rec.absent)
    _add_details(walk)
    add_modern_details(walk)
    return walk


# --------------------------------------------------------------------------------------------------
# The sections, in the chapter's order
# --------------------------------------------------------------------------------------------------

_TOKEN_DIM = ("token", "dim")
_QUERY_KEY = ("query", "key")


def _input(rec: _Recorder, x: Tensor, labels: tuple[str, ...], source: str) -> None:
    where = {"book": "the chapter's 3-dimensional embeddings", "given": "your embeddings",
             "random": "seeded random embeddings, rounded to 2 decimals"}[source]
    rec.add("input", "embeddings", x, title="Token embeddings x",
            why="attention works on vectors: each token is one row, and every step below mixes these rows",
            formula=f"x_i = embedding of token i ({where})", axes=_TOKEN_DIM,
            labels=(labels, _dims(x.shape[1])), symbol="x", query_axis=0, how=How("input", params={"source": where}))


def _simple(rec: _Recorder, x: Tensor, labels: tuple[str, ...], qi: int) -> None:
    q = labels[qi]
    xq = x[qi]  # (d_in,)
    scores = F.dot_scores_loop(xq, x)  # (T,); equal to F.dot_scores up to float32 rounding (tested in the core)
    key = (labels,)
    rec.add("simple", "scores", scores, title=f"Attention scores of the query {q}",
            why=f"a dot product measures how aligned two vectors are: the larger, the more {q} attends to that token",
            formula=f"score({q}, i) = x_{q} · x_i", axes=("key",), labels=key, symbol="score",
            how=How("dot", ("input.embeddings", "input.embeddings"), {"row": qi}),
            depends=("input.embeddings",), extra={"sum": float(scores.sum())})
    by_sum = F.normalize_by_sum(scores)  # (T,)
    rec.add("simple", "weights_by_sum", by_sum, title="Attention weights by dividing by the sum",
            why="normalise the scores so that they sum to 1 (simple, but breaks with negative scores)",
            formula=f"weight({q}, i) = score({q}, i) / Σ_j score({q}, j)", axes=("key",), labels=key,
            symbol="weight", how=How("divide_by_sum", ("simple.scores",)), depends=("simple.scores",),
            extra={"sum_of_scores": float(scores.sum()), "sum": float(by_sum.sum())})
    naive = F.softmax_naive(scores)  # (T,)
    if not bool(torch.isfinite(naive).all()):  # the chapter's point: exp overflows for large scores
        top = float(scores.max())
        rec.absent["simple.weights_naive"] = (
            f"the naive softmax overflows on this input: exp({fmt(top, 1)}) exceeds float32 (exp(x) is inf for "
            "x above about 88.7), which is why the stable softmax (simple.weights) subtracts the largest score "
            "first; smaller embeddings show it"
        )
    else:
        rec.add("simple", "weights_naive", naive, title="Attention weights by the naive softmax",
                why="softmax keeps every weight positive and favours the largest scores",
                formula=f"weight({q}, i) = exp(score({q}, i)) / Σ_j exp(score({q}, j))", axes=("key",), labels=key,
                symbol="weight", how=How("softmax_naive", ("simple.scores",)), depends=("simple.scores",),
                extra={"sum_of_exps": float(torch.exp(scores).sum()), "sum": float(naive.sum())})
    weights = F.softmax(scores)  # (T,)
    rec.add("simple", "weights", weights, title="Attention weights by softmax",
            why="the same numbers, computed stably: subtracting the largest score first keeps exp from overflowing",
            formula=f"weight({q}, i) = softmax(score({q}, ·))_i", axes=("key",), labels=key, symbol="weight",
            how=How("softmax", ("simple.scores",)), depends=("simple.scores",), extra={"sum": float(weights.sum())})
    context = F.context_vector_loop(weights, x)  # (d_in,)
    rec.add("simple", "context", context, title=f"Context vector of {q}",
            why=f"the weighted sum of all embeddings: what {q} gathers from the whole sentence",
            formula=f"z_{q} = Σ_i weight({q}, i) × x_i", axes=("dim",), labels=(_dims(x.shape[1]),), symbol="z",
            how=How("weighted_sum", ("simple.weights", "input.embeddings")),
            depends=("simple.weights", "input.embeddings"))


def _all(rec: _Recorder, x: Tensor, labels: tuple[str, ...]) -> None:
    scores = F.all_pair_scores(x)  # (T, T)
    qk = (labels, labels)
    rec.add("all", "scores", scores, title="Attention scores of every pair of tokens",
            why="the same dot products for every token as the query at once: one matrix product",
            formula="scores = x @ xᵀ   (score(i, j) = x_i · x_j)", axes=_QUERY_KEY, labels=qk, symbol="score",
            query_axis=0, how=How("dot", ("input.embeddings", "input.embeddings")), depends=("input.embeddings",))
    weights = F.softmax(scores, dim=-1)  # (T, T)
    rec.add("all", "weights", weights, title="Attention weights of every token (softmax of each row)",
            why="each row is one query's weights over all keys, so every row sums to 1",
            formula="weights = softmax(scores, dim=-1)", axes=_QUERY_KEY, labels=qk, symbol="weight",
            query_axis=0, how=How("softmax", ("all.scores",)), depends=("all.scores",),
            extra={"row_sums": weights.sum(dim=-1).numpy()})
    context = F.context_vectors(weights, x)  # (T, d_in)
    rec.add("all", "context", context, title="Context vectors of every token",
            why="every token's weighted sum of the embeddings, as one matrix product",
            formula="context = weights @ x", axes=_TOKEN_DIM, labels=(labels, _dims(x.shape[1])), symbol="z",
            query_axis=0, how=How("weighted_sum", ("all.weights", "input.embeddings")),
            depends=("all.weights", "input.embeddings"))


def _set_param(param: torch.nn.Parameter, value: np.ndarray) -> None:
    param.copy_(torch.from_numpy(value))


def _attention_steps(rec: _Recorder, sec: str, x: Tensor, labels: tuple[str, ...], w: dict[str, Tensor], scale: bool,
                     sources: Mapping[str, str]) -> dict[str, Any]:
    """W_query/W_key/W_value, queries/keys/values, scores, (scaled scores), weights: shared by the
    trainable and causal sections. ``sources[name]`` is the formula of each weight matrix (Python that
    recomputes it when the weights are seeded). Returns the tensors."""
    d_in, d_out = w["W_query"].shape
    io = (_dims(d_in), _dims(d_out))
    out: dict[str, Any] = {}
    for name, sym, role in (("W_query", "W_query", "query"), ("W_key", "W_key", "key"),
                            ("W_value", "W_value", "value")):
        rec.add(sec, name, w[name], title=f"Weight matrix {name} ({d_in} × {d_out})",
                why=f"trainable weights that turn each {d_in}-number embedding into a {d_out}-number {role}",
                formula=sources[name], axes=("in", "out"), labels=io, symbol=sym,
                how=How("weights", params={"source": sources[name]}))
    for name, sym, wname, why in (
        ("queries", "q", "W_query", "what each token is looking for"),
        ("keys", "k", "W_key", "what each token offers to be found by"),
        ("values", "v", "W_value", "what each token passes on when attended to"),
    ):
        t = x @ w[wname]  # (T, d_out), the chapter's x @ W
        out[name] = t
        rec.add(sec, name, t, title=f"{name.capitalize()} ({sym}_i = x_i @ {wname})", why=why,
                formula=f"{name} = x @ {wname}", axes=_TOKEN_DIM, labels=(labels, _dims(d_out)), symbol=sym,
                query_axis=0, how=How("project", ("input.embeddings", f"{sec}.{wname}")),
                depends=("input.embeddings", f"{sec}.{wname}"))
    qk = (labels, labels)
    scores = F.all_pair_scores(out["queries"], out["keys"])  # (T, T)
    out["scores"] = scores
    rec.add(sec, "scores", scores, title="Attention scores (queries · keys)",
            why="a query is compared with every key by a dot product, no longer the raw embeddings",
            formula="score(i, j) = q_i · k_j   (scores = queries @ keysᵀ)", axes=_QUERY_KEY, labels=qk,
            symbol="score", query_axis=0, how=How("dot", (f"{sec}.queries", f"{sec}.keys")),
            depends=(f"{sec}.queries", f"{sec}.keys"))
    logits_id = f"{sec}.scores"
    logits = scores
    if scale:
        root = math.sqrt(d_out)
        logits = scores / root  # (T, T)
        rec.add(sec, "scaled_scores", logits, title=f"Scaled scores (÷ √d_k = √{d_out})",
                why="dividing by √d_k keeps large dot products from making softmax too peaked (tiny gradients)",
                formula=f"scaled(i, j) = score(i, j) / √d_k = score(i, j) / {root:.4f}", axes=_QUERY_KEY,
                labels=qk, symbol="scaled", query_axis=0,
                how=How("scale", (f"{sec}.scores",), {"divisor": root, "divisor_text": f"√{d_out}"}),
                depends=(f"{sec}.scores",))
        logits_id = f"{sec}.scaled_scores"
    out["logits"] = logits
    out["logits_id"] = logits_id
    return out


def _v1_sources(st: Settings, given: bool) -> dict[str, str]:
    """SelfAttention_v1's weights: torch.rand for W_query, W_key, W_value, in that order after the seed,
    so W_key is the second draw and W_value the third (each formula is the Python that makes it)."""
    if given:
        return {name: f"{name} = your weights" for name in WEIGHT_NAMES}
    out, code = {}, f"torch.manual_seed({st.seed})"
    for name in WEIGHT_NAMES:
        code += f"; {name} = torch.rand({st.d_in}, {st.d_out})"
        out[name] = code
    return out


def _trainable(rec: _Recorder, x: Tensor, labels: tuple[str, ...], st: Settings, given: Mapping[str, np.ndarray] | None) -> None:
    sec = "trainable"
    d_in, d_out = st.d_in, st.d_out
    torch.manual_seed(st.seed)
    v1 = SelfAttention_v1(d_in, d_out)  # torch.rand for W_query, W_key, W_value, in that order
    if given:
        for name in WEIGHT_NAMES:
            _set_param(getattr(v1, name), given[name])
    w = {name: getattr(v1, name).detach() for name in WEIGHT_NAMES}
    t = _attention_steps(rec, sec, x, labels, w, st.scale, _v1_sources(st, given is not None))
    qk = (labels, labels)
    weights = F.softmax(t["logits"], dim=-1)  # (T, T)
    logits_id = t["logits_id"]
    rec.add(sec, "weights", weights, title="Attention weights (softmax of each row)",
            why="as before, softmax turns each query's scores into weights that sum to 1",
            formula=f"weights = softmax({'scores / √d_k' if st.scale else 'scores'}, dim=-1)", axes=_QUERY_KEY,
            labels=qk, symbol="weight", query_axis=0, how=How("softmax", (logits_id,)), depends=(logits_id,),
            extra={"row_sums": weights.sum(dim=-1).numpy()})
    context = F.context_vectors(weights, t["values"])  # (T, d_out)
    rec.add(sec, "context", context, title="Context vectors (weighted sums of the values)",
            why="each token gathers the values, not the embeddings, weighted by its attention weights",
            formula="context = weights @ values   (z_i = Σ_j weight(i, j) × v_j)", axes=_TOKEN_DIM,
            labels=(labels, _dims(d_out)), symbol="z", query_axis=0,
            how=How("weighted_sum", ("trainable.weights", "trainable.values")),
            depends=("trainable.weights", "trainable.values"))
    out_v1 = v1(x)  # (T, d_out)
    mod = f"SelfAttention_v1({d_in}, {d_out})"
    rec.add(sec, "v1_output", out_v1, title="SelfAttention_v1: the same steps as one class",
            why="the class holds W_query, W_key, W_value as nn.Parameter and runs the steps above in forward",
            formula=(f"{mod}(x) with your weights" if given else f"torch.manual_seed({st.seed}); {mod}(x)"),
            axes=_TOKEN_DIM,
            labels=(labels, _dims(d_out)), symbol="z", query_axis=0, how=How("module", params={"module": mod}),
            depends=("input.embeddings", "trainable.W_query", "trainable.W_key", "trainable.W_value"),
            extra={"max_abs_diff_to_context": float((out_v1 - context).abs().max())})
    torch.manual_seed(st.v2_seed)
    v2 = SelfAttention_v2(d_in, d_out)
    if given:
        for name in WEIGHT_NAMES:
            _set_param(getattr(v2, name).weight, given[name].T.copy())  # nn.Linear stores Wᵀ
    mod2 = f"SelfAttention_v2({d_in}, {d_out})"
    rec.add(sec, "v2_output", v2(x), title="SelfAttention_v2: nn.Linear projections",
            why="nn.Linear (without bias) computes x @ Wᵀ with a better weight initialisation than torch.rand",
            formula=(f"{mod2}(x) with your weights" if given else f"torch.manual_seed({st.v2_seed}); {mod2}(x)"),
            axes=_TOKEN_DIM, labels=(labels, _dims(d_out)), symbol="z", query_axis=0,
            how=How("module", params={"module": mod2}), depends=("input.embeddings",))


def _causal(rec: _Recorder, x: Tensor, labels: tuple[str, ...], st: Settings, given: Mapping[str, np.ndarray] | None) -> None:
    sec = "causal"
    d_in, d_out, T = st.d_in, st.d_out, x.shape[0]
    torch.manual_seed(st.v2_seed)
    v2 = SelfAttention_v2(d_in, d_out)
    if given:
        w = {name: torch.from_numpy(given[name]) for name in WEIGHT_NAMES}
        sources = {name: f"{name} = your weights" for name in WEIGHT_NAMES}
    else:
        w = {name: getattr(v2, name).weight.detach().T for name in WEIGHT_NAMES}  # (d_in, d_out)
        sources = {name: f"torch.manual_seed({st.v2_seed}); {name} = SelfAttention_v2({d_in}, {d_out})."
                         f"{name}.weight.T  # nn.Linear stores Wᵀ; as x @ W" for name in WEIGHT_NAMES}
    t = _attention_steps(rec, sec, x, labels, w, st.scale, sources)
    logits, logits_id = t["logits"], t["logits_id"]
    qk = (labels, labels)
    weights = F.softmax(logits, dim=-1)  # (T, T)
    rec.add(sec, "weights", weights, title="Attention weights before masking",
            why="every token still attends to tokens after it, which a model predicting the next word must not see",
            formula="weights = softmax(scores" + (" / √d_k" if st.scale else "") + ", dim=-1)", axes=_QUERY_KEY,
            labels=qk, symbol="weight", query_axis=0, how=How("softmax", (logits_id,)), depends=(logits_id,))
    allowed = causal_mask(T)  # (T, T) bool, True = may attend
    rec.add(sec, "mask", allowed.float(), title="Causal mask (1 = may attend)",
            why="token i may attend only to tokens 1..i: the lower triangle",
            formula="mask(i, j) = 1 if j <= i else 0   (torch.tril(torch.ones(T, T)))", axes=_QUERY_KEY, labels=qk,
            symbol="mask", query_axis=0, how=How("mask"))
    zeroed = weights * allowed  # (T, T)
    rec.add(sec, "weights_zeroed", zeroed, title="Masking after softmax: future weights set to 0",
            why="zeroing future tokens leaves rows that no longer sum to 1",
            formula="weights × mask", axes=_QUERY_KEY, labels=qk, symbol="zeroed", query_axis=0,
            how=How("mask_zero", ("causal.weights", "causal.mask")), depends=("causal.weights", "causal.mask"),
            extra={"row_sums": zeroed.sum(dim=-1).numpy()})
    renorm = F.mask_after_softmax(weights, allowed)  # (T, T)
    rec.add(sec, "weights_renormalized", renorm, title="Masking after softmax: rows renormalised",
            why="dividing each row by its sum makes the weights sum to 1 again",
            formula="renormalised(i, j) = zeroed(i, j) / Σ_k zeroed(i, k)", axes=_QUERY_KEY, labels=qk,
            symbol="weight", query_axis=0, how=How("mask_after", ("causal.weights_zeroed",)),
            depends=("causal.weights_zeroed",), extra={"row_sums": renorm.sum(dim=-1).numpy()})
    masked = F.mask_before_softmax(logits, allowed)  # (T, T)
    rec.add(sec, "scores_masked", masked, title="Masking before softmax: future scores set to -inf",
            why="exp(-inf) = 0, so softmax gives masked tokens weight 0 and normalises over the rest in one go",
            formula=f"masked = {'scaled' if st.scale else 'scores'}.masked_fill(mask == 0, -inf)", axes=_QUERY_KEY,
            labels=qk, symbol="masked", query_axis=0, how=How("mask_before", (logits_id, "causal.mask")),
            depends=(logits_id, "causal.mask"))
    masked_w = F.softmax(masked, dim=-1)  # (T, T)
    diff = float((masked_w - renorm).abs().max())
    rec.add(sec, "weights_masked", masked_w, title="Causal attention weights (softmax of the masked scores)",
            why="the same weights as masking after softmax and renormalising, with one softmax",
            formula="weights = softmax(masked, dim=-1)", axes=_QUERY_KEY, labels=qk, symbol="weight", query_axis=0,
            how=How("softmax", ("causal.scores_masked",)), depends=("causal.scores_masked",),
            extra={"max_abs_diff_to_renormalized": diff, "agree": diff < 1e-6})
    p = st.dropout
    dropout = torch.nn.Dropout(p)  # training mode: drops with probability p, scales the rest by 1/(1-p)
    torch.manual_seed(st.seed)
    example = dropout(torch.ones(T, T))  # (T, T)
    rec.add(sec, "dropout_example", example, title=f"Dropout (p = {p:g}) on a matrix of ones",
            why="during training, dropout zeroes random entries; the kept ones are scaled by 1/(1-p) "
                "so the expected sum stays the same",
            formula=f"torch.manual_seed({st.seed}); nn.Dropout({p:g})(torch.ones({T}, {T}))", axes=_QUERY_KEY,
            labels=qk, symbol="dropped", query_axis=0, how=How("dropout", (), {"p": p}),
            extra={"kept": int((example != 0).sum()), "scale": 1.0 / (1.0 - p)})
    torch.manual_seed(st.seed)
    dropped = dropout(masked_w)  # (T, T)
    rec.add(sec, "dropout_weights", dropped, title=f"Dropout (p = {p:g}) on the causal attention weights",
            why="dropping attention weights at random during training keeps the model from relying on few tokens",
            formula=f"torch.manual_seed({st.seed}); nn.Dropout({p:g})(weights)", axes=_QUERY_KEY, labels=qk,
            symbol="dropped", query_axis=0, how=How("dropout", ("causal.weights_masked",), {"p": p}),
            depends=("causal.weights_masked",), extra={"scale": 1.0 / (1.0 - p)})
    batch = torch.stack((x, x))  # (2, T, d_in)
    torch.manual_seed(st.seed)
    ca = CausalAttention(d_in, d_out, T, 0.0)
    if given:
        for name in WEIGHT_NAMES:
            _set_param(getattr(ca, name).weight, given[name].T.copy())
    mod = f"CausalAttention({d_in}, {d_out}, context_length={T}, dropout=0.0)"
    rec.add(sec, "output", ca(batch), title="CausalAttention on a batch of two copies",
            why="the class adds the causal mask (a buffer) and dropout, and takes a batch of sequences",
            formula=(f"{mod}(torch.stack((x, x))) with your weights" if given else
                     f"torch.manual_seed({st.seed}); {mod}(torch.stack((x, x)))"),
            axes=("batch", "token", "dim"), labels=(("1", "2"), labels, _dims(d_out)), symbol="z", query_axis=1,
            how=How("module", params={"module": mod}), depends=("input.embeddings",),
            extra={"batch_shape": [2, T, d_out]})


def _heads_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Causal attention of every head, with the weights: (H, T, hd) each -> context, weights."""
    ctx, weights = F.scaled_dot_product_attention(q, k, v, causal=True, return_weights=True)
    return ctx, weights  # (H, T, hd), (H, T, T)


def _multihead(rec: _Recorder, x: Tensor, labels: tuple[str, ...], st: Settings,
               given: Mapping[str, np.ndarray] | None) -> None:
    sec = "multihead"
    d_in, d_out, H, T = st.d_in, st.d_out, st.heads, x.shape[0]
    batch = torch.stack((x, x))  # (2, T, d_in)
    hd_w = d_out // H if given else d_out  # width of one wrapper head
    torch.manual_seed(st.seed)
    wrapper = MultiHeadAttentionWrapper(d_in, hd_w, T, 0.0, num_heads=H)
    heads_w = [cast(CausalAttention, head) for head in wrapper.heads]
    if given:
        for h, head in enumerate(heads_w):
            cols = slice(h * hd_w, (h + 1) * hd_w)
            for name in WEIGHT_NAMES:
                _set_param(head_param(head, name), given[name][:, cols].T.copy())
    qs = torch.stack([head.W_query(x) for head in heads_w])  # (H, T, hd_w)
    ks = torch.stack([head.W_key(x) for head in heads_w])  # (H, T, hd_w)
    vs = torch.stack([head.W_value(x) for head in heads_w])  # (H, T, hd_w)
    ctx, weights = _heads_attention(qs, ks, vs)
    heads = _dims(H)
    mod_w = f"MultiHeadAttentionWrapper({d_in}, {hd_w}, {T}, 0.0, num_heads={H})"
    seeded = "" if given else f"torch.manual_seed({st.seed}); "
    rec.add(sec, "head_weights", weights, title=f"Causal attention weights of each of the {H} heads",
            why="each head has its own W_query, W_key, W_value, so it attends in its own way",
            formula="weights_h = softmax(mask(q_h @ k_hᵀ / √d_head)), one CausalAttention per head of "
                    f"{mod_w}", axes=("head", "query", "key"), labels=(heads, labels, labels), symbol="weight",
            query_axis=1, how=How("module", params={"module": mod_w}), depends=("input.embeddings",))
    rec.add(sec, "head_context", ctx, title="Context vectors of each head",
            why="each head's weighted sum of its own values",
            formula="context_h = weights_h @ values_h", axes=("head", "token", "dim"),
            labels=(heads, labels, _dims(hd_w)), symbol="z", query_axis=1,
            how=How("module", params={"module": mod_w}), depends=("multihead.head_weights",))
    out_w = wrapper(batch)  # (2, T, H * hd_w)
    rec.add(sec, "wrapper_output", out_w[0], title="MultiHeadAttentionWrapper: the heads' context vectors concatenated",
            why="stacking the heads side by side gives a wider context vector per token",
            formula=f"{seeded}{mod_w}(torch.stack((x, x)))[0]{'  # with your weights;' if given else '  #'} torch.cat([head(x) for head in heads], dim=-1)", axes=_TOKEN_DIM,
            labels=(labels, _dims(H * hd_w)), symbol="z", query_axis=0,
            how=How("concat", ("multihead.head_context",), {"module": mod_w}),
            depends=("multihead.head_context",),
            extra={"batch_shape": list(out_w.shape),
                   "max_abs_diff_to_heads": float((out_w[0] - torch.cat(list(ctx), dim=-1)).abs().max())})

    H = st.mha_heads or st.heads
    heads = _dims(H)
    torch.manual_seed(st.seed)
    mha = MultiHeadAttention(d_in, d_out, T, 0.0, num_heads=H)
    if given:
        for name in WEIGHT_NAMES:
            _set_param(getattr(mha, name).weight, given[name].T.copy())
    hd = d_out // H
    mod = f"MultiHeadAttention({d_in}, {d_out}, {T}, 0.0, num_heads={H})"
    out, mha_w = mha(batch, need_weights=True)  # (2, T, d_out), (2, H, T, T)
    values = mha.W_value(x).view(T, H, hd).transpose(0, 1)  # (H, T, hd)
    mha_ctx = F.context_vectors(mha_w[0], values)  # (H, T, hd)
    concat = mha_ctx.transpose(0, 1).reshape(T, d_out)  # (T, d_out)
    rec.add(sec, "mha_weights", mha_w[0], title="MultiHeadAttention: weights of each head",
            why=f"one W_query/W_key/W_value of width d_out={d_out}, split into {H} heads of {hd}: one matrix "
                "product for all heads",
            formula="q, k, v = x @ W, viewed as (heads, T, d_out / heads); weights = softmax(mask(q @ kᵀ / √hd))",
            axes=("head", "query", "key"), labels=(heads, labels, labels), symbol="weight", query_axis=1,
            how=How("module", params={"module": mod}), depends=("input.embeddings",))
    rec.add(sec, "mha_context", mha_ctx, title="Context vectors of each head (before out_proj)",
            why="each head's weighted sum of its slice of the values",
            formula="context_h = weights_h @ values_h", axes=("head", "token", "dim"),
            labels=(heads, labels, _dims(hd)), symbol="z", query_axis=1,
            how=How("module", params={"module": mod}), depends=("multihead.mha_weights",))
    rec.add(sec, "mha_concat", concat, title="The heads merged back into one vector per token",
            why="transpose and view put the heads side by side again: (heads, T, hd) -> (T, d_out)",
            formula="context.transpose(1, 2).view(T, d_out)", axes=_TOKEN_DIM, labels=(labels, _dims(d_out)),
            symbol="c", query_axis=0, how=How("concat", ("multihead.mha_context",)), depends=("multihead.mha_context",))
    w_out = mha.out_proj.weight.detach().T  # (d_out, d_out), as x @ W
    rec.add(sec, "W_out", w_out, title="Output projection W_out (out_proj.weight.T)",
            why="a final linear layer mixes the heads' outputs",
            formula=f"torch.manual_seed({st.seed}); W_out = {mod}.out_proj.weight.T  # as x @ W + b",
            axes=("in", "out"), labels=(_dims(d_out), _dims(d_out)), symbol="W_out",
            how=How("weights", params={"source": "out_proj"}), extra={"bias": mha.out_proj.bias.detach().numpy()})
    rec.add(sec, "mha_output", out[0], title="MultiHeadAttention: output (merged heads through out_proj)",
            why="the module's output: the merged heads through the output projection",
            formula=f"{seeded}{mod}(torch.stack((x, x)))[0]  # out = concat @ W_out + b"
                    + (", with your W_query, W_key, W_value" if given else ""), axes=_TOKEN_DIM, labels=(labels, _dims(d_out)), symbol="out",
            query_axis=0, how=How("linear", ("multihead.mha_concat", "multihead.W_out"),
                                  {"bias": [float(b) for b in mha.out_proj.bias]}),
            depends=("multihead.mha_concat", "multihead.W_out"), extra={"batch_shape": list(out.shape)})


def head_param(head: CausalAttention, name: str) -> torch.nn.Parameter:
    return getattr(head, name).weight


# --------------------------------------------------------------------------------------------------
# Detail lines, written from the recorded steps
# --------------------------------------------------------------------------------------------------


def _add_details(walk: Walkthrough) -> None:
    q, qi = walk.query_label, walk.query
    p = 4
    lab = walk.labels

    def det(step_id: str, lines: list[str]) -> None:
        if step_id in walk:
            walk.step(step_id).detail = tuple(lines)

    if "simple.scores" in walk:
        s = walk.step("simple.scores")
        lines = []
        for j in range(min(len(lab), _MAX_LISTED)):
            cell = walk.explain_cell(s.id, (j,))
            lines.append(cell[0])
            if j == 0 and len(cell) > 1:
                lines.append(cell[1])
        det(s.id, lines)
        w = walk.step("simple.weights_by_sum")
        det(w.id, [f"Σ score = {fmt(w.extra['sum_of_scores'], p)};  Σ weight = {fmt(w.extra['sum'], p, integral=False)}"])
        sw = walk.step("simple.weights")
        if "simple.weights_naive" in walk:
            n = walk.step("simple.weights_naive")
            det(n.id, [f"Σ exp(score) = {fmt(n.extra['sum_of_exps'], p)};  Σ weight = {fmt(n.extra['sum'], p, integral=False)}"])
            det(sw.id, [f"Σ weight = {fmt(sw.extra['sum'], p, integral=False)}; the same numbers as the naive softmax"])
        else:
            det(sw.id, [f"Σ weight = {fmt(sw.extra['sum'], p, integral=False)}; "
                        + walk.absent["simple.weights_naive"]])
        c = walk.step("simple.context")
        x = walk.step("input.embeddings")
        terms = " + ".join(f"{fmt(a, p)}×x_{lab[i]}" for i, a in enumerate(sw.values[:_MAX_LISTED]))
        more = " + …" if len(lab) > _MAX_LISTED else ""
        det(c.id, [f"z_{q} = {terms}{more} = {fmt_vector(c.values, p, limit=8)}",
                   f"  e.g. {walk.explain_cell(c.id, (0,))[0]}" if len(lab) <= 6 and x.values.shape[1] <= 8 else
                   f"  shape: {x.values.shape[1]} numbers, like one embedding"])
    if "all.weights" in walk:
        w = walk.step("all.weights")
        det(w.id, [f"row sums: {fmt_vector(w.extra['row_sums'], p, integral=False, limit=8)}"])
        c = walk.step("all.context")
        det(c.id, [f"row {q} is the context vector of section 1: {fmt_vector(c.values[qi], p, limit=8)}"])
    for sec in ("trainable", "causal"):
        if f"{sec}.queries" not in walk:
            continue
        det(f"{sec}.queries", walk.explain_cell(f"{sec}.queries", (qi, 0))[1:])
        det(f"{sec}.scores", walk.explain_cell(f"{sec}.scores", (qi, qi)))
        if f"{sec}.scaled_scores" in walk:
            d = walk.settings.d_out
            det(f"{sec}.scaled_scores", [f"d_k = {d} (the keys' width), √d_k = {math.sqrt(d):.4f}"])
    if "trainable.weights" in walk:
        w = walk.step("trainable.weights")
        det(w.id, [f"row {q}: {fmt_vector(w.values[qi], p, limit=8)}, sum {fmt(float(w.values[qi].sum()), p, integral=False)}"])
        c = walk.step("trainable.context")
        det(c.id, [walk.explain_cell(c.id, (qi, 0))[0]])
        v1 = walk.step("trainable.v1_output")
        diff = v1.extra["max_abs_diff_to_context"]
        det(v1.id, [f"equals trainable.context (largest difference {diff:.1e})" if walk.settings.scale else
                    "differs from trainable.context: the class always divides by √d_k (--no-scale does not "
                    "apply to the chapter's classes)"])
        det("trainable.v2_output", ["the causal section below reuses these weights" if walk.settings.weights ==
                                    "seeded" else "with your weights: the same numbers as SelfAttention_v1"])
    if "causal.weights" in walk:
        z = walk.step("causal.weights_zeroed")
        det(z.id, [f"row sums: {fmt_vector(z.extra['row_sums'], p, integral=False, limit=8)}"])
        r = walk.step("causal.weights_renormalized")
        det(r.id, [f"row {q}: {fmt_vector(r.values[qi][:qi + 1], p, limit=8)} (then zeros)"])
        m = walk.step("causal.weights_masked")
        agree = "agree" if m.extra["agree"] else "DISAGREE"
        det(m.id, [(f"the two ways {agree}: largest difference from causal.weights_renormalized "
                   f"{m.extra['max_abs_diff_to_renormalized']:.1e}")])
        e = walk.step("causal.dropout_example")
        det(e.id, [f"{e.extra['kept']} of {e.values.size} kept, each scaled by 1/(1 − p) = {e.extra['scale']:g}"])
        det("causal.dropout_weights", [("kept weights are scaled by 1/(1 − p) = "
                                       f"{walk.step('causal.dropout_weights').extra['scale']:g}; rows no longer sum to 1")])
        det("causal.output", ["shape (2, T, d_out): both copies in the batch give the same rows",
                              "its own weights (nn.Linear, seeded), not the ones above" if walk.settings.weights ==
                              "seeded" else "with your weights: row by row, causal attention of the steps above"])
    if "multihead.wrapper_output" in walk:
        if walk.settings.heads_note:
            det("multihead.head_weights", [walk.settings.heads_note])
        o = walk.step("multihead.wrapper_output")
        det(o.id, [(f"shape {tuple(o.extra['batch_shape'])} for the batch of two copies; equals the heads' context "
                   f"vectors side by side (largest difference {o.extra['max_abs_diff_to_heads']:.1e})")])
        out = walk.step("multihead.mha_output")
        det(out.id, [f"shape {tuple(out.extra['batch_shape'])} for the batch of two copies",
                     walk.explain_cell(out.id, (qi, 0))[0]])
