"""Datasets of the reference trainers: scikit-learn's digits (embedded, the default) and CIFAR-100
from a local copy of the python-version archive. Nothing is ever downloaded.

Both live in memory as tensors (digits: 1,797 images of 1x8x8; CIFAR-100: 60,000 of 3x32x32
uint8, 184 MB), so a "loader" is a sampler plus tensor indexing: every batch carries the dataset
row ids (``idx``, the memory-bank rows of CRD and friends), and the contrastive negatives are
drawn per batch with :class:`dcdkernels.ClassConditionalSampler` (RepDistiller's ``mode='exact'``
negatives: uniform over rows of other classes) instead of a per-sample ``np.random.choice`` in
a DataLoader worker.

Determinism: the data order of epoch ``e`` comes from ``DistributedSampler(seed, epoch=e)``; the
augmentation and negative-sampling generators are re-seeded from ``(seed, epoch, rank)`` at the
start of every epoch. An epoch therefore depends only on the seed and its number, and a run
resumed at an epoch boundary replays exactly the batches of an uninterrupted run.
"""
import io
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from ..ops.sampling import ClassConditionalSampler

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)  # RepDistiller dataset/cifar100.py
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


@dataclass
class Split:
    """Images as stored (uint8 or float), labels int64, and how to turn a batch into network input."""
    images: torch.Tensor
    labels: torch.Tensor
    scale: float  # raw value -> [0, 1]
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)

    def __len__(self):
        return int(self.labels.numel())

    def subset(self, n: Optional[int]):
        if not n or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n], self.scale, self.mean, self.std)

    def normalize(self, raw):
        x = raw.to(torch.float32) * self.scale
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    crop_padding: int  # random-crop padding of the standard augmentation (0: no augmentation)
    flip: bool = True  # random horizontal flip in the augmentation (never for digits: it changes the class)
    class_names: list = field(default_factory=list)

    @property
    def n_train(self):
        return len(self.train)


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------
DIGITS_TEST_FRACTION = 0.2


