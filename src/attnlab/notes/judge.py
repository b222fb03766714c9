"""Checking a note: its code's printed output against what the code prints when run, and its claims
(vectors, scores, weights, context vectors, written-out arithmetic) against attnlab's walkthrough.

Code first. When a block ran, its saved output is compared number by number with what it printed (at
the decimals the note shows); a block that fails is a finding at the line that set the wrong value
(a name holding a plain number where the failing line needs a tensor), unless it fails only because the
note leaves something out (code that does not parse as written, a name the note never defines): those
outputs are then checked as claims.

Claims next, with :func:`attnlab.explain.explain` on the note's own definitions (tokens and their
embeddings, W_Q / W_K / W_V, whether it scales by √d_k) and :func:`attnlab.explain.check.check` at the
positions the claim names (``Score(The, sat)`` is one score, ``K_sat`` the keys' row of sat), so that
every error is named and later numbers that only follow from it are marked as following.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from attnlab.explain import Walkthrough, explain
from attnlab.explain.check import Expectation, check
from attnlab.explain.steps import fmt_vector
from attnlab.notes.numbers import Written, numbers_in, vectors_in
from attnlab.notes.parse import Block, Note
from attnlab.notes.report import Finding, NotesReport, Unchecked
from attnlab.notes.run import BlockRun, run_blocks

RUN_TIMEOUT = 60.0  # seconds for all of a note's code, in its own process

__all__ = ["judge_note"]


def _fmt_right(values: Sequence[float], decimals: int) -> str:
    return fmt_vector(values, max(decimals, 0), trim=False) if len(values) != 1 else fmt_vector(values, decimals)[1:-1]


# --------------------------------------------------------------------------------------------------
# Code
# --------------------------------------------------------------------------------------------------


def _assignment(note: Note, name: str, before: int) -> int | None:
    pat = re.compile(rf"^\s*{re.escape(name)}\s*=[^=]")
    best = None
    for b in note.blocks:
        for ln in b.lines:
            if b.kind == "code" and ln.number < before and pat.match(ln.text):
                best = ln.number
    return best


def _defined_anywhere(note: Note, name: str) -> bool:
    pat = re.compile(rf"^\s*(for\s+.*\b{re.escape(name)}\b.*\bin\b|{re.escape(name)}\s*[+\-*/]?=[^=]|def {name}\b|"
                     rf"class {name}\b|import .*\b{name}\b)")
    return any(pat.match(ln.text) for b in note.blocks if b.kind == "code" for ln in b.lines)


def _compare_output(rep: NotesReport, out: Block, printed: str) -> bool:
    """The saved output against what the code printed: findings for numbers that differ."""
    saved = [w for ln in out.lines for w in numbers_in(_strip_shape(ln.text), ln.number)]
    got = numbers_in(_strip_shape(printed))
    if len(saved) != len(got):
        for ln in out.lines:
            if numbers_in(ln.text):
                rep.unchecked.append(Unchecked(ln.number, ln.text, "the code prints another number of numbers "
                                                                   "here than the note shows"))
        return False
    bad: dict[int, list[tuple[Written, Written]]] = {}
    for w, g in zip(saved, got):
        right = round(g.value, w.decimals)
        if abs(right - w.value) > 0.5 * 10.0 ** -w.decimals + 1e-9 and abs(g.value - w.value) > 0.5 * 10.0 ** -w.decimals:
            bad.setdefault(w.line, []).append((w, g))
        else:
            rep.checked.append(w.line)
    for line, pairs in bad.items():
        rep.findings.append(Finding(
            line, "saved output", ", ".join(w.text for w, _ in pairs),
            ", ".join(f"{g.value:.{w.decimals}f}" for w, g in pairs), "output",
            "the code above does not print this: run it again, or the output was edited by hand"))
    return True


def _strip_shape(text: str) -> str:
    return re.sub(r"Size\(\[[^\]]*\]\)|grad_fn=<\w+>|dtype=\w+\.?\w*|<[^>]*>", "", text)


def _check_code(note: Note, rep: NotesReport, run: bool) -> set[int]:
    """Run the code (unless ``run`` is False) and compare; returns the output lines left for claims."""
    pairs = note.code_then_output()
    leftover: set[int] = set()
    for code, out in pairs:
        if not code.parses:
            for ln in code.lines:
                if numbers_in(ln.text) and not ln.text.strip().startswith("#"):
                    rep.unchecked.append(Unchecked(ln.number, ln.text, "code that does not parse as written"))
    if not run:
        return {ln.number for _, out in pairs if out is not None for ln in out.lines}
    runnable = [c for c, _ in pairs if c.parses]
    if not runnable:  # nothing to run: no process is started
        return {ln.number for _, out in pairs if out is not None for ln in out.lines}
    runs = dict(zip((id(c) for c in runnable), run_blocks(runnable, timeout=RUN_TIMEOUT, notebook=note.path.suffix == ".ipynb"
                                                           or "In [" in note.text)))
    for code, out in pairs:
        r: BlockRun | None = runs.get(id(code))
        if r is None or not r.ran:
            leftover |= {ln.number for ln in out.lines} if out is not None else set()
            continue
        if r.timed_out:
            rep.notes.append((code.start, (f"not finished: the code was stopped at the time limit "
                                           f"({RUN_TIMEOUT:g} s); its printed numbers are checked as claims instead")))
            leftover |= {ln.number for ln in out.lines} if out is not None else set()
            continue
        if r.error:
            name = re.match(r"NameError: name '(\w+)'", r.error)
            loops = set(re.findall(r"for\s+(\w+)(?:\s*,\s*(\w+))?\s+in", code.text))
            loop_names = {n for pair in loops for n in pair if n}
            scalar = next((n for n, v in r.names.items() if re.fullmatch(r"-?\d+(\.\d+)?", v)
                           and n not in loop_names), None)
            if name and not _defined_anywhere(note, name.group(1)):
                rep.notes.append((r.error_line, (f"not run: the code uses {name.group(1)}, which the note never "
                                                 "defines; its printed numbers are checked as claims instead")))
            elif name or "IndentationError" in r.error or "SyntaxError" in r.error:
                rep.notes.append((r.error_line, (f"not run: {r.error} (an earlier block did not run as written); "
                                                 "its printed numbers are checked as claims instead")))
            else:
                at = _assignment(note, scalar, r.error_line) if scalar else None
                what = f"{scalar} = {r.names[scalar]}" if scalar else "this line"
                msg = (f"this code cannot compute what the note prints: {what} here, a plain number where "
                       f"line {r.error_line} needs a vector ({r.error})")
                written = next((ln.text.strip() for b in note.blocks for ln in b.lines if ln.number == (at or r.error_line)), "")
                finding = Finding(at or r.error_line, scalar or "code", written,
                                  _right_for(note, scalar) if scalar else "code that runs", "code", msg,
                                  "set it to the vector the line uses")
                _what_was_printed(note, finding, r.error_line)
                rep.findings.append(finding)
            if out is not None:
                leftover |= {ln.number for ln in out.lines}
            continue
        if out is not None and not _compare_output(rep, out, r.stdout):
            leftover |= {ln.number for ln in out.lines}
    return leftover


def _what_was_printed(note: Note, finding: Finding, after: int) -> None:
    """The output printed after a failing block, when it is the scores of one input: say which."""
    out = next((b for b in note.blocks if b.kind == "output" and b.start > after), None)
    x = np.asarray(_definitions(note)["x"], dtype=np.float64)
    if out is None or x.ndim != 2:
        return
    printed = [w for ln in out.lines for w in numbers_in(_strip_shape(ln.text), ln.number)]
    if len(printed) != len(x):
        return
    dec = min(w.decimals for w in printed)
    for j in range(len(x)):
        if np.allclose(np.round(x @ x[j], dec), [w.value for w in printed], atol=0.5 * 10.0 ** -dec + 1e-9):
            finding.right = f"query = inputs[{j}] = {fmt_vector(x[j], 2)}"
            finding.fix = (f"query = inputs[{j}]: the scores printed at line {out.start} are the dot products "
                           f"with inputs[{j}] (x^{j + 1}), so that is the query the note means")
            return


def _right_for(note: Note, name: str | None) -> str:
    return f"{name} = inputs[1], the query's embedding (a vector)" if name == "query" else f"{name} as a vector"


# --------------------------------------------------------------------------------------------------
# Definitions and claims
# --------------------------------------------------------------------------------------------------


@dataclass
class _Claim:
    line: int
    step: str
    positions: tuple[tuple[int, ...], ...]
    numbers: list[Written]
    what: str


_TOKEN_VEC = re.compile(r"""^\s*[-*]?\s*["“']([^"”']+)["”']\s*:\s*(\[[^\]]*\])""")
_W_DEF = re.compile(r"\bW_?([QKV]|query|key|value)\b\s*=\s*(\[\[.*\]\])", re.IGNORECASE)
_INPUTS = re.compile(r"inputs\s*=\s*torch\.tensor\(\s*(\[.*?\])\s*\)", re.DOTALL)
_TOKEN_COMMENT = re.compile(r"""#\s*["“']?([\w']+)["”']?""")


