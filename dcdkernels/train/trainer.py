"""The whole run: the teacher (loaded or trained), the baseline, student and eager phases, and the
report. The pieces live one concern a module: ``runtime`` (process group, device, rank), ``loop``
(one phase: epochs, steps, evaluation), ``checkpoint`` (save/load/resume, the mid-epoch state,
teacher files) and ``report`` (table, JSON, plots); their public names are re-exported here.

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

import os
import time

import torch

from . import config as config_mod
from . import data as data_mod
from . import distill as distill_mod
from .checkpoint import (
    atomic_save,
    load_teacher_file,
    read_json,
    resolve_resume,
    rng_state,
    set_rng_state,
    teacher_key,
    write_json,
)
from .loop import Phase, contrast_op, evaluate, loader_options, lr_at, run_phase
from .models import canonical_name
from .report import fmt_bytes, format_table, plot_curves, write_report
from .runtime import PeakMemory, Runtime, broadcast_bn_buffers, environment, log, resolved_backend, seed_everything

__all__ = [
    "PeakMemory",
    "Phase",
    "Runtime",
    "atomic_save",
    "broadcast_bn_buffers",
    "contrast_op",
    "evaluate",
    "fmt_bytes",
    "format_table",
    "get_teacher",
    "load_teacher_file",
    "loader_options",
    "log",
    "lr_at",
    "plot_curves",
    "read_json",
    "resolve_resume",
    "resolved_backend",
    "rng_state",
    "run_phase",
    "seed_everything",
    "set_rng_state",
    "train",
    "write_json",
]


def get_teacher(cfg, dataset, rt, out_dir, resume):
    """(teacher module, result dict): loaded from --teacher-ckpt, the run folder, the teacher cache,
    or trained now (and then cached in the run folder and the teacher cache)."""
    run_copy = os.path.join(out_dir, "teacher.pt")
    cache = os.path.join(cfg.teacher_cache, teacher_key(cfg)) if cfg.teacher_cache else None
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
        environment=environment(rt),
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
        write_report(results, out_dir)
    rt.barrier()
    return results
