"""Tests for attnlab.distributed: every method on 2, 3 and 4 gloo processes against one process.

Each test starts one group of local processes (``run_local``: forked, a TCPStore on a port the OS picks,
a process-group timeout so a failing rank never hangs the suite) and runs a whole list of cases in it,
because starting processes costs more than the cases. Every case compares the gathered output and the
gathered gradients of q, k and v (all ranks' shards) with single-process attention on the whole
sequence: the eager reference in float64 on the same inputs (the exact answer), within tests/tolerances.py's
rel_tol(dtype, n) with n = d + d_v + T_q + T_k (the backward's reductions), relative to the largest value
of the reference (absolute where that is below 1).
Ulysses in float32 is held to the same backend call on one process (its local attention is that call).
"""

from __future__ import annotations

import inspect
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from attnlab import backends
from attnlab.distributed import (
    CommunicationError,
    ContextParallel,
    Layout,
    LocalRunError,
    choose_ulysses_size,
    merge_into,
    ring_attention,
    run_local,
    track_comm,
    ulysses_attention,
)
from attnlab.flash import forward_with_lse
from attnlab.masks import padding_mask
from attnlab.modules import MultiHeadAttention
from tolerances import abs_tol, attention_scale, rel_tol


def case_tol(case):
    """rel_tol of a case: head dim d = d_v = 8, T queries and T keys (the gradients' longest chain)."""
    return rel_tol(case["dtype"], 8 + 8 + 2 * case["T"])


TIMEOUT = 60.0  # seconds: the process group's timeout; the parent kills what is left soon after



# --------------------------------------------------------------------------------------------------
# Single-process reference and the per-rank case runner (module level: the ranks import them)
# --------------------------------------------------------------------------------------------------


def reference(q, k, v, causal, key_padding_mask, backend="eager"):
    """Single-process attention over the whole sequence (grouped-query by repetition)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, H, T, d)
    mask = None if key_padding_mask is None else padding_mask(key_padding_mask)  # (B, 1, 1, T)
    return backends.attention(q, k, v, mask=mask, causal=causal, backend=backend)


def _inputs(case):
    """The case's full-sequence q, k, v, output gradient and key padding mask (same on every rank)."""
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, h_kv, t, d, dt = 2, case["heads"], case["kv_heads"], case["T"], 8, case["dtype"]
    q = torch.randn(b, h, t, d, generator=gen, dtype=dt)  # (B, H, T, d)
    k = torch.randn(b, h_kv, t, d, generator=gen, dtype=dt)  # (B, H_kv, T, d)
    v = torch.randn(b, h_kv, t, d, generator=gen, dtype=dt)  # (B, H_kv, T, d)
    g = torch.randn(b, h, t, d, generator=gen, dtype=dt)  # (B, H, T, d)   dL/d out
    kpm = torch.rand(b, t, generator=gen) < 0.3 if case["pad"] else None  # (B, T) True = padding
    return q, k, v, g, kpm


def run_attention_cases(rank, world, cases):
    """Every rank: shard, attend, backward, gather. Rank 0 returns the errors against the reference."""
    cps: dict[tuple, ContextParallel] = {}
    report = []
    for case in cases:
        key = (case["method"], case.get("ulysses_size"), case.get("block"))
        if key not in cps:
            cps[key] = ContextParallel(None, case["method"], ulysses_size=case.get("ulysses_size"),
                                       block_size=case.get("block"))
        cp = cps[key]
        q, k, v, g, kpm = _inputs(case)

        def local(x, cp=cp):  # (B, H, T, d) -> this rank's (B, H, T_l, d), a leaf
            return cp.shard(x.transpose(1, 2)).transpose(1, 2).detach().requires_grad_()

        def full(x, cp=cp):  # (B, H, T_l, d) -> (B, H, T, d), every rank's rows
            return cp.gather(x.detach().transpose(1, 2)).transpose(1, 2)

        ql, kl, vl = local(q), local(k), local(v)
        out = cp.attention(ql, kl, vl, causal=case["causal"],
                           key_padding_mask=None if kpm is None else cp.shard(kpm))  # (B, H, T_l, d)
        (out * local(g)).sum().backward()
        got = [full(out), full(ql.grad), full(kl.grad), full(vl.grad)]
        if rank == 0:
            # The reference: the exact answer (float64 on the same inputs), except for Ulysses in float32,
            # whose local attention *is* a single-process backend call: held to that same call on one process.
            same = case["method"] == "ulysses" and case["dtype"] == torch.float32
            ref_dtype = case["dtype"] if same else torch.float64
            q2, k2, v2 = (x.to(ref_dtype).requires_grad_() for x in (q, k, v))
            o2 = reference(q2, k2, v2, case["causal"], kpm, backend="auto" if same else "eager")
            (o2 * g.to(ref_dtype)).sum().backward()
            want = [o2, q2.grad, k2.grad, v2.grad]
            # Error relative to the largest value (gradients at T = 1000 reach ~10; float32 rounding scales).
            errs = [float((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0))
                    for a, b in zip(got, want, strict=True)]
            shapes = [tuple(a.shape) == tuple(b.shape) for a, b in zip(got, want, strict=True)]
            report.append((case, errs, all(shapes)))
    return report


