"""Attention weights as a picture: heatmaps with token labels, a colour bar and the values in the cells.

Headless-safe: figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never
through ``pyplot``, so no display, no GUI backend and no global state are involved. The picture only shows
numbers it is given (the recorded steps of the walkthrough); it computes no attention itself.

Shape letters: H heads (panels), T_q query tokens (rows), T_k key tokens (columns).

Colours: viridis from 0 to the largest weight shown (shared by every panel of one figure, so heads compare);
masked cells (a causal mask's future) are light grey with a hatch and no number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

if TYPE_CHECKING:
    from attnlab.explain.steps import Walkthrough
    from attnlab.pretrained import AttentionMaps

__all__ = [
    "CMAP",
    "FORMATS",
    "MASKED_COLOR",
    "check_output_path",
    "heatmap_figure",
    "maps_figure",
    "save_figure",
    "walkthrough_figure",
]

# File extension -> matplotlib format. Anything else is refused with a one-line error.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
CMAP = "viridis"
MASKED_COLOR = "#d9d9d9"  # the same grey as the HTML report's masked cells

_MAX_FIG_INCHES = 13.0  # the widest figure we make (fits a README and a laptop screen)
_MAX_CELL_INCHES = 0.78  # cell size for short inputs
_MIN_CELL_INCHES = 0.16  # below this labels overlap: the figure grows instead


def _as_stack(weights: object) -> np.ndarray:
    arr = np.asarray(weights, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]  # (T_q, T_k) -> (1, T_q, T_k)
    if arr.ndim != 3 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(
            f"weights must be a (T_q, T_k) matrix or a (heads, T_q, T_k) stack, got shape {arr.shape}"
        )
    return arr  # (H, T_q, T_k)


def _check_labels(name: str, labels: Sequence[str] | None, size: int) -> list[str]:
    if labels is None:
        return [str(i + 1) for i in range(size)]
    labels = [str(label) for label in labels]
    if len(labels) != size:
        raise ValueError(f"{name} must have one label per {'row' if name == 'row_labels' else 'column'}: "
                         f"got {len(labels)} labels for {size}")
    return labels


def _cell_text(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _annotation_plan(cell_in: float, annotate: bool | None, max_decimals: int) -> tuple[int | None, float]:
    """How many decimals fit in a cell of ``cell_in`` inches, and the font size (points)."""
    fontsize = min(10.0, cell_in * 72 / 4.6)
    if annotate is False:
        return None, fontsize
    for decimals in (max_decimals, 2):
        width_pt = (decimals + 2) * fontsize * 0.62  # "0." + decimals digits, ~0.62 em per digit
        if width_pt <= cell_in * 72 * 0.9 and fontsize >= 6.0:
            return decimals, fontsize
        fontsize_needed = cell_in * 72 * 0.9 / ((decimals + 2) * 0.62)
        if annotate and fontsize_needed >= 4.0:
            return decimals, min(fontsize, fontsize_needed)
    return None, fontsize


def _text_color(rgba: Sequence[float]) -> str:
    r, g, b = rgba[:3]
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if luminance > 0.45 else "white"


def heatmap_figure(
    weights: object,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    *,
    titles: Sequence[str] | None = None,
    suptitle: str | None = None,
    masked: object | None = None,
    annotate: bool | None = None,
    decimals: int = 4,
    vmax: float | None = None,
    colorbar_label: str = "attention weight",
    row_axis: str = "query (attends from)",
    col_axis: str = "key (attends to)",
    ncols: int | None = None,
) -> Figure:
    """A figure of one attention matrix, or one panel per head side by side.

    weights     (T_q, T_k) or (H, T_q, T_k): row ``i`` is how much query ``i`` attends to each key
    row_labels  T_q token labels (rows, the queries); col_labels: T_k labels (default: the row labels)
    titles      one title per panel (e.g. ``head 1``); suptitle: a title over the whole figure
    masked      boolean, broadcastable to weights: True where a cell is masked out (drawn grey, hatched)
    annotate    write the values in the cells: None = when they fit, True = always (small), False = never
    decimals    decimals of the written values (fewer when the cells are small)
    vmax        top of the colour scale (default: the largest unmasked weight shown, at least 1e-6)
    ncols       panels per row (default up to 4); with more than 8 panels the grid is compact: tokens
                are written on the outer panels only (e.g. 6 layers x 12 heads of a pretrained model)

    Returns a :class:`matplotlib.figure.Figure` attached to an Agg canvas (save it with
    :func:`save_figure` or ``fig.savefig``).
    """
    stack = _as_stack(weights)  # (H, T_q, T_k)
    n_heads, t_q, t_k = stack.shape
    rows = _check_labels("row_labels", row_labels, t_q)
    cols = _check_labels("col_labels", col_labels if col_labels is not None else
                         (row_labels if t_q == t_k else None), t_k)
    if titles is not None and len(titles) != n_heads:
        raise ValueError(f"titles must have one title per panel: got {len(titles)} for {n_heads} panels")
    mask = np.zeros(stack.shape, dtype=bool)
    if masked is not None:
        try:
            mask = np.broadcast_to(np.asarray(masked, dtype=bool), stack.shape).copy()  # (H, T_q, T_k)
        except ValueError:
            raise ValueError(f"masked of shape {np.shape(masked)} does not fit weights of shape "
                             f"{stack.shape}") from None
    mask |= ~np.isfinite(stack)

    shown = stack[~mask]
    top = float(vmax) if vmax is not None else (float(shown.max()) if shown.size else 1.0)
    norm = Normalize(vmin=0.0, vmax=max(top, 1e-6))
    cmap = ListedColormap(_viridis_colors(), name=CMAP)

    # Size: cells as large as fit in the widest figure, panels in a grid of at most 4 columns.
    n_cols = max(1, min(n_heads, ncols if ncols is not None else (4 if t_k <= 12 else 2)))
    n_rows = math.ceil(n_heads / n_cols)
    compact = n_heads > 8  # many panels: tick labels on the outer panels only
    longest = max(len(label) for label in rows + cols)
    label_in = 0.09 * min(longest, 18) + 0.35  # space taken by tick labels on one side
    if compact:
        cell_in = (_MAX_FIG_INCHES + 3.0 - 1.4 - label_in - n_cols * 0.1) / (n_cols * t_k)
        cell_in = max(0.05, min(_MAX_CELL_INCHES, cell_in))
        tick_size = max(4.0, min(8.0, cell_in * 72 * 0.8))
        panel_w, panel_h = t_k * cell_in + 0.1, t_q * cell_in + (0.25 if titles is not None else 0.05)
        fig_w = n_cols * panel_w + label_in + 1.6
        fig_h = n_rows * panel_h + label_in + (0.6 if suptitle else 0.1) + 0.4
    else:
        cell_in = (_MAX_FIG_INCHES - 1.4 - n_cols * (label_in + 0.25)) / (n_cols * t_k)
        cell_in = max(_MIN_CELL_INCHES, min(_MAX_CELL_INCHES, cell_in))
        tick_size = max(5.0, min(11.0, cell_in * 72 * 0.55))
        panel_w = t_k * cell_in + label_in + 0.3
        panel_h = t_q * cell_in + label_in + 0.45 + (0.35 if titles is not None else 0.0)
        fig_w = n_cols * panel_w + 1.3
        fig_h = n_rows * panel_h + (0.5 if suptitle else 0.1) + 0.3
    digits, fontsize = _annotation_plan(cell_in, annotate, decimals)

    fig = Figure(figsize=(fig_w, fig_h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    image = None
    for h in range(n_rows * n_cols):
        ax = axes[h // n_cols][h % n_cols]
        if h >= n_heads:
            ax.set_visible(False)
            continue
        data = np.ma.masked_array(stack[h], mask=mask[h])
        image = ax.imshow(data, cmap=cmap, norm=norm, aspect="equal", interpolation="nearest")
        ax.set_facecolor(MASKED_COLOR)
        for i, j in zip(*np.nonzero(mask[h]), strict=True):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=MASKED_COLOR, edgecolor="#a6a6a6",
                                   hatch="///", linewidth=0.0))
        bottom = h // n_cols == n_rows - 1 or h + n_cols >= n_heads
        left = h % n_cols == 0
        if compact and not bottom:
            ax.set_xticks(range(t_k), [""] * t_k)
        else:
            ax.set_xticks(range(t_k), cols, rotation=45 if longest > 3 else 0, ha="right" if longest > 3 else
                          "center", rotation_mode="anchor", fontsize=tick_size)
        ax.set_yticks(range(t_q), rows if left or not compact else [""] * t_q, fontsize=tick_size)
        ax.set_xticks(np.arange(-0.5, t_k, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, t_q, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=min(0.8, cell_in * 72 * 0.05))
        ax.tick_params(which="minor", length=0)
        ax.tick_params(which="major", length=0, pad=3)
        for side in ax.spines.values():
            side.set_visible(False)
        if left and not compact:
            ax.set_ylabel(row_axis, fontsize=max(7.0, tick_size - 1))
        if bottom and not compact:
            ax.set_xlabel(col_axis, fontsize=max(7.0, tick_size - 1))
        if titles is not None:
            ax.set_title(titles[h], fontsize=max(6.0, tick_size + 1) if compact else max(8.0, tick_size + 1),
                         pad=2 if compact else 6)
        if digits is not None:
            for i in range(t_q):
                for j in range(t_k):
                    if mask[h, i, j]:
                        continue
                    value = float(stack[h, i, j])
                    ax.text(j, i, _cell_text(value, digits), ha="center", va="center", fontsize=fontsize,
                            color=_text_color(cmap(norm(value))))
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=min(1.0, 0.4 + 0.1 * t_q), pad=0.02,
                           aspect=25)
        bar.set_label(colorbar_label, fontsize=9)
        bar.ax.tick_params(labelsize=8)
        bar.outline.set_visible(False)
    if compact:
        fig.supylabel(row_axis, fontsize=9)
        fig.supxlabel(col_axis, fontsize=9)
    if mask.any():
        fig.legend(handles=[Patch(facecolor=MASKED_COLOR, edgecolor="#a6a6a6", hatch="///",
                                  label="masked (a future token): weight 0")],
                   loc="outside lower center", fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=12)
    return fig


def _viridis_colors() -> np.ndarray:
    from matplotlib import colormaps

    return colormaps[CMAP](np.linspace(0.0, 1.0, 256))


def check_output_path(
    path: str | Path, *, force: bool = False, formats: dict[str, str] | None = None
) -> Path:
    """The output path, checked before any work: a known extension, and no existing file unless ``force``.

    Raises ValueError (unknown extension) or FileExistsError (a file is there and ``force`` is False).
    """
    formats = FORMATS if formats is None else formats
    path = Path(path)
    if path.suffix.lower() not in formats:
        raise ValueError(f"cannot write {str(path)!r}: unknown extension {path.suffix or '(none)'!r}; "
                         f"use one of {', '.join(formats)}")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; give a file name ending in "
                                f"{', '.join(formats)}")
    if path.exists() and not force:
        raise FileExistsError(f"{str(path)!r} exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
    return path


def save_figure(fig: Figure, path: str | Path, *, force: bool = False) -> Path:
    """Write ``fig`` as PNG, SVG or PDF, chosen by the extension of ``path``; refuses to overwrite an
    existing file unless ``force``. Returns the path written."""
    path = check_output_path(path, force=force)
    fig.savefig(path, format=FORMATS[path.suffix.lower()], dpi=fig.dpi, facecolor="white",
                metadata={"Software": None} if path.suffix.lower() == ".png" else None)
    return path


def walkthrough_figure(
    walkthrough: Walkthrough,
    section: str = "simplified",
    *,
    head: int | None = None,
    step: str | None = None,
    annotate: bool | None = None,
) -> Figure:
    """The heatmap of one recorded attention matrix of a walkthrough (``attnlab.explain.explain(...)``).

    section  ``simplified`` (all tokens' weights, 3.3.2), ``trainable``, ``causal`` or ``multihead`` (also
             the walkthrough's own section ids: ``all``, ...): that section's attention weights
    head     multi-head only: the 1-based head to draw (default: every head side by side)
    step     any recorded query × key step id instead (e.g. ``causal.scores_masked``)

    Masked cells (from the recorded causal mask) are grey; nothing is recomputed.
    """
    from attnlab.report.data import HEATMAP_SECTIONS, head_axis, is_map, masked_cells, weights_step

    if step is not None:
        if step not in walkthrough:
            maps = [s.id for s in walkthrough.steps if is_map(s)]
            raise ValueError(f"no step {step!r} in the walkthrough; steps with a query x key matrix: "
                             f"{', '.join(maps)}")
        chosen = walkthrough.step(step)
        if not is_map(chosen):
            raise ValueError(f"step {step!r} is not a query x key matrix (its axes are {chosen.axes}); "
                             "pick a scores, weights or mask step")
    else:
        sec = HEATMAP_SECTIONS.get(section, section)
        if sec not in walkthrough.sections:
            raise ValueError(f"unknown or unrecorded section {section!r}; choose one of "
                             f"{', '.join(HEATMAP_SECTIONS)}")
        chosen = weights_step(walkthrough, sec)
    values = np.asarray(chosen.values, dtype=np.float64)
    masked = masked_cells(walkthrough, chosen)
    h_axis = head_axis(chosen)
    lead_axes = values.ndim - 2
    if lead_axes > 1 or (lead_axes == 1 and h_axis is None):
        raise ValueError(f"step {chosen.id} has axes {chosen.axes}: only (query, key) or (head, query, key) "
                         "matrices can be drawn")
    head_labels = list(chosen.labels[0]) if h_axis is not None else []
    if head is not None:
        if h_axis is None:
            raise ValueError(f"--head applies to multi-head attention only; {chosen.id} has no heads "
                             "(use --section multihead)")
        if not 1 <= head <= len(head_labels):
            raise ValueError(f"--head must be from 1 to {len(head_labels)}, got {head}")
        values, masked = values[head - 1], (None if masked is None else masked[head - 1])  # (T_q, T_k)
        titles = None
        panel = f", head {head_labels[head - 1]}"
    else:
        titles = [f"head {label}" for label in head_labels] if h_axis is not None else None
        panel = ""
    section_title = walkthrough.section_titles.get(chosen.section, chosen.section)
    return heatmap_figure(
        values,
        chosen.labels[-2],
        chosen.labels[-1],
        titles=titles,
        suptitle=f"{chosen.title}{panel}\n{section_title}",
        masked=masked,
        annotate=annotate,
        colorbar_label={"weight": "attention weight"}.get(chosen.symbol, chosen.symbol),
    )


def maps_figure(
    maps: AttentionMaps,
    *,
    layer: int | None = None,
    head: int | None = None,
    annotate: bool | None = None,
    model: str = "all-MiniLM-L6-v2",
) -> Figure:
    """Heatmaps of a pretrained encoder's attention (``load_encoder().attention(text)``).

    layer, head   1-based. Neither: every layer x head in one grid (rows: layers); a layer: its heads;
                  a head: that head in every layer; both: one map with its values.
    """
    from attnlab.explain.inputs import unique_labels

    weights = np.asarray(maps.weights, dtype=np.float64)  # (L, H, T, T)
    n_layers, n_heads = weights.shape[:2]
    for name, value, size in (("--layer", layer, n_layers), ("--head", head, n_heads)):
        if value is not None and not 1 <= value <= size:
            raise ValueError(f"{name} must be from 1 to {size}, got {value}")
    labels = unique_labels(maps.tokens)
    where = f"“{maps.text}” in {model}"
    if layer is not None and head is not None:
        return heatmap_figure(weights[layer - 1, head - 1], labels, annotate=annotate,
                              suptitle=f"Attention weights of layer {layer}, head {head}\n{where}")
    if layer is not None:
        return heatmap_figure(weights[layer - 1], labels, titles=[f"head {h + 1}" for h in range(n_heads)],
                              annotate=annotate, suptitle=f"Attention weights of layer {layer}\n{where}",
                              ncols=min(n_heads, 6))
    if head is not None:
        return heatmap_figure(weights[:, head - 1], labels, titles=[f"layer {i + 1}" for i in range(n_layers)],
                              annotate=annotate, suptitle=f"Attention weights of head {head}\n{where}",
                              ncols=min(n_layers, 6))
    flat = weights.reshape(n_layers * n_heads, *weights.shape[2:])  # (L * H, T, T)
    titles = [f"L{i + 1} H{h + 1}" for i in range(n_layers) for h in range(n_heads)]
    return heatmap_figure(flat, labels, titles=titles, annotate=False if annotate is None else annotate,
                          suptitle=f"Attention weights of every layer (rows) and head (columns)\n{where}",
                          ncols=n_heads)
