"""Running a note's code, never in attnlab's own process: one fresh Python process in a temporary
directory, with a time limit, runs the code blocks in order and prints a marker before each, so every
block's printed output (and a notebook's last expression, shown as a notebook shows it) is known.

A block that fails records the exception, the failing line (as a line of the note) and the value of
each name on that line, so that the report can point at the line that set a wrong value.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.notes.parse import Block

__all__ = ["BlockRun", "run_blocks"]

_MARK = "\x1eattnlab-notes-block"


@dataclass
class BlockRun:
    """What one code block did: ``stdout`` (its printed output), or ``error`` with ``error_line`` (a
    line of the note) and ``names`` (name -> repr of its value then, for the names on that line)."""

    stdout: str = ""
    error: str = ""
    error_line: int = 0
    names: dict[str, str] = field(default_factory=dict)
    ran: bool = False
    timed_out: bool = False  # it was still running at the time limit (the process was killed)


_DRIVER = r'''
import ast, json, sys, traceback
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
ns = {"__name__": "__note__"}
exec("import torch\nimport numpy as np", ns)  # the book notebook's imports, which notes leave out
for b in blocks:
    sys.stdout.write("\n%s %d\n" % (MARK, b["index"]))
    sys.stdout.flush()
    try:
        tree = ast.parse(b["code"])
        last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) and b["notebook"] else None
        if last is not None:
            tree.body = tree.body[:-1]
        exec(compile(tree, "<block %d>" % b["index"], "exec"), ns)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<block %d>" % b["index"], "eval"), ns)
            if value is not None:
                print(repr(value))
    except BaseException as exc:
        tb = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<block %d>" % b["index"]]
        line = tb[-1].lineno if tb else 0
        src = b["code"].splitlines()[line - 1] if 0 < line <= len(b["code"].splitlines()) else ""
        names = {}
        for node in ast.walk(ast.parse(src.strip() or "pass")) if src else []:
            if isinstance(node, ast.Name) and node.id in ns:
                names[node.id] = repr(ns[node.id])[:200]
        sys.stdout.write("\n%s-error %s\n" % (MARK, json.dumps(
            {"error": "%s: %s" % (type(exc).__name__, exc), "line": line, "names": names})))
        sys.stdout.flush()
'''


def run_blocks(blocks: list[Block], *, timeout: float = 60.0, notebook: bool = False) -> list[BlockRun]:
    """Run ``blocks`` (code that parses) in order in a new Python process; one :class:`BlockRun` each.
    A block after a time-out is not run (``ran`` False)."""
    runs = [BlockRun() for _ in blocks]
    payload = [{"index": i, "code": b.text, "notebook": notebook} for i, b in enumerate(blocks)]
    with tempfile.TemporaryDirectory(prefix="attnlab-notes-") as tmp:
        src = Path(tmp) / "blocks.json"
        src.write_text(json.dumps(payload), encoding="utf-8")
        driver = Path(tmp) / "driver.py"
        driver.write_text(f"MARK = {_MARK!r}\n" + _DRIVER, encoding="utf-8")
        # A session of its own, so that the time limit kills whatever the note's code started too; no stdin
        # (the note's code never reads what is typed into attnlab).
        proc = subprocess.Popen([sys.executable, str(driver), str(src)], cwd=tmp, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
        finally:
            _kill_group(proc)  # nothing the note started outlives the check
        if not timed_out and proc.returncode and _MARK not in out:
            raise RuntimeError(f"the note's code could not be started: {err.strip()[-300:]}")
    current = -1
    for line in out.split("\n"):
        if line.startswith(_MARK + "-error "):
            info = json.loads(line[len(_MARK) + 7:])
            r = runs[current]
            r.error, r.names = info["error"], info["names"]
            r.error_line = blocks[current].lines[info["line"] - 1].number if 0 < info["line"] <= len(
                blocks[current].lines) else blocks[current].start
        elif line.startswith(_MARK + " "):
            current = int(line.split()[-1])
            runs[current].ran = True
        elif current >= 0:
            runs[current].stdout += line + "\n"
    if timed_out and current >= 0 and not runs[current].error:
        runs[current].timed_out = True
    for r in runs:
        r.stdout = r.stdout.strip("\n")
    return runs


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (it leads its own session), ignoring one that is gone."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _env() -> dict[str, str]:
    import os

    keep = ("PATH", "HOME", "SYSTEMROOT", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    return env
