"""Pieces shared by the Triton kernels: the sampled-contrast kernels (one bank and dual bank)
and, for the dense and SupCon kernels, the logit scale and bias, the QK tile and the online softmax.

Device functions: the column -> bank row map (explicit index or in-kernel sampling), the tile of
dot products of two row blocks (tl.dot), one step of an online softmax, the per-column NCE terms,
the common starts of the partial and merge programs, one gathered tile folded into the online
state of a direction (anchor against rows), and the merge of per-chunk partials. Host helpers:
argument checks (the shape checks that keep every access in bounds), launch parameters, the
split of the K+1 columns into chunks (one program per (anchor, chunk); docs/math.md §1,
csrc/KERNELS.md) and the launch plan shared by the sampled launchers (SampledLaunch).
"""

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from .. import _ext
from .rng import rng_key, sample_index

NCE_EPS = 1e-7
# One program keeps a whole embedding (and D-long accumulators) in registers.
MAX_D = 4096
# Elements of one gathered (BLOCK_K, BLOCK_D) tile: 32 fp32 registers per thread at 4 warps.
TILE_ELEMENTS = 4096
MAX_BLOCK_K = 64
# A chunk holds at least this many tiles, so that splitting K never costs more than it hides.
MIN_TILES_PER_CHUNK = 4
# Programs per SM aimed at when splitting K on a GPU.
PROGRAMS_PER_SM = 4
MAX_CHUNKS = 1024
# Width of the D slice that one merge program writes.
MERGE_BLOCK_D = 256
# The launch option ``maxnreg`` (PTX ``.maxnreg``) of the dual kernels and of the dense kernels'
# fp32 dot path: without it ptxas may cap their registers at an occupancy step and spill (168 on
# sm_80 with triton 3.8 for the dual partial with fp32 banks, 40 for the dual merge with triton
# 3.6 on sm_90, 64-128 for a few dense fp32 configurations; the AOT sweep of
# ``python -m benchmarks.static_resources``); with it, no spill.
MAXNREG = 255
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------
@triton.jit
def column_rows(index_ptr, b, stride_ib, stride_ic, cols, COLS, N, key, offset, K, SAMPLED: tl.constexpr):
    """Bank rows (int64) of columns ``cols`` of anchor row ``b`` and a mask of the valid ones.

    Explicit index: ``index[b, cols]``. Sampled (``index`` holds the (B,) positives): column 0 is
    ``index[b]``, column k >= 1 is ``sample_index(key, offset, b, k, K, N)``. A column past the
    end or a row outside [0, N) is invalid: every load from it must be masked by the caller.
    """
    in_range = cols < COLS
    row_base = index_ptr + b.to(tl.int64) * stride_ib
    if SAMPLED:
        positive = tl.load(row_base)
        rows = tl.where(cols == 0, positive, sample_index(key, offset, b, cols, K, N))
    else:
        rows = tl.load(row_base + cols * stride_ic, mask=in_range, other=-1)
    valid = in_range & (rows >= 0) & (rows < N)
    return rows, valid


@triton.jit
def load_scale_bias(scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """The logit scale ``s`` and the bias ``beta`` (0 without ``HAS_BIAS``), read in the kernel."""
    s = tl.load(scale_ptr)
    beta = 0.0
    if HAS_BIAS:
        beta = tl.load(bias_ptr)
    return s, beta


@triton.jit
def qk_tile(
    a_rows,
    stride_ad,
    a_mask,
    b_rows,
    stride_bd,
    b_mask,
    D,
    DOT_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_DK: tl.constexpr,
):
    """The (BLOCK_A, BLOCK_B) fp32 tile of dot products ``<a_i, b_j>`` over the full D, BLOCK_DK
    at a time with tl.dot (operands in ``DOT_DTYPE``, "ieee": no TF32). ``a_rows`` are the row
    pointers as a (BLOCK_A, 1) column, ``b_rows`` a (BLOCK_B,) vector (loaded transposed,
    (BLOCK_DK, BLOCK_B)); masked rows read as zeros."""
    dots = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_DK):
        kd = k0 + tl.arange(0, BLOCK_DK)
        kd_mask = kd < D
        a = tl.load(a_rows + kd[None, :] * stride_ad, mask=a_mask[:, None] & kd_mask[None, :], other=0.0)
        bt = tl.load(b_rows[None, :] + kd[:, None] * stride_bd, mask=kd_mask[:, None] & b_mask[None, :], other=0.0)
        dots = tl.dot(a.to(DOT_DTYPE), bt.to(DOT_DTYPE), dots, input_precision="ieee")
    return dots