def load_digits(train_subset=None, test_subset=None):
    """scikit-learn's digits: 1,797 8x8 grey images (values 0..16), 10 classes, shipped with
    scikit-learn. Fixed stratified split (independent of the run's seed): 20% of each class is the
    test set (359 images), the rest the training set (1,438 images), both in a fixed shuffled order."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as exc:  # pragma: no cover - sklearn is a train extra
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn "
                          "(or pip install dcdkernels[train])") from exc
    bunch = _load()
    x = np.asarray(bunch.images, dtype=np.float32)  # (1797, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.RandomState(0)
    train_rows, test_rows = [], []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(rows) * DIGITS_TEST_FRACTION))
        test_rows.append(rows[:n_test])
        train_rows.append(rows[n_test:])
    train_rows = rng.permutation(np.concatenate(train_rows))
    test_rows = rng.permutation(np.concatenate(test_rows))
    images = torch.from_numpy(x).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.from_numpy(y)
    scale = 1.0 / 16.0
    tr = images[torch.from_numpy(train_rows)]
    mean = (tr * scale).mean().reshape(1)
    std = (tr * scale).std().reshape(1)
    train = Split(tr, labels[torch.from_numpy(train_rows)], scale, mean, std).subset(train_subset)
    test = Split(images[torch.from_numpy(test_rows)], labels[torch.from_numpy(test_rows)], scale, mean, std).subset(test_subset)
    return Dataset("digits", train, test, 10, 1, 8, crop_padding=1, flip=False,
                   class_names=[str(i) for i in range(10)])


# ----------------------------------------------------------------------------------------------
# CIFAR-100 (python version)
# ----------------------------------------------------------------------------------------------
def _missing_cifar(data_dir):
    where = os.path.abspath(data_dir) if data_dir else "<not given>"
    return FileNotFoundError(
        f"CIFAR-100 was not found under --data-dir {where}. dcdkernels downloads nothing: fetch the "
        f"python version ({CIFAR100_URL}) yourself and pass --data-dir pointing at either the archive "
        f"cifar-100-python.tar.gz, the folder holding it, the extracted cifar-100-python/ folder (with "
        f"its 'train', 'test' and 'meta' pickles), or the folder that contains cifar-100-python/.")


def _cifar_reader(data_dir):
    """A function name -> bytes reading 'train' / 'test' / 'meta' from wherever they are."""
    if not data_dir:
        raise _missing_cifar(data_dir)
    candidates_dirs = [os.path.join(data_dir, "cifar-100-python"), data_dir]
    for d in candidates_dirs:
        if all(os.path.isfile(os.path.join(d, n)) for n in ("train", "test")):
            def read(name, d=d):
                with open(os.path.join(d, name), "rb") as fh:
                    return fh.read()
            return read, d
    archives = [data_dir] if os.path.isfile(data_dir) else [
        os.path.join(data_dir, n) for n in ("cifar-100-python.tar.gz", "cifar-100-python.tgz", "cifar-100-python.tar")]
    for arc in archives:
        if os.path.isfile(arc) and tarfile.is_tarfile(arc):
            with tarfile.open(arc) as tf:
                members = {os.path.basename(m.name): m for m in tf.getmembers() if m.isfile()}
                if "train" not in members or "test" not in members:
                    raise FileNotFoundError(f"{arc} holds no cifar-100-python/train and test files")
                blobs = {n: tf.extractfile(members[n]).read() for n in ("train", "test", "meta") if n in members}

            def read(name, blobs=blobs, arc=arc):
                if name not in blobs:
                    raise FileNotFoundError(f"{arc} has no {name!r} member")
                return blobs[name]
            return read, arc
    raise _missing_cifar(data_dir)


def _unpickle(blob):
    obj = pickle.load(io.BytesIO(blob), encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def load_cifar100(data_dir, train_subset=None, test_subset=None):
    """CIFAR-100 (fine labels) from the python-version pickles: 50,000 train, 10,000 test images
    kept as uint8 (N, 3, 32, 32); normalised per batch with RepDistiller's mean and std."""
    read, where = _cifar_reader(data_dir)
    splits = {}
    for name in ("train", "test"):
        d = _unpickle(read(name))
        if "data" not in d or "fine_labels" not in d:
            raise ValueError(f"{where}: {name!r} is not a CIFAR-100 python pickle (keys {sorted(d)})")
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
        splits[name] = Split(torch.from_numpy(data.copy()), torch.from_numpy(labels), 1.0 / 255.0,
                             torch.tensor(CIFAR100_MEAN), torch.tensor(CIFAR100_STD))
    try:
        names = [n.decode() if isinstance(n, bytes) else n for n in _unpickle(read("meta"))["fine_label_names"]]
    except Exception:
        names = [str(i) for i in range(100)]
    return Dataset("cifar100", splits["train"].subset(train_subset), splits["test"].subset(test_subset), 100, 3, 32,
                   crop_padding=4, class_names=names)


def load_dataset(name, data_dir=None, train_subset=None, test_subset=None):
    if name == "digits":
        return load_digits(train_subset, test_subset)
    if name == "cifar100":
        return load_cifar100(data_dir, train_subset, test_subset)
    raise ValueError(f"unknown dataset {name!r} (digits or cifar100)")


# ----------------------------------------------------------------------------------------------
# augmentation and batches
# ----------------------------------------------------------------------------------------------
def random_crop_flip(raw, padding, generator, flip=True):
    """torchvision's RandomCrop(size, padding) + RandomHorizontalFlip() for a whole batch of raw
    (un-normalised) images: zero padding, one uniform offset per image, flip with p = 0.5 (the
    draws are made whether or not ``flip``, so the stream does not depend on it)."""
    if padding <= 0:
        return raw
    B, C, H, W = raw.shape
    padded = torch.nn.functional.pad(raw, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    flip = (torch.rand(B, generator=generator) < 0.5) & flip
    rows = (oy[:, None] + torch.arange(H)[None, :])  # (B, H)
    cols = (ox[:, None] + torch.arange(W)[None, :])  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(B)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def epoch_seed(seed, epoch, rank, stream):
    """A 63-bit seed for one (run seed, epoch, rank, stream) tuple."""
    h = np.random.SeedSequence([int(seed), int(epoch), int(rank), int(stream)])
    return int(h.generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1))


