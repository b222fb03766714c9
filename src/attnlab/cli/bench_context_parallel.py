"""``attnlab bench --context-parallel P``: what the options of ``attnlab bench`` mean for the context-parallel
benchmark, and its output; the measuring is :func:`attnlab.bench.context_parallel.run_cp_bench`.

Called by :func:`attnlab.cli.bench.run` after it has checked ``--json`` (a benchmark that cannot save its
results does not start).
"""

from __future__ import annotations

import argparse
import json
import sys

from attnlab.cli import UsageError
from attnlab.cli.options import write_output

__all__ = ["run_context_parallel_bench"]


def run_context_parallel_bench(args: argparse.Namespace) -> int:
    """Build the :class:`~attnlab.bench.context_parallel.CPConfig` from the options, run it (a line on stderr per
    method unless ``--no-progress``), print the table and write ``--json``. Exit 1 when a method failed."""
    from attnlab.bench.context_parallel import CPConfig, render_cp_table, report_dict, run_cp_bench

    if args.device == "cuda":
        raise UsageError("--context-parallel runs local gloo processes on the CPU; for GPUs launch "
                         "attnlab.distributed with torchrun and the nccl backend (see the README)")
    cfg = CPConfig(
        world=args.context_parallel,
        tokens=args.tokens or 16384,
        batch=args.batch or 1,
        heads=args.heads or 4,
        dtype=args.dtype or "float32",
        repeats=args.repeats or 3,
        warmup=0 if args.warmup is None else args.warmup,
        threads=args.threads or 1,
    )

    def progress(method: str) -> None:
        print(f"bench --context-parallel: {method} ...", file=sys.stderr)

    results = run_cp_bench(cfg, on_progress=None if args.no_progress else progress)
    print(render_cp_table(cfg, results))
    if args.json is not None:
        text = json.dumps(report_dict(cfg, results), indent=2) + "\n"
        write_output(args.json, "--json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return 0 if all(r.error is None for r in results) else 1
