"""Prefill and decode speed of one Hugging Face model under attnlab's registered attention and HF's own.

A Mistral-style decoder built from its config (random weights, no download): 4 layers, hidden 256, 8 query
heads and 2 key/value heads of size 32, MLP 704, vocabulary 1000, float32, batch 1, torch's default threads.
For each sequence length (512, 2048) and window (none, 256 tokens) the four implementations "attnlab"
(auto backend), "attnlab_tiles" (attnlab's tiled kernel), "sdpa" and "eager" are timed *alternately*
(a, b, c, d, then b, c, d, a, ...: the order rotates each repeat, so that no name always runs right after
eager's large allocations) after one warm-up each, so machine noise hits all alike; medians are reported.

- prefill: one forward over the T-token prompt with a fresh DynamicCache (what generate does first);
  tokens/s = T / median time.
- decode: after that prefill, ``--new`` greedy steps of one token each through the cache;
  tokens/s = new / median time of the whole loop.

    python benchmarks/bench_hf.py                       # the table of docs: 512 and 2048 tokens
    python benchmarks/bench_hf.py --tokens 512 --repeats 3 --json out.json
    python benchmarks/bench_hf.py --calls --threads 1     # per-call µs of one decode attention call

``--calls`` times one attention call alone, as a decode step of this model makes it: one query (1, 8, 1, 32),
a cache of T keys/values (1, 2, T, 32) (GQA), the mask each name's mask builder gives for that step
("attnlab": an :class:`attnlab.hf.AttentionMask`, causal; "sdpa": None), the model's first attention module.
The names and ``torch.nn.functional.scaled_dot_product_attention`` called directly (the kernel alone, the
floor) are timed alternately in blocks of ``--block`` calls; the median µs per call over the blocks is reported.

Besides whole-model tokens/s, each run times the attention function alone inside the same forward passes
(:class:`AttentionClock`: the registered function for the attnlab names and "sdpa", transformers' eager
function for "eager"), so an attention-only ratio to sdpa is reported next to the whole-model one: at hidden
256 the MLP and projections, the same for every implementation, take much of a prefill.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import transformers

import attnlab.hf

IMPLS = ("attnlab", "attnlab_tiles", "sdpa", "eager")


def build(window: int | None, max_tokens: int) -> transformers.MistralForCausalLM:
    cfg = transformers.MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                     max_position_embeddings=max_tokens + 256, sliding_window=window)
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).eval()


def prefill(model, ids: torch.Tensor):
    cache = transformers.DynamicCache(config=model.config)
    out = model(ids, cache=cache, use_cache=True)
    return out.logits[:, -1:].argmax(-1), cache  # (1, 1), the cache (updated in place)


def decode(model, token: torch.Tensor, cache, steps: int) -> None:
    for _ in range(steps):
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)  # (1, 1); the cache is updated in place


class AttentionClock:
    """Time spent inside the model's attention function (what ``attn_implementation`` names), summed over the
    calls of every layer: the function is wrapped in transformers' ``ALL_ATTENTION_FUNCTIONS`` for the run
    ("eager", which models take as the fallback, is put there for the run). The mask builder, run once per
    forward, is not in it."""

    def __init__(self, impl: str) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.mistral.modeling_mistral import eager_attention_forward

        self.mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
        self.impl, self.seconds = impl, 0.0
        self.had = impl in self.mapping
        self.original = self.mapping[impl] if self.had else eager_attention_forward

    def __enter__(self) -> AttentionClock:  # noqa: PYI034 (a script's class, never subclassed)
        original = self.original

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        self.mapping[self.impl] = timed
        return self

    def __exit__(self, *exc) -> None:
        if self.had:
            self.mapping[self.impl] = self.original
        else:
            self.mapping.pop(self.impl, None)


def measure(model, impl: str, ids: torch.Tensor, new: int) -> tuple[float, float, float, float]:
    """(prefill s, decode s, attention s inside the prefill, attention s inside the decode)."""
    model.set_attn_implementation(impl)
    with torch.no_grad():
        with AttentionClock(impl) as pre_clock:
            t0 = time.perf_counter()
            token, cache = prefill(model, ids)
            t1 = time.perf_counter()
        with AttentionClock(impl) as dec_clock:
            t2 = time.perf_counter()
            decode(model, token, cache, new)
            t3 = time.perf_counter()
    return t1 - t0, t3 - t2, pre_clock.seconds, dec_clock.seconds


def run(tokens: list[int], windows: list[int | None], repeats: int, new: int) -> list[dict]:
    rows = []
    for t in tokens:
        for window in windows:
            model = build(window, max(tokens))
            ids = torch.randint(0, 1000, (1, t), generator=torch.Generator().manual_seed(t))
            times: dict[str, list[tuple[float, float, float, float]]] = {impl: [] for impl in IMPLS}
            for impl in IMPLS:  # warm-up
                measure(model, impl, ids, 2)
            for r in range(repeats):
                for impl in IMPLS[r % len(IMPLS):] + IMPLS[:r % len(IMPLS)]:  # rotated: no name always follows eager
                    times[impl].append(measure(model, impl, ids, new))
            for impl in IMPLS:
                runs = times[impl]
                pre, dec, pre_attn, dec_attn = (statistics.median(r[i] for r in runs) for i in range(4))
                rows.append({"tokens": t, "window": window, "impl": impl, "prefill_tok_s": t / pre,
                             "decode_tok_s": new / dec, "prefill_attn_s": pre_attn, "decode_attn_s": dec_attn,
                             "prefill_s": [r[0] for r in runs], "decode_s": [r[1] for r in runs],
                             "prefill_attn_runs_s": [r[2] for r in runs], "decode_attn_runs_s": [r[3] for r in runs]})
            print(f"done T={t} window={window}", file=sys.stderr, flush=True)
    return rows


CALL_IMPLS = ("attnlab", "attnlab_torch", "sdpa", "kernel")


def _one_query_calls(t: int) -> dict[str, Callable[[], object]]:
    """The four one-query decode calls of :func:`call_overhead` over a cache of ``t`` tokens, as closures."""
    from transformers import masking_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = build(None, t).model.layers[0].self_attn
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(1, 8, 1, 32, generator=gen)  # (B, H, 1, d)
    k, v = torch.randn(1, 2, t, 32, generator=gen), torch.randn(1, 2, t, 32, generator=gen)  # (B, H_kv, T, d)
    ours = attnlab.hf.mask_builder(1, 1, t, q_offset=t - 1, kv_offset=0,
                                   mask_function=masking_utils.causal_mask_function)
    scaling = module.scaling
    auto, torch_name = ALL_ATTENTION_FUNCTIONS["attnlab"], ALL_ATTENTION_FUNCTIONS["attnlab_torch"]
    sdpa, kernel = ALL_ATTENTION_FUNCTIONS["sdpa"], torch.nn.functional.scaled_dot_product_attention
    return {
        "attnlab": lambda: auto(module, q, k, v, ours, dropout=0.0, scaling=scaling),
        "attnlab_torch": lambda: torch_name(module, q, k, v, ours, dropout=0.0, scaling=scaling),
        "sdpa": lambda: sdpa(module, q, k, v, None, dropout=0.0, scaling=scaling),
        "kernel": lambda: kernel(q, k, v, scale=scaling, enable_gqa=True),
    }


def call_overhead(tokens: list[int], blocks: int, block: int) -> list[dict]:
    """Median µs per one-query decode attention call, per name (see the module docstring)."""
    rows = []
    for t in tokens:
        calls = _one_query_calls(t)
        times: dict[str, list[float]] = {name: [] for name in CALL_IMPLS}
        with torch.no_grad():
            for name in CALL_IMPLS:  # warm-up
                for _ in range(block):
                    calls[name]()
            for _ in range(blocks):
                for name in CALL_IMPLS:
                    fn = calls[name]
                    t0 = time.perf_counter()
                    for _ in range(block):
                        fn()
                    times[name].append((time.perf_counter() - t0) / block * 1e6)
        for name in CALL_IMPLS:
            rows.append({"tokens": t, "impl": name, "us_per_call": statistics.median(times[name]),
                         "blocks_us": times[name]})
    return rows


def call_table(rows: list[dict]) -> str:
    ref = {r["tokens"]: r for r in rows if r["impl"] == "sdpa"}
    floor = {r["tokens"]: r for r in rows if r["impl"] == "kernel"}
    lines = ["| cached tokens | name | µs per call | × sdpa (time) | over the bare kernel (µs) |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['impl']} | {r['us_per_call']:.1f} | "
                     f"{r['us_per_call'] / ref[r['tokens']]['us_per_call']:.2f} | "
                     f"{r['us_per_call'] - floor[r['tokens']]['us_per_call']:+.1f} |")
    lines += ["", ("µs per call: median over the blocks; × sdpa (time) < 1: faster than sdpa; \"kernel\" is "
                   "torch.nn.functional.scaled_dot_product_attention called directly (enable_gqa, no mask).")]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    ref = {(r["tokens"], r["window"]): r for r in rows if r["impl"] == "sdpa"}
    lines = [("| tokens | window | implementation | prefill tok/s | × sdpa | attention ms | × sdpa (attention) | "
              "decode tok/s | × sdpa | attention ms/step | × sdpa (attention) |"),
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = ref[(r["tokens"], r["window"])]
        new = r["decode_tok_s"] * statistics.median(r["decode_s"])  # steps per decode run
        lines.append(f"| {r['tokens']} | {r['window'] or 'none'} | {r['impl']} | {r['prefill_tok_s']:,.0f} | "
                     f"{r['prefill_tok_s'] / s['prefill_tok_s']:.2f} | {1e3 * r['prefill_attn_s']:,.1f} | "
                     f"{s['prefill_attn_s'] / r['prefill_attn_s']:.2f} | {r['decode_tok_s']:,.1f} | "
                     f"{r['decode_tok_s'] / s['decode_tok_s']:.2f} | {1e3 * r['decode_attn_s'] / new:,.2f} | "
                     f"{s['decode_attn_s'] / r['decode_attn_s']:.2f} |")
    lines += ["", ("Speeds are ×sdpa (> 1: faster). \"attention\" is the time inside the attention function alone "
                   "(every layer; the mask builder excluded), median of the repeats.")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 256], help="0 = no window")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new", type=int, default=32, help="decode steps after the prefill")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's own)")
    parser.add_argument("--calls", action="store_true", help="time one decode attention call per name instead")
    parser.add_argument("--blocks", type=int, default=31, help="--calls: timed blocks per name")
    parser.add_argument("--block", type=int, default=200, help="--calls: calls per block")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    attnlab.hf.register()
    windows = [w or None for w in args.windows]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()}", flush=True)
    if args.calls:
        rows = call_overhead(args.tokens, args.blocks, args.block)
        print(call_table(rows))
    else:
        rows = run(args.tokens, windows, args.repeats, args.new)
        print(table(rows))
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
