"""``attnlab report|heatmap --model DIR``: a local Hugging Face model directory, seen through attnlab.hf.

Tiny random Llama (a decoder, grouped-query heads) and BERT (an encoder) models are saved to a temporary
directory with a word-level tokenizer built offline from a small vocabulary (``tokenizers``), as
``save_pretrained`` writes them. The recorded maps are compared with transformers' own eager attention
(``output_attentions=True``), an independent reference.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network
transformers = pytest.importorskip("transformers", reason="local models need the optional transformers package")
tokenizers = pytest.importorskip("tokenizers", reason="the test tokenizer is built with tokenizers")

from attnlab.cli import main
from attnlab.explain.model import attention_maps
from attnlab.report.codec import decode_bits
from hf_models import TEXT, save_models
from tolerances import assert_close


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{"llama": DIR, "bert": DIR, "no_tokenizer": DIR}, each written by save_pretrained."""
    return save_models(tmp_path_factory.mktemp("models"))


def _hf_eager(directory, text: str) -> tuple[list[str], torch.Tensor]:
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        attn = model(ids, output_attentions=True).attentions  # L x (1, H, T, T)
    return tok.convert_ids_to_tokens(ids[0]), torch.stack([a[0] for a in attn])  # (L, H, T, T)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_maps_of_a_local_model_equal_transformers_eager_attention(saved, kind):
    maps = attention_maps(TEXT, model=str(saved[kind]))
    tokens, ref = _hf_eager(saved[kind], TEXT)
    assert maps.tokens == tokens and maps.model == kind and not maps.truncated
    assert tuple(maps.weights.shape) == tuple(ref.shape)
    assert_close(maps.weights, ref, n=ref.shape[-1] + 32, dtype=torch.float32)
    t = len(tokens)
    if kind == "llama":  # a decoder: every future cell hidden, in every layer
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        assert maps.causal and torch.equal(maps.masked, future.expand(2, t, t))
    else:
        assert maps.masked is None and not maps.causal


def test_report_of_a_local_decoder_draws_its_causal_mask(saved, tmp_path, capsys):
    out = tmp_path / "llama.html"
    assert main(["report", "--model", str(saved["llama"]), "--text", TEXT, "-o", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json" class="attnlab-data">(.*?)</script>',
                                page, re.DOTALL).group(1))
    assert data["title"] == "Attention inside llama"
    step = data["steps"]["model.weights"]
    l, h, t, _ = step["shape"]
    assert (l, h, t) == (2, 4, 11) and data["tokens"][:3] == ["<s>", "the", "cat"]
    masked = decode_bits(step["masked"], l * h * t * t).reshape(l, h, t, t)
    assert np.array_equal(masked, np.broadcast_to(np.triu(np.ones((t, t), bool), 1), (l, h, t, t)))
    assert "causal" in step["formula"]
    assert "wrote" in capsys.readouterr().out


def test_report_and_heatmap_of_a_local_encoder(saved, tmp_path, capsys):
    html, png = tmp_path / "bert.html", tmp_path / "bert.png"
    assert main(["report", "--model", str(saved["bert"]), "--text", TEXT, "-o", str(html), "--layer", "2"]) == 0
    page = html.read_text(encoding="utf-8")
    assert "Attention inside bert" in page and "[CLS]" in page
    assert main(["heatmap", "--model", str(saved["bert"]), "--text", TEXT, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()


def test_heatmap_of_a_local_decoder(saved, tmp_path, capsys):
    png = tmp_path / "llama.png"
    assert main(["heatmap", "--model", str(saved["llama"]), "--text", TEXT, "-o", str(png),
                 "--layer", "1", "--head", "2"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().err == ""


def test_a_long_text_is_cut_with_one_warning_line(saved, tmp_path, capsys):
    out = tmp_path / "long.html"
    long_text = " ".join(["cat"] * 40)
    assert main(["report", "--model", str(saved["bert"]), "--text", long_text, "-o", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("attnlab report: warning: ") and "limit of 12 tokens" in err[0]
    assert "cut" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("case", ["missing", "no_tokenizer", "not_a_model"])
def test_bad_model_directories_are_one_line_errors(saved, tmp_path, capsys, case):
    directory = {"missing": tmp_path / "nowhere", "no_tokenizer": saved["no_tokenizer"],
                 "not_a_model": tmp_path}[case]
    expected = {"missing": "--model must be one of minilm", "no_tokenizer": "has no tokenizer",
                "not_a_model": "is a directory without a config.json"}[case]
    assert main(["report", "--model", str(directory), "--text", TEXT, "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1 and expected in err, err
