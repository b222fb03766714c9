"""Issue 13: rounding-aware --expect, the named mistakes, printed working that adds up, seeded formulas
that recompute their numbers, no dead ends, non-finite numbers as errors, and one vocabulary.

Every wrong number here is made by actually making the mistake, in float64 numpy written out in this
file (not with attnlab's own mistake code), from the walkthrough's recorded inputs and weights.
"""

from __future__ import annotations

import argparse
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from attnlab import modules
from attnlab.cli import build_parser, main
from attnlab.explain import SECTIONS, check, explain, parse_expect, resolve_sections
from attnlab.explain.check import format_results
from attnlab.explain.mistakes import CATALOGUE, mistake_configs, right_config, wrong_values
from tolerances import tols

# tests/tolerances.py for the toy example recomputed another way: d_in 3, d_out <= 3, 6 tokens, out_proj
TOY = tols(torch.float32, 3 + 3 + 6 + 3, scale=2.0)

CAT_SAT_X = [[1, 0, 1], [0, 1, 1], [1, 1, 0]]
CAT_SAT_W = {"W_query": [[1, 0], [0, 1], [1, 1]], "W_key": [[0, 1], [1, 0], [1, 1]],
             "W_value": [[1, 1], [0, 1], [1, 0]]}


@pytest.fixture(scope="module")
def book():
    return explain()


@pytest.fixture(scope="module")
def square():  # d_out = d_in = 3: W·x and "embeddings as values" have the right shapes
    return explain(d_out=3, heads=3)


@pytest.fixture(scope="module")
def cat_sat():
    return explain("The cat sat", CAT_SAT_X, query="The", weights=CAT_SAT_W, scale=False)


def arr(walk, step_id) -> np.ndarray:
    return walk.step(step_id).values.astype(np.float64)


