"""Time attnlab.flash.flash_attention against torch's fused scaled_dot_product_attention.

Causal attention, B=1, H heads, T tokens, head dim d, float32, torch's default threads.  The two
are timed alternately (flash, sdpa, flash, sdpa, ...) after warm-up so that machine noise hits both
alike; medians are reported.  A large float32 matmul timed in the same run gives the machine's
matmul rate, against which the useful attention FLOPs (4*B*H*T*T*d/2 for causal forward, three
times that for forward+backward) are compared.

    python benchmarks/bench_flash.py                   # forward, 4096 x 12 heads x 64
    python benchmarks/bench_flash.py --backward        # also forward+backward
    python benchmarks/bench_flash.py --sweep           # forward for several block sizes
    python benchmarks/bench_flash.py --memory 32768    # peak extra RSS of fwd+bwd at 32k tokens
    python benchmarks/bench_flash.py --threads 1       # one thread (steadier on a busy machine)

Block-sparse masks (issue 11): flash forward against torch.compile'd FlexAttention with the same block
mask, and flash forward+backward against SDPA with the equivalent explicit bool mask (the only other exact
CPU path with a backward; FlexAttention has none on CPU):

    python benchmarks/bench_flash.py --tokens 8192 --window 512 --backward --flex
    python benchmarks/bench_flash.py --tokens 8192 --documents 8 --backward --flex
    python benchmarks/bench_flash.py --memory 32768 --window 512   # peak extra RSS with a window
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from attnlab.flash import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, flash_attention


def median_times(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_times({"mm": lambda: a @ b}, repeats, 2)["mm"]
    return 2 * n**3 / t / 1e9


def fwd_bwd(attn, q, k, v, go):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    attn(q, k, v).backward(go)


MEMORY_SCRIPT = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
from attnlab.flash import flash_attention
def status_mib(field):
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(field + ":")) / 1024
torch.set_num_threads(1)  # memory does not depend on threads; one is far faster on a busy machine
T = int(sys.argv[1])
window = int(sys.argv[3]) or None
q, k, v = (torch.randn(1, 1, T, 64).requires_grad_() for _ in range(3))
go = torch.randn(1, 1, T, 64)
w = [t[..., :2048, :].detach().requires_grad_() for t in (q, k, v)]
flash_attention(*w, causal=True, window=window).backward(go[..., :2048, :])
del w
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status_mib("VmRSS")
t0 = time.perf_counter(); out = flash_attention(q, k, v, causal=True, window=window); t1 = time.perf_counter()
out.backward(go); t2 = time.perf_counter()
print(json.dumps({"T": T, "window": window, "extra_peak_mib": status_mib("VmHWM") - base, "fwd_s": t1 - t0,
                  "bwd_s": t2 - t1, "threads": torch.get_num_threads()}))
"""


