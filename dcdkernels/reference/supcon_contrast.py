"""Oracle of ``supcon_contrast``: the supervised-contrastive loss (Khosla et al., 2020) with a
label mask, as SupContrast's ``SupConLoss`` and PCKD's ``CategoryConLoss`` compute it.

Materialises the (R, N) logits. Per anchor row i, with l_ij = s * a_i . k_j:

* m_i = max_j l_ij over every column, the self column included (detached, as the official code);
* S_i = sum over the columns j != i (the self column excluded) of exp(l_ij - m_i);
* P_i = the columns j != i with key_labels[j] == labels[i] (the positives);
* L_i = -(1/|P_i|) sum_{j in P_i} (l_ij - m_i - log(S_i + eps)), eps = 1e-7 the official value.

A row with no positive (|P_i| = 0) has L_i = 0 and no gradient: the official code divides 0 by
0 there (NaN). "The self column" is column i of row i: with ``keys=None`` the anchors' own
diagonal; with a separate key set, key row i is taken as anchor row i's own copy (SupContrast's
``contrast_mode="one"``) unless ``exclude_self=False``, then no column is excluded.
"""

import torch

EPS = 1e-7  # SupContrast / PCKD ``helper/losses.py``


def supcon_contrast(
    anchors, labels, keys=None, key_labels=None, *, logit_scale, weight=None, eps=EPS, exclude_self=True
):
    """Per-row SupCon loss (R,) (times ``weight`` if given); gradients flow to the anchors, the
    keys and a learnable ``logit_scale``."""
    if keys is None:
        keys, key_labels = anchors, labels
    dtype = torch.float64 if torch.float64 in (anchors.dtype, keys.dtype) else torch.float32
    a, k = anchors.to(dtype), keys.to(dtype)
    logits = (a @ k.t()) * logit_scale
    R, N = logits.shape
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    rows = torch.arange(R, device=a.device)
    cols = torch.arange(N, device=a.device)
    self_col = (rows[:, None] == cols[None, :]) & bool(exclude_self)
    keep = (~self_col).to(dtype)
    positive = ((labels.reshape(-1, 1) == key_labels.reshape(1, -1)) & ~self_col).to(dtype)
    log_prob = logits - torch.log((logits.exp() * keep).sum(dim=1, keepdim=True) + eps)
    per_row = -(positive * log_prob).sum(dim=1) / positive.sum(dim=1).clamp_min(1.0)
    if weight is not None:
        per_row = per_row * weight.to(dtype)
    return per_row
