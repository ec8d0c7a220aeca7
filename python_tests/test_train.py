"""Reference trainers (dcdkernels.train): tiny end-to-end runs of every method, resume equality,
fused vs eager agreement, CIFAR-100 loading from a fake archive, config precedence, torchrun.

Everything runs on a CPU in tiny sizes: 256 digits training rows, 1-2 epochs, one shared teacher.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")

from fake_data import write_fake_cifar100  # noqa: E402

from dcdkernels.train import data as D  # noqa: E402
from dcdkernels.train import distill, make_config, train  # noqa: E402
from dcdkernels.train.models import build_model, get_classifier, model_names  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--train-subset",
    "256",
    "--batch-size",
    "64",
    "--nce-k",
    "64",
    "--no-progress",
    "--lr-decay-epochs",
    "100",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """One small digits teacher for the whole module (8 epochs on 256 rows)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = make_config(
        [
            "--method",
            "ce",
            "--student",
            "digits_teacher",
            "--epochs",
            "8",
            "--out-dir",
            str(out / "run"),
            "--teacher-cache",
            "",
        ]
        + TINY
    )
    res = train(cfg)
    assert res["phases"]["student"]["test_acc"] > 40.0
    return str(out / "run" / "student" / "model.pt")


def _run(tmp_path, teacher_ckpt, *args, name="run"):
    cfg = make_config(
        ["--teacher-ckpt", teacher_ckpt, "--out-dir", str(tmp_path / name), "--teacher-cache", ""] + TINY + list(args)
    )
    return cfg, train(cfg)


# ----------------------------------------------------------------------------------------------
# every method, end to end
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kd", "crd", "dcd", "icd", "cocord", "pckd", "crd+kd"])
def test_every_method_runs(tmp_path, teacher_ckpt, method):
    cfg, res = _run(tmp_path, teacher_ckpt, "--method", method, "--epochs", "1")
    st = res["phases"]["student"]
    assert st["method"] == method and st["epochs"] == 1 and st["steps"] == 4
    assert 0.0 <= st["test_acc"] <= 100.0
    h = st["history"][0]
    assert torch.isfinite(torch.tensor(h["loss"]))
    base = method.split("+")[0]
    if base != "kd":
        assert base in h["parts"], h["parts"]
    if method.endswith("+kd") or base == "kd":
        assert "kd" in h["parts"]
    # the weights are RepDistiller's (see distill.METHOD_WEIGHTS), CoCoRD's set for digits
    assert st["weights"] == distill.default_weights(method, "digits")
    saved = json.load(open(os.path.join(cfg.out_dir, "results.json")))
    assert saved["phases"]["student"]["test_acc"] == st["test_acc"]
    assert os.path.isfile(os.path.join(cfg.out_dir, "curves.png"))
    ck = torch.load(os.path.join(cfg.out_dir, "student", "checkpoint.pt"), weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] == 4


def test_method_weights_match_repdistiller():
    assert distill.default_weights("kd") == dict(gamma=0.1, alpha=0.9, beta=0.0)
    assert distill.default_weights("crd") == dict(gamma=1.0, alpha=0.0, beta=0.8)
    assert distill.default_weights("crd+kd") == dict(gamma=1.0, alpha=1.0, beta=0.8)
    assert distill.default_weights("dcd+kd") == dict(gamma=1.0, alpha=1.0, beta=1.0)
    with pytest.raises(ValueError):
        distill.normalize_method("kd+kd")
    with pytest.raises(ValueError):
        distill.normalize_method("foo")


