"""Packed sequences (document ids) and the log-sum-exp under context parallelism, at world sizes 2, 3 and 4.

In the spirit of PyTorch's context-parallel document-mask test: documents of random lengths packed into one
sequence, split over the ranks with ``ContextParallel.shard`` (ids sharded like the tokens, the true length
not a multiple of the layout's, so the shards carry padding), attention causal inside each document; every
method and layout equals one process (outputs, lse and the q/k/v gradients, within 1e-10 in float64) — the
float64 reference of ``distributed_helpers`` (PyTorch's SDPA with an explicit mask, ``torch.logsumexp``).
The ring skips the (query chunk, key piece) blocks in which no query shares a document with any key: counted.
"""

from __future__ import annotations

import pytest
import torch

from attnlab.distributed import ContextParallel, count_blocks, ring_attention, run_local
from distributed_helpers import TIMEOUT, contiguous_index, explicit_allowed, max_error, reference
from tolerances import rel_tol


def _packed(seed, t, b=2):
    """(B, T) document ids: documents of random lengths (1 to ~T/3 tokens), different in each batch row."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(b, t, generator=gen) < 3.0 / max(t, 1) + 0.05
    starts[:, 0] = True
    return starts.long().cumsum(-1)  # (B, T)


def run_document_cases(rank, world):
    errs: dict[str, list[float]] = {}
    heads = 2 * world  # every method (Ulysses needs the group size to divide the heads)
    methods = [("ring", "zigzag", None, 7), ("ring", "contiguous", None, None), ("ulysses", "contiguous", None, None)]
    if world == 4:
        methods += [("hybrid", "zigzag", 2, 5), ("hybrid", "contiguous", 2, None)]
    for method, order, u, block in methods:
        cp = ContextParallel(None, method, layout=order, ulysses_size=u, block_size=block)
        for t, causal, pad in ((6 * world + 1, True, False), (23, False, True), (37, True, True)):
            gen = torch.Generator().manual_seed(t + causal)
            q = torch.randn(2, heads, t, 8, generator=gen, dtype=torch.float64)  # (B, H, T, d)
            k = torch.randn(2, heads // 2, t, 8, generator=gen, dtype=torch.float64)  # (B, H_kv, T, d) grouped
            v = torch.randn(2, heads // 2, t, 8, generator=gen, dtype=torch.float64)
            g = torch.randn(2, heads, t, 8, generator=gen, dtype=torch.float64)
            docs = _packed(t, t)  # (B, T)
            kpm = (torch.rand(2, t, generator=gen) < 0.2) if pad else None  # (B, T) True = padding

            def local(x, cp=cp):  # (B, H, T, d) -> this rank's (B, H, T_l, d), a leaf
                return cp.shard(x, dim=2).detach().requires_grad_()

            ql, kl, vl = local(q), local(k), local(v)
            out, lse = cp.attention(ql, kl, vl, causal=causal, document_ids=cp.shard(docs),
                                    key_padding_mask=None if kpm is None else cp.shard(kpm), return_lse=True)
            (out * cp.shard(g, dim=2, remember=False)).sum().backward()
            q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
            want, want_lse = reference(q2, k2, v2, explicit_allowed(t, causal=causal, docs=docs, kpm=kpm))
            (want * g).sum().backward()
            # this rank's rows of the reference: its global positions, the layout's padding (>= T) dropped
            pos = cp.positions(ql.shape[2])
            real = pos < t
            pairs = [(out[:, :, real], want[:, :, pos[real]]), (lse[:, :, real], want_lse[:, :, pos[real]]),
                     (ql.grad[:, :, real], q2.grad[:, :, pos[real]]), (kl.grad[:, :, real], k2.grad[:, :, pos[real]]),
                     (vl.grad[:, :, real], v2.grad[:, :, pos[real]])]
            e = [max_error(a, b) for a, b in pairs]
            e.append(0.0 if bool(torch.isneginf(lse[:, :, ~real]).all()) else float("inf"))  # padding rows: -inf
            errs[f"{method} {order} T={t} causal={causal} pad={pad}"] = e

    # Skipped blocks: one document per rank's chunk (contiguous), so every other rank's keys are skipped.
    t = 8 * world
    docs = (torch.arange(t) // 8)[None].expand(2, t)  # (B, T): document r = rank r's tokens
    idx = contiguous_index(rank, world, t)
    gen = torch.Generator().manual_seed(99)
    q, k, v = (torch.randn(2, 2, t, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    counts = {}
    for causal in (False, True):
        ql, kl, vl = (x[:, :, idx].clone().requires_grad_() for x in (q, k, v))
        with count_blocks() as c:
            out = ring_attention(ql, kl, vl, causal=causal, layout="contiguous", document_ids=docs[:, idx])
        out.sum().backward()
        want, _ = reference(q, k, v, explicit_allowed(t, causal=causal, docs=docs))
        counts[causal] = dict(c)
        errs[f"skip causal={causal}"] = [max_error(out, want[:, :, idx])]
    # bad ids: checked on each rank before any communication (every rank makes the same mistake here)
    for bad in (torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 8)):
        try:
            ring_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], layout="contiguous", document_ids=bad)
            counts[str(bad.dtype)] = "no error"
        except (TypeError, ValueError) as exc:
            counts[str(bad.dtype)] = str(exc)
    return errs, counts


@pytest.mark.parametrize("world", [2, 3, 4])
def test_document_masked_context_parallelism_equals_one_process_with_lse(world):
    results = run_local(run_document_cases, world, timeout=TIMEOUT)
    bound = min(1e-10, rel_tol(torch.float64, n=4 * 37, ops=8 * world))
    for rank, (errs, counts) in enumerate(results):
        assert len(errs) == 3 * (5 if world == 4 else 3) + 2
        for name, e in errs.items():
            assert all(x <= bound for x in e), f"rank {rank} {name}: out/lse/dq/dk/dv/padding errors {e} > {bound}"
        # without a causal mask rank r meets P pieces, its own computed and P - 1 skipped; with one, the
        # pieces of ranks 0..r are in its past: r skipped, its own computed (later ranks: hidden, not counted)
        assert counts[False] == {"computed": 1, "skipped": world - 1}, counts
        assert counts[True] == {"computed": 1, "skipped": rank}, counts
        assert "document_ids must have shape (batch, local tokens) = (2, 8) or (8,)" in counts["torch.int64"]
        assert "got (2, 5)" in counts["torch.int64"]
        assert counts["torch.float32"] == "document_ids must have an integer dtype, got torch.float32"

