"""Reference trainers: train (or load) a teacher, distill a student with a dcdkernels loss.

``python -m dcdkernels.train`` / ``dcdkernels-train`` (see ``--help``). Default: CRD + CE with
RepDistiller's weights on scikit-learn's digits (embedded, CPU-sized); ``--dataset cifar100
--data-dir DIR`` runs RepDistiller's CIFAR-100 recipe from a local copy of the python archive
(torchvision's CIFAR100); ``--dataset imagefolder --data-dir DIR`` an ImageNet-style folder with
torchvision's ResNets (``configs/imagenet_crd.yaml``). Data come from ``torch.utils.data``
DataLoaders (``--num-workers``, ``--pin-memory``) over a DistributedSampler under torchrun.

From Python::

    from dcdkernels.train import make_config, train
    results = train(make_config(["--method", "crd", "--compare-eager"]))
"""

import importlib.util

# The 'train' extra of pyproject.toml, as {module: distribution} (python_tests/test_packaging.py
# keeps the two in step). Checked before anything imports them, so that a core-only install gets
# one clear message instead of the first ImportError deep inside the trainer.
TRAIN_EXTRA = {
    "numpy": "numpy",
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "matplotlib": "matplotlib",
    "torchvision": "torchvision",
}
_missing = [dist for module, dist in TRAIN_EXTRA.items() if importlib.util.find_spec(module) is None]
if _missing:
    raise ModuleNotFoundError(
        f"dcdkernels.train needs the 'train' extra, and {', '.join(_missing)} "
        f"{'is' if len(_missing) == 1 else 'are'} not installed: pip install 'dcdkernels[train]' "
        f"(from a clone: pip install --no-build-isolation -e '.[train]')",
        name=_missing[0],
    )

from .config import Config, make_config  # noqa: E402
from .distill import METHOD_WEIGHTS, Distiller, default_weights, kd_loss  # noqa: E402
from .models import MODELS, build_model, get_classifier, model_names  # noqa: E402
from .trainer import format_table, train  # noqa: E402

__all__ = [
    "Config",
    "Distiller",
    "METHOD_WEIGHTS",
    "MODELS",
    "build_model",
    "default_weights",
    "format_table",
    "get_classifier",
    "kd_loss",
    "make_config",
    "model_names",
    "train",
]
