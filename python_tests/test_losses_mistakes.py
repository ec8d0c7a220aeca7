"""Tests that FAIL on the classic mistakes of contrastive-distillation implementations.

Each test checks the module against the correct computation AND runs the deliberately wrong
variant next to it, asserting that the wrong variant gives a measurably different answer, so the
test really distinguishes the two (a test that both variants pass proves nothing).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import backend_params

from dcdkernels import reference
from dcdkernels.losses import CoCoRDLoss, CRDLoss, DCDLoss

BACKENDS = ["eager"] + [
    pytest.param(p.values[1], marks=pytest.mark.triton) if p.values[1] == "triton" else p.values[1]
    for p in backend_params()
    if p.values[0] == "cpu" and p.values[1] != "none"
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _differs(a, b, rel=1e-4):
    return (a - b).abs().max().item() > rel * max(1.0, b.abs().max().item())


S_DIM, T_DIM, N, D, K, B, TEMP = 5, 7, 30, 8, 6, 5, 0.07


def _batch(step, dtype=torch.float32, n=N, k=K, b=B):
    g = torch.Generator().manual_seed(900 + step)
    f_s = torch.randn(b, S_DIM, generator=g, dtype=dtype)
    f_t = torch.randn(b, T_DIM, generator=g, dtype=dtype)
    idx = torch.randperm(n, generator=g)[:b]
    cidx = torch.cat([idx[:, None], torch.randint(0, n, (b, k), generator=g)], dim=1)
    return f_s, f_t, idx, cidx


def _crd(backend, dtype=torch.float32, n=N, k=K, **kw):
    torch.manual_seed(0)
    return CRDLoss(S_DIM, T_DIM, n, feat_dim=D, nce_k=k, nce_t=TEMP, backend=backend, **kw).to(dtype)


def _nce(crd, z_s, z_t, bank_s, bank_t, cidx, log_z):
    """Correct CRD scoring: student anchor vs bank_t rows, teacher anchor vs bank_s rows."""
    l_s, l_t, _, _, _ = reference.dual_sampled_contrast(
        z_s, z_t, bank_s, bank_t, cidx, logit_scale=1 / TEMP, loss="nce", log_z=log_z, compute_kl=False
    )
    return l_s.mean() + l_t.mean()


def _updated(bank, idx, value, m=0.5):
    bank = bank.clone()
    reference.bank_momentum_update_(bank, idx, value.detach(), m)
    return bank


# 1. Memory update before scoring ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_crd_scores_before_updating_the_banks(backend):
    crd = _crd(backend)
    f_s, f_t, idx, cidx = _batch(0)
    crd(f_s, f_t, idx, cidx)  # sets Z
    f_s, f_t, idx, cidx = _batch(1)  # column 0 = idx: the positives are exactly the rows updated
    with torch.no_grad():
        z_s, z_t = crd.embed_s(f_s), crd.embed_t(f_t)
        right = _nce(crd, z_s, z_t, crd.bank_s, crd.bank_t, cidx, crd.log_z)
        new_s, new_t = _updated(crd.bank_s, idx, z_s), _updated(crd.bank_t, idx, z_t)
        wrong = _nce(crd, z_s, z_t, new_s, new_t, cidx, crd.log_z)
    loss = crd(f_s, f_t, idx, cidx)
    torch.testing.assert_close(loss.detach(), right, rtol=5e-5, atol=1e-5)
    assert _differs(wrong, right, 1e-3), "test cannot tell update-before-scoring apart"
    # ... and the update did happen, after scoring.
    torch.testing.assert_close(crd.bank_s, new_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(crd.bank_t, new_t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcd_memory_form_scores_before_updating_the_banks(backend):
    torch.manual_seed(0)
    dcd = DCDLoss(S_DIM, T_DIM, D, n_data=N, nce_k=K, backend=backend)
    f_s, f_t, idx, cidx = _batch(0)
    with torch.no_grad():
        z_s, z_t, s = dcd.embed_s(f_s), dcd.embed_t(f_t), dcd.logit_scale()

        def score(bank_s, bank_t):
            out = reference.dual_sampled_contrast(z_s, z_t, bank_s, bank_t, cidx, logit_scale=s)
            return out[0].mean() + 0.5 * out[2].mean()

        right = score(dcd.bank_s, dcd.bank_t)
        wrong = score(_updated(dcd.bank_s, idx, z_s), _updated(dcd.bank_t, idx, z_t))
    bank_s0 = dcd.bank_s.clone()
    loss = dcd(f_s, f_t, idx, cidx)
    torch.testing.assert_close(loss.detach(), right, rtol=5e-5, atol=1e-5)
    assert _differs(wrong, right, 1e-3)
    torch.testing.assert_close(dcd.bank_s, _updated(bank_s0, idx, z_s), rtol=1e-5, atol=1e-6)


# 2. Z re-estimated every batch --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_crd_partition_is_estimated_once(backend):
    crd = _crd(backend, torch.float64 if backend != "triton" else torch.float32)
    dt = crd.bank_s.dtype
    f_s, f_t, idx, cidx = _batch(0, dt)
    crd(f_s, f_t, idx, cidx)
    first = crd.log_z.clone()
    for step in (1, 2):
        f_s, f_t, idx, cidx = _batch(step, dt)
        with torch.no_grad():
            z_s, z_t = crd.embed_s(f_s), crd.embed_t(f_t)
            right = _nce(crd, z_s, z_t, crd.bank_s, crd.bank_t, cidx, first)
            # The mistake: a fresh Z = N * mean(exp(u)) from this batch.
            l_s = reference.sampled_contrast(z_s, crd.bank_t, cidx, logit_scale=1 / TEMP)[1]
            l_t = reference.sampled_contrast(z_t, crd.bank_s, cidx, logit_scale=1 / TEMP)[1]
            fresh = torch.stack(
                [math.log(N) + torch.logsumexp(l, 0) - math.log(l.numel() * (K + 1)) for l in (l_s, l_t)]
            )
            wrong = _nce(crd, z_s, z_t, crd.bank_s, crd.bank_t, cidx, fresh)
        loss = crd(f_s, f_t, idx, cidx)
        assert torch.equal(crd.log_z, first)
        torch.testing.assert_close(loss.detach(), right, rtol=5e-5, atol=1e-5)
        assert _differs(wrong, right, 1e-3), "test cannot tell a re-estimated Z apart"


# 3. Missing eps -----------------------------------------------------------------------------------
def _rd_nce(z, bank, cidx, log_z, n, eps):
    """RepDistiller's ContrastLoss on P = exp(u)/Z, with a configurable eps."""
    P = torch.exp(torch.einsum("bkd,bd->bk", bank[cidx], z) / TEMP - log_z)
    c = (cidx.shape[1] - 1) / n
    return (-torch.log(P[:, 0] / (P[:, 0] + c + eps)) - torch.log(c / (P[:, 1:] + c + eps)).sum(1)).mean()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if isinstance(b, str)])  # fp64: not Triton
