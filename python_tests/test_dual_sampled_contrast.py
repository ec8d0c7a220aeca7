"""dual_sampled_contrast on every backend (C++ CPU, Triton, CUDA) against the float64 oracle
(docs/math.md §1c, contract csrc/KERNELS.md): the three losses (student, teacher, consistency
KL), both LSEs and every per-row gradient, per dtype, on helpers.DUAL_SHAPES; layouts and mixed
dtypes, in-kernel sampling, no-grad, and the public op through the dispatcher and autograd.
The absent-column convention and the shard merge are in test_dual_absent.py."""

import pytest
import torch
from helpers import (
    BACKENDS,
    DTYPES,
    DUAL_SHAPES,
    F64,
    accumulation,
    assert_close,
    assert_refused,
    device_of,
    grads,
    kernel,
    misaligned,
    nce_log_z,
    noncontiguous,
    per_row,
    precision,
    scalar,
    tiles,
    unit_rows,
    unsupported,
)

import dcdkernels
from dcdkernels import reference as R

LOSSES = {"infonce": 0, "nce": 1}
LOSS_KL = [("infonce", True), ("infonce", False), ("nce", False), ("nce", True)]


def run(
    backend,
    zs,
    zt,
    bank_s,
    bank_t,
    index,
    s,
    bias,
    log_z,
    loss,
    kl,
    num_negatives=0,
    seed=0,
    offset=0,
    grad=True,
    split=None,
):
    acc = accumulation(zs, zt, bank_s, bank_t)
    dev = zs.device
    lz = None if log_z is None else torch.tensor(log_z, dtype=acc, device=dev)
    args = (
        zs,
        zt,
        bank_s,
        bank_t,
        index,
        scalar(s, acc, dev),
        scalar(bias, acc, dev),
        lz,
        LOSSES[loss],
        kl,
        num_negatives,
        seed,
        offset,
        grad,
    )
    return kernel("dual_sampled_contrast", backend)(*args, **tiles(backend, **(split or {})))


def oracle(zs, zt, bank_s, bank_t, index, s, bias, log_z, loss, kl):
    """float64: losses (3, B), lse (2, B), grad_anchors (4, B, D) = [dL^s/dz_s, dL^t/dz_t,
    dKL/dz_s, dKL/dz_t], grad_scalars (2, 3, B) = [d/ds, d/dbeta] of [L^s, L^t, KL]."""
    B, dev = zs.shape[0], zs.device
    qs, qt = zs.detach().to(F64).requires_grad_(), zt.detach().to(F64).requires_grad_()
    s_col, b_col = per_row(s, B, dev), per_row(bias, B, dev)
    lz = None if log_z is None else torch.tensor(log_z, dtype=F64, device=dev)
    ls, lt, k, lse_s, lse_t = R.dual_sampled_contrast(
        qs,
        qt,
        bank_s.to(F64),
        bank_t.to(F64),
        index,
        logit_scale=s_col,
        bias=b_col,
        loss=loss,
        log_z=lz,
        compute_kl=kl,
    )
    leaves = [qs, qt, s_col, b_col]
    g_s, g_t = grads(ls.sum(), leaves), grads(lt.sum(), leaves)
    g_k = grads(k.sum(), leaves) if kl else [torch.zeros_like(x) for x in leaves]
    grad_anchors = torch.stack([g_s[0], g_t[1], g_k[0], g_k[1]])
    grad_scalars = torch.stack([torch.stack([g[i].view(-1) for g in (g_s, g_t, g_k)]) for i in (2, 3)])
    return torch.stack([ls, lt, k]).detach(), torch.stack([lse_s, lse_t]), grad_anchors, grad_scalars


