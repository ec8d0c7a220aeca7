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
from .config import Config, make_config
from .distill import METHOD_WEIGHTS, Distiller, default_weights, kd_loss
from .models import MODELS, build_model, get_classifier, model_names
from .trainer import format_table, train

__all__ = ["Config", "Distiller", "METHOD_WEIGHTS", "MODELS", "build_model", "default_weights", "format_table",
           "get_classifier", "kd_loss", "make_config", "model_names", "train"]
