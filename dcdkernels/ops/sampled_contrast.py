"""Dispatch point of ``sampled_contrast`` (docs/math.md §1a/§1b, contract in csrc/KERNELS.md).

The fused backends compute the loss, the per-row LSE and every gradient in one pass over the
gathered rows; the registered autograd formula only scales the saved gradients by grad_output.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference
from . import _validate as V

LOSS_TYPES = {"infonce": 0, "nce": 1}
MAX_SAMPLED_NEGATIVES = 2**31  # K of in-kernel sampling: int32 columns in the kernels


@torch.library.custom_op("dcdkernels::sampled_contrast", mutates_args=())
def sampled_contrast_op(
    anchor: Tensor,
    bank: Tensor,
    index: Tensor,
    logit_scale: Tensor,
    bias: Optional[Tensor],
    log_z: Optional[Tensor],
    loss_type: int,
    num_negatives: int,
    seed: int,
    offset: int,
    compute_grad: bool,
    noise_rows: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = backends.kernel("sampled_contrast", backend)
    return tuple(
        fn(
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
            noise_rows,
        )
    )


@sampled_contrast_op.register_fake
def _(
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
    noise_rows,
    backend,
):
    B, D = anchor.shape
    acc = V.accumulation_dtype(anchor, bank)
    rows = anchor.new_empty((B,), dtype=acc)
    if compute_grad:
        return rows, rows.clone(), anchor.new_empty((B, D), dtype=acc), anchor.new_empty((2, B), dtype=acc)
    empty = anchor.new_empty((0,), dtype=acc)
    return rows, rows.clone(), empty, empty.clone()


def _setup_context(ctx, inputs, output):
    anchor, _, _, logit_scale, bias, log_z = inputs[:6]
    _, _, grad_anchor, grad_scalars = output
    ctx.anchor_dtype = anchor.dtype
    ctx.save_for_backward(grad_anchor, grad_scalars)
    ctx.has_bias, ctx.has_log_z = bias is not None, log_z is not None


def _backward(ctx, g_loss, g_lse, g_anchor_out, g_scalars_out):
    grad_anchor, grad_scalars = saved_gradients(ctx, "sampled_contrast")
    g = g_loss.to(grad_anchor.dtype)
    d_anchor = (grad_anchor * g[:, None]).to(ctx.anchor_dtype)
    d_scale = (grad_scalars[0] * g).sum()
    d_bias = (grad_scalars[1] * g).sum() if ctx.has_bias else None
    # v = l - log Z, so dL/dlog_z = -dL/dbeta.
    d_log_z = -(grad_scalars[1] * g).sum() if ctx.has_log_z else None
    return d_anchor, None, None, d_scale, d_bias, d_log_z, None, None, None, None, None, None, None


sampled_contrast_op.register_autograd(_backward, setup_context=_setup_context)


def refuse_double_backward(op: str) -> None:
    """The fused backward is first order only (the saved gradients are constants of the graph):
    raise as soon as a second-order graph is requested (``create_graph=True`` runs the backward
    with grad mode on), rather than return zeros for the second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: the fused backends do not support double backward (create_graph=True); "
            f"use backend='eager' for higher-order gradients"
        )


def saved_gradients(ctx, op: str, first_grad: int = 0):
    """``ctx.saved_tensors`` of the fused op ``op``, at the start of its first-order backward:
    ``refuse_double_backward``, then raise if the forward computed no gradients (its saved
    ``ctx.saved_tensors[first_grad]`` is empty)."""
    refuse_double_backward(op)
    saved = ctx.saved_tensors
    if saved[first_grad].numel() == 0:
        raise RuntimeError(f"{op}: backward called but the forward computed no gradients")
    return saved


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def validate_sampled(
    anchor, bank, index, loss, log_z, num_negatives, checks, name_bank="bank", anchor_name="anchor", seed=0, offset=0
):
    """Shared checks of the sampled ops. Returns the int64 index, K (0 for a 2-D index) and the
    stream's (seed, offset) as ints."""
    V.matrix(anchor_name, anchor)
    B, D = anchor.shape
    V.matrix(name_bank, bank, device=anchor.device, dim=D)
    if bank.stride(1) != 1:
        raise ValueError(f"{name_bank} rows must be contiguous (stride(1) == 1), got strides {bank.stride()}")
    if loss not in LOSS_TYPES:
        raise ValueError(f"loss must be 'infonce' or 'nce', got {loss!r}")
    if loss == "nce" and log_z is None:
        raise ValueError("loss='nce' needs log_z (the log partition estimate, e.g. from the first batch's LSE)")
    index = V.index_tensor("index", index, device=anchor.device, rows=B)
    K = 0
    if index.dim() == 1:
        if num_negatives is None:
            raise ValueError("a 1-D index holds only the positives: pass num_negatives=K >= 1 to sample negatives")
        K = V.integer("num_negatives", num_negatives, lo=1, hi=MAX_SAMPLED_NEGATIVES)
        if bank.shape[0] >= 2**31:
            raise ValueError("in-kernel sampling supports banks of fewer than 2**31 rows")
        seed, offset = V.stream(seed, offset, B * K)
    else:
        if num_negatives is not None and num_negatives is not False and num_negatives != 0:
            raise ValueError(
                "num_negatives is only for a 1-D index of positives; a (B, K+1) index already holds the negatives"
            )
        if index.shape[1] < 2:
            raise ValueError(f"index must be (B, K+1) with K >= 1 negatives, got shape {tuple(index.shape)}")
    checks.index_in_range("index", index, bank.shape[0])
    checks.finite(anchor_name, anchor)
    return index, K, seed, offset


