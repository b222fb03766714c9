"""``attnlab bench --decode``: text generation with and without a KV cache, per attention variant.

A decoder of the shape of the book's GPT-2 124M (chapter 4's ``GPT_CONFIG_124M``: 12 layers, 12 heads,
width 768, vocabulary 50257; random weights, eval mode) is built from attnlab modules, with the attention
of each variant (MHA, GQA, MQA, SWA, MLA), and greedily generates ``new_tokens`` tokens from a prompt of
``prompt_tokens`` tokens twice: *uncached*, recomputing the whole sequence at every step (the book's
``generate_text_simple``), and *cached*, the prompt once then one token per step through one cache per
layer (:mod:`attnlab.cache`; the book's ``generate_text_simple_cached``). Both paths compute the logits of
the last token only, so the difference is the attention layers' recomputation alone.

Measured per variant and path: tokens per second over the whole generation, the median time of one step
over the first and over the last ``edge`` steps (after the prompt), the peak memory above the resident
weights (see :mod:`attnlab.bench.worker`), and for the cached path the KV-cache bytes per token and in
total, both counted from the allocated buffers and from the formula (they must agree), and the largest
difference between the two paths' logits.

KV bytes per token (one sequence): ``2 * n_layers * n_kv_heads * head_dim * bytes`` for MHA / GQA / MQA /
SWA (keys and values), ``n_layers * latent_dim * bytes`` for MLA (the latent only); in total, times the
tokens in the context, capped at ``window_size`` for SWA (its rolling cache).

Shape letters: B batch (1 here), T tokens.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from attnlab.errors import AttnlabInputError
from attnlab.latent import MultiHeadLatentAttention
from attnlab.modules import MultiHeadAttention

__all__ = [
    "DECODE_DEFAULT",
    "DECODE_QUICK",
    "DecodeConfig",
    "DecodeReport",
    "Decoder",
    "GPTConfig",
    "decode_json",
    "generate",
    "kv_bytes_formula",
    "plot_kv_memory",
    "render_decode_table",
    "run_decode",
]

VARIANT_NAMES = ("mha", "gqa", "mqa", "swa", "mla")


@dataclass(frozen=True)
class GPTConfig:
    """The decoder's shape; defaults are the book's ``GPT_CONFIG_124M`` (chapter 4)."""

    vocab_size: int = 50257  # the GPT-2 tokenizer's vocabulary
    context_length: int = 1024  # longest sequence
    emb_dim: int = 768  # width
    n_heads: int = 12  # attention heads
    n_layers: int = 12  # transformer blocks
    drop_rate: float = 0.0  # the book trains with 0.1; generation runs in eval mode either way
    qkv_bias: bool = False  # no bias on the query/key/value projections


@dataclass(frozen=True)
class DecodeConfig:
    """One ``attnlab bench --decode`` run."""

    model: GPTConfig = GPTConfig()
    prompt_tokens: int = 256  # long enough that recomputing it costs (the book's "Hello, I am" is 4 tokens)
    new_tokens: int = 64  # tokens generated per path
    variants: tuple[str, ...] = VARIANT_NAMES
    gqa_groups: int = 3  # key/value heads of the GQA variant (12 heads -> groups of 4)
    window_size: int = 64  # SWA's window
    latent_dim: int | None = None  # MLA's latent; None: max(16, emb_dim // 8) as in the book
    edge: int = 10  # steps whose median is the "start" and "end" time per token
    device: str = "cpu"
    threads: int | None = None
    seed: int = 123
    backend: str = "auto"
    step_batches: tuple[int, ...] = (1, 8)  # one layer's cached step against a hand-written one: batch sizes
    step_cached: tuple[int, ...] = (1024, 8192)  # ... and cached tokens
    step_repeats: int = 60  # timed steps per setting (after 5 untimed)


DECODE_DEFAULT = DecodeConfig()
DECODE_QUICK = DecodeConfig(
    model=GPTConfig(vocab_size=1000, context_length=64, emb_dim=64, n_heads=8, n_layers=2),
    prompt_tokens=4, new_tokens=24, gqa_groups=2, window_size=8, edge=4, step_batches=(1, 2), step_cached=(32,),
    step_repeats=5,
)


# --------------------------------------------------------------------------------------------------
# The decoder (the book's GPTModel, chapter 4, with attnlab attention)
# --------------------------------------------------------------------------------------------------


def _attention(cfg: DecodeConfig, variant: str) -> nn.Module:
    m = cfg.model
    args = (m.emb_dim, m.emb_dim, m.context_length, m.drop_rate, m.n_heads, m.qkv_bias)
    if variant == "mla":
        return MultiHeadLatentAttention(*args, latent_dim=cfg.latent_dim, backend=cfg.backend)
    options: dict[str, Any] = {
        "mha": {}, "gqa": {"num_kv_groups": cfg.gqa_groups}, "mqa": {"num_kv_groups": 1},
        "swa": {"window_size": cfg.window_size},
    }[variant]
    return MultiHeadAttention(*args, backend=cfg.backend, **options)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: attention and a GELU feed-forward network, each with a shortcut."""

    def __init__(self, cfg: DecodeConfig, variant: str) -> None:
        super().__init__()
        d = cfg.model.emb_dim
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = _attention(cfg, variant)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x: Tensor, cache: Any = None) -> Tensor:
        x = x + self.att(self.norm1(x), cache=cache)  # (B, T, d)
        return x + self.ff(self.norm2(x))  # (B, T, d)