def check(backend, zs, zt, bank_s, bank_t, index, s, bias, log_z, loss, kl, dtype, what="", split=None):
    losses, lse, ga, gsc = run(backend, zs, zt, bank_s, bank_t, index, s, bias, log_z, loss, kl, split=split)
    e_losses, e_lse, e_ga, e_gsc = oracle(zs, zt, bank_s, bank_t, index, s, bias, log_z, loss, kl)
    B, D = zs.shape
    assert losses.shape == (3, B) and lse.shape == (2, B) and ga.shape == (4, B, D) and gsc.shape == (2, 3, B)
    assert losses.dtype == ga.dtype == accumulation(zs, zt, bank_s, bank_t)
    tol = precision(backend, dtype)
    for i, name in enumerate(("loss_s", "loss_t", "kl")):
        assert_close(losses[i], e_losses[i], tol, f"{what} {name}")
    assert_close(lse, e_lse, tol, f"{what} lse")
    for i, name in enumerate(("dL^s/dz_s", "dL^t/dz_t", "dKL/dz_s", "dKL/dz_t")):
        assert_close(ga[i], e_ga[i], tol, f"{what} {name}")
    assert_close(gsc[0], e_gsc[0], tol, f"{what} d/ds")
    assert_close(gsc[1], e_gsc[1], tol, f"{what} d/dbeta")
    assert torch.equal(gsc[1, 2], torch.zeros_like(gsc[1, 2])), f"{what}: dKL/dbeta is written 0, exactly"
    if loss == "infonce":
        assert torch.equal(gsc[1, :2], torch.zeros_like(gsc[1, :2])), f"{what}: InfoNCE d/dbeta is 0, exactly"
    if not kl:
        assert not losses[2].any() and not ga[2:].any() and not gsc[:, 2].any(), f"{what}: no KL asked"


def case(B, N, D, K, dtype, seed, device, bank_dtypes=None):
    g = torch.Generator().manual_seed(seed)
    ds, dt = bank_dtypes or (dtype, dtype)
    zs, zt = unit_rows(B, D, dtype, g, device), unit_rows(B, D, dtype, g, device)
    bank_s, bank_t = unit_rows(N, D, ds, g, device), unit_rows(N, D, dt, g, device)
    index = torch.randint(0, N, (B, K + 1), generator=g)
    index[:, -1] = index[:, 0]  # the positive again among the negatives
    if K >= 3:
        index[:, 2] = index[:, 1]  # a repeated negative
    return zs, zt, bank_s, bank_t, index.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss,kl", LOSS_KL, ids=["infonce-kl", "infonce", "nce", "nce-kl"])
