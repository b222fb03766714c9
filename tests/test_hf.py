"""attnlab's attention inside Hugging Face models (attnlab.hf): every registered name gives HF's own numbers.

Tiny random models built from their configs (no download): GPT-2, Llama, Mistral (sliding window), Qwen2,
Gemma 2 (score softcapping, local/global layers), Gemma 3 (local/global layers), BERT (an encoder).
References: the same model with attn_implementation="sdpa" and "eager" (HF's own two paths), and for
packed sequences each document run on its own.

Bound: float32 rounding of the whole network, ``tolerances.assert_close`` with ``n`` the sum of the
reduction lengths of one forward pass (per layer: the q/k/v, output and MLP projections, the head size,
the key count; then the vocabulary projection), see :func:`_chain`. The measured differences are far
smaller (about 1e-7 of logits of size ~1).
"""

from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="attnlab.hf needs the optional transformers package")

import attnlab.hf as ah
from attnlab import backends
from attnlab.flash import count_tiles
from tolerances import assert_close

NAMES = ("attnlab", "attnlab_eager", "attnlab_torch", "attnlab_tiles")
VOCAB = 97
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2


@pytest.fixture(scope="module", autouse=True)
def _registered():
    ah.register()
    yield


def _has(name: str) -> bool:
    return hasattr(transformers, name)


def _decoder(family: str):
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
                  "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256,
                  "pad_token_id": 0, "initializer_range": 0.2}
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=HIDDEN, n_layer=LAYERS,
                                      n_head=HEADS, pad_token_id=0, initializer_range=0.2)
        return transformers.GPT2LMHeadModel, cfg
    if family == "llama":
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralForCausalLM, transformers.MistralConfig(sliding_window=5, **common)
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**common)
    if family == "gemma2":
        return transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            head_dim=16, sliding_window=4, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
            final_logit_softcapping=None, **common)
    if family == "gemma3":
        return transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"], **common)
    raise ValueError(family)


DECODERS = ["gpt2", "llama", "mistral", "qwen2", "gemma2", "gemma3"]
_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# Gemma 2 caps its attention scores (softcapping): HF's sdpa refuses that, so eager is its reference, and
# PyTorch's fused kernel and attnlab's tiled one cannot do it (they raise, tested below).
_SOFTCAP = {"gemma2"}


def _model(family: str, impl: str, seed: int = 0):
    if not _has(_CLASSES[family]):
        pytest.skip(f"the installed transformers {transformers.__version__} has no {_CLASSES[family]}")
    cls, cfg = _decoder(family)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def _chain(model, t: int) -> int:
    """The sum of the reduction lengths along one forward pass (the tolerance policy's ``n``)."""
    c = model.config
    hidden = c.hidden_size
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden
    head = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    return c.num_hidden_layers * (4 * hidden + head + t + inter) + hidden


def _references(family: str) -> tuple[str, ...]:
    return ("eager",) if family in _SOFTCAP else ("sdpa", "eager")


def _names(family: str) -> tuple[str, ...]:
    return ("attnlab", "attnlab_eager") if family in _SOFTCAP else NAMES


def _batch(t: int = 13) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, t), generator=g)
    mask = torch.ones(3, t, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


# --------------------------------------------------------------------------------------------------
# Forward and backward, with padding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_logits_and_gradients_match_hf(family):
    ids, mask = _batch()
    real = mask.bool()
    t = ids.shape[1]
    results = {}
    for impl in (*_references(family), *_names(family)):
        model = _model(family, impl)
        out = model(ids, attention_mask=mask).logits  # (B, T, V)
        g = torch.Generator().manual_seed(2)
        probe = torch.randn(out.shape, generator=g)  # a random direction: loss = <probe, logits at real tokens>
        (out * probe)[real].sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out.detach(), grads)
    n = _chain(model, t)
    for ref in _references(family):
        ref_logits, ref_grads = results[ref]
        for impl in _names(family):
            logits, grads = results[impl]
            assert_close(logits[real], ref_logits[real], n=n, dtype=torch.float32,
                         msg=f"{family} logits {impl} vs {ref}")
            assert grads.keys() == ref_grads.keys()
            for name, grad in grads.items():
                assert_close(grad, ref_grads[name], n=2 * n, dtype=torch.float32,
                             scale=max(1.0, float(ref_grads[name].abs().max())),
                             msg=f"{family} grad {name} {impl} vs {ref}")


