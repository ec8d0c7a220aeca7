"""``python -m dcdkernels.info``: versions, devices and which backends work here (and why not)."""

import platform
import sys

import torch

from . import __version__, _ext, backends


def report() -> str:
    lines = [
        f"dcdkernels {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # triton is optional
        lines.append(f"triton: not importable ({type(exc).__name__})")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"device: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB, "
            f"{props.multi_processor_count} SMs), {torch.cuda.device_count()} visible"
        )
    else:
        lines.append(
            f"device: CPU only ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads); torch.cuda.is_available() is False"
        )
    lines.append(
        "extension dcdkernels._C: "
        + (f"loaded from {_ext._C.__file__}" if _ext._C else f"not loaded: {_ext.LOAD_ERROR}")
    )
    if _ext.BUILD_NOTE:
        lines.append(
            "  built with CUDA kernels"
            if _ext.BUILD_NOTE.get("cuda_kernels")
            else f"  built without CUDA kernels: {_ext.why_no_cuda_kernels()}"
        )
    lines.append("backends:")
    for name, (ok, why) in backends.availability().items():
        lines.append(f"  {name:<7} {'yes' if ok else 'no ':<4} {why}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines.append(
        f"backend='auto' on {device.type}: sampled_contrast -> "
        f"{backends.resolve('auto', device, 'sampled_contrast')}, dense_contrast -> "
        f"{backends.resolve('auto', device, 'dense_contrast')}"
    )
    return "\n".join(lines)


def main():
    print(report())


if __name__ == "__main__":
    main()
