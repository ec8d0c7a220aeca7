"""CRD (Tian, Krishnan & Isola, ICLR 2020) as a drop-in replacement of RepDistiller's
``crd.criterion.CRDLoss``, scored with one fused dual-bank NCE pass (SPEC §1b, §1c, §3).

Faithful to RepDistiller (``crd/criterion.py``, ``crd/memory.py``):

* heads ``embed_s``/``embed_t``: ``Linear(dim, feat_dim)`` + L2 normalisation (flattened input);
* ``bank_s`` = ``memory_v1`` (student embeddings), ``bank_t`` = ``memory_v2`` (teacher),
  initialised ``U(-stdv, stdv)``, ``stdv = 1/sqrt(feat_dim/3)``, with the same RNG calls in the
  same order, so under the same ``torch.manual_seed`` both libraries start from identical state;
* student anchor vs ``bank_t`` rows and teacher anchor vs ``bank_s`` rows at the same indices,
  ``P = exp(<z, row>/T) / Z``, ``ContrastLoss`` with ``c = K/N`` and ``eps = 1e-7``;
* ``Z = N * mean(exp(u))`` over the first batch's B(K+1) scores, one per direction, then frozen;
* loss = ``mean_b L^s_b + mean_b L^t_b``; then the momentum update of both banks at ``idx``.

Departures (all documented in the class docstring): Z is computed in log space from the per-row
LSE of a first no-grad InfoNCE pass (no fp32/fp16 ``exp(1/T)`` overflow); the optional EMA of Z;
in-kernel uniform negatives from a counter-based stream instead of the AliasMethod sampler; state
changes only in training mode.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .. import ops
from ._common import (Embed, MemoryBankState, check_batch_index, check_features, log_partition_from_lse,
                      no_autocast, rename_keys)


class CRDLoss(MemoryBankState):
    """Contrastive Representation Distillation loss over two memory banks.

    Args (RepDistiller's names and defaults):
        s_dim, t_dim: student / teacher feature sizes (inputs are flattened, as RepDistiller).
        n_data: dataset size N = rows of each bank.
        feat_dim: embedding size (128). nce_k: negatives per anchor K (16384).
        nce_t: temperature T (0.07), logit scale 1/T. nce_m: bank momentum (0.5).
        z_momentum: ``None`` (default) freezes Z after the first batch, as RepDistiller. A float m
            (CMC's suggestion: 0.99) instead updates ``Z <- m Z + (1 - m) Z_batch`` after every
            later batch, after scoring it (the batch is always scored with the previous Z).
        backend: backend of every op ("auto", "eager", "cpu", "cuda", "triton").
        bank_dtype: storage dtype of the banks (fp32 default; bf16 halves the memory).
        seed: seed of the in-kernel negative sampler (drawn from torch's RNG when None).

    ``forward(f_s, f_t, idx, contrast_idx=None)``: ``idx`` (B,) the dataset rows of the batch;
    ``contrast_idx`` (B, K+1) with column 0 the positive (RepDistiller's CIFAR dataset), or None to
    draw K uniform negatives per row inside the kernel from the (seed, offset) stream of the
    ``rng_state`` buffer (the offset advances by B*K per training step, so a resumed run continues
    the same stream; ``dcdkernels.sample_negatives`` reproduces the indices).

    Buffers: ``bank_s``, ``bank_t``, ``log_z`` = (log Z_s, log Z_t) (NaN until the first training
    batch; Z_s belongs to the student direction, RepDistiller's ``Z_v1``), ``rng_state``.

    First batch: the NCE loss needs Z before scoring, so a no-grad InfoNCE pass of the same batch
    (same indices, same banks, logit scale 1/T, no bias) returns the per-row LSE of ``u``, and
    ``log Z = log N + logsumexp_b(LSE_b) - log(B(K+1))`` (= RepDistiller's
    ``log(N * mean(exp(u)))`` exactly, computed without overflow). Later batches need one pass.

    Loading a RepDistiller state: ``load_state_dict`` (or :meth:`load_repdistiller_state_dict`)
    accepts RepDistiller's keys (``embed_s.linear.*`` -> ``embed_s.*``, ``contrast.memory_v1`` ->
    ``bank_s``, ``contrast.memory_v2`` -> ``bank_t``, ``contrast.params[2:4]`` (Z_v1, Z_v2, -1 when
    unset) -> ``log_z``), keeping the current ``rng_state``. K, T and the momentum stored in
    ``contrast.params`` are not read: they come from the constructor.

    In eval mode the loss is computed without touching any state (no bank update, no Z estimate,
    no sampler advance); Z must then have been set by a training batch or a loaded state.
    """

    def __init__(self, s_dim: int, t_dim: int, n_data: int, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5, *, z_momentum: Optional[float] = None,
                 backend: str = "auto", bank_dtype: torch.dtype = torch.float32, seed: Optional[int] = None):
        super().__init__()
        if nce_k < 1 or nce_t <= 0 or not 0.0 <= nce_m <= 1.0:
            raise ValueError(f"need nce_k >= 1, nce_t > 0, 0 <= nce_m <= 1; got {nce_k}, {nce_t}, {nce_m}")
        if z_momentum is not None and not 0.0 <= z_momentum < 1.0:
            raise ValueError(f"z_momentum must be None or in [0, 1), got {z_momentum}")
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, int(nce_k), float(nce_t), float(nce_m)
        self.z_momentum, self.backend = z_momentum, backend
        # Same construction order as RepDistiller: embed_s, embed_t, memory_v1, memory_v2.
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self._init_banks(n_data, feat_dim, bank_dtype, seed)
        self.register_buffer("log_z", torch.full((2,), float("nan")))
        self._log_z_set = False
        self.register_load_state_dict_pre_hook(_remap_repdistiller_keys)

    @classmethod
    def from_opt(cls, opt, **kwargs) -> "CRDLoss":
        """From RepDistiller's option namespace (``s_dim, t_dim, n_data, feat_dim, nce_k, nce_t,
        nce_m``); keyword arguments override / add (``z_momentum``, ``backend``, ...)."""
        args = dict(s_dim=opt.s_dim, t_dim=opt.t_dim, n_data=opt.n_data, feat_dim=getattr(opt, "feat_dim", 128),
                    nce_k=getattr(opt, "nce_k", 16384), nce_t=getattr(opt, "nce_t", 0.07),
                    nce_m=getattr(opt, "nce_m", 0.5))
        args.update(kwargs)
        return cls(**args)

    def _refresh_mirrors(self) -> None:
        super()._refresh_mirrors()
        self._log_z_set = bool(torch.isfinite(self.log_z).all())

    def reset_partition(self) -> None:
        """Forget Z: the next training batch estimates it again."""
        self.log_z.fill_(float("nan"))
        self._log_z_set = False

    def load_repdistiller_state_dict(self, state_dict, strict: bool = True):
        """Load a state dict of RepDistiller's ``CRDLoss`` (keys remapped, see the class doc)."""
        return self.load_state_dict(state_dict, strict=strict)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Optional[Tensor] = None) -> Tensor:
        check_features(f_s=(f_s, self.embed_s.in_features), f_t=(f_t, self.embed_t.in_features))
        z_s, z_t = self.embed_s(f_s), self.embed_t(f_t)  # fp32 (fp64 stays fp64), unit rows
        idx = check_batch_index(idx, z_s.shape[0])
        index, sample_kw, K = self.index_args(idx, contrast_idx, self.nce_k)
        scale = 1.0 / self.nce_t
        first = not self._log_z_set
        with no_autocast(z_s.device):
            if first:
                if not self.training:
                    raise RuntimeError("CRDLoss: Z is not set yet; run a training batch or load a state first")
                with torch.no_grad():
                    est = ops.dual_sampled_contrast(z_s.detach(), z_t.detach(), self.bank_s, self.bank_t, index,
                                                    logit_scale=scale, loss="infonce", backend=self.backend,
                                                    **sample_kw)
                    self._set_log_z(est.lse_s, est.lse_t, K)
            out = ops.dual_sampled_contrast(z_s, z_t, self.bank_s, self.bank_t, index, logit_scale=scale, loss="nce",
                                            log_z=self.log_z, backend=self.backend, **sample_kw)
            loss = out.loss_s.mean() + out.loss_t.mean()
        if self.training:  # after scoring: Z (EMA mode), the banks, the sampler stream
            with torch.no_grad():
                if self.z_momentum is not None and not first:
                    self._ema_log_z(out.lse_s, out.lse_t, K)
                self.update_banks(idx, z_s, z_t, self.nce_m, self.backend)
                if sample_kw:
                    self.advance_rng(z_s.shape[0], K)
        return loss

    def _batch_log_z(self, lse_s: Tensor, lse_t: Tensor, K: int) -> Tensor:
        N = self.n_data
        return torch.stack([log_partition_from_lse(lse_s, N, K + 1), log_partition_from_lse(lse_t, N, K + 1)])

    def _set_log_z(self, lse_s, lse_t, K) -> None:
        self.log_z.copy_(self._batch_log_z(lse_s, lse_t, K))
        self._log_z_set = True

    def _ema_log_z(self, lse_s, lse_t, K) -> None:
        m = self.z_momentum
        batch = self._batch_log_z(lse_s, lse_t, K)
        lz = self.log_z.double()
        new = torch.logaddexp(lz + math.log(m), batch + math.log1p(-m)) if m > 0 else batch
        self.log_z.copy_(new)

    def extra_repr(self) -> str:
        return (f"n_data={self.n_data}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, "
                f"nce_m={self.nce_m}, z_momentum={self.z_momentum}, backend={self.backend!r}")


def _remap_repdistiller_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                             error_msgs) -> None:
    """RepDistiller ``CRDLoss.state_dict()`` keys -> ours (in place, before loading)."""
    rename_keys(state_dict, prefix, [("embed_s.linear.weight", "embed_s.weight"), ("embed_s.linear.bias", "embed_s.bias"),
                                     ("embed_t.linear.weight", "embed_t.weight"), ("embed_t.linear.bias", "embed_t.bias"),
                                     ("contrast.memory_v1", "bank_s"), ("contrast.memory_v2", "bank_t")])
    params = state_dict.pop(prefix + "contrast.params", None)
    if params is not None and prefix + "log_z" not in state_dict:
        z = params[2:4].detach().double().cpu()
        log_z = torch.where(z > 0, z.clamp_min(1e-300).log(), torch.full_like(z, float("nan")))
        state_dict[prefix + "log_z"] = log_z.to(module.log_z.dtype)
    if prefix + "rng_state" not in state_dict and prefix + "bank_s" in state_dict:
        state_dict[prefix + "rng_state"] = module.rng_state.clone()
