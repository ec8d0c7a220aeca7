"""The occupancy model and the committed report of ``benchmarks/static_resources.py``."""

import os

from benchmarks import static_resources as S


def test_occupancy_model():
    # 166 registers x 256 threads: 168 x 32 = 5376 registers per warp, 12 warps fit: 1 block.
    assert S.occupancy(166, 8, 1152) == (1, "registers")
    assert S.occupancy(32, 4, 0) == (16, "warps")
    assert S.occupancy(64, 4, 100 * 1024)[0] == 2  # shared memory: 228 KB / (100 KB + 1 KB)
    assert 24 * 1024 < S.FLOOR_BYTES < 26 * 1024  # 4.8 TB/s x 700 ns / 132 SMs


def test_report_covers_every_kernel():
    with open(S.DEFAULT_OUT) as f:
        text = f.read()
    from dcdkernels.triton import aot

    for mod in aot._modules().values():
        for name in aot._kernels(mod):
            assert name in text, name
    for name in (
        "sampled_partials_kernel<float, 8>",
        "dual_partials_kernel",
        "dense_partials_kernel",
        "bank_update_kernel",
        "merge_partials_kernel",
    ):
        assert name in text, name
    assert "3.6.0" in text and "3.8.0" in text and "sm_80" in text and "sm_90" in text
    assert os.path.basename(S.DEFAULT_OUT) == "resources.md"
