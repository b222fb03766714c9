"""What a step's table shows, shared by the text and markdown renderers: labelled rows and columns,
shortened with an ellipsis when the step is wide or long (pretrained models have hundreds of
features), always keeping the query's row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnlab.explain.formatting import fmt, is_integral
from attnlab.explain.steps import Step, Walkthrough

__all__ = ["ELLIPSIS", "Table", "header_line", "settings_line", "tables"]

ELLIPSIS = "…"


@dataclass
class Table:
    """One 2-D table: ``caption`` (e.g. "head 1", or ""), ``corner`` (the top-left header), column
    headers, and rows of (label, cells, is_query_row). An ellipsis row has label ``…``."""

    caption: str
    corner: str
    columns: list[str]
    rows: list[tuple[str, list[str], bool]]


def _pick(n: int, limit: int, keep: int | None = None) -> list[int | None]:
    """Indices to show out of ``n`` (None = an ellipsis): the first ones, ``keep``, and the last."""
    if n <= limit:
        return list(range(n))
    head = max(limit - 2, 1)
    wanted = sorted(set(range(head)) | {n - 1} | ({keep} if keep is not None else set()))
    out: list[int | None] = []
    prev = -1
    for i in wanted:
        if i != prev + 1:
            out.append(None)
        out.append(i)
        prev = i
    return out


def _corner(step: Step) -> str:
    axes = step.axes[-2:]
    if axes == ("query", "key"):
        return "query \\ key"
    if axes == ("in", "out"):
        return f"{step.symbol} (in \\ out)"
    return step.symbol


def tables(walk: Walkthrough, step: Step, precision: int, max_cols: int, max_rows: int,
           max_slices: int = 4) -> list[Table]:
    """The tables showing one step (one per head / batch entry for 3-D steps)."""
    vals = step.values
    integral = is_integral(vals[np.isfinite(vals)].ravel().tolist()) if vals.size else True
    cell = lambda v: fmt(v, precision, integral=integral)
    if vals.ndim == 0:
        return [Table("", step.symbol, [""], [(step.symbol, [cell(vals)], False)])]
    if vals.ndim == 1:
        label = walk.query_label if step.axes[0] == "key" else f"{step.symbol}_{walk.query_label}" \
            if step.axes[0] == "dim" else step.symbol
        corner = "query \\ key" if step.axes[0] == "key" else step.symbol
        cols = _pick(len(vals), max_cols)
        return [Table("", corner, [step.labels[0][j] if j is not None else ELLIPSIS for j in cols],
                      [(label, [cell(vals[j]) if j is not None else ELLIPSIS for j in cols], True)])]
    out = []
    lead_shape = vals.shape[:-2]
    for n, lead in enumerate(np.ndindex(*lead_shape) if lead_shape else [()]):
        if n >= max_slices:
            break
        mat = vals[lead]
        caption = ", ".join(f"{step.axes[a]} {step.labels[a][i]}" for a, i in enumerate(lead))
        q_axis = step.query_axis
        keep = walk.query if q_axis is not None and q_axis == vals.ndim - 2 else None
        rows = _pick(mat.shape[0], max_rows, keep)
        cols = _pick(mat.shape[1], max_cols)
        table = Table(caption, _corner(step), [step.labels[-1][j] if j is not None else ELLIPSIS for j in cols], [])
        for i in rows:
            if i is None:
                table.rows.append((ELLIPSIS, [ELLIPSIS] * len(cols), False))
                continue
            table.rows.append((step.labels[-2][i], [cell(mat[i, j]) if j is not None else ELLIPSIS for j in cols],
                               keep is not None and i == keep))
        out.append(table)
    return out


def header_line(walk: Walkthrough) -> str:
    text = " ".join(walk.tokens)
    if len(text) > 70:
        text = text[:67] + "..."
    return (f'"{text}" · {len(walk.tokens)} tokens, d_in = {walk.settings.d_in} · query: {walk.query_label} '
            f"(position {walk.query + 1})")


def settings_line(walk: Walkthrough) -> str:
    st = walk.settings
    emb = {"book": "the chapter's embeddings", "given": "your embeddings",
           "random": f"random embeddings (seed {st.seed})"}.get(st.embeddings, st.embeddings)
    wts = "your weights" if st.weights == "given" else f"seeded weights (seed {st.seed}; SelfAttention_v2 {st.v2_seed})"
    scale = "scores ÷ √d_k" if st.scale else "no scaling (--no-scale)"
    heads = f"heads = {st.heads}"
    if st.mha_heads is not None and st.mha_heads != st.heads:
        heads += f" (MultiHeadAttention {st.mha_heads}, see section 5)"
    line = f"{emb} · {wts} · d_out = {st.d_out}, {heads}, dropout = {st.dropout:g} · {scale}"
    modern = getattr(st, "modern", None)
    if modern:  # the opt-in sections' own configurations
        line += " · " + "; ".join(f"{sec}: " + ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                                                        for k, v in opts.items()) for sec, opts in modern.items())
    return line
