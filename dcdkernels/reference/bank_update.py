"""Oracle for SPEC §4: in-place momentum update of memory rows and FIFO queue enqueue."""
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
    bank.index_copy_(0, rows, torch.nn.functional.normalize(mixed, dim=1, eps=1e-12).to(bank.dtype))
    return bank


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
    queue[pointer:pointer + first] = keys[:first]
    if first < B:
        queue[:B - first] = keys[first:]
    return (pointer + B) % K
