"""Pieces shared by the method losses: the embedding head, EMA of parameter lists, the
partition estimate, memory-bank state (banks, log Z, sampler stream) and state-dict remapping.

Conventions every loss module follows:

* All state (banks, queues, pointers, log Z, the sampler's seed/offset, the epoch) lives in
  buffers, so ``state_dict()`` captures it and a resumed run continues bit-identically.
* Heads may run under ``torch.autocast``; their outputs are cast to float32 (float64 stays
  float64) and the contrast ops run with autocast disabled, so every loss is accumulated in fp32.
* State changes (bank/queue writes, Z estimation, EMA) happen only in training mode and always
  AFTER the batch has been scored (EMA of heads: before, as in the official CoCoRD code).
"""
import contextlib
import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def to_loss_dtype(x: Tensor) -> Tensor:
    """float32 for low-precision (autocast) tensors; float32/float64 tensors are unchanged."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def no_autocast(device: torch.device):
    """Disable autocast around the loss ops (their inputs were already cast to fp32)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def l2_normalize(x: Tensor) -> Tensor:
    """RepDistiller's ``Normalize(2)`` (x / ||x||), with torch's 1e-12 floor on the norm."""
    return F.normalize(to_loss_dtype(x), p=2, dim=1)


class Embed(nn.Linear):
    """RepDistiller's ``Embed`` head: flatten, ``Linear(dim_in, dim_out)``, L2 normalisation.

    It *is* an ``nn.Linear`` (``embed.weight``, ``embed.bias``), so code that expects a Linear
    head works; RepDistiller's checkpoints name the same tensors ``embed.linear.weight`` and
    ``embed.linear.bias`` (its Embed wraps a Linear): the loss modules remap those keys on load.
    The output is float32 even when the Linear runs under autocast.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        return l2_normalize(super().forward(x))


def make_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear (CoCoRD's projector/predictor, BYOL's ``MLPHead`` used by PCKD)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


@torch.no_grad()
def ema_(targets: Sequence[Tensor], sources: Sequence[Tensor], momentum: float) -> None:
    """``t <- momentum * t + (1 - momentum) * s`` for every pair, in one ``_foreach_lerp_``."""
    targets, sources = list(targets), list(sources)
    if not targets:
        return
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)


def log_partition_from_lse(lse: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """RepDistiller's ``Z = N * mean(exp(u))`` over the batch's B*(K+1) scores, in log space:
    ``log Z = log N + logsumexp_b(lse_b) - log(B*(K+1))`` (``lse_b`` = per-row LSE of ``u``)."""
    lse = lse.double()
    return math.log(n_rows) + torch.logsumexp(lse, dim=0) - math.log(lse.shape[0] * n_cols)


def uniform_bank(n_rows: int, dim: int, dtype=torch.float32) -> Tensor:
    """RepDistiller's memory init, drawn exactly as ``ContrastMemory`` does (same RNG calls):
    ``rand(N, D) * 2 stdv - stdv``, ``stdv = 1/sqrt(D/3)``."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(n_rows, dim).mul_(2 * stdv).add_(-stdv).to(dtype)


