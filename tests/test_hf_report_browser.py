"""A local decoder's report (``attnlab report --model DIR``) in a real browser: Debian's chromium, headless.

The model is a tiny random Llama saved with ``save_pretrained`` and an offline word-level tokenizer (see
tests/hf_models.py). Like tests/test_report_browser.py, this FAILS (does not skip) when chromium or
Playwright is missing; it skips only when the optional transformers package is missing.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers", reason="local models need the optional transformers package")
pytest.importorskip("tokenizers", reason="the test tokenizer is built with tokenizers")

from attnlab.cli import main
from hf_models import TEXT, save_models
from test_report_browser import LAPTOP, Opened, _not_blank, browser  # noqa: F401 (the browser fixture)


def test_a_local_decoder_report_greys_out_the_future_in_every_layer_and_head(browser, tmp_path):  # noqa: F811
    directory = save_models(tmp_path)["llama"]  # a 2-layer Llama (4 query heads), its tokenizer beside it
    out = tmp_path / "llama.html"
    assert main(["report", "--model", str(directory), "--text", TEXT, "--out", str(out)]) == 0
    opened = Opened(browser, out.resolve().as_uri(), LAPTOP)
    try:
        page = opened.page
        t = 11  # <s> and 10 words
        assert page.locator(".ar-mini").count() == 2 * 4  # layers x heads small multiples
        assert page.locator(".ar-head-btn").count() == 4 and page.locator(".ar-layer-btn").count() == 2
        panel = page.locator('.ar-panel[data-head="0"]').first
        cells = panel.locator("td[data-k]")
        assert cells.count() == t * t
        future, past = cells.nth(1), cells.nth(t)  # (<s>, the): hidden; (the, <s>): seen
        assert "masked" in (future.get_attribute("class") or "")
        assert "masked" not in (past.get_attribute("class") or "")
        assert "masked" in page.locator(".ar-legend").inner_text()
        page.locator(".ar-tok-chip", has_text="cat").click()
        _not_blank(page.screenshot())
        assert opened.errors == []
        assert [u for u in opened.requests if u != opened.url and not u.startswith("data:")] == []
    finally:
        opened.close()
