"""``MemoryBank``: a memory of N rows held as module buffers (docs/math.md §5).

Buffers (all in ``state_dict()``):
- ``bank`` (N, D) in the storage dtype (fp32 default; bf16 halves the memory). In sharded mode
  only this rank's rows, ``(end - start, D)``.
- ``log_z`` 0-d fp32: log of the NCE partition estimate; NaN until the first NCE batch sets it.
- ``rng_seed``, ``rng_offset`` 0-d int64: the counter-based negative stream (docs/math.md §1d).
- ``shard_layout`` (3,) int64: ``[N, number of shards, this shard]`` (``[N, 1, 0]`` unless
  sharded), checked when a state dict is loaded.

These are ``MemoryState`` state tensors (``dcdkernels.memory.state``): in ``state_dict()`` and
moved by ``.to()``, but not ``named_buffers()``, so DistributedDataParallel never broadcasts them.
Host-side copies of the seed, offset and "log Z is set" flag avoid a device sync per step; they
are refreshed whenever a state dict is loaded (use ``set_rng_state`` to move the stream).
"""

from typing import Optional

import torch

from .. import ops
from ..ops import _validate as V
from . import sharded as Sh
from .state import SCORE_LOSSES, StreamAndPartition, check_rows_dim_dtype, init_rows, wants_grad