def masked_benchmark(args, q, k, v, go) -> None:
    """--window / --documents: flash vs compiled FlexAttention (forward) and SDPA + explicit mask (fwd+bwd)."""
    t = args.tokens
    pos = torch.arange(t)
    if args.window:
        name = f"window {args.window}"
        kwargs = {"window": args.window}
        dense = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - args.window)  # (T, T)

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (ki > qi - args.window)
    else:
        name = f"{args.documents} documents of {t // args.documents}, causal inside"
        docs = pos * args.documents // t  # (T,)
        kwargs = {"document_ids": docs.unsqueeze(0), "causal": True}
        dense = (pos[None] <= pos[:, None]) & (docs[None] == docs[:, None])  # (T, T)

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (docs[qi] == docs[ki])

    def flash(q, k, v):
        return flash_attention(q, k, v, block_q=args.block_q, block_k=args.block_k, **kwargs)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

    print(f"mask: {name}; density {dense.float().mean().item():.3f} of the T x T matrix")
    err = (flash(q, k, v) - sdpa(q, k, v)).abs().max().item()
    print(f"max |flash - sdpa with the explicit mask| = {err:.2e}")
    fwd = {"flash": lambda: flash(q, k, v), "sdpa+mask": lambda: sdpa(q, k, v)}
    if args.flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(mask_mod, None, None, t, t, device="cpu")
        flex = torch.compile(flex_attention)
        t0 = time.perf_counter()
        err = (flex(q, k, v, block_mask=block_mask) - sdpa(q, k, v)).abs().max().item()
        print(f"compiled FlexAttention ready in {time.perf_counter() - t0:.0f} s; max |flex - sdpa| = {err:.2e}")
        fwd["flex (compiled)"] = lambda: flex(q, k, v, block_mask=block_mask)
    res = median_times(fwd, args.repeats, args.warmup)
    print(f"forward (median of {args.repeats}):")
    for label, sec in res.items():
        print(f"  {label:16s} {sec * 1e3:9.1f} ms   flash is {sec / res['flash']:.2f}x faster")
    if args.backward:
        res = median_times({"flash": lambda: fwd_bwd(flash, q, k, v, go),
                            "sdpa+mask": lambda: fwd_bwd(sdpa, q, k, v, go)}, args.repeats, 1)
        print(f"forward+backward (median of {args.repeats}; FlexAttention has no backward on CPU):")
        for label, sec in res.items():
            print(f"  {label:16s} {sec * 1e3:9.1f} ms   flash is {sec / res['flash']:.2f}x faster")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block-q", type=int, default=DEFAULT_BLOCK_Q)
    ap.add_argument("--block-k", type=int, default=DEFAULT_BLOCK_K)
    ap.add_argument("--backward", action="store_true", help="also time forward+backward")
    ap.add_argument("--sweep", action="store_true", help="forward time for several block sizes")
    ap.add_argument("--memory", type=int, metavar="T", help="peak extra RSS of causal fwd+bwd at T tokens")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--window", type=int, default=0, help="sliding window of W keys (vs SDPA with the mask)")
    ap.add_argument("--documents", type=int, default=0, help="D packed documents of T/D tokens, causal inside")
    ap.add_argument("--flex", action="store_true", help="with --window/--documents: also compiled FlexAttention")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    if args.memory:
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(args.memory), str(SRC), str(args.window)],
                             capture_output=True, text=True, check=True)
        print("memory:", out.stdout.strip())
        return

    torch.manual_seed(0)
    b, h, t, d = 1, args.heads, args.tokens, args.dim
    q, k, v, go = (torch.randn(b, h, t, d) for _ in range(4))
    fwd_flops = 4 * b * h * t * t * d / 2  # QK^T and PV, half the matrix (causal)
    peak = matmul_gflops()
    print(f"shape B={b} H={h} T={t} d={d} float32; matmul 2048^3: {peak:.1f} GFLOP/s; load {os.getloadavg()}")
    if args.window or args.documents:
        masked_benchmark(args, q, k, v, go)
        return

    def flash(q, k, v, bq=args.block_q, bk=args.block_k):
        return flash_attention(q, k, v, causal=True, block_q=bq, block_k=bk)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    err = (flash(q, k, v) - sdpa(q, k, v)).abs().max().item()
    print(f"max |flash - sdpa| = {err:.2e}")

    if args.sweep:
        blocks = [(64, 256), (128, 128), (128, 256), (128, 512), (256, 256), (256, 512), (512, 512), (512, 1024)]
        fns = {"sdpa": lambda: sdpa(q, k, v)}
        fns |= {f"flash {bq}x{bk}": (lambda bq=bq, bk=bk: flash(q, k, v, bq, bk)) for bq, bk in blocks}
        res = median_times(fns, args.repeats, 1)
        for name, sec in res.items():
            print(f"  {name:18s} {sec * 1e3:8.1f} ms   ratio {sec / res['sdpa']:.2f}")
        return

    res = median_times({"flash": lambda: flash(q, k, v), "sdpa": lambda: sdpa(q, k, v)}, args.repeats, args.warmup)
    print(f"forward  (block_q={args.block_q}, block_k={args.block_k}, median of {args.repeats}):")
    for name in ("sdpa", "flash"):
        gf = fwd_flops / res[name] / 1e9
        print(f"  {name:6s} {res[name] * 1e3:8.1f} ms  {gf:6.1f} GFLOP/s  ({gf / peak:.0%} of matmul rate)")
    print(f"  ratio flash / sdpa = {res['flash'] / res['sdpa']:.2f}")

    if args.backward:
        res = median_times({"flash": lambda: fwd_bwd(flash, q, k, v, go), "sdpa": lambda: fwd_bwd(sdpa, q, k, v, go)},
                           args.repeats, 1)
        print(f"forward+backward (median of {args.repeats}):")
        for name in ("sdpa", "flash"):
            gf = 3 * fwd_flops / res[name] / 1e9
            print(f"  {name:6s} {res[name] * 1e3:8.1f} ms  {gf:6.1f} GFLOP/s  ({gf / peak:.0%} of matmul rate)")
        print(f"  ratio flash / sdpa = {res['flash'] / res['sdpa']:.2f}")
    print(json.dumps({"device": "cpu", "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
