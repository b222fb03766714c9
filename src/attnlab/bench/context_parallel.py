"""``attnlab bench --context-parallel P``: ring, Ulysses and hybrid attention on P local processes.

For every method, P processes (``attnlab.distributed.run_local``, gloo on CPU) each hold T / P tokens of
one sequence and run the method's attention (causal by default); one more process runs single-process
attention over all T tokens with the kernel the ring is built on (:func:`attnlab.flash.flash_attention`).
Reported per method, as medians over the timed calls (and the slowest rank, since a call is as slow as
its slowest rank):

* time per call, forward and forward+backward;
* bytes this rank sent per call (``attnlab.distributed.track_comm``: payload only, without the small
  size checks) beside the formula it should equal -- ring forward: (P - 1) local K and V blocks, i.e.
  (P - 1) / P of the whole K and V; Ulysses: (P - 1) / P of the local q, k, v and output, each way;
* peak memory per rank in the first call after a tiny warm-up (the resident-set high-water mark above
  the memory before the call, inputs excluded, as :mod:`attnlab.bench.worker` measures it, with glibc's
  mmap threshold fixed at 64 KiB in every process so that freed tensors leave the resident set;
  CUDA: ``max_memory_allocated``) against the single-process peak at the same
  total length, as the ratio ``rank peak / (single peak / P)`` (target <= 1.3);
* the fraction of the call spent waiting on communication.

On one machine the P processes share its cores, so times say little about a cluster; bytes and
memory per rank do not depend on that.

Shape letters: B batch, H heads, T tokens in all, T_l = T / P per rank, d head size.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import cast

import torch

from attnlab.bench.memory import PeakMemory, fix_mmap_threshold

__all__ = ["CPConfig", "CPResult", "expected_bytes", "render_cp_table", "report_dict", "run_cp_bench"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CPConfig:
    world: int  # P processes
    tokens: int = 16384  # T, the whole sequence
    batch: int = 1
    heads: int = 4
    head_dim: int = 32
    dtype: str = "float32"
    causal: bool = True
    repeats: int = 3  # timed calls per mode
    warmup: int = 0  # untimed calls besides the first one (which measures the memory)
    methods: tuple[str, ...] = ("ring", "ulysses", "hybrid")
    block_size: int | None = None  # ring pieces (default attnlab.distributed.ring.DEFAULT_BLOCK_SIZE)
    threads: int = 1  # torch threads per process
    baseline: bool = True  # also run the single-process baseline (the memory ratio needs it)


@dataclass
class CPResult:
    method: str  # "single" for the one-process baseline
    world: int
    mesh: str
    fwd_s: float | None = None  # median seconds per forward call (slowest rank)
    fwd_bwd_s: float | None = None
    bytes_fwd: int | None = None  # bytes one rank sent in one forward call
    bytes_fwd_bwd: int | None = None
    expected_fwd: int | None = None
    expected_fwd_bwd: int | None = None
    peak_fwd: int | None = None  # bytes, the largest over the ranks
    peak_fwd_bwd: int | None = None
    wait_fraction_fwd: float | None = None
    wait_fraction_fwd_bwd: float | None = None
    error: str | None = None
    per_rank: list[dict] = field(default_factory=list)


def expected_bytes(method: str, world: int, ring: int, ulysses: int, cfg: CPConfig, backward: bool) -> int:
    """What one rank should send per call, from the shapes alone.

    ring (R ranks): forward (R - 1) K and V pieces of the local size; backward the same again plus the
    gradient accumulators dK, dV (compute dtype) R times (the last step brings them home).
    Ulysses (U ranks): (U - 1) / U of the local q, k, v and output in the forward, the same in the backward.
    hybrid: both, the ring over R groups on ring chunks of U * T_l tokens and H / U heads (the same bytes).
    """
    el = torch.empty(0, dtype=DTYPES[cfg.dtype]).element_size()
    cel = max(el, 4)  # gradient accumulators are float32 for half precision
    t_pad = _padded(cfg.tokens, method, world, ring)
    local = cfg.batch * cfg.heads * (t_pad // world) * cfg.head_dim  # elements of one local q (or k, v, out)
    total = 0
    if ulysses > 1:
        total += (ulysses - 1) * 4 * local * el // ulysses * (2 if backward else 1)
    if ring > 1:
        total += (ring - 1) * 2 * local * el
        if backward:
            total += (ring - 1) * 2 * local * el + ring * 2 * local * cel
    return total


def _padded(tokens: int, method: str, world: int, ring: int) -> int:
    from attnlab.distributed.layout import Layout

    return Layout(ring=ring, ulysses=world // ring).padded_length(tokens) if method != "single" else tokens


def _mesh_of(method: str, world: int) -> tuple[int, int]:
    from attnlab.distributed.hybrid import choose_ulysses_size

    if method == "ring":
        return world, 1
    if method == "ulysses":
        return 1, world
    u = choose_ulysses_size(world)
    return world // u, u


def _rank_worker(rank: int, world: int, cfg: CPConfig, method: str) -> dict:
    """One rank: build its shards, warm up, time and measure forward and forward+backward."""
    fix_mmap_threshold()
    from attnlab.distributed import ContextParallel, track_comm
    from attnlab.flash import flash_attention

    device = torch.device("cpu")
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(rank)
    if method == "single":
        t_l = cfg.tokens

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return cast(torch.Tensor, flash_attention(q, k, v, causal=cfg.causal))  # no return_lse: one tensor
    else:
        cp = ContextParallel(None, method, block_size=cfg.block_size)
        cp.seq_len = cfg.tokens  # as cp.shard(x) would record for the whole sequence
        t_l = cp.layout.local_length(cfg.tokens)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return cast(torch.Tensor, cp.attention(q, k, v, causal=cfg.causal))  # no return_lse: one tensor

    shape = (cfg.batch, cfg.heads, t_l, cfg.head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, device=device) for _ in range(3))  # (B, H, T_l, d)
    grad = torch.randn(shape, dtype=dtype, device=device)  # (B, H, T_l, d)

    def fwd() -> None:
        with torch.no_grad():
            attend(q, k, v)

    def fwd_bwd() -> None:
        qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
        attend(qs, ks, vs).backward(grad)

    # First calls allocate once-only buffers (BLAS workspaces, thread pools): make them on a tiny input.
    tiny = [torch.randn(cfg.batch, cfg.heads, 8, cfg.head_dim, dtype=dtype, device=device, requires_grad=True)
            for _ in range(3)]  # (B, H, 8, d)
    seq_len = None if method == "single" else cp.seq_len
    if method != "single":
        cp.seq_len = None
    attend(*tiny).sum().backward()
    if method != "single":
        cp.seq_len = seq_len
    del tiny

    out: dict = {"rank": rank}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        _barrier(method)
        meter = PeakMemory(device)
        meter.start()
        fn()  # the memory call, also a warm-up
        peak = meter.peak_bytes()
        for _ in range(cfg.warmup):
            fn()
        times, waits, sent = [], [], []
        for _ in range(cfg.repeats):
            _barrier(method)
            with track_comm() as stats:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            waits.append(stats.wait_seconds)
            sent.append(stats.bytes_sent)
        out[name] = {"times": times, "waits": waits, "bytes": sent[0], "peak": peak}
    return out


def _barrier(method: str) -> None:
    if method != "single":
        import torch.distributed as dist

        dist.barrier()


def run_cp_bench(cfg: CPConfig, on_progress: Callable[[str], None] | None = None) -> list[CPResult]:
    """Run the single-process baseline, then every method on ``cfg.world`` local processes."""
    from attnlab.distributed import LocalRunError, run_local

    results = []
    for method in (("single",) if cfg.baseline else ()) + tuple(cfg.methods):
        world = 1 if method == "single" else cfg.world
        ring, uly = (1, 1) if method == "single" else _mesh_of(method, world)
        res = CPResult(method, world, f"{ring} x {uly}")
        if on_progress is not None:
            on_progress(method)
        try:
            ranks = run_local(_rank_worker, world, args=(cfg, method), timeout=600.0, threads=cfg.threads)
        except LocalRunError as exc:
            res.error = next(iter(exc.errors.values())).splitlines()[0]
            results.append(res)
            continue
        res.per_rank = ranks

        def slowest(mode: str, key: str, ranks: list[dict] = ranks) -> list[float]:
            return [max(r[mode][key][i] for r in ranks) for i in range(cfg.repeats)]

        res.fwd_s = statistics.median(slowest("fwd", "times"))
        res.fwd_bwd_s = statistics.median(slowest("fwd_bwd", "times"))
        res.peak_fwd = max(r["fwd"]["peak"] for r in ranks)
        res.peak_fwd_bwd = max(r["fwd_bwd"]["peak"] for r in ranks)
        if method != "single":
            res.bytes_fwd = max(r["fwd"]["bytes"] for r in ranks)
            res.bytes_fwd_bwd = max(r["fwd_bwd"]["bytes"] for r in ranks)
            res.expected_fwd = expected_bytes(method, world, ring, uly, cfg, backward=False)
            res.expected_fwd_bwd = expected_bytes(method, world, ring, uly, cfg, backward=True)
            res.wait_fraction_fwd = statistics.median(
                max(r["fwd"]["waits"][i] / r["fwd"]["times"][i] for r in ranks) for i in range(cfg.repeats))
            res.wait_fraction_fwd_bwd = statistics.median(
                max(r["fwd_bwd"]["waits"][i] / r["fwd_bwd"]["times"][i] for r in ranks) for i in range(cfg.repeats))
        results.append(res)
    return results


def _mib(x: int | None) -> str:
    return "—" if x is None else f"{x / 2**20:.1f}"


def _ratio(peak: int | None, single: int | None, world: int) -> str:
    if peak is None or not single:
        return "—"
    return f"{peak / (single / world):.2f}"


def render_cp_table(cfg: CPConfig, results: list[CPResult]) -> str:
    """A plain-text table (units in the header) and a legend."""
    single = next((r for r in results if r.method == "single"), None)
    single_fwd = single.peak_fwd if single is not None else None
    single_fwd_bwd = single.peak_fwd_bwd if single is not None else None
    head = ("method", "mesh R x U", "fwd (ms)", "fwd+bwd (ms)", "sent fwd (MiB)", "formula fwd (MiB)",
            "sent fwd+bwd (MiB)", "formula fwd+bwd (MiB)", "peak fwd (MiB)", "ratio fwd", "peak fwd+bwd (MiB)",
            "ratio fwd+bwd", "wait fwd", "wait fwd+bwd")
    rows = []
    for r in results:
        if r.error is not None:
            short = r.error if len(r.error) <= 60 else r.error[:57] + "..."
            rows.append((r.method, r.mesh, f"error: {short}") + ("",) * (len(head) - 3))
            continue

        def ms(x: float | None) -> str:
            return "—" if x is None else f"{x * 1e3:.0f}"

        def frac(x: float | None) -> str:
            return "—" if x is None else f"{x:.0%}"

        rows.append((
            r.method, r.mesh, ms(r.fwd_s), ms(r.fwd_bwd_s), _mib(r.bytes_fwd), _mib(r.expected_fwd),
            _mib(r.bytes_fwd_bwd), _mib(r.expected_fwd_bwd), _mib(r.peak_fwd),
            "1 process" if r.method == "single" else _ratio(r.peak_fwd, single_fwd, r.world),
            _mib(r.peak_fwd_bwd),
            "1 process" if r.method == "single" else _ratio(r.peak_fwd_bwd, single_fwd_bwd, r.world),
            frac(r.wait_fraction_fwd), frac(r.wait_fraction_fwd_bwd),
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in (head, *rows)]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    legend = (
        f"\nContext parallel over P = {cfg.world} local processes (gloo, {cfg.threads} torch thread(s) each): "
        f"batch {cfg.batch}, {cfg.tokens} tokens in all, {cfg.heads} heads of {cfg.head_dim}, {cfg.dtype}, "
        f"{'causal' if cfg.causal else 'not causal'}; median of {cfg.repeats} calls after {1 + cfg.warmup} untimed, "
        "the slowest rank per call.\n"
        "single: one process, attnlab.flash.flash_attention over all tokens. mesh: ring ranks x Ulysses ranks.\n"
        "sent: bytes one rank sent per call (payload; the size checks are extra, a few hundred bytes); formula: "
        "ring (R-1) local K+V blocks forward, again plus R x dK+dV backward; Ulysses (U-1)/U of local q,k,v,out.\n"
        "peak: memory a call needs above what was resident before it (inputs excluded; glibc mmap threshold 64 KiB "
        "in every process), the largest rank; "
        "ratio: rank peak / (single peak / P), target <= 1.3.\n"
        "wait: fraction of the call a rank spent blocked on communication (the largest rank)."
    )
    return "\n".join(lines) + legend


def report_dict(cfg: CPConfig, results: list[CPResult]) -> dict:
    return {"config": asdict(cfg), "results": [asdict(r) for r in results]}
