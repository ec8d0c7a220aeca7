"""Triton ``dual_sampled_contrast`` (docs/math.md §1c, contract in csrc/KERNELS.md).

Both CRD directions at the same indices: the student anchor ``z_s`` against ``bank_t`` rows
(``l^s_k = s <z_s, bank_t[idx_k]> + beta``) and the teacher anchor ``z_t`` against ``bank_s``
rows (``l^t_k``), plus the consistency ``KL(p^t || p^s)``. The structure is that of
``sampled_contrast.py``: a partial kernel, grid (B, num_chunks), reads both banks' rows of each
index once and keeps online partials per chunk; a merge kernel, grid (B, D slices), combines them.

Partials of a chunk (``w^X = e^(l^X - m_X)``, rescaled whenever ``m_X`` grows):
- per direction X in {s, t}: ``m_X``, ``sum w^X``, ``sum w^X d^X``, ``d^X_0``, the vector
  ``a_X = sum w^X row`` (softmax; for InfoNCE and for the KL) and, for NCE, the plain sums of the
  loss, of ``dL/dl``, ``dL/dl d`` and the vector ``sum dL/dl row``;
- for the KL, with ``f = l^t - l^s`` (all t-weighted, rescaled with ``m_t``): ``sum w^t f``,
  ``sum w^t d^s``, ``sum w^t f d^t``, and the vectors ``sum w^t bank_t-row`` and
  ``sum w^t f bank_s-row``.
With ``F = sum p^t f``: ``KL = F - LSE^t + LSE^s``, ``dKL/dz_s = s (a_s/l_s - sum p^t bank_t-row)``,
``dKL/dz_t = s (sum p^t f bank_s-row - F a_t/l_t)``, and ``dKL/ds`` is the same two terms with
``d`` in place of the rows; ``dKL/dbeta = 0``.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    MAXNREG,
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

# Statistics of one (anchor, chunk): a block of DIR_STATS per direction (s at 0, t at DIR_STATS),
# then the KL sums.
DIR_M = tl.constexpr(0)  # running max of the logits
DIR_L = tl.constexpr(1)  # sum w
DIR_C = tl.constexpr(2)  # sum w d
DIR_D0 = tl.constexpr(3)  # d_0 (chunk 0; 0 elsewhere)
DIR_NCE_LOSS = tl.constexpr(4)  # NCE: sum of the column losses
DIR_NCE_C = tl.constexpr(5)  # NCE: sum dL/dl d
DIR_NCE_SLOPE = tl.constexpr(6)  # NCE: sum dL/dl
DIR_STATS = tl.constexpr(7)
STAT_S = tl.constexpr(0)
STAT_T = tl.constexpr(7)
STAT_KL_F = tl.constexpr(14)  # sum w^t f
STAT_KL_DS = tl.constexpr(15)  # sum w^t d^s
STAT_KL_FDT = tl.constexpr(16)  # sum w^t f d^t
NUM_STATS = tl.constexpr(17)
# D-long vectors of one (anchor, chunk).
VEC_A_S = tl.constexpr(0)  # sum w^s bank_t-row
VEC_A_T = tl.constexpr(1)  # sum w^t bank_s-row
VEC_NCE_S = tl.constexpr(2)  # NCE: sum dL^s/dl bank_t-row
VEC_NCE_T = tl.constexpr(3)  # NCE: sum dL^t/dl bank_s-row
VEC_KL_RT = tl.constexpr(4)  # sum w^t bank_t-row
VEC_KL_FRS = tl.constexpr(5)  # sum w^t f bank_s-row
NUM_VECS = tl.constexpr(6)


@triton.jit
def plane_offset(PLANE: tl.constexpr, B, D):
    """Element offset of plane ``PLANE`` of a (planes, B, D) output, in int64: the int32 product
    ``PLANE * B * D`` overflows from B * D >= 2^31 / PLANE."""
    return PLANE * tl.cast(B, tl.int64) * D


@triton.jit
def _store_direction(
    stats,
    vecs,
    D,
    offs_d,
    d_mask,
    state,
    BASE: tl.constexpr,
    VEC_A: tl.constexpr,
    VEC_NCE: tl.constexpr,
    SOFTMAX_GRAD: tl.constexpr,
    NCE_GRAD: tl.constexpr,
):
    """Writes one direction's state (direction_step) to its statistics block BASE and vectors."""
    m, l, c, d0, a, nce_loss, nce_c, nce_slope, nce_a = state
    tl.store(stats + BASE + DIR_M, m)
    tl.store(stats + BASE + DIR_L, l)
    tl.store(stats + BASE + DIR_C, c)
    tl.store(stats + BASE + DIR_D0, d0)
    tl.store(stats + BASE + DIR_NCE_LOSS, nce_loss)
    tl.store(stats + BASE + DIR_NCE_C, nce_c)
    tl.store(stats + BASE + DIR_NCE_SLOPE, nce_slope)
    if SOFTMAX_GRAD:
        tl.store(vecs + VEC_A * D + offs_d, a, mask=d_mask)
    if NCE_GRAD:
        tl.store(vecs + VEC_NCE * D + offs_d, nce_a, mask=d_mask)


