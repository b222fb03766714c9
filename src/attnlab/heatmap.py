"""Attention weights as a picture: heatmaps with token labels, a colour bar and the values in the cells.

Headless-safe: figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never
through ``pyplot``, so no display, no GUI backend and no global state are involved. The picture only shows
numbers it is given (the recorded steps of a walkthrough, or a pretrained model's
:class:`~attnlab.pretrained.AttentionMaps`); it computes no attention and loads no model itself.

Shape letters: H heads (panels), T_q query tokens (rows), T_k key tokens (columns), L layers.

Colours: viridis from 0 to the largest weight shown (shared by every panel of one figure, so heads compare);
masked cells (a causal mask's future) are light grey, hatched while there are few of them, with no number.

Sizes: a figure is at most ``MAX_PIXELS`` on its longest side (72 maps of 256 tokens included): cells
shrink to a pixel, the values leave the cells when they no longer fit, tick labels are thinned to every
n-th token, and the cells are raster images in SVG and PDF too; a grid of many panels is drawn as one
picture on one axes (72 axes would take most of a minute to lay out and draw).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from attnlab.errors import AttnlabInputError
from attnlab.explain.kinds import StepKind, kind_of
from attnlab.maps import (
    CMAP,
    MASK_REASONS,
    MASKED_COLOR,
    head_axis,
    is_map,
    is_query_row,
    masked_cells,
    masked_reasons,
    weights_step,
    write_atomically,
)
from attnlab.maps import check_output_path as _check_output_path

if TYPE_CHECKING:
    from attnlab.explain.steps import Walkthrough
    from attnlab.pretrained import AttentionMaps

__all__ = [
    "CMAP",
    "FORMATS",
    "MASKED_COLOR",
    "MAX_PIXELS",
    "check_output_path",
    "heatmap_figure",
    "maps_figure",
    "save_figure",
    "walkthrough_figure",
]

# File extension -> matplotlib format. Anything else is refused with a one-line error.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
MAX_PIXELS = 4000  # the longest side of any figure, in pixels (at its dpi)

_DPI = 110
_MAX_FIG_INCHES = 13.0  # the widest figure we make (fits a README and a laptop screen)
_MAX_CELL_INCHES = 0.78  # cell size for short inputs
_MIN_CELL_INCHES = 0.16  # below this labels overlap: the figure grows (up to MAX_PIXELS) and labels thin
_MAX_MAP_INCHES = 24.0  # cells of long inputs shrink below _MIN_CELL_INCHES to keep the maps this wide
_MAX_TICKS = 96  # tick labels per axis at most (each one is a matplotlib artist: hundreds are slow)
_MAX_HATCHED = 2500  # more masked cells than this: plain grey (one patch per cell would be slow)
_HATCHES = ("///", "\\\\\\", "xxx")  # one per reason a cell is masked (the legend tells them apart)
_DEFAULT_MASKED = "masked (a future token): weight 0"


def _as_stack(weights: object) -> np.ndarray:
    arr = np.asarray(weights, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]  # (T_q, T_k) -> (1, T_q, T_k)
    if arr.ndim != 3 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise AttnlabInputError(
            f"weights must be a (T_q, T_k) matrix or a (heads, T_q, T_k) stack, got shape {arr.shape}"
        )
    return arr  # (H, T_q, T_k)


def _check_labels(name: str, labels: Sequence[str] | None, size: int) -> list[str]:
    if labels is None:
        return [str(i + 1) for i in range(size)]
    labels = [str(label) for label in labels]
    if len(labels) != size:
        raise AttnlabInputError(f"{name} must have one label per {'row' if name == 'row_labels' else 'column'}: "
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
    masked_label: str | None = None,
    masked_groups: Sequence[tuple[str, object]] | None = None,
    vmin: float = 0.0,
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
    masked_label  the legend's words for masked cells (default "masked (a future token): weight 0")
    masked_groups  instead, masked cells by reason: ``(legend words, boolean cells)`` pairs (e.g. the causal
                future and the earlier tokens outside a window), each with its own hatch and legend entry
    vmin        bottom of the colour scale (default 0)

    At most ``MAX_PIXELS`` on the longest side; long inputs get thinned tick labels and no values in
    the cells (unless ``annotate=True``).

    Returns a :class:`matplotlib.figure.Figure` attached to an Agg canvas (save it with
    :func:`save_figure` or ``fig.savefig``).
    """
    stack = _as_stack(weights)  # (H, T_q, T_k)
    n_heads, t_q, t_k = stack.shape
    rows = _check_labels("row_labels", row_labels, t_q)
    cols = _check_labels("col_labels", col_labels if col_labels is not None else
                         (row_labels if t_q == t_k else None), t_k)
    if titles is not None and len(titles) != n_heads:
        raise AttnlabInputError(f"titles must have one title per panel: got {len(titles)} for {n_heads} panels")
    mask = np.zeros(stack.shape, dtype=bool)
    if masked is not None:
        try:
            mask = np.broadcast_to(np.asarray(masked, dtype=bool), stack.shape).copy()  # (H, T_q, T_k)
        except ValueError:
            raise AttnlabInputError(f"masked of shape {np.asarray(masked).shape} does not fit weights of shape "
                             f"{stack.shape}") from None
    groups: list[tuple[str, np.ndarray]] = []
    for label, cells in masked_groups or ():
        try:
            group = np.broadcast_to(np.asarray(cells, dtype=bool), stack.shape)  # (H, T_q, T_k)
        except ValueError:
            raise AttnlabInputError(f"masked_groups {label!r}: cells of shape {np.asarray(cells).shape} do not fit "
                             f"weights of shape {stack.shape}") from None
        groups.append((label, group))
        mask |= group
    mask |= ~np.isfinite(stack)
    grouped = np.zeros(stack.shape, dtype=bool)
    for _, group in groups:
        grouped |= group
    if mask.any() and (not groups or (mask & ~grouped).any()):  # cells of no group: the default words
        groups.insert(0, (masked_label or _DEFAULT_MASKED, mask & ~grouped))
    hatch_of = np.zeros(stack.shape, dtype=np.int8)  # (H, T_q, T_k): index into _HATCHES of each masked cell
    for g, (_, group) in reversed(list(enumerate(groups))):
        hatch_of[group] = g % len(_HATCHES)

    shown = stack[~mask]
    top = float(vmax) if vmax is not None else (float(shown.max()) if shown.size else 1.0)
    norm = Normalize(vmin=vmin, vmax=max(top, vmin + 1e-6))
    cmap = ListedColormap(_viridis_colors(), name=CMAP)
    grey = to_rgba(MASKED_COLOR)

    # Size: cells as large as fit in the widest figure, panels in a grid of at most 4 columns.
    n_cols = max(1, min(n_heads, ncols if ncols is not None else (4 if t_k <= 12 else 2)))
    n_rows = math.ceil(n_heads / n_cols)
    compact = n_heads > 8  # many panels: tick labels on the outer panels only
    longest = max(len(label) for label in rows + cols)
    label_in = 0.09 * min(longest, 18) + 0.35  # space taken by tick labels on one side
    if compact:
        cell_in = (_MAX_FIG_INCHES + 3.0 - 1.4 - label_in - n_cols * 0.1) / (n_cols * t_k)
        cell_in = max(1.0 / _DPI, min(_MAX_CELL_INCHES, cell_in))
        tick_size = max(5.0, min(8.0, cell_in * 72 * 0.8))
        panel_w, panel_h = t_k * cell_in + 0.1, t_q * cell_in + (0.25 if titles is not None else 0.05)
        fig_w = n_cols * panel_w + label_in + 1.6
        fig_h = n_rows * panel_h + label_in + (0.6 if suptitle else 0.1) + 0.4
    else:
        cell_in = (_MAX_FIG_INCHES - 1.4 - n_cols * (label_in + 0.25)) / (n_cols * t_k)
        smallest = min(_MIN_CELL_INCHES, _MAX_MAP_INCHES / (n_cols * max(t_q, t_k)))  # long inputs: smaller
        cell_in = max(smallest, min(_MAX_CELL_INCHES, cell_in))
        tick_size = max(5.0, min(11.0, cell_in * 72 * 0.55))
        panel_w = t_k * cell_in + label_in + 0.3
        panel_h = t_q * cell_in + label_in + 0.45 + (0.35 if titles is not None else 0.0)
        fig_w = n_cols * panel_w + 1.3
        fig_h = n_rows * panel_h + (0.5 if suptitle else 0.1) + 0.3
    dpi = min(_DPI, MAX_PIXELS / max(fig_w, fig_h))  # never more than MAX_PIXELS on the longest side
    digits, fontsize = _annotation_plan(cell_in, annotate, decimals)
    if digits is not None and annotate is None and n_heads * t_q * t_k > 20_000:
        digits = None  # tens of thousands of numbers: unreadable and slow, leave them out unless asked
    # Tick labels: every token while they fit, else every n-th (about one label per 1.15 font heights).
    most = _MAX_TICKS if not compact else max(4, _MAX_TICKS // max(n_cols, n_rows))  # labels per axis
    every = max(1, math.ceil(tick_size * 1.15 / (cell_in * 72)), math.ceil(max(t_q, t_k) / most))
    row_ticks, col_ticks = list(range(0, t_q, every)), list(range(0, t_k, every))
    cell_px = cell_in * dpi
    hatched = int(mask.sum()) <= _MAX_HATCHED

    if compact:  # many panels: one image of the whole grid on one axes (72 axes would be slow to draw)
        return _grid_figure(stack, mask, rows, cols, titles=titles, suptitle=suptitle, cmap=cmap, norm=norm,
                            grey=grey, cell_in=cell_in, label_in=label_in, fig_w=fig_w + 0.6, fig_h=fig_h,
                            dpi=dpi, n_cols=n_cols, n_rows=n_rows, row_ticks=row_ticks, col_ticks=col_ticks,
                            tick_size=tick_size, digits=digits, fontsize=fontsize, hatched=hatched,
                            colorbar_label=colorbar_label, row_axis=row_axis, col_axis=col_axis,
                            groups=groups, hatch_of=hatch_of)
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    FigureCanvasAgg(fig)
    image = None
    for h in range(n_rows * n_cols):
        ax = axes[h // n_cols][h % n_cols]
        if h >= n_heads:
            ax.set_visible(False)
            continue
        rgba = cmap(norm(np.where(mask[h], 0.0, stack[h])))  # (T_q, T_k, 4): coloured once, here
        rgba[mask[h]] = grey
        shown_image = ax.imshow(rgba, aspect="equal", interpolation="nearest")
        shown_image.set_rasterized(True)  # one raster image per panel in SVG / PDF as well
        image = shown_image
        if hatched:
            for i, j in zip(*np.nonzero(mask[h]), strict=True):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=MASKED_COLOR, edgecolor="#a6a6a6",
                                       hatch=_HATCHES[hatch_of[h, i, j]], linewidth=0.0))
        bottom = h // n_cols == n_rows - 1 or h + n_cols >= n_heads
        left = h % n_cols == 0
        ax.set_xticks(col_ticks, [cols[j] for j in col_ticks], rotation=45 if longest > 3 or every > 1 else 0,
                      ha="right" if longest > 3 or every > 1 else "center", rotation_mode="anchor",
                      fontsize=tick_size)
        ax.set_yticks(row_ticks, [rows[i] for i in row_ticks], fontsize=tick_size)
        if cell_px >= 6:  # white lines between cells while the cells are big enough to show them
            width = min(0.8, cell_in * 72 * 0.05)
            ax.vlines(np.arange(0.5, t_k - 1, 1), -0.5, t_q - 0.5, colors="white", linewidth=width)
            ax.hlines(np.arange(0.5, t_q - 1, 1), -0.5, t_k - 0.5, colors="white", linewidth=width)
            ax.set_xlim(-0.5, t_k - 0.5)
            ax.set_ylim(t_q - 0.5, -0.5)
        ax.tick_params(which="major", length=0, pad=3)
        for side in ax.spines.values():
            side.set_visible(False)
        if left:
            ax.set_ylabel(row_axis, fontsize=max(7.0, tick_size - 1))
        if bottom:
            ax.set_xlabel(col_axis, fontsize=max(7.0, tick_size - 1))
        if titles is not None:
            ax.set_title(titles[h], fontsize=max(8.0, tick_size + 1), pad=6)
        if digits is not None:
            for i in range(t_q):
                for j in range(t_k):
                    if mask[h, i, j]:
                        continue
                    value = float(stack[h, i, j])
                    ax.text(j, i, _cell_text(value, digits), ha="center", va="center", fontsize=fontsize,
                            color=_text_color(cmap(norm(value))))
    if image is not None:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(),
                           shrink=min(1.0, 0.4 + 0.1 * t_q), pad=0.02, aspect=25)
        bar.set_label(colorbar_label, fontsize=9)
        bar.ax.tick_params(labelsize=8)
        bar.outline.set_visible(False)
    if mask.any():
        fig.legend(handles=_legend_handles(groups, hatched), loc="outside lower center", fontsize=8, frameon=False,
                   ncols=1)
    if suptitle:
        fig.suptitle(suptitle, fontsize=12)
    return fig


