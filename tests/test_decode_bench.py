"""``attnlab bench --decode``: the KV-byte formula for the book's GPT-2 124M shape, a small run whose
counted cache bytes equal the formula and whose cached logits equal the recomputed ones, and the CLI
(table, JSON, plot, one-line usage errors)."""

from __future__ import annotations

import json

import pytest

from attnlab.bench.decode import DECODE_DEFAULT, _Block, kv_bytes_formula
from attnlab.cli import main


def test_formula_for_the_books_gpt2_124m():
    cfg = DECODE_DEFAULT
    mha, _ = kv_bytes_formula(cfg, "mha", 204)
    assert mha == 2 * 12 * 12 * 64 * 4 == 73728  # keys and values, 12 layers, 12 heads of 64, float32
    assert kv_bytes_formula(cfg, "gqa", 204) == (mha // 4, mha // 4 * 204)  # 3 key/value heads: 12 / 3 = 4x less
    assert kv_bytes_formula(cfg, "mqa", 204) == (mha // 12, mha // 12 * 204)
    assert kv_bytes_formula(cfg, "swa", 204) == (mha, mha * 64)  # capped at the window
    assert kv_bytes_formula(cfg, "swa", 10) == (mha, mha * 10)
    assert kv_bytes_formula(cfg, "mla", 204) == (12 * 96 * 4, 12 * 96 * 4 * 204)  # latent 768 // 8


def test_the_decoder_is_the_books_gpt_shape():
    # One block built for real (7M parameters; the whole model would take seconds to initialise).
    block = _Block(DECODE_DEFAULT, "mha")
    per_block = sum(p.numel() for p in block.parameters())
    assert per_block == 7_085_568  # the book's TransformerBlock with qkv_bias=False
    m = DECODE_DEFAULT.model
    total = m.n_layers * per_block + 2 * m.vocab_size * m.emb_dim + m.context_length * m.emb_dim + 2 * m.emb_dim
    assert total == 163_009_536  # the book's GPTModel (124M with the output head tied to the embedding)
    assert block.att.num_heads == 12 and block.att.head_dim == 64


def test_cli_quick_smoke_run(tmp_path, capsys):
    """What CI runs: ``attnlab bench --decode --quick`` (every variant), with --json and --plot; the cache
    bytes counted from the buffers equal the formula and the cached logits equal the recomputed ones."""
    out, png = tmp_path / "d.json", tmp_path / "kv.png"
    assert main(["bench", "--decode", "--quick", "--no-progress", "--json", str(out), "--plot", str(png)]) == 0
    stdout = capsys.readouterr().out
    assert "Targets met by" in stdout and "KV per token / total" in stdout  # the legend under the table
    assert all(f"│ {name} " in stdout for name in ("mha", "gqa", "mqa", "swa", "mla"))
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["mha", "gqa", "mqa", "swa", "mla"]
    for name, r in rows.items():
        assert r["kv_bytes_per_token"] == r["kv_formula_per_token"], name
        assert r["kv_bytes_total"] == r["kv_formula_total"], name
        # the benchmark's own correctness column (a report threshold, not a rounding bound): far below the
        # logits' size (~1) and far above float32 rounding; same_tokens is the exact check
        assert r["max_logit_diff"] < 1e-4 and r["same_tokens"], name
        # the same float64 division on both sides: approx's 1e-6 only absorbs JSON's decimal round trip
        assert r["speedup"] == pytest.approx(r["cached"]["tokens_per_s"] / r["uncached"]["tokens_per_s"])
    assert rows["swa"]["kv_bytes_total"] == 8 * rows["swa"]["kv_bytes_per_token"]  # window 8 < 28 tokens
    assert rows["gqa"]["kv_bytes_per_token"] * 4 == rows["mha"]["kv_bytes_per_token"]  # 8 heads, 2 kv heads
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "--decode", "--quick", "--json", str(out)]) == 2  # exists: never overwritten unasked


def test_cli_variants_and_tokens(tmp_path):
    out = tmp_path / "d.json"
    assert main(["bench", "--decode", "--quick", "--tokens", "3", "--variants", "mla,mqa", "--no-progress",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["rows"]] == ["mla", "mqa"] and data["config"]["new_tokens"] == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variants", "mha,nope"], "--variants for --decode"),
        (["--width", "8"], "--width does not apply to --decode"),
        (["--tokens", "100"], "must fit the context_length of 64"),
        (["--plot", "x.svg"], "give a .png file name"),
    ],
)
def test_cli_usage_errors(extra, message, capsys):
    assert main(["bench", "--decode", "--quick", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
