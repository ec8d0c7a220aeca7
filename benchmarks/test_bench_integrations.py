"""The drop-ins of ``dcdkernels.integrations`` against the libraries' own classes, one training
step each (forward, backward to the embeddings, the memory write), with the memory full:

* ``lightly-ntxent``: ``lightly.loss.NTXentLoss(T, memory_bank_size=(M, D))`` (provider ``eager``)
  vs :class:`dcdkernels.integrations.NTXentMemoryLoss` (the fused providers);
* ``pml-ntxent`` / ``pml-supcon``: pytorch-metric-learning's ``CrossBatchMemory`` around its
  ``NTXentLoss`` / ``SupConLoss`` vs :class:`dcdkernels.integrations.CrossBatchMemory`, labels of
  SimCLR-style instances (two views per id; ``instances``) as MoCo-style use.

A provider is skipped when its library is not installed. The tests in
``python_tests/test_integration_memory_losses.py`` check that both compute the same thing.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks import sizes as S
from benchmarks.harness import CFG, grad_step
from dcdkernels.integrations import CrossBatchMemory, NTXentMemoryLoss, PMLNTXentLoss, PMLSupConLoss

CASES = ["lightly-ntxent", "pml-ntxent", "pml-supcon"]


def _library(case):
    name = "lightly.loss" if case.startswith("lightly") else "pytorch_metric_learning.losses"
    return pytest.importorskip(name, reason=f"eager: {name.split('.')[0]} is not installed")


def _inputs(size, case):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(size.B, size.D, generator=g).to(CFG.device).requires_grad_(True)
    if case.startswith("lightly"):
        return emb, torch.randn(size.B, size.D, generator=g).to(CFG.device)
    ids = torch.randint(0, size.M, (size.B // 2,), generator=g)
    return emb, torch.cat([ids, ids]).to(CFG.device)


def _full_memory(size):
    g = torch.Generator().manual_seed(1)
    return (
        F.normalize(torch.randn(size.M, size.D, generator=g), dim=1).to(CFG.device),
        torch.randint(0, size.M, (size.M,), generator=g).to(CFG.device),
    )


def _skip_if_pml_ntxent_too_big(size, batch_labels, memory_labels):
    """pytorch-metric-learning's NTXentLoss forms a (positive pairs x negative pairs) float mask
    (``n_per_p``) and masked copies of it: skip (with the figure) where that exceeds the RAM."""
    pos = int((batch_labels[:, None] == memory_labels[None, :]).sum()) + size.B  # + the batch's own pairs
    neg = size.B * size.M - pos
    need = 3 * 4 * pos * neg  # n_per_p, neg_pairs * n_per_p, exp(...): float32 each
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > ram // 2:
        pytest.skip(
            f"eager: pytorch-metric-learning's NTXentLoss in CrossBatchMemory builds (positive pairs x "
            f"negative pairs) = ({pos} x {neg}) float32 masks, ~{need / 2**30:.0f} GiB; this machine has "
            f"{ram / 2**30:.0f} GiB"
        )


@pytest.mark.bench(
    table=S.INTEGRATIONS,
    ops=["dense_contrast"],
    cases=CASES,
    dtypes=["fp32"],
    providers=["eager", "cpu", "triton", "cuda"],
)
def test_integration(bench, case, size, dtype, provider):
    T = 0.2 if case.startswith("lightly") else 0.1
    x, y = _inputs(size, case)
    mem, labels = _full_memory(size)
    if case.startswith("lightly"):
        if provider == "eager":
            loss = _library(case).NTXentLoss(temperature=T, memory_bank_size=(size.M, size.D)).to(CFG.device)
        else:
            loss = NTXentMemoryLoss(temperature=T, memory_bank_size=(size.M, size.D), backend=provider).to(CFG.device)

        def fn():
            return loss(x, y)
    else:
        inner_name = "NTXentLoss" if case == "pml-ntxent" else "SupConLoss"
        if provider == "eager":
            pml = _library(case)
            if case == "pml-ntxent":
                _skip_if_pml_ntxent_too_big(size, y, labels)
            loss = pml.CrossBatchMemory(getattr(pml, inner_name)(temperature=T), size.D, memory_size=size.M)
            loss.embedding_memory, loss.label_memory = mem.clone(), labels.clone()
            loss.has_been_filled = True
        else:
            inner = (PMLNTXentLoss if case == "pml-ntxent" else PMLSupConLoss)(temperature=T)
            loss = CrossBatchMemory(inner, size.D, memory_size=size.M, backend=provider).to(CFG.device)
            loss.memory.queue.copy_(mem)
            loss.label_memory.copy_(labels)
            loss.filled.fill_(True)

        def fn():
            return loss(x, y)

    analytic = {"eager": (3 * size.B * size.M * 4, "~3 (B, M) fp32 similarity / logits / mask buffers (+ bank clone)")}
    nbytes, note = analytic.get(
        provider,
        (size.B * size.D * 4 + size.B * size.B * 4 * 3, "fused: (B, D) anchor gradient + (B, B) in-batch part"),
    )
    bench.run(
        grad_step(fn, [x]),
        family="integrations",
        op="integration",
        case=case,
        size=size,
        dtype=dtype,
        provider=provider,
        bytes_read=size.keys_bytes(4),
        analytic_bytes=nbytes,
        analytic_note=note,
    )
