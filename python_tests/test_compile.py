"""torch.compile(fullgraph=True) traces losses that call the registered ops."""

import pytest
import torch
from helpers import backend_params

import dcdkernels


def _loss(q, qt, bank_s, bank_t, keys, idx, target, s, backend):
    single = dcdkernels.sampled_contrast(q, bank_t, idx, logit_scale=s, backend=backend).mean()
    dual = dcdkernels.dual_sampled_contrast(q, qt, bank_s, bank_t, idx, logit_scale=s, consistency=0.5, backend=backend)
    dense = dcdkernels.dense_contrast(q, keys, target, logit_scale=s, backend=backend).mean()
    dense_reduced = dcdkernels.dense_contrast(qt, keys, positive=q, logit_scale=s, reduction="sum", backend=backend)
    return single + dual.loss_s.mean() + dual.loss_t.mean() + dual.consistency.mean() + dense + dense_reduced


@pytest.mark.parametrize("device, backend", backend_params() + [pytest.param("cpu", "eager", id="cpu-eager")])
def test_compile_fullgraph_traces_ops(device, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    B, K, N, D = 4, 6, 20, 8
    q = torch.randn(B, D, device=device, requires_grad=True)
    qt = torch.randn(B, D, device=device, requires_grad=True)
    bank_s, bank_t = torch.randn(N, D, device=device), torch.randn(N, D, device=device)
    keys = torch.randn(N, D, device=device, requires_grad=True)
    idx = torch.randint(0, N, (B, K + 1), device=device)
    target = torch.randint(0, N, (B,), device=device)
    s = torch.tensor(2.0, device=device, requires_grad=True)
    args = (q, qt, bank_s, bank_t, keys, idx, target, s, backend)
    eager = _loss(*args)
    grads_eager = torch.autograd.grad(eager, (q, qt, keys, s))
    compiled = torch.compile(_loss, fullgraph=True, backend="aot_eager")(*args)
    grads_compiled = torch.autograd.grad(compiled, (q, qt, keys, s))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)
