"""The CUDA kernels of dcdkernels._C (csrc/cuda/*.cu), op by op, against the eager oracle.

Every output of the contract (csrc/KERNELS.md) is checked: loss, lse and each gradient, per
storage dtype, on shapes that reach every path of the kernels: B = 1, K = 1, D in {3, 130, 2048}
(element-wise loads when D is not a multiple of the vector width, a warp or less per row, a
whole block per row), D above 2048 (dense: several dim slices), large K (the split-K merge over
many chunks), duplicate indices, non-contiguous anchors and index, misaligned bank rows, mixed
dtypes, in-kernel sampling against dcdkernels.reference.rng, rows out of range.

The oracle runs in float64 on the very same (already rounded) inputs, with a per-row logit
scale and bias so that autograd gives the per-row d/ds and d/dbeta. The kernels accumulate in
fp32 whatever the storage dtype, so the fp32 tolerance applies to every dtype; only values
stored back in a 16-bit dtype (the bank update) use the 16-bit tolerance.
Skipped without a CUDA device.
"""

import pytest
import torch
from conftest import TOL

import dcdkernels
from dcdkernels import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FP32 = TOL[torch.float32]
F64 = torch.float64


def ops():
    return torch.ops.dcdkernels_C


def close(actual, expected, what, tol=FP32):
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), msg=lambda m: f"{what}: {m}", **tol)


def rand_rows(n, d, gen, dtype, normalize=True):
    x = torch.randn(n, d, generator=gen)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
    return x.to(device=DEVICE, dtype=dtype)


def noncontiguous(x, gen, how):
    """The same values in a non-contiguous layout: a column slice of a wider tensor, or a transpose."""
    if how == "slice":
        wide = torch.randn(x.shape[0], x.shape[1] + 3, generator=gen).to(device=x.device, dtype=x.dtype)
        wide[:, 1 : 1 + x.shape[1]] = x
        return wide[:, 1 : 1 + x.shape[1]]
    return x.t().contiguous().t()


def misaligned(bank):
    """The same rows starting one element past a 16-byte boundary, with an odd row stride."""
    full = torch.zeros(bank.shape[0], bank.shape[1] + 2, device=bank.device, dtype=bank.dtype)
    full[:, 1 : 1 + bank.shape[1]] = bank
    return full[:, 1 : 1 + bank.shape[1]]


def scalar(v):
    return None if v is None else torch.tensor(v, device=DEVICE, dtype=torch.float32)


def per_row(v, B):
    """A (B, 1) float64 leaf: per-row copies of a scalar, so that autograd gives per-row derivatives."""
    return torch.full((B, 1), 0.0 if v is None else float(v), device=DEVICE, dtype=F64, requires_grad=True)


def grads(out, leaves, weights=None):
    """d(sum_b w_b out_b)/d leaf for each leaf (zeros where a leaf is not reached)."""
    total = out.sum() if weights is None else (out * weights).sum()
    gs = torch.autograd.grad(total, leaves, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]


def test_cuda_kernels_are_built():
    avail = dcdkernels.availability()["cuda"]
    assert avail[0], avail[1]


# ---------------------------------------------------------------------------------------------
# sampled_contrast

# (B, K, N, D): B = 1 with K = 1 and D = 3; D = 130 (no 16-byte fragments); a thread per row
# (D = 8); the usual D = 128 over several chunks; many chunks; a block per row (D = 2048, 4096).
SAMPLED_SHAPES = [
    (1, 1, 5, 3),
    (4, 7, 50, 130),
    (5, 33, 64, 8),
    (3, 300, 1000, 128),
    (2, 5000, 3000, 64),
    (2, 40, 100, 2048),
    (3, 17, 40, 4096),
]


def sampled_case(B, K, N, D, dtype, seed, bank_dtype=None):
    g = torch.Generator().manual_seed(seed)
    q = rand_rows(B, D, g, dtype)
    bank = rand_rows(N, D, g, bank_dtype or dtype)
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    idx[:, -1] = idx[:, 0]  # the positive again among the negatives
    if K >= 3:
        idx[:, 2] = idx[:, 1]  # a repeated negative
    return q, bank, idx.to(DEVICE)


