"""``attnlab bench --decode``: what the options of ``attnlab bench`` mean for the decode benchmark, and its
output; the measuring is :func:`attnlab.bench.decode.run_decode`.

Called by :func:`attnlab.cli.bench.run` after it has checked ``--json`` and ``--plot`` (a benchmark that
cannot save its results does not start).
"""

from __future__ import annotations

import argparse
import sys

from attnlab.cli import UsageError
from attnlab.cli.options import write_output

__all__ = ["run_decode_bench"]

# Options of attnlab bench that the decode benchmark does not use: refused rather than silently ignored.
_NOT_FOR_DECODE = ("batch", "width", "heads", "dtype", "mode", "baseline", "repeats", "rounds", "warmup",
                   "window", "documents")


def _variants(text: str | None) -> tuple[str, ...] | None:
    """``--variants`` for --decode: distinct names of :data:`attnlab.bench.decode.VARIANT_NAMES` (None: all)."""
    from attnlab.bench.decode import VARIANT_NAMES

    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in VARIANT_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise UsageError(f"--variants for --decode: give distinct names from {', '.join(VARIANT_NAMES)}, "
                         f"got {text!r}")
    return names


def run_decode_bench(args: argparse.Namespace) -> int:
    """Refuse the options that do not apply, build the :class:`~attnlab.bench.decode.DecodeConfig`, run it with a
    progress bar on stderr, print the table and write ``--json`` / ``--plot``."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from attnlab.bench.decode import (
        DECODE_DEFAULT,
        DECODE_QUICK,
        decode_json,
        plot_kv_memory,
        render_decode_table,
        run_decode,
        with_overrides,
    )

    given = [f"--{k}" for k in _NOT_FOR_DECODE if getattr(args, k, None) not in (None, False)]
    if getattr(args, "compile", False):
        given.append("--compile")
    if given:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --decode "
                         "(it runs the GPT-2-124M shape; --quick for a small one)")
    cfg = with_overrides(DECODE_QUICK if args.quick else DECODE_DEFAULT, new_tokens=args.tokens,
                         variants=_variants(args.variants), device=args.device,
                         threads=args.threads if args.threads is not None else 1)
    if cfg.prompt_tokens + cfg.new_tokens > cfg.model.context_length:
        raise UsageError(f"--tokens {cfg.new_tokens}: the prompt ({cfg.prompt_tokens}) and the new tokens must fit "
                         f"the context_length of {cfg.model.context_length}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda requested but CUDA is not available (torch {torch.__version__}); use --device cpu")

    err = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]decode[/] {task.description:<8}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, transient=True, disable=args.no_progress,
    )
    with progress:
        task = progress.add_task("starting", total=2 * cfg.new_tokens * len(cfg.variants))
        report = run_decode(cfg, on_start=lambda v: progress.update(task, description=v),
                            on_step=lambda: progress.advance(task))
    out = Console(width=None if sys.stdout.isatty() else 200)
    out.print(render_decode_table(report))
    if args.json is not None:
        text = decode_json(report) + "\n"
        write_output(args.json, "--json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    if args.plot is not None:
        write_output(args.plot, "--plot", lambda tmp: plot_kv_memory(report, tmp))
    return 0
