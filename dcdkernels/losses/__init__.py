"""The five methods as drop-in ``nn.Module`` losses (docs/math.md §3), scored by the fused ops.

``CRDLoss`` (RepDistiller), ``DCDLoss`` / ``ICDLoss`` (Giakoumoglou & Stathaki), ``CoCoRDLoss``
(Fu et al.), ``PCKDLoss`` (Ding et al.). Every module keeps its state (banks, queues, pointers,
partition estimates, sampler stream, epoch) in ``state_dict()`` (banks and queues in
``dcdkernels.memory`` modules, ``memory_mode="local"|"replicated"|"sharded"``), runs on every
backend (``backend="auto"|"eager"|"cpu"|"cuda"|"triton"``) and under autocast (loss math in fp32).
"""

from ..memory.comm import log_partition as log_partition_from_lse
from ._common import Embed, ema_
from .cocord import CoCoRDLoss, byol_loss
from .crd import CRDLoss
from .dcd import DCDLoss, ICDLoss
from .pckd import PCKDLoss

__all__ = [
    "CRDLoss",
    "CoCoRDLoss",
    "DCDLoss",
    "Embed",
    "ICDLoss",
    "PCKDLoss",
    "byol_loss",
    "ema_",
    "log_partition_from_lse",
]