def sampled_contrast(
    anchor,
    bank,
    index,
    *,
    logit_scale,
    bias=None,
    loss="infonce",
    log_z=None,
    num_negatives=None,
    seed=0,
    offset=0,
    backend="auto",
    return_lse=False,
):
    """Per-row contrastive loss (B,) of anchors against gathered bank rows (docs/math.md §1).

    ``index`` is (B, K+1) int64 (column 0 the positive row), or (B,) positives together with
    ``num_negatives=K``: then negatives are drawn inside the kernel from the counter-based stream
    (seed, offset) and ``dcdkernels.sample_negatives`` returns the same indices.
    ``logit_scale`` is a float (1/tau) or a 0-d tensor (learnable); ``bias`` likewise or None.
    ``loss="nce"`` is RepDistiller's NCE and needs ``log_z``. With ``return_lse=True`` also returns
    the per-row LSE of the logits (no gradient), from which the first-batch log Z is formed.
    """
    checks = V.ValueChecks()
    index, K, seed, offset = validate_sampled(
        anchor, bank, index, loss, log_z, num_negatives, checks, seed=seed, offset=offset
    )
    acc = V.accumulation_dtype(anchor, bank)
    s = V.scalar("logit_scale", logit_scale, device=anchor.device, dtype=acc, positive=True, checks=checks)
    b = None if bias is None else V.scalar("bias", bias, device=anchor.device, dtype=acc, checks=checks)
    lz = None if log_z is None else V.scalar("log_z", log_z, device=anchor.device, dtype=acc, checks=checks)
    backend = backends.resolve(backend, anchor.device, "sampled_contrast", acc, dim=anchor.shape[1])
    checks.run(deferrable=backend in V.DEFERRABLE_BACKENDS)
    s = checks.tie(s)
    if backend == "eager":
        if index.dim() == 1:
            index = reference.sample_negatives(index, K, bank.shape[0], seed, offset)
        per_row, lse = reference.sampled_contrast(anchor, bank, index, logit_scale=s, bias=b, loss=loss, log_z=lz)
    else:
        per_row, lse, _, _ = sampled_contrast_op(
            anchor.contiguous(),
            bank.detach(),
            index,
            s,
            b,
            lz,
            LOSS_TYPES[loss],
            K,
            seed,
            offset,
            _needs_grad(anchor, s, b, lz),
            0,
            backend,
        )
    return (per_row, lse) if return_lse else per_row


def sampled_contrast_outputs(
    anchor,
    bank,
    index,
    *,
    logit_scale,
    bias=None,
    loss="infonce",
    log_z=None,
    noise_rows=0,
    compute_grad=True,
    backend="auto",
):
    """The kernels' four outputs ``(loss, lse, grad_anchor, grad_scalars)`` (csrc/KERNELS.md) for an
    explicit (B, K+1) ``index`` in which entries outside [0, bank rows) mark absent columns; NCE's
    ``c = K / noise_rows`` (0: the bank's rows). For callers that combine the results over slices
    of a bank (the sharded ``MemoryBank``): no validation (the caller has checked the global index),
    no autograd. ``logit_scale``, ``bias``, ``log_z``: 0-d tensors. The backend is chosen as in
    ``sampled_contrast``; "eager" is ``reference.sampled_contrast_outputs``.
    """
    acc = V.accumulation_dtype(anchor, bank)
    backend = backends.resolve(backend, anchor.device, "sampled_contrast", acc, dim=anchor.shape[1])
    s, b, lz = (None if t is None else t.detach().to(acc) for t in (logit_scale, bias, log_z))
    if backend == "eager":
        return reference.sampled_contrast_outputs(
            anchor,
            bank,
            index,
            logit_scale=s,
            bias=b,
            loss=loss,
            log_z=lz,
            noise_rows=noise_rows,
            compute_grad=compute_grad,
        )
    return sampled_contrast_op(
        anchor.contiguous(),
        bank.detach(),
        index,
        s,
        b,
        lz,
        LOSS_TYPES[loss],
        0,
        0,
        0,
        compute_grad,
        noise_rows,
        backend,
    )