# ----------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------
def test_resume_is_identical(tmp_path, teacher_ckpt):
    """2 epochs straight == 1 epoch, then --resume for the 2nd: same parameters, banks, log Z,
    sampler state and optimizer state, bit for bit."""
    _run(tmp_path, teacher_ckpt, "--method", "crd", "--epochs", "2", name="straight")
    _run(tmp_path, teacher_ckpt, "--method", "crd", "--epochs", "1", name="split")
    _, res = _run(tmp_path, teacher_ckpt, "--method", "crd", "--epochs", "2", "--resume", name="split")
    assert res["phases"]["student"]["resumed_from_epoch"] == 1
    a = torch.load(tmp_path / "straight" / "student" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "student" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    assert a["module"].keys() == b["module"].keys()
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k
    assert any(k.endswith("bank_s") for k in a["module"]) and any(k.endswith("bank_t") for k in a["module"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [h["test_acc"] for h in a["history"]] == [h["test_acc"] for h in b["history"]]


# ----------------------------------------------------------------------------------------------
# fused vs eager
# ----------------------------------------------------------------------------------------------
FUSED_EAGER_TOLERANCE = 2.0  # accuracy points on the 359 digits test images (about 7 images)


def test_fused_and_eager_agree(tmp_path, teacher_ckpt):
    """Same seed, backend auto (fused C++ kernels) vs eager: the same accuracy within
    FUSED_EAGER_TOLERANCE points (kernels sum in another order, so trajectories differ by rounding)."""
    _, res = _run(tmp_path, teacher_ckpt, "--method", "crd", "--epochs", "2", "--compare-eager")
    s, e = res["phases"]["student"], res["phases"]["student_eager"]
    assert "eager" not in s["backend_resolved"] and e["backend_resolved"] == "eager"
    assert abs(s["test_acc"] - e["test_acc"]) <= FUSED_EAGER_TOLERANCE
    assert abs(s["history"][0]["loss"] - e["history"][0]["loss"]) < 1e-2 * abs(e["history"][0]["loss"])
    assert e["peak_memory_bytes"] is not None and s["peak_memory_bytes"] is not None


# ----------------------------------------------------------------------------------------------
# data, models, config
# ----------------------------------------------------------------------------------------------
def test_digits_split_and_batches():
    ds = D.load_digits()
    assert len(ds.train) + len(ds.test) == 1797 and len(ds.test) == 359
    again = D.load_digits()
    assert torch.equal(ds.train_labels, again.train_labels)  # fixed split
    loader = D.TrainLoader(ds, batch_size=64, nce_k=32, two_views=True, augment=True, seed=3)
    loader.set_epoch(2)
    b1 = next(iter(loader))
    b2 = next(iter(loader))
    for k in b1:
        assert torch.equal(b1[k], b2[k]), k  # an epoch depends only on (seed, epoch)
    ci = b1["contrast_idx"]
    assert ci.shape == (64, 33) and torch.equal(ci[:, 0], b1["idx"])
    assert not (ds.train_labels[ci[:, 1:]] == b1["y"][:, None]).any()  # class-conditional negatives
    assert torch.equal(ds.train_labels[b1["idx"]], b1["y"])  # the dataset index of each sample
    assert not torch.equal(b1["x"], b1["x2"])
    # Starting 3 batches in (mid-epoch resume) gives the same batches 3, 4, ... and negatives.
    full = [b for _, b in loader.batches()]
    part = [b for _, b in loader.batches(skip=3)]
    assert len(part) == len(full) - 3
    for a, b in zip(full[3:], part):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))["idx"], b1["idx"])


def test_fake_cifar100_and_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-dir"):
        D.load_cifar100(str(tmp_path / "nothing"))
    arc = write_fake_cifar100(str(tmp_path / "a"), n_train=64, n_test=32, as_archive=True)
    ds = D.load_cifar100(arc)  # extracted next to the archive, then torchvision's CIFAR100
    assert len(ds.train) == 64 and ds.num_classes == 100 and ds.train_labels.shape == (64,)
    root = write_fake_cifar100(str(tmp_path / "b"), n_train=64, n_test=32)
    for where in (root, os.path.dirname(root)):
        assert len(D.load_cifar100(where).test) == 32
    x = ds.augment_transform(ds.train[0][0])  # RandomCrop(32, 4) + flip + normalise, torchvision
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert ds.probe(2).shape == (2, 3, 32, 32)


