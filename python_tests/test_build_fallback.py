"""The CUDA-to-CPU build fallback, for real: a copy of the repository whose CUDA sources are one
broken .cu file builds the CPU-only dcdkernels._C, prints the WARNING block, and the package
reports why the cuda backend is missing. Built with one CPU kernel file, to keep CI fast."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import os, sys, torch
import dcdkernels
from dcdkernels import _ext, info
assert dcdkernels.__file__.startswith(os.getcwd()), dcdkernels.__file__
ok, why = dcdkernels.availability()["cpu"]
assert ok, why
assert _ext.has_kernel("sampled_contrast", "CPU") and not _ext.has_kernel("sampled_contrast", "CUDA")
ok, why = dcdkernels.availability()["cuda"]
assert not ok and "the CUDA sources failed to build" in why, why
g = torch.Generator().manual_seed(0)
q, bank = torch.randn(3, 16, generator=g), torch.randn(40, 16, generator=g)
idx = torch.randint(0, 40, (3, 9), generator=g)
loss = {b: dcdkernels.sampled_contrast(q, bank, idx, logit_scale=2.0, backend=b) for b in ("cpu", "eager")}
torch.testing.assert_close(loss["cpu"], loss["eager"])
print(info.report())
"""


def _find_cuda_home(env):
    spec = importlib.util.spec_from_file_location("dcdkernels_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home(env)


@pytest.mark.slow
def test_broken_cuda_source_builds_the_cpu_only_extension_and_says_so(tmp_path):
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch (otherwise the CUDA sources are never attempted)")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CUDA_HOME", "CUDA_PATH", "PYTHONPATH") and not k.startswith("DCDKERNELS_")
    }
    cuda_home = _find_cuda_home(env)  # as a new user: no CUDA_HOME, the nvcc on PATH
    if cuda_home is None:
        pytest.skip("needs a CUDA toolkit (nvcc) so that the CUDA sources are attempted")

    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("*.so", "_C_build.json", "__pycache__", "*.cu")
    for name in ("csrc", "dcdkernels"):
        shutil.copytree(os.path.join(ROOT, name), repo / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), repo / name)
    # One CPU op is enough to show the CPU kernels built and loaded (the schemas of every op are in
    # registration.cpp, each kernel file only adds its implementations): the CPU sources compile
    # twice (with the CUDA flags, then for the fallback), so the others would only cost CI time.
    for name in os.listdir(repo / "csrc" / "cpu"):
        if name.endswith(".cpp") and name != "sampled_contrast.cpp":
            os.remove(repo / "csrc" / "cpu" / name)
    # The only CUDA source: a syntax error (compiles in a second).
    (repo / "csrc" / "cuda" / "broken.cu").write_text("__global__ void broken(float* x) { x[0] = ; }\n")

    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**env, "MAX_JOBS": "2"},
    )
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-4000:]
    assert f"building the CPU and CUDA kernels with the CUDA toolkit {cuda_home}" in build.stdout, log[-4000:]
    assert "broken.cu" in log  # nvcc was run on it, and failed
    assert (
        "WARNING: dcdkernels: building the CUDA kernels FAILED; building the CPU-only extension instead."
        in build.stderr
    ), log[-4000:]

    check = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHONPATH": str(repo)},
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "built without CUDA kernels: the CUDA sources failed to build" in check.stdout
