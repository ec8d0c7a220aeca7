"""Tiny fake datasets on disk for the trainer tests (moved out of dcdkernels.train.data): a
CIFAR-100-format folder or archive, and an ImageNet-style ImageFolder."""

import os
import tarfile

import numpy as np


def write_fake_cifar100(folder, n_train=200, n_test=100, seed=0, as_archive=False):
    """Writes a tiny CIFAR-100-format ``cifar-100-python/`` (or its .tar.gz) under ``folder``:
    random uint8 images whose class shifts their mean colour, for tests and smoke runs."""
    import pickle

    rng = np.random.RandomState(seed)
    root = os.path.join(folder, "cifar-100-python")
    os.makedirs(root, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = rng.randint(0, 100, size=n)
        base = (labels[:, None] * 2.5).astype(np.int64)
        data = np.clip(rng.randint(0, 64, size=(n, 3072)) + base, 0, 255).astype(np.uint8)
        with open(os.path.join(root, name), "wb") as fh:
            pickle.dump(
                {
                    "data": data,
                    "fine_labels": labels.tolist(),
                    "coarse_labels": (labels // 5).tolist(),
                    "filenames": [f"img{i}.png" for i in range(n)],
                },
                fh,
            )
    with open(os.path.join(root, "meta"), "wb") as fh:
        pickle.dump(
            {
                "fine_label_names": [f"class{i}" for i in range(100)],
                "coarse_label_names": [f"super{i}" for i in range(20)],
            },
            fh,
        )
    if as_archive:
        arc = os.path.join(folder, "cifar-100-python.tar.gz")
        with tarfile.open(arc, "w:gz") as tf:
            tf.add(root, arcname="cifar-100-python")
        import shutil

        shutil.rmtree(root)
        return arc
    return root


def write_image_folder(folder, classes=3, per_class=12, size=32, seed=0, splits=("train", "val")):
    """Writes a tiny ImageFolder (``folder/<split>/class<c>/<i>.png``, RGB ``size`` px) whose class
    shifts the mean colour, for tests and smoke runs. Returns ``folder``."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for split in splits:
        for c in range(classes):
            d = os.path.join(folder, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                px = np.clip(rng.randint(0, 96, size=(size, size, 3)) + 60 * c, 0, 255).astype(np.uint8)
                Image.fromarray(px).save(os.path.join(d, f"{i}.png"))
    return folder
