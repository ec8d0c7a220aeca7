"""One dispatch point per op: validation, backend choice, torch.library custom op and autograd."""

from .bank_update import bank_momentum_update_
from .dense_contrast import dense_contrast
from .dual_sampled_contrast import DualContrastOutput, dual_sampled_contrast
from .sampled_contrast import sampled_contrast
from .sampling import ClassConditionalSampler, sample_negatives
from .supcon_contrast import supcon_contrast

__all__ = [
    "ClassConditionalSampler",
    "DualContrastOutput",
    "bank_momentum_update_",
    "dense_contrast",
    "dual_sampled_contrast",
    "sample_negatives",
    "sampled_contrast",
    "supcon_contrast",
]
