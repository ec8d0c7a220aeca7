"""Oracle for SPEC §1a/§1b: anchors scored against gathered bank rows.

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


def nce_loss_from_logits(logits, log_z, n_rows):
    """RepDistiller ``ContrastLoss`` per row, in log space.

    P_k = exp(l_k - log Z), c = K / N:
    L = -log(P_0 / (P_0 + c + eps)) - sum_{k>=1} log(c / (P_k + c + eps)).
    """
    K = logits.shape[1] - 1
    c = K / n_rows
    log_c_eps = math.log(c + NCE_EPS)
    v = logits - log_z
    positive = torch.nn.functional.softplus(log_c_eps - v[:, 0])
    negatives = torch.logaddexp(torch.full_like(v[:, 1:], log_c_eps), v[:, 1:]) - math.log(c)
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