class _Definitions(TypedDict):
    """What :func:`_definitions` finds in a note."""

    tokens: list[str]
    x: list[list[float]]  # one embedding per token
    W: dict[str, list[list[float]]]  # "W_query" / "W_key" / "W_value" -> d_in x d_out
    query: int | None  # 0-based
    scale: bool  # divides the scores by sqrt(d_k)


def _definitions(note: Note) -> _Definitions:
    """Tokens, embeddings, W matrices, the query and scaling, as the note defines them."""
    d: _Definitions = {"tokens": [], "x": [], "W": {}, "query": None, "scale": False}
    for b in note.blocks:
        for ln in b.lines:
            m = _TOKEN_VEC.match(ln.text)
            if m and b.kind != "code":
                d["tokens"].append(m.group(1))
                d["x"].append([w.value for w in numbers_in(m.group(2))])
            m = _W_DEF.search(ln.text)
            if m:
                key = {"q": "W_query", "query": "W_query", "k": "W_key", "key": "W_key", "v": "W_value",
                       "value": "W_value"}[m.group(1).lower()]
                try:
                    d["W"][key] = ast.literal_eval(m.group(2))
                except (ValueError, SyntaxError):
                    pass
        if b.kind == "code" and not d["x"]:
            m = _INPUTS.search(b.text)
            if m:
                body = re.sub(r"#[^\n]*", "", m.group(1))
                try:
                    d["x"] = ast.literal_eval(body)
                    d["tokens"] = [c.group(1) for c in _TOKEN_COMMENT.finditer(m.group(1))][:len(d["x"])]
                except (ValueError, SyntaxError):
                    pass
        q = re.search(r"query\s*=\s*inputs\[(\d+)\]", b.text)
        if q and d["query"] is None:
            d["query"] = int(q.group(1))
        if re.search(r"√|sqrt|\*\*\s*0\.5|d_k", b.text):
            d["scale"] = True
    q = re.search(r"""For\s+["“']([^"”']+)["”']\s*\(Query\)""", note.text)
    if q and q.group(1) in d["tokens"]:
        d["query"] = d["tokens"].index(q.group(1))
    return d


