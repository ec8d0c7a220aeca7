"""The eager oracle itself: hand-computed cases and float64 gradcheck of every differentiable op."""

import math

import pytest
import torch

from dcdkernels import reference
from dcdkernels.reference.bank_update import last_occurrence

E = math.e


def _two_anchor_case():
    """2 anchors, 1 positive + 3 negatives each, D = 2, s = 1 (written out by hand below)."""
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    anchor = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    return anchor, bank, index


def test_infonce_hand_computed():
    anchor, bank, index = _two_anchor_case()
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    loss, lse = reference.sampled_contrast(anchor, bank, index, logit_scale=scale)
    # Each anchor's dots with its rows are (1, 0, -1, 0): Z = e + 2 + 1/e, L = log Z - 1.
    Z = E + 2 + 1 / E
    assert torch.allclose(loss, torch.full((2,), math.log(Z) - 1, dtype=torch.float64))
    assert torch.allclose(lse, torch.full((2,), math.log(Z), dtype=torch.float64))
    loss.sum().backward()
    # dL/dq = sum_k p_k row_k - row_0; for anchor 0: ((e - 1/e)/Z - 1, 0).
    g = (E - 1 / E) / Z - 1
    assert torch.allclose(anchor.grad, torch.tensor([[g, 0.0], [0.0, g]], dtype=torch.float64))
    # dL/ds = sum_k p_k d_k - d_0 = (e - 1/e)/Z - 1 per anchor.
    assert torch.allclose(scale.grad, torch.tensor(2 * g, dtype=torch.float64))


def test_nce_hand_computed():
    anchor, bank, index = _two_anchor_case()
    loss, _ = reference.sampled_contrast(anchor, bank, index, logit_scale=1.0, loss="nce", log_z=0.0)
    # c = K/N = 3/4, P_k = exp(d_k) = (e, 1, 1/e, 1), eps = 1e-7 (RepDistiller ContrastLoss).
    c, eps = 3 / 4, 1e-7
    P = [E, 1.0, 1 / E, 1.0]
    expected = -math.log(P[0] / (P[0] + c + eps)) - sum(math.log(c / (p + c + eps)) for p in P[1:])
    assert torch.allclose(loss, torch.full((2,), expected, dtype=torch.float64), atol=1e-12)
    loss[0].backward()
    # dL/du_0 = -(c+eps)/(P_0+c+eps), dL/du_k = P_k/(P_k+c+eps); grad_q = sum_k w_k row_k.
    w = [-(c + eps) / (P[0] + c + eps)] + [p / (p + c + eps) for p in P[1:]]
    gq = w[0] * bank[0] + w[1] * bank[1] + w[2] * bank[2] + w[3] * bank[3]
    assert torch.allclose(anchor.grad[0], gq)
    assert torch.all(anchor.grad[1] == 0)


def test_nce_matches_repdistiller_formula_in_fp64():
    torch.manual_seed(0)
    B, K, N, D = 4, 9, 50, 8
    q = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(N, D, dtype=torch.float64), dim=1)
    idx = torch.randint(0, N, (B, K + 1))
    T, log_z = 0.07, 3.0
    loss, _ = reference.sampled_contrast(q, bank, idx, logit_scale=1 / T, loss="nce", log_z=log_z)
    # RepDistiller: out = exp(bmm(w, q)/T) / Z; ContrastLoss.
    x = torch.exp(torch.bmm(bank[idx], q.unsqueeze(2)).squeeze(2) / T) / math.exp(log_z)
    Pn, eps = 1 / N, 1e-7
    log_D1 = torch.log(x[:, 0] / (x[:, 0] + K * Pn + eps))
    log_D0 = torch.log((K * Pn) / (x[:, 1:] + K * Pn + eps))
    rep = -(log_D1.sum() + log_D0.sum()) / B
    assert torch.allclose(loss.mean(), rep, rtol=1e-10)


def _gradcheck_inputs(seed=0, B=3, K=4, N=7, D=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, dtype=torch.float64, generator=g, requires_grad=True)
    bank = torch.randn(N, D, dtype=torch.float64, generator=g)
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    return q, bank, idx, s, beta


