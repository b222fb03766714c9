"""``attnlab explain --model DIR``: one head of a local Hugging Face model (decoder or encoder), step by step.

A tiny random Llama (a decoder: RoPE, 4 query heads reading 2 key/value heads) and a tiny random BERT (an
encoder, biases) are saved with ``save_pretrained`` and a word-level tokenizer (tests/hf_models.py). Every
number of the walkthrough is compared with an independent reference computed here from transformers' own
modules in eager mode: the layer's input (``output_hidden_states`` and the layer's input norm), the
projections, HF's ``apply_rotary_pos_emb``, and the attention weights HF's eager attention returns
(``output_attentions=True``); and with the weights recorded through attnlab's registered attention.
Tolerances: tests/tolerances.py (n = the longest reduction, the hidden size or the token count).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network
transformers = pytest.importorskip("transformers", reason="local models need the optional transformers package")
pytest.importorskip("tokenizers", reason="the test tokenizer is built with tokenizers")

from attnlab.cli import main
from attnlab.explain.model import ModelWalkthrough, attention_maps, explain_model
from attnlab.explain.recompute import recompute
from hf_models import TEXT, save_models
from tolerances import assert_close


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def references(saved):
    """{kind: (tokens, hidden states per layer, eager attentions (L, H, T, T), model)} from HF's eager path."""
    out = {}
    for kind in ("llama", "bert"):
        tok = transformers.AutoTokenizer.from_pretrained(saved[kind])
        model = transformers.AutoModel.from_pretrained(saved[kind], attn_implementation="eager").eval()
        ids = tok(TEXT, return_tensors="pt")["input_ids"]  # (1, T)
        with torch.no_grad():
            res = model(ids, output_attentions=True, output_hidden_states=True)
        out[kind] = (tok.convert_ids_to_tokens(ids[0]), res.hidden_states,
                     torch.stack([a[0] for a in res.attentions]), model)  # (L, H, T, T)
    return out


def _step(walk, name):
    return torch.from_numpy(walk.step(f"model.{name}").values.astype(np.float64))


@pytest.mark.parametrize(("kind", "layer", "head"), [("llama", 2, 1), ("llama", 1, 4), ("bert", 3, 2),
                                                     ("bert", 1, 1)])
def test_every_step_equals_transformers_own_modules(saved, references, kind, layer, head):
    walk = explain_model(TEXT, model=str(saved[kind]), layer=layer, head=head)
    tokens, hidden, eager, model = references[kind]
    assert isinstance(walk, ModelWalkthrough) and list(walk.tokens) == tokens
    assert (walk.layer, walk.head, walk.num_layers) == (layer, head, eager.shape[0])
    t, d = len(tokens), model.config.hidden_size
    n_heads = model.config.num_attention_heads
    hd = d // n_heads
    with torch.no_grad():
        if kind == "llama":
            block = model.layers[layer - 1]
            x = block.input_layernorm(hidden[layer - 1])  # (1, T, D): what the attention module reads
            attn = block.self_attn
            q_lin, k_lin, v_lin, names = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), "q_proj k_proj v_proj"
        else:
            x = hidden[layer - 1]  # (1, T, D)
            attn = model.encoder.layer[layer - 1].attention.self
            q_lin, k_lin, v_lin, names = attn.query(x), attn.key(x), attn.value(x), "query key value"
        n_kv = k_lin.shape[-1] // hd
        kv = (head - 1) // (n_heads // n_kv)  # the key/value head of this query head, 0-based
        q = q_lin.view(1, t, n_heads, hd).transpose(1, 2)  # (1, H, T, hd)
        k = k_lin.view(1, t, n_kv, hd).transpose(1, 2)  # (1, H_kv, T, hd)
        v = v_lin.view(1, t, n_kv, hd).transpose(1, 2)  # (1, H_kv, T, hd)
        if kind == "llama":
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            cos, sin = model.rotary_emb(x, torch.arange(t)[None])  # (1, T, hd) each
            q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)  # (1, H, T, hd), (1, H_kv, T, hd)
        else:
            q_rot, k_rot = q, k
    assert walk.kv_head == kv + 1 and walk.num_kv_heads == n_kv
    assert_close(_step(walk, "x"), x[0], dtype=torch.float32)
    w_q, w_k, w_v = (getattr(attn, n).weight for n in names.split())
    # The head's slices are copies of the checkpoint's numbers: exact.
    assert torch.equal(torch.from_numpy(walk.step("model.W_query").values), w_q[(head - 1) * hd:head * hd].T)
    assert torch.equal(torch.from_numpy(walk.step("model.W_key").values), w_k[kv * hd:(kv + 1) * hd].T)
    assert torch.equal(torch.from_numpy(walk.step("model.W_value").values), w_v[kv * hd:(kv + 1) * hd].T)
    assert_close(_step(walk, "queries"), q_rot[0, head - 1], n=d, dtype=torch.float32)
    assert_close(_step(walk, "keys"), k_rot[0, kv], n=d, dtype=torch.float32)
    assert_close(_step(walk, "values"), v[0, kv], n=d, dtype=torch.float32)
    if kind == "llama":  # the projections before RoPE are steps of their own
        assert_close(_step(walk, "queries_projected"), q[0, head - 1], n=d, dtype=torch.float32)
        assert_close(_step(walk, "keys_projected"), k[0, kv], n=d, dtype=torch.float32)
    else:
        assert "model.queries_projected" not in walk
    scores64 = q_rot[0, head - 1].double() @ k_rot[0, kv].double().T * hd ** -0.5  # (T, T), float64
    assert_close(_step(walk, "scores"), scores64, n=d + hd, dtype=torch.float32)
    ref = eager[layer - 1]  # (H, T, T): HF's eager attention weights, every head of the layer
    assert_close(_step(walk, "weights"), ref[head - 1], n=d + hd + t, dtype=torch.float32)
    assert_close(_step(walk, "head_weights"), ref, n=d + hd + t, dtype=torch.float32)
    assert_close(_step(walk, "context"), ref[head - 1].double() @ v[0, kv].double(), n=d + hd + 2 * t,
                 dtype=torch.float32)
    # ... and with the weights the model computed through attnlab's registered attention (maps of report)
    maps = attention_maps(TEXT, model=str(saved[kind]))
    assert_close(_step(walk, "weights"), maps.weights[layer - 1, head - 1], n=d + hd + t, dtype=torch.float32)
    assert walk.step("model.weights").extra["max_abs_diff_to_model"] <= 1e-5  # shown in a detail line


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_the_steps_recompute_from_their_operands(saved, kind):
    """Each step that is an operation on earlier steps (linear, mask, softmax, weighted sum) gives its own
    numbers back when recomputed by attnlab.explain.recompute (float64) from its recorded operands."""
    walk = explain_model(TEXT, model=str(saved[kind]))
    done = []
    for step in walk.steps:
        again = recompute(walk, step)
        if again is None:
            continue
        finite = np.isfinite(step.values)
        assert np.array_equal(finite, np.isfinite(again)), step.id
        assert_close(torch.from_numpy(again[finite]), torch.from_numpy(step.values[finite].astype(np.float64)),
                     n=32 + len(walk.tokens), dtype=torch.float32, msg=step.id)
        done.append(step.name)
    linear = {"queries_projected", "keys_projected", "values"} if kind == "llama" else {"queries", "keys", "values"}
    assert linear | {"weights", "context"} <= set(done)
    assert ("scores_masked" in done) == (kind == "llama")


