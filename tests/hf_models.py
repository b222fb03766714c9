"""Tiny random Hugging Face models saved to a directory, as ``save_pretrained`` writes them, with a word-level
tokenizer built offline from a small vocabulary: shared by tests/test_hf_model_cli.py and tests/test_hf_explain.py.
Import it after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

WORDS = ["the", "cat", "sat", "on", "mat", "because", "it", "was", "tired", "a", "dog", "ran"]
TEXT = "The cat sat on the mat because it was tired"


def tokenizer(kind: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS`: BERT's specials for ``kind="bert"``, else Llama's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if kind == "bert" else ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + WORDS)}, unk_token=special[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                    cls_token="[CLS]", sep_token="[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>")


def save_models(root: Path) -> dict[str, Path]:
    """{"llama": DIR, "bert": DIR, "no_tokenizer": DIR} under ``root``: a 2-layer Llama (4 query heads, 2
    key/value heads of 8) and a 3-layer BERT (2 heads of 16), random weights (seed 0), each with its tokenizer
    (``no_tokenizer``: the Llama without one)."""
    torch.manual_seed(0)
    n = len(WORDS) + 4
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=12, initializer_range=0.3))
    dirs = {}
    for name, model in (("llama", llama), ("bert", bert)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tokenizer(name).save_pretrained(dirs[name])
    dirs["no_tokenizer"] = root / "no_tokenizer"
    llama.save_pretrained(dirs["no_tokenizer"])
    return dirs
