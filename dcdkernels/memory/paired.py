"""``PairedMemoryBank``: the two banks of CRD and the DCD memory form (docs/math.md §1c, §5).

State tensors (``MemoryState``): ``bank_s`` (student embeddings, RepDistiller ``memory_v1``),
``bank_t`` (teacher embeddings, ``memory_v2``), ``log_z`` (2,) fp32 = (log Z_s, log Z_t) (NaN
until set; Z_s belongs to the student direction), ``rng_seed``/``rng_offset`` (one negative
stream: both directions read the same indices), ``shard_layout``.

Scored with ``dual_sampled_contrast`` (both directions and the consistency KL from one read of
the rows). Local and replicated modes call the fused op on the whole banks; sharded mode runs
the op on this rank's rows with local indices (absent columns elsewhere) and merges the partials
across ranks (``dcdkernels.memory.sharded.dual_shard_partials``): no rows are gathered.
"""

import math
from typing import Optional

import torch

from .. import ops
from ..ops import _validate as V
from ..ops.dual_sampled_contrast import DualContrastOutput
from . import sharded as Sh
from .state import INITS, SCORE_LOSSES, StreamAndPartition, check_rows_dim_dtype, init_rows, wants_grad

PAIRED_INITS = INITS + ("torch_rng",)


def torch_rng_rows(n_rows: int, dim: int, dtype, device) -> torch.Tensor:
    """RepDistiller's ``ContrastMemory`` init, drawn from torch's global RNG with the same calls:
    ``rand(N, D) * 2 stdv - stdv``, ``stdv = 1/sqrt(D/3)``."""
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(n_rows, dim).mul_(2 * stdv).add_(-stdv).to(dtype=dtype, device=device)


