"""The eager oracle: plain, differentiable PyTorch for every op in docs/math.md §1–§4.

Readable first, fast never: every backend is tested against these functions and every benchmark
uses them (or the RepDistiller/MoCo-style code in ``benchmarks/``) as the baseline.
"""

from .bank_update import bank_momentum_update_, queue_enqueue_
from .dense_contrast import dense_contrast
from .dual_sampled_contrast import dual_sampled_contrast, dual_sampled_contrast_outputs
from .rng import sample_negatives
from .sampled_contrast import nce_loss_from_logits, sampled_contrast, sampled_contrast_outputs
from .supcon_contrast import supcon_contrast

__all__ = [
    "bank_momentum_update_",
    "dense_contrast",
    "dual_sampled_contrast",
    "dual_sampled_contrast_outputs",
    "nce_loss_from_logits",
    "queue_enqueue_",
    "sample_negatives",
    "sampled_contrast",
    "sampled_contrast_outputs",
    "supcon_contrast",
]
