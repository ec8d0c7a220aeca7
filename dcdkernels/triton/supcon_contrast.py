"""Triton ``supcon_contrast`` and ``supcon_contrast_backward`` (contract: csrc/KERNELS.md): the
supervised-contrastive loss of anchors (R, D) with labels against keys (N, D) with labels,
``l_ij = s <a_i, k_j>``, tiled as ``dense_contrast``: the (R, N) logits are never written.

Forward, grid (R / BLOCK_M,): a program owns BLOCK_M anchors and walks the keys BLOCK_N at a
time (tl.dot over D in BLOCK_DK steps): running max ``m`` over every column (the self column
included, as the official row max), ``S = sum_{j != i} e^(l - m)`` rescaled online, the
positives' raw logit sum and count; ``L = m + log(S + eps) - pos_sum / npos`` (0 without a
positive); stats = [m, S + eps, npos].

Backward: ``G_ij = g_i ([j != i] e^(l_ij - m_i) / (S_i + eps) - [j in P_i] / npos_i)``, recomputed
tile by tile. Anchors kernel, grid (R / BLOCK_M, D / BLOCK_DV): ``grad_a = s G K`` and (slice 0)
the per-row ``sum_j G_ij d_ij`` of d/ds. Keys kernel, grid (N / BLOCK_N, D / BLOCK_DV):
``grad_k = s G^T A``. Dots in fp32 ("ieee").
"""

import torch
import triton
import triton.language as tl

from ._common import check_kernel_dtype, device_guard, online_softmax_step, qk_tile, scalar_arg

MAX_BLOCK_M = 32
MAX_BLOCK_N = 32
MAX_BLOCK_DK = 32
MAX_BLOCK_DV = 64
MIN_DOT = 16
# Every dot here is the full-fp32 (FMA) path: 32 x 32 tiles, D slices of 64 and 8 warps keep every
# configuration the launchers choose free of spills under triton 3.6 and 3.8 on sm_80 and sm_90
# (python_tests/test_triton_aot.py; 64 x 64 tiles with 4 warps spilled up to 4,573 stores).
NUM_WARPS = 8


