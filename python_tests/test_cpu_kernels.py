"""The C++ CPU kernels (csrc/cpu) called directly through ``torch.ops.dcdkernels_C``, against the
eager oracle in ``dcdkernels.reference`` evaluated in float64 on the same (rounded) inputs.

Per-row gradients of the oracle come from one backward pass: the logit scale, bias and log Z are
given to the oracle as (B, 1) columns (they broadcast over each row's logits), so the gradient of
the summed loss w.r.t. them is the per-row gradient the kernels return.
"""

import math

import pytest
import torch

from dcdkernels import reference as R

_C = pytest.importorskip("dcdkernels._C", reason="the C++ extension is not built")
ops = torch.ops.dcdkernels_C

LOW = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = (*LOW, torch.float64)
INFONCE, NCE = 0, 1


def tol(dtype):
    """Tolerances of a kernel output against the float64 oracle: the kernels accumulate in fp32
    (fp64 for fp64 inputs), and both sides see the same rounded inputs."""
    return dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-5, rtol=5e-4)


def close(actual, expected, dtype, **kw):
    torch.testing.assert_close(actual.double(), expected.double(), **{**tol(dtype), **kw})


def unit_rows(n, d, dtype, gen):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def acc_of(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def column(value, B, requires_grad=True):
    """A scalar as a (B, 1) float64 leaf: the oracle's per-row gradient w.r.t. it."""
    return torch.full((B, 1), float(value), dtype=torch.float64, requires_grad=requires_grad)


def grads(total, inputs):
    return torch.autograd.grad(total, inputs, allow_unused=True, retain_graph=True)


# ------------------------------------------------------------------------------------------------
# sampled_contrast

SAMPLED_SHAPES = [  # (B, N, D, K)
    (1, 4, 3, 1),
    (7, 40, 130, 300),  # N << B (K+1): many duplicate rows
    (2, 500, 16, 1200),  # few anchors: the columns are split across threads and merged
    (3, 97, 130, 33),
]


def run_sampled(
    anchor, bank, index, s, bias, log_z, loss_type, num_negatives=0, seed=0, offset=0, grad=True, noise_rows=0
):
    acc = acc_of(anchor, bank)
    t = lambda v: None if v is None else torch.tensor(v, dtype=acc)  # noqa: E731
    return ops.sampled_contrast(
        anchor, bank, index, t(s), t(bias), t(log_z), loss_type, num_negatives, seed, offset, grad, noise_rows
    )


def oracle_sampled(anchor, bank, index, s, bias, log_z, loss_type):
    """Per-row loss, LSE and gradients [d/dq (B, D), d/ds (B,), d/dbeta (B,)] in float64."""
    B = anchor.shape[0]
    q = anchor.double().requires_grad_()
    s_col, b_col = column(s, B), column(0.0 if bias is None else bias, B)
    loss = "nce" if loss_type == NCE else "infonce"
    lz = None if log_z is None else column(log_z, B, requires_grad=False)
    per_row, lse = R.sampled_contrast(q, bank.double(), index, logit_scale=s_col, bias=b_col, loss=loss, log_z=lz)
    gq, gs, gb = grads(per_row.sum(), (q, s_col, b_col))
    return per_row.detach(), lse, gq, gs.squeeze(1), gb.squeeze(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", [INFONCE, NCE])
@pytest.mark.parametrize("shape", SAMPLED_SHAPES)
def test_sampled_matches_oracle(dtype, loss_type, shape):
    B, N, D, K = shape
    gen = torch.Generator().manual_seed(B * 1000 + D + K)
    anchor, bank = unit_rows(B, D, dtype, gen), unit_rows(N, D, dtype, gen)
    index = torch.randint(0, N, (B, K + 1), generator=gen)
    s, bias, log_z = 1 / 0.07, (0.25 if K % 2 else None), (math.log(N) + 2.0 if loss_type == NCE else None)
    loss, lse, ga, gsc = run_sampled(anchor, bank, index, s, bias, log_z, loss_type)
    e_loss, e_lse, e_ga, e_gs, e_gb = oracle_sampled(anchor, bank, index, s, bias, log_z, loss_type)
    acc = acc_of(anchor, bank)
    assert loss.dtype == lse.dtype == ga.dtype == gsc.dtype == acc
    assert ga.shape == (B, D) and gsc.shape == (2, B)
    close(loss, e_loss, dtype)
    close(lse, e_lse, dtype)
    close(ga, e_ga, dtype)
    close(gsc[0], e_gs, dtype)
    if loss_type == INFONCE:
        assert torch.equal(gsc[1], torch.zeros_like(gsc[1]))  # exactly 0, written not computed
    else:
        close(gsc[1], e_gb, dtype)


@pytest.mark.parametrize("loss_type", [INFONCE, NCE])
def test_sampled_mixed_dtypes_and_noncontiguous_anchor(loss_type):
    gen = torch.Generator().manual_seed(1)
    B, N, D, K = 5, 60, 130, 50
    wide = unit_rows(B, 2 * D, torch.float32, gen)
    anchor = wide[:, ::2]  # non-contiguous, fp32
    bank_storage = unit_rows(N, D + 6, torch.bfloat16, gen)
    bank = bank_storage[:, 3 : D + 3]  # row stride D + 6, rows contiguous, bf16
    assert not anchor.is_contiguous() and bank.stride() == (D + 6, 1)
    index = torch.randint(0, N, (B, K + 1), generator=gen)
    log_z = 5.0 if loss_type == NCE else None
    loss, lse, ga, gsc = run_sampled(anchor, bank, index, 10.0, -0.5, log_z, loss_type)
    e_loss, e_lse, e_ga, e_gs, _ = oracle_sampled(anchor, bank.contiguous(), index, 10.0, -0.5, log_z, loss_type)
    close(loss, e_loss, torch.float32)
    close(lse, e_lse, torch.float32)
    close(ga, e_ga, torch.float32)
    close(gsc[0], e_gs, torch.float32)


@pytest.mark.parametrize("loss_type", [INFONCE, NCE])
def test_sampled_without_grad(loss_type):
    gen = torch.Generator().manual_seed(2)
    anchor, bank = unit_rows(4, 8, torch.float32, gen), unit_rows(30, 8, torch.float32, gen)
    index = torch.randint(0, 30, (4, 20), generator=gen)
    log_z = 3.0 if loss_type == NCE else None
    with_grad = run_sampled(anchor, bank, index, 5.0, None, log_z, loss_type)
    loss, lse, ga, gsc = run_sampled(anchor, bank, index, 5.0, None, log_z, loss_type, grad=False)
    assert ga.shape == (0,) and gsc.shape == (0,)
    torch.testing.assert_close(loss, with_grad[0])
    torch.testing.assert_close(lse, with_grad[1])


@pytest.mark.parametrize("B,K", [(1, 3000), (6, 40)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 17, 12345)])
def test_sampled_in_kernel_sampling_matches_explicit_indices(B, K, seed, offset):
    gen = torch.Generator().manual_seed(3)
    N, D = 1000, 16
    anchor, bank = unit_rows(B, D, torch.float32, gen), unit_rows(N, D, torch.float32, gen)
    positive = torch.randint(0, N, (B,), generator=gen)
    index = R.sample_negatives(positive, K, N, seed, offset)
    for loss_type, log_z in ((INFONCE, None), (NCE, 4.0)):
        sampled = run_sampled(anchor, bank, positive, 8.0, None, log_z, loss_type, K, seed, offset)
        explicit = run_sampled(anchor, bank, index, 8.0, None, log_z, loss_type)
        for a, b in zip(sampled, explicit):
            torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same rows in the same order


def absent_index(B, K, N, gen):
    """(B, K+1) index with absent columns (rows outside [0, N), csrc/KERNELS.md): row 0 absent
    negatives (far out of range too), row 1 an absent positive, row 2 no present column, row 3
    only its positive, row 4 (if any) a run of absent columns over the middle 2/3 of its row."""
    index = torch.randint(0, N, (B, K + 1), generator=gen)
    index[0, 1::3] = torch.tensor([-1, N, 2**40, -(2**40)] * K)[: index[0, 1::3].numel()]
    index[1, 0] = N + 3
    index[2] = -1
    index[3, 1:] = N
    if B > 4:
        index[4, (K + 1) // 6 : 5 * (K + 1) // 6] = -7
    return index


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("loss_type", [INFONCE, NCE])
@pytest.mark.parametrize("shape", [(4, 30, 8, 9), (5, 500, 16, 1200)])  # the second splits each row into chunks
def test_sampled_absent_columns_match_oracle(dtype, loss_type, shape):
    B, N, D, K = shape
    gen = torch.Generator().manual_seed(K)
    anchor, bank = unit_rows(B, D, dtype, gen), unit_rows(N, D, dtype, gen)
    index = absent_index(B, K, N, gen)
    s, bias, log_z = 1 / 0.07, 0.25, (math.log(N) + 2.0 if loss_type == NCE else None)
    noise = 3 * N  # NCE's c = K / noise, not K / N
    loss, lse, ga, gsc = run_sampled(anchor, bank, index, s, bias, log_z, loss_type, noise_rows=noise)
    e_loss, e_lse, e_ga, e_gsc = R.sampled_contrast_outputs(
        anchor.double(),
        bank.double(),
        index,
        logit_scale=s,
        bias=bias,
        loss="nce" if loss_type == NCE else "infonce",
        log_z=log_z,
        noise_rows=noise,
    )
    close(loss, e_loss, dtype)
    close(lse, e_lse, dtype)
    close(ga, e_ga, dtype)
    close(gsc, e_gsc, dtype)
    # Row 2 has no present column: LSE -inf, InfoNCE loss -inf (NCE: no term), zero gradients.
    assert lse[2] == -math.inf and loss[2] == (-math.inf if loss_type == INFONCE else 0)
    assert torch.equal(ga[2], torch.zeros_like(ga[2])) and torch.equal(gsc[:, 2], torch.zeros_like(gsc[:, 2]))
    if loss_type == INFONCE:  # row 3, only the positive: loss 0, gradients 0
        close(loss[3], torch.zeros(()), dtype)
        close(ga[3], torch.zeros(D), dtype)


def test_sampled_absent_positive_with_in_kernel_sampling():
    gen = torch.Generator().manual_seed(3)
    N, D, K = 50, 16, 40
    anchor, bank = unit_rows(3, D, torch.float32, gen), unit_rows(N, D, torch.float32, gen)
    positive = torch.tensor([-1, 7, N])
    index = R.sample_negatives(positive, K, N, 5, 11)
    for loss_type, log_z in ((INFONCE, None), (NCE, 4.0)):
        sampled = run_sampled(anchor, bank, positive, 8.0, None, log_z, loss_type, K, 5, 11)
        explicit = run_sampled(anchor, bank, index, 8.0, None, log_z, loss_type)
        for a, b in zip(sampled, explicit):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sampled_rejects_bad_arguments():
    anchor, bank = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(RuntimeError, match="num_negatives"):  # a 2-D index already has its negatives
        run_sampled(anchor, bank, torch.zeros(2, 5, dtype=torch.int64), 1.0, None, None, INFONCE, num_negatives=4)
    with pytest.raises(RuntimeError, match="noise_rows"):
        run_sampled(anchor, bank, torch.zeros(2, 5, dtype=torch.int64), 1.0, None, 0.0, NCE, noise_rows=-1)


# ------------------------------------------------------------------------------------------------
# dual_sampled_contrast


def oracle_dual(zs, zt, bank_s, bank_t, index, s, bias, log_z, loss_type, compute_kl):
    """float64: losses (3, B), lse (2, B), grad_anchors (4, B, D), grad_scalars (2, 3, B)."""
    B = zs.shape[0]
    qs, qt = zs.double().requires_grad_(), zt.double().requires_grad_()
    s_col, b_col = column(s, B), column(0.0 if bias is None else bias, B)
    lz = None if log_z is None else [column(v, B, requires_grad=False) for v in log_z]
    loss = "nce" if loss_type == NCE else "infonce"
    loss_s, loss_t, kl, lse_s, lse_t = R.dual_sampled_contrast(
        qs,
        qt,
        bank_s.double(),
        bank_t.double(),
        index,
        logit_scale=s_col,
        bias=b_col,
        loss=loss,
        log_z=lz,
        compute_kl=compute_kl,
    )
    terms = (loss_s, loss_t, kl)
    g = [grads(term.sum(), (qs, qt, s_col, b_col)) if term.requires_grad else (None,) * 4 for term in terms]
    zero_vec, zero_row = torch.zeros_like(qs), torch.zeros(B, dtype=torch.float64)
    pick = lambda x, zero: zero if x is None else x  # noqa: E731
    grad_anchors = torch.stack(
        [pick(g[0][0], zero_vec), pick(g[1][1], zero_vec), pick(g[2][0], zero_vec), pick(g[2][1], zero_vec)]
    )
    grad_scalars = torch.stack(
        [torch.stack([pick(g[j][i], zero_row.view(B, 1)).squeeze(1) for j in range(3)]) for i in (2, 3)]
    )
    return (torch.stack([t.detach() for t in terms]), torch.stack([lse_s, lse_t]), grad_anchors, grad_scalars)


def run_dual(
    zs, zt, bank_s, bank_t, index, s, bias, log_z, loss_type, compute_kl, num_negatives=0, seed=0, offset=0, grad=True
):
    acc = acc_of(zs, zt, bank_s, bank_t)
    t = lambda v: None if v is None else torch.tensor(v, dtype=acc)  # noqa: E731
    return ops.dual_sampled_contrast(
        zs, zt, bank_s, bank_t, index, t(s), t(bias), t(log_z), loss_type, compute_kl, num_negatives, seed, offset, grad
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,compute_kl", [(INFONCE, True), (INFONCE, False), (NCE, False), (NCE, True)])
@pytest.mark.parametrize("shape", [(1, 4, 3, 1), (6, 50, 130, 200), (2, 300, 16, 900)])
def test_dual_matches_oracle(dtype, loss_type, compute_kl, shape):
    B, N, D, K = shape
    gen = torch.Generator().manual_seed(B + D + K)
    zs, zt = unit_rows(B, D, dtype, gen), unit_rows(B, D, dtype, gen)
    bank_s, bank_t = unit_rows(N, D, dtype, gen), unit_rows(N, D, dtype, gen)
    index = torch.randint(0, N, (B, K + 1), generator=gen)
    s, bias = 1 / 0.07, (0.1 if D == 16 else None)
    log_z = (math.log(N) + 1.0, math.log(N) + 3.0) if loss_type == NCE else None
    losses, lse, ga, gsc = run_dual(zs, zt, bank_s, bank_t, index, s, bias, log_z, loss_type, compute_kl)
    e_losses, e_lse, e_ga, e_gsc = oracle_dual(zs, zt, bank_s, bank_t, index, s, bias, log_z, loss_type, compute_kl)
    assert ga.shape == (4, B, D) and gsc.shape == (2, 3, B)
    close(losses, e_losses, dtype)
    close(lse, e_lse, dtype)
    close(ga, e_ga, dtype)
    close(gsc, e_gsc, dtype)
    assert torch.equal(gsc[1, 2], torch.zeros(B, dtype=gsc.dtype))  # dKL/dbeta = 0 exactly
    if loss_type == INFONCE:
        assert torch.equal(gsc[1, :2], torch.zeros(2, B, dtype=gsc.dtype))
    if not compute_kl:
        assert torch.equal(losses[2], torch.zeros(B, dtype=losses.dtype))


def test_dual_mixed_dtypes_sampling_and_no_grad():
    gen = torch.Generator().manual_seed(4)
    B, N, D, K = 3, 200, 24, 500
    zs, zt = unit_rows(B, D, torch.float32, gen), unit_rows(B, 2 * D, torch.float16, gen)[:, ::2]
    bank_s, bank_t = unit_rows(N, D, torch.bfloat16, gen), unit_rows(N, D, torch.bfloat16, gen)
    positive = torch.randint(0, N, (B,), generator=gen)
    index = R.sample_negatives(positive, K, N, 7, 99)
    sampled = run_dual(zs, zt, bank_s, bank_t, positive, 12.0, None, None, INFONCE, True, K, 7, 99)
    explicit = run_dual(zs, zt, bank_s, bank_t, index, 12.0, None, None, INFONCE, True)
    for a, b in zip(sampled, explicit):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    e_losses, e_lse, e_ga, e_gsc = oracle_dual(zs, zt, bank_s, bank_t, index, 12.0, None, None, INFONCE, True)
    close(sampled[0], e_losses, torch.float32)
    close(sampled[2], e_ga, torch.float32)
    close(sampled[3], e_gsc, torch.float32)
    losses, lse, ga, gsc = run_dual(zs, zt, bank_s, bank_t, index, 12.0, None, None, INFONCE, True, grad=False)
    assert ga.shape == (0,) and gsc.shape == (0,)
    torch.testing.assert_close(losses, explicit[0])
    torch.testing.assert_close(lse, explicit[1])
    with pytest.raises(RuntimeError, match="share one dtype"):  # contract: one bank dtype
        run_dual(zs, zt, bank_s, bank_t.float(), index, 12.0, None, None, INFONCE, True)
    for bad in (N, -1):  # absent columns (csrc/KERNELS.md): never read, the oracle's outputs
        wrong = index.clone()
        wrong[1, 3] = bad
        got = run_dual(zs, zt, bank_s, bank_t, wrong, 12.0, None, None, INFONCE, True)
        want = R.dual_sampled_contrast_outputs(
            zs, zt, bank_s, bank_t, wrong, logit_scale=torch.tensor(12.0), compute_kl=True
        )
        for a, b in zip(got, want):
            close(a, b, torch.float32)
    # An absent positive with in-kernel sampling: the same as the explicit index of that stream.
    bad_pos = torch.tensor([0, N, 1])
    got = run_dual(zs, zt, bank_s, bank_t, bad_pos, 12.0, None, None, INFONCE, True, K, 7, 99)
    want = run_dual(zs, zt, bank_s, bank_t, R.sample_negatives(bad_pos, K, N, 7, 99), 12.0, None, None, INFONCE, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# dense_contrast and dense_contrast_backward_keys


def oracle_dense(anchor, keys, target, positive, s, bias, grad_rows):
    B = anchor.shape[0]
    q, k = anchor.double().requires_grad_(), keys.double().requires_grad_()
    p = None if positive is None else positive.double().requires_grad_()
    s_col, b_col = column(s, B), column(0.0 if bias is None else bias, B)
    per_row, lse = R.dense_contrast(q, k, target, positive=p, logit_scale=s_col, bias=b_col)
    gq, gs, gb, *gp = grads(per_row.sum(), (q, s_col, b_col) + (() if p is None else (p,)))
    gp = gp[0] if gp else None
    (gk,) = grads((per_row * grad_rows.double()).sum(), (k,))
    return per_row.detach(), lse, gq, gp, torch.stack([gs.squeeze(1), gb.squeeze(1)]), gk


DENSE_SHAPES = [  # (B, M, D): M crosses a key tile (1024 rows at D <= 256, 128 at D = 2048)
    (1, 1, 3),
    (5, 1030, 130),
    (3, 300, 2048),
    (300, 40, 8),  # more anchors than one anchor tile (256)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["target", "positive"])
@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_matches_oracle(dtype, mode, shape):
    B, M, D = shape
    gen = torch.Generator().manual_seed(B + M + D)
    anchor = unit_rows(B, 2 * D, dtype, gen)[:, ::2]  # non-contiguous
    keys = unit_rows(M, D, dtype, gen)
    target = torch.randint(0, M, (B,), generator=gen) if mode == "target" else None  # duplicates when B > M
    positive = unit_rows(B, D, dtype, gen) if mode == "positive" else None
    s, bias = 1 / 0.1, (0.5 if B % 2 else None)
    grad_rows = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    acc = acc_of(anchor, keys)
    t = lambda v: None if v is None else torch.tensor(v, dtype=acc)  # noqa: E731
    loss, lse, ga, gp, gsc = ops.dense_contrast(anchor, keys, target, positive, t(s), t(bias), True)
    gk = ops.dense_contrast_backward_keys(anchor, keys, target, positive, t(s), t(bias), lse, grad_rows.to(acc))
    e_loss, e_lse, e_ga, e_gp, e_gsc, e_gk = oracle_dense(anchor, keys, target, positive, s, bias, grad_rows)
    close(loss, e_loss, dtype)
    close(lse, e_lse, dtype)
    close(ga, e_ga, dtype)
    close(gsc, e_gsc, dtype)
    assert torch.equal(gsc[1], torch.zeros_like(gsc[1]))
    close(gk, e_gk, dtype)
    if positive is None:
        assert gp.shape == (0,)
    else:
        close(gp, e_gp, dtype)
    no_grad = ops.dense_contrast(anchor, keys, target, positive, t(s), t(bias), False)
    assert all(x.shape == (0,) for x in no_grad[2:])
    torch.testing.assert_close(no_grad[0], loss)


@pytest.mark.parametrize("mode", ["target", "positive"])
def test_dense_is_accurate_when_the_positive_dominates(mode):
    """Positive logit 60, the others 8 to 12 below: 1 - p+ ~ 2e-3. The kernel keeps the positive
    apart from the other columns, so the loss, d/dpositive and d/ds keep their digits in fp32;
    the textbook LSE - l+ would be off by ~ulp(60) = 4e-6, a relative error of 2e-3."""
    gen = torch.Generator().manual_seed(6)
    B, M, D, s = 4, 50, 64, 2.4
    q = 5 * unit_rows(B, D, torch.float64, gen)
    # key_j = c_j q + noise orthogonal to q, with <q, key_j> = 25 - gap_j / s.
    gaps = 8 + 4 * torch.rand(B, M, generator=gen, dtype=torch.float64)
    noise = torch.randn(B, M, D, generator=gen, dtype=torch.float64)
    noise -= (noise @ q.unsqueeze(2)) * q.unsqueeze(1) / 25  # orthogonal to q_b
    per_row_keys = ((25 - gaps / s) / 25).unsqueeze(2) * q.unsqueeze(1) + noise  # (B, M, D)
    anchor = q.float()
    if mode == "target":
        keys = per_row_keys.reshape(B * M, D).float()  # row b's keys are rows b*M .. b*M + M - 1
        target = torch.arange(B) * M + M // 2
        keys[target] = anchor  # <q_b, k+> = 25
        positive = None
    else:
        keys = per_row_keys[0].float()  # row 0 gets the controlled gaps; rows 1.. are checked too
        target, positive = None, anchor.clone()
    loss, lse, ga, gp, gsc = ops.dense_contrast(anchor, keys, target, positive, torch.tensor(s), None, True)
    e_loss, e_lse, e_ga, e_gp, e_gsc, _ = oracle_dense(anchor, keys, target, positive, s, None, torch.ones(B))
    assert 1e-4 < e_loss[0] < 1e-2  # the regime under test
    close(loss, e_loss, torch.float32, atol=1e-8, rtol=1e-4)
    close(ga, e_ga, torch.float32, atol=1e-6, rtol=1e-3)
    close(gsc, e_gsc, torch.float32, atol=1e-7, rtol=1e-3)
    if positive is not None:
        close(gp, e_gp, torch.float32, atol=1e-7, rtol=1e-3)
    # The reduced op keeps the positive apart too, and its key gradient gets 1 - p+ from the same sums.
    c = torch.ones(B)
    _, rows, _, r_ga, r_gp, r_gk, r_gsc = ops.dense_contrast_reduced(
        anchor, keys, target, positive, torch.tensor(s), None, c, True
    )
    _, e_rows, _, e_ga, e_gk, e_gsc, e_gp = oracle_reduced(anchor, keys, target, positive, s, None, c)
    close(rows, e_rows, torch.float32, atol=1e-8, rtol=1e-4)
    close(r_ga, e_ga, torch.float32, atol=1e-6, rtol=1e-3)
    close(r_gk, e_gk, torch.float32, atol=1e-7, rtol=1e-3)
    close(r_gsc[0], e_gsc[0], torch.float32, atol=1e-7, rtol=1e-3)
    if positive is not None:
        close(r_gp, e_gp, torch.float32, atol=1e-7, rtol=1e-3)


# dense_contrast_reduced: a strip of dots holds max(1, 2**20 // (M * element size)) anchors.
REDUCED_SHAPES = [  # (B, M, D)
    (1, 1, 3),
    (5, 1030, 130),
    (3, 300, 2048),
    (300, 1030, 8),  # several strips: 254 anchors per fp32 strip, 127 per fp64 strip
    (40, 9000, 8),  # strips of 29 (fp32) or 14 (fp64) anchors would be too thin: the per-row kernels
]


def oracle_reduced(anchor, keys, target, positive, s, bias, c):
    """float64 loss sum_b c_b L_b, per-row losses, LSE and the gradients of the loss."""
    q, k = anchor.detach().double().requires_grad_(), keys.detach().double().requires_grad_()
    p = None if positive is None else positive.detach().double().requires_grad_()
    s_t = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    b_t = torch.tensor(0.0 if bias is None else bias, dtype=torch.float64, requires_grad=True)
    per_row, lse = R.dense_contrast(q, k, target, positive=p, logit_scale=s_t, bias=b_t)
    total = (per_row * c.double()).sum()
    gq, gk, gs, gb, *gp = grads(total, (q, k, s_t, b_t) + (() if p is None else (p,)))
    return total.detach(), per_row.detach(), lse, gq, gk, torch.stack([gs, gb]), gp[0] if gp else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["target", "positive"])
@pytest.mark.parametrize("shape", REDUCED_SHAPES)
def test_dense_reduced_matches_oracle(dtype, mode, shape):
    B, M, D = shape
    gen = torch.Generator().manual_seed(B + M + D + 1)
    anchor = unit_rows(B, 2 * D, dtype, gen)[:, ::2]  # non-contiguous
    keys = unit_rows(M, D, dtype, gen)
    target = torch.randint(0, M, (B,), generator=gen) if mode == "target" else None  # duplicates when B > M
    positive = unit_rows(B, D, dtype, gen) if mode == "positive" else None
    s, bias = 1 / 0.1, (0.5 if B % 2 else None)
    acc = acc_of(anchor, keys)
    c = (torch.rand(B, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    t = lambda v: None if v is None else torch.tensor(v, dtype=acc)  # noqa: E731
    loss, rows, lse, ga, gp, gk, gsc = ops.dense_contrast_reduced(
        anchor, keys, target, positive, t(s), t(bias), c, True
    )
    e_loss, e_rows, e_lse, e_ga, e_gk, e_gsc, e_gp = oracle_reduced(anchor, keys, target, positive, s, bias, c)
    assert loss.shape == () and gsc.shape == (2,) and gk.shape == (M, D) and gk.dtype == acc
    close(loss, e_loss, dtype)
    close(rows, e_rows, dtype)
    close(lse, e_lse, dtype)
    close(ga, e_ga, dtype)
    close(gk, e_gk, dtype)
    close(gsc[0], e_gsc[0], dtype)
    assert gsc[1] == 0
    if positive is None:
        assert gp.shape == (0,)
    else:
        close(gp, e_gp, dtype)
    # Without a key gradient: the per-row kernel, its gradients times c.
    loss, rows, lse, ga, gp, gk, gsc = ops.dense_contrast_reduced(
        anchor, keys, target, positive, t(s), t(bias), c, False
    )
    assert gk.shape == (0,)
    for actual, expected in [(loss, e_loss), (rows, e_rows), (lse, e_lse), (ga, e_ga), (gsc[0], e_gsc[0])]:
        close(actual, expected, dtype)
    assert gsc[1] == 0
    if positive is not None:
        close(gp, e_gp, dtype)


def test_dense_rejects_bad_target():
    anchor, keys = torch.randn(2, 4), torch.randn(5, 4)
    s = torch.tensor(1.0)
    for bad in (5, -1):
        with pytest.raises(RuntimeError, match="out of range"):
            ops.dense_contrast(anchor, keys, torch.tensor([0, bad]), None, s, None, True)
    with pytest.raises(RuntimeError, match="exactly one"):
        ops.dense_contrast(anchor, keys, torch.tensor([0, 1]), torch.randn(2, 4), s, None, True)


# ------------------------------------------------------------------------------------------------
# bank_momentum_update_


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_bank_update_matches_oracle_with_duplicates(dtype, value_dtype):
    gen = torch.Generator().manual_seed(5)
    N, D, B = 50, 130, 40
    storage = unit_rows(N, D + 2, dtype, gen)
    bank = storage[:, :D]  # strided rows
    index = torch.randint(0, 12, (B,), generator=gen)  # many duplicates
    value = unit_rows(B, D, value_dtype, gen)
    original = bank.clone()
    expected = R.bank_momentum_update_(bank.clone(), index, value, 0.5)
    untouched = storage[:, D:].clone()
    ops.bank_momentum_update_(bank, index, value, 0.5)
    # One rounding to the bank dtype: at most one unit in the last place apart.
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else 1e-15
    torch.testing.assert_close(bank.double(), expected.double(), atol=eps, rtol=eps)
    assert torch.equal(storage[:, D:], untouched)
    # Independently of the oracle: row i is updated once, from its old value and the value at
    # the last position p holding i.
    last = {int(i): p for p, i in enumerate(index.tolist())}
    for i, p in last.items():
        mixed = 0.5 * original[i].double() + 0.5 * value[p].double()
        torch.testing.assert_close(bank[i].double(), mixed / mixed.norm(), atol=2 * eps, rtol=2 * eps)


def test_bank_update_validates_before_mutating():
    bank = torch.randn(10, 4)
    before = bank.clone()
    # The kernel itself checks range and finiteness (ValueError) before writing: on CPU the
    # Python layer relies on it instead of running its own reductions.
    for bad in (10, -1):
        with pytest.raises(ValueError, match="index has entries out of range"):
            ops.bank_momentum_update_(bank, torch.tensor([1, 2, bad]), torch.randn(3, 4), 0.5)
    for bad in (float("nan"), float("inf")):
        value = torch.randn(3, 4)
        value[2, 3] = bad
        with pytest.raises(ValueError, match="value has non-finite"):
            ops.bank_momentum_update_(bank, torch.tensor([1, 2, 3]), value, 0.5)
        with pytest.raises(ValueError, match="value has non-finite"):
            ops.bank_momentum_update_(bank, torch.tensor([1, 2, 3]), value.to(torch.bfloat16), 0.5)
    with pytest.raises(RuntimeError):
        ops.bank_momentum_update_(bank, torch.tensor([1, 2]), torch.randn(3, 4), 0.5)
    assert torch.equal(bank, before)
    ops.bank_momentum_update_(bank, torch.tensor([], dtype=torch.int64), torch.randn(0, 4), 0.5)
    assert torch.equal(bank, before)