def _case(method, T, causal, pad, dtype=torch.float64, heads=4, kv_heads=None, **extra):
    return dict(method=method, T=T, causal=causal, pad=pad, dtype=dtype, heads=heads,
                kv_heads=heads if kv_heads is None else kv_heads, seed=T * 7 + causal * 3 + pad, **extra)


def _check(report, expected_cases):
    assert len(report) == expected_cases
    bad = []
    for case, errs, shapes_ok in report:
        tol = case_tol(case)
        if not shapes_ok or not all(math.isfinite(e) and e <= tol for e in errs):
            bad.append((case, errs, shapes_ok))
    assert not bad, "\n".join(f"{c}: out/dq/dk/dv errors {e} (tol {case_tol(c)}), shapes ok {s}" for c, e, s in bad)


# --------------------------------------------------------------------------------------------------
# Exactness: 2, 3 and 4 processes
# --------------------------------------------------------------------------------------------------


def test_two_processes_every_method_matches_one_process():
    cases = [_case(m, T, c, p) for m in ("ring", "ulysses") for T in (97, 257) for c in (False, True)
             for p in (False, True)]
    cases += [_case("hybrid", 97, c, p) for c in (False, True) for p in (False, True)]  # a 2 x 1 mesh
    cases += [_case(m, 1000, c, True, torch.float32) for m in ("ring", "ulysses") for c in (False, True)]
    cases += [_case("ring", 257, True, True, block=16),  # many travelling pieces, several query chunks
              _case("ring", 97, False, True, heads=4, kv_heads=2, block=8),  # grouped-query
              _case("ring", 1, True, False), _case("ulysses", 3, True, True),  # shorter than the group
              _case("hybrid", 97, True, True, ulysses_size=2)]  # an explicit 1 x 2 mesh
    report = run_local(run_attention_cases, 2, args=(cases,), timeout=TIMEOUT)[0]
    _check(report, len(cases))


def test_three_processes_ring_and_ulysses_match_one_process():
    cases = [_case("ring", T, c, p, heads=3) for T in (97, 257) for c in (False, True) for p in (False, True)]
    cases += [_case("ulysses", 257, c, True, heads=6, kv_heads=3) for c in (False, True)]
    cases += [_case("ring", 1000, True, True, torch.float32, heads=2, kv_heads=1),
              _case("hybrid", 97, True, False, heads=3)]  # 3 is prime: the hybrid picks a 3 x 1 ring
    report = run_local(run_attention_cases, 3, args=(cases,), timeout=TIMEOUT)[0]
    _check(report, len(cases))


def test_four_processes_ring_ulysses_and_hybrid_mesh_match_one_process():
    cases = [_case(m, T, c, True) for m in ("ring", "ulysses", "hybrid") for T in (97, 257) for c in (False, True)]
    cases += [_case("hybrid", 257, True, False, heads=2, kv_heads=2),  # 2 x 2 mesh with 2 heads
              _case("ring", 1000, True, False, torch.float32, heads=2, block=64),
              _case("hybrid", 1000, False, True, torch.float32, heads=2, kv_heads=2)]
    report = run_local(run_attention_cases, 4, args=(cases,), timeout=TIMEOUT)[0]
    _check(report, len(cases))


# --------------------------------------------------------------------------------------------------
# A tiny GPT trained with the sequence split over 2 processes, the module path through the protocol
# --------------------------------------------------------------------------------------------------


MHA_TAKES_CP = "context_parallel" in inspect.signature(MultiHeadAttention.__init__).parameters


