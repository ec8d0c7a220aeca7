"""Loads the compiled extension ``dcdkernels._C`` if it was built, and says why if not."""
import functools
import importlib

import torch

_C = None
LOAD_ERROR = None
try:
    _C = importlib.import_module("dcdkernels._C")
except Exception as exc:  # built without a compiler, or an ABI mismatch with this torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)  # registrations are fixed once _C has loaded
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``dcdkernels_C::op`` has a kernel registered for CPU or CUDA."""
    if _C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dcdkernels_C::{op}", dispatch_key)
    except RuntimeError:
        return False


def cpp_op(op: str):
    return getattr(torch.ops.dcdkernels_C, op)