def test_cifar100_end_to_end(tmp_path):
    root = write_fake_cifar100(str(tmp_path), n_train=96, n_test=32)
    cfg = make_config(
        [
            "--dataset",
            "cifar100",
            "--data-dir",
            os.path.dirname(root),
            "--teacher",
            "resnet8",
            "--student",
            "resnet8",
            "--teacher-epochs",
            "1",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--nce-k",
            "64",
            "--method",
            "crd",
            "--out-dir",
            str(tmp_path / "run"),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert cfg.lr_decay_epochs == [150, 180, 210] and cfg.weight_decay == 5e-4 and cfg.momentum == 0.9
    res = train(cfg)
    assert res["phases"]["teacher"]["trained"] and res["phases"]["student"]["steps"] == 3
    assert os.path.isfile(tmp_path / "run" / "teacher.pt")


def test_cifar100_recipe_defaults():
    cfg = make_config(["--dataset", "cifar100", "--student", "ShuffleV1"])
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.nce_k) == (240, 64, 0.01, 16384)
    assert cfg.teacher == "resnet32x4" and cfg.teacher_lr == 0.05


def test_model_zoo_interface():
    for name in ("resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet20"):
        m = build_model(name, 100).eval()
        feats, logits = m(torch.randn(2, 3, 32, 32), is_feat=True)
        assert logits.shape == (2, 100) and feats[-1].shape == (2, m.feat_dim)
        assert get_classifier(m).weight.shape == (100, m.feat_dim)
    assert {"resnet32x4", "wrn_40_2", "resnet56", "vgg13", "digits_teacher"} <= set(model_names())
    sizes = {
        n: sum(p.numel() for p in build_model(n, 100).parameters()) for n in ("resnet8x4", "resnet32x4", "wrn_40_2")
    }
    assert sizes == {"resnet8x4": 1233540, "resnet32x4": 7433860, "wrn_40_2": 2255156}  # RepDistiller's counts
    import torchvision

    for name in ("resnet18", "resnet34"):  # torchvision's networks, parameter names and all
        m = build_model(name, 10).eval()
        ref = getattr(torchvision.models, name)(num_classes=10)
        assert m.state_dict().keys() == ref.state_dict().keys()
        m.load_state_dict(ref.state_dict())
        x = torch.randn(2, 3, 64, 64)
        feats, logits = m(x, is_feat=True)
        torch.testing.assert_close(logits, ref.eval()(x))
        assert feats[-1].shape == (2, 512) and get_classifier(m) is m.fc


def test_yaml_config_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n  dataset: digits\nsolver:\n  epochs: 7\n  lr: 0.2\ndistill:\n  method: crd+kd\n"
        "  beta: 0.5\n  loss_kwargs: {z_momentum: 0.99}\n"
    )
    cfg = make_config(["--config", str(path), "--lr", "0.3"])
    assert cfg.epochs == 7 and cfg.lr == 0.3 and cfg.method == "crd+kd" and cfg.beta == 0.5 and cfg.alpha == 1.0
    assert cfg.loss_kwargs == {"z_momentum": 0.99}
    cfg = make_config(["--loss-arg", "z_momentum=0.9"])
    assert cfg.loss_kwargs == {"z_momentum": 0.9}
    shipped = os.path.join(REPO, "dcdkernels", "train", "configs")
    for name in sorted(os.listdir(shipped)):
        if name.endswith(".yaml"):
            make_config(["--config", os.path.join(shipped, name)])


