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

Inside ``torch.compile`` the same checks stay in the graph: the conditions are traced tensor ops,
and one opaque custom op per call (``dcdkernels::value_checks``) reads them at run time, in the
mode above (a host read on CPU, deferred on CUDA under "auto"). Its 0-d zero output is added to a
scalar or the index the kernels read (:meth:`ValueChecks.tie`), so the graph cannot drop it and
the kernels run after it.

Tensor scalars (``logit_scale``, ``bias``, ``log_z``) are value checks of the call like the
others (sign and finiteness, read with them); float scalars are checked on the host at once.
"""

import collections
import math
import numbers
import operator
from typing import Optional

import torch

try:
    from numpy import bool_ as np_bool
except ImportError:  # numpy is optional
    np_bool = bool

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
    return _MODE != "off"


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
            raise ValueError(
                "an earlier call failed its deferred input checks (its results are invalid and it "
                "changed no bank or queue): " + "; ".join(failed)
            )


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


def scalar(name: str, value, *, device, dtype, positive=False, checks: Optional["ValueChecks"] = None) -> torch.Tensor:
    """A float or 0-d tensor as a 0-d tensor of the accumulation dtype on ``device``, finite (and
    > 0 with ``positive``) in that dtype. Learnable tensors keep their autograd graph (the cast is
    differentiable). A tensor's value is a data check of ``checks`` (read with the call's other
    checks: deferred on CUDA under "auto"); without ``checks`` it is read here, as a read-only
    call's check (at once on CPU, deferred on CUDA under "auto")."""
    need = "finite" + (" and > 0" if positive else "")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a 0-d tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {value.dtype}")
        if value.device != device and not (value.device.type == "cpu" and value.dim() == 0):
            raise ValueError(f"{name} is on {value.device} but the anchors are on {device}")
        out = value.reshape(()).to(device=device, dtype=dtype)
        own = checks is None
        checks = ValueChecks() if own else checks
        if checks._enabled:
            if value.device.type == "cpu" and _MODE != "deferred" and not torch.compiler.is_compiling():
                x = value.item()  # one host read of a CPU scalar: cheaper than a tensor condition
                if not (abs(x) <= torch.finfo(dtype).max and (x > 0 or not positive)):  # False for nan
                    checks._failed.append(f"{name} must be {need}")
            else:
                v = out.detach()
                checks._add(~torch.isfinite(v) | (v <= 0) if positive else ~torch.isfinite(v), f"{name} must be {need}")
        if own:  # a read-only use: deferrable (a deferred failure invalidates the caller's outputs only)
            checks.run(deferrable=True)
            out = checks.tie(out)
        return out
    if not is_real(value):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {need}, got an integer too large for a float") from None
    # Finite in the accumulation dtype too (1e39 is inf in fp32).
    if not (math.isfinite(as_float) and abs(as_float) <= torch.finfo(dtype).max) or (positive and as_float <= 0):
        raise ValueError(f"{name} must be {need} (in {dtype}), got {value}")
    return torch.tensor(as_float, dtype=dtype, device=device)


def is_real(value) -> bool:
    """A real Python or NumPy scalar (``numbers.Real``), not a bool."""
    return type(value) is float or (isinstance(value, numbers.Real) and not isinstance(value, (bool, np_bool)))


def integer(name: str, value, *, lo: int = 0, hi: Optional[int] = None) -> int:
    """``value`` as a Python int in ``[lo, hi)``: an int or an integer scalar (``__index__``);
    bools and floats (even 2.0) are rejected, never truncated."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if value < lo or (hi is not None and value >= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}), got {value}")
    return value


STREAM_LIMIT = 2**63  # seeds and counters of the negative stream are below this (int64 on every backend)


def stream(seed, offset, draws: int):
    """The one domain of the negative stream (csrc/KERNELS.md): ``seed`` in [0, 2**63), and the
    counters ``offset .. offset + draws - 1`` in [0, 2**63), so that no backend's counter can
    wrap. Returns ``(seed, offset)`` as ints."""
    seed = integer("seed", seed, lo=0, hi=STREAM_LIMIT)
    offset = integer("offset", offset, lo=0, hi=STREAM_LIMIT)
    if offset > STREAM_LIMIT - draws:
        raise ValueError(
            f"offset + B*K = {offset} + {draws} exceeds the stream's counters [0, 2**63): "
            f"use an offset <= {STREAM_LIMIT - draws}"
        )
    return seed, offset


def dense_rows(name: str, t: torch.Tensor) -> None:
    """A 2-D tensor about to be written row by row: its rows must not overlap in memory."""
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise ValueError(
            f"{name} rows overlap in memory (strides {t.stride()} for shape {tuple(t.shape)}): "
            f"a {name} must be a dense (N, D) layout"
        )


def _byte_span(t: torch.Tensor):
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size() - 1


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def bank_layout(bank: torch.Tensor, value: torch.Tensor) -> None:
    """The bank update's layout (twin of ``csrc/common/layout.h``): the bank's rows are written in
    parallel, so they must not overlap one another, and ``value`` must not share the bank's bytes."""
    dense_rows("bank", bank)
    # In a traced graph (or under FakeTensorMode, as the AOT sweep runs the launchers) the
    # storages are fakes without addresses: the kernels check it at run time.
    if (
        bank.numel()
        and value.numel()
        and not torch.compiler.is_compiling()
        and not _is_fake(bank)
        and bank.untyped_storage().data_ptr() == value.untyped_storage().data_ptr()
    ):
        (b0, b1), (v0, v1) = _byte_span(bank), _byte_span(value)
        if not (b1 < v0 or v1 < b0):
            raise ValueError("value overlaps the bank in memory: pass a copy (value.clone())")


