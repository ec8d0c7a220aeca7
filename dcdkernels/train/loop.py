"""One training phase: the model and loss module, the loader, DDP, the epochs and their steps,
evaluation, and the phase's result dict."""

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import distill as distill_mod
from .checkpoint import (
    EpochProgress,
    PhaseState,
    checkpoint_path,
    kill_hook_for_tests,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
)
from .models import build_model, canonical_name
from .runtime import PeakMemory, broadcast_bn_buffers, log, resolved_backend, seed_everything


class Phase:
    def __init__(self, name, title, arch, method, backend, epochs, lr, decay_epochs, teacher=None):
        self.name, self.title, self.arch, self.method, self.backend = name, title, arch, method, backend
        self.epochs, self.lr, self.decay_epochs, self.teacher = epochs, lr, decay_epochs, teacher


def lr_at(epoch, base_lr, decay_epochs, rate):
    """RepDistiller's ``adjust_learning_rate`` (1-based epoch): ``base * rate ** #{d : epoch > d}``."""
    steps = sum(int(epoch > d) for d in (decay_epochs or []))
    return base_lr * (rate**steps)


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


def _in_kernel_negatives(cfg):
    """``--loss-arg negatives=uniform`` switches CRD to in-kernel uniform sampling (no
    contrast_idx); the default is RepDistiller's class-conditional negatives."""
    return str((cfg.loss_kwargs or {}).get("negatives", "")).lower() in ("uniform", "kernel", "in-kernel")


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


def run_phase(cfg, phase, dataset, rt, out_dir, resume=False):
    """Train one phase to ``phase.epochs``; returns its result dict (and the trained module)."""
    phase_dir = os.path.join(out_dir, phase.name)
    os.makedirs(phase_dir, exist_ok=True)
    result_path = os.path.join(phase_dir, "result.json")
    module = _build(cfg, phase, dataset, rt)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=phase.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    st = PhaseState()
    ck = load_checkpoint(phase_dir, rt, module, optimizer) if resume else None
    if ck is not None:
        st.resume(ck)
        if st.start_epoch >= phase.epochs and os.path.isfile(result_path):
            res = read_json(result_path)
            log(rt, f"[{phase.name}] finished earlier: test acc {res['test_acc']:.2f}% (loaded {result_path})")
            return res, module
        where = f", batch {st.mid['batches_done'] + 1}" if st.mid else ""
        log(
            rt,
            f"[{phase.name}] resuming at epoch {st.start_epoch + 1}/{phase.epochs}{where} "
            f"from {checkpoint_path(phase_dir, rt.rank)}",
        )

    loader = _train_loader(cfg, phase, dataset, rt)
    net = _wrap_ddp(module, phase, rt)
    bar = _progress_bar(cfg, phase, rt, st, len(loader))
    mem = PeakMemory(rt.device)
    wall0 = time.perf_counter()
    test_acc = st.history[-1]["test_acc"] if st.history else float("nan")
    with mem:
        for epoch in range(st.start_epoch + 1, phase.epochs + 1):
            test_acc = _run_epoch(
                cfg, phase, epoch, dataset, net, module, optimizer, loader, rt, st, phase_dir, bar, test_acc
            )
    if bar is not None:
        bar.close()
    res = _phase_result(cfg, phase, module, dataset, rt, st, mem, time.perf_counter() - wall0)
    if rt.main:
        write_json(res, result_path)
    rt.barrier()
    return res, module


def _train_loader(cfg, phase, dataset, rt):
    base = distill_mod.split_method(phase.method)[0]
    workers, pin = loader_options(cfg, rt)
    return data_mod.TrainLoader(
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


def _wrap_ddp(module, phase, rt):
    """``module`` itself, or in a distributed run wrapped in DistributedDataParallel."""
    if not rt.distributed:
        return module
    base = distill_mod.split_method(phase.method)[0]
    # The loss modules' memory (banks, queues, log Z, streams) is distributed-correct by itself
    # (memory_mode, see dcdkernels.memory) and not made of buffers: DDP never touches it.
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
        broadcast_buffers=False,  # BatchNorm statistics: per rank, broadcast from rank 0 at epoch ends
        find_unused_parameters=base in ("cocord", "pckd") or (module.criterion is not None and not module.beta),
    )


def _progress_bar(cfg, phase, rt, st, steps_per_epoch):
    """A tqdm bar over all steps of the phase (rank 0, ``--progress``), or None."""
    if not (cfg.progress and rt.main and st.start_epoch < phase.epochs):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=phase.epochs * steps_per_epoch,
        initial=st.start_epoch * steps_per_epoch,
        desc=f"{phase.title}",
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
        leave=True,
        file=sys.stderr,
    )


