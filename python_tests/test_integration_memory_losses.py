"""Drop-ins for lightly's NTXentLoss (memory bank) and pytorch-metric-learning's CrossBatchMemory
(issue 14): equal to the libraries' own classes on identical inputs over 3 steps, the memory
contents included. The batches cross the end of the memory, so the wrap-around is exercised."""

import pytest
import torch
import torch.nn.functional as F
from helpers import close_fp32 as _close

from dcdkernels.integrations import CrossBatchMemory, NTXentMemoryLoss, PMLNTXentLoss, PMLSupConLoss

B, D, M = 8, 16, 20
BACKENDS = ["eager", "cpu"]


pytestmark = pytest.mark.usefixtures("single_thread")


def _step(mod, *inputs):
    leaves = [x.clone().requires_grad_(True) for x in inputs[:2] if x.is_floating_point()]
    loss = mod(*leaves, *inputs[len(leaves) :])
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


# ------------------------------------------------------------------------------ lightly
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(M, D), 0], ids=["bank", "in-batch"])
def test_lightly_ntxent_equal_over_three_steps(backend, size):
    lightly_loss = pytest.importorskip("lightly.loss")
    torch.manual_seed(0)
    ref = lightly_loss.NTXentLoss(temperature=0.2, memory_bank_size=size)
    torch.manual_seed(0)  # same RNG calls: the banks start identical
    ours = NTXentMemoryLoss(temperature=0.2, memory_bank_size=size, backend=backend)
    if size:
        assert torch.equal(ours.memory_bank.queue, ref.memory_bank.bank)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        out0, out1 = torch.randn(B, D, generator=gen), torch.randn(B, D, generator=gen)
        l_ref, g_ref = _step(ref, out0, out1)
        l_our, g_our = _step(ours, out0, out1)
        _close(l_our, l_ref, f"loss, step {step}")
        for a, b, name in zip(g_our, g_ref, ("out0", "out1")):
            _close(a, b, f"grad {name}, step {step}")
        if size:
            _close(ours.memory_bank.queue, ref.memory_bank.bank, f"bank, step {step}")
            assert ours.memory_bank.pointer == int(ref.memory_bank.bank_ptr), step


def test_lightly_ntxent_no_update_without_grad_and_errors():
    ours = NTXentMemoryLoss(0.1, memory_bank_size=(M, D))
    before = ours.memory_bank.queue.clone()
    with torch.no_grad():
        ours(torch.randn(B, D), torch.randn(B, D))
    assert torch.equal(before, ours.memory_bank.queue) and ours.memory_bank.pointer == 0
    with pytest.raises(ValueError, match="feature dimension"):
        NTXentMemoryLoss(0.1, memory_bank_size=64)
    with pytest.raises(ValueError, match="temperature"):
        NTXentMemoryLoss(0.0)
    with pytest.raises(ValueError, match="features"):
        ours(torch.randn(B, D + 1), torch.randn(B, D + 1))
    assert ours.memory_bank.pointer == 0


def test_lightly_bank_in_state_dict():
    a = NTXentMemoryLoss(0.1, memory_bank_size=(M, D))
    a(torch.randn(B, D, requires_grad=True), torch.randn(B, D))
    b = NTXentMemoryLoss(0.1, memory_bank_size=(M, D))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.memory_bank.queue, b.memory_bank.queue) and b.memory_bank.pointer == B


