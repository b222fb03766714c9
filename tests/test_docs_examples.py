"""Every example in README.md and docs/*.md runs, and shows what it prints (issue 21).

Our own small collector (no Sybil, no plugin: about 200 lines that say exactly what an example is):

- **```python blocks** of one page run in order in one namespace (selected alone, a block first runs the
  page's earlier blocks), in a temporary working directory. A statement whose last line ends with a comment
  ``# → SHOWN`` compares what it gives with SHOWN: ``repr`` of an expression, or of the variable a plain
  assignment ``name = ...`` binds.
- **```console blocks**: each ``$ attnlab ARGS`` line (``\\`` continues a line, ``#`` starts a comment) runs
  in-process through :func:`attnlab.cli.main`, in a temporary working directory per block, with
  ``COLUMNS=80`` and ``NO_COLOR=1``; the lines after it up to the next ``$`` are its output (stdout and stderr
  in the order they were written), compared when there are any. ``$ cat FILE`` followed by lines writes FILE
  with those lines (the example's input, shown to the reader); ``$ echo $?`` compares the last exit status.
  A command that exits non-zero must show its output or its status. Any other command is refused: such a
  block is marked not-run, or written as ```sh (setup commands such as ``pip install`` are not examples).
- **Comparing**: runs of spaces are one space (and spaces around a number are optional), blank lines
  are ignored; a number matches at the precision
  shown (within half a unit of its last shown digit plus half of the actual one's); a line that is only
  ``...`` (or ``…``) stands for any number of lines, ``...`` inside a line for any text.
- **Not run**: ``<!-- not-run: WHY -->`` on the line just before a fence (torchrun with several processes,
  several machines, a GPU, minutes of timing) keeps the block from running, but it is still parsed: python
  with :func:`compile`, console lines with ``attnlab.cli.build_parser().parse_args``, so a renamed option
  or a syntax error still fails.

Each block is one test (id ``FILE:LINE-kind``); the module prints one line with the count of examples run
at its end.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import tokenize
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)[ \t]*(?P<info>[\w+-]*)")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<why>.+?)\s*-->\s*$")
_SHOWN = "# →"


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    kind: str  # "python" or "console"
    text: str
    not_run: str | None  # why, when marked
    index: int = 0  # position among the page's python blocks

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}-{self.kind}"


def collect(path: Path) -> list[Block]:
    """The ```python and ```console blocks of a markdown file (fences may be indented, e.g. in a list)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].lower()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if info in ("python", "console"):
            body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1:end]]
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marked = _NOT_RUN.match(prev)
            blocks.append(Block(path, i + 1, info, "\n".join(body) + "\n", marked["why"] if marked else None))
        i = end + 1
    for n, block in enumerate(b for b in blocks if b.kind == "python"):
        block.index = n
    return blocks


BLOCKS = [block for path in FILES if path.exists() for block in collect(path)]
_COUNTS = {"run": 0, "parsed": 0}


# --------------------------------------------------------------------------------------------------
# Comparing shown output with actual output
# --------------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _half_ulp(text: str) -> float:
    try:
        return 0.5 * 10.0 ** Decimal(text).as_tuple().exponent  # type: ignore[operator]
    except (InvalidOperation, TypeError):
        return 0.0


def _line_matches(shown: str, actual: str) -> bool:
    """One shown line against one actual line: text exact (spaces collapsed), numbers at the shown
    precision, ``...`` any text."""
    pattern, numbers = "", []
    shown = re.sub(r"\s+\.\.\.", "...", shown)  # "wrote x ..." also matches "wrote x"
    for part in re.split(rf"(\.\.\.|{_NUMBER})", shown):
        if part == "...":
            pattern += ".*?"
        elif part and re.fullmatch(_NUMBER, part):
            pattern += rf"\s*({_NUMBER})\s*"  # numpy pads numbers to one width: "0.2464701 ,"
            numbers.append(part)
        else:
            pattern += r"\s+".join(re.escape(word) for word in part.split(" "))
    match = re.fullmatch(pattern, actual)
    if not match:
        return False
    for want, got in zip(numbers, match.groups()):
        if abs(float(want) - float(got)) > _half_ulp(want) + _half_ulp(got) + 1e-12 * abs(float(want)):
            return False
    return True


