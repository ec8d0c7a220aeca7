"""Dispatch point of ``supcon_contrast``: the supervised-contrastive loss with a label mask
(SupCon, Khosla et al. 2020; PCKD's category contrast). Semantics, including rows with no
positive: ``reference/supcon_contrast.py``; kernel contract: csrc/KERNELS.md.
"""

import math
from typing import Tuple

import torch
from torch import Tensor

from .. import backends, reference
from ..reference.supcon_contrast import EPS
from . import _validate as V

REDUCTIONS = ("none", "mean", "sum")


@torch.library.custom_op("dcdkernels::supcon_contrast", mutates_args=())
def supcon_contrast_op(
    anchors: Tensor,
    labels: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    logit_scale: Tensor,
    eps: float,
    exclude_self: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Per-row loss (R,) and the backward's stats (3, R) = [row max, S + eps, positives]."""
    fn = backends.kernel("supcon_contrast", backend)
    return tuple(fn(anchors, labels, keys, key_labels, logit_scale, eps, exclude_self))


@supcon_contrast_op.register_fake
def _(anchors, labels, keys, key_labels, logit_scale, eps, exclude_self, backend):
    acc = V.accumulation_dtype(anchors, keys)
    R = anchors.shape[0]
    return anchors.new_empty((R,), dtype=acc), anchors.new_empty((3, R), dtype=acc)


@torch.library.custom_op("dcdkernels::supcon_contrast_backward", mutates_args=())
def supcon_contrast_backward_op(
    anchors: Tensor,
    labels: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    logit_scale: Tensor,
    stats: Tensor,
    grad_rows: Tensor,
    exclude_self: bool,
    keys_grad: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_anchors (R, D), grad_keys (N, D) or (0,), d/d logit_scale (0-d)) for ``grad_rows``."""
    fn = backends.kernel("supcon_contrast_backward", backend)
    return tuple(fn(anchors, labels, keys, key_labels, logit_scale, stats, grad_rows, exclude_self, keys_grad))


@supcon_contrast_backward_op.register_fake
def _(anchors, labels, keys, key_labels, logit_scale, stats, grad_rows, exclude_self, keys_grad, backend):
    acc = V.accumulation_dtype(anchors, keys)
    grad_keys = keys.new_empty(keys.shape, dtype=acc) if keys_grad else keys.new_empty((0,), dtype=acc)
    return anchors.new_empty(anchors.shape, dtype=acc), grad_keys, anchors.new_empty((), dtype=acc)


def _setup_context(ctx, inputs, output):
    anchors, labels, keys, key_labels, logit_scale, _, exclude_self, backend = inputs
    ctx.exclude_self, ctx.backend = exclude_self, backend
    ctx.dtypes = (anchors.dtype, keys.dtype)
    ctx.save_for_backward(anchors, labels, keys, key_labels, logit_scale, output[1])


def _backward(ctx, g_loss, g_stats):
    anchors, labels, keys, key_labels, logit_scale, stats = ctx.saved_tensors
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True
        raise RuntimeError(
            "supcon_contrast: double backward (create_graph=True) is not supported; use "
            "backend='eager' for higher-order gradients"
        )
    keys_grad = ctx.needs_input_grad[2]
    ga, gk, gs = supcon_contrast_backward_op(
        anchors,
        labels,
        keys,
        key_labels,
        logit_scale,
        stats,
        g_loss.to(stats.dtype).contiguous(),
        ctx.exclude_self,
        keys_grad,
        ctx.backend,
    )
    d_anchors = ga.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    d_keys = gk.to(ctx.dtypes[1]) if keys_grad else None
    d_scale = gs.to(logit_scale.dtype) if ctx.needs_input_grad[4] else None
    return d_anchors, None, d_keys, None, d_scale, None, None, None


supcon_contrast_op.register_autograd(_backward, setup_context=_setup_context)


def _labels(name, t, device, rows):
    t = V.index_tensor(name, t, device=device, dims=(1, 2))
    if t.numel() != rows:
        raise ValueError(f"{name} has {t.numel()} entries but there are {rows} rows")
    return t.reshape(-1)


def supcon_contrast(
    anchors,
    labels,
    keys=None,
    key_labels=None,
    *,
    logit_scale,
    weight=None,
    eps=EPS,
    exclude_self=True,
    reduction="mean",
    backend="auto",
):
    """SupCon loss of ``anchors`` (R, D) with integer ``labels`` (R,) against themselves
    (``keys=None``) or against ``keys`` (N, D) with ``key_labels`` (N,).

    Row i: ``L_i = -mean_{j in P_i} log( exp(l_ij) / (sum_{j' != i} exp(l_ij') + eps') )`` with
    ``l_ij = logit_scale * a_i . k_j``, the positives ``P_i`` every column j != i with the same
    label, the self column i excluded (``exclude_self``) and ``eps`` added after the row max is
    subtracted (the official ``1e-7``). A row with no positive gives 0 and no gradient (the
    official code gives NaN there). ``weight`` (R,) scales the rows; ``reduction="mean"`` returns
    ``sum_i weight_i L_i / R``, ``"sum"`` the sum, ``"none"`` the (R,) rows. Gradients flow to the
    anchors, the keys and a learnable ``logit_scale`` (a 0-d tensor; a float is fixed).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    V.matrix("anchors", anchors)
    R, D = anchors.shape
    labels = _labels("labels", labels, anchors.device, R)
    if (keys is None) != (key_labels is None):
        raise ValueError("give keys and key_labels together (or neither, to contrast the anchors with themselves)")
    if keys is not None:
        V.matrix("keys", keys, device=anchors.device, dim=D)
        key_labels = _labels("key_labels", key_labels, anchors.device, keys.shape[0])
    if not isinstance(eps, (float, int)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {type(exclude_self).__name__}")
    checks = V.ValueChecks()
    if weight is not None:
        V.row_weight(weight, R, anchors.device, checks)
    checks.finite("anchors", anchors)
    if keys is not None:
        checks.finite("keys", keys)
    acc = V.accumulation_dtype(anchors, *(() if keys is None else (keys,)))
    s = V.scalar("logit_scale", logit_scale, device=anchors.device, dtype=acc, positive=True)
    if isinstance(logit_scale, Tensor):
        checks.finite_positive("logit_scale", s)
    backend = backends.resolve(backend, anchors.device, "supcon_contrast", acc)
    checks.run()
    if backend == "eager":
        per_row = reference.supcon_contrast(
            anchors, labels, keys, key_labels, logit_scale=s, eps=float(eps), exclude_self=exclude_self
        )
    else:
        a = anchors.contiguous()
        k, lk = (a, labels) if keys is None else (keys.contiguous(), key_labels)
        per_row, _ = supcon_contrast_op(a, labels, k, lk, s, float(eps), exclude_self, backend)
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    return per_row.mean() if reduction == "mean" else per_row.sum() if reduction == "sum" else per_row
