"""Builds the extension dcdkernels._C with ninja: C++ CPU kernels always, CUDA kernels when torch
has CUDA and a CUDA toolkit is found (no GPU needed to compile). The package metadata is in
pyproject.toml; this file holds only the extension logic.

The toolkit is the one of the real ``nvcc`` (find_cuda_home): $CUDA_HOME or $CUDA_PATH if set,
else the ``nvcc`` on PATH followed through symlinks and wrapper scripts, else /usr/local/cuda.
When the CUDA sources fail to build, a WARNING block is printed and the CPU-only extension is
built instead; either way the outcome is written next to _C (_C_build.json), and
``python -m dcdkernels.info`` reports it.

Environment switches:
  DCDKERNELS_CUDA=1       force the CUDA sources (fail if they cannot be built, no CPU fallback)
  DCDKERNELS_CUDA=0       skip the CUDA sources
  DCDKERNELS_NO_EXT=1     build no extension at all (pure Python: eager and Triton backends only)
  DCDKERNELS_REQUIRE_EXT=1  fail the install if no extension builds (otherwise a failed CPU build
                          only warns, and the package falls back to eager/Triton)
  DCDKERNELS_CUDA_ARCH    nvcc -gencode list, default "90" (Hopper; also sm_80 PTX)
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_NOTE = "_C_build.json"  # read by dcdkernels/_ext.py
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def _is_toolkit(root):
    """Whether ``root`` looks like a CUDA toolkit: bin/nvcc and the runtime headers."""
    if not root or not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return False
    return os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) or bool(
        glob.glob(os.path.join(root, "targets", "*", "include", "cuda_runtime.h"))
    )


def _nvcc_says(nvcc):
    """The toolkit that ``nvcc`` itself reports (its ``_HERE_``/``TOP`` lines under --dryrun -v)."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-v", "-c", "dcdkernels_probe.cu", "-o", "dcdkernels_probe.o"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for key in ("TOP", "_HERE_"):
        m = re.search(rf"^#\$ {key}=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            here = m.group(1).strip()
            root = os.path.realpath(here if key == "TOP" else os.path.join(here, ".."))
            if key == "TOP" and not _is_toolkit(root):
                root = os.path.realpath(os.path.join(here, ".."))
            if _is_toolkit(root):
                return root
    return None


def _script_targets(path):
    """Absolute ``.../bin/nvcc`` paths named in a wrapper script (what it execs)."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    text = head.decode("utf-8", "replace")
    found = re.findall(r"""(?:^|(?<=[\s"'=:]))(/[^\s"'`;|&<>()$]*/bin/nvcc)(?![\w.-])""", text, re.MULTILINE)
    return [p for p in found if os.path.isfile(p)]


def toolkit_of_nvcc(nvcc, _seen=None):
    """The CUDA toolkit root of the compiler ``nvcc`` (a path), or None. Follows symlinks, then
    wrapper scripts (what they exec), and as a last resort asks the compiler (--dryrun -v)."""
    seen = set() if _seen is None else _seen
    real = os.path.realpath(nvcc)
    if real in seen or len(seen) > 8:
        return None
    seen.add(real)
    root = os.path.dirname(os.path.dirname(real))
    if _is_toolkit(root):
        return root
    for target in _script_targets(real):
        found = toolkit_of_nvcc(target, seen)
        if found:
            return found
    return _nvcc_says(real) if _seen is None else None


def find_cuda_home(environ=None):
    """The CUDA toolkit to build with: $CUDA_HOME or $CUDA_PATH as given, else the toolkit of the
    real ``nvcc`` on $PATH, else /usr/local/cuda if it is a toolkit; None if there is none.

    torch's own guess is the parent of the ``nvcc`` found on PATH, which is wrong when that is a
    wrapper script (``/usr/local/bin/nvcc`` exec'ing ``/usr/local/cuda-13.0/bin/nvcc`` gives
    ``/usr/local``)."""
    env = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var]
    nvcc = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if nvcc:
        found = toolkit_of_nvcc(nvcc)
        if found:
            return found
    return os.path.realpath(DEFAULT_CUDA_HOME) if _is_toolkit(DEFAULT_CUDA_HOME) else None


def _nvidia_wheel_dirs():
    """Headers and libraries shipped by the nvidia-* wheels that a CUDA torch pulls in."""
    incs, libs = [], []
    for path in sys.path:
        base = os.path.join(path, "nvidia")
        if not os.path.isdir(base):
            continue
        for inc in glob.glob(os.path.join(base, "*", "include")):
            incs.append(inc)
        for lib in glob.glob(os.path.join(base, "*", "lib")):
            libs.append(lib)
    return incs, libs


def nvcc_flags():
    """The nvcc flags shared with CMakeLists.txt (csrc/nvcc_flags.txt, one per line)."""
    with open(os.path.join(ROOT, "csrc", "nvcc_flags.txt")) as f:
        return [ln.split("#", 1)[0].strip() for ln in f if ln.split("#", 1)[0].strip()]


def _cuda_flag():
    flag = os.environ.get("DCDKERNELS_CUDA", "auto").lower()
    return "off" if flag in ("0", "no", "off", "false") else "on" if flag in ("1", "yes", "on", "true") else "auto"


def _want_cuda(torch, cuda_home):
    flag = _cuda_flag()
    if flag == "off":
        return False, "skipped by DCDKERNELS_CUDA=0"
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a build without CUDA"
    elif cuda_home is None:
        why = f"no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset, no {DEFAULT_CUDA_HOME})"
    elif not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        why = f"CUDA_HOME={cuda_home} has no bin/nvcc"
    else:
        return True, ""
    if flag == "on":
        raise RuntimeError(f"DCDKERNELS_CUDA=1 but {why}")
    return False, why


def _warning_block(*lines):
    bar = "=" * 78
    print("\n".join(["", bar, *lines, bar, ""]), file=sys.stderr, flush=True)


def _build_ext_class(BuildExtension, fallback, why_no_cuda, cuda_home):
    """torch's BuildExtension, plus the CPU fallback and the build note (see the module doc)."""
    require_ext = os.environ.get("DCDKERNELS_REQUIRE_EXT", "0") == "1"

    class DcdBuildExtension(BuildExtension):
        note_path = None  # where _write_note put it: next to the built _C

        def _write_note(self, **note):
            self.note_path = os.path.join(os.path.dirname(self.get_ext_fullpath("dcdkernels._C")), BUILD_NOTE)
            os.makedirs(os.path.dirname(self.note_path), exist_ok=True)
            with open(self.note_path, "w") as f:
                json.dump(note, f, indent=1)

        def build_extensions(self):
            try:
                super().build_extensions()  # torch's ninja build; also checks nvcc against torch's CUDA
                self._write_note(cuda_kernels=fallback is not None, why_no_cuda=why_no_cuda or None, why_no_ext=None)
                return
            except Exception as exc:  # ninja raises RuntimeError, a CUDA version mismatch too
                if fallback is None or _cuda_flag() == "on":
                    return self._no_extension(exc)
                why = (
                    f"the CUDA sources failed to build with the toolkit {cuda_home} "
                    f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); "
                    "see the nvcc errors in the build log"
                )
            _warning_block(
                "WARNING: dcdkernels: building the CUDA kernels FAILED; building the CPU-only extension instead.",
                f"  {why}",
                "  dcdkernels._C will have the CPU kernels but NO CUDA kernels: backend='cuda' is unavailable and",
                "  backend='auto' on CUDA tensors uses Triton (python -m dcdkernels.info says why).",
                "  Fix the toolchain (e.g. CUDA_HOME=/path/to/cuda) and rebuild; DCDKERNELS_CUDA=1 makes this an",
                "  error, DCDKERNELS_CUDA=0 skips the CUDA sources.",
            )
            for ext in self.extensions:  # the same object setuptools has finalised, now CPU-only
                vars(ext).update({k: v for k, v in vars(fallback).items() if not k.startswith("_")})
            try:
                super().build_extensions()
            except Exception as exc:
                return self._no_extension(exc)
            self._write_note(cuda_kernels=False, why_no_cuda=why, why_no_ext=None)

        def _no_extension(self, exc):
            if require_ext or _cuda_flag() == "on":
                raise exc
            why = f"building dcdkernels._C failed ({type(exc).__name__}: {exc})"
            self._write_note(cuda_kernels=False, why_no_cuda=why, why_no_ext=why)
            _warning_block(
                f"WARNING: dcdkernels: {why}.",
                "  Installing WITHOUT the extension: only the eager and Triton backends will be available",
                "  (see python -m dcdkernels.info). DCDKERNELS_REQUIRE_EXT=1 makes this an error.",
            )

        def copy_extensions_to_source(self):  # --inplace and editable installs: the note goes along
            super().copy_extensions_to_source()
            src = self.note_path
            if src and os.path.isfile(src):
                build_py = self.get_finalized_command("build_py")
                dst = os.path.join(build_py.get_package_dir("dcdkernels"), BUILD_NOTE)
                if os.path.abspath(src) != os.path.abspath(dst):
                    self.copy_file(src, dst, level=self.verbose)

    return DcdBuildExtension


def _extensions():
    if os.environ.get("DCDKERNELS_NO_EXT", "0") == "1":
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is first imported
    import torch
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cuda_home and torch.version.cuda is not None:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported before with torch's guess
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda, why = _want_cuda(torch, cuda_home)
    if not use_cuda:
        print(f"dcdkernels: building without CUDA ({why})")
    else:
        print(f"dcdkernels: building the CPU and CUDA kernels with the CUDA toolkit {cuda_home}")
    # -fno-trapping-math -fno-math-errno (as torch itself is built): without them g++ will not
    # vectorise the CPU kernels' branch-free exp/log1p loops (csrc/cpu/cpu_utils.h).
    extra = {
        "cxx": ["-O3", "-fopenmp", "-std=c++20", "-fno-trapping-math", "-fno-math-errno"],
    }
    inc = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        nv_inc, nv_lib = _nvidia_wheel_dirs()
        arch = os.environ.get("DCDKERNELS_CUDA_ARCH", "90")
        gencode = []
        for a in arch.replace(";", ",").split(","):
            a = a.strip()
            if a:
                gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", "arch=compute_80,code=compute_80"]
        extra["nvcc"] = ["-std=c++20", *nvcc_flags(), *gencode]
        ext = CUDAExtension(
            "dcdkernels._C",
            cpp + cuda,
            include_dirs=inc + nv_inc,
            library_dirs=nv_lib,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "dcdkernels._C", cpp, include_dirs=inc, extra_compile_args=extra, extra_link_args=["-fopenmp"]
        )
    # The CPU-only extension that replaces the CUDA one if that fails to build (same C++ flags).
    fallback = (
        CppExtension(
            "dcdkernels._C",
            cpp,
            include_dirs=inc,
            extra_compile_args={"cxx": list(extra["cxx"])},
            extra_link_args=["-fopenmp"],
        )
        if use_cuda
        else None
    )
    cmd = _build_ext_class(BuildExtension, fallback, why, cuda_home)
    return [ext], {"build_ext": cmd.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for find_cuda_home
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