def _grid_figure(stack: np.ndarray, mask: np.ndarray, rows: list[str], cols: list[str], *,
                 titles: Sequence[str] | None, suptitle: str | None, cmap: ListedColormap, norm: Normalize,
                 grey: tuple[float, float, float, float], cell_in: float, label_in: float, fig_w: float, fig_h: float, dpi: float,
                 n_cols: int, n_rows: int, row_ticks: list[int], col_ticks: list[int], tick_size: float,
                 digits: int | None, fontsize: float, hatched: bool, colorbar_label: str, row_axis: str,
                 col_axis: str, groups: list[tuple[str, np.ndarray]], hatch_of: np.ndarray) -> Figure:
    """Many panels (e.g. 6 layers x 12 heads) as one picture: the panels are laid side by side in one
    RGBA image with gaps, on one axes; tokens are written beside the outer panels, titles above each."""
    n_heads, t_q, t_k = stack.shape
    gap_x = max(2, round(0.1 / cell_in))  # gaps between panels, in cells
    gap_y = max(2, round((0.3 if titles is not None else 0.1) / cell_in))
    step_x, step_y = t_k + gap_x, t_q + gap_y
    width, height = n_cols * step_x - gap_x, gap_y + n_rows * step_y - gap_y  # room for the first titles
    picture = np.full((height, width, 4), 255, dtype=np.uint8)  # (H_img, W_img, RGBA): white between panels
    grey_bytes = np.round(np.asarray(grey) * 255).astype(np.uint8)
    origins = []
    for h in range(n_heads):
        y0, x0 = gap_y + (h // n_cols) * step_y, (h % n_cols) * step_x
        rgba = cmap(norm(np.where(mask[h], 0.0, stack[h])), bytes=True)  # (T_q, T_k, 4) uint8
        rgba[mask[h]] = grey_bytes
        picture[y0:y0 + t_q, x0:x0 + t_k] = rgba
        origins.append((y0, x0))
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    left_in, right_in, bottom_in = label_in + 0.4, 1.3, label_in + 0.45
    top_in = 0.75 if suptitle else 0.15
    box = (left_in / fig_w, bottom_in / fig_h, 1 - (left_in + right_in) / fig_w, 1 - (top_in + bottom_in) / fig_h)
    ax = fig.add_axes(box)
    shown = ax.imshow(picture, interpolation="nearest", aspect="equal", extent=(-0.5, width - 0.5, height - 0.5, -0.5))
    shown.set_rasterized(True)  # one raster image in SVG / PDF as well
    for side in ax.spines.values():
        side.set_visible(False)
    ys = [origins[h][0] + i for h in range(0, n_heads, n_cols) for i in row_ticks]  # first column's rows
    last_row = [h for h in range(n_heads) if h + n_cols >= n_heads]
    xs = [origins[h][1] + j for h in last_row for j in col_ticks]
    ax.set_yticks(ys, [rows[i] for _ in range(0, n_heads, n_cols) for i in row_ticks], fontsize=tick_size)
    ax.set_xticks(xs, [cols[j] for _ in last_row for j in col_ticks], rotation=45, ha="right",
                  rotation_mode="anchor", fontsize=tick_size)
    ax.tick_params(length=0, pad=2)
    # the last row's keys sit under the picture: a panel above an empty slot gets none, which is fine
    if titles is not None:
        for h, (y0, x0) in enumerate(origins):
            ax.text(x0 + t_k / 2 - 0.5, y0 - 1.5, titles[h], ha="center", va="bottom",
                    fontsize=max(6.0, tick_size + 1), gid="panel-title")
    if hatched:
        for h, (y0, x0) in enumerate(origins):
            for i, j in zip(*np.nonzero(mask[h]), strict=True):
                ax.add_patch(Rectangle((x0 + j - 0.5, y0 + i - 0.5), 1, 1, facecolor=MASKED_COLOR,
                                       edgecolor="#a6a6a6", hatch=_HATCHES[hatch_of[h, i, j]], linewidth=0.0))
    if digits is not None:
        for h, (y0, x0) in enumerate(origins):
            for i in range(t_q):
                for j in range(t_k):
                    if not mask[h, i, j]:
                        value = float(stack[h, i, j])
                        ax.text(x0 + j, y0 + i, _cell_text(value, digits), ha="center", va="center",
                                fontsize=fontsize, color=_text_color(cmap(norm(value))))
    cax = fig.add_axes((1 - (right_in - 0.3) / fig_w, box[1], 0.18 / fig_w, box[3]))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label(colorbar_label, fontsize=9)
    bar.ax.tick_params(labelsize=8)
    bar.outline.set_visible(False)
    fig.supylabel(row_axis, fontsize=9)
    fig.supxlabel(col_axis, fontsize=9)
    if mask.any():
        fig.legend(handles=_legend_handles(groups, hatched), loc="lower center", fontsize=8, frameon=False)
    if suptitle:
        fig.suptitle(suptitle, fontsize=12)
    return fig


def _legend_handles(groups: list[tuple[str, np.ndarray]], hatched: bool) -> list[Patch]:
    """One legend entry per reason a cell is masked, with the hatch its cells are drawn with."""
    return [Patch(facecolor=MASKED_COLOR, edgecolor="#a6a6a6", hatch=_HATCHES[g % len(_HATCHES)] if hatched else None,
                  label=label) for g, (label, cells) in enumerate(groups) if cells.any()]


def _viridis_colors() -> np.ndarray:
    from matplotlib import colormaps

    return colormaps[CMAP](np.linspace(0.0, 1.0, 256))


def check_output_path(
    path: str | Path, *, force: bool = False, formats: dict[str, str] | None = None
) -> Path:
    """The output path, checked before any work: a known extension (``FORMATS`` unless ``formats``), and
    no existing file unless ``force`` (see :func:`attnlab.maps.check_output_path`)."""
    return _check_output_path(path, force=force, formats=FORMATS if formats is None else formats)


def save_figure(fig: Figure, path: str | Path, *, force: bool = False) -> Path:
    """Write ``fig`` as PNG, SVG or PDF, chosen by the extension of ``path``; refuses to overwrite an
    existing file unless ``force``. Returns the path written."""
    path = check_output_path(path, force=force)
    png = path.suffix.lower() == ".png"
    width, height = fig.get_size_inches() * fig.dpi
    quick = png and width * height > 4e6  # big pictures: a faster zlib level (a few % larger, 3x faster)
    extra: dict[str, Any] = {"pil_kwargs": {"compress_level": 2}} if quick else {}
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=FORMATS[path.suffix.lower()], dpi=fig.dpi,
                                                   facecolor="white", metadata={"Software": None} if png else None,
                                                   **extra))
    return path