@triton.jit
def _dots(
    a_ptr,
    stride_a,
    offs_m,
    m_mask,
    k_ptr,
    stride_k,
    offs_n,
    n_mask,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 dots <a_i, k_j> over the full D (rows with unit inner stride)."""
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_a
    k_rows = k_ptr + offs_n.to(tl.int64) * stride_k
    return qk_tile(a_rows, 1, m_mask, k_rows, 1, n_mask, D, tl.float32, BLOCK_M, BLOCK_N, BLOCK_DK)


@triton.jit
def _coefficients(dots, s, offs_m, m_mask, offs_n, n_mask, la, lk, m_i, inv_den, inv_np, g, EXCLUDE_SELF: tl.constexpr):
    """G (BLOCK_M, BLOCK_N) of the backward; 0 for padding, rows without positives, the self column."""
    keep = m_mask[:, None] & n_mask[None, :]
    if EXCLUDE_SELF:
        keep = keep & (offs_m[:, None] != offs_n[None, :])
    p = tl.where(keep, tl.exp(s * dots - m_i[:, None]) * inv_den[:, None], 0.0)
    pos = keep & (la[:, None] == lk[None, :])
    G = p - tl.where(pos, inv_np[:, None], 0.0)
    return G * g[:, None]


@triton.jit
def _supcon_fwd_kernel(
    a_ptr,
    stride_a,
    la_ptr,
    k_ptr,
    stride_k,
    lk_ptr,
    scale_ptr,
    loss_ptr,
    stats_ptr,
    R,
    N,
    D,
    eps,
    EXCLUDE_SELF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < R
    s = tl.load(scale_ptr)
    la = tl.load(la_ptr + offs_m, mask=m_mask, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    S = tl.zeros([BLOCK_M], dtype=tl.float32)
    pos_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    npos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        lk = tl.load(lk_ptr + offs_n, mask=n_mask, other=-1)
        logits = s * _dots(
            a_ptr, stride_a, offs_m, m_mask, k_ptr, stride_k, offs_n, n_mask, D, BLOCK_M, BLOCK_N, BLOCK_DK
        )
        # The self column counts in the max, not in S. Every tile holds a real column: m_new is finite.
        m_new, alpha, e = online_softmax_step(m_i, logits, n_mask[None, :], ROWS=True)
        keep = n_mask[None, :]
        if EXCLUDE_SELF:
            keep = keep & (offs_m[:, None] != offs_n[None, :])
        S = S * alpha + tl.sum(tl.where(keep, e, 0.0), axis=1)
        pos = keep & (la[:, None] == lk[None, :])
        pos_sum += tl.sum(tl.where(pos, logits, 0.0), axis=1)
        npos += tl.sum(pos.to(tl.float32), axis=1)
        m_i = m_new
    den = S + eps
    loss = tl.where(npos > 0, m_i + tl.log(den) - pos_sum / tl.maximum(npos, 1.0), 0.0)
    tl.store(loss_ptr + offs_m, loss, mask=m_mask)
    tl.store(stats_ptr + offs_m, m_i, mask=m_mask)
    tl.store(stats_ptr + R + offs_m, den, mask=m_mask)
    tl.store(stats_ptr + 2 * R + offs_m, npos, mask=m_mask)


@triton.jit
def _load_row_state(stats_ptr, g_ptr, offs_m, m_mask, R):
    m_i = tl.load(stats_ptr + offs_m, mask=m_mask, other=0.0)
    inv_den = 1.0 / tl.load(stats_ptr + R + offs_m, mask=m_mask, other=1.0)
    npos = tl.load(stats_ptr + 2 * R + offs_m, mask=m_mask, other=0.0)
    g = tl.load(g_ptr + offs_m, mask=m_mask, other=0.0)
    g = tl.where(npos > 0, g, 0.0)  # a row without positives has no gradient
    return m_i, inv_den, 1.0 / tl.maximum(npos, 1.0), g


@triton.jit
def _row_slices(ptr, stride, offs, mask, offs_v, v_mask):
    """The D slice ``offs_v`` of rows ``offs`` (unit inner stride), (rows, BLOCK_DV) in fp32."""
    rows = ptr + offs.to(tl.int64)[:, None] * stride
    return tl.load(rows + offs_v[None, :], mask=mask[:, None] & v_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_row_slices(out_ptr, D, offs, mask, offs_v, v_mask, value):
    """Writes ``value`` (rows, BLOCK_DV) to the D slice ``offs_v`` of rows ``offs`` of a (rows, D) output."""
    out = offs.to(tl.int64)[:, None] * D + offs_v[None, :]
    tl.store(out_ptr + out, value, mask=mask[:, None] & v_mask[None, :])


@triton.jit
def _supcon_bwd_anchors_kernel(
    a_ptr,
    stride_a,
    la_ptr,
    k_ptr,
    stride_k,
    lk_ptr,
    scale_ptr,
    stats_ptr,
    g_ptr,
    grad_a_ptr,
    grad_s_ptr,
    R,
    N,
    D,
    EXCLUDE_SELF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < R
    pid_v = tl.program_id(1)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_mask = offs_v < D
    s = tl.load(scale_ptr)
    la = tl.load(la_ptr + offs_m, mask=m_mask, other=-1)
    m_i, inv_den, inv_np, g = _load_row_state(stats_ptr, g_ptr, offs_m, m_mask, R)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    gs = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        lk = tl.load(lk_ptr + offs_n, mask=n_mask, other=-1)
        dots = _dots(a_ptr, stride_a, offs_m, m_mask, k_ptr, stride_k, offs_n, n_mask, D, BLOCK_M, BLOCK_N, BLOCK_DK)
        G = _coefficients(dots, s, offs_m, m_mask, offs_n, n_mask, la, lk, m_i, inv_den, inv_np, g, EXCLUDE_SELF)
        gs += tl.sum(G * dots, axis=1)
        v = _row_slices(k_ptr, stride_k, offs_n, n_mask, offs_v, v_mask)
        acc = tl.dot(G, v, acc, input_precision="ieee")
    _store_row_slices(grad_a_ptr, D, offs_m, m_mask, offs_v, v_mask, s * acc)
    tl.store(grad_s_ptr + offs_m, gs, mask=m_mask & (pid_v == 0))


@triton.jit
def _supcon_bwd_keys_kernel(
    a_ptr,
    stride_a,
    la_ptr,
    k_ptr,
    stride_k,
    lk_ptr,
    scale_ptr,
    stats_ptr,
    g_ptr,
    grad_k_ptr,
    R,
    N,
    D,
    EXCLUDE_SELF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_v = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_mask = offs_v < D
    s = tl.load(scale_ptr)
    lk = tl.load(lk_ptr + offs_n, mask=n_mask, other=-1)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for m0 in range(0, R, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < R
        la = tl.load(la_ptr + offs_m, mask=m_mask, other=-1)
        m_i, inv_den, inv_np, g = _load_row_state(stats_ptr, g_ptr, offs_m, m_mask, R)
        dots = _dots(a_ptr, stride_a, offs_m, m_mask, k_ptr, stride_k, offs_n, n_mask, D, BLOCK_M, BLOCK_N, BLOCK_DK)
        G = _coefficients(dots, s, offs_m, m_mask, offs_n, n_mask, la, lk, m_i, inv_den, inv_np, g, EXCLUDE_SELF)
        a = _row_slices(a_ptr, stride_a, offs_m, m_mask, offs_v, v_mask)
        acc = tl.dot(tl.trans(G), a, acc, input_precision="ieee")
    _store_row_slices(grad_k_ptr, D, offs_n, n_mask, offs_v, v_mask, s * acc)


def _block(n, limit):
    return max(MIN_DOT, min(limit, triton.next_power_of_2(n)))


def _check(anchors, labels, keys, key_labels):
    """The shape checks that keep every access in bounds (values are validated upstream)."""
    check_kernel_dtype("anchors", anchors)
    check_kernel_dtype("keys", keys)
    R, D = anchors.shape
    if keys.dim() != 2 or keys.shape[1] != D:
        raise ValueError(f"keys must be (N, D) with D = {D}, got shape {tuple(keys.shape)}")
    if anchors.stride(1) != 1 or keys.stride(1) != 1:
        raise ValueError("anchors and keys rows must be contiguous (stride(1) == 1)")
    for name, lab, n in (("labels", labels, R), ("key_labels", key_labels, keys.shape[0])):
        if lab.dtype != torch.int64 or lab.shape != (n,):
            raise ValueError(f"{name} must be int64 of shape ({n},), got {lab.dtype} {tuple(lab.shape)}")
    return labels.contiguous(), key_labels.contiguous()


def supcon_contrast(anchors, labels, keys, key_labels, logit_scale, eps, exclude_self):
    """Same arguments and outputs as the C++ op ``dcdkernels_C::supcon_contrast``:
    ``(loss (R,), stats (3, R))`` fp32."""
    labels, key_labels = _check(anchors, labels, keys, key_labels)
    R, D = anchors.shape
    N = keys.shape[0]
    f32 = dict(dtype=torch.float32, device=anchors.device)
    loss, stats = torch.empty((R,), **f32), torch.empty((3, R), **f32)
    block_m = _block(R, MAX_BLOCK_M)
    with device_guard(anchors):
        _supcon_fwd_kernel[(triton.cdiv(R, block_m),)](
            anchors,
            anchors.stride(0),
            labels,
            keys,
            keys.stride(0),
            key_labels,
            scalar_arg(logit_scale, anchors.device),
            loss,
            stats,
            R,
            N,
            D,
            float(eps),
            EXCLUDE_SELF=bool(exclude_self),
            BLOCK_M=block_m,
            BLOCK_N=_block(N, MAX_BLOCK_N),
            BLOCK_DK=_block(D, MAX_BLOCK_DK),
            num_warps=NUM_WARPS,
        )
    return loss, stats


def supcon_contrast_backward(anchors, labels, keys, key_labels, logit_scale, stats, grad_rows, exclude_self, keys_grad):
    """Same arguments and outputs as the C++ op ``dcdkernels_C::supcon_contrast_backward``:
    ``(grad_anchors (R, D), grad_keys (N, D) or (0,), grad_scale ())`` fp32."""
    labels, key_labels = _check(anchors, labels, keys, key_labels)
    R, D = anchors.shape
    N = keys.shape[0]
    if stats.shape != (3, R) or grad_rows.shape != (R,):
        raise ValueError(f"stats must be (3, {R}) and grad_rows ({R},)")
    device = anchors.device
    f32 = dict(dtype=torch.float32, device=device)
    stats = stats.to(torch.float32).contiguous()
    g = grad_rows.to(torch.float32).contiguous()
    s = scalar_arg(logit_scale, device)
    grad_a = torch.empty((R, D), **f32)
    grad_s_rows = torch.empty((R,), **f32)
    grad_k = torch.empty((N, D) if keys_grad else (0,), **f32)
    block_m, block_n, block_dv = _block(R, MAX_BLOCK_M), _block(N, MAX_BLOCK_N), _block(D, MAX_BLOCK_DV)
    common = (anchors, anchors.stride(0), labels, keys, keys.stride(0), key_labels, s, stats, g)
    tiles = dict(
        EXCLUDE_SELF=bool(exclude_self),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DK=_block(D, MAX_BLOCK_DK),
        BLOCK_DV=block_dv,
        num_warps=NUM_WARPS,
    )
    with device_guard(anchors):
        _supcon_bwd_anchors_kernel[(triton.cdiv(R, block_m), triton.cdiv(D, block_dv))](
            *common, grad_a, grad_s_rows, R, N, D, **tiles
        )
        if keys_grad:
            _supcon_bwd_keys_kernel[(triton.cdiv(N, block_n), triton.cdiv(D, block_dv))](
                *common, grad_k, R, N, D, **tiles
            )
    return grad_a, grad_k, grad_s_rows.sum()
