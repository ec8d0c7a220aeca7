"""The one test grid: backends, dtypes, tolerances, per-op shapes and input builders.

Every kernel test (test_sampled_contrast.py, test_dual_sampled_contrast.py,
test_dense_contrast.py, test_bank_update.py, test_supcon_contrast.py) runs each backend in
``BACKENDS`` on the same shapes and dtypes, against the float64 oracle of dcdkernels.reference
evaluated on the very same (already rounded) inputs, compared by :func:`assert_close` at the row
of ``TOL`` that :func:`precision` names. A backend is skipped only when its device or optional
dependency is missing here (the reason is given); a backend that is present but broken fails.
"""

import math
import os

import pytest
import torch

from dcdkernels import backends

F64 = torch.float64
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOW = (torch.bfloat16, torch.float16)

# Tolerances against the oracle, one row per dtype (Liger-style).
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
    torch.float16: dict(atol=5e-2, rtol=5e-2),
}


def assert_close(actual, expected, dtype, what, **override):
    """``actual`` against ``expected`` at the ``TOL`` row of ``dtype`` (compared in float64 on the
    CPU); ``what`` names the output in the failure message."""
    tol = {**TOL[dtype], **override}
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), msg=lambda m: f"{what}: {m}", **tol
    )


def close_fp32(a, b, msg):
    """``assert_close`` at the float32 row of ``TOL``, with a message."""
    torch.testing.assert_close(a, b, **TOL[torch.float32], msg=msg)


# ------------------------------------------------------------------------------------------------
# Backends

HAS_GPU = torch.cuda.is_available()


def device_of(backend):
    """Where a backend's tensors live: Triton runs on the GPU, or under the interpreter on CPU."""
    if backend == "cuda" or (backend == "triton" and HAS_GPU):
        return torch.device("cuda")
    return torch.device("cpu")


def missing(backend):
    """Why ``backend`` cannot run here for a missing device or optional dependency, else None.
    A backend whose device is present but whose kernels are missing is NOT skipped: its tests
    fail (the C++ CPU kernels are a required part of the build)."""
    if backend == "cuda" and not HAS_GPU:
        return "needs a CUDA GPU"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
            return "no GPU and TRITON_INTERPRET is not 1"
    return None


# The fused backends, each as a pytest param (ids "cpu", "triton", "cuda").
KERNEL_BACKENDS = ("cpu", "triton", "cuda")
BACKENDS = [
    pytest.param(b, id=b, marks=[pytest.mark.skip(reason=missing(b))] if missing(b) else []) for b in KERNEL_BACKENDS
]


def kernel(op, backend):
    """The kernel entry point of ``op`` on ``backend``: what the registered custom op calls, with
    one positional signature on every backend (csrc/KERNELS.md)."""
    return backends.kernel(op, backend)


def precision(backend, dtype):
    """The ``TOL`` row a backend's outputs are held to for inputs of ``dtype``. The C++ kernels
    (CPU and CUDA) upcast each element exactly and accumulate in fp32 (fp64 for fp64), so their
    16-bit results meet the float32 row. Triton may feed 16-bit operands to tensor-core dots and
    round intermediates to the storage dtype on a GPU: the dtype's own row."""
    if backend == "triton" or dtype in (torch.float32, F64):
        return dtype
    return torch.float32


def unsupported(op, backend, dtype, dim=None):
    """Why ``backend`` refuses ``op`` at ``dtype`` and feature dimension ``dim``, or None. Such a
    case is not skipped: the test asserts the documented error instead."""
    if dtype == F64 and backend in ("cuda", "triton"):
        return "float64"
    limit = None if dim is None else backends.max_dim(op, backend)
    if limit is not None and dim > limit:
        return "dim"
    return None


def assert_refused(reason, call):
    """``call()`` raises the clear error of an unsupported case (see :func:`unsupported`)."""
    if reason == "float64":
        with pytest.raises(TypeError, match="float64"):
            call()
    else:
        with pytest.raises((NotImplementedError, RuntimeError, ValueError), match=r"D|dim"):
            call()


def tiles(backend, **split):
    """A forced work split, for the launchers that take one (Triton's ``num_chunks``/``block_k``/
    ``num_splits``): it lets tiny shapes cross the tile and chunk boundaries that the default
    plan reaches only at GPU sizes. The C++ kernels plan their own split."""
    return split if backend == "triton" else {}


