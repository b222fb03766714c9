"""Bad input on the command line, swept: every subcommand, every kind of mistake a learner or a
practitioner makes (issue 17's trials and more). Each one must end the same way: exit code 2, exactly one
line on stderr that names what was wrong, no traceback, and nothing written.

The table is run in-process (``attnlab.cli.main``, fast); a handful of cases run as real processes too, to
prove that no traceback reaches the terminal and that the exit status is 2. Nothing here runs a benchmark:
every ``bench`` case must be refused before one starts (``run_bench`` and the workers are replaced by a
function that fails the test).

Placeholders in the argv: ``{out}`` an empty folder that must stay empty, ``{pre}`` a folder of files that
exist already (``{pre}/old.png``, ``old.html``, ``old.json``, ``emb.json`` ...), ``{nofolder}`` a folder
that does not exist, ``{ro}`` a folder no file can be created in (``/proc``: a read-only folder made with
chmod would not do, the suite may run as root).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnlab.cli import main

HUGE = "99999999999999999999"  # 20 digits: beyond int64
INVISIBLE = "\u200b\u200b \u2060\ufeff"  # zero-width space, word joiner, byte-order mark
RO = "/proc"  # no file can be created here, not even by root


def _png(name: str = "x.png") -> list[str]:
    return ["--out", f"{{out}}/{name}"]


def _html(name: str = "x.html") -> list[str]:
    return ["--out", f"{{out}}/{name}"]


# (argv, a substring of the one error line). Grouped by subcommand; each group's own mistakes first, then
# the input options every toy-input command shares (run through explain, heatmap and report alike).
EXPLAIN = [
    # issue 17's trials
    (["--section", "rope", "--rope-shift", HUGE], "--rope-shift must be from 1 to 16777211"),
    (["--section", "window", "--window-size", HUGE], "--window-size must be from 1 to 2048"),
    (["--section", "rope", "--rope-shift", "9223372036854775807"], "exact only up to 2^24"),
    (["--section", "rope", "--rope-shift", "100000000"], "--rope-shift must be from 1 to"),
    (["--section", "rope", "--rope-shift", "16777212"], "--rope-shift must be from 1 to 16777211"),
    (["--tokens", INVISIBLE], "made only of invisible characters"),
    (["--tokens", "a \u200b b"], "token 2 is made only of invisible characters (U+200B)"),
    (["--dim", "5"], "--dim sets the width of the random embeddings drawn for --tokens"),
    (["--dim", "4", "--tokens", "a b", "--embeddings", "[[1, 2], [3, 4]]"], "with --embeddings it changes nothing"),
    (["--model", "minilm", "--text", INVISIBLE], "--text is made only of invisible characters"),
    (["--model", "minilm", "--text", ""], "--text is empty"),
    (["--model", "minilm", "--text", "   "], "--text is empty"),
    # huge, negative and zero integers
    (["--seed", HUGE], "--seed must be at most"),
    (["--seed", "-1"], "--seed must be an int >= 0"),
    (["--heads", HUGE], "--heads must be at most 16"),
    (["--heads", "0"], "--heads must be an int >= 1"),
    (["--d-out", HUGE], "--d-out must be at most 1024"),
    (["--d-out", "-3"], "--d-out must be an int >= 1"),
    (["--tokens", "a b", "--dim", HUGE], "--dim must be at most 1024"),
    (["--tokens", "a b", "--dim", "0"], "--dim must be an int >= 1"),
    (["--section", "gqa", "--kv-groups", HUGE], "--kv-groups must divide heads"),
    (["--section", "gqa", "--kv-groups", "0"], "--kv-groups must be an int >= 1"),
    (["--section", "window", "--window-size", "0"], "--window-size must be an int >= 1"),
    (["--section", "rope", "--rope-shift", "0"], "--rope-shift must be an int >= 1"),
    (["--section", "rope", "--rope-shift", "-5"], "--rope-shift must be an int >= 1"),
    (["--precision", HUGE], "--precision must be in 0..10"),
    (["--precision", "-1"], "--precision must be in 0..10"),
    (["--query", HUGE], "--query position must be in 1..6"),
    (["--query", "0"], "--query position must be in 1..6"),
    (["--layer", HUGE], "--layer applies to a pretrained model only"),
    (["--head", "2"], "--head applies to a pretrained model only"),
    # NaN, inf and empty numbers
    (["--dropout", "nan"], "--dropout must be a number in [0, 1)"),
    (["--dropout", "inf"], "--dropout must be a number in [0, 1)"),
    (["--dropout=-inf"], "--dropout must be a number in [0, 1)"),
    (["--dropout", "1"], "--dropout must be a number in [0, 1)"),
    (["--dropout", ""], "argument --dropout: invalid float value: ''"),
    (["--section", "rope", "--rope-base", "nan"], "--rope-base must be a number > 1"),
    (["--section", "rope", "--rope-base", "inf"], "--rope-base must be a number > 1 (and finite)"),
    (["--section", "rope", "--rope-base", "1"], "--rope-base must be a number > 1"),
    (["--section", "rope", "--rope-base", ""], "argument --rope-base: invalid float value"),
    (["--seed", ""], "argument --seed: invalid int value: ''"),
    (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    (["--heads", "two"], "argument --heads: invalid int value: 'two'"),
    (["--embeddings", "[[NaN, 1], [2, 3]]"], "--embeddings: row 1, column 1 must be a finite number, got nan"),
    (["--embeddings", "[[1, Infinity], [2, 3]]"], "row 1, column 2 must be a finite number, got inf"),
    (["--embeddings", "[[1e39, 1], [2, 3]]"], "is too large for float32"),
    (["--embeddings", f"[[{HUGE}{HUGE}{HUGE}{HUGE}0, 1]]"], "is too large for float32"),
    (["--embeddings", "[[3e38, 1, 1], [2, 3, 1]]", "--section", "all"], "all.scores is inf at [0, 0]: overflow"),
    (["--embeddings", "[[3e38, 1, 1], [2, 3, 1]]", "--section", "rope"], "rope.scores is inf"),
    (["--embeddings", "[[3e38, 1, 1], [2, 3, 1]]", "--section", "window"], "window.scores is inf"),
    (["--embeddings", ""], "--embeddings is empty"),
    (["--embeddings", "[]"], "--embeddings is empty"),
    (["--embeddings", "[[1, 2], [3]]"], "--embeddings has ragged rows"),
    (["--embeddings", "[[1, 2], [3, 4"], "--embeddings: the inline value is not valid JSON"),
    (["--embeddings", '[["a", 1]]'], "--embeddings: row 1, column 1 must be a number"),
    (["--tokens", ""], "--tokens is empty"),
    (["--tokens", "   "], "--tokens is empty"),
    (["--tokens", "a b c", "--embeddings", "[[1, 2], [3, 4]]"], "tokens and embeddings must have the same count"),
    (["--query", "nope"], "--query 'nope' is not one of the tokens"),
    (["--query", ""], "--query '' is not one of the tokens"),
    (["--weights", ""], "--weights is empty"),
    (["--weights", "{{}}"], "--weights must have keys W_query, W_key, W_value"),
    # files: missing, unreadable, directories, wrong kind
    (["--embeddings", "{nofolder}/emb.json"], "--embeddings: no such file"),
    (["--embeddings", "{pre}"], "--embeddings: not a file"),
    (["--embeddings", "{pre}/emb.txt"], "must end in .json, .csv, .npy"),
    (["--embeddings", "{pre}/bad.npy"], "is not a valid .npy file"),
    (["--embeddings", "{pre}/latin1.csv"], "is not a UTF-8 text file"),
    (["--embeddings", "{pre}/objects.npy"], "holds Python objects, not numbers"),
    (["--embeddings", "{pre}/nan.csv"], "must be a finite number"),
    (["--weights", "{nofolder}/w.json"], "--weights: no such file"),
    (["--weights", "{pre}"], "--weights: not a file"),
    (["--weights", "{pre}/list.json"], "--weights must be a JSON object"),
    (["--embeddings", "/proc/self/mem.json"], "--embeddings: no such file"),
    # sections and steps
    (["--section", "bogus"], "unknown section 'bogus'"),
    (["--section", ""], "--section is empty; valid sections: simple"),
    (["--window-size", "2"], "--window-size applies to section 'window' only"),
    (["--rope-shift", "2"], "--rope-shift applies to section 'rope' only"),
    (["--kv-groups", "2"], "--kv-groups applies to section 'gqa' only"),
    (["--section", "cache", "--expect", "gqa.weights=1"], "section 'gqa' is not selected by --section"),
    (["--expect", "window.mask=1"], "add --section window"),
    (["--expect", "nope"], "--expect"),
    # unknown and abbreviated options, wrong choices
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--sect", "all"], "unrecognized arguments: --sect"),
    (["--token", "a b"], "unrecognized arguments: --token"),
    (["--format", "yaml"], "argument --format: invalid choice: 'yaml'"),
    (["--precision"], "argument --precision: expected one argument"),
]

HEATMAP = [
    (["--section", "causal", "--step", "window.mask", *_png()], "use --section window"),
    (["--section", "window", "--step", "rope.scores", *_png()], "--step rope.scores is a step of section rope"),
    (["--step", "nope.nothing", *_png()], "no step 'nope.nothing'"),
    (["--step", "window.nothing", *_png()], "no step 'window.nothing'"),
    (["--step", "window.queries", *_png()], "is not a query x key matrix"),
    (["--step", "input.embeddings", *_png()], "is not a query x key matrix"),
    (["--section", "all", "causal", *_png()], "unrecognized arguments: causal"),
    (["--section", "multihead", "--head", HUGE, *_png()], "--head must be from 1 to 2"),
    (["--section", "multihead", "--head", "0", *_png()], "--head must be from 1 to 2"),
    (["--head", "1", *_png()], "--head applies to --section multihead only"),
    (["--layer", "1", *_png()], "--layer applies to a pretrained model only"),
    (["--section", "rope", "--rope-shift", HUGE, *_png()], "--rope-shift must be from 1 to"),
    (["--section", "window", "--window-size", HUGE, *_png()], "--window-size must be from 1 to 2048"),
    (["--tokens", INVISIBLE, *_png()], "made only of invisible characters"),
    (["--dim", "7", *_png()], "--dim sets the width"),
    (["--out", "{out}/x.jpeg"], "unknown extension '.jpeg'"),
    (["--out", "{out}/x"], "unknown extension '(none)'"),
    (["--out", "{out}"], "unknown extension"),
    (["--out", "{pre}/dir.png"], "is a directory"),
    (["--out", "{pre}/old.png"], "exists; pass --force to overwrite it"),
    (["--out", "{nofolder}/x.png"], "does not exist"),
    (["--out", f"{RO}/x.png"], "takes no new file"),
    (["--out", "{pre}/emb.json/x.png"], "is not a folder"),
    (["--out", "{pre}/old.png", "--force", "--tokens", ""], "--tokens is empty"),
    (["--model", "minilm", "--text", INVISIBLE, *_png()], "--text is made only of invisible characters"),
    (["--model", "minilm", *_png()], "--model and --text go together"),
    (["--no-value", *_png()], "unrecognized arguments: --no-value"),
    (["--o", "{out}/x.png"], "unrecognized arguments: --o"),
]

REPORT = [
    (["--out", "{out}/x.png"], "unknown extension '.png'"),
    (["--out", "{pre}/old.html"], "exists; pass --force to overwrite it"),
    (["--out", "{pre}/dir.html"], "is a directory"),
    (["--out", "{nofolder}/x.html"], "does not exist"),
    (["--out", f"{RO}/x.html"], "takes no new file"),
    (["--head", HUGE, *_html()], "--head must be a 1-based head number from 1 to 2"),
    (["--head", "1", "--section", "causal", *_html()], "--head picks the head shown first in section multihead"),
    (["--section", "rope", "--rope-shift", "9223372036854775807", *_html()], "exact only up to 2^24"),
    (["--section", "window", "--window-size", HUGE, *_html()], "--window-size must be from 1 to 2048"),
    (["--section", "nope", *_html()], "unknown section 'nope'"),
    (["--tokens", INVISIBLE, *_html()], "made only of invisible characters"),
    (["--dim", "2", *_html()], "--dim sets the width"),
    (["--embeddings", "[[NaN]]", *_html()], "must be a finite number"),
    (["--seed", HUGE, *_html()], "--seed must be at most"),
    (["--model", "minilm", "--text", "", *_html()], "--text is empty"),
    (["--text", "The cat sat.", *_html()], "--model and --text go together"),
    (["--forc", *_html()], "unrecognized arguments: --forc"),
]

BENCH = [
    (["--json", "{ro}/b.json", "--quick"], "folder '/proc' takes no new file"),
    (["--json", "{nofolder}/b.json", "--quick"], "does not exist"),
    (["--json", "{pre}/old.json", "--quick"], "exists; pass --force to overwrite it"),
    (["--json", "{pre}", "--quick"], "is a directory"),
    (["--json", "{pre}/emb.json/b.json", "--quick"], "is not a folder"),
    (["--plot", "{out}/b.svg", "--quick"], "give a .png file name"),
    (["--plot", "{ro}/b.png", "--quick"], "folder '/proc' takes no new file"),
    (["--plot", "{pre}/old.png", "--quick"], "exists; pass --force"),
    (["--decode", "--json", "{ro}/d.json"], "folder '/proc' takes no new file"),
    (["--context-parallel", "2", "--json", "{ro}/c.json"], "folder '/proc' takes no new file"),
    (["--context-parallel", "2", "--plot", "{out}/c.png"], "--plot applies to the variants and --decode"),
    (["--decode", "--context-parallel", "2"], "--decode and --context-parallel are separate benchmarks"),
    (["--batch", HUGE], "expected a positive integer up to 2147483647"),
    (["--tokens", HUGE], "expected a positive integer up to 2147483647"),
    (["--width", HUGE], "expected a positive integer up to 2147483647"),
    (["--heads", HUGE], "expected a positive integer up to 2147483647"),
    (["--repeats", HUGE], "expected a positive integer up to 2147483647"),
    (["--rounds", HUGE], "expected a positive integer up to 2147483647"),
    (["--warmup", HUGE], "expected an integer >= 0 up to 2147483647"),
    (["--threads", HUGE], "expected a positive integer up to 2147483647"),
    (["--window", HUGE], "expected a positive integer up to 2147483647"),
    (["--documents", HUGE], "expected a positive integer up to 2147483647"),
    (["--context-parallel", HUGE], "expected an integer >= 2 up to 2147483647"),
    (["--batch", "0"], "expected a positive integer, got 0"),
    (["--warmup", "-1"], "expected an integer >= 0, got -1"),
    (["--tokens", "nan"], "expected a positive integer, got 'nan'"),
    (["--tokens", ""], "expected a positive integer, got ''"),
    (["--batch", "1000", "--tokens", "2000000000", "--width", "1024", "--heads", "8"], "more than this machine's"),
    (["--quick", "--heads", "3"], "--heads 3 does not divide --width 256"),
    (["--quick", "--variants", "nope"], "unknown variant 'nope' in --variants"),
    (["--quick", "--variants", ""], "(none given) in --variants"),
    (["--quick", "--variants", "ch03,ch03"], "names a variant twice"),
    (["--quick", "--baseline", "nope"], "unknown --baseline 'nope'"),
    (["--quick", "--window", "4", "--documents", "2"], "--window and --documents are measured one at a time"),
    (["--quick", "--documents", "9999"], "--documents 9999 is more than --tokens 256"),
    (["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--quik"], "unrecognized arguments: --quik"),
    (["--variant", "ch03"], "unrecognized arguments: --variant"),
]

TOP = [
    (["nope"], "argument COMMAND: invalid choice: 'nope'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["explain", "--help-me"], "unrecognized arguments: --help-me"),
]

CHECK = [
    (["{nofolder}/notes.md"], "notes.md"),
    (["{pre}/latin1.csv"], "latin1.csv"),
    (["{pre}/emb.json", "--bogus"], "unrecognized arguments: --bogus"),
    (["--format", "yaml", "{pre}/notes.md"], "argument --format: invalid choice: 'yaml'"),
]


def _has_check() -> bool:
    from attnlab.cli import build_parser

    return "check" in build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]


CASES = ([("explain", *case) for case in EXPLAIN] + [("heatmap", *case) for case in HEATMAP]
         + [("report", *case) for case in REPORT] + [("bench", *case) for case in BENCH]
         + [(None, *case) for case in TOP]
         + ([("check", *case) for case in CHECK] if _has_check() else []))


def test_there_are_at_least_100_cases_across_every_subcommand():
    assert len(CASES) >= 100
    commands = {c[0] for c in CASES}
    assert {"explain", "heatmap", "report", "bench"} <= commands


@pytest.fixture
def places(tmp_path):
    out, pre = tmp_path / "out", tmp_path / "pre"
    out.mkdir()
    pre.mkdir()
    for name in ("old.png", "old.html"):
        (pre / name).write_bytes(b"kept as it was")
    (pre / "old.json").write_text("{}")
    (pre / "emb.json").write_text("[[1, 2], [3, 4]]")
    (pre / "emb.txt").write_text("1 2")
    (pre / "bad.npy").write_bytes(b"not numpy at all")
    (pre / "latin1.csv").write_bytes("1,2\n3,\xe9\n".encode("latin-1"))
    np.save(pre / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (pre / "nan.csv").write_text("1,2\nnan,4\n")
    (pre / "list.json").write_text("[1, 2]")
    (pre / "notes.md").write_text("# notes\n")
    (pre / "dir.png").mkdir()
    (pre / "dir.html").mkdir()
    before = {p.name: p.read_bytes() for p in pre.iterdir() if p.is_file()}
    return {"out": out, "pre": pre, "nofolder": tmp_path / "no" / "such" / "folder", "ro": Path(RO),
            "before": before}


def _fill(argv: list[str], places: dict) -> list[str]:
    return [a.format(**{k: v for k, v in places.items() if k != "before"}) for a in argv]


@pytest.fixture
def no_benchmark(monkeypatch):
    """Any benchmark that starts fails the test: bad input must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a benchmark started on bad input")

    import attnlab.bench
    import attnlab.bench.context_parallel as cp
    from attnlab.bench import decode

    monkeypatch.setattr(attnlab.bench, "run_bench", refuse)
    monkeypatch.setattr(decode, "run_decode", refuse)
    monkeypatch.setattr(cp, "run_cp_bench", refuse)


