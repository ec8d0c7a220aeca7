"""Counter-based negative sampler, Triton twin of ``csrc/common/rng.h`` (eager twin:
``dcdkernels/reference/rng.py``); the stream is defined in csrc/KERNELS.md.

All arithmetic is uint32 with wrap-around, exactly as in C++. The 64-bit counter is built in
int64, whose wrap-around has the same bits as uint64's, and split into its two 32-bit halves
(truncation keeps the low half; an arithmetic right shift by 32 leaves the high half in the low
32 bits, so truncating it afterwards is exact whatever the sign). The final draw
``(uint64(h) * N) >> 32`` is the high word of a 32x32-bit product: exact in uint64 since N < 2^32.
"""

import triton
import triton.language as tl


@triton.jit
def _mix32(x):
    # x is uint32: the multiplications wrap modulo 2^32, and the Python literals take x's type.
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def rng_key(seed):
    """Per-launch key of ``seed`` (an integer scalar holding the uint64 seed's bits)."""
    seed = seed.to(tl.int64)
    lo = seed.to(tl.uint32)
    hi = (seed >> 32).to(tl.uint32)
    return _mix32(lo ^ _mix32(hi ^ 0x9E3779B9))


@triton.jit
def sample_index(key, offset, b, k, K, N):
    """Bank row of negative ``k`` (1..K, a block of int32 columns) of anchor row ``b``, uniform
    over [0, N): ``key`` from :func:`rng_key`, ``offset`` an int64 scalar. Returns int64."""
    ctr = offset.to(tl.int64) + b.to(tl.int64) * K + (k - 1)
    lo = ctr.to(tl.uint32)
    hi = (ctr >> 32).to(tl.uint32)
    h = _mix32(lo ^ _mix32(hi ^ key))
    return ((h.to(tl.uint64) * N) >> 32).to(tl.int64)
