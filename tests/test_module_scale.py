"""MultiHeadAttention at the size of real models: no context_length x context_length buffer at build time,
the book's state_dicts still load, checkpoints move between context lengths, and the shapes of real
checkpoints (head_dim, out_proj bias, qk-norm) as one-to-one constructor keywords."""

from __future__ import annotations

import time
import tracemalloc

import pytest
import torch
from torch import nn

from attnlab import CausalAttention, MultiHeadAttention
from attnlab.modules import BOOK_MASK_LIMIT, positions_within_documents
from test_modules import BookMultiHeadAttention  # the book's class, verbatim: the state_dicts' source
from tolerances import assert_close


def test_a_131072_token_module_builds_in_under_a_second_and_50_mb():
    torch.manual_seed(0)
    MultiHeadAttention(256, 256, 8, 0.0, 8)  # first-call costs (imports, allocator) outside the measure
    tracemalloc.start()
    start = time.perf_counter()
    m = MultiHeadAttention(256, 256, 131_072, 0.0, 8, num_kv_groups=2, rope=True)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    assert held < 50 * 2**20 and peak < 50 * 2**20, (held, peak)  # the book's buffer alone: 64 GiB
    assert held == sum(p.numel() for p in m.parameters()) * 4  # nothing but the weights (float32)
    sd = m.state_dict()  # no (T, T) matrix saved above BOOK_MASK_LIMIT either
    assert next(iter(sd)) == "mask" and tuple(sd["mask"].shape) == (0, 0)
    x = torch.randn(1, 5, 256)
    assert m(x).shape == (1, 5, 256)


@pytest.mark.parametrize("context_length", [1, 3, 97, 257])
def test_the_mask_is_the_books_on_use_and_in_the_state_dict(context_length):
    m = MultiHeadAttention(4, 4, context_length, 0.0, 2)
    assert "_mask_built" not in m.__dict__  # nothing built at construction
    book = torch.triu(torch.ones(context_length, context_length), diagonal=1)
    assert torch.equal(m.mask, book)  # exact: the same triu of ones
    assert torch.equal(m.state_dict()["mask"], book)
    assert m.to(torch.float64).mask.dtype == torch.float64


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_state_dicts_load_strictly_at_any_context_length(qkv_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 6)
    book = BookMultiHeadAttention(6, 4, 9, 0.0, 2, qkv_bias)
    for context_length in (9, 7, 64, 2000):  # the book's, shorter and longer ones, one past BOOK_MASK_LIMIT
        ours = MultiHeadAttention(6, 4, context_length, 0.0, 2, qkv_bias)
        ours.load_state_dict(book.state_dict(), strict=True)
        assert_close(ours(x), book(x), n=6 + 2 + 7)
    # attnlab -> book: at the same context_length up to BOOK_MASK_LIMIT (the book's buffer has that shape)
    same = MultiHeadAttention(6, 4, 9, 0.0, 2, qkv_bias)
    BookMultiHeadAttention(6, 4, 9, 0.0, 2, qkv_bias).load_state_dict(same.state_dict(), strict=True)
    big = MultiHeadAttention(6, 4, BOOK_MASK_LIMIT + 1, 0.0, 2, qkv_bias)
    with pytest.raises(RuntimeError, match="size mismatch for mask"):
        BookMultiHeadAttention(6, 4, BOOK_MASK_LIMIT + 1, 0.0, 2, qkv_bias).load_state_dict(big.state_dict())


def test_checkpoints_move_between_context_lengths_and_a_foreign_mask_is_refused():
    torch.manual_seed(0)
    small = MultiHeadAttention(6, 4, 16, 0.0, 2, num_kv_groups=1, rope=True)
    large = MultiHeadAttention(6, 4, 4096, 0.0, 2, num_kv_groups=1, rope=True)
    large.load_state_dict(small.state_dict(), strict=True)
    small.load_state_dict(large.state_dict(), strict=True)
    x = torch.randn(1, 9, 6)
    assert torch.equal(small(x), large(x))  # exact: the same weights and the same operations
    without = {k: v for k, v in small.state_dict().items() if k != "mask"}
    large.load_state_dict(without, strict=True)  # a checkpoint with no mask (e.g. converted) loads too
    sd = small.state_dict()
    sd["mask"] = torch.ones(16, 16)
    with pytest.raises(RuntimeError, match="mask: expected the chapter's causal mask"):
        large.load_state_dict(sd)


def test_the_chapters_causal_attention_keeps_its_buffer():
    assert tuple(CausalAttention(3, 2, 6, 0.0).mask.shape) == (6, 6)  # the book prints it; it stays a buffer


def test_nested_state_dict_keeps_the_books_key_order():
    model = nn.Sequential(nn.Linear(4, 4), MultiHeadAttention(4, 4, 8, 0.0, 2), nn.Linear(4, 4))
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.mask", "1.W_query.weight", "1.W_key.weight",
                                        "1.W_value.weight", "1.out_proj.weight", "1.out_proj.bias", "2.weight", "2.bias"]
    model.load_state_dict(model.state_dict(), strict=True)