class Decoder(nn.Module):
    """GPT-2-shaped decoder: token + position embeddings, ``n_layers`` blocks, final norm, output head.
    ``forward(idx, caches=None, start=0)`` returns the logits of the **last** token, (B, vocab)."""

    def __init__(self, cfg: DecodeConfig, variant: str) -> None:
        super().__init__()
        m = cfg.model
        self.tok_emb = nn.Embedding(m.vocab_size, m.emb_dim)
        self.pos_emb = nn.Embedding(m.context_length, m.emb_dim)
        self.blocks = nn.ModuleList([_Block(cfg, variant) for _ in range(m.n_layers)])
        self.final_norm = nn.LayerNorm(m.emb_dim)
        self.out_head = nn.Linear(m.emb_dim, m.vocab_size, bias=False)

    def new_caches(self, max_tokens: int) -> list:
        return [block.att.new_cache(1, max_tokens) for block in self.blocks]  # type: ignore[union-attr, operator]

    def forward(self, idx: Tensor, caches: list | None = None, start: int = 0) -> Tensor:
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)  # (T,)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])  # (B, T, d)
        return self.out_head(self.final_norm(x[:, -1]))  # (B, vocab)


def generate(
    model: Decoder, prompt: Tensor, new_tokens: int, *, cached: bool,
    on_step: Callable[[], None] | None = None,
) -> tuple[Tensor, list[float], list[float], list[Tensor], list]:
    """Greedy generation. Returns (tokens (1, prompt + new), wall seconds per step, CPU seconds per step,
    logits per step, caches)."""
    idx, times, cpu_times, logits_seen = prompt, [], [], []
    caches = model.new_caches(prompt.shape[1] + new_tokens) if cached else None
    with torch.no_grad():
        for step in range(new_tokens):
            t0, c0 = time.perf_counter(), time.process_time()
            if not cached:
                logits = model(idx)  # recompute the whole sequence
            elif step == 0:
                logits = model(idx, caches, 0)  # the prompt, once
            else:
                logits = model(idx[:, -1:], caches, idx.shape[1] - 1)  # the newest token only
            next_idx = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
            if idx.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            idx = torch.cat((idx, next_idx), dim=1)  # (1, T + 1)
            logits_seen.append(logits)
            if on_step is not None:
                on_step()
    return idx, times, cpu_times, logits_seen, caches or []


# --------------------------------------------------------------------------------------------------
# Memory formula
# --------------------------------------------------------------------------------------------------


