"""``attnlab bench``: argument parsing for the benchmark; the work is :mod:`attnlab.bench`.

The two other benchmarks behind the same command have their options' meaning in their own modules here:
``--decode`` in :mod:`attnlab.cli.bench_decode` (measured by :mod:`attnlab.bench.decode`) and
``--context-parallel P`` in :mod:`attnlab.cli.bench_context_parallel` (:mod:`attnlab.bench.context_parallel`).
The output files (``--json``, ``--plot``) are checked here first, for all three.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from attnlab.cli import UsageError
from attnlab.cli.options import check_output_option, write_output

if TYPE_CHECKING:
    from attnlab.bench import BenchConfig

DTYPES = ("float32", "float16", "bfloat16", "float64")


# No size, count or repeat of a benchmark needs more (and torch's sizes are int64): larger ones are refused.
MAX_INT = 2**31 - 1


def _int_at_least(low: int, words: str) -> Callable[[str], int]:
    """An argparse type: an int from ``low`` to ``MAX_INT`` (``words`` says so in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {words}, got {value}")
        if value > MAX_INT:
            shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}... ({len(str(value))} digits)"
            raise argparse.ArgumentTypeError(f"expected {words} up to {MAX_INT}, got {shown}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time the multi-head attention variants side by side",
        description=(
            "Time every multi-head attention variant of attnlab.variants on the same input, each in a fresh "
            "process: median and interquartile range of the wall time, peak memory, useful GFLOP/s, the "
            "fraction of this machine's matmul rate and the speed relative to the chapter's class. Defaults: "
            "the bonus notebook's setting (batch 8, 1024 tokens, width 768, 12 heads, causal, float32)."
        ),
    )
    p.add_argument("--quick", action="store_true",
                   help="a small setting for a laptop (batch 2, 256 tokens, width 256, 4 heads, 5 repeats); "
                        "options given explicitly still apply")
    p.add_argument("--batch", type=_positive_int, help="sequences per batch (default 8)")
    p.add_argument("--tokens", type=_positive_int, help="tokens per sequence (default 1024)")
    p.add_argument("--width", type=_positive_int, help="embedding width d_in = d_out (default 768)")
    p.add_argument("--heads", type=_positive_int, help="attention heads; must divide --width (default 12)")
    p.add_argument("--dtype", choices=DTYPES, help="floating-point type (default float32)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="where to run (default cpu)")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"),
                   help="fwd: inference forward (no autograd); fwd+bwd: forward and backward (default fwd)")
    p.add_argument("--variants", metavar="NAMES",
                   help="comma-separated variant names, in table order (default: all registered)")
    p.add_argument("--baseline", metavar="NAME",
                   help="variant the speed column compares against (default ch03)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each variant (compilation happens during warm-up, untimed; at least 2 "
                        "warm-up calls)")
    p.add_argument("--repeats", type=_positive_int, help="timed calls per variant (default 10; --quick 5)")
    p.add_argument("--rounds", type=_positive_int,
                   help="passes over all variants, each in a fresh process, samples pooled; odd passes in reverse "
                        "order (default 1); use several on a busy machine so that slow spells are shared")
    p.add_argument("--warmup", type=_non_negative_int, help="untimed calls first (default 2; --quick 1)")
    p.add_argument("--threads", type=_positive_int, help="torch threads per worker (default: torch's)")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", type=Path, help="also draw a bar chart (PNG)")
    p.add_argument("--force", action="store_true", help="overwrite existing --json / --plot files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--window", type=_positive_int, metavar="W",
                   help="sliding-window attention of W keys (the ch03, attnlab and flash variants; the others are "
                        "listed as unavailable)")
    p.add_argument("--documents", type=_positive_int, metavar="D",
                   help="D packed documents of tokens/D tokens per sequence, causal inside (ch03 and attnlab with "
                        "the explicit mask, flash with the document ids: its kernel skips the tiles between them)")
    p.add_argument("--context-parallel", type=_int_at_least(2, "an integer >= 2"), metavar="P",
                   help="instead of the variants: ring, Ulysses and hybrid attention on P local processes against "
                        "one process (time, bytes sent, peak memory per rank, time waiting on communication); "
                        "uses --tokens (default 16384), --batch (1), --heads (4, of size 32), --dtype, --repeats "
                        "(3), --warmup (0), --threads (1 per process), --json")
    p.add_argument("--decode", action="store_true",
                   help="instead of the variants: a GPT-2-124M-shaped decoder (random weights) generates --tokens "
                        "(default 64) tokens from a 256-token prompt with and without a KV cache, per attention "
                        "variant (mha, gqa, mqa, swa, mla; --variants picks some): tokens/s, time per token at the "
                        "start and the end, KV-cache bytes, peak memory; --plot draws KV memory against context "
                        "length; uses --quick, --device, --threads (default 1), --json, --plot")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> BenchConfig:
    from attnlab.bench import DEFAULT, QUICK
    from attnlab.variants import VARIANTS

    cfg = QUICK if args.quick else DEFAULT
    overrides = {
        key: getattr(args, key)
        for key in ("batch", "tokens", "width", "heads", "dtype", "device", "mode", "repeats", "warmup",
                    "rounds", "threads", "baseline", "window", "documents")
        if getattr(args, key) is not None
    }
    cfg = replace(cfg, compile=args.compile, **overrides)
    if cfg.width % cfg.heads:
        divisors = [h for h in range(1, cfg.width + 1) if cfg.width % h == 0]
        raise UsageError(f"--heads {cfg.heads} does not divide --width {cfg.width}; try --heads in {divisors}")
    if cfg.window and cfg.documents:
        raise UsageError("--window and --documents are measured one at a time; give one of them")
    if cfg.documents and cfg.documents > cfg.tokens:
        raise UsageError(f"--documents {cfg.documents} is more than --tokens {cfg.tokens}; give at most one per token")
    if args.variants is None:
        names = tuple(VARIANTS)
    else:
        names = tuple(n.strip() for n in args.variants.split(",") if n.strip())
        unknown = [n for n in names if n not in VARIANTS]
        if unknown or not names:
            raise UsageError(
                f"unknown variant{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown)) or '(none given)'}"
                f" in --variants; valid names: {', '.join(VARIANTS)}"
            )
        if len(set(names)) != len(names):
            raise UsageError(f"--variants names a variant twice: {args.variants}")
    if cfg.baseline not in VARIANTS:
        raise UsageError(f"unknown --baseline {cfg.baseline!r}; valid names: {', '.join(VARIANTS)}")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                f"--device cuda requested but CUDA is not available (torch {torch.__version__}); use --device cpu"
            )
    _check_memory(cfg, names)
    return cfg.with_variants(names)


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(cfg: BenchConfig, names: tuple[str, ...]) -> None:
    """Refuse, before any process starts, a setting whose inputs alone (x, q, k, v and the output, plus the
    scores of the variants that hold every (query, key) pair) cannot fit in this machine's memory."""
    if cfg.device != "cpu":
        return
    total = _memory_bytes()
    if total is None:
        return
    item = _ITEMSIZE[cfg.dtype]
    need = 5 * cfg.batch * cfg.tokens * cfg.width * item  # (B, T, D) x, q, k, v, out
    if any(n.startswith("ch03") or n in ("einsum", "combined_qkv") for n in names):
        need += cfg.batch * cfg.heads * cfg.tokens * cfg.tokens * item  # (B, H, T, T) scores
    if need > total:
        raise UsageError(f"--batch {cfg.batch} --tokens {cfg.tokens} --width {cfg.width} --heads {cfg.heads} "
                         f"({cfg.dtype}) need at least {need / 2**30:.3g} GiB, more than this machine's "
                         f"{total / 2**30:.3g} GiB; give smaller sizes (--quick for a small setting)")