def test_head_dim_out_bias_and_qk_norm_against_a_float64_reference():
    """Qwen3's shape: 4 heads of 6 in a 10-wide model, o_proj 24 -> 10 without bias, RMS-normed q and k."""
    torch.manual_seed(0)
    m = MultiHeadAttention(10, 10, 32, 0.0, 4, num_kv_groups=2, head_dim=6, out_bias=False, qk_norm=1e-6, rope=True)
    assert (m.W_query.out_features, m.W_key.out_features, m.out_proj.in_features) == (24, 12, 24)
    assert m.out_proj.bias is None and m.q_norm is not None
    with torch.no_grad():
        m.q_norm.weight.uniform_(0.5, 1.5)
        m.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 10)
    d = m.double()
    xd = x.double()

    def heads(t, n):
        return t.view(2, 7, n, 6)

    def rms(t, w):
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6) * w

    q = rms(heads(xd @ d.W_query.weight.T, 4), d.q_norm.weight).transpose(1, 2)  # (B, H, T, hd)
    k = rms(heads(xd @ d.W_key.weight.T, 2), d.k_norm.weight).transpose(1, 2)  # (B, H_kv, T, hd)
    v = heads(xd @ d.W_value.weight.T, 2).transpose(1, 2)  # (B, H_kv, T, hd)
    pos = torch.arange(7, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, 6, 2, dtype=torch.float64) / 6)
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)  # (T, hd)

    def rot(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * ang.cos() + torch.cat((-t2, t1), dim=-1) * ang.sin()

    q, k = rot(q), rot(k).repeat_interleave(2, dim=1)  # (B, H, T, hd)
    v = v.repeat_interleave(2, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
    expected = expected.transpose(1, 2).reshape(2, 7, 24) @ d.out_proj.weight.T  # (B, T, d_out)
    m.float()
    assert_close(m(x), expected, n=24 + 10 + 7, dtype=torch.float32)
    assert "head_dim=6" in repr(m)


def test_new_options_are_checked():
    with pytest.raises(ValueError, match="head_dim must be a positive int, got 0"):
        MultiHeadAttention(8, 8, 8, 0.0, 2, head_dim=0)
    with pytest.raises(TypeError, match="out_bias must be a bool"):
        MultiHeadAttention(8, 8, 8, 0.0, 2, out_bias=None)
    with pytest.raises(ValueError, match="qk_norm must be None or an RMSNorm eps"):
        MultiHeadAttention(8, 8, 8, 0.0, 2, qk_norm=True)
    for base in (float("inf"), float("nan"), 1.0):
        with pytest.raises(ValueError, match="rope_base must be a finite number > 1"):
            MultiHeadAttention(8, 8, 8, 0.0, 2, rope=True, rope_base=base)
    assert MultiHeadAttention(8, 6, 8, 0.0, 4, head_dim=3).inner_dim == 12  # 4 * 3 != 6 is fine with head_dim


@pytest.mark.parametrize("backend", ["eager", "torch", "flash"])
def test_document_ids_and_position_ids_equal_each_document_alone(backend):
    """Packed documents of 3, 1 and 5 tokens: with document_ids, RoPE restarts per document and each token
    attends its own document only, as when each document runs alone."""
    torch.manual_seed(0)
    m = MultiHeadAttention(8, 8, 16, 0.0, 2, num_kv_groups=1, rope=True, backend=backend)
    sizes = [3, 1, 5]
    docs = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))  # (T,)
    assert positions_within_documents(docs).tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    x = torch.randn(2, 9, 8)
    packed = m(x, document_ids=docs.expand(2, -1))
    alone = torch.cat([m(part) for part in x.split(sizes, dim=1)], dim=1)
    assert_close(packed, alone, n=8 + 8 + 9)
    explicit = m(x, document_ids=docs, position_ids=positions_within_documents(docs))
    assert_close(explicit, alone, n=8 + 8 + 9)
    with pytest.raises(ValueError, match=r"document_ids must have shape \(batch, T\) = \(2, 9\) or \(T,\)"):
        m(x, document_ids=docs[:4])
    with pytest.raises(TypeError, match="position_ids must be an integer"):
        m(x, position_ids=torch.zeros(9))


def test_docstring_states_how_nan_spreads():
    assert "NaN" in (MultiHeadAttention.__doc__ or "") and "torch.nn.MultiheadAttention" in MultiHeadAttention.__doc__
    m = MultiHeadAttention(4, 4, 8, 0.0, 2, causal=False)
    x = torch.randn(1, 5, 4)
    x[0, 2, 0] = float("nan")
    assert torch.isnan(m(x)).all()  # bidirectional: every position attends the NaN one
