"""Drop-ins for the memory-bank losses of lightly and pytorch-metric-learning, backed by
:class:`dcdkernels.memory.MomentumQueue` and the fused ``dense_contrast`` op (the (B, M) logits
against the memory are never materialised). Neither library is needed to use them.

* :class:`NTXentMemoryLoss` = ``lightly.loss.NTXentLoss(temperature, memory_bank_size,
  gather_distributed)`` (lightly 1.6: ``memory_bank_size`` is ``0`` or ``(num_features, dim)``).
* :class:`CrossBatchMemory` = ``pytorch_metric_learning.losses.CrossBatchMemory(loss,
  embedding_size, memory_size)`` around ``NTXentLoss(temperature)`` or ``SupConLoss(temperature)``
  (pytorch-metric-learning's own loss objects, or :class:`PMLNTXentLoss` / :class:`PMLSupConLoss`).
"""

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, ops
from ..memory import MomentumQueue


def _keys_for_scoring(queue: Tensor, anchor: Tensor, backend: str) -> Tensor:
    """The queue itself, or a snapshot where the eager path's autograd saves the keys (the
    queue is written in place after scoring; the fused reduced op saves only gradients)."""
    acc = torch.float64 if torch.float64 in (anchor.dtype, queue.dtype) else torch.float32
    if backends.resolve(backend, anchor.device, "dense_contrast_reduced", acc) == "eager":
        return queue.clone()
    return queue


