"""dcdkernels: fused kernels for contrastive knowledge distillation over memory banks.

Functional ops (all differentiable, all take ``backend="auto"|"eager"|"cpu"|"cuda"|"triton"``):
``sampled_contrast``, ``dual_sampled_contrast``, ``dense_contrast``, ``supcon_contrast``, ``bank_momentum_update_``,
``sample_negatives``, ``ClassConditionalSampler``. Modules: ``CRDLoss``, ``DCDLoss``, ``ICDLoss``,
``CoCoRDLoss``, ``PCKDLoss``, ``MemoryBank``, ``MomentumQueue``.
"""
from . import backends, reference
from .backends import availability
from .ops import (ClassConditionalSampler, DualContrastOutput, bank_momentum_update_, dense_contrast,
                  dual_sampled_contrast, sample_negatives, sampled_contrast, supcon_contrast)
from .ops._validate import check_errors, set_value_checks

__version__ = "0.1.0"

__all__ = [
    "ClassConditionalSampler", "DualContrastOutput", "availability", "backends", "bank_momentum_update_",
    "dense_contrast", "dual_sampled_contrast", "reference", "sample_negatives", "sampled_contrast",
    "supcon_contrast", "check_errors", "set_value_checks",
]

try:  # modules land as their issues do; the ops above never depend on them
    from .losses import CoCoRDLoss, CRDLoss, DCDLoss, ICDLoss, PCKDLoss  # noqa: F401
    from .memory import MemoryBank, MomentumQueue  # noqa: F401

    __all__ += ["CRDLoss", "CoCoRDLoss", "DCDLoss", "ICDLoss", "MemoryBank", "MomentumQueue", "PCKDLoss"]
except ImportError:
    pass
