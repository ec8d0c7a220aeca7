"""MemoryBank and MomentumQueue in one process (docs/math.md §5): buffers, log Z, the negative stream,
bit-identical resume from a checkpoint, the queue ring, and the sharded partial statistics
(simulated shards merged in one process). Multi-process tests: test_distributed.py."""

import io
import math

import pytest
import torch

import dcdkernels
from dcdkernels import reference as R
from dcdkernels.memory import MemoryBank, MomentumQueue, comm, init_rows, memory_buffer_names, shard_bounds
from dcdkernels.memory import sharded as Dist

# Backends that run on CPU tensors in this process (triton only under TRITON_INTERPRET=1).
CPU_BACKENDS = [b for b, (ok, _) in dcdkernels.availability().items() if ok and b in ("eager", "cpu", "triton")]


def same(a, b):
    """Bit-identical (NaN equal to NaN, as for an unset log Z)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        and torch.equal(torch.isnan(a), torch.isnan(b))
        if a.is_floating_point()
        else torch.equal(a, b)
    )


def unit(*shape, gen=None, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1).to(dtype)


# ------------------------------------------------------------------------------------- init / buffers
def test_init_is_independent_of_the_shard_layout(monkeypatch):
    from dcdkernels.memory import state as state_module

    monkeypatch.setattr(state_module, "_INIT_BLOCK", 16)  # small blocks: the same logic, cheaper
    N, D = 100, 3  # spans seven init blocks
    for init in ("uniform", "normal"):
        full = init_rows(N, D, 0, N, init=init, seed=7, dtype=torch.float32, device="cpu")
        for W in (2, 3, 4):
            parts = [
                init_rows(N, D, *shard_bounds(N, W, r), init=init, seed=7, dtype=torch.float32, device="cpu")
                for r in range(W)
            ]
            assert torch.equal(torch.cat(parts), full)
    stdv = 1 / math.sqrt(D / 3)
    u = init_rows(N, D, 0, N, init="uniform", seed=0, dtype=torch.float32, device="cpu")
    assert u.abs().max() <= stdv and u.min() < -0.9 * stdv and u.max() > 0.9 * stdv
    n = init_rows(N, D, 0, N, init="normal", seed=0, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(n.norm(dim=1), torch.ones(N))
    assert not torch.equal(u, init_rows(N, D, 0, N, init="uniform", seed=1, dtype=torch.float32, device="cpu"))


def test_shard_bounds_cover_the_bank():
    for N, W in ((10, 3), (9, 4), (1_281_167, 4), (5, 8)):
        bounds = [shard_bounds(N, W, r) for r in range(W)]
        assert bounds[0][0] == 0 and bounds[-1][1] == N
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        block = -(-N // W)
        assert all(s == min(r * block, N) for r, (s, _) in enumerate(bounds))


def test_buffers_defaults_and_dtype():
    mb = MemoryBank(100, 16, dtype=torch.bfloat16)
    sd = mb.state_dict()
    assert set(sd) == {"bank", "log_z", "rng_seed", "rng_offset", "shard_layout"}
    assert sd["bank"].dtype == torch.bfloat16 and sd["bank"].shape == (100, 16)
    assert torch.isnan(sd["log_z"]) and sd["log_z"].dtype == torch.float32
    assert sd["rng_seed"].dtype == torch.int64 and int(sd["rng_offset"]) == 0
    assert sd["shard_layout"].tolist() == [100, 1, 0]
    assert mb.bank.nbytes == 100 * 16 * 2


def test_bad_arguments():
    with pytest.raises(RuntimeError, match="init_process_group"):
        MemoryBank(10, 4, mode="sharded")
    with pytest.raises(RuntimeError, match="init_process_group"):
        MomentumQueue(10, 4, mode="replicated")
    with pytest.raises(ValueError, match="mode"):
        MemoryBank(10, 4, mode="bogus")
    with pytest.raises(ValueError, match="init"):
        MemoryBank(10, 4, init="bogus")
    with pytest.raises(ValueError, match="z_mode"):
        MemoryBank(10, 4, z_mode="bogus")
    with pytest.raises(TypeError, match="dtype"):
        MemoryBank(10, 4, dtype=torch.int32)
    mb = MemoryBank(10, 4)
    q = unit(2, 4)
    with pytest.raises(ValueError, match="num_negatives"):
        mb.score(q, torch.tensor([0, 1]), logit_scale=2.0)
    with pytest.raises(ValueError, match="out of range"):
        mb.score(q, torch.tensor([[0, 1], [2, 10]]), logit_scale=2.0)
    with pytest.raises(ValueError, match="D = 5"):
        mb.score(unit(2, 5), torch.tensor([[0, 1], [2, 3]]), logit_scale=2.0)


# ------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_score_is_the_sampled_contrast_op(backend):
    g = torch.Generator().manual_seed(0)
    mb = MemoryBank(64, 16, backend=backend, init="normal")
    q = unit(5, 16, gen=g)
    idx = torch.randint(0, 64, (5, 9), generator=g)
    got, lse = mb.score(q, idx, logit_scale=5.0, return_lse=True)
    want, want_lse = dcdkernels.sampled_contrast(q, mb.bank, idx, logit_scale=5.0, backend=backend, return_lse=True)
    assert torch.equal(got, want) and torch.equal(lse, want_lse)
    assert mb.rng_state() == (0, 0)  # explicit negatives do not touch the stream


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sampled_negatives_follow_the_saved_stream(backend):
    g = torch.Generator().manual_seed(1)
    a = MemoryBank(50, 8, backend=backend, seed=123, offset=5)
    b = MemoryBank(50, 8, backend=backend, seed=123, offset=5)
    for _ in range(2):
        q, pos = unit(4, 8, gen=g), torch.randint(0, 50, (4,), generator=g)
        got = a.score(q, pos, num_negatives=6, logit_scale=3.0)
        idx = b.sample_negatives(pos, 6)
        assert torch.equal(idx, dcdkernels.sample_negatives(pos, 6, 50, 123, a.rng_state()[1] - 24))
        want = b.score(q, idx, logit_scale=3.0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        assert a.rng_state() == b.rng_state()
    assert a.rng_state() == (123, 5 + 2 * 4 * 6) and int(a.rng_offset) == 5 + 48


@pytest.mark.parametrize("z_mode", ["frozen", "ema"])
def test_nce_partition_estimate(z_mode):
    g = torch.Generator().manual_seed(2)
    N, B, K, tau = 40, 6, 5, 0.07
    mb = MemoryBank(N, 8, z_mode=z_mode, backend="eager", init="normal")
    expected = None
    for step in range(3):
        q = unit(B, 8, gen=g)
        idx = torch.randint(0, N, (B, K + 1), generator=g)
        _, lse = R.sampled_contrast(q, mb.bank, idx, logit_scale=torch.tensor(1 / tau), loss="infonce")
        batch = math.log(N) + torch.logsumexp(lse.double(), 0).item() - math.log(B * (K + 1))
        if expected is None:
            expected = batch
        elif z_mode == "ema":
            expected = math.log(0.99 * math.exp(expected) + 0.01 * math.exp(batch))
        log_z_before = float(mb.log_z) if step else batch
        got = mb.score(q, idx, logit_scale=1 / tau, loss="nce")
        want, _ = R.sampled_contrast(
            q,
            mb.bank,
            idx,
            logit_scale=torch.tensor(1 / tau),
            loss="nce",
            log_z=torch.tensor(log_z_before, dtype=torch.float32),
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)  # scored with the estimate before this batch
        assert float(mb.log_z) == pytest.approx(expected, abs=1e-5)
    # RepDistiller's Z = N * mean(exp(u)) on the first batch, in linear space for a check
    assert z_mode == "ema" or math.isfinite(float(mb.log_z))


def test_update_is_the_bank_update_op():
    g = torch.Generator().manual_seed(3)
    mb = MemoryBank(30, 8, backend="eager")
    bank = mb.bank.clone()
    idx, val = torch.tensor([3, 7, 3, 29]), unit(4, 8, gen=g)
    mb.update_(idx, val, 0.5)
    R.bank_momentum_update_(bank, idx, val, 0.5)
    assert torch.equal(mb.bank, bank)


def test_update_validates_before_mutation():
    mb = MemoryBank(30, 8)
    before = mb.bank.clone()
    with pytest.raises(ValueError, match="out of range"):
        mb.update_(torch.tensor([1, 30]), unit(2, 8), 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        mb.update_(torch.tensor([1, 2]), torch.full((2, 8), float("nan")), 0.5)
    with pytest.raises(ValueError, match="momentum"):
        mb.update_(torch.tensor([1, 2]), unit(2, 8), 1.5)
    assert torch.equal(mb.bank, before)


# ------------------------------------------------------------------------------------- checkpoints
class Student(torch.nn.Module):
    """A head, a learnable logit scale (DCD: s = min(exp(theta), 10)) and a memory bank."""

    def __init__(self, N, dim_in, D, **bank_kw):
        super().__init__()
        self.head = torch.nn.Linear(dim_in, D)
        self.theta = torch.nn.Parameter(torch.tensor(1.0))
        self.memory = MemoryBank(N, D, **bank_kw)


def _train(model, opt, steps, first, *, loss, sampled, K=6, B=5, dim_in=12):
    out = []
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(B, dim_in, generator=g)
        pos = torch.randint(0, model.memory.n_rows, (B,), generator=g)
        z = torch.nn.functional.normalize(model.head(x), dim=1)
        s = model.theta.exp().clamp(max=10.0) if loss == "infonce" else 1 / 0.07
        if sampled:
            per_row = model.memory.score(z, pos, num_negatives=K, logit_scale=s, loss=loss)
        else:
            idx = torch.cat([pos[:, None], torch.randint(0, model.memory.n_rows, (B, K), generator=g)], 1)
            per_row = model.memory.score(z, idx, logit_scale=s, loss=loss)
        opt.zero_grad()
        per_row.mean().backward()
        opt.step()
        model.memory.update_(pos, z.detach(), 0.5)
        out.append(per_row.detach())
    return out


_VARIANTS = [
    ("infonce", "frozen", torch.float32, True),
    ("nce", "ema", torch.float32, True),
    ("nce", "frozen", torch.bfloat16, False),
]


# every variant on the fast backends; the Triton interpreter (about 5 ms per program) runs one
@pytest.mark.parametrize(
    "loss,z_mode,dtype,sampled,backend",
    [
        pytest.param(*v, b, id=f"{b}-{v[0]}-{v[1]}-{str(v[2])[6:]}-{'sampled' if v[3] else 'explicit'}")
        for b in CPU_BACKENDS
        for v in (_VARIANTS if b != "triton" else _VARIANTS[1:2])
    ],
)
def test_resume_from_checkpoint_is_bit_identical(loss, z_mode, dtype, sampled, backend):
    kw = dict(z_mode=z_mode, dtype=dtype, backend=backend, seed=99)

    def fresh():
        torch.manual_seed(0)
        model = Student(40, 12, 8, **kw)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, opt = fresh()
    straight = _train(model, opt, 6, 0, loss=loss, sampled=sampled)

    model2, opt2 = fresh()
    _train(model2, opt2, 3, 0, loss=loss, sampled=sampled)
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    del model2, opt2
    buf.seek(0)
    ckpt = torch.load(buf)
    model3, opt3 = fresh()
    torch.manual_seed(12345)  # the global RNG must not matter
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    assert model3.memory.rng_state() == (99, int(ckpt["model"]["memory.rng_offset"]))
    resumed = _train(model3, opt3, 3, 3, loss=loss, sampled=sampled)

    for a, b in zip(straight[3:], resumed):
        assert torch.equal(a, b)
    for name, t in model.state_dict().items():
        assert same(t, model3.state_dict()[name]), name
    assert same(model.memory.log_z, model3.memory.log_z)
    assert (loss == "nce") == bool(torch.isfinite(model3.memory.log_z))
    assert model.memory.rng_state() == model3.memory.rng_state()
    if sampled:
        assert model.memory.rng_state()[1] == 6 * 5 * 6


def test_load_checks_the_layout():
    mb = MemoryBank(20, 4)
    sd = mb.state_dict()
    sd["shard_layout"] = torch.tensor([20, 2, 0])
    sd["bank"] = sd["bank"][:10].clone()
    with pytest.raises(RuntimeError, match="same world size"):
        mb.load_state_dict(sd)
    other = MemoryBank(21, 4).state_dict()
    with pytest.raises(RuntimeError, match="layout"):
        mb.load_state_dict(other)


# ------------------------------------------------------------------------------------- sharded math


def merge_partials(parts):
    """Merge the partials of every shard in one process (what ``Dist.all_reduce_partials`` does
    across ranks: MAX of the reference maxima, rescale, SUM)."""
    m, scaled = None, [torch.zeros_like(t) for t in parts[0].scaled]
    if parts[0].m is not None:
        m = torch.stack([p.m for p in parts]).amax(0)
        for p in parts:
            w = Dist._rescale(p.m, m)
            for g, t in enumerate(p.scaled):
                scaled[g] += t * w[:, g : g + 1]
    return Dist.Partials(m, scaled, sum(p.plain for p in parts))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
@pytest.mark.parametrize("N,W", [(23, 1), (23, 2), (23, 3), (9, 4)])  # (9, 4): the last shard is empty
def test_sharded_partials_merge_to_the_reference(loss, N, W, backend):
    """Each shard runs the fused kernel on its rows (other columns absent); the merged partials
    are the unsharded op's values and gradients."""
    g = torch.Generator().manual_seed(4)
    D, B, K = 8, 6, 7
    bank = unit(N, D, gen=g)
    q = unit(B, D, gen=g).requires_grad_()
    theta = torch.tensor(1.3, requires_grad=True)
    beta = torch.tensor(0.2, requires_grad=True)
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    idx[0, 3] = idx[0, 0]  # a duplicate column
    idx[1] = torch.randint(0, 3, (K + 1,), generator=g)  # every column in the first shard: absent from the others
    idx[2, 0] = N - 1  # the positive in the last non-empty shard
    log_z = torch.tensor(2.5)
    s = theta.exp()
    want, want_lse = R.sampled_contrast(q, bank, idx, logit_scale=s, bias=beta, loss=loss, log_z=log_z)
    gq, gtheta, gbeta = torch.autograd.grad(want.sum(), [q, theta, beta])
    parts = []
    for r in range(W):
        a, e = shard_bounds(N, W, r)
        parts.append(
            Dist.shard_partials(
                q.detach(),
                lambda b0, b1: idx[b0:b1],
                bank[a:e],
                a,
                N,
                K + 1,
                logit_scale=s.detach(),
                bias=beta.detach(),
                loss=loss,
                log_z=log_z,
                need_grad=True,
                need_lse=True,
                backend=backend,
                chunk=3 * (K + 1),
            )
        )
    per_row, lse, ga, gs, gb = Dist.finalize(
        merge_partials(parts), loss=loss, logit_scale=s, bias=beta, need_grad=True, need_lse=True, D=D
    )
    tol = dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(per_row, want.detach(), **tol)
    torch.testing.assert_close(lse, want_lse, **tol)
    torch.testing.assert_close(ga, gq, **tol)
    torch.testing.assert_close(gs.sum() * s.detach(), gtheta, **tol)
    if loss == "infonce":  # exactly 0 (autograd's softmax gives ~1e-6 of rounding noise)
        assert torch.equal(gb, torch.zeros_like(gb)) and abs(float(gbeta)) < 1e-5
    else:
        torch.testing.assert_close(gb.sum(), gbeta, **tol)
    # Through the autograd wrapper: gradients reach the anchor, theta and beta.
    q2 = q.detach().clone().requires_grad_()
    out = Dist.PrecomputedContrast.apply(q2, theta.exp(), beta, per_row, ga, gs, gb)
    out.sum().backward()
    torch.testing.assert_close(q2.grad, gq, **tol)
    assert theta.grad is not None and beta.grad is not None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
