"""Test data shared by the report, heatmap and browser tests (imported as ``from fakes import ...``)."""

from __future__ import annotations

import numpy as np


def fake_attention_maps(layers: int, heads: int, t: int, truncated: bool = False):
    """AttentionMaps of random softmax rows (seeded by ``t``), as a pretrained model of ``layers`` x
    ``heads`` would give for ``t`` tokens ([CLS] w0 w1 ... [SEP])."""
    from attnlab.pretrained import AttentionMaps

    rng = np.random.default_rng(t)
    scores = rng.normal(0, 2, (layers, heads, t, t))
    weights = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)  # (L, H, T, T), float64: rows sum to 1
    tokens = ["[CLS]", *[f"w{i}" for i in range(t - 2)], "[SEP]"] if t >= 2 else ["[CLS]"]
    return AttentionMaps(text=" ".join(tokens[1:-1]), tokens=tokens, token_ids=list(range(t)),
                         weights=weights.astype(np.float32), truncated=truncated)
