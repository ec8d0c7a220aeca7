"""Input checks shared by every op. They run before any kernel, and before any bank is mutated,
and raise ``ValueError``/``TypeError`` naming the argument.

Value checks (index range, finiteness) need the data: on CPU they are cheap; on CUDA all of an
op's value checks are folded into one boolean tensor and read back with a single host sync.
``set_value_checks(False)`` turns the value checks off for users who validate upstream; the
kernels still never read out of bounds (they skip out-of-range rows).
"""
import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_VALUE_CHECKS = True


def set_value_checks(enabled: bool) -> None:
    global _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)


def value_checks_enabled() -> bool:
    return _VALUE_CHECKS and not torch.compiler.is_compiling()


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
    """Data-dependent checks. On CPU each is one reduction read at once; on CUDA they are
    collected and read back together with a single host sync in :meth:`run`."""

    def __init__(self):
        self._enabled = value_checks_enabled()
        self._conds, self._messages, self._failed = [], [], []

    def _add(self, cond: torch.Tensor, message: str):
        if cond.device.type == "cpu":
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
            # queued for the single sync in run().
            if t.device.type == "cpu" and bool(torch.isfinite(t.detach().sum(dtype=torch.float32))):
                return
            self._add(~torch.isfinite(t.detach()).all(), f"{name} has non-finite values (nan or inf)")

    def run(self):
        if self._conds:
            failed = torch.stack(self._conds).cpu().tolist()
            self._failed += [m for m, f in zip(self._messages, failed) if f]
        if self._failed:
            raise ValueError("; ".join(self._failed))
