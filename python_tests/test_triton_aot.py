"""Ahead-of-time compile of every Triton kernel, at every tile configuration the launchers choose,
for sm_90 and sm_80, under the venv's Triton and under triton 3.6 (issue 18). No GPU needed.

The configurations come from the launchers themselves (``dcdkernels.triton.aot.record``: the
launchers run over a sweep on fake CUDA tensors with the kernels replaced by recorders). CI
compiles one variant per tile configuration, the heaviest (most flags, mixed dtypes), and fails
naming the kernel and the configuration on any compile error, any register spill, or a gather
whose loads in flight per SM fall below the Little's-law floor of
``benchmarks/static_resources.py``. Triton 3.6 is looked for in ``$DCDKERNELS_TRITON36`` (CI
installs it there: ``pip install --target DIR triton==3.6.0 --no-deps``); without it, that half
is skipped (an optional dependency).
"""

import os
import sys

import pytest

pytestmark = pytest.mark.triton

ARCHS = ("90", "80")
TRITON36 = os.environ.get("DCDKERNELS_TRITON36", "")


def _have_compiler():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    return True


if not _have_compiler():
    pytest.skip("triton is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def launches():
    from dcdkernels.triton import aot

    return aot.record()


@pytest.fixture(scope="module")
def variants(launches):
    from dcdkernels.triton import aot

    return aot.select(launches)


def _compile_child(variants, pythonpath=None):
    """Compile in a child without TRITON_INTERPRET (this session may have set it), optionally
    with another Triton first on its path."""
    from dcdkernels.triton import aot

    return aot.compile_in_subprocess(variants, ARCHS, pythonpath or "", jobs=2)


@pytest.fixture(scope="module")
def compiled38(variants):
    return _compile_child(variants)


@pytest.fixture(scope="module")
def compiled36(variants):
    if not TRITON36 or not os.path.isdir(os.path.join(TRITON36, "triton")):
        pytest.skip("triton 3.6 not installed on the side (set DCDKERNELS_TRITON36)")
    results, errors, version = _compile_child(variants, TRITON36)
    assert version.startswith("3.6"), f"the child compiled with triton {version}, not 3.6"
    return results, errors, version


def test_sweep_reaches_every_kernel_and_the_headline_sizes(launches, variants):
    from dcdkernels.triton import aot

    kernels = {v["kernel"] for v in variants}
    expected = {name for mod in aot._modules().values() for name in aot._kernels(mod)}
    assert kernels == expected
    assert 80 <= len(variants) <= 250, len(variants)
    calls = {(op, d.get("B"), d.get("D")) for op, d in (l["call"] for l in launches)}
    for op in ("sampled_contrast", "dual_sampled_contrast", "dense_contrast"):
        for B in (64, 256):
            for D in (128, 2048):
                assert (op, B, D) in calls


def _check(compiled):
    results, errors, version = compiled
    assert not errors, f"triton {version}: {len(errors)} compile errors:\n" + "\n".join(errors[:20])
    assert results
    spills = [r for r in results if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not spills, f"triton {version}: {len(spills)} cubins spill registers:\n" + "\n".join(
        f"sm_{r['arch']} {r['registers']} regs, {r['spill_stores']} spill stores: {r['variant']}" for r in spills[:20]
    )
    from benchmarks import static_resources as S

    low, gathers = [], set()
    for r in results:
        f = S.triton_gather_in_flight(r) if r["arch"] == 90 else None
        if f and f[2] in S.HEADLINE["D"]:  # the headline (memory-bound) sizes
            gathers.add(r["kernel"])
            if f[0] < S.FLOOR_BYTES:
                low.append(f"{r['registers']} regs, {f[0] / 1024:.1f} KiB in flight: {r['variant']}")
    assert gathers == set(S.GATHER_KERNELS), gathers
    assert not low, f"triton {version}: gathers below the {S.FLOOR_BYTES / 1024:.1f} KiB/SM floor:\n" + "\n".join(
        low[:20]
    )


def test_aot_compile_venv_triton(compiled38):
    _check(compiled38)


def test_aot_compile_triton36(compiled36):
    _check(compiled36)


def test_c_gathers_keep_enough_loads_in_flight():
    """Every CUDA gather of _C (sampled/dual partials), at both of its block sizes, keeps at least
    the floor's bytes in flight per SM; no _C kernel touches local memory (no spills)."""
    from dcdkernels import _ext

    if not _ext.has_kernel("sampled_contrast", "CUDA"):
        pytest.skip("dcdkernels._C was built without CUDA kernels")
    from benchmarks import static_resources as S

    rows = S.c_kernels()
    assert len(rows) >= 20
    assert not [k for k in rows if k["local_ops"] or k["stack"]], "local memory (spills) in _C"
    gathers = [(k, S.c_gather_in_flight(k)) for k in rows if S.c_gather_in_flight(k)]
    assert gathers
    low = [(k["kernel"], t, b) for k, g in gathers for t, b, v in g if v < S.FLOOR_BYTES]
    assert not low, low


def test_fp16_keys_backward_keeps_fp16_dot_operands():
    """Defect 2 was fixed by scaling before the fp16 rounding, not by an fp32 dot: the compiled
    keys backward still feeds fp16 operands to the tensor cores (TTGIR), and scales first."""
    import json

    import triton.language as tl  # noqa: F401

    from dcdkernels.triton import aot

    v = {
        "module": "dense_contrast",
        "kernel": "_dense_contrast_bwd_keys_kernel",
        "signature": json.loads(_BWD_SIGNATURE),
        "constexprs": {
            "HAS_TARGET": True,
            "HAS_BIAS": False,
            "DOT_DTYPE": {"tl": "fp16"},
            "BLOCK_M": 64,
            "BLOCK_N": 64,
            "BLOCK_DK": 32,
            "BLOCK_DV": 128,
            "stride_ad": 1,
            "stride_kd": 1,
        },
        "divisible": [0, 1, 3, 4],
        "num_warps": 8,
        "num_stages": 3,
    }
    results, errors, _ = aot.compile_in_subprocess([v], ["90"], keep_asm=True)
    assert not errors, errors
    ttgir = results[0]["ttgir"]
    dots = [ln for ln in ttgir.splitlines() if "tt.dot" in ln or "warp_group_dot" in ln]
    assert dots and any("f16" in ln and "bf16" not in ln for ln in dots), dots[:3]
    assert "math.exp2" in ttgir or "exp2" in ttgir  # the power-of-two scale


_BWD_SIGNATURE = """{"anchor_ptr": "*fp16", "stride_ab": "i32", "stride_ad": "constexpr", "keys_ptr": "*fp16",
 "stride_kn": "i32", "stride_kd": "constexpr", "target_ptr": "*i64", "scale_ptr": "*fp32", "bias_ptr": "*fp32",
 "lse_ptr": "*fp32", "grad_rows_ptr": "*fp32", "grad_keys_ptr": "*fp32", "others_ptr": "*fp32",
 "B": "i32", "M": "i32", "D": "i32",
 "HAS_TARGET": "constexpr", "HAS_BIAS": "constexpr", "DOT_DTYPE": "constexpr", "BLOCK_M": "constexpr",
 "BLOCK_N": "constexpr", "BLOCK_DK": "constexpr", "BLOCK_DV": "constexpr"}"""


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
