"""Dispatch point of ``bank_momentum_update_`` (docs/math.md §4, contract in csrc/KERNELS.md)."""

import math

import torch
from torch import Tensor

from .. import _ext, backends, reference
from . import _validate as V


@torch.library.custom_op("dcdkernels::bank_momentum_update_", mutates_args=("bank",))
def bank_momentum_update_op(bank: Tensor, index: Tensor, value: Tensor, momentum: float, backend: str) -> None:
    backends.kernel("bank_momentum_update_", backend)(bank, index, value, momentum)


@bank_momentum_update_op.register_fake
def _(bank, index, value, momentum, backend):
    return None


def bank_momentum_update_(bank, index, value, momentum, *, backend="auto"):
    """In place: ``bank[i] = normalize(m * bank[i] + (1 - m) * value[p])`` for each distinct i of
    ``index`` (B,), p the last position holding i (docs/math.md §4). Everything is validated before the
    bank is touched; returns ``bank``.

    A per-step op on a few hundred rows, so the call itself must stay cheap. On CPU the C++
    kernel validates everything (shapes, dtypes, index range, finite values, momentum) before it
    writes, so outside ``torch.compile`` it is called first, directly; only if it rejects the
    input do the Python checks below run, to raise the error that names the argument."""
    # momentum: a Python float (the schema's double): a tensor, a bool or a string is refused here
    # on every backend, before the CPU fast path (whose binding would accept a 0-d tensor).
    if not V.is_real(momentum):
        raise TypeError(f"momentum must be a float in [0, 1], got {type(momentum).__name__}")
    momentum = float(momentum)
    if (
        isinstance(bank, Tensor)
        and not torch.compiler.is_compiling()
        and bank.is_inference()
        and not torch.is_inference_mode_enabled()
    ):
        raise ValueError(
            "bank is an inference tensor: it can be updated in place only under torch.inference_mode() "
            "(create the bank outside inference mode, or clone it)"
        )
    if (
        backend in ("auto", "cpu")
        and isinstance(bank, Tensor)
        and bank.device.type == "cpu"
        and not (bank.requires_grad and torch.is_grad_enabled())
        and isinstance(value, Tensor)
        and not torch.compiler.is_compiling()
        and _ext.has_kernel("bank_momentum_update_", "CPU")
    ):
        try:
            _ext.cpp_op("bank_momentum_update_")(bank, index, value.detach(), momentum)
            return bank
        except (RuntimeError, ValueError, TypeError):
            pass  # the bank is untouched; the checks below explain (or the kernel raises again)
    V.matrix("bank", bank)
    if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[0] != 0:
        V.matrix("value", value, device=bank.device, dim=bank.shape[1])
    elif value.shape[1] != bank.shape[1]:  # an empty update (a rank with no rows this step) is a no-op
        raise ValueError(f"value has D = {value.shape[1]} but the bank has D = {bank.shape[1]}")
    if bank.requires_grad and torch.is_grad_enabled():
        raise ValueError("bank requires grad: a memory bank is a buffer, update it under torch.no_grad()")
    if bank.stride(1) != 1 and bank.shape[1] > 1:
        raise ValueError(f"bank rows must be contiguous (stride(1) == 1), got strides {bank.stride()}")
    V.bank_layout(bank, value)
    index = V.index_tensor("index", index, device=bank.device, rows=value.shape[0], dims=(1,))
    if not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    # The math dtype is the bank's (fp32, fp64 for an fp64 bank), whatever the values' dtype.
    backend = backends.resolve(backend, bank.device, "bank_momentum_update_", V.accumulation_dtype(bank))
    if value.shape[0] == 0:
        return bank
    if backend != "cpu":
        checks = V.ValueChecks()
        checks.index_in_range("index", index, bank.shape[0])
        checks.finite("value", value)
        checks.run(deferrable=backend in V.DEFERRABLE_BACKENDS)
        index = checks.guard(index, bank.shape[0])
    value = value.detach()
    if backend in ("cuda", "triton") and value.dtype == torch.float64:
        value = value.float()  # the fp32 math reads it so on every backend (the GPU kernels take no fp64)
    with torch.no_grad():
        if backend == "eager":
            reference.bank_momentum_update_(bank, index, value, float(momentum))
        elif torch.compiler.is_compiling():
            bank_momentum_update_op(bank, index, value, float(momentum), backend)
        else:
            backends.kernel("bank_momentum_update_", backend)(bank, index, value, float(momentum))
    return bank
