"""supcon_contrast (issue 16): the oracle against a transcription, written for these tests, of
SupContrast's SupConLoss (HobbitLong/SupContrast ``losses.py``, contrast_mode="all", labels);
every fused backend against the oracle per dtype on values and gradients (anchors, keys,
logit_scale), rows without a positive, float64 gradcheck, opcheck, torch.compile, bad input."""

import pytest
import torch
from helpers import (
    BACKENDS,
    DTYPES,
    SUPCON_SHAPES,
    TOL,
    accumulation,
    assert_close,
    assert_refused,
    backend_params,
    device_of,
    skip_if_interpreted_and_slow,
    unsupported,
)

from dcdkernels import ops, reference
from dcdkernels.ops.supcon_contrast import supcon_contrast_backward_op, supcon_contrast_op

pytestmark = pytest.mark.usefixtures("single_thread")


def supcontrast_official(features, labels, temperature=0.07, base_temperature=0.07):
    """SupConLoss.forward of SupContrast, contrast_mode='all', features (bsz, n_views, D); the
    per-anchor loss before its mean, in the order (view, sample)."""
    bsz, n_views = features.shape[:2]
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).to(features.dtype)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    adc = torch.div(torch.matmul(contrast, contrast.T), temperature)
    logits = adc - torch.max(adc, dim=1, keepdim=True)[0].detach()
    mask = mask.repeat(n_views, n_views)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(bsz * n_views).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -(temperature / base_temperature) * mean_log_prob_pos