class MemoryBank(StreamAndPartition):
    """A bank of ``n_rows`` x ``dim`` memory rows, scored with ``dcdkernels.sampled_contrast``
    and updated with ``dcdkernels.bank_momentum_update_`` (docs/math.md §1, §4, §5).

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
            "sharded" (rank r owns ~N/W contiguous rows; see ``dcdkernels.memory.sharded``).
        process_group: the torch.distributed group (default: the world).
        backend: backend of the fused ops ("auto", "eager", "cpu", "cuda", "triton"), also the
            one sharded scoring runs its partial statistics on.
        seed, offset: initial state of the negative stream.
        shard_chunk: bound on anchor-columns processed at once by sharded scoring.

    In replicated and sharded modes ``score``, ``sample_negatives`` and ``update_`` are
    collectives: every rank of the group must call them, in the same order. Batch sizes may
    differ between ranks. DistributedDataParallel leaves the bank alone (state tensors are not
    buffers, see ``dcdkernels.memory.state``).
    """

    BANK_NAMES = ("bank",)

    def __init__(
        self,
        n_rows: int,
        dim: int,
        *,
        dtype=torch.float32,
        init: str = "uniform",
        init_seed: int = 0,
        z_mode: str = "frozen",
        z_momentum: float = 0.99,
        mode: str = "local",
        process_group=None,
        backend: str = "auto",
        seed: int = 0,
        offset: int = 0,
        device=None,
        shard_chunk: int = 1 << 18,
    ):
        super().__init__()
        check_rows_dim_dtype("n_rows", n_rows, dim, dtype)
        self.dim, self.shard_chunk = dim, int(shard_chunk)
        self._init_state(n_rows, mode=mode, process_group=process_group, backend=backend, device=device)
        self._add_state(
            "bank",
            init_rows(n_rows, dim, self.row_start, self.row_end, init=init, seed=init_seed, dtype=dtype, device=device),
        )
        self._init_stream(seed=seed, offset=offset, log_z_shape=(), z_mode=z_mode, z_momentum=z_momentum, device=device)

    # ---------------------------------------------------------------- scoring
    def _check_score_args(self, anchor, index, num_negatives, loss, logit_scale, bias):
        V.matrix("anchor", anchor, dim=self.dim)
        if anchor.device != self.bank.device:
            raise ValueError(f"anchor is on {anchor.device} but the bank is on {self.bank.device}")
        if loss not in SCORE_LOSSES:
            raise ValueError(f"loss must be 'infonce' or 'nce', got {loss!r}")
        index, n_cols = self._check_score_index(index, num_negatives, anchor)
        s, b = self._check_scale_bias(logit_scale, bias, anchor.device, V.accumulation_dtype(anchor, self.bank))
        # Distributed: checked here so that every rank raises together. Locally the op checks its
        # inputs; this module checks again only when checks are deferred (CUDA), to guard log Z.
        checks = None
        if self.mode != "local" or V.ValueChecks.deferred(anchor.device):
            checks = V.ValueChecks()
            checks.index_in_range("index", index, self.n_rows)
            checks.finite("anchor", anchor)
            # The call that sets log Z (and its host-side "set" flag) is never deferred.
            checks.run(deferrable=self.mode == "local" and (loss != "nce" or self._log_z_set))
        return index, n_cols, s, b, checks

    def score(
        self,
        anchor: torch.Tensor,
        index: torch.Tensor,
        *,
        logit_scale,
        bias=None,
        loss: str = "infonce",
        num_negatives: Optional[int] = None,
        return_lse: bool = False,
    ):
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
        mode: see ``dcdkernels.memory.sharded``. Both are collectives."""
        err, index_dim, n_cols, s, b, checks = None, 0, 0, None, None, None
        try:
            index, n_cols, s, b, checks = self._check_score_args(anchor, index, num_negatives, loss, logit_scale, bias)
            index_dim = index.dim()
        except (ValueError, TypeError) as exc:
            err = exc
        want_grad = wants_grad(anchor, logit_scale, bias)
        B = anchor.shape[0] if err is None else 0
        meta = self._score_meta(err, B, n_cols, index_dim, loss, [int(want_grad), int(return_lse)])
        sizes = meta[:, 0].tolist()
        start = self._batch_offset(sizes)
        sampled = index_dim == 1
        if self.mode == "sharded":
            return self._score_sharded(
                anchor,
                index,
                n_cols,
                s,
                b,
                loss,
                sizes,
                start,
                sampled,
                bool(meta[:, 4].any()),
                bool(meta[:, 5].any()),
                want_grad,
                return_lse,
            )
        kw = dict(
            num_negatives=num_negatives if sampled else None,
            seed=self._seed,
            offset=self._offset + start * (n_cols - 1),
            backend=self.backend,
            return_lse=True,
        )
        was_set = self._log_z_set
        if loss == "nce" and not was_set:
            with torch.no_grad():
                _, lse0 = ops.sampled_contrast(
                    anchor.detach(),
                    self.bank,
                    index,
                    logit_scale=s.detach(),
                    bias=None if b is None else b.detach(),
                    loss="infonce",
                    **kw,
                )
            self._set_log_z(self._batch_log_z([lse0], sum(sizes), n_cols), checks)
        per_row, lse = ops.sampled_contrast(
            anchor,
            self.bank,
            index,
            logit_scale=logit_scale,
            bias=bias,
            loss=loss,
            log_z=self.log_z if loss == "nce" else None,
            **kw,
        )
        if loss == "nce" and was_set and self.z_mode == "ema":
            self._ema_log_z(self._batch_log_z([lse], sum(sizes), n_cols), checks)
        if sampled:
            self._advance(sum(sizes) * (n_cols - 1))
        return (per_row, lse) if return_lse else per_row

    def _score_sharded(
        self, anchor, index, n_cols, s, b, loss, sizes, start, sampled, any_grad, any_lse, want_grad, return_lse
    ):
        B_local, D = anchor.shape
        (q_all,), index_fn = self._gather_for_shards([anchor], index, sizes, sampled, n_cols)
        K = n_cols - 1

        def run(loss_, need_grad, need_lse):
            p = Sh.shard_partials(
                q_all,
                index_fn,
                self.bank,
                need_grad=need_grad,
                need_lse=need_lse,
                **self._shard_kwargs(n_cols, s, b, loss_),
            )
            p = Sh.all_reduce_partials(p, self.process_group)
            return Sh.finalize(p, loss=loss_, logit_scale=s, bias=b, need_grad=need_grad, need_lse=need_lse, D=D)

        was_set = self._log_z_set
        ema = loss == "nce" and was_set and self.z_mode == "ema"
        if loss == "nce" and not was_set:
            _, lse0, *_ = run("infonce", False, True)
            self._set_log_z(self._batch_log_z([lse0], sum(sizes), n_cols))
        per_row, lse, ga, gs, gb = run(loss, any_grad, any_lse or ema)
        if ema:
            self._ema_log_z(self._batch_log_z([lse], sum(sizes), n_cols))
        if sampled:
            self._advance(sum(sizes) * K)
        mine = slice(start, start + B_local)
        per_row = per_row[mine]
        if want_grad:
            per_row = Sh.PrecomputedContrast.apply(anchor, s, b, per_row, ga[mine], gs[mine], gb[mine])
        if return_lse:
            return per_row, (lse[mine] if lse is not None else None)
        return per_row

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update_(self, index: torch.Tensor, value: torch.Tensor, momentum: float = 0.5) -> None:
        """``bank[i] <- normalize(m * bank[i] + (1 - m) * value)`` for the rows of ``index`` (B,)
        (docs/math.md §4; call after scoring). Duplicates: the last occurrence wins. Distributed modes
        all-gather (index, value) in rank order: replicated ranks apply the whole update, sharded
        ranks the part that falls in their rows, so the result equals one process applying the
        concatenated batch. Everything is validated (on every rank) before any row changes."""
        self._update_banks_([self.bank], index, [value], ["value"], momentum)