def sampled_oracle(q, bank, idx, s, beta, loss, log_z):
    """(loss, lse, grad_anchor, d/ds, d/dbeta) per row, in float64."""
    B = q.shape[0]
    q64 = q.detach().to(F64).requires_grad_()
    s_row, b_row = per_row(s, B), per_row(beta, B)
    out, lse = reference.sampled_contrast(q64, bank.to(F64), idx, logit_scale=s_row, bias=b_row, loss=loss, log_z=log_z)
    ga, gs, gb = grads(out, [q64, s_row, b_row])
    return out.detach(), lse, ga, gs.view(-1), gb.view(-1)


def sampled_kernel(
    q, bank, idx, s, beta, loss, log_z, num_negatives=0, seed=0, offset=0, compute_grad=True, noise_rows=0
):
    return ops().sampled_contrast(
        q,
        bank,
        idx,
        scalar(s),
        scalar(beta),
        scalar(log_z),
        0 if loss == "infonce" else 1,
        num_negatives,
        seed,
        offset,
        compute_grad,
        noise_rows,
    )


def check_sampled(q, bank, idx, s, beta, loss, log_z, what):
    out, lse, ga, gsc = sampled_kernel(q, bank, idx, s, beta, loss, log_z)
    e_out, e_lse, e_ga, e_gs, e_gb = sampled_oracle(q, bank, idx, s, beta, loss, log_z)
    assert out.dtype == lse.dtype == ga.dtype == gsc.dtype == torch.float32
    assert ga.shape == q.shape and gsc.shape == (2, q.shape[0])
    close(out, e_out, f"{what} loss")
    close(lse, e_lse, f"{what} lse")
    close(ga, e_ga, f"{what} grad_anchor")
    close(gsc[0], e_gs, f"{what} d/ds")
    if loss == "infonce":
        assert torch.all(gsc[1] == 0), f"{what}: InfoNCE d/dbeta must be exactly 0"
    else:
        close(gsc[1], e_gb, f"{what} d/dbeta")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
@pytest.mark.parametrize("shape", SAMPLED_SHAPES, ids=lambda s: "B{}-K{}-N{}-D{}".format(*s))
def test_sampled_contrast(shape, loss, dtype):
    q, bank, idx = sampled_case(*shape, dtype, seed=sum(shape))
    s, beta, log_z = (1 / 0.07, 0.3, 9.0) if loss == "nce" else (5.0, 0.3, None)
    check_sampled(q, bank, idx, s, beta, loss, log_z, "contiguous")


@pytest.mark.parametrize("loss", ["infonce", "nce"])
@pytest.mark.parametrize("D", [3, 130, 2048])
def test_sampled_contrast_layouts(D, loss):
    """Non-contiguous anchors and index, misaligned bank rows, mixed anchor/bank dtypes."""
    s, beta, log_z = (1 / 0.07, None, 9.0) if loss == "nce" else (4.0, None, None)
    for i, (qd, bd) in enumerate(
        [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32)]
    ):
        g = torch.Generator().manual_seed(100 + i)
        q, bank, idx = sampled_case(3, 37, 80, D, qd, seed=D + i, bank_dtype=bd)
        check_sampled(q, bank, idx, s, beta, loss, log_z, f"{qd}/{bd}")
        check_sampled(noncontiguous(q, g, "slice"), bank, idx, s, beta, loss, log_z, "sliced anchor")
        check_sampled(noncontiguous(q, g, "transpose"), bank, idx, s, beta, loss, log_z, "transposed anchor")
        check_sampled(q, misaligned(bank), idx, s, beta, loss, log_z, "misaligned bank")
        wide = torch.zeros(idx.shape[0], 2 * idx.shape[1], dtype=idx.dtype, device=DEVICE)
        wide[:, ::2] = idx
        check_sampled(q, bank, wide[:, ::2], s, beta, loss, log_z, "strided index")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_sampled_contrast_in_kernel_sampling(loss, dtype):
    """Negatives drawn in the kernel are exactly dcdkernels.reference.rng's, and the outputs are
    those of the explicit index (bit for bit: same columns, same order, same work split)."""
    B, K, N, D = 6, 700, 1234, 128
    s, log_z = (1 / 0.07, 9.0) if loss == "nce" else (5.0, None)
    for seed, offset in [(0, 0), (11, 5), (2**40 + 3, 2**33 + 17)]:
        q, bank, idx = sampled_case(B, K, N, D, dtype, seed=seed % 1000)
        positives = idx[:, 0].contiguous()
        sampled = sampled_kernel(q, bank, positives, s, None, loss, log_z, num_negatives=K, seed=seed, offset=offset)
        explicit_idx = reference.sample_negatives(positives, K, N, seed, offset)
        assert explicit_idx.shape == (B, K + 1) and int(explicit_idx.min()) >= 0 and int(explicit_idx.max()) < N
        explicit = sampled_kernel(q, bank, explicit_idx, s, None, loss, log_z)
        for name, a, b in zip(["loss", "lse", "grad_anchor", "grad_scalars"], sampled, explicit):
            assert torch.equal(a, b), f"seed={seed} offset={offset}: {name} differs from the explicit index"
        e_out, e_lse, e_ga, _, _ = sampled_oracle(q, bank, explicit_idx, s, None, loss, log_z)
        close(sampled[0], e_out, "loss")
        close(sampled[1], e_lse, "lse")
        close(sampled[2], e_ga, "grad_anchor")