class NTXentMemoryLoss(nn.Module):
    """lightly's ``NTXentLoss`` (SimCLR; MoCo with a memory bank), same constructor and forward.

    ``forward(out0, out1)``: both views are L2-normalised; with a memory bank the logits of
    ``out0`` are ``[out0 . out1, out0 . bank] / temperature`` (positive in column 0, the bank as it
    was before this batch) and the loss is their mean cross-entropy; then, if ``out0`` requires
    grad, ``out1`` is enqueued. As lightly, a batch that crosses the end of the bank writes only
    the rows up to the end and the pointer returns to 0 (the rest of that batch is dropped). The
    bank starts as lightly's (``normalize(torch.randn(size))`` from torch's global RNG), so under
    the same ``torch.manual_seed`` both start identical. Without a memory bank
    (``memory_bank_size=0``) the in-batch SimCLR loss is computed as lightly does (its (2B, 2B)
    logits are small).

    Differences: the bank (``memory_bank.queue``, ``memory_bank.queue_ptr``) is in ``state_dict()``
    (lightly's buffers are not persistent), so a resumed run continues the same bank; temperature
    must be > 0; ``gather_distributed`` uses ``MomentumQueue(mode="replicated")`` (every rank's
    keys in rank order; a gathered batch crossing the end wraps instead of being truncated), and
    the in-batch form supports it only on one process. ``backend`` selects the op backend.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        size = (memory_bank_size,) if isinstance(memory_bank_size, int) else tuple(memory_bank_size)
        if any(int(x) < 0 for x in size):
            raise ValueError(f"memory_bank_size: all entries must be non-negative, got {memory_bank_size}")
        if isinstance(memory_bank_size, int) and memory_bank_size > 0:
            raise ValueError(
                f"memory_bank_size={memory_bank_size} does not give the feature dimension: pass "
                f"memory_bank_size=({memory_bank_size}, dim), or 0 to disable the memory bank"
            )
        if size != (0,) and len(size) != 2:
            raise ValueError(f"memory_bank_size must be 0 or (num_features, dim), got {memory_bank_size}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.gather_distributed, self.backend = float(temperature), gather_distributed, backend
        self.eps = 1e-8
        self.memory_bank: Optional[MomentumQueue] = None
        if size != (0,):
            n, dim = int(size[0]), int(size[1])
            self.memory_bank = MomentumQueue(n, dim, init="empty", mode="replicated" if gather_distributed else "local")
            with torch.no_grad():  # lightly's MemoryBankModule init, same RNG calls
                self.memory_bank.queue.copy_(F.normalize(torch.randn((n, dim)), dim=-1))

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if not isinstance(out0, Tensor) or not isinstance(out1, Tensor) or out0.dim() != 2 or out0.shape != out1.shape:
            raise ValueError(
                "out0 and out1 must be (batch_size, embedding_size) tensors of one shape, got "
                f"{getattr(out0, 'shape', type(out0))} and {getattr(out1, 'shape', type(out1))}"
            )
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        if self.memory_bank is None:
            return self._in_batch(out0, out1)
        bank = self.memory_bank
        if out0.shape[1] != bank.dim:
            raise ValueError(f"out0 has {out0.shape[1]} features but the memory bank holds {bank.dim}")
        if bank.queue.device != out0.device:
            bank.to(out0.device)
        keys = _keys_for_scoring(bank.queue, out0, self.backend)
        loss = ops.dense_contrast(
            out0, keys, positive=out1, logit_scale=1.0 / self.temperature, reduction="mean", backend=self.backend
        )
        if out0.requires_grad:
            self._enqueue(out1.detach())
        return loss

    def _enqueue(self, keys: Tensor) -> None:
        bank = self.memory_bank
        if bank.mode == "local":
            room = bank.size - bank.pointer
            keys = keys[:room]  # lightly: the part of the batch past the end is dropped
        bank.enqueue_(keys)

    def _in_batch(self, out0: Tensor, out1: Tensor) -> Tensor:
        if (
            self.gather_distributed
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            raise NotImplementedError(
                "NTXentMemoryLoss: gather_distributed without a memory bank is not supported; "
                "use lightly's NTXentLoss for the distributed in-batch form"
            )
        B = out0.shape[0]
        eye = torch.eye(B, device=out0.device, dtype=torch.bool)
        t = self.temperature
        l00 = (out0 @ out0.t() / t)[~eye].view(B, -1)
        l11 = (out1 @ out1.t() / t)[~eye].view(B, -1)
        logits = torch.cat([torch.cat([out0 @ out1.t() / t, l00], 1), torch.cat([out1 @ out0.t() / t, l11], 1)], 0)
        labels = torch.arange(B, device=out0.device).repeat(2)
        return F.cross_entropy(logits, labels)


# ------------------------------------------------------------------------- pytorch-metric-learning
class PMLNTXentLoss:
    """Stands for ``pytorch_metric_learning.losses.NTXentLoss(temperature)`` inside
    :class:`CrossBatchMemory` when that library is not installed."""

    def __init__(self, temperature: float = 0.07):
        self.temperature = float(temperature)


class PMLSupConLoss:
    """Stands for ``pytorch_metric_learning.losses.SupConLoss(temperature)``."""

    def __init__(self, temperature: float = 0.1):
        self.temperature = float(temperature)


_DEFAULT_REDUCER = {"NTXentLoss": "MeanReducer", "SupConLoss": "AvgNonZeroReducer"}


def _loss_kind(loss) -> str:
    if isinstance(loss, PMLNTXentLoss):
        return "NTXentLoss"
    if isinstance(loss, PMLSupConLoss):
        return "SupConLoss"
    name = type(loss).__name__
    if name not in _DEFAULT_REDUCER or not hasattr(loss, "temperature"):
        raise ValueError(
            f"CrossBatchMemory (dcdkernels) supports NTXentLoss and SupConLoss, got {name}; "
            "use pytorch-metric-learning's CrossBatchMemory for the others"
        )
    distance = type(getattr(loss, "distance", None)).__name__
    reducer = type(getattr(loss, "reducer", None)).__name__
    if (
        distance != "CosineSimilarity"
        or reducer != _DEFAULT_REDUCER[name]
        or getattr(loss, "embedding_regularizer", None) is not None
    ):
        raise ValueError(
            f"CrossBatchMemory (dcdkernels) supports {name} with its default CosineSimilarity "
            f"distance and {_DEFAULT_REDUCER[name]}, no regularizer; got {distance}, {reducer}"
        )
    return name


# Masked logits: a finite "minus infinity" (as pytorch-metric-learning's finfo.min), so that an
# all-masked row's logsumexp has finite gradients (an exact -inf row would give NaN, even times 0).
_NEG = -1e30


def _logsubexp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) - exp(b)) for a > b."""
    return a + torch.log(-torch.expm1(b - a))


