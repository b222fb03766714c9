"""Reading a learner's note into blocks of prose, code and printed output, each line with its line number.

Formats: ``.md`` / ``.txt`` (code fences, with the printed output in the fence after the code or at its
end; notebook exports with ``In [n]:`` before each cell's code and the output after it) and ``.ipynb``
(code cells and their saved outputs, read as JSON, never executed here; the line of each output is its
line in the .ipynb file). A block of code is the longest run of lines that Python parses; what follows
it up to the next prose paragraph is its printed output.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.errors import AttnlabInputError

__all__ = ["Block", "Line", "Note", "read_note"]


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line in the file
    text: str


@dataclass
class Block:
    """``kind``: "prose", "code" or "output"; ``parses``: code that Python parses as it is written."""

    kind: str
    lines: list[Line] = field(default_factory=list)
    parses: bool = True

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    @property
    def start(self) -> int:
        return self.lines[0].number if self.lines else 0


@dataclass
class Note:
    path: Path
    text: str
    blocks: list[Block]

    def code_then_output(self) -> list[tuple[Block, Block | None]]:
        """Each code block with the output block right after it (None when it printed nothing shown)."""
        out = []
        for i, b in enumerate(self.blocks):
            if b.kind == "code":
                nxt = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
                out.append((b, nxt if nxt is not None and nxt.kind == "output" else None))
        return out


_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
_CELL = re.compile(r"^\s*In \[\s*\d*\s*\]:\s*$")
_OUTPUTISH = re.compile(r"tensor\(|^\s*[\[(]?-?\d|^\s*<[\w.]+ |Size\(\[|^[\w\s'\"/(),.-]{1,60}:\s*(tensor|\[|-?\d)")


def _parses(lines: list[Line]) -> bool:
    try:
        ast.parse("\n".join(line.text for line in lines))
    except SyntaxError:
        return False
    return True


_PRINTED = re.compile(r"""print\(\s*f?(["'])(.*?)(\{|\1)""")


def _split_code(lines: list[Line]) -> list[Block]:
    """Lines of a fence or an exported cell: code, then what it printed. The output is the run of lines
    after the last line that does not look printed (a tensor, numbers, ``label: value``, or text the
    code prints), the code everything before it, which must parse."""
    while lines and not lines[-1].text.strip():
        lines = lines[:-1]
    if not lines:
        return []
    labels = [m.group(2).strip() for t in lines for m in _PRINTED.finditer(t.text) if m.group(2).strip()]

    def printed(t: Line) -> bool:
        s = t.text.strip()
        return not s or bool(_OUTPUTISH.search(t.text)) or any(s.startswith(lab) for lab in labels)

    last = max((k for k, t in enumerate(lines) if not printed(t)), default=-1)
    for k in range(last + 1, len(lines) + 1):
        head, tail = lines[:k], lines[k:]
        if any(t.text.strip() for t in head) and _parses(head):
            blocks = [Block("code", head)]
            if any(t.text.strip() for t in tail):
                blocks.append(Block("output", [t for t in tail if t.text.strip()]))
            return blocks
    if last == -1:
        return [Block("output", [t for t in lines if t.text.strip()])]
    return [Block("code", lines, parses=False)]


def _read_text(text: str) -> list[Block]:
    raw = [Line(i + 1, t.replace("\u00a0", " ").rstrip()) for i, t in enumerate(text.splitlines())]
    blocks: list[Block] = []
    prose: list[Line] = []

    def flush() -> None:
        if prose:
            blocks.append(Block("prose", list(prose)))
            prose.clear()

    i = 0
    while i < len(raw):
        line = raw[i]
        fence = _FENCE.match(line.text)
        if fence:
            flush()
            j = i + 1
            while j < len(raw) and not raw[j].text.strip().startswith(fence.group(1)):
                j += 1
            body = raw[i + 1:j]
            if fence.group(2).lower() in ("shell", "text", "console", "output", "bash", "sh") and not _parses(body) or fence.group(2).lower() in ("shell", "text", "console", "output"):
                blocks.append(Block("output", [t for t in body if t.text.strip()]))
            else:
                blocks += _split_code(body)
            i = j + 1
            continue
        if _CELL.match(line.text):
            flush()
            j = i + 1
            seen_output = False
            labels: list[str] = []
            while j < len(raw) and not _CELL.match(raw[j].text) and (
                    not _prose_after_output(raw, j) or any(raw[j].text.strip().startswith(x) for x in labels)):
                t = raw[j].text
                labels += [m.group(2).strip() for m in _PRINTED.finditer(t) if m.group(2).strip()]
                after_blank = not raw[j - 1].text.strip()
                if t.startswith("![") or (seen_output and after_blank and (t.startswith("#") or (
                        not _OUTPUTISH.search(t) and not _parses([raw[j]]) and not t.rstrip().endswith(":")))):
                    break
                seen_output = seen_output or (after_blank and bool(_OUTPUTISH.search(t)))
                j += 1
            blocks += _split_code(raw[i + 1:j])
            i = j
            continue
        prose.append(line)
        i += 1
    flush()
    return [b for b in blocks if b.lines]


def _prose_after_output(raw: list[Line], j: int) -> bool:
    """A paragraph of prose (a long line of words after a blank line) ends an exported cell."""
    t = raw[j].text
    return bool(j > 0 and not raw[j - 1].text.strip() and len(t.split()) >= 6 and not _OUTPUTISH.search(t)
                and not _parses([raw[j]]) and not t.startswith((" ", "\t", "#")) and not t.rstrip().endswith(":")
                and " = " not in t and t.split()[0] not in _KEYWORDS)


_KEYWORDS = frozenset({"for", "if", "while", "def", "class", "with", "try", "elif", "else", "import", "from",
                       "return", "print"})


def _read_ipynb(text: str, path: Path) -> list[Block]:
    try:
        nb = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AttnlabInputError(f"{path}: not a notebook (JSON error at line {exc.lineno}: {exc.msg})") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise AttnlabInputError(f"{path}: not a notebook: expected a JSON object with a list of 'cells'")
    file_lines = text.splitlines()
    cursor = 0

    def locate(fragment: str) -> int:
        """The file line holding ``fragment`` (JSON-escaped), searching forward from the last one found."""
        nonlocal cursor
        needle = json.dumps(fragment.rstrip("\n"))[1:-1]
        for k in range(cursor, len(file_lines)):
            if needle and needle in file_lines[k]:
                cursor = k
                return k + 1
        return cursor + 1

    blocks: list[Block] = []
    for cell in nb["cells"]:
        src = cell.get("source", "")
        src_lines = "".join(src).splitlines() if isinstance(src, list) else str(src).splitlines()
        lines = [Line(locate(t) if t.strip() else cursor + 1, t) for t in src_lines]
        if cell.get("cell_type") == "code":
            blocks.append(Block("code", lines, parses=_parses(lines)))
            out_lines: list[Line] = []
            for out in cell.get("outputs", []):
                body = out.get("text") or (out.get("data") or {}).get("text/plain") or []
                body_lines = "".join(body).splitlines() if isinstance(body, list) else str(body).splitlines()
                out_lines += [Line(locate(t), t) for t in body_lines if t.strip()]
            if out_lines:
                blocks.append(Block("output", out_lines))
        else:
            blocks.append(Block("prose", lines))
    return [b for b in blocks if b.lines]


def read_note(path: str | Path) -> Note:
    """Read a note (.md, .txt, .ipynb, or any other text as .txt). ValueError/OSError for a file that
    cannot be read as one."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AttnlabInputError(f"{p}: not a text file (expected UTF-8 .md, .txt or .ipynb)") from None
    blocks = _read_ipynb(text, p) if p.suffix.lower() == ".ipynb" else _read_text(text)
    return Note(p, text, blocks)
