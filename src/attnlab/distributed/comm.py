"""The few torch.distributed calls attnlab.distributed makes, with clear errors and a byte count.

Only ``torch.distributed`` moves data (``gloo`` on CPU, ``nccl`` on GPU); this module adds:

* :func:`resolve_group` -- the group, this rank and the world size, or a clear error when no process
  group is initialised;
* :func:`check_same` -- one small ``all_gather`` of the call's sizes, so that ranks that pass shards of
  different lengths get a ``ValueError`` naming both ranks instead of a hang or garbage;
* :class:`RingShift` -- one step of a ring: ``batch_isend_irecv`` to the next rank / from the previous
  one, started before the current block's compute and waited for after it;
* :func:`all_to_all` / :func:`all_gather` -- the collectives Ulysses and ``gather`` need;
* :func:`track_comm` -- a context manager that counts bytes sent by this rank and seconds spent
  waiting on communication (used by ``attnlab bench --context-parallel``).

A failing transfer (a peer that died, or that never reached the same call before the process group's
timeout, ``init_process_group(timeout=...)``) raises :class:`CommunicationError` naming the rank and
the operation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "CommStats", "CommunicationError", "RingShift", "all_gather", "all_to_all", "check_same", "resolve_group",
    "track_comm",
]


class CommunicationError(RuntimeError):
    """A collective or point-to-point transfer failed or timed out."""


@dataclass
class CommStats:
    """What this rank sent and how long it waited, inside one :func:`track_comm` block."""

    bytes_sent: int = 0  # payload: K/V blocks, their gradients, all-to-all slices sent to other ranks
    control_bytes: int = 0  # size checks and gathered key padding masks
    wait_seconds: float = 0.0  # time blocked in a transfer (a wait on a ring step, a collective)
    messages: int = 0


_ACTIVE: list[CommStats] = []


@contextlib.contextmanager
def track_comm() -> Iterator[CommStats]:
    """Count the communication of the calls made inside the block (this rank only)."""
    stats = CommStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)


def _record(*, sent: int = 0, control: int = 0, wait: float = 0.0, messages: int = 0) -> None:
    for s in _ACTIVE:
        s.bytes_sent += sent
        s.control_bytes += control
        s.wait_seconds += wait
        s.messages += messages


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def _failures(op: str, group) -> Iterator[None]:
    """Turn a backend error (a dead peer, a timeout) into a CommunicationError that says what happened."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as exc:
        if isinstance(exc, CommunicationError):
            raise
        rank = dist.get_rank(group) if dist.is_initialized() else -1
        raise CommunicationError(
            f"attnlab.distributed: {op} failed on rank {rank}: {exc}. Another rank probably died or did not make "
            "the same call before the process group's timeout (set it with "
            "torch.distributed.init_process_group(timeout=...)); every rank must call the attention with shards "
            "of the same shape."
        ) from exc


def resolve_group(group) -> tuple[dist.ProcessGroup, int, int]:
    """``(group, rank in group, group size)``; ``group=None`` means the default (world) group."""
    if not dist.is_available():
        raise RuntimeError("attnlab.distributed needs torch.distributed, which this build of PyTorch lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            "attnlab.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group('gloo' or 'nccl', ...) on every process first (torchrun sets "
            "up its environment), or run local processes with attnlab.distributed.run_local"
        )
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group")
    return group, rank, dist.get_world_size(group)


def _comm_device(group, like: torch.Tensor) -> torch.device:
    """Where small control tensors live: the CPU for gloo, the input's device otherwise (nccl)."""
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else like.device


def check_same(group, like: torch.Tensor, what: str, **fields: int) -> None:
    """Raise ValueError when ``fields`` (sizes, flags) differ between the ranks of ``group``."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=_comm_device(group, like))  # (F,)
    every = [torch.empty_like(mine) for _ in range(world)]
    with _failures(f"{what}: the size check (all_gather)", group):
        t0 = time.perf_counter()
        dist.all_gather(every, mine, group=group)
        _record(control=_nbytes(mine) * (world - 1), wait=time.perf_counter() - t0, messages=1)
    rows = [tuple(int(x) for x in e.tolist()) for e in every]
    for r, row in enumerate(rows):
        if row != rows[0]:
            diffs = ", ".join(f"{name} {a} on rank 0 but {b} on rank {r}"
                              for name, a, b in zip(fields, rows[0], row, strict=True) if a != b)
            raise ValueError(
                f"{what}: the ranks disagree: {diffs}. Every rank must pass local shards of the same shape "
                "(split the sequence with ContextParallel.shard, which pads it to a length all ranks share)"
            )


def all_gather(t: torch.Tensor, group, what: str, *, control: bool = False) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all ranks), in rank order."""
    world = dist.get_world_size(group)
    if world == 1:
        return [t]
    t = t.contiguous()
    every = [torch.empty_like(t) for _ in range(world)]
    with _failures(f"{what} (all_gather)", group):
        t0 = time.perf_counter()
        dist.all_gather(every, t, group=group)
        n = _nbytes(t) * (world - 1)
        _record(sent=0 if control else n, control=n if control else 0, wait=time.perf_counter() - t0, messages=1)
    return every


def all_to_all(x: torch.Tensor, group, what: str) -> torch.Tensor:
    """``all_to_all_single`` over dim 0: slice ``i`` of ``x`` (P, ...) goes to rank ``i``; returns (P, ...)
    whose slice ``i`` came from rank ``i``."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty_like(x)
    with _failures(f"{what} (all_to_all)", group):
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x, group=group)
        _record(sent=_nbytes(x) * (world - 1) // world, wait=time.perf_counter() - t0, messages=1)
    return out


class RingShift:
    """Pass tensors one step around the ring of ``group``: send to rank + 1, receive from rank - 1.

    ``start(tensors)`` posts the transfers (``batch_isend_irecv``) and returns at once, so the caller
    computes on the current block while the next one travels; ``wait(handle)`` returns the received
    tensors (same shapes and dtypes). Tensor ``i`` travels with tag ``tag + i``, so distinct ``tag``s keep
    two streams (K/V blocks and their gradients) apart.
    """

    def __init__(self, group, rank: int, world: int) -> None:
        ranks = dist.get_process_group_ranks(group)
        self.group, self.rank, self.world = group, rank, world
        self.next, self.prev = ranks[(rank + 1) % world], ranks[(rank - 1) % world]  # global ranks

    def start(self, tensors: Sequence[torch.Tensor], tag: int = 0):
        sends = [t.contiguous() for t in tensors]
        recvs = [torch.empty_like(t) for t in sends]
        # One tag per tensor, so that matching never depends on the order messages are delivered in.
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(recvs)]
        with _failures("a ring step (batch_isend_irecv)", self.group):
            reqs = dist.batch_isend_irecv(ops)
        _record(sent=sum(_nbytes(t) for t in sends), messages=len(sends))
        return reqs, sends, recvs

    def wait(self, handle) -> list[torch.Tensor]:
        reqs, _sends, recvs = handle  # the sends stay referenced until their transfer is done
        t0 = time.perf_counter()
        with _failures(f"a ring step (waiting for rank {self.prev}'s block)", self.group):
            for req in reqs:
                req.wait()
        _record(wait=time.perf_counter() - t0)
        return recvs
