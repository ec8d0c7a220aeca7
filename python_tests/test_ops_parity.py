"""Every fused backend against the eager oracle through the public API: values and every
gradient, per dtype, on random shapes (B = 1, K = 1, D not a power of two, duplicate indices,
non-contiguous anchors, in-kernel sampling)."""

import pytest
import torch
from conftest import TOL, backend_params

import dcdkernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, K, N, D): B = 1, K = 1, D odd and not a power of two, D > a typical block.
SHAPES = [(1, 1, 5, 3), (3, 7, 11, 16), (4, 5, 9, 130), (2, 3, 6, 33)]


def _tol(dtype):
    return TOL[dtype]


def _case(shape, dtype, device, seed, noncontiguous=False):
    B, K, N, D = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    if noncontiguous:  # a column slice of a wider tensor: stride(0) != D
        q = torch.cat([q, torch.randn(B, 3, generator=g)], dim=1)[:, :D]
    bank = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    idx[:, -1] = idx[:, 0]  # a duplicate of the positive among the negatives
    q = q.to(device=device, dtype=dtype)
    return q, bank.to(device=device, dtype=dtype), idx.to(device)


def _grads(loss_fn, leaves):
    for t in leaves:
        t.grad = None
    out = loss_fn()
    weights = torch.linspace(0.5, 1.5, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), [t.grad.detach().clone() for t in leaves]


def _assert_close(actual, expected, dtype, what):
    tol = _tol(dtype)
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), msg=lambda m: f"{what}: {m}", **tol)


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _check(fn_fused, fn_eager, inputs, dtype, names):
    a = [_leaf(t) for t in inputs]
    b = [_leaf(t) for t in inputs]
    out_f, g_f = _grads(lambda: fn_fused(*a), a)
    out_e, g_e = _grads(lambda: fn_eager(*b), b)
    _assert_close(out_f, out_e, dtype, "loss")
    for name, x, y in zip(names, g_f, g_e):
        _assert_close(x, y, dtype, f"grad {name}")


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_sampled_contrast_matches_oracle(device, backend, dtype, loss):
    for i, shape in enumerate(SHAPES):
        q, bank, idx = _case(shape, dtype, device, seed=i, noncontiguous=(i % 2 == 1))
        s = torch.tensor(1 / 0.07 if loss == "nce" else 5.0, device=device)
        beta = torch.tensor(0.3, device=device)
        log_z = torch.tensor(2.0, device=device)

        def run(backend):
            return lambda q, s, beta: dcdkernels.sampled_contrast(
                q, bank, idx, logit_scale=s, bias=beta, loss=loss, log_z=log_z, backend=backend
            )

        _check(run(backend), run("eager"), [q, s, beta], dtype, ["anchor", "scale", "bias"])


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sampled_contrast_lse_and_in_kernel_sampling(device, backend, dtype):
    q, bank, idx = _case((3, 6, 13, 24), dtype, device, seed=7)
    positives = idx[:, 0].contiguous()
    fused, lse_f = dcdkernels.sampled_contrast(
        q, bank, positives, logit_scale=3.0, num_negatives=6, seed=11, offset=5, backend=backend, return_lse=True
    )
    explicit = dcdkernels.sample_negatives(positives, 6, 13, seed=11, offset=5)
    eager, lse_e = dcdkernels.sampled_contrast(q, bank, explicit, logit_scale=3.0, backend="eager", return_lse=True)
    _assert_close(fused, eager, dtype, "loss")
    _assert_close(lse_f, lse_e, dtype, "lse")


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_dual_sampled_contrast_matches_oracle(device, backend, dtype, loss):
    for i, shape in enumerate(SHAPES[:3]):
        qs, bank_s, idx = _case(shape, dtype, device, seed=10 + i, noncontiguous=(i == 1))
        qt, bank_t, _ = _case(shape, dtype, device, seed=20 + i)
        s = torch.tensor(4.0, device=device)
        beta = torch.tensor(-0.2, device=device)
        log_z = torch.tensor([1.0, 0.5], device=device)

        def run(backend):
            def f(qs, qt, s, beta):
                out = dcdkernels.dual_sampled_contrast(
                    qs,
                    qt,
                    bank_s,
                    bank_t,
                    idx,
                    logit_scale=s,
                    bias=beta,
                    loss=loss,
                    log_z=log_z,
                    consistency=0.5,
                    backend=backend,
                )
                return torch.stack([out.loss_s, out.loss_t, out.consistency])

            return f

        _check(run(backend), run("eager"), [qs, qt, s, beta], dtype, ["anchor_s", "anchor_t", "scale", "bias"])


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["target", "positive"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dense_contrast_matches_oracle(device, backend, dtype, mode, reduction):
    """Per-row output and the reduced op (every gradient in the forward) against the eager
    oracle, gradients included: anchors, keys, positive, scale, bias and a learnable per-row
    weight. B = 1, M = 1, D = 3, D = 130, M not a multiple of any tile, duplicate targets."""
    for i, (B, M, D) in enumerate([(1, 1, 3), (5, 37, 130), (3, 70, 16), (6, 3, 16)]):
        g = torch.Generator().manual_seed(30 + i)
        # Unit-norm embeddings, as every method feeds this op (logits within +-s).
        unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=1)
        q = unit(B, D).to(device=device, dtype=dtype)
        keys = unit(M, D).to(device=device, dtype=dtype)
        pos = unit(B, D).to(device=device, dtype=dtype)
        target = torch.randint(0, M, (B,), generator=g).to(device)
        w = (torch.rand(B, generator=g) + 0.5).to(device)
        s = torch.tensor(2.5, device=device)
        beta = torch.tensor(0.1, device=device)

        def run(backend):
            if mode == "target":
                return lambda q, keys, s, beta, w: dcdkernels.dense_contrast(
                    q, keys, target, logit_scale=s, bias=beta, weight=w, reduction=reduction, backend=backend
                )
            return lambda q, keys, p, s, beta, w: dcdkernels.dense_contrast(
                q, keys, positive=p, logit_scale=s, bias=beta, weight=w, reduction=reduction, backend=backend
            )

        inputs = [q, keys, s, beta, w] if mode == "target" else [q, keys, pos, s, beta, w]
        names = ["anchor", "keys", "scale", "bias", "weight"]
        if mode == "positive":
            names.insert(2, "positive")
        _check(run(backend), run("eager"), inputs, dtype, names)


