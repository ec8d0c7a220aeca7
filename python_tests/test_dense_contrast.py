"""dense_contrast, dense_contrast_backward_keys and dense_contrast_reduced on every backend
(C++ CPU, Triton, CUDA) against the float64 oracle (docs/math.md §2, contract csrc/KERNELS.md):
loss, LSE and every per-row gradient (anchor, positive, keys, scale, bias), per dtype, on
helpers.DENSE_SHAPES / REDUCED_SHAPES; layouts, accuracy when the positive dominates, and the
public op (reductions, weights, grad_output, retained graphs)."""

import sys

import pytest
import torch
from helpers import (
    BACKENDS,
    DENSE_SHAPES,
    DTYPES,
    F64,
    REDUCED_SHAPES,
    accumulation,
    assert_close,
    assert_refused,
    device_of,
    grads,
    kernel,
    noncontiguous,
    per_row,
    precision,
    scalar,
    skip_if_interpreted_and_slow,
    tiles,
    unit_rows,
    unsupported,
)

import dcdkernels
from dcdkernels import reference as R

TRITON = [p for p in BACKENDS if p.values == ("triton",)]
KEEPS_POSITIVE_APART = ("cpu", "triton")  # see test_accurate_when_the_positive_dominates


def oracle(anchor, keys, target, positive, s, bias, grad_rows):
    """float64 per-row loss, LSE, d/danchor, d/dpositive, [d/ds, d/dbeta] (2, B) and the keys'
    gradient of sum_b grad_rows_b L_b."""
    B, dev = anchor.shape[0], anchor.device
    q, k = anchor.detach().to(F64).requires_grad_(), keys.detach().to(F64).requires_grad_()
    p = None if positive is None else positive.detach().to(F64).requires_grad_()
    s_col, b_col = per_row(s, B, dev), per_row(bias, B, dev)
    out, lse = R.dense_contrast(q, k, target, positive=p, logit_scale=s_col, bias=b_col)
    gq, gs, gb, *gp = grads(out.sum(), [q, s_col, b_col] + ([] if p is None else [p]))
    (gk,) = grads((out * grad_rows.to(F64)).sum(), [k])
    return out.detach(), lse, gq, gp[0] if gp else None, torch.stack([gs.view(-1), gb.view(-1)]), gk


def check(backend, anchor, keys, target, positive, s, bias, dtype, what="", split=None, tol=None):
    """Forward, keys' backward and the no-grad forward against the oracle."""
    B, dev = anchor.shape[0], anchor.device
    acc = accumulation(anchor, keys, positive)
    st, bt = scalar(s, acc, dev), scalar(bias, acc, dev)
    forward = kernel("dense_contrast", backend)
    out, lse, ga, gp, gsc = forward(anchor, keys, target, positive, st, bt, True, **tiles(backend, **(split or {})))
    grad_rows = torch.linspace(0.5, 1.5, B, device=dev, dtype=acc)
    gk = kernel("dense_contrast_backward_keys", backend)(anchor, keys, target, positive, st, bt, lse, grad_rows)
    e_out, e_lse, e_ga, e_gp, e_gsc, e_gk = oracle(anchor, keys, target, positive, s, bias, grad_rows)
    tol = tol or precision(backend, dtype)
    assert out.dtype == ga.dtype == gk.dtype == acc and gk.shape == keys.shape
    assert_close(out, e_out, tol, f"{what} loss")
    assert_close(lse, e_lse, tol, f"{what} lse")
    assert_close(ga, e_ga, tol, f"{what} grad_anchor")
    assert_close(gsc[0], e_gsc[0], tol, f"{what} d/ds")
    assert torch.equal(gsc[1], torch.zeros_like(gsc[1])), f"{what}: d/dbeta is written 0, exactly"
    assert_close(gk, e_gk, tol, f"{what} grad_keys")
    if positive is None:
        assert gp.shape == (0,)
    else:
        assert_close(gp, e_gp, tol, f"{what} grad_positive")
    no_grad = forward(anchor, keys, target, positive, st, bt, False, **tiles(backend, **(split or {})))
    assert all(x.shape == (0,) for x in no_grad[2:])
    assert_close(no_grad[0], e_out, tol, f"{what} loss without grad")


