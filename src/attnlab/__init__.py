"""attnlab: chapter 3's attention mechanisms, from scratch on PyTorch.

Learn (``attnlab explain``), use (the chapter's classes, hardened), verify (every implementation is the
same function), measure (``attnlab bench``) and see (heatmaps and an HTML report) attention.
"""

from attnlab import functional, masks
from attnlab.cache import KVCache, RollingKVCache
from attnlab.generate import generate as generate  # attnlab.generate(...): the function
from attnlab.latent import MultiHeadLatentAttention
from attnlab.modules import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention_v1,
    SelfAttention_v2,
    SelfAttentionV1,
    SelfAttentionV2,
)
from attnlab.rope import RotaryEmbedding

__version__ = "0.1.0"

# The chapter's example: "Your journey starts with one step", 3-dimensional embeddings (chapter 3.3.1).
BOOK_TOKENS = ("Your", "journey", "starts", "with", "one", "step")
BOOK_INPUTS = (
    (0.43, 0.15, 0.89),  # Your     (x^1)
    (0.55, 0.87, 0.66),  # journey  (x^2)
    (0.57, 0.85, 0.64),  # starts   (x^3)
    (0.22, 0.58, 0.33),  # with     (x^4)
    (0.77, 0.25, 0.10),  # one      (x^5)
    (0.05, 0.80, 0.55),  # step     (x^6)
)


def book_inputs():
    """The chapter's ``inputs`` tensor, (6, 3) float32."""
    import torch

    return torch.tensor(BOOK_INPUTS)


# ``attnlab.explain(...)`` is the walkthrough function (a Walkthrough renders itself as the interactive
# report in a notebook); ``from attnlab.explain import Walkthrough, ...`` still reaches the subpackage.
# Imported last: the walkthrough reads BOOK_TOKENS and book_inputs above.
from attnlab.explain import explain

__all__ = [
    "BOOK_INPUTS",
    "BOOK_TOKENS",
    "CausalAttention",
    "KVCache",
    "MultiHeadLatentAttention",
    "RollingKVCache",
    "RotaryEmbedding",
    "MultiHeadAttention",
    "MultiHeadAttentionWrapper",
    "SelfAttention_v1",
    "SelfAttention_v2",
    "SelfAttentionV1",
    "SelfAttentionV2",
    "book_inputs",
    "explain",
    "functional",
    "masks",
]