class PairedMemoryBank(StreamAndPartition):
    """``bank_s`` and ``bank_t`` of ``n_rows`` x ``dim``, one negative stream, one log Z per direction.

    Args:
        n_rows, dim, dtype: as ``MemoryBank`` (both banks share one dtype).
        init: "torch_rng" (RepDistiller: both banks drawn from torch's global RNG, ``bank_s``
            first; local and replicated modes), or one of ``MemoryBank``'s inits ("uniform" is
            RepDistiller's distribution drawn in seeded blocks, identical whatever the world
            size; ``init_seed`` seeds ``bank_s``, ``init_seed + 1`` ``bank_t``).
        z_mode, z_momentum, mode, process_group, backend, seed, offset, device, shard_chunk: as
            ``MemoryBank``.

    ``score`` and ``update_`` are collectives in replicated and sharded modes (every rank calls
    them in the same order; batch sizes may differ).
    """

    BANK_NAMES = ("bank_s", "bank_t")

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
        if init not in PAIRED_INITS:
            raise ValueError(f"init must be one of {PAIRED_INITS}, got {init!r}")
        if init == "torch_rng" and mode == "sharded":
            raise ValueError(
                "init='torch_rng' draws the whole banks; a sharded bank uses init='uniform' "
                "(the same distribution, drawn in seeded blocks)"
            )
        self.dim, self.shard_chunk = dim, int(shard_chunk)
        self._init_state(n_rows, mode=mode, process_group=process_group, backend=backend, device=device)
        for j, name in enumerate(("bank_s", "bank_t")):
            if init == "torch_rng":
                rows = torch_rng_rows(n_rows, dim, dtype, device)
            else:
                rows = init_rows(
                    n_rows, dim, self.row_start, self.row_end, init=init, seed=init_seed + j, dtype=dtype, device=device
                )
            self._add_state(name, rows)
        self._init_stream(
            seed=seed, offset=offset, log_z_shape=(2,), z_mode=z_mode, z_momentum=z_momentum, device=device
        )

    # ---------------------------------------------------------------- scoring
    def _check_score_args(
        self, anchor_s, anchor_t, index, num_negatives, loss, logit_scale, bias, consistency, update_state, update_index
    ):
        V.matrix("anchor_s", anchor_s, dim=self.dim)
        V.matrix("anchor_t", anchor_t, dim=self.dim, device=anchor_s.device)
        if anchor_t.shape != anchor_s.shape:
            raise ValueError(f"anchor_t has shape {tuple(anchor_t.shape)} but anchor_s has {tuple(anchor_s.shape)}")
        if anchor_s.device != self.bank_s.device:
            raise ValueError(f"anchor_s is on {anchor_s.device} but the banks are on {self.bank_s.device}")
        if loss not in SCORE_LOSSES:
            raise ValueError(f"loss must be 'infonce' or 'nce', got {loss!r}")
        if not isinstance(consistency, (float, int)) or not consistency >= 0:
            raise ValueError(f"consistency must be a float >= 0, got {consistency!r}")
        if consistency and loss != "infonce":
            raise ValueError("the consistency KL is defined for loss='infonce' only")
        if loss == "nce" and not self._log_z_set and not update_state:
            raise RuntimeError("Z is not set yet: run a training batch or load a state first")
        index, n_cols = self._check_score_index(index, num_negatives, anchor_s)
        acc = V.accumulation_dtype(anchor_s, anchor_t, self.bank_s)
        s, b = self._check_scale_bias(logit_scale, bias, anchor_s.device, acc)
        # Every check before any state changes. Distributed: here, so that every rank raises
        # together. Locally the op checks its inputs; the call that sets log Z (and its host-side
        # flag) is checked here, never deferred; other deferred (CUDA) checks guard the log Z EMA.
        if update_index is not None:
            update_index = V.index_tensor(
                "update_index", update_index, device=anchor_s.device, rows=anchor_s.shape[0], dims=(1,)
            )
        checks = None
        sets_z = loss == "nce" and not self._log_z_set
        if self.mode != "local" or sets_z or update_index is not None or V.ValueChecks.deferred(anchor_s.device):
            checks = V.ValueChecks()
            checks.index_in_range("index", index, self.n_rows)
            if update_index is not None:
                checks.index_in_range("idx", update_index, self.n_rows)
            checks.finite("anchor_s", anchor_s)
            checks.finite("anchor_t", anchor_t)
            checks.run(deferrable=self.mode == "local" and not sets_z)
        return index, n_cols, s, b, checks

    def score(
        self,
        anchor_s: torch.Tensor,
        anchor_t: torch.Tensor,
        index: torch.Tensor,
        *,
        logit_scale,
        bias=None,
        loss: str = "infonce",
        consistency: float = 0.0,
        num_negatives: Optional[int] = None,
        update_state: bool = True,
        update_index: Optional[torch.Tensor] = None,
    ) -> DualContrastOutput:
        """Both CRD directions at the same indices: ``anchor_s`` (B, D) against ``bank_t`` rows,
        ``anchor_t`` against ``bank_s`` rows, and ``consistency * KL(p^t || p^s)`` per row
        (``dcdkernels.dual_sampled_contrast``). Returns a ``DualContrastOutput`` of per-row tensors.

        ``index``: (B, K+1) with the positive in column 0, or (B,) positives with
        ``num_negatives=K`` drawn from the saved stream (which then advances by B_total * K).
        ``loss="nce"``: the first batch sets ``log_z`` per direction from a no-grad InfoNCE pass
        (``comm.log_partition`` over the global batch); ``z_mode="ema"`` moves it after each later
        batch (scored with the previous estimate). ``update_state=False`` (evaluation) changes
        nothing: no log Z estimate, no stream advance. ``update_index``: the rows a following
        ``update_`` will write, range-checked with the scoring inputs (before log Z changes).
        Gradients reach both anchors, a learnable ``logit_scale`` and ``bias``."""
        err, index_dim, n_cols, s, b, checks = None, 0, 0, None, None, None
        try:
            index, n_cols, s, b, checks = self._check_score_args(
                anchor_s,
                anchor_t,
                index,
                num_negatives,
                loss,
                logit_scale,
                bias,
                consistency,
                update_state,
                update_index,
            )
            index_dim = index.dim()
        except (ValueError, TypeError, RuntimeError) as exc:
            err = exc
        want_grad = wants_grad(anchor_s, anchor_t, logit_scale, bias)
        B = anchor_s.shape[0] if err is None else 0
        meta = self._score_meta(
            err,
            B,
            n_cols,
            index_dim,
            loss,
            [int(want_grad), int(bool(consistency)), int(update_state)],
            same=((5, "consistency on/off"), (6, "update_state")),
        )
        sizes = meta[:, 0].tolist()
        start = self._batch_offset(sizes)
        sampled = index_dim == 1
        sets_z = loss == "nce" and not self._log_z_set and update_state
        ema = loss == "nce" and self._log_z_set and self.z_mode == "ema" and update_state
        if self.mode == "sharded":
            out = self._score_sharded(
                anchor_s,
                anchor_t,
                index,
                n_cols,
                s,
                b,
                loss,
                float(consistency),
                sizes,
                start,
                sampled,
                bool(meta[:, 4].any()),
                want_grad,
                sets_z,
                ema,
            )
        else:
            kw = dict(
                num_negatives=n_cols - 1 if sampled else None,
                seed=self._seed,
                offset=self._offset + start * (n_cols - 1),
                backend=self.backend,
            )
            if sets_z:
                with torch.no_grad():
                    est = ops.dual_sampled_contrast(
                        anchor_s.detach(),
                        anchor_t.detach(),
                        self.bank_s,
                        self.bank_t,
                        index,
                        logit_scale=s.detach(),
                        bias=None if b is None else b.detach(),
                        loss="infonce",
                        **kw,
                    )
                self._set_log_z(self._batch_log_z([est.lse_s, est.lse_t], sum(sizes), n_cols), checks)
            out = ops.dual_sampled_contrast(
                anchor_s,
                anchor_t,
                self.bank_s,
                self.bank_t,
                index,
                logit_scale=logit_scale,
                bias=bias,
                loss=loss,
                log_z=self.log_z if loss == "nce" else None,
                consistency=float(consistency),
                **kw,
            )
            if ema:
                self._ema_log_z(self._batch_log_z([out.lse_s, out.lse_t], sum(sizes), n_cols), checks)
        if sampled and update_state:
            self._advance(sum(sizes) * (n_cols - 1))
        return out

    def _score_sharded(
        self,
        anchor_s,
        anchor_t,
        index,
        n_cols,
        s,
        b,
        loss,
        consistency,
        sizes,
        start,
        sampled,
        any_grad,
        want_grad,
        sets_z,
        ema,
    ):
        B_local = anchor_s.shape[0]
        (qs_all, qt_all), index_fn = self._gather_for_shards([anchor_s, anchor_t], index, sizes, sampled, n_cols)

        def run(loss_, need_grad, need_kl):
            p = Sh.dual_shard_partials(
                qs_all,
                qt_all,
                index_fn,
                self.bank_s,
                self.bank_t,
                need_grad=need_grad,
                need_lse=True,
                need_kl=need_kl,
                **self._shard_kwargs(n_cols, s, b, loss_),
            )
            p = Sh.all_reduce_partials(p, self.process_group)
            return Sh.finalize_dual(
                p,
                qs_all,
                qt_all,
                loss=loss_,
                logit_scale=s,
                bias=b,
                need_grad=need_grad,
                need_lse=True,
                need_kl=need_kl,
            )

        if sets_z:
            _, lse0, _, _ = run("infonce", False, False)
            self._set_log_z(self._batch_log_z([lse0[0], lse0[1]], sum(sizes), n_cols))
        losses, lse, ga, gsc = run(loss, any_grad, consistency > 0)
        if ema:
            self._ema_log_z(self._batch_log_z([lse[0], lse[1]], sum(sizes), n_cols))
        mine = slice(start, start + B_local)
        losses, lse = losses[:, mine], lse[:, mine]
        if want_grad:
            losses = Sh.PrecomputedDualContrast.apply(anchor_s, anchor_t, s, b, losses, ga[:, mine], gsc[:, :, mine])
        return DualContrastOutput(losses[0], losses[1], losses[2] * consistency, lse[0], lse[1])

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update_(self, index: torch.Tensor, value_s: torch.Tensor, value_t: torch.Tensor, momentum: float = 0.5) -> None:
        """``bank_s[i] <- normalize(m bank_s[i] + (1 - m) value_s)`` and the same for ``bank_t``
        at the rows of ``index`` (B,) (docs/math.md §4; after scoring), from one all-gather in
        distributed modes; both banks validated (on every rank) before any row changes."""
        self._update_banks_([self.bank_s, self.bank_t], index, [value_s, value_t], ["value_s", "value_t"], momentum)
