"""The pictures say what each section's mask hides (issue 17): the causal future, an earlier token outside
the window, a token not yet cached; and the window's "earlier tokens the window hides" map highlights the
hidden cells on a 0-to-1 scale instead of greying them out.

PNG: the legend texts are read from the matplotlib figure objects, and the colours of a saved PNG at known
cells are compared with the colour map's own colours. HTML: one headless chromium (Playwright, Debian's
/usr/bin/chromium, as in test_report_browser.py) hovers cells of a report and reads the tooltip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from attnlab.explain import explain
from attnlab.heatmap import save_figure, walkthrough_figure
from attnlab.maps import CMAP, MASK_REASONS, MASKED_COLOR, masked_reasons
from attnlab.report import write_report

FUTURE, WINDOW, CACHE = MASK_REASONS["future"], MASK_REASONS["window"], MASK_REASONS["cache"]


def _legend(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


@pytest.fixture(scope="module")
def walk():
    """The book's sentence with the window (3 tokens) and the cache sections."""
    return explain(sections=["cache", "window"])


def test_words_name_what_each_mask_hides():
    assert FUTURE == "a future token the causal mask hides"
    assert WINDOW == "an earlier token outside the window"
    assert CACHE.startswith("a token not yet cached")


def test_window_legend_names_the_future_and_the_window(walk):
    legend = _legend(walkthrough_figure(walk, "window"))
    assert legend == [f"masked ({FUTURE}): weight 0", f"masked ({WINDOW}): weight 0"]
    scores = _legend(walkthrough_figure(walk, step="window.scores"))
    assert scores == [f"masked ({FUTURE}): score set to −inf", f"masked ({WINDOW}): score set to −inf"]
    mask = _legend(walkthrough_figure(walk, step="window.mask"))
    assert mask == [f"masked ({FUTURE}): mask 0, may not attend", f"masked ({WINDOW}): mask 0, may not attend"]


def test_window_reasons_split_the_masked_cells_by_position(walk):
    """Future = key after the query; window = key at least 3 (the window) before it; nothing else."""
    reasons = dict(masked_reasons(walk, walk.step("window.weights")))
    t = 6
    i, j = np.indices((t, t))
    np.testing.assert_array_equal(reasons["future"][0], j > i)
    np.testing.assert_array_equal(reasons["window"][0], j <= i - 3)


def test_cache_legend_says_not_yet_cached(walk):
    for fig in (walkthrough_figure(walk, "cache"), walkthrough_figure(walk, step="cache.scores")):
        legend = _legend(fig)
        assert len(legend) == 1 and CACHE in legend[0]
        assert "future" not in legend[0]
    assert _legend(walkthrough_figure(walk, step="cache.filled")) == [f"masked ({CACHE}): slot still empty"]


def test_causal_legend_keeps_the_future():
    legend = _legend(walkthrough_figure(explain(sections="causal"), "causal"))
    assert legend == [f"masked ({FUTURE}): weight 0"]


def _cell_pixel(fig, ax, row: int, col: int, dx: float = 0.3, dy: float = 0.3) -> tuple[int, int]:
    """The PNG pixel (x, y from the top) inside cell (row, col), off its centre by (dx, dy) cells."""
    x, y = ax.transData.transform((col + dx, row + dy))
    height = fig.get_size_inches()[1] * fig.dpi
    return round(float(x)), round(float(height - y))


def test_hidden_tokens_map_highlights_the_hidden_cells(walk, tmp_path):
    """window.out_of_window: 1 where the window hides an earlier token. Those cells are the map's brightest
    colour (the top of viridis), the cells inside the window its darkest, the causal future grey; the colour
    bar runs from 0 to 1."""
    fig = walkthrough_figure(walk, step="window.out_of_window", annotate=False)
    path = save_figure(fig, tmp_path / "hidden.png")
    ax = fig.axes[0]
    bar = fig.axes[-1]
    assert bar.get_ylim() == pytest.approx((0.0, 1.0))  # a meaningful scale, not 0 to 0
    assert "outside the window" in bar.get_ylabel()
    assert _legend(fig) == [f"masked ({FUTURE}): not counted here"]  # only the future is masked
    png = imread(path)[..., :3]  # (H, W, 3) floats in 0..1
    top, bottom = np.asarray(colormaps[CMAP](1.0)[:3]), np.asarray(colormaps[CMAP](0.0)[:3])
    hidden = walk.step("window.out_of_window").values
    for i in range(6):
        for j in range(6):
            x, y = _cell_pixel(fig, ax, i, j)
            got = png[y, x]
            if j > i:  # the future: grey (hatch lines are grey too)
                assert np.allclose(got, got.mean(), atol=0.02) and got.mean() > 0.6, (i, j, got)
                continue
            want = top if hidden[i, j] == 1 else bottom
            assert np.abs(got - want).max() < 0.02, (i, j, got, want)
    assert hidden.sum() == 6 and hidden[3, 0] == hidden[5, 2] == 1  # (with, Your) ... (step, starts)
    assert np.allclose(to_rgb(MASKED_COLOR), png[_cell_pixel(fig, ax, 0, 5)[::-1]], atol=0.25)


# --------------------------------------------------------------------------------------------------
# HTML, in a real browser (one launch)
# --------------------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


def test_report_tooltips_and_legend_name_the_reason(walk, tmp_path):
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        pytest.fail(f"this test needs Debian's chromium at {CHROMIUM} (apt-get install chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("this test needs Playwright's Python package: pip install playwright", pytrace=False)
    path = write_report(walk, tmp_path / "legends.html")
    executable = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(path.resolve().as_uri())
            tip = page.locator(".ar-tooltip")

            def hover(step: str, row: int, col: int) -> str:
                cell = page.locator(f'td[data-step="{step}"][data-r="{row}"][data-c="{col}"]').first
                cell.scroll_into_view_if_needed()
                cell.hover()
                tip.wait_for(state="visible")
                return tip.inner_text()

            outside = hover("window.weights", 3, 0)  # (with, Your): 3 back, the window is 3
            assert f"masked: {WINDOW}" in outside and "future" not in outside
            future = hover("window.weights", 0, 5)  # (Your, step)
            assert f"masked: {FUTURE}" in future
            cache = hover("cache.scores", 1, 4)  # (journey, one): slot 5 is written at step 5
            assert f"masked: {CACHE}" in cache and "future" not in cache
            # the hidden-tokens map: its hidden cells are coloured, not masked
            cell = page.locator('td[data-step="window.out_of_window"][data-r="3"][data-c="0"]').first
            assert "ar-masked" not in (cell.get_attribute("class") or "")
            colour = cell.evaluate("td => getComputedStyle(td).backgroundColor")
            top = tuple(round(255 * c) for c in colormaps[CMAP](1.0)[:3])
            got = tuple(int(v) for v in colour[colour.index("(") + 1:colour.index(")")].split(",")[:3])
            assert max(abs(a - b) for a, b in zip(got, top, strict=True)) <= 8, (got, top)
            legend = page.locator(".ar-legend").inner_text()
            for words in (FUTURE, WINDOW, CACHE):
                assert f"masked: {words}" in legend
            page.screenshot(path=str(tmp_path / "legends.png"), full_page=False)
            assert errors == []
        finally:
            browser.close()