def _section_of(walkthrough: Walkthrough, section: str) -> str:
    """A section name as every command spells it (``all``, ``trainable``, ...; old ones such as
    ``simplified`` too, see :data:`attnlab.explain.SECTION_ALIASES`) -> the walkthrough section drawn."""
    from attnlab.explain.steps import ALL_SECTIONS, SECTIONS, resolve_sections

    chosen: tuple[str, ...]
    if section in walkthrough.sections or section in SECTIONS:
        chosen = (section,)
    else:
        chosen, _ = resolve_sections(section)  # ValueError naming the valid sections
    # an old name standing for several sections (simplified = simple + all): its matrix, the last one
    sec = chosen[-1]
    if sec not in walkthrough.sections:
        recorded = [s for s in walkthrough.sections if s in ALL_SECTIONS]
        raise AttnlabInputError(f"section {section!r} is not recorded in this walkthrough; recorded: "
                         f"{', '.join(recorded) or 'none'}")
    return sec


def _masked_words(kind: StepKind, reason: str = "future") -> str:
    """The legend's words for masked cells: why they are hidden (:data:`attnlab.maps.MASK_REASONS`) and what
    a step of this kind holds there (:data:`attnlab.explain.kinds.KINDS`)."""
    return f"masked ({MASK_REASONS[reason]}): {kind.masked_words(reason)}"


