"""The few torch.distributed calls attnlab.distributed makes, with clear errors and a byte count.

Only ``torch.distributed`` moves data (``gloo`` on CPU, ``nccl`` on GPU); this module adds:

* :func:`resolve_group` -- the group, this rank and the world size, or a clear error when no process
  group is initialised;
* :func:`check_same` -- one small ``all_gather`` of a fixed-size header (which call, its sizes, dtype,
  layout and flags), so that ranks that pass shards of different lengths, or that call different
  context-parallel functions (one ``ring_attention``, another ``ulysses_attention``), all get the same
  ``ValueError`` naming both ranks' calls instead of a hang, garbage or a crash;
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
from typing import NoReturn, TypeAlias

import torch
import torch.distributed as dist

from attnlab.errors import AttnlabInputError, AttnlabInputTypeError

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

# What RingShift.start returns and RingShift.wait takes: the posted requests, the tensors being sent (kept
# referenced until their transfer is done) and the buffers being received into.
Transfer: TypeAlias = "tuple[list[dist.Work], list[torch.Tensor], list[torch.Tensor]]"


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
def _failures(op: str, group: dist.ProcessGroup | None) -> Iterator[None]:
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


def resolve_group(group: object) -> tuple[dist.ProcessGroup, int, int]:
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
    # torch.distributed.new_group returns the int GroupMember.NON_GROUP_MEMBER on the processes it leaves out.
    if group is dist.GroupMember.NON_GROUP_MEMBER or (
            isinstance(group, int) and not isinstance(group, bool) and group == dist.GroupMember.NON_GROUP_MEMBER):
        raise AttnlabInputError(
            f"this process (global rank {dist.get_rank()}) is not a member of the given group: "
            "torch.distributed.new_group(ranks) returns GroupMember.NON_GROUP_MEMBER on the processes outside "
            "ranks; call the attention only on the group's members (or pass group=None for all processes)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise AttnlabInputTypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise AttnlabInputError(f"this process (global rank {dist.get_rank()}) is not a member of the given group")
    return group, rank, dist.get_world_size(group)


def _comm_device(group: dist.ProcessGroup, like: torch.Tensor) -> torch.device:
    """Where small control tensors live: the CPU for gloo, the input's device otherwise (nccl)."""
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else like.device


# The calls whose ranks must agree, and the fields of each call's header, in order. Every process imports
# the same table, so a rank can print the call another rank made. The header has a fixed size whatever
# the call, so the all_gather that compares them is well formed even when the ranks made different calls.
CALLS: dict[str, tuple[str, ...]] = {
    "ring_attention": ("batch", "heads", "kv_heads", "local_tokens", "head_dim", "value_dim", "dtype", "causal",
                       "layout", "has_key_padding_mask", "has_document_ids", "seq_len", "block_size"),
    "ulysses_attention": ("batch", "heads", "kv_heads", "local_tokens", "head_dim", "value_dim", "dtype", "causal",
                          "layout", "has_key_padding_mask", "has_document_ids", "seq_len"),
    "hybrid_attention": ("batch", "heads", "kv_heads", "local_tokens", "head_dim", "value_dim", "dtype", "causal",
                         "layout", "has_key_padding_mask", "has_document_ids", "seq_len"),
}
HEADER_SIZE = 24  # int64 slots: magic, call id, field count, the fields, zeros
_MAGIC = 0x61746E6C6162  # "attnlab": a header, not some other rank's tensor of the same size
_CALL_IDS = {name: i + 1 for i, name in enumerate(CALLS)}
_CALL_NAMES = {i: name for name, i in _CALL_IDS.items()}
DTYPE_IDS: dict[torch.dtype, int] = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_DTYPE_NAMES = {i: str(dt).removeprefix("torch.") for dt, i in DTYPE_IDS.items()}
LAYOUT_IDS = {"zigzag": 1, "contiguous": 2}
_LAYOUT_NAMES = {i: name for name, i in LAYOUT_IDS.items()}


def _describe(row: tuple[int, ...]) -> str:
    """A header as the call it describes: ``ring_attention(batch=1, heads=2, ...)``."""
    if len(row) < 3 or row[0] != _MAGIC or row[1] not in _CALL_NAMES:
        return "something that is not an attnlab.distributed call (another collective of the same size?)"
    name = _CALL_NAMES[row[1]]
    parts = []
    for field, value in zip(CALLS[name], row[3:3 + row[2]], strict=False):
        if field == "dtype":
            parts.append(f"dtype={_DTYPE_NAMES.get(value, value)}")
        elif field == "layout":
            parts.append(f"layout={_LAYOUT_NAMES.get(value, 'None')!r}")
        else:
            parts.append(f"{field}={value}")
    return f"{name}({', '.join(parts)})"


