"""Determinism, overflow and 64-bit offsets (issue: reliability)."""

import math

import pytest
import torch
from helpers import backend_params

import dcdkernels


def _bank(N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(dtype)


@pytest.mark.parametrize("device, backend", backend_params())
def test_repeated_runs_are_bit_identical(device, backend):
    q = _bank(8, 64, seed=1).to(device).requires_grad_()
    bank = _bank(500, 64).to(device)
    idx = torch.randint(0, 500, (8, 257)).to(device)
    results = []
    for _ in range(3):
        q.grad = None
        loss = dcdkernels.sampled_contrast(q, bank, idx, logit_scale=1 / 0.07, loss="nce", log_z=3.0, backend=backend)
        loss.sum().backward()
        results.append((loss.detach().clone(), q.grad.clone()))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("device, backend", backend_params())
def test_duplicate_index_updates_are_identical_across_backends(device, backend):
    bank = _bank(16, 24).to(device)
    index = torch.tensor([3, 5, 3, 3, 9, 5, 0, 3], device=device)
    value = torch.randn(8, 24, device=device)
    a, b = bank.clone(), bank.clone()
    dcdkernels.bank_momentum_update_(a, index, value, 0.5, backend=backend)
    dcdkernels.bank_momentum_update_(b, index, value, 0.5, backend="eager")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # The last occurrence of row 3 (position 7) wins, computed from the pre-update row.
    expected = torch.nn.functional.normalize(0.5 * bank[3] + 0.5 * value[7], dim=0)
    torch.testing.assert_close(a[3], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device, backend", backend_params() + [pytest.param("cpu", "eager", id="cpu-eager")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tau_007_in_half_precision_never_overflows(device, backend, dtype):
    # exp(1/0.07) = 1.6e6 > fp16 max (65504): RepDistiller's exp(x/T) would be inf in fp16.
    assert math.isinf(torch.tensor(1 / 0.07, dtype=torch.float16).exp().item())
    q = _bank(4, 32, dtype).to(device).requires_grad_()
    bank = torch.cat([q.detach(), _bank(60, 32, dtype)]).to(device)  # positives aligned: <q, row> = 1
    idx = torch.cat([torch.arange(4).view(4, 1), torch.randint(0, 64, (4, 16))], 1).to(device)
    for loss, kw in (("nce", {"log_z": 0.0}), ("infonce", {})):
        q.grad = None
        out, lse = dcdkernels.sampled_contrast(
            q, bank, idx, logit_scale=1 / 0.07, loss=loss, backend=backend, return_lse=True, **kw
        )
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(q.grad.float()).all()
        assert lse.min() > 1 / 0.07 - 1  # the positive alone gives LSE >= 14.28


@pytest.mark.parametrize(
    "device, backend",
    [p for p in backend_params() if p.values[0] == "cpu"] + [pytest.param("cpu", "eager", id="cpu-eager")],
)
def test_bank_beyond_2_pow_31_elements_uses_64_bit_offsets(device, backend):
    """A bf16 bank of N*D > 2**31 elements (4.3 GB of address space; only touched pages are
    resident): rows past element 2**31 must be read and written at the right place."""
    D = 128
    N = 2**31 // D + 1000
    bank = torch.empty((N, D), dtype=torch.bfloat16)
    rows = torch.tensor([0, 7, N - 1, N - 500, 2**31 // D + 3])
    g = torch.Generator().manual_seed(0)
    bank[rows] = torch.nn.functional.normalize(torch.randn(len(rows), D, generator=g), dim=1).to(torch.bfloat16)
    q = torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=1)
    idx = torch.stack([rows, rows.flip(0)])
    small_bank = bank[rows].clone()  # the same rows in a small bank, at positions 0..4
    small_idx = torch.stack([torch.arange(5), torch.arange(5).flip(0)])
    big = dcdkernels.sampled_contrast(q, bank, idx, logit_scale=5.0, backend=backend)
    small = dcdkernels.sampled_contrast(q, small_bank, small_idx, logit_scale=5.0, backend="eager")
    torch.testing.assert_close(big, small, atol=1e-5, rtol=1e-5)
    value = torch.randn(2, D, generator=g)
    dcdkernels.bank_momentum_update_(bank, rows[2:4], value, 0.5, backend=backend)
    dcdkernels.bank_momentum_update_(small_bank, torch.tensor([2, 3]), value, 0.5, backend="eager")
    torch.testing.assert_close(bank[rows].float(), small_bank.float(), atol=1e-2, rtol=0)


def test_deterministic_mode_sizes_gpu_grids_independently_of_the_device():
    """torch.use_deterministic_algorithms(True) fixes the number of SMs the CUDA and Triton grids
    are sized for, so the reduction split does not depend on the GPU model (README, Guarantees)."""
    from dcdkernels import _ext
    from dcdkernels.triton import _common

    # One constant (csrc/common/constants.h), published by _C and read by the Triton launchers.
    assert _ext._C is not None, _ext.LOAD_ERROR
    assert _ext._C.DETERMINISTIC_SMS == _common.DETERMINISTIC_SMS == _ext.DETERMINISTIC_SMS
    torch.use_deterministic_algorithms(True)
    try:
        # No device query happens (there may be no GPU here): the constant is returned.
        assert _common.sm_count(torch.device("cuda", 0)) == _common.DETERMINISTIC_SMS
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("device, backend", backend_params())
def test_losses_run_under_torch_deterministic_algorithms(device, backend):
    from dcdkernels import CRDLoss

    torch.manual_seed(0)
    crd = CRDLoss(s_dim=12, t_dim=10, feat_dim=8, n_data=64, nce_k=7, backend=backend).to(device)
    f_s, f_t = torch.randn(4, 12, device=device, requires_grad=True), torch.randn(4, 10, device=device)
    idx = torch.tensor([1, 5, 9, 60], device=device)
    cidx = torch.randint(0, 64, (4, 8), device=device)
    cidx[:, 0] = idx
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            crd_copy = CRDLoss(s_dim=12, t_dim=10, feat_dim=8, n_data=64, nce_k=7, backend=backend).to(device)
            crd_copy.load_state_dict(crd.state_dict())
            f_s.grad = None
            loss = crd_copy(f_s, f_t, idx, cidx)
            loss.backward()
            runs.append((loss.detach(), f_s.grad.clone(), crd_copy.state_dict()))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])
