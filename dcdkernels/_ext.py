"""Loads the compiled extension ``dcdkernels._C`` if it was built, and says why if not."""

import functools
import importlib
import json
import os

import torch

_C = None
LOAD_ERROR = None
try:
    _C = importlib.import_module("dcdkernels._C")
except Exception as exc:  # built without a compiler, or an ABI mismatch with this torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def _read_build_note():
    """What setup.py wrote next to _C when it built it: whether the CUDA kernels were built and,
    if not, why (skipped, no toolkit, or a failed CUDA compile with the CPU-only fallback)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # built by CMake or an older setup.py, or never built


# Constants shared with the kernels: defined once, in csrc/common/constants.h, and published by _C
# (csrc/extension.cpp). The one fallback, for a missing _C or one built before it published them
# (then only the Triton grids use it): 132, the value of kDeterministicSms there.
DETERMINISTIC_SMS = int(getattr(_C, "DETERMINISTIC_SMS", 132))
# Largest D of the CUDA gather kernels, per op (no CUDA kernels run without _C; rebuild a _C
# that predates these attributes).
CUDA_MAX_DIM = {
    op: int(getattr(_C, f"CUDA_MAX_DIM_{op.upper()}"))
    for op in ("sampled_contrast", "dual_sampled_contrast")
    if hasattr(_C, f"CUDA_MAX_DIM_{op.upper()}")
}


BUILD_NOTE = _read_build_note()
if _C is None and BUILD_NOTE.get("why_no_ext"):
    LOAD_ERROR = f"{LOAD_ERROR} ({BUILD_NOTE['why_no_ext']})"


def why_no_cuda_kernels() -> str:
    """Why dcdkernels._C has no CUDA kernels, as recorded by the build (or the usual reasons)."""
    return BUILD_NOTE.get("why_no_cuda") or "torch without CUDA, nvcc missing, or DCDKERNELS_CUDA=0"


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