class EpochLoader:
    """Batches of one epoch over an in-memory split: ``dict(x, y, idx[, contrast_idx][, x2])``.

    ``x`` is normalised (and augmented if ``augment``); ``idx`` holds the dataset rows; with
    ``nce_k`` the batch also carries ``contrast_idx`` (B, K+1) from the class-conditional sampler
    (column 0 = ``idx``); with ``two_views`` a second independently augmented view ``x2``.
    Sharded with ``DistributedSampler`` (also for one process: it is deterministic per epoch).
    """

    def __init__(self, dataset: Dataset, split="train", batch_size=64, shuffle=True, augment=True, seed=0,
                 rank=0, world_size=1, nce_k=0, two_views=False, device="cpu", drop_last=False):
        self.ds, self.split = dataset, getattr(dataset, split)
        self.batch_size, self.augment, self.seed = batch_size, augment, seed
        self.rank, self.world_size, self.nce_k, self.two_views = rank, world_size, nce_k, two_views
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.sampler = DistributedSampler(range(len(self.split)), num_replicas=world_size, rank=rank,
                                          shuffle=shuffle, seed=seed, drop_last=False)
        self.negatives = ClassConditionalSampler(self.split.labels, dataset.num_classes) if nce_k else None
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        self.sampler.set_epoch(self.epoch)

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _view(self, raw, gen, augment=None):
        if self.augment if augment is None else augment:
            raw = random_crop_flip(raw, self.ds.crop_padding, gen, self.ds.flip) if self.ds.crop_padding else raw
        return self.split.normalize(raw)

    def __iter__(self):
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        g_aug = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank, 1))
        g_neg = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank, 2))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            raw = self.split.images[idx]
            batch = {"x": self._view(raw, g_aug), "y": self.split.labels[idx], "idx": idx}
            if self.two_views:  # the second view always differs from the first: augmented even
                batch["x2"] = self._view(raw, g_aug, augment=True)  # when the dataset trains without
            if self.negatives is not None:
                batch["contrast_idx"] = self.negatives(idx, self.nce_k, generator=g_neg)
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def eval_batches(dataset: Dataset, batch_size=256, rank=0, world_size=1, device="cpu"):
    """Deterministic, un-augmented batches of this rank's share of the test split."""
    split = dataset.test
    rows = torch.arange(rank, len(split), world_size)
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        yield split.normalize(split.images[idx]).to(device), split.labels[idx].to(device)


def write_fake_cifar100(folder, n_train=200, n_test=100, seed=0, as_archive=False):
    """Writes a tiny CIFAR-100-format ``cifar-100-python/`` (or its .tar.gz) under ``folder``:
    random uint8 images whose class shifts their mean colour, for tests and smoke runs."""
    rng = np.random.RandomState(seed)
    root = os.path.join(folder, "cifar-100-python")
    os.makedirs(root, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = rng.randint(0, 100, size=n)
        base = (labels[:, None] * 2.5).astype(np.int64)
        data = np.clip(rng.randint(0, 64, size=(n, 3072)) + base, 0, 255).astype(np.uint8)
        with open(os.path.join(root, name), "wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(),
                         b"filenames": [f"img{i}.png".encode() for i in range(n)]}, fh)
    with open(os.path.join(root, "meta"), "wb") as fh:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, fh)
    if as_archive:
        arc = os.path.join(folder, "cifar-100-python.tar.gz")
        with tarfile.open(arc, "w:gz") as tf:
            tf.add(root, arcname="cifar-100-python")
        import shutil
        shutil.rmtree(root)
        return arc
    return root
