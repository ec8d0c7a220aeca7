"""Training loop, checkpoint/resume, evaluation, metrics, the results table and plots.

A run is a sequence of *phases*, each a folder under the run directory:

* ``teacher``: trains the teacher with CE (skipped when ``--teacher-ckpt`` is given, when the run
  folder already holds ``teacher.pt``, or when the shared teacher cache holds one trained with the
  same settings);
* ``baseline`` (``--baseline``): the student trained with CE only;
* ``student``: the student distilled with ``--method`` and ``--backend``;
* ``student_eager`` (``--compare-eager``): the same, same seed, with ``backend="eager"``.

Each phase writes ``checkpoint.pt`` every ``--save-every`` epochs (student, loss module buffers
(banks, queues, log Z, sampler offsets), optimizer, epoch, step, RNG states, history) and
``result.json`` when it ends; ``--resume`` skips finished phases and continues the others from
their checkpoint, replaying exactly the batches of an uninterrupted run (see ``data.py``).
"""

import json
import math
import os
import random
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import config as config_mod
from . import data as data_mod
from . import distill as distill_mod
from .models import build_model, canonical_name

# ----------------------------------------------------------------------------------------------
# process / device
# ----------------------------------------------------------------------------------------------


class Runtime:
    """Device, distributed rank/world and whether this process talks to the user."""

    def __init__(self, cfg):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
            dev = torch.device(want if ":" in want else f"cuda:{self.local_rank if self.world_size > 1 else 0}")
            torch.cuda.set_device(dev)
        else:
            dev = torch.device(want)
        self.device = dev
        self.owns_group = False
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
            self.owns_group = True
        self.distributed = self.world_size > 1
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def all_sum(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            if self.device.type == "cuda":
                t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu().tolist()

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def log(rt, *msg):
    if rt is None or rt.main:
        print(*msg, flush=True)


# ----------------------------------------------------------------------------------------------
# memory and time
# ----------------------------------------------------------------------------------------------
def _proc_status_kb(field):
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"{field}:\s+(\d+)\s+kB", fh.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of a phase: on CUDA ``torch.cuda.max_memory_allocated`` (after a reset); on CPU
    the peak resident set size minus the RSS at the start (Linux: the high-water mark is reset
    through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, which cannot be reset, so later
    phases may read 0)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            self.kind = "peak RSS delta"
            self.start_rss = _proc_status_kb("VmRSS")
            self.linux = self.start_rss is not None
            if self.linux:
                try:
                    with open("/proc/self/clear_refs", "w") as fh:
                        fh.write("5")
                except OSError:
                    self.linux = False
            if not self.linux:
                import resource

                self.start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def read(self):
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.linux:
            return max(0, (_proc_status_kb("VmHWM") or 0) - self.start_rss) * 1024
        import resource

        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.start_rss) * 1024

    def __exit__(self, *exc):
        self.peak = self.read()
        return False


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(epoch, base_lr, decay_epochs, rate):
    """RepDistiller's ``adjust_learning_rate`` (1-based epoch): ``base * rate ** #{d : epoch > d}``."""
    steps = sum(int(epoch > d) for d in (decay_epochs or []))
    return base_lr * (rate**steps)


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


