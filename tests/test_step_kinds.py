"""attnlab.explain.kinds: the one table of step kinds (How.kind), and that every reader uses it.

Every kind the builders record is in the table and every entry is recorded somewhere; each kind's working
is what ``attnlab explain`` shows and ends with the recorded number; each kind's recomputation gives the
recorded numbers back (float64 from the recorded operands); report.js holds no kind's name; and in a real
browser the hover text of several kinds is the table's rendering (its full working when the page carries
it, else its template as :func:`attnlab.explain.kinds.render_template` fills it).
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab.explain import explain
from attnlab.explain.kinds import KINDS, PLAIN, Cell, explain_cell, hover_lines, kind_of, render_template
from attnlab.explain.recompute import recompute
from attnlab.explain.render_text import to_text
from attnlab.explain.steps import Step, Walkthrough, fmt
from attnlab.report import render_page
from attnlab.report.codec import decode, decode_bits
from tolerances import assert_close

ALL = ["simple", "all", "trainable", "causal", "multihead", "cache", "gqa", "window", "rope"]
EXPLAIN_SOURCES = Path(__file__).resolve().parents[1] / "src" / "attnlab" / "explain"


@pytest.fixture(scope="module")
def book() -> Walkthrough:
    return explain(sections=ALL)


@pytest.fixture(scope="module")
def modern() -> Walkthrough:
    """A modern section on other numbers than the book's: 5 tokens, 4 heads in 2 groups, a window of 2."""
    return explain("The cat sat on mats", dim=4, heads=4, d_out=8, kv_groups=2, window_size=2,
                   sections=["causal", "cache", "gqa", "window", "rope"])


def _model_walk() -> Walkthrough | None:
    try:
        from attnlab.explain.model import explain_model

        return explain_model("The cat sat on the mat.", layer=2, head=3)
    except ImportError:  # attnlab[models] not installed: the static check below still covers model.py
        return None


def _recorded_kinds(*walks: Walkthrough | None) -> set[str]:
    return {s.how.kind for walk in walks if walk is not None for s in walk.steps if s.how is not None}


def test_every_kind_the_builders_write_is_in_the_table_and_every_entry_is_used(book, modern):
    written = set()
    for path in EXPLAIN_SOURCES.glob("*.py"):  # every How("kind", ...) in the builders' source
        written |= set(re.findall(r"\bHow\(\s*\"(\w+)\"", path.read_text(encoding="utf-8")))
    assert written, "no How(...) found in the builders"
    assert written <= set(KINDS), f"kinds missing from the table: {sorted(written - set(KINDS))}"
    assert set(KINDS) <= written, f"table entries no builder writes: {sorted(set(KINDS) - written)}"
    recorded = _recorded_kinds(book, modern, _model_walk())
    assert recorded <= set(KINDS)
    expected_unrecorded = set() if _model_walk() is not None else {"linear", "scaled_dot"}
    assert set(KINDS) - recorded == expected_unrecorded  # the model's kinds need attnlab[models]
    for name, entry in KINDS.items():
        assert entry.name == name and entry.working is not None, name


def _cells(step: Step, limit: int = 40) -> list[tuple[int, ...]]:
    cells = list(np.ndindex(*step.values.shape))
    if len(cells) <= limit:
        return cells
    picked = np.random.default_rng(0).choice(len(cells), limit, replace=False)
    return [cells[i] for i in sorted(picked)]


