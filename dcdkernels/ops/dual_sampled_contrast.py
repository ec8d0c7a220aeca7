"""Dispatch point of ``dual_sampled_contrast`` (docs/math.md §1c, contract in csrc/KERNELS.md).

Both CRD directions at the same indices (student anchor vs teacher bank, teacher anchor vs
student bank) and the consistency KL(p^t || p^s), from one read of both banks' rows.
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference
from . import _validate as V
from .sampled_contrast import LOSS_TYPES, _needs_grad, saved_gradients, validate_sampled


class DualContrastOutput(NamedTuple):
    loss_s: Tensor  # (B,) student anchor vs teacher bank
    loss_t: Tensor  # (B,) teacher anchor vs student bank
    consistency: Tensor  # (B,) consistency * KL(p^t || p^s); zeros when consistency == 0
    lse_s: Tensor  # (B,) LSE of the student-direction logits (no gradient)
    lse_t: Tensor  # (B,) LSE of the teacher-direction logits (no gradient)


@torch.library.custom_op("dcdkernels::dual_sampled_contrast", mutates_args=())
def dual_sampled_contrast_op(
    anchor_s: Tensor,
    anchor_t: Tensor,
    bank_s: Tensor,
    bank_t: Tensor,
    index: Tensor,
    logit_scale: Tensor,
    bias: Optional[Tensor],
    log_z: Optional[Tensor],
    loss_type: int,
    compute_kl: bool,
    num_negatives: int,
    seed: int,
    offset: int,
    compute_grad: bool,
    noise_rows: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = backends.kernel("dual_sampled_contrast", backend)
    return tuple(
        fn(
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
            noise_rows,
        )
    )


@dual_sampled_contrast_op.register_fake
def _(
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
    noise_rows,
    backend,
):
    B, D = anchor_s.shape
    acc = V.accumulation_dtype(anchor_s, anchor_t, bank_s, bank_t)
    losses, lse = anchor_s.new_empty((3, B), dtype=acc), anchor_s.new_empty((2, B), dtype=acc)
    if compute_grad:
        return losses, lse, anchor_s.new_empty((4, B, D), dtype=acc), anchor_s.new_empty((2, 3, B), dtype=acc)
    return losses, lse, anchor_s.new_empty((0,), dtype=acc), anchor_s.new_empty((0,), dtype=acc)


def _setup_context(ctx, inputs, output):
    anchor_s, anchor_t = inputs[:2]
    bias, log_z = inputs[6], inputs[7]
    ctx.dtypes = (anchor_s.dtype, anchor_t.dtype)
    ctx.save_for_backward(output[2], output[3])
    ctx.has_bias, ctx.has_log_z = bias is not None, log_z is not None


def _backward(ctx, g_losses, g_lse, g_ga, g_gs):
    grad_anchors, grad_scalars = saved_gradients(ctx, "dual_sampled_contrast")
    g = g_losses.to(grad_anchors.dtype)  # (3, B): [L^s, L^t, KL]
    d_s = grad_anchors[0] * g[0, :, None] + grad_anchors[2] * g[2, :, None]
    d_t = grad_anchors[1] * g[1, :, None] + grad_anchors[3] * g[2, :, None]
    d_scale = (grad_scalars[0] * g).sum()
    d_bias = (grad_scalars[1] * g).sum() if ctx.has_bias else None
    # v = l - log Z per direction: dL^s/dlog Z_s = -dL^s/dbeta (the KL has no log Z).
    d_log_z = -(grad_scalars[1, :2] * g[:2]).sum(dim=1) if ctx.has_log_z else None
    # one gradient per input of the op: anchors, banks and index, scalars, then 8 non-tensor arguments
    return (d_s.to(ctx.dtypes[0]), d_t.to(ctx.dtypes[1]), None, None, None, d_scale, d_bias, d_log_z) + (None,) * 8


dual_sampled_contrast_op.register_autograd(_backward, setup_context=_setup_context)


def _log_z_pair(log_z, device, dtype, checks) -> Tensor:
    """``(log Z_s, log Z_t)``: a pair of finite floats, or a (2,) float tensor whose values are
    value checks of the call."""
    if isinstance(log_z, Tensor):
        if log_z.shape != (2,) or not log_z.is_floating_point():
            raise ValueError(
                f"log_z must be (log Z_s, log Z_t): a float (2,) tensor or a pair of floats, got "
                f"{log_z.dtype} of shape {tuple(log_z.shape)}"
            )
        if log_z.device != device and log_z.device.type != "cpu":
            raise ValueError(f"log_z is on {log_z.device} but the anchors are on {device}")
        lz = log_z.to(device=device, dtype=dtype)
        checks.finite("log_z", lz)
        return lz
    if not isinstance(log_z, (tuple, list)):
        raise TypeError(
            f"log_z must be (log Z_s, log Z_t): a pair of floats or a (2,) tensor, got {type(log_z).__name__} {log_z!r}"
        )
    if len(log_z) != 2:
        raise ValueError(f"log_z must be (log Z_s, log Z_t), got {len(log_z)} values")
    return torch.stack([V.scalar("log_z", v, device=device, dtype=dtype, checks=checks) for v in log_z])


def dual_sampled_contrast(
    anchor_s,
    anchor_t,
    bank_s,
    bank_t,
    index,
    *,
    logit_scale,
    bias=None,
    loss="infonce",
    log_z=None,
    consistency=0.0,
    num_negatives=None,
    seed=0,
    offset=0,
    backend="auto",
):
    """Both directions of CRD at the same indices, plus ``consistency * KL(p^t || p^s)`` per row.

    Student anchor ``anchor_s`` is scored against ``bank_t`` rows, teacher anchor ``anchor_t``
    against ``bank_s`` rows. For ``loss="nce"``, ``log_z`` is ``(log Z_s, log Z_t)`` (a pair of
    floats or a (2,) tensor). Returns a :class:`DualContrastOutput` of per-row tensors.
    """
    checks = V.ValueChecks()
    index, K, seed, offset = validate_sampled(
        anchor_s, bank_t, index, loss, log_z, num_negatives, checks, "bank_t", "anchor_s", seed=seed, offset=offset
    )
    V.matrix("anchor_t", anchor_t, device=anchor_s.device)
    if anchor_t.shape != anchor_s.shape:
        raise ValueError(f"anchor_t has shape {tuple(anchor_t.shape)} but anchor_s has {tuple(anchor_s.shape)}")
    V.matrix("bank_s", bank_s, device=anchor_s.device, dim=anchor_s.shape[1])
    if bank_s.shape[0] != bank_t.shape[0] or bank_s.stride(1) != 1:
        raise ValueError(
            f"bank_s must have contiguous rows and as many rows as bank_t, got {tuple(bank_s.shape)} "
            f"and {tuple(bank_t.shape)}"
        )
    if bank_s.dtype != bank_t.dtype:
        raise TypeError(f"bank_s ({bank_s.dtype}) and bank_t ({bank_t.dtype}) must share one dtype")
    checks.finite("anchor_t", anchor_t)
    if not V.is_real(consistency):
        raise TypeError(f"consistency must be a float >= 0, got {type(consistency).__name__}")
    if not (math.isfinite(consistency) and consistency >= 0):
        raise ValueError(f"consistency must be a finite float >= 0, got {consistency!r}")
    device = anchor_s.device
    acc = V.accumulation_dtype(anchor_s, anchor_t, bank_s, bank_t)
    s = V.scalar("logit_scale", logit_scale, device=device, dtype=acc, positive=True, checks=checks)
    b = None if bias is None else V.scalar("bias", bias, device=device, dtype=acc, checks=checks)
    lz = None if log_z is None else _log_z_pair(log_z, device, acc, checks)
    backend = backends.resolve(backend, device, "dual_sampled_contrast", acc, dim=anchor_s.shape[1])
    checks.run(deferrable=backend in V.DEFERRABLE_BACKENDS)
    s = checks.tie(s)
    compute_kl = consistency > 0
    if backend == "eager":
        if index.dim() == 1:
            index = reference.sample_negatives(index, K, bank_s.shape[0], seed, offset)
        loss_s, loss_t, kl, lse_s, lse_t = reference.dual_sampled_contrast(
            anchor_s, anchor_t, bank_s, bank_t, index, logit_scale=s, bias=b, loss=loss, log_z=lz, compute_kl=compute_kl
        )
    else:
        losses, lse, _, _ = dual_sampled_contrast_op(
            anchor_s.contiguous(),
            anchor_t.contiguous(),
            bank_s.detach(),
            bank_t.detach(),
            index,
            s,
            b,
            lz,
            LOSS_TYPES[loss],
            compute_kl,
            K,
            seed,
            offset,
            _needs_grad(anchor_s, anchor_t, s, b, lz),
            0,
            backend,
        )
        loss_s, loss_t, kl = losses.unbind(0)
        lse_s, lse_t = lse.unbind(0)
    return DualContrastOutput(loss_s, loss_t, kl * consistency, lse_s, lse_t)


def dual_sampled_contrast_outputs(
    anchor_s,
    anchor_t,
    bank_s,
    bank_t,
    index,
    *,
    logit_scale,
    bias=None,
    loss="infonce",
    log_z=None,
    compute_kl=False,
    noise_rows=0,
    compute_grad=True,
    backend="auto",
):
    """The kernels' four outputs ``(losses (3, B), lse (2, B), grad_anchors (4, B, D),
    grad_scalars (2, 3, B))`` (csrc/KERNELS.md) for an explicit (B, K+1) ``index`` in which
    entries outside [0, bank rows) mark absent columns (in both directions); NCE's
    ``c = K / noise_rows`` (0: the bank's rows). For callers that combine the results over slices
    of the banks (sharded banks): no validation (the caller has checked the global index), no
    autograd. ``logit_scale``, ``bias``: 0-d tensors; ``log_z``: a (2,) tensor
    ``[log Z_s, log Z_t]``. The backend is chosen as in ``dual_sampled_contrast``; "eager" is
    ``reference.dual_sampled_contrast_outputs``.
    """
    acc = V.accumulation_dtype(anchor_s, anchor_t, bank_s, bank_t)
    backend = backends.resolve(backend, anchor_s.device, "dual_sampled_contrast", acc, dim=anchor_s.shape[1])
    s, b, lz = (None if t is None else t.detach().to(acc) for t in (logit_scale, bias, log_z))
    if backend == "eager":
        return reference.dual_sampled_contrast_outputs(
            anchor_s,
            anchor_t,
            bank_s,
            bank_t,
            index,
            logit_scale=s,
            bias=b,
            loss=loss,
            log_z=lz,
            compute_kl=compute_kl,
            noise_rows=noise_rows,
            compute_grad=compute_grad,
        )
    return dual_sampled_contrast_op(
        anchor_s.contiguous(),
        anchor_t.contiguous(),
        bank_s.detach(),
        bank_t.detach(),
        index,
        s,
        b,
        lz,
        LOSS_TYPES[loss],
        compute_kl,
        0,
        0,
        0,
        compute_grad,
        noise_rows,
        backend,
    )
