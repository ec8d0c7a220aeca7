"""Triton kernels (dcdkernels/triton) against the eager oracle (dcdkernels/reference).

Without a CUDA device the kernels run on CPU tensors under the Triton interpreter. The
interpreter is chosen when the kernels are defined, so ``TRITON_INTERPRET=1`` is set here
before ``triton`` or ``dcdkernels.triton`` is imported (``setdefault``: an explicit setting
wins). If another module imports ``dcdkernels.triton`` earlier in the same session without it,
these tests cannot run on CPU. With a GPU the same tests run natively on CUDA tensors.

Shapes are tiny (the interpreter costs milliseconds per program). Every test compares values,
the LSE and every gradient (autograd through the oracle, weighted by a random grad_output) at
fp32 atol 1e-5 / rtol 5e-4 and bf16/fp16 atol 5e-2.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import dcdkernels  # noqa: E402
from dcdkernels import reference  # noqa: E402
from dcdkernels.triton import (
    bank_momentum_update_,
    dense_contrast,
    dense_contrast_backward_keys,  # noqa: E402
    dense_contrast_reduced,
    dual_sampled_contrast,
    rng_key,
    sample_index,
    sampled_contrast,
)

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {
    torch.float32: dict(atol=1e-5, rtol=5e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=0.0),
    torch.float16: dict(atol=5e-2, rtol=0.0),
}
SCALE = 1 / 0.07
LOSSES = {0: "infonce", 1: "nce"}


def close(actual, expected, dtype, what):
    torch.testing.assert_close(
        actual.float().cpu(), expected.detach().float().cpu(), **TOL[dtype], msg=lambda m: f"{what}: {m}"
    )


def unit_rows(gen, rows, dim, dtype, transposed=False):
    """L2-normalised rows (as the CRD/DCD heads produce), in ``dtype``; ``transposed`` gives a
    non-contiguous (rows, dim) view."""
    x = torch.randn((dim, rows) if transposed else (rows, dim), generator=gen)
    x = torch.nn.functional.normalize(x, dim=0 if transposed else 1).to(dtype).to(DEVICE)
    return x.t() if transposed else x


def leaf(value):
    return torch.tensor(value, device=DEVICE, requires_grad=True)


def oracle_grads(outputs_and_weights, inputs):
    """Autograd of sum(output * weight) through the oracle, None for unused inputs."""
    total = sum((out * w).sum() for out, w in outputs_and_weights)
    present = [x for x in inputs if x is not None]
    grads = iter(torch.autograd.grad(total, present, allow_unused=True))
    return [next(grads) if x is not None else None for x in inputs]


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed", "offset"])
def _sample_index_kernel(out_ptr, seed, offset, K, N, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    k = 1 + tl.arange(0, BLOCK)
    rows = sample_index(rng_key(seed), offset, b, k, K, N)
    tl.store(out_ptr + b * K + k - 1, rows, mask=k <= K)


@pytest.mark.parametrize("seed,offset", [(0, 0), (7, 2**32 - 5), (2**40 + 3, 123), (2**63 - 11, 2**45)])
def test_sample_index_matches_reference(seed, offset):
    B, K, N = 3, 5, 1000
    out = torch.empty((B, K), dtype=torch.int64, device=DEVICE)
    # The launcher convention: uint64 seeds/offsets travel as the int64 with the same bits.
    as_int64 = lambda v: v - 2**64 if v >= 2**63 else v  # noqa: E731
    _sample_index_kernel[(B,)](out, as_int64(seed), as_int64(offset), K, N, BLOCK=8)
    expected = reference.sample_negatives(torch.zeros(B, dtype=torch.int64), K, N, seed, offset)[:, 1:]
    assert torch.equal(out.cpu(), expected)
    assert ((out >= 0) & (out < N)).all()


# ----------------------------------------------------------------------------------------------
# sampled_contrast
# ----------------------------------------------------------------------------------------------
# (B, K, D, variant): "plain"; "chunks" splits K+1 over 3 programs of 2-column tiles (merge
# path); "strided" uses non-contiguous anchors and duplicate indices.
SAMPLED_CASES = [(1, 1, 3, "plain"), (3, 7, 16, "strided"), (3, 7, 130, "chunks")]


def _sampled_inputs(B, K, D, N, dtype, variant, seed=0):
    gen = torch.Generator().manual_seed(seed)
    anchor = unit_rows(gen, B, D, dtype, transposed=variant == "strided")
    bank = unit_rows(gen, N, D, dtype)
    index = torch.randint(0, N, (B, K + 1), generator=gen).to(DEVICE)
    if variant == "strided":
        index[:, 2] = index[:, 1]  # a negative drawn twice
        index[0, 3] = index[0, 0]  # the positive drawn as a negative
    split = dict(num_chunks=3, block_k=2) if variant == "chunks" else {}
    return anchor, bank, index, split


def _check_sampled(out, anchor, bank, index, loss, bias, log_z, dtype):
    """Compare the kernel outputs with the oracle on (anchor, bank, index)."""
    s = leaf(SCALE)
    q = anchor.float().detach().requires_grad_()  # exact upcast: the oracle computes in fp32 anyway
    per_row, lse = reference.sampled_contrast(q, bank, index, logit_scale=s, bias=bias, loss=loss, log_z=log_z)
    g = torch.randn(per_row.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    d_q, d_s, d_bias, d_log_z = oracle_grads([(per_row, g)], [q, s, bias, log_z])
    loss_k, lse_k, grad_anchor, grad_scalars = out
    close(loss_k, per_row, dtype, "loss")
    close(lse_k, lse, dtype, "lse")
    close(grad_anchor * g[:, None], d_q, dtype, "grad_anchor")
    close((grad_scalars[0] * g).sum(), d_s, dtype, "d/ds")
    if bias is not None:
        close((grad_scalars[1] * g).sum(), d_bias, dtype, "d/dbias")
    if log_z is not None:
        close(-(grad_scalars[1] * g).sum(), d_log_z, dtype, "d/dlog_z")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", [0, 1], ids=LOSSES.get)
@pytest.mark.parametrize("B,K,D,variant", SAMPLED_CASES)
def test_sampled_contrast(B, K, D, variant, loss_type, dtype):
    N = 20
    anchor, bank, index, split = _sampled_inputs(B, K, D, N, dtype, variant)
    bias = leaf(0.3) if variant != "plain" else None
    log_z = leaf(2.0) if loss_type == 1 else None
    out = sampled_contrast(
        anchor,
        bank,
        index,
        torch.tensor(SCALE, device=DEVICE),
        None if bias is None else bias.detach(),
        None if log_z is None else log_z.detach(),
        loss_type,
        0,
        0,
        0,
        True,
        **split,
    )
    _check_sampled(out, anchor, bank, index, LOSSES[loss_type], bias, log_z, dtype)


@pytest.mark.parametrize("loss_type", [0, 1], ids=LOSSES.get)
def test_sampled_contrast_in_kernel_sampling(loss_type):
    B, K, D, N, seed, offset = 3, 7, 16, 50, 1234, 2**32 - 10
    anchor, bank, _, _ = _sampled_inputs(B, K, D, N, torch.float32, "plain")
    positive = torch.arange(B, device=DEVICE) * 7
    log_z = leaf(2.0) if loss_type == 1 else None
    out = sampled_contrast(
        anchor,
        bank,
        positive,
        torch.tensor(SCALE, device=DEVICE),
        None,
        None if log_z is None else log_z.detach(),
        loss_type,
        K,
        seed,
        offset,
        True,
        num_chunks=2,
        block_k=4,
    )
    index = reference.sample_negatives(positive, K, N, seed, offset)
    _check_sampled(out, anchor, bank, index, LOSSES[loss_type], None, log_z, torch.float32)


def test_sampled_contrast_without_grad():
    anchor, bank, index, _ = _sampled_inputs(3, 7, 16, 20, torch.float32, "plain")
    s = torch.tensor(SCALE, device=DEVICE)
    loss, lse, grad_anchor, grad_scalars = sampled_contrast(anchor, bank, index, s, None, None, 0, 0, 0, 0, False)
    assert grad_anchor.shape == (0,) and grad_scalars.shape == (0,)
    per_row, expected_lse = reference.sampled_contrast(anchor, bank, index, logit_scale=s)
    close(loss, per_row, torch.float32, "loss")
    close(lse, expected_lse, torch.float32, "lse")


def test_dual_sampled_contrast_without_grad():
    B, K, D, N = 3, 7, 16, 20
    anchor_s, bank_t, index, _ = _sampled_inputs(B, K, D, N, torch.float32, "plain")
    anchor_t, bank_s, _, _ = _sampled_inputs(B, K, D, N, torch.float32, "plain", seed=1)
    s = torch.tensor(SCALE, device=DEVICE)
    losses, lse, grad_anchors, grad_scalars = dual_sampled_contrast(
        anchor_s, anchor_t, bank_s, bank_t, index, s, None, None, 0, True, 0, 0, 0, False
    )
    assert grad_anchors.shape == (0,) and grad_scalars.shape == (0,)
    expected = reference.dual_sampled_contrast(anchor_s, anchor_t, bank_s, bank_t, index, logit_scale=s)
    for name, got, want in zip(("loss_s", "loss_t", "kl", "lse_s", "lse_t"), [*losses, *lse], expected):
        close(got, want, torch.float32, name)


def test_sampled_contrast_skips_out_of_range_rows():
    """Validation normally rejects them; the kernel must still not read them, and treats their
    columns as absent."""
    B, K, D, N = 3, 7, 16, 20
    anchor, bank, index, _ = _sampled_inputs(B, K, D, N, torch.float32, "plain")
    bad = index.clone()
    bad[:, 3] = N + 1000
    bad[:, 5] = -7
    out = sampled_contrast(
        anchor, bank, bad, torch.tensor(SCALE, device=DEVICE), None, None, 0, 0, 0, 0, True, num_chunks=2, block_k=2
    )
    kept = index[:, [c for c in range(K + 1) if c not in (3, 5)]]
    _check_sampled(out, anchor, bank, kept, "infonce", None, None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", [0, 1], ids=LOSSES.get)
def test_sampled_contrast_absent_columns(loss_type, dtype):
    """The absent-column convention of csrc/KERNELS.md against the oracle: absent negatives (far
    out of range too), an absent positive, a row with no present column, a row with only its
    positive; NCE with an explicit noise size (c = K / noise_rows)."""
    B, K, D, N = 4, 9, 8, 30
    anchor, bank, index, _ = _sampled_inputs(B, K, D, N, dtype, "plain")
    index[0, 1::3] = torch.tensor([-1, N, 2**40], device=DEVICE)
    index[1, 0] = N + 3
    index[2] = -1
    index[3, 1:] = N
    s, bias, log_z = (torch.tensor(v, device=DEVICE) for v in (SCALE, 0.3, 2.0))
    out = sampled_contrast(
        anchor,
        bank,
        index,
        s,
        bias,
        log_z if loss_type else None,
        loss_type,
        0,
        0,
        0,
        True,
        3 * N,
        num_chunks=3,
        block_k=2,
    )
    want = reference.sampled_contrast_outputs(
        anchor.double(),
        bank.double(),
        index,
        logit_scale=s.double(),
        bias=bias.double(),
        loss=LOSSES[loss_type],
        log_z=log_z.double(),
        noise_rows=3 * N,
    )
    for name, got, expected in zip(("loss", "lse", "grad_anchor", "grad_scalars"), out, want):
        close(got, expected, torch.float32, name)  # the same rounded inputs on both sides
    loss, lse, grad_anchor, grad_scalars = out
    assert lse[2] == -float("inf") and loss[2] == (0.0 if loss_type else -float("inf"))
    assert not grad_anchor[2].any() and not grad_scalars[:, 2].any()


# ----------------------------------------------------------------------------------------------
# dual_sampled_contrast
# ----------------------------------------------------------------------------------------------
# Every shape and flag in fp32; the 16-bit dtypes on one shape (the dual kernel is the slowest
# one under the interpreter).
DUAL_CASES = [
    (shape, kl, loss_type, torch.float32)
    for shape in SAMPLED_CASES[1:] + [(1, 1, 3, "sampled")]
    for kl in (True, False)
    for loss_type in (0, 1)
]
DUAL_CASES += [(SAMPLED_CASES[1], True, loss_type, dtype) for dtype in DTYPES[1:] for loss_type in (0, 1)]


DUAL_IDS = [
    "{}x{}x{}-{}-{}-{}-{}".format(*shape, "kl" if kl else "nokl", LOSSES[loss_type], str(dtype)[6:])
    for shape, kl, loss_type, dtype in DUAL_CASES
]


@pytest.mark.parametrize("shape,compute_kl,loss_type,dtype", DUAL_CASES, ids=DUAL_IDS)
def test_dual_sampled_contrast(shape, compute_kl, loss_type, dtype):
    B, K, D, variant = shape
    N = 20
    gen = torch.Generator().manual_seed(3)
    anchor_s, bank_t, index, split = _sampled_inputs(B, K, D, N, dtype, variant, seed=2)
    anchor_t = unit_rows(gen, B, D, dtype)
    bank_s = unit_rows(gen, N, D, dtype)
    kernel_index, num_negatives, seed, offset = index, 0, 0, 0
    if variant == "sampled":
        num_negatives, seed, offset = K, 99, 5
        kernel_index = index[:, 0].contiguous()
        index = reference.sample_negatives(kernel_index, K, N, seed, offset)
    bias = leaf(0.3)
    log_z = torch.tensor([2.0, 1.5], device=DEVICE, requires_grad=True) if loss_type == 1 else None
    losses, lse, grad_anchors, grad_scalars = dual_sampled_contrast(
        anchor_s,
        anchor_t,
        bank_s,
        bank_t,
        kernel_index,
        torch.tensor(SCALE, device=DEVICE),
        bias.detach(),
        None if log_z is None else log_z.detach(),
        loss_type,
        compute_kl,
        num_negatives,
        seed,
        offset,
        True,
        **split,
    )

    s = leaf(SCALE)
    z_s = anchor_s.float().detach().requires_grad_()
    z_t = anchor_t.float().detach().requires_grad_()
    loss_s, loss_t, kl, lse_s, lse_t = reference.dual_sampled_contrast(
        z_s,
        z_t,
        bank_s,
        bank_t,
        index,
        logit_scale=s,
        bias=bias,
        loss=LOSSES[loss_type],
        log_z=log_z,
        compute_kl=compute_kl,
    )
    g = torch.randn((3, B), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    terms = [(loss_s, g[0]), (loss_t, g[1])] + ([(kl, g[2])] if compute_kl else [])
    d_zs, d_zt, d_s, d_bias, d_log_z = oracle_grads(terms, [z_s, z_t, s, bias, log_z])
    for i, (name, expected) in enumerate([("loss_s", loss_s), ("loss_t", loss_t), ("kl", kl)]):
        close(losses[i], expected, dtype, name)
    close(lse[0], lse_s, dtype, "lse_s")
    close(lse[1], lse_t, dtype, "lse_t")
    if not compute_kl:
        g = g * torch.tensor([1.0, 1.0, 0.0], device=DEVICE)[:, None]
        assert not grad_anchors[2:].any() and not grad_scalars[:, 2].any()
    close(grad_anchors[0] * g[0, :, None] + grad_anchors[2] * g[2, :, None], d_zs, dtype, "grad z_s")
    close(grad_anchors[1] * g[1, :, None] + grad_anchors[3] * g[2, :, None], d_zt, dtype, "grad z_t")
    close((grad_scalars[0] * g).sum(), d_s, dtype, "d/ds")
    close((grad_scalars[1] * g).sum(), d_bias, dtype, "d/dbias")
    if log_z is not None:
        close(-(grad_scalars[1, :2] * g[:2]).sum(dim=1), d_log_z, dtype, "d/dlog_z")


# ----------------------------------------------------------------------------------------------
# dense_contrast
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_positive", [False, True], ids=["target", "positive"])
@pytest.mark.parametrize("B,M,D", [(1, 1, 3), (3, 7, 16), (3, 7, 130), (20, 70, 3)])
def test_dense_contrast(B, M, D, with_positive, dtype):
    _check_dense_contrast(B, M, D, with_positive, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_positive", [False, True], ids=["target", "positive"])
@pytest.mark.parametrize("B,M,D,num_splits", [(5, 200, 130, 4), (20, 70, 3, 2), (3, 130, 16, 3)])
def test_dense_contrast_key_splits(B, M, D, num_splits, with_positive, dtype):
    """The forward split over the keys (flash-decoding partials + merge, what a GPU takes when the
    anchor blocks cannot fill it: B = 64 is 4 programs for 132 SMs), forced here."""
    import sys

    module = sys.modules["dcdkernels.triton.dense_contrast"]
    assert module.plan_key_splits(4, 65536, 64, 132) == (64, 1024)  # B = 64 on an H100: 256 programs
    assert module.plan_key_splits(4, M, 64, None, num_splits)[0] > 1
    _check_dense_contrast(B, M, D, with_positive, dtype, num_splits=num_splits)


def _check_dense_contrast(B, M, D, with_positive, dtype, num_splits=None):
    gen = torch.Generator().manual_seed(5)
    anchor = unit_rows(gen, B, D, dtype, transposed=B == 3)
    keys = unit_rows(gen, M, D, dtype)
    positive = unit_rows(gen, B, D, dtype) if with_positive else None
    target = None if with_positive else torch.randint(0, M, (B,), generator=gen).to(DEVICE)
    bias = leaf(0.3) if D != 3 else None
    loss, lse, grad_anchor, grad_positive, grad_scalars = dense_contrast(
        anchor,
        keys,
        target,
        positive,
        torch.tensor(SCALE, device=DEVICE),
        None if bias is None else bias.detach(),
        True,
        num_splits=num_splits,
    )
    g = torch.randn(B, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    grad_keys = dense_contrast_backward_keys(
        anchor,
        keys,
        target,
        positive,
        torch.tensor(SCALE, device=DEVICE),
        None if bias is None else bias.detach(),
        lse,
        g,
    )

    s = leaf(SCALE)
    q, k = anchor.float().detach().requires_grad_(), keys.float().detach().requires_grad_()
    p = positive.float().detach().requires_grad_() if with_positive else None
    per_row, expected_lse = reference.dense_contrast(q, k, target, positive=p, logit_scale=s, bias=bias)
    d_q, d_k, d_p, d_s, d_bias = oracle_grads([(per_row, g)], [q, k, p, s, bias])
    close(loss, per_row, dtype, "loss")
    close(lse, expected_lse, dtype, "lse")
    close(grad_anchor * g[:, None], d_q, dtype, "grad_anchor")
    close(grad_keys, d_k, dtype, "grad_keys")
    close((grad_scalars[0] * g).sum(), d_s, dtype, "d/ds")
    if with_positive:
        close(grad_positive * g[:, None], d_p, dtype, "grad_positive")
    else:
        assert grad_positive.shape == (0,)
    if bias is not None:
        close((grad_scalars[1] * g).sum(), d_bias, dtype, "d/dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_positive", [False, True], ids=["target", "positive"])
@pytest.mark.parametrize("B,M,D", [(1, 1, 3), (3, 7, 130), (20, 70, 3)])
def test_dense_contrast_reduced(B, M, D, with_positive, dtype):
    gen = torch.Generator().manual_seed(8)
    anchor = unit_rows(gen, B, D, dtype, transposed=B == 3)
    keys = unit_rows(gen, M, D, dtype)
    positive = unit_rows(gen, B, D, dtype) if with_positive else None
    target = None if with_positive else torch.randint(0, M, (B,), generator=gen).to(DEVICE)
    bias = leaf(0.3) if D != 3 else None
    c = (torch.rand(B, generator=gen) + 0.5).to(DEVICE)
    loss, rows, lse, grad_anchor, grad_positive, grad_keys, grad_scalars = dense_contrast_reduced(
        anchor,
        keys,
        target,
        positive,
        torch.tensor(SCALE, device=DEVICE),
        None if bias is None else bias.detach(),
        c,
        True,
    )

    s = leaf(SCALE)
    q, k = anchor.float().detach().requires_grad_(), keys.float().detach().requires_grad_()
    p = positive.float().detach().requires_grad_() if with_positive else None
    per_row, expected_lse = reference.dense_contrast(q, k, target, positive=p, logit_scale=s, bias=bias)
    d_q, d_k, d_p, d_s, d_bias = oracle_grads([(per_row, c)], [q, k, p, s, bias])
    close(loss, (per_row * c).sum(), dtype, "loss")
    close(rows, per_row, dtype, "rows")
    close(lse, expected_lse, dtype, "lse")
    close(grad_anchor, d_q, dtype, "grad_anchor")
    close(grad_keys, d_k, dtype, "grad_keys")
    close(grad_scalars[0], d_s, dtype, "d/ds")
    if with_positive:
        close(grad_positive, d_p, dtype, "grad_positive")
    else:
        assert grad_positive.shape == (0,)
    if bias is not None:
        close(grad_scalars[1], d_bias, dtype, "d/dbias")
    assert dense_contrast_reduced(anchor, keys, target, positive, torch.tensor(SCALE, device=DEVICE), None, c, False)[
        5
    ].shape == (0,)


def test_dense_contrast_without_grad():
    gen = torch.Generator().manual_seed(7)
    anchor, keys = unit_rows(gen, 3, 16, torch.float32), unit_rows(gen, 7, 16, torch.float32)
    target = torch.tensor([0, 6, 3], device=DEVICE)
    s = torch.tensor(SCALE, device=DEVICE)
    loss, lse, *grads = dense_contrast(anchor, keys, target, None, s, None, False)
    assert all(t.shape == (0,) for t in grads)
    per_row, expected_lse = reference.dense_contrast(anchor, keys, target, logit_scale=s)
    close(loss, per_row, torch.float32, "loss")
    close(lse, expected_lse, torch.float32, "lse")


def test_dense_backward_keys_fp16_small_probabilities_do_not_underflow(monkeypatch):
    """Issue 18, defect 2: with fp16 anchors and keys on a GPU the keys' backward rounds its dot
    operand ``g (P - onehot)`` to fp16, and ``g p`` (here g = 1/256, the "mean" weight at
    B = 256, times p ~ 1e-13) is below fp16's smallest subnormal: unscaled, the negatives' key
    gradients came out exactly 0. Run here under the interpreter with the GPU's fp16 dot forced
    (it rounds the operands to fp16 as the GPU does); each key's gradient row must match the
    oracle to fp16 precision relative to its own size."""
    import sys

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
    anchor, keys = anchor.half().to(DEVICE), keys.half().to(DEVICE)
    target = torch.randint(0, 4, (B,), generator=gen).to(DEVICE)
    s = torch.tensor(SCALE, device=DEVICE)
    loss, lse, *_ = dense_contrast(anchor, keys, target, None, s, None, False)
    g = torch.full((B,), 1.0 / B, device=DEVICE)
    grad_keys = dense_contrast_backward_keys(anchor, keys, target, None, s, None, lse, g).double().cpu()
    # The oracle in float64 from the same fp16 values.
    a64, k64 = anchor.double().cpu(), keys.double().cpu()
    p = torch.softmax(SCALE * a64 @ k64.t(), dim=1)
    p[torch.arange(B), target.cpu()] -= 1
    negatives = slice(4, M)
    assert (p[:, negatives] / B).max() < 2.0**-24  # g p below fp16's smallest subnormal: the defect's case
    expected = SCALE * (p * g.double().cpu()[:, None]).t() @ a64
    err = (grad_keys - expected).norm(dim=1) / expected.norm(dim=1)
    assert err[negatives].max() < 1e-2, f"relative error of the negatives' key gradients: {err[negatives].max()}"
    assert err[:4].max() < 1e-2


# ----------------------------------------------------------------------------------------------
# bank_momentum_update_
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,B,D", [(10, 6, 3), (5, 1, 130), (8, 8, 16)])
def test_bank_momentum_update(N, B, D, dtype):
    gen = torch.Generator().manual_seed(8)
    bank = unit_rows(gen, N, D, dtype)
    index = torch.randint(0, N, (B,), generator=gen).to(DEVICE)
    index[-1] = index[0]  # a duplicate: the last occurrence wins
    value = unit_rows(gen, B, D, torch.float32, transposed=True)  # another dtype, non-contiguous
    expected, before = bank.clone(), bank.clone()
    reference.bank_momentum_update_(expected, index, value, 0.7)
    bank_momentum_update_(bank, index, value, 0.7)
    if DEVICE.type == "cpu":
        # Same fp32 operations and the same rounding: at these sizes the rows agree to the bit.
        assert torch.equal(bank, expected), (bank.float() - expected.float()).abs().max()
    else:
        # A GPU may contract m*x + (1-m)*v into an FMA and reduce the norm in another order.
        close(bank, expected, dtype, "bank")
    assert_within_contract_rounding(bank, before, index, value, 0.7)


def assert_within_contract_rounding(bank, before, index, value, momentum):
    """Issue 18, defect 4: the update is fp32 math rounded once to the bank dtype, but neither the
    order of the norm's reduction nor an FMA contraction is part of the contract, so a GPU result
    need not equal ``F.normalize``'s bit for bit (the old GPU-only ``torch.equal`` would fail).
    The bound: against the exact update (float64, from the same fp32 inputs and fp32
    coefficients m and 1 - m), rows of unit norm, the fp32 pipeline errs by at most about
    ``(5 + D/2) u`` absolute (u = 2^-24: the mix 2 roundings, amplified <= 1.5x by the mix's
    cancellation for these rows, the sum of D squares <= D roundings halved by the sqrt, sqrt and
    division 1 each). A 16-bit bank adds its one rounding: the two results may round to
    neighbours, <= 1 ulp <= eps of the dtype for elements <= 1."""
    from dcdkernels.reference.bank_update import last_occurrence

    keep = last_occurrence(index)
    m32 = torch.tensor(momentum, dtype=torch.float32).double()
    one_minus = torch.tensor(1.0 - momentum, dtype=torch.float32).double()
    mixed = before[index[keep]].double() * m32 + value[keep].double() * one_minus
    exact = mixed / mixed.norm(dim=1, keepdim=True)
    assert exact.norm(dim=1).sub(1).abs().max() < 1e-12
    D = bank.shape[1]
    u = 2.0**-24
    fp32_err = (5 + D / 2) * u
    allowed = fp32_err if bank.dtype == torch.float32 else torch.finfo(bank.dtype).eps + fp32_err
    err = (bank[index[keep]].double() - exact).abs().max().item()
    assert err <= allowed, f"{err / u:.1f} u from the exact update (allowed {allowed / u:.1f} u, u = 2^-24)"


def test_bank_momentum_update_skips_out_of_range_rows():
    gen = torch.Generator().manual_seed(9)
    bank = unit_rows(gen, 6, 4, torch.float32)
    value = unit_rows(gen, 3, 4, torch.float32)
    before = bank.clone()
    bank_momentum_update_(bank, torch.tensor([-1, 2, 6], device=DEVICE), value, 0.5)
    # Rows other than 2 are untouched, bit for bit; row 2 is the update within the contract's
    # rounding (not torch.equal to F.normalize: on a GPU the reduction orders differ).
    assert torch.equal(bank[[0, 1, 3, 4, 5]], before[[0, 1, 3, 4, 5]])
    assert_within_contract_rounding(bank[2:3], before[2:3], torch.tensor([0], device=DEVICE), value[1:2], 0.5)


# ----------------------------------------------------------------------------------------------
# Through the public API (dispatch, custom op, autograd)
# ----------------------------------------------------------------------------------------------
def test_public_api_triton_backend_matches_eager():
    gen = torch.Generator().manual_seed(10)
    anchor, bank = unit_rows(gen, 3, 16, torch.float32), unit_rows(gen, 20, 16, torch.float32)
    index = torch.randint(0, 20, (3, 8), generator=gen).to(DEVICE)
    results = {}
    for backend in ("eager", "triton"):
        q = anchor.clone().requires_grad_()
        s = leaf(SCALE)
        loss = dcdkernels.sampled_contrast(q, bank, index, logit_scale=s, backend=backend)
        loss.sum().backward()
        results[backend] = (loss.detach(), q.grad, s.grad)
    for got, want in zip(results["triton"], results["eager"]):
        close(got, want, torch.float32, "public sampled_contrast")
