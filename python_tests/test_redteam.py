"""Red-team tests of the op entry points (issue 15, op-level classes 1-4, 8-11, and probes).

One test per failure class, each parametrised over the backends available here (eager, the C++
CPU kernels, Triton under the interpreter). Every one of them failed on the code before the fix.
"""

import math

import pytest
import torch
from helpers import fused_backends

import dcdkernels
from dcdkernels import ops
from dcdkernels import reference as R

BACKENDS = ["eager"] + fused_backends("cpu")
FUSED = fused_backends("cpu")


def _unit(n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


def _sampled_inputs(B=3, K=4, N=10, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return _unit(B, D, seed), _unit(N, D, seed + 1), torch.randint(0, N, (B, K + 1), generator=g)


def _call(op, backend, **kw):
    """One call of ``op`` ("sampled", "dual" or "dense") on small valid inputs, ``kw`` overriding."""
    q, bank, index = _sampled_inputs()
    if op == "sampled":
        args = dict(logit_scale=10.0)
        args.update(kw)
        return ops.sampled_contrast(q, bank, index, backend=backend, **args)
    if op == "dual":
        args = dict(logit_scale=10.0, consistency=0.5)
        args.update(kw)
        return ops.dual_sampled_contrast(q, _unit(3, 6, 7), bank, _unit(10, 6, 8), index, backend=backend, **args)
    args = dict(logit_scale=10.0, positive=_unit(3, 6, 9))
    args.update(kw)
    return ops.dense_contrast(q, bank, backend=backend, **args)


# ---------------------------------------------------------------------------------------------
# Class 1: scalars passed as tensors are checked like the float forms.
# ---------------------------------------------------------------------------------------------
BAD_SCALE = [-1.0, 0.0, math.inf, -math.inf, math.nan]
BAD_ANY = [math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sampled", "dual", "dense"])
def test_class1_tensor_scalars_are_checked_like_floats(op, backend):
    for v in BAD_SCALE:
        for form in (v, torch.tensor(v), torch.tensor([v]), torch.tensor(v, requires_grad=True)):
            with pytest.raises(ValueError, match="logit_scale"):
                _call(op, backend, logit_scale=form)
    for v in BAD_ANY:
        for form in (v, torch.tensor(v), torch.tensor(v, dtype=torch.float64)):
            with pytest.raises(ValueError, match="bias"):
                _call(op, backend, bias=form)
    if op == "sampled":
        for v in BAD_ANY:
            for form in (v, torch.tensor(v)):
                with pytest.raises(ValueError, match="log_z"):
                    _call(op, backend, loss="nce", log_z=form)
    if op == "dual":
        for v in BAD_ANY:
            for form in ((0.0, v), torch.tensor([v, 0.0])):
                with pytest.raises(ValueError, match="log_z"):
                    _call(op, backend, loss="nce", log_z=form)
            with pytest.raises(ValueError, match="consistency"):
                _call(op, backend, consistency=v)
        for form in (torch.tensor(-1.0), torch.tensor(math.inf), -0.5):
            with pytest.raises((ValueError, TypeError), match="consistency"):
                _call(op, backend, consistency=form)
    # A float that overflows the accumulation dtype is not finite there.
    with pytest.raises(ValueError, match="logit_scale"):
        _call(op, backend, logit_scale=1e39)
    # Valid tensor scalars still work, learnable ones keep their gradient.
    s = torch.tensor(7.0, requires_grad=True)
    out = _call(op, backend, logit_scale=s, bias=torch.tensor(0.5))
    (out[0] if op == "dual" else out).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad)


# ---------------------------------------------------------------------------------------------
# Class 2: double backward is correct (eager) or raises at once (fused) -- never zeros.
# ---------------------------------------------------------------------------------------------
def _second_order(op, backend, reduction="none"):
    q = _unit(3, 6).double().requires_grad_()
    _, bank, index = _sampled_inputs()
    bank = bank.double()
    if op == "sampled":
        loss = ops.sampled_contrast(q, bank, index, logit_scale=10.0, backend=backend).sum()
    elif op == "dual":
        loss = ops.dual_sampled_contrast(
            q,
            _unit(3, 6, 7).double(),
            bank,
            _unit(10, 6, 8).double(),
            index,
            logit_scale=10.0,
            consistency=0.5,
            backend=backend,
        ).consistency.sum()
    else:
        out = ops.dense_contrast(
            q, bank, torch.tensor([1, 2, 3]), logit_scale=10.0, reduction=reduction, backend=backend
        )
        loss = out.sum() if reduction == "none" else out
    (g,) = torch.autograd.grad(loss, q, create_graph=True)
    (gg,) = torch.autograd.grad((g * g).sum(), q)
    return gg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "op,reduction", [("sampled", "none"), ("dual", "none"), ("dense", "none"), ("dense", "mean"), ("dense", "sum")]
)
def test_class2_double_backward_is_correct_or_refused(op, reduction, backend):
    if backend == "eager":
        assert _second_order(op, "eager", reduction).abs().sum() > 0
        return
    if backend == "triton":  # float64 is CPU/eager only: refuse double backward in fp32
        q = _unit(3, 6).requires_grad_()
        _, bank, index = _sampled_inputs()
        loss = ops.sampled_contrast(q, bank, index, logit_scale=10.0, backend=backend).sum()
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, q, create_graph=True)
        return
    with pytest.raises(RuntimeError, match="double backward"):
        _second_order(op, backend, reduction)