def write_text(path: Path, option: str, text: str) -> None:
    """Write ``text`` to the file of ``option`` all at once (:func:`attnlab.cli.options.write_output`)."""
    write_output(path, option, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def run(args: argparse.Namespace) -> int:
    # The output files first, in every mode: a benchmark that cannot save its results does not start.
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {args.plot}: give a .png file name")
    check_output_option(args.json, "--json", force=args.force)
    check_output_option(args.plot, "--plot", force=args.force)
    if getattr(args, "decode", False):
        if getattr(args, "context_parallel", None) is not None:
            raise UsageError("--decode and --context-parallel are separate benchmarks; give one of them")
        from attnlab.cli.bench_decode import run_decode_bench

        return run_decode_bench(args)
    if getattr(args, "context_parallel", None) is not None:
        if args.plot is not None:
            raise UsageError("--plot applies to the variants and --decode benchmarks, not to --context-parallel")
        from attnlab.cli.bench_context_parallel import run_context_parallel_bench

        return run_context_parallel_bench(args)
    cfg = _config(args)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from attnlab.bench import run_bench
    from attnlab.bench.table import render_table, report_json

    err = Console(stderr=True)
    total = 1 + cfg.rounds * len(cfg.variants) * (cfg.warmup_calls + cfg.repeats)
    progress = Progress(
        TextColumn("[bold]bench[/] {task.description:<22}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, transient=True, disable=args.no_progress,
    )
    with progress:
        task = progress.add_task("starting", total=total)
        report = run_bench(
            cfg,
            on_start=lambda label, steps: progress.update(task, description=label),
            on_tick=lambda: progress.advance(task),
        )

    out = Console(width=None if sys.stdout.isatty() else 180)
    out.print(render_table(report))
    if args.json is not None:
        write_text(args.json, "--json", report_json(report) + "\n")
    if args.plot is not None:
        from attnlab.bench.plot import plot_report

        write_output(args.plot, "--plot", lambda tmp: plot_report(report, tmp))
    return 0
