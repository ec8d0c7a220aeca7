"""Configuration of the reference trainers: command-line flags and an optional YAML file.

Precedence, lowest first: built-in defaults < the dataset's recipe (``DATASET_DEFAULTS``) < the
method's loss weights (``distill.METHOD_WEIGHTS``) < the YAML file given with ``--config`` < flags
given on the command line. A YAML file is a mapping of the same keys as the flags (dashes or
underscores); like mdistiller's and torchdistill's configs it may group them in sections
(``data:``, ``model:``, ``solver:``, ``distill:``, ``run:``, any name): sections are flattened.
``loss_kwargs:`` (a mapping) is passed verbatim to the loss module's constructor.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

METHODS = ("ce", "kd", "crd", "dcd", "icd", "cocord", "pckd")
BACKENDS = ("auto", "eager", "cpu", "cuda", "triton")


@dataclass
class Config:
    # data
    dataset: str = "digits"
    data_dir: Optional[str] = None
    train_subset: Optional[int] = None  # first N training rows only (smoke tests)
    test_subset: Optional[int] = None
    augment: Optional[bool] = None  # dataset default: off for digits (CoCoRD: 1-px crops), crop+flip for CIFAR-100
    image_size: Optional[int] = None  # imagefolder: the training crop (224); evaluation resizes to 256/224 of it
    num_workers: Optional[int] = None  # DataLoader workers (dataset default: 0 digits, 4 CIFAR-100, 8 imagefolder)
    pin_memory: Optional[bool] = None  # DataLoader pin_memory (default: on for CUDA)
    # models
    teacher: Optional[str] = None
    student: Optional[str] = None
    teacher_ckpt: Optional[str] = None
    # method
    method: str = "crd"
    backend: str = "auto"
    gamma: Optional[float] = None  # CE weight        (RepDistiller -r)
    alpha: Optional[float] = None  # KD weight        (RepDistiller -a)
    beta: Optional[float] = None  # distill weight   (RepDistiller -b)
    kd_T: float = 4.0
    feat_dim: int = 128
    nce_k: Optional[int] = None
    nce_t: float = 0.07
    nce_m: float = 0.5
    loss_kwargs: dict = field(default_factory=dict)
    # memory of the bank/queue losses under torchrun: None = "replicated" when WORLD_SIZE > 1
    memory_mode: Optional[str] = None
    # optimisation (student)
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_decay_epochs: Optional[List[int]] = None
    lr_decay_rate: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    # teacher training (when no --teacher-ckpt)
    teacher_epochs: Optional[int] = None
    teacher_lr: Optional[float] = None
    teacher_lr_decay_epochs: Optional[List[int]] = None
    # run
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None  # torch.set_num_threads; 0 = torch's default (all cores)
    out_dir: Optional[str] = None
    name: Optional[str] = None
    resume: Optional[str] = None
    compare_eager: bool = False
    baseline: bool = False
    progress: bool = True
    save_every: int = 1
    save_every_steps: int = 0  # also checkpoint inside an epoch every N steps (0: epoch ends only)
    teacher_cache: Optional[str] = None  # folder of teachers shared across runs ("" disables)
    config: Optional[str] = None

    def to_dict(self):
        return dataclasses.asdict(self)


# RepDistiller's CIFAR-100 recipe (train_student.py / train_teacher.py defaults: 240 epochs, batch
# 64, SGD lr 0.05 momentum 0.9 wd 5e-4, lr x0.1 at epochs 150, 180, 210; lr 0.01 for MobileNetV2
# and the ShuffleNets; nce_k 16384), and a CPU-sized recipe for the embedded digits.
DATASET_DEFAULTS = {
    "cifar100": dict(
        teacher="resnet32x4",
        student="resnet8x4",
        epochs=240,
        teacher_epochs=240,
        batch_size=64,
        lr=0.05,
        teacher_lr=0.05,
        lr_decay_epochs=[150, 180, 210],
        teacher_lr_decay_epochs=[150, 180, 210],
        nce_k=16384,
        augment=True,
        num_workers=4,
    ),
    # digits: 1,438 training rows. nce_k = 512 negatives per anchor: K must stay well below the
    # ~1,290 rows of the other classes an anchor can draw from (sampling with replacement only in
    # the degenerate case) and K/N = 0.36 keeps the NCE noise prior meaningful.
    "digits": dict(
        teacher="digits_teacher",
        student="digits_student",
        epochs=20,
        teacher_epochs=20,
        batch_size=64,
        lr=0.05,
        teacher_lr=0.05,
        lr_decay_epochs=[12, 15, 18],
        teacher_lr_decay_epochs=[12, 15, 18],
        nce_k=512,
        augment=False,
        threads=1,
        num_workers=0,
    ),
    # An ImageNet-style folder (DIR/train, DIR/val): torchvision resnet34 -> resnet18 and the schedule
    # of torchdistill's ILSVRC-2012 CRD config (configs/sample/ilsvrc2012/crd/resnet18_from_resnet50.yaml:
    # 20 epochs, SGD lr 1e-4 momentum 0.9 wd 5e-4, x0.1 at epochs 5 and 15, K = 16,384), see
    # configs/imagenet_crd.yaml. Pass the teacher with --teacher-ckpt (torchvision's weights load); without
    # one it is trained first with the PyTorch ImageNet example's recipe (90 epochs, lr 0.1, x0.1 every 30).
    "imagefolder": dict(
        teacher="resnet34",
        student="resnet18",
        epochs=20,
        teacher_epochs=90,
        batch_size=256,
        lr=1e-4,
        teacher_lr=0.1,
        lr_decay_epochs=[5, 15],
        teacher_lr_decay_epochs=[30, 60],
        nce_k=16384,
        augment=True,
        image_size=224,
        num_workers=8,
    ),
}
# threads=1 on digits: the 8x8 models are far too small to gain from intra-op parallelism, and on a
# shared CPU a 2-thread torch pool loses up to 10x waiting at its barriers for a descheduled core.


def _int_list(text):
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    return [int(v) for v in str(text).replace(" ", "").split(",") if v]


def _kv(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    try:
        import yaml

        v = yaml.safe_load(v)
    except Exception:
        pass
    return k.strip().replace("-", "_"), v


def build_parser():
    p = argparse.ArgumentParser(
        prog="dcdkernels-train",
        description="Train (or load) a teacher, then distill a student with a dcdkernels loss. "
        "Default: CRD + CE with RepDistiller's weights on scikit-learn's digits.",
        epilog="Defaults that depend on the dataset (override any of them): "
        + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for name, d in DATASET_DEFAULTS.items())
        + ". Loss weights default to RepDistiller's for the method (kd: -r 0.1 -a 0.9 -b 0; crd: -r 1 -a 0 "
        "-b 0.8; crd+kd: -a 1 -b 0.8; dcd/icd: -r 1 -a 0 -b 1). Other defaults: seed 0, kd_T 4, feat_dim 128, "
        "nce_t 0.07, nce_m 0.5, weight_decay 5e-4, momentum 0.9, lr_decay_rate 0.1, backend auto.",
        argument_default=argparse.SUPPRESS,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=tuple(DATASET_DEFAULTS),
        help="digits (embedded), cifar100 or imagefolder (both need --data-dir)",
    )
    g.add_argument(
        "--data-dir",
        help="cifar100: the python version (cifar-100-python/ folder, its parent, or the "
        ".tar.gz); imagefolder: a folder with train/ and val/ class sub-folders",
    )
    g.add_argument("--image-size", type=int, help="imagefolder: training crop size (224)")
    g.add_argument("--num-workers", type=int, help="DataLoader worker processes (0: load in the main process)")
    g.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, help="DataLoader pin_memory (default: CUDA)")
    g.add_argument("--train-subset", type=int, help="use only the first N training rows")
    g.add_argument("--test-subset", type=int, help="use only the first N test rows")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, help="random crop + horizontal flip")
    g = p.add_argument_group("models")
    g.add_argument("--teacher", help="teacher architecture (see --list-models)")
    g.add_argument("--student", help="student architecture")
    g.add_argument(
        "--teacher-ckpt",
        help="load the teacher from this checkpoint instead of training it "
        "({'model': state_dict} as RepDistiller, or a bare state_dict)",
    )
    g.add_argument("--list-models", action="store_true", help="print the model zoo and exit")
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--method", help=f"one of {', '.join(METHODS)}, optionally '+kd' (e.g. crd+kd); ce = no distillation"
    )
    g.add_argument("--backend", choices=BACKENDS, help="backend of the contrastive losses")
    g.add_argument("-r", "--gamma", type=float, help="CE weight (default: RepDistiller's for the method)")
    g.add_argument("-a", "--alpha", type=float, help="KD weight")
    g.add_argument("-b", "--beta", type=float, help="weight of the method's distillation term")
    g.add_argument("--kd-T", dest="kd_T", type=float, help="KD temperature (4)")
    g.add_argument("--feat-dim", type=int, help="embedding dimension of the contrastive heads (128)")
    g.add_argument("--nce-k", type=int, help="negatives per anchor (CRD; memory-form DCD/ICD)")
    g.add_argument("--nce-t", type=float, help="NCE temperature (0.07)")
    g.add_argument("--nce-m", type=float, help="memory momentum (0.5)")
    g.add_argument(
        "--memory-mode",
        choices=("local", "replicated", "sharded"),
        help="memory of CRD / memory-form DCD / CoCoRD under torchrun: replicated (the default with "
        "WORLD_SIZE > 1: every rank holds the banks) or sharded (rank r holds ceil(N/W) rows)",
    )
    g.add_argument(
        "--loss-arg",
        dest="loss_args",
        action="append",
        type=_kv,
        metavar="KEY=VALUE",
        help="extra keyword argument of the loss module's constructor (repeatable)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-decay-epochs", type=_int_list, help="comma separated, e.g. 150,180,210")
    g.add_argument("--lr-decay-rate", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--teacher-epochs", type=int)
    g.add_argument("--teacher-lr", type=float)
    g.add_argument("--teacher-lr-decay-epochs", type=_int_list)
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML file of the same keys (flags override it)")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=int, help="torch.set_num_threads (digits default 1; 0 = all cores)")
    g.add_argument("--out-dir", help="run folder (default runs/<name>)")
    g.add_argument("--name", help="run name (default: dataset_method_student_timestamp)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="continue the run in --out-dir (or the given run folder / checkpoint file)",
    )
    g.add_argument(
        "--compare-eager",
        action="store_true",
        help="train the student again, same seed, with backend='eager' losses; compare both",
    )
    g.add_argument("--baseline", action="store_true", help="also train the student without distillation (CE only)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    g.add_argument("--save-every", type=int, help="checkpoint every N epochs")
    g.add_argument(
        "--save-every-steps",
        type=int,
        help="also checkpoint every N steps inside an epoch, so a killed run resumes mid-epoch",
    )
    g.add_argument(
        "--teacher-cache", help="folder of trained teachers reused across runs ('' to disable; default runs/teachers)"
    )
    return p


def _flatten_yaml(obj, path="") -> dict:
    fields = {f.name for f in dataclasses.fields(Config)} | {"loss_args"}
    out = {}
    for k, v in obj.items():
        key = str(k).replace("-", "_")
        if key in ("kd_t",):
            key = "kd_T"
        if key in fields or key == "loss_kwargs":
            out[key] = v
        elif isinstance(v, dict):
            out.update(_flatten_yaml(v, f"{path}{key}."))
        else:
            raise ValueError(f"unknown config key {path}{k!r}")
    return out


def load_yaml(path) -> dict:
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of option: value")
    return _flatten_yaml(data)


def make_config(argv=None, **overrides) -> Config:
    """Parse ``argv`` (flags), merge an optional YAML file and ``overrides`` (keyword arguments,
    highest precedence: handy from Python and tests), then fill in dataset and method defaults."""
    ns = vars(build_parser().parse_args([] if argv is None else list(argv)))
    if ns.pop("list_models", False):
        from .models import model_names

        print("\n".join(model_names()))
        raise SystemExit(0)
    values = {}
    cfg_path = overrides.get("config", ns.get("config"))
    if cfg_path:
        values.update(load_yaml(cfg_path))
    loss_args = dict(ns.pop("loss_args", []) or [])
    values.update(ns)
    values.update(overrides)
    kw = dict(values.pop("loss_kwargs", {}) or {})
    kw.update(loss_args)
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(k for k in values if k not in known and k != "loss_args")
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} (from {cfg_path or 'the arguments'}); see --help")
    cfg = Config(**{k: v for k, v in values.items() if k != "loss_args"})
    cfg.loss_kwargs = kw
    return finalize(cfg)


def finalize(cfg: Config) -> Config:
    from . import distill

    if cfg.dataset not in DATASET_DEFAULTS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}")
    for k, v in DATASET_DEFAULTS[cfg.dataset].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, list(v) if isinstance(v, list) else v)
    cfg.method = distill.normalize_method(cfg.method)
    for k, v in distill.default_weights(cfg.method, cfg.dataset).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.lr_decay_epochs is not None:
        cfg.lr_decay_epochs = _int_list(cfg.lr_decay_epochs)
    if cfg.teacher_lr_decay_epochs is not None:
        cfg.teacher_lr_decay_epochs = _int_list(cfg.teacher_lr_decay_epochs)
    if cfg.dataset == "cifar100":
        from .models import LOW_LR_MODELS, canonical_name

        # RepDistiller: "set different learning rate from these 4 models"
        if canonical_name(cfg.student) in LOW_LR_MODELS and cfg.lr == DATASET_DEFAULTS["cifar100"]["lr"]:
            cfg.lr = 0.01
        if (
            canonical_name(cfg.teacher) in LOW_LR_MODELS
            and cfg.teacher_lr == DATASET_DEFAULTS["cifar100"]["teacher_lr"]
        ):
            cfg.teacher_lr = 0.01
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    check_values(cfg)
    if cfg.name is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.name = f"{cfg.dataset}_{cfg.method.replace('+', '-')}_{cfg.student}_{stamp}"
    if cfg.out_dir is None:
        if cfg.resume not in (None, "auto"):
            r = cfg.resume
            cfg.out_dir = os.path.dirname(os.path.dirname(r)) if os.path.isfile(r) else r
        else:
            cfg.out_dir = os.path.join("runs", cfg.name)
    if cfg.teacher_cache is None:
        cfg.teacher_cache = os.path.join(os.path.dirname(os.path.abspath(cfg.out_dir)), "teachers")
    return cfg


# Ranges of the numeric options, checked once the defaults are filled in (flags, YAML keys and
# Python overrides alike), so that a bad value fails here naming the option, not deep in torch.
_RANGES = {
    "epochs": (int, 1, None),
    "batch_size": (int, 1, None),
    "teacher_epochs": (int, 1, None),
    "feat_dim": (int, 1, None),
    "nce_k": (int, 1, None),
    "image_size": (int, 8, None),
    "num_workers": (int, 0, None),
    "seed": (int, 0, 2**63 - 1),
    "threads": (int, 0, None),
    "save_every": (int, 1, None),
    "save_every_steps": (int, 0, None),
    "train_subset": (int, 1, None),
    "test_subset": (int, 1, None),
    "lr": (float, 0.0, None),
    "teacher_lr": (float, 0.0, None),
    "kd_T": (float, 0.0, None),
    "nce_t": (float, 0.0, None),
    "nce_m": (float, 0.0, 1.0),
    "momentum": (float, 0.0, 1.0),
    "lr_decay_rate": (float, 0.0, 1.0),
    "weight_decay": (float, 0.0, None),
    "gamma": (float, 0.0, None),
    "alpha": (float, 0.0, None),
    "beta": (float, 0.0, None),
}
_OPEN_LOW = ("lr", "teacher_lr", "kd_T", "nce_t")  # must be > 0, not only >= 0


def check_values(cfg: Config) -> None:
    """Raise a ``ValueError`` naming the option (``--flag`` / YAML key) for a value of the wrong
    type or out of its range. ``None`` means "the dataset's default" and is not checked."""
    for key, (kind, low, high) in _RANGES.items():
        v = getattr(cfg, key)
        if v is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            raise ValueError(f"{flag} ({key}) must be {'a number' if kind is float else 'an integer'}, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"{flag} ({key}) must be finite, got {v!r}")
        bad_low = v <= low if key in _OPEN_LOW else v < low
        if bad_low or (high is not None and v > high):
            top = f"{high}]" if high is not None else "inf)"
            rng = f"{'(' if key in _OPEN_LOW else '['}{low}, {top}"
            raise ValueError(f"{flag} ({key}) must be in {rng}, got {v!r}")
    for key in ("lr_decay_epochs", "teacher_lr_decay_epochs"):
        for e in getattr(cfg, key) or []:
            if isinstance(e, bool) or not isinstance(e, int) or e < 1:
                raise ValueError(f"--{key.replace('_', '-')} ({key}) must be epochs >= 1, got {getattr(cfg, key)!r}")


def dump(cfg: Config, path):
    with open(path, "w") as fh:
        json.dump(cfg.to_dict(), fh, indent=2, sort_keys=True)
