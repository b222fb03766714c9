"""attnlab.masks: one convention (True = may attend), masks that compose."""

from __future__ import annotations

import pytest
import torch

from attnlab.masks import and_masks, causal_mask, or_masks, padding_mask, to_additive, window_mask


def test_causal_square_is_lower_triangle():
    assert torch.equal(causal_mask(4), torch.ones(4, 4, dtype=torch.bool).tril())


def test_causal_bottom_right_matches_pytorch():
    from torch.nn.attention.bias import causal_lower_right

    for t_q, t_k in [(3, 7), (7, 3), (1, 5), (5, 1)]:
        expected = causal_lower_right(t_q, t_k)._materialize()
        assert torch.equal(causal_mask(t_q, t_k), expected)


def test_padding_mask_inverts_and_broadcasts():
    pad = torch.tensor([[False, False, True], [False, True, True]])
    m = padding_mask(pad)
    assert m.shape == (2, 1, 1, 3)
    assert torch.equal(m[:, 0, 0], ~pad)


def test_masks_compose():
    pad = padding_mask(torch.tensor([[False, False, True]]))  # (1, 1, 1, 3)
    both = and_masks(causal_mask(3), pad)
    expected = torch.tensor([[True, False, False], [True, True, False], [True, True, False]])
    assert torch.equal(both[0, 0], expected)
    assert and_masks(None, None) is None
    assert torch.equal(or_masks(causal_mask(3), causal_mask(3).T), torch.ones(3, 3, dtype=torch.bool))
    assert or_masks(causal_mask(3), None) is None


def test_window_mask():
    w = window_mask(5, window=2)
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(w, expected)


def test_to_additive():
    add = to_additive(torch.tensor([True, False]))
    assert add[0] == 0 and torch.isneginf(add[1])


def test_errors():
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor \(True = padding\), got dtype torch.int64"):
        padding_mask(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, num_tokens\), got shape \(3,\)"):
        padding_mask(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"t_q must be a non-negative int, got -1"):
        causal_mask(-1)
    with pytest.raises(ValueError, match=r"window must be an int >= 1, got 0"):
        window_mask(3, window=0)


def test_symbolic_and_traced_lengths():
    """Lengths may be symbolic (torch.export / compile) or 0-d tensors (torch.jit.trace)."""
    assert torch.equal(causal_mask(torch.tensor(3), torch.tensor(5)), causal_mask(3, 5))
    with pytest.raises(TypeError, match=r"t_k must be a non-negative int, got float \(2.5\)"):
        causal_mask(3, 2.5)  # type: ignore[arg-type]

    class M(torch.nn.Module):
        def forward(self, x):
            return causal_mask(x.shape[0], x.shape[0] + 2) & window_mask(x.shape[0], x.shape[0] + 2, window=2)

    t = torch.export.Dim("T", max=16)
    program = torch.export.export(M(), (torch.zeros(4),), dynamic_shapes=({0: t},))
    for n in (2, 5, 16):
        assert torch.equal(program.module()(torch.zeros(n)), window_mask(n, n + 2, window=2))


@pytest.mark.parametrize("t_q,t_k", [(1, 1), (4, 4), (3, 7), (7, 3), (0, 3), (3, 0)])
@pytest.mark.parametrize("window", [1, 2, 5])
def test_window_mask_is_the_contract_definition(t_q, t_k, window):
    offset = t_k - t_q
    expected = torch.tensor(
        [[i + offset - window < j <= i + offset for j in range(t_k)] for i in range(t_q)], dtype=torch.bool
    ).reshape(t_q, t_k)
    assert torch.equal(window_mask(t_q, t_k, window=window), expected)
    assert torch.equal(causal_mask(t_q, t_k), torch.ones(t_q, t_k, dtype=torch.bool).tril(offset))