def test_sampled_contrast_without_grad():
    q, bank, idx = sampled_case(4, 100, 200, 128, torch.float32, seed=3)
    for loss, log_z in [("infonce", None), ("nce", 9.0)]:
        with_grad = sampled_kernel(q, bank, idx, 5.0, 0.1, loss, log_z)
        out, lse, ga, gsc = sampled_kernel(q, bank, idx, 5.0, 0.1, loss, log_z, compute_grad=False)
        assert ga.shape == (0,) and gsc.shape == (0,)
        assert torch.equal(out, with_grad[0]) and torch.equal(lse, with_grad[1])


@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_sampled_contrast_rows_out_of_range_are_absent(loss):
    """Rows outside [0, N) are never read and their columns are absent (csrc/KERNELS.md): absent
    negatives drop out, an absent positive adds no -l_0 / -row_0 term, a row with no present
    column has LSE -inf; NCE's c = K / noise_rows. Against the oracle of the kernels' outputs."""
    B, K, N, D = 5, 600, 50, 128
    q, bank, idx = sampled_case(B, K, N, D, torch.float32, seed=5)
    bad = idx.clone()
    bad[0, 1::3] = -1
    bad[0, 2::3] = N + 2**40
    bad[1, 0] = N
    bad[2] = -7
    bad[3, 1:] = N
    bad[4, 100:500] = -1  # whole chunks with nothing present
    s, beta, log_z = (1 / 0.07, 0.3, 9.0) if loss == "nce" else (5.0, 0.3, None)
    out = sampled_kernel(q, bank, bad, s, beta, loss, log_z, noise_rows=4 * N)
    want = reference.sampled_contrast_outputs(
        q.to(F64), bank.to(F64), bad, logit_scale=s, bias=beta, loss=loss, log_z=log_z, noise_rows=4 * N
    )
    for name, got, expected in zip(("loss", "lse", "grad_anchor", "grad_scalars"), out, want):
        close(got, expected, name)
    assert out[1][2].item() == -float("inf") and not out[2][2].any() and not out[3][:, 2].any()


def test_sampled_contrast_rejects_float64():
    q, bank, idx = sampled_case(2, 3, 10, 8, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="float64"):
        sampled_kernel(q.double(), bank.double(), idx, 5.0, None, "infonce", None)


# ---------------------------------------------------------------------------------------------
# dual_sampled_contrast


def dual_oracle(zs, zt, bank_s, bank_t, idx, s, beta, loss, log_z, kl):
    """(losses (3, B), lse (2, B), grad_anchors (4, B, D), grad_scalars (2, 3, B)) in float64."""
    B = zs.shape[0]
    zs64 = zs.detach().to(F64).requires_grad_()
    zt64 = zt.detach().to(F64).requires_grad_()
    s_row, b_row = per_row(s, B), per_row(beta, B)
    lz = None if log_z is None else torch.tensor(log_z, device=DEVICE, dtype=F64)
    ls, lt, k, lse_s, lse_t = reference.dual_sampled_contrast(
        zs64,
        zt64,
        bank_s.to(F64),
        bank_t.to(F64),
        idx,
        logit_scale=s_row,
        bias=b_row,
        loss=loss,
        log_z=lz,
        compute_kl=kl,
    )
    g_s = grads(ls, [zs64, s_row, b_row])
    g_t = grads(lt, [zt64, s_row, b_row])
    g_k = grads(k, [zs64, zt64, s_row, b_row]) if kl else [torch.zeros_like(x) for x in (zs64, zt64, s_row, b_row)]
    losses = torch.stack([ls, lt, k]).detach()
    grad_anchors = torch.stack([g_s[0], g_t[0], g_k[0], g_k[1]])
    grad_scalars = torch.stack([torch.stack([g_s[1], g_t[1], g_k[2]]), torch.stack([g_s[2], g_t[2], g_k[3]])])
    return losses, torch.stack([lse_s, lse_t]), grad_anchors, grad_scalars.view(2, 3, B)


