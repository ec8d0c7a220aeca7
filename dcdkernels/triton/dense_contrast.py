"""Triton ``dense_contrast`` and ``dense_contrast_backward_keys`` (docs/math.md §2, contract in
csrc/KERNELS.md): anchors q (B, D) against a dense key set (M, D) with InfoNCE, flash-attention
style. The (B, M) logits are never written.

Forward, grid (B / BLOCK_M, D / BLOCK_DV, splits): a program owns BLOCK_M anchors, one BLOCK_DV
slice of their gradient and one split of the keys. It walks its keys BLOCK_N at a time: the logits tile
``s * Q K^T + beta`` (tl.dot, accumulated over D in BLOCK_DK steps) feeds an online softmax
that keeps the positive apart (as the CPU kernel, csrc/cpu/dense_contrast.cpp): the running
max ``m`` starts at the positive logit ``l+`` and the sums run over the other columns only,
``lo = sum e^(l - m)``, ``c = sum e^(l - m) d`` and ``acc += P @ K[:, slice]``, rescaled like the
output of flash attention. At the end, with ``w+ = e^(l+ - m)``, ``l = w+ + lo`` and
``1 - p+ = lo / l``: ``loss = (m - l+) + log1p((w+ - 1) + lo)``,
``grad_anchor = s (acc / l - (1 - p+) k_pos)``, ``dL/ds = c / l - (1 - p+) d_pos``,
``dL/dbeta = 0``: nothing cancels when the positive dominates (p+ -> 1), where the textbook
``LSE - l+`` and ``p+ - 1`` lose about ulp(LSE). When the anchor blocks alone cannot fill the GPU
(B = 64: 4 programs for 132 SMs) the keys are split (flash-decoding): each split, its max
started at ``l+`` too, writes its state (m, lo, c, acc), and a second launch of the same kernel
(MERGE) combines the splits in order and writes the outputs. With D <= BLOCK_DV (D <= 128)
there is one slice; a wider D costs one recomputation of the logits per slice, which keeps the
accumulator (BLOCK_M, BLOCK_DV) in registers for any D.

Backward for the keys, grid (M / BLOCK_N, D / BLOCK_DV): a program owns BLOCK_N keys and walks
the anchors BLOCK_M at a time, recomputes ``p = e^(l - lse)`` from the forward's LSE and
accumulates ``(g P)^T @ Q`` with tl.dot, the target column left out of P. The target term
``-s g (1 - p+) q`` follows, ``1 - p+`` summed over the other columns (each program writes its
keys' share), from a second small kernel over the stably sorted targets (no atomics). The
forward and the backward build their logits tiles with the same ``qk_tile`` (``_common.py``),
the backward with the roles of anchors and keys swapped; the forward's online softmax is
``online_softmax_step``.

``dense_contrast_reduced`` composes the two: the forward kernel with gradients, then the keys
kernel with ``grad_rows`` = the row weights, both in the forward pass.

Dot products run in the inputs' dtype when anchors and keys share a 16-bit dtype on a GPU
(fp32 accumulation; P is rounded to that dtype for ``P @ K`` as in flash attention), in full
fp32 ("ieee", not TF32) otherwise. The interpreter always uses fp32. In the keys' backward with
fp16, ``g (P - onehot)`` is scaled per key by a power of two before it is rounded to fp16 (and
the product scaled back in fp32): unscaled, ``g p`` underflows fp16 at B = 256, p < 1.5e-5.
"""

import torch
import triton
import triton.language as tl

from ._common import (
    MAXNREG,
    check_kernel_dtype,
    device_guard,
    load_scale_bias,
    online_softmax_step,
    qk_tile,
    scalar_arg,
    sm_count,
)

MAX_BLOCK_M = 64
MAX_BLOCK_N = 64
MAX_BLOCK_DK = 32  # 64 spills registers in the fp32 (FMA) dot path
MAX_BLOCK_DV = 128
MIN_DOT = 16  # tl.dot needs every block dimension >= 16
MIN_TILES_PER_SPLIT = 4  # key tiles per split of the forward: the partials stay < 2% of the key reads


