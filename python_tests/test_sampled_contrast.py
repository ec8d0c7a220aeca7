"""sampled_contrast on every backend (C++ CPU, Triton, CUDA) against the float64 oracle
(docs/math.md §1, contract csrc/KERNELS.md): loss, LSE and every per-row gradient, per dtype,
on the shapes of helpers.SAMPLED_SHAPES; layouts, in-kernel sampling, absent columns, no-grad,
and the public op through the dispatcher and autograd."""

import pytest
import torch
from helpers import (
    BACKENDS,
    DTYPES,
    F64,
    SAMPLED_SHAPES,
    accumulation,
    assert_close,
    assert_refused,
    device_of,
    grads,
    kernel,
    misaligned,
    missing,
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


def run(
    backend,
    anchor,
    bank,
    index,
    s,
    bias,
    log_z,
    loss,
    num_negatives=0,
    seed=0,
    offset=0,
    grad=True,
    noise_rows=0,
    split=None,
):
    """The backend's kernel on the given inputs; the scalars as 0-d tensors of the accumulation dtype."""
    acc = accumulation(anchor, bank)
    t = lambda v: scalar(v, acc, anchor.device)  # noqa: E731
    args = (anchor, bank, index, t(s), t(bias), t(log_z), LOSSES[loss], num_negatives, seed, offset, grad, noise_rows)
    return kernel("sampled_contrast", backend)(*args, **tiles(backend, **(split or {})))


def oracle(anchor, bank, index, s, bias, log_z, loss):
    """float64 per-row loss, LSE, d/danchor (B, D), d/ds (B,), d/dbeta (B,)."""
    B, dev = anchor.shape[0], anchor.device
    q = anchor.detach().to(F64).requires_grad_()
    s_col, b_col = per_row(s, B, dev), per_row(bias, B, dev)
    lz = None if log_z is None else torch.tensor(log_z, dtype=F64, device=dev)
    out, lse = R.sampled_contrast(q, bank.to(F64), index, logit_scale=s_col, bias=b_col, loss=loss, log_z=lz)
    gq, gs, gb = grads(out.sum(), [q, s_col, b_col])
    return out.detach(), lse, gq, gs.view(-1), gb.view(-1)


def check(backend, anchor, bank, index, s, bias, log_z, loss, dtype, what="", split=None):
    out, lse, ga, gsc = run(backend, anchor, bank, index, s, bias, log_z, loss, split=split)
    e_out, e_lse, e_ga, e_gs, e_gb = oracle(anchor, bank, index, s, bias, log_z, loss)
    acc = accumulation(anchor, bank)
    assert out.dtype == lse.dtype == ga.dtype == gsc.dtype == acc
    assert ga.shape == anchor.shape and gsc.shape == (2, anchor.shape[0])
    tol = precision(backend, dtype)
    assert_close(out, e_out, tol, f"{what} loss")
    assert_close(lse, e_lse, tol, f"{what} lse")
    assert_close(ga, e_ga, tol, f"{what} grad_anchor")
    assert_close(gsc[0], e_gs, tol, f"{what} d/ds")
    if loss == "infonce":
        assert torch.equal(gsc[1], torch.zeros_like(gsc[1])), f"{what}: InfoNCE d/dbeta is written 0, exactly"
    else:
        assert_close(gsc[1], e_gb, tol, f"{what} d/dbeta")


def case(B, N, D, K, dtype, seed, device, bank_dtype=None):
    """Unit anchors and bank rows, an index with the positive again among the negatives and a
    repeated negative (when K >= 3)."""
    g = torch.Generator().manual_seed(seed)
    anchor = unit_rows(B, D, dtype, g, device)
    bank = unit_rows(N, D, bank_dtype or dtype, g, device)
    index = torch.randint(0, N, (B, K + 1), generator=g)
    index[:, -1] = index[:, 0]
    if K >= 3:
        index[:, 2] = index[:, 1]
    return anchor, bank, index.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
@pytest.mark.parametrize("B,N,D,K,split", SAMPLED_SHAPES)
def test_matches_oracle(backend, dtype, loss, B, N, D, K, split):
    dev = device_of(backend)
    anchor, bank, index = case(B, N, D, K, dtype, seed=B * 1000 + D + K, device=dev)
    s, bias = 1 / 0.07, (0.25 if K % 2 else None)
    log_z = nce_log_z(N) if loss == "nce" else None
    refused = unsupported("sampled_contrast", backend, dtype, D)
    if refused:
        assert_refused(
            refused,
            lambda: dcdkernels.sampled_contrast(
                anchor, bank, index, logit_scale=s, loss=loss, log_z=log_z, backend=backend
            ),
        )
        return
    check(backend, anchor, bank, index, s, bias, log_z, loss, dtype, split=split)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
@pytest.mark.parametrize("D", [3, 130])
def test_layouts(backend, loss, D):
    """Non-contiguous anchors (a column slice, a transpose), misaligned bank rows with an odd row
    stride, a strided index, and mixed anchor/bank dtypes."""
    dev = device_of(backend)
    s, bias, log_z = (1 / 0.07, None, 9.0) if loss == "nce" else (4.0, -0.5, None)
    for i, (qd, bd) in enumerate(
        [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32)]
    ):
        g = torch.Generator().manual_seed(100 + i)
        q, bank, idx = case(3, 80, D, 37, qd, seed=D + i, device=dev, bank_dtype=bd)
        tol = precision(backend, torch.bfloat16)
        check(backend, q, bank, idx, s, bias, log_z, loss, tol, f"{qd}/{bd}")
        check(backend, noncontiguous(q, g, "slice"), bank, idx, s, bias, log_z, loss, tol, "sliced anchor")
        check(backend, noncontiguous(q, g, "transpose"), bank, idx, s, bias, log_z, loss, tol, "transposed anchor")
        check(backend, q, misaligned(bank), idx, s, bias, log_z, loss, tol, "misaligned bank")
        wide = torch.zeros(idx.shape[0], 2 * idx.shape[1], dtype=idx.dtype, device=dev)
        wide[:, ::2] = idx
        check(backend, q, bank, wide[:, ::2], s, bias, log_z, loss, tol, "strided index")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_without_grad(backend, loss):
    anchor, bank, index = case(4, 200, 24, 100, torch.float32, seed=3, device=device_of(backend))
    log_z = 9.0 if loss == "nce" else None
    with_grad = run(backend, anchor, bank, index, 5.0, 0.1, log_z, loss)
    out, lse, ga, gsc = run(backend, anchor, bank, index, 5.0, 0.1, log_z, loss, grad=False)
    assert ga.shape == (0,) and gsc.shape == (0,)
    assert_close(out, with_grad[0], torch.float32, "loss without grad")
    assert_close(lse, with_grad[1], torch.float32, "lse without grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,K,split", [(1, 3000, {}), (6, 40, dict(num_chunks=2, block_k=4))])
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 17, 12345), (11, 2**32 - 10)])
def test_in_kernel_sampling_matches_explicit_index(backend, B, K, split, seed, offset):
    """Negatives drawn in the kernel are exactly dcdkernels.reference.rng's, and the outputs are
    those of the explicit index bit for bit (same columns, same order, same work split)."""
    N, D = 1000, 16
    anchor, bank, index = case(B, N, D, K, torch.float32, seed=seed % 1000, device=device_of(backend))
    positive = index[:, 0].contiguous()
    explicit = R.sample_negatives(positive, K, N, seed, offset)
    assert explicit.shape == (B, K + 1) and int(explicit.min()) >= 0 and int(explicit.max()) < N
    for loss, log_z in (("infonce", None), ("nce", 4.0)):
        sampled = run(backend, anchor, bank, positive, 8.0, None, log_z, loss, K, seed, offset, split=split)
        direct = run(backend, anchor, bank, explicit, 8.0, None, log_z, loss, split=split)
        for name, a, b in zip(("loss", "lse", "grad_anchor", "grad_scalars"), sampled, direct):
            assert torch.equal(a, b), f"{loss} seed={seed} offset={offset}: {name} differs from the explicit index"
        e_out, e_lse, e_ga, _, _ = oracle(anchor, bank, explicit, 8.0, None, log_z, loss)
        assert_close(sampled[0], e_out, torch.float32, "loss")
        assert_close(sampled[1], e_lse, torch.float32, "lse")
        assert_close(sampled[2], e_ga, torch.float32, "grad_anchor")


