"""CoCoRD, Contrastive Consistent Representation Distillation (Fu et al., BMVC 2023), as a
drop-in loss on backbone features. Official code: ShipengFu/CoCoRD (``cocord/builder.py``,
``helper/loop.py``, ``helper/util.py``, ``options/train_student.yml``) (docs/math.md §3).

Per step (official order):
1. EMA: slow student (encoder + projector) <- 0.9 slow + 0.1 student; teacher projection head
   <- 0.999 head + 0.001 student projector (``torch._foreach_lerp_``).
2. Query ``q = normalize(projector(f_s))``; key ``k = normalize(teacher_head(f_t))`` (no grad).
3. InfoNCE at T = 0.1 over ``[q.k, q.queue]`` (``dense_contrast(positive=k)``).
4. Enqueue ``k`` into the FIFO ring of 2048 keys AFTER scoring (pointer saved in a buffer).
5. BYOL term ``2 - 2 cos(predictor(projector(f_s)), slow(view 2))``, symmetric over the views.
Total = ``ctr_weight * L_ctr + pred_weight * L_pred`` (1 and 4); add the student's CE yourself.
"""

import copy
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..memory import MomentumQueue, check_loadable
from ._common import (
    MEMORY_MODES,
    check_features,
    ema_,
    finite_checks,
    first_linear_in_features,
    freeze_,
    make_projector,
    no_autocast,
    parameter_pairs,
    rename_keys,
    to_loss_dtype,
)


def make_predictor(dim: int, pred_dim: int) -> nn.Sequential:
    """CoCoRD's predictor: dim-pred_dim-dim with BN and ReLU (2048-512-2048)."""
    return make_projector(dim, pred_dim, dim)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """``2 - 2 cos(p, z)`` per row (CoCoRD's ``DistillMSE``)."""
    p, z = F.normalize(to_loss_dtype(p), dim=-1), F.normalize(to_loss_dtype(z), dim=-1)
    return 2 - 2 * (p * z).sum(dim=-1)


def _call_encoder(encoder: nn.Module, x: Tensor) -> Tensor:
    return encoder(x)


