"""Memory state under ``torch.distributed``: replicated and sharded banks (SPEC §5).

Replicated mode: every rank holds the whole bank. Scoring is local; updates are all-gathered as
(indices, values) in rank order and every rank applies the same update, so the banks stay
bit-identical (the last-occurrence rule of SPEC §4 applies to the rank-ordered concatenation,
exactly as if one process had seen the concatenated batch).

Sharded mode: rank r owns the contiguous rows ``[r*ceil(N/W), min((r+1)*ceil(N/W), N))``. The
anchors (and their indices, or only their positives when negatives are drawn from the counter
RNG) are all-gathered; each rank computes, for every (anchor, column) whose row it owns, the
partial online-softmax statistics of SPEC §1a (``m``, ``l``, ``a``, ``c`` plus the positive
column's logit and row) or the additive NCE terms of §1b; the partials merge with one MAX and
one SUM all-reduce; each rank then forms the loss and gradient of its own anchors. Updates go to
the owning rank.

The partial statistics come from the fused ``sampled_contrast`` kernel run on the local shard
with local indices ``idx - row_start``: a column owned by another rank falls outside the shard
and is absent (csrc/KERNELS.md), so the kernel reads the owned rows in place and returns the
owned columns' LSE, loss and gradients, from which ``shard_partials`` recovers the partials
(plain torch reads only the owned positive rows, one per anchor). Temporaries are bounded by
``chunk`` (anchor-columns per step): the chunk's (B_chunk, K+1) index and the kernel's
per-anchor outputs; no gathered rows, never the (B, K+1, D) gather.

This module also holds the DDP helpers: DistributedDataParallel broadcasts every buffer from
rank 0 at construction and (``broadcast_buffers=True``) at every forward, which copies a whole
replicated bank each step and silently overwrites every shard of a sharded bank with rank 0's.
``ddp_wrap`` / ``ddp_ignore_memory_buffers`` exclude the memory buffers from that sync.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..ops.sampled_contrast import sampled_contrast_outputs

MODES = ("local", "replicated", "sharded")


# --------------------------------------------------------------------------------------------
# process group and layout
# --------------------------------------------------------------------------------------------
def group_rank_world(mode: str, process_group=None) -> Tuple[int, int]:
    """(rank, world_size) of this process for ``mode``; (0, 1) for local mode."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "local":
        if process_group is not None:
            raise ValueError("process_group is only meaningful with mode='replicated' or 'sharded'")
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"mode={mode!r} needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group) before the module is built")
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


# --------------------------------------------------------------------------------------------
# sharded partial statistics
# --------------------------------------------------------------------------------------------
@dataclass
class Partials:
    """Per-anchor partial statistics of one shard, for all B anchors of the gathered batch.

    ``m`` (B,): reference max of the softmax-weighted sums, here the LSE of the owned columns'
    logits (-inf where none is owned); ``None`` when no softmax statistics were requested.
    ``scaled`` (B, P): sums weighted by ``exp(l - m)`` (rescaled by ``exp(m - M)`` when merged);
    ``plain`` (B, Q): additive sums. Column layout (``fields``) is fixed by the loss type and
    flags, see ``shard_partials``.
    """
    m: Optional[torch.Tensor]
    scaled: torch.Tensor
    plain: torch.Tensor


def _layout(loss: str, need_grad: bool, need_lse: bool, D: int):
    """(scaled fields, plain fields) as lists of (name, width).

    InfoNCE: ``l = sum_k exp(l_k - m)``, ``c = sum_k exp(l_k - m) d_k``,
    ``a = s sum_k exp(l_k - m) row_k`` over the owned columns; ``d0``, ``row0``: the positive's
    dot and row (zeros unless owned). NCE: ``l`` as above (for the LSE only); ``loss``, ``gs``,
    ``gb``, ``ga``: the owned columns' share of the loss, dL/ds, dL/dbeta, dL/dq."""
    if loss == "infonce":
        scaled = [("l", 1)] + ([("c", 1), ("a", D)] if need_grad else [])
        plain = [("d0", 1)] + ([("row0", D)] if need_grad else [])
    else:
        scaled = [("l", 1)] if need_lse else []
        plain = [("loss", 1)] + ([("gs", 1), ("gb", 1), ("ga", D)] if need_grad else [])
    return scaled, plain


def _split(t: torch.Tensor, fields):
    out, col = {}, 0
    for name, width in fields:
        out[name] = t[:, col] if width == 1 else t[:, col:col + width]
        col += width
    return out


