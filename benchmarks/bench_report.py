"""The HTML report and the heatmaps at the size of a real text (issue 14's targets).

    .venv/bin/python benchmarks/bench_report.py [--repeats 10] [--json out.json]

Measures, on a 224-word paragraph that all-MiniLM-L6-v2 cuts to 256 tokens (6 layers x 12 heads):

- ``attnlab report``'s page: size (target <= 12 MB) and the time to write it from the recorded
  AttentionMaps (<= 10 s);
- in Debian's chromium (headless, Playwright): first paint of the report (the page's own
  ``performance.now()`` when its maps are drawn, from navigation start; and the browser's first contentful
  paint) (<= 2 s); switching the focused head (<= 200 ms) and the hover text of a cell (<= 100 ms), each
  ``performance.now()`` around the handler, median of ``--repeats``;
- the toy walkthrough on 300 tokens: page size (<= 3 MB);
- ``attnlab heatmap --model minilm`` on the paragraph, the whole command (<= 30 s) and the PNG's longest
  side (<= 4000 px).

Medians and spread of the repeats; the machine's load (``os.getloadavg``) is printed beside them: on a
shared machine, timings are noisy. Needs attnlab[models], Playwright and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

PARAGRAPH = (
    "The history of the printing press begins in the middle of the fifteenth century, when Johannes "
    "Gutenberg, a goldsmith from Mainz, combined several existing technologies into a single working system. "
    "Movable type had been used in East Asia for centuries, and screw presses were common in the wine and "
    "olive oil trades, but Gutenberg's contribution was a hand mould that could cast large numbers of "
    "identical metal letters quickly and cheaply. He also developed an oil-based ink that stuck to metal type "
    "and a method for aligning the pages so that text printed on both sides of a sheet would line up. The "
    "first major book produced with this system, a Latin Bible, appeared around 1455 and is still admired for "
    "the clarity of its letters and the evenness of its lines. Within fifty years, presses had spread to more "
    "than two hundred cities across Europe, and millions of books had been printed. Scholars could now "
    "compare identical copies of a text, which made it easier to correct errors and to build on the work of "
    "others. Pamphlets and newspapers followed, carrying news, arguments and advertisements to readers who "
    "had never owned a book before. Historians still debate how quickly literacy rose as a result, but few "
    "doubt that the cheap, reliable reproduction of words changed how ideas moved between people, cities and "
    "generations."
)
CHROMIUM = "/usr/bin/chromium"
TARGETS = {"html_mb": 12.0, "write_s": 10.0, "first_paint_ms": 2000.0, "head_ms": 200.0, "hover_ms": 100.0,
           "toy_mb": 3.0, "heatmap_s": 30.0, "png_px": 4000}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f} / {five:.1f} (1 / 5 min) on {os.cpu_count()} CPUs"


def measure_page(path: Path, repeats: int) -> dict:
    from playwright.sync_api import sync_playwright

    out: dict = {"ready_ms": [], "fcp_ms": [], "head_ms": [], "hover_ms": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        for _ in range(3):  # three loads: first paint
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(path.resolve().as_uri())
            page.wait_for_selector("canvas.ar-canvas[data-drawn]")
            t = page.evaluate("document.querySelector('.attnlab-report').attnlabTimings")
            fcp = page.evaluate("(performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime")
            out["ready_ms"].append(t["ready"])
            if fcp is not None:
                out["fcp_ms"].append(fcp)
            page.close()
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(path.resolve().as_uri())
        page.wait_for_selector("canvas.ar-canvas[data-drawn]")
        page.wait_for_timeout(500)  # the small maps are drawn a batch per frame after the first paint
        out["head_ms"] = page.evaluate(f"""() => {{
            const buttons = [...document.querySelectorAll('.ar-head-btn')], times = [];
            for (let i = 0; i < {repeats}; i++) {{
                const b = buttons[(i + 1) % buttons.length], t0 = performance.now();
                b.click();
                times.push(performance.now() - t0);
            }}
            return times;
        }}""")
        out["hover_ms"] = page.evaluate(f"""() => {{
            const c = document.querySelector('canvas.ar-canvas'), box = c.getBoundingClientRect();
            const cell = +c.dataset.cell, margin = +c.dataset.margin, times = [];
            for (let i = 0; i < {repeats}; i++) {{
                const x = box.left + margin + cell * (7 + 23 * i % 250 + 0.5), y = box.top + margin + cell * (3 + 17 * i % 250 + 0.5);
                const t0 = performance.now();
                c.dispatchEvent(new MouseEvent('mousemove', {{clientX: x, clientY: y, bubbles: true}}));
                times.push(performance.now() - t0);
            }}
            return times;
        }}""")
        out["tooltip"] = page.locator(".ar-tooltip").inner_text().splitlines()[0]
        browser.close()
    return {k: (_stats(v) if isinstance(v, list) and v else v) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if not Path(CHROMIUM).is_file():
        sys.stderr.write(f"bench_report: needs Debian's chromium at {CHROMIUM} (apt-get install chromium)\n")
        return 2
    from attnlab.explain import explain
    from attnlab.explain.model import attention_maps
    from attnlab.report import write_report

    results: dict = {"load_before": _load()}
    tmp = Path(tempfile.mkdtemp(prefix="bench_report_"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        maps = attention_maps(PARAGRAPH, model="minilm")
        results["model_load_and_attention_s"] = time.perf_counter() - t0
    results["tokens"] = maps.seq_len
    writes = []
    for i in range(3):
        t0 = time.perf_counter()
        page = write_report(maps, tmp / "model.html", force=True)
        writes.append(time.perf_counter() - t0)
    results["write_s"] = _stats(writes)
    results["html_mb"] = page.stat().st_size / 1e6
    results["browser"] = measure_page(page, args.repeats)
    toy = explain(" ".join(f"w{i}" for i in range(300)))
    results["toy_mb"] = write_report(toy, tmp / "toy.html", force=True).stat().st_size / 1e6
    png = tmp / "heatmap.png"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attnlab", "heatmap", "--model", "minilm", "--text", PARAGRAPH,
                    "--out", str(png)], check=True, capture_output=True)
    results["heatmap_s"] = time.perf_counter() - t0
    from matplotlib import image as mpimg

    results["png_px"] = list(mpimg.imread(png).shape[:2])
    results["load_after"] = _load()

    b = results["browser"]
    rows = [
        ("HTML size, MiniLM 256 tokens x 72 heads (MB)", f"{results['html_mb']:.2f}", TARGETS["html_mb"]),
        ("write the HTML (s, median of 3)", f"{results['write_s']['median']:.2f}", TARGETS["write_s"]),
        ("first paint: maps drawn (ms, median of 3)", f"{b['ready_ms']['median']:.0f}", TARGETS["first_paint_ms"]),
        ("first contentful paint (ms, median of 3)",
         f"{b['fcp_ms']['median']:.0f}" if b.get("fcp_ms") else "n/a", TARGETS["first_paint_ms"]),
        (f"switch the focused head (ms, median of {args.repeats})", f"{b['head_ms']['median']:.1f}",
         TARGETS["head_ms"]),
        (f"hover text of a cell (ms, median of {args.repeats})", f"{b['hover_ms']['median']:.1f}",
         TARGETS["hover_ms"]),
        ("toy walkthrough, 300 tokens (MB)", f"{results['toy_mb']:.2f}", TARGETS["toy_mb"]),
        ("heatmap --model minilm, whole command (s)", f"{results['heatmap_s']:.1f}", TARGETS["heatmap_s"]),
        ("heatmap PNG, longest side (px)", str(max(results["png_px"])), TARGETS["png_px"]),
    ]
    print(f"| measure ({results['tokens']} tokens) | value | target |")
    print("|---|---:|---:|")
    for name, value, target in rows:
        print(f"| {name} | {value} | ≤ {target:g} |")
    print(f"\nmodel load + attention: {results['model_load_and_attention_s']:.1f} s; "
          f"{results['load_before']} before, {results['load_after']} after")
    print(f"spread (min-max): write {results['write_s']['min']:.2f}-{results['write_s']['max']:.2f} s, "
          f"head {b['head_ms']['min']:.1f}-{b['head_ms']['max']:.1f} ms, "
          f"hover {b['hover_ms']['min']:.1f}-{b['hover_ms']['max']:.1f} ms; last tooltip: {b['tooltip']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
