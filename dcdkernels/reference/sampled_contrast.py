"""Oracle for docs/math.md §1a/§1b: anchors scored against gathered bank rows.

This is what RepDistiller and every eager user write: gather a (B, K+1, D) tensor, batched
matrix-vector product, then the loss. It materialises everything on purpose: it is the reference.
"""

import math

import torch

NCE_EPS = 1e-7


def sampled_logits(anchor, bank, index, logit_scale, bias=None):
    """l_bk = s <q_b, bank[idx_bk]> + beta, in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.float64 if torch.float64 in (anchor.dtype, bank.dtype) else torch.float32
    rows = bank.index_select(0, index.reshape(-1)).view(*index.shape, bank.shape[1]).to(dtype)
    dots = torch.bmm(rows, anchor.to(dtype).unsqueeze(2)).squeeze(2)  # (B, K+1)
    logits = dots * logit_scale
    if bias is not None:
        logits = logits + bias
    return logits


def nce_terms(logits, log_z, c):
    """RepDistiller's NCE terms in log space, with P_k = exp(l_k - log Z):
    the positive's ``-log(P_0 / (P_0 + c + eps))`` (B,) and each negative's
    ``-log(c / (P_k + c + eps))`` (B, K)."""
    log_c_eps = math.log(c + NCE_EPS)
    v = logits - log_z
    positive = torch.nn.functional.softplus(log_c_eps - v[:, 0])
    negatives = torch.logaddexp(torch.full_like(v[:, 1:], log_c_eps), v[:, 1:]) - math.log(c)
    return positive, negatives


def nce_loss_from_logits(logits, log_z, n_rows):
    """RepDistiller ``ContrastLoss`` per row, in log space.

    P_k = exp(l_k - log Z), c = K / N:
    L = -log(P_0 / (P_0 + c + eps)) - sum_{k>=1} log(c / (P_k + c + eps)).
    """
    positive, negatives = nce_terms(logits, log_z, (logits.shape[1] - 1) / n_rows)
    return positive + negatives.sum(dim=1)


def sampled_contrast(anchor, bank, index, *, logit_scale, bias=None, loss="infonce", log_z=None):
    """Per-row loss (B,) and per-row LSE of the logits (B,), differentiable w.r.t. anchor,
    logit_scale and bias (the bank gets no gradient: it is a memory)."""
    logits = sampled_logits(anchor, bank.detach(), index, logit_scale, bias)
    lse = torch.logsumexp(logits, dim=1)
    if loss == "infonce":
        per_row = lse - logits[:, 0]
    elif loss == "nce":
        if log_z is None:
            raise ValueError("loss='nce' needs log_z")
        per_row = nce_loss_from_logits(logits, log_z, bank.shape[0])
    else:
        raise ValueError(f"unknown loss {loss!r}")
    return per_row, lse.detach()


def sampled_contrast_outputs(
    anchor, bank, index, *, logit_scale, bias=None, loss="infonce", log_z=None, noise_rows=0, compute_grad=True
):
    """The four outputs of the fused kernels (csrc/KERNELS.md), absent columns included:
    ``(loss (B,), lse (B,), grad_anchor (B, D), grad_scalars (2, B) = [dL/ds, dL/dbeta])`` in fp32
    (fp64 for fp64 inputs); the gradients are ``(0,)`` without ``compute_grad``.

    ``index`` (B, K+1): an entry outside [0, N) (N = bank rows) marks its column absent. Only the
    present columns P count: ``lse = LSE_{k in P} l_k`` (-inf for an empty P); InfoNCE
    ``loss = lse - [0 in P] l_0``; NCE ``loss`` = the sum of the present columns' terms with
    ``c = K / noise_rows`` (0: N), K = columns - 1 whether present or not. Gradients follow from
    ``dL/dl_k`` over P (InfoNCE ``p_k - [k = 0]``, ``p_k = exp(l_k - lse)``; NCE the slopes of
    §1b), sums over an empty P being 0: ``grad_anchor = s sum_k dL/dl_k row_k``,
    ``dL/ds = sum_k dL/dl_k d_k``, ``dL/dbeta = sum_k dL/dl_k`` (exactly 0 for InfoNCE).
    """
    N, D = bank.shape
    dtype = torch.float64 if torch.float64 in (anchor.dtype, bank.dtype) else torch.float32
    present = (index >= 0) & (index < N)
    safe = torch.where(present, index, torch.zeros_like(index))
    rows = bank.detach().index_select(0, safe.reshape(-1)).view(*index.shape, D).to(dtype)
    dots = torch.bmm(rows, anchor.detach().to(dtype).unsqueeze(2)).squeeze(2)  # (B, K+1)
    s = torch.as_tensor(logit_scale, dtype=dtype).detach()
    logits = dots * s
    if bias is not None:
        logits = logits + torch.as_tensor(bias, dtype=dtype).detach()
    masked = logits.masked_fill(~present, -math.inf)
    lse = torch.logsumexp(masked, dim=1)
    if loss == "infonce":
        has_pos = present[:, 0]
        per_row = lse - torch.where(has_pos, logits[:, 0], torch.zeros_like(lse))
        finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        slope = torch.exp(masked - finite_lse[:, None])  # p_k over P; 0 at absent columns
        slope[:, 0] -= has_pos.to(dtype)
    elif loss == "nce":
        if log_z is None:
            raise ValueError("loss='nce' needs log_z")
        log_z = torch.as_tensor(log_z, dtype=dtype).detach()
        c = (index.shape[1] - 1) / (noise_rows or N)
        positive, negatives = nce_terms(logits, log_z, c)
        terms = torch.cat([positive[:, None], negatives], dim=1).masked_fill(~present, 0.0)
        per_row = terms.sum(dim=1)
        x = logits - log_z - math.log(c + NCE_EPS)
        slope = torch.cat([-torch.sigmoid(-x[:, :1]), torch.sigmoid(x[:, 1:])], dim=1).masked_fill(~present, 0.0)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    if not compute_grad:
        empty = dots.new_empty((0,))
        return per_row, lse, empty, empty.clone()
    grad_anchor = s * torch.einsum("bk,bkd->bd", slope, rows)
    grad_bias = slope.sum(dim=1) if loss == "nce" else torch.zeros_like(per_row)
    return per_row, lse, grad_anchor, torch.stack([(slope * dots).sum(dim=1), grad_bias])
