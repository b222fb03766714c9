"""The interactive report: one self-contained HTML file (or notebook cell) for a recorded walkthrough.

:func:`render_html` returns a fragment (a ``<div>`` with its ``<style>``, data and ``<script>``) that works
on its own page and inside a Jupyter cell: every CSS rule and every DOM lookup is scoped to one container
with a unique id. :func:`render_page` wraps it in a full document for ``attnlab report --out``.

The page shows the recorded steps only: the numbers, labels, formulas and the "how this number is made"
lines all come from the :class:`~attnlab.explain.steps.Walkthrough` (through ``explain_cell``) or from
:class:`~attnlab.pretrained.AttentionMaps`; nothing here loads a model or computes attention. Every step's
numbers are stored once, compactly (:mod:`attnlab.report.codec`: exactly the 4 decimals shown); the
JavaScript decodes them, draws large maps on ``<canvas>`` (small ones as tables with their numbers), writes
hover text and a token's rows on demand, and reacts to the pointer and the keyboard. No network: the CSS and
JavaScript (``report.css``, ``report.js`` beside this module) are inlined, there are no images, fonts or
links to other files.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.explain.kinds import hover_lines, kind_of, module_template
from attnlab.maps import (
    CMAP,
    MASK_REASONS,
    chain_operand,
    check_output_path,
    head_axis,
    is_map,
    is_query_row,
    masked_cells,
    masked_reasons,
    write_atomically,
)
from attnlab.report.codec import encode, encode_bits

if TYPE_CHECKING:
    from attnlab.explain.steps import Step, Walkthrough
    from attnlab.pretrained import AttentionMaps

__all__ = ["HTML_FORMATS", "model_report_data", "render_html", "render_page", "report_data", "write_report"]

HTML_FORMATS = {".html": "html", ".htm": "html"}
_COLORS = 64  # entries of the colour map sent to the page
# Up to this many map cells the library's own hover lines (explain_cell) go in the page; above it the page
# writes them from the recorded numbers when a cell is pointed at (the same operations, fewer words).
_MAX_HOVER_CELLS = 4_000


def _asset(name: str) -> str:
    return resources.files("attnlab.report").joinpath(name).read_text(encoding="utf-8")


def _colors() -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps[CMAP]
    return [to_hex(cmap(i / (_COLORS - 1))) for i in range(_COLORS)]


def _step_data(walk: Walkthrough, step: Step, hover: bool) -> dict[str, Any]:
    values = np.asarray(step.values, dtype=np.float64)
    labels = [list(lab) for lab in step.labels]
    axes = list(step.axes)
    if values.ndim == 1 and is_query_row(step):  # the query's own row: show it as a one-row map
        values, axes = values[None], ["query", "key"]  # (1, T_k)
        labels = [[walk.query_label], labels[0]]
    elif values.ndim == 0:
        values, axes, labels = values.reshape(1, 1), ["row", "col"], [[""], [""]]  # (1, 1)
    elif values.ndim == 1 and axes[0] == "dim":  # the query's own vector (its context vector)
        values, axes, labels = values[None], ["query", "dim"], [[walk.query_label], labels[0]]  # (1, d)
    elif values.ndim == 1:
        values, axes, labels = values[None], ["row", *axes], [[""], labels[0]]  # (1, n)
    how = step.how
    data: dict[str, Any] = {
        "id": step.id,
        "title": step.title,
        "why": step.why,
        "formula": step.formula,
        "symbol": step.symbol,
        "kind": how.kind if how is not None else "",
        "operands": [o for o in how.operands if o in walk] if how is not None else [],
        "params": _params(how.params) if how is not None else {},
        "template": kind_of(step).hover_template(walk, step),  # the page writes hover text from it
        "axes": axes,
        "labels": labels,
        "shape": list(values.shape),
        "values": encode(values),
        "detail": list(step.detail),
        "map": is_map(step) or is_query_row(step),
        "head_axis": head_axis(step),
        "one_row": step.values.ndim == 1,
    }
    if kind_of(step).spelled_out:  # a followed token's row is written out number by number
        data["spell_out"] = True
    if data["map"]:
        finite = values[np.isfinite(values)]
        masked = masked_cells(walk, step)
        masked = np.zeros(values.shape, bool) if masked is None else masked.reshape(values.shape)
        shown = values[np.isfinite(values) & ~masked]
        data["masked"] = encode_bits(masked) if masked.any() else None
        if masked.any():  # why each masked cell is hidden: [reason, its cells' bits or None for all of them]
            reasons = masked_reasons(walk, step)
            data["mask_reasons"] = [[r, None if len(reasons) == 1 else encode_bits(c.reshape(values.shape))]
                                    for r, c in reasons]
        if masked.any():  # the hidden cells hold one value (0, -inf): sent once, not per cell
            data["values"] = encode(values, skip=masked)
        data["vmin"] = float(min(0.0, shown.min())) if shown.size else 0.0
        data["vmax"] = float(shown.max()) if shown.size else (float(finite.max()) if finite.size else 1.0)
        data["chain"] = chain_operand(walk, step)
        if hover:
            data["hover"] = [_cell_lines(walk, step, idx) for idx in np.ndindex(*step.values.shape)]
    return data


def _params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of a step's ``How.params`` (what the page's hover text needs)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, (str, bool)) or (isinstance(value, (int, float)) and math.isfinite(value)):
            out[key] = value
    return out


def _cell_lines(walk: Walkthrough, step: Step, index: tuple[int, ...]) -> list[str]:
    try:
        return hover_lines(walk, step, index)
    except (KeyError, IndexError, ValueError, TypeError) as exc:  # a recorded step explain cannot spell out
        return [f"{step.symbol} = {float(step.values[index]):.4f} ({step.formula}; {exc})"]


def _notices(walk: Any) -> list[str]:
    if getattr(walk, "truncated", False):
        limit = getattr(walk, "max_tokens", 0) or len(walk.tokens)
        return [(f"The text was cut: it is longer than the model's limit of {limit} tokens, so only its "
                 f"first {limit} tokens ([CLS] and [SEP] included) are shown.")]
    return []


def _initial_head(head: int | None, n_heads: int) -> int:
    if head is None:
        return 0
    if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or not 1 <= head <= n_heads:
        raise AttnlabInputError(f"head must be a 1-based head number from 1 to {n_heads}, got {head!r}")
    return int(head) - 1


def report_data(walk: Walkthrough, *, hover: bool | None = None, head: int | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-ready data: every step once, its numbers in the compact
    form of :mod:`attnlab.report.codec` (exactly as ``attnlab explain`` writes them). ``hover``: send the
    library's own "how this number is made" lines for every map cell (default: when the maps are small;
    else the page writes them from the recorded numbers when a cell is pointed at). ``head``: the 1-based
    head shown first in the multi-head sections."""
    s = walk.settings
    if hover is None:
        cells = sum(int(np.prod(st.values.shape)) for st in walk.steps if is_map(st) or is_query_row(st))
        hover = cells <= _MAX_HOVER_CELLS
    sections = []
    for sec in walk.sections:
        steps = walk.section_steps(sec)
        axes = [(st, head_axis(st)) for st in steps]
        heads = [(st, a) for st, a in axes if a is not None]
        head_labels = list(heads[0][0].labels[heads[0][1]]) if heads else []
        sections.append({
            "id": sec,
            "title": walk.section_titles.get(sec, sec),
            "steps": [st.id for st in steps],
            "heads": head_labels,
            "head": _initial_head(head, len(head_labels)) if head_labels else 0,
        })
    if head is not None and not any(sec["heads"] for sec in sections):
        raise AttnlabInputError("head applies to a walkthrough with multi-head attention (section multihead)")
    settings_text = getattr(walk, "settings_text", None) or (
        f"d_in = {s.d_in}, d_out = {s.d_out}, heads = {s.heads}, dropout = {s.dropout:g}, seed = {s.seed}, "
        f"scores {'scaled by 1/√d_k' if s.scale else 'not scaled'}, embeddings: {s.embeddings}, "
        f"weights: {s.weights}"
    )
    return {
        "format": "attnlab.report",
        "version": 2,
        "tokens": list(walk.tokens),
        "labels": list(walk.labels),
        "query": walk.query,
        "settings": s.to_dict(),
        "settings_text": settings_text,
        "notices": _notices(walk),
        "colors": _colors(),
        "mask_words": MASK_REASONS,
        "sections": sections,
        "steps": _share({st.id: _step_data(walk, st, hover) for st in walk.steps}, list(walk.labels)),
        "hover": bool(hover),
    }


