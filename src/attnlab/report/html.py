"""The interactive report: one self-contained HTML file (or notebook cell) for a recorded walkthrough.

:func:`render_html` returns a fragment (a ``<div>`` with its ``<style>``, data and ``<script>``) that works
on its own page and inside a Jupyter cell: every CSS rule and every DOM lookup is scoped to one container
with a unique id. :func:`render_page` wraps it in a full document for ``attnlab report --out``.

The page shows the recorded steps only: the numbers, labels, formulas and the "how this number is made"
lines all come from the :class:`~attnlab.explain.steps.Walkthrough` (through ``explain_cell``); the
JavaScript only lays them out, colours them and reacts to the pointer and the keyboard. No network: the CSS
and JavaScript (``report.css``, ``report.js`` beside this module) are inlined, there are no images, fonts
or links to other files.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import uuid
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from attnlab.report.data import chain_operand, head_axis, is_map, is_query_row, masked_cells

if TYPE_CHECKING:
    from attnlab.explain.steps import Step, Walkthrough
    from attnlab.pretrained import AttentionMaps

__all__ = ["model_report_data", "render_html", "render_page", "report_data", "write_report"]

_COLORS = 64  # entries of the colour map sent to the page
_MAX_HOVER_CELLS = 20_000  # above this many map cells, hover text is left out to keep the file small


def _asset(name: str) -> str:
    return resources.files("attnlab.report").joinpath(name).read_text(encoding="utf-8")


def _colors() -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    from attnlab.heatmap import CMAP

    cmap = colormaps[CMAP]
    return [to_hex(cmap(i / (_COLORS - 1))) for i in range(_COLORS)]


def _integral(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return bool(finite.size) and bool(np.all(np.abs(finite - np.round(finite)) < 1e-6))


def _texts(values: np.ndarray) -> list[str]:
    """Every number of a step as ``attnlab explain`` writes it (whole numbers only when all are whole)."""
    from attnlab.explain.steps import fmt

    integral = _integral(values)
    return [fmt(float(v), integral=integral) for v in values.reshape(-1)]


def _numbers(values: np.ndarray) -> list[float | None]:
    """Values for colouring: float32 read back as the shortest decimal; None for ±inf / nan."""
    return [float(str(np.float32(v))) if math.isfinite(v) else None for v in values.reshape(-1).tolist()]


def _step_data(walk: Walkthrough, step: Step, hover: bool) -> dict[str, Any]:
    values = np.asarray(step.values, dtype=np.float32)
    labels = [list(lab) for lab in step.labels]
    axes = list(step.axes)
    if values.ndim == 1 and is_query_row(step):  # the query's own row: show it as a one-row map
        values, axes = values[None], ["query", "key"]
        labels = [[walk.query_label], labels[0]]
    elif values.ndim == 0:
        values, axes, labels = values.reshape(1, 1), ["row", "col"], [[""], [""]]
    elif values.ndim == 1 and axes[0] == "dim":  # the query's own vector (its context vector)
        values, axes, labels = values[None], ["query", "dim"], [[walk.query_label], labels[0]]
    elif values.ndim == 1:
        values, axes, labels = values[None], ["row", *axes], [[""], labels[0]]
    data: dict[str, Any] = {
        "id": step.id,
        "title": step.title,
        "why": step.why,
        "formula": step.formula,
        "symbol": step.symbol,
        "kind": step.how.kind if step.how is not None else "",
        "axes": axes,
        "labels": labels,
        "shape": list(values.shape),
        "text": _texts(values),
        "detail": list(step.detail),
        "map": is_map(step) or is_query_row(step),
        "head_axis": head_axis(step),
    }
    if data["map"]:
        finite = values[np.isfinite(values)]
        masked = masked_cells(walk, step)
        masked = np.zeros(values.shape, bool) if masked is None else masked.reshape(values.shape)
        shown = values[np.isfinite(values) & ~masked]
        data["values"] = _numbers(values)
        data["masked"] = [int(m) for m in masked.reshape(-1)] if masked.any() else None
        data["vmin"] = float(min(0.0, shown.min())) if shown.size else 0.0
        data["vmax"] = float(shown.max()) if shown.size else (float(finite.max()) if finite.size else 1.0)
        data["chain"] = chain_operand(walk, step)
        if hover:
            data["hover"] = [_cell_lines(walk, step, idx) for idx in np.ndindex(*step.values.shape)]
    return data


def _cell_lines(walk: Walkthrough, step: Step, index: tuple[int, ...]) -> list[str]:
    try:
        lines = walk.explain_cell(step.id, index)
        if step.how is not None and step.how.kind == "module" and step.formula:
            lines = [*lines, f"  where {step.formula}"]
        return lines
    except (KeyError, IndexError, ValueError, TypeError) as exc:  # a recorded step explain cannot spell out
        return [f"{step.symbol} = {float(step.values[index]):.4f} ({step.formula}; {exc})"]


def _follow(walk: Walkthrough, section: str) -> list[list[dict[str, Any]]]:
    """For every token, the rows of this section's steps that belong to it: its step-by-step computation,
    with the numbers as ``attnlab explain`` writes them."""
    from attnlab.explain.cells import row_name
    from attnlab.explain.steps import fmt_vector

    n = len(walk.tokens)
    per_token: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    for step in walk.section_steps(section):
        values = step.values
        h_axis = head_axis(step)
        if values.ndim == 1 and step.axes[0] in ("key", "dim"):
            # a step that belongs to the walkthrough's query only
            per_token[walk.query].append({
                "step": step.id, "title": step.title, "formula": step.formula, "head": None,
                "lines": [f"{row_name(walk, step, ())} = {fmt_vector(values)}"],
            })
            continue
        if values.ndim < 2 or step.axes[-2] not in ("query", "token") or len(step.labels[-2]) != n:
            continue
        for t in range(n):
            for lead in np.ndindex(*values.shape[:-2]):
                index = lead + (t,)
                lines = [f"{row_name(walk, step, index)} = {fmt_vector(values[index])}"]
                kind = step.how.kind if step.how is not None else ""
                if kind == "weighted_sum" and values.shape[-1] <= 8:
                    for d in range(values.shape[-1]):
                        lines += ["  " + line for line in _cell_lines(walk, step, index + (d,))[:1]]
                per_token[t].append({
                    "step": step.id, "title": step.title, "formula": step.formula,
                    "head": None if h_axis is None else int(lead[h_axis]),
                    "lines": lines,
                })
    return per_token


def report_data(walk: Walkthrough, *, hover: bool | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-ready data (numbers already formatted as explain does)."""
    s = walk.settings
    if hover is None:
        cells = sum(int(np.prod(st.values.shape)) for st in walk.steps if is_map(st) or is_query_row(st))
        hover = cells <= _MAX_HOVER_CELLS
    sections = []
    for sec in walk.sections:
        steps = walk.section_steps(sec)
        heads = [st for st in steps if head_axis(st) is not None]
        head_labels = list(heads[0].labels[head_axis(heads[0])]) if heads else []
        sections.append({
            "id": sec,
            "title": walk.section_titles.get(sec, sec),
            "steps": [st.id for st in steps],
            "heads": head_labels,
            "follow": _follow(walk, sec),
        })
    settings_text = (
        f"d_in = {s.d_in}, d_out = {s.d_out}, heads = {s.heads}, dropout = {s.dropout:g}, seed = {s.seed}, "
        f"scores {'scaled by 1/√d_k' if s.scale else 'not scaled'}, embeddings: {s.embeddings}, "
        f"weights: {s.weights}"
    )
    return {
        "format": "attnlab.report",
        "version": 1,
        "tokens": list(walk.tokens),
        "labels": list(walk.labels),
        "query": walk.query,
        "settings": s.to_dict(),
        "settings_text": settings_text,
        "colors": _colors(),
        "sections": sections,
        "steps": {st.id: _step_data(walk, st, hover) for st in walk.steps},
        "hover": bool(hover),
    }


