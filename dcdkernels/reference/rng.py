"""Counter-based negative sampler, eager twin of ``csrc/common/rng.h`` and ``dcdkernels/triton/rng.py``.

Negative k (1..K) of anchor row b is ``(mix32(ctr_lo ^ mix32(ctr_hi ^ key)) * N) >> 32`` with
``ctr = offset + b*K + k - 1`` (see csrc/KERNELS.md). uint32 arithmetic is emulated on int64
tensors by masking after every multiply (the low 32 bits of a wrapped int64 product are exact).
"""

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def rng_key(seed: int) -> int:
    seed &= (1 << 64) - 1
    return _mix32_int((seed & _MASK32) ^ _mix32_int((seed >> 32) ^ 0x9E3779B9))


def sample_negatives(
    positive: torch.Tensor, num_negatives: int, n_rows: int, seed: int, offset: int = 0
) -> torch.Tensor:
    """(B, K+1) int64 index: column 0 = ``positive``, columns 1..K uniform over [0, n_rows)."""
    if not 0 < n_rows < 2**31:
        raise ValueError(f"n_rows must be in [1, 2**31), got {n_rows}")
    B, K = positive.shape[0], int(num_negatives)
    # The stream's domain (checked for users in dcdkernels/ops/_validate.py::stream): the int64
    # counters below must not wrap.
    if not (0 <= seed < 2**63 and 0 <= offset <= 2**63 - B * K):
        raise ValueError(
            f"seed and offset must lie in the negative stream's domain (0 <= seed < 2**63, "
            f"0 <= offset <= 2**63 - B*K), got seed={seed}, offset={offset}"
        )
    key = rng_key(seed)
    ctr = offset + torch.arange(B * K, dtype=torch.int64, device=positive.device)
    lo, hi = ctr & _MASK32, ctr >> 32
    h = _mix32(lo ^ _mix32(hi ^ key))
    neg = (h * n_rows) >> 32
    return torch.cat([positive.reshape(B, 1).to(torch.int64), neg.view(B, K)], dim=1)