@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_gradcheck_sampled(loss):
    q, bank, idx, s, beta = _gradcheck_inputs()
    log_z = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    fn = lambda q, s, beta, lz: reference.sampled_contrast(q, bank, idx, logit_scale=s, bias=beta, loss=loss, log_z=lz)[
        0
    ]
    assert torch.autograd.gradcheck(fn, (q, s, beta, log_z))


@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_gradcheck_dual(loss):
    q, bank, idx, s, beta = _gradcheck_inputs(1)
    qt = torch.randn_like(q).requires_grad_()
    bank_t = torch.randn_like(bank)
    log_z = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def fn(qs, qt, s, beta, lz):
        return torch.stack(
            reference.dual_sampled_contrast(qs, qt, bank, bank_t, idx, logit_scale=s, bias=beta, loss=loss, log_z=lz)[
                :3
            ]
        )

    assert torch.autograd.gradcheck(fn, (q, qt, s, beta, log_z))


@pytest.mark.parametrize("mode", ["target", "positive"])
def test_gradcheck_dense(mode):
    q, keys, _, s, beta = _gradcheck_inputs(2, N=6)
    keys.requires_grad_()
    w = torch.rand(q.shape[0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 5, 2])
    pos = torch.randn_like(q).requires_grad_()
    if mode == "target":
        fn = lambda q, k, s, b, w: reference.dense_contrast(q, k, target, logit_scale=s, bias=b, weight=w)[0]
        assert torch.autograd.gradcheck(fn, (q, keys, s, beta, w))
    else:
        fn = lambda q, k, p, s, b: reference.dense_contrast(q, k, positive=p, logit_scale=s, bias=b)[0]
        assert torch.autograd.gradcheck(fn, (q, keys, pos, s, beta))


def test_softmax_bias_gradient_is_zero():
    q, bank, idx, s, beta = _gradcheck_inputs(3)
    loss, _ = reference.sampled_contrast(q, bank, idx, logit_scale=s, bias=beta)
    loss.sum().backward()
    assert abs(beta.grad.item()) < 1e-12 and abs(s.grad.item()) > 1e-6


# ------------------------------------------------------------------------------------------------
# sampled_contrast_outputs: the kernels' four outputs, absent columns included (csrc/KERNELS.md)


def _outputs(q, bank, idx, s, beta, loss, log_z, noise_rows=0):
    return reference.sampled_contrast_outputs(
        q, bank, idx, logit_scale=s, bias=beta, loss=loss, log_z=log_z, noise_rows=noise_rows
    )


@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_kernel_outputs_are_the_autograd_gradients(loss):
    """Every column present: the closed-form outputs equal autograd through ``sampled_contrast``
    (per-row scale and bias columns give the per-row d/ds and d/dbeta)."""
    q, bank, idx, s, beta = _gradcheck_inputs(5, B=4, K=6, N=9)
    B = q.shape[0]
    s_col = s.detach().expand(B, 1).clone().requires_grad_()
    b_col = beta.detach().expand(B, 1).clone().requires_grad_()
    per_row, lse = reference.sampled_contrast(q, bank, idx, logit_scale=s_col, bias=b_col, loss=loss, log_z=0.7)
    gq, gs, gb = torch.autograd.grad(per_row.sum(), (q, s_col, b_col))
    got = _outputs(q, bank, idx, s, beta, loss, 0.7)
    for actual, expected in zip(got, (per_row, lse, gq, torch.stack([gs[:, 0], gb[:, 0]]))):
        torch.testing.assert_close(actual, expected.detach(), atol=1e-12, rtol=1e-10)
    if loss == "infonce":
        assert torch.equal(got[3][1], torch.zeros(B, dtype=torch.float64))


@pytest.mark.parametrize("loss", ["infonce", "nce"])
def test_absent_columns_drop_out(loss):
    """Absent negatives (rows outside [0, N)) give what the index without their columns gives, NCE
    at the same c = K / noise_rows (K counts the absent columns: 8 / 14 = 4 / 7)."""
    q, bank, idx, s, beta = _gradcheck_inputs(6, B=3, K=8, N=14)
    gone = [2, 4, 5, 8]
    absent = idx.clone()
    absent[:, gone] = torch.tensor([-1, 14, 2**40, -5])
    kept = idx[:, [k for k in range(9) if k not in gone]]
    for actual, expected in zip(
        _outputs(q, bank, absent, s, beta, loss, 0.7), _outputs(q, bank, kept, s, beta, loss, 0.7, noise_rows=7)
    ):
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)


