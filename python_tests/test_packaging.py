"""Packaging: the one version, the core/train split of the dependencies, the CUDA toolkit that
setup.py finds from the real nvcc, the build note that `python -m dcdkernels.info` reports, and
the Triton launcher lookup. The CUDA-to-CPU build fallback itself is test_build_fallback.py."""

import importlib.util
import os
import subprocess
import sys

import pytest

import dcdkernels
from dcdkernels import _ext, backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_setup():
    """setup.py as a module: its body runs setup() only as __main__."""
    spec = importlib.util.spec_from_file_location("dcdkernels_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup_py(monkeypatch, tmp_path):
    module = _load_setup()
    monkeypatch.setattr(module, "DEFAULT_CUDA_HOME", str(tmp_path / "no-default-cuda"))
    return module


def _executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _toolkit(root, targets=False):
    """A fake CUDA toolkit: bin/nvcc (answers --dryrun -v as the real one does) and cuda_runtime.h."""
    _executable(root / "bin" / "nvcc", f'#!/bin/sh\necho "#$ _HERE_={root}/bin" >&2\necho "#$ TOP={root}/bin/.." >&2\n')
    inc = root / ("targets/x86_64-linux/include" if targets else "include")
    inc.mkdir(parents=True)
    (inc / "cuda_runtime.h").write_text("")
    return root


def _env(bindir):
    return {"PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin"}


def test_wrapper_script_in_a_bin_dir_resolves_to_the_toolkit_it_execs(setup_py, tmp_path):
    tk = _toolkit(tmp_path / "opt" / "cuda-13.0")
    _executable(tmp_path / "local" / "bin" / "nvcc", f'#!/bin/sh\nexec {tk}/bin/nvcc "$@"\n')
    found = setup_py.find_cuda_home(_env(tmp_path / "local" / "bin"))
    assert found == str(tk)
    assert found != str(tmp_path / "local")  # torch's guess: the parent of the nvcc on PATH


def test_wrapper_with_a_quoted_target_and_a_targets_layout(setup_py, tmp_path):
    tk = _toolkit(tmp_path / "cuda-12.8", targets=True)
    _executable(tmp_path / "w" / "bin" / "nvcc", f'#!/usr/bin/env bash\nset -e\nexec "{tk}/bin/nvcc" "$@"\n')
    assert setup_py.find_cuda_home(_env(tmp_path / "w" / "bin")) == str(tk)


def test_wrapper_through_a_variable_is_resolved_by_asking_nvcc(setup_py, tmp_path):
    tk = _toolkit(tmp_path / "cuda")
    _executable(tmp_path / "w" / "bin" / "nvcc", f'#!/bin/sh\nD={tk}\nexec "$D/bin/nvcc" "$@"\n')
    assert setup_py._script_targets(str(tmp_path / "w" / "bin" / "nvcc")) == []  # only nvcc knows
    assert setup_py.find_cuda_home(_env(tmp_path / "w" / "bin")) == str(tk)


def test_symlinked_nvcc_resolves_to_its_toolkit(setup_py, tmp_path):
    tk = _toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "links").mkdir()
    os.symlink(tk / "bin" / "nvcc", tmp_path / "links" / "nvcc")
    assert setup_py.find_cuda_home(_env(tmp_path / "links")) == str(tk)


def test_nvcc_in_a_toolkit_bin_dir_is_its_toolkit(setup_py, tmp_path):
    tk = _toolkit(tmp_path / "cuda")
    assert setup_py.find_cuda_home(_env(tk / "bin")) == str(tk)


def test_cuda_home_from_the_environment_wins(setup_py, tmp_path):
    tk = _toolkit(tmp_path / "cuda")
    env = {**_env(tk / "bin"), "CUDA_HOME": "/somewhere/else"}
    assert setup_py.find_cuda_home(env) == "/somewhere/else"
    assert setup_py.find_cuda_home({**_env(tk / "bin"), "CUDA_PATH": "/p"}) == "/p"


def test_no_toolkit_anywhere_is_none(setup_py, tmp_path):
    # a wrapper that execs a missing compiler and answers nothing
    _executable(tmp_path / "w" / "bin" / "nvcc", f'#!/bin/sh\nexec {tmp_path}/gone/bin/nvcc "$@"\n')
    assert setup_py.find_cuda_home(_env(tmp_path / "w" / "bin")) is None
    assert setup_py.find_cuda_home(_env(tmp_path / "empty")) is None