# What the colour of a map's step means, by its symbol (default: the symbol itself).
_COLORBAR_LABELS = {
    "weight": "attention weight",
    "hidden": "1 = an earlier token outside the window (hidden), 0 = inside it",
    "mask": "mask: 1 = may attend",
    "cached": "1 = slot filled (cached)",
}


def walkthrough_figure(
    walkthrough: Walkthrough,
    section: str = "all",
    *,
    head: int | None = None,
    step: str | None = None,
    annotate: bool | None = None,
) -> Figure:
    """The heatmap of one recorded attention matrix of a walkthrough (``attnlab.explain.explain(...)``).

    section  ``all`` (all tokens' weights, 3.3.2; the default), ``simple`` (the query's row, 3.3.1),
             ``trainable``, ``causal`` or ``multihead``: that section's attention weights. Old names
             (``simplified`` = 3.3 as a whole: its matrix, ``all``) are accepted too.
    head     multi-head only: the 1-based head to draw (default: every head side by side)
    step     any recorded query × key step id instead (e.g. ``causal.scores_masked``)

    Masked cells (from the recorded causal mask) are grey; nothing is recomputed.
    """
    if step is not None:
        if step not in walkthrough:
            reason = walkthrough.absent_reason(step) if hasattr(walkthrough, "absent_reason") else None
            if reason:  # a step recorded under other options only: say which (e.g. without --no-scale)
                raise AttnlabInputError(reason)
            maps = [s.id for s in walkthrough.steps if is_map(s)]
            raise AttnlabInputError(f"no step {step!r} in the walkthrough; steps with a query x key matrix: "
                             f"{', '.join(maps)}")
        chosen = walkthrough.step(step)
        if not (is_map(chosen) or is_query_row(chosen)):
            raise AttnlabInputError(f"step {step!r} is not a query x key matrix (its axes are {chosen.axes}); "
                             "pick a scores, weights or mask step")
    else:
        chosen = weights_step(walkthrough, _section_of(walkthrough, section))
    values = np.asarray(chosen.values, dtype=np.float64)
    masked = masked_cells(walkthrough, chosen)
    kind = kind_of(chosen)
    groups = [(_masked_words(kind, reason), cells) for reason, cells in masked_reasons(walkthrough, chosen)]
    row_labels = list(chosen.labels[-2]) if values.ndim >= 2 else [walkthrough.query_label]
    if values.ndim == 1:  # the query's own row (section simple): one row of keys
        values = values[None]  # (1, T_k)
        masked = None if masked is None else masked[None]  # (1, T_k)
        groups = [(label, cells[None]) for label, cells in groups]  # (1, T_k) each
    h_axis = head_axis(chosen)
    lead_axes = values.ndim - 2
    if lead_axes > 1 or (lead_axes == 1 and h_axis is None):
        raise AttnlabInputError(f"step {chosen.id} has axes {chosen.axes}: only (query, key) or (head, query, key) "
                         "matrices can be drawn")
    head_labels = list(chosen.labels[0]) if h_axis is not None else []
    if head is not None:
        if h_axis is None:
            raise AttnlabInputError(f"--head applies to multi-head attention only; {chosen.id} has no heads "
                             "(use --section multihead)")
        if not 1 <= head <= len(head_labels):
            raise AttnlabInputError(f"--head must be from 1 to {len(head_labels)}, got {head}")
        values, masked = values[head - 1], (None if masked is None else masked[head - 1])  # (T_q, T_k)
        groups = [(label, cells[head - 1]) for label, cells in groups]  # (T_q, T_k) each
        titles = None
        panel = f", head {head_labels[head - 1]}"
    else:
        titles = [f"head {label}" for label in head_labels] if h_axis is not None else None
        panel = ""
    section_title = walkthrough.section_titles.get(chosen.section, chosen.section)
    binary = kind.binary  # 0/1 maps: the scale runs from 0 to 1 whatever is shown
    return heatmap_figure(
        values,
        row_labels,
        chosen.labels[-1],
        titles=titles,
        suptitle=f"{chosen.title}{panel}\n{section_title}",
        masked=masked,
        annotate=annotate,
        colorbar_label=_COLORBAR_LABELS.get(chosen.symbol, chosen.symbol),
        masked_label=_masked_words(kind),
        masked_groups=groups,
        vmax=1.0 if binary else None,
        decimals=0 if binary else 4,
    )


