"""The walkthrough's numbers against the book's and the seed notes', its data model, checks and renderers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnlab.explain import SECTIONS, Step, Walkthrough, check, explain, parse_expect
from attnlab.explain.check import format_results
from attnlab.explain.render_markdown import to_markdown
from attnlab.explain.render_text import to_text
from tolerances import abs_tol, printed_atol

# The book prints 4 decimals: half a unit of the last one, plus our float32 bound (n = the chapter's chained
# reductions: d_in 3, d_out 2, 6 tokens, out_proj 2; values below 2.5 in size).
TOL = printed_atol(4, torch.float32, 3 + 2 + 6 + 2, scale=2.5)
BOOK_N = 3 + 2 + 6 + 2  # the same n, for comparisons of two computations (tests/tolerances.py)

CAT_RAN = ("The cat ran", [[0.2, 0.1, 0.5], [0.9, 0.1, 0.3], [0.4, 0.8, 0.2]])
CAT_SAT_X = [[1, 0, 1], [0, 1, 1], [1, 1, 0]]
CAT_SAT_W = {"W_query": [[1, 0], [0, 1], [1, 1]], "W_key": [[0, 1], [1, 0], [1, 1]],
             "W_value": [[1, 1], [0, 1], [1, 0]]}


@pytest.fixture(scope="module")
def book() -> Walkthrough:
    return explain()


@pytest.fixture(scope="module")
def cat_sat() -> Walkthrough:
    return explain("The cat sat", CAT_SAT_X, query="The", weights=CAT_SAT_W, scale=False)


def close(actual, expected, tol=TOL) -> None:
    """tol: TOL against the book's printed numbers, 0 where both sides are the same numbers (said at the call),
    else a bound from tests/tolerances.py."""
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               atol=tol, rtol=0)


def q(walk: Walkthrough, step_id: str) -> np.ndarray:
    return walk.step(step_id).query_values(walk.query)


# --------------------------------------------------------------------------------------------------
# The book's numbers (chapter 3), with no options
# --------------------------------------------------------------------------------------------------


def test_default_is_the_books_example(book):
    assert book.tokens == ("Your", "journey", "starts", "with", "one", "step")
    assert book.query_label == "journey" and book.query == 1
    assert book.settings.d_in == 3 and book.settings.d_out == 2 and book.settings.heads == 2
    assert book.sections == ["input", *SECTIONS]


def test_simplified_attention_for_journey(book):
    close(book.step("simple.scores").values, [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865])
    close(book.step("simple.weights_by_sum").values, [0.1455, 0.2278, 0.2249, 0.1285, 0.1077, 0.1656])
    close(book.step("simple.weights_by_sum").extra["sum_of_scores"], 6.5617)
    close(book.step("simple.weights_naive").values, [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581])
    close(book.step("simple.weights").values, [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581])
    close(book.step("simple.context").values, [0.4419, 0.6515, 0.5683])
    written = "\n".join(book.step("simple.scores").detail)
    assert "= 0.55×0.43 + 0.87×0.15 + 0.66×0.89 = 0.2365 + 0.1305 + 0.5874 = 0.9544" in written


def test_all_tokens_matrices(book):
    close(book.step("all.scores").values, [
        [0.9995, 0.9544, 0.9422, 0.4753, 0.4576, 0.6310],
        [0.9544, 1.4950, 1.4754, 0.8434, 0.7070, 1.0865],
        [0.9422, 1.4754, 1.4570, 0.8296, 0.7154, 1.0605],
        [0.4753, 0.8434, 0.8296, 0.4937, 0.3474, 0.6565],
        [0.4576, 0.7070, 0.7154, 0.3474, 0.6654, 0.2935],
        [0.6310, 1.0865, 1.0605, 0.6565, 0.2935, 0.9450]])
    weights = book.step("all.weights").values
    close(weights, [
        [0.2098, 0.2006, 0.1981, 0.1242, 0.1220, 0.1452],
        [0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581],
        [0.1390, 0.2369, 0.2326, 0.1242, 0.1108, 0.1565],
        [0.1435, 0.2074, 0.2046, 0.1462, 0.1263, 0.1720],
        [0.1526, 0.1958, 0.1975, 0.1367, 0.1879, 0.1295],
        [0.1385, 0.2184, 0.2128, 0.1420, 0.0988, 0.1896]])
    close(weights.sum(axis=-1), np.ones(6), tol=abs_tol(torch.float32, 6))
    close(book.step("all.context").values, [
        [0.4421, 0.5931, 0.5790],
        [0.4419, 0.6515, 0.5683],
        [0.4431, 0.6496, 0.5671],
        [0.4304, 0.6298, 0.5510],
        [0.4671, 0.5910, 0.5266],
        [0.4177, 0.6503, 0.5645]])


def test_trainable_weights(book):
    close(q(book, "trainable.queries"), [0.4306, 1.4551])
    assert book.step("trainable.keys").shape == (6, 2) and book.step("trainable.values").shape == (6, 2)
    close(book.step("trainable.scores").values[1, 1], 1.8524)  # the book's attn_score_22
    close(q(book, "trainable.scores"), [1.2705, 1.8524, 1.8111, 1.0795, 0.5577, 1.5440])
    close(q(book, "trainable.weights"), [0.1500, 0.2264, 0.2199, 0.1311, 0.0906, 0.1820])
    close(q(book, "trainable.context"), [0.3061, 0.8210])
    v1 = book.step("trainable.v1_output").values
    close(v1, [[0.2996, 0.8053], [0.3061, 0.8210], [0.3058, 0.8203], [0.2948, 0.7939], [0.2927, 0.7891],
               [0.2990, 0.8040]])
    close(v1, book.step("trainable.context").values, tol=abs_tol(torch.float32, BOOK_N))
    close(book.step("trainable.v2_output").values, [
        [-0.0739, 0.0713], [-0.0748, 0.0703], [-0.0749, 0.0702], [-0.0760, 0.0685], [-0.0763, 0.0679],
        [-0.0754, 0.0693]])


def test_causal_attention(book):
    close(book.step("causal.weights").values, [
        [0.1921, 0.1646, 0.1652, 0.1550, 0.1721, 0.1510],
        [0.2041, 0.1659, 0.1662, 0.1496, 0.1665, 0.1477],
        [0.2036, 0.1659, 0.1662, 0.1498, 0.1664, 0.1480],
        [0.1869, 0.1667, 0.1668, 0.1571, 0.1661, 0.1564],
        [0.1830, 0.1669, 0.1670, 0.1588, 0.1658, 0.1585],
        [0.1935, 0.1663, 0.1666, 0.1542, 0.1666, 0.1529]])
    close(book.step("causal.mask").values, np.tril(np.ones((6, 6))))
    close(book.step("causal.weights_zeroed").extra["row_sums"], [0.1921, 0.3700, 0.5357, 0.6775, 0.8415, 1.0000])
    renorm = book.step("causal.weights_renormalized").values
    close(renorm, [
        [1.0000, 0, 0, 0, 0, 0],
        [0.5517, 0.4483, 0, 0, 0, 0],
        [0.3800, 0.3097, 0.3103, 0, 0, 0],
        [0.2758, 0.2460, 0.2462, 0.2319, 0, 0],
        [0.2175, 0.1983, 0.1984, 0.1888, 0.1971, 0],
        [0.1935, 0.1663, 0.1666, 0.1542, 0.1666, 0.1529]])
    masked = book.step("causal.scores_masked").values
    assert np.isneginf(masked[0, 1:]).all() and np.isfinite(np.tril(masked)).all()
    close(masked[1, :2], [0.3293, 0.1218])
    close(book.step("causal.weights_masked").values, renorm, tol=abs_tol(torch.float32, BOOK_N))
    assert book.step("causal.weights_masked").extra["agree"] is True


def test_dropout_follows_the_books_seed(book):
    close(book.step("causal.dropout_example").values, [
        [2, 2, 0, 2, 2, 0], [0, 0, 0, 2, 0, 2], [2, 2, 2, 2, 0, 2],
        [0, 2, 2, 0, 0, 2], [0, 2, 0, 2, 0, 2], [0, 2, 2, 2, 2, 0]], tol=0)  # exact: 0 or 1 / (1 - p) = 2
    dropped = book.step("causal.dropout_weights").values
    close(dropped[2], [0.7599, 0.6194, 0.6206, 0, 0, 0])
    close(dropped[0], [2.0, 0, 0, 0, 0, 0])


def test_the_chapters_classes(book):
    out = book.step("causal.output")
    assert out.shape == (2, 6, 2)
    close(out.values[:, 0], [[-0.4519, 0.2216]] * 2)
    close(out.values[0], out.values[1], tol=0)  # exact: two copies of one input, one batched computation
    close(book.step("multihead.wrapper_output").values[0], [-0.4519, 0.2216, 0.4772, 0.1063])
    assert book.step("multihead.wrapper_output").extra["batch_shape"] == [2, 6, 4]
    close(book.step("multihead.mha_output").values[0], [0.3190, 0.4858])
    assert book.step("multihead.head_weights").shape == (2, 6, 6)
    assert book.step("multihead.mha_weights").shape == (2, 6, 6)
    close(book.step("multihead.mha_weights").values.sum(-1), np.ones((2, 6)), tol=abs_tol(torch.float32, 6))
    # the merged heads through out_proj give the module's output
    concat, w_out = book.step("multihead.mha_concat").values, book.step("multihead.W_out").values
    bias = book.step("multihead.W_out").extra["bias"]
    close(concat @ w_out + bias, book.step("multihead.mha_output").values, tol=abs_tol(torch.float32, 2))  # d_out 2


def test_global_rng_is_left_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    explain(sections=["trainable", "causal"])
    assert torch.equal(torch.rand(3), expected)  # exact: the same generator state gives the same draws


# --------------------------------------------------------------------------------------------------
# The seed notes' own examples
# --------------------------------------------------------------------------------------------------


def test_seed_003_the_cat_ran():
    walk = explain(*CAT_RAN, query="ran")
    close(walk.step("simple.scores").values, [0.26, 0.50, 0.84])
    close(walk.step("simple.weights").values, [0.2465, 0.3133, 0.4402])
    close(walk.step("simple.context").values, [0.5074, 0.4081, 0.3053])
    results = check(walk, [parse_expect("simple.weights=0.2465,0.3133,0.4402", walk.step_ids),
                           parse_expect("simple.context=0.5074,0.4081,0.3053", walk.step_ids)])
    assert all(r.ok for r in results)


def test_seed_004_correct_result(cat_sat):
    close(q(cat_sat, "trainable.queries"), [2, 1], tol=0)
    close(cat_sat.step("trainable.keys").values, [[1, 2], [2, 1], [1, 1]], tol=0)  # k_sat is [1, 1]
    close(q(cat_sat, "trainable.scores"), [4, 5, 3], tol=0)
    close(q(cat_sat, "trainable.weights"), [0.2447, 0.6652, 0.0900])
    close(q(cat_sat, "trainable.context"), [1.2447, 1.0900])
    assert "trainable.scaled_scores" not in cat_sat


def test_seed_004_slip_is_diagnosed(cat_sat):
    results = check(cat_sat, [parse_expect("trainable.scores=4,5,1", cat_sat.step_ids)])
    (res,) = results
    assert not res.ok and len(res.mismatches) == 1
    m = res.mismatches[0]
    assert m.index == (0, 2) and m.expected == 1 and m.actual == 3
    text = "\n".join(format_results(results))
    assert "score(The, sat): you have 1, attnlab has 3" in text
    assert "score(The, sat) = q_The · k_sat = [2, 1] · [1, 1] = 3" in text
    assert "k_sat = x_sat @ W_key = [1, 1, 0] @ W_key = [1, 1]" in text
    assert res.inherits == ["trainable.weights", "trainable.context"]


def test_seed_004_hand_numbers_pass_when_right(cat_sat):
    exps = [parse_expect(e, cat_sat.step_ids) for e in (
        "trainable.scores=4,5,3", "trainable.weights=0.24,0.67,0.09", "trainable.context=1.2447,1.09",
        "trainable.queries=2,1", "trainable.keys=1,2;2,1;1,1")]
    results = check(cat_sat, exps)
    assert [r.ok for r in results] == [True] * 5
    assert results[-1].scope == "all" and results[0].scope == "query"


def test_later_failures_say_what_they_inherit(cat_sat):
    exps = [parse_expect("trainable.weights=0.27,0.72,0.01", cat_sat.step_ids),
            parse_expect("trainable.scores=4,5,1", cat_sat.step_ids)]
    weights, scores = check(cat_sat, exps)
    assert weights.inherited_from == "trainable.scores" and scores.inherited_from is None
    assert "exp(4) / (exp(4) + exp(5) + exp(3))" in "\n".join(weights.explanation)


# --------------------------------------------------------------------------------------------------
# --expect parsing and comparison
# --------------------------------------------------------------------------------------------------


def test_compares_at_the_users_decimals(book):
    ok = check(book, [parse_expect("simple.weights=0.14,0.24,0.23,0.12,0.11,0.16", book.step_ids)])[0]
    assert ok.ok
    bad = check(book, [parse_expect("simple.weights=0.14,0.24,0.23,0.12,0.11,0.17", book.step_ids)])[0]
    assert not bad.ok and bad.mismatches[0].index == (5,) and bad.mismatches[0].decimals == 2
    # more decimals than shown: compared at the shown precision
    assert check(book, [parse_expect("simple.scores=[0.954401, 1.495, 1.4754, 0.8434, 0.707, 1.0865]",
                                     book.step_ids)])[0].ok


@pytest.mark.parametrize("text, message", [
    ("trainable.score=1,2", "unknown step 'trainable.score'; valid steps: input.embeddings"),
    ("trainable.scores", "must be STEP=VALUES"),
    ("simple.scores=1,x", "'x' is not a number"),
    ("simple.scores=1,2;3", "rows must have the same length"),
    ("simple.scores=", "no values given"),
])
def test_parse_expect_errors(book, text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_expect(text, book.step_ids)


def test_expect_wrong_count_names_the_shapes(book):
    with pytest.raises(ValueError, match=r"expected 1 row\(s\) of 6 .* or 6 row\(s\) of 6"):
        check(book, [parse_expect("all.scores=1,2,3", book.step_ids)])


def test_expect_masked_minus_inf(book):
    assert check(book, [parse_expect("causal.scores_masked=0.3293,0.1218,-inf,-inf,-inf,-inf",
                                     book.step_ids)])[0].ok


# --------------------------------------------------------------------------------------------------
# The data model
# --------------------------------------------------------------------------------------------------


def test_every_step_is_labelled_and_explains_every_cell(book):
    for step in book.steps:
        assert isinstance(step, Step) and step.why and step.formula and step.title
        assert len(step.labels) == step.values.ndim
        for dep in step.depends:
            assert dep in book, (step.id, dep)
        for index in np.ndindex(*step.shape):
            lines = book.explain_cell(step.id, index)
            assert lines and lines[0].startswith(book.cell_name(step.id, index))


def test_full_matrices_for_every_query(book):
    for sid in ("trainable.scores", "trainable.weights", "causal.weights_masked"):
        assert book.step(sid).shape == (6, 6)
    assert book.step("trainable.context").shape == (6, 2)
    assert book.step("multihead.head_weights").axes == ("head", "query", "key")
    assert book.step("multihead.head_weights").query_values(book.query).shape == (2, 6)


def test_explain_cell_for_hover(book):
    lines = book.explain_cell("trainable.scores", (2, 5))
    assert lines[0].startswith("score(starts, step) = q_starts · k_step = ")
    assert any(line.strip().startswith("k_step = x_step @ W_key") for line in lines)
    assert book.explain_cell("causal.scores_masked", (0, 3))[0].startswith("masked(Your, with) = -inf")
    assert "dropped" in book.explain_cell("causal.dropout_weights", (1, 0))[0]
    assert book.cell_name("trainable.queries", (1, 0)) == "q_journey[1]"
    with pytest.raises(IndexError):
        book.explain_cell("trainable.scores", (6, 0))


def test_dependents(book):
    assert book.dependents("trainable.scores") == [
        "trainable.scaled_scores", "trainable.weights", "trainable.context"]
    assert "causal.dropout_weights" in book.dependents("causal.scores")


def test_json_round_trip(book):
    data = json.loads(book.to_json())
    assert data["format"] == "attnlab.explain" and data["version"] == 1
    assert data["query"] == {"index": 1, "position": 2, "token": "journey", "label": "journey"}
    steps = {s["id"]: s for s in data["steps"]}
    assert list(steps) == book.step_ids
    s = steps["trainable.scores"]
    assert s["shape"] == [6, 6] and s["labels"][0] == list(book.labels) and s["query_axis"] == 0
    assert s["how"] == {"kind": "dot", "operands": ["trainable.queries", "trainable.keys"], "params": {}}
    close(s["values"][1], [1.2705, 1.8524, 1.8111, 1.0795, 0.5577, 1.5440])
    assert steps["causal.scores_masked"]["values"][0][1] == "-inf"
    first = steps["simple.scores"]["values"][0]  # the shortest decimal that reads back as the float32
    assert abs(first - 0.9544) <= abs_tol(torch.float32, 3) and len(repr(first)) <= 10  # 0.9544 exactly, d = 3


def test_repr_html_is_guarded(book):
    out = book._repr_html_()
    assert out is None or isinstance(out, str)


def test_sections_subset():
    walk = explain(sections=["causal"])
    assert walk.sections == ["input", "causal"]
    assert "trainable.scores" not in walk
    close(walk.step("causal.weights_renormalized").values[1, :2], [0.5517, 0.4483])


def test_only_the_selected_sections_are_built(monkeypatch):
    from attnlab.explain import build

    def must_not_run(*args, **kwargs):
        raise AssertionError("a section that was not selected was built")

    for name in ("_all", "_trainable", "_causal", "_multihead"):
        monkeypatch.setattr(build, name, must_not_run)
    tokens = " ".join(f"w{i}" for i in range(1500))
    walk = explain(tokens, sections="simple")
    assert walk.sections == ["input", "simple"]
    assert {s.section for s in walk.steps} == {"input", "simple"}
    assert walk.step("simple.scores").shape == (1500,)
    assert len(walk.step("simple.scores").detail) >= 12  # the detail lines of the section still come


def test_each_section_alone_equals_the_full_walkthrough(book, cat_sat):
    """No section depends on another one having run (seeds, weights, detail lines)."""
    for full, kwargs in ((book, {}), (cat_sat, {"tokens": "The cat sat", "embeddings": CAT_SAT_X, "query": "The",
                                                "weights": CAT_SAT_W, "scale": False})):
        for sec in SECTIONS:
            alone = explain(sections=[sec], **kwargs)
            ids = [s.id for s in full.steps if s.section in ("input", sec)]
            assert alone.step_ids == ids
            for step_id in ids:
                a, b = alone.step(step_id), full.step(step_id)
                np.testing.assert_array_equal(a.values, b.values, err_msg=step_id)  # exact: same computation
                assert a.detail == b.detail, step_id


def test_no_runtime_self_check_of_loop_against_matrix(monkeypatch):
    # the loop and the matrix product sum in different orders: in float32 they may differ in the last bits
    # (as at --dim 3000000); the walkthrough must not raise over it (the core's tests cover loop = matrix)
    from attnlab import functional

    monkeypatch.setattr(functional, "dot_scores", lambda query, x: (x @ query) * (1 + 1e-3))
    walk = explain("a b c", dim=1024, sections="simple")
    assert walk.step("simple.scores").shape == (3,)


@pytest.mark.parametrize("kwargs, message", [
    ({"d_out": 100_000}, "d_out must be at most 1024 for a step-by-step walkthrough, got 100000"),
    ({"tokens": "a b", "dim": 3_000_000}, "dim must be at most 1024 for a step-by-step walkthrough, got 3000000"),
    ({"heads": 64}, "heads must be at most 16 for a step-by-step walkthrough, got 64"),
    ({"tokens": " ".join(["w"] * 3000)}, "tokens must have at most 2048 tokens for a step-by-step walkthrough, got 3000"),
    ({"embeddings": np.zeros((2, 5000), dtype=np.float32)}, "embeddings must have at most 1024 columns"),
    ({"weights": {k: np.zeros((3, 4096)) for k in ("W_query", "W_key", "W_value")}},
     "weights must have at most 1024 columns"),
])
def test_sizes_are_capped_before_anything_is_allocated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        explain(**kwargs)


@pytest.mark.parametrize("embeddings, got", [
    ([[1e39, 1.0]], "got 1e+39"),
    ([[1.0, -1e39]], "got -1e+39"),
    ([[10**400, 1]], "(401 characters)"),
    (np.array([[1e39, 1.0]]), "got 1e+39"),
])
def test_numbers_beyond_float32_are_refused_without_a_warning(embeddings, got):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="too large for float32") as info:
            explain("a", embeddings)
    assert got in str(info.value) and "\n" not in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"weights W_key: row 2, column 1 is too large for float32"):
            explain(weights={"W_query": np.ones((3, 2)), "W_key": [[1, 1], [1e39, 1], [1, 1]],
                             "W_value": np.ones((3, 2))})


# --------------------------------------------------------------------------------------------------
# Own input
# --------------------------------------------------------------------------------------------------


def test_random_embeddings_are_seeded_and_rounded():
    a, b = explain("one two three four", dim=5), explain("one two three four", dim=5)
    x = a.step("input.embeddings").values
    assert x.shape == (4, 5) and np.array_equal(x, b.step("input.embeddings").values)  # exact: same seed
    close(x, np.round(x, 2), tol=abs_tol(torch.float32, 0, ops=1, scale=np.abs(x).max()))  # float32 of 2 decimals
    assert a.settings.embeddings == "random"
    assert not np.array_equal(x, explain("one two three four", dim=5, seed=7).step("input.embeddings").values)


def test_given_weights_are_carried_into_causal_and_multihead(cat_sat):
    close(cat_sat.step("causal.W_key").values, CAT_SAT_W["W_key"], tol=0)  # exact: a copy of small integers
    close(cat_sat.step("causal.scores").values, cat_sat.step("trainable.scores").values, tol=0)  # exact: integers
    # heads are column slices of the given weights: the wrapper's and MultiHeadAttention's heads agree
    tol = abs_tol(torch.float32, BOOK_N, scale=4.0)  # integer inputs: scores up to 4
    close(cat_sat.step("multihead.head_weights").values, cat_sat.step("multihead.mha_weights").values, tol=tol)
    close(cat_sat.step("multihead.wrapper_output").values, cat_sat.step("multihead.mha_concat").values, tol=tol)
    # the classes scale by sqrt(d_k) always, so with scale=False SelfAttention_v1 differs from the steps
    assert "always divides" in cat_sat.step("trainable.v1_output").detail[0]


def test_query_forms():
    tokens, x = CAT_RAN
    assert explain(tokens, x, query="cat").query == 1
    assert explain(tokens, x, query="3").query == 2
    assert explain(tokens, x, query=0).query == 0
    assert explain(tokens, x).query == 1


def test_repeated_tokens_get_unique_labels():
    walk = explain("the cat saw the dog", dim=2, query="5")
    assert walk.labels == ("the(1)", "cat", "saw", "the(4)", "dog")
    assert explain("the cat saw the dog", dim=2, query="the(4)").query == 3
    with pytest.raises(ValueError, match="appears 2 times"):
        explain("the cat saw the dog", dim=2, query="the")


def test_long_and_wide_inputs_render_shortened():
    tokens = " ".join(f"w{i}" for i in range(1, 31))
    walk = explain(tokens, dim=40, d_out=8, heads=4, query="w29")
    assert walk.step("trainable.scores").shape == (30, 30)
    assert walk.step("multihead.mha_weights").shape == (4, 30, 30)
    text = to_text(walk, width=100)
    assert "…" in text and "▸ w29" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    md = to_markdown(walk)
    assert "| … |" in md or " … |" in md


@pytest.mark.parametrize("kwargs, message", [
    ({"tokens": "a b", "embeddings": [[1.0, 2.0]]}, "same count: 2 tokens but 1 embedding rows"),
    ({"tokens": "a b", "embeddings": [[1.0, 2.0], [1.0]]}, "ragged rows"),
    ({"tokens": "a", "embeddings": [[1.0, "x"]]}, "must be a number"),
    ({"tokens": "a", "embeddings": [[1.0, float("nan")]]}, "finite"),
    ({"tokens": ""}, "empty"),
    ({"tokens": "a b", "query": "c"}, "not one of the tokens"),
    ({"weights": CAT_SAT_W, "heads": 3}, "heads must divide d_out"),
    ({"weights": {"W_query": [[1, 0]], "W_key": [[1, 0]], "W_value": [[1, 0]]}}, "d_in = 3 rows"),
    ({"weights": {"W_query": [[1], [0], [1]]}}, "missing W_key, W_value"),
    ({"sections": ["simple", "nope"]}, "unknown section 'nope'"),
    ({"dropout": 1.0}, "dropout must be a number in"),
])
def test_bad_input_raises_value_error(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        explain(**kwargs)


def test_text_and_markdown_renderers(book):
    text = to_text(book, width=100)
    for heading in ("1. Simplified self-attention", "2. Attention weights for all tokens",
                    "3. Self-attention with trainable weights", "4. Causal attention", "5. Multi-head attention"):
        assert heading in text
    assert "\x1b[" not in text
    assert "▸ journey    0.9544   1.4950  1.4754  0.8434  0.7070  1.0865" in text
    md = to_markdown(book, checks=["✓ simple.scores: matches"])
    assert "| query \\ key | Your | journey | starts | with | one | step |" in md
    assert "| **journey** | 0.9544 | 1.4950 | 1.4754 | 0.8434 | 0.7070 | 1.0865 |" in md
    assert md.count("## ") >= 6 and "✓ simple.scores" in md


def test_precision_changes_the_shown_decimals(book):
    assert "0.95 " in to_text(book, precision=2, width=100)
    assert math.isclose(float(book.step("simple.scores").values[0]), 0.9544, abs_tol=abs_tol(torch.float32, 3))  # exact in decimal


def test_tokens_of_the_wrong_type_are_an_input_error():
    import attnlab
    from attnlab.errors import AttnlabInputTypeError

    with pytest.raises(AttnlabInputTypeError, match=r"tokens must be a str .* got int \(5\)"):
        attnlab.explain(tokens=5)
