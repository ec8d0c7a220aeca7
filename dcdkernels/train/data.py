"""Datasets and loaders of the reference trainers, on torchvision and ``torch.utils.data``.

* ``digits`` (the default): scikit-learn's 8x8 digits, embedded, in memory as tensors;
* ``cifar100``: ``torchvision.datasets.CIFAR100(root, download=False)`` with RepDistiller's
  transforms (RandomCrop 32 padding 4, horizontal flip, its mean and std);
* ``imagefolder``: ``torchvision.datasets.ImageFolder`` over ``DIR/train`` and ``DIR/val`` (the
  ImageNet layout) with the standard ImageNet transforms (RandomResizedCrop, flip, normalise;
  Resize 256/224 of the crop, CenterCrop for evaluation).

Nothing is ever downloaded. Training batches come from a ``torch.utils.data.DataLoader``
(``num_workers``, ``pin_memory``, persistent workers) over a ``DistributedSampler`` (also for one
process); each sample carries its dataset index (``idx``, the memory-bank row of CRD and friends)
and the contrastive negatives of a batch are drawn with
:class:`dcdkernels.ClassConditionalSampler` (RepDistiller's ``mode='exact'``: uniform over the rows
of other classes) in the main process.

Determinism: the order of epoch ``e`` is ``DistributedSampler(seed, epoch=e)``; the random
augmentation of sample ``i`` in epoch ``e`` is drawn from torch's RNG seeded with ``(seed, epoch,
i)`` (inside whichever worker loads it; restored after it in the main process), and the negatives
from a generator seeded with ``(seed, epoch, rank)``. An epoch therefore depends only on the seed
and its number, whatever the number of workers, and a run resumed at a checkpoint (epoch boundary or
mid-epoch) replays exactly the batches of an uninterrupted run.
"""

import os
import tarfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from ..ops.sampling import ClassConditionalSampler

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # RepDistiller dataset/cifar100.py
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision / PyTorch ImageNet example
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tv():
    try:
        import torchvision
        from torchvision import transforms
    except ImportError as exc:  # pragma: no cover - a hard requirement of the trainer
        raise ImportError("the trainer needs torchvision: pip install torchvision (or dcdkernels[train])") from exc
    return torchvision, transforms


@dataclass
class Dataset:
    """A train and a test split (torch Datasets of ``(raw image, label)``, no transform), the
    transforms that turn a raw image into network input, and the training labels."""

    name: str
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    in_channels: int
    image_size: int
    train_labels: torch.Tensor  # (n_train,) int64
    augment_transform: Callable  # random augmentation + normalisation
    eval_transform: Callable  # deterministic (evaluation, and training without augmentation)
    class_names: list = field(default_factory=list)

    @property
    def n_train(self):
        return len(self.train)

    def probe(self, n=2):
        """``n`` training images as evaluation input (to size the loss heads)."""
        return torch.stack([self.eval_transform(self.train[i][0]) for i in range(n)])


def _subset(ds, n):
    return ds if not n or n >= len(ds) else Subset(ds, range(n))