def test_absent_positive_and_empty_rows():
    q, bank, idx, s, beta = _gradcheck_inputs(7, B=3, K=5, N=8)
    s, beta = s.detach(), beta.detach()
    rows, dots = bank[idx], torch.einsum("bkd,bd->bk", bank[idx], q.detach())
    absent = idx.clone()
    absent[0, 0] = -1  # row 0: no positive
    absent[1] = 8  # row 1: nothing present
    absent[2, 1:] = 8  # row 2: only the positive
    got = _outputs(q, bank, absent, s, beta, "infonce", None)
    # No positive: loss = LSE over the negatives, gradients without the -row_0, -d_0 terms.
    lse0 = torch.logsumexp(s * dots[0, 1:] + beta, 0)
    p = torch.softmax(s * dots[0, 1:], 0)
    torch.testing.assert_close(got[0][0], lse0)
    torch.testing.assert_close(got[1][0], lse0)
    torch.testing.assert_close(got[2][0], s * (p[:, None] * rows[0, 1:]).sum(0))
    torch.testing.assert_close(got[3][0, 0], (p * dots[0, 1:]).sum())
    # Nothing present: LSE and InfoNCE loss -inf, zero gradients.
    assert got[0][1] == -math.inf and got[1][1] == -math.inf
    assert not got[2][1].any() and not got[3][:, 1].any()
    # Only the positive: loss 0, LSE = l_0, zero gradients.
    torch.testing.assert_close(got[0][2], torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(got[1][2], s * dots[2, 0] + beta)
    torch.testing.assert_close(got[2][2], torch.zeros_like(got[2][2]))
    # NCE: an absent column removes its term and its slope, the positive's included.
    nce_full = _outputs(q, bank, idx, s, beta, "nce", 0.7)
    nce = _outputs(q, bank, absent, s, beta, "nce", 0.7)
    c = 5 / 8
    x0 = s * dots[0, 0] + beta - 0.7 - math.log(c + 1e-7)
    torch.testing.assert_close(nce[0][0], nce_full[0][0] - torch.nn.functional.softplus(-x0))
    torch.testing.assert_close(nce[2][0], nce_full[2][0] + s * torch.sigmoid(-x0) * rows[0, 0])
    assert nce[0][1] == 0 and nce[1][1] == -math.inf and not nce[2][1].any() and not nce[3][:, 1].any()


def test_dual_kl_is_kl_of_softmaxes():
    q, bank, idx, s, _ = _gradcheck_inputs(4)
    qt, bank_t = torch.randn_like(q), torch.randn_like(bank)
    _, _, kl, _, _ = reference.dual_sampled_contrast(q, qt, bank, bank_t, idx, logit_scale=s)
    p_s = torch.softmax(s * torch.bmm(bank_t[idx], q.unsqueeze(2)).squeeze(2), 1)
    p_t = torch.softmax(s * torch.bmm(bank[idx], qt.unsqueeze(2)).squeeze(2), 1)
    assert torch.allclose(kl, (p_t * (p_t.log() - p_s.log())).sum(1))


def test_bank_update_last_occurrence_wins():
    bank = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=1)
    before = bank.clone()
    index = torch.tensor([2, 4, 2, 0, 2])
    value = torch.randn(5, 3, dtype=torch.float64)
    assert last_occurrence(index).tolist() == [1, 3, 4]
    reference.bank_momentum_update_(bank, index, value, 0.5)
    expected = torch.nn.functional.normalize(0.5 * before[2] + 0.5 * value[4], dim=0)
    assert torch.allclose(bank[2], expected)
    assert torch.equal(bank[1], before[1]) and torch.equal(bank[3], before[3])
    assert torch.allclose(bank[0], torch.nn.functional.normalize(0.5 * before[0] + 0.5 * value[3], dim=0))


def test_queue_enqueue_wraps_and_rejects_oversized_batch():
    queue = torch.zeros(5, 2)
    keys = torch.arange(8.0).view(4, 2)
    ptr = reference.queue_enqueue_(queue, 3, keys)
    assert ptr == 2
    assert queue[3:].tolist() == [[0, 1], [2, 3]] and queue[:2].tolist() == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="larger than the queue"):
        reference.queue_enqueue_(queue, 0, torch.zeros(6, 2))
