"""dual_sampled_contrast's absent-column convention and noise_rows (csrc/KERNELS.md "Absent
columns"): the oracle ``reference.dual_sampled_contrast_outputs`` against independent formulas
and float64 gradcheck, every backend here against it, the all-present case against the public
op, and the shard-merge property the sharded CRD/DCD banks rely on. Also the D-limit-aware
choice of ``backend="auto"`` and the int64 plane offsets of the Triton dual launcher."""

import functools
import importlib
import math
import types
from pathlib import Path

import pytest
import torch
from helpers import TOL, devices, fused_backends

import dcdkernels
from dcdkernels import _ext, backends, reference
from dcdkernels.ops.dual_sampled_contrast import dual_sampled_contrast_op, dual_sampled_contrast_outputs

dual_ops = importlib.import_module("dcdkernels.ops.dual_sampled_contrast")

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _inputs(B, K, N, D, dtype=torch.float32, bank_dtype=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    zs = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=F64), dim=1)
    zt = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=F64), dim=1)
    bs = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=F64), dim=1)
    bt = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=F64), dim=1)
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    bank_dtype = bank_dtype or dtype
    return (
        zs.to(device, dtype),
        zt.to(device, dtype),
        bs.to(device, bank_dtype),
        bt.to(device, bank_dtype),
        idx.to(device),
    )


def _absent(idx, N, pattern):
    """Marks columns absent (rows outside [0, N), negative ones too) following ``pattern``."""
    idx = idx.clone()
    B, C = idx.shape
    if pattern in ("some", "mixed"):
        idx[:, C - 1] = N  # the last column of every row
        idx[0, min(1, C - 1)] = -3  # a negative row
        if C > 3:
            idx[B - 1, 2] = N + 17
    if pattern in ("positive", "mixed"):
        idx[0, 0] = -1  # an absent positive
    if pattern in ("empty", "mixed"):
        idx[B - 1] = N + 1  # every column of the last row
    return idx


def _scalars(dtype=torch.float32, bias=True, device="cpu"):
    acc = F64 if dtype == F64 else torch.float32
    s = torch.tensor(7.3, dtype=acc, device=device)
    b = torch.tensor(0.3, dtype=acc, device=device) if bias else None
    lz = torch.tensor([1.2, -0.4], dtype=acc, device=device)
    return s, b, lz


def _call(backend, zs, zt, bs, bt, idx, loss, kl, noise_rows=0, bias=True, compute_grad=True):
    s, b, lz = _scalars(zs.dtype, bias, zs.device)
    if backend == "oracle":
        return reference.dual_sampled_contrast_outputs(
            zs,
            zt,
            bs,
            bt,
            idx,
            logit_scale=s,
            bias=b,
            loss=loss,
            log_z=lz,
            compute_kl=kl,
            noise_rows=noise_rows,
            compute_grad=compute_grad,
        )
    return dual_sampled_contrast_outputs(
        zs,
        zt,
        bs,
        bt,
        idx,
        logit_scale=s,
        bias=b,
        loss=loss,
        log_z=lz,
        compute_kl=kl,
        noise_rows=noise_rows,
        compute_grad=compute_grad,
        backend=backend,
    )