def test_crd_keeps_the_nce_eps(backend):
    """N = 200k rows, K = 64: c = K/N = 3.2e-4 while P ~ 1/N = 5e-6, so eps = 1e-7 is 3e-4 of
    every negative's denominator and shifts each row's loss by ~K eps / c = 0.02."""
    n, k = 200_000, 64
    crd = _crd(backend, torch.float64, n=n, k=k)
    f_s, f_t, idx, cidx = _batch(0, torch.float64, n=n, k=k)
    crd(f_s, f_t, idx, cidx)
    f_s, f_t, idx, cidx = _batch(1, torch.float64, n=n, k=k)
    with torch.no_grad():
        z_s, z_t = crd.embed_s(f_s), crd.embed_t(f_t)
        args = [(z_s, crd.bank_t, cidx, crd.log_z[0]), (z_t, crd.bank_s, cidx, crd.log_z[1])]
        right = sum(_rd_nce(*a, n, 1e-7) for a in args)
        wrong = sum(_rd_nce(*a, n, 0.0) for a in args)
    loss = crd(f_s, f_t, idx, cidx)
    torch.testing.assert_close(loss.detach(), right, rtol=1e-10, atol=1e-10)
    assert (wrong - right).abs() > 1e-3, "eps does not matter in this case: the test would not catch it"


