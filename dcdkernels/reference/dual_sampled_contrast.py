"""Oracle for docs/math.md §1c: both CRD directions at the same indices, plus the consistency KL.

Student direction: z_s against bank_t rows; teacher direction: z_t against bank_s rows.
KL_b = KL(p^t_b || p^s_b) with p = softmax over the K+1 columns.
"""

import math

import torch

from .sampled_contrast import nce_loss_from_logits, sampled_contrast_outputs, sampled_logits


def dual_sampled_contrast(
    anchor_s, anchor_t, bank_s, bank_t, index, *, logit_scale, bias=None, loss="infonce", log_z=None, compute_kl=True
):
    """Returns (loss_s, loss_t, kl, lse_s, lse_t), each (B,). ``log_z`` = (log Z_s, log Z_t) for NCE."""
    l_s = sampled_logits(anchor_s, bank_t.detach(), index, logit_scale, bias)
    l_t = sampled_logits(anchor_t, bank_s.detach(), index, logit_scale, bias)
    lse_s, lse_t = torch.logsumexp(l_s, 1), torch.logsumexp(l_t, 1)
    if loss == "infonce":
        loss_s, loss_t = lse_s - l_s[:, 0], lse_t - l_t[:, 0]
    elif loss == "nce":
        if log_z is None:
            raise ValueError("loss='nce' needs log_z = (log Z_s, log Z_t)")
        loss_s = nce_loss_from_logits(l_s, log_z[0], bank_t.shape[0])
        loss_t = nce_loss_from_logits(l_t, log_z[1], bank_s.shape[0])
    else:
        raise ValueError(f"unknown loss {loss!r}")
    if compute_kl:
        log_p_s = torch.log_softmax(l_s, dim=1)
        log_p_t = torch.log_softmax(l_t, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    else:
        kl = torch.zeros_like(loss_s)
    return loss_s, loss_t, kl, lse_s.detach(), lse_t.detach()


def _present_log_softmax(anchor, bank, index, present, s, bias, dtype):
    """Gathered rows (B, K+1, D), dots (B, K+1) and log p over the present columns (-inf at
    absent ones; all -inf for an empty row)."""
    safe = torch.where(present, index, torch.zeros_like(index))
    rows = bank.detach().index_select(0, safe.reshape(-1)).view(*index.shape, bank.shape[1]).to(dtype)
    dots = torch.bmm(rows, anchor.detach().to(dtype).unsqueeze(2)).squeeze(2)
    logits = dots * s + (0 if bias is None else bias)
    masked = logits.masked_fill(~present, -math.inf)
    lse = torch.logsumexp(masked, dim=1)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return rows, dots, masked - finite[:, None]


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
):
    """The four outputs of the fused kernels (csrc/KERNELS.md), absent columns included:
    ``losses (3, B) = [L^s, L^t, KL]``, ``lse (2, B) = [LSE^s, LSE^t]``,
    ``grad_anchors (4, B, D) = [dL^s/dz_s, dL^t/dz_t, dKL/dz_s, dKL/dz_t]`` and
    ``grad_scalars (2, 3, B) = [d/ds, d/dbeta] x [L^s, L^t, KL]`` in fp32 (fp64 for fp64 inputs);
    the gradients are ``(0,)`` without ``compute_grad``.

    ``index`` (B, K+1): an entry outside [0, N) (N = bank rows) marks its column absent in both
    directions. Each direction is ``sampled_contrast_outputs`` (student: z_s against bank_t with
    ``log_z[0]``; teacher: z_t against bank_s with ``log_z[1]``; ``noise_rows`` as there), except
    InfoNCE's ``dL/dbeta = sum_P p_k - [0 in P]``: 1 for a row whose positive alone is absent. The KL
    is ``KL(p^t || p^s)`` with both softmaxes normalised over the present columns P; an empty P
    gives KL 0 and zero KL gradients. ``dKL/dl^s_k = p^s_k - p^t_k``,
    ``dKL/dl^t_k = p^t_k (f_k - F)`` (``f = l^t - l^s``, ``F = sum_P p^t f``), ``dKL/dbeta = 0``.
    """
    dtype = (
        torch.float64
        if torch.float64 in (anchor_s.dtype, anchor_t.dtype, bank_s.dtype, bank_t.dtype)
        else torch.float32
    )
    s = torch.as_tensor(logit_scale, dtype=dtype).detach()
    b = None if bias is None else torch.as_tensor(bias, dtype=dtype).detach()
    lz = [None, None] if log_z is None else torch.as_tensor(log_z, dtype=dtype).detach()
    common = dict(logit_scale=s, bias=b, loss=loss, noise_rows=noise_rows, compute_grad=compute_grad)
    loss_s, lse_s, ga_s, gs_s = sampled_contrast_outputs(anchor_s.to(dtype), bank_t, index, log_z=lz[0], **common)
    loss_t, lse_t, ga_t, gs_t = sampled_contrast_outputs(anchor_t.to(dtype), bank_s, index, log_z=lz[1], **common)
    B, D = anchor_s.shape
    present = (index >= 0) & (index < bank_t.shape[0])
    if loss == "infonce" and compute_grad:
        # dL/dbeta = sum_P p_k - [0 in P]: 0 unless the positive is absent from a non-empty row
        # (sampled_contrast_outputs writes 0 always).
        gs_s[1] = gs_t[1] = (present.any(dim=1) & ~present[:, 0]).to(dtype)
    kl = torch.zeros_like(loss_s)
    ga_kl = torch.zeros((2, B, D), dtype=dtype, device=anchor_s.device)
    ds_kl = torch.zeros_like(loss_s)
    if compute_kl:
        rows_t, dots_s, log_p_s = _present_log_softmax(anchor_s, bank_t, index, present, s, b, dtype)
        rows_s, dots_t, log_p_t = _present_log_softmax(anchor_t, bank_s, index, present, s, b, dtype)
        p_s, p_t = log_p_s.exp(), log_p_t.exp()  # 0 at absent columns
        log_ratio = torch.where(present, log_p_t - log_p_s, torch.zeros_like(p_t))
        kl = (p_t * log_ratio).sum(dim=1)
        f = torch.where(present, (dots_t - dots_s) * s, torch.zeros_like(p_t))  # l^t - l^s (beta cancels)
        F = (p_t * f).sum(dim=1, keepdim=True)
        slope_s, slope_t = p_s - p_t, p_t * (f - F)
        ga_kl = torch.stack(
            [s * torch.einsum("bk,bkd->bd", slope_s, rows_t), s * torch.einsum("bk,bkd->bd", slope_t, rows_s)]
        )
        ds_kl = (slope_s * dots_s).sum(dim=1) + (slope_t * dots_t).sum(dim=1)
    losses, lse = torch.stack([loss_s, loss_t, kl]), torch.stack([lse_s, lse_t])
    if not compute_grad:
        empty = losses.new_empty((0,))
        return losses, lse, empty, empty.clone()
    grad_anchors = torch.cat([ga_s[None], ga_t[None], ga_kl])
    grad_scalars = torch.stack(
        [torch.stack([gs_s[0], gs_t[0], ds_kl]), torch.stack([gs_s[1], gs_t[1], torch.zeros_like(ds_kl)])]
    )
    return losses, lse, grad_anchors, grad_scalars
