"""Oracle for SPEC §1c: both CRD directions at the same indices, plus the consistency KL.

Student direction: z_s against bank_t rows; teacher direction: z_t against bank_s rows.
KL_b = KL(p^t_b || p^s_b) with p = softmax over the K+1 columns.
"""
import torch

from .sampled_contrast import nce_loss_from_logits, sampled_logits


def dual_sampled_contrast(anchor_s, anchor_t, bank_s, bank_t, index, *, logit_scale, bias=None, loss="infonce",
                          log_z=None, compute_kl=True):
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