def check_same(group: dist.ProcessGroup, like: torch.Tensor, what: str, *, error: BaseException | None = None, **fields: int) -> None:
    """Raise the same ValueError on every rank when the ranks of ``group`` made different calls or passed
    different ``fields`` (sizes, flags), or when a rank's own checks of its inputs failed (``error``, see
    :func:`refuse`: that rank raises its own error, every other rank a ValueError that quotes it). ``what`` is a name of :data:`CALLS` and ``fields`` its fields, in order.

    One ``all_gather`` of a :data:`HEADER_SIZE` int64 header: fixed-size whatever the call, so it is well
    formed even when another rank called a different function (then both calls are named). Only when some
    rank failed its own checks does a second gather bring every rank that rank's message.
    """
    if what not in CALLS or tuple(fields) != CALLS[what]:  # a programming error inside attnlab
        raise RuntimeError(f"check_same({what!r}) with fields {tuple(fields)}, expected {CALLS.get(what)}")
    world = dist.get_world_size(group)
    if world == 1:
        return
    values = [_MAGIC, _CALL_IDS[what], len(fields), *(int(x) for x in fields.values())]
    values += [0] * (HEADER_SIZE - len(values))
    values[-1] = int(error is not None)  # the last slot: this rank refused its own inputs
    mine = torch.tensor(values, dtype=torch.int64, device=_comm_device(group, like))  # (HEADER_SIZE,)
    every = [torch.empty_like(mine) for _ in range(world)]
    with _failures(f"{what}: the call check (all_gather)", group):
        t0 = time.perf_counter()
        dist.all_gather(every, mine, group=group)
        _record(control=_nbytes(mine) * (world - 1), wait=time.perf_counter() - t0, messages=1)
    rows = [tuple(int(x) for x in e.tolist()) for e in every]
    refused = [r for r, row in enumerate(rows) if row[0] == _MAGIC and row[-1]]
    if refused:
        messages: list[str | None] = [None] * world
        mine_text = None if error is None else f"{_kind(error)}: {str(error).splitlines()[0]}"
        with _failures(f"{what}: gathering why a rank refused its inputs", group):
            dist.all_gather_object(messages, mine_text, group=group)
        if error is not None:  # a rank that refused raises its own error, as it would alone
            raise error
        why = "; ".join(f"rank {r}: {messages[r]}" for r in refused)
        raise AttnlabInputError(f"{what}: stopped on every rank before any data moved, because rank(s) "
                         f"{', '.join(map(str, refused))} refused their inputs: {why}")
    for r, row in enumerate(rows):
        if row == rows[0]:
            continue
        if row[:2] != rows[0][:2]:
            raise AttnlabInputError(
                f"{what}: the ranks made different calls: rank 0 called {_describe(rows[0])} but rank {r} called "
                f"{_describe(row)}. Every rank of the group must call the same context-parallel function with shards "
                "of the same shape (use one ContextParallel(group, method) on every rank)"
            )
        a, b = rows[0][3:3 + len(fields)], row[3:3 + len(fields)]
        diffs = ", ".join(f"{name} {_value(name, x)} on rank 0 but {_value(name, y)} on rank {r}"
                          for name, x, y in zip(fields, a, b, strict=True) if x != y)
        raise AttnlabInputError(
            f"{what}: the ranks disagree: {diffs}. Every rank must pass local shards of the same shape "
            "(split the sequence with ContextParallel.shard, which pads it to a length all ranks share), with the "
            "same flags and layout"
        )


def refuse(group: dist.ProcessGroup, like: object, what: str, error: BaseException) -> NoReturn:
    """Raise ``error`` (a rank's own input check failed) so that the other ranks, which wait in
    :func:`check_same`, raise the same ValueError instead of hanging: this rank takes part in the header
    exchange with its refusal. Alone, or without a tensor to talk through, ``error`` itself is raised."""
    if isinstance(like, torch.Tensor) and dist.get_world_size(group) > 1:
        check_same(group, like, what, error=error, **dict.fromkeys(CALLS[what], 0))
    raise error


def _value(field: str, value: int) -> str:
    if field == "dtype":
        return _DTYPE_NAMES.get(value, str(value))
    if field == "layout":
        return repr(_LAYOUT_NAMES.get(value))
    return str(value)


def all_gather(t: torch.Tensor, group: dist.ProcessGroup, what: str, *, control: bool = False) -> list[torch.Tensor]:
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


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, what: str) -> torch.Tensor:
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

    def __init__(self, group: dist.ProcessGroup, rank: int, world: int) -> None:
        ranks = dist.get_process_group_ranks(group)
        self.group, self.rank, self.world = group, rank, world
        self.next, self.prev = ranks[(rank + 1) % world], ranks[(rank - 1) % world]  # global ranks

    def start(self, tensors: Sequence[torch.Tensor], tag: int = 0) -> Transfer:
        sends = [t.contiguous() for t in tensors]
        recvs = [torch.empty_like(t) for t in sends]
        # One tag per tensor, so that matching never depends on the order messages are delivered in.
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(recvs)]
        with _failures("a ring step (batch_isend_irecv)", self.group):
            reqs = dist.batch_isend_irecv(ops)
        _record(sent=sum(_nbytes(t) for t in sends), messages=len(sends))
        return reqs, sends, recvs

    def wait(self, handle: Transfer) -> list[torch.Tensor]:
        reqs, _sends, recvs = handle  # the sends stay referenced until their transfer is done
        t0 = time.perf_counter()
        with _failures(f"a ring step (waiting for rank {self.prev}'s block)", self.group):
            for req in reqs:
                req.wait()
        _record(wait=time.perf_counter() - t0)
        return recvs


def _kind(error: BaseException) -> str:
    """The error's kind as a caller catches it: ValueError / TypeError for attnlab's input errors."""
    if isinstance(error, AttnlabInputTypeError):
        return "TypeError"
    return "ValueError" if isinstance(error, AttnlabInputError) else type(error).__name__
