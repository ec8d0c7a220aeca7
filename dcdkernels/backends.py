"""Which backends exist here, why others do not, and which one ``backend="auto"`` picks.

Backends: "eager" (the PyTorch oracle, always), "cpu" (C++/OpenMP kernels of dcdkernels._C),
"cuda" (CUDA C++ kernels of dcdkernels._C), "triton" (Triton kernels; on CPU tensors only under
TRITON_INTERPRET=1). A backend named explicitly is used or fails with a clear error: it never
falls back silently. Only "auto" chooses.
"""

import functools
import importlib
import os

import torch

from . import _ext

BACKENDS = ("auto", "eager", "cpu", "cuda", "triton")

# Largest feature dimension D a GPU kernel takes, where it has a limit (the CPU kernels and the
# oracle have none). CUDA: a row group of at most kMaxGroup threads holds at most a fixed number
# of floats per thread (csrc/common/constants.h, read from _C). Triton: the sampled kernels hold a
# row in registers, D <= triton/_common.py's MAX_D.
_CUDA_MAX_DIM = _ext.CUDA_MAX_DIM
_TRITON_MAX_DIM_OPS = ("sampled_contrast", "dual_sampled_contrast")


def max_dim(op: str, backend: str):
    """The largest D that ``backend`` runs ``op`` at, or None for no limit."""
    if backend == "cuda":
        return _CUDA_MAX_DIM.get(op)
    if backend == "triton" and op in _TRITON_MAX_DIM_OPS:
        from .triton._common import MAX_D  # only reached when triton is importable

        return MAX_D
    return None


def _fits(op: str, backend: str, dim) -> bool:
    limit = None if dim is None else max_dim(op, backend)
    return limit is None or dim <= limit


@functools.lru_cache(maxsize=None)
def _triton_status():
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__}" + (" (interpreter)" if not torch.cuda.is_available() else "")
    return (
        False,
        f"triton {triton.__version__} is installed but there is no GPU (set TRITON_INTERPRET=1 to run it on CPU)",
    )


def availability():
    """{backend: (available, detail)} for this process."""
    out = {"eager": (True, f"torch {torch.__version__}")}
    if _ext.LOAD_ERROR is not None:
        out["cpu"] = (False, f"dcdkernels._C did not load: {_ext.LOAD_ERROR}")
        out["cuda"] = (False, f"dcdkernels._C did not load: {_ext.LOAD_ERROR}")
    else:
        out["cpu"] = (
            _ext.has_kernel("sampled_contrast", "CPU"),
            "C++ kernels" if _ext.has_kernel("sampled_contrast", "CPU") else "dcdkernels._C has no CPU kernels",
        )
        if not _ext.has_kernel("sampled_contrast", "CUDA"):
            out["cuda"] = (False, f"dcdkernels._C was built without CUDA kernels: {_ext.why_no_cuda_kernels()}")
        elif not torch.cuda.is_available():
            out["cuda"] = (False, "CUDA kernels are compiled, but no CUDA device is visible")
        else:
            out["cuda"] = (True, f"CUDA kernels on {torch.cuda.get_device_name()}")
    out["triton"] = _triton_status()
    return out


@torch.compiler.assume_constant_result  # decided once at trace time under torch.compile
def resolve(backend: str, device: torch.device, op: str, dtype: torch.dtype = torch.float32, dim=None) -> str:
    """The concrete backend for ``op`` on ``device`` with accumulation ``dtype`` and feature
    dimension ``dim`` (None: not checked). Raises for impossible explicit choices. float64 runs on
    the CPU kernels and the oracle only. "auto" picks a backend that can run the call: on CUDA
    devices the CUDA kernels, else Triton, else the oracle, skipping those whose D limit
    (``max_dim``) ``dim`` exceeds."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if dtype == torch.float64 and backend in ("cuda", "triton"):
        raise TypeError(f"{op}: backend {backend!r} does not support float64 (use 'cpu' or 'eager')")
    if backend == "auto":
        if device.type == "cuda":
            if dtype == torch.float64:
                return "eager"
            if _ext.has_kernel(op, "CUDA") and _fits(op, "cuda", dim):
                return "cuda"
            return "triton" if _triton_status()[0] and _fits(op, "triton", dim) else "eager"
        return "cpu" if _ext.has_kernel(op, "CPU") else "eager"
    if backend == "eager":
        return backend
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {device}")
        if not _ext.has_kernel(op, "CPU"):
            raise NotImplementedError(f"{op}: backend 'cpu' is not available: {availability()['cpu'][1]}")
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device}")
        if not _ext.has_kernel(op, "CUDA"):
            raise NotImplementedError(f"{op}: backend 'cuda' is not available: {availability()['cuda'][1]}")
    elif backend == "triton":
        ok, why = _triton_status()
        if not ok:
            raise NotImplementedError(f"{op}: backend 'triton' is not available: {why}")
    return backend


def kernel(op: str, backend: str):
    """The function implementing ``op`` on a resolved, non-eager backend."""
    if backend in ("cpu", "cuda"):
        return _ext.cpp_op(op)
    try:
        kernels = importlib.import_module("dcdkernels.triton")
    except ModuleNotFoundError as exc:  # triton itself missing; any other broken import propagates
        if exc.name != "triton":
            raise
        raise NotImplementedError(f"{op}: backend 'triton' is not available ({type(exc).__name__}: {exc})") from exc
    if op not in kernels.__all__:
        raise NotImplementedError(f"{op}: backend 'triton' has no kernel (dcdkernels.triton exports {kernels.__all__})")
    return getattr(kernels, op)
