"""Input checks shared by every op. They run before any kernel, and before any bank is mutated,
and raise ``ValueError``/``TypeError`` naming the argument.

Value checks (index range, finiteness) need the data. How they are read back is the mode of
:func:`set_value_checks`:

* ``"auto"`` (default): on CPU they are read at once (cheap); on CUDA they are *deferred*.
* ``"sync"``: read at once everywhere. On CUDA all of an op's checks are folded into one
  boolean tensor read with a single host sync per call.
* ``"deferred"``: no host sync. The flags are copied to pinned host memory with a CUDA event;
  every later op call polls the events without blocking (``event.query()``) and raises the
  error of the earliest failed call as soon as its flags have landed; :func:`check_errors`
  waits for and raises them all. Meanwhile nothing unsafe happens: the kernels skip rows out of
  range (never an out-of-bounds access), and a mutating op whose checks fail becomes a no-op on
  the device (its indices are replaced by an out-of-range sentinel, see :meth:`ValueChecks.guard`),
  so a bank or queue is never left half-updated. What a deferred failure cannot undo is the
  output of a read-only op in the failed call: it is garbage and its error names the call.
* ``False`` / ``"off"``: no value checks (for users who validate upstream); kernels still skip
  out-of-range rows, and the CPU bank update still checks in C++.
"""
import collections
import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MODES = ("auto", "sync", "deferred", "off")
DEFERRABLE_BACKENDS = ("cuda", "triton")  # kernels that skip out-of-range rows
_MODE = "auto"
_MAX_PENDING = 256  # deferred checks in flight before the oldest is waited for


def set_value_checks(mode) -> None:
    """``True``/``"auto"``, ``"sync"``, ``"deferred"`` or ``False``/``"off"`` (module docstring)."""
    global _MODE
    if mode is True:
        mode = "auto"
    elif mode is False:
        mode = "off"
    if mode not in MODES:
        raise ValueError(f"value checks mode must be True, False or one of {MODES}, got {mode!r}")
    _MODE = mode


def value_checks_enabled() -> bool:
    return _MODE != "off" and not torch.compiler.is_compiling()


class _Pending:
    """Flags of one deferred call on their way to the host."""

    def __init__(self, flags: torch.Tensor, messages):
        self.messages = messages
        if flags.device.type == "cuda":
            self.host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            # The copy is queued on the current stream of the FLAGS' device, which need not be the
            # current device: the event must be recorded on that same stream (a bare record()
            # would use the current device's stream, and the host could read the flags early).
            stream = torch.cuda.current_stream(flags.device)
            self.host.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        else:  # "deferred" forced on CPU tensors (tests): the flags are already on the host
            self.host, self.event = flags, None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def failures(self):
        return [m for m, f in zip(self.messages, self.host.tolist()) if f]


_PENDING = collections.deque()


def poll_deferred(block: bool = False) -> None:
    """Raise the first deferred check that failed among the calls whose flags have landed (all
    of them with ``block=True``). Never blocks with ``block=False``."""
    while _PENDING:
        p = _PENDING[0]
        if not (block or p.ready() or len(_PENDING) > _MAX_PENDING):
            return
        p.wait()
        _PENDING.popleft()
        failed = p.failures()
        if failed:
            raise ValueError("an earlier call failed its deferred input checks (its results are invalid and it "
                             "changed no bank or queue): " + "; ".join(failed))


def check_errors() -> None:
    """Wait for every deferred input check (one host sync) and raise the first failure."""
    poll_deferred(block=True)


def matrix(name: str, t, *, device=None, dim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the anchors are on {device}")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} has D = {t.shape[1]} but the anchors have D = {dim}")


def index_tensor(name: str, t, *, device, rows: Optional[int] = None, dims=(1, 2)) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 (or int32), got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the anchors are on {device}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows but there are {rows} anchors")
    return t.to(torch.int64).contiguous()


def scalar(name: str, value, *, device, dtype, positive=False) -> torch.Tensor:
    """A float or 0-d tensor as a 0-d tensor of the accumulation dtype on ``device``.
    Learnable tensors keep their autograd graph (the cast is differentiable)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
        if value.device != device and not (value.device.type == "cpu" and value.dim() == 0):
            raise ValueError(f"{name} is on {value.device} but the anchors are on {device}")
        return value.reshape(()).to(device=device, dtype=dtype)
    if not isinstance(value, (float, int)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
    return torch.tensor(float(value), dtype=dtype, device=device)


def accumulation_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class ValueChecks:
    """Data-dependent checks of one call. On CPU (mode "auto") each is one reduction read at once;
    on CUDA they are collected and read back together in :meth:`run`, with one host sync
    ("sync") or none ("deferred"). Creating one first raises any deferred failure that has
    already landed."""

    def __init__(self):
        self._enabled = value_checks_enabled()
        self._conds, self._messages, self._failed = [], [], []
        self._bad = None
        if _PENDING:
            poll_deferred()

    @staticmethod
    def deferred(device) -> bool:
        """Whether a deferrable call's checks on ``device`` are deferred in the current mode."""
        return _MODE == "deferred" or (_MODE == "auto" and device.type == "cuda")

    def _add(self, cond: torch.Tensor, message: str):
        if cond.device.type == "cpu" and _MODE != "deferred":
            if bool(cond):
                self._failed.append(message)
        else:
            self._conds.append(cond.reshape(()))
            self._messages.append(message)

    def index_in_range(self, name, index, n_rows):
        if self._enabled and index.numel():
            lo, hi = torch.aminmax(index)
            self._add((lo < 0) | (hi >= n_rows), f"{name} has entries out of range [0, {n_rows})")

    def finite(self, name, t):
        if self._enabled and t.numel():
            # CPU fast path, one reduction: the sum of finite values is finite unless it overflows,
            # which the exact (two-op) test below then rules out. On CUDA the exact test alone is
            # queued for run().
            if (t.device.type == "cpu" and _MODE != "deferred"
                    and bool(torch.isfinite(t.detach().sum(dtype=torch.float32)))):
                return
            self._add(~torch.isfinite(t.detach()).all(), f"{name} has non-finite values (nan or inf)")

    def run(self, deferrable: bool = False):
        """Raise now, or, for a ``deferrable`` call in a deferred mode, queue the flags for a lazy
        report; then :meth:`guard` makes a mutation conditional on them, on the device. Only
        calls whose kernels skip out-of-range rows are deferrable (the fused CUDA and Triton
        backends; not eager torch, where an out-of-range index is a device-side assert)."""
        if self._conds:
            flags = torch.stack(self._conds)
            if deferrable and self.deferred(flags.device):
                self._bad = flags.any()
                _PENDING.append(_Pending(flags, self._messages))
            else:
                self._failed += [m for m, f in zip(self._messages, flags.cpu().tolist()) if f]
        if self._failed:
            raise ValueError("; ".join(self._failed))

    def guard(self, index: torch.Tensor, n_rows: int) -> torch.Tensor:
        """``index`` itself, or, when deferred checks are pending for this call, ``index`` with
        every entry replaced on the device by ``n_rows`` (out of range, so every kernel skips
        it) if any check failed: the mutation becomes a no-op without a host sync."""
        if self._bad is None:
            return index
        return torch.where(self._bad, torch.full_like(index, n_rows), index)

    def guard_rows(self, new: torch.Tensor, old_fn) -> torch.Tensor:
        """``new`` rows to be written, or, when deferred checks are pending for this call, the
        rows ``old_fn()`` already there if any check failed (a write of unchanged values)."""
        if self._bad is None:
            return new
        return torch.where(self._bad, old_fn(), new)
