"""PCKD, Preview-based Category Contrastive Learning for Knowledge Distillation (Ding et al.,
2024; TCSVT 2025) as a drop-in loss, as the authors' code computes it (MuHeDing/PCKD at 610b3e8:
``helper/losses.py``, ``helper/loops.py``, ``train_student.py``).

The batch holds ``num_views`` (official: 4) views of each of B images, image-major: row
``b * V + v`` is view v of image b, view 0 the normal (un-augmented) one. With ``n`` the normal
rows and W, b the raw classifier weights and biases:

* CE: ``CE(logit_s[n], y)`` (batch mean), weight ``ce_weight`` (official 1, whatever ``-r``).
* L_KD: Hinton KD at T = 4 on the normal rows, ``sum_i w_i KD_i / B`` with the preview weights
  ``w`` (gradients flow through ``w``, as the official code), weight ``kd_weight`` (``-d``).
* L_CC, category contrast: the anchors ``cat([n(E_s f_s) W_s^T, n(E_t f_s) W_t^T])`` (2BV, C)
  (both heads take the student feature: ``embed_s = Linear(s_dim, s_dim)``, ``embed_t =
  Linear(s_dim, t_dim)``, L2-normalised) in a supervised-contrastive loss over all rows
  (:func:`dcdkernels.ops.supcon_contrast`, temperature ``cc_temperature`` = 4, eps 1e-7), each
  row times ``cc_temperature / cc_base_temperature`` (4 / 0.07); the two halves are added per
  row, weighted by the detached preview weights repeated over the views, summed and divided by
  BV. Weight ``cc_weight`` (``-b``).
* L_FA, feature alignment: ``2 - 2 mean(cos(MLP(f_s), f_t))`` over all rows, MLP =
  Linear-BN-ReLU-Linear ``s_dim -> 16 t_dim -> t_dim`` (BYOL's MLPHead). Weight ``fa_weight`` (``-f``).
* L_CA, classifier alignment: ``MSE([W_s | b_s], [W_t | b_t])``, and 0 when the shapes differ
  (the official ``loss_corr = 0``). Weight ``ca_weight`` (``-a``).

Preview weights (official): ``a_i = CE_i / CE`` on the normal rows, ``t = preview_base ** epoch``
(1.005; the official loop counts epochs from 1), ``w_i = 1`` if ``a_i <= t`` else ``exp(-a_i^2)``,
no floor. Defaults are the authors' README command ``-r 1 -a 1 -b 0.05 -f 20`` with ``-d``
unset (0): ``ce 1, ca 1, cc 0.05, fa 20, kd 0``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import _validate as V
from ._common import Embed, check_features, make_projector, no_autocast, rename_keys, to_loss_dtype

PREVIEW_SCHEDULES = ("official", "quantile", None)


class PCKDLoss(nn.Module):
    """PCKD loss on penultimate features, logits and classifiers of all views.

    Args (official names in brackets):
        s_dim, t_dim: student / teacher penultimate feature sizes (= classifier input sizes).
        n_cls: number of classes; if given, the classifiers and logits are checked against it.
        num_views: views per image in the batch (4, the official loop; 1 for plain batches).
        cc_temperature: SupCon temperature of L_CC (4, ``CategoryConLoss(opt, temperature=4)``).
        cc_base_temperature: its ``base_temperature`` (0.07): rows are scaled by T / base.
        kd_temperature: KD temperature (4, ``--kd_T``).
        ce_weight (1), ca_weight [a] (1), cc_weight [b] (0.05), fa_weight [f] (20), kd_weight [d] (0).
        fa_hidden_dim: hidden size of the alignment MLP (``16 * t_dim``, as the official).
        preview: the difficulty schedule (``set_epoch`` drives it): "official" (above);
            "quantile" (this library's variant, not the authors'): samples whose CE is above the
            q-quantile of the batch get ``hard_weight`` (0.5), q moving linearly from
            ``start_quantile`` (0.5) at epoch 0 to 1 at ``preview_epochs`` (120); None: all 1.
        preview_base: 1.005. min_weight: floor of the official weights (0: none, the official;
            > 0 is a departure that keeps very hard samples from underflowing to weight 0).
        detach_preview: False (official: the KD term's gradient flows through the weights);
            True is a departure that treats the weights as constants.
        backend: backend of the contrast op.

    ``forward(f_s, f_t, logit_s, logit_t, labels, fc_s, fc_t)``: features and logits of all
    B * V rows, ``labels`` (B,) per image, ``fc_s``/``fc_t`` the classifiers (``nn.Linear``), a
    weight tensor (C, dim) or a (weight, bias) pair; the teacher's tensors are detached here.
    Every input is checked (shapes, finite values, integer labels in range, classifier sizes)
    before any head runs, so a rejected call changes nothing (BatchNorm statistics included).
    ``last_terms`` holds the detached unweighted terms and ``last_weights`` the preview weights.
    Buffer ``epoch`` (1 at construction, set by :meth:`set_epoch`) is saved in the state dict.
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        *,
        n_cls: Optional[int] = None,
        num_views: int = 4,
        cc_temperature: float = 4.0,
        cc_base_temperature: float = 0.07,
        kd_temperature: float = 4.0,
        ce_weight: float = 1.0,
        ca_weight: float = 1.0,
        cc_weight: float = 0.05,
        fa_weight: float = 20.0,
        kd_weight: float = 0.0,
        fa_hidden_dim: Optional[int] = None,
        preview: Optional[str] = "official",
        preview_base: float = 1.005,
        min_weight: float = 0.0,
        detach_preview: bool = False,
        start_quantile: float = 0.5,
        preview_epochs: int = 120,
        hard_weight: float = 0.5,
        backend: str = "auto",
    ):
        super().__init__()
        if preview not in PREVIEW_SCHEDULES:
            raise ValueError(f"preview must be one of {PREVIEW_SCHEDULES}, got {preview!r}")
        if not 0.0 < hard_weight <= 1.0 or not 0.0 <= min_weight <= 1.0:
            raise ValueError("need 0 < hard_weight <= 1 and 0 <= min_weight <= 1")
        if not 0.0 <= start_quantile <= 1.0 or preview_epochs < 1 or preview_base < 1.0:
            raise ValueError("need 0 <= start_quantile <= 1, preview_epochs >= 1, preview_base >= 1")
        if min(cc_temperature, cc_base_temperature, kd_temperature) <= 0:
            raise ValueError("temperatures must be > 0")
        if not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be an int >= 1, got {num_views!r}")
        if n_cls is not None and (not isinstance(n_cls, int) or n_cls < 1):
            raise ValueError(f"n_cls must be an int >= 1, got {n_cls!r}")
        self.s_dim, self.t_dim, self.n_cls, self.num_views = s_dim, t_dim, n_cls, num_views
        self.cc_temperature, self.cc_base_temperature = float(cc_temperature), float(cc_base_temperature)
        self.kd_temperature = float(kd_temperature)
        self.ce_weight, self.fa_weight, self.ca_weight = float(ce_weight), float(fa_weight), float(ca_weight)
        self.cc_weight, self.kd_weight = float(cc_weight), float(kd_weight)
        self.preview, self.preview_base, self.min_weight = preview, float(preview_base), float(min_weight)
        self.detach_preview = bool(detach_preview)
        self.start_quantile, self.preview_epochs = float(start_quantile), int(preview_epochs)
        self.hard_weight = float(hard_weight)
        self.backend = backend
        self.embed_s = Embed(s_dim, s_dim)  # anchors for the student's classifier
        self.embed_t = Embed(s_dim, t_dim)  # anchors for the teacher's classifier (teacher space)
        self.align_mlp = make_projector(s_dim, fa_hidden_dim or 16 * t_dim, t_dim)
        self.register_buffer("epoch", torch.ones((), dtype=torch.int64))
        self._epoch = 1
        self.register_load_state_dict_pre_hook(_remap_official_keys)
        self.register_load_state_dict_post_hook(_refresh_epoch)
        self.last_terms, self.last_weights = {}, None

    @classmethod
    def from_opt(cls, opt, **kwargs) -> "PCKDLoss":
        """From the official ``train_student.py`` options: ``s_dim``, ``t_dim``, ``alpha`` (``-a``),
        ``beta`` (``-b``), ``delta`` (``-d``), ``ff`` (``-f``), ``kd_T``, ``n_cls``; the short names
        ``a``, ``b``, ``d``, ``f`` are accepted too, and missing weights take the official argparse
        default 0. ``r``/``gamma`` is ignored, as the official PCKD branch adds CE with weight 1;
        ``feat_dim`` is ignored, as no PCKD head uses it. Keyword arguments override."""

        def opt_value(long, short, default):
            for name in (long, short):
                if getattr(opt, name, None) is not None:
                    return float(getattr(opt, name))
            return default

        args = dict(
            s_dim=opt.s_dim,
            t_dim=opt.t_dim,
            n_cls=getattr(opt, "n_cls", None),
            ca_weight=opt_value("alpha", "a", 0.0),
            cc_weight=opt_value("beta", "b", 0.0),
            kd_weight=opt_value("delta", "d", 0.0),
            fa_weight=opt_value("ff", "f", 0.0),
            kd_temperature=opt_value("kd_T", "kd_T", 4.0),
            ce_weight=1.0,
        )
        args.update(kwargs)
        return cls(**args)

    def set_epoch(self, epoch: int) -> None:
        """Set the training epoch that drives the preview schedule (the authors count from 1)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = int(epoch)
        self.epoch.fill_(self._epoch)

    def preview_weights(self, logit_s: Tensor, labels: Tensor) -> Tensor:
        """Per-sample weights from the student's per-sample CE on the normal rows (B, C).
        Differentiable for the official schedule unless ``detach_preview``."""
        if self.preview is None:
            return torch.ones(labels.shape[0], dtype=to_loss_dtype(logit_s).dtype, device=logit_s.device)
        if self.preview != "official" or self.detach_preview:
            logit_s = logit_s.detach()
        logit_s = to_loss_dtype(logit_s)
        g = F.cross_entropy(logit_s, labels, reduction="none")
        if self.preview == "official":
            a = g / F.cross_entropy(logit_s, labels)  # the official divides by the mean CE term itself
            t = self.preview_base**self._epoch
            hard = torch.exp(-(a * a))
            if self.min_weight > 0:
                hard = hard.clamp_min(self.min_weight)
            return torch.where(a <= t, torch.ones_like(a), hard)
        q = self.start_quantile + (1.0 - self.start_quantile) * min(self._epoch / self.preview_epochs, 1.0)
        threshold = torch.quantile(g, q)
        return torch.where(g > threshold, torch.full_like(g, self.hard_weight), torch.ones_like(g))

    def _check(self, f_s, f_t, logit_s, logit_t, labels, fc_s, fc_t):
        """Every check of a call, before any head runs. Returns (B, w_s, b_s, w_t, b_t, labels)."""
        rows = check_features(
            f_s=(f_s, self.s_dim),
            f_t=(f_t, self.t_dim),
            logit_s=(logit_s, None),
            logit_t=(logit_t, logit_s.shape[-1] if isinstance(logit_s, Tensor) else None),
        )
        if logit_s.dim() != 2:
            raise ValueError(f"logit_s must be (rows, C), got shape {tuple(logit_s.shape)}")
        C = logit_s.shape[1]
        if self.n_cls is not None and C != self.n_cls:
            raise ValueError(f"logit_s has {C} classes but the loss was built for n_cls = {self.n_cls}")
        V_ = self.num_views
        if rows % V_:
            raise ValueError(f"f_s has {rows} rows, not a multiple of num_views = {V_} (rows are image-major views)")
        B = rows // V_
        if (
            not isinstance(labels, Tensor)
            or labels.dtype not in (torch.int64, torch.int32)
            or labels.numel() != B
            or labels.device != f_s.device
        ):
            raise ValueError(
                f"labels must be a ({B},) int64 tensor of class ids (one per image) on {f_s.device}, got "
                f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__} "
                f"{tuple(labels.shape) if isinstance(labels, Tensor) else ''}"
            )
        w_s, b_s = _weight_bias("fc_s", fc_s)
        w_t, b_t = _weight_bias("fc_t", fc_t)
        for name, w, b, dim in (("fc_s", w_s, b_s, self.s_dim), ("fc_t", w_t, b_t, self.t_dim)):
            if w.dim() != 2 or w.shape != (C, dim):
                raise ValueError(
                    f"{name} weight must be (C, {dim}) = ({C}, {dim}) (C from logit_s), got shape {tuple(w.shape)}"
                )
            if b is not None and b.shape != (C,):
                raise ValueError(f"{name} bias must be ({C},), got shape {tuple(b.shape)}")
            if w.device != f_s.device:
                raise ValueError(f"{name} is on {w.device} but f_s is on {f_s.device}")
        labels = labels.reshape(-1).to(torch.int64)
        checks = V.ValueChecks()
        for name, t in (
            ("f_s", f_s),
            ("f_t", f_t),
            ("logit_s", logit_s),
            ("logit_t", logit_t),
            ("fc_s", w_s),
            ("fc_t", w_t),
        ):
            checks.finite(name, t)
        checks.index_in_range("labels", labels, C)
        checks.run()
        return B, w_s, b_s, w_t.detach(), None if b_t is None else b_t.detach(), labels

    def forward(self, f_s: Tensor, f_t: Tensor, logit_s: Tensor, logit_t: Tensor, labels: Tensor, fc_s, fc_t) -> Tensor:
        B, w_s, b_s, w_t, b_t, labels = self._check(f_s, f_t, logit_s, logit_t, labels, fc_s, fc_t)
        V_, rows = self.num_views, B * self.num_views
        f_s = f_s.reshape(rows, -1)
        f_t = to_loss_dtype(f_t.reshape(rows, -1).detach())
        nor = slice(0, rows, V_)
        weights = self.preview_weights(logit_s[nor], labels)
        z_s, z_t = self.embed_s(f_s), self.embed_t(f_s)
        aligned = self.align_mlp(f_s)
        with no_autocast(z_s.device):
            logit_s32 = to_loss_dtype(logit_s[nor])
            logit_t32 = to_loss_dtype(logit_t[nor].detach())
            anchors = torch.cat([z_s @ to_loss_dtype(w_s).t(), z_t @ to_loss_dtype(w_t).t()])  # (2BV, C)
            view_labels = labels.repeat_interleave(V_)
            view_w = weights.detach().repeat_interleave(V_).to(anchors.dtype)
            row_w = torch.cat([view_w, view_w]) * (self.cc_temperature / self.cc_base_temperature / rows)
            l_cc = ops.supcon_contrast(
                anchors,
                torch.cat([view_labels, view_labels]),
                logit_scale=1.0 / self.cc_temperature,
                weight=row_w,
                reduction="sum",
                backend=self.backend,
            )
            T = self.kd_temperature
            kd_rows = F.kl_div(
                F.log_softmax(logit_s32 / T, dim=1), F.softmax(logit_t32 / T, dim=1), reduction="none"
            ).sum(dim=1) * (T * T / B)
            l_kd = torch.dot(weights.to(kd_rows.dtype), kd_rows)
            a_n = F.normalize(to_loss_dtype(aligned), dim=-1)
            l_fa = 2 - 2 * (a_n * F.normalize(f_t, dim=-1)).sum(dim=-1).mean()
            fc_sm = _joined(w_s, b_s)
            fc_tm = _joined(w_t, b_t)
            l_ca = F.mse_loss(fc_sm, fc_tm) if fc_sm.shape == fc_tm.shape else anchors.new_zeros(())
            l_ce = F.cross_entropy(logit_s32, labels)
        total = (
            self.ce_weight * l_ce
            + self.fa_weight * l_fa
            + self.ca_weight * l_ca
            + self.cc_weight * l_cc
            + self.kd_weight * l_kd
        )
        self.last_terms = {k: v.detach() for k, v in dict(ce=l_ce, fa=l_fa, ca=l_ca, cc=l_cc, kd=l_kd).items()}
        self.last_weights = weights.detach()
        return total

    def extra_repr(self) -> str:
        return (
            f"s_dim={self.s_dim}, t_dim={self.t_dim}, num_views={self.num_views}, preview={self.preview!r}, "
            f"epoch={self._epoch}, backend={self.backend!r}"
        )


def _joined(w: Tensor, b: Optional[Tensor]) -> Tensor:
    """The official ``torch.cat(list(fc.parameters()), 1)``: [W | b] (C, dim + 1), or W alone."""
    w = to_loss_dtype(w)
    return w if b is None else torch.cat([w, to_loss_dtype(b)[:, None]], 1)


def _weight_bias(name, fc):
    if isinstance(fc, nn.Module):
        w, b = getattr(fc, "weight", None), getattr(fc, "bias", None)
    elif isinstance(fc, Tensor):
        w, b = fc, None
    elif isinstance(fc, (tuple, list)) and len(fc) == 2:
        w, b = fc
    else:
        raise TypeError(f"{name} must be an nn.Linear, a weight tensor (C, dim) or a (weight, bias) pair")
    if not isinstance(w, Tensor) or not w.is_floating_point() or (b is not None and not isinstance(b, Tensor)):
        raise TypeError(f"{name} must hold a floating weight tensor (C, dim) and an optional bias tensor (C,)")
    return w, b


def _remap_official_keys(module, state_dict, prefix, *args) -> None:
    """The official ``CategoryConLoss`` / ``AlignLoss`` keys (Embed wraps a Linear) -> ours."""
    rename_keys(
        state_dict,
        prefix,
        [(f"{head}.linear.{p}", f"{head}.{p}") for head in ("embed_s", "embed_t") for p in ("weight", "bias")],
    )


def _refresh_epoch(module, incompatible_keys) -> None:
    module._epoch = int(module.epoch)
