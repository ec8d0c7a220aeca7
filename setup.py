"""Builds dcdkernels._C with ninja: C++ CPU kernels always, CUDA kernels when torch has CUDA and
nvcc is found (no GPU needed to compile).

Environment switches:
  DCDKERNELS_CUDA=1       force the CUDA sources (fail if they cannot be built)
  DCDKERNELS_CUDA=0       skip the CUDA sources
  DCDKERNELS_NO_EXT=1     build no extension at all (pure Python: eager and Triton backends only)
  DCDKERNELS_REQUIRE_EXT=1  fail the install if the extension does not build (otherwise a failed
                          build only warns, and the package falls back to eager/Triton)
  DCDKERNELS_CUDA_ARCH    nvcc -gencode list, default "90" (Hopper; also sm_80 PTX)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _want_cuda(torch):
    flag = os.environ.get("DCDKERNELS_CUDA", "auto").lower()
    if flag in ("0", "no", "off", "false"):
        return False, "skipped by DCDKERNELS_CUDA=0"
    from torch.utils.cpp_extension import CUDA_HOME

    have = torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if flag in ("1", "yes", "on", "true") and not have:
        raise RuntimeError("DCDKERNELS_CUDA=1 but torch has no CUDA or nvcc was not found")
    if not have:
        return False, "torch has no CUDA build or nvcc was not found"
    return True, ""


def _extensions():
    if os.environ.get("DCDKERNELS_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda, why = _want_cuda(torch)
    if not use_cuda:
        print(f"dcdkernels: building without CUDA ({why})")
    # -fno-trapping-math -fno-math-errno (as torch itself is built): without them g++ will not
    # vectorise the CPU kernels' branch-free exp/log1p loops (csrc/cpu/cpu_utils.h).
    extra = {
        "cxx": ["-O3", "-fopenmp", "-std=c++20", "-fno-trapping-math", "-fno-math-errno",
                "-DDCDKERNELS_WITH_CUDA=%d" % int(use_cuda)],
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
    # A failed compile must not make the package uninstallable: the extension is optional (setuptools
    # turns its build errors into a warning) and dcdkernels falls back to the eager and Triton
    # backends, saying why in `python -m dcdkernels.info`. DCDKERNELS_CUDA=1 or
    # DCDKERNELS_REQUIRE_EXT=1 make a failed build an error (CI sets the latter).
    ext.optional = os.environ.get("DCDKERNELS_REQUIRE_EXT", "0") != "1" and os.environ.get("DCDKERNELS_CUDA") != "1"

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # torch's ninja build raises RuntimeError, which setuptools does not filter
                if not extension.optional:
                    raise
                print(f"WARNING: dcdkernels: building {extension.name} failed ({exc}); installing without it: "
                      "only the eager and Triton backends will be available (see python -m dcdkernels.info)")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="dcdkernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for contrastive knowledge distillation over memory banks",
    packages=find_packages(include=["dcdkernels", "dcdkernels.*"]),
    package_data={"dcdkernels.train": ["configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest", "scikit-learn", "pyyaml", "matplotlib"],
        "train": ["scikit-learn", "pyyaml", "matplotlib"],
    },
    entry_points={"console_scripts": ["dcdkernels-train=dcdkernels.train.__main__:main"]},
    zip_safe=False,
)