@pytest.mark.parametrize(("command", "argv", "expected"), CASES,
                         ids=[f"{c[0] or 'attnlab'}:{' '.join(c[1])[:60]}" for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(command, argv, expected, places, capsys, no_benchmark):
    args = ([command] if command else []) + _fill(argv, places)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert expected in err, err
    assert list(places["out"].iterdir()) == []  # nothing written
    pre = places["pre"]
    assert {p.name: p.read_bytes() for p in pre.iterdir() if p.is_file()} == places["before"]  # nothing changed
    assert not [p for p in pre.iterdir() if p.name.startswith(".")]  # no temporary file left behind


# A few of the same through a real process: what the terminal shows, and the exit status the shell sees.
_SUBPROCESS = [
    ["explain", "--section", "rope", "--rope-shift", HUGE],
    ["heatmap", "--section", "window", "--window-size", HUGE, "--out", "{out}/x.png"],
    ["bench", "--json", "{ro}/b.json", "--quick", "--variants", "ch03"],
]


@pytest.mark.parametrize("argv", _SUBPROCESS, ids=[" ".join(a)[:50] for a in _SUBPROCESS])
def test_a_real_process_shows_no_traceback(argv, places):
    run = subprocess.run([sys.executable, "-m", "attnlab", *_fill(argv, places)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("attnlab "), run.stderr
    assert run.stdout == ""
    assert list(places["out"].iterdir()) == []


# --------------------------------------------------------------------------------------------------
# The learner cases with a right result instead of an error
# --------------------------------------------------------------------------------------------------


def test_rope_shift_at_the_float32_limit_agrees_and_a_larger_one_is_refused(capsys):
    """2^24 - (T - 1) is the largest shift whose positions float32 holds exactly: with head size 2 (angle =
    position, exact) the shifted scores still equal the unshifted ones; one more is refused."""
    from attnlab.explain import explain

    walk = explain(sections="rope", rope_shift=2**24 - 5)  # 6 tokens: the last one at position 2^24
    step = walk.step("rope.scores_shifted")
    assert step.extra["largest_position"] == 2**24
    assert step.detail[0].startswith("equals rope.scores")
    with pytest.raises(ValueError, match="rope_shift must be from 1 to 16777211"):
        explain(sections="rope", rope_shift=2**24 - 4)


def test_rope_shift_that_loses_float32_precision_says_so():
    """Head size 4 has a second pair turning by 0.01 per position: at positions near 10^6 its float32 angle is
    rounded, so the shifted scores differ; the detail line says that float32 is the cause, not RoPE."""
    from attnlab.explain import explain

    walk = explain(sections="rope", d_out=4, rope_shift=1_000_000)
    lines = walk.step("rope.scores_shifted").detail
    assert lines[0].startswith("DIFFERS FROM rope.scores")
    assert "float32, not RoPE" in lines[1] and "a smaller --rope-shift" in lines[1]
    assert walk.step("rope.scores_shifted").extra["max_rotation_error_float32"] > 1e-6
    # the default shift: equal, and no float32 excuse
    calm = explain(sections="rope", d_out=4).step("rope.scores_shifted").detail
    assert len(calm) == 1 and calm[0].startswith("equals rope.scores")


def test_rope_base_without_effect_is_said(capsys):
    assert main(["explain", "--section", "rope", "--rope-base", "500"]) == 0
    out, err = capsys.readouterr()
    assert err == ("attnlab explain: note: --rope-base 500 changes nothing with head size 2 (one feature pair, "
                   "turned by θ_1 = 1 for every base); add --d-out 4 to see it\n")
    assert "changes none of these" in out.replace("\n   ", "").replace("  ", " ")
    # with head size 4 the base matters: the numbers change and no note is printed
    assert main(["explain", "--section", "rope", "--rope-base", "500", "--d-out", "4", "--format", "json"]) == 0
    out500, err = capsys.readouterr()
    assert err == ""
    assert main(["explain", "--section", "rope", "--d-out", "4", "--format", "json"]) == 0
    out_default = capsys.readouterr().out

    def cos(text):
        return next(s["values"] for s in json.loads(text)["steps"] if s["id"] == "rope.cos")

    a, b = np.asarray(cos(out500)), np.asarray(cos(out_default))
    assert a.shape == b.shape == (6, 4)
    np.testing.assert_array_equal(a[:, 0], b[:, 0])  # θ_1 = 1 for every base: identical (same operations)
    assert not np.allclose(a[:, 1], b[:, 1])  # θ_2 = base^(-1/2): 0.0447 vs 0.01


def test_heatmap_draws_every_opt_in_step(tmp_path, capsys):
    """Every query x key step of every opt-in section can be drawn with --step (its section is chosen for it,
    or named by --section)."""
    from attnlab.explain import MODERN_SECTIONS, explain
    from attnlab.maps import is_map

    walk = explain(sections=list(MODERN_SECTIONS))
    ids = [s.id for s in walk.steps if is_map(s)]
    assert {i.partition(".")[0] for i in ids} == set(MODERN_SECTIONS)
    from attnlab.heatmap import walkthrough_figure

    ids_run: list[str] = []
    for section in MODERN_SECTIONS:  # the first and the last map of each section, the others in-process
        mine = [s for s in ids if s.startswith(f"{section}.")]
        for step in mine[1:-1]:
            assert walkthrough_figure(walk, step=step).axes
        ids_drawn = [mine[0], mine[-1]]
        ids_run.extend(ids_drawn)
    for i, step in enumerate(ids_run):
        extra = ["--section", step.partition(".")[0]] if i % 2 else []  # with and without --section
        path = tmp_path / f"{step}.png"
        assert main(["heatmap", "--step", step, *extra, "--out", str(path), "--no-values"]) == 0, capsys.readouterr()
        assert path.stat().st_size > 1000
    capsys.readouterr()


def test_bench_refuses_an_unwritable_json_before_running(tmp_path, capsys, no_benchmark):
    """The issue's case: the whole benchmark ran, then writing the JSON failed. Now it never starts."""
    assert main(["bench", "--quick", "--variants", "ch03", "--json", f"{RO}/bench.json"]) == 2
    assert "folder '/proc' takes no new file" in capsys.readouterr().err


def test_working_shows_float32_numbers_cleanly(capsys):
    """0.4935 is 0.49350002 in float32: the written-out working shows 0.4935 (the shortest decimal of the
    float32 number), never the float32 artefact."""
    assert main(["explain", "--embeddings", "[[0.4935, 0.1], [0.3, 0.7]]", "--section", "simple"]) == 0
    out = capsys.readouterr().out
    assert "0.4935" in out and "0.49350002" not in out and "0.30000001" not in out
    assert "[0.3, 0.7] · [0.4935, 0.1]" in out
    from attnlab.explain.steps import fmt

    assert fmt(np.float32(0.4935), 8, trim=True) == "0.4935"
    assert fmt(np.float32(0.4935), 8) == "0.49350000"  # tables: the same digits, padded
    assert fmt(0.123456789, 4) == "0.1235"  # fewer decimals than float32 holds: rounded as before
    assert fmt(float(np.float32(1 / 3)), 10) == "0.3333333400"  # float32's 1/3: 8 digits tell it apart