# ------------------------------------------------------------------------------ pytorch-metric-learning
def _labels(kind, gen):
    if kind == "classes":  # supervised: 3 classes, many positives in memory
        return torch.randint(0, 3, (B,), generator=gen)
    ids = torch.randint(0, 6, (B // 2,), generator=gen)  # two views of B/2 instances
    return torch.cat([ids, ids])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("labels_kind", ["classes", "instances"])
@pytest.mark.parametrize("wrap_pml_loss", [True, False], ids=["pml-loss", "standalone-loss"])
def test_cross_batch_memory_equal_over_three_steps(backend, loss_name, labels_kind, wrap_pml_loss):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    ref = pml.CrossBatchMemory(getattr(pml, loss_name)(temperature=0.1), D, memory_size=M)
    inner = (
        getattr(pml, loss_name)(temperature=0.1)
        if wrap_pml_loss
        else {"NTXentLoss": PMLNTXentLoss, "SupConLoss": PMLSupConLoss}[loss_name](temperature=0.1)
    )
    ours = CrossBatchMemory(inner, D, memory_size=M, backend=backend)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        emb = torch.randn(B, D, generator=gen)
        lab = _labels(labels_kind, gen)
        l_ref, (g_ref,) = _step(ref, emb, lab)
        l_our, (g_our,) = _step(ours, emb, lab)
        _close(l_our, l_ref, f"loss, step {step}")
        _close(g_our, g_ref, f"grad, step {step}")
        _close(ours.embedding_memory, F.normalize(ref.embedding_memory, dim=1), f"memory, step {step}")
        assert torch.equal(ours.label_memory, ref.label_memory), step
        assert ours.queue_idx == ref.queue_idx and ours.has_been_filled == ref.has_been_filled, step


def test_ntxent_exact_path_when_positives_dominate(monkeypatch):
    """Rows of one label nearly identical (logit 1/T = 20 between them), one far positive
    (logit ~0) and one negative at logit ~6: the negatives hold ~1e-6 of an anchor's mass, so
    log(exp(LSE_all) - exp(LSE_same)) cancels, while the far pair's loss (~6) depends on them.
    Those anchors take the exact path (masked rows), and the loss equals the original's."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    from dcdkernels.integrations import memory_losses

    calls = []
    exact = memory_losses.CrossBatchMemory._masked_neg_lse
    monkeypatch.setattr(
        memory_losses.CrossBatchMemory,
        "_masked_neg_lse",
        lambda self, q_sub, *a: calls.append(q_sub.shape[0]) or exact(self, q_sub, *a),
    )
    ref = pml.CrossBatchMemory(pml.NTXentLoss(temperature=0.05), D, memory_size=2 * M)
    ours = CrossBatchMemory(PMLNTXentLoss(temperature=0.05), D, memory_size=2 * M)
    gen = torch.Generator().manual_seed(3)
    u, v, w = torch.linalg.qr(torch.randn(D, 3, generator=gen))[0].t()  # orthonormal directions
    lab = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1])
    for step in range(3):
        emb = torch.stack([u] * 6 + [v, 0.3 * u + 0.954 * w]) + 1e-3 * torch.randn(B, D, generator=gen)
        l_ref, (g_ref,) = _step(ref, emb, lab)
        l_our, (g_our,) = _step(ours, emb, lab)
        _close(l_our, l_ref, f"loss, step {step}")
        _close(g_our, g_ref, f"grad, step {step}")
    assert calls  # the exact path ran


def test_cross_batch_memory_state_dict_and_reset():
    a = CrossBatchMemory(PMLSupConLoss(), D, memory_size=M)
    for _ in range(3):
        a(torch.randn(B, D), torch.randint(0, 3, (B,)))
    b = CrossBatchMemory(PMLSupConLoss(), D, memory_size=M)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.embedding_memory, b.embedding_memory) and torch.equal(a.label_memory, b.label_memory)
    assert (b.queue_idx, b.has_been_filled) == (a.queue_idx, a.has_been_filled) == (4, True)
    b.reset_queue()
    assert b.queue_idx == 0 and not b.has_been_filled and not b.embedding_memory.any()


def test_cross_batch_memory_rejects_unsupported():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    with pytest.raises(ValueError, match="supports NTXentLoss and SupConLoss"):
        CrossBatchMemory(pml.TripletMarginLoss(), D)
    with pytest.raises(ValueError, match="distance"):
        from pytorch_metric_learning.distances import LpDistance

        CrossBatchMemory(pml.NTXentLoss(distance=LpDistance()), D)
    ours = CrossBatchMemory(PMLNTXentLoss(), D, memory_size=M)
    with pytest.raises(NotImplementedError, match="enqueue_mask"):
        ours(torch.randn(B, D), torch.zeros(B, dtype=torch.int64), enqueue_mask=torch.ones(B, dtype=torch.bool))
    with pytest.raises(ValueError, match="larger than memory_size"):
        ours(torch.randn(M + 1, D), torch.zeros(M + 1, dtype=torch.int64))
    bad = torch.randn(B, D)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        ours(bad, torch.ones(B, dtype=torch.int64))
    assert ours.queue_idx == 0 and not ours.has_been_filled and not ours.label_memory.any()
    assert not ours.embedding_memory.any()
