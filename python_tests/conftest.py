"""Shared test setup. Without a GPU, Triton kernels run under the interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before triton is imported, hence here)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dcdkernels  # noqa: E402

# Liger-style tolerances against the oracle.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-7),
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
    torch.float16: dict(atol=5e-2, rtol=5e-2),
}


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fused_backends(device="cpu"):
    """Fused backends that can run on ``device`` here (explicitly named, never 'auto')."""
    avail = dcdkernels.availability()
    names = ["cpu"] if device == "cpu" else ["cuda"]
    names.append("triton")
    return [n for n in names if avail[n][0]]


def backend_params():
    """(device, backend) pairs for every fused backend available here, as pytest params."""
    out = []
    for dev in devices():
        for be in fused_backends(dev):
            out.append(pytest.param(dev, be, id=f"{dev}-{be}"))
    if not out:
        out.append(
            pytest.param(
                "cpu", "none", id="no-fused-backend", marks=pytest.mark.skip(reason="no fused backend available here")
            )
        )
    return out


@pytest.fixture
def single_thread():
    """Tiny shapes: intra-op threads only add spin-wait overhead on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def close_fp32(a, b, msg):
    """``assert_close`` at the float32 row of ``TOL``, with a message."""
    torch.testing.assert_close(a, b, **TOL[torch.float32], msg=msg)
