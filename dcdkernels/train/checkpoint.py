"""Checkpoints: files written atomically, the per-rank phase checkpoint (``epoch`` epochs done,
plus the progress inside the next epoch for a mid-epoch checkpoint), resuming a run, and
teacher files.

A phase checkpoint holds the module (student and loss module buffers: banks, queues, log Z,
sampler offsets), the optimizer, epoch, step, history, RNG states and, when written inside an
epoch, ``mid_epoch``: the batches done and the running sums of that epoch (see ``EpochProgress``),
so that a resumed run replays exactly the batches and numbers of an uninterrupted one.
"""

import json
import os
import random
import signal
import time

import numpy as np
import torch
from torch import nn

from .models import build_model, canonical_name


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def checkpoint_path(phase_dir, rank):
    """``checkpoint.pt`` on rank 0, ``checkpoint.rank{r}.pt`` on the others."""
    main = os.path.join(phase_dir, "checkpoint.pt")
    return main if rank == 0 else os.path.join(phase_dir, f"checkpoint.rank{rank}.pt")


class PhaseState:
    """Where a phase stands: epochs done, optimizer steps, per-epoch history, training time, and
    after a mid-epoch resume the ``mid_epoch`` progress and the RNG state of the checkpoint (put
    back at the first batch trained after it)."""

    def __init__(self):
        self.start_epoch, self.step, self.history, self.train_time = 0, 0, [], 0.0
        self.mid = None  # progress inside a partly trained epoch (a mid-epoch checkpoint)
        self.rng = None

    def resume(self, ck):
        """Take the progress of the checkpoint ``ck``; restores the RNG now unless mid-epoch."""
        self.start_epoch, self.step, self.history, self.train_time = (
            ck["epoch"],
            ck["step"],
            ck["history"],
            ck["train_time"],
        )
        self.mid = ck.get("mid_epoch")
        self.rng = ck["rng"]
        if self.mid is None:
            set_rng_state(self.rng)

    def first_batch(self):
        """Before the first batch trained after a mid-epoch resume: torch/numpy/python RNG exactly
        as at the checkpoint."""
        if self.mid is not None:
            set_rng_state(self.rng)
            self.mid = None


class EpochProgress:
    """The running sums of one epoch (loss*n, correct, n; the loss parts * n), the samples seen
    and the start time; starts from a mid-epoch checkpoint's when resuming inside this epoch."""

    def __init__(self, epoch, mid=None):
        self.sums = torch.zeros(3, dtype=torch.float64)  # loss*n, correct, n
        self.part_sums = {}
        self.t0 = time.perf_counter()
        self.seen, self.skip = 0, 0
        if mid is not None and mid["epoch"] == epoch:  # resume inside this epoch
            self.sums, self.part_sums, self.seen, self.skip = (
                mid["sums"].clone(),
                dict(mid["part_sums"]),
                mid["seen"],
                mid["batches_done"],
            )
            self.t0 -= mid["elapsed"]

    @torch.no_grad()
    def add(self, loss, logits, y, parts):
        n = y.numel()
        self.seen += n
        self.sums += torch.tensor(
            [float(loss.detach()) * n, float((logits.argmax(1) == y).sum()), n],
            dtype=torch.float64,
        )
        for k, v in parts.items():
            self.part_sums[k] = self.part_sums.get(k, 0.0) + float(v.detach()) * n

    def elapsed(self):
        return time.perf_counter() - self.t0

    def mid_epoch(self, epoch, batches_done):
        """The ``mid_epoch`` entry of a checkpoint written after ``batches_done`` batches."""
        return dict(
            epoch=epoch,
            batches_done=batches_done,
            sums=self.sums.clone(),
            part_sums=dict(self.part_sums),
            seen=self.seen,
            elapsed=self.elapsed(),
        )


def load_checkpoint(phase_dir, rt, module, optimizer):
    """This rank's checkpoint of the phase, loaded into ``module`` and ``optimizer``; None if none."""
    path = checkpoint_path(phase_dir, rt.rank)
    if not os.path.isfile(path):
        return None
    ck = torch.load(path, map_location=rt.device, weights_only=False)
    module.load_state_dict(ck["module"])
    optimizer.load_state_dict(ck["optimizer"])
    return ck


def save_checkpoint(cfg, phase, module, optimizer, epoch, step, history, train_time, rt, phase_dir, mid_epoch=None):
    """``epoch`` = epochs completed; ``mid_epoch`` = progress inside the next one, if any."""
    state = dict(
        phase=phase.name,
        epoch=epoch,
        step=step,
        history=history,
        train_time=train_time,
        rng=rng_state(),
        loader=dict(seed=cfg.seed, next_epoch=epoch + 1, world_size=rt.world_size, rank=rt.rank),
        module=module.state_dict(),
        optimizer=optimizer.state_dict(),
        config=cfg.to_dict(),
        mid_epoch=mid_epoch,
    )
    atomic_save(state, checkpoint_path(phase_dir, rt.rank))
    if rt.main and mid_epoch is None:
        # RepDistiller-style student snapshot (``{'model': state_dict}``), loadable as a teacher
        atomic_save(
            {
                "model": module.student.state_dict(),
                "arch": canonical_name(phase.arch),
                "epoch": epoch,
                "accuracy": history[-1]["test_acc"],
                "dataset": cfg.dataset,
            },
            os.path.join(phase_dir, "model.pt"),
        )


def kill_hook_for_tests(step):
    """Tests kill the process (SIGKILL, no cleanup) right after the mid-epoch checkpoint of step
    ``DCDKERNELS_TEST_KILL_AFTER_STEP``, to prove that a killed run resumes identically."""
    if os.environ.get("DCDKERNELS_TEST_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def resolve_resume(cfg):
    """Whether to resume, and fix ``out_dir`` when --resume names a folder or checkpoint."""
    if not cfg.resume:
        return False
    if cfg.resume != "auto":
        r = cfg.resume
        if os.path.isfile(r):  # runs/x/student/checkpoint.pt -> runs/x
            r = os.path.dirname(os.path.dirname(os.path.abspath(r)))
        cfg.out_dir = r
    if not os.path.isdir(cfg.out_dir):
        raise FileNotFoundError(f"--resume: no run folder {cfg.out_dir} (pass --out-dir of the run to continue)")
    return True


def teacher_key(cfg):
    sub = f"_n{cfg.train_subset}" if cfg.train_subset else ""
    if cfg.dataset == "imagefolder":  # which folder, at which crop size
        sub += f"_{os.path.basename(os.path.abspath(cfg.data_dir or ''))}_i{cfg.image_size}"
    return (
        f"{cfg.dataset}{sub}_{canonical_name(cfg.teacher)}_e{cfg.teacher_epochs}_lr{cfg.teacher_lr}"
        f"_d{'-'.join(map(str, cfg.teacher_lr_decay_epochs or []))}_b{cfg.batch_size}"
        f"_aug{int(bool(cfg.augment))}_s{cfg.seed}_w{os.environ.get('WORLD_SIZE', '1')}.pt"
    )


def load_teacher_file(path, dataset, rt, arch=None):
    """(model on ``rt.device`` in eval mode, arch) from a ``{'model': state_dict, 'arch': ...}`` file,
    a bare state dict or a pickled module (RepDistiller's ``module.`` prefixes dropped)."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    state = ck.get("model", ck) if isinstance(ck, dict) else ck
    if isinstance(state, nn.Module):
        state = state.state_dict()
    arch = (ck.get("arch") if isinstance(ck, dict) else None) or arch
    model = build_model(arch, dataset.num_classes, dataset.in_channels)
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(rt.device).eval(), arch