def _run_epoch(cfg, phase, epoch, dataset, net, module, optimizer, loader, rt, st, phase_dir, bar, test_acc):
    """Train epoch ``epoch`` (from a mid-epoch checkpoint's batch when resuming inside it), evaluate,
    append to ``st.history``, checkpoint every ``--save-every`` epochs; returns the test accuracy."""
    lr = lr_at(epoch, phase.lr, phase.decay_epochs, cfg.lr_decay_rate)
    for g in optimizer.param_groups:
        g["lr"] = lr
    loader.set_epoch(epoch)
    module.set_epoch(epoch, phase.epochs)
    module.train()
    prog = EpochProgress(epoch, st.mid)
    steps_per_epoch = len(loader)
    for i, batch in loader.batches(prog.skip):  # from the first batch not trained before the checkpoint
        st.first_batch()
        loss, logits, parts = net(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        st.step += 1
        prog.add(loss, logits, batch["y"], parts)
        if cfg.save_every_steps and st.step % cfg.save_every_steps == 0 and i + 1 < steps_per_epoch:
            save_checkpoint(
                cfg,
                phase,
                module,
                optimizer,
                epoch - 1,
                st.step,
                st.history,
                st.train_time,
                rt,
                phase_dir,
                mid_epoch=prog.mid_epoch(epoch, i + 1),
            )
            rt.barrier()  # a checkpoint exists once every rank has written its file
            kill_hook_for_tests(st.step)
        if bar is not None:
            bar.update(1)
            if i % 5 == 0 or i == steps_per_epoch - 1:
                n = prog.sums[2]
                sps = prog.seen * rt.world_size / max(prog.elapsed(), 1e-9)
                _postfix(bar, epoch, phase, prog.sums[0] / n, 100 * prog.sums[1] / n, test_acc, sps, refresh=False)
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    epoch_time = prog.elapsed()
    st.train_time += epoch_time
    if rt.distributed:
        broadcast_bn_buffers(module.student)
    record = _epoch_record(cfg, module, dataset, rt, prog, epoch, lr, epoch_time, st.step)
    st.history.append(record)
    if bar is not None:
        sps = record["samples"] / max(epoch_time, 1e-9)
        _postfix(bar, epoch, phase, record["loss"], record["train_acc"], record["test_acc"], sps)
    if epoch % max(1, cfg.save_every) == 0 or epoch == phase.epochs:
        save_checkpoint(cfg, phase, module, optimizer, epoch, st.step, st.history, st.train_time, rt, phase_dir)
    return record["test_acc"]


def _postfix(bar, epoch, phase, loss, acc, test_acc, sps, refresh=True):
    bar.set_postfix(
        ep=f"{epoch}/{phase.epochs}",
        loss=f"{loss:.3f}",
        acc=f"{acc:.1f}",
        test=f"{test_acc:.1f}",
        sps=f"{sps:.0f}",
        refresh=refresh,
    )


def _epoch_record(cfg, module, dataset, rt, prog, epoch, lr, epoch_time, step):
    """The history entry of an epoch: its sums over all ranks, and the test accuracy and loss."""
    part_keys = sorted(prog.part_sums)
    tot = rt.all_sum(prog.sums.tolist() + [prog.part_sums[k] for k in part_keys])
    test_acc, test_loss = evaluate(module.student, dataset, rt, cfg=cfg)
    return dict(
        epoch=epoch,
        lr=lr,
        loss=tot[0] / tot[2],
        train_acc=100.0 * tot[1] / tot[2],
        test_acc=test_acc,
        test_loss=test_loss,
        parts={k: v / tot[2] for k, v in zip(part_keys, tot[3:])},
        epoch_time=epoch_time,
        step=step,
        samples=int(tot[2]),
    )


def _phase_result(cfg, phase, module, dataset, rt, st, mem, wall):
    """The result dict of a finished phase (``result.json``)."""
    history, step, train_time = st.history, st.step, st.train_time
    samples = sum(h["samples"] for h in history)
    return dict(
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
        resumed_from_epoch=st.start_epoch,
        world_size=rt.world_size,
        history=history,
        weights=dict(gamma=module.gamma, alpha=module.alpha, beta=module.beta),
        params=sum(p.numel() for p in module.student.parameters()),
        n_train=len(dataset.train),
    )