def _lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def output_matches(shown: str, actual: str) -> bool:
    """Shown lines against actual lines; a shown line that is only ``...`` or ``…`` matches any lines."""
    want, got = _lines(shown), _lines(actual)
    # match[i][j]: want[i:] matches got[j:]
    match = [[False] * (len(got) + 1) for _ in range(len(want) + 1)]
    match[len(want)][len(got)] = True
    for i in range(len(want) - 1, -1, -1):
        for j in range(len(got), -1, -1):
            if want[i] in ("...", "…"):
                match[i][j] = match[i + 1][j] or (j < len(got) and match[i][j + 1])
            else:
                match[i][j] = j < len(got) and _line_matches(want[i], got[j]) and match[i + 1][j + 1]
    return match[0][0]


def _assert_shown(where: str, shown: str, actual: str) -> None:
    if not output_matches(shown, actual):
        got = _lines(actual)
        lost = [w for w in _lines(shown) if w not in ("...", "…") and not any(_line_matches(w, g) for g in got)]
        first = f"first shown line found nowhere in the output: {lost[0]!r}" if lost else "lines out of order, or more output than shown: end with a '...' line"
        pytest.fail(f"{where}: the output differs from the docs ({first})\n--- shown in the docs:\n{shown}\n"
                    f"--- actual:\n{actual}", pytrace=False)


# --------------------------------------------------------------------------------------------------
# python blocks
# --------------------------------------------------------------------------------------------------