def dual_kernel(
    zs, zt, bank_s, bank_t, idx, s, beta, loss, log_z, kl, num_negatives=0, seed=0, offset=0, compute_grad=True
):
    lz = None if log_z is None else torch.tensor(log_z, device=DEVICE, dtype=torch.float32)
    return ops().dual_sampled_contrast(
        zs,
        zt,
        bank_s,
        bank_t,
        idx,
        scalar(s),
        scalar(beta),
        lz,
        0 if loss == "infonce" else 1,
        kl,
        num_negatives,
        seed,
        offset,
        compute_grad,
    )


def check_dual(zs, zt, bank_s, bank_t, idx, s, beta, loss, log_z, kl, what):
    losses, lse, ga, gsc = dual_kernel(zs, zt, bank_s, bank_t, idx, s, beta, loss, log_z, kl)
    e_losses, e_lse, e_ga, e_gsc = dual_oracle(zs, zt, bank_s, bank_t, idx, s, beta, loss, log_z, kl)
    B, D = zs.shape
    assert losses.shape == (3, B) and lse.shape == (2, B) and ga.shape == (4, B, D) and gsc.shape == (2, 3, B)
    close(losses, e_losses, f"{what} losses")
    close(lse, e_lse, f"{what} lse")
    for i, name in enumerate(["dL^s/dz_s", "dL^t/dz_t", "dKL/dz_s", "dKL/dz_t"]):
        close(ga[i], e_ga[i], f"{what} {name}")
    close(gsc[0], e_gsc[0], f"{what} d/ds")
    close(gsc[1], e_gsc[1], f"{what} d/dbeta")
    if not kl:
        assert torch.all(losses[2] == 0) and torch.all(ga[2:] == 0) and torch.all(gsc[:, 2] == 0)
    if loss == "infonce":
        assert torch.all(gsc[1] == 0), f"{what}: InfoNCE and KL d/dbeta must be exactly 0"


DUAL_SHAPES = [(1, 1, 5, 3), (4, 7, 50, 130), (5, 33, 64, 8), (3, 600, 1000, 128), (2, 40, 100, 2048)]


@pytest.mark.parametrize("kl", [True, False], ids=["kl", "no-kl"])
@pytest.mark.parametrize("loss", ["infonce", "nce"])
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32,) * 3,
        (torch.bfloat16,) * 3,
        (torch.float16,) * 3,
        (torch.float32, torch.float16, torch.float16),
        (torch.bfloat16, torch.float32, torch.float32),
    ],
    ids=lambda d: "-".join(str(x).replace("torch.", "") for x in d),
)
@pytest.mark.parametrize("shape", DUAL_SHAPES, ids=lambda s: "B{}-K{}-N{}-D{}".format(*s))
def test_dual_sampled_contrast(shape, dtypes, loss, kl):
    """dtypes = (anchors, bank_s, bank_t)."""
    B, K, N, D = shape
    qd, sd, td = dtypes
    zs, bank_s, idx = sampled_case(B, K, N, D, qd, seed=sum(shape), bank_dtype=sd)
    zt, bank_t, _ = sampled_case(B, K, N, D, qd, seed=sum(shape) + 1, bank_dtype=td)
    s, beta, log_z = (1 / 0.07, -0.2, (9.0, 8.0)) if loss == "nce" else (4.0, -0.2, None)
    check_dual(zs, zt, bank_s, bank_t, idx, s, beta, loss, log_z, kl, "dual")