class CoCoRDLoss(nn.Module):
    """CoCoRD distillation loss with its projector, predictor, slow student and teacher head.

    Args:
        s_dim, t_dim: student / teacher backbone feature sizes.
        embed_dim: projector output / queue key size (2048). hidden_dim: projector hidden (2048).
        pred_dim: predictor hidden (512). queue_size: K keys in the queue (2048).
        temperature: InfoNCE temperature (0.1). teacher_momentum: EMA of the teacher head (0.999).
        slow_momentum: EMA of the slow student (0.9). ctr_weight, pred_weight: 1.0 and 4.0.
        student_encoder: optional student backbone. If given, a frozen deep copy becomes the slow
            encoder (EMA'd with the projector) and ``forward`` can take the raw views ``x_s``,
            ``x_s2``; otherwise pass the slow encoder's features ``f_slow``/``f_slow2`` yourself
            (computed after :meth:`momentum_update` for the official order).
        feature_fn: ``feature_fn(encoder, x) -> (B, s_dim)`` features of the slow encoder
            (default ``encoder(x)``; e.g. ``lambda m, x: m(x, is_feat=True)[0][-1]`` for RepDistiller).
        backend: backend of the contrast op. queue_dtype: storage dtype of the queue.
        memory_mode: "local" (default) or "replicated": every rank all-gathers its keys in rank
            order before the enqueue (MoCo's ``concat_all_gather``), so every rank holds the queue
            one process would hold on the concatenated batch. "sharded" means the same as
            "replicated" here: the queue holds K keys whatever the dataset size and is scored
            densely, so there is nothing to shard by dataset row. BatchNorm in the heads stays
            per rank (convert them with ``SyncBatchNorm`` on GPUs for global statistics).
        process_group: the group of the distributed modes (default: the world).
        queue_init: "torch_rng" (unit rows from torch's global RNG, as before; the local default)
            or "normal" (the same distribution in seeded blocks, ``queue_seed``; the default of the
            distributed modes, so that every rank starts from the same queue).

    ``forward(f_s, f_t, f_s2=None, f_slow=None, f_slow2=None, *, x_s=None, x_s2=None)``:
        ``f_s``/``f_s2`` student features of views 1 / 2 (view 1 is the query), ``f_t`` teacher
        features (the official code feeds the teacher a third view), ``f_slow`` the slow student's
        features of view 2 (target of view 1's prediction) and ``f_slow2`` of view 1. ``f_s2`` and
        the slow features are only needed when ``pred_weight > 0``.

    Teacher dim != student dim: the official code copies and EMAs the student projector into the
    teacher head parameter by parameter, which breaks at the first Linear (``(hidden, t_dim)`` vs
    ``(hidden, s_dim)``). Here the teacher head has its own input layer ``Linear(t_dim, hidden)``:
    it is initialised independently and stays fixed (the head never gets gradients, as in the
    official code: keys are computed under no_grad), i.e. a random projection of the teacher
    features; every shape-compatible parameter (its bias, BN affine, second Linear) is copied at
    init and EMA'd from the student projector exactly as officially. With equal dims all
    parameters are EMA'd, as in the official code.

    State: ``self.memory``, a :class:`dcdkernels.memory.MomentumQueue` (``memory.queue`` (K,
    embed_dim) unit rows (the official layout is (embed_dim, K)), ``memory.queue_ptr``);
    ``queue`` and ``queue_ptr`` remain as attributes and the former keys load. In eval mode
    nothing is updated (no EMA, no enqueue). Every input is checked (finite features, batch
    against the queue, on every rank) before any EMA, BatchNorm statistics or enqueue.
    ``last_terms`` holds the detached ``{"ctr", "pred"}`` terms of the last call.
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        embed_dim: int = 2048,
        hidden_dim: int = 2048,
        pred_dim: int = 512,
        queue_size: int = 2048,
        temperature: float = 0.1,
        teacher_momentum: float = 0.999,
        slow_momentum: float = 0.9,
        ctr_weight: float = 1.0,
        pred_weight: float = 4.0,
        *,
        student_encoder: Optional[nn.Module] = None,
        feature_fn: Optional[Callable] = None,
        backend: str = "auto",
        queue_dtype: torch.dtype = torch.float32,
        memory_mode: str = "local",
        process_group=None,
        queue_init: Optional[str] = None,
        queue_seed: int = 0,
    ):
        super().__init__()
        if queue_size < 1 or temperature <= 0:
            raise ValueError(f"need queue_size >= 1 and temperature > 0, got {queue_size}, {temperature}")
        for name, m in (("teacher_momentum", teacher_momentum), ("slow_momentum", slow_momentum)):
            if not 0.0 <= m <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {m}")
        self.temperature, self.teacher_momentum, self.slow_momentum = (
            float(temperature),
            teacher_momentum,
            slow_momentum,
        )
        self.ctr_weight, self.pred_weight, self.backend = float(ctr_weight), float(pred_weight), backend
        self.projector = make_projector(s_dim, hidden_dim, embed_dim)
        self.predictor = make_predictor(embed_dim, pred_dim)
        self.slow_projector = copy.deepcopy(self.projector)
        self.teacher_projector = make_projector(t_dim, hidden_dim, embed_dim)
        with torch.no_grad():
            for dst, src in zip(*parameter_pairs(self.teacher_projector, self.projector)):
                dst.copy_(src)
        freeze_(self.slow_projector.parameters())
        freeze_(self.teacher_projector.parameters())
        self.slow_encoder = None
        self._online_encoder = ()  # a tuple, so the student backbone is not registered here
        if student_encoder is not None:
            self.slow_encoder = copy.deepcopy(student_encoder)
            freeze_(self.slow_encoder.parameters())
            self._online_encoder = (student_encoder,)
        self.feature_fn = feature_fn or _call_encoder
        if memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {memory_mode!r}")
        if queue_init is None:
            queue_init = "torch_rng" if memory_mode == "local" else "normal"
        if queue_init not in ("torch_rng", "normal"):
            raise ValueError(f"queue_init must be 'torch_rng' or 'normal', got {queue_init!r}")
        self.memory = MomentumQueue(
            queue_size,
            embed_dim,
            dtype=queue_dtype,
            init="empty" if queue_init == "torch_rng" else "normal",
            init_seed=queue_seed,
            mode=memory_mode,
            process_group=process_group,
        )
        if queue_init == "torch_rng":
            with torch.no_grad():
                self.memory.queue.copy_(F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_load_state_dict_pre_hook(_remap_queue_keys)
        self._updated_this_step = False
        self.last_terms = {}

    @property
    def queue(self) -> Tensor:
        return self.memory.queue

    @property
    def queue_ptr(self) -> Tensor:
        return self.memory.queue_ptr

    @property
    def memory_mode(self) -> str:
        return self.memory.mode

    @torch.no_grad()
    def momentum_update(self) -> None:
        """The EMA step of every slow copy, at most once per training step (``forward`` calls it
        first; call it yourself before computing slow-encoder features for the official order)."""
        if self._updated_this_step:
            return
        slow_t, slow_s = list(self.slow_projector.parameters()), list(self.projector.parameters())
        if self.slow_encoder is not None:
            slow_t += list(self.slow_encoder.parameters())
            slow_s += list(self._online_encoder[0].parameters())
        ema_(slow_t, slow_s, self.slow_momentum)
        ema_(*parameter_pairs(self.teacher_projector, self.projector), self.teacher_momentum)
        self._updated_this_step = True

    @torch.no_grad()
    def slow_features(self, x: Tensor) -> Tensor:
        """Features of the slow student encoder (after this step's EMA update)."""
        if self.slow_encoder is None:
            raise ValueError("no slow encoder: build CoCoRDLoss with student_encoder=... or pass f_slow")
        if self.training:
            self.momentum_update()
        return self.feature_fn(self.slow_encoder, x)

    def forward(
        self,
        f_s: Tensor,
        f_t: Tensor,
        f_s2: Optional[Tensor] = None,
        f_slow: Optional[Tensor] = None,
        f_slow2: Optional[Tensor] = None,
        *,
        x_s: Optional[Tensor] = None,
        x_s2: Optional[Tensor] = None,
    ) -> Tensor:
        s_dim, t_dim = first_linear_in_features(self.projector), first_linear_in_features(self.teacher_projector)
        use_pred = self.pred_weight != 0
        err, B = None, 0
        try:  # every check before any EMA, BatchNorm statistics or enqueue, agreed on by every rank
            B = check_features(
                f_s=(f_s, s_dim), f_t=(f_t, t_dim), f_s2=(f_s2, s_dim), f_slow=(f_slow, s_dim), f_slow2=(f_slow2, s_dim)
            )
            finite_checks(f_s=f_s, f_t=f_t, f_s2=f_s2, f_slow=f_slow, f_slow2=f_slow2, x_s=x_s, x_s2=x_s2).run()
            if use_pred:
                if f_s2 is None:
                    raise ValueError("CoCoRD's prediction term needs the student features of the second view (f_s2)")
                if (f_slow is None and x_s2 is None) or (f_slow2 is None and x_s is None):
                    raise ValueError(
                        "CoCoRD's prediction term needs the slow student's features (f_slow of view 2, "
                        "f_slow2 of view 1) or the views x_s, x_s2 with student_encoder set"
                    )
                if (f_slow is None or f_slow2 is None) and self.slow_encoder is None:
                    raise ValueError("no slow encoder: build CoCoRDLoss with student_encoder=... or pass f_slow")
        except (ValueError, TypeError) as exc:
            err = exc
        sizes = self.memory.agree_sizes(B, err, self.queue.device)
        if sum(sizes) > self.queue.shape[0]:
            raise ValueError(
                f"batch of {sum(sizes)} keys ({sizes} per rank) is larger than the queue ({self.queue.shape[0]} rows)"
            )
        if use_pred:
            if f_slow is None:
                f_slow = self.slow_features(x_s2)
            if f_slow2 is None:
                f_slow2 = self.slow_features(x_s)
        try:
            if self.training:
                self.momentum_update()
            s_q = self.projector(f_s.reshape(B, -1))
            q = F.normalize(to_loss_dtype(s_q), dim=1)
            with torch.no_grad():
                k = F.normalize(to_loss_dtype(self.teacher_projector(f_t.reshape(B, -1))), dim=1)
            # Snapshot: the op saves the keys for backward, and the enqueue below writes the queue.
            keys = self.queue.clone()
            with no_autocast(q.device):
                loss_ctr = ops.dense_contrast(
                    q, keys, positive=k, logit_scale=1.0 / self.temperature, reduction="mean", backend=self.backend
                )
            total = self.ctr_weight * loss_ctr
            loss_pred = torch.zeros((), device=q.device)
            if use_pred:
                s_q2 = self.projector(f_s2.reshape(B, -1))
                p1, p2 = self.predictor(s_q), self.predictor(s_q2)
                with torch.no_grad():
                    t1 = self.slow_projector(f_slow.reshape(B, -1))
                    t2 = self.slow_projector(f_slow2.reshape(B, -1))
                loss_pred = (byol_loss(p1, t1) + byol_loss(p2, t2)).mean()
                total = total + self.pred_weight * loss_pred
            if self.training:  # after scoring
                self.memory.enqueue_(k)
        finally:
            self._updated_this_step = False
        self.last_terms = {"ctr": loss_ctr.detach(), "pred": loss_pred.detach()}
        return total


def _remap_queue_keys(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """The former keys ``queue`` and ``queue_ptr`` ((1,) int64) -> ``memory.*``; then the whole state
    dict is validated (shapes, pointer range) before anything loads."""
    rename_keys(state_dict, prefix, [("queue", "memory.queue")])
    if prefix + "queue_ptr" in state_dict and prefix + "memory.queue_ptr" not in state_dict:
        state_dict[prefix + "memory.queue_ptr"] = torch.as_tensor(state_dict.pop(prefix + "queue_ptr")).reshape(())
    if prefix + "memory.queue" in state_dict:
        state_dict.setdefault(prefix + "memory.shard_layout", module.memory.shard_layout.clone())
    check_loadable(module, state_dict, prefix)
