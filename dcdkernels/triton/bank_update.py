"""Triton ``bank_momentum_update_`` (docs/math.md §4, contract in csrc/KERNELS.md), in place:
``bank[i] = normalize(m * bank[i] + (1 - m) * value[p])`` for every distinct ``i`` of ``index``,
``p`` the last position holding ``i``.

The launcher sorts the (B,) index (stable, so equal destinations keep their order) and launches
one program per sorted position; a program whose successor holds the same destination is not the
last occurrence and writes nothing, so every destination row is written by exactly one program,
from its pre-update value. No (B, D) temporary is made. Math is fp32; the row is normalised by
``max(||x||, 1e-12)`` and rounded once to the bank dtype.
"""

import torch
import triton
import triton.language as tl

from ..ops._validate import bank_layout
from ._common import check_kernel_dtype, device_guard

MAX_BLOCK_D = 1024


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, by integer arithmetic on the bits: the same result as
    torch's ``.to(torch.bfloat16)`` on every target (the interpreter's own cast truncates).
    ``x`` is finite here (a normalised row)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _pow2_scale_for(amax):
    """2^-e for ``amax = f * 2^e`` (f in [0.5, 1)), e clamped to [-126, 126] so that 2^-e and
    1e-12 * 2^-e are normal floats; built from the exponent bits (exact)."""
    e = ((amax.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 126
    e = tl.minimum(tl.maximum(e, -126), 126)
    return ((127 - e) << 23).to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _bank_momentum_update_kernel(
    bank_ptr,
    stride_bn,
    value_ptr,
    stride_vb,
    stride_vd,
    sorted_index_ptr,
    order_ptr,
    B,
    N,
    D,
    momentum,
    one_minus_momentum,
    BANK_IS_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    row = tl.load(sorted_index_ptr + i)
    next_row = tl.load(sorted_index_ptr + i + 1, mask=i + 1 < B, other=-1)
    # The last of a run of equal destinations is the last occurrence in `index` (stable sort).
    write = ((i + 1 >= B) | (next_row != row)) & (row >= 0) & (row < N)
    source = tl.load(order_ptr + i)
    bank_row = bank_ptr + row * stride_bn
    value_row = value_ptr + source * stride_vb

    # Pass 1: max |x| of the mixed row x, for a scaled norm (y = x * 2^-e exact, 2^e near max|x|:
    # ||y|| neither overflows nor underflows). Pass 2: ||y||. Pass 3: mix again (the rows are
    # cached) and store y / max(||y||, 1e-12 * 2^-e).
    amax = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, _ = _mixed(bank_row, value_row, stride_vd, d0, D, write, momentum, one_minus_momentum, BLOCK_D)
        amax = tl.maximum(amax, tl.abs(x))
    scale = _pow2_scale_for(tl.max(amax, axis=0))
    sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, _ = _mixed(bank_row, value_row, stride_vd, d0, D, write, momentum, one_minus_momentum, BLOCK_D)
        sq += (x * scale) * (x * scale)
    norm = tl.maximum(tl.sqrt_rn(tl.sum(sq, axis=0)), 1e-12 * scale)
    for d0 in range(0, D, BLOCK_D):
        x, mask = _mixed(bank_row, value_row, stride_vd, d0, D, write, momentum, one_minus_momentum, BLOCK_D)
        out = tl.div_rn(x * scale, norm)
        if BANK_IS_BF16:
            out = _round_to_bf16(out)
        tl.store(bank_row + d0 + tl.arange(0, BLOCK_D), out.to(bank_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixed(bank_row, value_row, stride_vd, d0, D, write, momentum, one_minus_momentum, BLOCK_D: tl.constexpr):
    """Elements d0 .. d0 + BLOCK_D of ``m * bank_row + (1 - m) * value_row`` in fp32 (0 outside
    the row, or when the row is not written), and their mask."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask = (offs_d < D) & write
    old = tl.load(bank_row + offs_d, mask=mask, other=0.0).to(tl.float32)
    new = tl.load(value_row + offs_d * stride_vd, mask=mask, other=0.0).to(tl.float32)
    return old * momentum + new * one_minus_momentum, mask


def bank_momentum_update_(bank, index, value, momentum):
    """Same arguments as the C++ op ``dcdkernels_C::bank_momentum_update_``; updates ``bank`` in
    place and returns nothing."""
    check_kernel_dtype("bank", bank)
    check_kernel_dtype("value", value)
    if bank.stride(1) != 1:
        raise ValueError(f"bank rows must be contiguous (stride(1) == 1), got strides {tuple(bank.stride())}")
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"index must be a 1-D int64 tensor, got {index.dtype} of shape {tuple(index.shape)}")
    if value.dim() != 2 or value.shape != (index.shape[0], bank.shape[1]):
        raise ValueError(f"value must be (B, D) = ({index.shape[0]}, {bank.shape[1]}), got {tuple(value.shape)}")
    bank_layout(bank, value)  # before the first write
    B = index.shape[0]
    if B == 0:
        return
    N, D = bank.shape
    sorted_index, order = torch.sort(index, stable=True)
    m = float(momentum)
    with device_guard(bank):
        _bank_momentum_update_kernel[(B,)](
            bank,
            bank.stride(0),
            value,
            value.stride(0),
            value.stride(1),
            sorted_index,
            order,
            B,
            N,
            D,
            m,
            1.0 - m,
            BANK_IS_BF16=bank.dtype == torch.bfloat16,
            BLOCK_D=min(triton.next_power_of_2(D), MAX_BLOCK_D),
            enable_fp_fusion=False,  # m * x + (1 - m) * v rounded as on the CPU: no FMA contraction
        )