# 4. Positive taken from the current teacher instead of the bank ------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_crd_positive_comes_from_the_bank(backend):
    crd = _crd(backend)
    f_s, f_t, idx, cidx = _batch(0)
    crd(f_s, f_t, idx, cidx)
    crd.zero_grad()
    f_s, f_t, idx, cidx = _batch(1)
    with torch.no_grad():
        z_s, z_t = crd.embed_s(f_s), crd.embed_t(f_t)
        right = _nce(crd, z_s, z_t, crd.bank_s, crd.bank_t, cidx, crd.log_z)
        # The mistake: the student's positive is the current teacher embedding <z_s, z_t>.
        l_s = torch.einsum("bkd,bd->bk", crd.bank_t[cidx], z_s) / TEMP
        l_s[:, 0] = (z_s * z_t).sum(1) / TEMP
        l_t = torch.einsum("bkd,bd->bk", crd.bank_s[cidx], z_t) / TEMP
        l_t[:, 0] = (z_t * z_s).sum(1) / TEMP
        wrong = (
            reference.nce_loss_from_logits(l_s, crd.log_z[0], N).mean()
            + reference.nce_loss_from_logits(l_t, crd.log_z[1], N).mean()
        )
    twin = copy.deepcopy(crd)
    loss = crd(f_s, f_t, idx, cidx)
    torch.testing.assert_close(loss.detach(), right, rtol=5e-5, atol=1e-5)
    assert _differs(wrong, right, 1e-3)
    # Consequence: the student head's gradient does not depend on the teacher features at all.
    loss.backward()
    twin(f_s, f_t * 3.0 + 1.0, idx, cidx).backward()
    torch.testing.assert_close(crd.embed_s.weight.grad, twin.embed_s.weight.grad, rtol=1e-6, atol=1e-7)
    assert _differs(crd.embed_t.weight.grad, twin.embed_t.weight.grad)  # (the teacher head's does)


# 5. Enqueue before scoring -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_cocord_enqueues_after_scoring(backend):
    torch.manual_seed(0)
    cc = CoCoRDLoss(5, 5, embed_dim=12, hidden_dim=10, pred_dim=6, queue_size=10, pred_weight=0.0, backend=backend)
    g = torch.Generator().manual_seed(1)
    f_s, f_t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    ref = copy.deepcopy(cc)
    ref.momentum_update()
    with torch.no_grad():
        q = F.normalize(ref.projector(f_s), dim=1)
        k = F.normalize(ref.teacher_projector(f_t), dim=1)
        queue = ref.queue.clone()
        right = reference.dense_contrast(q, queue, positive=k, logit_scale=10.0)[0].mean()
        early = queue.clone()
        reference.queue_enqueue_(early, torch.zeros(1, dtype=torch.long), k)
        wrong = reference.dense_contrast(q, early, positive=k, logit_scale=10.0)[0].mean()
    loss = cc(f_s, f_t)
    torch.testing.assert_close(loss.detach(), right, rtol=5e-5, atol=1e-5)
    assert _differs(wrong, right, 1e-3), "test cannot tell enqueue-before-scoring apart"
    torch.testing.assert_close(cc.queue, early)  # enqueued after all, at the old pointer
    assert cc.queue_ptr.item() == 4
    loss.backward()  # the snapshot keeps autograd valid after the in-place enqueue