def absent_index(B, K, N, gen, device):
    """(B, K+1) index with absent columns (rows outside [0, N), csrc/KERNELS.md): row 0 absent
    negatives (far out of range too), row 1 an absent positive, row 2 no present column, row 3
    only its positive, row 4 (if any) a run of absent columns over the middle 2/3 of its row
    (whole chunks with nothing present)."""
    index = torch.randint(0, N, (B, K + 1), generator=gen)
    index[0, 1::3] = torch.tensor([-1, N, 2**40, -(2**40)] * K)[: index[0, 1::3].numel()]
    index[1, 0] = N + 3
    index[2] = -1
    index[3, 1:] = N
    if B > 4:
        index[4, (K + 1) // 6 : 5 * (K + 1) // 6] = -7
    return index.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
@pytest.mark.parametrize(
    "B,N,D,K,split", [(4, 30, 8, 9, dict(num_chunks=3, block_k=2)), (5, 500, 16, 1200, dict(num_chunks=4, block_k=64))]
)
def test_absent_columns_match_oracle(backend, dtype, loss, B, N, D, K, split):
    """Absent negatives drop out, an absent positive adds no -l_0 / -row_0 term, a row with no
    present column has LSE -inf (InfoNCE loss -inf, NCE no term) and zero gradients; NCE's
    c = K / noise_rows with an explicit noise size."""
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(K)
    anchor, bank = unit_rows(B, D, dtype, gen, dev), unit_rows(N, D, dtype, gen, dev)
    index = absent_index(B, K, N, gen, dev)
    s, bias, log_z = 1 / 0.07, 0.25, (nce_log_z(N) if loss == "nce" else None)
    if unsupported("sampled_contrast", backend, dtype, D):
        return  # float64 on a GPU backend: refused, as test_matches_oracle asserts
    noise = 3 * N
    out = run(backend, anchor, bank, index, s, bias, log_z, loss, noise_rows=noise, split=split)
    want = R.sampled_contrast_outputs(
        anchor.to(F64), bank.to(F64), index, logit_scale=s, bias=bias, loss=loss, log_z=log_z, noise_rows=noise
    )
    for name, got, expected in zip(("loss", "lse", "grad_anchor", "grad_scalars"), out, want):
        assert_close(got, expected, precision(backend, dtype), name)
    loss_k, lse, ga, gsc = out
    assert lse[2] == -float("inf") and loss_k[2] == (-float("inf") if loss == "infonce" else 0)
    assert not ga[2].any() and not gsc[:, 2].any()
    if loss == "infonce":  # row 3, only the positive: loss 0, gradients 0
        assert_close(loss_k[3], torch.zeros(()), precision(backend, dtype), "row with only its positive")
        assert_close(ga[3], torch.zeros(D), precision(backend, dtype), "row with only its positive")


@pytest.mark.parametrize("backend", BACKENDS)
def test_absent_positive_with_in_kernel_sampling(backend):
    dev = device_of(backend)
    gen = torch.Generator().manual_seed(3)
    N, D, K = 50, 16, 40
    anchor, bank = unit_rows(3, D, torch.float32, gen, dev), unit_rows(N, D, torch.float32, gen, dev)
    positive = torch.tensor([-1, 7, N], device=dev)
    index = R.sample_negatives(positive, K, N, 5, 11)
    for loss, log_z in (("infonce", None), ("nce", 4.0)):
        sampled = run(backend, anchor, bank, positive, 8.0, None, log_z, loss, K, 5, 11)
        explicit = run(backend, anchor, bank, index, 8.0, None, log_z, loss)
        for a, b in zip(sampled, explicit):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_rejects_bad_arguments(backend):
    dev = device_of(backend)
    anchor, bank = torch.randn(2, 4, device=dev), torch.randn(10, 4, device=dev)
    index = torch.zeros(2, 5, dtype=torch.int64, device=dev)
    with pytest.raises((RuntimeError, ValueError), match="num_negatives"):  # a 2-D index has its negatives
        run(backend, anchor, bank, index, 1.0, None, None, "infonce", num_negatives=4)
    with pytest.raises((RuntimeError, ValueError), match="noise_rows"):
        run(backend, anchor, bank, index, 1.0, None, 0.0, "nce", noise_rows=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_public_op_matches_eager(backend, dtype, loss):
    """Through the dispatcher, the custom op and its autograd formula: the loss and the gradients
    of the anchor, a learnable logit scale and bias (and log Z for NCE), weighted by a non-uniform
    grad_output, equal the eager oracle's; the LSE comes back with ``return_lse``."""
    dev = device_of(backend)
    anchor, bank, index = case(3, 11, 33, 7, dtype, seed=5, device=dev)
    anchor = noncontiguous(anchor, torch.Generator().manual_seed(1))
    if unsupported("sampled_contrast", backend, dtype):
        return  # refused, as test_matches_oracle asserts
    results = {}
    for be in (backend, "eager"):
        q = anchor.detach().clone().requires_grad_()
        leaves = [torch.tensor(v, device=dev, dtype=accumulation(q), requires_grad=True) for v in (5.0, 0.3, 2.0)]
        s, bias, log_z = leaves
        out, lse = dcdkernels.sampled_contrast(
            q, bank, index, logit_scale=s, bias=bias, loss=loss, log_z=log_z, backend=be, return_lse=True
        )
        weight = torch.linspace(0.5, 1.5, out.numel(), device=dev, dtype=out.dtype)
        (out * weight).sum().backward()
        results[be] = [out, lse, q.grad, s.grad, bias.grad, log_z.grad if loss == "nce" else torch.zeros(())]
    names = ("loss", "lse", "grad anchor", "grad scale", "grad bias", "grad log_z")
    for name, got, want in zip(names, results[backend], results["eager"]):
        assert_close(got, want, dtype, name)


if not missing("triton"):
    import triton
    import triton.language as tl

    from dcdkernels.triton import rng_key, sample_index

    @triton.jit(do_not_specialize=["seed", "offset"])
    def _sample_index_kernel(out_ptr, seed, offset, K, N, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        k = 1 + tl.arange(0, BLOCK)
        rows = sample_index(rng_key(seed), offset, b, k, K, N)
        tl.store(out_ptr + b * K + k - 1, rows, mask=k <= K)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values == ("triton",)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (7, 2**32 - 5), (2**40 + 3, 123), (2**63 - 11, 2**45)])
def test_triton_sample_index_matches_reference(backend, seed, offset):
    """The Triton RNG building block (dcdkernels/triton/rng.py) inside a kernel draws exactly
    dcdkernels.reference.rng's rows."""
    B, K, N = 3, 5, 1000
    out = torch.empty((B, K), dtype=torch.int64, device=device_of(backend))
    # The launcher convention: uint64 seeds/offsets travel as the int64 with the same bits.
    as_int64 = lambda v: v - 2**64 if v >= 2**63 else v  # noqa: E731
    _sample_index_kernel[(B,)](out, as_int64(seed), as_int64(offset), K, N, BLOCK=8)
    expected = R.sample_negatives(torch.zeros(B, dtype=torch.int64), K, N, seed, offset)[:, 1:]
    assert torch.equal(out.cpu(), expected)
