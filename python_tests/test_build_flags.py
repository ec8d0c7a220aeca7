"""The two builds (setup.py and CMakeLists.txt) compile the CUDA kernels with one list of nvcc
flags, csrc/nvcc_flags.txt, and that list has no --use_fast_math (issue 18, defect 3: with it
the bank update's sqrt and division were approximate, and its fp32 rows differed from the CPU
and Triton ones). When the CUDA build of ``_C`` is present, its PTX shows the IEEE operations."""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _flags():
    return [
        ln.split("#", 1)[0].strip()
        for ln in _read("csrc", "nvcc_flags.txt").splitlines()
        if ln.split("#", 1)[0].strip()
    ]


def test_both_builds_read_one_flag_list_without_fast_math():
    flags = _flags()
    assert "-O3" in flags
    for bad in ("--use_fast_math", "-use_fast_math", "--ftz=true", "--prec-div=false", "--prec-sqrt=false"):
        assert bad not in flags
    setup, cmake = _read("setup.py"), _read("CMakeLists.txt")
    assert "nvcc_flags.txt" in setup and "nvcc_flags.txt" in cmake
    code = lambda text: "\n".join(ln.split("#", 1)[0] for ln in text.splitlines())  # noqa: E731
    assert "fast_math" not in code(setup) and "fast_math" not in code(cmake)


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def test_built_bank_update_uses_ieee_sqrt_and_division():
    from dcdkernels import _ext

    if not _ext.has_kernel("bank_momentum_update_", "CUDA"):
        pytest.skip("dcdkernels._C was built without CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    import dcdkernels._C as C

    ptx = subprocess.run([tool, "-ptx", C.__file__], capture_output=True, text=True, check=True).stdout
    # The PTX of each kernel runs from its ".entry" to the next one.
    parts = re.split(r"(?=\.visible \.entry|\.entry )", ptx)
    bank = [p for p in parts if "bank_update_kernel" in p.split("(", 1)[0]]
    assert bank, "bank_update_kernel not found in the PTX of dcdkernels._C"
    for body in bank:
        assert "sqrt.rn.f32" in body, "the bank update's sqrt is not the IEEE one"
        assert not re.search(r"sqrt\.approx|rsqrt\.approx|div\.approx|div\.full|rcp\.approx|\.ftz\.", body), (
            "approximate or flush-to-zero math in the bank update"
        )
