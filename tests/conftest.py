"""Suite-wide settings for the thread / kernel matrix (see tests/tolerances.py for why it matters).

``ATTNLAB_TEST_THREADS=N`` runs the suite with ``torch.set_num_threads(N)``; ``ATEN_CPU_CAPABILITY``
(``default``, ``avx2``, ``avx512``) is read by PyTorch itself when it loads. The header of every run names
both, so a log says which kernels and how many threads produced it (``make test-matrix`` runs a subset).
"""

from __future__ import annotations

import os

import pytest
import torch

THREADS_ENV = "ATTNLAB_TEST_THREADS"


def _threads_from_env() -> int | None:
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise pytest.UsageError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
    return n


def pytest_configure(config: pytest.Config) -> None:
    n = _threads_from_env()
    if n is not None:
        torch.set_num_threads(n)


def matrix_cell() -> str:
    """Which kernels and how many threads this run used, in words."""
    capability = torch.backends.cpu.get_cpu_capability()
    requested = os.environ.get("ATEN_CPU_CAPABILITY", "") or "unset"
    return (f"torch {torch.__version__}, CPU capability {capability} (ATEN_CPU_CAPABILITY={requested}), "
            f"{torch.get_num_threads()} threads ({THREADS_ENV}={os.environ.get(THREADS_ENV) or 'unset'})")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Printed even under ``-q`` (a report header is not), so every log names its matrix cell."""
    terminalreporter.write_line(f"attnlab: {matrix_cell()}")
