"""DCD, Discriminative and Consistent Distillation (Giakoumoglou & Stathaki 2024), first
published as ICD (Invariant Consistency Distillation). Official code: giakoumoglou/distillers,
``distillers/DCD.py`` and ``distillers/ICD.py`` (docs/math.md §3).

In-batch form (the official loss): ``z = normalize(Linear(f))``, ``s = min(exp(theta), 10)``,
``logits = s z_s z_t^T + b`` (B, B),
``L = CE(logits, arange) + alpha * KL(softmax(logits, 0)^T || softmax(logits, 1))`` (batchmean).
Memory form (this library's extension): the same loss with bank negatives, scored by the fused
dual-bank pass (docs/math.md §1c); with the current batch as the bank it equals the in-batch form.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..memory import check_loadable
from ._common import (
    EMBED_LINEAR_KEYS,
    Embed,
    PairedMemoryLoss,
    check_features,
    finite_checks,
    no_autocast,
    remap_paired_memory_keys,
    rename_keys,
)


class DCDLoss(PairedMemoryLoss):
    """Discriminative and Consistent Distillation loss.

    Args:
        s_dim, t_dim, feat_dim: as the official ``opt`` (heads ``Linear(dim, feat_dim)`` + L2 norm).
        alpha: weight of the consistency KL (0.5). init_log_scale: theta at init (1.0, the official
            ``init_tau``; the scale is ``s = min(exp(theta), max_scale)``). max_scale: 10.0.
        n_data: None (default) for the official in-batch loss; the dataset size N for the memory
            form, which keeps ``bank_s``/``bank_t`` (as CRD) and draws ``nce_k`` negatives per row.
        nce_k: negatives per row in the memory form (default 16384, or pass ``contrast_idx``).
        bank_momentum: momentum of the bank update in the memory form (0.5, as CRD).
        backend: backend of every op. bank_dtype, seed, memory_mode, process_group, bank_init: as
            :class:`CRDLoss` (memory form only; the in-batch form holds no memory and accepts only
            ``memory_mode="local"``).
        trainable: True (default): the learnable scale above. False: the official
            ``trainable=False``: the scale is fixed to ``nce_t`` itself (0.07; the official code sets
            ``params.tau = nce_t`` and multiplies the logits by it, no exp and no clamp), held in
            the buffer ``fixed_scale``, and the bias is frozen. An official ``trainable=False``
            state dict (``params.tau`` = 0.07) loads as is into a module built with ``trainable=False``.
        nce_t: the fixed scale when ``trainable=False`` (official ``opt.nce_t``, 0.07).

    Parameters: ``log_scale`` (theta, official ``params.tau``) and ``bias`` (official ``params.b``).
    A shared shift of all logits cancels in both softmaxes, so the loss does not depend on the
    bias and its gradient is exactly 0: the bias never enters the logits here and receives an
    exact zero gradient (a ``0 * bias`` term), on every backend. (In the official code autograd
    returns rounding noise, ``sum_j p_j - 1`` ~ 1e-8, instead of 0.) The parameter is kept for
    state-dict fidelity; ``load_state_dict`` also accepts the official keys ``params.tau``,
    ``params.b`` and ``embed_*.linear.*`` (ICD's Embed wrapper).

    ``forward(f_s, f_t, idx=None, contrast_idx=None)``:

    * in-batch form: ``idx``/``contrast_idx`` are ignored. The consistency KL needs the whole
      (B, B) logits matrix anyway, so the CE is taken from that same matrix with
      ``F.cross_entropy`` (one product, as the official code) on every backend: a fused
      ``dense_contrast`` here would only add a second product and its call overhead (measured:
      0.72x eager at B = 64, see benchmarks/results).
    * memory form: ``idx`` (B,) dataset rows; ``contrast_idx`` (B, K+1) column 0 the positive, or
      in-kernel sampling as CRD. One ``dual_sampled_contrast(loss="infonce", consistency=alpha)``
      pass: student anchors vs ``bank_t`` rows give the CE, teacher anchors vs ``bank_s`` rows give
      p^t, and the loss is ``mean_b L^s_b + alpha * mean_b KL(p^t_b || p^s_b)``. The teacher-anchored
      CE L^t is NOT added: the official loss is asymmetric (CE over rows only; the column softmax
      enters only through the KL). Banks are detached memories, so gradients reach z_s through the
      CE and the KL and z_t through the KL only; then (training mode) the banks are updated at
      ``idx`` with z_s / z_t (momentum ``bank_momentum``), after scoring.
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        feat_dim: int = 128,
        alpha: float = 0.5,
        init_log_scale: float = 1.0,
        max_scale: float = 10.0,
        *,
        n_data: Optional[int] = None,
        nce_k: Optional[int] = None,
        bank_momentum: float = 0.5,
        backend: str = "auto",
        bank_dtype: torch.dtype = torch.float32,
        seed: Optional[int] = None,
        memory_mode: str = "local",
        process_group=None,
        bank_init: Optional[str] = None,
        trainable: bool = True,
        nce_t: float = 0.07,
    ):
        super().__init__()
        if not isinstance(trainable, bool):
            raise TypeError(f"trainable must be a bool, got {type(trainable).__name__}")
        if not trainable and not (isinstance(nce_t, (int, float)) and 0 < nce_t < float("inf")):
            raise ValueError(f"nce_t (the fixed scale) must be a finite float > 0, got {nce_t!r}")
        if alpha < 0 or max_scale <= 0:
            raise ValueError(f"need alpha >= 0 and max_scale > 0, got {alpha}, {max_scale}")
        self.feat_dim, self.alpha, self.max_scale, self.backend = feat_dim, float(alpha), float(max_scale), backend
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.trainable = trainable
        if trainable:
            self.log_scale = nn.Parameter(torch.tensor(float(init_log_scale)))
        else:
            self.register_buffer("fixed_scale", torch.tensor(float(nce_t)))
        self.bias = nn.Parameter(torch.tensor(0.0), requires_grad=trainable)
        self.memory = None
        self.nce_k = int(nce_k if nce_k is not None else 16384)
        self.bank_momentum = float(bank_momentum)
        if n_data is not None:
            self._init_memory(
                n_data,
                feat_dim,
                bank_dtype=bank_dtype,
                seed=seed,
                memory_mode=memory_mode,
                process_group=process_group,
                backend=backend,
                bank_init=bank_init,
            )
        elif memory_mode != "local" or process_group is not None:
            raise ValueError("the in-batch DCD loss holds no memory: memory_mode and process_group need n_data")
        self.register_load_state_dict_pre_hook(_remap_official_keys)

    @classmethod
    def from_opt(
        cls,
        opt,
        max_tau: float = 10.0,
        alpha: float = 0.5,
        init_tau: float = 1.0,
        init_b: float = 0.0,
        trainable: bool = True,
        **kwargs,
    ) -> "DCDLoss":
        """As the official ``DCDLoss(opt, max_tau, alpha, init_tau, init_b, trainable)``: ``opt.s_dim``,
        ``opt.t_dim``, ``opt.feat_dim`` (128 if absent), ``opt.nce_t`` (0.07 if absent; the fixed
        scale when ``trainable=False``). Keyword arguments are passed on (``backend``, ``n_data``, ...)."""
        args = dict(
            s_dim=opt.s_dim,
            t_dim=opt.t_dim,
            feat_dim=getattr(opt, "feat_dim", 128),
            alpha=alpha,
            init_log_scale=init_tau,
            max_scale=max_tau,
            trainable=trainable,
            nce_t=getattr(opt, "nce_t", 0.07),
        )
        args.update(kwargs)
        module = cls(**args)
        with torch.no_grad():
            module.bias.fill_(float(init_b) if trainable else 0.0)
        return module

    def logit_scale(self) -> Tensor:
        """``s = min(exp(theta), max_scale)`` (zero gradient to theta once clamped, as the official
        ``exp().clamp(0, max_tau)``); with ``trainable=False`` the fixed ``nce_t`` itself."""
        if not self.trainable:
            return self.fixed_scale
        return self.log_scale.exp().clamp(0, self.max_scale)

    def forward(
        self, f_s: Tensor, f_t: Tensor, idx: Optional[Tensor] = None, contrast_idx: Optional[Tensor] = None
    ) -> Tensor:
        if self.memory is not None:
            idx, index, num_negatives = self._check_memory_inputs(f_s, f_t, idx, contrast_idx, self.nce_k)
        else:
            check_features(f_s=(f_s, self.embed_s.in_features), f_t=(f_t, self.embed_t.in_features))
            finite_checks(f_s=f_s, f_t=f_t).run(deferrable=True)  # no state to guard, but never a silent NaN loss
        z_s, z_t = self.embed_s(f_s), self.embed_t(f_t)
        with no_autocast(z_s.device):
            s = self.logit_scale()
            if self.memory is not None:
                loss = self._memory_loss(z_s, z_t, s, idx, index, num_negatives)
            else:
                loss = self._in_batch_loss(z_s, z_t, s)
        return loss + 0.0 * self.bias  # the bias cancels in every softmax: exact zero gradient

    def _in_batch_loss(self, z_s: Tensor, z_t: Tensor, s: Tensor) -> Tensor:
        B = z_s.shape[0]
        target = torch.arange(B, device=z_s.device)
        logits = (z_s @ z_t.t()) * s.to(z_s.dtype)  # (B, B), rows: student anchors
        ce = F.cross_entropy(logits, target)
        log_p_s = F.log_softmax(logits, dim=1)
        log_p_t = F.log_softmax(logits.t(), dim=1)  # = log softmax(logits, 0)^T: teacher anchors
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum() / B  # kl_div(log_p_s, p_t, "batchmean")
        return ce + self.alpha * kl

    def _memory_loss(self, z_s, z_t, s, idx, index, num_negatives) -> Tensor:
        out = self.memory.score(
            z_s,
            z_t,
            index,
            logit_scale=s,
            loss="infonce",
            consistency=self.alpha,
            num_negatives=num_negatives,
            update_state=self.training,
            update_index=idx,
        )
        loss = out.loss_s.mean() + out.consistency.mean()
        if self.training:
            self.memory.update_(idx, z_s.detach(), z_t.detach(), self.bank_momentum)
        return loss

    def extra_repr(self) -> str:
        mem = (
            (
                f", n_data={self.n_data}, nce_k={self.nce_k}, bank_momentum={self.bank_momentum}, "
                f"memory_mode={self.memory_mode!r}"
            )
            if self.memory is not None
            else ""
        )
        fixed = "" if self.trainable else f", trainable=False, fixed_scale={float(self.fixed_scale)}"
        return f"alpha={self.alpha}, max_scale={self.max_scale}{fixed}{mem}, backend={self.backend!r}"


class ICDLoss(DCDLoss):
    """ICD, Invariant Consistency Distillation: the first published name of :class:`DCDLoss`
    (arXiv v1 of Giakoumoglou & Stathaki 2024; official ``distillers/ICD.py``).

    The same loss: in-batch InfoNCE with a learnable scale ``min(exp(theta), 10)`` and bias, plus
    the "invariance penalty" ``alpha * KL(softmax(logits, 0)^T || softmax(logits, 1))`` (which the
    later DCD versions call the consistency term). The official ICD code wraps its heads in an
    ``Embed`` (``embed_s.linear.*``); those keys load here. All arguments as :class:`DCDLoss`.
    """


def _remap_official_keys(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    # official trainable=False: params.tau holds the multiplier itself (nce_t), our fixed_scale
    rename_keys(
        state_dict,
        prefix,
        [
            ("params.tau", "log_scale" if module.trainable else "fixed_scale"),
            ("params.b", "bias"),
            *EMBED_LINEAR_KEYS,
        ],
    )
    if module.memory is not None:
        remap_paired_memory_keys(module, state_dict, prefix)
    check_loadable(module, state_dict, prefix)
