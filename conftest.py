"""Loaded by pytest before any test module of python_tests/ or benchmarks/ is imported.

Without a GPU, Triton kernels run under the interpreter on CPU tensors. The interpreter is
chosen when a kernel is defined, so TRITON_INTERPRET=1 must be set before triton or
dcdkernels.triton is first imported by any collected module, whichever directory is collected
first (``setdefault``: an explicit setting wins)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
