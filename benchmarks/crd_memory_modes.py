"""CRDLoss per-rank bank memory and step time at ImageNet size: memory_mode local (1 process),
replicated and sharded over 2 and 4 gloo ranks (CPU processes), and RepDistiller-style eager code
(1 process, ``benchmarks/baselines.py: RepDistillerCRD``).

    PYTHONPATH=. python benchmarks/crd_memory_modes.py [--steps 2] [--n 1281167] [--k 16384]

One step = forward (score both directions), backward, optimiser step, bank update; in-kernel
uniform negatives for CRDLoss, RepDistiller's AliasMethod draw for the eager code. Each process
runs single-threaded (this 2-core machine is shared; 4 ranks on 2 cores are oversubscribed,
so distributed step times measure correctness of the scaling, not speed). Per process:

* banks: ``bank_s.nbytes + bank_t.nbytes`` of this rank;
* transient: peak of torch's CPU allocator during one step above its start (torch.profiler
  memory events, as benchmarks/harness.py), i.e. what a step allocates beyond the state;
* peak RSS: ``VmHWM`` after a reset (``/proc/self/clear_refs``) just before the timed steps,
  minus the RSS at that point;
* step time: median wall time of the timed steps (after one warm-up step), slowest rank.

Writes ``benchmarks/results/<device>/crd_memory_modes.{json,md}``.
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

S_DIM, T_DIM, FEAT, B = 256, 512, 128, 256


def _kb(field):
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+)\s+kB", fh.read()).group(1))


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _measure(make, step_fn, steps):
    """(banks bytes, transient bytes, peak RSS delta bytes, median step s) of one process."""
    from benchmarks.harness import _cpu_peak_bytes

    module, banks = make()
    step_fn(module, 0)  # warm-up (first-call costs, sets Z)
    transient = _cpu_peak_bytes(lambda: step_fn(module, 1))
    _reset_hwm()
    rss0 = _kb("VmRSS")
    times = []
    for s in range(steps):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        step_fn(module, 2 + s)
        times.append(time.perf_counter() - t0)
    peak = (_kb("VmHWM") - rss0) * 1024
    return dict(
        banks_bytes=banks(module),
        transient_bytes=transient,
        peak_rss_delta_bytes=max(peak, 0),
        step_s=statistics.median(times),
        times=times,
    )


def _batch(step, rank, n, k):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return (
        torch.randn(B, S_DIM, generator=g),
        torch.randn(B, T_DIM, generator=g),
        torch.randint(0, n, (B,), generator=g),
    )


def _ours(mode, n, k):
    from dcdkernels import CRDLoss

    def make():
        torch.manual_seed(0)
        crd = CRDLoss(S_DIM, T_DIM, n, FEAT, k, memory_mode=mode)
        opt = torch.optim.SGD(crd.parameters(), lr=0.01)
        return (crd, opt), lambda m: m[0].memory.bank_s.nbytes + m[0].memory.bank_t.nbytes

    def step(m, s):
        crd, opt = m
        rank = dist.get_rank() if dist.is_initialized() else 0
        f_s, f_t, idx = _batch(s, rank, n, k)
        loss = crd(f_s, f_t, idx)
        opt.zero_grad()
        loss.backward()
        for p in crd.parameters():  # what DDP would do with the gradients
            if dist.is_initialized():
                dist.all_reduce(p.grad)
        opt.step()

    return make, step


def _eager(n, k):
    from benchmarks.baselines import RepDistillerCRD

    def make():
        torch.manual_seed(0)
        crd = RepDistillerCRD(S_DIM, T_DIM, n, FEAT, k)
        opt = torch.optim.SGD(crd.parameters(), lr=0.01)
        return (crd, opt), lambda m: m[0].contrast.memory_v1.nbytes + m[0].contrast.memory_v2.nbytes

    def step(m, s):
        crd, opt = m
        f_s, f_t, idx = _batch(s, 0, n, k)
        loss = crd(f_s, f_t, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return make, step


def _worker(rank, world, mode, n, k, steps, tmp):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{tmp}/store_{mode}_{world}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=1800),
        )
    try:
        make, step = _eager(n, k) if mode == "eager" else _ours(mode, n, k)
        res = _measure(make, step, steps)
        with open(os.path.join(tmp, f"{mode}_{world}_{rank}.json"), "w") as fh:
            json.dump(res, fh)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(mode, world, n, k, steps, tmp):
    ctx = mp.start_processes(
        _worker, args=(world, mode, n, k, steps, tmp), nprocs=world, start_method="spawn", join=True
    )
    del ctx
    return [json.load(open(os.path.join(tmp, f"{mode}_{world}_{r}.json"))) for r in range(world)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--k", type=int, default=16384)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--only", nargs="*", help="subset of: local replicated2 sharded2 replicated4 sharded4 eager")
    args = p.parse_args()
    import tempfile

    tmp = tempfile.mkdtemp()
    runs = [
        ("local", "local", 1),
        ("replicated2", "replicated", 2),
        ("sharded2", "sharded", 2),
        ("replicated4", "replicated", 4),
        ("sharded4", "sharded", 4),
        ("eager", "eager", 1),
    ]
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu-x86_64-2core")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "crd_memory_modes.json")
    results = json.load(open(path)).get("runs", {}) if os.path.isfile(path) else {}
    for name, mode, world in runs:
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        per_rank = run(mode, world, args.n, args.k, args.steps, tmp)
        results[name] = dict(mode=mode, world=world, per_rank=per_rank)
        print(f"{name}: {time.time() - t0:.0f} s; rank 0 {per_rank[0]}", flush=True)
    device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread per process"
    meta = dict(
        device=device,
        torch=torch.__version__,
        N=args.n,
        K=args.k,
        B_per_rank=B,
        D=FEAT,
        s_dim=S_DIM,
        t_dim=T_DIM,
        steps_timed=args.steps,
        date=datetime.datetime.utcnow().isoformat(timespec="seconds"),
    )
    json.dump(dict(meta=meta, runs=results), open(path, "w"), indent=1)
    write_markdown(meta, results, os.path.join(out_dir, "crd_memory_modes.md"))


def write_markdown(meta, results, path):
    mb = lambda b: f"{b / 1e6:,.1f} MB"
    lines = [
        "# CRDLoss memory modes at ImageNet size",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']} UTC. "
        f"N = {meta['N']:,}, K = {meta['K']:,}, B = {meta['B_per_rank']} per rank, D = {meta['D']} "
        f"(heads {meta['s_dim']} -> {meta['D']}, {meta['t_dim']} -> {meta['D']}); median of "
        f"{meta['steps_timed']} timed steps after one warm-up. Rerun: "
        "`PYTHONPATH=. python benchmarks/crd_memory_modes.py`.",
        "",
        "| run | processes | banks per rank | transient per step (max rank) "
        "| peak RSS above state (max rank) | step time (slowest rank) |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "local": "CRDLoss, memory_mode=local",
        "replicated2": "CRDLoss, replicated",
        "sharded2": "CRDLoss, sharded",
        "replicated4": "CRDLoss, replicated",
        "sharded4": "CRDLoss, sharded",
        "eager": "RepDistiller-style eager (baselines.RepDistillerCRD)",
    }
    for key in ("local", "replicated2", "sharded2", "replicated4", "sharded4", "eager"):
        if key not in results:
            continue
        r = results[key]
        pr = r["per_rank"]
        lines.append(
            f"| {names[key]} | {r['world']} | {mb(max(x['banks_bytes'] for x in pr))} | "
            f"{mb(max(x['transient_bytes'] for x in pr))} | {mb(max(x['peak_rss_delta_bytes'] for x in pr))} | "
            f"{max(x['step_s'] for x in pr):.2f} s |"
        )
    if "eager" in results and "local" in results:
        e, l_ = results["eager"]["per_rank"][0], results["local"]["per_rank"][0]
        lines += [
            "",
            f"Transient memory of a step, CRDLoss (local) / eager: "
            f"{l_['transient_bytes'] / max(e['transient_bytes'], 1):.4%}; step time ratio eager / CRDLoss "
            f"(local): {e['step_s'] / l_['step_s']:.2f}x (same process layout, one run).",
        ]
    lines += [
        "",
        "Banks per rank: the two fp32 banks (`bank_s` + `bank_t`); sharded over W ranks each rank holds "
        "ceil(N/W) rows of each. Distributed runs are W single-threaded processes on this 2-core machine "
        "(oversubscribed at W = 4): their step times include waiting for the other ranks and are not a "
        "speed claim.",
        "",
    ]
    open(path, "w").write("\n".join(lines))


if __name__ == "__main__":
    main()
