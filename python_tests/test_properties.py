"""Property-based comparison against the oracle (hypothesis): random tiny shapes, dtypes,
scales, duplicate indices, every op, every fused backend available here. The example counts
add up to over 1,000 cases on a CPU-only CI machine (CPU kernels + Triton interpreter)."""

import pytest
import torch
from helpers import TOL, backend_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcdkernels

# Triton under the interpreter costs milliseconds per program: fewer examples there.
EXAMPLES = {"cpu": 300, "cuda": 300, "triton": 40}
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _settings(backend):
    return settings(
        max_examples=EXAMPLES.get(backend, 10), deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )


@st.composite
def sampled_case(draw):
    B = draw(st.integers(1, 5))
    K = draw(st.integers(1, 9))
    N = draw(st.integers(1, 12))
    D = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, K, N, D, seed, draw(DTYPES), draw(st.floats(0.5, 15.0)), draw(st.sampled_from(["infonce", "nce"]))


def _close(a, b, dtype):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), **TOL[dtype])


def _run_sampled(device, backend, case):
    B, K, N, D, seed, dtype, scale, loss = case
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(device, dtype)
    bank = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype)
    idx = torch.randint(0, N, (B, K + 1), generator=g).to(device)
    outs = []
    for be in (backend, "eager"):
        x = q.clone().requires_grad_()
        s = torch.tensor(scale, device=device, requires_grad=True)
        out = dcdkernels.sampled_contrast(x, bank, idx, logit_scale=s, loss=loss, log_z=1.0, backend=be)
        out.sum().backward()
        outs.append((out.detach(), x.grad, s.grad))
    for a, b in zip(*outs):
        _close(a, b, dtype)


def _run_dense(device, backend, case):
    B, M, N, D, seed, dtype, scale, _ = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g).to(device, dtype)
    keys = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1).to(device, dtype)
    target = torch.randint(0, M, (B,), generator=g).to(device)
    outs = []
    for be in (backend, "eager"):
        x, k = q.clone().requires_grad_(), keys.clone().requires_grad_()
        out = dcdkernels.dense_contrast(x, k, target, logit_scale=min(scale, 5.0), backend=be)
        out.sum().backward()
        outs.append((out.detach(), x.grad, k.grad))
    for a, b in zip(*outs):
        _close(a, b, dtype)


def _run_update(device, backend, case):
    B, K, N, D, seed, dtype, scale, _ = case
    g = torch.Generator().manual_seed(seed)
    bank = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1).to(device, dtype)
    index = torch.randint(0, N, (B + K,), generator=g).to(device)
    value = torch.randn(B + K, D, generator=g).to(device)
    a, b = bank.clone(), bank.clone()
    dcdkernels.bank_momentum_update_(a, index, value, 0.5, backend=backend)
    dcdkernels.bank_momentum_update_(b, index, value, 0.5, backend="eager")
    torch.testing.assert_close(a.float(), b.float(), atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("device, backend", backend_params())
@pytest.mark.parametrize("runner", [_run_sampled, _run_dense, _run_update], ids=["sampled", "dense", "update"])
def test_random_cases_match_oracle(device, backend, runner):
    @_settings(backend)
    @given(sampled_case())
    def check(case):
        runner(device, backend, case)

    check()
