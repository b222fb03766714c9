"""Peak memory of a piece of work, above what was there before it.

On the CPU: the resident-set high-water mark ``VmHWM``, reset to the current ``VmRSS`` through
``/proc/self/clear_refs`` before the work (Linux), after a ``gc.collect()`` and glibc's ``malloc_trim``
hand back what is free; where that reset is not possible, the lifetime peak (an over-estimate). On CUDA:
``torch.cuda.max_memory_allocated`` above ``memory_allocated``. Light to import (no compiler stack), so
forked benchmark ranks and workers share it.
"""

from __future__ import annotations

import ctypes
import gc
import resource

import torch

__all__ = ["PeakMemory", "fix_mmap_threshold"]


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc


def fix_mmap_threshold(nbytes: int = 64 * 1024) -> None:
    """Make glibc return every freed block of ``nbytes`` or more to the system at once (``M_MMAP_THRESHOLD``
    fixed instead of growing with the largest block freed), so that the resident set follows the live
    tensors rather than what the allocator keeps cached. Do it in every process that is compared."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD = -3


class PeakMemory:
    """``start()`` before the work, ``peak_bytes()`` after it: the peak above the level at ``start``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.exact = False
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current VmRSS
            self.exact = _proc_status_kib("VmHWM") is not None
        except OSError:
            self.exact = False  # VmHWM is then the lifetime peak: an over-estimate
        rss = _proc_status_kib("VmRSS")
        self.base = (rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        hwm = _proc_status_kib("VmHWM") if self.exact else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, hwm * 1024 - self.base)
