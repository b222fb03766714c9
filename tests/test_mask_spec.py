"""The one mask description, attnlab.masks.MaskSpec: its dense form equals the rule written out pair by pair,
its parts compose by AND, and every backend handed it computes the same function as the eager reference
handed the dense mask."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnlab import backends
from attnlab.cache import step_mask, step_spec
from attnlab.masks import MaskSpec
from tolerances import assert_close

SIZES = [(0, 0), (1, 1), (1, 3), (3, 3), (3, 97), (97, 97), (257, 257)]


def _pairwise(spec: MaskSpec, b: int, t_q: int, t_k: int) -> torch.Tensor:
    """The rule for each (row, query, key), in plain Python: (B, T_q, T_k) bool."""
    out = torch.zeros(b, t_q, t_k, dtype=torch.bool)
    for r, i, j in itertools.product(range(b), range(t_q), range(t_k)):
        if spec.query_positions is not None:
            qi = int(spec.query_positions.expand(b, t_q)[r, i])
            kj = int(spec.key_positions.expand(b, t_k)[r, j])
            ok = kj >= 0 and (not spec.is_causal or kj <= qi)
            ok = ok and (spec.window is None or kj > qi - spec.window)
        else:
            last = i + t_k - t_q
            ok = (not spec.is_causal or j <= last) and (spec.window is None or j > last - spec.window)
        if spec.document_ids is not None:
            docs = spec.document_ids.expand(b, t_q)
            ok = ok and bool(docs[r, i] == docs[r, j])
        if spec.key_padding is not None:
            ok = ok and not bool(spec.key_padding.expand(b, t_k)[r, j])
        if spec.allowed is not None:
            ok = ok and bool(spec.allowed.expand(b, 1, t_q, t_k)[r, 0, i, j])
        out[r, i, j] = ok
    return out


def _specs(b: int, t_q: int, t_k: int) -> list[MaskSpec]:
    g = torch.Generator().manual_seed(t_q * 1000 + t_k)
    pad = torch.rand(b, t_k, generator=g) < 0.3
    allowed = torch.rand(b, 1, t_q, t_k, generator=g) < 0.7
    specs = [MaskSpec(), MaskSpec(causal=True), MaskSpec(window=2), MaskSpec(causal=True, key_padding=pad),
             MaskSpec(allowed=allowed), MaskSpec(window=3, key_padding=pad, allowed=allowed)]
    if t_q == t_k:
        docs = torch.sort(torch.randint(0, 3, (b, t_q), generator=g), dim=1).values
        specs += [MaskSpec(document_ids=docs), MaskSpec(causal=True, document_ids=docs, key_padding=pad)]
    q_pos = torch.randint(0, t_k + 2, (b, t_q), generator=g)
    k_pos = torch.randint(-1, t_k + 2, (b, t_k), generator=g)
    specs += [MaskSpec(causal=True, query_positions=q_pos, key_positions=k_pos, key_padding=pad),
              MaskSpec(window=2, query_positions=q_pos, key_positions=k_pos)]
    return specs


@pytest.mark.parametrize("t_q,t_k", [s for s in SIZES if s[0] * s[1] < 10_000])
def test_dense_is_the_rule_pair_by_pair(t_q, t_k):
    b = 2
    for spec in _specs(b, t_q, t_k):
        dense = spec.dense(t_q, t_k)
        want = _pairwise(spec, b, t_q, t_k)
        if dense is None:
            assert bool(want.all()), spec
            continue
        assert torch.equal(dense.expand(b, 1, t_q, t_k)[:, 0], want), spec  # exact: booleans


def test_and_composes_parts():
    b, t = 2, 9
    specs = _specs(b, t, t)
    for a, c in itertools.product(specs, repeat=2):
        mixed = [s for s in (a, c) if s.query_positions is None and s.is_causal] and [
            s for s in (a, c) if s.query_positions is not None]
        shared_parts = [name for name in ("document_ids", "query_positions")
                        if getattr(a, name) is not None and getattr(c, name) is not None
                        and getattr(a, name) is not getattr(c, name)]
        if mixed or shared_parts:  # causal by index AND causal by position: refused, not guessed
            with pytest.raises(ValueError, match="cannot AND|both give"):
                _ = a & c
            continue
        both = a & c
        da, dc, dboth = (s.dense(t, t) for s in (a, c, both))
        full = torch.ones(b, 1, t, t, dtype=torch.bool)
        want = full & (full if da is None else da) & (full if dc is None else dc)
        got = full if dboth is None else full & dboth
        assert torch.equal(got, want)  # exact: booleans
    with pytest.raises(ValueError, match="both give document_ids"):
        _ = MaskSpec(document_ids=torch.zeros(3, dtype=torch.long)) & MaskSpec(document_ids=torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("t", [1, 3, 97])
@pytest.mark.parametrize("backend", ["eager", "torch", "auto", "flash"])
def test_every_backend_takes_the_description(t, backend):
    b, h, d = 2, 4, 8
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    specs = _specs(b, t, t)
    for spec in specs:
        # flash reads only parts with a tile form: positions never; an explicit mask only when it says which
        # keys a row may see (the same for every query: here, with one query)
        if backend == "flash" and (spec.query_positions is not None or (spec.allowed is not None and t > 1)):
            with pytest.raises(ValueError, match="flash backend"):
                backends.attention(q, k, v, mask=spec, backend=backend)
            continue
        got = backends.attention(q, k, v, mask=spec, backend=backend)
        want = backends.attention(q, k, v, mask=spec.dense(t, t), backend="eager")
        assert_close(got, want, n=t + d, msg=f"{backend} {spec}")


def test_a_float_mask_is_a_bias_and_other_dtypes_are_refused():
    bias = torch.randn(3, 3)
    spec, got = MaskSpec.describe(bias, causal=True)
    assert got is bias and spec.causal and spec.allowed is None
    spec, got = MaskSpec.describe(bias > 0)
    assert got is None and spec.allowed is not None
    with pytest.raises(TypeError, match="mask must be bool .* or float .*, got dtype torch.int64"):
        MaskSpec.describe(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="key_padding must be a bool torch.Tensor, got torch.float32"):
        MaskSpec(key_padding=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="window must be None or an int >= 1, got 0"):
        MaskSpec(window=0)
    with pytest.raises(ValueError, match="given together"):
        MaskSpec(query_positions=torch.arange(3))


def test_the_cache_step_is_a_description():
    q_pos = torch.tensor([[4, 5], [2, 3]])
    k_pos = torch.tensor([[0, 1, 2, 3, 4, 5, -1], [0, 1, 2, 3, -1, -1, -1]])
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 0] = True
    spec = step_spec(q_pos, k_pos, pad, window=3)
    assert torch.equal(step_mask(q_pos, k_pos, pad, window=3), spec.dense(2, 7))  # exact: booleans
    assert torch.equal(spec.dense(2, 7)[:, 0], _pairwise(spec, 2, 2, 7))  # exact: booleans


def test_index_and_position_alignment_are_not_mixed():
    by_index = MaskSpec(causal=True)
    by_position = MaskSpec(query_positions=torch.tensor([5, 6, 7]), key_positions=torch.tensor([0, 1, 2]))
    for a, c in ((by_index, by_position), (by_position, by_index)):
        with pytest.raises(ValueError, match="cannot AND a causal/window part aligned by index"):
            _ = a & c
    with pytest.raises(ValueError, match="cannot AND"):
        MaskSpec.describe(by_position, causal=True)
    both = MaskSpec(causal=True, query_positions=by_position.query_positions,
                    key_positions=by_position.key_positions) & MaskSpec(key_padding=torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(both.dense(3, 3)[0, 0], torch.ones(3, 3, dtype=torch.bool))  # exact: booleans (keys 0..2 <= 5)


def test_a_plain_layer_compiles_without_warnings():
    import warnings

    from attnlab.modules import MultiHeadAttention

    m = MultiHeadAttention(8, 8, 16, 0.0, 2).eval()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(m, backend="eager", fullgraph=True)(x)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
    assert_close(got, m(x), n=5 + 8)


def test_context_parallel_takes_the_description_parts_it_can_shard():
    from attnlab.distributed.context_parallel import _sharded_parts

    pad = torch.tensor([[False, True, False]])
    docs = torch.tensor([[0, 0, 1]])
    causal, kpm, ids = _sharded_parts(MaskSpec(causal=True, key_padding=pad, document_ids=docs), False, None, None)
    assert causal is True and kpm is pad and ids is docs  # the spec's own tensors, handed on
    other = torch.tensor([[True, False, False]])
    causal, kpm, ids = _sharded_parts(MaskSpec(key_padding=pad), True, other, None)  # AND with the keywords
    assert causal is True and torch.equal(kpm, pad | other) and ids is None  # exact: booleans
    for spec in (MaskSpec(window=2), MaskSpec(allowed=torch.ones(3, 3, dtype=torch.bool)),
                 MaskSpec(causal=True, query_positions=torch.arange(3), key_positions=torch.arange(3))):
        with pytest.raises(ValueError, match="have no sharded form here"):
            _sharded_parts(spec, False, None, None)
    with pytest.raises(TypeError, match="mask must be an attnlab.masks.MaskSpec or None"):
        _sharded_parts(torch.ones(3), False, None, None)  # type: ignore[arg-type]
