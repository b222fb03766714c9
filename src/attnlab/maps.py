"""Attention maps read off a recorded walkthrough (nothing is recomputed, nothing is loaded).

Shared by the two pictures of the same numbers, :mod:`attnlab.heatmap` (a figure) and
:mod:`attnlab.report` (the HTML page), neither of which depends on the other: which steps are attention
maps (their last two axes are query × key), which cells a causal mask hides, which recorded step a map's
numbers were made from (for hover text), and which step holds a section's attention weights.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from attnlab.errors import AttnlabInputError
from attnlab.explain.kinds import kind_of

if TYPE_CHECKING:
    from attnlab.explain.steps import Step, Walkthrough

__all__ = [
    "CMAP",
    "MASKED_COLOR",
    "check_output_path",
    "chain_operand",
    "head_axis",
    "is_map",
    "is_query_row",
    "MASK_REASONS",
    "masked_cells",
    "masked_reasons",
    "weights_step",
    "write_atomically",
]

CMAP = "viridis"  # the colour map of both pictures: low weights dark, high weights yellow
MASKED_COLOR = "#d9d9d9"  # masked (future) cells, the same grey in the figure and the page

# Why a cell is masked, in the words of both pictures' legends and tooltips (see :func:`masked_reasons`).
MASK_REASONS = {
    "future": "a future token the causal mask hides",
    "window": "an earlier token outside the window",
    "cache": "a token not yet cached (its key is written at a later step)",
}

def is_map(step: Step) -> bool:
    """A query × key matrix (attention scores, weights or a mask), possibly per head."""
    return step.values.ndim >= 2 and tuple(step.axes[-2:]) == ("query", "key")


def is_query_row(step: Step) -> bool:
    """A 1-D step over keys that belongs to the walkthrough's query (its scores or weights)."""
    return step.values.ndim == 1 and step.axes[0] == "key"


def head_axis(step: Step) -> int | None:
    """The index of the step's ``head`` axis, or None."""
    return step.axes.index("head") if "head" in step.axes else None


def _ancestors(walk: Walkthrough, step: Step) -> list[Step]:
    """The step and every recorded step it was computed from, directly or not."""
    ids = set(walk.step_ids)
    seen: list[str] = []
    todo = [step.id]
    while todo:
        sid = todo.pop()
        if sid in seen or sid not in ids:
            continue
        seen.append(sid)
        todo.extend(walk.step(sid).depends)
        how = walk.step(sid).how
        if how is not None:
            todo.extend(how.operands)
    return [walk.step(sid) for sid in seen]


def masked_cells(walk: Walkthrough, step: Step) -> np.ndarray | None:
    """Boolean array of ``step.values``' shape, True where a mask hides the cell (a future token, an earlier
    token outside a window, a slot not yet cached: :func:`masked_reasons` tells them apart), for a map (or
    1-D query row); None for other steps. The window's map of hidden tokens (``out_of_window``) shows those
    tokens as its content: only its causal future is masked. Read from the recorded mask step (value 0 = masked) and
    from recorded ``-inf`` scores that the step was computed from."""
    if not (is_map(step) or is_query_row(step)):
        return None
    shape = step.values.shape
    if kind_of(step).hides == "content":
        # e.g. the window's hidden cells are this map's content (value 1), not masked: only the causal future is
        return _future(shape, walk.query)
    masked = np.zeros(shape, dtype=bool)
    for source in _ancestors(walk, step):
        if not (is_map(source) or is_query_row(source)):
            continue
        if kind_of(source).hides == "zeros":  # a mask: 0 = hidden
            hidden = source.values == 0
        else:
            hidden = ~np.isfinite(source.values)
            if not hidden.any():
                continue
        masked |= _fit(hidden, shape, walk.query)
    if not masked.any() and _looks_causal(step):
        masked |= np.triu(np.ones(shape[-2:], dtype=bool), k=1 + shape[-1] - shape[-2])  # (..., T_q, T_k)
    return masked


def _future(shape: tuple[int, ...], query: int) -> np.ndarray:
    """The cells of a causal mask's future: key j after query i (bottom-right aligned), or after the
    walkthrough's query for a 1-D row."""
    if len(shape) == 1:
        return np.arange(shape[0]) > query
    t_q, t_k = shape[-2:]
    return np.broadcast_to(np.triu(np.ones((t_q, t_k), dtype=bool), k=1 + t_k - t_q), shape).copy()


def masked_reasons(walk: Walkthrough, step: Step) -> list[tuple[str, np.ndarray]]:
    """Why the masked cells of a map are hidden: ``(reason, cells)`` pairs, a key of :data:`MASK_REASONS`
    and a boolean array of the step's shape; together they cover :func:`masked_cells`. Section ``cache``:
    slots not yet cached; section ``window``: the causal future and the earlier tokens outside the window;
    every other mask is causal (the future). Empty for a step without masked cells."""
    masked = masked_cells(walk, step)
    if masked is None or not masked.any():
        return []
    if step.section == "cache":
        return [("cache", masked)]
    if step.section == "window":
        future = _future(masked.shape, walk.query)
        pairs = [("future", masked & future), ("window", masked & ~future)]
        return [(reason, cells) for reason, cells in pairs if cells.any()]
    return [("future", masked)]