def kv_bytes_formula(cfg: DecodeConfig, variant: str, tokens: int, element_size: int = 4) -> tuple[int, int]:
    """(bytes per token, total bytes for ``tokens`` tokens of context) of one sequence's KV cache."""
    m = cfg.model
    head_dim = m.emb_dim // m.n_heads
    if variant == "mla":
        latent = cfg.latent_dim if cfg.latent_dim is not None else max(16, m.emb_dim // 8)
        per_token = m.n_layers * latent * element_size
    else:
        kv_heads = {"mha": m.n_heads, "gqa": cfg.gqa_groups, "mqa": 1, "swa": m.n_heads}[variant]
        per_token = 2 * m.n_layers * kv_heads * head_dim * element_size
    held = min(tokens, cfg.window_size) if variant == "swa" else tokens
    return per_token, per_token * held


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class PathResult:
    tokens_per_s: float
    start_s: float  # median seconds per step, first `edge` steps after the prompt
    end_s: float  # median seconds per step, last `edge` steps
    total_s: float
    peak_mem_bytes: int
    cpu_total_s: float  # CPU time of this process over the generation (all its threads)


@dataclass
class DecodeRow:
    variant: str
    uncached: PathResult
    cached: PathResult
    speedup: float  # cached tokens/s over uncached tokens/s (wall time)
    end_over_start: float  # cached: end time per token over start time per token (wall time)
    cpu_speedup: float  # the same two ratios in CPU time: what load from other processes does not change
    cpu_end_over_start: float
    kv_bytes_per_token: int  # counted from the allocated cache buffers
    kv_bytes_total: int
    kv_formula_per_token: int
    kv_formula_total: int
    max_logit_diff: float  # largest |cached - uncached| logit over every step
    same_tokens: bool


@dataclass
class StepRow:
    """One layer's cached step (``MultiHeadAttention(x, cache=...)``) against a hand-written step on the same
    tensors (project, write the new key/value in place, ``scaled_dot_product_attention`` over the filled
    slots, project out); medians of ``step_repeats`` steps, measured alternately. ``ratio`` is the median of
    the per-step ratios (each attnlab step against the hand-written step timed right beside it), which a
    shared machine's changing load moves far less than the ratio of the two medians."""

    variant: str
    batch: int
    cached_tokens: int
    attnlab_us: float
    hand_us: float
    ratio: float  # median over steps of attnlab / hand-written, each pair timed back to back (target <= 1.25)
    max_abs_diff: float


@dataclass
class DecodeReport:
    config: DecodeConfig
    rows: list[DecodeRow]
    machine: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRow] = field(default_factory=list)


def _hand_step(layer: MultiHeadAttention, keys: Tensor, values: Tensor, x: Tensor, position: int) -> Tensor:
    """The hand-written decoding step: what one writes without attnlab (no RoPE, one position for the batch):
    project, write the new key and value into the preallocated cache by a slice, PyTorch's SDPA over the
    filled prefix (``enable_gqa`` for grouped heads: no repeated keys), project out."""
    b, h, hk, hd = x.shape[0], layer.num_heads, layer.num_kv_groups, layer.head_dim
    q = layer.W_query(x).view(b, 1, h, hd).transpose(1, 2)  # (B, H, 1, hd)
    k = layer.W_key(x).view(b, 1, hk, hd).transpose(1, 2)  # (B, H_kv, 1, hd)
    v = layer.W_value(x).view(b, 1, hk, hd).transpose(1, 2)  # (B, H_kv, 1, hd)
    keys[:, :, position : position + 1] = k
    values[:, :, position : position + 1] = v
    out = torch.nn.functional.scaled_dot_product_attention(
        q, keys[:, :, : position + 1], values[:, :, : position + 1], enable_gqa=hk != h
    )  # (B, H, 1, hd)
    return layer.out_proj(out.transpose(1, 2).reshape(b, 1, layer.inner_dim))  # (B, 1, d)


