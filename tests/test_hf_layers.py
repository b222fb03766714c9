"""MultiHeadAttention.from_hf / to_hf: Llama, Mistral, Qwen2, Qwen3 and GPT-2 attention layers (tiny random
ones built from configs, no download) map one to one onto the module and give HF's outputs."""

from __future__ import annotations

import pytest
import torch

from attnlab import MultiHeadAttention
from tolerances import assert_close

transformers = pytest.importorskip("transformers")

T, HIDDEN = 7, 32


def _common(**extra):
    return dict(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=1, max_position_embeddings=64, vocab_size=50, **extra)


def _layer(kind):
    if kind == "llama":
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig, LlamaRotaryEmbedding
        cfg = LlamaConfig(**_common(rope_theta=5000.0))
        return LlamaAttention(cfg, 0), LlamaRotaryEmbedding(cfg), None
    if kind == "mistral":
        from transformers.models.mistral.modeling_mistral import (
            MistralAttention,
            MistralConfig,
            MistralRotaryEmbedding,
        )
        cfg = MistralConfig(**_common(sliding_window=3))
        return MistralAttention(cfg, 0), MistralRotaryEmbedding(cfg), 3
    if kind == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2Config, Qwen2RotaryEmbedding
        cfg = Qwen2Config(**_common())
        return Qwen2Attention(cfg, 0), Qwen2RotaryEmbedding(cfg), None
    if kind == "qwen3":
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3Config, Qwen3RotaryEmbedding
        cfg = Qwen3Config(**_common(head_dim=16))  # 4 heads x 16 = 64 != 32
        return Qwen3Attention(cfg, 0), Qwen3RotaryEmbedding(cfg), None
    raise AssertionError(kind)


def _hf_mask(window):
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return torch.zeros(T, T).masked_fill(~allowed, -torch.inf)[None, None]  # (1, 1, T, T), additive


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_rope_family_layers_map_one_to_one(kind):
    torch.manual_seed(0)
    layer, rotary, window = _layer(kind)
    layer.config._attn_implementation = "eager"
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.3, 0.3)  # norms and biases too: nothing left at its initial 1 / 0
    layer.eval()
    x = torch.randn(2, T, HIDDEN)
    positions = torch.arange(T)[None].expand(2, -1)
    with torch.no_grad():
        expected, _ = layer(x, position_embeddings=rotary(x, positions), attention_mask=_hf_mask(window))
        ours = MultiHeadAttention.from_hf(layer).eval()
        got = ours(x)
    assert ours.window_size == window and ours.num_kv_groups == 2
    assert (ours.out_proj.bias is None) == (layer.o_proj.bias is None)
    assert (ours.q_norm is not None) == (kind == "qwen3") and ours.inner_dim == layer.q_proj.out_features
    assert_close(got, expected, n=HIDDEN + ours.inner_dim + T)
    # to_hf: a fresh layer takes our weights and computes the same
    fresh, _, _ = _layer(kind)
    fresh.config._attn_implementation = "eager"
    ours.to_hf(fresh)
    for (name, a), b in zip(layer.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name  # exact: copies


def test_gpt2_layer_maps_one_to_one():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=HIDDEN, n_head=4, n_layer=1, n_positions=64, vocab_size=50, attn_pdrop=0.0,
                     resid_pdrop=0.0)
    cfg._attn_implementation = "eager"
    layer = GPT2Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.3, 0.3)
    x = torch.randn(2, T, HIDDEN)
    with torch.no_grad():
        expected = layer(x, attention_mask=_hf_mask(None))[0]
        ours = MultiHeadAttention.from_hf(layer).eval()
        got = ours(x)
    assert ours.context_length == 64 and ours.out_proj.bias is not None
    assert_close(got, expected, n=2 * HIDDEN + T)
    fresh = GPT2Attention(cfg, layer_idx=0)
    ours.to_hf(fresh)
    assert torch.equal(fresh.c_attn.weight, layer.c_attn.weight) and torch.equal(fresh.c_proj.bias, layer.c_proj.bias)


def test_unsupported_layers_are_refused():
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaConfig

    scaled = LlamaConfig(**_common(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match="supports the default RoPE only"):
        MultiHeadAttention.from_hf(LlamaAttention(scaled, 0))
    with pytest.raises(TypeError, match="layer must be a Hugging Face attention layer"):
        MultiHeadAttention.from_hf(torch.nn.Linear(2, 2))
