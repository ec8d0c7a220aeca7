"""dcdkernels: fused kernels for contrastive knowledge distillation over memory banks.

Functional ops (all differentiable, all take ``backend="auto"|"eager"|"cpu"|"cuda"|"triton"``):
``sampled_contrast``, ``dual_sampled_contrast``, ``dense_contrast``, ``supcon_contrast``, ``bank_momentum_update_``,
``sample_negatives``, ``ClassConditionalSampler``. Modules: ``CRDLoss``, ``DCDLoss``, ``ICDLoss``,
``CoCoRDLoss``, ``PCKDLoss``, ``MemoryBank``, ``MomentumQueue``.
"""

from . import backends, reference
from .backends import availability
from .losses import CoCoRDLoss, CRDLoss, DCDLoss, ICDLoss, PCKDLoss
from .memory import MemoryBank, MomentumQueue
from .ops import (
    ClassConditionalSampler,
    DualContrastOutput,
    bank_momentum_update_,
    dense_contrast,
    dual_sampled_contrast,
    sample_negatives,
    sampled_contrast,
    supcon_contrast,
)
from .ops._validate import check_errors, set_value_checks

__version__ = "0.1.0"  # the one definition of the package version (pyproject.toml reads it here)

__all__ = [
    "ClassConditionalSampler",
    "CRDLoss",
    "CoCoRDLoss",
    "DCDLoss",
    "DualContrastOutput",
    "ICDLoss",
    "MemoryBank",
    "MomentumQueue",
    "PCKDLoss",
    "availability",
    "backends",
    "bank_momentum_update_",
    "check_errors",
    "dense_contrast",
    "dual_sampled_contrast",
    "reference",
    "sample_negatives",
    "sampled_contrast",
    "set_value_checks",
    "supcon_contrast",
]