def test_a_decoder_masks_the_future_and_an_encoder_does_not(saved):
    dec = explain_model(TEXT, model=str(saved["llama"]), layer=1, head=3)
    t = len(dec.tokens)
    future = np.triu(np.ones((t, t), dtype=bool), 1)
    assert dec.causal and np.array_equal(dec.step("model.mask").values, (~future).astype(np.float32))
    masked = dec.step("model.scores_masked").values
    assert np.all(np.isneginf(masked[future])) and np.array_equal(masked[~future], dec.step("model.scores").values[~future])
    weights = dec.step("model.weights").values
    assert np.all(weights[future] == 0.0)  # exp(-inf) is exactly 0
    assert_close(torch.from_numpy(weights.sum(-1)), torch.ones(t), n=t, dtype=torch.float32)
    assert dec.step("model.weights").how.operands == ("model.scores_masked",)
    assert dec.query == t - 1  # a decoder's default query: the last token, which sees every token
    enc = explain_model(TEXT, model=str(saved["bert"]))
    assert not enc.causal and "model.mask" not in enc and "model.scores_masked" not in enc
    assert enc.query == 1 and enc.layer == 3  # default: the first word after [CLS], the last layer


@pytest.mark.parametrize("text", ["cat", "cat sat on"])
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_short_texts(saved, kind, text):
    walk = explain_model(text, model=str(saved[kind]), head=2)
    t = len(walk.tokens)
    assert walk.step("model.weights").values.shape == (t, t)
    assert walk.step("model.head_weights").values.shape[1:] == (t, t)
    assert walk.step("model.weights").extra["max_abs_diff_to_model"] <= 1e-5


def test_all_layers_adds_every_layer_and_head(saved, references):
    walk = explain_model(TEXT, model=str(saved["llama"]), all_layers=True)
    eager = references["llama"][2]
    n = references["llama"][3].config.hidden_size
    assert_close(_step(walk, "layer_weights"), eager, n=n + len(walk.tokens), dtype=torch.float32)


def test_cli_text_and_json(saved, capsys):
    assert main(["explain", "--model", str(saved["llama"]), "--text", TEXT, "--layer", "1", "--head", "3"]) == 0
    out = capsys.readouterr().out
    assert "llama · layer 1 of 2, head 3 of 4 (reads key/value head 2 of 2)" in out
    assert "Masked scores" in out and "RoPE" in out and "differ by at most" in out
    assert main(["explain", "--model", str(saved["bert"]), "--text", TEXT, "--format", "json",
                 "--query", "cat"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["name"] == "bert" and data["model"]["causal"] is False
    assert data["model"]["layer"] == 3 and data["model"]["num_heads"] == 2
    assert data["query"]["token"] == "cat"
    ids = [s["id"] for s in data["steps"]]
    assert ids[:3] == ["model.x", "model.W_query", "model.W_key"] and "model.weights" in ids


@pytest.mark.parametrize(("args", "expected"), [
    (["--layer", "3"], "--layer must be an integer from 1 to 2"),
    (["--head", "5"], "--head must be an integer from 1 to 4"),
    (["--query", "zebra"], "zebra"),
])
def test_cli_bad_input_is_one_line(saved, capsys, args, expected):
    assert main(["explain", "--model", str(saved["llama"]), "--text", TEXT, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and expected in err, err


def test_a_long_text_is_cut_with_one_warning(saved, capsys):
    assert main(["explain", "--model", str(saved["bert"]), "--text", " ".join(["cat"] * 40)]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert len(err) == 1 and "limit of 12 tokens" in err[0], err
    assert "text cut at 12 tokens" in " ".join(captured.out.split())  # the renderer wraps lines