def _looks_causal(step: Step) -> bool:
    """A causal module's recorded weights (e.g. ``MultiHeadAttention``'s, recorded without a mask step):
    weights of a module whose every cell after the diagonal is exactly 0 in every head. Only read off the
    recorded numbers, to grey those cells out like the causal section's masked cells."""
    if not kind_of(step).may_be_causal or not is_map(step):
        return False
    t_q, t_k = step.values.shape[-2:]
    if t_k < 2:
        return False
    future = np.triu(np.ones((t_q, t_k), dtype=bool), k=1 + t_k - t_q)  # bottom-right aligned
    return bool(future.any()) and bool(np.all(step.values[..., future] == 0))


def _fit(hidden: np.ndarray, shape: tuple[int, ...], query: int) -> np.ndarray:
    """A mask of one step brought to another step's shape (shared heads, or the query's row)."""
    if hidden.shape == shape:
        return hidden
    if len(shape) == 1:  # a 1-D query row from a matrix: the query's row of the last two axes
        flat = np.asarray(hidden.reshape(-1, *hidden.shape[-2:]).any(axis=0) if hidden.ndim >= 2 else hidden)
        row = np.asarray(flat[query] if flat.ndim == 2 else flat)
        return row if row.shape == shape else np.zeros(shape, dtype=bool)
    tail = hidden.reshape(-1, *hidden.shape[-2:]).all(axis=0) if hidden.ndim >= 2 else None
    if tail is None or tail.shape != shape[-2:]:
        return np.zeros(shape, dtype=bool)
    return np.broadcast_to(tail, shape)


def chain_operand(walk: Walkthrough, step: Step) -> str | None:
    """The id of the step whose same cell this step's cell was made from (softmax, scaling, masking,
    dropout: the kinds marked ``cellwise`` in :data:`attnlab.explain.kinds.KINDS`), so hover text can say how
    a weight came from a score (weight <- softmax <- scaled score <- score = q_i · k_j); None otherwise."""
    how = step.how
    if how is None or not kind_of(step).cellwise or not how.operands:
        return None
    first = how.operands[0]
    if first not in walk:
        return None
    return first if walk.step(first).values.shape == step.values.shape else None


def weights_step(walk: Walkthrough, section: str) -> Step:
    """The step holding a section's attention weights: its last query × key map with symbol ``weight``
    (after masking, before dropout: the weights the chapter's classes use), else its last map. Section
    ``simple`` (one query) has no matrix: its weights are the query's row (a 1-D step over keys)."""
    def shown(s: Step) -> bool:
        return is_map(s) or is_query_row(s)

    maps = [s for s in walk.section_steps(section) if shown(s)]
    if not maps:
        present = [sec for sec in walk.sections if any(shown(s) for s in walk.section_steps(sec))]
        raise AttnlabInputError(f"the walkthrough has no attention weights for section {section!r}; "
                         f"sections with weights: {', '.join(present) or 'none'}")
    named = [s for s in maps if s.symbol == "weight" and not kind_of(s).drawn]  # before dropout
    return (named or maps)[-1]


def check_output_path(path: str | Path, *, force: bool = False, formats: dict[str, str] | None = None) -> Path:
    """The output path, checked before any work: a known extension (one of ``formats``, when given), and no
    existing file unless ``force``.

    Raises ValueError (unknown extension), IsADirectoryError, FileExistsError (a file is there and
    ``force`` is False), FileNotFoundError (no such folder) or PermissionError (the folder takes no new
    file, or the existing file is not writable), so that no work is done for a file that cannot be written."""
    path = Path(path)
    if not str(path).strip():
        raise AttnlabInputError("the output file name is empty; give a file name")
    if formats is not None and path.suffix.lower() not in formats:
        raise AttnlabInputError(f"cannot write {str(path)!r}: unknown extension {path.suffix or '(none)'!r}; "
                         f"use one of {', '.join(formats)}")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; give a file name"
                                + (f" ending in {', '.join(formats)}" if formats else ""))
    if path.exists() and not force:
        raise FileExistsError(f"{str(path)!r} already exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
    if not path.parent.is_dir():
        raise NotADirectoryError(f"cannot write {str(path)!r}: {str(path.parent)!r} is not a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"cannot write {str(path)!r}: the file is not writable; choose another name")
    try:  # the one sure test: create (and remove) a file beside it
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".attnlab-write-test-")
    except OSError as exc:
        raise PermissionError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} takes no new file "
                              f"({exc.strerror or exc}); choose another folder") from None
    os.close(fd)
    os.unlink(probe)
    return path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``: a failure half-way
    leaves no half-written file (and an existing one as it was)."""
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")  # created as any new file
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