def test_default_toolkit_when_no_nvcc_on_path(setup_py, monkeypatch, tmp_path):
    tk = _toolkit(tmp_path / "usr-local-cuda")
    monkeypatch.setattr(setup_py, "DEFAULT_CUDA_HOME", str(tk))
    assert setup_py.find_cuda_home(_env(tmp_path / "empty")) == str(tk)


def test_want_cuda_names_the_reason(setup_py, monkeypatch, tmp_path):
    import torch

    monkeypatch.delenv("DCDKERNELS_CUDA", raising=False)
    fake_cuda_torch = type("T", (), {"version": type("V", (), {"cuda": "13.0"}), "__version__": "x"})
    assert setup_py._want_cuda(fake_cuda_torch, None) == (
        False,
        f"no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset, no {setup_py.DEFAULT_CUDA_HOME})",
    )
    assert setup_py._want_cuda(fake_cuda_torch, str(tmp_path)) == (False, f"CUDA_HOME={tmp_path} has no bin/nvcc")
    assert setup_py._want_cuda(fake_cuda_torch, str(_toolkit(tmp_path / "tk"))) == (True, "")
    monkeypatch.setenv("DCDKERNELS_CUDA", "1")
    with pytest.raises(RuntimeError, match="DCDKERNELS_CUDA=1 but no CUDA toolkit found"):
        setup_py._want_cuda(fake_cuda_torch, None)
    monkeypatch.setenv("DCDKERNELS_CUDA", "0")
    assert setup_py._want_cuda(torch, None) == (False, "skipped by DCDKERNELS_CUDA=0")


def test_pyproject_metadata_one_version_and_the_train_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    import dcdkernels.train

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    project = meta["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dcdkernels.__version__"}
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch"]
    assert sorted(project["optional-dependencies"]["train"]) == sorted(dcdkernels.train.TRAIN_EXTRA.values())
    assert project["scripts"] == {"dcdkernels-train": "dcdkernels.train.__main__:main"}
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_src = f.read()
    for duplicated in ("version=", "install_requires", "extras_require", "entry_points", "name="):
        assert duplicated not in setup_src, f"setup.py repeats the metadata of pyproject.toml: {duplicated}"


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, **env},
    )


def test_core_import_needs_only_torch():
    # torch first (it may use numpy itself); then everything of the train extra is made missing
    out = _python(
        "import torch, sys\n"
        "for m in ('numpy', 'tqdm', 'sklearn', 'yaml', 'matplotlib', 'torchvision'):\n"
        "    sys.modules[m] = None\n"
        "import dcdkernels, dcdkernels.info\n"
        "print(sorted(m for m in ('numpy', 'tqdm', 'sklearn', 'yaml', 'matplotlib') if sys.modules[m]))\n"
        "dcdkernels.info.report()\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("missing", ["tqdm", "numpy"])
def test_train_without_the_train_extra_names_it(missing):
    out = _python(
        f"import sys, runpy\nsys.modules[{missing!r}] = None\n"
        "runpy.run_module('dcdkernels.train', run_name='__main__')\n"
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: dcdkernels.train needs the 'train' extra"), out.stderr
    assert f"{missing} is not installed" in last and "pip install 'dcdkernels[train]'" in last


def test_build_note_explains_missing_cuda_kernels(monkeypatch):
    why = "the CUDA sources failed to build with the toolkit /usr/local/cuda (RuntimeError: x)"
    monkeypatch.setattr(_ext, "BUILD_NOTE", {"cuda_kernels": False, "why_no_cuda": why, "why_no_ext": None})
    monkeypatch.setattr(_ext, "has_kernel", lambda op, key: key == "CPU")
    assert backends.availability()["cuda"] == (False, f"dcdkernels._C was built without CUDA kernels: {why}")
    from dcdkernels import info

    assert f"built without CUDA kernels: {why}" in info.report()


def test_triton_launchers_are_the_exports_of_dcdkernels_triton():
    pytest.importorskip("triton")
    import dcdkernels.triton as kernels

    ops = [
        "sampled_contrast",
        "dual_sampled_contrast",
        "dense_contrast",
        "dense_contrast_backward_keys",
        "dense_contrast_reduced",
        "bank_momentum_update_",
    ]
    for op in ops:
        assert backends.kernel(op, "triton") is getattr(kernels, op)
    with pytest.raises(NotImplementedError, match="backend 'triton' has no kernel"):
        backends.kernel("no_such_op", "triton")


def test_version_is_defined_once():
    from dcdkernels import info

    assert info.report().splitlines()[0] == f"dcdkernels {dcdkernels.__version__}"
