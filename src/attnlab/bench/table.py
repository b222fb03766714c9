"""Render a :class:`~attnlab.bench.runner.BenchReport` as a rich table with a legend, or as JSON.

Every header states its unit; the legend under the table says how each column was measured.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Group, JustifyMethod
from rich.table import Table
from rich.text import Text

from attnlab.bench.runner import BenchReport

__all__ = ["HEADERS", "legend_lines", "render_table", "report_json", "setting_line"]

HEADERS = (
    "variant",
    "median (ms)",
    "IQR (ms)",
    "peak mem (MiB)",
    "GFLOP/s",
    "% of matmul",
    "speed vs {baseline} (×)",
    "note",
)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits - 1}f}" if abs(value) < 10 else f"{value:.1f}"


def setting_line(report: BenchReport) -> str:
    c, m = report.config, report.machine
    where = m.get("gpu") if c.device == "cuda" else f"{m.get('processor')}, {m.get('threads')} threads"
    return (
        f"batch {c.batch} × {c.tokens} tokens × width {c.width}, {c.heads} heads "
        f"(head_dim {c.width // c.heads}), causal, {c.dtype}, mode {c.mode}"
        f"{', torch.compile' if c.compile else ''}; {c.device} ({where}); torch {m.get('torch')}; "
        f"{c.repeats} timed calls after {c.warmup_calls} warm-up" + (f" × {c.rounds} rounds" if c.rounds > 1 else "")
        + f", one fresh process per variant{' and round' if c.rounds > 1 else ''}; "
        f"load average {m.get('load_average_at_start')} at start"
    )


def legend_lines(report: BenchReport) -> list[str]:
    c = report.config
    call = "one forward call (inference: eval mode, no autograd)" if c.mode == "fwd" else (
        "one forward + backward call (input and parameter gradients)"
    )
    mm = f"{report.matmul_gflops:,.1f} GFLOP/s" if report.matmul_gflops else "not measured"
    mem = (
        "resident-memory high-water mark (VmHWM) during the timed calls minus the resident memory before them"
        if c.device == "cpu"
        else "torch.cuda.max_memory_allocated during the timed calls minus memory_allocated before them"
    )
    return [
        f"median (ms): median wall time of {call} over {c.repeats * c.rounds} timed calls"
        + (" (CUDA events, synchronised)" if c.device == "cuda" else "") + ".",
        "IQR (ms): spread = 75th minus 25th percentile of the same timed calls.",
        f"peak mem (MiB): {mem}; parameters and input excluded.",
        f"GFLOP/s: useful work / median time; work = {report.flops / 1e9:.4g} GFLOP per call = "
        "[2·B·T·d_in·d_out·3 (q,k,v) + 2·B·T·d_out² (out_proj) + 4·B·d_out·T(T+1)/2 (causal q·k and "
        "weights·v)]" + (" × 3 (forward + backward)." if c.mode == "fwd+bwd" else "."),
        (
            f"% of matmul: GFLOP/s / this machine's {report.matmul_n}×{report.matmul_n} {c.dtype} matmul "
            f"rate measured in the same run ({mm})."
        ),
        f"speed vs {c.baseline} (×): median time of {c.baseline} / median time of the row; above 1 = faster."
        + ("" if any(r.name == c.baseline and r.summary for r in report.results)
           else f" ({c.baseline} was not timed in this run.)"),
        "—: not measured (see the note: unavailable here, out of memory, compile failed, error).",
    ]


def render_table(report: BenchReport) -> Group:
    c = report.config
    table = Table(title="attnlab bench", caption=setting_line(report), caption_justify="left")
    for i, header in enumerate(HEADERS):
        justify: JustifyMethod = "left" if i in (0, len(HEADERS) - 1) else "right"
        table.add_column(header.format(baseline=c.baseline), justify=justify, no_wrap=i == 0)
    for r in report.results:
        s = r.summary
        table.add_row(
            r.name,
            _num(s.median * 1e3 if s else None, 4),
            _num(s.iqr * 1e3 if s else None),
            _num(r.peak_mem_bytes / 2**20 if r.peak_mem_bytes is not None else None),
            _num(r.gflops),
            _num(r.frac_of_matmul * 100 if r.frac_of_matmul is not None else None),
            f"{r.speedup:.2f}" if r.speedup is not None else "—",
            (r.status if r.status != "ok" else "") + (": " if r.note and r.status != "ok" else "") + r.note,
        )
    legend = Text("\n".join(legend_lines(report)), style="dim")
    return Group(table, legend)


def report_json(report: BenchReport) -> str:
    data: dict[str, Any] = report.to_dict()
    return json.dumps(data, indent=2, ensure_ascii=False)