# ------------------------------------------------------------------------------------------------
# Per-op shapes. Each list reaches every backend's tile boundaries; comments name them.

# sampled_contrast (B, N, D, K, triton split)
SAMPLED_SHAPES = [
    pytest.param(1, 4, 3, 1, {}, id="B1-K1-D3"),
    # C++: the K+1 columns of few anchors split over threads / chunks and merged.
    # Triton: 3 chunks of 2-column tiles (the merge path).
    pytest.param(2, 500, 16, 1200, dict(num_chunks=3, block_k=64), id="B2-K1200-D16-chunks"),
    # N << K+1: many duplicate rows; D = 130, no 16-byte fragments (CUDA); Triton tiles of 2.
    pytest.param(7, 40, 130, 30, dict(num_chunks=3, block_k=2), id="B7-K30-D130-dups"),
    # CUDA: a thread per row (D = 8); the usual D = 128 over several chunks.
    pytest.param(5, 64, 8, 33, {}, id="B5-K33-D8"),
    pytest.param(3, 1000, 128, 300, {}, id="B3-K300-D128"),
    # CUDA: a block per row (D = 2048); D = 4096, Triton's MAX_D and CUDA's limit for this op.
    pytest.param(2, 100, 2048, 40, {}, id="B2-K40-D2048"),
    pytest.param(3, 40, 4096, 17, {}, id="B3-K17-D4096"),
]

# dual_sampled_contrast (B, N, D, K, triton split): the dual kernel is the slowest under the
# Triton interpreter, so the shapes stay small; the CUDA ones reach a block per row.
DUAL_SHAPES = [
    pytest.param(1, 4, 3, 1, {}, id="B1-K1-D3"),
    pytest.param(4, 50, 130, 7, dict(num_chunks=3, block_k=2), id="B4-K7-D130-chunks"),
    pytest.param(5, 64, 8, 33, {}, id="B5-K33-D8"),
    pytest.param(2, 300, 16, 900, dict(num_chunks=3, block_k=128), id="B2-K900-D16-chunks"),
    pytest.param(2, 100, 2048, 40, {}, id="B2-K40-D2048"),
]

# dense_contrast (B, M, D, triton split, seconds a call of forward + keys' backward takes under
# the Triton interpreter on this CPU, measured): M crosses a key tile (C++: 1024 rows at D <= 256,
# 128 at D = 2048; CUDA: D = 2500 takes two dim slices); B = 300 is more than one anchor tile
# (256). Triton: its forward split over the keys (flash-decoding partials and their merge).
DENSE_SHAPES = [
    pytest.param(1, 1, 3, {}, 0.2, id="B1-M1-D3"),
    pytest.param(5, 1030, 130, dict(num_splits=3), 2.2, id="B5-M1030-D130-splits"),
    pytest.param(3, 300, 2048, {}, 40, id="B3-M300-D2048"),
    pytest.param(300, 40, 8, dict(num_splits=2), 0.2, id="B300-M40-D8-splits"),
    pytest.param(3, 20, 2500, {}, 17, id="B3-M20-D2500"),
]

# dense_contrast_reduced (B, M, D, interpreter seconds as above): the C++ strip of dots holds
# max(1, 2**20 // (M * element size)) anchors: several strips at B = 300, M = 1030; strips too
# thin at M = 9000 (the per-row kernels instead).
REDUCED_SHAPES = [
    pytest.param(1, 1, 3, 0.1, id="B1-M1-D3"),
    pytest.param(5, 1030, 130, 2.0, id="B5-M1030-D130"),
    pytest.param(3, 300, 2048, 66, id="B3-M300-D2048"),
    pytest.param(300, 1030, 8, 2.4, id="B300-M1030-D8-strips"),
    pytest.param(40, 9000, 8, 7.7, id="B40-M9000-D8-thin"),
]

# supcon_contrast (R anchors, N keys, D, interpreter seconds as above): R = 1, a D not a power of
# two with non-contiguous anchors (D = 7), rows and keys across tiles.
SUPCON_SHAPES = [
    pytest.param(1, 1, 3, 0.1, id="R1-N1-D3"),
    pytest.param(5, 5, 7, 0.2, id="R5-N5-D7"),
    pytest.param(19, 37, 20, 1.0, id="R19-N37-D20"),
    pytest.param(70, 70, 33, 8, id="R70-N70-D33"),
]