@pytest.mark.parametrize("N,W", [(23, 1), (23, 3), (9, 4)])  # (9, 4): the last shard is empty
def test_dual_sharded_partials_merge_to_the_reference(loss, N, W, backend):
    """The paired banks' shards: both directions and the consistency KL (loss, LSE, gradients to
    both anchors, the scale and the bias) merge to the unsharded dual op's."""
    g = torch.Generator().manual_seed(8)
    D, B, K = 8, 6, 7
    bank_s, bank_t = unit(N, D, gen=g), unit(N, D, gen=g)
    zs, zt = unit(B, D, gen=g).requires_grad_(), unit(B, D, gen=g).requires_grad_()
    theta = torch.tensor(1.3, requires_grad=True)
    beta = torch.tensor(0.2, requires_grad=True)
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    idx[0, 3] = idx[0, 0]
    idx[1] = torch.randint(0, 3, (K + 1,), generator=g)  # every column in the first shard
    idx[2, 0] = N - 1
    log_z = torch.tensor([2.5, 1.5])
    s = theta.exp()
    kl_on = loss == "infonce"
    ls, lt, kl, lse_s, lse_t = R.dual_sampled_contrast(
        zs,
        zt,
        bank_s,
        bank_t,
        idx,
        logit_scale=s,
        bias=beta,
        loss=loss,
        log_z=log_z if loss == "nce" else None,
        compute_kl=kl_on,
    )
    want = torch.stack([ls, lt, kl])
    parts = []
    for r in range(W):
        a, e = shard_bounds(N, W, r)
        parts.append(
            Dist.dual_shard_partials(
                zs.detach(),
                zt.detach(),
                lambda b0, b1: idx[b0:b1],
                bank_s[a:e],
                bank_t[a:e],
                a,
                N,
                K + 1,
                logit_scale=s.detach(),
                bias=beta.detach(),
                loss=loss,
                log_z=log_z if loss == "nce" else None,
                need_grad=True,
                need_lse=True,
                need_kl=kl_on,
                backend=backend,
                chunk=3 * (K + 1),
            )
        )
    losses, lse, ga, gsc = Dist.finalize_dual(
        merge_partials(parts),
        zs.detach(),
        zt.detach(),
        loss=loss,
        logit_scale=s,
        bias=beta,
        need_grad=True,
        need_lse=True,
        need_kl=kl_on,
    )
    # Against the unsharded kernel (the local and replicated paths): fp32 to 1e-6.
    from dcdkernels.ops.dual_sampled_contrast import dual_sampled_contrast_outputs

    full = dual_sampled_contrast_outputs(
        zs.detach(),
        zt.detach(),
        bank_s,
        bank_t,
        idx,
        logit_scale=s.detach(),
        bias=beta.detach(),
        loss=loss,
        log_z=log_z if loss == "nce" else None,
        compute_kl=kl_on,
        backend=backend,
    )
    # Each carries about 1e-6 of fp32 rounding against the fp64 values (measured: the sharded
    # merge is no less accurate than the fused kernel), so they agree to 2e-6.
    for got, ref in zip((losses, lse, ga, gsc), full):
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-6)
    # Against autograd of the oracle.
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses, want.detach(), **tol)
    torch.testing.assert_close(lse, torch.stack([lse_s, lse_t]), **tol)
    for term in range(3):
        if term == 2 and not kl_on:
            continue
        gs_, gt_, gth, gb = torch.autograd.grad(
            want[term].sum(), [zs, zt, theta, beta], allow_unused=True, retain_graph=True
        )
        zero = torch.zeros_like(zs)
        ga_s = ga[0] if term == 0 else ga[2] if term == 2 else zero
        ga_t = ga[1] if term == 1 else ga[3] if term == 2 else zero
        torch.testing.assert_close(ga_s, gs_ if gs_ is not None else zero, **tol)
        torch.testing.assert_close(ga_t, gt_ if gt_ is not None else zero, **tol)
        torch.testing.assert_close(gsc[0, term].sum() * s.detach(), gth, **tol)
        if loss == "infonce":  # exactly 0 (autograd gives rounding noise)
            assert torch.equal(gsc[1, term], torch.zeros_like(gsc[1, term])) and abs(float(gb)) < 1e-5
        else:
            torch.testing.assert_close(gsc[1, term].sum(), gb, **tol)
    # Through the autograd wrapper: gradients reach both anchors, theta and beta.
    zs2, zt2 = zs.detach().clone().requires_grad_(), zt.detach().clone().requires_grad_()
    th2 = theta.detach().clone().requires_grad_()
    out = Dist.PrecomputedDualContrast.apply(zs2, zt2, th2.exp(), beta, losses, ga, gsc)
    out.sum().backward()
    gzs, gzt, gth = torch.autograd.grad(want.sum(), [zs, zt, theta])
    torch.testing.assert_close(zs2.grad, gzs, **tol)
    torch.testing.assert_close(zt2.grad, gzt, **tol)
    torch.testing.assert_close(th2.grad, gth, **tol)


