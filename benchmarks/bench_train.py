"""Time one training step of the chapter-4 GPT with three attention classes, in one process.

The model is the book's GPTModel (chapter 4: token + position embeddings, pre-LayerNorm transformer
blocks with GELU feed-forward, output head), at the shape of issue 9: 4 layers, 4 heads, width 128,
context 128, batch 8 (vocabulary ``--vocab``, 50257 as in the book by default). Only the attention class
changes between the models:

- ``book``: the book's ``MultiHeadAttention`` (chapter 3.6.2), copied verbatim;
- ``attnlab``: ``attnlab.MultiHeadAttention`` (``--backend``, "auto" by default);
- ``nn.MHA``: ``torch.nn.MultiheadAttention(batch_first=True)`` with the causal mask.

All three start from the same weights where their parameters match (book and attnlab share names and
seeds). One step is forward, cross-entropy, backward and an AdamW update. The models are timed
round-robin (book, attnlab, nn.MHA, book, ...) after warm-up, so machine noise hits them alike; the
table gives medians and the ratio to the book's class (below 1 = faster than the book).

    python benchmarks/bench_train.py                       # dropout 0.1 and 0.0, 30 steps each
    python benchmarks/bench_train.py --steps 60 --json out.json
    python benchmarks/bench_train.py --vocab 1000          # attention's share of the step is larger
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import attnlab

# -- the book's classes, verbatim (chapter 3.6.2 and chapter 4) ------------------------------------


class BookMultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, d_in = x.shape  # noqa: RUF059  (verbatim)
        keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context_vec = (attn_weights @ values).transpose(1, 2)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(), nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"])
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg, attention):
        super().__init__()
        self.att = attention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        x = self.att(x)
        x = self.drop_shortcut(x)
        x = x + shortcut
        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        return x + shortcut


class GPTModel(nn.Module):
    def __init__(self, cfg, attention):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg, attention) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        batch_size, seq_len = in_idx.shape  # noqa: RUF059  (verbatim)
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = tok_embeds + pos_embeds
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        return self.out_head(x)


# -- the three attention classes behind one constructor ---------------------------------------------


class TorchMHA(nn.Module):
    """torch.nn.MultiheadAttention as a causal self-attention layer (batch first)."""

    def __init__(self, cfg):
        super().__init__()
        t = cfg["context_length"]
        self.mha = nn.MultiheadAttention(
            cfg["emb_dim"], cfg["n_heads"], dropout=cfg["drop_rate"], bias=cfg["qkv_bias"], batch_first=True
        )
        self.register_buffer("mask", torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1))

    def forward(self, x):
        t = x.shape[1]
        out, _ = self.mha(x, x, x, attn_mask=self.mask[:t, :t], need_weights=False, is_causal=True)
        return out


def attention_classes(backend: str) -> dict:
    def book(cfg):
        return BookMultiHeadAttention(
            cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"], cfg["n_heads"], cfg["qkv_bias"]
        )

    def ours(cfg):
        return attnlab.MultiHeadAttention(
            cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"], cfg["n_heads"], cfg["qkv_bias"],
            backend=backend,
        )

    return {"book": book, f"attnlab ({backend})": ours, "nn.MHA": TorchMHA}


def train_step(model: nn.Module, opt: torch.optim.Optimizer, idx: torch.Tensor, target: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    logits = model(idx)  # (B, T, vocab)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
    loss.backward()
    opt.step()


def measure(cfg: dict, backend: str, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per training step of each model, steps interleaved round-robin."""
    models, opts = {}, {}
    for name, make in attention_classes(backend).items():
        torch.manual_seed(123)
        models[name] = GPTModel(cfg, make).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=4e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg["vocab_size"], (batch, cfg["context_length"] + 1), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]  # (B, T), (B, T)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(warmup + steps):
        for name, model in models.items():
            t0 = time.perf_counter()
            train_step(model, opts[name], x, y)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per model and dropout (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size (default 50257, the book's)")
    p.add_argument("--backend", default="auto", help="attnlab backend (default auto)")
    p.add_argument("--dropout", type=float, nargs="+", default=[0.1, 0.0], help="dropout rates (default 0.1 0.0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this new file")
    args = p.parse_args(argv)
    if args.json is not None and args.json.exists():
        print(f"error: {args.json} exists; choose another --json path", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, load {load:.2f}")
    print("| dropout | model | ms / step (median) | vs book |")
    print("|---|---|---|---|")
    for drop in args.dropout:
        cfg = {"vocab_size": args.vocab, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 4,
               "drop_rate": drop, "qkv_bias": False}
        med = measure(cfg, args.backend, 8, args.steps, args.warmup)
        book = med["book"]
        for name, t in med.items():
            print(f"| {drop} | {name} | {t * 1e3:.2f} | {t / book:.3f} |")
            results.append({"dropout": drop, "model": name, "seconds": t, "ratio_vs_book": t / book})
    print("ms / step: forward + cross-entropy + backward + AdamW, batch 8, context 128; "
          "vs book: median step time / the book's class's (below 1 = faster).")
    if args.json is not None:
        args.json.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
