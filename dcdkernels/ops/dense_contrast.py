"""Dispatch point of ``dense_contrast`` (docs/math.md §2, contract in csrc/KERNELS.md).

Anchors against a dense key set (MoCo/CoCoRD queue with a separate positive key, PCKD category
centres or in-batch keys with a target column). The fused kernels never write the (B, M)
logits. Per-row output (``reduction="none"``): the anchor/positive/scale gradients come out of
the forward pass, and the key gradient, which needs grad_output, is a second tiled pass over
the keys in backward. Reduced output (``"mean"``/``"sum"``, Liger fused-linear-cross-entropy
style): the weight of every row in the scalar is known in the forward, so the forward also
computes the key gradient and backward only scales the saved gradients (CPU with key
gradients: 3 matmuls instead of 4).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference
from . import _validate as V
from .sampled_contrast import _needs_grad, refuse_double_backward, saved_gradients


@torch.library.custom_op("dcdkernels::dense_contrast", mutates_args=())
def dense_contrast_op(
    anchor: Tensor,
    keys: Tensor,
    target: Optional[Tensor],
    positive: Optional[Tensor],
    logit_scale: Tensor,
    bias: Optional[Tensor],
    compute_grad: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = backends.kernel("dense_contrast", backend)
    return tuple(fn(anchor, keys, target, positive, logit_scale, bias, compute_grad))


@dense_contrast_op.register_fake
def _(anchor, keys, target, positive, logit_scale, bias, compute_grad, backend):
    B, D = anchor.shape
    acc = V.accumulation_dtype(anchor, keys)
    rows = anchor.new_empty((B,), dtype=acc)
    empty = anchor.new_empty((0,), dtype=acc)
    if not compute_grad:
        return rows, rows.clone(), empty, empty.clone(), empty.clone()
    grad_positive = anchor.new_empty((B, D), dtype=acc) if positive is not None else empty
    return rows, rows.clone(), anchor.new_empty((B, D), dtype=acc), grad_positive, anchor.new_empty((2, B), dtype=acc)


@torch.library.custom_op("dcdkernels::dense_contrast_backward_keys", mutates_args=())
def dense_contrast_backward_keys_op(
    anchor: Tensor,
    keys: Tensor,
    target: Optional[Tensor],
    positive: Optional[Tensor],
    logit_scale: Tensor,
    bias: Optional[Tensor],
    lse: Tensor,
    grad_rows: Tensor,
    backend: str,
) -> Tensor:
    fn = backends.kernel("dense_contrast_backward_keys", backend)
    return fn(anchor, keys, target, positive, logit_scale, bias, lse, grad_rows)


@dense_contrast_backward_keys_op.register_fake
def _(anchor, keys, target, positive, logit_scale, bias, lse, grad_rows, backend):
    return keys.new_empty(keys.shape, dtype=V.accumulation_dtype(anchor, keys))


def _setup_context(ctx, inputs, output):
    anchor, keys, target, positive, logit_scale, bias, _, backend = inputs
    _, lse, grad_anchor, grad_positive, grad_scalars = output
    ctx.backend, ctx.has_bias = backend, bias is not None
    ctx.dtypes = (anchor.dtype, keys.dtype, None if positive is None else positive.dtype)
    ctx.keys_need_grad = keys.requires_grad
    ctx.save_for_backward(
        anchor, keys, target, positive, logit_scale, bias, lse, grad_anchor, grad_positive, grad_scalars
    )


def _backward(ctx, g_loss, g_lse, g_ga, g_gp, g_gs):
    saved = saved_gradients(ctx, "dense_contrast", first_grad=7)
    anchor, keys, target, positive, logit_scale, bias, lse, grad_anchor, grad_positive, grad_scalars = saved
    g = g_loss.to(grad_anchor.dtype)
    d_anchor = (grad_anchor * g[:, None]).to(ctx.dtypes[0])
    d_keys = None
    if ctx.keys_need_grad:
        d_keys = dense_contrast_backward_keys_op(
            anchor, keys, target, positive, logit_scale, bias, lse, g, ctx.backend
        ).to(ctx.dtypes[1])
    d_positive = (grad_positive * g[:, None]).to(ctx.dtypes[2]) if positive is not None else None
    d_scale = (grad_scalars[0] * g).sum()
    d_bias = (grad_scalars[1] * g).sum() if ctx.has_bias else None
    return d_anchor, d_keys, None, d_positive, d_scale, d_bias, None, None


dense_contrast_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("dcdkernels::dense_contrast_reduced", mutates_args=())
def dense_contrast_reduced_op(
    anchor: Tensor,
    keys: Tensor,
    target: Optional[Tensor],
    positive: Optional[Tensor],
    logit_scale: Tensor,
    bias: Optional[Tensor],
    row_weight: Tensor,
    keys_grad: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = backends.kernel("dense_contrast_reduced", backend)
    return tuple(fn(anchor, keys, target, positive, logit_scale, bias, row_weight, keys_grad))


@dense_contrast_reduced_op.register_fake
def _(anchor, keys, target, positive, logit_scale, bias, row_weight, keys_grad, backend):
    B, D = anchor.shape
    acc = V.accumulation_dtype(anchor, keys)
    rows = anchor.new_empty((B,), dtype=acc)
    empty = anchor.new_empty((0,), dtype=acc)
    grad_positive = anchor.new_empty((B, D), dtype=acc) if positive is not None else empty
    grad_keys = keys.new_empty(keys.shape, dtype=acc) if keys_grad else empty.clone()
    return (
        anchor.new_empty((), dtype=acc),
        rows,
        rows.clone(),
        anchor.new_empty((B, D), dtype=acc),
        grad_positive,
        grad_keys,
        anchor.new_empty((2,), dtype=acc),
    )


def _setup_context_reduced(ctx, inputs, output):
    anchor, keys, _, positive, _, bias, _, keys_grad, _ = inputs
    _, rows, _, grad_anchor, grad_positive, grad_keys, grad_scalars = output
    ctx.has_bias, ctx.keys_grad = bias is not None, keys_grad
    ctx.set_materialize_grads(False)  # the other outputs' gradients are unused: no zero (M, D) tensors
    ctx.dtypes = (anchor.dtype, keys.dtype, None if positive is None else positive.dtype)
    ctx.save_for_backward(rows, grad_anchor, grad_positive, grad_keys, grad_scalars)


def _backward_reduced(ctx, g_loss, g_rows, g_lse, g_ga, g_gp, g_gk, g_gs):
    if g_loss is None:  # only the rows or the LSE were used, and they carry no gradient
        return (None,) * 9
    refuse_double_backward("dense_contrast")
    if ctx.needs_input_grad[1] and not ctx.keys_grad:
        raise RuntimeError(
            "dense_contrast_reduced: the keys need a gradient but the forward computed none (keys_grad=False)"
        )
    rows, grad_anchor, grad_positive, grad_keys, grad_scalars = ctx.saved_tensors
    g = g_loss.to(grad_anchor.dtype)
    # grad_output = 1 (a loss term of weight 1, or loss.backward() itself): the saved gradients
    # are returned as they are. On CPU the product's fresh (M, D) buffer doubles the transient
    # memory and costs page faults; the test needs a plain tensor (no device sync, no branch on
    # data in a traced graph).
    unit = type(g) is torch.Tensor and g.device.type == "cpu" and not torch.compiler.is_compiling() and bool(g == 1)

    def scaled(grad, dtype):
        return (grad if unit else grad * g).to(dtype)

    d_anchor = scaled(grad_anchor, ctx.dtypes[0])
    d_keys = scaled(grad_keys, ctx.dtypes[1]) if ctx.keys_grad else None
    d_positive = scaled(grad_positive, ctx.dtypes[2]) if ctx.dtypes[2] is not None else None
    d_bias = grad_scalars[1] * g if ctx.has_bias else None
    d_row_weight = rows * g if ctx.needs_input_grad[6] else None
    return d_anchor, d_keys, None, d_positive, grad_scalars[0] * g, d_bias, d_row_weight, None, None


dense_contrast_reduced_op.register_autograd(_backward_reduced, setup_context=_setup_context_reduced)

REDUCTIONS = ("none", "mean", "sum")


def dense_contrast(
    anchor,
    keys,
    target=None,
    *,
    positive=None,
    logit_scale,
    bias=None,
    weight=None,
    reduction="none",
    backend="auto",
    return_lse=False,
):
    """Per-row InfoNCE (B,) of anchors against dense keys (docs/math.md §2), times ``weight`` if given.

    Exactly one of ``target`` (B,) int64 (the positive is key ``target_b``: in-batch, class
    centres) or ``positive`` (B, D) (MoCo/CoCoRD: logits ``[q.k+, q.keys]``). Gradients flow to
    the anchors, the keys and the positive keys where they require grad, and to a learnable
    ``logit_scale``/``bias`` and ``weight``.

    ``reduction="mean"`` returns ``sum_b weight_b L_b / B`` (the same as ``.mean()`` of the
    per-row output), ``"sum"`` returns ``sum_b weight_b L_b``. A reduced call that needs
    gradients computes all of them in its forward pass (no recomputation in backward).
    ``return_lse=True`` also returns the per-row LSE (B,).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    V.matrix("anchor", anchor)
    B, D = anchor.shape
    V.matrix("keys", keys, device=anchor.device, dim=D)
    checks = V.ValueChecks()
    if (target is None) == (positive is None):
        raise ValueError("dense_contrast: give exactly one of target (B,) and positive (B, D)")
    if target is not None:
        target = V.index_tensor("target", target, device=anchor.device, rows=B, dims=(1,))
        checks.index_in_range("target", target, keys.shape[0])
    else:
        V.matrix("positive", positive, device=anchor.device, dim=D)
        if positive.shape[0] != B:
            raise ValueError(f"positive has {positive.shape[0]} rows but there are {B} anchors")
        checks.finite("positive", positive)
    if weight is not None:
        V.row_weight(weight, B, anchor.device, checks)
    checks.finite("anchor", anchor)
    acc = V.accumulation_dtype(anchor, keys)
    s = V.scalar("logit_scale", logit_scale, device=anchor.device, dtype=acc, positive=True, checks=checks)
    b = None if bias is None else V.scalar("bias", bias, device=anchor.device, dtype=acc, checks=checks)
    needs_grad = _needs_grad(anchor, keys, positive, s, b)
    # Without other gradients a weight's gradient is the per-row loss: the per-row op serves.
    fused_reduction = reduction != "none" and needs_grad
    op = "dense_contrast_reduced" if fused_reduction else "dense_contrast"
    backend = backends.resolve(backend, anchor.device, op, acc)
    checks.run(deferrable=backend in V.DEFERRABLE_BACKENDS)
    s = checks.tie(s)
    positive = None if positive is None else positive.contiguous()
    if backend != "eager" and fused_reduction:
        # Row weights c of the scalar sum_b c_b L_b.
        if weight is None:
            c = torch.full((B,), 1 / B if reduction == "mean" else 1.0, dtype=acc, device=anchor.device)
        else:
            c = weight.to(acc) / B if reduction == "mean" else weight.to(acc)
        loss, _, lse, _, _, _, _ = dense_contrast_reduced_op(
            anchor.contiguous(), keys.contiguous(), target, positive, s, b, c, keys.requires_grad, backend
        )
        return (loss, lse) if return_lse else loss
    if backend == "eager":
        per_row, lse = reference.dense_contrast(anchor, keys, target, positive=positive, logit_scale=s, bias=b)
    else:
        per_row, lse, _, _, _ = dense_contrast_op(
            anchor.contiguous(), keys.contiguous(), target, positive, s, b, needs_grad, backend
        )
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    out = per_row.mean() if reduction == "mean" else per_row.sum() if reduction == "sum" else per_row
    return (out, lse) if return_lse else out
