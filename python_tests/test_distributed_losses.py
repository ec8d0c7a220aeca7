"""CRDLoss, DCDLoss (memory form) and CoCoRDLoss with ``memory_mode="replicated"|"sharded"`` under
torch.distributed (gloo, 2 and 4 CPU processes, unequal per-rank batches): over 3 optimiser
steps the loss, every parameter gradient, the banks / queue (sharded: the gathered shards), log Z
and the stream position equal one process on the concatenated batch. Also: a bad input on one
rank raises on every rank with no state changed anywhere, within a deadline.

Forked processes, one launch per world size (as test_distributed.py). Each rank backpropagates
``loss_r * B_r / B`` and the parameter gradients are summed over ranks, which is the gradient of
the global batch mean (what DDP computes for equal batches).
"""

import datetime
import math
import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcdkernels import CoCoRDLoss, CRDLoss, DCDLoss
from dcdkernels.memory import comm

pytestmark = pytest.mark.distributed

N, S_DIM, T_DIM, FEAT, K = 37, 10, 12, 8, 6
STEPS = 3
TOL = dict(atol=1e-6, rtol=1e-6)
# The consistency KL's gradients carry about 1e-6 of fp32 rounding both in the fused kernel and in
# the sharded merge (each against fp64, see test_memory.py): the two agree to 2e-6.
TOL_KL = dict(atol=2e-6, rtol=1e-6)
CASES = [(loss, mode) for loss in ("crd", "dcd", "cocord") for mode in ("replicated", "sharded")]


def batch_sizes(world_size):
    return [3 + (r % 2) for r in range(world_size)]  # unequal per rank


def build(kind, mode):
    torch.manual_seed(0)  # the heads: identical on every rank and in the reference
    if kind == "crd":
        return CRDLoss(S_DIM, T_DIM, N, FEAT, nce_k=K, z_momentum=0.5, memory_mode=mode, bank_init="uniform", seed=5)
    if kind == "dcd":
        return DCDLoss(S_DIM, T_DIM, FEAT, n_data=N, nce_k=K, memory_mode=mode, bank_init="uniform", seed=5)
    cc = CoCoRDLoss(
        S_DIM,
        T_DIM,
        embed_dim=FEAT,
        hidden_dim=16,
        pred_dim=8,
        queue_size=32,
        memory_mode=mode,
        queue_init="normal",
        queue_seed=3,
    )
    return cc


def train_mode(module):
    module.train()
    for m in module.modules():  # BatchNorm statistics are per rank (SyncBatchNorm on GPUs): use running stats
        if isinstance(m, torch.nn.BatchNorm1d):
            m.eval()
    return module


def global_batch(step, total):
    g = torch.Generator().manual_seed(100 + step)
    f_s, f_s2, f_slow, f_slow2 = (torch.randn(total, S_DIM, generator=g) for _ in range(4))
    f_t = torch.randn(total, T_DIM, generator=g)
    idx = torch.randperm(N, generator=g)[:total]
    idx[-1] = idx[0]  # a duplicate across ranks: the last occurrence (last rank) wins the update
    return dict(f_s=f_s, f_t=f_t, f_s2=f_s2, f_slow=f_slow, f_slow2=f_slow2, idx=idx)


def call(kind, module, b):
    if kind == "cocord":
        return module(b["f_s"], b["f_t"], b["f_s2"], b["f_slow"], b["f_slow2"])
    return module(b["f_s"], b["f_t"], b["idx"])


def state(kind, module, gather=None):
    """The memory state to compare (sharded banks gathered in rank order)."""
    if kind == "cocord":
        return dict(queue=module.queue.clone(), ptr=int(module.queue_ptr))
    mem = module.memory
    out = dict(log_z=mem.log_z.clone(), offset=mem.rng_state()[1])
    for name in ("bank_s", "bank_t"):
        t = getattr(mem, name)
        out[name] = gather(t) if gather is not None and mem.mode == "sharded" else t.clone()
    return out


def run(kind, module, sizes, rank):
    """3 steps; rank=None: the concatenated batch in one process."""
    total = sum(sizes)
    lo, hi = (0, total) if rank is None else (sum(sizes[:rank]), sum(sizes[: rank + 1]))
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    gather = None
    if rank is not None:

        def gather(t):
            n = comm.all_gather_rows(torch.tensor([[t.shape[0]]]), [1] * len(sizes), None)[:, 0].tolist()
            return comm.all_gather_rows(t, n, None)

    out = []
    for step in range(STEPS):
        b = {k: v[lo:hi] for k, v in global_batch(step, total).items()}
        loss = call(kind, module, b) * ((hi - lo) / total)
        opt.zero_grad()
        loss.backward()
        grads = {}
        for name, p in module.named_parameters():
            if p.requires_grad:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if rank is not None:
                    g = g.clone()
                    dist.all_reduce(g)
                    p.grad = g
                grads[name] = g.clone()
        loss = loss.detach().clone()
        if rank is not None:
            dist.all_reduce(loss)
        opt.step()
        out.append(dict(loss=loss, grads=grads, state=state(kind, module, gather)))
    return out


