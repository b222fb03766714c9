"""``attnlab bench``: time the attention variants of :mod:`attnlab.variants` side by side.

- :mod:`attnlab.bench.stats`   median / quartiles, FLOP counts (pure functions)
- :mod:`attnlab.bench.worker`  one variant in one fresh process: warm-up, timing, peak memory
- :mod:`attnlab.bench.runner`  the configuration, the worker processes, the report
- :mod:`attnlab.bench.table`   the rich table with its legend, JSON
- :mod:`attnlab.bench.plot`    the bar chart (matplotlib, Agg)
"""

from attnlab.bench.runner import DEFAULT, QUICK, BenchConfig, BenchReport, VariantResult, run_bench
from attnlab.bench.stats import Summary, attention_flops, summarize

__all__ = [
    "DEFAULT",
    "QUICK",
    "BenchConfig",
    "BenchReport",
    "Summary",
    "VariantResult",
    "attention_flops",
    "run_bench",
    "summarize",
]
