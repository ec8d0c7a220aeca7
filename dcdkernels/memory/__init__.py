"""Memory state: ``MemoryBank``, ``PairedMemoryBank`` and ``MomentumQueue`` (state that survives
checkpoints) in local, replicated and sharded modes under ``torch.distributed`` (docs/math.md §5).

Layers, bottom up (no import circles): ``comm`` (collectives, LSE statistics, log Z),
``sharded`` (the partials math of sharded scoring), ``state`` (state tensors, layout, stream,
log Z, row updates), ``bank`` / ``paired`` / ``queue``, ``ddp`` (DistributedDataParallel helpers).
"""

from .bank import MemoryBank
from .comm import log_partition, shard_bounds
from .ddp import ddp_ignore_memory_buffers, ddp_wrap, memory_buffer_names
from .paired import PairedMemoryBank
from .queue import MomentumQueue
from .state import MemoryState, check_loadable, init_rows

__all__ = [
    "MemoryBank",
    "MemoryState",
    "MomentumQueue",
    "PairedMemoryBank",
    "check_loadable",
    "ddp_ignore_memory_buffers",
    "ddp_wrap",
    "init_rows",
    "log_partition",
    "memory_buffer_names",
    "shard_bounds",
]