@pytest.mark.parametrize("device, backend", backend_params())
def test_dense_contrast_reduced_grad_output_and_retained_graph(device, backend):
    """grad_output 1 (the saved gradients returned as they are) and 3 (scaled) both match the
    oracle, and a retained graph gives the same gradients again."""
    g = torch.Generator().manual_seed(4)
    q = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1).to(device)
    keys = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=1).to(device)
    target = torch.tensor([0, 8, 3, 3, 1], device=device)
    a, b = [_leaf(t) for t in (q, keys)], [_leaf(t) for t in (q, keys)]
    loss = dcdkernels.dense_contrast(*a, target, logit_scale=4.0, reduction="mean", backend=backend)
    expected = torch.autograd.grad(
        dcdkernels.dense_contrast(*b, target, logit_scale=4.0, reduction="mean", backend="eager"), b
    )
    once = torch.autograd.grad(loss, a, retain_graph=True)
    tripled = torch.autograd.grad(3 * loss, a, retain_graph=True)
    again = torch.autograd.grad(loss, a)
    for name, x, y, z, e in zip(["anchor", "keys"], once, tripled, again, expected):
        _assert_close(x, e, torch.float32, f"grad {name}")
        _assert_close(y, 3 * e, torch.float32, f"grad {name} x3")
        _assert_close(z, e, torch.float32, f"grad {name} again")


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dense_contrast_reductions_agree(device, backend, reduction):
    """Every reduction equals the reduced per-row output, with and without gradients (then the
    per-row kernel runs without its gradient outputs), and the LSE comes back with each."""
    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1).to(device)
    keys = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=1).to(device)
    target = torch.tensor([0, 8, 3, 3], device=device)
    w = torch.rand(4, generator=g).to(device)
    per_row, lse = dcdkernels.dense_contrast(
        q, keys, target, logit_scale=4.0, weight=w, backend="eager", return_lse=True
    )
    expected = {"none": per_row, "mean": per_row.mean(), "sum": per_row.sum()}[reduction]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out, lse_f = dcdkernels.dense_contrast(
                q.clone().requires_grad_(grad),
                keys,
                target,
                logit_scale=4.0,
                weight=w,
                reduction=reduction,
                backend=backend,
                return_lse=True,
            )
        _assert_close(out, expected, torch.float32, f"loss (grad={grad})")
        _assert_close(lse_f, lse, torch.float32, f"lse (grad={grad})")
    with pytest.raises(ValueError, match="reduction"):
        dcdkernels.dense_contrast(q, keys, target, logit_scale=4.0, reduction="max", backend=backend)


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bank_update_matches_oracle_with_duplicates(device, backend, dtype):
    for N, B, D in [(7, 1, 3), (9, 12, 130), (20, 8, 16)]:
        g = torch.Generator().manual_seed(N * B)
        bank = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device=device, dtype=dtype)
        index = torch.randint(0, min(N, 4), (B,), generator=g).to(device)  # many duplicates
        value = torch.randn(B, D, generator=g).to(device=device, dtype=torch.float32)
        fused, eager = bank.clone(), bank.clone()
        dcdkernels.bank_momentum_update_(fused, index, value, 0.5, backend=backend)
        dcdkernels.bank_momentum_update_(eager, index, value, 0.5, backend="eager")
        if dtype == torch.float32:
            _assert_close(fused, eager, dtype, "bank")
        else:  # one rounding to the bank dtype of the same fp32 value: at most one ulp apart
            torch.testing.assert_close(fused.float(), eager.float(), atol=1e-2, rtol=1e-2)