@torch.no_grad()
def evaluate(model, dataset, rt, batch_size=512, cfg=None):
    """Top-1 test accuracy (%) and mean CE, over all ranks."""
    was = model.training
    model.eval()
    correct = total = loss = 0.0
    workers, pin = loader_options(cfg, rt)
    for x, y in data_mod.eval_batches(dataset, batch_size, rt.rank, rt.world_size, rt.device, workers, pin):
        logits = model(x)
        correct += float((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        total += y.numel()
    correct, total, loss = rt.all_sum([correct, total, loss])
    model.train(was)
    return 100.0 * correct / max(total, 1), loss / max(total, 1)


def loader_options(cfg, rt):
    """(num_workers, pin_memory) of the DataLoaders: ``--num-workers`` (dataset default) and
    ``--pin-memory`` (default: on for CUDA)."""
    if cfg is None:
        return 0, False
    pin = cfg.pin_memory if cfg.pin_memory is not None else rt.device.type == "cuda"
    return int(cfg.num_workers or 0), bool(pin)


def contrast_op(cfg, method):
    """The op that carries the method's contrast (for reporting which kernel ran)."""
    base = distill_mod.split_method(method)[0]
    return "dual_sampled_contrast" if distill_mod.uses_memory(cfg, base) else "dense_contrast"


def resolved_backend(backend, device, op="dual_sampled_contrast"):
    """What ``backend`` means on ``device`` for ``op`` (for the report)."""
    try:
        from .. import backends

        r = backends.resolve(backend, device, op)
        return r if backend != "auto" else f"auto->{r}"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"{backend} (unavailable: {exc})"


# ----------------------------------------------------------------------------------------------
# one phase
# ----------------------------------------------------------------------------------------------
class Phase:
    def __init__(self, name, title, arch, method, backend, epochs, lr, decay_epochs, teacher=None):
        self.name, self.title, self.arch, self.method, self.backend = name, title, arch, method, backend
        self.epochs, self.lr, self.decay_epochs, self.teacher = epochs, lr, decay_epochs, teacher


def _build(cfg, phase, dataset, rt):
    """Student (or teacher) + loss module, created right after seeding so that two phases with the
    same seed (fused vs eager) start from identical weights, banks and sampler streams."""
    seed_everything(cfg.seed)
    model = build_model(phase.arch, dataset.num_classes, dataset.in_channels)
    method = phase.method
    criterion = None
    teacher = phase.teacher
    if distill_mod.split_method(method)[0] not in ("ce", "kd"):
        with torch.no_grad():
            probe = dataset.probe(2)
            fs, _ = model.eval()(probe, is_feat=True)
            ft, _ = teacher.eval()(probe, is_feat=True)
        model.train()
        criterion = distill_mod.build_criterion(
            cfg,
            method,
            fs[-1].numel() // 2,
            ft[-1].numel() // 2,
            dataset.n_train,
            dataset.num_classes,
            phase.backend,
            model,
            teacher,
        )
    weights = distill_mod.default_weights(method, cfg.dataset)
    if phase.name in ("student", "student_eager"):
        weights = dict(gamma=cfg.gamma, alpha=cfg.alpha, beta=cfg.beta)
    module = distill_mod.Distiller(model, teacher, criterion, method, kd_T=cfg.kd_T, **weights)
    return module.to(rt.device)


def _ckpt_paths(phase_dir, rank):
    main = os.path.join(phase_dir, "checkpoint.pt")
    return main if rank == 0 else os.path.join(phase_dir, f"checkpoint.rank{rank}.pt")


def run_phase(cfg, phase, dataset, rt, out_dir, resume=False):
    """Train one phase to ``phase.epochs``; returns its result dict (and the trained module)."""
    phase_dir = os.path.join(out_dir, phase.name)
    os.makedirs(phase_dir, exist_ok=True)
    result_path = os.path.join(phase_dir, "result.json")
    module = _build(cfg, phase, dataset, rt)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=phase.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history, start_epoch, step, train_time = [], 0, 0, 0.0
    ckpt_path = _ckpt_paths(phase_dir, rt.rank)

    mid = None  # progress inside a partly trained epoch (a mid-epoch checkpoint)
    if resume and os.path.isfile(ckpt_path):
        ck = torch.load(ckpt_path, map_location=rt.device, weights_only=False)
        module.load_state_dict(ck["module"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, step, history, train_time = ck["epoch"], ck["step"], ck["history"], ck["train_time"]
        mid = ck.get("mid_epoch")
        if mid is None:
            set_rng_state(ck["rng"])
        if start_epoch >= phase.epochs and os.path.isfile(result_path):
            res = read_json(result_path)
            log(rt, f"[{phase.name}] finished earlier: test acc {res['test_acc']:.2f}% (loaded {result_path})")
            return res, module
        where = f", batch {mid['batches_done'] + 1}" if mid else ""
        log(rt, f"[{phase.name}] resuming at epoch {start_epoch + 1}/{phase.epochs}{where} from {ckpt_path}")

    base = distill_mod.split_method(phase.method)[0]
    workers, pin = loader_options(cfg, rt)
    loader = data_mod.TrainLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        augment=cfg.augment,
        seed=cfg.seed,
        rank=rt.rank,
        world_size=rt.world_size,
        nce_k=cfg.nce_k if distill_mod.uses_memory(cfg, base) and not _in_kernel_negatives(cfg) else 0,
        two_views=base in distill_mod.TWO_VIEWS,
        device=rt.device,
        num_workers=workers,
        pin_memory=pin,
    )

    net = module
    if rt.distributed:
        # The loss modules' memory (banks, queues, log Z, streams) is distributed-correct by itself
        # (memory_mode, see dcdkernels.memory) and not made of buffers: DDP never touches it.
        net = nn.parallel.DistributedDataParallel(
            module,
            device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            broadcast_buffers=False,  # BatchNorm statistics: per rank, broadcast from rank 0 at epoch ends
            find_unused_parameters=base in ("cocord", "pckd") or (module.criterion is not None and not module.beta),
        )

    steps_per_epoch = len(loader)
    total_steps = phase.epochs * steps_per_epoch
    bar = None
    if cfg.progress and rt.main and start_epoch < phase.epochs:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=start_epoch * steps_per_epoch,
            desc=f"{phase.title}",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
            leave=True,
            file=sys.stderr,
        )
    mem = PeakMemory(rt.device)
    wall0 = time.perf_counter()
    test_acc = history[-1]["test_acc"] if history else float("nan")
    with mem:
        for epoch in range(start_epoch + 1, phase.epochs + 1):
            lr = lr_at(epoch, phase.lr, phase.decay_epochs, cfg.lr_decay_rate)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loader.set_epoch(epoch)
            module.set_epoch(epoch, phase.epochs)
            module.train()
            sums = torch.zeros(3, dtype=torch.float64)  # loss*n, correct, n
            part_sums = {}
            t0 = time.perf_counter()
            seen, skip = 0, 0
            if mid is not None and mid["epoch"] == epoch:  # resume inside this epoch
                sums, part_sums, seen, skip = (
                    mid["sums"].clone(),
                    dict(mid["part_sums"]),
                    mid["seen"],
                    mid["batches_done"],
                )
                t0 -= mid["elapsed"]
            for i, batch in loader.batches(skip):  # from the first batch not trained before the checkpoint
                if mid is not None:
                    set_rng_state(ck["rng"])  # torch/numpy/python RNG exactly as at the checkpoint
                    mid = None
                loss, logits, parts = net(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                n = batch["y"].numel()
                seen += n
                with torch.no_grad():
                    sums += torch.tensor(
                        [float(loss.detach()) * n, float((logits.argmax(1) == batch["y"]).sum()), n],
                        dtype=torch.float64,
                    )
                    for k, v in parts.items():
                        part_sums[k] = part_sums.get(k, 0.0) + float(v.detach()) * n
                if cfg.save_every_steps and step % cfg.save_every_steps == 0 and i + 1 < steps_per_epoch:
                    _save_checkpoint(
                        cfg,
                        phase,
                        module,
                        optimizer,
                        epoch - 1,
                        step,
                        history,
                        train_time,
                        rt,
                        phase_dir,
                        mid_epoch=dict(
                            epoch=epoch,
                            batches_done=i + 1,
                            sums=sums.clone(),
                            part_sums=dict(part_sums),
                            seen=seen,
                            elapsed=time.perf_counter() - t0,
                        ),
                    )
                    rt.barrier()  # a checkpoint exists once every rank has written its file
                    _test_kill_hook(step)
                if bar is not None:
                    el = time.perf_counter() - t0
                    bar.update(1)
                    if i % 5 == 0 or i == steps_per_epoch - 1:
                        bar.set_postfix(
                            ep=f"{epoch}/{phase.epochs}",
                            loss=f"{sums[0] / sums[2]:.3f}",
                            acc=f"{100 * sums[1] / sums[2]:.1f}",
                            test=f"{test_acc:.1f}",
                            sps=f"{seen * rt.world_size / max(el, 1e-9):.0f}",
                            refresh=False,
                        )
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            if rt.distributed:
                broadcast_bn_buffers(module.student)
            tot = rt.all_sum(sums.tolist() + [part_sums[k] for k in sorted(part_sums)])
            loss_avg, train_acc = tot[0] / tot[2], 100.0 * tot[1] / tot[2]
            parts_avg = {k: v / tot[2] for k, v in zip(sorted(part_sums), tot[3:])}
            test_acc, test_loss = evaluate(module.student, dataset, rt, cfg=cfg)
            history.append(
                dict(
                    epoch=epoch,
                    lr=lr,
                    loss=loss_avg,
                    train_acc=train_acc,
                    test_acc=test_acc,
                    test_loss=test_loss,
                    parts=parts_avg,
                    epoch_time=epoch_time,
                    step=step,
                    samples=int(tot[2]),
                )
            )
            if bar is not None:
                bar.set_postfix(
                    ep=f"{epoch}/{phase.epochs}",
                    loss=f"{loss_avg:.3f}",
                    acc=f"{train_acc:.1f}",
                    test=f"{test_acc:.1f}",
                    sps=f"{tot[2] / max(epoch_time, 1e-9):.0f}",
                )
            if epoch % max(1, cfg.save_every) == 0 or epoch == phase.epochs:
                _save_checkpoint(cfg, phase, module, optimizer, epoch, step, history, train_time, rt, phase_dir)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - wall0
    samples = sum(h["samples"] for h in history)
    res = dict(
        phase=phase.name,
        title=phase.title,
        arch=canonical_name(phase.arch),
        method=phase.method,
        backend=phase.backend,
        backend_resolved=(
            resolved_backend(phase.backend, rt.device, contrast_op(cfg, phase.method))
            if module.criterion is not None
            else "-"
        ),
        epochs=phase.epochs,
        test_acc=history[-1]["test_acc"] if history else float("nan"),
        best_acc=max((h["test_acc"] for h in history), default=float("nan")),
        train_time_s=train_time,
        steps=step,
        steps_per_s=step / train_time if train_time > 0 else float("nan"),
        samples_per_s=samples / train_time if train_time > 0 else float("nan"),
        peak_memory_bytes=mem.peak,
        memory_kind=mem.kind,
        wall_s_this_process=wall,
        resumed_from_epoch=start_epoch,
        world_size=rt.world_size,
        history=history,
        weights=dict(gamma=module.gamma, alpha=module.alpha, beta=module.beta),
        params=sum(p.numel() for p in module.student.parameters()),
        n_train=len(dataset.train),
    )
    if rt.main:
        write_json(res, result_path)
    rt.barrier()
    return res, module


# ----------------------------------------------------------------------------------------------
# torch.distributed
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def broadcast_bn_buffers(model):
    """BatchNorm running statistics from rank 0 (once per epoch, before evaluation and saving)."""
    for buf in model.buffers():
        dist.broadcast(buf, 0)


def _in_kernel_negatives(cfg):
    """``--loss-arg negatives=uniform`` switches CRD to in-kernel uniform sampling (no
    contrast_idx); the default is RepDistiller's class-conditional negatives."""
    return str((cfg.loss_kwargs or {}).get("negatives", "")).lower() in ("uniform", "kernel", "in-kernel")


def _test_kill_hook(step):
    """Tests kill the process (SIGKILL, no cleanup) right after the mid-epoch checkpoint of step
    ``DCDKERNELS_TEST_KILL_AFTER_STEP``, to prove that a killed run resumes identically."""
    if os.environ.get("DCDKERNELS_TEST_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _save_checkpoint(cfg, phase, module, optimizer, epoch, step, history, train_time, rt, phase_dir, mid_epoch=None):
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
    atomic_save(state, _ckpt_paths(phase_dir, rt.rank))
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


# ----------------------------------------------------------------------------------------------
# teacher
# ----------------------------------------------------------------------------------------------
def _teacher_key(cfg):
    sub = f"_n{cfg.train_subset}" if cfg.train_subset else ""
    if cfg.dataset == "imagefolder":  # which folder, at which crop size
        sub += f"_{os.path.basename(os.path.abspath(cfg.data_dir or ''))}_i{cfg.image_size}"
    return (
        f"{cfg.dataset}{sub}_{canonical_name(cfg.teacher)}_e{cfg.teacher_epochs}_lr{cfg.teacher_lr}"
        f"_d{'-'.join(map(str, cfg.teacher_lr_decay_epochs or []))}_b{cfg.batch_size}"
        f"_aug{int(bool(cfg.augment))}_s{cfg.seed}_w{os.environ.get('WORLD_SIZE', '1')}.pt"
    )


def load_teacher_file(path, dataset, rt, arch=None):
    ck = torch.load(path, map_location="cpu", weights_only=False)
    state = ck.get("model", ck) if isinstance(ck, dict) else ck
    if isinstance(state, nn.Module):
        state = state.state_dict()
    arch = (ck.get("arch") if isinstance(ck, dict) else None) or arch
    model = build_model(arch, dataset.num_classes, dataset.in_channels)
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    model.load_state_dict(state)
    return model.to(rt.device).eval(), arch


def get_teacher(cfg, dataset, rt, out_dir, resume):
    """(teacher module, result dict): loaded from --teacher-ckpt, the run folder, the teacher cache,
    or trained now (and then cached in the run folder and the teacher cache)."""
    run_copy = os.path.join(out_dir, "teacher.pt")
    cache = os.path.join(cfg.teacher_cache, _teacher_key(cfg)) if cfg.teacher_cache else None
    source = None
    for path, why in ((cfg.teacher_ckpt, "--teacher-ckpt"), (run_copy, "run folder"), (cache, "teacher cache")):
        if path and os.path.isfile(path):
            source = (path, why)
            break
        if why == "--teacher-ckpt" and path:
            raise FileNotFoundError(f"--teacher-ckpt {path} does not exist")
    if source is not None:
        teacher, arch = load_teacher_file(source[0], dataset, rt, cfg.teacher)
        if canonical_name(arch) != canonical_name(cfg.teacher):
            log(rt, f"note: the checkpoint holds a {arch}, not {cfg.teacher}: using {arch}")
            cfg.teacher = arch
        acc, _ = evaluate(teacher, dataset, rt, cfg=cfg)
        log(rt, f"[teacher] {arch} loaded from {source[0]} ({source[1]}): test acc {acc:.2f}%")
        earlier = os.path.join(out_dir, "teacher", "result.json")
        if source[1] == "run folder" and os.path.isfile(earlier):  # trained by this run before a resume
            res = read_json(earlier)
            res["trained"] = True
            return teacher, res
        res = dict(
            phase="teacher",
            title=f"teacher {arch}",
            arch=arch,
            method="ce",
            backend="-",
            backend_resolved="-",
            test_acc=acc,
            best_acc=acc,
            source=source[0],
            epochs=0,
            train_time_s=None,
            steps_per_s=None,
            samples_per_s=None,
            peak_memory_bytes=None,
            history=[],
            trained=False,
            params=sum(p.numel() for p in teacher.parameters()),
        )
        if rt.main and source[1] != "run folder":
            atomic_save(
                {"model": teacher.state_dict(), "arch": arch, "accuracy": acc, "dataset": cfg.dataset}, run_copy
            )
        rt.barrier()
        return teacher, res
    phase = Phase(
        "teacher",
        f"teacher {cfg.teacher}",
        cfg.teacher,
        "ce",
        "eager",
        cfg.teacher_epochs,
        cfg.teacher_lr,
        cfg.teacher_lr_decay_epochs,
    )
    res, module = run_phase(cfg, phase, dataset, rt, out_dir, resume=resume)
    res["trained"] = True
    teacher = module.student.eval()
    if rt.main:
        blob = {
            "model": teacher.state_dict(),
            "arch": canonical_name(cfg.teacher),
            "accuracy": res["test_acc"],
            "dataset": cfg.dataset,
            "epochs": cfg.teacher_epochs,
        }
        atomic_save(blob, run_copy)
        if cache:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            atomic_save(blob, cache)
    rt.barrier()
    return teacher, res


# ----------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------
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


def train(cfg):
    """Run everything ``cfg`` asks for; returns the results dict (also saved as results.json)."""
    rt = Runtime(cfg)
    try:
        return _train(cfg, rt)
    finally:
        rt.close()


def _train(cfg, rt):
    t_start = time.perf_counter()
    resume = resolve_resume(cfg)
    out_dir = cfg.out_dir
    if rt.main:
        os.makedirs(out_dir, exist_ok=True)
        config_mod.dump(cfg, os.path.join(out_dir, "config.json"))
    rt.barrier()
    dataset = data_mod.load_dataset(cfg.dataset, cfg.data_dir, cfg.train_subset, cfg.test_subset, cfg.image_size)
    base, plus_kd = distill_mod.split_method(cfg.method)
    log(
        rt,
        f"dcdkernels-train: {cfg.dataset} ({len(dataset.train)} train / {len(dataset.test)} test, "
        f"{dataset.num_classes} classes), teacher {cfg.teacher}, student {cfg.student}, method {cfg.method} "
        f"(gamma {cfg.gamma:g}, alpha {cfg.alpha:g}, beta {cfg.beta:g}), backend {cfg.backend} "
        f"[{resolved_backend(cfg.backend, rt.device, contrast_op(cfg, cfg.method))}], "
        f"device {rt.device}, world {rt.world_size}, "
        f"torch threads {torch.get_num_threads()}, run folder {out_dir}",
    )
    results = dict(
        config=cfg.to_dict(),
        dataset=dict(
            name=dataset.name, n_train=len(dataset.train), n_test=len(dataset.test), num_classes=dataset.num_classes
        ),
        environment=_environment(rt),
        phases={},
    )
    teacher = None
    if base != "ce" or cfg.baseline:
        if base != "ce":
            teacher, results["phases"]["teacher"] = get_teacher(cfg, dataset, rt, out_dir, resume)
    if cfg.baseline and base != "ce":
        ph = Phase(
            "baseline",
            f"student {cfg.student} CE only",
            cfg.student,
            "ce",
            "eager",
            cfg.epochs,
            cfg.lr,
            cfg.lr_decay_epochs,
        )
        results["phases"]["baseline"], _ = run_phase(cfg, ph, dataset, rt, out_dir, resume)
    title = f"student {cfg.student} {cfg.method}"
    ph = Phase(
        "student",
        title + f" [{cfg.backend}]",
        cfg.student,
        cfg.method,
        cfg.backend,
        cfg.epochs,
        cfg.lr,
        cfg.lr_decay_epochs,
        teacher,
    )
    results["phases"]["student"], _ = run_phase(cfg, ph, dataset, rt, out_dir, resume)
    if cfg.compare_eager and base in ("ce", "kd"):
        log(rt, f"--compare-eager: method {cfg.method} has no contrastive loss module, nothing to compare")
    elif cfg.compare_eager:
        ph = Phase(
            "student_eager",
            title + " [eager]",
            cfg.student,
            cfg.method,
            "eager",
            cfg.epochs,
            cfg.lr,
            cfg.lr_decay_epochs,
            teacher,
        )
        results["phases"]["student_eager"], _ = run_phase(cfg, ph, dataset, rt, out_dir, resume)
    results["total_wall_s_this_process"] = time.perf_counter() - t_start
    if rt.main:
        write_json(results, os.path.join(out_dir, "results.json"))
        table = format_table(results)
        print(table, flush=True)
        with open(os.path.join(out_dir, "summary.txt"), "w") as fh:
            fh.write(table + "\n")
        png = plot_curves(results, os.path.join(out_dir, "curves.png"))
        if png:
            print(f"learning curves: {png}")
        print(f"results: {os.path.join(out_dir, 'results.json')}")
    rt.barrier()
    return results


def _environment(rt):
    env = dict(
        torch=torch.__version__,
        device=str(rt.device),
        threads=torch.get_num_threads(),
        world_size=rt.world_size,
        python=sys.version.split()[0],
    )
    try:
        from .. import backends

        env["backends"] = {k: dict(available=v[0], detail=v[1]) for k, v in backends.availability().items()}
    except Exception as exc:  # noqa: BLE001
        env["backends"] = str(exc)
    if rt.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(rt.device)
    return env


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _f(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(results):
    ph = results["phases"]
    rows = [
        ("model", "method", "backend", "test acc %", "best %", "epochs", "train s", "steps/s", "samples/s", "peak mem")
    ]
    for key in ("teacher", "baseline", "student", "student_eager"):
        r = ph.get(key)
        if not r:
            continue
        label = {
            "teacher": "teacher",
            "baseline": "student (no distill)",
            "student": "student",
            "student_eager": "student",
        }[key]
        method = "ce" if key in ("teacher", "baseline") else r["method"]
        if key == "teacher" and not r.get("trained", True):
            method = "loaded"
        rows.append(
            (
                f"{label} {r['arch']}",
                method,
                r.get("backend_resolved", "-"),
                _f(r["test_acc"], ".2f"),
                _f(r.get("best_acc"), ".2f"),
                str(r.get("epochs", "-")),
                _f(r.get("train_time_s"), ".1f"),
                _f(r.get("steps_per_s"), ".1f"),
                _f(r.get("samples_per_s"), ".0f"),
                fmt_bytes(r.get("peak_memory_bytes")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [line]
    for j, row in enumerate(rows):
        out.append("|".join(f" {c:<{w}} " if i < 3 else f" {c:>{w}} " for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append(line)
    out.append(line)
    cfg = results["config"]
    head = (
        f"{results['dataset']['name']}: {results['dataset']['n_train']} train / {results['dataset']['n_test']} test; "
        f"weights gamma(CE) {cfg['gamma']:g}, alpha(KD) {cfg['alpha']:g}, beta({cfg['method']}) {cfg['beta']:g}; "
        f"peak mem = {(ph.get('student') or {}).get('memory_kind', '')}"
    )
    out.insert(0, head)
    s, e = ph.get("student"), ph.get("student_eager")
    if s and e:
        sp = (s["steps_per_s"] / e["steps_per_s"]) if s.get("steps_per_s") and e.get("steps_per_s") else float("nan")
        mem_s, mem_e = s.get("peak_memory_bytes"), e.get("peak_memory_bytes")
        out.append(
            f"{s['backend_resolved']} vs eager: accuracy {s['test_acc']:.2f}% vs {e['test_acc']:.2f}% "
            f"(diff {s['test_acc'] - e['test_acc']:+.2f}), train time {s['train_time_s']:.1f}s vs "
            f"{e['train_time_s']:.1f}s (speed-up x{sp:.2f}), peak memory {fmt_bytes(mem_s)} vs {fmt_bytes(mem_e)}"
        )
        if "eager" in str(s.get("backend_resolved", "")):
            out.append("note: no fused kernel is available here, so both runs used the eager losses")
    return "\n".join(out)


def plot_curves(results, path):
    """Test accuracy and training loss per epoch of every trained phase (PNG, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - optional
        return None
    phases = [(k, r) for k, r in results["phases"].items() if r.get("history")]
    if not phases:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, r in phases:
        ep = [h["epoch"] for h in r["history"]]
        method = r["method"] if key.startswith("student") else "ce"
        label = f"{key}: {r['arch']} {method} ({r.get('backend_resolved', '-')})"
        style = dict(
            linestyle="--" if key == "student_eager" else "-",
            marker=("x" if key == "student_eager" else "o") if len(ep) <= 40 else None,
            markersize=4,
        )
        axes[0].plot(ep, [h["test_acc"] for h in r["history"]], label=label, **style)
        axes[1].plot(ep, [h["loss"] for h in r["history"]], label=label, **style)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="training loss (total)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{results['dataset']['name']} - {results['config']['method']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