@pytest.mark.distributed
def test_torchrun_gloo(tmp_path, teacher_ckpt):
    """Two CPU processes under torchrun (gloo): DDP + DistributedSampler, one epoch of CRD; both
    ranks end with the same parameters, banks and partition estimates."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "dcdkernels.train",
        "--method",
        "crd",
        "--epochs",
        "1",
        "--teacher-ckpt",
        teacher_ckpt,
        "--out-dir",
        str(tmp_path / "ddp"),
        "--teacher-cache",
        "",
    ] + TINY
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.load(open(tmp_path / "ddp" / "results.json"))
    st = res["phases"]["student"]
    assert st["world_size"] == 2 and st["steps"] == 2  # 256 rows / 2 ranks / batch 64
    r0 = torch.load(tmp_path / "ddp" / "student" / "checkpoint.pt", weights_only=False)["module"]
    r1 = torch.load(tmp_path / "ddp" / "student" / "checkpoint.rank1.pt", weights_only=False)["module"]
    for k in r0:  # replicated bank updates, DDP-synced gradients, BN statistics from rank 0
        if not k.endswith("rng_state"):
            assert torch.equal(r0[k], r1[k]), k


def test_killed_mid_epoch_resumes_identically(tmp_path, teacher_ckpt):
    """SIGKILL right after a mid-epoch checkpoint (step 6 of 8, inside epoch 2), then --resume:
    the same parameters, banks, log Z, optimizer state and history as an uninterrupted run."""
    args = ["--method", "crd", "--epochs", "2", "--save-every-steps", "3", "--no-progress"]
    _run(tmp_path, teacher_ckpt, *args, name="straight")
    cmd = [
        sys.executable,
        "-m",
        "dcdkernels.train",
        "--teacher-ckpt",
        teacher_ckpt,
        "--out-dir",
        str(tmp_path / "killed"),
        "--teacher-cache",
        "",
        *TINY,
        *args,
    ]
    env = dict(os.environ, DCDKERNELS_TEST_KILL_AFTER_STEP="6")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed, no cleanup
    ck = torch.load(tmp_path / "killed" / "student" / "checkpoint.pt", weights_only=False)
    assert ck["mid_epoch"]["epoch"] == 2 and ck["mid_epoch"]["batches_done"] == 2 and ck["step"] == 6
    _, res = _run(tmp_path, teacher_ckpt, *args, "--resume", name="killed")
    a = torch.load(tmp_path / "straight" / "student" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "student" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 8 and b["mid_epoch"] is None
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_time"} for e in h]
    assert strip(a["history"]) == strip(b["history"])


@pytest.mark.distributed
def test_torchrun_sharded_killed_mid_epoch_resumes_identically(tmp_path, teacher_ckpt):
    """``--memory-mode sharded`` under torchrun (gloo, 2 ranks): each rank holds half of each bank;
    SIGKILL after the mid-epoch checkpoint of step 3 (epoch 2), then --resume: every rank's
    checkpoint equals the uninterrupted run's."""
    args = [
        "--method",
        "crd",
        "--epochs",
        "2",
        "--memory-mode",
        "sharded",
        "--save-every-steps",
        "1",
        "--teacher-ckpt",
        teacher_ckpt,
        "--teacher-cache",
        "",
    ] + TINY
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")

    def torchrun(name, *extra, kill=None):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "dcdkernels.train",
            "--out-dir",
            str(tmp_path / name),
            *args,
            *extra,
        ]
        e = dict(env, DCDKERNELS_TEST_KILL_AFTER_STEP=str(kill)) if kill else env
        return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=180)

    proc = torchrun("straight")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = torchrun("killed", kill=3)
    assert proc.returncode != 0  # both ranks killed after their checkpoint of step 3
    for rank, f in enumerate(("checkpoint.pt", "checkpoint.rank1.pt")):
        ck = torch.load(tmp_path / "killed" / "student" / f, weights_only=False)
        assert ck["step"] == 3 and ck["mid_epoch"]["epoch"] == 2, rank
    proc = torchrun("killed", "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shards = []
    for f in ("checkpoint.pt", "checkpoint.rank1.pt"):
        a = torch.load(tmp_path / "straight" / "student" / f, weights_only=False)
        b = torch.load(tmp_path / "killed" / "student" / f, weights_only=False)
        assert a["step"] == b["step"] == 4 and b["mid_epoch"] is None
        for k in a["module"]:
            assert torch.equal(torch.nan_to_num(a["module"][k]), torch.nan_to_num(b["module"][k])), (f, k)
        shards.append(a["module"])
    key = "criterion.memory.bank_s"
    assert shards[0][key].shape == shards[1][key].shape == (128, 128)  # 256 rows: half of each bank per rank
    assert shards[0]["criterion.memory.shard_layout"].tolist() == [256, 2, 0]
    assert shards[1]["criterion.memory.shard_layout"].tolist() == [256, 2, 1]
    assert torch.equal(shards[0]["criterion.memory.log_z"], shards[1]["criterion.memory.log_z"])