@pytest.mark.parametrize("B,N,D,K,split", DUAL_SHAPES)
def test_matches_oracle(backend, dtype, loss, kl, B, N, D, K, split):
    dev = device_of(backend)
    zs, zt, bank_s, bank_t, index = case(B, N, D, K, dtype, seed=B + D + K, device=dev)
    s, bias = 1 / 0.07, (0.1 if D == 16 else -0.2)
    log_z = (nce_log_z(N, 1.0), nce_log_z(N, 3.0)) if loss == "nce" else None
    refused = unsupported("dual_sampled_contrast", backend, dtype, D)
    if refused:
        lz = None if log_z is None else torch.tensor(log_z, device=dev)
        assert_refused(
            refused,
            lambda: dcdkernels.dual_sampled_contrast(
                zs, zt, bank_s, bank_t, index, logit_scale=s, loss=loss, log_z=lz, backend=backend
            ),
        )
        return
    check(backend, zs, zt, bank_s, bank_t, index, s, bias, log_z, loss, kl, dtype, split=split)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtypes",
    [(torch.float32, torch.float16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
    ids=lambda d: "-".join(str(x)[6:] for x in d),
)
def test_layouts_and_mixed_dtypes(backend, dtypes):
    """Anchors of one dtype, both banks of another; non-contiguous anchors (slice, transpose),
    misaligned bank rows, a strided index."""
    qd, bd = dtypes
    dev = device_of(backend)
    g = torch.Generator().manual_seed(9)
    zs, zt, bank_s, bank_t, index = case(3, 500, 130, 30, qd, seed=1, device=dev, bank_dtypes=(bd, bd))
    tol = precision(backend, torch.bfloat16)
    for loss, log_z in (("infonce", None), ("nce", (9.0, 8.0))):
        check(backend, zs, zt, bank_s, bank_t, index, 4.0, 0.1, log_z, loss, True, tol, "mixed dtypes")
    wide = torch.zeros(index.shape[0], 2 * index.shape[1], dtype=index.dtype, device=dev)
    wide[:, ::2] = index
    check(
        backend,
        noncontiguous(zs, g, "slice"),
        noncontiguous(zt, g, "transpose"),
        misaligned(bank_s),
        bank_t,
        wide[:, ::2],
        4.0,
        None,
        None,
        "infonce",
        True,
        tol,
        "layouts",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_banks_share_one_dtype(backend):
    """The contract (csrc/KERNELS.md): bank_s and bank_t share one dtype, on every backend."""
    dev = device_of(backend)
    zs, zt, bank_s, bank_t, index = case(2, 20, 8, 3, torch.float32, seed=2, device=dev)
    with pytest.raises(TypeError, match="share one dtype"):
        dcdkernels.dual_sampled_contrast(zs, zt, bank_s, bank_t.bfloat16(), index, logit_scale=4.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed,offset", [(7, 99), (77, 2**35)])
def test_in_kernel_sampling_and_no_grad(backend, seed, offset):
    """Negatives drawn in the kernel give the explicit index's outputs bit for bit; without
    gradients the losses and LSEs are the same."""
    dev = device_of(backend)
    B, N, D, K = 3, 200, 24, 300
    zs, zt, bank_s, bank_t, index = case(B, N, D, K, torch.float32, seed=4, device=dev)
    positive = index[:, 0].contiguous()
    explicit = R.sample_negatives(positive, K, N, seed, offset)
    split = dict(num_chunks=2, block_k=64)
    for loss, log_z in (("infonce", None), ("nce", (9.0, 8.0))):
        sampled = run(
            backend, zs, zt, bank_s, bank_t, positive, 12.0, 0.1, log_z, loss, True, K, seed, offset, split=split
        )
        direct = run(backend, zs, zt, bank_s, bank_t, explicit, 12.0, 0.1, log_z, loss, True, split=split)
        for name, a, b in zip(("losses", "lse", "grad_anchors", "grad_scalars"), sampled, direct):
            assert torch.equal(a, b), f"{loss}: {name} differs from the explicit index"
        e_losses, e_lse, e_ga, _ = oracle(zs, zt, bank_s, bank_t, explicit, 12.0, 0.1, log_z, loss, True)
        assert_close(sampled[0], e_losses, torch.float32, f"{loss} sampled losses")
        assert_close(sampled[2], e_ga, torch.float32, f"{loss} sampled grad_anchors")
        losses, lse, ga, gsc = run(backend, zs, zt, bank_s, bank_t, explicit, 12.0, 0.1, log_z, loss, True, grad=False)
        assert ga.shape == (0,) and gsc.shape == (0,)
        assert_close(losses, direct[0], torch.float32, "losses without grad")
        assert_close(lse, direct[1], torch.float32, "lse without grad")
    # An absent positive with in-kernel sampling: the same as the explicit index of that stream.
    bad = torch.tensor([0, N, 1], device=dev)
    got = run(backend, zs, zt, bank_s, bank_t, bad, 12.0, None, None, "infonce", True, K, seed, offset)
    want = run(
        backend, zs, zt, bank_s, bank_t, R.sample_negatives(bad, K, N, seed, offset), 12.0, None, None, "infonce", True
    )
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_public_op_matches_eager(backend, dtype, loss):
    """Through the dispatcher, the custom op and its autograd formula: the three losses and the
    gradients of both anchors, a learnable logit scale and bias, under a non-uniform
    grad_output, equal the eager oracle's."""
    dev = device_of(backend)
    zs, zt, bank_s, bank_t, index = case(4, 9, 130, 5, dtype, seed=10, device=dev)
    zs = noncontiguous(zs, torch.Generator().manual_seed(1))
    if unsupported("dual_sampled_contrast", backend, dtype):
        return  # refused, as test_matches_oracle asserts
    results = {}
    for be in (backend, "eager"):
        qs, qt = zs.detach().clone().requires_grad_(), zt.detach().clone().requires_grad_()
        acc = accumulation(qs)
        s = torch.tensor(4.0, device=dev, dtype=acc, requires_grad=True)
        bias = torch.tensor(-0.2, device=dev, dtype=acc, requires_grad=True)
        out = dcdkernels.dual_sampled_contrast(
            qs,
            qt,
            bank_s,
            bank_t,
            index,
            logit_scale=s,
            bias=bias,
            loss=loss,
            log_z=torch.tensor([1.0, 0.5], device=dev, dtype=acc),
            consistency=0.5,
            backend=be,
        )
        terms = torch.stack([out.loss_s, out.loss_t, out.consistency])
        weight = torch.linspace(0.5, 1.5, terms.numel(), device=dev, dtype=terms.dtype).view_as(terms)
        (terms * weight).sum().backward()
        results[be] = [terms, qs.grad, qt.grad, s.grad, bias.grad]
    for name, got, want in zip(
        ("losses", "grad z_s", "grad z_t", "grad scale", "grad bias"), results[backend], results["eager"]
    ):
        assert_close(got, want, dtype, name)