@pytest.mark.parametrize("which", ["book", "modern"])
def test_each_kinds_working_is_what_explain_shows_and_ends_with_the_recorded_number(which, book, modern):
    walk = book if which == "book" else modern
    seen = set()
    for step in walk.steps:
        entry = kind_of(step)
        for index in _cells(step):
            how = step.how
            ops = tuple(walk.step(o) for o in how.operands if o in walk) if how is not None else ()
            cell = Cell(walk, step, index, 4, ops, dict(how.params) if how is not None else {})
            lines = (entry.working(cell) if entry.working is not None else None) or [
                f"{cell.name} = {cell.shown} ({step.formula})"]
            assert walk.explain_cell(step.id, index) == lines == explain_cell(walk, step.id, index)
            value = float(step.values[index])
            shown = fmt(value, 4)  # the number as the tables show it
            assert lines[0].startswith(walk.cell_name(step.id, index)), (step.id, index, lines[0])
            assert shown in lines[0] or (value == 0 and "= 0:" in lines[0]), (step.id, index, lines[0])
            seen.add(entry.name)
    assert seen == _recorded_kinds(walk)  # every kind this walkthrough records was written out
    text = to_text(walk, width=200)
    for step_id, index in (("trainable.scores", (walk.query, walk.query)), ("cache.scores", (0, walk.query, 0)),
                           ("window.scores", (0, walk.query, 0))):
        if step_id in walk:  # the detail lines print the table's working of these cells
            assert walk.explain_cell(step_id, index)[0] in text, step_id


def test_the_books_numbers_through_the_table(book):
    """SelfAttention_v2's scores for "journey" (the book, 3.4.1): 1.8524 is score(journey, journey)."""
    line = book.explain_cell("trainable.scores", (1, 1))[0]
    assert line.startswith("score(journey, journey) = q_journey · k_journey") and line.endswith("= 1.8524")
    weight = book.explain_cell("simple.weights", (1,))[0]  # softmax of the simplified scores: 0.2379
    assert weight.startswith("weight(journey, journey) = exp(") and weight.endswith("= 0.2379")


@pytest.mark.parametrize("which", ["book", "modern"])
def test_each_kinds_recomputation_gives_the_recorded_numbers_back(which, book, modern):
    walk = book if which == "book" else modern
    done = set()
    for step in walk.steps:
        again = recompute(walk, step)
        if again is None:
            continue
        ops = [walk.step(o) for o in step.how.operands]
        n = max([1] + [o.values.shape[-1] for o in ops])  # the longest reduction: a row or a vector
        assert_close(again, step.values.astype(np.float64), n=n, dtype=torch.float32, equal_nan=True, msg=step.id)
        done.add(step.how.kind)
    # every kind recorded here that the table can recompute was recomputed (and only those)
    assert done == {k for k in _recorded_kinds(walk) if KINDS[k].recompute is not None}


def test_unknown_kind_reads_as_plain(book):
    step = book.step("simple.scores")
    assert kind_of(step).name == "dot"
    assert PLAIN.working is None and PLAIN.recompute is None and PLAIN.masked_words("future") == "weight 0"


# --------------------------------------------------------------------------------------------------
# The report's JavaScript receives words and templates, it does not know the kinds
# --------------------------------------------------------------------------------------------------


def test_report_js_names_no_step_kind():
    js = resources.files("attnlab.report").joinpath("report.js").read_text(encoding="utf-8")
    literals = set(re.findall(r"\"([^\"\\]*)\"|'([^'\\]*)'", js))
    strings = {a or b for a, b in literals}
    assert strings.isdisjoint(KINDS), f"report.js names step kinds: {sorted(strings & set(KINDS))}"
    assert not re.search(r"\.kind\b", js), "report.js reads a step's kind"
    assert "switch (step" not in js and "Math.exp" in js  # one generic filler (exp is a placeholder)


def _payload(page: str) -> dict:
    return json.loads(re.search(r'class="attnlab-data">(.*?)</script>', page, re.DOTALL).group(1))


def _page_numbers(data: dict):
    """``page(step)`` for render_template: a step's numbers and decimals as the page decodes them."""
    def page(step: Step) -> tuple[np.ndarray, int]:
        sent = data["steps"][step.id]
        blob = sent["values"]
        if "same" in blob:
            blob = data["steps"][blob["same"]]["values"]
        size = int(np.prod(sent["shape"]))
        mask = decode_bits(sent["masked"], size) if sent.get("masked") else None
        return decode(blob, size, mask).reshape(step.values.shape), int(blob["dec"])
    return page


