"""The walkthrough as data: one :class:`Step` per intermediate, collected in a :class:`Walkthrough`.

Renderers (terminal, markdown, json, the HTML report) only read these objects; none of them recomputes
the attention math. A step records its values with a name and labels for every axis, the formula that
made them, and (:class:`How`) which recorded steps it was computed from, so that
:meth:`Walkthrough.explain_cell` can write out how any single number is made from recorded numbers.

Axis names used by :attr:`Step.axes`:
    query   a token acting as the query (a row of scores / weights)
    key     a token acting as a key (a column of scores / weights)
    token   a token's row of a per-token matrix (embeddings, queries, keys, values, context vectors)
    dim     one feature of a vector (labelled 1, 2, ...)
    in/out  rows / columns of a weight matrix, in the chapter's ``x @ W`` convention
    head    one attention head            batch   one sequence of a batch
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnlab.errors import AttnlabInputError
from attnlab.explain.formatting import fmt, fmt_vector
from attnlab.notebook import to_html

__all__ = [
    "ALL_SECTIONS",
    "FORMAT_VERSION",
    "MODERN_SECTIONS",
    "OPTIONAL_STEPS",
    "SECTIONS",
    "SECTION_ALIASES",
    "SECTION_TITLES",
    "How",
    "Settings",
    "Step",
    "Walkthrough",
    "fmt",
    "fmt_vector",
    "resolve_sections",
]

FORMAT_VERSION = 1

# Selectable sections, in the chapter's order; "input" (the embeddings) is always recorded. These are the
# canonical names for every command (explain, heatmap, report); older names are in SECTION_ALIASES.
SECTIONS = ("simple", "all", "trainable", "causal", "multihead")
# Opt-in sections beyond chapter 3 (modern LLMs' attention, :mod:`attnlab.explain.modern`): recorded only when
# named (``--section cache gqa window rope``), never in the default run, so its numbers stay the chapter's.
MODERN_SECTIONS = ("cache", "gqa", "window", "rope")
ALL_SECTIONS = SECTIONS + MODERN_SECTIONS
# Old or other names -> the sections they stand for (accepted with a notice, see resolve_sections).
# "simplified" is 3.3 as a whole: the one-query walk (3.3.1) and all tokens at once (3.3.2).
SECTION_ALIASES: dict[str, tuple[str, ...]] = {
    "simplified": ("simple", "all"),
    "self-attention": ("trainable",),
    "self_attention": ("trainable",),
    "multi-head": ("multihead",),
    "multi_head": ("multihead",),
    "mha": ("multihead",),
}
# Step ids recorded only under some options -> the option that makes them appear.
OPTIONAL_STEPS: dict[str, str] = {
    "trainable.scaled_scores": "without --no-scale (with --no-scale the scores are not divided by √d_k)",
    "causal.scaled_scores": "without --no-scale (with --no-scale the scores are not divided by √d_k)",
    "model.layer_weights": "in the HTML report of a model (attnlab report --model ...), which records every layer",
}


def resolve_sections(names: str | Iterable[str]) -> tuple[tuple[str, ...], list[str]]:
    """Section names (canonical or old, see ``SECTION_ALIASES``; comma-separated text allowed) ->
    (the canonical sections in the chapter's order, one notice per old name used).
    ValueError naming the valid sections for an unknown name or an empty list."""
    items = [names] if isinstance(names, str) else list(names)
    parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not parts:
        raise AttnlabInputError(f"sections is empty; valid sections: {', '.join(ALL_SECTIONS)}")
    chosen: list[str] = []
    notices: list[str] = []
    for name in parts:
        key = name.lower()
        if key in ALL_SECTIONS:
            chosen.append(key)
        elif key in SECTION_ALIASES:
            new = SECTION_ALIASES[key]
            chosen += new
            notices.append(f"section {name!r} is now called {' and '.join(repr(n) for n in new)}")
        else:
            raise AttnlabInputError(f"unknown section {name!r}; valid sections: {', '.join(ALL_SECTIONS)}")
    return tuple(s for s in ALL_SECTIONS if s in chosen), notices
SECTION_TITLES = {
    "input": "Input: tokens and embeddings",
    "simple": "1. Simplified self-attention for one query (3.3.1)",
    "all": "2. Attention weights for all tokens (3.3.2)",
    "trainable": "3. Self-attention with trainable weights (3.4)",
    "causal": "4. Causal attention (3.5)",
    "multihead": "5. Multi-head attention (3.6)",
    "cache": "KV cache: decoding one token at a time",
    "gqa": "Grouped-query attention: key/value heads shared by query heads",
    "window": "Sliding-window attention: a band instead of the lower triangle",
    "rope": "Rotary position embeddings (RoPE): q and k rotated by position",
}


# --------------------------------------------------------------------------------------------------
# The data model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class How:
    """How every number of a step is made, as data.

    kind      the operation: ``input``, ``weights``, ``project`` (x @ W), ``dot`` (a_i · b_j),
              ``scale``, ``divide_by_sum``, ``softmax``, ``weighted_sum`` (Σ_j w_ij v_j), ``mask``,
              ``mask_zero`` (weights × mask), ``mask_after`` (zero then renormalise), ``mask_before``
              (-inf before softmax), ``dropout``, ``module`` (the output of one of the chapter's classes),
              ``concat``, ``linear`` (x @ W + b).
    operands  ids of the recorded steps it reads, in the order of the formula.
    params    the rest: ``row`` (the query row a 1-D step belongs to), ``factor`` and ``divisor``
              (scaling), ``p`` (dropout), ``module`` (class and arguments), ``source`` (where inputs and
              weights came from).
    """

    kind: str
    operands: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "operands": list(self.operands), "params": dict(self.params)}


@dataclass
class Step:
    """One recorded intermediate of the walkthrough.

    section, name   ``section.name`` is the step's id, e.g. ``trainable.scores``
    title, why      a short heading and a one-line reason for the step
    formula         how the numbers are made, in the chapter's notation
    values          the numbers (float32 numpy array), full matrices wherever the section computes them
    axes            one name per axis of ``values`` (see the module docstring)
    labels          one tuple of labels per axis (tokens for token axes, "1", "2", ... for features)
    symbol          the name of one number or row: ``score``, ``weight``, ``q``, ``k``, ``v``, ``z``...
    query_axis      the axis indexed by query tokens, whose entry ``Walkthrough.query`` is the query's
                    row; None when the whole step already belongs to the query (1-D steps) or to no token
    how             how each number is made (:class:`How`), for :meth:`Walkthrough.explain_cell`
    depends         ids of the steps it is computed from (errors propagate along these)
    detail          extra lines shown under the table (sums, a dot product written out, agreements)
    extra           other facts as plain data (e.g. ``row_sums``, ``sum``, ``batch_shape``)
    """

    section: str
    name: str
    title: str
    why: str
    formula: str
    values: np.ndarray
    axes: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    symbol: str
    query_axis: int | None = None
    how: How | None = None
    depends: tuple[str, ...] = ()
    detail: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        if len(self.axes) != self.values.ndim or len(self.labels) != self.values.ndim:
            raise AttnlabInputError(
                f"step {self.id}: axes {self.axes} and labels must have one entry per dimension of values "
                f"{self.values.shape}"
            )
        for axis, labels in enumerate(self.labels):
            if len(labels) != self.values.shape[axis]:
                raise AttnlabInputError(
                    f"step {self.id}: axis {axis} ({self.axes[axis]}) has {self.values.shape[axis]} entries "
                    f"but {len(labels)} labels"
                )

    @property
    def id(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def row_labels(self) -> tuple[str, ...] | None:
        return self.labels[-2] if self.values.ndim >= 2 else None

    @property
    def col_labels(self) -> tuple[str, ...]:
        return self.labels[-1] if self.values.ndim >= 1 else ()

    def query_values(self, query: int) -> np.ndarray:
        """The query's part of the values: its row (or its row in every head), or all of them when the
        step is not indexed by query tokens."""
        if self.query_axis is None:
            return self.values
        return np.take(self.values, query, axis=self.query_axis)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "section": self.section,
            "name": self.name,
            "title": self.title,
            "why": self.why,
            "formula": self.formula,
            "symbol": self.symbol,
            "shape": list(self.shape),
            "axes": list(self.axes),
            "labels": [list(lab) for lab in self.labels],
            "query_axis": self.query_axis,
            "values": _json_values(self.values),
            "depends": list(self.depends),
            "how": None if self.how is None else self.how.to_dict(),
            "detail": list(self.detail),
            "extra": _json_ready(self.extra),
        }


def _json_number(v: float) -> float | str:
    if math.isfinite(v):
        return float(str(np.float32(v)))  # the shortest decimal that reads back as the same float32
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def _json_values(values: np.ndarray) -> Any:
    if values.ndim == 0:
        return _json_number(float(values))
    return [_json_values(v) for v in values]


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _json_values(obj.astype(np.float32)) if obj.dtype.kind == "f" else obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _json_number(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


@dataclass(frozen=True)
class Settings:
    """What the walkthrough was run with.

    d_in, d_out     embedding width, and width of queries/keys/values (per head for the wrapper)
    heads           number of heads in the multi-head section
    dropout         dropout rate of the dropout step (the classes run with 0.0, as in the chapter)
    seed            seed of the trainable weights, dropout, the classes and random embeddings
    v2_seed         seed of SelfAttention_v2, whose weights the causal section reuses (789 by default)
    scale           whether scores are divided by √d_k in the trainable and causal steps
    embeddings      where the embeddings came from: "book", "given" or "random"
    weights         where W_query/W_key/W_value came from: "seeded" or "given"
    sections        the sections recorded, in order
    mha_heads       heads of MultiHeadAttention (None: ``heads``); differs from ``heads`` only when
                    ``heads`` does not divide d_out (the wrapper's seeded heads need not)
    heads_note      what was chosen for the heads and why, when not what was asked ("" otherwise)
    modern          the options of each opt-in section recorded (heads, d_out, kv_groups, window_size, ...;
                    see :class:`attnlab.explain.modern.ModernOptions`), empty without one
    """

    d_in: int
    d_out: int
    heads: int
    dropout: float
    seed: int
    v2_seed: int
    scale: bool
    embeddings: str
    weights: str
    sections: tuple[str, ...]
    mha_heads: int | None = None
    heads_note: str = ""
    modern: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # opt-in section -> its options

    def to_dict(self) -> dict[str, Any]:
        out = {
            "d_in": self.d_in, "d_out": self.d_out, "heads": self.heads, "dropout": self.dropout,
            "seed": self.seed, "v2_seed": self.v2_seed, "scale": self.scale,
            "embeddings": self.embeddings, "weights": self.weights, "sections": list(self.sections),
            "mha_heads": self.heads if self.mha_heads is None else self.mha_heads, "heads_note": self.heads_note,
        }
        if self.modern:  # only with an opt-in section: the chapter's JSON stays as it was
            out["modern"] = {sec: dict(opts) for sec, opts in self.modern.items()}
        return out


@dataclass
class Walkthrough:
    """Every step of the chapter computed on one input.

    tokens      the tokens as given          labels   unique display labels (repeated tokens get "(i)")
    query       0-based index of the query token
    settings    :class:`Settings`
    steps       the recorded steps, in the chapter's order
    section_titles   heading of each section id, in display order
    absent      steps left out on this input, with why (e.g. the naive softmax when exp overflows)
    """

    tokens: tuple[str, ...]
    labels: tuple[str, ...]
    query: int
    settings: Settings
    steps: list[Step]
    section_titles: dict[str, str] = field(default_factory=lambda: dict(SECTION_TITLES))
    absent: dict[str, str] = field(default_factory=dict)  # steps left out on this input -> why

    @property
    def query_label(self) -> str:
        return self.labels[self.query]

    @property
    def step_ids(self) -> list[str]:
        return [s.id for s in self.steps]

    @property
    def sections(self) -> list[str]:
        """Section ids present, in order."""
        seen: list[str] = []
        for s in self.steps:
            if s.section not in seen:
                seen.append(s.section)
        return seen

    def step(self, step_id: str) -> Step:
        """The step with id ``section.name``; KeyError saying why it is absent (an option or a section
        not selected, :meth:`absent_reason`) or naming the valid ids otherwise."""
        for s in self.steps:
            if s.id == step_id:
                return s
        reason = self.absent_reason(step_id)
        raise KeyError(reason or f"no step {step_id!r}; valid steps: {', '.join(self.step_ids)}")

    def absent_reason(self, step_id: str) -> str | None:
        """Why a known step id is not recorded here, naming the option that makes it appear; None for a
        step that is here or an id that exists under no option."""
        if step_id in self:
            return None
        if step_id in self.absent:
            return f"{step_id} is not recorded: {self.absent[step_id]}"
        section = step_id.partition(".")[0]
        if step_id in OPTIONAL_STEPS and (section in self.sections or section == "model"):
            return f"{step_id} is not recorded with these options: it appears {OPTIONAL_STEPS[step_id]}"
        if section in ALL_SECTIONS and section not in self.sections and "model" not in self.sections:
            return (f"{step_id}: section {section!r} is not selected by --section "
                    f"(selected: {', '.join(s for s in self.sections if s != 'input')}); add --section {section}")
        return None

    def __contains__(self, step_id: object) -> bool:
        return any(s.id == step_id for s in self.steps)

    def section_steps(self, section: str) -> list[Step]:
        return [s for s in self.steps if s.section == section]

    def dependents(self, step_id: str) -> list[str]:
        """Ids of the later steps computed, directly or not, from ``step_id`` (they inherit its errors)."""
        tainted = {step_id}
        out = []
        for s in self.steps:
            if s.id != step_id and tainted.intersection(s.depends):
                tainted.add(s.id)
                out.append(s.id)
        return out

    def explain_cell(self, step_id: str, index: Sequence[int], precision: int = 4) -> list[str]:
        """How one number is made, as lines of text built from recorded numbers only: the first line is
        ``name = formula = numbers = value``, the next ones say how its operands were made (e.g.
        ``k_sat = x_sat @ W_key = [1, 1, 0] @ W_key = [1, 1]``)."""
        from attnlab.explain.cells import explain_cell

        return explain_cell(self, step_id, tuple(int(i) for i in index), precision)

    def cell_name(self, step_id: str, index: Sequence[int]) -> str:
        """The name of one number, e.g. ``score(The, sat)`` or ``q_The[2]``."""
        from attnlab.explain.cells import cell_name

        return cell_name(self, self.step(step_id), tuple(int(i) for i in index))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "attnlab.explain",
            "version": FORMAT_VERSION,
            "tokens": list(self.tokens),
            "labels": list(self.labels),
            "query": {"index": self.query, "position": self.query + 1, "token": self.tokens[self.query],
                      "label": self.query_label},
            "settings": self.settings.to_dict(),
            "sections": [{"id": sec, "title": self.section_titles.get(sec, sec)} for sec in self.sections],
            "steps": [s.to_dict() for s in self.steps],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    def _repr_html_(self) -> str | None:
        """In a notebook: the interactive report (:func:`attnlab.report.render_html`, through
        :mod:`attnlab.notebook`: the report is a layer above this one)."""
        return to_html(self)
