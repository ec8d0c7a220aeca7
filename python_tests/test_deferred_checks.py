"""Deferred value checks (issue: reliability, "no host sync per step for the range check").

On CUDA the default ("auto") defers the index-range and finiteness checks of the fused CUDA and
Triton backends: no host sync, the error surfaces at the next op call or at
``dcdkernels.check_errors()``, and a failed mutation is a no-op on the device. Here the mode is
forced to "deferred" so that the same logic runs on CPU tensors with the Triton interpreter (the
CUDA-only parts, pinned copies and event polling, run only on a GPU).
"""

import math

import pytest
import torch
from helpers import devices, fused_backends

import dcdkernels
from dcdkernels import MemoryBank, MomentumQueue

DEFERRABLE = [
    pytest.param(d, b, id=f"{d}-{b}") for d in devices() for b in fused_backends(d) if b in ("cuda", "triton")
]
if not DEFERRABLE:
    DEFERRABLE = [pytest.param("cpu", "triton", marks=pytest.mark.skip(reason="no CUDA or Triton backend here"))]


@pytest.fixture
def deferred():
    dcdkernels.check_errors()
    dcdkernels.set_value_checks("deferred")
    try:
        yield
    finally:
        dcdkernels.set_value_checks(True)
        try:
            dcdkernels.check_errors()
        except ValueError:
            pass


def _unit(n, d, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device)


@pytest.mark.parametrize("device, backend", DEFERRABLE)
def test_bad_bank_update_is_a_no_op_and_raises_later(deferred, device, backend):
    bank = _unit(12, 5, device=device)
    before = bank.clone()
    index = torch.tensor([1, 2, 12], device=device)  # 12 is out of range
    dcdkernels.bank_momentum_update_(bank, index, torch.randn(3, 5, device=device), 0.5, backend=backend)
    assert torch.equal(bank, before)  # rows 1 and 2 were not written either
    with pytest.raises(ValueError, match="earlier call.*index has entries out of range"):
        dcdkernels.check_errors()
    dcdkernels.check_errors()  # reported once

    value = torch.randn(3, 5, device=device)
    value[0, 0] = math.nan
    dcdkernels.bank_momentum_update_(bank, torch.tensor([1, 2, 3], device=device), value, 0.5, backend=backend)
    assert torch.equal(bank, before)
    # The next call raises before it runs (on CPU the flags are on the host at once).
    with pytest.raises(ValueError, match="value has non-finite"):
        dcdkernels.bank_momentum_update_(
            bank, torch.tensor([4], device=device), torch.randn(1, 5, device=device), 0.5, backend=backend
        )
    assert torch.equal(bank, before)


@pytest.mark.parametrize("device, backend", DEFERRABLE)
def test_good_calls_are_unchanged_by_deferral(deferred, device, backend):
    bank = _unit(40, 6, device=device)
    q = _unit(3, 6, seed=1, device=device).requires_grad_()
    idx = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2)).to(device)
    loss = dcdkernels.sampled_contrast(q, bank, idx, logit_scale=5.0, backend=backend)
    loss.sum().backward()
    dcdkernels.set_value_checks("sync")
    q2 = q.detach().clone().requires_grad_()
    loss2 = dcdkernels.sampled_contrast(q2, bank, idx, logit_scale=5.0, backend=backend)
    loss2.sum().backward()
    assert torch.equal(loss, loss2) and torch.equal(q.grad, q2.grad)
    dcdkernels.check_errors()


@pytest.mark.parametrize("device, backend", DEFERRABLE)
def test_read_only_ops_skip_bad_rows_and_raise_later(deferred, device, backend):
    bank = _unit(20, 4, device=device)
    q = _unit(2, 4, seed=1, device=device)
    idx = torch.tensor([[0, 1, 2], [3, 4, -7]], device=device)
    dcdkernels.sampled_contrast(q, bank, idx, logit_scale=2.0, backend=backend)
    with pytest.raises(ValueError, match="index has entries out of range"):
        dcdkernels.check_errors()
    keys = _unit(6, 4, seed=3, device=device)
    dcdkernels.dense_contrast(q, keys, torch.tensor([0, 6], device=device), logit_scale=2.0, backend=backend)
    with pytest.raises(ValueError, match="target has entries out of range"):
        dcdkernels.check_errors()
    # With the keys' gradient too: the backward skips the absent target's key (no write outside
    # grad_keys, no endless run over the sorted targets), and the error is raised later.
    for bad in (6, -1, 2**40):
        keys_g = keys.clone().requires_grad_()
        target = torch.tensor([bad, 0], device=device)
        dcdkernels.dense_contrast(q, keys_g, target, logit_scale=2.0, backend=backend).sum().backward()
        with pytest.raises(ValueError, match="target has entries out of range"):
            dcdkernels.check_errors()
        assert torch.isfinite(keys_g.grad).all()
    q_bad = q.clone()
    q_bad[1, 2] = math.inf
    dcdkernels.dual_sampled_contrast(
        q_bad,
        q,
        bank,
        bank.clone(),
        torch.tensor([[0, 1, 2], [3, 4, 5]], device=device),
        logit_scale=2.0,
        backend=backend,
    )
    with pytest.raises(ValueError, match="anchor_s has non-finite"):
        dcdkernels.check_errors()


