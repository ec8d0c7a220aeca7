"""``MemoryState``: what every memory module shares (docs/math.md §5). Above ``comm``, below the modules.

* **State tensors, not buffers.** Banks, queues, pointers, log Z and the stream live in
  ``state_dict()`` (same keys as buffers would have), move with ``.to()``/``.cuda()``, but are not
  ``named_buffers()``: DistributedDataParallel broadcasts every buffer from rank 0 at
  construction and (``broadcast_buffers=True``) at every forward, which would overwrite each
  rank's shard of a sharded bank with rank 0's rows and copy a whole replicated bank per step.
  A plain ``DistributedDataParallel(model)`` therefore leaves the memory alone: nothing to
  configure (``ddp_wrap`` stays as a convenience).
* **Distributed layout**: mode, rank, world size, owned rows, ``shard_layout`` (checked on load).
* **The negative stream** ``rng_seed``/``rng_offset`` (host mirrors avoid a sync per step).
* **log Z** (any shape: one per scored direction), NaN until set: set from the first batch
  (``comm.log_partition`` over the global batch), or EMA'd in log space.
* **Row updates** of one or several banks from one all-gather of the batch (replicated: every
  rank applies all of it; sharded: the owner rank).
* ``load_state_dict`` validates every key of this module (shape, dtype class, layout) before
  anything is copied; ``check_state_dict`` lets a parent validate a whole state dict first.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..ops import _validate as V
from ..reference import rng as _rng
from . import comm

INITS = ("uniform", "normal", "zeros", "empty")
SCORE_LOSSES = ("infonce", "nce")  # the losses a bank scores with (``loss=``)
_INIT_BLOCK = 1 << 14  # rows per independently seeded init block: the init does not depend on W


def check_rows_dim_dtype(rows_name: str, n_rows, dim, dtype) -> None:
    """Constructor checks shared by every memory module: positive int sizes, a float storage dtype."""
    if not isinstance(n_rows, int) or not isinstance(dim, int) or n_rows < 1 or dim < 1:
        raise ValueError(f"{rows_name} and dim must be positive ints, got {n_rows!r}, {dim!r}")
    if dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")


def wants_grad(*values) -> bool:
    """Whether autograd records this call: grad mode on and any tensor among ``values`` requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in values)


