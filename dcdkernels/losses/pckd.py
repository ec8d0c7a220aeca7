"""PCKD, Preview-based Category Contrastive Learning for Knowledge Distillation (Ding et al.,
2024; TCSVT 2025) as a drop-in loss (SPEC §3).

Terms (returned total = ce_weight * CE + fa_weight * L_FA + ca_weight * L_CA + cc_weight * L_CC
+ kd_weight * L_KD):

* L_CC, category contrast: the student feature, embedded (``Linear`` + L2 norm), is contrasted
  with the category centres = L2-normalised classifier weight rows, target = label, InfoNCE at
  temperature ``cc_temperature``: once against the student classifier (``embed_s``, key gradients
  flow to the student's classifier weights) and once against the teacher classifier (``embed_t``
  maps into the teacher feature space; teacher weights detached). Fused: ``dense_contrast``.
* L_FA, feature alignment: ``|| n(MLP(f_s)) - n(f_t) ||^2 = 2 - 2 cos`` (MSE of the
  L2-normalised features, as the authors' ``AlignLoss``), batch mean.
* L_CA, classifier alignment: MSE between the student and teacher classifier weights (and biases,
  when both are given), through a learnable ``Linear(s_dim, t_dim)`` when the dims differ.
* L_KD: Hinton KD at T = 4, ``T^2 KL(p_t || p_s)`` per sample.
* CE of the student logits (unweighted; set ``ce_weight=0`` to add your own).

Preview weights (on L_CC and L_KD, per sample, never 0; weighted terms are
``sum_i w_i L_i / B``): the difficulty ``g_i`` is the student's per-sample CE, detached.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ._common import Embed, check_features, make_projector, no_autocast, to_loss_dtype

PREVIEW_SCHEDULES = ("official", "quantile", None)


class PCKDLoss(nn.Module):
    """PCKD loss on penultimate features, logits and classifier weights.

    Args:
        s_dim, t_dim: student / teacher penultimate feature sizes (= classifier input sizes).
        cc_temperature: temperature of the category contrast (0.1; centres and anchors are unit).
        kd_temperature: KD temperature (4).
        ce_weight, fa_weight, ca_weight, cc_weight, kd_weight: term weights (1.0 each).
        fa_hidden_dim: hidden size of the alignment MLP (Linear-BN-ReLU-Linear); default
            ``16 * t_dim`` as the authors' code.
        preview: the difficulty schedule (``set_epoch`` drives it):
            "official" (default): the authors' released code (MuHeDing/PCKD ``helper/loops.py``):
            relative difficulty ``a_i = g_i / mean(g)``, threshold ``t = preview_base ** epoch``
            (``preview_base = 1.005``), weight 1 if ``a_i <= t`` else ``exp(-a_i^2)``, floored at
            ``min_weight`` (the authors' weight underflows to exactly 0 for a_i > ~10).
            "quantile": samples with ``g_i`` above the q-quantile of the batch get ``hard_weight``
            (0.5), others 1; q moves linearly from ``start_quantile`` (0.5) at epoch 0 to 1.0 at
            ``preview_epochs`` (120), after which no sample is down-weighted.
            None: all weights 1.
        backend: backend of the contrast op.

    ``forward(f_s, f_t, logit_s, logit_t, labels, fc_s, fc_t)``: ``fc_s``/``fc_t`` are the
    classifiers (``nn.Linear``) or their weight tensors (C, dim). The teacher's tensors are
    detached here. ``last_terms`` holds the detached terms and ``last_weights`` the preview weights.
    Buffer ``epoch`` (set by :meth:`set_epoch`) is saved in the state dict.
    """

    def __init__(self, s_dim: int, t_dim: int, *, cc_temperature: float = 0.1, kd_temperature: float = 4.0,
                 ce_weight: float = 1.0, fa_weight: float = 1.0, ca_weight: float = 1.0, cc_weight: float = 1.0,
                 kd_weight: float = 1.0, fa_hidden_dim: Optional[int] = None, preview: Optional[str] = "official",
                 preview_base: float = 1.005, min_weight: float = 1e-6, start_quantile: float = 0.5,
                 preview_epochs: int = 120, hard_weight: float = 0.5, backend: str = "auto"):
        super().__init__()
        if preview not in PREVIEW_SCHEDULES:
            raise ValueError(f"preview must be one of {PREVIEW_SCHEDULES}, got {preview!r}")
        if not 0.0 < hard_weight <= 1.0 or not 0.0 < min_weight <= 1.0:
            raise ValueError("hard_weight and min_weight must be in (0, 1]: hard samples are down-weighted, never dropped")
        if not 0.0 <= start_quantile <= 1.0 or preview_epochs < 1 or preview_base < 1.0:
            raise ValueError("need 0 <= start_quantile <= 1, preview_epochs >= 1, preview_base >= 1")
        if cc_temperature <= 0 or kd_temperature <= 0:
            raise ValueError("temperatures must be > 0")
        self.s_dim, self.t_dim = s_dim, t_dim
        self.cc_temperature, self.kd_temperature = float(cc_temperature), float(kd_temperature)
        self.ce_weight, self.fa_weight, self.ca_weight = float(ce_weight), float(fa_weight), float(ca_weight)
        self.cc_weight, self.kd_weight = float(cc_weight), float(kd_weight)
        self.preview, self.preview_base, self.min_weight = preview, float(preview_base), float(min_weight)
        self.start_quantile, self.preview_epochs = float(start_quantile), int(preview_epochs)
        self.hard_weight = float(hard_weight)
        self.backend = backend
        self.embed_s = Embed(s_dim, s_dim)  # anchors for the student's centres
        self.embed_t = Embed(s_dim, t_dim)  # anchors for the teacher's centres (teacher space)
        self.align_mlp = make_projector(s_dim, fa_hidden_dim or 16 * t_dim, t_dim)
        self.ca_proj = nn.Identity() if s_dim == t_dim else nn.Linear(s_dim, t_dim, bias=False)
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))
        self._epoch = 0
        self.register_load_state_dict_post_hook(_refresh_epoch)
        self.last_terms, self.last_weights = {}, None

    def set_epoch(self, epoch: int) -> None:
        """Set the training epoch that drives the preview schedule (the authors count from 1)."""
        if epoch < 0:
            raise ValueError("epoch must be >= 0")
        self._epoch = int(epoch)
        self.epoch.fill_(self._epoch)

    @torch.no_grad()
    def preview_weights(self, logit_s: Tensor, labels: Tensor) -> Tensor:
        """Per-sample weights in (0, 1] from the detached per-sample student CE."""
        g = F.cross_entropy(to_loss_dtype(logit_s.detach()), labels, reduction="none")
        if self.preview is None:
            return torch.ones_like(g)
        if self.preview == "official":
            a = g / g.mean().clamp_min(torch.finfo(g.dtype).tiny)
            t = self.preview_base ** self._epoch
            return torch.where(a <= t, torch.ones_like(a), torch.exp(-a * a).clamp_min(self.min_weight))
        q = self.start_quantile + (1.0 - self.start_quantile) * min(self._epoch / self.preview_epochs, 1.0)
        threshold = torch.quantile(g, q)
        return torch.where(g > threshold, torch.full_like(g, self.hard_weight), torch.ones_like(g))

    def forward(self, f_s: Tensor, f_t: Tensor, logit_s: Tensor, logit_t: Tensor, labels: Tensor, fc_s, fc_t) -> Tensor:
        B = check_features(f_s=(f_s, self.s_dim), f_t=(f_t, self.t_dim), logit_s=(logit_s, None),
                           logit_t=(logit_t, logit_s.shape[-1] if isinstance(logit_s, Tensor) else None))
        w_s, b_s = _weight_bias(fc_s)
        w_t, b_t = _weight_bias(fc_t)
        w_t = w_t.detach()
        b_t = None if b_t is None else b_t.detach()
        if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32) or labels.numel() != B:
            raise ValueError(f"labels must be a ({B},) int64 tensor of class ids, got "
                             f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__} "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else ''}")
        if w_s.shape[0] != logit_s.shape[1] or w_t.shape[0] != logit_s.shape[1]:
            raise ValueError(f"fc_s/fc_t have {w_s.shape[0]}/{w_t.shape[0]} classes but logit_s has {logit_s.shape[1]}")
        f_s = f_s.reshape(B, -1)
        f_t = to_loss_dtype(f_t.reshape(B, -1).detach())
        labels = labels.reshape(-1)
        weights = self.preview_weights(logit_s, labels)
        z_s, z_t = self.embed_s(f_s), self.embed_t(f_s)
        aligned = self.align_mlp(f_s)
        w_s_proj = self.ca_proj(w_s)
        with no_autocast(z_s.device):
            logit_s32 = to_loss_dtype(logit_s)
            logit_t32 = to_loss_dtype(logit_t.detach())
            centres_s = F.normalize(to_loss_dtype(w_s), dim=1)
            centres_t = F.normalize(to_loss_dtype(w_t), dim=1)
            scale = 1.0 / self.cc_temperature
            l_cc = (ops.dense_contrast(z_s, centres_s, labels, logit_scale=scale, weight=weights, reduction="mean",
                                       backend=self.backend)
                    + ops.dense_contrast(z_t, centres_t, labels, logit_scale=scale, weight=weights, reduction="mean",
                                         backend=self.backend))
            T = self.kd_temperature
            log_p_s = F.log_softmax(logit_s32 / T, dim=1)
            log_p_t = F.log_softmax(logit_t32 / T, dim=1)
            kd_rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * (T * T)
            l_kd = (weights * kd_rows).sum() / B
            l_fa = (F.normalize(to_loss_dtype(aligned), dim=1) - F.normalize(f_t, dim=1)).pow(2).sum(dim=1).mean()
            l_ca = F.mse_loss(to_loss_dtype(w_s_proj), to_loss_dtype(w_t))
            if b_s is not None and b_t is not None:
                l_ca = F.mse_loss(torch.cat([to_loss_dtype(w_s_proj), to_loss_dtype(b_s)[:, None]], 1),
                                  torch.cat([to_loss_dtype(w_t), to_loss_dtype(b_t)[:, None]], 1))
            l_ce = F.cross_entropy(logit_s32, labels)
        total = (self.ce_weight * l_ce + self.fa_weight * l_fa + self.ca_weight * l_ca + self.cc_weight * l_cc
                 + self.kd_weight * l_kd)
        self.last_terms = {k: v.detach() for k, v in
                           dict(ce=l_ce, fa=l_fa, ca=l_ca, cc=l_cc, kd=l_kd).items()}
        self.last_weights = weights
        return total

    def extra_repr(self) -> str:
        return (f"s_dim={self.s_dim}, t_dim={self.t_dim}, preview={self.preview!r}, epoch={self._epoch}, "
                f"backend={self.backend!r}")


def _weight_bias(fc):
    if isinstance(fc, nn.Module):
        return fc.weight, getattr(fc, "bias", None)
    if isinstance(fc, Tensor):
        return fc, None
    if isinstance(fc, (tuple, list)) and len(fc) == 2:
        return fc[0], fc[1]
    raise TypeError("fc_s / fc_t must be an nn.Linear, a weight tensor (C, dim) or a (weight, bias) pair")


def _refresh_epoch(module, incompatible_keys) -> None:
    module._epoch = int(module.epoch)

