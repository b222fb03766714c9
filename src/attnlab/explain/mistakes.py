"""The known wrong ways to compute a step, so that ``--expect`` can name the one a learner made.

Each :class:`Mistake` has a stable id (the ``mistake`` field of ``--format json`` checks), a one-line
name, and the fix. :func:`wrong_values` computes a section the way a learner who made one mistake
would, from the recorded inputs (the embeddings and the section's W_query / W_key / W_value) with
:mod:`attnlab.functional`'s operations in float64; one :class:`_Config` field differs from the right
computation per mistake, and the error flows on into every later step of the section as it would by
hand. :func:`right_config` (no field changed) reproduces the recorded steps (tested), so a mistake's
numbers differ from the right ones only by the mistake.

Catalogue (id: what the learner did):
    no_scaling                 the scores were not divided by √d_k
    scaled_by_d_k              divided by d_k instead of √d_k
    softmax_wrong_axis         softmax down the columns (dim=0) instead of along each row
    normalised_by_sum          divided the scores by their sum instead of the softmax
    raw_embeddings             the embeddings instead of the queries and keys (x @ xᵀ: all.scores)
    keys_queries_swapped       k_i · q_j instead of q_i · k_j (the transposed scores)
    w_transposed               W·x instead of x·W (W transposed; square W only)
    mask_after_no_renorm       masked after the softmax without renormalising (causal.weights_zeroed)
    dropout_no_rescale         dropout without the 1/(1 − p) rescaling of the kept weights
    scores_instead_of_weights  the scores instead of the weights in the weighted sum
    values_replaced_by_keys    the keys instead of the values in the weighted sum
    values_replaced_by_embeddings  the embeddings instead of the values in the weighted sum
Two more are diagnosed by :mod:`.check` itself: ``one_wrong_number`` (a single slip, e.g. one dot
product) and ``follows_from_yours`` (right, given the learner's own wrong numbers of an earlier step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from attnlab import functional as F
from attnlab.explain.steps import Walkthrough

__all__ = ["CATALOGUE", "Mistake", "mistake_configs", "right_config", "wrong_values"]


@dataclass(frozen=True)
class Mistake:
    """id (stable, in JSON), name (one line: what was done), fix (how to do it right); ``name`` and
    ``fix`` may use ``{d_k}``, ``{root}`` (√d_k), ``{rescale}`` (1/(1 − p)) and ``{earlier}``."""

    id: str
    name: str
    fix: str

    def text(self, walk: Walkthrough, **extra: str) -> tuple[str, str]:
        d = walk.settings.d_out
        p = walk.settings.dropout
        values = {"d_k": str(d), "root": f"{math.sqrt(d):.4f}", "rescale": f"{1.0 / (1.0 - p):g}", **extra}
        return self.name.format(**values), self.fix.format(**values)


_ENTRIES = (
    Mistake("no_scaling", "the scores were not divided by √d_k",
            "divide every score by √d_k = √{d_k} = {root} (d_k = {d_k}, the keys' width) before the softmax"),
    Mistake("scaled_by_d_k", "the scores were divided by d_k = {d_k} instead of √d_k",
            "divide by the square root of d_k: √{d_k} = {root}"),
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
    Mistake("w_transposed", "W·x instead of x·W (the weight matrix transposed)",
            "the chapter multiplies the row vector by the matrix: q_i = x_i @ W_query, each number a column "
            "of W_query dotted with x_i"),
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
    Mistake("one_wrong_number", "one number is off: {earlier}",
            "redo that one number (how it is made is below); the others are right"),
    Mistake("follows_from_yours", "your numbers follow correctly from your own {earlier}, which is wrong",
            "fix {earlier} first: these numbers will then come out right"),
)
CATALOGUE: dict[str, Mistake] = {m.id: m for m in _ENTRIES}


@dataclass(frozen=True)
class _Config:
    """How a section is computed; the right way is :func:`right_config`."""

    divisor: str = "sqrt"  # "sqrt" (√d_k), "none", "d_k"
    normaliser: str = "softmax"  # or "sum"
    softmax_dim: int = -1
    qk: str = "qk"  # "qk", "x" (raw embeddings), "swapped"
    transpose_w: bool = False
    renormalise: bool = True
    rescale_dropout: bool = True
    ctx_weights: str = "weights"  # or "scores"
    ctx_values: str = "values"  # "keys", "x"


_SECTIONS = ("simple", "all", "trainable", "causal")  # the sections computed here (multihead: by the classes)


def right_config(walk: Walkthrough, section: str) -> _Config:
    scaled = walk.settings.scale and section in ("trainable", "causal")
    return _Config(divisor="sqrt" if scaled else "none")


def mistake_configs(walk: Walkthrough, section: str) -> list[tuple[str, _Config]]:
    """(mistake id, the section's config with that one mistake), for the mistakes that apply."""
    if section not in _SECTIONS:
        return []  # e.g. a pretrained model's steps: not the chapter's computation
    right = right_config(walk, section)
    out: list[tuple[str, _Config]] = []
    if section in ("trainable", "causal"):
        if walk.settings.scale:
            out += [("no_scaling", replace(right, divisor="none")), ("scaled_by_d_k", replace(right, divisor="d_k"))]
        out += [("raw_embeddings", replace(right, qk="x")), ("keys_queries_swapped", replace(right, qk="swapped"))]
        if walk.settings.d_in == walk.settings.d_out:
            out.append(("w_transposed", replace(right, transpose_w=True)))
    if section != "simple":
        out.append(("softmax_wrong_axis", replace(right, softmax_dim=0)))
    out.append(("normalised_by_sum", replace(right, normaliser="sum")))
    out.append(("scores_instead_of_weights", replace(right, ctx_weights="scores")))
    if section in ("trainable", "causal"):
        out += [("values_replaced_by_keys", replace(right, ctx_values="keys")),
                ("values_replaced_by_embeddings", replace(right, ctx_values="x"))]
    if section == "causal":
        out += [("mask_after_no_renorm", replace(right, renormalise=False)),
                ("dropout_no_rescale", replace(right, rescale_dropout=False))]
    return out


def _v(walk: Walkthrough, step_id: str) -> torch.Tensor:
    return torch.from_numpy(walk.step(step_id).values.astype(np.float64))


def _normalise(cfg: _Config, scores: torch.Tensor) -> torch.Tensor:
    if cfg.normaliser == "sum":
        return F.normalize_by_sum(scores, dim=cfg.softmax_dim)
    return F.softmax(scores, dim=cfg.softmax_dim)


def wrong_values(walk: Walkthrough, section: str, cfg: _Config) -> dict[str, np.ndarray]:
    """Every step of ``section`` computed with ``cfg`` (step id -> float64 values of the step's shape);
    the steps a config cannot change (the classes' outputs) are left out."""
    if section not in _SECTIONS or "input.embeddings" not in walk:
        return {}
    x = _v(walk, "input.embeddings")  # (T, d_in)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if section == "simple":
            xq = x[walk.query]  # (d_in,)
            scores = F.dot_scores(xq, x)  # (T,)
            weights = _normalise(replace(cfg, softmax_dim=-1), scores)  # (T,)
            out = {"scores": scores, "weights": weights,
                   "context": (scores if cfg.ctx_weights == "scores" else weights) @ x}  # (d_in,)
        elif section == "all":
            scores = F.all_pair_scores(x)  # (T, T)
            weights = _normalise(cfg, scores)  # (T, T)
            out = {"scores": scores, "weights": weights,
                   "context": F.context_vectors(scores if cfg.ctx_weights == "scores" else weights, x)}
        elif section in ("trainable", "causal"):
            out = _attention(walk, section, cfg, x)
    return {f"{section}.{k}": v.numpy() for k, v in out.items() if f"{section}.{k}" in walk}


def _attention(walk: Walkthrough, sec: str, cfg: _Config, x: torch.Tensor) -> dict[str, torch.Tensor]:
    w = {n: _v(walk, f"{sec}.{n}") for n in ("W_query", "W_key", "W_value")}  # (d_in, d_out) each
    if cfg.transpose_w:
        w = {n: m.T for n, m in w.items()}  # W·x for a column x is x @ Wᵀ for a row
    q, k, v = x @ w["W_query"], x @ w["W_key"], x @ w["W_value"]  # (T, d_out) each
    qs, ks = {"qk": (q, k), "x": (x, x), "swapped": (k, q)}[cfg.qk]
    scores = F.all_pair_scores(qs, ks)  # (T, T)
    d = walk.settings.d_out
    logits = scores / {"sqrt": math.sqrt(d), "none": 1.0, "d_k": float(d)}[cfg.divisor]  # (T, T)
    weights = _normalise(cfg, logits)  # (T, T)
    out = {"queries": q, "keys": k, "values": v, "scores": scores, "scaled_scores": logits, "weights": weights}
    if sec == "trainable":
        vals = {"values": v, "keys": k, "x": x}[cfg.ctx_values]
        if vals.shape[-1] == v.shape[-1]:
            out["context"] = F.context_vectors(logits if cfg.ctx_weights == "scores" else weights, vals)
        return out
    allowed = _v(walk, "causal.mask") > 0  # (T, T) bool
    zeroed = weights * allowed  # (T, T)
    out["weights_zeroed"] = zeroed
    out["weights_renormalized"] = F.mask_after_softmax(weights, allowed) if cfg.renormalise else zeroed
    masked = F.mask_before_softmax(logits, allowed)  # (T, T)
    out["scores_masked"] = masked
    out["weights_masked"] = _normalise(cfg, masked) if cfg.renormalise else zeroed
    p = walk.settings.dropout
    factor = 1.0 / (1.0 - p) if cfg.rescale_dropout else 1.0
    for name, src in (("dropout_example", torch.ones_like(zeroed)), ("dropout_weights", out["weights_masked"])):
        keep = _v(walk, f"causal.{name}") != 0  # the seeded draw of the recorded step
        out[name] = src * keep * factor
    return out
