"""Dispatch point of ``supcon_contrast``: the supervised-contrastive loss with a label mask
(SupCon, Khosla et al. 2020; PCKD's category contrast). Semantics, including rows with no
positive: ``reference/supcon_contrast.py``; kernel contract: csrc/KERNELS.md.
"""
import math

import torch
from torch import Tensor

from .. import backends, reference
from ..reference.supcon_contrast import EPS
from . import _validate as V

REDUCTIONS = ("none", "mean", "sum")


def _labels(name, t, device, rows):
    t = V.index_tensor(name, t, device=device, dims=(1, 2))
    if t.numel() != rows:
        raise ValueError(f"{name} has {t.numel()} entries but there are {rows} rows")
    return t.reshape(-1)


def supcon_contrast(anchors, labels, keys=None, key_labels=None, *, logit_scale, weight=None, eps=EPS,
                    exclude_self=True, reduction="mean", backend="auto"):
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
        checks.finite("logit_scale", s)
        checks._add(s.detach() <= 0, "logit_scale must be > 0")
    backend = backends.resolve(backend, anchors.device, "supcon_contrast", acc)
    checks.run()
    if backend == "eager":
        per_row = reference.supcon_contrast(anchors, labels, keys, key_labels, logit_scale=s, eps=float(eps),
                                            exclude_self=exclude_self)
    else:
        raise NotImplementedError(f"supcon_contrast: backend {backend!r} has no kernel yet")
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    return per_row.mean() if reduction == "mean" else per_row.sum() if reduction == "sum" else per_row
