"""DistributedDataParallel and the memory modules (top of ``dcdkernels.memory``).

DDP broadcasts every parameter and buffer from rank 0 when it is built, and every buffer at each
forward (``broadcast_buffers=True``, the default). The memory modules hold their state in state
tensors that are not buffers (``dcdkernels.memory.state``), so a plain
``DistributedDataParallel(model)`` never overwrites a shard of a sharded bank with rank 0's rows
nor copies a replicated bank each step: there is nothing to configure. ``ddp_wrap`` is kept as a
convenience and ``memory_buffer_names`` lists what DDP leaves alone.
"""

from typing import List

import torch

from .state import memory_modules


def memory_buffer_names(model: torch.nn.Module) -> List[str]:
    """Fully qualified state-dict names of every memory state tensor inside ``model`` (none of
    them is a buffer, so none is synchronised by DDP)."""
    return [
        f"{prefix}.{name}" if prefix else name for prefix, mod in memory_modules(model) for name in mod.state_tensors()
    ]


def ddp_ignore_memory_buffers(model: torch.nn.Module) -> List[str]:
    """Kept for compatibility: registers the memory names in DDP's ignore list (which they no
    longer need: they are not buffers). Returns the ignored names (merged with any already set)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = memory_buffer_names(model)
    previous = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    merged = previous + [n for n in names if n not in previous]
    DDP._set_params_and_buffers_to_ignore_for_model(model, merged)
    return merged


def ddp_wrap(model: torch.nn.Module, **ddp_kwargs):
    """``DistributedDataParallel(model, **ddp_kwargs)``; the memory is never broadcast either way."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp_ignore_memory_buffers(model)
    return DDP(model, **ddp_kwargs)