def case(B, M, D, dtype, mode, seed, device):
    """Non-contiguous anchors, unit keys, a target with duplicates (two anchors share a key, and
    more when B > M) or a positive per anchor."""
    g = torch.Generator().manual_seed(seed)
    anchor = noncontiguous(unit_rows(B, D, dtype, g, device), g)
    keys = unit_rows(M, D, dtype, g, device)
    target = positive = None
    if mode == "target":
        target = torch.randint(0, M, (B,), generator=g).to(device)
        target[-1] = target[0]
    else:
        positive = unit_rows(B, D, dtype, g, device)
    return anchor, keys, target, positive


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["target", "positive"])
@pytest.mark.parametrize("B,M,D,split,interpreter_s", DENSE_SHAPES)
def test_matches_oracle(backend, dtype, mode, B, M, D, split, interpreter_s):
    dev = device_of(backend)
    anchor, keys, target, positive = case(B, M, D, dtype, mode, seed=B + M + D, device=dev)
    s, bias = 1 / 0.1, (0.5 if B % 2 else None)
    refused = unsupported("dense_contrast", backend, dtype, D)
    if refused:
        assert_refused(
            refused,
            lambda: dcdkernels.dense_contrast(anchor, keys, target, positive=positive, logit_scale=s, backend=backend),
        )
        return
    skip_if_interpreted_and_slow(backend, interpreter_s)
    check(backend, anchor, keys, target, positive, s, bias, dtype, mode, split)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_mixed_dtypes(backend):
    """Non-contiguous anchors, keys, positive and target; anchors, keys and positive of three dtypes."""
    dev = device_of(backend)
    B, M, D = 11, 90, 130
    g = torch.Generator().manual_seed(0)
    q = unit_rows(B, D, torch.float32, g, dev)
    keys = unit_rows(M, D, torch.bfloat16, g, dev)
    positive = unit_rows(B, D, torch.float16, g, dev)
    target = torch.randint(0, M, (2 * B,), generator=g).to(dev)[::2]
    tol = precision(backend, torch.bfloat16)
    check(
        backend,
        noncontiguous(q, g, "slice"),
        noncontiguous(keys, g, "transpose"),
        target,
        None,
        7.0,
        None,
        tol,
        "strided target",
    )
    check(
        backend,
        noncontiguous(q, g, "transpose"),
        keys,
        None,
        noncontiguous(positive, g, "slice"),
        7.0,
        -0.5,
        tol,
        "strided positive",
    )


def oracle_reduced(anchor, keys, target, positive, s, bias, c):
    """float64 loss sum_b c_b L_b, per-row losses, LSE and the gradients of the loss."""
    q, k = anchor.detach().to(F64).requires_grad_(), keys.detach().to(F64).requires_grad_()
    p = None if positive is None else positive.detach().to(F64).requires_grad_()
    s_t = torch.tensor(s, dtype=F64, device=q.device, requires_grad=True)
    b_t = torch.tensor(0.0 if bias is None else bias, dtype=F64, device=q.device, requires_grad=True)
    rows, lse = R.dense_contrast(q, k, target, positive=p, logit_scale=s_t, bias=b_t)
    total = (rows * c.to(F64)).sum()
    gq, gk, gs, gb, *gp = grads(total, [q, k, s_t, b_t] + ([] if p is None else [p]))
    return total.detach(), rows.detach(), lse, gq, gk, torch.stack([gs, gb]), gp[0] if gp else None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["target", "positive"])