# ---------------------------------------------------------------------------------------------
# Class 3: torch.compile keeps the value checks in the graph.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_class3_compiled_graph_keeps_value_checks(backend):
    torch._dynamo.reset()

    def f(q, bank, index, s):
        return ops.sampled_contrast(q, bank, index, logit_scale=s, backend=backend).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    q, bank, index = _sampled_inputs()
    s = torch.tensor(10.0)
    torch.testing.assert_close(compiled(q, bank, index, s), f(q, bank, index, s))
    bad = index.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match="index has entries out of range"):
        compiled(q, bank, bad, s)
    nan_q = q.clone()
    nan_q[0, 0] = math.nan
    with pytest.raises(ValueError, match="anchor has non-finite"):
        compiled(nan_q, bank, index, s)
    with pytest.raises(ValueError, match="logit_scale"):
        compiled(q, bank, index, torch.tensor(-1.0))

    def dense(q, keys, target, s):
        return ops.dense_contrast(q, keys, target, logit_scale=s, reduction="mean", backend=backend)

    cdense = torch.compile(dense, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(cdense(q, bank, torch.tensor([1, 2, 3]), s), dense(q, bank, torch.tensor([1, 2, 3]), s))
    with pytest.raises(ValueError, match="target has entries out of range"):
        cdense(q, bank, torch.tensor([1, 2, 10]), s)

    def dual(qs, qt, bank, index, lz):
        return ops.dual_sampled_contrast(
            qs, qt, bank, bank, index, logit_scale=10.0, loss="nce", log_z=lz, consistency=0.5, backend=backend
        ).loss_s.sum()

    cdual = torch.compile(dual, backend="aot_eager", fullgraph=True)
    lz = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(cdual(q, q, bank, index, lz), dual(q, q, bank, index, lz))
    with pytest.raises(ValueError, match="anchor_t has non-finite"):
        cdual(q, nan_q, bank, index, lz)
    with pytest.raises(ValueError, match="log_z"):
        cdual(q, q, bank, index, torch.tensor([1.0, math.inf]))

    def upd(bank, index, value):
        ops.bank_momentum_update_(bank, index, value, 0.5, backend=backend)
        return bank

    cupd = torch.compile(upd, backend="aot_eager", fullgraph=True)
    bank2 = bank.clone()
    cupd(bank2, torch.tensor([1, 2]), _unit(2, 6, 3))
    before = bank2.clone()
    with pytest.raises(ValueError, match="index has entries out of range"):
        cupd(bank2, torch.tensor([1, 10]), _unit(2, 6, 3))
    assert torch.equal(bank2, before)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Class 4: banks with overlapping rows, and values aliasing the bank, are rejected before writing.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_class4_overlapping_bank_is_rejected_before_writing(backend):
    base = _unit(12, 8)
    for bank in (
        base[:1].expand(5, 8),
        base.reshape(-1).as_strided((5, 8), (4, 1)),
        base.reshape(-1).as_strided((3, 8), (0, 1)),
    ):
        storage = base.clone()
        with pytest.raises(ValueError, match="bank.*overlap"):
            ops.bank_momentum_update_(bank, torch.tensor([0, 2]), _unit(2, 8, 1), 0.5, backend=backend)
        assert torch.equal(base, storage)
    bank = _unit(12, 8)
    before = bank.clone()
    for value in (bank[3:5], bank[:, :8][2:4]):
        with pytest.raises(ValueError, match="value.*overlap"):
            ops.bank_momentum_update_(bank, torch.tensor([4, 0]), value, 0.5, backend=backend)
        assert torch.equal(bank, before)
    # A read-only stride-0 value (one row broadcast) is fine, and a bank of a single row too.
    ops.bank_momentum_update_(bank, torch.tensor([1, 2]), _unit(1, 8, 4).expand(2, 8), 0.5, backend=backend)
    ops.bank_momentum_update_(_unit(1, 8).expand(1, 8), torch.tensor([0]), _unit(1, 8, 4), 0.5, backend=backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available here")
def test_class4_triton_kernel_itself_rejects_overlap():
    from dcdkernels.triton.bank_update import bank_momentum_update_

    base = _unit(4, 8)
    with pytest.raises(ValueError, match="overlap"):
        bank_momentum_update_(base[:1].expand(4, 8), torch.tensor([0, 1]), _unit(2, 8, 1), 0.5)
    with pytest.raises(ValueError, match="overlap"):
        bank_momentum_update_(base, torch.tensor([0, 1]), base[2:], 0.5)


# ---------------------------------------------------------------------------------------------
# Class 8: one domain for the negative stream, the same draws over all of it.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_class8_one_stream_domain_on_every_backend(backend):
    q, bank, _ = _sampled_inputs()
    pos = torch.tensor([1, 2, 3])
    B, K, N = 3, 4, bank.shape[0]
    bad = [
        dict(seed=-1),
        dict(offset=-5),
        dict(seed=2**64),
        dict(seed=2**63),
        dict(offset=2**63),
        dict(offset=2**63 - B * K + 1),
        dict(seed=1.5),
        dict(offset=2.0),
        dict(seed=True),
    ]
    for kw in bad:
        with pytest.raises((ValueError, TypeError), match="seed|offset"):
            ops.sampled_contrast(q, bank, pos, logit_scale=10.0, num_negatives=K, backend=backend, **kw)
        with pytest.raises((ValueError, TypeError), match="seed|offset"):
            ops.sample_negatives(pos, K, N, **{"seed": 0, "offset": 0, **kw})
        with pytest.raises((ValueError, TypeError), match="seed|offset"):
            ops.dual_sampled_contrast(q, q, bank, bank, pos, logit_scale=10.0, num_negatives=K, backend=backend, **kw)
    for seed, offset in [(0, 0), (2**63 - 1, 2**63 - B * K), (2**62 + 3, 2**32 - 5), (5, 2**63 - B * K - 7)]:
        index = ops.sample_negatives(pos, K, N, seed=seed, offset=offset)
        assert index.min() >= 0 and index.max() < N
        fused = ops.sampled_contrast(
            q, bank, pos, logit_scale=10.0, num_negatives=K, seed=seed, offset=offset, backend=backend
        )
        explicit = ops.sampled_contrast(q, bank, index, logit_scale=10.0, backend=backend)
        torch.testing.assert_close(fused, explicit, atol=0, rtol=0)
        dual = ops.dual_sampled_contrast(
            q, q, bank, bank, pos, logit_scale=10.0, num_negatives=K, seed=seed, offset=offset, backend=backend
        )
        torch.testing.assert_close(dual.loss_s, explicit, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Class 9: non-integers are rejected, never truncated.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_class9_non_integers_are_rejected(backend):
    q, bank, _ = _sampled_inputs()
    pos = torch.tensor([1, 2, 3])
    for k in (2.5, 2.0, True, "3", 2**31):
        with pytest.raises((TypeError, ValueError), match="num_negatives"):
            ops.sampled_contrast(q, bank, pos, logit_scale=10.0, num_negatives=k, backend=backend)
        with pytest.raises((TypeError, ValueError), match="num_negatives"):
            ops.dual_sampled_contrast(q, q, bank, bank, pos, logit_scale=10.0, num_negatives=k, backend=backend)
        with pytest.raises((TypeError, ValueError), match="num_negatives"):
            ops.sample_negatives(pos, k, 10)
    with pytest.raises((TypeError, ValueError), match="n_rows"):
        ops.sample_negatives(pos, 3, 10.5)
    # numpy-style integer scalars are integers
    ops.sampled_contrast(q, bank, pos, logit_scale=10.0, num_negatives=torch.tensor(3).item(), backend=backend)
    with pytest.raises(TypeError, match="labels"):
        ops.ClassConditionalSampler(torch.tensor([0.0, 1.5, 1.0]))
    with pytest.raises(TypeError, match="labels"):
        ops.ClassConditionalSampler([0, 1.5, 1])
    sampler = ops.ClassConditionalSampler(torch.tensor([0, 1, 1, 0]))
    with pytest.raises(TypeError, match="index"):
        sampler(torch.tensor([0.0, 1.7]), 2)
    with pytest.raises((TypeError, ValueError), match="num_negatives"):
        sampler(torch.tensor([0, 1]), 2.5)


# ---------------------------------------------------------------------------------------------
# Class 10: finite extreme values give unit rows (a scaled norm), identical on every backend.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_class10_bank_update_norm_does_not_overflow(backend, dtype):
    big = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 3e4, torch.float64: 1e300}[dtype]
    D = 37
    bank = (_unit(6, D, 1, torch.float64) * big).to(dtype)
    value = (_unit(4, D, 2, torch.float64) * big).to(dtype)
    index = torch.tensor([0, 2, 3, 2])
    out = bank.clone()
    if dtype == torch.float64 and backend == "triton":  # float64: the CPU kernels and the oracle only
        with pytest.raises(TypeError, match="float64"):
            ops.bank_momentum_update_(out, index, value, 0.25, backend=backend)
        assert torch.equal(out, bank)
        return
    ops.bank_momentum_update_(out, index, value, 0.25, backend=backend)
    norms = out[[0, 2, 3]].double().norm(dim=1)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=D * eps, rtol=0)
    assert torch.equal(out[[1, 4, 5]], bank[[1, 4, 5]])
    # Against the oracle: one rounding apart at most (bit-identical on CPU).
    expected = R.bank_momentum_update_(bank.clone(), index, value, 0.25)
    torch.testing.assert_close(out.double(), expected.double(), atol=eps, rtol=eps)
    # The exact mathematical result of normalize(x) = x / max(||x||, 1e-12), in float64.
    mixed = (0.25 * bank[[0, 2, 3]].double() + 0.75 * value[[0, 3, 2]].double()) / big  # no overflow here
    torch.testing.assert_close(
        out[[0, 2, 3]].double(), mixed / mixed.norm(dim=1, keepdim=True), atol=4 * eps, rtol=4 * eps
    )
    # Tiny rows: the exact norm is below 1e-12, so the row is x / 1e-12 (not a unit row, not 0).
    if dtype in (torch.float32, torch.float64):
        tiny = (_unit(2, D, 3, torch.float64) * 1e-25).to(dtype)
        zero_bank = torch.zeros(2, D, dtype=dtype)
        ops.bank_momentum_update_(zero_bank, torch.tensor([0, 1]), tiny, 0.0, backend=backend)
        torch.testing.assert_close(zero_bank.double(), tiny.double() / 1e-12, atol=0, rtol=8 * eps)


# ---------------------------------------------------------------------------------------------
# Class 11: errors name the argument; the backends agree.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_class11_messages_name_the_argument(backend):
    sampler = ops.ClassConditionalSampler(torch.tensor([0, 1, 1, 0, 2]))
    for k in (0, -1):
        with pytest.raises(ValueError, match="num_negatives"):
            sampler(torch.tensor([0, 1]), k)
    for idx in ([0, 5], [-1, 2]):
        with pytest.raises(ValueError, match="index.*out of range"):
            sampler(torch.tensor(idx), 2)
    with pytest.raises((TypeError, ValueError), match="log_z"):
        _call("dual", backend, loss="nce", log_z=3.0)
    with pytest.raises(ValueError, match="log_z"):
        _call("dual", backend, loss="nce", log_z=(1.0, 2.0, 3.0))
    for op in ("sampled", "dual", "dense"):
        with pytest.raises(ValueError, match="logit_scale"):
            _call(op, backend, logit_scale=10**400)
        with pytest.raises(TypeError, match="logit_scale"):
            _call(op, backend, logit_scale=True)
        with pytest.raises(TypeError, match="logit_scale"):
            _call(op, backend, logit_scale=torch.tensor(True))
    bank = _unit(6, 4)
    before = bank.clone()
    for m in (torch.tensor(0.5), True, math.nan, 1.5, -0.1, "0.5"):
        with pytest.raises((TypeError, ValueError), match="momentum"):
            ops.bank_momentum_update_(bank, torch.tensor([1]), _unit(1, 4), m, backend=backend)
    assert torch.equal(bank, before)
    # An empty update is a no-op on every backend (a rank with no rows this step).
    ops.bank_momentum_update_(bank, torch.tensor([], dtype=torch.int64), torch.empty(0, 4), 0.5, backend=backend)
    assert torch.equal(bank, before)
    with pytest.raises(ValueError, match="value"):  # but its D must still match
        ops.bank_momentum_update_(bank, torch.tensor([], dtype=torch.int64), torch.empty(0, 3), 0.5, backend=backend)


# ---------------------------------------------------------------------------------------------
# Probes beyond the list: wrong types, bool tensors, aliasing, repeated calls, empty tensors.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_probes_wrong_types_and_empty_tensors(backend):
    q, bank, index = _sampled_inputs()
    for bad_q in (q.bool(), q.to(torch.int32), q.numpy(), q[:0], q[:, :0], q[0]):
        with pytest.raises((TypeError, ValueError), match="anchor"):
            ops.sampled_contrast(bad_q, bank, index, logit_scale=10.0, backend=backend)
    for bad_index in (index.bool(), index.float(), index[:, :1], index.tolist()):
        with pytest.raises((TypeError, ValueError), match="index"):
            ops.sampled_contrast(q, bank, bad_index, logit_scale=10.0, backend=backend)
    with pytest.raises((TypeError, ValueError), match="target"):
        ops.dense_contrast(q, bank, torch.tensor([True, False, True]), logit_scale=10.0, backend=backend)
    with pytest.raises(ValueError, match="weight"):
        ops.dense_contrast(
            q,
            bank,
            torch.tensor([1, 2, 3]),
            logit_scale=10.0,
            weight=torch.tensor([1.0, math.inf, 1.0]),
            backend=backend,
        )
    with pytest.raises(ValueError, match="reduction"):
        ops.dense_contrast(q, bank, torch.tensor([1, 2, 3]), logit_scale=10.0, reduction="avg", backend=backend)
    with pytest.raises((TypeError, ValueError), match="bank"):
        ops.bank_momentum_update_(bank.bool(), torch.tensor([1]), _unit(1, 6), 0.5, backend=backend)
    with pytest.raises((TypeError, ValueError), match="index"):
        ops.bank_momentum_update_(bank, torch.tensor([True]), _unit(1, 6), 0.5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_probes_aliasing_and_repeated_calls_are_consistent(backend):
    q, bank, index = _sampled_inputs()
    # The anchors may alias the bank (read-only): same result as a copy.
    alias = ops.sampled_contrast(bank[:3], bank, index, logit_scale=10.0, backend=backend)
    copy = ops.sampled_contrast(bank[:3].clone(), bank, index, logit_scale=10.0, backend=backend)
    assert torch.equal(alias, copy)
    # Repeated calls are bit-identical and leave their inputs unchanged.
    snapshot = [t.clone() for t in (q, bank, index)]
    first = ops.sampled_contrast(q, bank, index, logit_scale=10.0, backend=backend)
    for _ in range(3):
        assert torch.equal(ops.sampled_contrast(q, bank, index, logit_scale=10.0, backend=backend), first)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, (q, bank, index)))
    # A bank updated with rows of another bank that shares no memory: fine; updating a bank in a
    # loop keeps unit rows.
    b2 = _unit(10, 6, 5)
    for step in range(3):
        ops.bank_momentum_update_(b2, torch.tensor([step, step + 1]), bank[step : step + 2], 0.5, backend=backend)
    torch.testing.assert_close(b2.norm(dim=1), torch.ones(10), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_probes_found_backend_disagreements(backend):
    np = pytest.importorskip("numpy")
    q, bank, index = _sampled_inputs()
    # NumPy scalars are real numbers like Python floats (np.float32 was refused, np.float64 not).
    ref = ops.sampled_contrast(q, bank, index, logit_scale=10.0, backend=backend)
    for s in (np.float32(10.0), np.float64(10.0), np.int64(10)):
        assert torch.equal(ops.sampled_contrast(q, bank, index, logit_scale=s, backend=backend), ref)
    b = _unit(10, 6, 3)
    ops.bank_momentum_update_(b, torch.tensor([1]), _unit(1, 6), np.float32(0.5), backend=backend)
    # An inference tensor is refused outside inference mode on every backend (eager raised deep in
    # torch, the fused kernels wrote into it).
    with torch.inference_mode():
        frozen = _unit(10, 6, 3)
    with pytest.raises(ValueError, match="inference"):
        ops.bank_momentum_update_(frozen, torch.tensor([1]), _unit(1, 6), 0.5, backend=backend)
    # A float16 bank updated with float64 values: fp32 math on every backend (triton refused it).
    half = _unit(10, 6, 3).half()
    expected = R.bank_momentum_update_(half.clone(), torch.tensor([1, 4]), _unit(2, 6, 5).double(), 0.5)
    ops.bank_momentum_update_(half, torch.tensor([1, 4]), _unit(2, 6, 5).double(), 0.5, backend=backend)
    torch.testing.assert_close(half, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available here")
def test_class1_tensor_scalars_are_deferred_checks_in_deferred_mode():
    """In the deferred mode (the CUDA default for the fused backends), a bad tensor scalar is
    queued like the other value checks: no host read in the call, the error at the next call or
    at check_errors()."""
    from dcdkernels.ops import _validate as V

    dcdkernels.check_errors()
    dcdkernels.set_value_checks("deferred")
    try:
        q, bank, index = _sampled_inputs()
        ops.sampled_contrast(q, bank, index, logit_scale=torch.tensor(math.nan), backend="triton")
        assert len(V._PENDING) == 1
        with pytest.raises(ValueError, match="earlier call.*logit_scale must be finite and > 0"):
            dcdkernels.check_errors()
    finally:
        dcdkernels.set_value_checks(True)
        V._PENDING.clear()


def test_value_checks_op_passes_opcheck():
    from dcdkernels.ops._validate import value_checks_op

    torch.library.opcheck(value_checks_op, (torch.tensor([False, False]), "a\x1fb", False))
    with pytest.raises(ValueError, match="^b$"):
        value_checks_op(torch.tensor([False, True]), "a\x1fb", False)


@pytest.mark.parametrize("which", ["f_s", "f_t"])
def test_class5_dcd_in_batch_rejects_non_finite_features(which):
    """Issue 15 class 5: the in-batch DCD loss gave a NaN loss for NaN features with no error."""
    torch.manual_seed(0)
    loss = dcdkernels.DCDLoss(8, 6)
    f = {"f_s": torch.randn(4, 8), "f_t": torch.randn(4, 6)}
    f[which][1, 2] = float("nan")
    with pytest.raises(ValueError, match=which):
        loss(f["f_s"], f["f_t"])
    f[which][1, 2] = float("inf")
    with pytest.raises(ValueError, match=which):
        loss(f["f_s"], f["f_t"])


@pytest.mark.parametrize(
    "args, option",
    [
        (["--epochs", "-1"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--nce-k", "0"], "--nce-k"),
        (["--lr", "-1"], "--lr"),
        (["--seed", "-3"], "--seed"),
        (["--nce-m", "1.5"], "--nce-m"),
        (["--num-workers", "-2"], "--num-workers"),
        (["--lr-decay-epochs", "0,3"], "--lr-decay-epochs"),
    ],
)
def test_trainer_cli_rejects_bad_values_naming_the_option(args, option, capsys):
    """Beyond the issue's list: the trainer's numeric options were passed on unchecked (``--epochs
    -1`` ran and reported a run; ``--seed -3`` failed inside numpy). Now each raises before any
    work, naming the option, and the CLI exits 2 without a traceback."""
    pytest.importorskip("sklearn")
    from dcdkernels.train.__main__ import main
    from dcdkernels.train.config import make_config

    with pytest.raises(ValueError, match=option):
        make_config(args)
    assert main(args + ["--no-progress"]) == 2
    assert option in capsys.readouterr().err


def test_trainer_config_file_rejects_unknown_keys(tmp_path):
    pytest.importorskip("yaml")
    from dcdkernels.train.config import make_config

    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nbogus_key: 3\n")
    with pytest.raises(ValueError, match="bogus_key"):
        make_config(["--config", str(path)])
