"""Triton kernels, one module per op (csrc/KERNELS.md): each exposes a launcher with the name,
positional arguments and outputs of the C++ op, and ``dcdkernels.backends`` finds it by name.

On a GPU they compile for the device (triton 3.6 and later). On CPU tensors they run under the
interpreter, which must be switched on with ``TRITON_INTERPRET=1`` before this package is first
imported (``triton.jit`` reads it when the kernels are defined).
"""

from .bank_update import bank_momentum_update_
from .dense_contrast import dense_contrast, dense_contrast_backward_keys, dense_contrast_reduced
from .dual_sampled_contrast import dual_sampled_contrast
from .rng import rng_key, sample_index
from .sampled_contrast import sampled_contrast
from .supcon_contrast import supcon_contrast, supcon_contrast_backward

__all__ = [
    "bank_momentum_update_",
    "dense_contrast",
    "dense_contrast_backward_keys",
    "dense_contrast_reduced",
    "dual_sampled_contrast",
    "rng_key",
    "sample_index",
    "sampled_contrast",
    "supcon_contrast",
    "supcon_contrast_backward",
]
