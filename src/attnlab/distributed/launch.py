"""Run a function on P local processes joined by a torch.distributed process group (tests, benchmarks).

    results = run_local(fn, 4, args=(...,))   # fn(rank, world_size, *args) on 4 processes; their returns

The parent opens a ``TCPStore`` on 127.0.0.1 at a port the OS picks (so parallel runs never collide),
each child joins it with ``init_process_group(backend, timeout=...)`` and runs ``fn``. A child that raises
or dies makes ``run_local`` raise :class:`LocalRunError` with every rank's error; a rank that waits on a
dead or stuck peer fails after ``timeout`` seconds (the process group's timeout) instead of hanging,
and the parent kills what is left after ``timeout`` plus a grace period.

``start_method="fork"`` (the default on Linux for CPU runs) starts children in milliseconds, as
they inherit the imported modules; ``"spawn"`` starts fresh interpreters (needed for CUDA).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import queue as queue_module
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from attnlab.errors import AttnlabInputError

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

__all__ = ["LocalRunError", "run_local"]


class LocalRunError(RuntimeError):
    """Some ranks of :func:`run_local` raised, died or timed out; ``errors`` maps rank -> message."""

    def __init__(self, errors: dict[int, str], results: dict[int, Any]) -> None:
        self.errors, self.results = errors, results
        lines = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(errors.items()))
        super().__init__(f"{len(errors)} of the local ranks failed:\n{lines}")


def _child(rank: int, world: int, port: int, backend: str, timeout: float, threads: int | None,
           fn: Callable[..., Any], args: Sequence[Any], queue: Queue[tuple[int, str, Any]]) -> None:
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        store = dist.TCPStore("127.0.0.1", port, None, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent, SystemExit included
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - a broken group cannot be torn down; the process ends anyway
                print(f"rank {rank}: destroy_process_group failed: {exc}", file=sys.stderr)
        queue.close()
        queue.join_thread()


def run_local(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *, backend: str = "gloo",
              timeout: float = 60.0, start_method: str | None = None, threads: int | None = 1) -> list[Any]:
    """``[fn(0, P, *args), ..., fn(P-1, P, *args)]``, each run in its own process of a ``backend`` group.

    fn must be importable (a module-level function); its return values travel back pickled through a
    multiprocessing queue (keep them small). ``threads``: torch threads per process (default 1; None
    keeps torch's default).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise AttnlabInputError(f"world_size must be a positive int, got {world_size!r}")
    if timeout <= 0:
        raise AttnlabInputError(f"timeout must be positive seconds, got {timeout!r}")
    method = start_method or ("fork" if sys.platform == "linux" and backend == "gloo" else "spawn")
    if method == "fork":
        # torch imports this (and sympy) lazily at the first backward(): seconds that every forked rank would
        # pay again; imported once here, the ranks inherit it.
        import torch.fx.experimental.symbolic_shapes  # noqa: F401
    ctx: Any = mp.get_context(method)
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(r, world_size, store.port, backend, timeout, threads, fn, args, queue),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout + 15.0
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = queue.get(timeout=0.2)
        except queue_module.Empty:  # look for children that died without a word
            for r, p in enumerate(procs):
                if not p.is_alive() and r not in results and r not in errors and p.exitcode not in (0, None):
                    # Give a message it may still have sent a moment to arrive.
                    errors.setdefault(r, f"the process exited with code {p.exitcode} without reporting")
            continue
        (results if status == "ok" else errors)[rank] = payload
        errors.pop(rank, None) if status == "ok" else None
    for r in range(world_size):
        if r not in results and r not in errors:
            errors[r] = f"no result within {timeout + 15.0:.0f} s (killed)"
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join()
    del store
    if errors:
        raise LocalRunError(errors, results)
    return [results[r] for r in range(world_size)]
