"""torch.library.opcheck on every registered custom op, for every fused backend available here,
plus float64 gradcheck of the fused ops' registered autograd formulas."""

import pytest
import torch
from helpers import backend_params

import dcdkernels
from dcdkernels.ops.bank_update import bank_momentum_update_op
from dcdkernels.ops.dense_contrast import dense_contrast_backward_keys_op, dense_contrast_op, dense_contrast_reduced_op
from dcdkernels.ops.dual_sampled_contrast import dual_sampled_contrast_op
from dcdkernels.ops.sampled_contrast import sampled_contrast_op

B, K, N, D = 3, 5, 11, 7


def _dtype_for(backend):
    # CPU kernels run float64 (tight opcheck and gradcheck); GPU kernels accumulate in fp32.
    return torch.float64 if backend == "cpu" else torch.float32


def _sampled_args(device, dtype, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)
    bank = torch.randn(N, D, generator=g, dtype=dtype).to(device)
    idx = torch.randint(0, N, (B, K + 1), generator=g).to(device)
    s = torch.tensor(1.7, dtype=dtype, device=device, requires_grad=requires_grad)
    beta = torch.tensor(0.1, dtype=dtype, device=device, requires_grad=requires_grad)
    log_z = torch.tensor(0.4, dtype=dtype, device=device)
    return q, bank, idx, s, beta, log_z


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("loss_type", [0, 1])
def test_opcheck_sampled_contrast(device, backend, loss_type):
    q, bank, idx, s, beta, log_z = _sampled_args(device, _dtype_for(backend))
    torch.library.opcheck(sampled_contrast_op, (q, bank, idx, s, beta, log_z, loss_type, 0, 0, 0, True, 0, backend))
    # In-kernel sampling with a 1-D index of positives.
    torch.library.opcheck(
        sampled_contrast_op, (q, bank, idx[:, 0].contiguous(), s, beta, log_z, loss_type, K, 7, 3, True, 0, backend)
    )
    # Absent columns (rows outside [0, N), a positive among them) and an explicit NCE noise size.
    absent = idx.clone()
    absent[0, 0], absent[1, 2], absent[2, K] = -1, N, N + 5
    torch.library.opcheck(
        sampled_contrast_op, (q, bank, absent, s, beta, log_z, loss_type, 0, 0, 0, True, 4 * N, backend)
    )


@pytest.mark.parametrize("device, backend", backend_params())
def test_opcheck_dual_sampled_contrast(device, backend):
    q, bank, idx, s, beta, _ = _sampled_args(device, _dtype_for(backend))
    qt = torch.randn_like(q).requires_grad_()
    log_z = torch.tensor([0.2, -0.3], dtype=q.dtype, device=device)
    absent = idx.clone()  # absent columns (rows outside [0, N), a positive among them), every column of row 2
    absent[0, 0], absent[1, 2], absent[2] = -1, N, N + 5
    for loss_type in (0, 1):
        torch.library.opcheck(
            dual_sampled_contrast_op,
            (q, qt, bank, bank * 0.5, idx, s, beta, log_z, loss_type, True, 0, 0, 0, True, 0, backend),
        )
        # Absent columns with an explicit NCE noise size.
        torch.library.opcheck(
            dual_sampled_contrast_op,
            (q, qt, bank, bank * 0.5, absent, s, beta, log_z, loss_type, True, 0, 0, 0, True, 4 * N, backend),
        )


@pytest.mark.parametrize("device, backend", backend_params())
def test_opcheck_dense_contrast(device, backend):
    q, keys, _, s, beta, _ = _sampled_args(device, _dtype_for(backend))
    keys.requires_grad_()
    target = torch.tensor([0, 10, 4], device=device)
    pos = torch.randn_like(q).requires_grad_()
    torch.library.opcheck(dense_contrast_op, (q, keys, target, None, s, beta, True, backend))
    torch.library.opcheck(dense_contrast_op, (q, keys, None, pos, s, beta, True, backend))
    _, lse, _, _, _ = dense_contrast_op(q, keys, target, None, s, beta, True, backend)
    g = torch.rand(B, dtype=q.dtype, device=device)
    torch.library.opcheck(
        dense_contrast_backward_keys_op,
        (q.detach(), keys.detach(), target, None, s.detach(), beta.detach(), lse.detach(), g, backend),
    )


