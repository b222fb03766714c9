"""ALiBi on the flash kernel (per tile, from the slopes) against the peer a user would pick: PyTorch's SDPA
with ALiBi as a dense float bias (what BLOOM-style code hands it), forward, in one process.

    $ .venv/bin/python benchmarks/bench_alibi.py [--tokens 1024 4096] [--repeats 5] [--threads N]

Prints median wall times over the repeats (after one warm-up) and the ratio to SDPA + dense bias (built
per call, as a model's forward builds it, and prebuilt), for plain
causal attention and a sliding window of 256 (where the kernel skips the hidden tiles), and the bytes of
the dense bias SDPA needs (the kernel builds none).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import torch

from attnlab.alibi import ALiBiBias, alibi_slopes
from attnlab.flash import flash_attention


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _dense_bias(slopes: torch.Tensor, t: int, window: int | None) -> torch.Tensor:
    """ALiBi as a dense (1, H, T, T) float bias with the causal/window part as -inf."""
    bias = ALiBiBias(slopes).dense(t, t)  # (1, H, T, T)
    i = torch.arange(t)
    hidden = i[None, :] > i[:, None]  # (T, T)
    if window is not None:
        hidden |= i[None, :] <= i[:, None] - window
    return bias.masked_fill(hidden, float("-inf"))  # (1, H, T, T)


def _sdpa_dense_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                     window: int | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The peer: SDPA with ALiBi as a dense float bias, built per call (as a model's forward does) unless
    given prebuilt."""
    bias = _dense_bias(slopes, q.shape[-2], window) if bias is None else bias
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    slopes = alibi_slopes(args.heads).float()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    print("| tokens | mask | SDPA + dense bias (ms) | SDPA, bias prebuilt (ms) | flash + alibi_slopes (ms) "
          "| flash / SDPA (×) | flash / SDPA prebuilt (×) | flash, no bias (ms) | dense bias (MiB) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in args.tokens:
        q, k, v = (torch.randn(1, args.heads, t, args.head_dim) for _ in range(3))  # (B, H, T, d)
        for label, window in (("causal", None), ("window 256", 256)):
            sdpa = functools.partial(_sdpa_dense_bias, q, k, v, slopes, window)
            flash = functools.partial(flash_attention, q, k, v, causal=True, window=window)
            with torch.no_grad():
                ref = _median_ms(sdpa, args.repeats)
                prebuilt = _median_ms(functools.partial(sdpa, bias=_dense_bias(slopes, t, window)), args.repeats)
                ours = _median_ms(functools.partial(flash, alibi_slopes=slopes), args.repeats)
                plain = _median_ms(flash, args.repeats)
                err = (sdpa() - flash(alibi_slopes=slopes)).abs().max()
            assert float(err) < 1e-4, f"flash ALiBi differs from SDPA + dense bias by {float(err)}"
            mib = args.heads * t * t * 4 / 2**20
            print(f"| {t} | {label} | {ref:.1f} | {prebuilt:.1f} | {ours:.1f} | {ours / ref:.2f} | {ours / prebuilt:.2f} "
                  f"| {plain:.1f} | {mib:.0f} |")


if __name__ == "__main__":
    main()