class ProtocolAttention(nn.Module):
    """Causal multi-head attention that uses the ContextParallel protocol exactly as MultiHeadAttention
    does once it takes ``context_parallel=`` (used while modules.py does not have that option yet)."""

    def __init__(self, d: int, heads: int, cp: ContextParallel | None) -> None:
        super().__init__()
        self.heads, self.cp = heads, cp
        self.W_query, self.W_key, self.W_value = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for w in (self.W_query, self.W_key, self.W_value))  # (B, H, T, hd)
        if self.cp is None:
            ctx = backends.attention(q, k, v, causal=True, backend="eager")
        else:
            ctx = self.cp.attention(q, k, v, causal=True, key_padding_mask=None, scale=None)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, d))  # (B, T, d)


class TinyGPT(nn.Module):
    """Token + learned position embeddings, pre-norm attention and MLP blocks, a linear head."""

    def __init__(self, vocab: int, d: int, heads: int, context: int, layers: int, cp=None) -> None:
        super().__init__()
        self.cp = cp
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        if MHA_TAKES_CP:
            # Llama-style layers: grouped-query (one key/value head) and RoPE at this rank's global positions.
            attn = [MultiHeadAttention(d, d, context, 0.0, heads, num_kv_groups=1, rope=True, context_parallel=cp)
                    for _ in range(layers)]
        else:
            attn = [ProtocolAttention(d, heads, cp) for _ in range(layers)]
        self.attn = nn.ModuleList(attn)
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                 for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(t) if self.cp is None else self.cp.positions(t, idx.device)  # (T_l,) global positions
        x = self.tok(idx) + self.pos(pos)  # (B, T_l, d)
        for attn, norm, mlp in zip(self.attn, self.norms, self.mlp, strict=True):
            x = x + attn(norm(x))
            x = x + mlp(x)
        return self.head(x)  # (B, T_l, vocab)


def _train(model, idx, targets, valid, steps, n_valid, group=None):
    """SGD on the mean next-token loss over the valid tokens; with a group, gradients are summed over it."""
    losses = []
    for _ in range(steps):  # plain SGD by hand (torch.optim imports torch._dynamo: seconds per process)
        model.zero_grad()
        logits = model(idx)  # (B, T_l, vocab)
        per_token = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        loss = (per_token * valid.flatten()).sum() / n_valid
        loss.backward()
        total = loss.detach().clone()
        if group is not None:
            for p in model.parameters():
                dist.all_reduce(p.grad, group=group)
            dist.all_reduce(total, group=group)
        losses.append(float(total))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    return losses


def run_gpt(rank, world, method, t, steps):
    torch.manual_seed(0)
    vocab, d, heads, layers, b = 13, 16, 2, 2, 2
    data = torch.randint(0, vocab, (b, t + 1))
    idx, targets = data[:, :-1], data[:, 1:]  # (B, T)
    torch.manual_seed(1)
    single = TinyGPT(vocab, d, heads, 64, layers)
    cp = ContextParallel(None, method)
    split = TinyGPT(vocab, d, heads, 64, layers, cp=cp)
    split.load_state_dict(single.state_dict())
    valid = cp.shard(torch.ones(b, t))  # (B, T_l): 0 on the layout's padding
    losses = _train(split, cp.shard(idx), cp.shard(targets), valid, steps, b * t, group=cp.group)
    if rank != 0:
        return None
    ref_losses = _train(single, idx, targets, torch.ones(b, t), steps, b * t)
    param_err = max(float((p - q).detach().abs().max()) for p, q in zip(split.parameters(), single.parameters(), strict=True))
    return losses, ref_losses, param_err


def test_tiny_gpt_trained_over_two_processes_matches_one_process():
    losses, ref_losses, param_err = run_local(run_gpt, 2, args=("ring", 37, 4), timeout=TIMEOUT)[0]
    assert len(losses) == 4
    assert losses[-1] < losses[0]  # it trains
    # float32, 4 SGD steps of a 2-layer model (d 16, T 37, vocab 13): per step the forward and twice back
    # through each layer's reductions (projections 16 x 4, T), the vocabulary softmax and the mean over B * T
    n = 4 * (3 * 2 * (4 * 16 + 37) + 13 + 2 * 37)
    scale = max(1.0, max(abs(x) for x in ref_losses))
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= abs_tol(torch.float32, n, scale=scale), (
        losses, ref_losses)
    assert param_err <= abs_tol(torch.float32, n, scale=scale)