def run_layer_steps(cfg: DecodeConfig) -> list[StepRow]:
    """One layer's cached step vs the hand-written one, for MHA and GQA at each batch size and cache length.

    The cache is filled with ``cached`` random keys and values per row (``KVCache.update``, as a prompt
    pass would leave it; a step's time does not depend on the values, and the prompt pass itself at
    8k tokens × batch 8 would take minutes on a CPU); the hand-written step gets copies of the same
    tensors. Both steps then run on the same inputs, alternately (which goes first alternates too), so
    that both see the same load; their outputs are compared."""
    m = cfg.model
    device = torch.device(cfg.device)
    rows = []
    for variant, groups in (("mha", None), ("gqa", cfg.gqa_groups)):
        torch.manual_seed(cfg.seed)
        layer = MultiHeadAttention(m.emb_dim, m.emb_dim, max(cfg.step_cached) + 64, 0.0, m.n_heads,
                                   num_kv_groups=groups, backend=cfg.backend).to(device).eval()
        for batch in cfg.step_batches:
            for cached in cfg.step_cached:
                steps = 5 + cfg.step_repeats
                cache = layer.new_cache(batch, cached + steps)
                kv_shape = (batch, layer.num_kv_groups, cached, layer.head_dim)
                xs = torch.randn(steps, batch, 1, m.emb_dim, device=device)
                ours_t, hand_t, diff = [], [], 0.0
                with torch.no_grad():
                    cache.update(torch.randn(kv_shape, device=device), torch.randn(kv_shape, device=device),
                                 trim=True)  # the prompt's keys and values
                    cache.claim(layer)
                    keys, values = cache.keys.clone(), cast(Tensor, cache.values).clone()
                    for i in range(steps):
                        if i % 2:
                            t0 = time.perf_counter()
                            hand = _hand_step(layer, keys, values, xs[i], cached + i)
                            _sync(device)
                            t1 = time.perf_counter()
                            ours = layer(xs[i], cache=cache)
                            _sync(device)
                            t2 = time.perf_counter()
                            ours_s, hand_s = t2 - t1, t1 - t0
                        else:
                            t0 = time.perf_counter()
                            ours = layer(xs[i], cache=cache)
                            _sync(device)
                            t1 = time.perf_counter()
                            hand = _hand_step(layer, keys, values, xs[i], cached + i)
                            _sync(device)
                            t2 = time.perf_counter()
                            ours_s, hand_s = t1 - t0, t2 - t1
                        if i >= 5:
                            ours_t.append(ours_s)
                            hand_t.append(hand_s)
                        diff = max(diff, float((cast(Tensor, ours) - hand).abs().max()))
                a, h = statistics.median(ours_t), statistics.median(hand_t)
                paired = statistics.median(o / w for o, w in zip(ours_t, hand_t))  # each pair: the same load
                rows.append(StepRow(variant, batch, cached, a * 1e6, h * 1e6, paired, diff))
                del cache, keys, values
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _edges(times: list[float], edge: int) -> tuple[float, float]:
    steps = times[1:] if len(times) > 1 else times  # after the prompt step
    edge = max(1, min(edge, len(steps)))
    return statistics.median(steps[:edge]), statistics.median(steps[-edge:])


def _path_result(times: list[float], cpu_times: list[float], edge: int, peak: int) -> PathResult:
    total = sum(times)
    start, end = _edges(times, edge)
    return PathResult(len(times) / total, start, end, total, peak, sum(cpu_times))


