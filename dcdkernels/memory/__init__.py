"""Memory state: ``MemoryBank`` and ``MomentumQueue`` (buffers that survive checkpoints) and
their distributed modes (replicated and sharded banks, DDP helpers). SPEC §5."""
from .bank import MemoryBank, init_rows
from .distributed import ddp_ignore_memory_buffers, ddp_wrap, memory_buffer_names, shard_bounds
from .queue import MomentumQueue

__all__ = ["MemoryBank", "MomentumQueue", "ddp_ignore_memory_buffers", "ddp_wrap", "init_rows",
           "memory_buffer_names", "shard_bounds"]