def test_lse_stats_combine():
    x = torch.randn(17) * 30
    parts = [comm.lse_stats(x[:5]), comm.lse_stats(x[5:]), comm.lse_stats(x[:0])]
    torch.testing.assert_close(comm.combine_lse_stats(torch.cat(parts)).float(), torch.logsumexp(x, 0))
    # the one log Z formula: RepDistiller's log(N mean(exp(u))) over B (K+1) scores
    u = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(comm.log_partition(torch.logsumexp(u, 1), 50, 6), (50 * u.exp().mean()).log())


# ------------------------------------------------------------------------------------- queue
def test_queue_ring_wraps_around():
    g = torch.Generator().manual_seed(5)
    mq = MomentumQueue(5, 4)
    assert mq.queue.shape == (5, 4) and mq.pointer == 0
    torch.testing.assert_close(mq.queue.norm(dim=1), torch.ones(5))
    k1, k2, k3 = unit(3, 4, gen=g), unit(4, 4, gen=g), unit(5, 4, gen=g)
    assert mq.enqueue_(k1) == 3
    assert torch.equal(mq.queue[:3], k1)
    assert mq.enqueue_(k2) == 2  # rows 3, 4, 0, 1
    assert torch.equal(mq.queue[3:], k2[:2]) and torch.equal(mq.queue[:2], k2[2:])
    assert torch.equal(mq.queue[2], k1[2])
    assert mq.enqueue_(k3) == 2 and int(mq.queue_ptr) == 2  # a full-size batch
    assert torch.equal(mq.queue[[2, 3, 4, 0, 1]], k3)


