"""How ``attnlab`` ends when something goes wrong (issue 18, item 6).

- the user's input is wrong (:class:`attnlab.errors.AttnlabInputError`, a ``UsageError`` of the command line,
  a file the user named that cannot be read or written): one line ``attnlab CMD: error: ...``, exit 2;
- anything else is a bug in attnlab -- a ``RuntimeError``, an ``IndexError``, and also a *plain*
  ``ValueError`` / ``TypeError`` / ``OSError`` raised by attnlab's or torch's own code: one line
  ``attnlab CMD: internal error: ...`` that says so, asks for a report and tells how to see the traceback,
  exit 3, no traceback; with ``--debug`` (before or after the subcommand) or ``ATTNLAB_DEBUG=1`` the
  traceback too, exit still 3.

The bugs are planted by replacing the library function a subcommand calls (``monkeypatch``), in-process; a
few runs go through a real ``python -m attnlab`` process to show what the terminal gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import attnlab
from attnlab.cli import EXIT_INPUT, EXIT_INTERNAL, UsageError, debug_requested, main
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError

TRACEBACK = "Traceback (most recent call last)"


def _raiser(exc: BaseException) -> Callable[..., object]:
    def fail(*args: object, **kwargs: object) -> object:
        raise exc

    return fail


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    return err.rstrip("\n")


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case starts without ATTNLAB_DEBUG, whatever the shell running the suite has."""
    monkeypatch.delenv("ATTNLAB_DEBUG", raising=False)


# Where each subcommand's work is done: (module attribute to replace, argv that reaches it).
WORK = {
    "explain": ("attnlab.cli.explain.explain", ["explain", "--section", "simple"]),
    "heatmap": ("attnlab.heatmap.walkthrough_figure", ["heatmap", "--out", "{tmp}/h.png"]),
    "report": ("attnlab.report.html.render_page", ["report", "--out", "{tmp}/r.html"]),  # inside write_report
    "bench": ("attnlab.bench.run_bench", ["bench", "--quick", "--variants", "ch03", "--no-progress"]),
}
BUGS = [RuntimeError("the kernel lost its way"), IndexError("list index out of range"),
        ValueError("not enough values to unpack (expected 3, got 2)"), TypeError("'NoneType' object is not callable"),
        KeyError("W_query"), FileNotFoundError(2, "No such file or directory", "/nonexistent/cache/file")]


def _plant(monkeypatch: pytest.MonkeyPatch, command: str, exc: BaseException, tmp_path: Path) -> list[str]:
    target, argv = WORK[command]
    monkeypatch.setattr(target, _raiser(exc))
    return [a.format(tmp=tmp_path) for a in argv]