def _assert_outputs_close(got, want, **tol):
    names = ("losses", "lse", "grad_anchors", "grad_scalars")
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        torch.testing.assert_close(g.double(), w.double(), **tol, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------
# The oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_oracle_all_present_matches_the_differentiable_oracle(loss):
    """Layout and values of the four outputs: the autograd gradients of reference.dual_sampled_contrast."""
    zs, zt, bs, bt, idx = _inputs(4, 6, 13, 5, F64)
    s, b, lz = _scalars(F64)
    leaves = [t.clone().requires_grad_() for t in (zs, zt, s, b)]
    ls, lt, kl, lse_s, lse_t = reference.dual_sampled_contrast(
        *leaves[:2], bs, bt, idx, logit_scale=leaves[2], bias=leaves[3], loss=loss, log_z=lz
    )
    losses, lse, ga, gs = reference.dual_sampled_contrast_outputs(
        zs, zt, bs, bt, idx, logit_scale=s, bias=b, loss=loss, log_z=lz, compute_kl=True
    )
    tol = TOL[F64]
    torch.testing.assert_close(losses, torch.stack([ls, lt, kl]).detach(), **tol)
    torch.testing.assert_close(lse, torch.stack([lse_s, lse_t]), **tol)
    for row, value in enumerate((ls, lt, kl)):
        g_s, g_t = torch.autograd.grad(value.sum(), leaves[:2], retain_graph=True, allow_unused=True)
        want = {0: [(0, g_s)], 1: [(1, g_t)], 2: [(2, g_s), (3, g_t)]}[row]
        for plane, grad in want:
            torch.testing.assert_close(ga[plane], grad, **tol)
        for which in (0, 1):  # per-row d/ds and d/dbeta
            per_row = [
                torch.autograd.grad(value[i], leaves[2 + which], retain_graph=True)[0] for i in range(len(value))
            ]
            torch.testing.assert_close(gs[which, row], torch.stack(per_row), **tol)


def test_oracle_absent_columns_equal_dropping_them():
    """InfoNCE and the KL with absent columns equal the full oracle on each row's present columns
    (a row whose positive is present; the positive stays column 0)."""
    B, K, N, D = 5, 7, 17, 6
    zs, zt, bs, bt, idx = _inputs(B, K, N, D, F64, seed=3)
    idx = _absent(idx, N, "some")
    s, b, lz = _scalars(F64)
    losses, lse, _, _ = reference.dual_sampled_contrast_outputs(
        zs, zt, bs, bt, idx, logit_scale=s, bias=b, compute_kl=True
    )
    for r in range(B):
        keep = idx[r][(idx[r] >= 0) & (idx[r] < N)][None]
        ls, lt, kl, lse_s, lse_t = reference.dual_sampled_contrast(
            zs[r : r + 1], zt[r : r + 1], bs, bt, keep, logit_scale=s, bias=b
        )
        torch.testing.assert_close(losses[:, r], torch.cat([ls, lt, kl]), **TOL[F64])
        torch.testing.assert_close(lse[:, r], torch.cat([lse_s, lse_t]), **TOL[F64])


@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_oracle_absent_positive_and_empty_row(loss):
    B, K, N, D = 3, 4, 9, 5
    zs, zt, bs, bt, idx = _inputs(B, K, N, D, F64, seed=4)
    idx = _absent(idx, N, "mixed")
    s, b, lz = _scalars(F64)
    losses, lse, ga, gs = reference.dual_sampled_contrast_outputs(
        zs, zt, bs, bt, idx, logit_scale=s, bias=b, loss=loss, log_z=lz, compute_kl=True
    )
    # The empty last row: LSE -inf, InfoNCE loss -inf, NCE loss 0, KL 0, gradients 0.
    assert torch.all(lse[:, -1] == -math.inf)
    assert torch.all(losses[:2, -1] == (-math.inf if loss == "infonce" else 0.0))
    assert losses[2, -1] == 0
    assert torch.all(ga[:, -1] == 0) and torch.all(gs[:, :, -1] == 0)
    # Row 0 lost its positive: InfoNCE is its present columns' LSE alone (no -l_0).
    if loss == "infonce":
        torch.testing.assert_close(losses[:2, 0], lse[:, 0], **TOL[F64])
    assert torch.isfinite(losses[:, :-1]).all() and torch.isfinite(ga).all() and torch.isfinite(gs).all()


class _OracleWithGrads(torch.autograd.Function):
    """losses (3, B) of the oracle, differentiated through its own gradient outputs with the
    op's registered backward formula (dual_sampled_contrast._backward)."""

    @staticmethod
    def forward(ctx, zs, zt, s, b, lz, bs, bt, idx, loss, noise_rows):
        losses, _, ga, gs = reference.dual_sampled_contrast_outputs(
            zs, zt, bs, bt, idx, logit_scale=s, bias=b, loss=loss, log_z=lz, compute_kl=True, noise_rows=noise_rows
        )
        ctx.save_for_backward(ga, gs)
        ctx.nce = loss == "nce"  # log Z enters NCE only
        return losses

    @staticmethod
    def backward(ctx, g):
        op_ctx = types.SimpleNamespace(
            saved_tensors=ctx.saved_tensors, dtypes=(F64, F64), has_bias=True, has_log_z=ctx.nce
        )
        out = dual_ops._backward(op_ctx, g, None, None, None)
        d_s, d_t, d_scale, d_bias, d_log_z = out[0], out[1], out[5], out[6], out[7]
        return d_s, d_t, d_scale, d_bias, d_log_z, None, None, None, None, None


@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_gradcheck_oracle_float64_with_absent_columns(loss):
    B, K, N, D = 3, 5, 11, 7
    zs, zt, bs, bt, idx = _inputs(B, K, N, D, F64, seed=5)
    idx = _absent(idx, N, "some")
    idx[1, 0] = N + 2  # an absent positive in a row that keeps other columns
    s, b, lz = (t.clone().requires_grad_(loss == "nce" or i < 2) for i, t in enumerate(_scalars(F64)))
    leaves = (zs.requires_grad_(), zt.requires_grad_(), s, b, lz)
    fn = lambda *xs: _OracleWithGrads.apply(*xs, bs, bt, idx, loss, 3 * N)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("loss_type", [0, 1])
def test_gradcheck_cpu_op_float64_with_absent_columns(loss_type):
    """The registered autograd formula over the CPU kernel's gradients, absent columns included."""
    B, K, N, D = 3, 5, 11, 7
    zs, zt, bs, bt, idx = _inputs(B, K, N, D, F64, seed=6)
    idx = _absent(idx, N, "some")
    idx[1, 0] = -1
    s, b, lz = (t.clone().requires_grad_() for t in _scalars(F64))
    lz = lz if loss_type == 1 else None
    fn = lambda zs, zt, s, b, *lz: dual_sampled_contrast_op(  # noqa: E731
        zs, zt, bs, bt, idx, s, b, lz[0] if lz else None, loss_type, True, 0, 0, 0, True, 2 * N, "cpu"
    )[0]
    assert torch.autograd.gradcheck(
        fn, (zs.requires_grad_(), zt.requires_grad_(), s, b) + ((lz,) if lz is not None else ())
    )


# ------------------------------------------------------------------------------------------------
# Every backend against the oracle
# ------------------------------------------------------------------------------------------------
def _backends():
    """(device, backend) pairs: the oracle's eager path and every fused backend here."""
    return [pytest.param(dev, be, id=f"{dev}-{be}") for dev in devices() for be in ["eager"] + fused_backends(dev)]


def _dtypes(device, backend):
    out = [torch.float32, torch.bfloat16, torch.float16]
    return out + ([F64] if device == "cpu" and backend in ("cpu", "eager") else [])


CASES = [  # (B, K, N, D, pattern)
    pytest.param(4, 6, 13, 7, "some", id="some"),
    pytest.param(3, 5, 11, 33, "mixed", id="mixed-D33"),
    pytest.param(3, 4, 9, 5, "positive", id="positive"),
    pytest.param(2, 3, 8, 6, "empty", id="empty-row"),
    pytest.param(1, 1, 5, 3, "positive", id="B1-K1"),
    pytest.param(3, 1, 7, 10, "none", id="K1-present"),
]


@pytest.mark.parametrize("device, backend", _backends())
@pytest.mark.parametrize("B, K, N, D, pattern", CASES)
@pytest.mark.parametrize("loss, kl", [("infonce", True), ("nce", False), ("nce", True)])
def test_backend_matches_oracle_with_absent_columns(device, backend, B, K, N, D, pattern, loss, kl):
    for dtype in _dtypes(device, backend):
        zs, zt, bs, bt, idx = _inputs(B, K, N, D, dtype, seed=B * 100 + D, device=device)
        idx = _absent(idx, N, pattern)
        want = _call("oracle", zs, zt, bs, bt, idx, loss, kl, noise_rows=5 * N)
        got = _call(backend, zs, zt, bs, bt, idx, loss, kl, noise_rows=5 * N)
        _assert_outputs_close(got, want, **TOL[dtype])
        if not kl:
            assert torch.all(got[0][2] == 0) and torch.all(got[2][2:] == 0) and torch.all(got[3][:, 2] == 0)


@pytest.mark.parametrize("device, backend", _backends())
def test_backend_noise_rows_and_no_grad(device, backend):
    zs, zt, bs, bt, idx = _inputs(3, 4, 10, 6, seed=9, device=device)
    idx = _absent(idx, 10, "some")
    default = _call(backend, zs, zt, bs, bt, idx, "nce", True)
    same = _call(backend, zs, zt, bs, bt, idx, "nce", True, noise_rows=10)
    other = _call(backend, zs, zt, bs, bt, idx, "nce", True, noise_rows=1000)
    _assert_outputs_close(same, default, atol=0, rtol=0)
    assert not torch.allclose(other[0][:2], default[0][:2])  # c = K / noise_rows enters the NCE loss
    _assert_outputs_close(
        other, _call("oracle", zs, zt, bs, bt, idx, "nce", True, noise_rows=1000), **TOL[torch.float32]
    )
    losses, lse, ga, gs = _call(backend, zs, zt, bs, bt, idx, "infonce", True, compute_grad=False)
    assert ga.shape == (0,) and gs.shape == (0,)
    torch.testing.assert_close(losses, _call("oracle", zs, zt, bs, bt, idx, "infonce", True)[0], **TOL[torch.float32])
    torch.testing.assert_close(lse, default[1], **TOL[torch.float32])


@pytest.mark.parametrize("device, backend", _backends())
def test_non_contiguous_anchors_and_strided_banks(device, backend):
    zs, zt, bs, bt, idx = _inputs(4, 5, 12, 9, seed=11, device=device)
    idx = _absent(idx, 12, "mixed")
    want = _call("oracle", zs, zt, bs, bt, idx, "infonce", True)
    wide_s = torch.zeros(12, 16, device=device)
    wide_s[:, :9] = bs
    wide_t = torch.zeros(12, 16, device=device)
    wide_t[:, 3:12] = bt
    got = _call(
        backend, zs.t().contiguous().t(), zt.t().contiguous().t(), wide_s[:, :9], wide_t[:, 3:12], idx, "infonce", True
    )
    _assert_outputs_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("device, backend", _backends())
@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_all_present_index_gives_exactly_the_public_op(device, backend, loss):
    zs, zt, bs, bt, idx = _inputs(4, 6, 15, 7, seed=12, device=device)
    s, b, lz = _scalars(device=device)
    losses, lse, ga, gs = dual_sampled_contrast_outputs(
        zs, zt, bs, bt, idx, logit_scale=s, bias=b, loss=loss, log_z=lz, compute_kl=True, backend=backend
    )
    leaves = [t.clone().requires_grad_() for t in (zs, zt, s, b)]
    out = dcdkernels.dual_sampled_contrast(
        *leaves[:2],
        bs,
        bt,
        idx,
        logit_scale=leaves[2],
        bias=leaves[3],
        loss=loss,
        log_z=lz,
        consistency=1.0,
        backend=backend,
    )
    # The same kernel call: bit-identical. The public eager path differentiates the plain oracle instead.
    same = torch.equal if backend != "eager" else functools.partial(_close, **TOL[torch.float32])
    assert same(losses, torch.stack([out.loss_s, out.loss_t, out.consistency]).detach())
    assert same(lse, torch.stack([out.lse_s, out.lse_t]))
    gs_s, gt_t = torch.autograd.grad(out.loss_s.sum() + out.loss_t.sum(), leaves[:2], retain_graph=True)
    assert same(gs_s, ga[0]) and same(gt_t, ga[1])
    gkl_s, gkl_t, gkl_scale = torch.autograd.grad(out.consistency.sum(), leaves[:3])
    assert same(gkl_s, ga[2]) and same(gkl_t, ga[3])
    torch.testing.assert_close(gkl_scale, gs[0, 2].sum(), **TOL[torch.float32])


def _close(a, b, **tol):
    torch.testing.assert_close(a, b, **tol)
    return True


def test_public_op_still_rejects_out_of_range_indices():
    zs, zt, bs, bt, idx = _inputs(2, 3, 6, 4)
    idx[1, 2] = 6
    with pytest.raises(ValueError, match="index"):
        dcdkernels.dual_sampled_contrast(zs, zt, bs, bt, idx, logit_scale=2.0)


# ------------------------------------------------------------------------------------------------
# Sharded banks: per-shard outputs with local indices merge to the full-bank outputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, backend", _backends())
@pytest.mark.parametrize("bounds", [(0, 7, 19), (0, 5, 12, 19), (0, 1, 18, 19)], ids=["2", "3", "3-thin"])
def test_shard_merge(device, backend, bounds):
    B, K, N, D = 5, 12, 19, 6
    zs, zt, bs, bt, idx = _inputs(B, K, N, D, seed=13, device=device)
    s, b, lz = _scalars(device=device)
    full = {
        loss: dual_sampled_contrast_outputs(
            zs, zt, bs, bt, idx, logit_scale=s, bias=b, loss=loss, log_z=lz, compute_kl=True, backend=backend
        )
        for loss in ("infonce", "nce")
    }
    parts = {
        loss: [
            dual_sampled_contrast_outputs(
                zs,
                zt,
                bs[lo:hi],
                bt[lo:hi],
                idx - lo,
                logit_scale=s,
                bias=b,
                loss=loss,
                log_z=lz,
                compute_kl=True,
                noise_rows=N,
                backend=backend,
            )
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        for loss in ("infonce", "nce")
    }
    tol = TOL[torch.float32]
    for loss in ("infonce", "nce"):
        lse_parts = torch.stack([p[1] for p in parts[loss]])  # (shards, 2, B)
        torch.testing.assert_close(torch.logsumexp(lse_parts, dim=0), full[loss][1], **tol)
    # NCE: losses and gradients add up over the shards.
    for i in (0, 2, 3):
        want = full["nce"][i][:2] if i != 3 else full["nce"][3][:, :2]
        got = sum(p[i][:2] if i != 3 else p[3][:, :2] for p in parts["nce"])
        torch.testing.assert_close(got, want, **tol)
    # The KL from the shard partials: F_r = KL_r + LSE^t_r - LSE^s_r is shard r's p^t-mean of f,
    # the whole row's F = sum_r exp(LSE^t_r - LSE^t) F_r (empty shards weigh 0).
    losses = torch.stack([p[0] for p in parts["infonce"]])
    lse = torch.stack([p[1] for p in parts["infonce"]])
    lse_all = torch.logsumexp(lse, dim=0)
    weight = torch.exp(lse[:, 1] - lse_all[1])
    f_r = torch.where(weight > 0, losses[:, 2] + lse[:, 1] - lse[:, 0], torch.zeros_like(weight))
    kl = (weight * f_r).sum(0) - lse_all[1] + lse_all[0]
    torch.testing.assert_close(kl, full["infonce"][0][2], **tol)


# ------------------------------------------------------------------------------------------------
# Defect 6: "auto" picks a backend whose D limit admits the call
# ------------------------------------------------------------------------------------------------
def test_cuda_dim_limits_match_the_kernels():
    # The limits are defined once (csrc/common/constants.h) and published by _C.
    assert _ext._C is not None, _ext.LOAD_ERROR
    assert backends.max_dim("sampled_contrast", "cuda") == _ext._C.CUDA_MAX_DIM_SAMPLED_CONTRAST
    assert backends.max_dim("dual_sampled_contrast", "cuda") == _ext._C.CUDA_MAX_DIM_DUAL_SAMPLED_CONTRAST == 2048
    assert backends.max_dim("dense_contrast", "cuda") is None


@pytest.mark.parametrize(
    "cuda_built, triton_ok, dim, expected",
    [
        (True, True, 128, "cuda"),
        (True, True, 2048, "cuda"),
        (True, True, 2049, "triton"),
        (True, True, 4096, "triton"),
        (True, True, 4097, "eager"),
        (True, False, 3000, "eager"),
        (False, True, 3000, "triton"),
        (True, True, None, "cuda"),
    ],
)
def test_auto_resolution_respects_dim_limits(monkeypatch, cuda_built, triton_ok, dim, expected):
    pytest.importorskip("triton")
    monkeypatch.setattr(backends._ext, "has_kernel", lambda op, key: key == "CPU" or cuda_built)
    monkeypatch.setattr(backends, "_triton_status", lambda: (triton_ok, "patched"))
    got = backends.resolve("auto", torch.device("cuda"), "dual_sampled_contrast", torch.float32, dim=dim)
    assert got == expected
    # sampled_contrast's CUDA kernels go further (D <= 8192).
    if dim is not None and dim <= 8192 and cuda_built:
        assert backends.resolve("auto", torch.device("cuda"), "sampled_contrast", torch.float32, dim=dim) == "cuda"


def test_public_dual_op_resolves_with_its_dim(monkeypatch):
    seen = []
    real = backends.resolve

    def spy(backend, device, op, dtype=torch.float32, dim=None):
        seen.append((op, dim))
        return real(backend, device, op, dtype, dim=dim)

    monkeypatch.setattr(backends, "resolve", spy)
    zs, zt, bs, bt, idx = _inputs(2, 3, 6, 5)
    dcdkernels.dual_sampled_contrast(zs, zt, bs, bt, idx, logit_scale=2.0)
    s, b, lz = _scalars()
    dual_sampled_contrast_outputs(zs, zt, bs, bt, idx, logit_scale=s)
    assert seen == [("dual_sampled_contrast", 5)] * 2


# ------------------------------------------------------------------------------------------------
# Defect 7: the Triton dual merge addresses its output planes in int64
# ------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl

    from dcdkernels.triton.dual_sampled_contrast import plane_offset

    @triton.jit
    def _plane_offset_probe(out_ptr, B, D, PLANE: tl.constexpr):
        tl.store(out_ptr, plane_offset(PLANE, B, D))
except ImportError:  # triton is optional
    _plane_offset_probe = None


def test_triton_dual_plane_offsets_are_int64():
    if _plane_offset_probe is None or not backends.availability()["triton"][0]:
        pytest.skip("triton cannot run here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros(1, dtype=torch.int64, device=device)
    # 3 * B * D = 3 * 2^32 overflows int32 (the product the launcher formed before); B = 1 is a
    # specialised constant.
    for B, D in ((2**20, 2**12), (1, 2**31 - 1)):
        for plane in (1, 2, 3):
            _plane_offset_probe[(1,)](out, B, D, PLANE=plane)
            assert out.item() == plane * B * D


# ------------------------------------------------------------------------------------------------
# Several column chunks per anchor, one of them with no present column
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, backend", _backends())
@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_absent_columns_across_chunks(device, backend, loss):
    B, K, N, D = 2, 767, 40, 5  # 768 columns: the CPU kernel splits them into chunks at small B
    zs, zt, bs, bt, idx = _inputs(B, K, N, D, seed=21, device=device)
    idx[0, 300:] = N + 3  # the last chunk(s) of row 0 entirely
    idx[1, ::3] = -7  # the positive and every third column of row 1
    kwargs = dict(num_chunks=3) if backend == "triton" else {}
    want = _call("oracle", zs, zt, bs, bt, idx, loss, True)
    if kwargs:  # the Triton launcher takes the split explicitly
        from dcdkernels.triton.dual_sampled_contrast import dual_sampled_contrast as triton_dual

        s, b, lz = _scalars(device=device)
        got = triton_dual(
            zs, zt, bs, bt, idx, s, b, lz, 0 if loss == "infonce" else 1, True, 0, 0, 0, True, 0, **kwargs
        )
    else:
        got = _call(backend, zs, zt, bs, bt, idx, loss, True)
    _assert_outputs_close(got, want, **TOL[torch.float32])