@pytest.mark.parametrize("family", DECODERS)
def test_generate_with_cache_matches_hf(family):
    ids, mask = _batch(9)
    outs = {}
    for impl in (*_references(family), "attnlab", "attnlab_eager"):
        model = _model(family, impl)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        outs[impl] = (out.sequences, torch.stack(out.scores))  # (B, T + 6), (6, B, V)
    ref_seq, ref_scores = outs[_references(family)[0]]
    for impl, (seq, scores) in outs.items():
        assert_close(scores, ref_scores, n=_chain(model, 15), dtype=torch.float32,
                     msg=f"{family} generate scores {impl}")
        assert torch.equal(seq, ref_seq), f"{family}: greedy tokens of {impl} differ from HF's"


def test_generate_with_a_static_cache_uses_the_dense_mask_and_matches_sdpa():
    """A static cache's queries do not end at the last key slot: the mask builder gives HF's dense mask."""
    ids, mask = _batch(9)
    seqs = {}
    for impl in ("sdpa", "attnlab"):
        model = _model("llama", impl)
        seqs[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                    pad_token_id=0, cache_implementation="static")
    assert torch.equal(seqs["attnlab"], seqs["sdpa"])


# --------------------------------------------------------------------------------------------------
# Packed sequences (documents from position_ids)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_packed_sequences_equal_each_document_alone(family):
    lengths = (5, 1, 7, 3)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    packed = torch.cat(docs)[None]  # (1, 16)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, 16): restarts per document
    for impl in ("sdpa", "attnlab", "attnlab_torch", "attnlab_tiles"):
        model = _model(family, impl)
        with torch.no_grad():
            together = model(packed, position_ids=position_ids, use_cache=False).logits[0]  # (16, V)
            alone = torch.cat([model(d[None]).logits[0] for d in docs])  # (16, V)
        assert_close(together, alone, n=_chain(model, max(lengths)), dtype=torch.float32,
                     msg=f"{family} {impl}: packed vs each document alone")


# --------------------------------------------------------------------------------------------------
# The encoder: BERT
# --------------------------------------------------------------------------------------------------


