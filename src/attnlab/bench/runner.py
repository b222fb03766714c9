"""Run the benchmark: one fresh worker process per variant, results gathered into a :class:`BenchReport`.

Workers are forked from a ``multiprocessing`` fork server that has already imported torch and attnlab
(cheap to start, and nothing in the server has run a kernel, initialised CUDA or allocated tensors), so
every variant starts from the same clean state. A worker that dies (e.g. killed by the kernel for lack
of memory) becomes a row saying so; the run goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from attnlab.bench.stats import Summary, attention_flops, matmul_flops, summarize

__all__ = ["DEFAULT", "QUICK", "BenchConfig", "BenchReport", "VariantResult", "run_bench"]


@dataclass(frozen=True)
class BenchConfig:
    """What ``attnlab bench`` measures. Defaults: the bonus notebook's setting (GPT-2 small's attention)."""

    batch: int = 8  # sequences per batch
    tokens: int = 1024  # tokens per sequence (= context_length)
    width: int = 768  # d_in = d_out, the embedding size
    heads: int = 12  # attention heads (head_dim = width / heads = 64)
    dtype: str = "float32"  # float32, float16, bfloat16 or float64
    device: str = "cpu"  # cpu or cuda
    mode: str = "fwd"  # "fwd": inference forward (eval, no autograd); "fwd+bwd": forward + backward
    variants: tuple[str, ...] = ()  # names from attnlab.variants.VARIANTS; () = all
    compile: bool = False  # torch.compile each variant (compilation happens in the warm-up)
    repeats: int = 10  # timed calls per variant and round
    rounds: int = 1  # passes over all variants (fresh process each); samples of all rounds are pooled
    warmup: int = 2  # untimed calls first (allocations, caches, compilation)
    threads: int | None = None  # torch.set_num_threads in each worker; None = torch's default
    baseline: str = "ch03"  # the row the "speed vs" column divides by
    seed: int = 123  # torch.manual_seed in each worker
    matmul_n: int | None = None  # size N of the N x N matmul giving the machine's rate; None = by device
    window: int | None = None  # sliding window of this many keys (MultiHeadAttention-based variants only)
    documents: int | None = None  # this many packed documents per sequence, causal inside (same variants)

    @property
    def warmup_calls(self) -> int:
        """Warm-up calls actually made: with ``compile``, at least 2, so that a recompilation triggered by
        the second call (guards failing once state set by the first call exists) is never timed."""
        return max(self.warmup, 2) if self.compile else self.warmup

    def with_variants(self, names: tuple[str, ...]) -> BenchConfig:
        return replace(self, variants=names)


DEFAULT = BenchConfig()
# --quick: a small setting that runs in seconds on a laptop.
QUICK = BenchConfig(batch=2, tokens=256, width=256, heads=4, repeats=5, warmup=1)


@dataclass
class VariantResult:
    """One row of the table."""

    name: str
    status: str  # "ok", "unavailable", "out of memory", "compile failed", "error", "killed"
    note: str = ""
    times_s: list[float] = field(default_factory=list)
    summary: Summary | None = None
    peak_mem_bytes: int | None = None
    gflops: float | None = None  # useful GFLOP/s at the median time
    frac_of_matmul: float | None = None  # gflops / the machine's matmul GFLOP/s
    speedup: float | None = None  # median(baseline) / median(this); > 1 = faster than the baseline

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["summary"] = self.summary.to_dict() if self.summary else None
        return out


@dataclass
class BenchReport:
    config: BenchConfig
    machine: dict[str, Any]
    matmul_gflops: float | None
    matmul_n: int
    flops: int  # useful operations of one timed call
    results: list[VariantResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": {
                **asdict(self.config), "variants": list(self.config.variants),
                "warmup_calls": self.config.warmup_calls,
            },
            "machine": self.machine,
            "matmul": {"n": self.matmul_n, "gflops": self.matmul_gflops},
            "flops_per_call": self.flops,
            "flop_formula": (
                "forward = 2*B*T*d_in*d_out*3 + 2*B*T*d_out*d_out + 4*B*P*d_out, "
                "P = T*(T+1)/2 (causal); fwd+bwd = 3 x forward"
            ),
            "spread": "IQR = 75th - 25th percentile of the timed samples",
            "peak_memory": "bytes above the resident (CPU) / allocated (CUDA) memory before the timed calls",
            "results": [r.to_dict() for r in self.results],
        }


def machine_info(cfg: BenchConfig) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": cfg.threads or torch.get_num_threads(),
        "load_average_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["processor"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if cfg.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["attnlab.bench.worker"])
        return ctx
    return multiprocessing.get_context("spawn")


def _run_in_worker(ctx: Any, target: Callable[..., None], args: tuple[Any, ...], on_tick: Callable[[], None],
                   ) -> dict[str, Any]:
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    child.close()
    result: dict[str, Any] | None = None
    try:
        while True:
            try:
                kind, payload = parent.recv()
            except EOFError:
                break
            if kind == "tick":
                on_tick()
            elif kind == "result":
                result = payload
                break
    finally:
        proc.join()
        parent.close()
    if result is None:
        code = proc.exitcode
        if code is not None and code < 0:
            sig = -code
            hint = " (probably out of memory)" if sig == 9 else ""
            return {"status": "killed", "note": f"worker killed by signal {sig}{hint}"}
        return {"status": "error", "note": f"worker exited with code {code} without a result"}
    return result


def run_bench(
    cfg: BenchConfig,
    *,
    on_start: Callable[[str, int], None] | None = None,
    on_tick: Callable[[], None] | None = None,
) -> BenchReport:
    """Measure every variant of ``cfg`` (plus the machine's matmul rate) in fresh worker processes.

    ``on_start(label, steps)`` is called before each measurement, ``on_tick()`` after every call of it
    (a progress bar hooks in here)."""
    from attnlab.bench import worker

    ctx = _context()
    start = on_start or (lambda label, steps: None)
    tick = on_tick or (lambda: None)
    cfg_dict = {**asdict(cfg), "warmup": cfg.warmup_calls}
    n = cfg.matmul_n or (8192 if cfg.device == "cuda" else 2048)

    machine = machine_info(cfg)  # before any worker runs: the load average is the other processes'
    start("matmul", 1)
    mm = _run_in_worker(ctx, worker.measure_matmul, (cfg_dict, n), tick)
    tick()
    matmul_gflops = None
    if mm["status"] == "ok":
        matmul_gflops = matmul_flops(n) / summarize(mm["times_s"]).median / 1e9

    flops = attention_flops(
        cfg.batch, cfg.tokens, cfg.width, cfg.width, cfg.heads, causal=True, backward=cfg.mode == "fwd+bwd"
    )
    # Rounds interleave the variants in time, so that a slow spell of the machine (other processes)
    # is shared between them instead of landing on one row; odd rounds go in reverse order, so that no
    # variant always runs right after the same neighbour.
    raws: dict[str, list[dict[str, Any]]] = {name: [] for name in cfg.variants}
    for r in range(cfg.rounds):
        for name in cfg.variants if r % 2 == 0 else reversed(cfg.variants):
            if raws[name] and raws[name][-1]["status"] != "ok":
                continue  # unavailable / failed once: not retried
            label = name if cfg.rounds == 1 else f"{name} ({r + 1}/{cfg.rounds})"
            start(label, cfg.warmup_calls + cfg.repeats)
            raws[name].append(_run_in_worker(ctx, worker.measure_variant, (cfg_dict, name), tick))

    results = []
    for name in cfg.variants:
        failed = [raw for raw in raws[name] if raw["status"] != "ok"]
        if failed:
            results.append(VariantResult(name=name, status=failed[0]["status"], note=failed[0].get("note", "")))
            continue
        res = VariantResult(name=name, status="ok", note=raws[name][0].get("note", ""))
        res.times_s = [t for raw in raws[name] for t in raw["times_s"]]
        res.summary = summarize(res.times_s)
        res.peak_mem_bytes = max(raw["peak_mem_bytes"] for raw in raws[name])
        res.gflops = flops / res.summary.median / 1e9
        if matmul_gflops:
            res.frac_of_matmul = res.gflops / matmul_gflops
        results.append(res)

    base = next((res for res in results if res.name == cfg.baseline and res.summary), None)
    if base is not None and base.summary is not None:
        for res in results:
            if res.summary:
                res.speedup = base.summary.median / res.summary.median
    return BenchReport(
        config=cfg, machine=machine, matmul_gflops=matmul_gflops, matmul_n=n, flops=flops,
        results=results,
    )