# A Triton call on CPU runs under the interpreter, one program after another: a shape that takes
# longer than this there runs only with a GPU (natively, in well under a second).
INTERPRETER_BUDGET_S = 5.0


def skip_if_interpreted_and_slow(backend, seconds):
    if backend == "triton" and not HAS_GPU and seconds > INTERPRETER_BUDGET_S:
        pytest.skip(f"needs a GPU: about {seconds:g} s a call under the Triton interpreter on CPU")


# bank_momentum_update_ (N, B, D): one row; D = 130 (no vector loads); D = 2048 (a block per row).
BANK_UPDATE_SHAPES = [
    pytest.param(7, 1, 3, id="N7-B1-D3"),
    pytest.param(9, 12, 130, id="N9-B12-D130"),
    pytest.param(50, 40, 128, id="N50-B40-D128"),
    pytest.param(30, 20, 2048, id="N30-B20-D2048"),
]


# ------------------------------------------------------------------------------------------------
# Inputs


def unit_rows(n, d, dtype, gen, device="cpu"):
    """``n`` L2-normalised rows of dimension ``d`` (as the CRD/DCD heads produce), in ``dtype``."""
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=F64), dim=1)
    return x.to(device=device, dtype=dtype)


def noncontiguous(x, gen, how="slice"):
    """The same values in a non-contiguous layout: a column slice of a wider tensor, or a transpose."""
    if how == "slice":
        wide = torch.randn(x.shape[0], x.shape[1] + 3, generator=gen).to(device=x.device, dtype=x.dtype)
        wide[:, 1 : 1 + x.shape[1]] = x
        return wide[:, 1 : 1 + x.shape[1]]
    return x.t().contiguous().t()


def misaligned(bank):
    """The same rows starting one element past a 16-byte boundary, with an odd row stride."""
    full = torch.zeros(bank.shape[0], bank.shape[1] + 2, device=bank.device, dtype=bank.dtype)
    full[:, 1 : 1 + bank.shape[1]] = bank
    return full[:, 1 : 1 + bank.shape[1]]


def accumulation(*tensors):
    """The dtype the kernels accumulate and return in: float64 if any input is, else float32."""
    return F64 if any(t is not None and t.dtype == F64 for t in tensors) else torch.float32


def scalar(value, dtype, device):
    """A kernel's 0-d scalar argument (logit scale, bias, log Z), or None."""
    return None if value is None else torch.tensor(value, dtype=dtype, device=device)


def per_row(value, B, device="cpu"):
    """A scalar as a (B, 1) float64 leaf broadcast over each row's logits: autograd through the
    oracle then gives the per-row derivative the kernels return."""
    v = 0.0 if value is None else float(value)
    return torch.full((B, 1), v, dtype=F64, device=device, requires_grad=True)


def grads(total, leaves):
    """d total / d leaf for each leaf, zeros where a leaf is not reached."""
    gs = torch.autograd.grad(total, leaves, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]


def nce_log_z(N, shift=2.0):
    return math.log(N) + shift


# ------------------------------------------------------------------------------------------------
# Used by the loss, memory and integration tests


def devices():
    return ["cpu"] + (["cuda"] if HAS_GPU else [])


def fused_backends(device="cpu"):
    """The fused backends of ``BACKENDS`` that run on ``device`` here (explicitly named, never
    'auto'): "cpu" on CPU always (a missing _C fails its tests), "cuda" with a GPU, "triton" on the
    GPU, or on CPU under the interpreter."""
    return [b for b in KERNEL_BACKENDS if not missing(b) and device_of(b).type == device]


def backend_params():
    """(device, backend) pairs of ``BACKENDS`` as pytest params, ids "cpu-cpu", "cpu-triton" (the
    interpreter) or "cuda-triton", "cuda-cuda"; skipped, with the reason, only when the device or
    optional dependency is missing."""
    out = []
    for b in KERNEL_BACKENDS:
        dev = device_of(b).type
        marks = [pytest.mark.skip(reason=missing(b))] if missing(b) else []
        out.append(pytest.param(dev, b, id=f"{dev}-{b}", marks=marks))
    return out
