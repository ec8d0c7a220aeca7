"""Problem sizes of the benchmark suite, in three sets.

* ``gpu``: the settings that matter (docs/math.md §7): RepDistiller's CIFAR-100 (N=50,000, B=64,
  K=16,384, D=128), mdistiller's ImageNet (N=1,281,167, B=256, K=16,384), MoCo's queue
  (B=256, M=65,536, D=128) and CoCoRD's queue (B=64, M=2,048, D=2,048).
* ``cpu``: the same settings cut to what a CPU does in about a second per eager step:
  sampled N=50,000 B=64 K=4,096 D=128; dense B=64 M=4,096 D=128; CoCoRD B=16 M=2,048
  D=2,048; bank update B=256 N=50,000 D=128.
* ``smoke``: tiny shapes that only check that every code path runs (CI, ``--benchmark-disable``).

The set is chosen by ``--bench-sizes`` / ``DCDK_BENCH_SIZES`` (see ``benchmarks/conftest.py``).
Every size is a frozen dataclass; its ``id`` appears in test ids, groups and the report.
"""

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

SIZE_SETS = ("smoke", "cpu", "gpu")


@dataclass(frozen=True)
class Sampled:
    """Gather ops (sampled_contrast, dual_sampled_contrast): B anchors, K+1 rows of an (N, D) bank."""

    id: str
    N: int
    B: int
    K: int
    D: int

    def gather_bytes(self, elem: int) -> int:
        """Bytes of the B(K+1) gathered rows of ONE bank (what the fused pass reads once)."""
        return self.B * (self.K + 1) * self.D * elem

    def dims(self) -> Dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "id"}


@dataclass(frozen=True)
class Dense:
    """Dense op: B anchors against M keys of dim D (queue, class centres, in-batch)."""

    id: str
    B: int
    M: int
    D: int

    def keys_bytes(self, elem: int) -> int:
        return self.M * self.D * elem

    def dims(self) -> Dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "id"}


@dataclass(frozen=True)
class Update:
    """Momentum bank update: B rows of an (N, D) bank."""

    id: str
    N: int
    B: int
    D: int

    def dims(self) -> Dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "id"}


@dataclass(frozen=True)
class Method:
    """One full loss step of a method: heads + loss + backward + state update.

    ``N, B, K, feat`` are the bank/negatives shape (CRD, DCD memory form); ``s_dim, t_dim`` the
    backbone feature sizes fed to the heads; ``M, hidden, pred`` CoCoRD's queue and MLP sizes;
    ``classes`` PCKD's number of category centres.
    """

    id: str
    B: int
    N: int = 0
    K: int = 0
    feat: int = 128
    s_dim: int = 256
    t_dim: int = 256
    M: int = 0
    hidden: int = 0
    pred: int = 0
    classes: int = 0

    def dims(self) -> Dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "id" and v}


@dataclass(frozen=True)
class Sweep:
    """A scaling sweep: ``base`` with ``axis`` ("K" or "B") taking each of ``values``."""

    base: Sampled
    axis: str
    values: Tuple[int, ...] = field(default_factory=tuple)

    def points(self) -> List[Sampled]:
        out = []
        for v in self.values:
            kw = self.base.dims()
            kw[self.axis] = v
            out.append(Sampled(id=f"{self.base.id}-{self.axis}{v}", **kw))
        return out


# --- op sizes -------------------------------------------------------------------------------
SAMPLED = {
    "smoke": [Sampled("smoke", N=512, B=8, K=64, D=32)],
    "cpu": [Sampled("cifar100-cpu", N=50_000, B=64, K=4_096, D=128)],
    "gpu": [
        Sampled("cifar100", N=50_000, B=64, K=16_384, D=128),
        Sampled("imagenet", N=1_281_167, B=256, K=16_384, D=128),
    ],
}

# Queue with a separate positive key (MoCo, CoCoRD): keys are a buffer, no key gradient.
DENSE_QUEUE = {
    "smoke": [Dense("smoke", B=8, M=64, D=32), Dense("cocord-smoke", B=4, M=32, D=64)],
    "cpu": [Dense("moco-cpu", B=64, M=4_096, D=128), Dense("cocord-cpu", B=16, M=2_048, D=2_048)],
    "gpu": [Dense("moco", B=256, M=65_536, D=128), Dense("cocord", B=64, M=2_048, D=2_048)],
}

# Target column and keys that require grad (DCD in-batch teacher features, PCKD class centres).
DENSE_KEYS_GRAD = {
    "smoke": [Dense("smoke", B=8, M=64, D=32)],
    "cpu": [Dense("keys-cpu", B=64, M=4_096, D=128)],
    "gpu": [Dense("inbatch-4096", B=4_096, M=4_096, D=128), Dense("imagenet-centres", B=256, M=1_000, D=512)],
}