def maps_figure(
    maps: AttentionMaps,
    *,
    layer: int | None = None,
    head: int | None = None,
    query: str | int | None = None,
    annotate: bool | None = None,
    model: str | None = None,
) -> Figure:
    """Heatmaps of a pretrained encoder's attention (``load_encoder().attention(text)``).

    layer, head   1-based. Neither: every layer x head in one grid (rows: layers); a layer: its heads;
                  a head: that head in every layer; both: one map with its values.
    query         a token (word piece, e.g. "cat"), a 1-based position as text ("3") or a 0-based int:
                  one picture of that token's row in every chosen layer and head (rows: layer and head,
                  columns: the tokens it attends to)
    """
    from attnlab.explain.inputs import unique_labels

    weights = np.asarray(maps.weights, dtype=np.float64)  # (L, H, T, T)
    n_layers, n_heads = weights.shape[:2]
    model = model or getattr(maps, "model", None) or "all-MiniLM-L6-v2"
    hidden = getattr(maps, "masked", None)  # (L, T, T) bool: cells the model's mask hid (a decoder's future)
    hid = None if hidden is None else np.broadcast_to(np.asarray(hidden, dtype=bool)[:, None],
                                                         weights.shape)  # (L, H, T, T)
    for name, value, size in (("--layer", layer, n_layers), ("--head", head, n_heads)):
        if value is not None and not 1 <= value <= size:
            raise AttnlabInputError(f"{name} must be from 1 to {size}, got {value}")
    labels = unique_labels(maps.tokens)
    shown_text = maps.text if len(maps.text) <= 80 else maps.text[:79].rstrip() + "…"
    where = f"“{shown_text}” in {model}" + (" (text cut at the model's token limit)" if maps.truncated else "")
    if query is not None:
        from attnlab.explain.model import resolve_model_query

        qi = resolve_model_query(query, tuple(maps.tokens), tuple(labels))
        layers = [layer - 1] if layer is not None else list(range(n_layers))
        heads = [head - 1] if head is not None else list(range(n_heads))
        rows = weights[np.ix_(layers, heads)][:, :, qi, :].reshape(len(layers) * len(heads), -1)  # (L'H', T)
        names = [f"L{i + 1} H{h + 1}" for i in layers for h in heads]
        return heatmap_figure(rows, names, labels, annotate=annotate, row_axis="layer, head",
                              masked=None if hid is None else hid[np.ix_(layers, heads)][:, :, qi, :].reshape(
                                  rows.shape),  # (L'H', T)
                              col_axis=f"key (what {labels[qi]} attends to)",
                              suptitle=f"What {labels[qi]} attends to, in every layer and head shown\n{where}")
    if layer is not None and head is not None:
        return heatmap_figure(weights[layer - 1, head - 1], labels, annotate=annotate,
                              masked=None if hid is None else hid[layer - 1, head - 1],
                              suptitle=f"Attention weights of layer {layer}, head {head}\n{where}")
    if layer is not None:
        return heatmap_figure(weights[layer - 1], labels, titles=[f"head {h + 1}" for h in range(n_heads)],
                              masked=None if hid is None else hid[layer - 1],
                              annotate=annotate, suptitle=f"Attention weights of layer {layer}\n{where}",
                              ncols=min(n_heads, 6))
    if head is not None:
        return heatmap_figure(weights[:, head - 1], labels, titles=[f"layer {i + 1}" for i in range(n_layers)],
                              masked=None if hid is None else hid[:, head - 1],
                              annotate=annotate, suptitle=f"Attention weights of head {head}\n{where}",
                              ncols=min(n_layers, 6))
    flat = weights.reshape(n_layers * n_heads, *weights.shape[2:])  # (L * H, T, T)
    titles = [f"L{i + 1} H{h + 1}" for i in range(n_layers) for h in range(n_heads)]
    return heatmap_figure(flat, labels, titles=titles, annotate=False if annotate is None else annotate,
                          masked=None if hid is None else hid.reshape(flat.shape),  # (L * H, T, T)
                          suptitle=f"Attention weights of every layer (rows) and head (columns)\n{where}",
                          ncols=n_heads)