def test_dual_sampled_contrast_layouts_and_sampling():
    B, K, N, D = 3, 300, 500, 130
    g = torch.Generator().manual_seed(9)
    zs, bank_s, idx = sampled_case(B, K, N, D, torch.float32, seed=1, bank_dtype=torch.bfloat16)
    zt, bank_t, _ = sampled_case(B, K, N, D, torch.float32, seed=2, bank_dtype=torch.bfloat16)
    check_dual(
        noncontiguous(zs, g, "slice"),
        noncontiguous(zt, g, "transpose"),
        misaligned(bank_s),
        bank_t,
        idx,
        4.0,
        None,
        "infonce",
        None,
        True,
        "layouts",
    )
    positives = idx[:, 0].contiguous()
    for loss, log_z in [("infonce", None), ("nce", (9.0, 8.0))]:
        sampled = dual_kernel(
            zs, zt, bank_s, bank_t, positives, 4.0, 0.1, loss, log_z, True, num_negatives=K, seed=77, offset=2**35
        )
        explicit_idx = reference.sample_negatives(positives, K, N, 77, 2**35)
        explicit = dual_kernel(zs, zt, bank_s, bank_t, explicit_idx, 4.0, 0.1, loss, log_z, True)
        for a, b in zip(sampled, explicit):
            assert torch.equal(a, b)
        e_losses = dual_oracle(zs, zt, bank_s, bank_t, explicit_idx, 4.0, 0.1, loss, log_z, True)[0]
        close(sampled[0], e_losses, f"{loss} sampled losses")
    no_grad = dual_kernel(zs, zt, bank_s, bank_t, idx, 4.0, None, "infonce", None, True, compute_grad=False)
    assert no_grad[2].shape == (0,) and no_grad[3].shape == (0,)
    close(no_grad[0], dual_oracle(zs, zt, bank_s, bank_t, idx, 4.0, None, "infonce", None, True)[0], "no-grad")


# ---------------------------------------------------------------------------------------------
# dense_contrast and dense_contrast_backward_keys


def dense_oracle(q, keys, target, positive, s, beta, weights):
    """(loss, lse, grad_anchor, grad_positive, d/ds, d/dbeta, grad_keys of sum_b w_b L_b) in float64."""
    B = q.shape[0]
    q64 = q.detach().to(F64).requires_grad_()
    k64 = keys.detach().to(F64).requires_grad_()
    p64 = None if positive is None else positive.detach().to(F64).requires_grad_()
    s_row, b_row = per_row(s, B), per_row(beta, B)
    out, lse = reference.dense_contrast(q64, k64, target, positive=p64, logit_scale=s_row, bias=b_row)
    leaves = [q64, s_row, b_row] + ([] if p64 is None else [p64])
    g = grads(out, leaves)
    gk = grads(out, [k64], weights)[0]
    gp = g[3] if p64 is not None else None
    return out.detach(), lse, g[0], gp, g[1].view(-1), g[2].view(-1), gk


def check_dense(q, keys, target, positive, s, beta, what):
    B = q.shape[0]
    st, bt = scalar(s), scalar(beta)
    out, lse, ga, gp, gsc = ops().dense_contrast(q, keys, target, positive, st, bt, True)
    weights = torch.linspace(0.5, 1.5, B, device=DEVICE, dtype=torch.float32)
    gk = ops().dense_contrast_backward_keys(q, keys, target, positive, st, bt, lse, weights)
    e_out, e_lse, e_ga, e_gp, e_gs, e_gb, e_gk = dense_oracle(q, keys, target, positive, s, beta, weights.to(F64))
    close(out, e_out, f"{what} loss")
    close(lse, e_lse, f"{what} lse")
    close(ga, e_ga, f"{what} grad_anchor")
    close(gsc[0], e_gs, f"{what} d/ds")
    assert torch.all(gsc[1] == 0), f"{what}: d/dbeta must be exactly 0"
    if positive is None:
        assert gp.shape == (0,)
    else:
        close(gp, e_gp, f"{what} grad_positive")
    assert gk.shape == keys.shape and gk.dtype == torch.float32
    close(gk, e_gk, f"{what} grad_keys")
    no_grad = ops().dense_contrast(q, keys, target, positive, st, bt, False)
    assert all(t.shape == (0,) for t in no_grad[2:])
    close(no_grad[0], e_out, f"{what} loss without grad")


# (B, M, D): a single anchor and key; tails of every tile; many anchor tiles and key splits;
# D = 2048 (8 accumulator dims per thread); D = 2500 (two dim slices); CoCoRD's queue.
DENSE_SHAPES = [(1, 1, 3), (5, 37, 130), (70, 300, 64), (9, 100, 2048), (3, 20, 2500), (64, 2048, 2048)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["target", "positive"])
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "B{}-M{}-D{}".format(*s))
def test_dense_contrast(shape, mode, dtype):
    B, M, D = shape
    g = torch.Generator().manual_seed(B * M + D)
    q = rand_rows(B, D, g, dtype)
    keys = rand_rows(M, D, g, dtype)
    target = positive = None
    if mode == "target":
        target = torch.randint(0, M, (B,), generator=g).to(DEVICE)
        target[-1] = target[0]  # a key that is the target of two anchors
    else:
        positive = rand_rows(B, D, g, dtype)
    check_dense(q, keys, target, positive, 1 / 0.1, 0.2, mode)


