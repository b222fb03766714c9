"""What runs inside one benchmark process: build one variant, warm it up, time it, measure its memory.

:mod:`attnlab.bench.runner` starts a fresh process for every variant (and one for the matmul rate), so
that one variant's memory high-water mark, allocator state, compiled code or crash (an out-of-memory kill)
never leaks into another's row. A worker reports through a pipe: ``("tick", None)`` after every call
(for the progress bar), then one ``("result", dict)``.

Timing: CPU, ``time.perf_counter`` around each call (the calls are synchronous); CUDA, a pair of CUDA
events around each call and a synchronisation before reading them.

Peak memory, the memory a call needs on top of what was resident before it (parameters, input, the
process itself):
  CPU   the process' resident-set high-water mark (``VmHWM`` in ``/proc/self/status``), reset just before
        the timed calls by writing ``5`` to ``/proc/self/clear_refs``, minus the resident set (``VmRSS``)
        at that moment. Freed heap memory is handed back to the system first (``malloc_trim``), so that
        the timed calls' allocations show up as new resident pages. Without ``/proc`` (not Linux), the
        lifetime ``ru_maxrss`` is used and the baseline is still subtracted (an over-estimate: it includes
        the warm-up and, with ``--compile``, compilation).
  CUDA  ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
        ``torch.cuda.memory_allocated()`` before the timed calls.

Shape letters: B batch, T tokens, d width (d_in = d_out), N the matmul size.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx.experimental.symbolic_shapes  # imported once in the fork server, not by each
import torch.nn.attention.flex_attention  # worker at its first call (seconds each)

from attnlab.bench.memory import PeakMemory
from attnlab.errors import AttnlabInputError
from attnlab.modules import MultiHeadAttention
from attnlab.variants import VARIANTS, VariantUnavailableError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

__all__ = ["measure_matmul", "measure_variant"]

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, synchronised on CUDA."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _setup(cfg: dict[str, Any]) -> torch.device:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    # FlexAttention warns that its eager path is unfused; the table says so in its note instead.
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    torch.manual_seed(int(cfg.get("seed", 123)))
    return torch.device(cfg["device"])


# --------------------------------------------------------------------------------------------------
# Entry points (run in a fresh process each)
# --------------------------------------------------------------------------------------------------


def measure_variant(cfg: dict[str, Any], name: str, conn: Connection) -> None:
    """Build, warm up and time variant ``name`` under ``cfg``; send the result dict on ``conn``."""
    try:
        result = _measure_variant(cfg, name, conn)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row, the run goes on
        status = "out of memory" if _is_oom(exc) else "error"
        result = {"status": status, "note": _first_line(exc)}
    conn.send(("result", result))
    conn.close()


def _measure_variant(cfg: dict[str, Any], name: str, conn: Connection) -> dict[str, Any]:
    device = _setup(cfg)
    dtype = DTYPES[cfg["dtype"]]
    b, t, d, h = cfg["batch"], cfg["tokens"], cfg["width"], cfg["heads"]
    backward = cfg["mode"] == "fwd+bwd"
    window, documents = cfg.get("window"), cfg.get("documents")
    if (window or documents) and name not in _MASKED_VARIANTS:
        option = "--window" if window else "--documents"
        return {"status": "unavailable", "note": f"{option} is measured for {', '.join(_MASKED_VARIANTS)} only"}
    try:
        model: torch.nn.Module = VARIANTS[name](d, d, t, 0.0, h).to(device=device, dtype=dtype)
        if window:  # the same module with the window: MultiHeadAttention(window_size=...) on the variant's backend
            model = MultiHeadAttention(d, d, t, 0.0, h, backend=str(model.backend), window_size=window).to(
                device=device, dtype=dtype)
    except VariantUnavailableError as exc:
        return {"status": "unavailable", "note": str(exc)}
    forward_kwargs = _packed_documents(model, name, b, t, documents, device) if documents else {}
    model.train(backward)  # fwd: inference (eval mode, no autograd); fwd+bwd: training mode
    x = torch.randn(b, t, d, device=device, dtype=dtype)  # (B, T, d)
    grad_out = torch.randn(b, t, d, device=device, dtype=dtype)  # (B, T, d)
    notes = []
    if name == "flex" and not cfg["compile"]:
        notes.append("eager FlexAttention: unfused")
    runner: Callable[..., Any] = model  # the module, or its compiled form
    if cfg["compile"]:
        runner = torch.compile(model)

    if backward:
        def step() -> None:
            xx = x.detach().requires_grad_(True)  # (B, T, d)
            runner(xx, **forward_kwargs).backward(grad_out)
            model.zero_grad(set_to_none=True)
    else:
        def step() -> None:
            with torch.no_grad():
                runner(x, **forward_kwargs)

    for i in range(cfg["warmup"]):
        try:
            step()
        except VariantUnavailableError as exc:
            return {"status": "unavailable", "note": str(exc)}
        except Exception as exc:
            if cfg["compile"] and i == 0 and not _is_oom(exc):
                return {"status": "compile failed", "note": _first_line(exc)}
            raise
        conn.send(("tick", None))

    peak = PeakMemory(device)
    peak.start()
    times = []
    for _ in range(cfg["repeats"]):
        try:
            times.append(_timed(step, device))
        except VariantUnavailableError as exc:  # no warm-up: the first call finds out
            return {"status": "unavailable", "note": str(exc)}
        conn.send(("tick", None))
    return {"status": "ok", "times_s": times, "peak_mem_bytes": peak.peak_bytes(), "note": "; ".join(notes)}


_MASKED_VARIANTS = ("ch03", "attnlab", "flash")  # the MultiHeadAttention-based ones: they take window_size


def _packed_documents(model: torch.nn.Module, name: str, b: int, t: int, documents: int,
                      device: torch.device) -> dict[str, Any]:
    """--documents D: D documents of T/D tokens per sequence, a token attends only within its own (causal inside).

    The flash variant gets the document ids themselves (its kernel skips the tiles between documents), through
    a backend registered with attnlab.backends.register; ch03 and attnlab get the equivalent explicit mask
    (attn_mask, combined with the causal mask by MultiHeadAttention)."""
    from attnlab import backends
    from attnlab.flash import flash_attention

    doc_ids = (torch.arange(t, device=device) * documents // t).expand(b, t)  # (B, T)
    if name != "flash":
        return {"attn_mask": (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])}  # (B, 1, T, T)

    def flash_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                        causal: bool = False, window: int | None = None, scale: float | None = None,
                        dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
        if mask is not None:
            raise AttnlabInputError("the flash-documents backend of attnlab bench takes no mask")
        out = flash_attention(q, k, v, causal=causal, window=window, document_ids=doc_ids, scale=scale,
                              dropout_p=dropout_p if training else 0.0)  # (B, H, T, hd)
        return cast(torch.Tensor, out)  # without return_lse: one tensor

    backends.register("flash-documents", flash_documents, replace=True)
    cast(Any, model).backend = "flash-documents"  # a plain attribute, not a parameter or buffer
    return {}


def measure_matmul(cfg: dict[str, Any], n: int, conn: Connection) -> None:
    """This machine's matrix-multiply rate at ``cfg``'s dtype and device: median GFLOP/s of
    (N × N) @ (N × N) over ``repeats`` calls after one warm-up; sends ``{"status", "times_s", "n"}``."""
    try:
        device = _setup(cfg)
        dtype = DTYPES[cfg["dtype"]]
        a = torch.randn(n, n, device=device, dtype=dtype)  # (N, N)
        b = torch.randn(n, n, device=device, dtype=dtype)  # (N, N)
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times = [_timed(lambda: torch.mm(a, b), device) for _ in range(max(3, min(cfg["repeats"], 10)))]
        result = {"status": "ok", "times_s": times, "n": n}
    except BaseException as exc:  # noqa: BLE001
        result = {"status": "error", "note": _first_line(exc), "n": n}
    conn.send(("result", result))
    conn.close()