def _targets(ds):
    if isinstance(ds, Subset):
        return torch.as_tensor(_targets(ds.dataset))[list(ds.indices)]
    return torch.as_tensor(ds.targets, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------
DIGITS_TEST_FRACTION = 0.2


class TensorImages(torch.utils.data.Dataset):
    """In-memory images (N, C, H, W) in [0, 1] and labels: ``(image, label)``."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def load_digits(train_subset=None, test_subset=None):
    """scikit-learn's digits: 1,797 8x8 grey images (values 0..16), 10 classes, shipped with
    scikit-learn. Fixed stratified split (independent of the run's seed): 20% of each class is the
    test set (359 images), the rest the training set (1,438 images), both in a fixed shuffled order.
    Augmentation (off by default for digits): RandomCrop 8 with padding 1, no flip (it changes
    the class)."""
    _, T = _tv()
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - sklearn is a train extra
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn (or pip install dcdkernels[train])"
        ) from exc
    bunch = _load()
    x = np.asarray(bunch.images, dtype=np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.RandomState(0)
    train_rows, test_rows = [], []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(rows) * DIGITS_TEST_FRACTION))
        test_rows.append(rows[:n_test])
        train_rows.append(rows[n_test:])
    train_rows = torch.from_numpy(rng.permutation(np.concatenate(train_rows)))
    test_rows = torch.from_numpy(rng.permutation(np.concatenate(test_rows)))
    images, labels = torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)
    tr = images[train_rows]
    norm = T.Normalize([float(tr.mean())], [float(tr.std())])
    train = _subset(TensorImages(tr, labels[train_rows]), train_subset)
    test = _subset(TensorImages(images[test_rows], labels[test_rows]), test_subset)
    return Dataset(
        "digits",
        train,
        test,
        10,
        1,
        8,
        _targets(train),
        T.Compose([T.RandomCrop(8, padding=1), norm]),
        norm,
        class_names=[str(i) for i in range(10)],
    )


# ----------------------------------------------------------------------------------------------
# CIFAR-100 (torchvision)
# ----------------------------------------------------------------------------------------------
def _missing_cifar(data_dir):
    where = os.path.abspath(data_dir) if data_dir else "<not given>"
    return FileNotFoundError(
        f"CIFAR-100 was not found under --data-dir {where}. dcdkernels downloads nothing: fetch the "
        f"python version ({CIFAR100_URL}) yourself and pass --data-dir pointing at either the archive "
        f"cifar-100-python.tar.gz, the folder holding it, the extracted cifar-100-python/ folder (with "
        f"its 'train', 'test' and 'meta' pickles), or the folder that contains cifar-100-python/."
    )


def _cifar_root(data_dir):
    """The root torchvision's CIFAR100 expects (the folder holding ``cifar-100-python/``);
    an archive is extracted next to itself (once)."""
    if not data_dir:
        raise _missing_cifar(data_dir)
    d = os.path.abspath(data_dir)
    if os.path.isdir(os.path.join(d, "cifar-100-python")):
        return d
    if os.path.isdir(d) and os.path.basename(d) == "cifar-100-python":
        return os.path.dirname(d)
    archives = (
        [d]
        if os.path.isfile(d)
        else [os.path.join(d, n) for n in ("cifar-100-python.tar.gz", "cifar-100-python.tgz", "cifar-100-python.tar")]
    )
    for arc in archives:
        if os.path.isfile(arc) and tarfile.is_tarfile(arc):
            root = os.path.dirname(arc)
            if not os.path.isdir(os.path.join(root, "cifar-100-python")):
                with tarfile.open(arc) as tf:
                    tf.extractall(root, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(root)
            if os.path.isdir(os.path.join(root, "cifar-100-python")):
                return root
    raise _missing_cifar(data_dir)


def _cifar100_class():
    torchvision, _ = _tv()

    class LocalCIFAR100(torchvision.datasets.CIFAR100):
        """torchvision's CIFAR100 with a presence check instead of its md5s: nothing is downloaded,
        so the checksums would only reject the tests' small CIFAR-format archives."""

        train_list = [["train", None]]
        test_list = [["test", None]]
        meta = {"filename": "meta", "key": "fine_label_names", "md5": None}

    return LocalCIFAR100


def load_cifar100(data_dir, train_subset=None, test_subset=None):
    """CIFAR-100 (fine labels), 50,000 train / 10,000 test images, via
    ``torchvision.datasets.CIFAR100(root, download=False)``."""
    _, T = _tv()
    root = _cifar_root(data_dir)
    cls = _cifar100_class()
    try:
        train, test = cls(root, train=True, download=False), cls(root, train=False, download=False)
    except RuntimeError as exc:
        raise _missing_cifar(data_dir) from exc
    norm = [T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    names = list(train.classes)
    train, test = _subset(train, train_subset), _subset(test, test_subset)
    return Dataset(
        "cifar100",
        train,
        test,
        100,
        3,
        32,
        _targets(train),
        T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] + norm),
        T.Compose(norm),
        class_names=names,
    )


# ----------------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout)
# ----------------------------------------------------------------------------------------------
def load_imagefolder(data_dir, train_subset=None, test_subset=None, image_size=224):
    """``ImageFolder(DIR/train)`` and ``ImageFolder(DIR/val)`` (or ``DIR/test``), the standard
    ImageNet transforms: RandomResizedCrop(image_size) + RandomHorizontalFlip for training,
    Resize(image_size * 256 / 224) + CenterCrop(image_size) for evaluation, ImageNet mean/std."""
    torchvision, T = _tv()
    if not data_dir or not os.path.isdir(os.path.join(data_dir, "train")):
        raise FileNotFoundError(
            f"--dataset imagefolder: --data-dir {data_dir!r} must hold a train/ folder of class "
            "sub-folders (and val/ or test/), the ImageNet layout"
        )
    val = next((os.path.join(data_dir, n) for n in ("val", "test") if os.path.isdir(os.path.join(data_dir, n))), None)
    if val is None:
        raise FileNotFoundError(f"--dataset imagefolder: {data_dir} has train/ but no val/ (or test/) folder")
    train = torchvision.datasets.ImageFolder(os.path.join(data_dir, "train"))
    test = torchvision.datasets.ImageFolder(val)
    if test.classes != train.classes:
        raise ValueError(f"{val} has classes {test.classes[:5]}... but train/ has {train.classes[:5]}...")
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    size = int(image_size)
    names = list(train.classes)
    train, test = _subset(train, train_subset), _subset(test, test_subset)
    return Dataset(
        "imagefolder",
        train,
        test,
        len(names),
        3,
        size,
        _targets(train),
        T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + norm),
        T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)] + norm),
        class_names=names,
    )


def load_dataset(name, data_dir=None, train_subset=None, test_subset=None, image_size=None):
    if name == "digits":
        return load_digits(train_subset, test_subset)
    if name == "cifar100":
        return load_cifar100(data_dir, train_subset, test_subset)
    if name == "imagefolder":
        return load_imagefolder(data_dir, train_subset, test_subset, image_size or 224)
    raise ValueError(f"unknown dataset {name!r} (digits, cifar100 or imagefolder)")


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
def epoch_seed(seed, epoch, rank, stream):
    """A 63-bit seed for one (run seed, epoch, rank or sample, stream) tuple."""
    h = np.random.SeedSequence([int(seed), int(epoch), int(rank), int(stream)])
    return int(h.generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1))


