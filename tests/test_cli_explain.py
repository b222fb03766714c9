"""``attnlab explain`` end to end, through the real console script.

Every run of the console script starts a fresh process (importing torch takes seconds), so those runs
are started at once in a thread pool by one fixture and the tests read their results. Checks that do not
need a separate process (formats, files, colour, more bad inputs) call ``attnlab.cli.main`` in-process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from attnlab.cli import main
from tolerances import printed_atol

SCRIPT = Path(sys.executable).with_name("attnlab")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "attnlab"]

CAT_RAN = ["--tokens", "The cat ran", "--embeddings", "[[0.2,0.1,0.5],[0.9,0.1,0.3],[0.4,0.8,0.2]]",
           "--query", "ran"]
CAT_SAT_W = {"W_query": [[1, 0], [0, 1], [1, 1]], "W_key": [[0, 1], [1, 0], [1, 1]],
             "W_value": [[1, 1], [0, 1], [1, 0]]}


def _files(tmp: Path) -> dict[str, str]:
    files = {
        "cat_sat_x.json": json.dumps([[1, 0, 1], [0, 1, 1], [1, 1, 0]]),
        "w.json": json.dumps(CAT_SAT_W),
        "x.csv": "0.2,0.1,0.5\n0.9,0.1,0.3\n\n0.4,0.8,0.2\n",
        "bad.json": "{not json",
        "bad.csv": "1,2,3\n4,abc,6\n",
        "inf.csv": "1,2,3\n4,1e999,6\n",
        "big.csv": "1,2\n1e39,4\n",
        "x.txt": "1,2,3\n",
        "garbage.npy": "this is not an npy file",
        "w_shape.json": json.dumps({"W_query": [[1, 0], [0, 1]], "W_key": [[1, 0], [0, 1]],
                                    "W_value": [[1, 0], [0, 1]]}),
        "w_missing.json": json.dumps({"W_query": [[1, 0], [0, 1], [1, 1]]}),
    }
    out = {}
    for name, text in files.items():
        (tmp / name).write_text(text)
        out[name] = str(tmp / name)
    np.save(tmp / "x.npy", np.array([[0.2, 0.1, 0.5], [0.9, 0.1, 0.3], [0.4, 0.8, 0.2]]))
    np.save(tmp / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(tmp / "big.npy", np.array([[1.0, 2.0], [3.0, -1e39]]))  # float64: beyond float32
    (tmp / "adir.json").mkdir()
    for name in ("x.npy", "objects.npy", "big.npy", "adir.json"):
        out[name] = str(tmp / name)
    return out


def _bad(f: dict[str, str]) -> dict[str, tuple[list[str], str]]:
    """Bad input: arguments and the part of the one-line message that names the problem."""
    two = ["--tokens", "a b"]
    return {
        "count_differs": (["--tokens", "a b c", "--embeddings", "[[1,2],[3,4]]"], "2 embedding rows"),
        "ragged": (two + ["--embeddings", "[[1,2],[3]]"], "ragged rows"),
        "non_numeric": (two + ["--embeddings", '[[1,"x"],[3,4]]'], "must be a number"),
        "nan": (two + ["--embeddings", "[[1,NaN],[3,4]]"], "finite"),
        "inf_csv": (["--tokens", "a b", "--embeddings", f["inf.csv"]], "finite"),
        "malformed_json": (two + ["--embeddings", "[[1,2],[3,4]"], "not valid JSON"),
        "malformed_json_file": (two + ["--embeddings", f["bad.json"]], "not valid JSON"),
        "malformed_csv": (two + ["--embeddings", f["bad.csv"]], "must be a number, got 'abc'"),
        "missing_file": (two + ["--embeddings", "/no/such/x.json"], "no such file"),
        "unreadable_file": (two + ["--embeddings", f["adir.json"]], "not a file"),
        "bad_npy": (two + ["--embeddings", f["garbage.npy"]], "not a valid .npy"),
        "pickled_npy": (two + ["--embeddings", f["objects.npy"]], "holds Python objects"),
        "wrong_suffix": (two + ["--embeddings", f["x.txt"]], "must end in .json, .csv, .npy"),
        "unknown_query": (CAT_RAN[:4] + ["--query", "dog"], "'dog' is not one of the tokens"),
        "query_position": (CAT_RAN[:4] + ["--query", "7"], "position must be in 1..3"),
        "heads": (["--weights", f["w.json"], "--heads", "3"], "--heads must divide d_out"),
        "empty_tokens": (["--tokens", ""], "--tokens is empty"),
        "empty_embeddings": (["--embeddings", "[]"], "--embeddings is empty"),
        "weights_shape": (["--weights", f["w_shape.json"]], "W_query must have d_in = 3 rows"),
        "weights_missing": (["--weights", f["w_missing.json"]], "missing W_key, W_value"),
        "unknown_expect": (["--expect", "trainable.score=1,2"], "valid steps: input.embeddings, simple.scores"),
        "expect_count": (["--expect", "trainable.scores=1,2"], "expected 1 row(s) of 6"),
        "unknown_section": (["--section", "simple", "attention"], "unknown section 'attention'"),
        "dropout": (["--dropout", "1.5"], "--dropout must be a number in [0, 1)"),
        "not_an_int": (["--heads", "two"], "invalid int value"),
        "precision": (["--precision", "-1"], "--precision must be in 0..10"),
        # sizes are capped before anything is allocated
        "huge_d_out": (["--d-out", "100000", "--section", "simple"],
                       "--d-out must be at most 1024 for a step-by-step walkthrough, got 100000"),
        "huge_dim": (["--tokens", "a b c", "--dim", "3000000", "--section", "simple"],
                     "--dim must be at most 1024 for a step-by-step walkthrough, got 3000000"),
        "huge_heads": (["--heads", "1000000"], "--heads must be at most 16 for a step-by-step walkthrough, got 1000000"),
        "too_many_tokens": (["--tokens", " ".join(["w"] * 5000), "--section", "simple"],
                            "--tokens must have at most 2048 tokens for a step-by-step walkthrough, got 5000"),
        # numbers beyond float32: the user's number, no numpy overflow warning
        "float32_inline": (two + ["--embeddings", "[[1e39,1],[2,3]]"],
                           "--embeddings: row 1, column 1 is too large for float32 (at most ±3.402823e+38), got 1e+39"),
        "float32_npy": (two + ["--embeddings", f["big.npy"]], "row 2, column 2 is too large for float32"),
        "float32_csv": (two + ["--embeddings", f["big.csv"]], "row 2, column 1 is too large for float32"),
        "float32_weights": (["--weights", json.dumps({"W_query": [[1], [1], [1]], "W_key": [[1], [1], [-1e39]],
                                                      "W_value": [[1], [1], [1]]})],
                            "--weights W_key: row 3, column 1 is too large for float32"),
    }


# The list of bad inputs, each through the real console script; the rest run in-process.
SUBPROCESS_BAD = ("count_differs", "ragged", "non_numeric", "nan", "malformed_json", "malformed_csv",
                  "missing_file", "unreadable_file", "unknown_query", "heads", "empty_tokens", "weights_shape",
                  "unknown_expect", "unknown_section", "huge_d_out", "huge_dim", "huge_heads", "too_many_tokens",
                  "float32_inline", "float32_npy", "float32_weights")


def _cases(f: dict[str, str]):
    cat_sat = ["--tokens", "The cat sat", "--embeddings", f["cat_sat_x.json"], "--weights", f["w.json"],
               "--query", "The", "--no-scale"]
    cases = {
        "default": [],
        "cat_ran": CAT_RAN + ["--section", "simple", "--expect", "simple.scores=0.26,0.50,0.84",
                              "--expect", "simple.weights=0.2465,0.3133,0.4402",
                              "--expect", "simple.context=0.5074,0.4081,0.3053"],
        "cat_sat_fail": cat_sat + ["--section", "trainable", "--expect", "trainable.scores=4,5,1"],
        "json": cat_sat + ["--format", "json", "--expect", "trainable.scores=4,5,1"],
        "long_simple": ["--tokens", " ".join(f"w{i}" for i in range(1500)), "--section", "simple"],
    }
    cases.update({f"bad_{name}": args for name, (args, _) in _bad(f).items() if name in SUBPROCESS_BAD})
    return cases


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return _files(tmp_path_factory.mktemp("explain_cli"))


@pytest.fixture(scope="module")
def runs(files) -> dict[str, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS")}

    def run(item):
        name, args = item
        return name, subprocess.run(COMMAND + ["explain", *args], check=False, capture_output=True, text=True, env=env,
                                    cwd=Path(files["w.json"]).parent, timeout=600)

    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1) as pool:
        return dict(pool.map(run, _cases(files).items()))


def has_row(text: str, numbers: str) -> bool:
    """Whether ``numbers`` appear in this order on one line, separated by any spaces."""
    return re.search(r"[ \t]+".join(re.escape(n) for n in numbers.split()), text) is not None


def cli(capsys, monkeypatch, args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``attnlab explain ARGS`` in-process: (exit code, stdout, stderr)."""
    for key in ("NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    try:
        code = main(["explain", *args])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_console_script_is_installed():
    assert SCRIPT.exists() or shutil.which("attnlab") or COMMAND[1] == "-m"


BOOK_ROWS = (
    "0.9544 1.4950 1.4754 0.8434 0.7070 1.0865",  # simple.scores
    "0.1455 0.2278 0.2249 0.1285 0.1077 0.1656",  # divide by sum
    "0.1385 0.2379 0.2333 0.1240 0.1082 0.1581",  # softmax
    "0.4419 0.6515 0.5683",  # context
    "0.4306 1.4551",  # query
    "1.2705 1.8524 1.8111 1.0795 0.5577 1.5440",  # trainable scores
    "0.1500 0.2264 0.2199 0.1311 0.0906 0.1820",  # scaled weights
    "0.3061 0.8210", "0.2996 0.8053", "-0.0739 0.0713",
    "0.1921 0.1646 0.1652 0.1550 0.1721 0.1510", "0.5517 0.4483",
    "0.7599 0.6194 0.6206 0.0000 0.0000 0.0000",
    "-0.4519 0.2216", "-0.4519 0.2216 0.4772 0.1063", "0.3190 0.4858",
)


def test_default_shows_the_books_numbers(runs):
    out = runs["default"]
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and "\x1b[" not in out.stdout  # piped: plain text
    for numbers in BOOK_ROWS:
        assert has_row(out.stdout, numbers), numbers
    for heading in ("1. Simplified self-attention", "2. Attention weights for all tokens",
                    "3. Self-attention with trainable weights", "4. Causal attention", "5. Multi-head attention"):
        assert heading in out.stdout


def test_seed_003_the_cat_ran(runs):
    out = runs["cat_ran"]
    assert out.returncode == 0, out.stdout + out.stderr
    assert has_row(out.stdout, "▸ ran 0.2600 0.5000 0.8400")
    assert has_row(out.stdout, "▸ ran 0.2465 0.3133 0.4402")
    assert has_row(out.stdout, "▸ z_ran 0.5074 0.4081 0.3053")
    assert out.stdout.count("✓ ") == 3


def test_seed_004_slip(runs):
    out = runs["cat_sat_fail"]
    assert out.returncode == 1, out.stderr
    text = out.stdout
    assert "✗ trainable.scores: 1 of 3 values differs" in text
    assert "score(The, sat): you have 1, attnlab has 3" in text
    assert "score(The, sat) = q_The · k_sat = [2, 1] · [1, 1] = 3" in text
    assert "k_sat = x_sat @ W_key = [1, 1, 0] @ W_key = [1, 1]" in text
    assert "later steps that inherit this error: trainable.weights, trainable.context" in text
    # the correct result is shown
    assert has_row(text, "▸ The 4 5 3")
    assert has_row(text, "▸ The 0.2447 0.6652 0.0900") and has_row(text, "▸ The 1.2447 1.0900")


def test_json_format(runs):
    out = runs["json"]
    assert out.returncode == 1, out.stderr
    data = json.loads(out.stdout)
    assert data["format"] == "attnlab.explain" and data["tokens"] == ["The", "cat", "sat"]
    assert data["settings"]["scale"] is False and data["settings"]["weights"] == "given"
    steps = {s["id"]: s for s in data["steps"]}
    assert steps["trainable.scores"]["values"][0] == [4, 5, 3]
    assert steps["trainable.keys"]["values"][2] == [1, 1]
    assert steps["trainable.scores"]["labels"] == [["The", "cat", "sat"]] * 2
    book = printed_atol(4, n=3 + 2 + 3, scale=2.0)  # printed at 4 decimals; d_in 3, d_out 2, 3 tokens
    np.testing.assert_allclose(steps["trainable.weights"]["values"][0], [0.2447, 0.6652, 0.0900], atol=book, rtol=0)
    np.testing.assert_allclose(steps["trainable.context"]["values"][0], [1.2447, 1.0900], atol=book, rtol=0)
    (chk,) = data["checks"]
    assert chk["step"] == "trainable.scores" and chk["ok"] is False
    assert chk["first_mismatch"]["index"] == [0, 2] and chk["first_mismatch"]["actual"] == 3
    assert chk["inherits"] == ["trainable.weights", "trainable.context"]


def test_one_section_of_a_long_text_is_small(runs):
    out = runs["long_simple"]
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr == ""
    assert "1. Simplified self-attention" in out.stdout and "2. Attention weights for all tokens" not in out.stdout
    assert len(out.stdout) < 50_000  # only section 1's vectors, shortened: no 1500 x 1500 matrices


@pytest.mark.parametrize("name", SUBPROCESS_BAD)
def test_bad_input_through_the_console_script(runs, files, name):
    out = runs[f"bad_{name}"]
    assert out.returncode == 2, (out.returncode, out.stdout[-500:], out.stderr)
    assert "Traceback" not in out.stderr + out.stdout and "Warning" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("attnlab")
    assert _bad(files)[name][1] in lines[0], lines[0]
    assert out.stdout == ""


# --------------------------------------------------------------------------------------------------
# In-process: the same entry point, without a process per case
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "inf_csv", "malformed_json_file", "bad_npy", "pickled_npy", "wrong_suffix", "query_position",
    "empty_embeddings", "weights_missing", "expect_count", "dropout", "not_an_int", "precision", "float32_csv",
])
def test_more_bad_input(capsys, monkeypatch, files, name):
    args, message = _bad(files)[name]
    code, out, err = cli(capsys, monkeypatch, args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and message in err, err


def test_seed_004_correct_numbers_pass(capsys, monkeypatch, files):
    code, out, _ = cli(capsys, monkeypatch, [
        "--tokens", "The cat sat", "--embeddings", files["cat_sat_x.json"], "--weights", files["w.json"],
        "--query", "1", "--no-scale", "--section", "trainable",
        "--expect", "trainable.scores=4,5,3", "--expect", "trainable.weights=0.2447,0.6652,0.0900",
        "--expect", "trainable.context=1.2447,1.0900", "--expect", "trainable.keys=1,2;2,1;1,1"])
    assert code == 0, out[-2000:]
    assert out.count("✓ ") == 4


def test_markdown_format(capsys, monkeypatch):
    code, out, _ = cli(capsys, monkeypatch, CAT_RAN + ["--format", "markdown", "--section", "simple", "all"])
    assert code == 0
    assert "| **ran** | 0.2465 | 0.3133 | 0.4402 |" in out
    assert "## 2. Attention weights for all tokens" in out and "## 3." not in out


@pytest.mark.parametrize("name", ["x.csv", "x.npy"])
def test_embedding_files(capsys, monkeypatch, files, name):
    code, out, err = cli(capsys, monkeypatch, [
        "--tokens", "The cat ran", "--embeddings", files[name], "--query", "3", "--section", "simple",
        "--expect", "simple.context=0.5074,0.4081,0.3053"])
    assert code == 0, err
    assert "✓ simple.context" in out


def test_colour_in_a_terminal_and_plain_with_no_color(capsys, monkeypatch):
    _, coloured, _ = cli(capsys, monkeypatch, ["--section", "simple"], {"FORCE_COLOR": "1"})
    assert "\x1b[" in coloured
    _, plain, _ = cli(capsys, monkeypatch, ["--section", "simple"], {"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert "\x1b[" not in plain and has_row(plain, "▸ journey 0.9544 1.4950")


def test_expect_needs_its_section(capsys, monkeypatch):
    code, _, err = cli(capsys, monkeypatch, ["--section", "simple", "--expect", "trainable.scores=1,2,3"])
    assert code == 2 and "section 'trainable' is not selected" in err