def _json_for_script(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # Inside <script> only "</" (and "<!--") can end or confuse the element: escape the "<".
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def model_report_data(maps: AttentionMaps, *, model: str = "all-MiniLM-L6-v2") -> dict[str, Any]:
    """The page's data for a pretrained encoder's attention (:class:`attnlab.pretrained.AttentionMaps`):
    one section with every layer × head as small multiples and the selected head's maps at full size."""
    from attnlab.explain.inputs import unique_labels
    from attnlab.explain.steps import fmt_vector

    weights = np.asarray(maps.weights, dtype=np.float32)  # (L, H, T, T)
    n_layers, n_heads, t, _ = weights.shape
    labels = list(unique_labels(maps.tokens))
    step_id = "model.weights"
    layer_labels = [str(i + 1) for i in range(n_layers)]
    head_labels = [str(i + 1) for i in range(n_heads)]
    formula = (f"weights = softmax(q_h @ k_hᵀ / √d_head) of one head of one layer of {model} "
               "(MultiHeadAttention, not causal: every token sees every token)")
    follow: list[list[dict[str, Any]]] = [[] for _ in range(t)]
    for i in range(t):
        for h in range(n_heads):
            lines = [f"layer {layer + 1}: weight({labels[i]}, ·) = {fmt_vector(weights[layer, h, i])}"
                     for layer in range(n_layers)]
            follow[i].append({"step": step_id, "title": f"Attention weights of {labels[i]} in every layer",
                              "formula": "", "head": h, "lines": lines})
    step = {
        "id": step_id,
        "title": f"Attention weights, {n_layers} layers × {n_heads} heads",
        "why": "each row is one query token's weights over all tokens and sums to 1; [CLS] and [SEP] are the "
               "special tokens the model adds",
        "formula": formula,
        "symbol": "weight",
        "kind": "module",
        "axes": ["layer", "head", "query", "key"],
        "labels": [layer_labels, head_labels, labels, labels],
        "shape": [n_layers, n_heads, t, t],
        "text": _texts(weights),
        "detail": ["the text was cut at the model's maximum length"] if maps.truncated else [],
        "map": True,
        "head_axis": 1,
        "values": _numbers(weights),
        "masked": None,
        "vmin": 0.0,
        "vmax": float(weights.max()) if weights.size else 1.0,
        "chain": None,
    }
    return {
        "format": "attnlab.report",
        "version": 1,
        "title": f"Attention inside {model}",
        "subtitle": f"“{maps.text}”: the attention weights of every layer and head of the pretrained {model} "
                    "(attnlab.pretrained, the chapter's MultiHeadAttention with the model's weights).",
        "tokens": list(maps.tokens),
        "labels": labels,
        "query": 0,
        "settings": {"model": model, "layers": n_layers, "heads": n_heads},
        "settings_text": f"{model}: {n_layers} layers × {n_heads} heads",
        "colors": _colors(),
        "sections": [{
            "id": "model",
            "title": f"{model}: {n_layers} layers × {n_heads} heads",
            "steps": [step_id],
            "heads": head_labels,
            "follow": follow,
        }],
        "steps": {step_id: step},
        "hover": False,
    }


def _is_walkthrough(obj: Any) -> bool:
    return hasattr(obj, "steps") and hasattr(obj, "settings")


def _data(obj: Walkthrough | AttentionMaps, hover: bool | None) -> dict[str, Any]:
    if _is_walkthrough(obj):
        return report_data(obj, hover=hover)
    if hasattr(obj, "weights") and hasattr(obj, "tokens") and hasattr(obj, "text"):
        return model_report_data(obj)
    raise TypeError(f"render_html takes an attnlab.explain Walkthrough or attnlab.pretrained AttentionMaps, "
                    f"got {type(obj).__name__}")


def render_html(walkthrough: Walkthrough | AttentionMaps, *, uid: str | None = None,
                hover: bool | None = None) -> str:
    """The interactive report as an HTML fragment: a ``<div>`` holding its style, data and script, all
    scoped to the unique id ``uid`` (random unless given), so several reports can share one notebook.

    Takes a walkthrough (``attnlab.explain.explain(...)``) or a pretrained encoder's attention
    (``attnlab.pretrained.load_encoder().attention(text)``: every layer × head)."""
    data = _data(walkthrough, hover)
    uid = uid or f"attnlab-{uuid.uuid4().hex[:12]}"
    if not uid.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"uid must be letters, digits, '-' and '_' only, got {uid!r}")
    css = _asset("report.css").replace("#attnlab-root", f"#{uid}")
    js = _asset("report.js")
    sentence = html.escape(" ".join(data["tokens"]))
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