@pytest.mark.parametrize("B,M,D,interpreter_s", REDUCED_SHAPES)
def test_reduced_matches_oracle(backend, dtype, mode, B, M, D, interpreter_s):
    """Every gradient in the forward, with and without the keys' gradient (then the per-row
    kernel runs and its gradients are scaled by c)."""
    dev = device_of(backend)
    anchor, keys, target, positive = case(B, M, D, dtype, mode, seed=B + M + D + 1, device=dev)
    s, bias = 1 / 0.1, (0.5 if B % 2 else None)
    if unsupported("dense_contrast", backend, dtype, D):
        return  # refused, as test_matches_oracle asserts
    skip_if_interpreted_and_slow(backend, interpreter_s)
    acc = accumulation(anchor, keys)
    c = (torch.rand(B, generator=torch.Generator().manual_seed(B), dtype=F64) + 0.5).to(device=dev, dtype=acc)
    st, bt = scalar(s, acc, dev), scalar(bias, acc, dev)
    e_loss, e_rows, e_lse, e_ga, e_gk, e_gsc, e_gp = oracle_reduced(anchor, keys, target, positive, s, bias, c)
    tol = precision(backend, dtype)
    for keys_grad in (True, False):
        what = "with" if keys_grad else "without"
        loss, rows, lse, ga, gp, gk, gsc = kernel("dense_contrast_reduced", backend)(
            anchor, keys, target, positive, st, bt, c, keys_grad
        )
        assert loss.shape == () and gsc.shape == (2,)
        for name, got, want in [
            ("loss", loss, e_loss),
            ("rows", rows, e_rows),
            ("lse", lse, e_lse),
            ("grad_anchor", ga, e_ga),
            ("d/ds", gsc[0], e_gsc[0]),
        ]:
            assert_close(got, want, tol, f"{name} ({what} the keys' gradient)")
        assert gsc[1] == 0
        if keys_grad:
            assert gk.shape == (M, D) and gk.dtype == acc
            assert_close(gk, e_gk, tol, "grad_keys")
        else:
            assert gk.shape == (0,)
        if positive is None:
            assert gp.shape == (0,)
        else:
            assert_close(gp, e_gp, tol, f"grad_positive ({what} the keys' gradient)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["target", "positive"])
def test_accurate_when_the_positive_dominates(backend, mode):
    """Positive logit 60, the others 8 to 12 below: 1 - p+ ~ 2e-3. The C++ CPU and the Triton
    kernels keep the positive apart from the other columns (csrc/cpu/dense_contrast.cpp,
    dcdkernels/triton/dense_contrast.py), so the loss, d/dpositive, d/ds and the keys' gradient
    keep their digits in fp32, where the textbook LSE - l+ (eager, and the CUDA kernels today) is
    off by ~ulp(60) = 4e-6, a relative error of 2e-3: those backends are held to the float32 row
    of TOL here, the CPU and Triton kernels to the tight bounds."""
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(6)
    B, M, D, s = 4, 50, 64, 2.4
    q = 5 * unit_rows(B, D, F64, gen)
    # key_j = c_j q + noise orthogonal to q, with <q, key_j> = 25 - gap_j / s.
    gaps = 8 + 4 * torch.rand(B, M, generator=gen, dtype=F64)
    noise = torch.randn(B, M, D, generator=gen, dtype=F64)
    noise -= (noise @ q.unsqueeze(2)) * q.unsqueeze(1) / 25  # orthogonal to q_b
    per_row_keys = ((25 - gaps / s) / 25).unsqueeze(2) * q.unsqueeze(1) + noise  # (B, M, D)
    anchor = q.float().to(dev)
    if mode == "target":
        keys = per_row_keys.reshape(B * M, D).float().to(dev)  # row b's keys are rows b*M .. b*M + M - 1
        target = (torch.arange(B) * M + M // 2).to(dev)
        keys[target] = anchor  # <q_b, k+> = 25
        positive = None
    else:
        keys = per_row_keys[0].float().to(dev)  # row 0 gets the controlled gaps; rows 1.. are checked too
        target, positive = None, anchor.clone()
    st = torch.tensor(s, device=dev)
    loss, lse, ga, gp, gsc = kernel("dense_contrast", backend)(anchor, keys, target, positive, st, None, True)
    e_loss, e_lse, e_ga, e_gp, e_gsc, _ = oracle(anchor, keys, target, positive, s, None, torch.ones(B, device=dev))
    assert 1e-4 < e_loss[0] < 1e-2  # the regime under test
    f32 = torch.float32
    tight = lambda atol, rtol: dict(atol=atol, rtol=rtol) if backend in KEEPS_POSITIVE_APART else {}  # noqa: E731
    assert_close(loss, e_loss, f32, "loss", **tight(1e-8, 1e-4))
    assert_close(ga, e_ga, f32, "grad_anchor", **tight(1e-6, 1e-3))
    assert_close(gsc, e_gsc, f32, "scalars", **tight(1e-7, 1e-3))
    if positive is not None:
        assert_close(gp, e_gp, f32, "grad_positive", **tight(1e-7, 1e-3))
    # The reduced op keeps the positive apart too, and its key gradient gets 1 - p+ from the same sums.
    c = torch.ones(B, device=dev)
    _, rows, _, r_ga, r_gp, r_gk, r_gsc = kernel("dense_contrast_reduced", backend)(
        anchor, keys, target, positive, st, None, c, True
    )
    _, e_rows, _, e_ga, e_gk, e_gsc, e_gp = oracle_reduced(anchor, keys, target, positive, s, None, c)
    assert_close(rows, e_rows, f32, "reduced rows", **tight(1e-8, 1e-4))
    assert_close(r_ga, e_ga, f32, "reduced grad_anchor", **tight(1e-6, 1e-3))
    assert_close(r_gk, e_gk, f32, "reduced grad_keys", **tight(1e-7, 1e-3))
    assert_close(r_gsc[0], e_gsc[0], f32, "reduced d/ds", **tight(1e-7, 1e-3))
    if positive is not None:
        assert_close(r_gp, e_gp, f32, "reduced grad_positive", **tight(1e-7, 1e-3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_rejects_bad_target(backend):
    dev = device_of(backend)
    anchor, keys = torch.randn(2, 4, device=dev), torch.randn(5, 4, device=dev)
    for bad in (5, -1):
        with pytest.raises(ValueError, match="target"):
            dcdkernels.dense_contrast(
                anchor, keys, torch.tensor([0, bad], device=dev), logit_scale=1.0, backend=backend
            )
    with pytest.raises(ValueError, match="exactly one"):
        dcdkernels.dense_contrast(
            anchor,
            keys,
            torch.tensor([0, 1], device=dev),
            positive=torch.randn(2, 4, device=dev),
            logit_scale=1.0,
            backend=backend,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["target", "positive"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_public_op_matches_eager(backend, dtype, mode, reduction):
    """Through the dispatcher, the custom ops and their autograd formulas: per-row output and the
    reduced op (every gradient in the forward) against the eager oracle, gradients of anchors,
    keys, positive, scale, bias and a learnable per-row weight included."""
    dev = device_of(backend)
    if unsupported("dense_contrast", backend, dtype):
        return  # refused, as test_matches_oracle asserts
    for i, (B, M, D) in enumerate([(1, 1, 3), (5, 37, 130), (6, 3, 16)]):
        anchor, keys, target, positive = case(B, M, D, dtype, mode, seed=30 + i, device=dev)
        w0 = torch.rand(B, generator=torch.Generator().manual_seed(i), dtype=F64) + 0.5
        results = {}
        for be in (backend, "eager"):
            acc = accumulation(anchor)
            leaves = [
                x.detach().clone().requires_grad_()
                for x in (anchor, keys) + ((positive,) if positive is not None else ())
            ]
            s = torch.tensor(2.5, device=dev, dtype=acc, requires_grad=True)
            bias = torch.tensor(0.1, device=dev, dtype=acc, requires_grad=True)
            w = w0.to(device=dev, dtype=acc).requires_grad_()
            p = leaves[2] if positive is not None else None
            out = dcdkernels.dense_contrast(
                leaves[0],
                leaves[1],
                target,
                positive=p,
                logit_scale=s,
                bias=bias,
                weight=w,
                reduction=reduction,
                backend=be,
            )
            weight = torch.linspace(0.5, 1.5, out.numel(), device=dev, dtype=out.dtype).view_as(out)
            (out * weight).sum().backward()
            results[be] = [out] + [x.grad for x in leaves + [s, bias, w]]
        for j, (got, want) in enumerate(zip(results[backend], results["eager"])):
            assert_close(got, want, dtype, f"B={B} M={M} D={D} output {j} (0 the loss, then the gradients)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_grad_output_and_retained_graph(backend):
    """grad_output 1 (the saved gradients returned as they are) and 3 (scaled) both match the
    oracle, and a retained graph gives the same gradients again."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(4)
    q, keys = unit_rows(5, 16, torch.float32, g, dev), unit_rows(9, 16, torch.float32, g, dev)
    target = torch.tensor([0, 8, 3, 3, 1], device=dev)
    a, b = [x.clone().requires_grad_() for x in (q, keys)], [x.clone().requires_grad_() for x in (q, keys)]
    loss = dcdkernels.dense_contrast(*a, target, logit_scale=4.0, reduction="mean", backend=backend)
    expected = torch.autograd.grad(
        dcdkernels.dense_contrast(*b, target, logit_scale=4.0, reduction="mean", backend="eager"), b
    )
    once = torch.autograd.grad(loss, a, retain_graph=True)
    tripled = torch.autograd.grad(3 * loss, a, retain_graph=True)
    again = torch.autograd.grad(loss, a)
    for name, x, y, z, e in zip(["anchor", "keys"], once, tripled, again, expected):
        assert_close(x, e, torch.float32, f"grad {name}")
        assert_close(y, 3 * e, torch.float32, f"grad {name} x3")
        assert_close(z, e, torch.float32, f"grad {name} again")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_public_op_reductions_agree(backend, reduction):
    """Every reduction equals the reduced per-row output, with and without gradients (then the
    per-row kernel runs without its gradient outputs), and the LSE comes back with each."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(3)
    q, keys = unit_rows(4, 16, torch.float32, g, dev), unit_rows(9, 16, torch.float32, g, dev)
    target = torch.tensor([0, 8, 3, 3], device=dev)
    w = torch.rand(4, generator=g).to(dev)
    per_row_loss, lse = dcdkernels.dense_contrast(
        q, keys, target, logit_scale=4.0, weight=w, backend="eager", return_lse=True
    )
    expected = {"none": per_row_loss, "mean": per_row_loss.mean(), "sum": per_row_loss.sum()}[reduction]
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
        assert_close(out, expected, torch.float32, f"loss (grad={grad})")
        assert_close(lse_f, lse, torch.float32, f"lse (grad={grad})")
    with pytest.raises(ValueError, match="reduction"):
        dcdkernels.dense_contrast(q, keys, target, logit_scale=4.0, reduction="max", backend=backend)


# ------------------------------------------------------------------------------------------------
# Triton's own planning and its fp16 dot operands


@pytest.mark.parametrize("backend", TRITON)
def test_triton_key_split_plan(backend):
    """The forward split over the keys (flash-decoding partials + merge) is what a GPU takes when
    the anchor blocks cannot fill it (B = 64 is 4 programs for 132 SMs); forced splits are kept."""
    module = sys.modules["dcdkernels.triton.dense_contrast"]
    assert module.plan_key_splits(4, 65536, 64, 132) == (64, 1024)  # B = 64 on an H100: 256 programs
    assert module.plan_key_splits(4, 200, 64, None, 4)[0] == 4
    assert module.plan_key_splits(4, 200, 64, None) == (1, 256)  # the interpreter: one split


@pytest.mark.parametrize("backend", TRITON)
def test_triton_keys_backward_fp16_small_probabilities_do_not_underflow(backend, monkeypatch):
    """Issue 18, defect 2: with fp16 anchors and keys on a GPU the keys' backward rounds its dot
    operand ``g (P - onehot)`` to fp16, and ``g p`` (here g = 1/256, the "mean" weight at
    B = 256, times p ~ 1e-13) is below fp16's smallest subnormal: unscaled, the negatives' key
    gradients came out exactly 0. The GPU's fp16 dot is forced (under the interpreter it rounds
    the operands to fp16 as the GPU does); each key's gradient row must match the oracle to fp16
    precision relative to its own size."""
    import triton.language as tl

    dev = device_of(backend)
    module = sys.modules["dcdkernels.triton.dense_contrast"]
    forced = module._dot_dtype(torch.empty(1, dtype=torch.float16), torch.empty(1, dtype=torch.float16), True)
    assert forced == tl.float16
    monkeypatch.setattr(module, "_dot_dtype", lambda a, k, on_gpu=None: forced)
    gen = torch.Generator().manual_seed(18)
    B, M, D = 256, 32, 16
    direction = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    anchor = torch.nn.functional.normalize(direction + 0.1 * torch.randn(B, D, generator=gen), dim=1)
    keys = torch.cat(
        [
            torch.nn.functional.normalize(direction + 0.1 * torch.randn(4, D, generator=gen), dim=1),
            torch.nn.functional.normalize(-direction + 0.3 * torch.randn(M - 4, D, generator=gen), dim=1),
        ]
    )
    anchor, keys = anchor.half().to(dev), keys.half().to(dev)
    target = torch.randint(0, 4, (B,), generator=gen).to(dev)
    scale = 1 / 0.07
    s = torch.tensor(scale, device=dev)
    loss, lse, *_ = kernel("dense_contrast", backend)(anchor, keys, target, None, s, None, False)
    g = torch.full((B,), 1.0 / B, device=dev)
    grad_keys = kernel("dense_contrast_backward_keys", backend)(anchor, keys, target, None, s, None, lse, g)
    a64, k64 = anchor.double().cpu(), keys.double().cpu()
    p = torch.softmax(scale * a64 @ k64.t(), dim=1)
    p[torch.arange(B), target.cpu()] -= 1
    negatives = slice(4, M)
    assert (p[:, negatives] / B).max() < 2.0**-24  # g p below fp16's smallest subnormal: the defect's case
    expected = scale * (p / B).t() @ a64
    err = (grad_keys.double().cpu() - expected).norm(dim=1) / expected.norm(dim=1)
    assert err[negatives].max() < 1e-2, f"relative error of the negatives' key gradients: {err[negatives].max()}"
    assert err[:4].max() < 1e-2