def test_oracle_matches_supcontrast():
    g = torch.Generator().manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(6, 2, 5, generator=g, dtype=torch.float64), dim=-1)
    f.requires_grad_()
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    ref = supcontrast_official(f, y)
    anchors = torch.cat(torch.unbind(f, dim=1), dim=0)
    ours = reference.supcon_contrast(anchors, y.repeat(2), logit_scale=1 / 0.07, eps=0.0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad(ours.sum(), f)
    (gb,) = torch.autograd.grad(ref.sum(), f)
    torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def _inputs(R, N, D, dtype, device, separate, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    C = max(2, R // 3)
    a = torch.randn(R, D * (2 if noncontig else 1), generator=g).to(dtype)
    a = (a[:, ::2] if noncontig else a).to(device).requires_grad_()
    la = torch.randint(0, C, (R,), generator=g).to(device)
    if not separate:
        return a, la, None, None
    k = torch.randn(N, D, generator=g).to(dtype).to(device).requires_grad_()
    lk = torch.randint(0, C, (N,), generator=g).to(device)
    return a, la, k, lk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("R,N,D,interpreter_s", SUPCON_SHAPES)
@pytest.mark.parametrize("separate", [False, True], ids=["self", "keys"])
def test_backend_matches_oracle(backend, dtype, R, N, D, interpreter_s, separate):
    """Loss (weighted sum, per row, mean) and the gradients of the anchors, keys and logit scale
    against the eager oracle, with and without the self column."""
    device = device_of(backend)
    if unsupported("supcon_contrast", backend, dtype):
        a, la, k, lk = _inputs(R, N, D, dtype, device, separate)
        assert_refused("float64", lambda: ops.supcon_contrast(a, la, k, lk, logit_scale=1.3, backend=backend))
        return
    skip_if_interpreted_and_slow(backend, interpreter_s)
    acc = accumulation(torch.empty(0, dtype=dtype))
    for exclude_self in (True, False):
        a, la, k, lk = _inputs(R, N, D, dtype, device, separate, noncontig=(D == 7))
        s = torch.tensor(1.3, device=device, dtype=acc, requires_grad=True)
        w = torch.rand(R, generator=torch.Generator().manual_seed(1), dtype=acc).to(device)
        args = dict(logit_scale=s, weight=w, exclude_self=exclude_self, reduction="sum")
        got = ops.supcon_contrast(a, la, k, lk, backend=backend, **args)
        inputs = [a, s] + ([k] if separate else [])
        g_got = torch.autograd.grad(got, inputs)
        ref = ops.supcon_contrast(a, la, k, lk, backend="eager", **args)
        g_ref = torch.autograd.grad(ref, inputs)
        assert_close(got, ref, dtype, "loss")
        for name, x, y in zip(("anchors", "scale", "keys"), g_got, g_ref):
            # A gradient sums R weighted rows: the atol grows with R.
            assert_close(x, y, dtype, f"grad {name}", atol=TOL[dtype]["atol"] * R, rtol=TOL[dtype]["rtol"] * 4)
        per_row = dict(logit_scale=s, exclude_self=exclude_self, backend=backend)
        rows = ops.supcon_contrast(a, la, k, lk, reduction="none", **per_row)
        expected = ops.supcon_contrast(a, la, k, lk, reduction="none", **{**per_row, "backend": "eager"})
        assert_close(rows, expected, dtype, "rows")
        assert_close(ops.supcon_contrast(a, la, k, lk, reduction="mean", **per_row), rows.mean(), dtype, "mean")


@pytest.mark.parametrize("backend", ["eager"] + BACKENDS)
def test_rows_without_a_positive_give_zero_and_no_gradient(backend):
    dev = device_of(backend)
    a = torch.randn(5, 4, device=dev, requires_grad=True)
    y = torch.tensor([0, 0, 1, 2, 2], device=dev)  # row 2 has no other row of its label
    rows = ops.supcon_contrast(a, y, logit_scale=2.0, reduction="none", backend=backend)
    assert float(rows[2].detach()) == 0.0 and torch.isfinite(rows).all() and (rows[[0, 1, 3, 4]] != 0).all()
    (ga,) = torch.autograd.grad(rows[2], a, retain_graph=True)
    # row 2's loss has no gradient; it still receives gradient as a column of the other rows
    (gb,) = torch.autograd.grad(rows.sum(), a)
    assert torch.equal(ga, torch.zeros_like(ga)) and torch.isfinite(gb).all()
    single = ops.supcon_contrast(a[:1], y[:1], logit_scale=2.0, reduction="none", backend=backend)
    assert float(single.detach()) == 0.0  # R = 1: no other row at all


@pytest.mark.parametrize("separate", [False, True], ids=["self", "keys"])
def test_gradcheck_float64_cpu(separate):
    a, la, k, lk = _inputs(6, 7, 5, torch.float64, "cpu", separate)
    s = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64)

    def f(a, s, *k_):
        return ops.supcon_contrast(
            a, la, k_[0] if k_ else None, lk, logit_scale=s, weight=w, reduction="none", backend="cpu"
        )

    assert torch.autograd.gradcheck(f, (a, s) + ((k,) if separate else ()))


@pytest.mark.parametrize("device, backend", backend_params())
def test_opcheck(device, backend):
    dt = torch.float64 if backend == "cpu" else torch.float32
    a, la, k, lk = _inputs(6, 7, 5, dt, device, True)
    s = torch.tensor(0.9, dtype=dt, device=device, requires_grad=True)
    torch.library.opcheck(supcon_contrast_op, (a, la, k, lk, s, 1e-7, True, backend))
    torch.library.opcheck(supcon_contrast_op, (a, la, a, la, s, 1e-7, False, backend))
    loss, stats = supcon_contrast_op(a.detach(), la, k.detach(), lk, s.detach(), 1e-7, True, backend)
    g = torch.rand(6, dtype=dt, device=device)
    torch.library.opcheck(
        supcon_contrast_backward_op, (a.detach(), la, k.detach(), lk, s.detach(), stats, g, True, True, backend)
    )


@pytest.mark.parametrize("device, backend", backend_params() + [pytest.param("cpu", "eager", id="cpu-eager")])
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    a, la, k, lk = _inputs(8, 9, 6, torch.float32, device, True)
    s = torch.tensor(1.5, device=device, requires_grad=True)

    def loss(a, k, s):
        return ops.supcon_contrast(a, la, logit_scale=s, reduction="mean", backend=backend) + ops.supcon_contrast(
            a, la, k, lk, logit_scale=s, reduction="sum", backend=backend
        )

    eager = loss(a, k, s)
    g_eager = torch.autograd.grad(eager, (a, k, s))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(a, k, s)
    g_comp = torch.autograd.grad(compiled, (a, k, s))
    torch.testing.assert_close(compiled, eager)
    for x, y in zip(g_comp, g_eager):
        torch.testing.assert_close(x, y)


def test_double_backward_is_an_error_not_zeros():
    a = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 0])
    loss = ops.supcon_contrast(a, y, logit_scale=2.0, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, a, create_graph=True)


def test_bad_input_names_the_argument():
    a = torch.randn(4, 3)
    y = torch.tensor([0, 1, 0, 1])
    bad = {
        "labels must be int64": dict(labels=y.float()),
        "labels has 3 entries": dict(labels=y[:3]),
        "keys and key_labels together": dict(keys=torch.randn(5, 3)),
        "keys has D = 2": dict(keys=torch.randn(5, 2), key_labels=torch.zeros(5, dtype=torch.long)),
        "key_labels has 4 entries": dict(keys=torch.randn(5, 3), key_labels=torch.zeros(4, dtype=torch.long)),
        "anchors has non-finite": dict(anchors=torch.tensor([[float("nan"), 0, 0]] * 4)),
        "logit_scale must be finite and > 0": dict(logit_scale=torch.tensor(-1.0)),
        "logit_scale must be finite": dict(logit_scale=float("inf")),
        "weight must be a floating": dict(weight=torch.ones(3)),
        "eps must be": dict(eps=-1.0),
        "reduction must be": dict(reduction="max"),
    }
    for match, override in bad.items():
        kw = {**dict(anchors=a, labels=y, logit_scale=1.0), **override}
        with pytest.raises((ValueError, TypeError), match=match):
            ops.supcon_contrast(**kw)
