"""The opt-in explain sections cache, gqa, window and rope: their numbers against float64 references written
the plain way here (not the library's code), the default run unchanged, the CLI, --expect and the maps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnlab import book_inputs
from attnlab.cli import main
from attnlab.explain import MODERN_SECTIONS, SECTIONS, explain, resolve_sections
from attnlab.maps import masked_cells, weights_step
from attnlab.masks import window_mask
from attnlab.modules import MultiHeadAttention
from tolerances import abs_tol, rel_tol

# float32 steps against float64 references (tests/tolerances.py): the toy example's chained reductions are
# d_in (<= 8), d_out (<= 8), T (<= 7) and d_out again for the output projection; values below 2 in size.
# TOL is for the steps up to the weights, OUT_TOL for outputs (terms up to 4: |weights| |values| |W_out|).
MODERN_N = 8 + 8 + 7 + 8
TOL = abs_tol(torch.float32, MODERN_N, scale=2.0)
OUT_TOL = abs_tol(torch.float32, MODERN_N, scale=4.0)


def close(actual, expected, tol=TOL) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               atol=tol, rtol=0)


def _x(walk) -> np.ndarray:
    return walk.step("input.embeddings").values.astype(np.float64)


def _weights64(seed: int, d_in: int, d_out: int, t: int, heads: int, **kw) -> dict[str, np.ndarray]:
    """The seeded module's weights as float64 (x @ W layout): the same seed as the walkthrough's."""
    torch.manual_seed(seed)
    mha = MultiHeadAttention(d_in, d_out, t, 0.0, num_heads=heads, **kw)
    return {n: getattr(mha, n).weight.detach().double().numpy().T.copy()
            for n in ("W_query", "W_key", "W_value", "out_proj")} | {
        "b_out": mha.out_proj.bias.detach().double().numpy()}


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _heads(a: np.ndarray, h: int) -> np.ndarray:
    t = a.shape[0]
    return a.reshape(t, h, -1).transpose(1, 0, 2)  # (H, T, hd)


def _attend(x, w, heads, groups, allowed) -> tuple[np.ndarray, np.ndarray]:
    """Plain float64 multi-head attention: weights (H, T, T) and output (T, D)."""
    q = _heads(x @ w["W_query"], heads)
    k = np.repeat(_heads(x @ w["W_key"], groups), heads // groups, axis=0)
    v = np.repeat(_heads(x @ w["W_value"], groups), heads // groups, axis=0)
    s = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    s = np.where(allowed, s, -np.inf)
    a = _softmax(s)
    ctx = (a @ v).transpose(1, 0, 2).reshape(x.shape[0], -1)
    return a, ctx @ w["out_proj"] + w["b_out"]


@pytest.fixture(scope="module")
def book():
    return explain(sections=list(MODERN_SECTIONS))


# --------------------------------------------------------------------------------------------------
# The default run is the chapter's, unchanged
# --------------------------------------------------------------------------------------------------


def test_default_run_has_no_modern_section():
    walk = explain()
    assert walk.sections == ["input", *SECTIONS]
    assert "modern" not in walk.to_dict()["settings"]
    assert resolve_sections("cache, rope")[0] == ("cache", "rope")
    assert resolve_sections(["rope", "simple", "gqa"])[0] == ("simple", "gqa", "rope")  # chapter order first
    with pytest.raises(ValueError, match="valid sections: simple, all, trainable, causal, multihead, cache"):
        resolve_sections("caches")


def test_modern_options_need_their_section():
    with pytest.raises(ValueError, match="kv_groups applies to section 'gqa' only"):
        explain(kv_groups=2)
    with pytest.raises(ValueError, match="window_size applies to section 'window'"):
        explain(sections="cache", window_size=2)


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,heads", [(None, None), ("a", None), ("a b c d e f g", 2)])
def test_cache_rows_equal_recomputing(tokens, heads):
    walk = explain(tokens, sections="cache", heads=heads, d_out=4 if heads else None)
    x = _x(walk)
    t = x.shape[0]
    o = walk.settings.modern["cache"]
    w = _weights64(123, x.shape[1], o["d_out"], t, o["heads"])
    ref_w, ref_out = _attend(x, w, o["heads"], o["heads"], np.tril(np.ones((t, t), bool)))
    close(walk.step("cache.filled").values, np.tril(np.ones((t, t))))
    # the new query's row at step i (against the cache of tokens 1..i) is row i of the full recompute
    close(walk.step("cache.weights").values, ref_w)
    scores = walk.step("cache.scores").values
    assert np.isneginf(scores[:, np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]]).all()
    close(walk.step("cache.output").values, ref_out, OUT_TOL)
    close(walk.step("cache.recomputed").values, ref_out, OUT_TOL)
    close(walk.step("cache.output").values, walk.step("cache.recomputed").values)
    close(walk.step("cache.keys").values, _heads(x @ w["W_key"], o["heads"]), OUT_TOL)
    hd = o["head_dim"]
    assert walk.step("cache.filled").extra["bytes"] == [(i + 1) * 2 * o["heads"] * hd * 4 for i in range(t)]
    assert walk.step("cache.recomputed").extra["max_abs_diff_to_cached"] < TOL


def test_cache_cell_explanations(book):
    line = book.explain_cell("cache.scores", (0, 1, 3))[0]
    assert "-inf" in line and "cache holds tokens 1..2" in line
    line = book.explain_cell("cache.scores", (0, 2, 1))[0]
    q, k = book.step("cache.queries").values[0, 2], book.step("cache.keys").values[0, 1]
    assert line.endswith(f"{float(q @ k) / math.sqrt(2):.4f}")
    assert "1 slot filled" in book.step("cache.filled").detail[1]


# --------------------------------------------------------------------------------------------------
# gqa
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,groups", [(None, None), (4, 1), (4, 4), (6, 3), (3, 1)])
def test_gqa_weights_per_head(heads, groups):
    walk = explain("a b c d e f g", sections="gqa", heads=heads, kv_groups=groups)
    x = _x(walk)
    o = walk.settings.modern["gqa"]
    h, g = o["heads"], o["kv_groups"]
    assert (h, g) == ((heads or 4), (groups or 2))
    share = walk.step("gqa.sharing").values
    close(share, np.arange(h)[:, None] // (h // g) == np.arange(g)[None, :])
    assert share.sum(axis=1).tolist() == [1] * h and share.sum(axis=0).tolist() == [h // g] * g
    w = _weights64(123, x.shape[1], o["d_out"], x.shape[0], h, num_kv_groups=g)
    ref_w, ref_out = _attend(x, w, h, g, np.tril(np.ones((x.shape[0],) * 2, bool)))
    close(walk.step("gqa.weights").values, ref_w)
    close(walk.step("gqa.output").values, ref_out, OUT_TOL)
    assert walk.step("gqa.keys").shape == (g, x.shape[0], o["head_dim"])
    assert walk.step("gqa.output").extra["max_abs_diff_to_mha_with_copies"] <= OUT_TOL
    assert walk.step("gqa.sharing").extra["mha_kv_bytes_per_token"] == (h // g) * walk.step(
        "gqa.sharing").extra["kv_bytes_per_token"]


def test_gqa_cell_names_its_key_value_head(book):
    line = book.explain_cell("gqa.scores", (3, 2, 1))[0]
    q, k = book.step("gqa.queries").values[3, 2], book.step("gqa.keys").values[1, 1]
    assert "key/value head 2" in line and line.endswith(f"{float(q @ k) / math.sqrt(2):.4f}")
    assert book.step("gqa.sharing").detail[:2] == ("query heads 1, 2 -> key/value head 1",
                                                   "query heads 3, 4 -> key/value head 2")


# --------------------------------------------------------------------------------------------------
# window
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 2, 3, 6, 9])
def test_window_mask_and_weights(window):
    walk = explain(sections="window", window_size=window)
    x = _x(walk)
    t = x.shape[0]
    mask = window_mask(t, window=window).numpy()
    close(walk.step("window.mask").values, mask)
    i, j = np.indices((t, t))
    close(walk.step("window.mask").values, (j <= i) & (j > i - window))  # the definition, written out
    close(walk.step("window.out_of_window").values, (j < i - window + 1))
    w = _weights64(123, x.shape[1], 2, t, 1)
    ref_w, ref_out = _attend(x, w, 1, 1, mask)
    close(walk.step("window.weights").values, ref_w)
    close(walk.step("window.output").values, ref_out, OUT_TOL)
    assert walk.step("window.mask").extra["visible"] == [min(r + 1, window) for r in range(t)]
    # what each token can still see, in words
    assert walk.step("window.mask").detail[5] == "step sees " + ", ".join(
        ["Your", "journey", "starts", "with", "one", "step"][max(0, 6 - window):])


def test_window_maps_mask_the_band(book):
    step = weights_step(book, "window")
    assert step.id == "window.weights"
    close(masked_cells(book, step)[0], ~window_mask(6, window=3).numpy())


# --------------------------------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------------------------------


def _rotate(v: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Turn each feature pair (d, d + hd/2) of v (..., T, hd) by position × base^(-2d/hd), as 2-D rotations."""
    hd = v.shape[-1]
    half = hd // 2
    theta = base ** (-2 * np.arange(half) / hd)
    a = positions[:, None] * theta[None, :]  # (T, hd/2)
    x1, x2 = v[..., :half], v[..., half:]
    return np.concatenate((x1 * np.cos(a) - x2 * np.sin(a), x1 * np.sin(a) + x2 * np.cos(a)), axis=-1)