def init_rows(n_rows: int, dim: int, start: int, end: int, *, init: str, seed: int, dtype, device) -> torch.Tensor:
    """Rows ``[start, end)`` of the bank a single process would initialise with ``init``/``seed``.

    Rows are drawn in aligned blocks of ``2**14`` rows, each from a CPU generator seeded by
    ``(seed, block)``, so a shard gets exactly its slice of the full bank (and every rank of a
    replicated bank the same bank) whatever the world size and device.
    ``uniform``: U(-stdv, stdv), stdv = 1/sqrt(dim/3) (RepDistiller ``ContrastMemory``);
    ``normal``: N(0, 1) rows L2-normalised (MoCo's queue); ``zeros``; ``empty`` (uninitialised,
    for a bank about to receive a checkpoint)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    out = torch.empty((end - start, dim), dtype=dtype, device=device)
    if init == "empty" or end <= start:
        return out
    if init == "zeros":
        return out.zero_()
    stdv = 1.0 / math.sqrt(dim / 3)
    for block in range(start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK + 1):
        b0 = block * _INIT_BLOCK
        b1 = min(b0 + _INIT_BLOCK, n_rows)
        gen = torch.Generator().manual_seed(_rng.rng_key(seed) * 1_000_003 + block)
        if init == "uniform":
            rows = torch.rand((b1 - b0, dim), generator=gen).mul_(2 * stdv).add_(-stdv)
        else:
            rows = torch.nn.functional.normalize(torch.randn((b1 - b0, dim), generator=gen), dim=1)
        lo, hi = max(start, b0), min(end, b1)
        out[lo - start : hi - start].copy_(rows[lo - b0 : hi - b0])
    return out


class MemoryState(nn.Module):
    """Base of ``MemoryBank``, ``PairedMemoryBank`` and ``MomentumQueue`` (see the module doc)."""

    def _init_state(self, n_rows: int, *, mode: str, process_group, backend: str, device, modes=comm.MODES) -> None:
        self._state_names: List[str] = []
        self.n_rows, self.mode, self.process_group, self.backend = n_rows, mode, process_group, backend
        self.rank, self.world_size = comm.group_rank_world(mode, process_group, modes)
        if mode == "sharded":
            self.row_start, self.row_end = comm.shard_bounds(n_rows, self.world_size, self.rank)
            layout = [n_rows, self.world_size, self.rank]
        else:
            self.row_start, self.row_end = 0, n_rows
            layout = [n_rows, 1, 0]
        self._add_state("shard_layout", torch.tensor(layout, dtype=torch.int64, device=device))

    @property
    def num_local_rows(self) -> int:
        """Rows held by this rank (all of them unless sharded)."""
        return self.row_end - self.row_start

    # ---------------------------------------------------------------- state tensors
    def _add_state(self, name: str, tensor: torch.Tensor) -> None:
        object.__setattr__(self, name, tensor)
        self._state_names.append(name)

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """This module's memory state (name -> tensor), as saved in ``state_dict()``."""
        return {n: getattr(self, n) for n in self._state_names}

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        for n in self._state_names:
            object.__setattr__(self, n, fn(getattr(self, n)))
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        V.check_errors()  # a checkpoint never captures state after a call that failed deferred checks
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for n in self._state_names:
            t = getattr(self, n)
            destination[prefix + n] = t if keep_vars else t.detach()

    def _check_one(self, name: str, value, key: str) -> None:
        mine = getattr(self, name)
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(f"{type(self).__name__}: {key} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(mine.shape):
            raise RuntimeError(
                f"{type(self).__name__}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(mine.shape)} here (another n_data, dim, queue size or world size?)"
            )
        if value.is_floating_point() != mine.is_floating_point():
            raise RuntimeError(f"{type(self).__name__}: {key} is {value.dtype} in the checkpoint but {mine.dtype} here")

    def check_state_dict(self, state_dict, prefix: str = "") -> None:
        """Raise (changing nothing) unless every key of this module in ``state_dict`` fits."""
        key = prefix + "shard_layout"
        if key in state_dict:
            saved = [int(v) for v in torch.as_tensor(state_dict[key]).tolist()]
            mine = [int(v) for v in self.shard_layout.tolist()]
            if saved != mine:
                raise RuntimeError(
                    f"{type(self).__name__} checkpoint layout [n_rows, shards, shard] = {saved} does not match this "
                    f"module's {mine}: a sharded bank reloads only under the same world size and rank (and a "
                    "replicated or local checkpoint holds the whole bank, not one shard)"
                )
        for n in self._state_names:
            if prefix + n in state_dict:
                self._check_one(n, state_dict[prefix + n], prefix + n)
        self._check_values(state_dict, prefix)

    def _check_values(self, state_dict, prefix: str) -> None:
        """Value checks of a subclass (e.g. the queue pointer's range)."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self.check_state_dict(state_dict, prefix)
        mine = {prefix + n: n for n in self._state_names}
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        with torch.no_grad():
            for key, n in mine.items():
                if key in state_dict:
                    getattr(self, n).copy_(state_dict[key])
                elif strict and n != "shard_layout":  # only checked: older queue checkpoints lack it
                    missing_keys.append(key)
        self._refresh_host_state()

    def _refresh_host_state(self) -> None:
        """Host mirrors of the state tensors (subclasses)."""

    # ---------------------------------------------------------------- collectives
    def _meta(self, values, error, device):
        """``comm.gather_meta`` (every rank raises together), or the local equivalent."""
        if self.mode == "local":
            if error is not None:
                raise error
            return torch.tensor([[int(v) for v in values]], dtype=torch.int64)
        return comm.gather_meta(values, error, self.process_group, device)

    def agree(self, error: Optional[BaseException] = None, device=None) -> None:
        """Raise ``error`` on this rank and a RuntimeError naming it on every other rank (a
        collective in distributed modes; locally just ``raise error``). Loss modules call it after
        validating their inputs and before their first collective or state change, so a bad
        input on one rank never leaves the others waiting."""
        self.agree_sizes(0, error, device)

    def agree_sizes(self, n: int, error: Optional[BaseException] = None, device=None) -> List[int]:
        """``agree`` that also all-gathers one int per rank (e.g. the batch size): [n_0, .., n_W-1]."""
        meta = self._meta(
            [n if error is None else 0], error, device if device is not None else self.shard_layout.device
        )
        return meta[:, 0].tolist()

    def _batch_offset(self, sizes) -> int:
        """Rows of the concatenated batch before this rank's."""
        return sum(sizes[: self.rank]) if self.mode != "local" else 0


class StreamAndPartition(MemoryState):
    """``MemoryState`` with the counter-based negative stream and log Z (the banks)."""

    BANK_NAMES: Sequence[str] = ()  # the bank state tensors (one storage dtype), set by each bank class

    def extra_repr(self):
        rows = f"rows [{self.row_start}, {self.row_end}) of " if self.mode == "sharded" else ""
        dtype = getattr(self, self.BANK_NAMES[0]).dtype
        return (
            f"{rows}n_rows={self.n_rows}, dim={self.dim}, dtype={dtype}, mode={self.mode!r}, "
            f"z_mode={self.z_mode!r}, world_size={self.world_size}"
        )

    @staticmethod
    def _check_score_index(index, num_negatives, anchor: torch.Tensor):
        """The scored ``index`` as int64 and its number of columns K+1: (B, K+1) explicit, or (B,)
        positives with ``num_negatives=K`` drawn from the stream."""
        index = V.index_tensor("index", index, device=anchor.device, rows=anchor.shape[0])
        if index.dim() == 1:
            if not isinstance(num_negatives, int) or num_negatives < 1:
                raise ValueError("a 1-D index holds only the positives: pass num_negatives=K >= 1 to sample negatives")
            return index, num_negatives + 1
        if num_negatives:
            raise ValueError(
                "num_negatives is only for a 1-D index of positives; a (B, K+1) index already holds the negatives"
            )
        if index.shape[1] < 2:
            raise ValueError(f"index must be (B, K+1) with K >= 1 negatives, got shape {tuple(index.shape)}")
        return index, index.shape[1]

    def _score_meta(self, err, B: int, n_cols: int, index_dim: int, loss, flags, same=()) -> torch.Tensor:
        """``_meta`` of ``[B, K+1, index dim, loss, *flags]`` (ints) per rank. Raises unless every
        rank scores with the same K+1, kind of index and loss, and the same flag in each
        ``(column, what)`` of ``same``."""
        loss_id = SCORE_LOSSES.index(loss) if loss in SCORE_LOSSES else -1
        device = getattr(self, self.BANK_NAMES[0]).device
        meta = self._meta([B, n_cols, index_dim, loss_id, *flags], err, device)
        for col, what in (
            (1, "number of columns K+1"),
            (2, "kind of index (explicit (B, K+1) or sampled (B,))"),
            (3, "loss"),
            *same,
        ):
            if len(set(meta[:, col].tolist())) != 1:
                raise ValueError(f"every rank must score with the same {what}; got {meta[:, col].tolist()} per rank")
        return meta

    @staticmethod
    def _check_scale_bias(logit_scale, bias, device, acc):
        """``logit_scale`` (> 0) and ``bias`` (or None) as 0-d tensors of the accumulation dtype."""
        s = V.scalar("logit_scale", logit_scale, device=device, dtype=acc, positive=True)
        b = None if bias is None else V.scalar("bias", bias, device=device, dtype=acc)
        return s, b

    def _init_stream(self, *, seed: int, offset: int, log_z_shape, z_mode: str, z_momentum: float, device) -> None:
        if not isinstance(seed, int) or not isinstance(offset, int) or seed < 0 or offset < 0:
            raise ValueError(f"seed and offset must be non-negative ints, got {seed!r}, {offset!r}")
        if z_mode not in ("frozen", "ema"):
            raise ValueError(f"z_mode must be 'frozen' or 'ema', got {z_mode!r}")
        if not isinstance(z_momentum, (float, int)) or not 0.0 <= float(z_momentum) < 1.0:
            raise ValueError(f"z_momentum must be in [0, 1), got {z_momentum!r}")
        self.z_mode, self.z_momentum = z_mode, float(z_momentum)
        self._add_state("log_z", torch.full(tuple(log_z_shape), math.nan, dtype=torch.float32, device=device))
        self._add_state("rng_seed", torch.tensor(int(seed), dtype=torch.int64, device=device))
        self._add_state("rng_offset", torch.tensor(int(offset), dtype=torch.int64, device=device))
        self._seed, self._offset, self._log_z_set = int(seed), int(offset), False

    def _refresh_host_state(self) -> None:
        self._seed = int(self.rng_seed.item())
        self._offset = int(self.rng_offset.item())
        self._log_z_set = bool(torch.isfinite(self.log_z).all().item())

    # ---------------------------------------------------------------- stream
    def rng_state(self):
        """(seed, offset) of the negative stream."""
        return self._seed, self._offset

    def forward(self, *args, **kwargs):
        return self.score(*args, **kwargs)

    def gathered_index_fn(self, idx_all: torch.Tensor, sampled: bool, num_negatives: int):
        """``index_fn(b0, b1)`` over the all-gathered batch for sharded scoring: the explicit
        (B, K+1) rows ``b0..b1-1``, or their positives plus the K negatives this stream draws for
        them at the current offset (the rows a single process would score)."""
        if not sampled:
            return lambda b0, b1: idx_all[b0:b1]
        K, seed, offset, n_rows = num_negatives, self._seed, self._offset, self.n_rows
        return lambda b0, b1: _rng.sample_negatives(idx_all[b0:b1], K, n_rows, seed, offset + b0 * K)

    def _gather_for_shards(self, anchors: Sequence[torch.Tensor], index, sizes, sampled: bool, n_cols: int):
        """Sharded scoring's inputs: the all-gathered (detached) ``anchors`` of every rank and the
        ``gathered_index_fn`` of the all-gathered ``index``."""
        gathered = [comm.all_gather_rows(a.detach(), sizes, self.process_group) for a in anchors]
        idx_all = comm.all_gather_rows(index, sizes, self.process_group)
        return gathered, self.gathered_index_fn(idx_all, sampled, n_cols - 1)

    def _shard_kwargs(self, n_cols: int, s, b, loss: str) -> dict:
        """The arguments every ``sharded.*shard_partials`` call over this rank's rows shares."""
        shard = dict(row_start=self.row_start, n_rows=self.n_rows, n_cols=n_cols, backend=self.backend)
        log_z = self.log_z if loss == "nce" else None
        return dict(shard, logit_scale=s, bias=b, loss=loss, log_z=log_z, chunk=self.shard_chunk)

    def set_rng_state(self, seed: int, offset: int = 0) -> None:
        if seed < 0 or offset < 0:
            raise ValueError("seed and offset must be non-negative")
        self._seed, self._offset = int(seed), int(offset)
        self.rng_seed.fill_(self._seed)
        self.rng_offset.fill_(self._offset)

    def _advance(self, n: int) -> None:
        self._offset += int(n)
        self.rng_offset.fill_(self._offset)

    # ---------------------------------------------------------------- log Z
    @property
    def log_z_is_set(self) -> bool:
        return self._log_z_set

    def reset_partition(self) -> None:
        """Forget Z: the next NCE batch in training estimates it again."""
        self.log_z.fill_(math.nan)
        self._log_z_set = False

    def _global_lse(self, lse_local: torch.Tensor) -> torch.Tensor:
        """logsumexp over every rank's per-row LSE (0-d fp64 on device): one small all-gather in
        replicated mode; in sharded mode (and locally) this rank already holds every row's LSE."""
        stats = comm.lse_stats(lse_local)
        if self.mode == "replicated":
            stats = comm.all_gather_rows(stats, [1] * self.world_size, self.process_group)
        return comm.combine_lse_stats(stats)

    def _batch_log_z(self, lses: Sequence[torch.Tensor], count: int, n_cols: int) -> torch.Tensor:
        """log Z of one batch per direction (``comm.log_partition`` over the global batch), shaped as ``log_z``."""
        vals = [comm.log_partition(None, self.n_rows, n_cols, count=count, total_lse=self._global_lse(l)) for l in lses]
        return torch.stack(vals).reshape(self.log_z.shape)

    def _set_log_z(self, value: torch.Tensor, checks: Optional[V.ValueChecks] = None) -> None:
        value = value.detach().to(self.log_z.dtype)
        if checks is not None:  # a call that fails its deferred checks leaves log Z as it was
            value = checks.guard_rows(value, lambda: self.log_z)
        self.log_z.copy_(value)
        self._log_z_set = True

    def _ema_log_z(self, batch_log_z: torch.Tensor, checks: Optional[V.ValueChecks] = None) -> None:
        """Z <- m Z + (1 - m) Z_batch, in log space (Z itself overflows fp16 for tau = 0.07)."""
        m = self.z_momentum
        if m == 0.0:
            self._set_log_z(batch_log_z, checks)
            return
        old = self.log_z.to(torch.float64)
        self._set_log_z(torch.logaddexp(old + math.log(m), batch_log_z + math.log1p(-m)), checks)

    # ---------------------------------------------------------------- negatives
    def sample_negatives(self, positives: torch.Tensor, num_negatives: int) -> torch.Tensor:
        """(B, K+1) index: ``positives`` then K negatives from the saved (seed, offset) stream,
        exactly those scoring ``positives`` with ``num_negatives=K`` would draw at the same state;
        advances the stream by B_total * K. In distributed modes this is a collective (rank r's
        rows are rows ``sum_{r'<r} B_r' ..`` of the concatenated batch)."""
        err = None
        try:
            if not isinstance(num_negatives, int) or num_negatives < 1:
                raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
            V.index_tensor("positives", positives, device=positives.device, dims=(1,))
            checks = V.ValueChecks()
            checks.index_in_range("positives", positives, self.n_rows)
            checks.run()
        except (ValueError, TypeError) as exc:
            err = exc
        sizes = self._meta([positives.shape[0] if isinstance(positives, torch.Tensor) else 0], err, self.log_z.device)[
            :, 0
        ].tolist()
        idx = ops.sample_negatives(
            positives, num_negatives, self.n_rows, self._seed, self._offset + self._batch_offset(sizes) * num_negatives
        )
        self._advance(sum(sizes) * num_negatives)
        return idx

    # ---------------------------------------------------------------- updates
    def _check_update(
        self, index, values: Sequence[torch.Tensor], names: Sequence[str], dim: int, device, momentum, defer: bool
    ):
        for name, v in zip(names, values):
            V.matrix(name, v, dim=dim)
            if v.device != device:
                raise ValueError(f"{name} is on {v.device} but the bank is on {device}")
            if v.shape[0] != values[0].shape[0]:
                raise ValueError(f"{name} has {v.shape[0]} rows but {names[0]} has {values[0].shape[0]}")
        index = V.index_tensor("index", index, device=device, rows=values[0].shape[0], dims=(1,))
        if not isinstance(momentum, (float, int)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
        checks = V.ValueChecks()
        checks.index_in_range("index", index, self.n_rows)
        for name, v in zip(names, values):
            checks.finite(name, v)
        checks.run(deferrable=defer)
        return index, checks

    @torch.no_grad()
    def _update_banks_(
        self,
        banks: Sequence[torch.Tensor],
        index: torch.Tensor,
        values: Sequence[torch.Tensor],
        names: Sequence[str],
        momentum: float,
    ) -> None:
        """``bank[i] <- normalize(m * bank[i] + (1 - m) * value)`` of each (bank, value) pair at
        ``index`` (docs/math.md §4; last occurrence wins). Distributed modes all-gather (index, values)
        in rank order: replicated ranks apply all of it, sharded ranks the rows they own, so the
        result equals one process applying the concatenated batch. Everything is validated on
        every rank before any row changes."""
        bank0 = banks[0]
        err, checks = None, None
        try:
            index, checks = self._check_update(
                index, values, names, bank0.shape[1], bank0.device, momentum, defer=self.mode == "local"
            )
        except (ValueError, TypeError) as exc:
            err = exc
        if self.mode == "local":
            if err is not None:
                raise err
            index = checks.guard(index, self.n_rows)  # deferred failures: every row is skipped
            for bank, v in zip(banks, values):
                ops.bank_momentum_update_(bank, index, v, momentum, backend=self.backend)
            return
        sizes = self._meta([values[0].shape[0] if err is None else 0], err, bank0.device)[:, 0].tolist()
        # The update computes in fp32 (fp64 for an fp64 bank) whatever the value dtype: gather in it.
        acc = torch.float64 if bank0.dtype == torch.float64 else torch.float32
        packed = torch.cat([v.detach().to(acc) for v in values], dim=1)
        idx_all = comm.all_gather_rows(index, sizes, self.process_group)
        val_all = comm.all_gather_rows(packed, sizes, self.process_group)
        if self.mode == "sharded":
            owned = (idx_all >= self.row_start) & (idx_all < self.row_end)
            idx_all, val_all = idx_all[owned] - self.row_start, val_all[owned]  # order kept: last occurrence rule
            if idx_all.numel() == 0:
                return
        D = bank0.shape[1]
        for j, bank in enumerate(banks):
            ops.bank_momentum_update_(bank, idx_all, val_all[:, j * D : (j + 1) * D], momentum, backend=self.backend)


def memory_modules(model: nn.Module):
    """(qualified name, module) of every ``MemoryState`` inside ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MemoryState)]


def check_loadable(model: nn.Module, state_dict, prefix: str = "") -> None:
    """Validate a whole state dict for ``model`` before anything is loaded: every tensor of
    ``model.state_dict()`` present in ``state_dict`` must have the same shape, and every memory
    module's own checks (layout, pointer range) must pass. Loss modules call this from their
    load pre-hook, so a rejected checkpoint leaves the whole module unchanged."""
    for key, mine in model.state_dict().items():
        other = state_dict.get(prefix + key)
        if isinstance(other, torch.Tensor) and isinstance(mine, torch.Tensor) and other.shape != mine.shape:
            raise RuntimeError(
                f"{type(model).__name__}.load_state_dict: {prefix + key} has shape "
                f"{tuple(other.shape)} in the checkpoint but {tuple(mine.shape)} here; nothing was loaded"
            )
    for name, mod in memory_modules(model):
        mod.check_state_dict(state_dict, prefix + (name + "." if name else ""))