def _bert(impl: str):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=64,
                                  initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def test_bert_logits_and_gradients_match_hf():
    ids, _ = _batch(11)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding, as BERT tokenizers pad
    mask[2, -1:] = 0
    real = mask.bool()
    results = {}
    for impl in ("sdpa", "eager", *NAMES):
        model = _bert(impl)
        out = model(ids, attention_mask=mask).logits  # (B, T, V)
        out[real].square().mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out.detach(), grads)
    n = LAYERS * (4 * HIDDEN + HIDDEN // HEADS + 11 + INTER) + 2 * HIDDEN
    for ref in ("sdpa", "eager"):
        for impl in NAMES:
            assert_close(results[impl][0][real], results[ref][0][real], n=n, dtype=torch.float32,
                         msg=f"bert logits {impl} vs {ref}")
            for name, grad in results[impl][1].items():
                ref_grad = results[ref][1][name]
                assert_close(grad, ref_grad, n=2 * n, dtype=torch.float32,
                             scale=max(1.0, float(ref_grad.abs().max())), msg=f"bert grad {name} {impl} vs {ref}")


# --------------------------------------------------------------------------------------------------
# The mask builder: attnlab's description equals HF's dense mask
# --------------------------------------------------------------------------------------------------


def _hf_dense(**kwargs) -> torch.Tensor:
    mu = transformers.masking_utils
    return mu.sdpa_mask(allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


@pytest.mark.parametrize("t_q,past", [(1, 0), (3, 0), (97, 0), (1, 12), (4, 12), (257, 3)])
@pytest.mark.parametrize("window", [None, 1, 5])
@pytest.mark.parametrize("padded", [False, True])
def test_mask_builder_equals_hf_dense_mask(t_q, past, window, padded):
    mu = transformers.masking_utils
    b, t_k = 2, past + t_q
    fn = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    attention_mask = None
    if padded:
        attention_mask = torch.ones(b, t_k, dtype=torch.bool)
        attention_mask[1, : min(3, t_k - 1)] = False
    kwargs = {"batch_size": b, "q_length": t_q, "kv_length": t_k, "q_offset": past, "kv_offset": 0, "mask_function": fn,
                  "attention_mask": attention_mask}
    built = ah.mask_builder(**kwargs)
    assert isinstance(built, ah.AttentionMask), "a causal / window / padding mask is described, not dense"
    assert built.causal and built.window == window
    # exact: both are the same boolean comparisons of integer positions
    assert torch.equal(built.dense(), _hf_dense(**kwargs))


def test_mask_builder_reads_packed_documents_and_falls_back_to_dense_for_unknown_parts():
    mu = transformers.masking_utils
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    docs = mu.find_packed_sequence_indices(position_ids)
    fn = mu.and_masks(mu.remap_positions_for_packed_sequence(mu.causal_mask_function, position_ids),
                      mu.packed_sequence_mask_function(docs))
    kwargs = {"batch_size": 1, "q_length": 9, "kv_length": 9, "mask_function": fn}
    built = ah.mask_builder(**kwargs)
    assert isinstance(built, ah.AttentionMask) and built.document_ids is not None
    assert torch.equal(built.document_ids, docs)
    assert torch.equal(built.dense(), _hf_dense(**kwargs))  # exact: the same integer comparisons
    # A part attnlab has no word for (HF's chunked attention): HF's own dense mask, unchanged.
    chunked = mu.chunked_causal_mask_function(3, torch.zeros(1, dtype=torch.long))
    dense = ah.mask_builder(batch_size=1, q_length=7, kv_length=7, mask_function=chunked)
    assert isinstance(dense, torch.Tensor) and dense.dtype == torch.bool
    assert torch.equal(dense, _hf_dense(batch_size=1, q_length=7, kv_length=7, mask_function=chunked))


def test_the_tiled_kernel_skips_the_tiles_a_window_hides():
    """Mistral with a 64-token window at 600 tokens: the kernel computes only the tiles near the diagonal
    (a block size of 256: 5 of the 9 tiles of a 3 x 3 grid, per layer), not a dense mask."""
    cls, cfg = _decoder("mistral")
    cfg.sliding_window = 64
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.set_attn_implementation("attnlab_tiles")
    ids = torch.randint(1, VOCAB, (1, 600))
    with torch.no_grad(), count_tiles() as counts:
        tiles = model(ids).logits
    assert counts["forward"] == LAYERS * 5
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(ids).logits
    assert_close(tiles, ref, n=_chain(model, 600), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Weights, errors, registration
# --------------------------------------------------------------------------------------------------


def test_recorded_weights_equal_hf_eager_output_attentions():
    ids, mask = _batch()
    eager = _model("llama", "eager")
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask, output_attentions=True).attentions  # L x (B, H, T, T)
    ours = _model("llama", "attnlab_tiles")
    with torch.no_grad(), ah.record_attention() as recorded:
        ours(ids, attention_mask=mask)
    assert len(recorded) == LAYERS
    real = mask.bool()
    for call, want in zip(recorded, ref, strict=True):
        got = call.weights
        assert got.shape == want.shape
        # exact: both are the same integer comparisons (causal lower triangle, left padding)
        assert torch.equal(call.allowed.expand(3, 1, 13, 13),
                           torch.ones(13, 13, dtype=torch.bool).tril() & real[:, None, None, :])
        # rows of real queries (padding queries: zeros here, HF eager's mean over all keys there)
        assert_close(got.permute(0, 2, 1, 3)[real], want.permute(0, 2, 1, 3)[real], n=HIDDEN // HEADS + 13,
                     dtype=torch.float32)


def test_the_tiled_kernel_refuses_a_dense_mask_with_a_clear_error():
    model = _model("llama", "attnlab_tiles")
    ids, _ = _batch(5)
    dense = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None].expand(3, 1, 5, 5)  # a custom 4-D mask
    with pytest.raises(ValueError, match="flash backend takes a bool mask that only says which keys"):
        model(ids, attention_mask=dense)
    model.set_attn_implementation("attnlab")
    assert model(ids, attention_mask=dense).logits.isfinite().all()


@pytest.mark.parametrize("impl", ["attnlab_torch", "attnlab_tiles"])
def test_softcapping_on_a_backend_without_it_is_a_clear_error(impl):
    model = _model("gemma2", impl)
    ids, mask = _batch(5)
    with pytest.raises(ValueError, match="softcap"):
        model(ids, attention_mask=mask)


def test_softcapping_changes_the_numbers_so_the_parity_above_checks_it():
    ids, mask = _batch()
    model = _model("gemma2", "attnlab")
    with torch.no_grad():
        capped = model(ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = model(ids, attention_mask=mask).logits
    assert (capped - uncapped).abs().max() > 1e-2


def test_unsupported_hf_arguments_are_refused():
    q = torch.randn(1, 2, 3, 4)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="attention sinks"):
        ah.attention_forward(module, q, q, q, None, s_aux=torch.zeros(2))
    module.num_key_value_groups = 2
    with pytest.raises(ValueError, match="num_key_value_groups=2"):
        ah.attention_forward(module, q, q, q, None)


def test_names_never_contain_flash_and_all_are_registered():
    from transformers import AttentionInterface, AttentionMaskInterface

    assert set(ah.register()) == set(ah.BACKEND_OF) == set(NAMES)
    for name in NAMES:
        assert "flash" not in name
        assert name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping
        assert ah.BACKEND_OF[name] in (*backends.BACKENDS, "auto")


def test_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModuleNotFoundError, match="pip install transformers"):
        ah.register()
