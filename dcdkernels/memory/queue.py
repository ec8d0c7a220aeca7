"""``MomentumQueue``: a FIFO ring buffer of keys with a saved pointer (MoCo, CoCoRD; docs/math.md §3, §4).

State tensors (``MemoryState``: in ``state_dict()``, not DDP-broadcast buffers): ``queue``
(size, D) in the storage dtype and ``queue_ptr`` 0-d int64 (the next row to write), so a resumed
run continues bit-identically.
"""

import torch

from ..ops import _validate as V
from ..reference import queue_enqueue_
from . import comm
from .state import MemoryState, check_rows_dim_dtype, init_rows

# The queue holds keys, not dataset rows: there is nothing to shard by row. "sharded" is accepted
# (every loss takes the same memory modes) and means a replicated queue.
QUEUE_MODES = ("local", "replicated", "sharded")


class MomentumQueue(MemoryState):
    """Ring buffer of ``size`` keys of dimension ``dim``.

    ``enqueue_(keys)`` writes the (B, D) keys at the pointer, wrapping around the end, and
    advances the pointer by B (mod size). A batch larger than the queue is rejected (it would
    overwrite itself); every check runs before the queue changes (never deferred: the pointer's
    host copy must not move on a failed call).

    ``mode="replicated"`` (under torch.distributed) all-gathers the keys of every rank in rank
    order before enqueueing (MoCo's ``concat_all_gather``), so every rank holds the same queue;
    then the limit applies to the gathered batch. ``mode="sharded"`` is the same as replicated:
    a queue of K keys does not grow with the dataset, and scoring against it is dense. ``init``:
    "normal" (unit rows, MoCo), "uniform", "zeros" or "empty", reproducible with ``init_seed``.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype=torch.float32,
        init: str = "normal",
        init_seed: int = 0,
        mode: str = "local",
        process_group=None,
        device=None,
    ):
        super().__init__()
        check_rows_dim_dtype("size", size, dim, dtype)
        self.size, self.dim = size, dim
        self._init_state(
            size,
            mode="replicated" if mode == "sharded" else mode,
            process_group=process_group,
            backend="auto",
            device=device,
            modes=QUEUE_MODES,
        )
        self._add_state("queue", init_rows(size, dim, 0, size, init=init, seed=init_seed, dtype=dtype, device=device))
        self._add_state("queue_ptr", torch.zeros((), dtype=torch.int64, device=device))
        self._ptr = 0

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}, dtype={self.queue.dtype}, mode={self.mode!r}"

    def _check_values(self, state_dict, prefix):
        key = prefix + "queue_ptr"
        if key in state_dict:
            ptr = int(torch.as_tensor(state_dict[key]).reshape(()).item())
            if not 0 <= ptr < self.size:
                raise RuntimeError(f"MomentumQueue: {key} = {ptr} in the checkpoint is outside [0, {self.size})")

    def _refresh_host_state(self) -> None:
        self._ptr = int(self.queue_ptr.item())

    @property
    def pointer(self) -> int:
        return self._ptr

    def forward(self):
        return self.queue

    def check_keys(self, keys) -> None:
        """Every check of ``enqueue_`` that needs no communication (shape, device, finite values)."""
        V.matrix("keys", keys, dim=self.dim)
        if keys.device != self.queue.device:
            raise ValueError(f"keys are on {keys.device} but the queue is on {self.queue.device}")
        checks = V.ValueChecks()
        checks.finite("keys", keys)
        checks.run()
        if self.mode == "local" and keys.shape[0] > self.size:
            raise ValueError(
                f"batch of {keys.shape[0]} keys is larger than the queue ({self.size} rows): "
                "it would overwrite itself; enlarge the queue or split the batch"
            )

    @torch.no_grad()
    def enqueue_(self, keys: torch.Tensor) -> int:
        """Write ``keys`` (B, D) at the pointer (wrapping around) and return the new pointer."""
        err = None
        try:
            self.check_keys(keys)
        except (ValueError, TypeError) as exc:
            err = exc
        if self.mode != "local":
            sizes = self._meta([keys.shape[0] if err is None else 0], err, self.queue.device)[:, 0].tolist()
            if sum(sizes) > self.size:
                raise ValueError(
                    f"the gathered batch of {sum(sizes)} keys ({sizes} per rank) is larger than the "
                    f"queue ({self.size} rows): it would overwrite itself"
                )
            keys = comm.all_gather_rows(keys.detach().to(self.queue.dtype), sizes, self.process_group)
        elif err is not None:
            raise err
        if keys.shape[0] == 0:
            return self._ptr
        self._ptr = int(queue_enqueue_(self.queue, self._ptr, keys.detach()))
        self.queue_ptr.fill_(self._ptr)
        return self._ptr
