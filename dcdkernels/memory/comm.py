"""Communication primitives of the memory modules, and the batch statistics they exchange (docs/math.md §5).

Bottom of ``dcdkernels.memory``: nothing here imports another memory module.

* process group and layout: ``group_rank_world``, ``shard_bounds``;
* collectives: ``gather_meta`` (a few ints per rank plus an "input is valid" flag, so that every
  rank raises together), ``all_gather_rows`` (rank-ordered concatenation, unequal sizes);
* the LSE statistics that make log Z global: ``lse_stats``, ``combine_lse_stats``, and the one
  function that turns the kernels' per-row LSE into RepDistiller's log Z: ``log_partition``.
"""

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

MODES = ("local", "replicated", "sharded")


# --------------------------------------------------------------------------------------------
# process group and layout
# --------------------------------------------------------------------------------------------
def group_rank_world(mode: str, process_group=None, modes=MODES) -> Tuple[int, int]:
    """(rank, world_size) of this process for ``mode``; (0, 1) for local mode."""
    if mode not in modes:
        raise ValueError(f"memory_mode must be one of {modes}, got {mode!r}")
    if mode == "local":
        if process_group is not None:
            raise ValueError("process_group is only meaningful with memory_mode='replicated' or 'sharded'")
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"memory_mode={mode!r} needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) before the module is built"
        )
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def shard_bounds(n_rows: int, world_size: int, rank: int) -> Tuple[int, int]:
    """Rows ``[start, end)`` owned by ``rank``: contiguous blocks of ``ceil(N/W)`` rows (the
    last block may be shorter, and when ``N < W * ceil(N/W) - ceil(N/W)`` trailing ranks own none)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    block = -(-n_rows // world_size)
    start = min(rank * block, n_rows)
    return start, min(start + block, n_rows)


# --------------------------------------------------------------------------------------------
# collectives
# --------------------------------------------------------------------------------------------
def gather_meta(values: List[int], error: Optional[BaseException], group, device) -> torch.Tensor:
    """All-gather a few ints per rank plus an "input is valid" flag: (W, len(values)).

    Validation that raises on some ranks but not others would leave the others waiting in the
    next collective; with the flag gathered, every rank raises together (the failing rank its own
    error, the others a RuntimeError naming it)."""
    W = dist.get_world_size(group)
    local = torch.tensor([int(error is None)] + [int(v) for v in values], dtype=torch.int64, device=device)
    out = [torch.empty_like(local) for _ in range(W)]
    dist.all_gather(out, local, group=group)
    meta = torch.stack(out).cpu()
    if error is not None:
        raise error
    bad = [r for r in range(W) if meta[r, 0] == 0]
    if bad:
        raise RuntimeError(f"invalid input on rank(s) {bad} (see their errors); no state was changed")
    return meta[:, 1:]


def all_gather_rows(t: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Concatenate every rank's ``t`` (sizes[r], ...) along dim 0, in rank order. Unequal batch
    sizes are padded to the largest for the collective and trimmed afterwards."""
    W = len(sizes)
    if W == 1:
        return t
    most = max(sizes)
    if t.shape[0] < most:
        t = torch.cat([t, t.new_zeros((most - t.shape[0],) + tuple(t.shape[1:]))])
    out = [torch.empty_like(t) for _ in range(W)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


# --------------------------------------------------------------------------------------------
# LSE statistics and the partition estimate
# --------------------------------------------------------------------------------------------
def lse_stats(x: torch.Tensor) -> torch.Tensor:
    """(1, 2) fp64 ``[max, sum exp(x - max)]`` of a tensor (``[-inf, 0]`` when empty)."""
    x = x.detach().reshape(-1).to(torch.float64)
    if x.numel() == 0:
        return torch.tensor([[-math.inf, 0.0]], dtype=torch.float64, device=x.device)
    mx = x.max()
    return torch.stack([mx, torch.exp(x - mx).sum()])[None]


def combine_lse_stats(stats: torch.Tensor) -> torch.Tensor:
    """``stats`` (R, 2) rows of ``lse_stats`` -> 0-d fp64 logsumexp of the union (on device, no sync)."""
    mx = stats[:, 0]
    top = mx.max()
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    scale = torch.where(torch.isfinite(mx), torch.exp(mx - safe_top), torch.zeros_like(mx))
    return safe_top + torch.log((stats[:, 1] * scale).sum())


def log_partition(
    lse: torch.Tensor, n_rows: int, n_cols: int, count: Optional[int] = None, total_lse: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """RepDistiller's ``Z = N * mean(exp(u))`` over a batch's ``count * n_cols`` scores, in log
    space: ``log Z = log N + logsumexp_b(lse_b) - log(count * n_cols)`` (``lse_b`` the per-row LSE
    of the kernels). Pass ``total_lse`` (``logsumexp_b lse_b`` already combined over ranks with
    ``lse_stats``/``combine_lse_stats``) and ``count`` (the global batch) in distributed modes.
    fp64, 0-d. The only place this library computes log Z."""
    if total_lse is None:
        total_lse = combine_lse_stats(lse_stats(lse))
    if count is None:
        count = lse.numel()
    return total_lse + (math.log(n_rows) - math.log(count * n_cols))