@pytest.mark.parametrize("heads,d_out,base,shift", [(None, None, 10000.0, None), (2, 8, 100.0, 3),
                                                     (1, 4, 10000.0, 97)])
def test_rope_scores_are_dot_products_of_rotated_vectors(heads, d_out, base, shift):
    walk = explain("a b c d e", sections="rope", heads=heads, d_out=d_out, rope_base=base, rope_shift=shift)
    x = _x(walk)
    t = x.shape[0]
    o = walk.settings.modern["rope"]
    h, hd = o["heads"], o["head_dim"]
    w = _weights64(123, x.shape[1], o["d_out"], t, h, rope=True, rope_base=base)
    q, k = _heads(x @ w["W_query"], h), _heads(x @ w["W_key"], h)
    pos = np.arange(t, dtype=np.float64)
    qr, kr = _rotate(q, pos, base), _rotate(k, pos, base)
    close(walk.step("rope.queries_rotated").values, qr)
    close(walk.step("rope.keys_rotated").values, kr)
    scores = qr @ kr.transpose(0, 2, 1) / math.sqrt(hd)
    close(walk.step("rope.scores").values, scores)
    close(np.diagonal(walk.step("rope.scores").values, axis1=1, axis2=2), (q * k).sum(-1) / math.sqrt(hd))
    # shifting both positions leaves every score unchanged
    s = shift or 10
    shifted = _rotate(q, pos + s, base) @ _rotate(k, pos + s, base).transpose(0, 2, 1) / math.sqrt(hd)
    # float64: a head-dim dot product of vectors rotated by angles up to T + s (their rounding grows with it)
    close(shifted, scores, abs_tol(torch.float64, hd + 2 + t + s, scale=float(np.abs(q).max() * np.abs(k).max() * hd)))
    close(walk.step("rope.scores_shifted").values, scores)
    # one pair of vectors at every pair of positions: a function of m - n only
    rel = walk.step("rope.relative").values
    for off in range(-t + 1, t):
        d = np.diagonal(rel, off)
        close(d, np.full_like(d, d[0]))
    ref_w, ref_out = _attend_rotated(qr, kr, x, w, h)
    close(walk.step("rope.weights").values, ref_w)
    close(walk.step("rope.output").values, ref_out, OUT_TOL)
    assert walk.step("rope.cos").extra["theta"] == pytest.approx(base ** (-2 * np.arange(hd // 2) / hd),
                                                                  rel=rel_tol(torch.float32, 1))  # one float32 pow


def _attend_rotated(qr, kr, x, w, h):
    t = x.shape[0]
    v = _heads(x @ w["W_value"], h)
    s = np.where(np.tril(np.ones((t, t), bool)), qr @ kr.transpose(0, 2, 1) / math.sqrt(qr.shape[-1]), -np.inf)
    a = _softmax(s)
    return a, (a @ v).transpose(1, 0, 2).reshape(t, -1) @ w["out_proj"] + w["b_out"]


def test_rope_cells(book):
    cos = book.explain_cell("rope.cos", (3, 0))[0]
    assert cos == f"cos_with[1] = cos(position × θ_1) = cos(3 × 1) = cos(3) = {math.cos(3):.4f}"
    q = book.step("rope.queries").values[0, 3]
    line = book.explain_cell("rope.queries_rotated", (0, 3, 0))[0]
    assert line.endswith(f"{q[0] * math.cos(3) - q[1] * math.sin(3):.4f}")


def test_rope_needs_an_even_head_size():
    with pytest.raises(ValueError, match="rope needs an even head size"):
        explain(sections="rope", d_out=3)


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def cli(capsys, args):
    code = main(["explain", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_sections_and_expect(capsys):
    code, out, _ = cli(capsys, ["--section", "cache", "window", "--window-size", "2", "--format", "json"])
    assert code == 0
    data = json.loads(out)
    assert [s["id"] for s in data["sections"]] == ["input", "cache", "window"]
    assert data["settings"]["modern"]["window"]["window_size"] == 2
    walk = explain(sections="cache")
    row = ",".join(f"{v:.4f}" for v in walk.step("cache.weights").values[0, 1])
    code, out, _ = cli(capsys, ["--section", "cache", "--expect", f"cache.weights={row}"])
    assert code == 0 and "✓ cache.weights: matches" in out
    code, out, _ = cli(capsys, ["--section", "cache", "--expect", "cache.weights=0.6000,0.4000,0,0,0,0"])
    assert code == 1


@pytest.mark.parametrize("args,message", [
    (["--section", "gqa", "--kv-groups", "3"], "--kv-groups must divide heads"),
    (["--section", "window", "--window-size", "0"], "--window-size must be an int >= 1"),
    (["--window-size", "2"], "--window-size applies to section 'window' only"),
    (["--section", "rope", "--rope-base", "1"], "--rope-base must be a number > 1"),
    (["--section", "cache", "--expect", "gqa.weights=1"], "section 'gqa' is not selected"),
])
def test_cli_bad_options(capsys, args, message):
    code = main(["explain", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_book_inputs_are_the_walkthroughs(book):
    close(_x(book), book_inputs().double().numpy())