@triton.jit
def _rowwise_dot(a_rows, stride_a, b_rows, stride_b, mask, D, BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr):
    """``<a_i, b_i>`` in fp32 for BLOCK_M row pairs (row pointers ``a_rows``, ``b_rows``)."""
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_DK):
        kd = k0 + tl.arange(0, BLOCK_DK)
        kd_mask = mask[:, None] & (kd < D)[None, :]
        a = tl.load(a_rows + kd[None, :] * stride_a, mask=kd_mask, other=0.0).to(tl.float32)
        b = tl.load(b_rows + kd[None, :] * stride_b, mask=kd_mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    return acc


@triton.jit
def _log1p(x):
    """``log(1 + x)`` for x > -1, to fp32's precision for tiny x too (tl has no log1p). With
    u = fl(1 + x), ``log(u) x / (u - 1)`` corrects the rounding of 1 + x (Goldberg 1991); x itself
    once u rounds to 1. For |x| < 1/4, where log(u) is near 0, log(u) comes from the series of
    2 atanh(z), z = (u - 1) / (u + 1), so its accuracy does not rest on that of tl.log near 1."""
    u = 1.0 + x
    d = u - 1.0
    z = d / (u + 1.0)
    z2 = z * z
    series = 2.0 * z * (1.0 + z2 * (1.0 / 3.0 + z2 * (1.0 / 5.0 + z2 * (1.0 / 7.0 + z2 * (1.0 / 9.0 + z2 / 11.0)))))
    log_u = tl.where(tl.abs(d) < 0.25, series, tl.log(u))
    return tl.where(d == 0.0, x, log_u * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _dense_contrast_fwd_kernel(
    anchor_ptr,
    stride_ab,
    stride_ad,
    keys_ptr,
    stride_kn,
    stride_kd,
    target_ptr,
    positive_ptr,
    stride_pb,
    stride_pd,
    scale_ptr,
    bias_ptr,
    loss_ptr,
    lse_ptr,
    grad_anchor_ptr,
    grad_positive_ptr,
    grad_scalars_ptr,
    part_stats_ptr,
    part_acc_ptr,
    B,
    M,
    D,
    keys_per_split,
    num_splits,
    HAS_POSITIVE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    SPLIT: tl.constexpr,
    MERGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """The forward, in one of three roles: the whole key set (neither flag), one key split whose
    softmax state goes to the partials (SPLIT), or the merge of the splits' partials (MERGE,
    grid (B / BLOCK_M, D / BLOCK_DV), flash-decoding): m = max(l+, max_s m_s), w_s = e^(m_s - m),
    lo = sum w_s lo_s, c = sum w_s c_s, acc = sum w_s acc_s, in split order (deterministic)."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid_s = tl.program_id(2)  # key split (SPLIT): keys [pid_s * keys_per_split, ..)
    first = pid_v == 0  # the program that writes the per-row scalars
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < B
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_mask = offs_v < D
    mv_mask = m_mask[:, None] & v_mask[None, :]
    s, beta = load_scale_bias(scale_ptr, bias_ptr, HAS_BIAS)
    anchor_rows = anchor_ptr + offs_m.to(tl.int64)[:, None] * stride_ab
    # The positive column of each anchor: its dot product d_pos (its row's D slice is read at the
    # end). MoCo (HAS_POSITIVE): a separate row per anchor; else key target_b (out of range: d = 0).
    if HAS_POSITIVE:
        pos_rows = positive_ptr + offs_m.to(tl.int64)[:, None] * stride_pb
        pos_valid = m_mask
        stride_pos = stride_pd
    else:
        target = tl.load(target_ptr + offs_m, mask=m_mask, other=-1)
        pos_valid = m_mask & (target >= 0) & (target < M)
        pos_rows = keys_ptr + target.to(tl.int64)[:, None] * stride_kn
        stride_pos = stride_kd
    d_pos = _rowwise_dot(anchor_rows, stride_ad, pos_rows, stride_pos, pos_valid, D, BLOCK_M, BLOCK_DK)
    l_pos = s * d_pos + beta

    # The softmax state keeps the positive apart (docs/math.md §2, csrc/KERNELS.md): the running max m starts at
    # l+ (so m >= l+ throughout) and the sums run over the OTHER columns only,
    # lo = sum e^(l_j - m), c = sum e^(l_j - m) d_j, acc = sum e^(l_j - m) k_j[slice].
    m_i = l_pos
    lo_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if MERGE:
        # The splits' states, merged in split order; each started at the same m = l+.
        for split in range(0, num_splits):
            stats = part_stats_ptr + split * 3 * B + offs_m
            m_s = tl.load(stats, mask=m_mask, other=0.0)
            m_new = tl.maximum(m_i, m_s)
            alpha = tl.exp(m_i - m_new)
            w = tl.exp(m_s - m_new)
            lo_i = lo_i * alpha + w * tl.load(stats + B, mask=m_mask, other=0.0)
            if COMPUTE_GRAD:
                c_i = c_i * alpha + w * tl.load(stats + 2 * B, mask=m_mask, other=0.0)
                part = tl.load(
                    part_acc_ptr + (split * B + offs_m.to(tl.int64))[:, None] * D + offs_v[None, :],
                    mask=mv_mask,
                    other=0.0,
                )
                acc = acc * alpha[:, None] + w[:, None] * part
            m_i = m_new
    else:
        n_lo = pid_s * keys_per_split
        n_hi = tl.minimum(M, n_lo + keys_per_split)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_hi
            key_rows = keys_ptr + offs_n.to(tl.int64) * stride_kn
            dots = qk_tile(
                anchor_rows, stride_ad, m_mask, key_rows, stride_kd, n_mask, D, DOT_DTYPE, BLOCK_M, BLOCK_N, BLOCK_DK
            )
            others = n_mask[None, :]
            if not HAS_POSITIVE:
                others = others & (offs_n[None, :] != target[:, None])  # key target_b is l+, kept apart
            m_new, alpha, p = online_softmax_step(m_i, s * dots + beta, others, ROWS=True)
            lo_i = lo_i * alpha + tl.sum(p, axis=1)
            if COMPUTE_GRAD:
                c_i = c_i * alpha + tl.sum(p * dots, axis=1)
                v = tl.load(
                    key_rows[:, None] + offs_v[None, :] * stride_kd, mask=n_mask[:, None] & v_mask[None, :], other=0.0
                )
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision="ieee")
            m_i = m_new

    if SPLIT:
        # Partials for the MERGE launch: stats (splits, 3, B) = m, lo, c; acc (splits, B, D).
        stats = part_stats_ptr + pid_s.to(tl.int64) * 3 * B + offs_m
        tl.store(stats, m_i, mask=m_mask & first)
        tl.store(stats + B, lo_i, mask=m_mask & first)
        if COMPUTE_GRAD:
            tl.store(stats + 2 * B, c_i, mask=m_mask & first)
            out = (pid_s.to(tl.int64) * B + offs_m.to(tl.int64))[:, None] * D + offs_v[None, :]
            tl.store(part_acc_ptr + out, acc, mask=mv_mask)
    else:
        # With w+ = e^(l+ - m) <= 1 and l = w+ + lo: loss = (m - l+) + log l, where
        # log l = log1p((w+ - 1) + lo) keeps every digit when the positive is the max (w+ = 1),
        # and 1 - p+ = lo / l. Nothing cancels as p+ -> 1, where LSE - l+ would lose ~ulp(LSE).
        w_pos = tl.exp(l_pos - m_i)
        l_i = w_pos + lo_i
        log_l = _log1p((w_pos - 1.0) + lo_i)
        tl.store(loss_ptr + offs_m, (m_i - l_pos) + log_l, mask=m_mask & first)
        tl.store(lse_ptr + offs_m, m_i + log_l, mask=m_mask & first)
        if COMPUTE_GRAD:
            # The positive's coefficient p+ - 1 = -(1 - p+) = -lo / l:
            # dL/ds = c / l - (lo / l) d+, grad_q = s (acc / l - (lo / l) k+), dL/dk+ = -s (lo / l) q.
            others = lo_i / l_i
            tl.store(grad_scalars_ptr + offs_m, c_i / l_i - others * d_pos, mask=m_mask & first)
            tl.store(grad_scalars_ptr + B + offs_m, tl.zeros([BLOCK_M], dtype=tl.float32), mask=m_mask & first)
            out = offs_m.to(tl.int64)[:, None] * D + offs_v[None, :]
            pos_slice = tl.load(
                pos_rows + offs_v[None, :] * stride_pos, mask=pos_valid[:, None] & v_mask[None, :], other=0.0
            ).to(tl.float32)
            grad_anchor = s * (acc / l_i[:, None] - others[:, None] * pos_slice)
            tl.store(grad_anchor_ptr + out, grad_anchor, mask=mv_mask)
            if HAS_POSITIVE:
                q_slice = tl.load(anchor_rows + offs_v[None, :] * stride_ad, mask=mv_mask, other=0.0).to(tl.float32)
                tl.store(grad_positive_ptr + out, (-s * others)[:, None] * q_slice, mask=mv_mask)


@triton.jit
def _dense_contrast_bwd_keys_kernel(
    anchor_ptr,
    stride_ab,
    stride_ad,
    keys_ptr,
    stride_kn,
    stride_kd,
    target_ptr,
    scale_ptr,
    bias_ptr,
    lse_ptr,
    grad_rows_ptr,
    grad_keys_ptr,
    others_ptr,
    B,
    M,
    D,
    HAS_TARGET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """``grad_keys = s (G^T Q)`` over this program's keys, ``G = g P``. With a target the target
    column is left out of G (p_bt = 0 here) and the program writes its keys' share of each row's
    1 - p+ = sum_{j != t_b} p_bj to ``others`` (key blocks, B); the launcher adds the target term
    -s g_b (1 - p+_b) q_b from their sum. Summed over the other columns, 1 - p+ keeps its digits
    when p+ -> 1, where p+ - 1 from the saved fp32 LSE would be off by ~ulp(LSE)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_mask = offs_v < D
    s, beta = load_scale_bias(scale_ptr, bias_ptr, HAS_BIAS)
    key_rows = keys_ptr + offs_n.to(tl.int64)[:, None] * stride_kn

    # acc = sum_b G[b, n] q_b for this program's keys.
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < B
        anchor_rows = anchor_ptr + offs_m.to(tl.int64) * stride_ab
        # dots^T = K Q^T, the forward's tile with the roles of keys and anchors swapped.
        dots_t = qk_tile(
            key_rows, stride_kd, n_mask, anchor_rows, stride_ad, m_mask, D, DOT_DTYPE, BLOCK_N, BLOCK_M, BLOCK_DK
        )
        # Rows past B get g = 0 (and lse = 0 keeps their p finite).
        lse = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0)
        g = tl.load(grad_rows_ptr + offs_m, mask=m_mask, other=0.0)
        p_t = tl.exp(s * dots_t + beta - lse[None, :])
        if HAS_TARGET:
            target = tl.load(target_ptr + offs_m, mask=m_mask, other=-1)
            p_t = tl.where(n_mask[:, None] & (offs_n[:, None] != target[None, :]), p_t, 0.0)
            others = others_ptr + pid_n.to(tl.int64) * B + offs_m
            tl.store(others, tl.sum(p_t, axis=0), mask=m_mask & (pid_v == 0))
        grad_t = g[None, :] * p_t
        q = tl.load(
            anchor_rows[:, None] + offs_v[None, :] * stride_ad, mask=m_mask[:, None] & v_mask[None, :], other=0.0
        )
        if DOT_DTYPE == tl.float16:
            # fp16 has no range for g p (1/B times a probability near 1/M underflows: B = 256,
            # M = 65,536 gives 6e-8, fp16's smallest subnormal). Each key's row of G is scaled by
            # a power of two that brings its largest entry of this tile to [2^14, 2^15) before the
            # rounding, and the fp32 product is scaled back: every entry within 2^-28 of its
            # row's largest stays a normal fp16 number.
            row_max = tl.max(tl.abs(grad_t), axis=1)
            up = tl.exp2(14.0 - tl.floor(tl.log2(tl.where(row_max > 0, row_max, 1.0))))
            part = tl.dot((grad_t * up[:, None]).to(DOT_DTYPE), q.to(DOT_DTYPE), input_precision="ieee")
            acc += part / up[:, None]
        else:
            acc = tl.dot(grad_t.to(DOT_DTYPE), q.to(DOT_DTYPE), acc, input_precision="ieee")

    out = offs_n.to(tl.int64)[:, None] * D + offs_v[None, :]
    tl.store(grad_keys_ptr + out, s * acc, mask=n_mask[:, None] & v_mask[None, :])


@triton.jit
def _dense_contrast_target_term_kernel(
    grad_keys_ptr,
    anchor_ptr,
    stride_ab,
    stride_ad,
    sorted_target_ptr,
    order_ptr,
    coef_ptr,
    B,
    M,
    D,
    BLOCK_DV: tl.constexpr,
):
    """``grad_keys[t] += sum_{b: target_b = t} coef_b q_b`` without atomics, grid (B, D / BLOCK_DV)
    over the stably sorted targets: the program at the head of a run of equal targets sums the
    run's rows in order and writes key t's slice; the others write nothing. A target outside
    [0, M) (possible when value checks are deferred) has no key: its run writes nothing, as the
    other dense kernels skip it."""
    i = tl.program_id(0)
    offs_v = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_mask = offs_v < D
    t = tl.load(sorted_target_ptr + i)
    first = (i == 0) | (tl.load(sorted_target_ptr + i - 1, mask=i > 0, other=-1) != t)
    head = first & (t >= 0) & (t < M)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    j = i
    in_run = head
    while in_run:
        b = tl.load(order_ptr + j)
        q = tl.load(anchor_ptr + b * stride_ab + offs_v * stride_ad, mask=v_mask, other=0.0).to(tl.float32)
        acc += tl.load(coef_ptr + b) * q
        j += 1
        in_run = tl.load(sorted_target_ptr + j, mask=j < B, other=-1) == t  # t >= 0 in a run
    out = grad_keys_ptr + t * D + offs_v
    tl.store(out, tl.load(out, mask=v_mask & head, other=0.0) + acc, mask=v_mask & head)


def _dot_dtype(anchor, keys, on_gpu=None):
    """tl dtype of the dot operands: the shared 16-bit dtype on a GPU, else fp32 (``on_gpu``
    defaults to ``anchor.is_cuda``; the tests force the GPU choice under the interpreter)."""
    if on_gpu is None:
        on_gpu = anchor.is_cuda
    if on_gpu and anchor.dtype == keys.dtype and anchor.dtype in (torch.bfloat16, torch.float16):
        return tl.bfloat16 if anchor.dtype == torch.bfloat16 else tl.float16
    return tl.float32


def _with_strides(*matrices):
    """Each (rows, D) tensor followed by its two strides, as the kernels take them."""
    return tuple(x for t in matrices for x in (t, t.stride(0), t.stride(1)))


def _tiles(dot_dtype, block_m, block_n, D, block_dv, num_warps):
    """The launch constants the dense kernels share: dot dtype, tile sizes and warps. The fp32
    (FMA) dot path also takes ``maxnreg``: without it ptxas capped a few of its configurations at
    an occupancy step (64, 80 or 128 registers) and spilled 1-2 registers (the AOT sweep)."""
    return dict(
        DOT_DTYPE=dot_dtype,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DK=_block(D, MAX_BLOCK_DK),
        BLOCK_DV=block_dv,
        num_warps=num_warps,
        **({"maxnreg": MAXNREG} if dot_dtype == tl.float32 else {}),
    )


def _block(n, limit):
    return max(MIN_DOT, min(limit, triton.next_power_of_2(n)))


def _num_warps(rows, cols):
    """8 warps from an fp32 accumulator tile (rows, cols) of 8192 elements on (64 registers per
    thread at 4 warps): with 4, the forward kernel spills at 64 x 128 (checked with ptxas, sm_90)."""
    return 8 if rows * cols >= 8192 else 4


def _fp32_dot_tiles(block, num_warps):
    """Tiles of the full-fp32 (FMA, not tensor-core) dot path at BLOCK_DV >= 64 (and the keys backward's
    fp32 dot at any D): at most 32 rows per step and 8 warps. The AOT sweep
    (``python -m benchmarks.static_resources``) found spills there otherwise: the forward at 16 x 64
    x 128 with 4 warps (46 spill stores) and at 32 x 64 x 128 with 8 (44), the keys backward with
    mixed fp32/bf16 inputs at 64 x 64 x 128 (up to 43 on sm_80); 32 x 32 x 128 at 8 warps takes 128
    registers and no stack."""
    return min(block, 32), 8


def _check(anchor, keys, target, positive):
    """The shape checks that keep every access in bounds (values are validated upstream).
    Returns ``target`` contiguous (the kernels read it with stride 1)."""
    check_kernel_dtype("anchor", anchor)
    check_kernel_dtype("keys", keys)
    if keys.dim() != 2 or keys.shape[1] != anchor.shape[1]:
        raise ValueError(f"keys must be (M, D) with D = {anchor.shape[1]}, got shape {tuple(keys.shape)}")
    if (target is None) == (positive is None):
        raise ValueError("dense_contrast: give exactly one of target (B,) and positive (B, D)")
    if target is not None and (target.dtype != torch.int64 or target.shape != anchor.shape[:1]):
        raise ValueError(
            f"target must be int64 of shape (B,) = ({anchor.shape[0]},), got {target.dtype} {tuple(target.shape)}"
        )
    if positive is not None:
        check_kernel_dtype("positive", positive)
        if positive.shape != anchor.shape:
            raise ValueError(f"positive must be (B, D) = {tuple(anchor.shape)}, got {tuple(positive.shape)}")
    return None if target is None else target.contiguous()


def plan_key_splits(programs, M, block_n, sms, num_splits=None):
    """Split of the M keys (flash-decoding): on a GPU with ``sms`` SMs, enough splits that
    ``programs * splits`` reaches 2 programs per SM, each split at least MIN_TILES_PER_SPLIT key
    tiles; one split under the interpreter. ``num_splits`` forces a count (tests). Returns
    ``(splits, keys_per_split)``, every split non-empty."""
    tiles = triton.cdiv(M, block_n)
    if num_splits is None:
        num_splits = 1 if sms is None else min(triton.cdiv(2 * sms, programs), triton.cdiv(tiles, MIN_TILES_PER_SPLIT))
    num_splits = max(1, min(int(num_splits), tiles))
    per_split = triton.cdiv(tiles, num_splits) * block_n
    return triton.cdiv(M, per_split), per_split


def dense_contrast(anchor, keys, target, positive, logit_scale, bias, compute_grad, *, num_splits=None):
    """Same arguments and outputs as the C++ op ``dcdkernels_C::dense_contrast``:
    ``(loss (B,), lse (B,), grad_anchor (B, D), grad_positive (B, D), grad_scalars (2, B))``, fp32;
    the gradients are (0,) when not ``compute_grad``, grad_positive also without ``positive``.
    ``num_splits`` forces the number of key splits (tests, tuning; default: :func:`plan_key_splits`)."""
    target = _check(anchor, keys, target, positive)
    B, D = anchor.shape
    M = keys.shape[0]
    device = anchor.device
    f32 = dict(dtype=torch.float32, device=device)
    logit_scale, bias = scalar_arg(logit_scale, device), scalar_arg(bias, device)
    loss = torch.empty((B,), **f32)
    lse = torch.empty((B,), **f32)
    grad_anchor = torch.empty((B, D) if compute_grad else (0,), **f32)
    grad_positive = torch.empty((B, D) if compute_grad and positive is not None else (0,), **f32)
    grad_scalars = torch.empty((2, B) if compute_grad else (0,), **f32)

    block_dv = _block(D, MAX_BLOCK_DV)
    slices = triton.cdiv(D, block_dv) if compute_grad else 1
    # Smaller anchor blocks when few programs would leave most SMs idle.
    block_m = _block(B, MAX_BLOCK_M)
    block_n = _block(M, MAX_BLOCK_N)
    if anchor.is_cuda:
        while block_m > MIN_DOT and triton.cdiv(B, block_m) * slices < sm_count(device):
            block_m //= 2
    dot_dtype = _dot_dtype(anchor, keys)
    num_warps = _num_warps(block_m, block_dv)
    if block_dv >= 64:
        # 32 keys per step: with 64, triton 3.6 spills the 16-bit forward at 16 x 64 x 128 with
        # 4 warps (58 spill stores, sm_90); the fp32 path spills more (below).
        block_n = min(block_n, 32)
    if dot_dtype == tl.float32 and block_dv >= 64:
        block_m, num_warps = _fp32_dot_tiles(block_m, num_warps)
    splits, keys_per_split = plan_key_splits(
        triton.cdiv(B, block_m) * slices, M, block_n, sm_count(device) if anchor.is_cuda else None, num_splits
    )
    split = splits > 1
    part_stats = torch.empty((splits, 3, B) if split else (0,), **f32)
    part_acc = torch.empty((splits, B, D) if split and compute_grad else (0,), **f32)
    has_positive = positive is not None
    args = (
        *_with_strides(anchor, keys),
        anchor if has_positive else target,
        positive if has_positive else anchor,
        positive.stride(0) if has_positive else 0,
        positive.stride(1) if has_positive else 0,
        logit_scale,
        logit_scale if bias is None else bias,
        loss,
        lse,
        grad_anchor,
        grad_positive,
        grad_scalars,
        part_stats,
        part_acc,
        B,
        M,
        D,
        keys_per_split,
        splits,
    )
    flags = dict(HAS_POSITIVE=has_positive, HAS_BIAS=bias is not None, COMPUTE_GRAD=bool(compute_grad))
    tiles = _tiles(dot_dtype, block_m, block_n, D, block_dv, num_warps)
    with device_guard(anchor):
        grid = (triton.cdiv(B, block_m), slices)
        _dense_contrast_fwd_kernel[grid + (splits,)](*args, SPLIT=split, MERGE=False, **flags, **tiles)
        if split:
            _dense_contrast_fwd_kernel[grid](*args, SPLIT=False, MERGE=True, **flags, **tiles)
    return loss, lse, grad_anchor, grad_positive, grad_scalars


def dense_contrast_backward_keys(anchor, keys, target, positive, logit_scale, bias, lse, grad_rows):
    """Same arguments and output as the C++ op ``dcdkernels_C::dense_contrast_backward_keys``:
    ``grad_keys (M, D)`` fp32, ``s * sum_b g_b (p_bj - [target_b == j]) q_b`` (no target term
    with ``positive``; ``grad_rows`` = grad_output * weight). The target column's
    p+ - 1 = -(1 - p+) is summed over the other columns (see the kernel)."""
    target = _check(anchor, keys, target, positive)
    B, D = anchor.shape
    M = keys.shape[0]
    if lse.shape != (B,) or grad_rows.shape != (B,):
        raise ValueError(f"lse and grad_rows must be ({B},), got {tuple(lse.shape)} and {tuple(grad_rows.shape)}")
    device = anchor.device
    logit_scale, bias = scalar_arg(logit_scale, device), scalar_arg(bias, device)
    lse = lse.to(torch.float32).contiguous()
    grad_rows = grad_rows.to(torch.float32).contiguous()
    grad_keys = torch.empty((M, D), dtype=torch.float32, device=device)
    block_n = _block(M, MAX_BLOCK_N)
    block_dv = _block(D, MAX_BLOCK_DV)
    block_m = _block(B, MAX_BLOCK_M)
    num_warps = _num_warps(block_n, block_dv)
    dot_dtype = _dot_dtype(anchor, keys)
    if dot_dtype == tl.float32:  # at every D: all-fp32 16 x 64 x 16 with 4 warps spills (triton 3.8, sm_90)
        block_m, num_warps = _fp32_dot_tiles(block_m, num_warps)
        if target is not None:
            # With a target (the row sums of 1 - p+ too) 32 x 64 x 128 spills (~135 spill stores,
            # triton 3.6 and 3.8, sm_80 and sm_90; 5 at 32 x 64 x 64): 32 keys per program.
            block_n = min(block_n, 32)
    has_target = target is not None
    key_blocks = triton.cdiv(M, block_n)
    others = torch.empty((key_blocks, B) if has_target else (0,), dtype=torch.float32, device=device)
    with device_guard(anchor):
        _dense_contrast_bwd_keys_kernel[(key_blocks, triton.cdiv(D, block_dv))](
            *_with_strides(anchor, keys),
            target if has_target else lse,
            logit_scale,
            logit_scale if bias is None else bias,
            lse,
            grad_rows,
            grad_keys,
            others,
            B,
            M,
            D,
            HAS_TARGET=has_target,
            HAS_BIAS=bias is not None,
            **_tiles(dot_dtype, block_m, block_n, D, block_dv, num_warps),
        )
        if has_target and B > 0:
            # Target term -s g_b (1 - p+_b) q_b on key target_b, summed over duplicate targets in
            # a fixed order; the key blocks' shares of 1 - p+ are summed in block order.
            coef = -logit_scale * grad_rows * others.sum(dim=0)
            sorted_target, order = torch.sort(target, stable=True)
            _dense_contrast_target_term_kernel[(B, triton.cdiv(D, block_dv))](
                grad_keys,
                anchor,
                anchor.stride(0),
                anchor.stride(1),
                sorted_target,
                order,
                coef,
                B,
                M,
                D,
                BLOCK_DV=block_dv,
            )
    return grad_keys


def dense_contrast_reduced(anchor, keys, target, positive, logit_scale, bias, row_weight, keys_grad):
    """Same arguments and outputs as the C++ op ``dcdkernels_C::dense_contrast_reduced``:
    ``(loss (), rows (B,), lse (B,), grad_anchor (B, D), grad_positive, grad_keys, grad_scalars (2,))``
    of ``loss = sum_b c_b L_b``, ``c`` = ``row_weight``; grad_keys is (0,) when not ``keys_grad``."""
    rows, lse, grad_anchor, grad_positive, grad_scalars = dense_contrast(
        anchor, keys, target, positive, logit_scale, bias, True
    )
    c = row_weight.to(torch.float32)
    if keys_grad:
        grad_keys = dense_contrast_backward_keys(anchor, keys, target, positive, logit_scale, bias, lse, c)
    else:
        grad_keys = torch.empty((0,), dtype=torch.float32, device=anchor.device)
    if positive is not None:
        grad_positive.mul_(c[:, None])
    return (
        (rows * c).sum(),
        rows,
        lse,
        grad_anchor.mul_(c[:, None]),
        grad_positive,
        grad_keys,
        grad_scalars.mul_(c).sum(dim=1),
    )