# 6. The DCD bias gradient is exactly zero ---------------------------------------------------------
@pytest.mark.parametrize("memory", [False, True], ids=["in-batch", "memory"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dcd_bias_gradient_is_exactly_zero(backend, memory):
    torch.manual_seed(0)
    kw = dict(n_data=N, nce_k=K) if memory else {}
    dcd = DCDLoss(S_DIM, T_DIM, D, backend=backend, **kw)
    with torch.no_grad():
        dcd.bias.fill_(0.7)
    nonzero_official = 0
    for step in range(3):
        f_s, f_t, idx, cidx = _batch(step)
        dcd.zero_grad()
        dcd(f_s, f_t, idx, cidx).backward()
        assert dcd.bias.grad is not None and dcd.bias.grad.item() == 0.0
        assert dcd.log_scale.grad.item() != 0.0
        # The wrong (official) way: b added to the logits, autograd returns rounding noise.
        b = torch.tensor(0.7, requires_grad=True)
        with torch.no_grad():
            z_s, z_t = dcd.embed_s(f_s), dcd.embed_t(f_t)
        logits = z_s @ z_t.t() * dcd.logit_scale().detach() + b
        wrong = F.cross_entropy(logits, torch.arange(B)) + 0.5 * F.kl_div(
            F.log_softmax(logits, 1), F.softmax(logits, 0).t(), reduction="batchmean"
        )
        wrong.backward()
        nonzero_official += int(b.grad.item() != 0.0)
    assert nonzero_official > 0, "the official formulation happened to give exact zeros: pick other seeds"


def _module_cases():
    """(name, loss module, call(overrides) -> loss) for each method, with small valid inputs."""
    from dcdkernels import CoCoRDLoss, CRDLoss, DCDLoss, PCKDLoss

    g = torch.Generator().manual_seed(0)
    B, S, T, C = 4, 12, 10, 5

    def feats(dim, batch=B):
        return torch.randn(batch, dim, generator=g)

    idx = torch.tensor([1, 5, 9, 60])
    crd = CRDLoss(S, T, n_data=64, feat_dim=8, nce_k=7)
    dcd = DCDLoss(S, T, feat_dim=8)
    coc = CoCoRDLoss(S, T, embed_dim=16, hidden_dim=16, pred_dim=8, queue_size=32)
    pck = PCKDLoss(S, T, num_views=1)
    fc_s, fc_t = torch.nn.Linear(S, C), torch.nn.Linear(T, C)
    base = {
        "crd": (crd, dict(f_s=feats(S), f_t=feats(T), idx=idx)),
        "dcd": (dcd, dict(f_s=feats(S), f_t=feats(T))),
        "cocord": (coc, dict(f_s=feats(S), f_t=feats(T), f_s2=feats(S), f_slow=feats(S), f_slow2=feats(S))),
        "pckd": (
            pck,
            dict(
                f_s=feats(S),
                f_t=feats(T),
                logit_s=feats(C),
                logit_t=feats(C),
                labels=torch.tensor([0, 1, 2, 4]),
                fc_s=fc_s,
                fc_t=fc_t,
            ),
        ),
    }
    return base, feats


@pytest.mark.parametrize("method", ["crd", "dcd", "cocord", "pckd"])
def test_loss_modules_name_the_bad_argument(method):
    """Issue: reliability, input validation of every module. Each bad feature input is rejected
    with the argument's name before any head or kernel runs; the valid call works."""
    base, feats = _module_cases()
    module, kwargs = base[method]
    assert torch.isfinite(module(**kwargs))
    f_s = kwargs["f_s"]
    bad = {
        "f_s has 11 features per row": dict(f_s=feats(11)),
        "f_t has batch 3 but f_s has 4": dict(f_t=feats(kwargs["f_t"].shape[1], batch=3)),
        "f_s is an empty batch": dict(f_s=f_s[:0]),
        "f_s must be floating point": dict(f_s=f_s.to(torch.int64)),
        "f_s must be .B, features...": dict(f_s=f_s[0]),
    }
    if method == "pckd":
        bad["labels must be a"] = dict(labels=torch.tensor([0.0, 1.0, 2.0, 3.0]))
        bad["logit_t has 4 features per row"] = dict(logit_t=feats(4))
    for match, override in bad.items():
        with pytest.raises((ValueError, TypeError), match=match):
            module(**{**kwargs, **override})