# (step, index in the walkthrough): a dot, scale and softmax chain, the masks, masking before and after the
# softmax, dropout, a class's output, the opt-in sections' scores and window masks.
HOVERED = [
    ("trainable.weights", (1, 2)),
    ("causal.mask", (1, 3)),
    ("causal.scores_masked", (0, 3)),
    ("causal.weights_masked", (2, 1)),
    ("causal.dropout_weights", (3, 0)),
    ("multihead.mha_weights", (0, 2, 1)),
    ("cache.scores", (0, 1, 3)),
    ("window.mask", (4, 1)),
    ("window.out_of_window", (4, 0)),
    ("simple.weights", (2,)),
]


def _browser():
    chromium = "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")
    if chromium is None:
        pytest.fail("the browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
                    pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright's Python package: pip install playwright", pytrace=False)
    return sync_playwright, chromium


def _tip_lines(page, step_id: str, flat: int, lead: int) -> list[str]:
    """Hover the cell (flat index ``flat`` within its table) and read the tooltip's working lines."""
    if lead:  # a head's table is built when its head is shown
        section = step_id.partition(".")[0]
        page.locator(f'[data-section="{section}"] .ar-head-btn[data-head="{lead}"]').click()
    page.locator("h1").hover()
    page.locator(f'td[data-step="{step_id}"][data-k="{flat}"]').first.hover()
    tip = page.locator(".ar-tooltip")
    tip.wait_for(state="visible")
    return tip.locator(".ar-tip-line").evaluate_all("els => els.map(e => e.textContent)")


@pytest.mark.parametrize("hover", [True, False], ids=["full-working", "templates"])
def test_hover_text_in_the_browser_is_the_tables_rendering(book, tmp_path, hover):
    page_text = render_page(book) if hover else _render_without_hover(book)
    data = _payload(page_text)
    assert data["hover"] is hover
    out = tmp_path / "r.html"
    out.write_text(page_text, encoding="utf-8")
    numbers = _page_numbers(data)
    sync_playwright, chromium = _browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out.resolve().as_uri())
            page.wait_for_selector(".ar-app")
            for step_id, index in HOVERED:
                step = book.step(step_id)
                chain = [step]  # the hover text follows a cellwise step back to where its cell was made
                while data["steps"][chain[0].id].get("chain"):
                    chain.insert(0, book.step(data["steps"][chain[0].id]["chain"]))
                if hover:
                    expected = [line for s in chain for line in hover_lines(book, s, index)]
                else:
                    expected = [line for s in chain for line in render_template(book, s, index, numbers)]
                flat_index = index[-1] if step.values.ndim == 1 else index[-2] * step.values.shape[-1] + index[-1]
                head = index[0] if step.values.ndim == 3 else 0
                shown = _tip_lines(page, step_id, flat_index + head * int(np.prod(step.values.shape[-2:])), head)
                assert shown == expected, step_id
            assert errors == []
        finally:
            browser.close()


def _render_without_hover(walk: Walkthrough) -> str:
    """The page as large inputs get it: no written lines in the data, the page fills each step's template."""
    return render_page(walk, hover=False)


def test_templates_follow_the_table_and_stay_small(book):
    data = _payload(_render_without_hover(book))
    for step in book.steps:
        sent = data["steps"][step.id]
        assert sent["template"] == kind_of(step).hover_template(book, step), step.id
        assert bool(sent.get("spell_out")) == kind_of(step).spelled_out
    # the templates of a whole walkthrough weigh a few kilobytes, whatever the number of tokens
    size = sum(len(json.dumps(data["steps"][s.id]["template"], ensure_ascii=False)) for s in book.steps)
    assert size < 20_000