@pytest.mark.parametrize("command", sorted(WORK))
@pytest.mark.parametrize("bug", BUGS, ids=[type(b).__name__ for b in BUGS])
def test_a_bug_is_an_internal_error_exit_3_one_line_no_traceback(command, bug, monkeypatch, capsys, tmp_path):
    argv = _plant(monkeypatch, command, bug, tmp_path)
    code, out, err = _run(argv, capsys)
    assert code == EXIT_INTERNAL == 3, err
    line = _one_line(err)
    assert line.startswith(f"attnlab {command}: internal error: {type(bug).__name__}: ")
    assert "this is a bug in attnlab" in line and "please report it" in line
    assert "--debug" in line and "ATTNLAB_DEBUG=1" in line
    assert TRACEBACK not in err and TRACEBACK not in out
    assert "error: " + str(bug) not in line  # never dressed up as the user's mistake
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command", sorted(WORK))
def test_an_input_error_from_the_library_is_exit_2_one_line(command, monkeypatch, capsys, tmp_path):
    argv = _plant(monkeypatch, command, AttnlabInputError("query must be in 1..6, got 9"), tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == EXIT_INPUT == 2, err
    line = _one_line(err)
    assert line.startswith(f"attnlab {command}: error: ") and "9" in line
    assert "internal error" not in line and TRACEBACK not in err


def test_an_input_type_error_is_an_input_error_too(monkeypatch, capsys, tmp_path):
    argv = _plant(monkeypatch, "explain", AttnlabInputTypeError("weights must be a JSON object, got list"), tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert _one_line(err) == "attnlab explain: error: --weights must be a JSON object, got list"  # option named


def test_only_the_first_line_of_a_message_is_shown(monkeypatch, capsys, tmp_path):
    argv = _plant(monkeypatch, "explain", RuntimeError("first line\nsecond line\nthird"), tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == 3 and "first line" in _one_line(err) and "second" not in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_prints_the_traceback_and_still_exits_3(where, monkeypatch, capsys, tmp_path):
    argv = _plant(monkeypatch, "explain", IndexError("tuple index out of range"), tmp_path)
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    code, _, err = _run(argv, capsys)
    assert code == 3
    assert TRACEBACK in err and "IndexError: tuple index out of range" in err
    assert "_raiser.<locals>.fail" in err or "in fail" in err  # the frame that raised is shown
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("attnlab explain: internal error: IndexError: tuple index out of range")
    assert "the traceback is above" in last


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_debug_environment_variable_prints_the_traceback(value, monkeypatch, capsys, tmp_path):
    argv = _plant(monkeypatch, "bench", RuntimeError("worker pipe closed"), tmp_path)
    monkeypatch.setenv("ATTNLAB_DEBUG", value)
    code, _, err = _run(argv, capsys)
    assert code == 3 and TRACEBACK in err and "RuntimeError: worker pipe closed" in err


@pytest.mark.parametrize("value", ["", "0", "false", "no", "off"])
def test_debug_environment_variable_off_values(value, monkeypatch, capsys, tmp_path):
    argv = _plant(monkeypatch, "bench", RuntimeError("worker pipe closed"), tmp_path)
    monkeypatch.setenv("ATTNLAB_DEBUG", value)
    code, _, err = _run(argv, capsys)
    assert code == 3 and TRACEBACK not in err
    _one_line(err)


def test_debug_is_read_from_argv_when_parsing_has_not_finished(monkeypatch):
    assert debug_requested(["--debug", "explain"])
    assert debug_requested(["explain", "--debug"])
    assert not debug_requested(["explain", "--", "--debug"])  # after --, a value, not the option
    assert not debug_requested(["explain"])
    monkeypatch.setenv("ATTNLAB_DEBUG", "1")
    assert debug_requested([])


def test_debug_with_an_input_error_shows_the_traceback_and_exits_2(monkeypatch, capsys, tmp_path):
    argv = _plant(monkeypatch, "report", AttnlabInputError("head must be in 1..2, got 7"), tmp_path)
    code, _, err = _run(["--debug", *argv], capsys)
    assert code == 2 and TRACEBACK in err
    assert err.rstrip("\n").splitlines()[-1] == "attnlab report: error: --head must be in 1..2, got 7"


def test_debug_changes_nothing_for_a_run_that_works(capsys):
    code, out, err = _run(["--debug", "explain", "--section", "simple", "--format", "json"], capsys)
    assert code == 0 and err == "" and '"format": "attnlab.explain"' in out
    code, out_after, err = _run(["explain", "--section", "simple", "--format", "json", "--debug"], capsys)
    assert code == 0 and err == "" and out_after == out


def test_keyboard_interrupt_is_130(monkeypatch, capsys, tmp_path):
    argv = _plant(monkeypatch, "explain", KeyboardInterrupt(), tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == 130 and err == "attnlab: interrupted\n"


def test_a_bug_while_building_the_parser_is_an_internal_error(monkeypatch, capsys):
    monkeypatch.setattr("attnlab.cli.report.register", _raiser(AttributeError("'NoneType' has no 'add_parser'")))
    code, _, err = _run(["report"], capsys)
    assert code == 3
    assert _one_line(err).startswith("attnlab report: internal error: AttributeError: ")


def test_a_user_file_that_cannot_be_read_is_the_users_error(tmp_path, capsys):
    """The OSError of a file the user named is turned into an input error where the command opens it."""
    folder = tmp_path / "emb.json"
    folder.mkdir()
    code, _, err = _run(["explain", "--embeddings", str(folder)], capsys)
    assert code == 2 and _one_line(err).startswith("attnlab explain: error: --embeddings: not a file")
    code, _, err = _run(["explain", "--weights", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "--weights: no such file" in _one_line(err)
    unreadable = Path("/proc/self/mem")  # opens, but reading it from the start fails (EIO), even as root
    if unreadable.exists():
        code, _, err = _run(["check", str(unreadable), "--no-run"], capsys)
        assert code == 2 and _one_line(err).startswith(f"attnlab check: error: NOTES: cannot read {unreadable}")


def test_writing_an_output_file_that_fails_is_the_users_error(monkeypatch, tmp_path, capsys):
    """The disk fills up or the folder goes away after the check: the file the user named, one line, exit 2;
    an OSError naming another file (a package file, a cache) while writing is still a bug."""
    monkeypatch.setattr("attnlab.report.html.write_atomically", _raiser(OSError(28, "No space left on device")))
    out = tmp_path / "r.html"
    code, _, err = _run(["report", "--out", str(out)], capsys)
    assert code == 2
    assert _one_line(err) == f"attnlab report: error: --out: cannot write {str(out)!r}: No space left on device"
    tmp_file = str(tmp_path / ".r.0123.tmp.html")  # write_atomically's temporary file beside it
    monkeypatch.setattr("attnlab.report.html.write_atomically", _raiser(PermissionError(13, "Permission denied",
                                                                                         tmp_file)))
    code, _, err = _run(["report", "--out", str(out)], capsys)
    assert code == 2 and "--out: cannot write" in _one_line(err) and "Permission denied" in err
    asset = "/usr/lib/python3/site-packages/attnlab/report/report.js"
    monkeypatch.setattr("attnlab.report.html.write_atomically", _raiser(FileNotFoundError(2, "No such file", asset)))
    code, _, err = _run(["report", "--out", str(out)], capsys)
    assert code == 3 and _one_line(err).startswith("attnlab report: internal error: FileNotFoundError: ")
    monkeypatch.setattr("attnlab.heatmap.write_atomically", _raiser(OSError(28, "No space left on device")))
    code, _, err = _run(["heatmap", "--out", str(tmp_path / "h.png")], capsys)
    assert code == 2 and "--out: cannot write" in _one_line(err)


def test_output_file_checks_name_the_option(tmp_path, capsys):
    """The one output check (attnlab.maps.check_output_path) behind every option, with the option named."""
    existing = tmp_path / "old.png"
    existing.write_bytes(b"kept")
    for argv, option in ((["heatmap", "--out", str(existing)], "--out"),
                         (["report", "--out", str(tmp_path / "old.png")], "--out"),
                         (["bench", "--quick", "--json", str(existing)], "--json")):
        code, _, err = _run(argv, capsys)
        assert code == 2 and _one_line(err).startswith(f"attnlab {argv[0]}: error: {option}: "), err
    assert existing.read_bytes() == b"kept"


# --------------------------------------------------------------------------------------------------
# The error classes: a library contract
# --------------------------------------------------------------------------------------------------


def test_input_errors_are_value_errors_so_callers_except_value_error_still_works():
    with pytest.raises(ValueError, match="dropout must be a number in"):
        attnlab.explain(dropout=2)
    try:
        attnlab.MultiHeadAttention(3, 2, 6, 0.0, num_heads=4)
    except ValueError as exc:  # a caller written before the error classes existed
        assert isinstance(exc, AttnlabInputError) and "num_heads" in str(exc)
    else:
        pytest.fail("num_heads=4 for d_out=2 was accepted")


def test_input_type_errors_are_type_errors_and_input_errors():
    import torch

    mha = attnlab.MultiHeadAttention(3, 2, 6, 0.0, num_heads=2)
    with pytest.raises(TypeError, match="floating-point") as info:
        mha(torch.ones(1, 6, 3, dtype=torch.long))
    assert isinstance(info.value, AttnlabInputTypeError)
    assert isinstance(info.value, AttnlabInputError) and isinstance(info.value, ValueError)
    assert issubclass(UsageError, AttnlabInputError)


def test_the_error_classes_are_exported_from_attnlab():
    assert attnlab.AttnlabInputError is AttnlabInputError
    assert attnlab.AttnlabInputTypeError is AttnlabInputTypeError
    assert {"AttnlabInputError", "AttnlabInputTypeError"} <= set(attnlab.__all__)


# --------------------------------------------------------------------------------------------------
# Real processes: what the terminal shows, the exit status the shell sees
# --------------------------------------------------------------------------------------------------

# A bug planted in a fresh interpreter, then `attnlab explain` run as `python -m attnlab` would.
_PLANTED = ("import sys, attnlab.cli.explain as m\n"
            "def fail(*a, **k):\n    raise {exc}\n"
            "m.explain = fail\n"
            "from attnlab.cli import main\n"
            "raise SystemExit(main(sys.argv[1:]))\n")


def _process(argv: list[str], exc: str | None = None, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    code = ["-c", _PLANTED.format(exc=exc)] if exc else ["-m", "attnlab"]
    full_env = {k: v for k, v in os.environ.items() if k != "ATTNLAB_DEBUG"}
    full_env.update({"PYTHONWARNINGS": "ignore", **(env or {})})
    return subprocess.run([sys.executable, *code, *argv], capture_output=True, text=True, timeout=120,
                          env=full_env, check=False)


def test_real_process_internal_error_is_one_line_exit_3():
    run = _process(["explain", "--section", "simple"], exc="ZeroDivisionError('division by zero')")
    assert run.returncode == 3, run.stderr
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1 and TRACEBACK not in run.stderr
    assert run.stderr.startswith("attnlab explain: internal error: ZeroDivisionError: division by zero")


def test_real_process_debug_shows_the_traceback():
    run = _process(["--debug", "explain"], exc="ValueError('shape mismatch')")
    assert run.returncode == 3 and TRACEBACK in run.stderr and "ValueError: shape mismatch" in run.stderr
    run = _process(["explain"], exc="ValueError('shape mismatch')", env={"ATTNLAB_DEBUG": "1"})
    assert run.returncode == 3 and TRACEBACK in run.stderr


def test_real_process_input_error_is_exit_2_and_a_closed_pipe_is_quiet():
    run = _process(["explain", "--query", "9"])  # a real mistake, no planting
    assert run.returncode == 2 and run.stderr == "attnlab explain: error: --query position must be in 1..6, got 9\n"
    run = _process(["explain"], exc="BrokenPipeError(32, 'Broken pipe')")  # `attnlab explain | head`
    assert run.returncode == 1 and run.stderr == ""
