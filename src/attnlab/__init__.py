"""attnlab: chapter 3's attention mechanisms, from scratch on PyTorch.

Learn (``attnlab explain``), use (the chapter's classes, hardened), verify (every implementation is the
same function), measure (``attnlab bench``) and see (heatmaps and an HTML report) attention.

Bad input raises :class:`AttnlabInputError` (a ``ValueError``) or :class:`AttnlabInputTypeError` (also a
``TypeError``), naming the argument, what was expected and what was given.

The package's layers point one way (``tests/test_layers.py`` checks it): :mod:`attnlab.errors`, the math
(:mod:`attnlab.functional`, :mod:`attnlab.masks`, the backends) and the book's example (:mod:`attnlab.book`)
at the bottom; the modules (:mod:`attnlab.modules`, the cache, the variants, the pretrained models) on
them; the walkthrough, the benchmarks and the pictures (:mod:`attnlab.explain`, :mod:`attnlab.bench`,
:mod:`attnlab.heatmap`, :mod:`attnlab.report`) above; the command line (:mod:`attnlab.cli`) at the top.
This file is the one place that imports from every layer.
"""

from attnlab import functional, masks
from attnlab.book import BOOK_INPUTS, BOOK_TOKENS, book_inputs
from attnlab.cache import KVCache, RollingKVCache
from attnlab.errors import AttnlabInputError, AttnlabInputTypeError
from attnlab.explain import explain  # attnlab.explain(...): the walkthrough function
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
from attnlab.notebook import register_html as _register_html
from attnlab.report.html import render_html as _render_html
from attnlab.rope import RotaryEmbedding

__version__ = "0.1.0"

# A Walkthrough or AttentionMaps shows itself in a notebook as the interactive report: wired here, at the
# top, so that those data classes import nothing above them (see attnlab.notebook).
_register_html(_render_html)

__all__ = [
    "BOOK_INPUTS",
    "BOOK_TOKENS",
    "AttnlabInputError",
    "AttnlabInputTypeError",
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
