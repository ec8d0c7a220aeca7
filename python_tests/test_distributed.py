"""Replicated and sharded MemoryBank under torch.distributed (docs/math.md §5): gloo, 2 and 4 processes
on one CPU machine.

Each world size is launched once (module fixture): every rank runs all scenarios and saves its
results; the tests compare them with one process that sees the concatenated batch. Processes are
forked (torch is already imported: about 0.3 s instead of about 4 s per rank with spawn) and run
single-threaded; a deadline turns a hang into a failure.
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

import dcdkernels
from dcdkernels.memory import MemoryBank, MomentumQueue, ddp_wrap, memory_buffer_names, shard_bounds

pytestmark = pytest.mark.distributed

N, D, K, DIM_IN = 37, 8, 6, 10  # N divisible by neither 2 nor 4: uneven shards
STEPS = 3
IMAGENET = (1_281_167, 128)
# Replicated scoring calls the fused ops: the backends that run on CPU tensors here, except the
# Triton interpreter (about 5 ms per program, times 4 ranks on a shared CPU; test_memory.py runs
# MemoryBank on it, and nothing distributed depends on the backend).
BACKENDS = [b for b, (ok, _) in dcdkernels.availability().items() if ok and b in ("eager", "cpu")]

# name: (mode, loss, z_mode, sampled negatives, learnable bias)
VARIANTS = {
    "rep_infonce_sampled": ("replicated", "infonce", "frozen", True, True),
    "rep_nce_ema_explicit": ("replicated", "nce", "ema", False, False),
    "shard_infonce_sampled": ("sharded", "infonce", "frozen", True, True),
    "shard_infonce_explicit": ("sharded", "infonce", "frozen", False, False),
    "shard_nce_ema_sampled": ("sharded", "nce", "ema", True, True),
    "shard_nce_frozen_explicit": ("sharded", "nce", "frozen", False, False),
}


def batch_sizes(world_size):
    return [3 + (r % 2) for r in range(world_size)]  # unequal per rank


def global_batch(step, total):
    """Anchors (B, D), positives (B,), explicit index (B, K+1) of one step, the same on every rank."""
    g = torch.Generator().manual_seed(100 + step)
    z = torch.nn.functional.normalize(torch.randn(total, D, generator=g), dim=1)
    pos = torch.randint(0, N, (total,), generator=g)
    pos[-1] = pos[0]  # a duplicate across ranks: the last occurrence (last rank) wins the update
    idx = torch.cat([pos[:, None], torch.randint(0, N, (total, K), generator=g)], 1)
    return z, pos, idx


def run_steps(bank, variant, sizes, rank, first, steps):
    """Score, backward, update for ``steps`` steps; ``rank=None``: the whole concatenated batch."""
    _, loss, _, sampled, with_bias = VARIANTS[variant]
    lo, hi = (0, sum(sizes)) if rank is None else (sum(sizes[:rank]), sum(sizes[: rank + 1]))
    theta = torch.tensor(1.0 if loss == "infonce" else math.log(1 / 0.07), requires_grad=True)
    beta = torch.tensor(0.1, requires_grad=True) if with_bias else None
    out = []
    for step in range(first, first + steps):
        z, pos, idx = global_batch(step, sum(sizes))
        z = z[lo:hi].clone().requires_grad_()
        pos, idx = pos[lo:hi], idx[lo:hi]
        kw = dict(logit_scale=theta.exp(), bias=beta, loss=loss)
        per_row = bank.score(z, pos, num_negatives=K, **kw) if sampled else bank.score(z, idx, **kw)
        theta.grad = None
        if beta is not None:
            beta.grad = None
        per_row.sum().backward()
        bank.update_(pos, z.detach(), 0.5)
        out.append(
            dict(
                loss=per_row.detach(),
                grad_z=z.grad,
                grad_theta=theta.grad.clone(),
                grad_beta=None if beta is None else beta.grad.clone(),
                log_z=bank.log_z.clone(),
                offset=bank.rng_state()[1],
            )
        )
    return out


def make_bank(variant, backend="auto", init_seed=3, **kw):
    mode, _, z_mode, _, _ = VARIANTS[variant]
    return MemoryBank(
        N,
        D,
        mode=mode,
        z_mode=z_mode,
        init="normal",
        init_seed=init_seed,
        seed=11,
        backend=backend,
        shard_chunk=5 * (K + 1),
        **kw,
    )


class Model(torch.nn.Module):
    """CRD-style: a head, a learnable scale, a memory updated inside forward."""

    def __init__(self, mode, n_rows):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(DIM_IN, D)
        self.theta = torch.nn.Parameter(torch.tensor(1.0))
        self.memory = MemoryBank(n_rows, D, mode=mode, init="uniform", init_seed=5, seed=7, backend="eager")

    def forward(self, x, pos):
        z = torch.nn.functional.normalize(self.head(x), dim=1)
        loss = self.memory.score(z, pos, num_negatives=K, logit_scale=self.theta.exp()).mean()
        self.memory.update_(pos, z.detach(), 0.5)
        return loss


def ddp_batch(step, total, n_rows):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(total, DIM_IN, generator=g), torch.randint(0, n_rows, (total,), generator=g)


# ------------------------------------------------------------------------------------- worker side
def _scenarios(rank, world_size, tmpdir):
    sizes = batch_sizes(world_size)
    res = {}
    t0 = time.monotonic()
    # 1. every variant (replicated ones on every backend), several steps
    for variant, (mode, *_rest) in VARIANTS.items():
        for backend in BACKENDS if mode == "replicated" else ["auto"]:
            bank = make_bank(variant, backend)
            try:
                steps = run_steps(bank, variant, sizes, rank, 0, STEPS)
            except NotImplementedError as exc:  # recorded on the rank, and a failure in the test
                res[(variant, backend)] = f"{type(exc).__name__}: {exc}"
                continue
            res[(variant, backend)] = dict(steps=steps, bank=bank.bank.clone(), rows=(bank.row_start, bank.row_end))

    res["time_variants"] = time.monotonic() - t0
    # 2. checkpoint: 3 steps, save per rank, a new module loads, 3 more == 6 straight steps
    for variant in ("rep_infonce_sampled", "shard_nce_ema_sampled"):
        straight = make_bank(variant)
        s6 = run_steps(straight, variant, sizes, rank, 0, 2 * STEPS)
        first = make_bank(variant)
        run_steps(first, variant, sizes, rank, 0, STEPS)
        path = os.path.join(tmpdir, f"ckpt_{variant}_rank{rank}.pt")
        torch.save(first.state_dict(), path)
        resumed = make_bank(variant, init_seed=999)  # different init: everything must come from the file
        resumed.load_state_dict(torch.load(path))
        s3 = run_steps(resumed, variant, sizes, rank, STEPS, STEPS)
        res[("ckpt", variant)] = dict(
            straight=s6[STEPS:],
            resumed=s3,
            bank_straight=straight.bank.clone(),
            bank_resumed=resumed.bank.clone(),
            state_straight=straight.state_dict(),
            state_resumed=resumed.state_dict(),
        )
    # a shard checkpoint from another world size is refused
    bank = make_bank("shard_infonce_sampled")
    other = 4 if world_size == 2 else 2
    a, e = shard_bounds(N, other, min(rank, other - 1))
    foreign = dict(
        bank.state_dict(), bank=torch.zeros(e - a, D), shard_layout=torch.tensor([N, other, min(rank, other - 1)])
    )
    try:
        bank.load_state_dict(foreign)
        res["foreign_ckpt"] = None
    except RuntimeError as exc:
        res["foreign_ckpt"] = str(exc)

    res["time_ckpt"] = time.monotonic() - t0
    # 3. DDP: a plain DistributedDataParallel (or ddp_wrap) never broadcasts a shard (or a
    #    replicated bank): the memory's state tensors are not buffers
    for mode in ("sharded", "replicated"):
        model = Model(mode, N)
        before = model.memory.bank.clone()
        wrap = torch.nn.parallel.DistributedDataParallel if mode == "sharded" else ddp_wrap
        ddp = wrap(model)  # broadcast_buffers left at its default (True)
        kept = torch.equal(model.memory.bank, before)
        synced = sorted(ddp.named_module_buffers)
        grads = []
        for step in range(2):
            x, pos = ddp_batch(step, 4 * world_size, N)
            ddp.zero_grad()
            loss = ddp(x[4 * rank : 4 * rank + 4], pos[4 * rank : 4 * rank + 4])
            loss.backward()
            grads.append(dict(loss=loss.detach(), head=model.head.weight.grad.clone(), theta=model.theta.grad.clone()))
        res[("ddp", mode)] = dict(
            kept=kept,
            synced=synced,
            ignored=memory_buffer_names(model),
            grads=grads,
            bank=model.memory.bank.clone(),
            rows=(model.memory.row_start, model.memory.row_end),
        )
    # plain DDP on a sharded bank with equal shard shapes (where a buffer broadcast would go unnoticed)
    n_even = 10 * world_size
    model = Model("sharded", n_even)
    before = model.memory.bank.clone()
    torch.nn.parallel.DistributedDataParallel(model)
    res["plain_ddp_overwrote_shard"] = not torch.equal(model.memory.bank, before)

    # 4. a replicated queue enqueues every rank's keys in rank order; too large a gathered batch is
    #    refused on every rank
    queue = MomentumQueue(16, D, mode="replicated", init_seed=2)
    for step in range(3):
        keys = torch.nn.functional.normalize(
            torch.randn(sum(sizes), D, generator=torch.Generator().manual_seed(step)), dim=1
        )
        queue.enqueue_(keys[sum(sizes[:rank]) : sum(sizes[: rank + 1])])
    try:
        queue.enqueue_(torch.zeros(16 // world_size + 1, D))
        res["queue_too_large"] = None
    except ValueError as exc:
        res["queue_too_large"] = str(exc)
    res["queue"] = (queue.queue.clone(), queue.pointer)

    # sample_negatives: rank r gets its rows of the concatenated batch's stream
    bank = make_bank("shard_infonce_sampled")
    _, pos, _ = global_batch(0, sum(sizes))
    res["sampled_idx"] = [bank.sample_negatives(pos[sum(sizes[:rank]) : sum(sizes[: rank + 1])], K) for _ in range(2)]
    res["sampled_offset"] = bank.rng_state()[1]

    # 5. invalid input on one rank: every rank raises (no rank is left waiting in a collective)
    #    and no row changes
    for variant in ("rep_infonce_sampled", "shard_infonce_sampled"):
        bank = make_bank(variant)
        before = bank.bank.clone()
        bad = torch.tensor([0, N if rank == world_size - 1 else 1])
        try:
            bank.update_(bad, torch.nn.functional.normalize(torch.ones(2, D), dim=1), 0.5)
            err = None
        except (ValueError, RuntimeError) as exc:
            err = f"{type(exc).__name__}: {exc}"
        try:
            bank.score(torch.ones(2, D), bad, num_negatives=K, logit_scale=2.0)
            err_score = None
        except (ValueError, RuntimeError) as exc:
            err_score = f"{type(exc).__name__}: {exc}"
        res[("invalid", variant)] = dict(
            update=err, score=err_score, unchanged=torch.equal(bank.bank, before), offset=bank.rng_state()[1]
        )
    res["time_ddp"] = time.monotonic() - t0
    # 6. ImageNet-scale layout: 1,281,167 x 128 split over the ranks, a 1/W share each
    if world_size == 4:
        for dtype in (torch.float32, torch.bfloat16):
            big = MemoryBank(*IMAGENET, dtype=dtype, init="empty", mode="sharded")  # torch.empty: pages untouched
            sd = big.state_dict()
            res[("imagenet", str(dtype))] = dict(
                numel=big.bank.numel(),
                nbytes=big.bank.nbytes,
                rows=(big.row_start, big.row_end),
                shape=tuple(sd["bank"].shape),
                layout=sd["shard_layout"].tolist(),
            )
            del big, sd
    return res


def _entry(rank, world_size, tmpdir):
    torch.set_num_threads(1)  # forked children: no OpenMP pool, no oversubscription of the cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmpdir}/store",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        res = _scenarios(rank, world_size, tmpdir)
        torch.save(res, os.path.join(tmpdir, f"result{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(world_size, tmpdir, deadline_s=120):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_entry, args=(world_size, str(tmpdir)), nprocs=world_size, join=False, start_method=method)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world_size}-rank run did not finish within {deadline_s} s")
    return [torch.load(os.path.join(tmpdir, f"result{r}.pt"), weights_only=False) for r in range(world_size)]


def warm_up():
    """The first call of a torch.library op imports torch._dynamo (seconds): pay it once here,
    before forking, instead of once per rank."""
    for backend in BACKENDS:
        bank = MemoryBank(8, 4, backend=backend)
        q = torch.nn.functional.normalize(torch.randn(2, 4), dim=1).requires_grad_()
        bank.score(
            q, torch.tensor([0, 1]), num_negatives=2, logit_scale=torch.tensor(2.0, requires_grad=True)
        ).sum().backward()
        bank.update_(torch.tensor([0, 1]), q.detach(), 0.5)


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def world(request, tmp_path_factory):
    W = request.param
    warm_up()
    t0 = time.monotonic()
    results = launch(W, tmp_path_factory.mktemp(f"dist{W}"))
    times = {k: round(v, 2) for k, v in results[0].items() if isinstance(k, str) and k.startswith("time")}
    print(f"\n{W}-rank run: {time.monotonic() - t0:.1f} s (rank 0 cumulative: {times})")
    return W, results


# ------------------------------------------------------------------------------------- parent side
TOL = dict(atol=1e-6, rtol=1e-6)


def reference(variant, world_size, backend="auto"):
    mode, loss, z_mode, sampled, _ = VARIANTS[variant]
    bank = MemoryBank(N, D, mode="local", z_mode=z_mode, init="normal", init_seed=3, seed=11, backend=backend)
    return run_steps(bank, variant, batch_sizes(world_size), None, 0, STEPS), bank


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_one_process(world, variant):
    """Losses, anchor gradients, scale/bias gradients, log Z, stream offsets and the bank after
    several steps equal one process scoring and updating the concatenated batch."""
    W, results = world
    mode = VARIANTS[variant][0]
    for backend in BACKENDS if mode == "replicated" else ["auto"]:
        got = [r[(variant, backend)] for r in results]
        if isinstance(got[0], str):
            pytest.fail(f"backend {backend!r} raised on the ranks: {got[0]}")
        ref_steps, ref_bank = reference(variant, W, backend)
        for t, ref in enumerate(ref_steps):
            steps = [g["steps"][t] for g in got]
            torch.testing.assert_close(torch.cat([s["loss"] for s in steps]), ref["loss"], **TOL)
            torch.testing.assert_close(torch.cat([s["grad_z"] for s in steps]), ref["grad_z"], **TOL)
            torch.testing.assert_close(sum(s["grad_theta"] for s in steps), ref["grad_theta"], **TOL)
            if ref["grad_beta"] is not None:
                torch.testing.assert_close(sum(s["grad_beta"] for s in steps), ref["grad_beta"], **TOL)
            for s in steps:  # state shared by all ranks is identical on all ranks
                assert torch.equal(torch.nan_to_num(s["log_z"]), torch.nan_to_num(steps[0]["log_z"]))
                assert s["offset"] == steps[0]["offset"]
            torch.testing.assert_close(steps[0]["log_z"], ref["log_z"], equal_nan=True, **TOL)
            assert steps[0]["offset"] == ref["offset"]
        if mode == "replicated":
            for g in got:
                assert torch.equal(g["bank"], ref_bank.bank)
        else:
            for r, g in enumerate(got):
                start, end = shard_bounds(N, W, r)
                assert g["rows"] == (start, end) and g["bank"].shape == (end - start, D)
                assert torch.equal(g["bank"], ref_bank.bank[start:end])


@pytest.mark.parametrize("variant", ["rep_infonce_sampled", "shard_nce_ema_sampled"])
def test_checkpoint_resumes_bit_identically(world, variant):
    W, results = world
    for r in results:
        c = r[("ckpt", variant)]
        for a, b in zip(c["straight"], c["resumed"]):
            for key in ("loss", "grad_z", "grad_theta", "grad_beta"):
                assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key
            assert (
                torch.equal(torch.nan_to_num(a["log_z"]), torch.nan_to_num(b["log_z"])) and a["offset"] == b["offset"]
            )
        assert torch.equal(c["bank_straight"], c["bank_resumed"])
        for key, t in c["state_straight"].items():
            assert torch.equal(torch.nan_to_num(t), torch.nan_to_num(c["state_resumed"][key])), key


def test_shard_checkpoint_needs_the_same_world_size(world):
    _, results = world
    for r in results:
        assert r["foreign_ckpt"] is not None and "same world size" in r["foreign_ckpt"]


@pytest.mark.parametrize("mode", ["sharded", "replicated"])
def test_ddp_keeps_memory_out_of_buffer_broadcast(world, mode):
    W, results = world
    x_sizes = 4
    ref = Model("local", N)
    ref_grads = []
    for step in range(2):
        x, pos = ddp_batch(step, x_sizes * W, N)
        ref.zero_grad()
        loss = ref(x, pos)
        loss.backward()
        ref_grads.append(dict(loss=loss.detach(), head=ref.head.weight.grad.clone(), theta=ref.theta.grad.clone()))
    for rank, r in enumerate(results):
        got = r[("ddp", mode)]
        assert got["kept"]  # DDP's construction did not copy rank 0's memory over this rank's
        assert not set(got["ignored"]) & set(got["synced"]) and "memory.bank" in got["ignored"]
        for g, want in zip(got["grads"], ref_grads):
            # equal per-rank batches: DDP's gradient average is the gradient of the global mean
            torch.testing.assert_close(g["head"], want["head"], **TOL)
            torch.testing.assert_close(g["theta"], want["theta"], **TOL)
        start, end = got["rows"]
        assert torch.equal(got["bank"], ref.memory.bank[start:end])
        if mode == "sharded":
            assert (start, end) == shard_bounds(N, W, rank)
    # a plain DDP (no helper) leaves every rank's shard alone
    assert not any(r["plain_ddp_overwrote_shard"] for r in results)


def test_sample_negatives_draws_the_concatenated_stream(world):
    W, results = world
    sizes = batch_sizes(W)
    _, pos, _ = global_batch(0, sum(sizes))
    for step in range(2):
        got = torch.cat([r["sampled_idx"][step] for r in results])
        assert torch.equal(got, dcdkernels.sample_negatives(pos, K, N, 11, step * sum(sizes) * K))
    assert all(r["sampled_offset"] == 2 * sum(sizes) * K for r in results)


def test_replicated_queue_gathers_keys_in_rank_order(world):
    W, results = world
    sizes = batch_sizes(W)
    ref = MomentumQueue(16, D, init_seed=2)
    for step in range(3):
        ref.enqueue_(
            torch.nn.functional.normalize(
                torch.randn(sum(sizes), D, generator=torch.Generator().manual_seed(step)), dim=1
            )
        )
    for r in results:
        queue, pointer = r["queue"]
        assert torch.equal(queue, ref.queue) and pointer == ref.pointer
        assert "larger than the queue" in r["queue_too_large"]


@pytest.mark.parametrize("variant", ["rep_infonce_sampled", "shard_infonce_sampled"])
def test_invalid_input_on_one_rank_raises_on_every_rank(world, variant):
    W, results = world
    for rank, r in enumerate(results):
        got = r[("invalid", variant)]
        assert got["unchanged"] and got["offset"] == 0
        for err in (got["update"], got["score"]):
            if rank == W - 1:
                assert err.startswith("ValueError") and "out of range" in err
            else:
                assert err.startswith("RuntimeError") and f"rank(s) [{W - 1}]" in err


def test_imagenet_bank_is_split_over_four_ranks(world):
    W, results = world
    if W != 4:
        pytest.skip("the ImageNet-scale layout check runs with 4 ranks")
    n, d = IMAGENET
    block = math.ceil(n / 4)
    for dtype, itemsize in ((torch.float32, 4), (torch.bfloat16, 2)):
        total = 0
        for rank, r in enumerate(results):
            got = r[("imagenet", str(dtype))]
            rows = min(block, n - rank * block)
            assert got["rows"] == (rank * block, rank * block + rows)
            assert got["numel"] == rows * d and got["shape"] == (rows, d)
            assert got["nbytes"] == rows * d * itemsize
            assert got["layout"] == [n, 4, rank]
            total += got["numel"]
        assert total == n * d
        # a quarter of the 656 MB (fp32) / 328 MB (bf16) bank per rank
        assert results[0][("imagenet", str(dtype))]["nbytes"] == 320_292 * 128 * itemsize