class _EpochIndices(Sampler):
    """A ``DistributedSampler`` that yields ``(index, epoch)`` (the epoch reaches the dataset even
    in persistent workers) and can start ``start`` samples into the epoch (mid-epoch resume)."""

    def __init__(self, n, rank, world_size, shuffle, seed):
        self.inner = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        self.inner.set_epoch(self.epoch)

    def order(self):
        return list(iter(self.inner))

    def __iter__(self):
        for i in self.order()[self.start :]:
            yield i, self.epoch

    def __len__(self):
        return len(self.inner) - self.start


class _TrainView(torch.utils.data.Dataset):
    """``dict(x, y, idx[, x2])`` of sample ``(index, epoch)``; random transforms draw from torch's
    RNG seeded with (seed, epoch, index), so the result does not depend on the worker."""

    def __init__(self, base, transform, second, seed, random):
        self.base, self.transform, self.second, self.seed, self.random = base, transform, second, seed, random

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        i, epoch = key
        raw, y = self.base[i]
        if not self.random:
            out = {"x": self.transform(raw)}
        else:  # in the main process (num_workers=0) the caller's RNG state is put back afterwards
            state = torch.get_rng_state() if torch.utils.data.get_worker_info() is None else None
            try:
                torch.default_generator.manual_seed(epoch_seed(self.seed, epoch, i, 1))  # CPU RNG only: cheap
                out = {"x": self.transform(raw)}
                if self.second is not None:
                    out["x2"] = self.second(raw)
            finally:
                if state is not None:
                    torch.set_rng_state(state)
        out["y"], out["idx"] = int(y), int(i)
        return out


def _seed_worker(worker_id):
    """numpy / random in a worker from torch's per-worker seed (nothing here draws from them)."""
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class TrainLoader:
    """Batches of one epoch: ``dict(x, y, idx[, contrast_idx][, x2])`` on ``device``.

    ``x`` is the augmented (``augment``) or plain view; ``idx`` the dataset rows; with ``nce_k``
    also ``contrast_idx`` (B, K+1) from the class-conditional sampler (column 0 = ``idx``); with
    ``two_views`` a second, always augmented view ``x2``. ``batches(skip)`` starts ``skip``
    batches into the epoch without loading them (their negatives are still drawn, so the stream
    continues exactly)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size=64,
        shuffle=True,
        augment=True,
        seed=0,
        rank=0,
        world_size=1,
        nce_k=0,
        two_views=False,
        device="cpu",
        num_workers=0,
        pin_memory=False,
    ):
        self.batch_size, self.seed, self.rank, self.nce_k = batch_size, seed, rank, nce_k
        self.device = torch.device(device)
        transform = dataset.augment_transform if augment else dataset.eval_transform
        view = _TrainView(
            dataset.train,
            transform,
            dataset.augment_transform if two_views else None,
            seed,
            random=augment or two_views,
        )
        self.sampler = _EpochIndices(len(dataset.train), rank, world_size, shuffle, seed)
        self.generator = torch.Generator()
        self.loader = DataLoader(
            view,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            generator=self.generator,
            worker_init_fn=_seed_worker if num_workers > 0 else None,
            drop_last=False,
        )
        self.negatives = ClassConditionalSampler(dataset.train_labels, dataset.num_classes) if nce_k else None
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        self.sampler.set_epoch(self.epoch)
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, self.rank, 3))

    def __len__(self):
        return -(-len(self.sampler.inner) // self.batch_size)

    def __iter__(self):
        return (b for _, b in self.batches())

    def batches(self, skip=0):
        """``(i, batch)`` for batches ``skip, skip + 1, ...`` of the current epoch."""
        g_neg = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank, 2))
        order = self.sampler.order()
        if self.negatives is not None:  # the skipped batches' negatives: the stream advances as before
            for s in range(skip):
                idx = torch.tensor(order[s * self.batch_size : (s + 1) * self.batch_size], dtype=torch.int64)
                self.negatives(idx, self.nce_k, generator=g_neg)
        self.sampler.start = skip * self.batch_size
        try:
            for i, batch in enumerate(self.loader, start=skip):
                if self.negatives is not None:
                    batch["contrast_idx"] = self.negatives(batch["idx"], self.nce_k, generator=g_neg)
                yield i, {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        finally:
            self.sampler.start = 0


class _EvalView(torch.utils.data.Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        raw, y = self.base[i]
        return self.transform(raw), int(y)


def eval_batches(dataset: Dataset, batch_size=256, rank=0, world_size=1, device="cpu", num_workers=0, pin_memory=False):
    """Deterministic, un-augmented batches ``(x, y)`` of this rank's share of the test split."""
    view = Subset(_EvalView(dataset.test, dataset.eval_transform), range(rank, len(dataset.test), world_size))
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
