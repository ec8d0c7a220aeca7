"""``MomentumQueue``: a FIFO ring buffer of keys with a saved pointer (MoCo, CoCoRD; SPEC §3, §4).

Buffers: ``queue`` (size, D) in the storage dtype and ``queue_ptr`` 0-d int64 (the next row to
write), both in ``state_dict()``, so a resumed run continues bit-identically.
"""
import torch
from torch import nn

from ..ops import _validate as V
from ..reference import queue_enqueue_
from . import distributed as Dist
from .bank import init_rows


class MomentumQueue(nn.Module):
    """Ring buffer of ``size`` keys of dimension ``dim``.

    ``enqueue_(keys)`` writes the (B, D) keys at the pointer, wrapping around the end, and
    advances the pointer by B (mod size). A batch larger than the queue is rejected (it would
    overwrite itself); every check runs before the queue changes.

    ``mode="replicated"`` (under torch.distributed) all-gathers the keys of every rank in rank
    order before enqueueing (MoCo's ``concat_all_gather``), so every rank holds the same queue;
    then the limit applies to the gathered batch. ``init``: "normal" (unit rows, MoCo), "uniform",
    "zeros" or "empty", reproducible with ``init_seed``.
    """

    def __init__(self, size: int, dim: int, *, dtype=torch.float32, init: str = "normal", init_seed: int = 0,
                 mode: str = "local", process_group=None, device=None):
        super().__init__()
        if not isinstance(size, int) or not isinstance(dim, int) or size < 1 or dim < 1:
            raise ValueError(f"size and dim must be positive ints, got {size!r}, {dim!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")
        if mode not in ("local", "replicated"):
            raise ValueError(f"mode must be 'local' or 'replicated', got {mode!r}")
        self.size, self.dim, self.mode, self.process_group = size, dim, mode, process_group
        self.rank, self.world_size = Dist.group_rank_world(mode, process_group)
        self.register_buffer("queue", init_rows(size, dim, 0, size, init=init, seed=init_seed, dtype=dtype, device=device))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64, device=device))
        self._ptr = 0
        self.register_load_state_dict_post_hook(MomentumQueue._refresh_host_state)

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}, mode={self.mode!r}"

    @staticmethod
    def _refresh_host_state(module, incompatible_keys):
        ptr = int(module.queue_ptr.item())
        if not 0 <= ptr < module.size:
            raise RuntimeError(f"MomentumQueue: loaded pointer {ptr} is outside [0, {module.size})")
        module._ptr = ptr

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        V.check_errors()  # a checkpoint never captures state after a call that failed deferred checks
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @property
    def pointer(self) -> int:
        return self._ptr

    def forward(self):
        return self.queue

    def _check(self, keys):
        V.matrix("keys", keys, dim=self.dim)
        if keys.device != self.queue.device:
            raise ValueError(f"keys are on {keys.device} but the queue is on {self.queue.device}")
        checks = V.ValueChecks()
        checks.finite("keys", keys)
        checks.run(deferrable=self.mode == "local")  # a slice copy is safe whatever the values
        return checks

    @torch.no_grad()
    def enqueue_(self, keys: torch.Tensor) -> int:
        """Write ``keys`` (B, D) at the pointer (wrapping around) and return the new pointer."""
        err, checks = None, None
        try:
            checks = self._check(keys)
            if self.mode == "local" and keys.shape[0] > self.size:
                raise ValueError(f"batch of {keys.shape[0]} keys is larger than the queue ({self.size} rows): "
                                 "it would overwrite itself; enlarge the queue or split the batch")
        except (ValueError, TypeError) as exc:
            err = exc
        if self.mode == "replicated":
            sizes = Dist.gather_meta([keys.shape[0] if err is None else 0], err, self.process_group,
                                     self.queue.device)[:, 0].tolist()
            if sum(sizes) > self.size:
                raise ValueError(f"the gathered batch of {sum(sizes)} keys ({sizes} per rank) is larger than the "
                                 f"queue ({self.size} rows): it would overwrite itself")
            keys = Dist.all_gather_rows(keys.detach().to(self.queue.dtype), sizes, self.process_group)
        elif err is not None:
            raise err
        if keys.shape[0] == 0:
            return self._ptr
        keys = keys.detach()
        if self.mode == "local":  # deferred checks (CUDA): failed keys rewrite the rows already there
            keys = checks.guard_rows(keys.to(self.queue.dtype), lambda: self.queue[
                (self._ptr + torch.arange(keys.shape[0], device=keys.device)) % self.size])
        self._ptr = int(queue_enqueue_(self.queue, self._ptr, keys))
        self.queue_ptr.fill_(self._ptr)
        return self._ptr