class CrossBatchMemory(nn.Module):
    """pytorch-metric-learning's ``CrossBatchMemory(loss, embedding_size, memory_size)`` for
    ``NTXentLoss`` / ``SupConLoss``, same constructor and ``forward(embeddings, labels)``.

    As the original: the batch is first written to the memory (a ring of ``memory_size`` rows,
    wrapping, with its labels), then every embedding is compared with every memory row written so
    far, except its own slot (pairs of equal labels positive, others negative), with cosine
    similarity over ``temperature``; NTXent averages ``-log(e^{s_ap} / (e^{s_ap} + sum_n e^{s_an}))``
    over the positive pairs, SupCon ``-mean_p log softmax`` over the anchors with a non-zero loss.

    Here the memory rows other than this batch's are scored with the fused ``dense_contrast`` op
    (per-row LSE of ``q . memory / T``, gradients to the embeddings; the (B, M) similarity matrix is
    never formed), and the small (B, B) in-batch part directly. SupCon's denominator and its sum of
    positive logits (through per-label sums of the memory rows) follow exactly from those. NTXent's
    negatives exclude the rows of the anchor's label: ``log(exp(LSE_all) - exp(LSE_same))``, with
    the rows of the anchor's label scored explicitly; an anchor whose label holds over 95 % of its
    memory mass is recomputed from its masked similarity row (no cancellation). A fused SupCon op
    (branch wt-pckd) is meant to replace the SupCon composition once it lands.

    Memory: ``embedding_memory`` holds the L2-normalised rows (cosine similarity depends only on
    the direction; the original stores them unnormalised), ``label_memory`` the labels, both in
    ``state_dict()`` with the pointer (``queue_idx``) and ``has_been_filled``.
    Not supported (a clear error): ``miner``, ``indices_tuple``, ``enqueue_mask``, losses other
    than NTXent/SupCon or with a non-default distance/reducer.
    """

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None, *, backend: str = "auto"):
        super().__init__()
        if miner is not None:
            raise ValueError("CrossBatchMemory (dcdkernels): miners are not supported")
        self.kind = _loss_kind(loss)
        self.loss = loss
        self.temperature = float(loss.temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.embedding_size, self.memory_size, self.backend = int(embedding_size), int(memory_size), backend
        self.memory = MomentumQueue(self.memory_size, self.embedding_size, init="zeros")
        self.register_buffer("label_memory", torch.zeros(self.memory_size, dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.bool))

    @property
    def embedding_memory(self) -> Tensor:
        return self.memory.queue

    @property
    def queue_idx(self) -> int:
        return self.memory.pointer

    @property
    def has_been_filled(self) -> bool:
        return bool(self.filled)

    def reset_queue(self) -> None:
        """An empty memory, as the original's ``reset_queue``."""
        device = self.label_memory.device
        self.memory = MomentumQueue(self.memory_size, self.embedding_size, init="zeros", device=device)
        with torch.no_grad():
            self.label_memory.zero_()
            self.filled.fill_(False)

    # -------------------------------------------------------------- forward
    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None, enqueue_mask=None) -> Tensor:
        if indices_tuple is not None or enqueue_mask is not None:
            raise NotImplementedError(
                "CrossBatchMemory (dcdkernels): indices_tuple and enqueue_mask are not "
                "supported; use pytorch-metric-learning's class for them"
            )
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (B, {self.embedding_size}), got {getattr(embeddings, 'shape', None)}")
        if not isinstance(labels, Tensor) or labels.shape != (embeddings.shape[0],) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer ({embeddings.shape[0]},) tensor")
        B, M = embeddings.shape[0], self.memory_size
        if B > M:
            raise ValueError(f"batch of {B} is larger than memory_size ({M})")
        if self.memory.queue.device != embeddings.device:
            self.to(embeddings.device)
        labels = labels.to(device=embeddings.device, dtype=torch.int64)
        q = F.normalize(embeddings, dim=1).to(self.memory.queue.dtype)
        start = self.memory.pointer
        was_filled = self.has_been_filled
        with torch.no_grad():
            self.memory.enqueue_(q.detach())
            rows = (start + torch.arange(B, device=q.device)) % M
            self.label_memory.index_copy_(0, rows, labels)
            if not was_filled and self.memory.pointer <= start:
                self.filled.fill_(True)
        # Memory rows other than this batch's: one or two contiguous ranges.
        if not self.has_been_filled:
            old = [(0, start)]
        elif start + B <= M:
            old = [(start + B, M), (0, start)]
        else:
            old = [(start + B - M, start)]
        old = [(a, b) for a, b in old if b > a]
        return self._supcon(q, labels, old) if self.kind == "SupConLoss" else self._ntxent(q, labels, old)

    def _scale(self) -> float:
        return 1.0 / self.temperature

    def _old_lse(self, q: Tensor, old) -> Tensor:
        """Per-anchor LSE (B,) of ``q . rows / T`` over the old memory rows, with gradient to q."""
        out = []
        for a, b in old:
            keys = self.memory.queue[a:b]
            target = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
            per_row = ops.dense_contrast(q, keys, target, logit_scale=self._scale(), backend=self.backend)
            out.append(per_row + (q @ keys[0]) * self._scale())  # LSE = CE + logit of the target column
        if not out:
            return torch.full((q.shape[0],), _NEG, dtype=q.dtype, device=q.device)
        return torch.stack(out).logsumexp(0) if len(out) > 1 else out[0]

    def _label_buckets(self, labels: Tensor, old, want_sums: bool):
        """Unique batch labels, each anchor's bucket, per bucket the old rows' count (and sum of
        rows if ``want_sums``), and the old rows of a batch label with their buckets."""
        uniq, inv = torch.unique(labels, return_inverse=True)
        U = uniq.shape[0]
        sums = (
            torch.zeros((U + 1, self.embedding_size), dtype=self.memory.queue.dtype, device=labels.device)
            if want_sums
            else None
        )
        counts = torch.zeros(U + 1, dtype=torch.int64, device=labels.device)
        hits = []
        for a, b in old:
            lab = self.label_memory[a:b]
            pos = torch.searchsorted(uniq, lab).clamp_max(U - 1)
            hit = uniq[pos] == lab
            bucket = torch.where(hit, pos, torch.full_like(pos, U))
            if want_sums:
                sums.index_add_(0, bucket, self.memory.queue[a:b])
            counts += torch.bincount(bucket, minlength=U + 1)
            where = hit.nonzero().squeeze(1)
            hits.append((a + where, pos[where]))
        return inv, None if sums is None else sums[:U], counts[:U], hits

    def _batch_part(self, q: Tensor, labels: Tensor):
        """(B, B) in-batch logits (keys detached, self on the diagonal), same-label mask (no self)."""
        logits = q @ q.detach().t() * self._scale()
        eye = torch.eye(q.shape[0], dtype=torch.bool, device=q.device)
        same = (labels[:, None] == labels[None, :]) & ~eye
        return logits, same, eye

    def _zero(self, q: Tensor) -> Tensor:
        return (q * 0).sum()

    def _supcon(self, q, labels, old):
        lse_old = self._old_lse(q, old)
        inv, sums, counts, _ = self._label_buckets(labels, old, want_sums=True)
        logits_bb, same, eye = self._batch_part(q, labels)
        lse_bb = logits_bb.masked_fill(eye, _NEG).logsumexp(1)
        den = torch.logaddexp(lse_old, lse_bb)
        pos_sum = (q * sums[inv]).sum(1) * self._scale() + (logits_bb * same).sum(1)
        n_pos = counts[inv] + same.sum(1)
        n_keys = sum(b - a for a, b in old) + q.shape[0] - 1
        if int(n_pos.sum()) == 0 or int((n_keys - n_pos).sum()) == 0 or n_keys == 0:
            return self._zero(q)
        n_pos_f = n_pos.to(q.dtype)
        losses = -(pos_sum - n_pos_f * den) / (n_pos_f + torch.finfo(q.dtype).tiny)
        kept = losses[losses > 0]
        return kept.mean() if kept.numel() else self._zero(q)

    def _ntxent(self, q, labels, old):
        scale = self._scale()
        lse_old = self._old_lse(q, old)
        inv, _, counts, hits = self._label_buckets(labels, old, want_sums=False)
        logits_bb, same, eye = self._batch_part(q, labels)
        lse_all = torch.logaddexp(lse_old, logits_bb.masked_fill(eye, _NEG).logsumexp(1))
        # Positive pairs: old rows of the anchor's label, and same-label batch rows.
        rows = torch.cat([r for r, _ in hits]) if hits else torch.zeros(0, dtype=torch.int64, device=q.device)
        buckets = torch.cat([u for _, u in hits]) if hits else rows
        logits_hit = q @ self.memory.queue[rows].t() * scale  # (B, H)
        mask_hit = inv[:, None] == buckets[None, :]
        lse_same = torch.logaddexp(
            logits_hit.masked_fill(~mask_hit, _NEG).logsumexp(1), logits_bb.masked_fill(~same, _NEG).logsumexp(1)
        )
        n_old = sum(b - a for a, b in old)
        n_pos = int(mask_hit.sum()) + int(same.sum())
        n_neg_per = (n_old - counts[inv]) + (q.shape[0] - 1 - same.sum(1))
        n_neg = int(n_neg_per.sum())
        if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
            return self._zero(q)
        has_neg = n_neg_per > 0
        share = (lse_same - lse_all).detach()
        exact = has_neg & (share > math.log(0.95))  # the negatives hold under 5 % of the mass
        safe_same = torch.where(has_neg & ~exact, lse_same, lse_all - 1.0)  # finite where unused
        lse_neg = torch.where(has_neg & ~exact, _logsubexp(lse_all, safe_same), torch.zeros_like(lse_all))
        idx = (exact & has_neg).nonzero().squeeze(1)
        if idx.numel():
            lse_neg = lse_neg.index_put((idx,), self._masked_neg_lse(q[idx], labels[idx], old, labels, q.detach()))
        # Pair losses: softplus(LSE_neg(a) - s_ap) = -log(e^s / (e^s + sum_n e^n)); 0 without negatives.
        neg_a = torch.where(has_neg, lse_neg, torch.full_like(lse_neg, -1e4))[:, None]
        l_hit = (F.softplus(neg_a - logits_hit) * (mask_hit & has_neg[:, None])).sum()
        l_bb = (F.softplus(neg_a - logits_bb) * (same & has_neg[:, None])).sum()
        return (l_hit + l_bb) / n_pos

    def _masked_neg_lse(self, q_sub, lab_sub, old, labels, keys_bb):
        """LSE over the other-label memory rows for a few anchors (each has at least one), from
        their masked similarity rows."""
        scale = self._scale()
        parts = [
            (q_sub @ self.memory.queue[a:b].t() * scale).masked_fill(
                self.label_memory[a:b][None, :] == lab_sub[:, None], _NEG
            )
            for a, b in old
        ]
        parts.append((q_sub @ keys_bb.t() * scale).masked_fill(labels[None, :] == lab_sub[:, None], _NEG))
        return torch.cat(parts, 1).logsumexp(1)