def row_weight(weight, rows: int, device, checks: "ValueChecks", name: str = "weight") -> None:
    """A per-row weight: a floating (rows,) tensor on ``device``, finite (queued on ``checks``)."""
    if not isinstance(weight, torch.Tensor) or weight.shape != (rows,) or not weight.is_floating_point():
        raise ValueError(f"{name} must be a floating (B,) = ({rows},) tensor")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but the anchors are on {device}")
    checks.finite(name, weight)


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
        self._bad = self._token = None
        if _PENDING:
            poll_deferred()

    @staticmethod
    def deferred(device) -> bool:
        """Whether a deferrable call's checks on ``device`` are deferred in the current mode."""
        return _MODE == "deferred" or (_MODE == "auto" and device.type == "cuda")

    def _add(self, cond: torch.Tensor, message: str):
        if cond.device.type == "cpu" and _MODE != "deferred" and not torch.compiler.is_compiling():
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
            if (
                t.device.type == "cpu"
                and _MODE != "deferred"
                and not torch.compiler.is_compiling()
                and bool(torch.isfinite(t.detach().sum(dtype=torch.float32)))
            ):
                return
            self._add(~torch.isfinite(t.detach()).all(), f"{name} has non-finite values (nan or inf)")

    def finite_positive(self, name, t):
        """A tensor scalar that must be finite and > 0 (a float one is checked by :func:`scalar`)."""
        if self._enabled:
            t = t.detach()
            self._add(~(torch.isfinite(t) & (t > 0)).all(), f"{name} must be finite and > 0")

    def run(self, deferrable: bool = False):
        """Raise now, or, for a ``deferrable`` call in a deferred mode, queue the flags for a lazy
        report; then :meth:`guard` makes a mutation conditional on them, on the device. Only
        calls whose kernels skip out-of-range rows are deferrable (the fused CUDA and Triton
        backends; not eager torch, where an out-of-range index is a device-side assert)."""
        if self._conds:
            flags = torch.stack(self._conds)
            if torch.compiler.is_compiling():  # read at run time by an op of the graph
                self._token = value_checks_op(flags, _SEP.join(self._messages), deferrable)
                if deferrable and self.deferred(flags.device):
                    self._bad = flags.any()
            elif deferrable and self.deferred(flags.device):
                self._bad = flags.any()
                _PENDING.append(_Pending(flags, self._messages))
            else:
                self._failed += [m for m, f in zip(self._messages, flags.cpu().tolist()) if f]
        if self._failed:
            raise ValueError("; ".join(self._failed))

    def tie(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` itself, or, in a compiled graph, ``t`` plus the 0-d zero of the graph's check op:
        whatever reads ``t`` then runs after the checks, and the graph cannot drop them."""
        if self._token is None:
            return t
        return t + self._token.to(t.dtype)

    def guard(self, index: torch.Tensor, n_rows: int) -> torch.Tensor:
        """``index`` itself, or, when deferred checks are pending for this call, ``index`` with
        every entry replaced on the device by ``n_rows`` (out of range, so every kernel skips
        it) if any check failed: the mutation becomes a no-op without a host sync."""
        index = self.tie(index)
        if self._bad is None:
            return index
        return torch.where(self._bad, torch.full_like(index, n_rows), index)

    def guard_rows(self, new: torch.Tensor, old_fn) -> torch.Tensor:
        """``new`` rows to be written, or, when deferred checks are pending for this call, the
        rows ``old_fn()`` already there if any check failed (a write of unchanged values)."""
        if self._bad is None:
            return new
        return torch.where(self._bad, old_fn(), new)


_SEP = "\x1f"  # joins the messages of one call into the op's string argument


@torch.library.custom_op("dcdkernels::value_checks", mutates_args=())
def value_checks_op(flags: torch.Tensor, messages: str, deferrable: bool) -> torch.Tensor:
    """The value checks of one call inside a compiled graph: ``flags`` (n,) bool, one per message.
    Raises, or queues the flags as a deferred check, exactly as :meth:`ValueChecks.run` does
    outside a graph. Returns a 0-d int64 zero for :meth:`ValueChecks.tie`."""
    if _PENDING:
        poll_deferred()  # as ValueChecks() does for an eager call
    messages = messages.split(_SEP)
    if deferrable and ValueChecks.deferred(flags.device):
        _PENDING.append(_Pending(flags, messages))
    else:
        failed = [m for m, f in zip(messages, flags.cpu().tolist()) if f]
        if failed:
            raise ValueError("; ".join(failed))
    return flags.new_zeros((), dtype=torch.int64)


@value_checks_op.register_fake
def _(flags, messages, deferrable):
    return flags.new_zeros((), dtype=torch.int64)