def _walk(d: _Definitions) -> Walkthrough | None:
    x = np.asarray(d["x"], dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        return None
    toks = d["tokens"] if len(d["tokens"]) == len(x) and len(set(d["tokens"])) == len(x) else None
    w = d["W"] if set(d["W"]) == {"W_query", "W_key", "W_value"} else None
    sections = ("simple", "all", "trainable") if w is not None else ("simple", "all")
    try:
        return explain(toks, x.tolist(), query=d["query"] if d["query"] is not None else None, weights=w,
                       scale=d["scale"], sections=sections)
    except (ValueError, TypeError):
        return None


_LABELS = (("context", "context"), ("weight", "weights"), ("score", "scores"), ("quer", "queries"),
           ("key", "keys"), ("value", "values"))


def _claims(note: Note, walk: Walkthrough, lines: set[int] | None) -> list[_Claim]:
    """The numbers the note claims, each tied to a step and positions of ``walk``."""
    out: list[_Claim] = []
    trainable = "trainable.scores" in walk
    labels = list(walk.labels)

    def row_of(token: str) -> int | None:
        return labels.index(token) if token in labels else None

    for b in note.blocks:
        if b.kind == "code":
            continue
        for ln in b.lines:
            if lines is not None and b.kind == "output" and ln.number not in lines:
                continue
            text = ln.text
            m = re.search(r"Score\(\s*([^,]+?)\s*,\s*([^)]+?)\s*\)\s*:?(.*)", text)
            if m and trainable:
                i, j = row_of(m.group(1)), row_of(m.group(2))
                if i is None or j is None:
                    continue
                rest = m.group(3)
                vecs = vectors_in(rest, ln.number)
                qk = re.search(r"Q_(\w+)\s*·\s*K_(\w+)", rest)
                if qk and len(vecs) >= 2:
                    qi, kj = row_of(qk.group(1)), row_of(qk.group(2))
                    if qi is not None and kj is not None:
                        qpos = tuple((qi, c) for c in range(len(vecs[0])))
                        kpos = tuple((kj, c) for c in range(len(vecs[1])))
                        out.append(_Claim(ln.number, "trainable.queries", qpos, vecs[0], f"q_{qk.group(1)}"))
                        out.append(_Claim(ln.number, "trainable.keys", kpos, vecs[1], f"k_{qk.group(2)}"))
                result = numbers_in(rest.split("=")[-1] if "=" in rest else rest, ln.number)
                if result:
                    out.append(_Claim(ln.number, "trainable.scores", ((i, j),), [result[-1]],
                                      f"score({m.group(1)}, {m.group(2)})"))
                continue
            vecs = vectors_in(_strip_shape(text), ln.number)
            if not vecs:
                m2 = re.search(r"tensor\(\[\[", text)
                if not m2:
                    continue
            low = text.lower()
            kind = next((k for word, k in _LABELS if word in low), None)
            if kind is None or not vecs:
                continue
            tok = re.search(r"""for\s+["“'‘]([^"”'’]+)["”'’]""", text)
            row = row_of(tok.group(1)) if tok else walk.query
            sec = "trainable" if trainable else "simple"
            step = f"{sec}.{kind}"
            if step not in walk:
                continue
            nums = vecs[0]
            st = walk.step(step)
            pos: tuple[tuple[int, ...], ...]
            if st.values.ndim == 1:
                pos = tuple((c,) for c in range(len(nums)))
                if len(nums) != st.shape[0]:
                    continue
            else:
                if row is None or len(nums) != st.shape[-1]:
                    continue
                pos = tuple((row, c) for c in range(len(nums)))
            if "raw scores" in low or kind != "weights" or not re.search(r"/\s*\w*\.sum\(\)", note.text):
                word = {"context": "context vector", "weights": "weights", "scores": "scores", "queries": "query",
                        "keys": "key", "values": "value"}[kind]
                out.append(_Claim(ln.number, step, pos, nums, f"{word} of {walk.labels[row]}" if row is not None
                                  else word))
            else:
                out.append(_Claim(ln.number, f"{sec}.weights_by_sum" if sec == "simple" else step, pos, nums, step))
    return out


def _check_claims(note: Note, rep: NotesReport, lines: set[int] | None, d: _Definitions) -> set[int]:
    walk = _walk(d)
    if walk is None:
        return set()
    claims = _claims(note, walk, lines)
    if not claims:
        return set()
    exps = [Expectation(c.step, (tuple(w.value for w in c.numbers),), (tuple(w.decimals for w in c.numbers),),
                        (tuple(w.text for w in c.numbers),), c.positions) for c in claims]
    results = check(walk, exps, precision=4)
    roots: dict[str, Finding] = {}
    said: dict[tuple[str, tuple[int, ...]], tuple[float, Finding]] = {}  # wrong numbers already reported
    covered: set[int] = set()
    order = {sid: i for i, sid in enumerate(walk.step_ids)}
    ranked = sorted(zip(claims, results), key=lambda cr: (order[cr[0].step], cr[0].line))
    for c, res in ranked:  # in the walkthrough's order: an error before the numbers that follow from it
        covered.add(c.line)
        if res.ok:
            rep.checked.append(c.line)
            continue
        st = walk.step(c.step)
        right = [float(st.values[p]) for p in c.positions]
        dec = max(w.decimals for w in c.numbers)
        right_text = _fmt_right(right, dec)
        if res.mistake == "follows_from_yours" and res.follows_from:
            root = roots.get(res.follows_from) or next(iter(roots.values()), None)
            if root is not None:
                if c.line not in root.follows and c.line != root.line:
                    root.follows.append(c.line)
                    root.follows_right[c.line] = f"{c.what} = {right_text}"
                elif c.line == root.line:
                    root.message += f"; {c.what} on this line follows from it (right: {right_text})"
                roots[c.step] = root
                continue
        seen = [said[c.step, p] for p, w in zip(c.positions, c.numbers)
                if (c.step, p) in said and said[c.step, p][0] == w.value]
        if seen:  # the same wrong number written again (a list of the scores worked out one by one above)
            root = seen[0][1]
            if c.line != root.line and c.line not in root.follows:
                root.follows.append(c.line)
                root.follows_right[c.line] = f"{c.what} = {right_text}"
            continue
        written = ", ".join(w.text for w in c.numbers)
        how = f" ({res.explanation[1].strip()})" if len(res.explanation) > 1 else ""
        f = Finding(c.line, c.what, f"[{written}]" if len(c.numbers) > 1 else written, right_text, res.mistake,
                    res.mistake_name or "these numbers differ from the right ones", res.fix + how)
        existing = next((x for x in rep.findings if x.line == c.line), None)
        if existing is not None and existing.mistake != "output":
            existing.follows_right[c.line] = f"{c.what} = {right_text}"
            f = existing
        else:
            rep.findings.append(f)
        roots[c.step] = f
        for p, w in zip(c.positions, c.numbers):
            said[c.step, p] = (w.value, f)
    return covered


def _arithmetic(note: Note, rep: NotesReport) -> None:
    """``2 × 0 + 1 × 1 = 1``: the sum of products as written."""
    pat = re.compile(r"((?:[-\d.]+\s*[×x*]\s*[-\d.]+\s*\+\s*)+[-\d.]+\s*[×x*]\s*[-\d.]+)\s*=\s*([-\d.]+)")
    for b in note.blocks:
        if b.kind == "code":
            continue
        for ln in b.lines:
            for m in pat.finditer(ln.text):
                terms = re.split(r"\s*\+\s*", m.group(1))
                total = 0.0
                for t in terms:
                    a, c = re.split(r"\s*[×x*]\s*", t)
                    total += float(a) * float(c)
                w = numbers_in(m.group(2))[0]
                if abs(round(total, w.decimals) - w.value) > 0.5 * 10.0 ** -w.decimals:
                    rep.findings.append(Finding(ln.number, "arithmetic", m.group(0), f"{total:.{w.decimals}f}", None,
                                                "the written sum of products does not add up"))
                else:
                    rep.checked.append(ln.number)


# numbers that are not values: list numbers, "Step 1", "figure 3.9", section numbers, x^1, images and links
_NOISE = re.compile(r"^\s*(#+\s*)?\d+(\.\d+)*[.)]\s|\b(step|figure|fig\.|chapter|section|table|in)\s*\[?\d+(\.\d+)*\]?"
                    r"|\(x\^\d+\)|x\^\(?\d+\)?|!?\[\[?[^\]]*\]\]?(\([^)]*\))?|\d+%|\d{4}-\d\d-\d\d", re.IGNORECASE)


def judge_note(note: Note, *, run: bool = True) -> NotesReport:
    rep = NotesReport(str(note.path))
    leftover = _check_code(note, rep, run)
    d = _definitions(note)
    _arithmetic(note, rep)
    covered = _check_claims(note, rep, leftover, d)
    _order_remark(note, rep)
    done = {f.line for f in rep.findings} | {ln for f in rep.findings for ln in f.follows} | set(rep.checked) \
        | covered | {u.line for u in rep.unchecked}
    code_lines = {ln.number for b in note.blocks if b.kind == "code" for ln in b.lines}
    ran_outputs = {ln.number for b in note.blocks if b.kind == "output" for ln in b.lines} - leftover
    for b in note.blocks:
        for ln in b.lines:
            if ln.number in done or ln.number in code_lines or (run and ln.number in ran_outputs):
                continue
            if numbers_in(_strip_shape(_NOISE.sub("", ln.text))):
                why = "definition" if (_TOKEN_VEC.match(ln.text) or _W_DEF.search(ln.text)) else \
                    "not a number attnlab recomputes (prose, a figure, or a value it cannot tie to a step)"
                if why == "definition":
                    continue
                rep.unchecked.append(Unchecked(ln.number, ln.text, why))
    rep.findings.sort(key=lambda f: f.line)
    rep.unchecked.sort(key=lambda u: u.line)
    return rep


def _order_remark(note: Note, rep: NotesReport) -> None:
    """A class that creates W_key before W_query draws other numbers from the same seed than the book."""
    for b in note.blocks:
        if b.kind != "code":
            continue
        names = [(ln.number, m.group(1)) for ln in b.lines for m in [re.search(r"self\.(W_\w+)\s*=.*rand", ln.text)] if m]
        order = [n for _, n in names]
        if order[:2] == ["W_key", "W_query"]:
            rep.notes.append((names[0][0], ("this class creates W_key before W_query, so torch.manual_seed(123) "
                                            "gives it other weights (and other numbers) than the book's "
                                            "SelfAttention_v1; its printed numbers are right for this order")))
