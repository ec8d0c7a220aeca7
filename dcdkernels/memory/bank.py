"""``MemoryBank``: a memory of N rows held as module buffers (SPEC §5).

Buffers (all in ``state_dict()``):
- ``bank`` (N, D) in the storage dtype (fp32 default; bf16 halves the memory). In sharded mode
  only this rank's rows, ``(end - start, D)``.
- ``log_z`` 0-d fp32: log of the NCE partition estimate; NaN until the first NCE batch sets it.
- ``rng_seed``, ``rng_offset`` 0-d int64: the counter-based negative stream (SPEC §1d).
- ``shard_layout`` (3,) int64: ``[N, number of shards, this shard]`` (``[N, 1, 0]`` unless
  sharded), checked when a state dict is loaded.

Host-side copies of the seed, offset and "log Z is set" flag avoid a device sync per step; they
are refreshed whenever a state dict is loaded (use ``set_rng_state`` to move the stream).
"""
import math
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops import _validate as V
from ..reference import rng as _rng
from . import distributed as Dist

INITS = ("uniform", "normal", "zeros", "empty")
_LOSSES = ("infonce", "nce")
_INIT_BLOCK = 1 << 14  # rows per independently seeded init block: the init does not depend on W


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
        out[lo - start:hi - start].copy_(rows[lo - b0:hi - b0])
    return out