def _share(steps: dict[str, dict[str, Any]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Send what steps share once: an axis labelled with the token labels is ``"@labels"``; values equal
    to an earlier step's are ``{"same": that step's id}`` (e.g. the causal weights, masked before or after
    the softmax, are the same numbers)."""
    seen: dict[tuple[str, str, int, str], str] = {}
    for sid, step in steps.items():
        step["labels"] = ["@labels" if lab == labels else lab for lab in step["labels"]]
        blob = step["values"]
        key = (blob["mode"], blob["data"], blob["dec"], f"{blob.get('low')} {blob.get('fill')} {step.get('masked')}")
        if key in seen and steps[seen[key]]["shape"] == step["shape"]:
            step["values"] = {"same": seen[key]}
        else:
            seen.setdefault(key, sid)
    return steps


def _json_for_script(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # Inside <script> only "</" (and "<!--") can end or confuse the element: escape the "<".
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _numbers_1based(name: str, value: int | Sequence[int] | None, size: int) -> list[int]:
    """``layer`` / ``head`` selections: None (all), one 1-based number, or several."""
    if value is None:
        return list(range(1, size + 1))
    items = [value] if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        chosen = list(items)  # type: ignore[arg-type]
    except TypeError:
        raise AttnlabInputTypeError(f"{name} must be a 1-based number or a list of them, got {value!r}") from None
    for v in chosen:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= size:
            raise AttnlabInputError(f"{name} must be from 1 to {size} (1-based), got {v!r}")
    if not chosen:
        raise AttnlabInputError(f"{name} must name at least one of 1..{size}, got an empty list")
    return sorted({int(v) for v in chosen})


def model_report_data(
    maps: AttentionMaps,
    *,
    model: str | None = None,
    layer: int | Sequence[int] | None = None,
    head: int | Sequence[int] | None = None,
    query: str | int | None = None,
) -> dict[str, Any]:
    """The page's data for a pretrained encoder's attention (:class:`attnlab.pretrained.AttentionMaps`):
    a layer × head overview, the focused head at full size, a token filter.

    layer, head  1-based numbers (or lists of them) to keep in the file (default every layer and head)
    query        the token followed first: a word piece ("cat"), a 1-based position as text ("2") or a
                 0-based int index (default the first word after [CLS])
    """
    from attnlab.explain.inputs import unique_labels
    from attnlab.explain.model import resolve_model_query

    weights = np.asarray(maps.weights, dtype=np.float32)  # (L, H, T, T)
    if weights.ndim != 4 or weights.shape[-1] != weights.shape[-2]:
        raise AttnlabInputError(f"maps.weights must be (layers, heads, T, T), got shape {weights.shape}")
    n_layers, n_heads, t, _ = weights.shape
    model = model or getattr(maps, "model", None) or "all-MiniLM-L6-v2"
    hidden = getattr(maps, "masked", None)  # (L, T, T) bool: cells the model's mask hid (a decoder's future)
    layers = _numbers_1based("layer", layer, n_layers)
    heads = _numbers_1based("head", head, n_heads)
    chosen = weights[np.ix_([i - 1 for i in layers], [h - 1 for h in heads])]  # (L', H', T, T)
    if not np.all(np.isfinite(chosen)):
        raise AttnlabInputError("maps.weights has non-finite values: the attention weights must be finite")
    labels = list(unique_labels(maps.tokens))
    qi = resolve_model_query(query, tuple(maps.tokens), tuple(labels)) if query is not None else min(1, t - 1)
    step_id = "model.weights"
    formula = (f"weights = softmax(q_h @ k_hᵀ / √d_head) of one head of one layer of {model} "
               + ("(causal: a token sees itself and the tokens before it; grey cells are hidden by the mask)"
                  if hidden is not None else "(MultiHeadAttention, not causal: every token sees every token)"))
    shape = list(chosen.shape)
    only = []
    if len(layers) < n_layers:
        only.append("layer " + ", ".join(map(str, layers)))
    if len(heads) < n_heads:
        only.append("head " + ", ".join(map(str, heads)))
    what = f"{len(layers)} layer{'s' if len(layers) != 1 else ''} × {len(heads)} head{'s' if len(heads) != 1 else ''}"
    step = {
        "id": step_id,
        "title": f"Attention weights, {what}" + (f" (only {'; '.join(only)})" if only else ""),
        "why": "each row is one query token's weights over all tokens and sums to 1; [CLS] and [SEP] are the "
               "special tokens the model adds",
        "formula": formula,
        "symbol": "weight",
        "kind": "module",
        "operands": [],
        "params": {"module": f"{model} ({n_layers} layers of {n_heads} heads)"},
        "template": module_template(f"{model} ({n_layers} layers of {n_heads} heads)", formula),
        "axes": ["layer", "head", "query", "key"],
        "labels": [[str(i) for i in layers], [str(h) for h in heads], labels, labels],
        "shape": shape,
        "values": encode(chosen),
        "detail": [],
        "map": True,
        "head_axis": 1,
        "one_row": False,
        "masked": None if hidden is None else encode_bits(np.broadcast_to(
            np.asarray(hidden, dtype=bool)[[i - 1 for i in layers]][:, None], chosen.shape)),  # (L', H', T, T)
        "vmin": 0.0,
        "vmax": float(chosen.max()) if chosen.size else 1.0,
        "chain": None,
    }
    notices = []
    if maps.truncated:
        notices.append(f"The text was cut: it is longer than {model}'s limit of {t} tokens, so only its first "
                       f"{t} tokens (special tokens included) are shown.")
    return {
        "format": "attnlab.report",
        "version": 2,
        "title": f"Attention inside {model}",
        "subtitle": f"“{_short_text(maps.text)}”: the attention weights of {'every' if not only else 'the chosen'} layer and "
                    f"head of the pretrained {model} " + (
                        "(attnlab.pretrained, the chapter's MultiHeadAttention with the model's weights)."
                        if model == "all-MiniLM-L6-v2" else "(a local Hugging Face model, its attention "
                        "computed by attnlab's registered attention function, attnlab.hf)."),
        "tokens": list(maps.tokens),
        "labels": labels,
        "query": qi,
        "settings": {"model": model, "layers": n_layers, "heads": n_heads, "shown_layers": layers,
                     "shown_heads": heads, "truncated": bool(maps.truncated)},
        "settings_text": f"{model}: {n_layers} layers × {n_heads} heads" + (f", showing {'; '.join(only)}"
                                                                             if only else ""),
        "notices": notices,
        "colors": _colors(),
        "sections": [{
            "id": "model",
            "title": f"{model}: {what}",
            "steps": [step_id],
            "heads": [str(h) for h in heads],
            "head": 0,
        }],
        "steps": {step_id: step},
        "hover": False,
    }


def _short_text(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _is_walkthrough(obj: Any) -> bool:
    return hasattr(obj, "steps") and hasattr(obj, "settings")


def _is_maps(obj: Any) -> bool:
    return hasattr(obj, "weights") and hasattr(obj, "tokens") and hasattr(obj, "text")


def _data(obj: Walkthrough | AttentionMaps, hover: bool | None, select: dict[str, Any]) -> dict[str, Any]:
    if _is_walkthrough(obj):
        for name in ("layer", "query"):
            if select.get(name) is not None:
                raise AttnlabInputError(f"{name} applies to a pretrained model's AttentionMaps; a walkthrough has "
                                 f"its {'query' if name == 'query' else 'sections'} already (explain(..., "
                                 f"query=...))")
        return report_data(cast("Walkthrough", obj), hover=hover, head=select.get("head"))
    if _is_maps(obj):
        return model_report_data(cast("AttentionMaps", obj), **{k: v for k, v in select.items() if v is not None})
    raise AttnlabInputTypeError(f"render_html takes an attnlab.explain Walkthrough or attnlab.pretrained AttentionMaps, "
                    f"got {type(obj).__name__}")


def render_html(walkthrough: Walkthrough | AttentionMaps, *, uid: str | None = None,
                hover: bool | None = None, layer: int | Sequence[int] | None = None,
                head: int | Sequence[int] | None = None, query: str | int | None = None) -> str:
    """The interactive report as an HTML fragment: a ``<div>`` holding its style, data and script, all
    scoped to the unique id ``uid`` (random unless given), so several reports can share one notebook.

    Takes a walkthrough (``attnlab.explain.explain(...)``) or a pretrained encoder's attention
    (``attnlab.pretrained.load_encoder().attention(text)``: every layer × head). For AttentionMaps,
    ``layer`` / ``head`` (1-based, one or several) narrow what goes in the page and ``query`` is the token
    followed first; for a walkthrough ``head`` is the head shown first."""
    data = _data(walkthrough, hover, {"layer": layer, "head": head, "query": query})
    uid = uid or f"attnlab-{uuid.uuid4().hex[:12]}"
    if not uid.replace("-", "").replace("_", "").isalnum():
        raise AttnlabInputError(f"uid must be letters, digits, '-' and '_' only, got {uid!r}")
    css = _asset("report.css").replace("#attnlab-root", f"#{uid}")
    js = _asset("report.js")
    sentence = html.escape(" ".join(data["tokens"][:40]) + (" …" if len(data["tokens"]) > 40 else ""))
    return (
        f'<div id="{uid}" class="attnlab-report" lang="en">\n'
        f"<style>\n{css}</style>\n"
        f'<p class="attnlab-loading">attnlab report for “{sentence}”: this view needs JavaScript '
        "(in Jupyter, trust the notebook; or open the file written by <code>attnlab report</code>).</p>\n"
        f'<script type="application/json" class="attnlab-data">{_json_for_script(data)}</script>\n'
        "<script>\n(function () {\n"
        f"{js}\n"
        "var script = document.currentScript;\n"
        f'var root = (script && script.closest(".attnlab-report")) || document.getElementById("{uid}");\n'
        "var data = root && root.querySelector('script.attnlab-data');\n"
        "if (data) { attnlabReport(root, JSON.parse(data.textContent)); }\n"
        "})();\n</script>\n"
        "</div>\n"
    )


def render_page(walkthrough: Walkthrough | AttentionMaps, *, hover: bool | None = None,
                layer: int | Sequence[int] | None = None, head: int | Sequence[int] | None = None,
                query: str | int | None = None) -> str:
    """A full, self-contained HTML document of the report (what ``attnlab report --out`` writes); the
    options as :func:`render_html`."""
    digest = hashlib.sha256()
    shown: Any = walkthrough
    if _is_walkthrough(shown):
        digest.update(shown.to_json(indent=None).encode("utf-8"))
    else:
        digest.update(shown.text.encode("utf-8"))
        digest.update(np.ascontiguousarray(np.asarray(shown.weights, dtype=np.float32)).tobytes())
    digest.update(repr((layer, head, query)).encode("utf-8"))
    body = render_html(walkthrough, uid=f"attnlab-{digest.hexdigest()[:12]}", hover=hover, layer=layer,
                       head=head, query=query)
    words = " ".join(shown.tokens) if _is_walkthrough(shown) else shown.text
    if len(words) > 120:
        words = words[:117] + "…"
    title = html.escape(f"attnlab: attention on “{words}”")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'  # no favicon request
        f"<title>{title}</title>\n"
        "<style>html,body{margin:0;padding:0;background:#fff}</style>\n"
        f"</head>\n<body>\n{body}</body>\n</html>\n"
    )


def write_report(walkthrough: Walkthrough | AttentionMaps, path: str | Path, *, force: bool = False,
                 layer: int | Sequence[int] | None = None, head: int | Sequence[int] | None = None,
                 query: str | int | None = None) -> Path:
    """Write :func:`render_page` to ``path`` (``.html`` / ``.htm``); refuses to overwrite unless ``force``.
    The page is built before the file is opened: a mistake in the options leaves no file behind."""
    path = check_output_path(path, force=force, formats=HTML_FORMATS)
    page = render_page(walkthrough, layer=layer, head=head, query=query)
    write_atomically(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path