@pytest.mark.parametrize("device, backend", DEFERRABLE)
def test_eager_backend_is_never_deferred(deferred, device, backend):
    bank = _unit(12, 5, device=device)
    with pytest.raises(ValueError, match="out of range"):  # eager indexing would assert on the device
        dcdkernels.bank_momentum_update_(
            bank, torch.tensor([12], device=device), torch.randn(1, 5, device=device), 0.5, backend="eager"
        )


@pytest.mark.parametrize("device, backend", DEFERRABLE)
def test_modules_keep_their_state_and_refuse_to_checkpoint_after_a_failed_call(deferred, device, backend):
    queue = MomentumQueue(8, 4, device=device)
    before = queue.queue.clone()
    keys = torch.randn(3, 4, device=device)
    keys[2, 1] = math.nan
    # the queue's checks are never deferred: its pointer (a host copy) must not move on a failed call
    with pytest.raises(ValueError, match="keys has non-finite"):
        queue.enqueue_(keys)
    assert torch.equal(queue.queue, before) and queue.pointer == 0 and int(queue.queue_ptr) == 0

    mem = MemoryBank(30, 4, backend=backend, device=device)
    bank_before = mem.bank.clone()
    q = _unit(2, 4, seed=1, device=device)
    q[0, 0] = math.nan
    try:  # the module's own (deferred) check may already surface at the op call inside score()
        mem.score(q, torch.tensor([[0, 1, 2], [3, 4, 5]], device=device), logit_scale=2.0, loss="nce")
    except ValueError as exc:
        assert "anchor has non-finite" in str(exc)
    assert torch.isnan(mem.log_z).all()  # the first-batch estimate was not taken from a failed call
    try:  # as above: the deferred failure may surface at the op call inside update_()
        mem.update_(torch.tensor([0, 31], device=device), torch.randn(2, 4, device=device))
        with pytest.raises(ValueError, match="earlier call"):
            mem.state_dict()
    except ValueError as exc:
        assert "out of range" in str(exc)
    assert torch.equal(mem.bank, bank_before)


def test_modes_are_validated_and_cpu_default_raises_at_once():
    with pytest.raises(ValueError, match="value checks mode"):
        dcdkernels.set_value_checks("lazy")
    bank = _unit(12, 5)
    for mode in (True, "auto", "sync"):
        dcdkernels.set_value_checks(mode)
        try:
            for backend in ["eager"] + fused_backends("cpu"):
                with pytest.raises(ValueError, match="out of range"):
                    dcdkernels.bank_momentum_update_(bank, torch.tensor([12]), torch.randn(1, 5), 0.5, backend=backend)
        finally:
            dcdkernels.set_value_checks(True)


class _FakeEvent:
    def __init__(self):
        self.stream = "not recorded"

    def record(self, stream=None):
        self.stream = stream


class _FakeHost:
    def __init__(self):
        self.copied_from = None

    def copy_(self, src, non_blocking=False):
        self.copied_from = (src, non_blocking)
        return self


def test_deferred_flags_event_is_recorded_on_the_flags_device_stream(monkeypatch):
    """Defect 1 of issue 18, checked without a GPU: with flags on cuda:1 and the current device
    cuda:0, the event that tells the host the pinned copy has landed must be recorded on
    cuda:1's current stream (where ``copy_`` queues the copy), not on the current device's. The
    CUDA calls are replaced by fakes that record which stream was asked for."""
    from dcdkernels.ops import _validate

    class FakeFlags:  # a (2,) bool tensor on cuda:1, as far as _Pending looks at it
        shape, device = (2,), torch.device("cuda", 1)

    current_device = torch.device("cuda", 0)
    asked = []

    def current_stream(device=None):
        device = current_device if device is None else torch.device(device)
        asked.append(device)
        return f"stream of {device}"

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    host = _FakeHost()
    monkeypatch.setattr(torch, "empty", lambda *a, **k: host)
    pending = _validate._Pending(FakeFlags(), ["m1", "m2"])
    monkeypatch.undo()
    assert host.copied_from[1] is True  # an asynchronous copy
    assert pending.event.stream == "stream of cuda:1", f"event recorded on {pending.event.stream!r}"
    assert asked == [torch.device("cuda", 1)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize(
    "backend",
    [b for b in fused_backends("cuda") if b in ("cuda", "triton")] if torch.cuda.device_count() >= 2 else ["cuda"],
)
def test_deferred_check_on_a_non_current_device(deferred, backend):
    """Tensors on cuda:1 while cuda:0 is current: a bad index is caught (after the copy lands,
    never before), and the bank is left unchanged."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    for _ in range(20):  # repeated: an early read of the pinned flags would miss some
        bank = _unit(12, 5, device=dev)
        before = bank.clone()
        index = torch.tensor([1, 99], device=dev)
        dcdkernels.bank_momentum_update_(bank, index, _unit(2, 5, seed=1, device=dev), 0.5, backend=backend)
        with pytest.raises(ValueError, match="out of range"):
            dcdkernels.check_errors()
        assert torch.equal(bank, before)
