"""CRD (Tian, Krishnan & Isola, ICLR 2020) as a drop-in replacement of RepDistiller's
``crd.criterion.CRDLoss``, scored with one fused dual-bank NCE pass (docs/math.md §1b, §1c, §3).

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

from typing import Optional

import torch
from torch import Tensor

from ..memory import check_loadable
from ._common import EMBED_LINEAR_KEYS, Embed, PairedMemoryLoss, no_autocast, remap_paired_memory_keys, rename_keys


class CRDLoss(PairedMemoryLoss):
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
        seed: seed of the in-kernel negative sampler (drawn from torch's RNG when None; 0 in the
            distributed modes). It also seeds ``bank_init="uniform"``.
        memory_mode: "local" (default), "replicated" (every rank holds both banks; updates
            all-gathered in rank order, so the banks, Z and the stream equal one process on the
            concatenated batch) or "sharded" (rank r holds ceil(N/W) rows of each bank; scoring
            merges the fused kernel's partials across ranks). Distributed modes need
            ``torch.distributed`` initialised first; every rank calls ``forward`` each step.
        process_group: the group of the distributed modes (default: the world).
        bank_init: "torch_rng" (RepDistiller's exact RNG calls; the local default) or "uniform"
            (the same distribution in seeded blocks, identical whatever the world size; the
            default of the distributed modes).

    ``forward(f_s, f_t, idx, contrast_idx=None)``: ``idx`` (B,) the dataset rows of the batch;
    ``contrast_idx`` (B, K+1) with column 0 the positive (RepDistiller's CIFAR dataset), or None to
    draw K uniform negatives per row inside the kernel from the (seed, offset) stream of the
    ``rng_state`` buffer (the offset advances by B*K per training step, so a resumed run continues
    the same stream; ``dcdkernels.sample_negatives`` reproduces the indices).

    State: ``self.memory``, a :class:`dcdkernels.memory.PairedMemoryBank` (``memory.bank_s``,
    ``memory.bank_t``, ``memory.log_z`` = (log Z_s, log Z_t), NaN until the first training batch,
    Z_s the student direction's (RepDistiller's ``Z_v1``), ``memory.rng_seed``/``rng_offset``).
    ``bank_s``, ``bank_t``, ``log_z``, ``rng_state`` remain as read-only attributes. A plain
    ``DistributedDataParallel`` leaves the memory alone (it is not made of buffers).

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

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        n_data: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        *,
        z_momentum: Optional[float] = None,
        backend: str = "auto",
        bank_dtype: torch.dtype = torch.float32,
        seed: Optional[int] = None,
        memory_mode: str = "local",
        process_group=None,
        bank_init: Optional[str] = None,
    ):
        super().__init__()
        if nce_k < 1 or nce_t <= 0 or not 0.0 <= nce_m <= 1.0:
            raise ValueError(f"need nce_k >= 1, nce_t > 0, 0 <= nce_m <= 1; got {nce_k}, {nce_t}, {nce_m}")
        if z_momentum is not None and not 0.0 <= z_momentum < 1.0:
            raise ValueError(f"z_momentum must be None or in [0, 1), got {z_momentum}")
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, int(nce_k), float(nce_t), float(nce_m)
        self.backend = backend
        # Same construction order as RepDistiller: embed_s, embed_t, memory_v1, memory_v2.
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self._init_memory(
            n_data,
            feat_dim,
            bank_dtype=bank_dtype,
            seed=seed,
            memory_mode=memory_mode,
            process_group=process_group,
            backend=backend,
            bank_init=bank_init,
            z_momentum=z_momentum,
        )
        self.register_load_state_dict_pre_hook(_remap_repdistiller_keys)

    @property
    def z_momentum(self) -> Optional[float]:
        """None (Z frozen after the first batch) or the EMA momentum m (held by ``self.memory``)."""
        return None if self.memory.z_mode == "frozen" else self.memory.z_momentum

    @z_momentum.setter
    def z_momentum(self, m: Optional[float]) -> None:
        if m is not None and not 0.0 <= m < 1.0:
            raise ValueError(f"z_momentum must be None or in [0, 1), got {m}")
        self.memory.z_mode, self.memory.z_momentum = ("frozen", 0.0) if m is None else ("ema", float(m))

    @classmethod
    def from_opt(cls, opt, **kwargs) -> "CRDLoss":
        """From RepDistiller's option namespace (``s_dim, t_dim, n_data, feat_dim, nce_k, nce_t,
        nce_m``); keyword arguments override / add (``z_momentum``, ``backend``, ...)."""
        args = dict(
            s_dim=opt.s_dim,
            t_dim=opt.t_dim,
            n_data=opt.n_data,
            feat_dim=getattr(opt, "feat_dim", 128),
            nce_k=getattr(opt, "nce_k", 16384),
            nce_t=getattr(opt, "nce_t", 0.07),
            nce_m=getattr(opt, "nce_m", 0.5),
        )
        args.update(kwargs)
        return cls(**args)

    def load_repdistiller_state_dict(self, state_dict, strict: bool = True):
        """Load a state dict of RepDistiller's ``CRDLoss`` (keys remapped, see the class doc)."""
        return self.load_state_dict(state_dict, strict=strict)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Optional[Tensor] = None) -> Tensor:
        idx, index, num_negatives = self._check_memory_inputs(f_s, f_t, idx, contrast_idx, self.nce_k)
        z_s, z_t = self.embed_s(f_s), self.embed_t(f_t)  # fp32 (fp64 stays fp64), unit rows
        with no_autocast(z_s.device):
            # First training batch: log Z per direction from a no-grad InfoNCE pass of the same
            # batch (inside the memory); EMA mode: moved after scoring. Eval: nothing changes.
            out = self.memory.score(
                z_s,
                z_t,
                index,
                logit_scale=1.0 / self.nce_t,
                loss="nce",
                num_negatives=num_negatives,
                update_state=self.training,
                update_index=idx,
            )
            loss = out.loss_s.mean() + out.loss_t.mean()
        if self.training:  # after scoring: the banks (Z and the stream moved inside score)
            self.memory.update_(idx, z_s.detach(), z_t.detach(), self.nce_m)
        return loss

    def extra_repr(self) -> str:
        return (
            f"n_data={self.n_data}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, "
            f"nce_m={self.nce_m}, z_momentum={self.z_momentum}, backend={self.backend!r}, "
            f"memory_mode={self.memory_mode!r}"
        )


def _remap_repdistiller_keys(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """RepDistiller's and this library's former ``CRDLoss`` keys -> ours (in place), then the
    whole state dict is validated before anything loads."""
    rename_keys(state_dict, prefix, EMBED_LINEAR_KEYS)
    params = state_dict.pop(prefix + "contrast.params", None)
    if params is not None and prefix + "log_z" not in state_dict and prefix + "memory.log_z" not in state_dict:
        z = torch.as_tensor(params)[2:4].detach().double().cpu()
        log_z = torch.where(z > 0, z.clamp_min(1e-300).log(), torch.full_like(z, float("nan")))
        state_dict[prefix + "memory.log_z"] = log_z.to(module.log_z.dtype)
    remap_paired_memory_keys(module, state_dict, prefix)
    check_loadable(module, state_dict, prefix)