@pytest.mark.parametrize("device, backend", backend_params())
def test_opcheck_dense_contrast_reduced(device, backend):
    q, keys, _, s, beta, _ = _sampled_args(device, _dtype_for(backend))
    keys.requires_grad_()
    target = torch.tensor([0, 10, 4], device=device)
    pos = torch.randn_like(q).requires_grad_()
    c = torch.rand(B, dtype=q.dtype, device=device).requires_grad_()
    torch.library.opcheck(dense_contrast_reduced_op, (q, keys, target, None, s, beta, c, True, backend))
    torch.library.opcheck(dense_contrast_reduced_op, (q, keys, None, pos, s, beta, c, True, backend))
    torch.library.opcheck(dense_contrast_reduced_op, (q, keys.detach(), None, pos, s, beta, c, False, backend))


@pytest.mark.parametrize("device, backend", backend_params())
def test_opcheck_bank_update(device, backend):
    bank = torch.nn.functional.normalize(torch.randn(N, D, device=device), dim=1)
    torch.library.opcheck(
        bank_momentum_update_op,
        (bank, torch.tensor([1, 3, 1], device=device), torch.randn(3, D, device=device), 0.5, backend),
    )


@pytest.mark.parametrize("device, backend", [p for p in backend_params() if p.values[1] == "cpu"])
def test_gradcheck_fused_ops_float64(device, backend):
    q, bank, idx, s, beta, log_z = _sampled_args(device, torch.float64)
    log_z.requires_grad_()
    for loss in ("infonce", "nce"):
        fn = lambda q, s, b, lz: dcdkernels.sampled_contrast(
            q, bank, idx, logit_scale=s, bias=b, loss=loss, log_z=lz, backend=backend
        )
        assert torch.autograd.gradcheck(fn, (q, s, beta, log_z))
    qt = torch.randn_like(q).requires_grad_()
    lz2 = torch.tensor([0.2, -0.3], dtype=torch.float64, requires_grad=True)
    for loss in ("infonce", "nce"):
        fn = lambda qs, qt, s, b, lz: torch.stack(
            dcdkernels.dual_sampled_contrast(
                qs,
                qt,
                bank,
                bank.flip(0),
                idx,
                logit_scale=s,
                bias=b,
                loss=loss,
                log_z=lz,
                consistency=0.5,
                backend=backend,
            )[:3]
        )
        assert torch.autograd.gradcheck(fn, (q, qt, s, beta, lz2))
    keys = bank.clone().requires_grad_()
    w = torch.rand(B, dtype=torch.float64)
    fn = lambda q, k, s, b: dcdkernels.dense_contrast(
        q, k, torch.tensor([0, 10, 4]), logit_scale=s, bias=b, weight=w, backend=backend
    )
    assert torch.autograd.gradcheck(fn, (q, keys, s, beta))
    pos = torch.randn_like(q).requires_grad_()
    fn = lambda q, k, p, s: dcdkernels.dense_contrast(q, k, positive=p, logit_scale=s, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, keys, pos, s))
    w.requires_grad_()
    for reduction in ("mean", "sum"):
        fn = lambda q, k, s, b, w: dcdkernels.dense_contrast(
            q, k, torch.tensor([0, 10, 4]), logit_scale=s, bias=b, weight=w, reduction=reduction, backend=backend
        )
        assert torch.autograd.gradcheck(fn, (q, keys, s, beta, w))
        fn = lambda q, k, p, s, w: dcdkernels.dense_contrast(
            q, k, positive=p, logit_scale=s, weight=w, reduction=reduction, backend=backend
        )
        assert torch.autograd.gradcheck(fn, (q, keys, pos, s, w))