def rename_keys(state_dict, prefix: str, mapping) -> None:
    """In place: ``prefix + old`` -> ``prefix + new`` for each (old, new) in ``mapping``."""
    for old, new in mapping:
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class MemoryBankState(nn.Module):
    """Base of the bank-based losses (CRD, DCD memory form): two banks, the sampler stream.

    Buffers: ``bank_s`` (student embeddings, RepDistiller ``memory_v1``), ``bank_t`` (teacher
    embeddings, ``memory_v2``), ``rng_state`` = (seed, offset) of the in-kernel negative sampler.
    A Python mirror of ``rng_state`` avoids a device sync per step; it is refreshed on load.
    """

    def _init_banks(self, n_data: int, feat_dim: int, bank_dtype, seed: Optional[int]) -> None:
        if not isinstance(n_data, int) or n_data < 2:
            raise ValueError(f"n_data must be an int >= 2, got {n_data!r}")
        # Same RNG calls and order as RepDistiller's ContrastMemory (memory_v1 then memory_v2).
        self.register_buffer("bank_s", uniform_bank(n_data, feat_dim, bank_dtype))
        self.register_buffer("bank_t", uniform_bank(n_data, feat_dim, bank_dtype))
        if seed is None:  # drawn after the banks, so the bank init matches RepDistiller's
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        if seed < 0:
            raise ValueError("seed must be >= 0")
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.int64))
        self._rng = [int(seed), 0]
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _refresh_mirrors(self) -> None:
        self._rng = [int(v) for v in self.rng_state.tolist()]

    @property
    def n_data(self) -> int:
        return self.bank_s.shape[0]

    def index_args(self, idx: Tensor, contrast_idx: Optional[Tensor], num_negatives: int):
        """(index, kwargs, K) for the sampled ops: an explicit (B, K+1) ``contrast_idx`` (column 0
        the positive), or the positives ``idx`` with in-kernel sampling from (seed, offset)."""
        if contrast_idx is not None:
            if contrast_idx.dim() != 2:
                raise ValueError(f"contrast_idx must be (B, K+1) with column 0 the positive, "
                                 f"got shape {tuple(contrast_idx.shape)}")
            return contrast_idx, {}, contrast_idx.shape[1] - 1
        if idx is None:
            raise ValueError("idx (the dataset rows of the batch) is required")
        seed, offset = self._rng
        return idx.reshape(-1), dict(num_negatives=num_negatives, seed=seed, offset=offset), num_negatives

    @torch.no_grad()
    def advance_rng(self, batch: int, num_negatives: int) -> None:
        self._rng[1] += batch * num_negatives
        self.rng_state[1] = self._rng[1]

    @torch.no_grad()
    def update_banks(self, idx: Tensor, z_s: Tensor, z_t: Tensor, momentum: float, backend: str) -> None:
        idx = idx.reshape(-1)
        ops.bank_momentum_update_(self.bank_s, idx, z_s.detach(), momentum, backend=backend)
        ops.bank_momentum_update_(self.bank_t, idx, z_t.detach(), momentum, backend=backend)


def _refresh_after_load(module, incompatible_keys) -> None:
    module._refresh_mirrors()


def first_linear_in_features(module: nn.Module) -> int:
    return next(m for m in module.modules() if isinstance(m, nn.Linear)).in_features


def check_features(**named) -> int:
    """Checks a loss module's feature inputs before any head or kernel runs, naming the argument:
    ``name=(tensor, dim)`` (``dim`` the expected features per row after flattening, or None);
    ``None`` tensors are skipped. All must be floating tensors of rank >= 2 with the same
    non-empty batch, on one device. Returns the batch size."""
    batch, device, first = None, None, None
    for name, (t, dim) in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"{name} must be (B, features...) with rank >= 2, got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)})")
        per_row = t[0].numel()
        if dim is not None and per_row != dim:
            raise ValueError(f"{name} has {per_row} features per row (shape {tuple(t.shape)}) but the loss was "
                             f"built for {dim}")
        if batch is None:
            batch, device, first = t.shape[0], t.device, name
        elif t.shape[0] != batch:
            raise ValueError(f"{name} has batch {t.shape[0]} but {first} has {batch}")
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")
    return batch


def check_batch_index(idx: Optional[Tensor], batch: int) -> Tensor:
    if idx is None:
        raise ValueError("idx (the dataset rows of the batch, (B,) int64) is required to update the memory")
    idx = idx.reshape(-1)
    if idx.shape[0] != batch:
        raise ValueError(f"idx has {idx.shape[0]} entries but the batch has {batch} rows")
    return idx


def parameter_pairs(target: nn.Module, source: nn.Module):
    """(target, source) parameter pairs in registration order whose shapes agree; the rest are
    skipped (CoCoRD's teacher head when the teacher feature dim differs from the student's)."""
    pairs = [(pt, ps) for pt, ps in zip(target.parameters(), source.parameters()) if pt.shape == ps.shape]
    return [p for p, _ in pairs], [q for _, q in pairs]


def freeze_(params: Iterable[Tensor]) -> None:
    for p in params:
        p.requires_grad_(False)
