"""Triton ``sampled_contrast`` (docs/math.md §1a/§1b, contract in csrc/KERNELS.md).

Anchor b is scored against the K+1 bank rows of ``index[b]`` (column 0 the positive). The
columns are split into chunks, and two kernels run:

1. ``_sampled_contrast_partial_kernel``, grid (B, num_chunks): a program gathers its chunk
   BLOCK_K rows at a time as a (BLOCK_K, BLOCK_D) tile, computes the logits
   ``l = s <q, row> + beta`` and folds them into online partials (flash-attention style, with one
   query and V = the gathered rows): running max ``m``, ``l = sum e^(l_k - m)``, and with
   ``compute_grad`` the vector ``a = sum e^(l_k - m) row_k`` and ``c = sum e^(l_k - m) d_k``.
   For NCE the per-column terms need no max: plain sums of the loss, of ``dL/dl_k row_k``,
   ``dL/dl_k d_k`` and ``dL/dl_k`` (``m``/``l`` are still kept, for the ``lse`` output).
   Partials go to a workspace: ``stats`` (B, chunks, NUM_STATS) and ``vec`` (B, chunks, 1, D).
2. ``_sampled_contrast_merge_kernel``, grid (B, D slices): rescales the chunk partials to the
   global max and writes loss, lse, grad_anchor (its D slice) and grad_scalars.

Every gathered row is read once, and the gradient is complete after that read: the autograd
backward only scales it by grad_output. A column whose row lies outside [0, N) is absent
(csrc/KERNELS.md): never read, it adds nothing to any sum, and an absent positive adds no
``-l_0`` / ``-row_0`` term.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    SampledLaunch,
    check_kernel_dtype,
    check_sampled_args,
    chunk_scales,
    column_rows,
    device_guard,
    direction_init,
    direction_step,
    gather_tile,
    load_anchor,
    load_row_slice,
    merge_chunk_vectors,
    merge_prologue,
    num_warps_for,
    partial_prologue,
)

# Slots of the per-(anchor, chunk) statistics in the workspace.
STAT_M = tl.constexpr(0)  # running max of the logits
STAT_L = tl.constexpr(1)  # sum e^(l_k - m)
STAT_C = tl.constexpr(2)  # InfoNCE: sum e^(l_k - m) d_k; NCE: sum dL/dl_k d_k
STAT_D0 = tl.constexpr(3)  # d_0 = <q, positive row> (chunk 0, positive present; 0 elsewhere)
STAT_NCE_LOSS = tl.constexpr(4)  # NCE: sum of the per-column losses
STAT_NCE_SLOPE = tl.constexpr(5)  # NCE: sum dL/dl_k (= dL/dbeta)
NUM_STATS = tl.constexpr(6)


@triton.jit(do_not_specialize=["seed", "offset"])
def _sampled_contrast_partial_kernel(
    anchor_ptr,
    stride_ab,
    stride_ad,
    bank_ptr,
    stride_bn,
    N,
    index_ptr,
    stride_ib,
    stride_ic,
    scale_ptr,
    bias_ptr,
    log_z_ptr,
    stats_ptr,
    vec_ptr,
    D,
    COLS,
    cols_per_chunk,
    num_negatives,
    seed,
    offset,
    log_c_eps,
    log1p_eps_c,
    LOSS_TYPE: tl.constexpr,
    SAMPLED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, chunk, offs_d, d_mask, s, beta, key, col_start, col_end = partial_prologue(
        scale_ptr, bias_ptr, seed, D, COLS, cols_per_chunk, HAS_BIAS, BLOCK_D
    )
    q = load_anchor(anchor_ptr, b, stride_ab, stride_ad, offs_d, d_mask)
    log_z = 0.0
    if LOSS_TYPE == 1:
        log_z = tl.load(log_z_ptr)

    # InfoNCE keeps the softmax sums (c, a), NCE the plain ones (nce_c, nce_a).
    sm_grad = COMPUTE_GRAD and LOSS_TYPE == 0
    nce_grad = COMPUTE_GRAD and LOSS_TYPE == 1
    state = direction_init(BLOCK_D)
    for start in range(col_start, col_end, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        rows, valid = column_rows(
            index_ptr, b, stride_ib, stride_ic, cols, COLS, N, key, offset, num_negatives, SAMPLED
        )
        tile = gather_tile(bank_ptr, stride_bn, rows, offs_d, valid[:, None] & d_mask[None, :])
        state, _, _, _, _ = direction_step(
            state, q, tile, s, beta, cols, valid, log_z, log_c_eps, log1p_eps_c, LOSS_TYPE, sm_grad, nce_grad
        )
    m, l, c, d0, a, nce_loss, nce_c, nce_slope, nce_a = state
    if LOSS_TYPE == 1:
        c = nce_c
        a = nce_a

    slot = b.to(tl.int64) * tl.num_programs(1) + chunk
    stats = stats_ptr + slot * NUM_STATS
    tl.store(stats + STAT_M, m)
    tl.store(stats + STAT_L, l)
    tl.store(stats + STAT_C, c)
    tl.store(stats + STAT_D0, d0)
    tl.store(stats + STAT_NCE_LOSS, nce_loss)
    tl.store(stats + STAT_NCE_SLOPE, nce_slope)
    if COMPUTE_GRAD:
        tl.store(vec_ptr + slot * D + offs_d, a, mask=d_mask)


@triton.jit
def _sampled_contrast_merge_kernel(
    stats_ptr,
    vec_ptr,
    num_chunks,
    N,
    index_ptr,
    stride_ib,
    scale_ptr,
    bias_ptr,
    B,
    D,
    bank_ptr,
    stride_bn,
    loss_ptr,
    lse_ptr,
    grad_anchor_ptr,
    grad_scalars_ptr,
    LOSS_TYPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, pid_d, first, s, beta, row0, has_pos = merge_prologue(scale_ptr, bias_ptr, index_ptr, stride_ib, N, HAS_BIAS)

    # Chunk statistics, rescaled to the global max: scale_c = e^(m_c - m).
    stats, c_mask, m_ref, scale_c = chunk_scales(stats_ptr, b, num_chunks, STAT_M, NUM_STATS, BLOCK_C)
    l = tl.sum(tl.load(stats + STAT_L, mask=c_mask, other=0.0) * scale_c, axis=0)
    lse = m_ref + tl.log(l)  # -inf when no column is present
    inv_l = 1.0 / tl.where(l > 0.0, l, float("inf"))  # 0 when no column is present: empty sums are 0
    c_c = tl.load(stats + STAT_C, mask=c_mask, other=0.0)
    d0 = tl.sum(tl.load(stats + STAT_D0, mask=c_mask, other=0.0), axis=0)
    if LOSS_TYPE == 0:
        loss = lse - tl.where(has_pos, s * d0 + beta, 0.0)
        grad_scale = tl.sum(c_c * scale_c, axis=0) * inv_l - d0
        grad_bias = 0.0  # a shift shared by every column cancels in the softmax
    else:
        loss = tl.sum(tl.load(stats + STAT_NCE_LOSS, mask=c_mask, other=0.0), axis=0)
        grad_scale = tl.sum(c_c, axis=0)
        grad_bias = tl.sum(tl.load(stats + STAT_NCE_SLOPE, mask=c_mask, other=0.0), axis=0)
    tl.store(loss_ptr + b, loss, mask=first)
    tl.store(lse_ptr + b, lse, mask=first)

    if COMPUTE_GRAD:
        tl.store(grad_scalars_ptr + b, grad_scale, mask=first)
        tl.store(grad_scalars_ptr + B + b, grad_bias, mask=first)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        acc = merge_chunk_vectors(
            vec_ptr,
            stats_ptr,
            b,
            num_chunks,
            0,
            1,
            STAT_M,
            NUM_STATS,
            m_ref,
            offs_d,
            d_mask,
            D,
            LOSS_TYPE == 0,
            BLOCK_D,
        )
        if LOSS_TYPE == 0:
            # dL/dq = s (sum_k p_k row_k - row_0): gather the positive row's slice once more
            # (zeros when it is absent).
            grad = s * (acc * inv_l - load_row_slice(bank_ptr, stride_bn, N, row0, offs_d, d_mask))
        else:
            grad = s * acc
        tl.store(grad_anchor_ptr + b.to(tl.int64) * D + offs_d, grad, mask=d_mask)


def _partial_warps(block_d):
    """Warps of the partial kernel: num_warps_for, except 2 at BLOCK_D = 256. With 4 there, ptxas
    (triton 3.8, sm_90) fits the kernel into 128 registers (4 programs per SM) and spills one
    8-byte slot; with 2 it takes 187 registers and no stack, 4 programs per SM still (the
    AOT sweep, ``python -m benchmarks.static_resources``), so the same 32 KiB in flight per SM."""
    return 2 if block_d == 256 else num_warps_for(block_d, 1)


def sampled_contrast(
    anchor,
    bank,
    index,
    logit_scale,
    bias,
    log_z,
    loss_type,
    num_negatives,
    seed,
    offset,
    compute_grad,
    noise_rows=0,
    *,
    num_chunks=None,
    block_k=None,
):
    """Same arguments and outputs as the C++ op ``dcdkernels_C::sampled_contrast``:
    ``(loss (B,), lse (B,), grad_anchor (B, D) or (0,), grad_scalars (2, B) or (0,))``, fp32.
    ``noise_rows``: NCE's N in ``c = K / N`` (0: the bank's rows).

    ``num_chunks`` and ``block_k`` override the split of the K+1 columns (tests, tuning).
    """
    check_kernel_dtype("anchor", anchor)
    K = check_sampled_args(anchor, {"bank": bank}, index, loss_type, log_z, num_negatives)
    launch = SampledLaunch(anchor, bank, index, K, compute_grad, NUM_STATS.value, 1, num_chunks, block_k)
    launch.scalars(logit_scale, bias, log_z, loss_type, seed, offset, noise_rows)
    B, D = anchor.shape
    f32 = dict(dtype=torch.float32, device=anchor.device)
    loss = torch.empty((B,), **f32)
    lse = torch.empty((B,), **f32)
    grad_anchor = torch.empty((B, D) if compute_grad else (0,), **f32)
    grad_scalars = torch.empty((2, B) if compute_grad else (0,), **f32)
    with device_guard(anchor):
        _sampled_contrast_partial_kernel[(B, launch.chunks)](
            anchor,
            anchor.stride(0),
            anchor.stride(1),
            bank,
            bank.stride(0),
            *launch.partial_args,
            **launch.flags,
            **launch.partial_flags,
            num_warps=_partial_warps(launch.block_d),
        )
        _sampled_contrast_merge_kernel[launch.merge_grid](
            *launch.merge_args,
            bank,
            bank.stride(0),
            loss,
            lse,
            grad_anchor,
            grad_scalars,
            **launch.flags,
            **launch.merge_flags,
        )
    return loss, lse, grad_anchor, grad_scalars
