"""The trainer on an ImageNet-style folder (issue 14): torchvision ImageFolder + transforms,
DataLoader workers, the dataset index reaching the loss, torchvision ResNets, bit-identical resume
with seeded workers, and 2-rank gloo. A tiny folder written by the test (3 classes x 12 PNGs of
32 px, train/ and val/), 32-px crops, tiny models (the digits CNNs take 3 channels too), 1 epoch."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchvision")

from fake_data import write_image_folder  # noqa: E402

from dcdkernels.train import data as D  # noqa: E402
from dcdkernels.train import make_config, train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--dataset",
    "imagefolder",
    "--image-size",
    "32",
    "--batch-size",
    "12",
    "--nce-k",
    "16",
    "--no-progress",
    "--threads",
    "1",
    "--teacher-cache",
    "",
    "--lr",
    "0.05",
    "--lr-decay-epochs",
    "100",
    "--num-workers",
    "0",
]
TINY_MODELS = ["--teacher", "digits_teacher", "--student", "digits_student"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("imgs")), classes=3, per_class=12, size=32)


@pytest.fixture(scope="module")
def teacher_ckpt(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = make_config(
        [
            "--data-dir",
            folder,
            "--method",
            "ce",
            "--student",
            "digits_teacher",
            "--epochs",
            "2",
            "--out-dir",
            str(out / "run"),
        ]
        + SMALL
    )
    train(cfg)
    return str(out / "run" / "student" / "model.pt")


def _run(tmp_path, folder, teacher_ckpt, *args, name="run"):
    cfg = make_config(
        ["--data-dir", folder, "--teacher-ckpt", teacher_ckpt, "--out-dir", str(tmp_path / name)]
        + SMALL
        + TINY_MODELS
        + list(args)
    )
    return cfg, train(cfg)


def test_image_folder_dataset_and_loader(folder):
    ds = D.load_dataset("imagefolder", folder, image_size=32)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (36, 36, 3) and ds.class_names == [
        "class0",
        "class1",
        "class2",
    ]
    loader = D.TrainLoader(ds, batch_size=12, nce_k=8, two_views=True, augment=True, seed=1, num_workers=2)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 3 and sorted(torch.cat([b["idx"] for b in batches]).tolist()) == list(range(36))
    for b in batches:
        assert b["x"].shape == (12, 3, 32, 32) and b["x2"].shape == (12, 3, 32, 32)
        assert torch.equal(ds.train_labels[b["idx"]], b["y"])  # the index of each sample is the dataset row
        assert torch.equal(b["contrast_idx"][:, 0], b["idx"])
        assert not (ds.train_labels[b["contrast_idx"][:, 1:]] == b["y"][:, None]).any()
    # Workers do not change the batches: augmentation is seeded per (seed, epoch, sample).
    loader0 = D.TrainLoader(ds, batch_size=12, nce_k=8, two_views=True, augment=True, seed=1, num_workers=0)
    loader0.set_epoch(1)
    for a, b in zip(batches, loader0):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    x, y = next(D.eval_batches(ds, batch_size=36))
    assert x.shape == (36, 3, 32, 32) and y.shape == (36,)
    with pytest.raises(FileNotFoundError, match="train/"):
        D.load_dataset("imagefolder", os.path.join(folder, "train"))


def _has_fused():
    from dcdkernels import backends

    try:
        return backends.resolve("auto", torch.device("cpu"), "dual_sampled_contrast") != "eager"
    except Exception:
        return False


@pytest.mark.parametrize("method", ["crd", "dcd", "icd", "cocord", "pckd"])
def test_every_method_fused_and_eager(tmp_path, folder, teacher_ckpt, method):
    _, res = _run(tmp_path, folder, teacher_ckpt, "--method", method, "--epochs", "1", "--compare-eager")
    for key in ("student", "student_eager"):
        st = res["phases"][key]
        assert st["steps"] == 3 and st["n_train"] == 36
        assert torch.isfinite(torch.tensor(st["history"][0]["loss"])), key
        assert method in st["history"][0]["parts"], st["history"][0]["parts"]
    assert res["phases"]["student_eager"]["backend_resolved"] == "eager"
    if _has_fused():
        assert "eager" not in res["phases"]["student"]["backend_resolved"]


def test_torchvision_resnets_crd(tmp_path, folder):
    """resnet34 -> resnet18 (torchvision), one epoch of CRD on the folder, teacher trained first."""
    cfg = make_config(
        [
            "--data-dir",
            folder,
            "--method",
            "crd",
            "--epochs",
            "1",
            "--teacher-epochs",
            "1",
            "--out-dir",
            str(tmp_path / "tv"),
        ]
        + SMALL
        + ["--num-workers", "1"]
    )
    assert (cfg.teacher, cfg.student) == ("resnet34", "resnet18")
    res = train(cfg)
    assert res["phases"]["teacher"]["arch"] == "resnet34" and res["phases"]["student"]["arch"] == "resnet18"
    assert res["phases"]["student"]["steps"] == 3


def test_resume_is_identical_with_workers(tmp_path, folder, teacher_ckpt):
    """2 epochs straight == 1 epoch then --resume, with 2 DataLoader workers and augmentation:
    parameters, banks, log Z, sampler state, optimizer state and history bit for bit."""
    args = ["--method", "crd", "--num-workers", "2"]
    _run(tmp_path, folder, teacher_ckpt, *args, "--epochs", "2", name="straight")
    _run(tmp_path, folder, teacher_ckpt, *args, "--epochs", "1", name="split")
    _, res = _run(tmp_path, folder, teacher_ckpt, *args, "--epochs", "2", "--resume", name="split")
    assert res["phases"]["student"]["resumed_from_epoch"] == 1
    a = torch.load(tmp_path / "straight" / "student" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "student" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for k in a["module"]:
        assert torch.equal(a["module"][k], b["module"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_time"} for e in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


@pytest.mark.distributed
def test_torchrun_gloo_image_folder(tmp_path, folder, teacher_ckpt):
    """Two CPU processes under torchrun (gloo): DistributedSampler over the folder, DDP, one epoch
    of CRD; both ranks end with the same parameters and banks."""
    cmd = (
        [
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
            "--data-dir",
            folder,
            "--teacher-ckpt",
            teacher_ckpt,
            "--out-dir",
            str(tmp_path / "ddp"),
        ]
        + SMALL
        + TINY_MODELS
        + ["--batch-size", "6"]
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    st = json.load(open(tmp_path / "ddp" / "results.json"))["phases"]["student"]
    assert st["world_size"] == 2 and st["steps"] == 3  # 36 rows / 2 ranks / batch 6
    r0 = torch.load(tmp_path / "ddp" / "student" / "checkpoint.pt", weights_only=False)["module"]
    r1 = torch.load(tmp_path / "ddp" / "student" / "checkpoint.rank1.pt", weights_only=False)["module"]
    for k in r0:
        if not k.endswith("rng_state"):
            assert torch.equal(r0[k], r1[k]), k
