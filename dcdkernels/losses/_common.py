"""Pieces shared by the method losses: the embedding head, EMA of parameter lists, input checks,
the paired-bank base (its state lives in ``dcdkernels.memory``) and state-dict remapping.

Conventions every loss module follows:

* All state (banks, queues, pointers, log Z, the sampler's seed/offset, the epoch) is in
  ``state_dict()``, so a resumed run continues bit-identically; memory state lives in
  ``dcdkernels.memory`` modules (``memory_mode="local"|"replicated"|"sharded"``).
* Every input is validated before the first state change (and, in distributed modes, agreed on
  by every rank first: a bad input on one rank raises on all of them).
* Heads may run under ``torch.autocast``; their outputs are cast to float32 (float64 stays
  float64) and the contrast ops run with autocast disabled, so every loss is accumulated in fp32.
* State changes (bank/queue writes, Z estimation, EMA) happen only in training mode and always
  AFTER the batch has been scored (EMA of heads: before, as in the official CoCoRD code).
"""

import contextlib
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..memory import PairedMemoryBank
from ..ops import _validate as V

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
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


@torch.no_grad()
def ema_(targets: Sequence[Tensor], sources: Sequence[Tensor], momentum: float) -> None:
    """``t <- momentum * t + (1 - momentum) * s`` for every pair, in one ``_foreach_lerp_``."""
    targets, sources = list(targets), list(sources)
    if not targets:
        return
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)


def rename_keys(state_dict, prefix: str, mapping) -> None:
    """In place: ``prefix + old`` -> ``prefix + new`` for each (old, new) in ``mapping``."""
    for old, new in mapping:
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


# RepDistiller's and ICD's ``Embed`` wraps its Linear: ``embed_*.linear.*`` -> this ``Embed``'s keys.
EMBED_LINEAR_KEYS = (
    ("embed_s.linear.weight", "embed_s.weight"),
    ("embed_s.linear.bias", "embed_s.bias"),
    ("embed_t.linear.weight", "embed_t.weight"),
    ("embed_t.linear.bias", "embed_t.bias"),
)

MEMORY_MODES = ("local", "replicated", "sharded")