def render_page(walkthrough: Walkthrough | AttentionMaps, *, hover: bool | None = None) -> str:
    """A full, self-contained HTML document of the report (what ``attnlab report --out`` writes)."""
    if _is_walkthrough(walkthrough):
        content = walkthrough.to_json(indent=None)
    else:
        content = json.dumps([walkthrough.text, np.asarray(walkthrough.weights).tobytes().hex()])
    data_id = hashlib.sha256(content.encode("utf-8")).hexdigest()[:12]
    body = render_html(walkthrough, uid=f"attnlab-{data_id}", hover=hover)
    words = " ".join(walkthrough.tokens) if _is_walkthrough(walkthrough) else walkthrough.text
    title = html.escape(f"attnlab: attention on “{words}”")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'  # no favicon request
        f"<title>{title}</title>\n"
        "<style>html,body{margin:0;padding:0;background:#fff}</style>\n"
        f"</head>\n<body>\n{body}</body>\n</html>\n"
    )


def write_report(walkthrough: Walkthrough | AttentionMaps, path: str | Path, *, force: bool = False) -> Path:
    """Write :func:`render_page` to ``path`` (``.html`` / ``.htm``); refuses to overwrite unless ``force``."""
    from attnlab.heatmap import check_output_path

    path = check_output_path(path, force=force, formats={".html": "html", ".htm": "html"})
    path.write_text(render_page(walkthrough), encoding="utf-8")
    return path
