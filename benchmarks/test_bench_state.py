"""Memory-state updates that need no kernel of ours, benchmarked to show it (issue: dense + update):

* ``ema``: the momentum-encoder EMA (CoCoRD's slow student and teacher head) as one
  ``torch._foreach_lerp_`` over the parameter list (``dcdkernels.losses._common.ema_``) against the
  Python loop over parameters that MoCo/BYOL code uses (``p_t.mul_(m).add_(p_s, alpha=1-m)``).
* ``enqueue``: the FIFO queue write (``dcdkernels.reference.queue_enqueue_``: one ``index_copy_``
  with wrap-around) against MoCo's slice assignment ``queue[ptr:ptr+B] = keys``.

The library's path is reported under the device's provider name (``cpu`` or ``cuda``).
"""

import pytest
import torch

from benchmarks.harness import CFG
from dcdkernels.losses._common import ema_
from dcdkernels.reference import queue_enqueue_
from dcdkernels.train.models import build_model


def _run(bench, provider, eager, ours, *, op, case, size, bytes_read):
    """Time ``eager`` (provider "eager") or the library's ``ours``, reported under the device's
    provider name (``cpu`` or ``cuda``)."""
    bench.run(
        eager if provider == "eager" else ours,
        family="state",
        op=op,
        case=case,
        size=size,
        dtype="fp32",
        provider=provider if provider == "eager" else ("cuda" if CFG.device.type == "cuda" else "cpu"),
        bytes_read=bytes_read,
    )


class _Size:
    def __init__(self, id, **dims):
        self.id, self._dims = id, dims

    def dims(self):
        return dict(self._dims)


EMA_MODEL = {"smoke": "resnet8", "cpu": "resnet8x4", "gpu": "resnet32x4"}
QUEUE = {"smoke": (256, 16, 32), "cpu": (2_048, 64, 2_048), "gpu": (65_536, 256, 128)}  # (K, B, D)


@pytest.mark.parametrize("provider", ["eager", "ours"])
def test_ema_foreach_vs_loop(bench, provider):
    name = EMA_MODEL[CFG.size_set]
    student = build_model(name, 100).to(CFG.device)
    slow = build_model(name, 100).to(CFG.device)
    src, dst = list(student.parameters()), list(slow.parameters())
    size = _Size(name, tensors=len(src), params=sum(p.numel() for p in src))
    m = 0.999

    @torch.no_grad()
    def loop():  # as MoCo/BYOL write it
        for p_t, p_s in zip(dst, src):
            p_t.mul_(m).add_(p_s, alpha=1 - m)

    @torch.no_grad()
    def foreach():
        ema_(dst, src, m)

    # Same result (up to rounding) before timing: the comparison is of equal work.
    with torch.no_grad():
        a = [p.clone() for p in dst]
        loop()
        b = [p.clone() for p in dst]
        torch._foreach_copy_(dst, a)
        foreach()
        for p, q in zip(dst, b):
            torch.testing.assert_close(p, q)
    _run(bench, provider, loop, foreach, op="ema", case="foreach", size=size, bytes_read=3 * 4 * size.dims()["params"])


@pytest.mark.parametrize("provider", ["eager", "ours"])
def test_queue_enqueue(bench, provider):
    K, B, D = QUEUE[CFG.size_set]
    size = _Size(f"K{K}-B{B}-D{D}", K=K, B=B, D=D)
    queue = torch.randn(K, D, device=CFG.device)
    keys = torch.randn(B, D, device=CFG.device)
    state = {"ptr": K - B // 2}  # wraps around on the first call

    def moco():  # MoCo's _dequeue_and_enqueue (assumes K % B == 0; wraps by resetting)
        ptr = state["ptr"]
        if ptr + B > K:
            ptr = 0
        queue[ptr : ptr + B] = keys
        state["ptr"] = (ptr + B) % K

    def ring():
        state["ptr"] = queue_enqueue_(queue, state["ptr"], keys)

    _run(bench, provider, moco, ring, op="enqueue", case="", size=size, bytes_read=2 * 4 * B * D)
