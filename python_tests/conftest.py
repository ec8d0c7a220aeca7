"""Shared test setup. The test grid itself (tolerances, backends, per-op shapes) is
python_tests/helpers.py. Without a GPU, Triton kernels run under the interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before triton is imported, hence here)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def single_thread():
    """Tiny shapes: intra-op threads only add spin-wait overhead on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
