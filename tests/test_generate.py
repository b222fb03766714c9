"""attnlab.generate: a batch of prompts of lengths 1, 7 and 33 decodes what each prompt decodes alone
(static and rolling caches, latent attention), equal to greedy decoding without a cache; sampling options
against a reference; stop tokens; no_grad / inference_mode; one compiled graph per shape bucket."""

from __future__ import annotations

import pytest
import torch

from attnlab import generate
from attnlab.generate import sample_next
from attnlab.modern import DecoderConfig, TinyDecoder

CONFIGS = {"static": DecoderConfig(), "rolling": DecoderConfig(window_size=5), "mla": DecoderConfig(latent_dim=8)}


def uncached_greedy(model, prompt, new):
    """The book's generate_text_simple: recompute the whole sequence at every step."""
    idx = prompt[None]
    for _ in range(new):
        idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)  # (1, T + 1)
    return idx[0, prompt.numel():]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_a_batch_of_prompts_decodes_as_each_prompt_alone(kind):
    torch.manual_seed(0)
    model = TinyDecoder(CONFIGS[kind]).eval()
    prompts = [torch.randint(0, 97, (n,)) for n in (1, 7, 33)]
    batch = generate(model, prompts, 10)
    with torch.no_grad():
        for prompt, got in zip(prompts, batch):
            assert torch.equal(got, generate(model, [prompt], 10)[0])
            assert torch.equal(got, uncached_greedy(model, prompt, 10))
    caches = model.new_caches(1, 8)
    assert kind != "rolling" or type(caches[0]).__name__ == "RollingKVCache"


def test_runs_under_inference_mode_and_leaves_grad_mode_alone():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    prompts = [torch.tensor([3, 1, 4]), torch.tensor([1])]
    expected = generate(model, prompts, 6)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(generate(model, prompts, 6), expected))
    assert torch.is_grad_enabled()


def test_stop_tokens_end_each_row():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    prompts = [torch.randint(0, 97, (n,)) for n in (2, 5)]
    free = generate(model, prompts, 8)
    stop = int(free[0][2])  # row 0's third token
    stopped = generate(model, prompts, 8, stop_tokens=[stop])
    assert torch.equal(stopped[0], free[0][:3])  # up to and including the stop token
    hits = (free[1] == stop).nonzero()
    end = int(hits[0]) + 1 if len(hits) else 8
    assert torch.equal(stopped[1], free[1][:end])


def test_sampling_follows_temperature_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    assert sample_next(logits).tolist() == [0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature=1.0, top_k=2, generator=g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}  # only the two most likely
    probs = torch.softmax(logits[0].double(), 0)  # 0.56, 0.21, 0.13, 0.03, 0.08
    # top_p=0.7: tokens 0 and 1 reach 0.77 >= 0.7, so the nucleus is {0, 1}
    assert probs[0] < 0.7 <= probs[0] + probs[1]
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_next(logits, temperature=1.0, top_p=0.7, generator=g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}
    share = float((draws == 0).double().mean())
    expected = float(probs[0] / (probs[0] + probs[1]))  # renormalised in the nucleus: 0.73
    assert abs(share - expected) < 4 * (expected * (1 - expected) / 400) ** 0.5  # 4 standard errors
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    prompts = [torch.tensor([5, 6])]
    a = generate(model, prompts, 5, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompts, 5, temperature=0.8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and a[0].numel() == 5  # repeatable with a generator


def test_compiles_one_graph_per_shape_bucket():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = TinyDecoder(DecoderConfig(n_layers=1)).eval()
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    expected = generate(model, prompts, 4)
    torch._dynamo.reset()
    counters.clear()
    # Dynamo alone (backend "eager"): what decides the graphs is the same; inductor's code generation is left
    # out to keep the test quick (compile=True uses it).
    got = generate(model, prompts, 4, compile="eager")
    again = generate(model, [torch.tensor([7, 8, 9, 10, 11]), torch.tensor([2])], 4, compile="eager")  # same bucket
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert again[0].numel() == 4
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # one prefill, one step: not per length


def test_bad_arguments_are_named():
    model = TinyDecoder().eval()
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty 1-D integer tensor"):
        generate(model, [torch.tensor([1]), torch.tensor([])], 3)
    with pytest.raises(ValueError, match="top_k / top_p restrict sampling"):
        generate(model, [torch.tensor([1])], 3, top_k=5)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        generate(model, [torch.tensor([1])], 3, temperature=-1.0)
    with pytest.raises(ValueError, match="max_tokens=4 cannot hold the padded prompt"):
        generate(model, [torch.tensor([1])], 3, max_tokens=4)
    with pytest.raises(TypeError, match="model must have new_caches"):
        generate(torch.nn.Linear(2, 2), [torch.tensor([1])], 3)
    for bad in (2, "2", [2.0], [-1], [True]):
        with pytest.raises(TypeError, match=r"stop_tokens must be a sequence of token ids \(ints >= 0\)"):
            generate(model, [torch.tensor([1])], 3, stop_tokens=bad)