def resolve_seed(seed: Optional[int], memory_mode: str) -> int:
    """The negative stream's seed: ``seed``, or drawn from torch's RNG (local mode, after the banks,
    as before), or 0 in distributed modes (every rank must agree without communication)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if memory_mode == "local" else 0
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return seed


class PairedMemoryLoss(nn.Module):
    """Base of the losses that score a ``PairedMemoryBank`` (CRD, the DCD memory form). All the
    state is in ``self.memory``; this class builds it, loads the older state-dict layouts and
    exposes the former attribute names (``bank_s``, ``bank_t``, ``log_z``, ``rng_state``)."""

    def _init_memory(
        self,
        n_data,
        feat_dim,
        *,
        bank_dtype,
        seed,
        memory_mode,
        process_group,
        backend,
        bank_init,
        z_momentum: Optional[float] = None,
    ) -> None:
        if not isinstance(n_data, int) or n_data < 2:
            raise ValueError(f"n_data must be an int >= 2, got {n_data!r}")
        if memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
        if bank_init is None:  # RepDistiller's RNG calls locally; seeded blocks shared by every rank otherwise
            bank_init = "torch_rng" if memory_mode == "local" else "uniform"
        self.memory = PairedMemoryBank(
            n_data,
            feat_dim,
            dtype=bank_dtype,
            init=bank_init,
            init_seed=0 if seed is None else int(seed),
            z_mode="frozen" if z_momentum is None else "ema",
            z_momentum=0.0 if z_momentum is None else z_momentum,
            mode=memory_mode,
            process_group=process_group,
            backend=backend,
        )
        self.memory.set_rng_state(resolve_seed(seed, memory_mode), 0)  # drawn after the banks (RepDistiller order)

    @property
    def memory_mode(self) -> str:
        return self.memory.mode

    @property
    def n_data(self) -> int:
        return self.memory.n_rows

    @property
    def bank_s(self) -> Tensor:
        return self.memory.bank_s

    @property
    def bank_t(self) -> Tensor:
        return self.memory.bank_t

    @property
    def log_z(self) -> Tensor:
        return self.memory.log_z

    @property
    def rng_state(self) -> Tensor:
        """(seed, offset) of the negative stream, as the former ``rng_state`` buffer (a copy)."""
        return torch.tensor(list(self.memory.rng_state()), dtype=torch.int64)

    def reset_partition(self) -> None:
        """Forget Z: the next training batch estimates it again."""
        self.memory.reset_partition()

    def _check_memory_inputs(self, f_s, f_t, idx, contrast_idx, num_negatives: int):
        """The structural input checks (no device sync), before any head runs, agreed on by every
        rank: returns (idx (B,), scoring index, num_negatives or None). The value checks (index
        ranges, finite anchors) run inside ``memory.score`` (``update_index=idx``) before its
        first state change, and guard it when checks are deferred."""
        err, out = None, (None, None, None)
        try:
            B = check_features(f_s=(f_s, self.embed_s.in_features), f_t=(f_t, self.embed_t.in_features))
            idx = V.index_tensor("idx", check_batch_index(idx, B), device=f_s.device, rows=B, dims=(1,))
            if contrast_idx is not None:
                if not isinstance(contrast_idx, Tensor) or contrast_idx.dim() != 2:
                    raise ValueError(
                        f"contrast_idx must be (B, K+1) with column 0 the positive, got "
                        f"{tuple(contrast_idx.shape) if isinstance(contrast_idx, Tensor) else contrast_idx!r}"
                    )
                contrast_idx = V.index_tensor("contrast_idx", contrast_idx, device=f_s.device, rows=B, dims=(2,))
            out = (idx, idx, num_negatives) if contrast_idx is None else (idx, contrast_idx, None)
        except (ValueError, TypeError) as exc:
            err = exc
        self.memory.agree(err, self.memory.bank_s.device)
        return out


def remap_paired_memory_keys(module: PairedMemoryLoss, state_dict, prefix: str) -> None:
    """This library's former keys (``bank_s``, ``bank_t``, ``log_z``, ``rng_state`` (seed, offset))
    and RepDistiller's banks (``contrast.memory_v1``/``memory_v2``) -> ``memory.*``; state the
    old layouts lack (the stream, the shard layout) keeps its current value. In place."""
    mem = prefix + "memory."
    rename_keys(
        state_dict,
        prefix,
        [
            ("contrast.memory_v1", "memory.bank_s"),
            ("contrast.memory_v2", "memory.bank_t"),
            ("bank_s", "memory.bank_s"),
            ("bank_t", "memory.bank_t"),
            ("log_z", "memory.log_z"),
        ],
    )
    rng = state_dict.pop(prefix + "rng_state", None)
    if rng is not None:
        rng = torch.as_tensor(rng).reshape(-1)
        state_dict.setdefault(mem + "rng_seed", rng[0].clone())
        state_dict.setdefault(mem + "rng_offset", rng[1].clone())
    if mem + "bank_s" in state_dict or mem + "bank_t" in state_dict:
        for name, t in module.memory.state_tensors().items():
            state_dict.setdefault(mem + name, t.detach().clone())


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
            raise ValueError(
                f"{name} has {per_row} features per row (shape {tuple(t.shape)}) but the loss was built for {dim}"
            )
        if batch is None:
            batch, device, first = t.shape[0], t.device, name
        elif t.shape[0] != batch:
            raise ValueError(f"{name} has batch {t.shape[0]} but {first} has {batch}")
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")
    return batch


def finite_checks(**named) -> V.ValueChecks:
    """``ValueChecks`` with a ``finite`` check of every named tensor that is not None, in order."""
    checks = V.ValueChecks()
    for name, t in named.items():
        if t is not None:
            checks.finite(name, t)
    return checks


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
