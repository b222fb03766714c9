"""The chapter's example, "Your journey starts with one step": its six tokens and their 3-dimensional
embeddings (chapter 3.3.1), the input of every walkthrough and of the library examples.

Its own small module, low in the package, so that the walkthrough (:mod:`attnlab.explain`) reads it without
importing the package's top (``attnlab/__init__.py``, which imports the walkthrough); ``attnlab.BOOK_TOKENS``,
``attnlab.BOOK_INPUTS`` and ``attnlab.book_inputs()`` are these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["BOOK_INPUTS", "BOOK_TOKENS", "book_inputs"]

BOOK_TOKENS = ("Your", "journey", "starts", "with", "one", "step")
BOOK_INPUTS = (
    (0.43, 0.15, 0.89),  # Your     (x^1)
    (0.55, 0.87, 0.66),  # journey  (x^2)
    (0.57, 0.85, 0.64),  # starts   (x^3)
    (0.22, 0.58, 0.33),  # with     (x^4)
    (0.77, 0.25, 0.10),  # one      (x^5)
    (0.05, 0.80, 0.55),  # step     (x^6)
)


def book_inputs() -> torch.Tensor:
    """The chapter's ``inputs`` tensor, (6, 3) float32."""
    import torch

    return torch.tensor(BOOK_INPUTS)  # (6, 3)