def test_dense_contrast_layouts():
    """Non-contiguous anchors, keys, positive and target; mixed dtypes."""
    B, M, D = 11, 90, 130
    g = torch.Generator().manual_seed(0)
    q = rand_rows(B, D, g, torch.float32)
    keys = rand_rows(M, D, g, torch.bfloat16)
    positive = rand_rows(B, D, g, torch.float16)
    target = torch.randint(0, M, (2 * B,), generator=g).to(DEVICE)[::2]
    check_dense(
        noncontiguous(q, g, "slice"), noncontiguous(keys, g, "transpose"), target, None, 7.0, None, "strided target"
    )
    check_dense(
        noncontiguous(q, g, "transpose"), keys, None, noncontiguous(positive, g, "slice"), 7.0, -0.5, "strided positive"
    )


# ---------------------------------------------------------------------------------------------
# bank_momentum_update_


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(7, 1, 3), (9, 12, 130), (50, 40, 128), (30, 200, 2048)], ids=lambda s: "N{}-B{}-D{}".format(*s)
)
def test_bank_momentum_update(shape, dtype, value_dtype):
    N, B, D = shape
    g = torch.Generator().manual_seed(N + B + D)
    bank = rand_rows(N, D, g, dtype)
    index = torch.randint(0, min(N, max(2, B // 3)), (B,), generator=g).to(DEVICE)  # many duplicates
    value = rand_rows(B, D, g, value_dtype, normalize=False)
    expected = reference.bank_momentum_update_(bank.clone(), index, value, 0.5)
    fused = bank.clone()
    ops().bank_momentum_update_(fused, index, value, 0.5)
    close(fused.float(), expected.float(), "bank", TOL[dtype])
    again = bank.clone()
    ops().bank_momentum_update_(again, index, value, 0.5)
    assert torch.equal(fused, again), "the update must be deterministic"
    untouched = torch.ones(N, dtype=torch.bool, device=DEVICE)
    untouched[index] = False
    assert torch.equal(fused[untouched], bank[untouched])


def test_bank_momentum_update_layouts_and_out_of_range():
    N, B, D = 40, 64, 130
    g = torch.Generator().manual_seed(1)
    base = rand_rows(N, D, g, torch.bfloat16)
    index = torch.randint(0, N, (B,), generator=g).to(DEVICE)
    value = noncontiguous(rand_rows(B, D, g, torch.float32, normalize=False), g, "transpose")
    expected = reference.bank_momentum_update_(base.clone(), index, value, 0.9)
    bank = misaligned(base.clone())
    ops().bank_momentum_update_(bank, index, value, 0.9)
    close(bank.float(), expected.float(), "misaligned bank", TOL[torch.bfloat16])
    # Positions holding a row out of range are skipped; the others update as usual.
    bad = index.clone()
    bad[::5] = -1
    bad[1::7] = N
    ok = (bad >= 0) & (bad < N)
    expected = reference.bank_momentum_update_(base.clone(), bad[ok], value[ok], 0.9)
    bank = base.clone()
    ops().bank_momentum_update_(bank, bad, value, 0.9)
    close(bank.float(), expected.float(), "rows out of range", TOL[torch.bfloat16])


# ---------------------------------------------------------------------------------------------
# Through the public API: the dispatcher, autograd and the CUDA kernels together.


def test_public_api_end_to_end():
    g = torch.Generator().manual_seed(2)
    B, K, N, M, D = 8, 64, 300, 50, 128
    q, bank, idx = sampled_case(B, K, N, D, torch.float32, seed=4)
    keys0 = rand_rows(M, D, g, torch.float32)
    target = torch.randint(0, M, (B,), generator=g).to(DEVICE)
    results = {}
    for backend in ["cuda", "eager"]:
        a = q.clone().requires_grad_()
        keys = keys0.clone().requires_grad_()
        theta = torch.tensor(1.5, device=DEVICE, requires_grad=True)
        loss = dcdkernels.sampled_contrast(a, bank, idx, logit_scale=theta.exp(), backend=backend).mean()
        loss = loss + dcdkernels.dense_contrast(a, keys, target, logit_scale=theta.exp(), backend=backend).mean()
        loss.backward()
        results[backend] = (loss.detach(), a.grad, theta.grad, keys.grad)
    for x, y, name in zip(results["cuda"], results["eager"], ["loss", "anchor", "theta", "keys"]):
        close(x, y, name)
