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
from pathlib import Path
from typing import Any, cast

import numpy as np

from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.explain import cells
from attnlab.explain.build import resolve_query
from attnlab.explain.inputs import unique_labels
from attnlab.explain.kinds import linear_row
from attnlab.explain.steps import How, Settings, Step, Walkthrough, fmt, fmt_vector

__all__ = ["DEFAULT_MODEL", "ModelWalkthrough", "attention_maps", "explain_model", "get_encoder", "model_names",
           "resolve_model_query"]

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
    from attnlab.pretrained import canonical_name

    if isinstance(model, str) and model.strip().lower() not in _known() and Path(model).expanduser().is_dir():
        raise AttnlabInputError(f"model {model!r} is a directory without a config.json: give a Hugging Face model "
                         "directory (config.json, weights and tokenizer from save_pretrained) or minilm")
    return canonical_name(model, "model")


def _known() -> set[str]:
    from attnlab.pretrained import MODEL_NAMES

    return set(MODEL_NAMES)


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
        raise AttnlabInputError(
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
    # A local Hugging Face model directory (None: a packaged model such as minilm) and its facts.
    directory: str | None = None
    causal: bool = False  # the model's mask hid some keys from some queries (a decoder's future tokens)
    kv_head: int = 0  # 1-based key/value head the head reads (grouped-query attention)
    num_kv_heads: int = 0
    scaling: float = 0.0  # what the scores were multiplied by

    @property
    def settings_text(self) -> str:
        """The line the renderers show instead of the toy's settings line."""
        st = self.settings
        if self.directory is not None:
            kv = (f" (reads key/value head {self.kv_head} of {self.num_kv_heads})"
                  if self.num_kv_heads != self.num_heads else "")
            return (f"{self.model} · layer {self.layer} of {self.num_layers}, head {self.head} of "
                    f"{self.num_heads}{kv} (1-based) · x: the hidden states entering layer {self.layer}'s attention"
                    f" · d_in = {st.d_in}, d_k = {st.d_out} per head · scores × {self.scaling:.6g}"
                    + (" · causal" if self.causal else "")
                    + (f" · text cut at {self.max_tokens} tokens" if self.truncated else ""))
        return (f"{self.model} · layer {self.layer} of {self.num_layers}, "
                f"head {self.head} of {self.num_heads} "
                f"(1-based) · x: the hidden states entering layer {self.layer} · d_in = {st.d_in}, "
                f"d_k = {st.d_out} per head · scores ÷ √d_k"
                + (f" · text cut at {self.max_tokens} tokens" if self.truncated else ""))

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["model"] = {"name": self.model, "layer": self.layer, "head": self.head,
                         "num_layers": self.num_layers, "num_heads": self.num_heads,
                         "numbering": "1-based", "truncated": self.truncated, "max_tokens": self.max_tokens}
        if self.directory is not None:
            data["model"].update({"directory": self.directory, "causal": self.causal, "kv_head": self.kv_head,
                                  "num_kv_heads": self.num_kv_heads, "scaling": self.scaling})
        return data


def resolve_model_query(query: str | int | None, tokens: Sequence[str], labels: Sequence[str]) -> int:
    """:func:`attnlab.explain.build.resolve_query` for a model's word pieces: None is the first word after
    [CLS], and a word not found as given is looked up lower-cased (the tokenizer lower-cases: "The" is the
    token "the"). Shared by the walkthrough, the heatmap and the report of a pretrained model."""
    if query is None:
        return 1 if len(tokens) >= 2 else 0  # the first word after [CLS]
    if isinstance(query, str) and query.strip() not in labels and query.strip() not in tokens:
        lower = query.strip().lower()  # the tokenizer lower-cases: "The" is the token "the"
        if lower in labels or lower in tokens:
            query = lower
    return resolve_query(query, tokens, labels)


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
    if encoder is None and _is_model_dir(model):
        return _explain_dir(text, model, layer, head, query, all_layers)
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
    qi = resolve_model_query(query, tokens, labels)
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
    if encoder is None and _is_model_dir(model):
        return _model_dir_maps(text, model)
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


def _is_model_dir(model: object) -> bool:
    from attnlab.pretrained import is_model_dir

    return is_model_dir(model)


@functools.cache
def _load_dir(path: str) -> Any:
    from attnlab.pretrained import load_model_dir

    return load_model_dir(path)


def _model_dir_maps(text: object, model: str) -> Any:
    """:func:`attention_maps` of a local Hugging Face model directory (loaded once per process, through
    :mod:`attnlab.hf`'s registered attention); the truncation warning in one line, as for MiniLM."""
    _check_text_arg(text)
    hf_model = _load_dir(str(Path(model).expanduser().resolve()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = hf_model.attention(text)
    for w in caught:
        if not (issubclass(w.category, UserWarning) and "truncat" in str(w.message)):
            warnings.warn(w.message, w.category, stacklevel=3)
    if maps.truncated:
        _warn_truncated(maps.model, maps.max_tokens, special="special tokens included")
    return maps


def _explain_dir(text: object, model: str, layer: int | None, head: int, query: str | int | None,
                 all_layers: bool) -> ModelWalkthrough:
    """:func:`explain_model` of a local Hugging Face model directory: the numbers are the ones the model's
    attention received and computed, recorded through :mod:`attnlab.hf`'s registered attention."""
    _check_text_arg(text)
    text = cast(str, text)  # checked above
    hf_model = _load_dir(str(Path(model).expanduser().resolve()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = hf_model.attention(text) if all_layers else None
        n_layers = probe.num_layers if probe is not None else _count_layers(hf_model)
        layer = n_layers if layer is None else _check_number("layer", layer, n_layers, "layers")
        n_heads = probe.num_heads if probe is not None else _count_heads(hf_model)
        head = _check_number("head", head, n_heads, "heads")
        hs = hf_model.head_steps(text, layer - 1, head - 1)
    for w in caught:
        if not (issubclass(w.category, UserWarning) and "truncat" in str(w.message)):
            warnings.warn(w.message, w.category, stacklevel=3)
    if hs.truncated:
        _warn_truncated(hf_model.name, hf_model.max_tokens, special="special tokens included")
    tokens = tuple(hs.tokens)
    labels = unique_labels(tokens)
    causal = not bool(hs.allowed.all())
    if query is None:
        qi = len(tokens) - 1 if causal else (1 if len(tokens) >= 2 else 0)  # a decoder's last token sees all
    else:
        qi = resolve_model_query(query, tokens, labels)
    name = hf_model.name
    settings = Settings(d_in=int(hs.x.shape[-1]), d_out=hs.head_dim, heads=hs.num_heads, dropout=0.0, seed=0,
                        v2_seed=0, scale=True, embeddings="model", weights="pretrained", sections=(SECTION,))
    walk = ModelWalkthrough(
        tokens=tokens, labels=labels, query=qi, settings=settings,
        steps=_dir_steps(hs, labels, layer, head, name, causal, probe),
        section_titles={SECTION: f"{name} layer {layer}, head {head} ({hs.module}, 1-based)"},
        model=name, layer=layer, head=head, num_layers=hs.num_layers, num_heads=hs.num_heads,
        truncated=hs.truncated, max_tokens=hf_model.max_tokens, directory=str(hf_model.path), causal=causal,
        kv_head=hs.kv_head + 1, num_kv_heads=hs.num_kv_heads, scaling=hs.scaling,
    )
    _add_details(walk, rotary=hs.rotary, weights_note=(
        f"the model's own weights of head {walk.head} (recorded through attnlab's attention) differ by at most "
        f"{walk.step(f'{SECTION}.weights').extra['max_abs_diff_to_model']:.1e}"))
    return walk


def _count_layers(hf_model: Any) -> int:
    """The number of attention calls in one forward: the layers (read from the config, else counted)."""
    n = getattr(hf_model.model.config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else hf_model.attention("a").num_layers


def _count_heads(hf_model: Any) -> int:
    n = getattr(hf_model.model.config, "num_attention_heads", None)
    return int(n) if isinstance(n, int) else hf_model.attention("a").num_heads


def _dir_steps(hs: Any, labels: tuple[str, ...], layer: int, head: int, name: str, causal: bool,
               maps: Any) -> list[Step]:
    """The steps of one head of a local model (:class:`attnlab.pretrained.HFHeadSteps`)."""
    sec = SECTION
    hd, d_in = hs.head_dim, int(hs.x.shape[-1])
    token_dim, qk = ("token", "dim"), ("query", "key")
    out: list[Step] = []
    out.append(Step(
        sec, "x", f"Hidden states x entering layer {layer}'s attention", values=_np(hs.x),
        why=f"one {d_in}-number vector per token (after the layer's input normalisation, where it has one): "
            "what this layer's attention mixes",
        formula=f"x_i = hidden state of token i entering layer {layer}'s {hs.module} of {name}", axes=token_dim,
        labels=(labels, _dims(d_in)), symbol="x", query_axis=0,
        how=How("input", params={"source": f"{name}, the input of layer {layer}'s attention"}),
    ))
    heads_of = {"q": (head, hs.num_heads), "k": (hs.kv_head + 1, hs.num_kv_heads),
                "v": (hs.kv_head + 1, hs.num_kv_heads)}
    for wname, short, bias in (("W_query", "q", hs.b_query), ("W_key", "k", hs.b_key), ("W_value", "v", hs.b_value)):
        h, n = heads_of[short]
        first = (h - 1) * hd
        cols = f"columns {first + 1}–{first + hd}"
        whose = f"head {head}" if short == "q" else f"key/value head {h} of {n} (read by head {head})"
        out.append(Step(
            sec, wname, f"{wname} of {whose} ({d_in} × {hd})", values=_np(getattr(hs, wname)),
            why=f"{whose}'s slice of the layer's trained {wname}: it turns a {d_in}-number hidden state into a "
                f"{hd}-number {_ROLE[short]}",
            formula=f"{cols} of layer {layer}'s {wname} ({d_in} × {n * hd}, x @ W)"
                    + (f", with bias b_{wname[2:]} ({hd} numbers)" if bias is not None else ", no bias"),
            axes=("in", "out"), labels=(_dims(d_in), _dims(hd)), symbol=wname,
            how=How("weights", params={"source": f"{name}, layer {layer}, {cols}"}),
            extra={"bias": None if bias is None else _np(bias), "columns": [first, first + hd]},
        ))

    def linear(step: str, wname: str, sym: str, bias: Any, values: Any, title: str, why: str) -> Step:
        b = f"b_{wname[2:]}"
        return Step(
            sec, step, title, values=_np(values), why=why,
            formula=f"{step} = x @ {wname}" + (f" + {b}" if bias is not None else ""), axes=token_dim,
            labels=(labels, _dims(hd)), symbol=sym, query_axis=0,
            how=How("linear", (f"{sec}.x", f"{sec}.{wname}"),
                    {"bias": None if bias is None else [float(v) for v in _np(bias)],
                     "bias_name": b if bias is not None else "0"}),
            depends=(f"{sec}.x", f"{sec}.{wname}"))

    why = {"queries": "what each token looks for", "keys": "what each token offers to be found by",
           "values": "what each token passes on when it is attended to"}
    if hs.rotary:
        norm = " (after the module's per-head q_norm / k_norm)" if hs.q_norm else ""
        for step, wname, sym, bias, values, title in (
                ("queries_projected", "W_query", "q_proj", hs.b_query, hs.projected_queries, "Projected queries"),
                ("keys_projected", "W_key", "k_proj", hs.b_key, hs.projected_keys, "Projected keys")):
            out.append(linear(step, wname, sym, bias, values, f"{title} of head {head}, before RoPE",
                              "the projection, before the rotation that adds each token's position"))
        for step, sym, values, src in (("queries", "q", hs.queries, "queries_projected"),
                                       ("keys", "k", hs.keys, "keys_projected")):
            out.append(Step(
                sec, step, f"{step.title()} after RoPE ({hd} numbers per token)", values=_np(values),
                why=why[step] + "; rotated by the token's position (RoPE), so q · k depends on how far apart "
                                "the two tokens are",
                formula=f"{step} = RoPE({src}{norm}), token i rotated by its position i - 1 (counted from 0): what "
                        "the model's attention received",
                axes=token_dim, labels=(labels, _dims(hd)), symbol=sym, query_axis=0,
                how=How("module", (f"{sec}.{src}",), {"module": f"rotary position embedding of {name}"}),
                depends=(f"{sec}.{src}",)))
    else:
        out.append(linear("queries", "W_query", "q", hs.b_query, hs.queries,
                          f"Queries of head {head} ({hd} numbers per token)", why["queries"]))
        out.append(linear("keys", "W_key", "k", hs.b_key, hs.keys,
                          f"Keys of head {head} ({hd} numbers per token)", why["keys"]))
    out.append(linear("values", "W_value", "v", hs.b_value, hs.values,
                      f"Values of head {head} ({hd} numbers per token)", why["values"]))
    factor = hs.scaling
    root = math.sqrt(hd)
    divisor_text = f"√{hd}" if abs(factor * root - 1.0) < 1e-6 else fmt(1.0 / factor, 4)
    out.append(Step(
        sec, "scores", "Attention scores (queries · keys, scaled)", values=_np(hs.scores),
        why="each query is compared with every key by a dot product; the scale keeps the scores in a range "
            "where softmax still has useful gradients",
        formula=f"score(i, j) = q_i · k_j × {factor:.6g}   (the module's scaling"
                + (f", 1/√{hd}" if divisor_text == f"√{hd}" else "") + ")",
        axes=qk, labels=(labels, labels), symbol="score", query_axis=0,
        how=How("scaled_dot", (f"{sec}.queries", f"{sec}.keys"), {"divisor": 1.0 / factor,
                                                                   "divisor_text": divisor_text}),
        depends=(f"{sec}.queries", f"{sec}.keys"),
    ))
    logits = f"{sec}.scores"
    if causal:
        allowed = hs.allowed.float().numpy()
        out.append(Step(
            sec, "mask", "The model's mask (1 = may attend)", values=allowed,
            why="a decoder's query may not see the tokens after it (and a sliding window hides the far past)",
            formula="mask(i, j) = 1 where the model's attention mask lets query i see key j", axes=qk,
            labels=(labels, labels), symbol="mask", query_axis=0, how=How("mask")))
        out.append(Step(
            sec, "scores_masked", "Masked scores: hidden keys set to -inf", values=_np(
                hs.scores.masked_fill(~hs.allowed, float("-inf"))),
            why="exp(-inf) = 0, so softmax gives the hidden keys weight 0 and normalises over the rest",
            formula="masked = scores.masked_fill(mask == 0, -inf)", axes=qk, labels=(labels, labels),
            symbol="masked", query_axis=0, how=How("mask_before", (logits, f"{sec}.mask")),
            depends=(logits, f"{sec}.mask")))
        logits = f"{sec}.scores_masked"
    weights = _np(hs.weights)
    own = _np(hs.model_weights[head - 1])
    diff = float(np.abs(weights - own).max()) if weights.size else 0.0
    out.append(Step(
        sec, "weights", "Attention weights (softmax of each row)" + (", causal" if causal else ""), values=weights,
        why="each row is one query's weights over the keys it may see: positive, summing to 1"
            + (" (the future keys get 0)" if causal else " (no mask: an encoder reads the whole sentence)"),
        formula=f"weights = softmax({logits.split('.')[1]}, dim=-1)", axes=qk, labels=(labels, labels),
        symbol="weight", query_axis=0, how=How("softmax", (logits,)), depends=(logits,),
        extra={"row_sums": weights.sum(axis=-1), "max_abs_diff_to_model": diff},
    ))
    out.append(_context_step(head, _np(hs.context), labels, hd, "what this head gathers for it"))
    n_heads = hs.num_heads
    out.append(Step(
        sec, "head_weights", f"Attention weights of each of the {n_heads} heads of layer {layer}",
        values=_np(hs.model_weights),
        why="every head has its own W_query (and key/value heads), so each attends in its own way; "
            f"head {head} is the one above. These are the model's own, recorded inside its forward pass",
        formula="weights_h = softmax(q_h @ k_hᵀ × scaling, masked) for every head h", axes=("head", "query", "key"),
        labels=(_dims(n_heads), labels, labels), symbol="weight", query_axis=1,
        how=How("module", params={"module": f"layer {layer}'s {hs.module} of {name} ({n_heads} heads), through "
                                            "attnlab's registered attention"}), depends=(f"{sec}.x",),
    ))
    if maps is not None:
        out.append(_layer_weights_step(maps, name, labels, "q_lh @ k_lhᵀ × scaling, masked"))
    return out


def _add_details(walk: ModelWalkthrough, *, rotary: bool = False, weights_note: str | None = None) -> None:
    """Detail lines under the tables, written from the recorded numbers (``rotary``: the queries and keys
    were rotated after their projection; ``weights_note``: a last line under the weights)."""
    qi, q, p, sec = walk.query, walk.query_label, 4, SECTION

    def det(name: str, lines: list[str]) -> None:
        walk.step(f"{sec}.{name}").detail = tuple(lines)

    x = walk.step(f"{sec}.x")
    det("x", [f"x_{q} = {_short(x.values[qi], p)}",
              f"{x.values.shape[1]} numbers per token: tables show the first ones, json has them all"])
    for wname in ("W_query", "W_key", "W_value"):
        bias = walk.step(f"{sec}.{wname}").extra["bias"]
        det(wname, [f"b_{wname[2:]} = {_short(bias, p)}" if bias is not None else "this layer has no bias"])
    linear = ["values", *(("queries_projected", "keys_projected") if rotary else ("queries", "keys"))]
    for name_ in linear:
        det(name_, linear_row(walk, walk.step(f"{sec}.{name_}"), qi, p, _short))
    if rotary:
        for name_ in ("queries", "keys"):
            step = walk.step(f"{sec}.{name_}")
            det(name_, [(f"{cells.row_name(walk, step, (qi,))} = {_short(step.values[qi], p)} "
                         f"(rotated by position {qi}, counted from 0)")])
    det("scores", walk.explain_cell(f"{sec}.scores", (qi, qi), p))
    row = walk.step(f"{sec}.weights").values[qi]
    top = np.argsort(-row, kind="stable")[:3]
    det("weights", [f"row {q}: sum {fmt(float(row.sum()), p, integral=False)}; largest: "
                    + ", ".join(f"{walk.labels[j]} {fmt(float(row[j]), p)}" for j in top),
                    *([weights_note] if weights_note is not None else [])])
    det("context", [walk.explain_cell(f"{sec}.context", (qi, 0), p)[0]])
    hw = walk.step(f"{sec}.head_weights")
    n = hw.values.shape[0]
    most = [(h, int(np.argmax(hw.values[h, qi]))) for h in range(n)]
    det("head_weights", [f"{q} attends most to: " + ", ".join(
        f"head {h + 1} {walk.labels[j]} ({fmt(float(hw.values[h, qi, j]), 2)})" for h, j in most),
        f"tables show the first heads; --format json (and the report) have all {n}"])


def _check_text_arg(text: object) -> None:
    if not isinstance(text, str):
        raise AttnlabInputTypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise AttnlabInputError(f"text is empty: give the sentence to look at, e.g. \"The cat sat.\" (got {text!r})")


def _checked_encoder(model: str, text: object, encoder: Any) -> tuple[str, Any]:
    """The canonical model name and its encoder (``encoder``, or loaded once per process), after checking
    ``text`` is a non-empty str."""
    canonical = _canonical(model)
    if not isinstance(text, str):
        raise AttnlabInputTypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise AttnlabInputError(f"text is empty: give the sentence to look at, e.g. \"The cat sat.\" (got {text!r})")
    return canonical, (_load(canonical) if encoder is None else encoder)


def _warn_truncated(canonical: str, limit: int, special: str = "[CLS] and [SEP] included") -> None:
    """The one-line warning for a text cut at the model's token limit, pointing at the public caller."""
    warnings.warn(
        f"the text is longer than {canonical}'s limit of {limit} tokens; only its first {limit} "
        f"tokens ({special}) are used",
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
    out.append(_context_step(head, _np(ls.context), labels, hd,
                             "what this head gathers for it from the sentence"))
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
        out.append(_layer_weights_step(maps, name, labels, "q_lh @ k_lhᵀ / √d_k"))
    return out


def _context_step(head: int, context: Any, labels: Any, hd: int, gathers: str) -> Step:
    """One head's context vectors, the weighted sum of its values (``gathers``: what the sum is, in words)."""
    return Step(
        SECTION, "context", f"Context vectors of head {head}", values=context,
        why=f"each token's weighted sum of the values: {gathers}",
        formula="context = weights @ values   (z_i = Σ_j weight(i, j) × v_j)", axes=("token", "dim"),
        labels=(labels, _dims(hd)), symbol="z", query_axis=0,
        how=How("weighted_sum", (f"{SECTION}.weights", f"{SECTION}.values")),
        depends=(f"{SECTION}.weights", f"{SECTION}.values"),
    )


def _layer_weights_step(maps: Any, name: str, labels: Any, inside: str) -> Step:
    """Every layer's and head's attention weights as one step (``inside``: what the softmax is taken of)."""
    n_layers, n_heads = maps.weights.shape[:2]
    return Step(
        SECTION, "layer_weights", f"Attention weights of every layer and head ({n_layers} × {n_heads})",
        values=_np(maps.weights),
        why="the whole model at a glance: each layer's heads attend to the output of the layer before",
        formula=f"weights[l, h] = softmax({inside}), every layer l and head h",
        axes=("layer", "head", "query", "key"), labels=(_dims(n_layers), _dims(n_heads), labels, labels),
        symbol="weight", query_axis=2,
        how=How("module", params={"module": f"{name} ({n_layers} layers of {n_heads} heads)"}),
    )
