"""Oracle for docs/math.md §4: in-place momentum update of memory rows and FIFO queue enqueue."""

import math

import torch


def last_occurrence(index: torch.Tensor) -> torch.Tensor:
    """Positions p of ``index`` (B,) such that no later position holds the same value, ascending."""
    B = index.shape[0]
    positions = torch.arange(B, device=index.device)
    # Sort by (value, position): the last entry of each run of equal values is the last occurrence.
    order = torch.sort(index * B + positions).indices if B > 0 else positions
    sorted_index = index[order]
    is_last = torch.ones(B, dtype=torch.bool, device=index.device)
    is_last[:-1] = sorted_index[1:] != sorted_index[:-1]
    return torch.sort(order[is_last]).values


@torch.no_grad()
def bank_momentum_update_(bank, index, value, momentum):
    """bank[i] <- normalize(m * bank[i] + (1 - m) * v) for each distinct i in ``index``;
    for duplicates the last occurrence wins (computed from the pre-update row)."""
    keep = last_occurrence(index)
    rows = index[keep]
    dtype = torch.float64 if bank.dtype == torch.float64 else torch.float32
    mixed = bank.index_select(0, rows).to(dtype) * momentum + value.index_select(0, keep).to(dtype) * (1 - momentum)
    bank.index_copy_(0, rows, normalize_rows(mixed).to(bank.dtype))
    return bank


def normalize_rows(x, eps=1e-12):
    """``x / max(||x||, eps)`` per row through a scaled norm (csrc/KERNELS.md): ``y = x * 2^-e``
    with ``max|x| = f * 2^e`` (f in [0.5, 1), e clamped so that 2^-e and eps * 2^-e are normal),
    then ``y / max(||y||, eps * 2^-e)``. Scaling by a power of two is exact, so this is
    ``F.normalize(x)`` to the bit wherever ||x|| does not overflow or underflow, and the exact
    result where it would (finite fp32 rows near 1e30)."""
    info = torch.finfo(x.dtype)
    lo, hi = round(math.log2(info.tiny)), round(math.log2(info.max)) - 2  # fp32: -126, 126
    _, e = torch.frexp(x.abs().amax(dim=1, keepdim=True))
    scale = torch.ldexp(torch.ones_like(x[:, :1]), -e.clamp(lo, hi))
    y = x * scale
    return y / torch.maximum(torch.linalg.vector_norm(y, dim=1, keepdim=True), eps * scale)


@torch.no_grad()
def queue_enqueue_(queue, pointer, keys):
    """Write ``keys`` (B, D) into ring buffer ``queue`` (K, D) at ``pointer``, wrapping around.
    Returns the new pointer. B > K is an error (the batch would overwrite itself)."""
    K, B = queue.shape[0], keys.shape[0]
    if B > K:
        raise ValueError(f"batch of {B} keys is larger than the queue ({K} rows)")
    if isinstance(pointer, torch.Tensor):  # a device pointer: one index_copy_, no host sync
        rows = (pointer + torch.arange(B, device=queue.device)) % K
        queue.index_copy_(0, rows, keys.to(queue.dtype))
        return (pointer + B) % K
    # A host pointer: at most two slice copies (benchmarks/test_bench_state.py: as fast as MoCo's).
    first = min(B, K - pointer)
    queue[pointer : pointer + first] = keys[:first]
    if first < B:
        queue[: B - first] = keys[first:]
    return (pointer + B) % K
