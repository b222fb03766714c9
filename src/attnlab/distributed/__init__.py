"""Exact attention over a sequence split across processes, on torch.distributed.

- :func:`ring_attention`: keys/values passed round a ring, partial results merged by log-sum-exp
  (:mod:`attnlab.distributed.merge`), zigzag layout for causal attention, any head count;
- :func:`ulysses_attention`: all-to-all from a sequence split to a head split, local attention through
  any attnlab backend, all-to-all back (the group size must divide the heads);
- :func:`hybrid_attention` over a :class:`Mesh` (:func:`make_mesh`): Ulysses inside, ring across;
- :class:`ContextParallel`: ``shard`` / ``gather`` / ``positions`` / ``attention`` for one group and method,
  the object ``MultiHeadAttention(..., context_parallel=cp)`` calls;
- :func:`run_local`: run a function on P local processes (gloo), as the tests and the benchmark do.

Only ``torch.distributed`` moves data: ``gloo`` on CPU, ``nccl`` on GPU (the code is dtype- and
device-generic). Every function checks that the ranks agree on the shapes and fails with a clear error
when they do not, when no process group is initialised, or when a peer dies (after the process
group's timeout at the latest).
"""

from attnlab.distributed.comm import CommStats, CommunicationError, track_comm
from attnlab.distributed.context_parallel import METHODS, ContextParallel
from attnlab.distributed.hybrid import Mesh, choose_ulysses_size, hybrid_attention, make_mesh
from attnlab.distributed.launch import LocalRunError, run_local
from attnlab.distributed.layout import LAYOUTS, Layout
from attnlab.distributed.merge import merge_into
from attnlab.distributed.ring import count_blocks, ring_attention
from attnlab.distributed.ulysses import ulysses_attention

__all__ = [
    "LAYOUTS", "METHODS", "CommStats", "CommunicationError", "ContextParallel", "Layout", "LocalRunError", "Mesh",
    "choose_ulysses_size", "count_blocks", "hybrid_attention", "make_mesh", "merge_into", "ring_attention", "run_local",
    "track_comm", "ulysses_attention",
]