def run_decode(
    cfg: DecodeConfig,
    on_start: Callable[[str], None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> DecodeReport:
    """Build each variant's decoder and generate with and without the cache (with ``cfg.threads`` torch
    threads; the caller's thread setting is restored afterwards)."""
    before = torch.get_num_threads()
    try:
        return _run_decode(cfg, on_start, on_step)
    finally:
        torch.set_num_threads(before)


def _run_decode(
    cfg: DecodeConfig,
    on_start: Callable[[str], None] | None,
    on_step: Callable[[], None] | None,
) -> DecodeReport:
    from attnlab.bench.memory import PeakMemory

    unknown = [v for v in cfg.variants if v not in VARIANT_NAMES]
    if unknown or not cfg.variants:
        raise AttnlabInputError(f"unknown decode variant(s) {unknown or '(none)'}; valid names: {', '.join(VARIANT_NAMES)}")
    if cfg.prompt_tokens + cfg.new_tokens > cfg.model.context_length:
        raise AttnlabInputError(f"prompt_tokens + new_tokens = {cfg.prompt_tokens + cfg.new_tokens} exceeds the "
                         f"model's context_length={cfg.model.context_length}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    machine = {
        "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average_at_start": _load_average(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    rows = []
    for variant in cfg.variants:
        if on_start is not None:
            on_start(variant)
        torch.manual_seed(cfg.seed)
        model = Decoder(cfg, variant).to(device).eval()
        prompt = torch.randint(0, cfg.model.vocab_size, (1, cfg.prompt_tokens), device=device)
        generate(model, prompt, 2, cached=True)  # warm-up (first-call costs), untimed
        generate(model, prompt, 2, cached=False)
        results: dict[bool, tuple] = {}
        for cached in (False, True):
            peak = PeakMemory(device)
            peak.start()
            run = generate(model, prompt, cfg.new_tokens, cached=cached, on_step=on_step)
            results[cached] = (*run, peak.peak_bytes())
        tokens_u, times_u, cpu_u, logits_u, _, peak_u = results[False]
        tokens_c, times_c, cpu_c, logits_c, caches, peak_c = results[True]
        uncached = _path_result(times_u, cpu_u, cfg.edge, peak_u)
        cached_r = _path_result(times_c, cpu_c, cfg.edge, peak_c)
        cpu_start, cpu_end = _edges(cpu_c, cfg.edge)
        per_token = sum(c.bytes_per_token for c in caches)
        total = sum(c.nbytes for c in caches)
        formula_per_token, formula_total = kv_bytes_formula(
            cfg, variant, cfg.prompt_tokens + cfg.new_tokens, caches[0].keys.element_size()
        )
        diff = max(float((a - b).abs().max()) for a, b in zip(logits_u, logits_c))
        rows.append(DecodeRow(
            variant, uncached, cached_r, cached_r.tokens_per_s / uncached.tokens_per_s,
            cached_r.end_s / cached_r.start_s, uncached.cpu_total_s / max(cached_r.cpu_total_s, 1e-12),
            cpu_end / max(cpu_start, 1e-12), per_token, total, formula_per_token, formula_total, diff,
            bool(torch.equal(tokens_u, tokens_c)),
        ))
        del model, caches, results
    return DecodeReport(cfg, rows, machine, run_layer_steps(cfg))


def _load_average() -> str:
    try:
        import os

        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------------------------------
# Output: table, JSON, plot
# --------------------------------------------------------------------------------------------------

HEADERS = (
    "variant", "uncached (tok/s)", "cached (tok/s)", "cached / uncached (×)", "start (ms/tok)", "end (ms/tok)",
    "end / start (×)", "CPU: cached / uncached (×)", "CPU: end / start (×)", "KV per token (KiB)", "KV total (KiB)", "peak mem (MiB)", "max |Δ logit|",
)


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}g}"


def render_decode_table(report: DecodeReport) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    c, m = report.config, report.config.model
    table = Table(title=(f"attnlab bench --decode: {c.new_tokens} tokens from a {c.prompt_tokens}-token prompt, "
                         f"{m.n_layers} layers × {m.n_heads} heads × width {m.emb_dim}, vocabulary {m.vocab_size}"))
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in report.rows:
        table.add_row(
            r.variant, _fmt(r.uncached.tokens_per_s), _fmt(r.cached.tokens_per_s), f"{r.speedup:.2f}",
            f"{r.cached.start_s * 1e3:.3g}", f"{r.cached.end_s * 1e3:.3g}", f"{r.end_over_start:.2f}",
            f"{r.cpu_speedup:.2f}", f"{r.cpu_end_over_start:.2f}",
            _fmt(r.kv_bytes_per_token / 1024), _fmt(r.kv_bytes_total / 1024),
            _fmt(r.cached.peak_mem_bytes / 2**20), f"{r.max_logit_diff:.1e}",
        )
    steps = Table(title="One layer's cached step: attnlab vs a hand-written SDPA step on the same tensors (µs, median)")
    for i, h in enumerate(("variant", "batch", "cached tokens", "attnlab (µs)", "hand-written (µs)",
                           "attnlab / hand (×)", "max |Δ|")):
        steps.add_column(h, justify="left" if i == 0 else "right")
    for s in report.steps:
        steps.add_row(s.variant, str(s.batch), str(s.cached_tokens), _fmt(s.attnlab_us), _fmt(s.hand_us),
                      f"{s.ratio:.2f}", f"{s.max_abs_diff:.1e}")
    met = [f"{s.variant} B={s.batch} {s.cached_tokens}" for s in report.steps if s.ratio <= 1.25]
    legend = (f"Step target: attnlab / hand-written ≤ 1.25×; met by {len(met)} of {len(report.steps)} settings "
              f"({report.config.step_repeats} timed steps each, alternating which goes first, after 5 untimed; "
              "the ratio is the median of the per-step ratios of neighbouring steps).")
    return Group(table, *(Text(line, style="dim") for line in decode_legend(report)), steps, Text(legend, style="dim"))


def decode_legend(report: DecodeReport) -> list[str]:
    c, mach = report.config, report.machine
    met = [r.variant for r in report.rows if r.speedup >= 5.0 and r.end_over_start <= 1.5]
    met_cpu = [r.variant for r in report.rows if r.cpu_speedup >= 5.0 and r.cpu_end_over_start <= 1.5]
    return [
        (f"Setting: {c.device} ({mach.get('processor')}, {mach.get('threads')} threads), torch {mach.get('torch')}, "
         f"float32, batch 1, greedy, random weights (seed {c.seed}), backend {c.backend!r}; load average "
         f"{mach.get('load_average_at_start')} at start; {mach.get('date_utc')} UTC."),
        ("tok/s: generated tokens / wall time of the whole generation (prompt step included). uncached: every step "
         "recomputes the whole sequence; cached: the prompt once, then one token per step through a KV cache per "
         "layer."),
        (f"start / end (ms/tok): cached path, median time of one step over the first / last {c.edge} steps after "
         "the prompt. Target: cached ≥ 5× uncached tok/s, end / start ≤ 1.5×."),
        (f"KV per token / total: the cache buffers of all layers for one sequence (equal to the formula: "
         f"2 × layers × kv_heads × head_dim × 4 bytes; MLA layers × latent × 4; SWA total capped at its window of "
         f"{c.window_size}). GQA: {c.gqa_groups} key/value heads; MLA latent "
         f"{c.latent_dim or max(16, c.model.emb_dim // 8)}."),
        ("CPU: the same ratios in this process' CPU time (time.process_time), which load from other processes "
         "does not inflate: on a shared machine the wall-time ratios also carry load changes between the runs."),
        "peak mem: cached path, resident memory above the loaded weights. max |Δ logit|: cached vs uncached logits.",
        (f"Targets met by (wall time): {', '.join(met) if met else 'none'}; "
         f"(CPU time): {', '.join(met_cpu) if met_cpu else 'none'}."),
    ]


def decode_json(report: DecodeReport) -> str:
    return json.dumps({"config": asdict(report.config), "machine": report.machine,
                       "rows": [asdict(r) for r in report.rows], "steps": [asdict(s) for s in report.steps]}, indent=2)


def plot_kv_memory(report: DecodeReport, path: str | Path, max_tokens: int | None = None) -> None:
    """KV-cache memory (MiB, one sequence) against the context length, one line per variant (formula)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = report.config
    top = max_tokens or c.model.context_length
    lengths = list(range(1, top + 1, max(1, top // 256)))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for r in report.rows:
        ax.plot(lengths, [kv_bytes_formula(c, r.variant, n)[1] / 2**20 for n in lengths], label=r.variant)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache (MiB, one sequence, float32)")
    m = c.model
    ax.set_title(f"KV-cache memory: {m.n_layers} layers, {m.n_heads} heads, width {m.emb_dim}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def with_overrides(cfg: DecodeConfig, **overrides: Any) -> DecodeConfig:
    """``cfg`` with the given fields replaced (``None`` values are ignored)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