# --------------------------------------------------------------------------------------------------
# Failure modes
# --------------------------------------------------------------------------------------------------


def run_failures(rank, world):
    """Errors every rank must see the same way; returns their messages."""
    cp = ContextParallel(None, "ring")
    messages = {}
    x = torch.randn(1, 2, 4 + 2 * rank, 8)  # rank 1 passes a longer shard than rank 0
    try:
        cp.attention(x, x, x, causal=False)
    except ValueError as exc:
        messages["lengths"] = str(exc)
    try:
        ulysses_attention(*(torch.randn(1, 3, 4, 8),) * 3)  # 3 heads over 2 ranks
    except ValueError as exc:
        messages["heads"] = str(exc)
    try:
        ContextParallel(None, "ulysses").attention(*(torch.randn(1, 2, 5, 8),) * 3, causal=False)
        messages["ulysses odd"] = "ok"  # odd local lengths are fine without a zigzag
    except ValueError as exc:
        messages["ulysses odd"] = str(exc)
    try:
        ring_attention(*(torch.randn(1, 2, 5, 8),) * 3, causal=True)
    except ValueError as exc:
        messages["zigzag"] = str(exc)
    # Bytes sent per rank: ring forward (P - 1) local K and V blocks, backward those again plus dK, dV P times;
    # Ulysses (P - 1) / P of the local q, k, v and output each way.
    q, k, v = (torch.randn(2, 4, 40, 8, requires_grad=True) for _ in range(3))  # (B, H, T_l, d)
    kv = 2 * k.numel() * k.element_size()
    for method, fwd_want, bwd_want in (("ring", (world - 1) * kv, (world - 1) * kv + world * kv),
                                       ("ulysses", (world - 1) * 2 * kv // world, (world - 1) * 2 * kv // world)):
        cp_m = ContextParallel(None, method, block_size=16)  # several pieces: the total is the same
        with track_comm() as fwd:
            out = cp_m.attention(q, k, v, causal=True)
        with track_comm() as bwd:
            out.sum().backward()
        messages[f"bytes {method}"] = (fwd.bytes_sent, fwd_want, bwd.bytes_sent, bwd_want)
    return messages


def test_clear_errors_for_mismatched_shards_and_head_counts_and_bytes_sent_as_the_formula():
    messages = run_local(run_failures, 2, timeout=TIMEOUT)
    for m in messages:
        assert "local_tokens 4 on rank 0 but 6 on rank 1" in m["lengths"]
        assert "ContextParallel.shard" in m["lengths"]
        assert "3 query heads" in m["heads"] and "method='ring'" in m["heads"]
        assert m["ulysses odd"] == "ok"
        assert "even" in m["zigzag"]
        for method in ("ring", "ulysses"):
            sent_fwd, want_fwd, sent_bwd, want_bwd = m[f"bytes {method}"]
            assert (sent_fwd, sent_bwd) == (want_fwd, want_bwd), method


def test_no_process_group_is_a_clear_error():
    assert not dist.is_initialized()
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="initialised process group"):
        ring_attention(x, x, x)
    with pytest.raises(RuntimeError, match="initialised process group"):
        ContextParallel(None, "ulysses")


def run_dead_peer(rank, world, how):
    if rank == 1:
        if how == "dies":
            os._exit(3)
        time.sleep(6.0)  # stuck: alive, but never joins the call
        return "slept"
    t0 = time.monotonic()
    try:
        ContextParallel(None, "ring").attention(*(torch.randn(1, 1, 4, 8),) * 3, causal=True)
    except CommunicationError as exc:
        return f"{time.monotonic() - t0:.1f}s {exc}"
    return "no error"


@pytest.mark.parametrize("how", ["dies", "stuck"])
def test_a_dead_or_stuck_rank_gives_an_error_not_a_hang(how):
    t0 = time.monotonic()
    try:
        results, errors = dict(enumerate(run_local(run_dead_peer, 2, args=(how,), timeout=3.0))), {}
    except LocalRunError as exc:
        results, errors = exc.results, exc.errors
    if how == "dies":
        assert "exited with code 3" in errors[1]
    else:
        assert results[1] == "slept"
    assert "Another rank probably died" in results[0], results[0]
    assert time.monotonic() - t0 < 20.0


# --------------------------------------------------------------------------------------------------
# Pieces that need no second process
# --------------------------------------------------------------------------------------------------


def test_merge_of_two_key_halves_equals_attention_over_all_keys():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 3, 9, 4, dtype=torch.float64), \
        torch.randn(2, 3, 9, 4, dtype=torch.float64)
    out, lse = forward_with_lse(q, k[:, :, :4], v[:, :, :4])
    o2, l2 = forward_with_lse(q, k[:, :, 4:], v[:, :, 4:])
    merge_into(out, lse, o2, l2)
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    terms = attention_scale(q, k, v)  # float64: d = 4, T_k = 9
    assert float((out - want).abs().max()) <= abs_tol(torch.float64, 4 + 9, scale=terms)
    assert float((lse - torch.logsumexp(q @ k.transpose(-1, -2) / 2.0, dim=-1)).abs().max()) <= abs_tol(
        torch.float64, 4 + 9, scale=terms)
    # A row with no key on either side stays 0 with lse -inf (never NaN).
    z, zl = torch.zeros(1, 4), torch.full((1,), -math.inf)
    merge_into(z, zl, torch.zeros(1, 4), torch.full((1,), -math.inf))
    assert torch.equal(z, torch.zeros(1, 4)) and zl.item() == -math.inf  # exact: no keys, 0 and -inf by definition


