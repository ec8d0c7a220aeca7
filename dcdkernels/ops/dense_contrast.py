"""Dispatch point of ``dense_contrast`` (SPEC §2, contract in csrc/KERNELS.md).

Anchors against a dense key set (MoCo/CoCoRD queue with a separate positive key, PCKD category
centres or in-batch keys with a target column). The fused kernels never write the (B, M)
logits; the anchor/positive/scale gradients come out of the forward pass, and the key gradient,
which needs grad_output, is a second tiled pass over the keys in backward.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference
from . import _validate as V
from .sampled_contrast import _needs_grad


@torch.library.custom_op("dcdkernels::dense_contrast", mutates_args=())
def dense_contrast_op(anchor: Tensor, keys: Tensor, target: Optional[Tensor], positive: Optional[Tensor],
                      logit_scale: Tensor, bias: Optional[Tensor], compute_grad: bool,
                      backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
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
def dense_contrast_backward_keys_op(anchor: Tensor, keys: Tensor, target: Optional[Tensor], positive: Optional[Tensor],
                                    logit_scale: Tensor, bias: Optional[Tensor], lse: Tensor, grad_rows: Tensor,
                                    backend: str) -> Tensor:
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
    ctx.save_for_backward(anchor, keys, target, positive, logit_scale, bias, lse, grad_anchor, grad_positive,
                          grad_scalars)


def _backward(ctx, g_loss, g_lse, g_ga, g_gp, g_gs):
    anchor, keys, target, positive, logit_scale, bias, lse, grad_anchor, grad_positive, grad_scalars = ctx.saved_tensors
    if grad_anchor.numel() == 0:
        raise RuntimeError("dense_contrast: backward called but the forward computed no gradients")
    g = g_loss.to(grad_anchor.dtype)
    d_anchor = (grad_anchor * g[:, None]).to(ctx.dtypes[0])
    d_keys = None
    if ctx.keys_need_grad:
        d_keys = dense_contrast_backward_keys_op(anchor, keys, target, positive, logit_scale, bias, lse, g,
                                                 ctx.backend).to(ctx.dtypes[1])
    d_positive = (grad_positive * g[:, None]).to(ctx.dtypes[2]) if positive is not None else None
    d_scale = (grad_scalars[0] * g).sum()
    d_bias = (grad_scalars[1] * g).sum() if ctx.has_bias else None
    return d_anchor, d_keys, None, d_positive, d_scale, d_bias, None, None


dense_contrast_op.register_autograd(_backward, setup_context=_setup_context)


def dense_contrast(anchor, keys, target=None, *, positive=None, logit_scale, bias=None, weight=None, backend="auto",
                   return_lse=False):
    """Per-row InfoNCE (B,) of anchors against dense keys (SPEC §2, §8), times ``weight`` if given.

    Exactly one of ``target`` (B,) int64 (the positive is key ``target_b``: in-batch, class
    centres) or ``positive`` (B, D) (MoCo/CoCoRD: logits ``[q.k+, q.keys]``). Gradients flow to
    the anchors, the keys and the positive keys where they require grad, and to a learnable
    ``logit_scale``/``bias``.
    """
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
        if not isinstance(weight, Tensor) or weight.shape != (B,) or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating (B,) = ({B},) tensor")
        if weight.device != anchor.device:
            raise ValueError(f"weight is on {weight.device} but the anchors are on {anchor.device}")
        checks.finite("weight", weight)
    checks.finite("anchor", anchor)
    acc = V.accumulation_dtype(anchor, keys)
    s = V.scalar("logit_scale", logit_scale, device=anchor.device, dtype=acc, positive=True)
    b = None if bias is None else V.scalar("bias", bias, device=anchor.device, dtype=acc)
    backend = backends.resolve(backend, anchor.device, "dense_contrast", acc)
    checks.run(deferrable=backend in V.DEFERRABLE_BACKENDS)
    if backend == "eager":
        per_row, lse = reference.dense_contrast(anchor, keys, target, positive=positive, logit_scale=s, bias=b)
    else:
        positive = None if positive is None else positive.contiguous()
        per_row, lse, _, _, _ = dense_contrast_op(anchor.contiguous(), keys.contiguous(), target, positive, s, b,
                                                  _needs_grad(anchor, keys, positive, s, b), backend)
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    return (per_row, lse) if return_lse else per_row