@triton.jit(do_not_specialize=["seed", "offset"])
def _dual_sampled_contrast_partial_kernel(
    anchor_s_ptr,
    stride_sb,
    stride_sd,
    anchor_t_ptr,
    stride_tb,
    stride_td,
    bank_s_ptr,
    stride_bsn,
    bank_t_ptr,
    stride_btn,
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
    COMPUTE_KL: tl.constexpr,
    SAMPLED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Softmax vectors serve InfoNCE and the KL; NCE has its own plain sums.
    sm_grad = COMPUTE_GRAD and (LOSS_TYPE == 0 or COMPUTE_KL)
    nce_grad = COMPUTE_GRAD and LOSS_TYPE == 1
    b, chunk, offs_d, d_mask, s, beta, key, col_start, col_end = partial_prologue(
        scale_ptr, bias_ptr, seed, D, COLS, cols_per_chunk, HAS_BIAS, BLOCK_D
    )
    q_s = load_anchor(anchor_s_ptr, b, stride_sb, stride_sd, offs_d, d_mask)
    q_t = load_anchor(anchor_t_ptr, b, stride_tb, stride_td, offs_d, d_mask)
    log_z_s = 0.0
    log_z_t = 0.0
    if LOSS_TYPE == 1:
        log_z_s = tl.load(log_z_ptr)
        log_z_t = tl.load(log_z_ptr + 1)

    # One direction's state (direction_init) per direction, then the KL sums.
    state_s = direction_init(BLOCK_D)
    state_t = direction_init(BLOCK_D)
    kl_f = 0.0
    kl_ds = 0.0
    kl_fdt = 0.0
    kl_rt = tl.zeros([BLOCK_D], dtype=tl.float32)
    kl_frs = tl.zeros([BLOCK_D], dtype=tl.float32)

    # Software-pipelined gather (cp.async into shared memory): NUM_STAGES - 1 tiles in flight
    # while one is used, without holding them in registers (pipeline_stages).
    for start in tl.range(col_start, col_end, BLOCK_K, num_stages=NUM_STAGES):
        cols = start + tl.arange(0, BLOCK_K)
        rows, valid = column_rows(
            index_ptr, b, stride_ib, stride_ic, cols, COLS, N, key, offset, num_negatives, SAMPLED
        )
        mask = valid[:, None] & d_mask[None, :]
        row_t = gather_tile(bank_t_ptr, stride_btn, rows, offs_d, mask)
        row_s = gather_tile(bank_s_ptr, stride_bsn, rows, offs_d, mask)
        # Student: z_s against bank_t rows; teacher: z_t against bank_s rows.
        state_s, dots_s, logits_s, _, _ = direction_step(
            state_s, q_s, row_t, s, beta, cols, valid, log_z_s, log_c_eps, log1p_eps_c, LOSS_TYPE, sm_grad, nce_grad
        )
        state_t, dots_t, logits_t, alpha_t, w_t = direction_step(
            state_t, q_t, row_s, s, beta, cols, valid, log_z_t, log_c_eps, log1p_eps_c, LOSS_TYPE, sm_grad, nce_grad
        )
        if COMPUTE_KL:
            # f is finite on invalid columns too (their logits are beta), where w_t = 0.
            f = logits_t - logits_s
            kl_f = kl_f * alpha_t + tl.sum(w_t * f, axis=0)
            if COMPUTE_GRAD:
                kl_ds = kl_ds * alpha_t + tl.sum(w_t * dots_s, axis=0)
                kl_fdt = kl_fdt * alpha_t + tl.sum(w_t * f * dots_t, axis=0)
                kl_rt = kl_rt * alpha_t + tl.sum(w_t[:, None] * row_t, axis=0)
                kl_frs = kl_frs * alpha_t + tl.sum((w_t * f)[:, None] * row_s, axis=0)

    slot = b.to(tl.int64) * tl.num_programs(1) + chunk
    stats = stats_ptr + slot * NUM_STATS
    vecs = vec_ptr + slot * NUM_VECS * D
    _store_direction(stats, vecs, D, offs_d, d_mask, state_s, STAT_S, VEC_A_S, VEC_NCE_S, sm_grad, nce_grad)
    _store_direction(stats, vecs, D, offs_d, d_mask, state_t, STAT_T, VEC_A_T, VEC_NCE_T, sm_grad, nce_grad)
    tl.store(stats + STAT_KL_F, kl_f)
    tl.store(stats + STAT_KL_DS, kl_ds)
    tl.store(stats + STAT_KL_FDT, kl_fdt)
    if COMPUTE_KL and COMPUTE_GRAD:
        tl.store(vecs + VEC_KL_RT * D + offs_d, kl_rt, mask=d_mask)
        tl.store(vecs + VEC_KL_FRS * D + offs_d, kl_frs, mask=d_mask)


@triton.jit
def _merge_direction(stats, c_mask, m_ref, scale_c, s, beta, has_pos, BASE: tl.constexpr, LOSS_TYPE: tl.constexpr):
    """Per-row scalars of one direction from its chunk statistics: (1/l, lse, softmax c / l, loss,
    dL/ds, dL/dbeta). ``scale_c`` rescales the chunks to this direction's max ``m_ref``. Absent
    columns (csrc/KERNELS.md) are in no statistic; without a present column l = 0, lse = -inf and
    1/l is taken as 0 so that every sum over the columns is 0; an absent positive (``has_pos``
    false) adds no -l_0 (its d_0 is 0)."""
    l = tl.sum(tl.load(stats + BASE + DIR_L, mask=c_mask, other=0.0) * scale_c, axis=0)
    lse = m_ref + tl.log(l)
    inv_l = 1.0 / tl.where(l > 0.0, l, float("inf"))
    c = tl.sum(tl.load(stats + BASE + DIR_C, mask=c_mask, other=0.0) * scale_c, axis=0) * inv_l
    d0 = tl.sum(tl.load(stats + BASE + DIR_D0, mask=c_mask, other=0.0), axis=0)
    if LOSS_TYPE == 0:
        loss = lse - tl.where(has_pos, s * d0 + beta, 0.0)
        grad_scale = c - d0
        grad_bias = tl.where(has_pos | (inv_l == 0.0), 0.0, 1.0)  # sum_P p_k - [0 in P]
    else:
        loss = tl.sum(tl.load(stats + BASE + DIR_NCE_LOSS, mask=c_mask, other=0.0), axis=0)
        grad_scale = tl.sum(tl.load(stats + BASE + DIR_NCE_C, mask=c_mask, other=0.0), axis=0)
        grad_bias = tl.sum(tl.load(stats + BASE + DIR_NCE_SLOPE, mask=c_mask, other=0.0), axis=0)
    return inv_l, lse, c, loss, grad_scale, grad_bias


@triton.jit
def _merged_vector(
    vec_ptr, stats_ptr, b, num_chunks, m_ref, offs_d, d_mask, D, VEC: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Vector ``VEC`` of anchor ``b`` summed over its chunks (merge_chunk_vectors), each chunk's
    weighted by ``e^(m_c - m_ref)`` of the direction whose weights it holds: the student's for
    VEC_A_S and VEC_NCE_S, the teacher's for the others; the NCE vectors are plain sums."""
    student = VEC == VEC_A_S or VEC == VEC_NCE_S
    rescale = VEC != VEC_NCE_S and VEC != VEC_NCE_T
    return merge_chunk_vectors(
        vec_ptr,
        stats_ptr,
        b,
        num_chunks,
        VEC,
        NUM_VECS,
        (STAT_S if student else STAT_T) + DIR_M,
        NUM_STATS,
        m_ref,
        offs_d,
        d_mask,
        D,
        rescale,
        BLOCK_D,
    )


@triton.jit
def _dual_sampled_contrast_merge_kernel(
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
    bank_s_ptr,
    stride_bsn,
    bank_t_ptr,
    stride_btn,
    losses_ptr,
    lse_ptr,
    grad_anchors_ptr,
    grad_scalars_ptr,
    LOSS_TYPE: tl.constexpr,
    COMPUTE_KL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b, pid_d, first, s, beta, row0, has_pos = merge_prologue(scale_ptr, bias_ptr, index_ptr, stride_ib, N, HAS_BIAS)
    stats, c_mask, m_ref_s, scale_s = chunk_scales(stats_ptr, b, num_chunks, STAT_S + DIR_M, NUM_STATS, BLOCK_C)
    _, _, m_ref_t, scale_t = chunk_scales(stats_ptr, b, num_chunks, STAT_T + DIR_M, NUM_STATS, BLOCK_C)
    inv_l_s, lse_s, c_s, loss_s, gscale_s, gbias_s = _merge_direction(
        stats, c_mask, m_ref_s, scale_s, s, beta, has_pos, STAT_S, LOSS_TYPE
    )
    inv_l_t, lse_t, c_t, loss_t, gscale_t, gbias_t = _merge_direction(
        stats, c_mask, m_ref_t, scale_t, s, beta, has_pos, STAT_T, LOSS_TYPE
    )
    kl = 0.0
    gscale_kl = 0.0
    F = 0.0
    if COMPUTE_KL:
        F = tl.sum(tl.load(stats + STAT_KL_F, mask=c_mask, other=0.0) * scale_t, axis=0) * inv_l_t
        kl = tl.where(inv_l_t > 0.0, F - lse_t + lse_s, 0.0)  # 0 without a present column
        kl_ds = tl.sum(tl.load(stats + STAT_KL_DS, mask=c_mask, other=0.0) * scale_t, axis=0) * inv_l_t
        kl_fdt = tl.sum(tl.load(stats + STAT_KL_FDT, mask=c_mask, other=0.0) * scale_t, axis=0) * inv_l_t
        # through l^s: sum (p^s - p^t) d^s; through l^t: sum p^t (f - F) d^t
        gscale_kl = (c_s - kl_ds) + (kl_fdt - F * c_t)
    # Plane offsets of the (3, B), (2, B), (2, 3, B) and (4, B, D) outputs in int64.
    tl.store(losses_ptr + b, loss_s, mask=first)
    tl.store(losses_ptr + plane_offset(1, B, 1) + b, loss_t, mask=first)
    tl.store(losses_ptr + plane_offset(2, B, 1) + b, kl, mask=first)
    tl.store(lse_ptr + b, lse_s, mask=first)
    tl.store(lse_ptr + plane_offset(1, B, 1) + b, lse_t, mask=first)

    if COMPUTE_GRAD:
        # grad_scalars (2, 3, B): [d/ds, d/dbeta] x [L^s, L^t, KL]; dKL/dbeta = 0.
        tl.store(grad_scalars_ptr + b, gscale_s, mask=first)
        tl.store(grad_scalars_ptr + plane_offset(1, B, 1) + b, gscale_t, mask=first)
        tl.store(grad_scalars_ptr + plane_offset(2, B, 1) + b, gscale_kl, mask=first)
        tl.store(grad_scalars_ptr + plane_offset(3, B, 1) + b, gbias_s, mask=first)
        tl.store(grad_scalars_ptr + plane_offset(4, B, 1) + b, gbias_t, mask=first)
        tl.store(grad_scalars_ptr + plane_offset(5, B, 1) + b, 0.0, mask=first)

        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        if LOSS_TYPE == 0 or COMPUTE_KL:
            p_s_rt = _merged_vector(vec_ptr, stats_ptr, b, num_chunks, m_ref_s, offs_d, d_mask, D, VEC_A_S, BLOCK_D)
            p_t_rs = _merged_vector(vec_ptr, stats_ptr, b, num_chunks, m_ref_t, offs_d, d_mask, D, VEC_A_T, BLOCK_D)
            p_s_rt *= inv_l_s
            p_t_rs *= inv_l_t
        if LOSS_TYPE == 0:
            # zeros for an absent positive's row (load_row_slice)
            grad_s = s * (p_s_rt - load_row_slice(bank_t_ptr, stride_btn, N, row0, offs_d, d_mask))
            grad_t = s * (p_t_rs - load_row_slice(bank_s_ptr, stride_bsn, N, row0, offs_d, d_mask))
        else:
            grad_s = _merged_vector(vec_ptr, stats_ptr, b, num_chunks, m_ref_s, offs_d, d_mask, D, VEC_NCE_S, BLOCK_D)
            grad_t = _merged_vector(vec_ptr, stats_ptr, b, num_chunks, m_ref_t, offs_d, d_mask, D, VEC_NCE_T, BLOCK_D)
            grad_s *= s
            grad_t *= s
        kl_grad_s = tl.zeros([BLOCK_D], dtype=tl.float32)
        kl_grad_t = tl.zeros([BLOCK_D], dtype=tl.float32)
        if COMPUTE_KL:
            p_t_rt = _merged_vector(vec_ptr, stats_ptr, b, num_chunks, m_ref_t, offs_d, d_mask, D, VEC_KL_RT, BLOCK_D)
            p_t_f_rs = _merged_vector(
                vec_ptr, stats_ptr, b, num_chunks, m_ref_t, offs_d, d_mask, D, VEC_KL_FRS, BLOCK_D
            )
            kl_grad_s = s * (p_s_rt - p_t_rt * inv_l_t)
            kl_grad_t = s * (p_t_f_rs * inv_l_t - F * p_t_rs)
        out = grad_anchors_ptr + b.to(tl.int64) * D + offs_d
        tl.store(out, grad_s, mask=d_mask)
        tl.store(out + plane_offset(1, B, D), grad_t, mask=d_mask)
        tl.store(out + plane_offset(2, B, D), kl_grad_s, mask=d_mask)
        tl.store(out + plane_offset(3, B, D), kl_grad_t, mask=d_mask)


PIPELINE_BYTES = 32 * 1024  # gathered bytes in flight per program, through the pipeline


def pipeline_stages(tile_bytes):
    """Stages of the partial kernel's gather loop for a tile (both banks' rows) of ``tile_bytes``:
    ``NUM_STAGES - 1`` tiles (2 to 4) in flight per program, PIPELINE_BYTES when tiles allow.
    The kernel holds ~200 registers per thread (two directions, the KL, six D-long partial
    vectors), so only 1-2 programs fit on an SM; with the loads held in registers that was
    8-16 KiB in flight per SM against the 24.9 KiB Little's-law floor of
    ``benchmarks/static_resources.py``. In shared memory the tiles cost no registers: 32-64 KiB
    per SM at D = 128 and 2048 (bf16), at most max(PIPELINE_BYTES, 2 tiles) of shared memory."""
    return 1 + min(4, max(2, triton.cdiv(PIPELINE_BYTES, tile_bytes)))


def dual_sampled_contrast(
    anchor_s,
    anchor_t,
    bank_s,
    bank_t,
    index,
    logit_scale,
    bias,
    log_z,
    loss_type,
    compute_kl,
    num_negatives,
    seed,
    offset,
    compute_grad,
    noise_rows=0,
    *,
    num_chunks=None,
    block_k=None,
):
    """Same arguments and outputs as the C++ op ``dcdkernels_C::dual_sampled_contrast``:
    ``(losses (3, B), lse (2, B), grad_anchors (4, B, D) or (0,), grad_scalars (2, 3, B) or (0,))``,
    fp32. ``num_chunks`` and ``block_k`` override the split of the K+1 columns (tests, tuning).
    """
    check_kernel_dtype("anchor_s", anchor_s)
    check_kernel_dtype("anchor_t", anchor_t)
    K = check_sampled_args(anchor_s, {"bank_s": bank_s, "bank_t": bank_t}, index, loss_type, log_z, num_negatives)
    if anchor_t.shape != anchor_s.shape or bank_s.shape != bank_t.shape:
        raise ValueError(
            f"anchor_t/bank_s must match anchor_s/bank_t: {tuple(anchor_t.shape)} vs "
            f"{tuple(anchor_s.shape)}, {tuple(bank_s.shape)} vs {tuple(bank_t.shape)}"
        )
    if log_z is not None and log_z.numel() != 2:
        raise ValueError(f"log_z must be (2,) = [log Z_s, log Z_t], got shape {tuple(log_z.shape)}")
    B, D = anchor_s.shape
    # Tiles of TILE_ELEMENTS 16-bit elements (the same bytes, so the same pipeline_stages, and 32
    # registers of rows per thread at 4 warps): fp32 banks gather half the columns per step.
    column_bytes = bank_s.element_size() + bank_t.element_size()
    launch = SampledLaunch(
        anchor_s,
        bank_s,
        index,
        K,
        compute_grad,
        NUM_STATS.value,
        NUM_VECS.value,
        num_chunks,
        block_k,
        rows_per_column=triton.cdiv(column_bytes, 2),
    )
    launch.scalars(logit_scale, bias, log_z, loss_type, seed, offset, noise_rows)
    f32 = dict(dtype=torch.float32, device=anchor_s.device)
    losses = torch.empty((3, B), **f32)
    lse = torch.empty((2, B), **f32)
    grad_anchors = torch.empty((4, B, D) if compute_grad else (0,), **f32)
    grad_scalars = torch.empty((2, 3, B) if compute_grad else (0,), **f32)
    flags = dict(COMPUTE_KL=bool(compute_kl), maxnreg=MAXNREG, **launch.flags)
    with device_guard(anchor_s):
        _dual_sampled_contrast_partial_kernel[(B, launch.chunks)](
            anchor_s,
            anchor_s.stride(0),
            anchor_s.stride(1),
            anchor_t,
            anchor_t.stride(0),
            anchor_t.stride(1),
            bank_s,
            bank_s.stride(0),
            bank_t,
            bank_t.stride(0),
            *launch.partial_args,
            NUM_STAGES=pipeline_stages(launch.block_k * launch.block_d * column_bytes),
            num_warps=num_warps_for(launch.block_d, NUM_VECS.value),
            **launch.partial_flags,
            **flags,
        )
        _dual_sampled_contrast_merge_kernel[launch.merge_grid](
            *launch.merge_args,
            bank_s,
            bank_s.stride(0),
            bank_t,
            bank_t.stride(0),
            losses,
            lse,
            grad_anchors,
            grad_scalars,
            **launch.merge_flags,
            **flags,
        )
    return losses, lse, grad_anchors, grad_scalars