class MemoryBank(nn.Module):
    """A bank of ``n_rows`` x ``dim`` memory rows, scored with ``dcdkernels.sampled_contrast``
    and updated with ``dcdkernels.bank_momentum_update_`` (SPEC §1, §4, §5).

    Args:
        n_rows: N, the number of rows (dataset size).
        dim: D.
        dtype: storage dtype of the bank (fp32, bf16, fp16); accumulation is always fp32.
        init: "uniform" (RepDistiller), "normal" (unit rows), "zeros" or "empty"; ``init_seed``
            makes it reproducible and identical on every rank.
        z_mode: "frozen" (RepDistiller: log Z from the first NCE batch, never updated) or "ema"
            (Z <- m Z + (1 - m) Z_batch after every NCE batch, in log space; CMC's advice).
        z_momentum: m of the EMA.
        mode: "local", "replicated" (every rank has the whole bank; updates all-gathered) or
            "sharded" (rank r owns ~N/W contiguous rows; see ``dcdkernels.memory.distributed``).
        process_group: the torch.distributed group (default: the world).
        backend: backend of the fused ops ("auto", "eager", "cpu", "cuda", "triton"), also the
            one sharded scoring runs its partial statistics on.
        seed, offset: initial state of the negative stream.
        shard_chunk: bound on anchor-columns processed at once by sharded scoring.

    In replicated and sharded modes ``score``, ``sample_negatives`` and ``update_`` are
    collectives: every rank of the group must call them, in the same order. Batch sizes may
    differ between ranks. Wrap models holding a bank with ``dcdkernels.memory.ddp_wrap``.
    """

    def __init__(self, n_rows: int, dim: int, *, dtype=torch.float32, init: str = "uniform", init_seed: int = 0,
                 z_mode: str = "frozen", z_momentum: float = 0.99, mode: str = "local", process_group=None,
                 backend: str = "auto", seed: int = 0, offset: int = 0, device=None, shard_chunk: int = 1 << 20):
        super().__init__()
        if not isinstance(n_rows, int) or not isinstance(dim, int) or n_rows < 1 or dim < 1:
            raise ValueError(f"n_rows and dim must be positive ints, got {n_rows!r}, {dim!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"dtype must be float32, bfloat16, float16 or float64, got {dtype}")
        if z_mode not in ("frozen", "ema"):
            raise ValueError(f"z_mode must be 'frozen' or 'ema', got {z_mode!r}")
        if not 0.0 <= float(z_momentum) < 1.0:
            raise ValueError(f"z_momentum must be in [0, 1), got {z_momentum!r}")
        if seed < 0 or offset < 0:
            raise ValueError("seed and offset must be non-negative")
        self.n_rows, self.dim, self.mode = n_rows, dim, mode
        self.z_mode, self.z_momentum = z_mode, float(z_momentum)
        self.process_group, self.backend = process_group, backend
        self.shard_chunk = int(shard_chunk)
        self.rank, self.world_size = Dist.group_rank_world(mode, process_group)
        if mode == "sharded":
            self.row_start, self.row_end = Dist.shard_bounds(n_rows, self.world_size, self.rank)
            layout = [n_rows, self.world_size, self.rank]
        else:
            self.row_start, self.row_end = 0, n_rows
            layout = [n_rows, 1, 0]
        self.register_buffer("bank", init_rows(n_rows, dim, self.row_start, self.row_end, init=init, seed=init_seed,
                                               dtype=dtype, device=device))
        self.register_buffer("log_z", torch.full((), math.nan, dtype=torch.float32, device=device))
        self.register_buffer("rng_seed", torch.tensor(int(seed), dtype=torch.int64, device=device))
        self.register_buffer("rng_offset", torch.tensor(int(offset), dtype=torch.int64, device=device))
        self.register_buffer("shard_layout", torch.tensor(layout, dtype=torch.int64, device=device))
        self._seed, self._offset, self._log_z_set = int(seed), int(offset), False
        self.register_load_state_dict_post_hook(MemoryBank._refresh_host_state)

    # ---------------------------------------------------------------- state
    def extra_repr(self):
        rows = f"rows [{self.row_start}, {self.row_end}) of " if self.mode == "sharded" else ""
        return (f"{rows}n_rows={self.n_rows}, dim={self.dim}, dtype={self.bank.dtype}, mode={self.mode!r}, "
                f"z_mode={self.z_mode!r}, world_size={self.world_size}")

    @property
    def num_local_rows(self) -> int:
        return self.row_end - self.row_start

    def rng_state(self):
        """(seed, offset) of the negative stream."""
        return self._seed, self._offset

    def set_rng_state(self, seed: int, offset: int = 0) -> None:
        if seed < 0 or offset < 0:
            raise ValueError("seed and offset must be non-negative")
        self._seed, self._offset = int(seed), int(offset)
        self.rng_seed.fill_(self._seed)
        self.rng_offset.fill_(self._offset)

    def _advance(self, n: int) -> None:
        self._offset += int(n)
        self.rng_offset.fill_(self._offset)

    @staticmethod
    def _refresh_host_state(module, incompatible_keys):
        module._seed = int(module.rng_seed.item())
        module._offset = int(module.rng_offset.item())
        module._log_z_set = not bool(torch.isnan(module.log_z).item())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        V.check_errors()  # a checkpoint never captures state after a call that failed deferred checks
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "shard_layout"
        if key in state_dict:
            saved = [int(v) for v in state_dict[key].tolist()]
            mine = [int(v) for v in self.shard_layout.tolist()]
            if saved != mine:
                raise RuntimeError(
                    f"MemoryBank checkpoint layout [n_rows, shards, shard] = {saved} does not match this bank's {mine}: "
                    "a sharded bank reloads only under the same world size and rank (and a replicated or local "
                    "checkpoint holds the whole bank, not one shard)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # ---------------------------------------------------------------- collectives
    def _meta(self, values, error):
        if self.world_size == 1 and self.mode == "local":
            if error is not None:
                raise error
            return torch.tensor([[int(v) for v in values]], dtype=torch.int64)
        return Dist.gather_meta(values, error, self.process_group, self.bank.device)

    def _global_lse(self, lse_local: torch.Tensor) -> torch.Tensor:
        """logsumexp over every rank's per-row LSE (0-d fp64 on device): one small all-gather
        in replicated mode; in sharded mode every rank already holds every row's LSE."""
        stats = Dist.lse_stats(lse_local)
        if self.mode == "replicated":
            stats = Dist.all_gather_rows(stats, [1] * self.world_size, self.process_group)
        return Dist.combine_lse_stats(stats)

    def _batch_log_z(self, total_lse: torch.Tensor, count: int, n_cols: int) -> torch.Tensor:
        """log Z of one batch: ``log N + logsumexp_b(lse_b) - log(B (K+1))`` (RepDistiller's
        ``Z = N * mean(exp(u))`` over the B(K+1) scores, without exponentiating)."""
        return total_lse + (math.log(self.n_rows) - math.log(count * n_cols))

    def _set_log_z(self, value: torch.Tensor, checks: Optional[V.ValueChecks] = None) -> None:
        value = value.detach()
        if checks is not None:  # a call that fails its deferred checks leaves log Z as it was
            value = checks.guard_rows(value.to(self.log_z.dtype), lambda: self.log_z)
        self.log_z.copy_(value)
        self._log_z_set = True

    def _ema_log_z(self, batch_log_z: torch.Tensor, checks: Optional[V.ValueChecks] = None) -> None:
        """Z <- m Z + (1 - m) Z_batch, in log space (Z itself overflows fp16 for tau = 0.07)."""
        m = self.z_momentum
        old = self.log_z.to(torch.float64)
        if m == 0.0:
            self._set_log_z(batch_log_z, checks)
            return
        self._set_log_z(torch.logaddexp(old + math.log(m), batch_log_z + math.log1p(-m)), checks)

    # ---------------------------------------------------------------- negatives
    def _validate_positives(self, positives):
        V.index_tensor("positives", positives, device=positives.device, dims=(1,))
        checks = V.ValueChecks()
        checks.index_in_range("positives", positives, self.n_rows)
        checks.run()

    def sample_negatives(self, positives: torch.Tensor, num_negatives: int) -> torch.Tensor:
        """(B, K+1) index: ``positives`` then K negatives from the saved (seed, offset) stream,
        exactly those ``score(positives, num_negatives=K)`` would draw at the same state;
        advances the stream by B_total * K. In distributed modes this is a collective (rank r's
        rows are rows ``sum_{r'<r} B_r' ..`` of the concatenated batch)."""
        err = None
        try:
            if not isinstance(num_negatives, int) or num_negatives < 1:
                raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
            self._validate_positives(positives)
        except (ValueError, TypeError) as exc:
            err = exc
        sizes = self._meta([positives.shape[0] if isinstance(positives, torch.Tensor) else 0], err)[:, 0].tolist()
        start = sum(sizes[:self.rank]) if self.mode != "local" else 0
        idx = ops.sample_negatives(positives, num_negatives, self.n_rows, self._seed,
                                   self._offset + start * num_negatives)
        self._advance(sum(sizes) * num_negatives)
        return idx

    # ---------------------------------------------------------------- scoring
    def forward(self, *args, **kwargs):
        return self.score(*args, **kwargs)

    def _check_score_args(self, anchor, index, num_negatives, loss, logit_scale, bias):
        V.matrix("anchor", anchor, dim=self.dim)
        if anchor.device != self.bank.device:
            raise ValueError(f"anchor is on {anchor.device} but the bank is on {self.bank.device}")
        if loss not in _LOSSES:
            raise ValueError(f"loss must be 'infonce' or 'nce', got {loss!r}")
        index = V.index_tensor("index", index, device=anchor.device, rows=anchor.shape[0])
        if index.dim() == 1:
            if not isinstance(num_negatives, int) or num_negatives < 1:
                raise ValueError("a 1-D index holds only the positives: pass num_negatives=K >= 1 to sample negatives")
            n_cols = num_negatives + 1
        else:
            if num_negatives:
                raise ValueError("num_negatives is only for a 1-D index of positives; a (B, K+1) index already holds the negatives")
            if index.shape[1] < 2:
                raise ValueError(f"index must be (B, K+1) with K >= 1 negatives, got shape {tuple(index.shape)}")
            n_cols = index.shape[1]
        acc = V.accumulation_dtype(anchor, self.bank)
        s = V.scalar("logit_scale", logit_scale, device=anchor.device, dtype=acc, positive=True)
        b = None if bias is None else V.scalar("bias", bias, device=anchor.device, dtype=acc)
        # Distributed: checked here so that every rank raises together. Locally the op checks its
        # inputs; this module checks again only when checks are deferred (CUDA), to guard log Z.
        checks = None
        if self.mode != "local" or V.ValueChecks.deferred(anchor.device):
            checks = V.ValueChecks()
            checks.index_in_range("index", index, self.n_rows)
            checks.finite("anchor", anchor)
            checks.run(deferrable=self.mode == "local")
        return index, n_cols, s, b, checks

    def score(self, anchor: torch.Tensor, index: torch.Tensor, *, logit_scale, bias=None, loss: str = "infonce",
              num_negatives: Optional[int] = None, return_lse: bool = False):
        """Per-row loss (B,) of ``anchor`` (B, D) against the bank rows of ``index``.

        ``index``: (B, K+1) with the positive in column 0, or (B,) positives with
        ``num_negatives=K`` (negatives drawn from the saved stream, which then advances by
        B_total * K; ``sample_negatives`` returns the same indices).
        ``loss="nce"`` uses this bank's log Z: on the first NCE batch it is set to
        ``log N + logsumexp_b(lse_b) - log(B (K+1))`` from this batch's LSE (over all ranks)
        before scoring; with ``z_mode="ema"`` later batches are scored with the current
        estimate, which then moves towards the batch's. ``return_lse=True`` also returns the
        per-row LSE of the logits. Gradients flow to ``anchor``, ``logit_scale`` and ``bias``.

        Replicated mode: scoring is local; one small all-gather (batch sizes, and the batch
        LSE statistics for NCE) keeps the stream and log Z identical on every rank. Sharded
        mode: see ``dcdkernels.memory.distributed``. Both are collectives."""
        err, index_dim, n_cols, s, b, checks = None, 0, 0, None, None, None
        try:
            index, n_cols, s, b, checks = self._check_score_args(anchor, index, num_negatives, loss, logit_scale, bias)
            index_dim = index.dim()
        except (ValueError, TypeError) as exc:
            err = exc
        want_grad = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (anchor, logit_scale, bias))
        B = anchor.shape[0] if err is None else 0
        meta = self._meta([B, n_cols, index_dim, _LOSSES.index(loss) if loss in _LOSSES else -1,
                           int(want_grad), int(return_lse)], err)
        for col, what in ((1, "number of columns K+1"), (2, "kind of index (explicit (B, K+1) or sampled (B,))"),
                          (3, "loss")):
            if len(set(meta[:, col].tolist())) != 1:
                raise ValueError(f"every rank must score with the same {what}; got {meta[:, col].tolist()} per rank")
        sizes = meta[:, 0].tolist()
        start = sum(sizes[:self.rank])
        sampled = index_dim == 1
        if self.mode == "sharded":
            return self._score_sharded(anchor, index, n_cols, s, b, loss, sizes, start, sampled,
                                       bool(meta[:, 4].any()), bool(meta[:, 5].any()), want_grad, return_lse)
        kw = dict(num_negatives=num_negatives if sampled else None, seed=self._seed,
                  offset=self._offset + start * (n_cols - 1), backend=self.backend, return_lse=True)
        was_set = self._log_z_set
        if loss == "nce" and not was_set:
            with torch.no_grad():
                _, lse0 = ops.sampled_contrast(anchor.detach(), self.bank, index, logit_scale=s.detach(),
                                               bias=None if b is None else b.detach(), loss="infonce", **kw)
            self._set_log_z(self._batch_log_z(self._global_lse(lse0), sum(sizes), n_cols), checks)
        per_row, lse = ops.sampled_contrast(anchor, self.bank, index, logit_scale=logit_scale, bias=bias, loss=loss,
                                            log_z=self.log_z if loss == "nce" else None, **kw)
        if loss == "nce" and was_set and self.z_mode == "ema":
            self._ema_log_z(self._batch_log_z(self._global_lse(lse), sum(sizes), n_cols), checks)
        if sampled:
            self._advance(sum(sizes) * (n_cols - 1))
        return (per_row, lse) if return_lse else per_row

    def _score_sharded(self, anchor, index, n_cols, s, b, loss, sizes, start, sampled, any_grad, any_lse,
                       want_grad, return_lse):
        group = self.process_group
        B_local, D = anchor.shape
        q_all = Dist.all_gather_rows(anchor.detach(), sizes, group)
        idx_all = Dist.all_gather_rows(index, sizes, group)
        K = n_cols - 1
        seed, offset, n_rows = self._seed, self._offset, self.n_rows
        if sampled:
            def index_fn(b0, b1):
                return _rng.sample_negatives(idx_all[b0:b1], K, n_rows, seed, offset + b0 * K)
        else:
            def index_fn(b0, b1):
                return idx_all[b0:b1]

        def run(loss_, need_grad, need_lse):
            p = Dist.shard_partials(q_all, index_fn, self.bank, self.row_start, n_rows, n_cols, logit_scale=s, bias=b,
                                    loss=loss_, log_z=self.log_z if loss_ == "nce" else None, need_grad=need_grad,
                                    need_lse=need_lse, backend=self.backend, chunk=self.shard_chunk)
            p = Dist.all_reduce_partials(p, group)
            return Dist.finalize(p, loss=loss_, logit_scale=s, bias=b, need_grad=need_grad, need_lse=need_lse, D=D)

        was_set = self._log_z_set
        ema = loss == "nce" and was_set and self.z_mode == "ema"
        if loss == "nce" and not was_set:
            _, lse0, *_ = run("infonce", False, True)
            self._set_log_z(self._batch_log_z(Dist.combine_lse_stats(Dist.lse_stats(lse0)), sum(sizes), n_cols))
        per_row, lse, ga, gs, gb = run(loss, any_grad, any_lse or ema)
        if ema:
            self._ema_log_z(self._batch_log_z(Dist.combine_lse_stats(Dist.lse_stats(lse)), sum(sizes), n_cols))
        if sampled:
            self._advance(sum(sizes) * K)
        mine = slice(start, start + B_local)
        per_row = per_row[mine]
        if want_grad:
            per_row = Dist.PrecomputedContrast.apply(anchor, s, b, per_row, ga[mine], gs[mine], gb[mine])
        if return_lse:
            return per_row, (lse[mine] if lse is not None else None)
        return per_row

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update_(self, index: torch.Tensor, value: torch.Tensor, momentum: float = 0.5) -> None:
        """``bank[i] <- normalize(m * bank[i] + (1 - m) * value)`` for the rows of ``index`` (B,)
        (SPEC §4; call after scoring). Duplicates: the last occurrence wins. Distributed modes
        all-gather (index, value) in rank order: replicated ranks apply the whole update, sharded
        ranks the part that falls in their rows, so the result equals one process applying the
        concatenated batch. Everything is validated (on every rank) before any row changes."""
        err = None
        try:
            V.matrix("value", value, dim=self.dim)
            if value.device != self.bank.device:
                raise ValueError(f"value is on {value.device} but the bank is on {self.bank.device}")
            index = V.index_tensor("index", index, device=value.device, rows=value.shape[0], dims=(1,))
            if not isinstance(momentum, (float, int)) or not 0.0 <= momentum <= 1.0:
                raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
            if self.mode != "local":  # checked here so that every rank raises together; locally the op checks
                checks = V.ValueChecks()
                checks.index_in_range("index", index, self.n_rows)
                checks.finite("value", value)
                checks.run()
        except (ValueError, TypeError) as exc:
            err = exc
        if self.mode == "local":
            if err is not None:
                raise err
            ops.bank_momentum_update_(self.bank, index, value, momentum, backend=self.backend)
            return
        sizes = self._meta([value.shape[0] if err is None else 0], err)[:, 0].tolist()
        # The update computes in fp32 (fp64 for an fp64 bank) whatever the value dtype: gather in it.
        value = value.detach().to(torch.float64 if self.bank.dtype == torch.float64 else torch.float32)
        idx_all = Dist.all_gather_rows(index, sizes, self.process_group)
        val_all = Dist.all_gather_rows(value, sizes, self.process_group)
        if self.mode == "sharded":
            owned = (idx_all >= self.row_start) & (idx_all < self.row_end)
            idx_all, val_all = idx_all[owned] - self.row_start, val_all[owned]  # order kept: last occurrence rule
            if idx_all.numel() == 0:
                return
        ops.bank_momentum_update_(self.bank, idx_all, val_all, momentum, backend=self.backend)