def softmax(a: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def qkv(walk, sec="trainable", transpose=False):
    x = arr(walk, "input.embeddings")
    ws = [arr(walk, f"{sec}.{n}") for n in ("W_query", "W_key", "W_value")]
    if transpose:
        ws = [w.T for w in ws]
    return x, *(x @ w for w in ws)


def as_expect(step_id: str, values: np.ndarray, decimals: int = 4) -> str:
    rows = np.atleast_2d(values)
    return f"{step_id}=" + ";".join(",".join(f"{v:.{decimals}f}" for v in row) for row in rows)


def verdict(walk, *texts):
    results = check(walk, [parse_expect(t, walk.step_ids) for t in texts])
    return results, "\n".join(format_results(results))


# --------------------------------------------------------------------------------------------------
# 1. Rounding-aware checking
# --------------------------------------------------------------------------------------------------


def test_seed_004_context_from_the_shown_weights_is_accepted(cat_sat):
    shown = np.round(softmax(np.array([4.0, 5.0, 3.0])), 4)  # 0.2447, 0.6652, 0.0900 as the table shows
    v = np.asarray(CAT_SAT_X, dtype=np.float64) @ np.asarray(CAT_SAT_W["W_value"], dtype=np.float64)
    by_hand = shown @ v  # 0.2447×2 + 0.6652 + 0.0900 = 1.2446
    assert f"{by_hand[0]:.4f}" == "1.2446"
    (res,), text = verdict(cat_sat, as_expect("trainable.context", by_hand))
    assert res.ok and res.basis == "rounded"
    assert "matches, computed from the rounded weights shown above (trainable.weights at 4 decimals)" in text
    (exact,), _ = verdict(cat_sat, "trainable.context=1.2447,1.0900")
    assert exact.ok and exact.basis == "exact"
    (wrong,), _ = verdict(cat_sat, "trainable.context=1.2449,1.0900")
    assert not wrong.ok


def test_book_weights_from_the_shown_scaled_scores_are_accepted():
    walk = explain(query="step")
    scaled = arr(walk, "trainable.scaled_scores")[5]
    by_hand = softmax(np.round(scaled, 4))  # from the 4-decimal scaled scores the table shows
    assert f"{by_hand[1]:.4f}" == "0.2091" and f"{walk.step('trainable.weights').values[5, 1]:.4f}" == "0.2092"
    (res,), text = verdict(walk, as_expect("trainable.weights", by_hand))
    assert res.ok and res.basis == "rounded" and "rounded scaled scores shown above" in text
    assert res.to_dict()["basis"] == "rounded" and res.to_dict()["mistake"] is None


def _evaluable(segment: str):
    """A segment of printed working as Python, or None when it holds names."""
    seg = segment.strip()
    if not re.fullmatch(r"[\d.\s×+−\-/()\[\],·exp]*", seg) or not re.search(r"\d", seg):
        return None
    py = seg.replace("×", "*").replace("−", "-").replace("·", "@").replace("exp(", "math.exp(")
    py = re.sub(r"\[([^\]]*)\]", r"np.array([\1])", py)
    return py


def _check_line(line: str) -> int:
    """Every arithmetic segment of ``name = ... = result``, evaluated on the printed numbers, rounds to
    the printed result. Returns the number of segments checked."""
    parts = [p.strip() for p in line.split(" = ")]
    result = parts[-1].split(" ")[0]
    if not re.fullmatch(r"-?\d+(\.\d+)?", result):
        return 0
    decimals = len(result.split(".")[1]) if "." in result else 0
    checked = 0
    for seg in parts[1:-1]:
        py = _evaluable(seg)
        if py is None:
            continue
        value = float(eval(py, {"math": math, "np": np}))  # our own printed numbers
        shown = f"{value:.{decimals}f}"
        shown = shown[1:] if shown.startswith("-") and shown.strip("-0.") == "" else shown
        assert shown == result, f"{seg!r} gives {value} but the line prints {result}: {line}"
        checked += 1
    return checked


def test_printed_working_adds_up_as_printed(book, cat_sat, square):
    line = cat_sat.explain_cell("trainable.context", (0, 0))[0]
    assert "0.2447×2 + 0.6652×1 + 0.09×1 = 1.2447" not in line
    assert _check_line(line) == 1
    checked = 0
    for walk in (book, cat_sat, square, explain(query="step")):
        for step in walk.steps:
            if step.how is None or step.how.kind in ("module", "input", "weights", "concat", "mask"):
                continue
            for index in np.ndindex(*step.shape):
                for text in walk.explain_cell(step.id, index):
                    checked += _check_line("x " + text.strip() if text.strip().startswith("= ") else text)
    assert checked > 1000


# --------------------------------------------------------------------------------------------------
# 2. The catalogue of named mistakes: each made for real, then named
# --------------------------------------------------------------------------------------------------


def _mistakes(book, square, cat_sat):
    qi = book.query  # journey
    x, q, k, v = qkv(book)
    root = math.sqrt(2)
    xs, qs, ks, _ = qkv(square)
    wsq = softmax(qs @ ks.T / math.sqrt(3))
    _, qc, kc, _ = qkv(book, "causal")
    tril = np.tril(np.ones((6, 6)))
    torch.manual_seed(123)
    keep = nn.Dropout(0.5)(torch.ones(6, 6)).numpy() != 0  # the same draw as the walkthrough's dropout
    s = x @ x[qi]
    return [
        ("no_scaling", book, "trainable.scaled_scores", (q @ k.T)[qi]),
        ("no_scaling", book, "trainable.weights", softmax(q @ k.T)[qi]),
        ("scaled_by_d_k", book, "trainable.weights", softmax(q @ k.T / 2)[qi]),
        ("softmax_wrong_axis", book, "trainable.weights", softmax(q @ k.T / root, axis=0)[qi]),
        ("softmax_wrong_axis", book, "all.weights", softmax(x @ x.T, axis=0)[qi]),
        ("normalised_by_sum", book, "simple.weights", s / s.sum()),
        ("raw_embeddings", book, "trainable.scores", (x @ x.T)[qi]),
        ("keys_queries_swapped", book, "trainable.scores", (k @ q.T)[qi]),
        ("w_transposed", square, "trainable.queries", (xs @ arr(square, "trainable.W_query").T)[square.query]),
        ("mask_after_no_renorm", book, "causal.weights_masked", (softmax(qc @ kc.T / root) * tril)[qi]),
        ("dropout_no_rescale", book, "causal.dropout_weights",  # the whole matrix: rows 1-2 may be all dropped
         np.where(tril > 0, softmax(np.where(tril > 0, qc @ kc.T / root, -np.inf)), 0) * keep),
        ("scores_instead_of_weights", book, "trainable.context", ((q @ k.T / root) @ v)[qi]),
        ("scores_instead_of_weights", book, "simple.context", s @ x),
        ("values_replaced_by_keys", book, "trainable.context", (softmax(q @ k.T / root) @ k)[qi]),
        ("values_replaced_by_embeddings", square, "trainable.context", (wsq @ xs)[square.query]),
        ("one_wrong_number", cat_sat, "trainable.scores", np.array([4, 5, 1])),
    ]


def test_every_catalogue_entry_is_named_from_numbers_made_by_that_mistake(book, square, cat_sat):
    cases = _mistakes(book, square, cat_sat)
    named = set()
    for mistake, walk, step_id, wrong in cases:
        decimals = 0 if mistake == "one_wrong_number" else 4
        (res,), text = verdict(walk, as_expect(step_id, wrong, decimals))
        assert not res.ok, (mistake, step_id)
        assert res.mistake == mistake, (mistake, step_id, res.mistake, text)
        _, fix = CATALOGUE[mistake].text(walk, earlier=text.split("off: ")[-1].split("\n")[0])
        assert f"mistake ({mistake}): " in text and "fix: " + fix in text
        first = res.mismatches[0]
        assert f"you have {first.expected_text}, attnlab has" in text  # the learner's against the right number
        assert res.to_dict()["mistake"] == mistake
        named.add(mistake)
    # follows_from_yours: the note's weights worked out from its wrong scores [4, 5, 1]
    results, text = verdict(cat_sat, as_expect("trainable.weights", softmax(np.array([4.0, 5, 1])), 2),
                            "trainable.scores=4,5,1")
    assert results[0].mistake == "follows_from_yours" and "fix trainable.scores first" in text
    named.add("follows_from_yours")
    # issue 19 added mistakes, each made for real at 2, 3 and 4 decimals in tests/test_checker_decimals.py
    assert set(CATALOGUE) - named <= {"scaled_by_sqrt_d_in", "scaled_by_sqrt_d_model", "another_query",
                                      "keys_from_query_weights", "mask_with_zero", "heads_split_wrong",
                                      "heads_concat_wrong"}


def test_right_numbers_are_never_named_and_unknown_errors_are_not_guessed(book):
    (res,), _ = verdict(book, as_expect("trainable.weights", book.step("trainable.weights").values[book.query]))
    assert res.ok and res.mistake is None
    (res,), text = verdict(book, "trainable.weights=0.1,0.1,0.1,0.1,0.1,0.5")
    assert not res.ok and res.mistake is None and "mistake (" not in text


def test_the_right_config_reproduces_every_recorded_step(book, square, cat_sat):
    for walk in (book, square, cat_sat, explain(scale=False, query="one")):
        for sec in ("simple", "all", "trainable", "causal"):
            for step_id, values in wrong_values(walk, sec, right_config(walk, sec)).items():
                np.testing.assert_allclose(values, arr(walk, step_id), **TOY, err_msg=step_id)
            assert {m for m, _ in mistake_configs(walk, sec)} <= set(CATALOGUE)


# --------------------------------------------------------------------------------------------------
# 3. No dead ends
# --------------------------------------------------------------------------------------------------


def test_sections_not_asked_for_never_block():
    w3 = {n: np.eye(3).tolist() for n in ("W_query", "W_key", "W_value")}
    walk = explain(weights=w3, sections="trainable")  # 2 heads do not divide d_out = 3: not asked for
    assert walk.sections == ["input", "trainable"]
    full = explain(weights=w3)  # asked for, without --heads: a valid count, said so
    assert full.settings.heads == 3 and "the default 2 does not divide d_out = 3" in full.settings.heads_note
    assert full.step("multihead.mha_weights").shape[0] == 3
    assert full.settings.heads_note in full.step("multihead.head_weights").detail
    with pytest.raises(ValueError, match=r"heads must divide d_out .* got d_out=3 and heads=2"):
        explain(weights=w3, heads=2)


def test_exercise_3_2_wrapper_with_outputs_of_width_1():
    walk = explain(d_out=1)
    out = walk.step("multihead.wrapper_output").values
    assert out.shape == (6, 2)  # two heads of width 1: 2-dimensional context vectors
    torch.manual_seed(123)
    ref = modules.MultiHeadAttentionWrapper(3, 1, 6, 0.0, num_heads=2)(torch.stack((torch.tensor(
        walk.step("input.embeddings").values),) * 2))[0]
    np.testing.assert_allclose(out, ref.detach().numpy(), **TOY)
    assert walk.settings.mha_heads == 1 and "MultiHeadAttention uses 1 head" in walk.settings.heads_note
    assert walk.step("multihead.mha_output").shape == (6, 1)
    assert main(["explain", "--d-out", "1", "--section", "multihead", "--format", "json"]) == 0


# --------------------------------------------------------------------------------------------------
# 5. Honest numbers
# --------------------------------------------------------------------------------------------------


def test_overflow_is_an_error_naming_the_step_and_the_cause(capsys):
    with pytest.raises(ValueError, match=r"^all\.scores is inf .*overflow.*scale the embeddings down"):
        explain(embeddings=[[1e20, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert main(["explain", "--embeddings", "[[1e20, 1, 1], [1, 1, 1]]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overflow" in err and "nan" not in capsys.readouterr().out


def test_naive_softmax_overflow_is_said_not_recorded_as_nan():
    walk = explain("a b c", [[30.0] * 3, [1.0] * 3, [2.0] * 3], query="a", sections="simple")
    assert "simple.weights_naive" not in walk
    assert "overflows" in walk.absent_reason("simple.weights_naive")
    assert all(np.isfinite(s.values).all() for s in walk.steps)


def _run_formula(formula: str, namespace: dict):
    code = formula.split("  #")[0]
    *head, last = [c.strip() for c in code.split(";")]
    for stmt in head:
        exec(stmt, namespace)  # noqa: S102 - the walkthrough's own formula strings
    if re.match(r"^\w+ = ", last):
        exec(last, namespace)  # noqa: S102
        return namespace[last.split(" = ")[0]]
    return eval(last, namespace)


@pytest.mark.parametrize("kwargs", [{}, {"d_out": 3, "seed": 7}])
def test_seeded_formulas_recompute_their_numbers(kwargs):
    walk = explain(**kwargs)
    x = torch.from_numpy(walk.step("input.embeddings").values)
    ran = []
    for step in walk.steps:
        if "torch.manual_seed" not in step.formula:
            continue
        ns = {"torch": torch, "nn": nn, "x": x, "weights": torch.from_numpy(walk.step("causal.weights_masked").values),
              **{n: getattr(modules, n) for n in modules.__all__}}
        with torch.no_grad():
            got = _run_formula(step.formula, ns)
        np.testing.assert_allclose(got.detach().numpy(), step.values, **TOY, err_msg=step.formula)
        ran.append(step.id)
    assert {"trainable.W_key", "trainable.W_value", "causal.W_key", "multihead.W_out", "causal.output"} <= set(ran)
    assert walk.step("trainable.W_key").formula.endswith(f"W_key = torch.rand(3, {walk.settings.d_out})")


# --------------------------------------------------------------------------------------------------
# 4. One vocabulary (explain's side)
# --------------------------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_parser_accepts_abbreviations(capsys):
    parsers = list(_parsers(build_parser()))
    assert len(parsers) >= 3 and all(p.allow_abbrev is False for p in parsers)
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--sec", "simple"])
    assert exc.value.code == 2 and "unrecognized arguments: --sec" in capsys.readouterr().err
    assert main(["explain", "--head", "3"]) == 2  # not taken as --heads
    assert "--head applies to a pretrained model only" in capsys.readouterr().err


def test_section_names_one_list_old_names_with_a_notice(capsys):
    assert SECTIONS == ("simple", "all", "trainable", "causal", "multihead")
    assert resolve_sections(["simplified"]) == (("simple", "all"), ["section 'simplified' is now called 'simple' and 'all'"])
    assert resolve_sections("causal,trainable")[0] == ("trainable", "causal")
    with pytest.raises(ValueError, match="unknown section 'nope'; valid sections: simple, all"):
        resolve_sections(["nope"])
    assert main(["explain", "--section", "simplified", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "note: section 'simplified' is now called 'simple' and 'all'" in captured.err
    assert '"sections": [\n      "simple",\n      "all"\n    ]' in captured.out


def test_option_dependent_steps_answer_with_the_option(capsys):
    walk = explain(scale=False, sections="trainable")
    with pytest.raises(KeyError, match="appears without --no-scale"):
        walk.step("trainable.scaled_scores")
    assert main(["explain", "--no-scale", "--expect", "trainable.scaled_scores=1,2,3,4,5,6"]) == 2
    assert "trainable.scaled_scores is not recorded with these options: it appears without --no-scale" in \
        capsys.readouterr().err
    assert main(["explain", "--section", "simple", "--expect", "causal.weights=1"]) == 2
    assert "section 'causal' is not selected by --section" in capsys.readouterr().err


def test_seed_004_the_whole_note_is_diagnosed(cat_sat, capsys, tmp_path):
    # the note's hand calculation: one slip in a score, then weights and context worked out from it
    results, text = verdict(cat_sat, "trainable.scores=4,5,1", "trainable.weights=0.27,0.72,0.01",
                            "trainable.context=1.27,1.01")
    assert [r.mistake for r in results] == ["one_wrong_number", "follows_from_yours", "follows_from_yours"]
    assert results[2].inherited_from == "trainable.weights"
    assert "your numbers follow correctly from your own trainable.weights, which is wrong" in text
    w = tmp_path / "w.json"
    w.write_text(__import__("json").dumps(CAT_SAT_W))
    args = ["explain", "--tokens", "The cat sat", "--embeddings", str(CAT_SAT_X), "--weights", str(w),
            "--query", "The", "--no-scale", "--section", "trainable", "--format", "json",
            "--expect", "trainable.scores=4,5,1", "--expect", "trainable.context=1.2446,1.0899"]
    assert main(args) == 1
    checks = __import__("json").loads(capsys.readouterr().out)["checks"]
    assert [c["mistake"] for c in checks] == ["one_wrong_number", None]
    assert checks[1]["ok"] and checks[1]["basis"] == "rounded"