@pytest.mark.parametrize("ring,ulysses,t", [(1, 1, 5), (2, 1, 9), (1, 3, 7), (2, 2, 97), (3, 2, 1000), (4, 1, 1)])
def test_layout_positions_partition_the_padded_sequence(ring, ulysses, t):
    lay = Layout(ring=ring, ulysses=ulysses)
    t_pad = lay.padded_length(t)
    assert t_pad >= t and t_pad % lay.world == 0 and t_pad - t < lay.multiple
    t_l = t_pad // lay.world
    every = torch.cat([lay.positions(r, t_l) for r in range(lay.world)])
    assert torch.equal(every.sort().values, torch.arange(t_pad))
    for r in range(lay.world):  # increasing positions inside a rank (the block planner relies on it)
        pos = lay.positions(r, t_l)
        assert bool((pos[1:] > pos[:-1]).all())
    if ring > 1:  # zigzag: rank i of the ring holds chunks i and 2R - 1 - i
        c = t_pad // (2 * ring)
        first = torch.cat([lay.positions(r, t_l) for r in range(ulysses)])
        assert torch.equal(first, torch.cat([torch.arange(c), torch.arange((2 * ring - 1) * c, 2 * ring * c)]))


def test_choose_ulysses_size(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [choose_ulysses_size(p) for p in (1, 2, 3, 4, 6, 8, 16)] == [1, 1, 1, 2, 2, 2, 4]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert choose_ulysses_size(8) == 4 and choose_ulysses_size(6) == 2


def test_track_comm_counts_nothing_outside_a_call():
    with track_comm() as stats:
        pass
    assert stats.bytes_sent == 0 and stats.wait_seconds == 0.0


# --------------------------------------------------------------------------------------------------
# The benchmark, tiny
# --------------------------------------------------------------------------------------------------


def test_context_parallel_bench_measures_bytes_as_the_formula_and_renders(tmp_path, capsys):
    from attnlab.bench.context_parallel import CPConfig, render_cp_table, run_cp_bench
    from attnlab.cli import main

    # Without the single-process baseline here: its first flash_attention call costs seconds per process.
    cfg = CPConfig(world=2, tokens=61, heads=2, head_dim=8, repeats=1, baseline=False)
    results = run_cp_bench(cfg)
    assert [r.method for r in results] == ["ring", "ulysses", "hybrid"]
    for r in results:
        assert r.error is None and r.fwd_s > 0 and r.fwd_bwd_s > 0 and r.peak_fwd is not None
        if r.method != "single":
            assert r.bytes_fwd == r.expected_fwd > 0 and r.bytes_fwd_bwd == r.expected_fwd_bwd
            assert 0.0 <= r.wait_fraction_fwd <= 1.0
    table = render_cp_table(cfg, results)
    assert "ring" in table and "target <= 1.3" in table
    # The command line: a user mistake is one line and exit 2, never a traceback.
    with pytest.raises(SystemExit) as info:
        main(["bench", "--context-parallel", "1"])
    assert info.value.code == 2
    assert "an integer >= 2" in capsys.readouterr().err
