"""Negative sampling: the counter-based uniform stream the kernels draw from (docs/math.md §1d), and a
vectorised class-conditional sampler replacing RepDistiller's per-sample ``np.random.choice``."""

import torch

from .. import reference
from . import _validate as V
from .sampled_contrast import MAX_SAMPLED_NEGATIVES


def sample_negatives(positive, num_negatives, n_rows, seed=0, offset=0):
    """The exact (B, K+1) index the fused kernels use for ``index=positive, num_negatives=K``:
    column 0 = ``positive``, negative k of row b drawn from the counter-based stream at
    ``offset + b*K + k - 1`` (so advance ``offset`` by B*K per step for fresh negatives)."""
    if (
        not isinstance(positive, torch.Tensor)
        or positive.dim() != 1
        or positive.dtype not in (torch.int64, torch.int32)
    ):
        raise ValueError(
            f"positive must be a 1-D integer tensor, got {getattr(positive, 'dtype', type(positive))} "
            f"of shape {tuple(getattr(positive, 'shape', ()))}"
        )
    K = V.integer("num_negatives", num_negatives, lo=1, hi=MAX_SAMPLED_NEGATIVES)
    n_rows = V.integer("n_rows", n_rows, lo=1, hi=2**31)
    seed, offset = V.stream(seed, offset, positive.shape[0] * K)
    return reference.sample_negatives(positive, K, n_rows, seed, offset)


class ClassConditionalSampler:
    """Draws negatives uniformly over the dataset rows whose label differs from the anchor's
    (RepDistiller's CIFAR-100 ``mode='exact'`` negatives), for a whole batch in a few tensor ops.

    Rows are grouped by class once. A draw ``r`` uniform in ``[0, N - count[c])`` skips the
    anchor's own class block: ``r + count[c]`` if ``r >= start[c]``, then maps through the
    grouping. No Python loop over samples and no (B, N) mask.
    """

    def __init__(self, labels, num_classes=None):
        labels = _integer_tensor("labels", labels)
        if labels.numel() == 0 or labels.min() < 0:
            raise ValueError("labels must be a non-empty tensor of class ids >= 0")
        self.num_classes = (
            V.integer("num_classes", num_classes, lo=1) if num_classes is not None else int(labels.max().item()) + 1
        )
        if labels.max() >= self.num_classes:
            raise ValueError(f"labels has class ids >= num_classes={self.num_classes}")
        self.labels = labels
        self.order = torch.argsort(labels, stable=True)  # row ids grouped by class
        self.count = torch.bincount(labels, minlength=self.num_classes)
        self.start = torch.cumsum(self.count, 0) - self.count
        if (self.count == labels.numel()).any():
            raise ValueError("every row has the same class: there are no negatives to draw")

    def __call__(self, index, num_negatives, generator=None):
        """(B, K+1) int64 on ``index``'s device: column 0 = ``index`` (dataset rows of the anchors),
        columns 1..K uniform over rows of other classes."""
        device = index.device if isinstance(index, torch.Tensor) else torch.device("cpu")
        index = _integer_tensor("index", index)
        K = V.integer("num_negatives", num_negatives, lo=1)
        N = self.labels.numel()
        if index.numel() and (index.min() < 0 or index.max() >= N):
            raise ValueError(f"index has entries out of range [0, {N}) (the rows of the labels)")
        cls = self.labels[index]
        span = (N - self.count[cls]).to(torch.float64)
        u = torch.rand(index.numel(), K, dtype=torch.float64, generator=generator)
        r = (u * span[:, None]).to(torch.int64).clamp_max_(span.to(torch.int64)[:, None] - 1)
        start, count = self.start[cls][:, None], self.count[cls][:, None]
        r = torch.where(r >= start, r + count, r)
        neg = self.order[r]
        return torch.cat([index[:, None], neg], dim=1).to(device)


def _integer_tensor(name, values) -> torch.Tensor:
    """A flat int64 CPU tensor of integer ``values`` (a tensor or a sequence): floats and bools
    are refused, never truncated."""
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.detach().to(device="cpu", dtype=torch.int64).reshape(-1)