@torch.no_grad()
def shard_partials(anchor: torch.Tensor, index_fn: Callable[[int, int], torch.Tensor], shard: torch.Tensor,
                   row_start: int, n_rows: int, n_cols: int, *, logit_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   loss: str, log_z: Optional[torch.Tensor], need_grad: bool, need_lse: bool, backend: str = "auto",
                   chunk: int = 1 << 20) -> Partials:
    """Partial statistics of the columns whose rows this shard owns, from the fused kernel.

    anchor (B, D) all-gathered anchors; ``index_fn(b0, b1)`` returns the (b1-b0, K+1) global
    index of anchors b0..b1-1 (explicit or drawn from the counter RNG); ``shard`` (R, D) the
    owned rows ``[row_start, row_start + R)`` of a bank of ``n_rows`` rows; ``n_cols = K + 1``.

    The kernel (``backend`` resolved as for ``sampled_contrast``) reads the shard in place with
    the local index ``idx - row_start``: columns owned elsewhere fall outside [0, R) and are
    absent (csrc/KERNELS.md); NCE's ``c = K / n_rows`` uses the global K and N. Its outputs are
    the owned columns' statistics: per anchor, ``lse`` is their LSE, so with ``m = lse`` the
    softmax sum is 1 (0 when nothing is owned) and the softmax-weighted dot and row means come
    from ``grad_scalars[0]`` and ``grad_anchor`` once the owned positive's ``-d_0``, ``-s row_0``
    are added back (the positive's row is read here, one row per anchor). NCE terms are additive:
    the kernel's loss and gradients are the partials. Everything is fp32 (fp64 for fp64 inputs).
    Anchors go in chunks of about ``chunk / n_cols`` (each anchor in one chunk): temporaries are
    the chunk's index and the kernel's per-anchor outputs, never gathered rows (except on the
    "eager" backend, whose oracle gathers up to ``chunk`` rows at a time).
    """
    B, D = anchor.shape
    acc = torch.float64 if torch.float64 in (anchor.dtype, shard.dtype) else torch.float32
    dev = anchor.device
    q = anchor.to(acc)
    s = logit_scale.detach().to(acc)
    row_end = row_start + shard.shape[0]
    with_m = loss == "infonce" or need_lse
    sfields, pfields = _layout(loss, need_grad, need_lse, D)
    m = torch.full((B,), -math.inf, dtype=acc, device=dev) if with_m else None
    scaled = torch.zeros((B, sum(w for _, w in sfields)), dtype=acc, device=dev)
    plain = torch.zeros((B, sum(w for _, w in pfields)), dtype=acc, device=dev)
    S, P = _split(scaled, sfields), _split(plain, pfields)
    if shard.shape[0] == 0:  # a trailing rank past the last row owns nothing
        return Partials(m, scaled, plain)
    step = max(1, chunk // n_cols)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        idx = index_fn(b0, b1)
        per_row, lse, ga, gsc = sampled_contrast_outputs(
            anchor[b0:b1], shard, idx - row_start, logit_scale=s, bias=bias, loss=loss, log_z=log_z,
            noise_rows=n_rows, compute_grad=need_grad, backend=backend)
        if with_m:
            m[b0:b1] = lse
            S["l"][b0:b1] = torch.isfinite(lse).to(acc)  # sum_k exp(l_k - lse) over the owned columns
        if loss == "infonce":
            pos = idx[:, 0]
            owned = ((pos >= row_start) & (pos < row_end)).nonzero().squeeze(1)
            row0 = shard.index_select(0, pos[owned] - row_start).to(acc)
            d0 = (row0 * q[b0:b1].index_select(0, owned)).sum(1)
            mine = owned + b0
            P["d0"][mine] = d0
            if need_grad:
                P["row0"][mine] = row0
                S["c"][b0:b1] = gsc[0]
                S["c"][mine] += d0
                S["a"][b0:b1] = ga
                S["a"][mine] += s * row0
        else:
            P["loss"][b0:b1] = per_row
            if need_grad:
                P["gs"][b0:b1] = gsc[0]
                P["gb"][b0:b1] = gsc[1]
                P["ga"][b0:b1] = ga
    return Partials(m, scaled, plain)


def _rescale(m_local: torch.Tensor, m_global: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(m_local), torch.exp(m_local - m_global), torch.zeros_like(m_local))


def merge_partials(parts: List[Partials]) -> Partials:
    """Merge the partials of every shard in one process (what the all-reduces do across ranks)."""
    m = None
    scaled = torch.zeros_like(parts[0].scaled)
    if parts[0].m is not None:
        m = torch.stack([p.m for p in parts]).amax(0)
        for p in parts:
            scaled += p.scaled * _rescale(p.m, m)[:, None]
    return Partials(m, scaled, sum(p.plain for p in parts))


def all_reduce_partials(p: Partials, group) -> Partials:
    """MAX all-reduce of ``m``, rescale, then one SUM all-reduce of everything else."""
    scaled = p.scaled
    if p.m is not None:
        m = p.m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        scaled = scaled * _rescale(p.m, m)[:, None]
    else:
        m = None
    packed = torch.cat([scaled, p.plain], dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return Partials(m, packed[:, :scaled.shape[1]], packed[:, scaled.shape[1]:])


def finalize(p: Partials, *, loss: str, logit_scale: torch.Tensor, bias: Optional[torch.Tensor],
             need_grad: bool, need_lse: bool, D: int):
    """Per-anchor (loss, lse or None, grad_anchor, grad_scale, grad_bias) from merged partials
    (gradients ``None`` unless ``need_grad``)."""
    sfields, pfields = _layout(loss, need_grad, need_lse, D)
    S, P = _split(p.scaled, sfields), _split(p.plain, pfields)
    acc = p.plain.dtype
    s = logit_scale.detach().to(acc)
    lse = p.m + torch.log(S["l"]) if "l" in S else None
    ga = gs = gb = None
    if loss == "infonce":
        l0 = P["d0"] * s
        if bias is not None:
            l0 = l0 + bias.detach().to(acc)
        per_row = lse - l0
        if need_grad:
            inv = 1.0 / S["l"]
            ga = S["a"] * inv[:, None] - s * P["row0"]
            gs = S["c"] * inv - P["d0"]
            gb = torch.zeros_like(gs)  # a shared shift cancels in the softmax: exactly 0
    else:
        per_row = P["loss"]
        if need_grad:
            ga, gs, gb = P["ga"], P["gs"], P["gb"]
    return per_row, lse, ga, gs, gb


class PrecomputedContrast(torch.autograd.Function):
    """Attaches gradients computed in the forward pass (SPEC §1a: the gradient is ready after the
    forward read of each row) to the per-row loss, so ``loss.backward()`` reaches the anchors, a
    learnable logit scale and bias. Backward only scales by ``grad_output``: no communication."""

    @staticmethod
    def forward(ctx, anchor, logit_scale, bias, per_row, grad_anchor, grad_scale, grad_bias):
        ctx.save_for_backward(grad_anchor, grad_scale, grad_bias)
        ctx.anchor_dtype = anchor.dtype
        ctx.has_bias = bias is not None
        return per_row.clone()

    @staticmethod
    def backward(ctx, g):
        ga, gs, gb = ctx.saved_tensors
        g = g.to(ga.dtype)
        d_anchor = (ga * g[:, None]).to(ctx.anchor_dtype) if ctx.needs_input_grad[0] else None
        d_scale = (gs * g).sum() if ctx.needs_input_grad[1] else None
        d_bias = (gb * g).sum() if ctx.has_bias and ctx.needs_input_grad[2] else None
        return d_anchor, d_scale, d_bias, None, None, None, None


# --------------------------------------------------------------------------------------------
# DistributedDataParallel
# --------------------------------------------------------------------------------------------
def memory_buffer_names(model: torch.nn.Module) -> List[str]:
    """Fully qualified names of every buffer of every MemoryBank / MomentumQueue inside ``model``."""
    from .bank import MemoryBank
    from .queue import MomentumQueue

    names = []
    for prefix, mod in model.named_modules():
        if isinstance(mod, (MemoryBank, MomentumQueue)):
            for name, _ in mod.named_buffers(recurse=False):
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def ddp_ignore_memory_buffers(model: torch.nn.Module) -> List[str]:
    """Tell DDP (before wrapping) not to broadcast the memory buffers of ``model``, neither at
    construction nor at each forward; other buffers (BatchNorm statistics) are still synced.
    Returns the ignored names (merged with any already registered)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = memory_buffer_names(model)
    previous = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    merged = previous + [n for n in names if n not in previous]
    DDP._set_params_and_buffers_to_ignore_for_model(model, merged)
    return merged


def ddp_wrap(model: torch.nn.Module, **ddp_kwargs):
    """``DistributedDataParallel(model, **ddp_kwargs)`` with the memory buffers excluded from
    DDP's buffer broadcast (``broadcast_buffers`` / ``forward_sync_buffers`` keep their meaning
    for every other buffer). Without this, DDP copies a replicated bank from rank 0 on every
    forward (the whole N x D bank per step), and overwrites each rank's shard of a sharded bank
    with rank 0's shard at construction and every forward (silently wrong when shapes agree)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp_ignore_memory_buffers(model)
    return DDP(model, **ddp_kwargs)
