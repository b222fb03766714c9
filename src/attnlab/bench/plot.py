"""Bar chart of a :class:`~attnlab.bench.runner.BenchReport`: median time per variant, with the
inter-quartile range as error bars; rows that did not run are labelled with their status."""

from __future__ import annotations

from pathlib import Path

from attnlab.bench.runner import BenchReport

__all__ = ["plot_report"]


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def plot_report(report: BenchReport, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = report.config
    rows = report.results
    names = [r.name for r in rows]
    medians = [r.summary.median * 1e3 if r.summary else 0.0 for r in rows]
    lo = [(r.summary.median - r.summary.q1) * 1e3 if r.summary else 0.0 for r in rows]
    hi = [(r.summary.q3 - r.summary.median) * 1e3 if r.summary else 0.0 for r in rows]
    colors = ["#d62728" if r.name == c.baseline else "#1f77b4" for r in rows]

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.8), dpi=120)
    y = list(range(len(rows)))
    ax.barh(y, medians, xerr=[lo, hi], color=colors, ecolor="black", capsize=3, height=0.6)
    ax.set_yticks(y, names, fontsize=10)
    ax.invert_yaxis()  # first variant on top, as in the table
    top = max(medians + [1e-9])
    right = max([m + h for m, h in zip(medians, hi)] + [1e-9])
    for yi, r, m, h in zip(y, rows, medians, hi):
        if r.summary:
            label = f"{_ms(m)} ms" + (f"  ({r.speedup:.2f}× vs {c.baseline})" if r.speedup else "")
            ax.text(m + h + right * 0.02, yi, label, va="center", fontsize=8)
        else:
            ax.text(top * 0.01, yi, r.status, va="center", fontsize=8, color="#7f7f7f", style="italic")
    ax.set_xlim(0, right * 1.5)
    unit = "forward" if c.mode == "fwd" else "forward + backward"
    ax.set_xlabel(f"median time of one {unit} call (ms); error bars: interquartile range")
    ax.set_title(
        f"attnlab bench: batch {c.batch} × {c.tokens} tokens × {c.width} wide, {c.heads} heads, causal, "
        f"{c.dtype}, {c.device}" + (", compiled" if c.compile else ""),
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