def test_queue_validates_before_mutation():
    mq = MomentumQueue(5, 4)
    mq.enqueue_(unit(2, 4))
    before, ptr = mq.queue.clone(), mq.pointer
    with pytest.raises(ValueError, match="larger than the queue"):
        mq.enqueue_(unit(6, 4))
    with pytest.raises(ValueError, match="D = 3"):
        mq.enqueue_(unit(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        mq.enqueue_(torch.full((2, 4), float("inf")))
    assert torch.equal(mq.queue, before) and mq.pointer == ptr == int(mq.queue_ptr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_queue_state_dict_round_trip(dtype):
    g = torch.Generator().manual_seed(6)
    a = MomentumQueue(7, 4, dtype=dtype)
    for n in (3, 3, 2):
        a.enqueue_(unit(n, 4, gen=g))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = MomentumQueue(7, 4, dtype=dtype, init_seed=1)
    b.load_state_dict(torch.load(buf))
    assert b.pointer == a.pointer == 1 and torch.equal(a.queue, b.queue) and b.queue.dtype == dtype
    k = unit(4, 4, gen=g)
    assert a.enqueue_(k) == b.enqueue_(k) == 5
    assert torch.equal(a.queue, b.queue)


# ------------------------------------------------------------------------------------- DDP helpers
def test_memory_buffer_names_for_ddp():
    from dcdkernels.memory import ddp_ignore_memory_buffers

    model = torch.nn.Module()
    model.student = Student(10, 4, 4)
    model.queue = MomentumQueue(4, 4)
    model.bn = torch.nn.BatchNorm1d(4)
    names = memory_buffer_names(model)
    assert names == [
        "student.memory.shard_layout",
        "student.memory.bank",
        "student.memory.log_z",
        "student.memory.rng_seed",
        "student.memory.rng_offset",
        "queue.shard_layout",
        "queue.queue",
        "queue.queue_ptr",
    ]
    # memory state is in the state dict but not a buffer: DDP's broadcasts never see it
    assert set(names) <= set(model.state_dict()) and not set(names) & {n for n, _ in model.named_buffers()}
    model._ddp_params_and_buffers_to_ignore = ["bn.running_mean"]
    ignored = ddp_ignore_memory_buffers(model)
    assert ignored == ["bn.running_mean"] + names
    assert "bn.running_var" not in ignored