@triton.jit
def online_softmax_step(m, logits, valid, ROWS: tl.constexpr = False):
    """Folds a block of logits into a running max ``m``: a vector of columns of one row, or with
    ``ROWS`` a (rows, columns) tile with ``m`` the vector of the rows' maxima.

    Returns ``(m_new, alpha, w)``: ``alpha = exp(m - m_new)`` rescales every accumulator built so
    far, ``w = exp(logits - m_new)`` weighs the new columns (0 where not ``valid``). While no
    valid column has been seen ``m_new`` is -inf, and exp is taken against 0 instead so that
    (-inf) - (-inf) never produces a NaN.
    """
    masked = tl.where(valid, logits, float("-inf"))
    if ROWS:
        m_new = tl.maximum(m, tl.max(masked, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(masked - m_ref[:, None])
    else:
        m_new = tl.maximum(m, tl.max(masked, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(masked - m_ref)
    alpha = tl.exp(m - m_ref)
    return m_new, alpha, w


@triton.jit
def nce_column_terms(logits, cols, valid, log_z, log_c_eps, log1p_eps_c):
    """RepDistiller NCE per column (csrc/KERNELS.md): returns (loss_k, dL/dl_k), 0 where invalid.

    With v = l - log Z and LCE = log(c + eps): the positive (column 0) costs
    softplus(LCE - v) with slope -sigmoid(LCE - v); a negative costs
    logaddexp(LCE, v) - log c = softplus(v - LCE) + log1p(eps / c) with slope sigmoid(v - LCE).
    Both are evaluated in log space: nothing overflows whatever the logit scale.
    """
    v = logits - log_z
    x = tl.where(cols == 0, log_c_eps - v, v - log_c_eps)
    softplus = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
    sigmoid = 1.0 / (1.0 + tl.exp(-x))
    loss = tl.where(cols == 0, softplus, softplus + log1p_eps_c)
    slope = tl.where(cols == 0, -sigmoid, sigmoid)
    return tl.where(valid, loss, 0.0), tl.where(valid, slope, 0.0)


@triton.jit
def direction_init(BLOCK_D: tl.constexpr):
    """Empty online state of one direction (one anchor against gathered rows), the tuple
    ``(m, l, c, d0, a, nce_loss, nce_c, nce_slope, nce_a)`` that ``direction_step`` carries."""
    return (
        float("-inf"),
        0.0,
        0.0,
        0.0,
        tl.zeros([BLOCK_D], dtype=tl.float32),
        0.0,
        0.0,
        0.0,
        tl.zeros([BLOCK_D], dtype=tl.float32),
    )


@triton.jit
def direction_step(
    state,
    q,
    tile,
    s,
    beta,
    cols,
    valid,
    log_z,
    log_c_eps,
    log1p_eps_c,
    LOSS_TYPE: tl.constexpr,
    SOFTMAX_GRAD: tl.constexpr,
    NCE_GRAD: tl.constexpr,
):
    """Folds one gathered tile (BLOCK_K, BLOCK_D) of columns ``cols`` into the online state of one
    direction, anchor ``q`` against the rows of ``tile`` (logits ``s <q, row> + beta``):
    ``m`` running max, ``l = sum w``, ``d0`` the positive's dot, with SOFTMAX_GRAD ``c = sum w d``
    and ``a = sum w row`` (``w = e^(l - m)``, rescaled as ``m`` grows); for NCE (LOSS_TYPE 1)
    the plain sums ``nce_loss``, and with NCE_GRAD ``nce_c = sum g d``, ``nce_slope = sum g``,
    ``nce_a = sum g row`` (``g = dL/dl``). Returns the new state, then the tile's ``dots``,
    ``logits``, the rescale ``alpha`` and the weights ``w`` (the dual kernel's KL sums use them)."""
    m, l, c, d0, a, nce_loss, nce_c, nce_slope, nce_a = state
    dots = tl.sum(tile * q[None, :], axis=1)
    logits = s * dots + beta
    d0 += tl.sum(tl.where(cols == 0, dots, 0.0), axis=0)
    m_new, alpha, w = online_softmax_step(m, logits, valid)
    l = l * alpha + tl.sum(w, axis=0)
    if SOFTMAX_GRAD:
        c = c * alpha + tl.sum(w * dots, axis=0)
        a = a * alpha + tl.sum(w[:, None] * tile, axis=0)
    if LOSS_TYPE == 1:
        loss_k, slope = nce_column_terms(logits, cols, valid, log_z, log_c_eps, log1p_eps_c)
        nce_loss += tl.sum(loss_k, axis=0)
        if NCE_GRAD:
            nce_c += tl.sum(slope * dots, axis=0)
            nce_slope += tl.sum(slope, axis=0)
            nce_a += tl.sum(slope[:, None] * tile, axis=0)
    return (m_new, l, c, d0, a, nce_loss, nce_c, nce_slope, nce_a), dots, logits, alpha, w


@triton.jit
def partial_prologue(scale_ptr, bias_ptr, seed, D, COLS, cols_per_chunk, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Common start of a partial program, grid (B, chunks): anchor ``b``, chunk ``chunk``, the D
    offsets and mask, ``s``, ``beta``, the sampling key and the chunk's columns [col_start, col_end)."""
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    s, beta = load_scale_bias(scale_ptr, bias_ptr, HAS_BIAS)
    col_start = chunk * cols_per_chunk
    col_end = tl.minimum(col_start + cols_per_chunk, COLS)
    return b, chunk, offs_d, offs_d < D, s, beta, rng_key(seed), col_start, col_end


@triton.jit
def load_anchor(anchor_ptr, b, stride_ab, stride_ad, offs_d, d_mask):
    """Anchor row ``b`` (its ``offs_d`` slice) in fp32."""
    return tl.load(anchor_ptr + b.to(tl.int64) * stride_ab + offs_d * stride_ad, mask=d_mask, other=0.0).to(tl.float32)


@triton.jit
def gather_tile(bank_ptr, stride_bn, rows, offs_d, mask):
    """The (BLOCK_K, BLOCK_D) tile of bank rows ``rows`` in fp32; zeros where not ``mask``."""
    return tl.load(bank_ptr + rows[:, None] * stride_bn + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def merge_prologue(scale_ptr, bias_ptr, index_ptr, stride_ib, N, HAS_BIAS: tl.constexpr):
    """Common start of a merge program, grid (B, D slices): anchor ``b``, slice ``pid_d``, whether
    it writes the per-row scalars (slice 0), ``s``, ``beta``, the positive's bank row ``row0`` and
    whether it is present (an absent positive adds no -l_0 and no -row_0)."""
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    s, beta = load_scale_bias(scale_ptr, bias_ptr, HAS_BIAS)
    row0 = tl.load(index_ptr + b.to(tl.int64) * stride_ib)
    return b, pid_d, pid_d == 0, s, beta, row0, (row0 >= 0) & (row0 < N)


@triton.jit
def chunk_scales(stats_ptr, b, num_chunks, M_SLOT: tl.constexpr, NUM_STATS: tl.constexpr, BLOCK_C: tl.constexpr):
    """For the merge of anchor ``b``'s chunk partials (workspace ``stats`` (B, chunks, NUM_STATS)):
    returns the pointers to its chunks' statistics and their mask, the global max taken
    against (``m_ref``: 0 when every chunk is empty) and ``scale_c = e^(m_c - m_ref)``."""
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < num_chunks
    stats = stats_ptr + (b.to(tl.int64) * num_chunks + offs_c) * NUM_STATS
    m_c = tl.load(stats + M_SLOT, mask=c_mask, other=float("-inf"))
    m = tl.max(m_c, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return stats, c_mask, m_ref, tl.exp(m_c - m_ref)


@triton.jit
def merge_chunk_vectors(
    vec_ptr,
    stats_ptr,
    b,
    num_chunks,
    VEC: tl.constexpr,
    NUM_VECS: tl.constexpr,
    M_SLOT: tl.constexpr,
    NUM_STATS: tl.constexpr,
    m_ref,
    offs_d,
    d_mask,
    D,
    RESCALE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``sum_c w_c vec[b, c, VEC, offs_d]`` over the chunks of anchor ``b`` (workspace ``vec``
    (B, chunks, NUM_VECS, D)), with ``w_c = e^(stats[b, c, M_SLOT] - m_ref)`` for online-softmax
    partials (RESCALE) and ``w_c = 1`` for plain sums."""
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for chunk in range(0, num_chunks):
        slot = b.to(tl.int64) * num_chunks + chunk
        part = tl.load(vec_ptr + (slot * NUM_VECS + VEC) * D + offs_d, mask=d_mask, other=0.0)
        if RESCALE:
            part *= tl.exp(tl.load(stats_ptr + slot * NUM_STATS + M_SLOT) - m_ref)
        acc += part
    return acc


@triton.jit
def load_row_slice(bank_ptr, stride_bn, N, row, offs_d, d_mask):
    """Slice ``offs_d`` of bank row ``row`` in fp32; zeros if ``row`` is outside [0, N)."""
    row_valid = (row >= 0) & (row < N)
    return tl.load(bank_ptr + tl.where(row_valid, row, 0) * stride_bn + offs_d, mask=d_mask & row_valid, other=0.0).to(
        tl.float32
    )


# ----------------------------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------------------------
def device_guard(tensor):
    """Launch on ``tensor``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


# Under torch.use_deterministic_algorithms(True) grids are sized for this many SMs whatever the
# GPU, so the split of every reduction (and so every rounding) does not depend on the device. The
# CUDA kernels' constant (kDeterministicSms, csrc/common/constants.h), read from dcdkernels._C.
DETERMINISTIC_SMS = _ext.DETERMINISTIC_SMS


def sm_count(device):
    """Number of SMs that grids on the CUDA ``device`` are sized for (see DETERMINISTIC_SMS)."""
    if torch.are_deterministic_algorithms_enabled():
        return DETERMINISTIC_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def scalar_arg(tensor, device):
    """A 0-d fp32 tensor on ``device`` (logit_scale, bias, log_z are read inside the kernels)."""
    return None if tensor is None else tensor.detach().reshape(-1).to(device=device, dtype=torch.float32)


def check_kernel_dtype(name, tensor):
    if tensor.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name}: the Triton kernels take float32, bfloat16 or float16, got {tensor.dtype} "
            "(float64 runs on the 'cpu' and 'eager' backends)"
        )


def check_sampled_args(anchor, banks, index, loss_type, log_z, num_negatives):
    """Checks shared by the sampled launchers. Returns K, the number of negatives per row."""
    B, D = anchor.shape
    for name, bank in banks.items():
        check_kernel_dtype(name, bank)
        if bank.dim() != 2 or bank.shape[1] != D:
            raise ValueError(f"{name} must be (N, D) with D = {D}, got shape {tuple(bank.shape)}")
        if bank.stride(1) != 1:
            raise ValueError(f"{name} rows must be contiguous (stride(1) == 1), got strides {tuple(bank.stride())}")
    if D > MAX_D:
        raise NotImplementedError(f"the Triton sampled kernels hold a row in registers: D <= {MAX_D}, got {D}")
    if loss_type not in (0, 1):
        raise ValueError(f"loss_type must be 0 (InfoNCE) or 1 (NCE), got {loss_type}")
    if loss_type == 1 and log_z is None:
        raise ValueError("loss_type=1 (NCE) needs log_z")
    if index.dtype != torch.int64:
        raise TypeError(f"index must be int64, got {index.dtype}")
    if index.dim() not in (1, 2) or index.shape[0] != B:
        raise ValueError(f"index must have one row per anchor (B = {B}), got shape {tuple(index.shape)}")
    n_rows = next(iter(banks.values())).shape[0]
    if index.dim() == 1:
        if num_negatives < 1:
            raise ValueError("a 1-D index holds the positives only: num_negatives must be >= 1")
        if n_rows >= 2**32:
            raise ValueError("in-kernel sampling needs fewer than 2**32 bank rows")
        return num_negatives
    if index.shape[1] < 2 or num_negatives != 0:
        raise ValueError(
            f"index must be (B, K+1), K >= 1, with num_negatives=0, or (B,) with num_negatives=K > 0;"
            f" got shape {tuple(index.shape)} and num_negatives={num_negatives}"
        )
    return index.shape[1] - 1


def num_warps_for(block_d, vectors):
    """Warps of a partial program holding ``vectors`` D-long fp32 accumulators: 8 once they
    would take more than 32 registers per thread at 4 warps (128 threads), as in the dual
    kernel from D = 1024 on."""
    return 8 if vectors * block_d > 32 * 128 else 4


def block_k_for(block_d, rows_per_column=1):
    """Columns per gathered tile, a power of two: at most TILE_ELEMENTS in all (``rows_per_column``
    rows of 16-bit elements read per column)."""
    k = max(1, min(MAX_BLOCK_K, TILE_ELEMENTS // (block_d * rows_per_column)))
    return 1 << (k.bit_length() - 1)


def plan_chunks(batch, cols, block_k, device, num_chunks=None):
    """Split of the ``cols`` columns of every anchor into chunks of whole tiles.

    On a GPU, enough chunks that ``batch * chunks`` programs fill every SM a few times over, but
    never fewer than MIN_TILES_PER_CHUNK tiles per chunk. Under the interpreter programs run one
    after another, so one chunk. ``num_chunks`` forces a count (tests, tuning). Returns
    ``(num_chunks, cols_per_chunk)``; every chunk is non-empty.
    """
    tiles = triton.cdiv(cols, block_k)
    if num_chunks is None:
        if device.type == "cuda":
            num_chunks = min(
                triton.cdiv(PROGRAMS_PER_SM * sm_count(device), batch), triton.cdiv(tiles, MIN_TILES_PER_CHUNK)
            )
        else:
            num_chunks = 1
    num_chunks = max(1, min(int(num_chunks), tiles, MAX_CHUNKS))
    tiles_per_chunk = triton.cdiv(tiles, num_chunks)
    return triton.cdiv(tiles, tiles_per_chunk), tiles_per_chunk * block_k


def nce_constants(num_negatives, n_rows):
    """(log(c + eps), log1p(eps / c)) with c = K / N, computed in float64 on the host."""
    c = num_negatives / n_rows
    return math.log(c + NCE_EPS), math.log1p(NCE_EPS / c)


class SampledLaunch:
    """What the sampled launchers (one bank and dual) share. The constructor plans the tile and the
    split of the K+1 columns and allocates the workspace: ``stats`` (B, chunks, num_stats) and,
    with ``compute_grad``, ``vec`` (B, chunks, num_vecs, D). :meth:`scalars` then gives the
    arguments that follow the anchors and banks in both kernels (``partial_args``,
    ``merge_args``) and their shared constexprs (``flags``, ``partial_flags``, ``merge_flags``)."""

    def __init__(
        self, anchor, bank, index, K, compute_grad, num_stats, num_vecs, num_chunks, block_k, rows_per_column=1
    ):
        B, D = anchor.shape
        self.anchor, self.bank, self.index, self.K, self.compute_grad = anchor, bank, index, K, bool(compute_grad)
        f32 = dict(dtype=torch.float32, device=anchor.device)
        self.block_d = triton.next_power_of_2(D)
        self.block_k = block_k or block_k_for(self.block_d, rows_per_column)
        self.chunks, self.cols_per_chunk = plan_chunks(B, K + 1, self.block_k, anchor.device, num_chunks)
        self.stats = torch.empty((B, self.chunks, num_stats), **f32)
        self.vec = torch.empty((B, self.chunks, num_vecs, D), **f32) if compute_grad else self.stats
        self.merge_block_d = min(self.block_d, MERGE_BLOCK_D)
        self.merge_grid = (B, triton.cdiv(D, self.merge_block_d) if compute_grad else 1)

    def scalars(self, logit_scale, bias, log_z, loss_type, seed, offset, noise_rows):
        """Sets the kernels' arguments from the scalars (0-d fp32 tensors on the device), the loss
        type, the sampling stream and NCE's ``noise_rows`` (0: the bank's rows)."""
        if noise_rows < 0:
            raise ValueError(f"noise_rows must be >= 0 (0: the bank's rows), got {noise_rows}")
        B, D = self.anchor.shape
        N = self.bank.shape[0]
        device = self.anchor.device
        scale, bias_arg, log_z_arg = (scalar_arg(t, device) for t in (logit_scale, bias, log_z))
        bias_or_scale = scale if bias is None else bias_arg
        log_c_eps, log1p_eps_c = nce_constants(self.K, noise_rows or N) if loss_type == 1 else (0.0, 0.0)
        sampled = self.index.dim() == 1
        self.partial_args = (
            N,
            self.index,
            self.index.stride(0),
            0 if sampled else self.index.stride(1),
            scale,
            bias_or_scale,
            scale if log_z is None else log_z_arg,
            self.stats,
            self.vec,
            D,
            self.K + 1,
            self.cols_per_chunk,
            self.K,
            as_int64(seed),
            as_int64(offset),
            log_c_eps,
            log1p_eps_c,
        )
        self.merge_args = (
            self.stats,
            self.vec,
            self.chunks,
            N,
            self.index,
            self.index.stride(0),
            scale,
            bias_or_scale,
            B,
            D,
        )
        self.flags = dict(LOSS_TYPE=loss_type, HAS_BIAS=bias is not None, COMPUTE_GRAD=self.compute_grad)
        self.partial_flags = dict(SAMPLED=sampled, BLOCK_K=self.block_k, BLOCK_D=self.block_d)
        self.merge_flags = dict(BLOCK_C=triton.next_power_of_2(self.chunks), BLOCK_D=self.merge_block_d)
        return self


def as_int64(value):
    """An int (seed, offset: uint64 bits) as the signed int64 with the same bits."""
    value = int(value) & (2**64 - 1)
    return value - 2**64 if value >= 2**63 else value