def _shown_comments(source: str) -> dict[int, str]:
    """line number -> the text after ``# →`` of a comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith(_SHOWN):
            out[tok.start[0]] = tok.string[len(_SHOWN):].strip()
    return out


def run_python(block: Block, namespace: dict) -> None:
    tree = ast.parse(block.text, filename=block.id)
    shown = _shown_comments(block.text)
    for stmt in tree.body:
        where = f"{block.path.relative_to(ROOT)}:{block.line + stmt.lineno}"
        want = shown.get(stmt.end_lineno or stmt.lineno)
        if want is not None and isinstance(stmt, ast.Expr):
            value = eval(compile(ast.Expression(stmt.value), where, "eval"), namespace)
        else:
            exec(compile(ast.Module([stmt], type_ignores=[]), where, "exec"), namespace)  # noqa: S102 (the docs run)
            if want is None:
                continue
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)):
                pytest.fail(f"{where}: '# →' follows a statement that is neither an expression nor "
                            "`name = ...`", pytrace=False)
            value = namespace[stmt.targets[0].id]
        _assert_shown(where, want, repr(value))


@dataclass
class _Page:
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    done: int = 0  # python blocks of the page run so far
    cwd: Path | None = None
    failed: str | None = None  # the first block of the page that failed


_PAGES: dict[Path, _Page] = {}


# --------------------------------------------------------------------------------------------------
# console blocks
# --------------------------------------------------------------------------------------------------


def console_commands(block: Block) -> list[tuple[int, str, str]]:
    """(line, command, shown output) for each ``$`` line; ``\\`` continues a command."""
    commands: list[tuple[int, str, str]] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if line.strip() and not commands:
                pytest.fail(f"{block.id}: a console block starts with '$ COMMAND', got {line!r}", pytrace=False)
            if commands:
                n, cmd, out = commands[-1]
                commands[-1] = (n, cmd, out + line + "\n")
            i += 1
            continue
        start, command = i, line[2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        commands.append((block.line + 1 + start, command, ""))
        i += 1
    return commands


def _argv(command: str, where: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    operators = [t for t in tokens if t and set(t) <= set("|&;<>()")]
    if operators or "$(" in command or "`" in command:
        pytest.fail(f"{where}: shell syntax beyond quoting in {command!r}: write the command plainly or mark "
                    "the block <!-- not-run: why -->", pytrace=False)
    return shlex.split(command, comments=True)


def parse_console(block: Block) -> None:
    from attnlab.cli import build_parser

    for line, command, _ in console_commands(block):
        argv = shlex.split(command, comments=True)
        if argv[:1] != ["attnlab"]:
            continue
        code: object = 0
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as exc:  # --help / --version exit 0; a refused argument exits 2
            code = exc.code
        if code not in (0, None):
            pytest.fail(f"{block.path.relative_to(ROOT)}:{line}: attnlab's parser refuses {command!r} "
                        f"(exit {code})", pytrace=False)


def run_console(block: Block, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from attnlab.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")
    status: int | None = None
    for line, command, shown in console_commands(block):
        where = f"{block.path.relative_to(ROOT)}:{line}"
        if command.strip() == "echo $?":
            if status is None or str(status) != shown.strip():
                pytest.fail(f"{where}: exit status {status}, the docs show {shown.strip()!r}", pytrace=False)
            continue
        argv = _argv(command, where)
        if argv[:1] == ["cat"] and len(argv) == 2:
            target = Path(argv[1])
            if target.exists():
                _assert_shown(where, shown, target.read_text(encoding="utf-8"))
            else:
                target.write_text(shown, encoding="utf-8")  # the example's input file, as shown
            continue
        if argv[:1] != ["attnlab"]:
            pytest.fail(f"{where}: only `attnlab ...`, `cat FILE` and `echo $?` run here, got {command!r}; "
                        "mark the block <!-- not-run: why --> or write it as ```sh", pytrace=False)
        capsys.readouterr()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                status = main(argv[1:])
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
        actual = buffer.getvalue() + capsys.readouterr().out
        if shown.strip():
            _assert_shown(f"{where} (exit {status})", shown, actual)
        elif status != 0:
            pytest.fail(f"{where}: {command!r} exited {status} and the docs show no output:\n{actual}",
                        pytrace=False)


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _report_count(request: pytest.FixtureRequest):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and sum(_COUNTS.values()):
        files = len({b.path for b in BLOCKS})
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\ndocs examples: {_COUNTS['run']} run, {_COUNTS['parsed']} parsed only "
                                f"(not-run), of {len(BLOCKS)} blocks in {files} files")


def test_blocks_found() -> None:
    # README.md and the guides hold examples of both kinds; a collector that finds none tests nothing.
    kinds = {(b.path.name, b.kind) for b in BLOCKS}
    assert ("README.md", "python") in kinds and ("README.md", "console") in kinds, kinds


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_example(block: Block, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture) -> None:
    if block.not_run:
        if block.kind == "python":
            compile(block.text, block.id, "exec")
        else:
            parse_console(block)
        _COUNTS["parsed"] += 1
        return
    if block.kind == "console":
        monkeypatch.chdir(tmp_path_factory.mktemp("console"))
        run_console(block, monkeypatch, capsys)
    else:
        page = _PAGES.setdefault(block.path, _Page())
        if page.cwd is None:
            page.cwd = tmp_path_factory.mktemp("python")
        monkeypatch.chdir(page.cwd)
        if page.failed:
            pytest.fail(f"not run: it builds on {page.failed}, an earlier block of the page, which failed",
                        pytrace=False)
        earlier = [b for b in BLOCKS if b.path == block.path and b.kind == "python" and not b.not_run
                   and page.done <= b.index < block.index]
        page.failed = block.id  # until the page's blocks up to this one have run
        for b in earlier:  # selected alone: the page's earlier blocks first
            page.failed = b.id
            run_python(b, page.namespace)
        page.failed = block.id
        run_python(block, page.namespace)
        page.failed = None
        page.done = block.index + 1
    _COUNTS["run"] += 1
