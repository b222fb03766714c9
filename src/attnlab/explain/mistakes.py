"""The mistakes learners make in chapter 3, each as a change to one kind of operation.

A :class:`Hypothesis` is a way the learner may have worked: the right way (no change), or one named
mistake, which overrides the operation of the steps it concerns (the scaling, the softmax, the dot
product, a projection, the mask, dropout, the weighted sum, the heads' split or merge) and leaves every
other step as it is. :func:`attnlab.explain.recompute.evaluate` runs a hypothesis from the learner's own
numbers down to one step, so a mistake is only ever named for a step whose computation contains its
operation (``no_scaling`` never for ``trainable.scores``, ``softmax_wrong_axis`` never for the scaled
scores): a hypothesis that overrides nothing on the way gives the right numbers and is not a candidate.

Catalogue (id: what the learner did; the operation it changes):
    no_scaling                 the scores were not divided by √d_k                         (scale)
    scaled_by_d_k              divided by d_k instead of √d_k                              (scale)
    scaled_by_sqrt_d_in        divided by √d_in (the embeddings' width) instead of √d_k    (scale, heads)
    scaled_by_sqrt_d_model     divided by √d_model = √d_out instead of √d_k of one head     (heads)
    softmax_wrong_axis         softmax down the columns (dim=0) instead of along each row  (softmax)
    normalised_by_sum          divided the scores by their sum instead of the softmax      (softmax)
    raw_embeddings             the embeddings instead of the queries and keys (x_i · x_j)   (dot)
    keys_queries_swapped       k_i · q_j instead of q_i · k_j                              (dot)
    another_query              the query of another token (its row instead of the query's) (dot)
    keys_from_query_weights    keys made with W_query instead of W_key                     (projection)
    w_transposed               W·x instead of x·W (square W only)                          (projection)
    mask_with_zero             masked with 0 instead of -inf before the softmax            (mask)
    mask_after_no_renorm       masked after the softmax without renormalising              (mask)
    dropout_no_rescale         dropout without the 1/(1 − p) rescaling of the kept weights (dropout)
    scores_instead_of_weights  the scores instead of the weights in the weighted sum       (weighted sum)
    values_replaced_by_keys    the keys instead of the values in the weighted sum          (weighted sum)
    values_replaced_by_embeddings  the embeddings instead of the values                    (weighted sum)
    heads_split_wrong          q.view(H, T, d_head) instead of view(T, H, d_head).transpose  (heads)
    heads_concat_wrong         heads merged by view(T, d_out) without transposing back     (merge)
Two more are diagnosed by :mod:`.check` itself: ``one_wrong_number`` (a single slip, e.g. one dot
product) and ``follows_from_yours`` (right, given the learner's own wrong numbers of an earlier step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from attnlab.explain.recompute import (
    Interval,
    Override,
    by_sum,
    evaluate,
    matmul,
    mha_attention,
    scale,
    scores,
    softmax,
    times,
)
from attnlab.explain.steps import Step, Walkthrough

__all__ = ["CATALOGUE", "Hypothesis", "Mistake", "hypotheses", "mistake_configs", "right_config", "wrong_values"]


@dataclass(frozen=True)
class Mistake:
    """id (stable, in JSON), name (one line: what was done), fix (how to do it right); ``name`` and
    ``fix`` may use ``{d_k}``, ``{root}`` (√d_k), ``{rescale}`` (1/(1 − p)), ``{d_in}``, ``{token}`` and
    ``{earlier}``."""

    id: str
    name: str
    fix: str

    def text(self, walk: Walkthrough, **extra: str) -> tuple[str, str]:
        d = walk.settings.d_out
        p = walk.settings.dropout
        values = {"d_k": str(d), "root": f"{math.sqrt(d):.4f}", "rescale": f"{1.0 / (1.0 - p):g}",
                  "d_in": str(walk.settings.d_in), "token": "", "earlier": "", "head": "", **extra}
        return self.name.format(**values), self.fix.format(**values)


_ENTRIES = (
    Mistake("no_scaling", "the scores were not divided by √d_k",
            "divide every score by √d_k = √{d_k} = {root} (d_k = {d_k}, the keys' width) before the softmax"),
    Mistake("scaled_by_d_k", "the scores were divided by d_k = {d_k} instead of √d_k",
            "divide by the square root of d_k: √{d_k} = {root}"),
    Mistake("scaled_by_sqrt_d_in", "the scores were divided by √d_in = √{d_in} (the embeddings' width) "
            "instead of √d_k",
            "d_k is the width of the keys ({d_k}{head}), not of the embeddings: divide by √d_k"),
    Mistake("scaled_by_sqrt_d_model", "the scores were divided by √d_model = √{d_k} instead of √d_k of one head",
            "each head's keys have d_k = d_out / heads numbers: divide by the square root of that"),
    Mistake("softmax_wrong_axis", "the softmax was taken down the columns (over the queries, dim=0) "
            "instead of along each row",
            "take the softmax of each row (dim=-1): one query's weights over all the keys sum to 1"),
    Mistake("normalised_by_sum", "the scores were divided by their sum instead of taking the softmax",
            "weight_i = exp(score_i) / Σ_j exp(score_j): softmax, not score_i / Σ_j score_j"),
    Mistake("raw_embeddings", "the embeddings x were used instead of the queries and keys "
            "(x_i · x_j: the numbers of all.scores)",
            "project first: q_i = x_i @ W_query and k_j = x_j @ W_key, then score(i, j) = q_i · k_j"),
    Mistake("keys_queries_swapped", "keys and queries were swapped: k_i · q_j, the transposed scores",
            "score(i, j) = q_i · k_j: the query's own q against every token's k"),
    Mistake("another_query", "the query of another token ({token}) was used: these are its numbers",
            "use the query's own vector: the row of the query token, not of {token}"),
    Mistake("keys_from_query_weights", "the keys were made with W_query instead of W_key (k_j = x_j @ W_query)",
            "k_j = x_j @ W_key: each of W_query, W_key and W_value makes its own vectors"),
    Mistake("w_transposed", "W·x instead of x·W (the weight matrix transposed)",
            "the chapter multiplies the row vector by the matrix, x_i @ W (q_i = x_i @ W_query, "
            "k_i = x_i @ W_key, v_i = x_i @ W_value): each number is a column of W dotted with x_i"),
    Mistake("mask_with_zero", "the future scores were set to 0 instead of -inf before the softmax",
            "masked_fill with -inf: exp(-inf) = 0 gives them weight 0, while a score of 0 still gets exp(0) = 1"),
    Mistake("mask_after_no_renorm", "masked after the softmax without renormalising "
            "(the numbers of causal.weights_zeroed)",
            "divide each row by its sum after zeroing the future, or set the future scores to -inf before "
            "the softmax"),
    Mistake("dropout_no_rescale", "dropout without rescaling the kept weights by 1/(1 − p)",
            "multiply every kept weight by 1/(1 − p) = {rescale}"),
    Mistake("scores_instead_of_weights", "the scores were used instead of the attention weights in the "
            "weighted sum",
            "turn the scores into weights with the softmax first, then z = Σ_j weight_j × v_j"),
    Mistake("values_replaced_by_keys", "the keys were used instead of the values in the weighted sum",
            "z_i = Σ_j weight(i, j) × v_j with the values v_j = x_j @ W_value"),
    Mistake("values_replaced_by_embeddings", "the embeddings were used instead of the values in the "
            "weighted sum",
            "z_i = Σ_j weight(i, j) × v_j with the values v_j = x_j @ W_value, not the embeddings"),
    Mistake("heads_split_wrong", "the heads were split with view(heads, T, d_head), which mixes tokens and "
            "heads, instead of view(T, heads, d_head).transpose(0, 1)",
            "split the last dimension: q.view(T, heads, d_head), then transpose to (heads, T, d_head)"),
    Mistake("heads_concat_wrong", "the heads were merged with view(T, d_out) on (heads, T, d_head), without "
            "transposing back first",
            "context.transpose(0, 1) to (T, heads, d_head) first, then .contiguous().view(T, d_out)"),
    Mistake("one_wrong_number", "one number is off: {earlier}",
            "redo that one number (how it is made is below); the others are right"),
    Mistake("follows_from_yours", "your numbers follow correctly from your own {earlier}, which is wrong",
            "fix {earlier} first: these numbers will then come out right"),
)
CATALOGUE: dict[str, Mistake] = {m.id: m for m in _ENTRIES}


@dataclass(frozen=True)
class Hypothesis:
    """A way of working: ``mistake`` None is the right way; ``override`` changes the operations the
    mistake concerns (see :func:`attnlab.explain.recompute.evaluate`); ``words`` fill the mistake's text
    (e.g. the other token of ``another_query``)."""

    mistake: str | None
    override: Override | None = None
    words: Mapping[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.mistake is None:
            return "right"
        return self.mistake + (f"({self.words['token']})" if self.words.get("token") else "")


# --------------------------------------------------------------------------------------------------
# The overrides: (walk, step, operands, values so far) -> the step's numbers the mistaken way, or None
# --------------------------------------------------------------------------------------------------


def _kind(step: Step) -> str:
    return "" if step.how is None else step.how.kind


def _recorded(walk: Walkthrough, sid: str, values: Mapping[str, Interval]) -> Interval:
    return values[sid] if sid in values else Interval.point(walk.step(sid).values)


def _in_qk_section(step: Step) -> bool:
    return step.section in ("trainable", "causal")


def _scale_by(divisor: str) -> Override:
    def override(walk: Walkthrough, step: Step, ops: list[Interval],
                 values: Mapping[str, Interval]) -> Interval | None:
        if _kind(step) != "scale" or not _in_qk_section(step):
            return None
        d_in, d_k = walk.settings.d_in, walk.settings.d_out
        by = {"none": 1.0, "d_k": float(d_k), "sqrt_d_in": math.sqrt(d_in)}[divisor]
        return scale(ops[0], by)
    return override


def _softmax_rows_down(walk: Walkthrough, step: Step, ops: list[Interval],
                       values: Mapping[str, Interval]) -> Interval | None:
    if _kind(step) not in ("softmax", "softmax_naive") or ops[0].mid.ndim != 2:
        return None
    return softmax(ops[0], dim=0)


def _by_sum(walk: Walkthrough, step: Step, ops: list[Interval],
            values: Mapping[str, Interval]) -> Interval | None:
    if _kind(step) not in ("softmax", "softmax_naive") or not np.isfinite(ops[0].mid).all():
        return None
    return by_sum(ops[0])


def _dot_operands(step: Step) -> bool:
    return _kind(step) == "dot" and _in_qk_section(step) and step.how is not None and \
        step.how.operands[0].endswith(".queries")


def _raw_embeddings(walk: Walkthrough, step: Step, ops: list[Interval],
                    values: Mapping[str, Interval]) -> Interval | None:
    if not _dot_operands(step):
        return None
    x = _recorded(walk, "input.embeddings", values)
    return scores(x, x)


def _swapped(walk: Walkthrough, step: Step, ops: list[Interval],
             values: Mapping[str, Interval]) -> Interval | None:
    return scores(ops[1], ops[0]) if _dot_operands(step) else None


def _another_query(j: int) -> Override:
    def override(walk: Walkthrough, step: Step, ops: list[Interval],
                 values: Mapping[str, Interval]) -> Interval | None:
        if _kind(step) != "dot":
            return None
        qi = walk.query
        if step.values.ndim == 1:
            row = Interval(ops[0].mid[j][None, :], ops[0].rad[j][None, :])  # (1, d)
            out = scores(row, ops[1])  # (1, T)
            return Interval(out.mid[0], out.rad[0])  # (T,)
        right = scores(ops[0], ops[1])  # (T, T)
        mid, rad = right.mid.copy(), right.rad.copy()
        mid[qi], rad[qi] = right.mid[j], right.rad[j]
        return Interval(mid, rad)
    return override


def _keys_from_queries(walk: Walkthrough, step: Step, ops: list[Interval],
                       values: Mapping[str, Interval]) -> Interval | None:
    if _kind(step) != "project" or step.name != "keys" or not _in_qk_section(step):
        return None
    return matmul(ops[0], _recorded(walk, f"{step.section}.W_query", values))


def _w_transposed(walk: Walkthrough, step: Step, ops: list[Interval],
                  values: Mapping[str, Interval]) -> Interval | None:
    if _kind(step) != "project" or ops[1].mid.shape[0] != ops[1].mid.shape[1]:
        return None
    return matmul(ops[0], ops[1].transpose(1, 0))


def _mask_with_zero(walk: Walkthrough, step: Step, ops: list[Interval],
                    values: Mapping[str, Interval]) -> Interval | None:
    return times(ops[0], ops[1].mid) if _kind(step) == "mask_before" else None


def _no_renorm(walk: Walkthrough, step: Step, ops: list[Interval],
               values: Mapping[str, Interval]) -> Interval | None:
    if _kind(step) == "mask_after":
        return ops[0]
    if step.id == "causal.weights_masked":
        masked = walk.step("causal.scores_masked")
        if masked.how is None:
            return None
        logits_id, mask_id = masked.how.operands
        weights = softmax(_recorded(walk, logits_id, values))
        return times(weights, walk.step(mask_id).values)
    return None


def _dropout_no_rescale(walk: Walkthrough, step: Step, ops: list[Interval],
                        values: Mapping[str, Interval]) -> Interval | None:
    if _kind(step) != "dropout" or not ops:
        return None
    return times(ops[0], (step.values != 0).astype(np.float64))


def _weighted(replace: str) -> Override:
    def override(walk: Walkthrough, step: Step, ops: list[Interval],
                 values: Mapping[str, Interval]) -> Interval | None:
        if _kind(step) != "weighted_sum" or step.how is None:
            return None
        w, v = ops
        if replace == "scores":
            source = walk.step(step.how.operands[0])
            if source.how is None or not source.how.operands:
                return None
            w = _recorded(walk, source.how.operands[0], values)
        elif replace == "keys":
            if not _in_qk_section(step):
                return None
            v = _recorded(walk, f"{step.section}.keys", values)
        else:
            if not _in_qk_section(step):
                return None
            v = _recorded(walk, "input.embeddings", values)
        if v.mid.shape[-1] != step.values.shape[-1]:
            return None
        if w.mid.ndim == 1:
            return matmul(w.reshape(1, -1), v).reshape(-1)  # (1, T) @ (T, d) -> (d,)
        return matmul(w, v)
    return override


def _heads(split: str = "right", divisor: str = "head") -> Override:
    def override(walk: Walkthrough, step: Step, ops: list[Interval],
                 values: Mapping[str, Interval]) -> Interval | None:
        if step.id not in ("multihead.mha_weights", "multihead.mha_context"):
            return None
        out = mha_attention(walk, split=split, divisor=divisor)
        if out is None:
            return None
        return Interval.point(out[0] if step.name == "mha_weights" else out[1])
    return override


def _concat_wrong(walk: Walkthrough, step: Step, ops: list[Interval],
                  values: Mapping[str, Interval]) -> Interval | None:
    if _kind(step) != "concat" or ops[0].mid.ndim != 3:
        return None
    h, t, hd = ops[0].mid.shape
    return ops[0].reshape(t, h * hd)  # (H, T, hd) viewed as (T, H * hd) without the transpose


def right_config(walk: Walkthrough, section: str) -> Hypothesis:
    """The right way (every step computed by its own operation)."""
    return Hypothesis(None)


def hypotheses(walk: Walkthrough, *, query_row: bool = True) -> list[Hypothesis]:
    """Every named mistake as a hypothesis, in the catalogue's order; ``another_query`` once per other
    token, and only when the numbers compared are the query's row (``query_row``)."""
    st = walk.settings
    out = [Hypothesis("no_scaling", _scale_by("none")), Hypothesis("scaled_by_d_k", _scale_by("d_k"))]
    if st.d_in != st.d_out:
        out.append(Hypothesis("scaled_by_sqrt_d_in", _scale_by("sqrt_d_in")))
    out += [Hypothesis("softmax_wrong_axis", _softmax_rows_down), Hypothesis("normalised_by_sum", _by_sum),
            Hypothesis("raw_embeddings", _raw_embeddings), Hypothesis("keys_queries_swapped", _swapped)]
    if query_row:
        out += [Hypothesis("another_query", _another_query(j), {"token": walk.labels[j]})
                for j in range(len(walk.labels)) if j != walk.query]
    out += [Hypothesis("keys_from_query_weights", _keys_from_queries), Hypothesis("w_transposed", _w_transposed),
            Hypothesis("mask_with_zero", _mask_with_zero), Hypothesis("mask_after_no_renorm", _no_renorm),
            Hypothesis("dropout_no_rescale", _dropout_no_rescale),
            Hypothesis("scores_instead_of_weights", _weighted("scores")),
            Hypothesis("values_replaced_by_keys", _weighted("keys")),
            Hypothesis("values_replaced_by_embeddings", _weighted("x"))]
    if "multihead.mha_weights" in walk:
        out += [Hypothesis("heads_split_wrong", _heads(split="wrong")),
                Hypothesis("scaled_by_sqrt_d_model", _heads(divisor="d_model"))]
        if st.d_in != st.d_out // max(1, st.mha_heads or st.heads):
            out.append(Hypothesis("scaled_by_sqrt_d_in", _heads(divisor="d_in"), {"head": " per head"}))
        out.append(Hypothesis("heads_concat_wrong", _concat_wrong))
    return out


def mistake_configs(walk: Walkthrough, section: str) -> list[tuple[str, Hypothesis]]:
    """(mistake id, hypothesis) for the mistakes that change some step of ``section``."""
    out = []
    for hyp in hypotheses(walk):
        changed = wrong_values(walk, section, hyp)
        right = wrong_values(walk, section, right_config(walk, section))
        if any(k in right and not np.allclose(v, right[k], equal_nan=True) for k, v in changed.items()):
            out.append((hyp.mistake or "", hyp))
    return out


def wrong_values(walk: Walkthrough, section: str, cfg: Hypothesis) -> dict[str, np.ndarray]:
    """Every step of ``section`` that can be computed, computed the hypothesis's way from the recorded
    inputs and weights (step id -> float64 values of the step's shape)."""
    out: dict[str, np.ndarray] = {}
    override = cfg.override if cfg.override is not None else _heads()
    for step in walk.section_steps(section):
        got = evaluate(walk, step.id, override=override)
        if got is not None and got.mid.shape == step.shape:
            out[step.id] = got.mid
    return out