# ------------------------------------------------------------------------------------- worker side
def _scenarios(rank, world_size):
    sizes = batch_sizes(world_size)
    res = {}
    for kind, mode in CASES:
        module = train_mode(build(kind, mode))
        res[(kind, mode)] = run(kind, module, sizes, rank)
    # A bad input on the last rank: every rank raises, nothing changes anywhere (first batch: Z unset).
    for kind, mode in (("crd", "sharded"), ("crd", "replicated"), ("cocord", "replicated")):
        module = train_mode(build(kind, mode))
        before = {k: v.clone() for k, v in module.state_dict().items()}
        b = {k: v[: sizes[rank]].clone() for k, v in global_batch(0, sum(sizes)).items()}
        if rank == world_size - 1:
            if kind == "cocord":
                b["f_t"][0, 0] = float("nan")
            else:
                b["idx"][0] = N
        try:
            call(kind, module, b)
            err = None
        except (ValueError, RuntimeError) as exc:
            err = f"{type(exc).__name__}: {exc}"
        after = module.state_dict()
        unchanged = all(torch.equal(torch.nan_to_num(before[k]), torch.nan_to_num(after[k])) for k in before)
        res[("invalid", kind, mode)] = dict(err=err, unchanged=unchanged)
    return res


def _entry(rank, world_size, tmpdir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmpdir}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(_scenarios(rank, world_size), os.path.join(tmpdir, f"result{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(world_size, tmpdir, deadline_s=150):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_entry, args=(world_size, str(tmpdir)), nprocs=world_size, join=False, start_method=method)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world_size}-rank run did not finish within {deadline_s} s (a hang?)")
    return [torch.load(os.path.join(tmpdir, f"result{r}.pt"), weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def world(request, tmp_path_factory):
    W = request.param
    for kind in ("crd", "dcd", "cocord"):  # pay the first-call costs (dynamo import) once, before forking
        run(kind, train_mode(build(kind, "local")), [2], None)
    t0 = time.monotonic()
    results = launch(W, tmp_path_factory.mktemp(f"distloss{W}"))
    print(f"\n{W}-rank loss run: {time.monotonic() - t0:.1f} s")
    return W, results


# ------------------------------------------------------------------------------------- parent side
def reference(kind, world_size):
    module = train_mode(build(kind, "local"))
    return run(kind, module, batch_sizes(world_size), None)


@pytest.mark.parametrize("kind,mode", CASES)
def test_loss_matches_one_process(world, kind, mode):
    W, results = world
    ref = reference(kind, W)
    for rank, r in enumerate(results):
        for step, (got, want) in enumerate(zip(r[(kind, mode)], ref)):
            where = f"{kind}/{mode}, rank {rank}, step {step}"
            torch.testing.assert_close(got["loss"], want["loss"], **TOL, msg=where)
            assert got["grads"].keys() == want["grads"].keys()
            for name, g in want["grads"].items():
                tol = TOL_KL if kind == "dcd" else TOL
                torch.testing.assert_close(got["grads"][name], g, **tol, msg=f"{where}: grad of {name}")
            if kind == "dcd":  # the bias cancels in both softmaxes: exactly 0 on every path
                assert torch.equal(got["grads"]["bias"], torch.zeros(()))
            gs, ws = got["state"], want["state"]
            for key, t in ws.items():
                if isinstance(t, torch.Tensor):
                    torch.testing.assert_close(gs[key], t, **TOL, equal_nan=True, msg=f"{where}: {key}")
                else:
                    assert gs[key] == t, f"{where}: {key}"
        if kind != "cocord":  # Z set from the global first batch; the stream of the concatenated batch
            assert math.isfinite(float(r[(kind, mode)][0]["state"]["log_z"].sum())) == (kind == "crd")
            assert r[(kind, mode)][-1]["state"]["offset"] == STEPS * sum(batch_sizes(W)) * K


@pytest.mark.parametrize("kind,mode", [("crd", "sharded"), ("crd", "replicated"), ("cocord", "replicated")])
def test_bad_input_on_one_rank_raises_everywhere_and_changes_nothing(world, kind, mode):
    W, results = world
    for rank, r in enumerate(results):
        got = r[("invalid", kind, mode)]
        assert got["unchanged"], f"rank {rank}: state changed"
        assert got["err"] is not None, f"rank {rank} did not raise"
        if rank == W - 1:
            assert got["err"].startswith("ValueError") and ("out of range" in got["err"] or "non-finite" in got["err"])
        else:
            assert got["err"].startswith("RuntimeError") and f"rank(s) [{W - 1}]" in got["err"]