# Drop-ins for lightly / pytorch-metric-learning (benchmarks/test_bench_integrations.py): MoCo's
# queue size on every set but smoke (the figure is B=256, memory 65,536, D=128 on CPU).
INTEGRATIONS = {
    "smoke": [Dense("smoke", B=8, M=64, D=32)],
    "cpu": [Dense("moco-queue", B=256, M=65_536, D=128)],
    "gpu": [Dense("moco-queue", B=256, M=65_536, D=128)],
}

# Supervised contrastive (SupCon, PCKD's category contrast): B anchors against themselves (M = B),
# labels of ``SUPCON_CLASSES`` classes.
SUPCON = {
    "smoke": [Dense("smoke", B=16, M=16, D=32)],
    "cpu": [Dense("supcon-1024", B=1_024, M=1_024, D=128), Dense("supcon-4096", B=4_096, M=4_096, D=128)],
    "gpu": [Dense("supcon-1024", B=1_024, M=1_024, D=128), Dense("supcon-4096", B=4_096, M=4_096, D=128)],
}
SUPCON_CLASSES = 100

UPDATE = {
    "smoke": [Update("smoke", N=512, B=16, D=32)],
    "cpu": [Update("cifar100-cpu", N=50_000, B=256, D=128)],
    "gpu": [Update("cifar100", N=50_000, B=64, D=128), Update("imagenet", N=1_281_167, B=256, D=128)],
}

# --- scaling sweeps (sampled NCE, one bank) --------------------------------------------------
SWEEPS = {
    "smoke": [
        Sweep(Sampled("smoke", N=512, B=8, K=64, D=32), "K", (16, 64)),
        Sweep(Sampled("smoke", N=512, B=8, K=64, D=32), "B", (4, 8)),
    ],
    "cpu": [
        Sweep(Sampled("cpu", N=50_000, B=64, K=4_096, D=128), "K", (256, 1_024, 4_096, 16_384)),
        Sweep(Sampled("cpu", N=50_000, B=64, K=4_096, D=128), "B", (16, 32, 64, 128)),
    ],
    "gpu": [
        Sweep(Sampled("imagenet", N=1_281_167, B=256, K=16_384, D=128), "K", (1_024, 4_096, 16_384, 65_536)),
        Sweep(Sampled("imagenet", N=1_281_167, B=256, K=16_384, D=128), "B", (64, 128, 256, 512, 1_024)),
    ],
}

# --- method sizes ----------------------------------------------------------------------------
METHODS = {
    "crd": {  # CRDLoss: dual-bank NCE + bank update; also DCD's memory form
        "smoke": [Method("smoke", B=8, N=512, K=64, feat=32, s_dim=16, t_dim=24)],
        "cpu": [Method("cifar100-cpu", B=64, N=50_000, K=4_096, s_dim=256, t_dim=256)],
        "gpu": [
            Method("cifar100", B=64, N=50_000, K=16_384, s_dim=256, t_dim=256),
            Method("imagenet", B=256, N=1_281_167, K=16_384, s_dim=512, t_dim=512),
        ],
    },
    "inbatch": {  # DCD / ICD official in-batch form: (B, B) logits
        "smoke": [Method("smoke", B=8, feat=32, s_dim=16, t_dim=24)],
        "cpu": [Method("cifar100-cpu", B=64, s_dim=256, t_dim=256)],
        "gpu": [Method("cifar100", B=64, s_dim=256, t_dim=256), Method("imagenet", B=256, s_dim=512, t_dim=512)],
    },
    "cocord": {
        "smoke": [Method("smoke", B=4, M=32, feat=64, hidden=64, pred=16, s_dim=16, t_dim=16)],
        "cpu": [Method("cocord-cpu", B=16, M=2_048, feat=2_048, hidden=2_048, pred=512, s_dim=256, t_dim=256)],
        "gpu": [Method("cocord", B=64, M=2_048, feat=2_048, hidden=2_048, pred=512, s_dim=256, t_dim=256)],
    },
    "pckd": {
        "smoke": [Method("smoke", B=8, classes=10, s_dim=16, t_dim=24)],
        "cpu": [Method("cifar100-cpu", B=64, classes=100, s_dim=256, t_dim=256)],
        "gpu": [
            Method("cifar100", B=64, classes=100, s_dim=256, t_dim=256),
            Method("imagenet", B=256, classes=1_000, s_dim=512, t_dim=512),
        ],
    },
}


def pick(table, size_set: str):
    if size_set not in SIZE_SETS:
        raise ValueError(f"unknown size set {size_set!r}; choose one of {SIZE_SETS}")
    return table[size_set]
