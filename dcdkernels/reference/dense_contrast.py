"""Oracle for docs/math.md §2: anchors against a dense key set (queue, category centres, in-batch).

Materialises the (B, M) logits (or (B, 1+M) with a separate positive key) and applies
cross-entropy per row, as MoCo's and CoCoRD's code do.
"""

import torch


def dense_logits(anchor, keys, *, positive=None, logit_scale, bias=None):
    dtype = torch.float64 if torch.float64 in (anchor.dtype, keys.dtype) else torch.float32
    q = anchor.to(dtype)
    logits = q @ keys.to(dtype).t()
    if positive is not None:
        l_pos = (q * positive.to(dtype)).sum(dim=1, keepdim=True)
        logits = torch.cat([l_pos, logits], dim=1)
    logits = logits * logit_scale
    if bias is not None:
        logits = logits + bias
    return logits


def dense_contrast(anchor, keys, target=None, *, positive=None, logit_scale, bias=None, weight=None):
    """Per-row weighted InfoNCE (B,) and per-row LSE (B,).

    Exactly one of ``target`` (B,) (the positive is key ``target_b``) and ``positive`` (B, D)
    (MoCo: logits ``[q.k+, q.keys]``, positive column 0). Gradients flow to anchor, keys,
    positive, logit_scale and bias wherever they require grad.
    """
    if (target is None) == (positive is None):
        raise ValueError("give exactly one of target and positive")
    logits = dense_logits(anchor, keys, positive=positive, logit_scale=logit_scale, bias=bias)
    if positive is not None:
        target = torch.zeros(anchor.shape[0], dtype=torch.int64, device=anchor.device)
    lse = torch.logsumexp(logits, dim=1)
    per_row = lse - logits.gather(1, target.view(-1, 1)).squeeze(1)
    if weight is not None:
        per_row = per_row * weight.to(per_row.dtype)
    return per_row, lse.detach()
