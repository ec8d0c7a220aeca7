"""PCKDLoss against transcriptions, written for these tests, of the authors' code (MuHeDing/PCKD
at 610b3e8: ``helper/losses.py`` CategoryConLoss / AlignLoss, ``helper/loops.py`` the ``pckd``
branch of ``train_distill``, ``distiller_zoo/KD.py`` DistillKL, ``train_student.py`` the heads,
weights and SGD). Everything in float64; the tolerance is rel err <= 1e-6 (issue 16).
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcdkernels import ops
from dcdkernels.losses import PCKDLoss

EPS = 1e-7
DT = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def close(a, b, rel=1e-6, atol=1e-12):
    """max |a - b| <= rel * max |b| (+ atol for tensors that are rounding noise in both, e.g. a
    bias gradient of a softmax: sum_j p_j - 1 ~ 1e-17)."""
    a, b = torch.as_tensor(a, dtype=DT).detach(), torch.as_tensor(b, dtype=DT).detach()
    err = (a - b).abs().max()
    assert err <= rel * b.abs().max() + atol, f"max err {float(err):.3g} vs max {float(b.abs().max()):.3g}"


# ---- the official computations, transcribed --------------------------------------------------
def off_embed(lin, x):  # Embed: Linear then x / ||x|| (Normalize(2), no floor)
    x = lin(x.view(x.shape[0], -1))
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


def off_category_con(embed_s, embed_t, feat_s, fcl_s, fcl_t, labels, temperature=4.0, base_temperature=0.07):
    """CategoryConLoss.forward: (BV,) per-row loss, the two halves added."""
    n = feat_s.shape[0]
    lab = labels.contiguous().view(-1, 1)
    mask = torch.eq(lab, lab.t()).to(DT)
    fu_s = off_embed(embed_s, feat_s) @ fcl_s
    fu_t = off_embed(embed_t, feat_s) @ fcl_t
    anchor = torch.cat([fu_s, fu_t], 0)
    adc = torch.div(anchor @ anchor.t(), temperature)
    logits = adc - adc.max(dim=1, keepdim=True)[0].detach()
    mask = mask.repeat(2, 2)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(2 * n).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True) + EPS)
    mlpp = (mask * log_prob).sum(1) / mask.sum(1)
    loss = (-(temperature / base_temperature) * mlpp).view(2, n)
    return loss[0] + loss[1]


def off_distill_kl(y_s, y_t, T=4.0, reduction="sum"):
    return F.kl_div(F.log_softmax(y_s / T, 1), F.softmax(y_t / T, 1), reduction=reduction) * T**2 / y_s.shape[0]


def off_percent(logit_nor, target, epoch):
    loss_cls_id = F.cross_entropy(logit_nor, target, reduction="none")
    alpha = loss_cls_id / F.cross_entropy(logit_nor, target)
    t = math.pow(1.005, epoch)
    return torch.where(alpha <= t, torch.ones(alpha.shape, dtype=DT), torch.exp(-torch.pow(alpha, 2)))


class OffMLPHead(nn.Module):  # BYOL MLPHead as used by AlignLoss
    def __init__(self, i, h, o):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Linear(h, o))

    def forward(self, x):
        return self.net(x)


def off_align(mlp, feat_s, feat_t):
    fs = F.normalize(mlp(feat_s), dim=-1, p=2)
    ft = F.normalize(feat_t, dim=-1, p=2)
    return 2 - 2 * (fs * ft).sum(dim=-1).mean()


def off_step_loss(opt, epoch, x, target, model_s, model_t, embed_s, embed_t, mlp):
    """The ``pckd`` branch of train_distill for one batch x (B, 4, in)."""
    inp = x.view(-1, x.shape[-1])
    bs = inp.shape[0] // 4
    nor = torch.arange(4 * bs) % 4 == 0
    f_s, logit_s, fc_s = model_s(inp)
    with torch.no_grad():
        f_t, logit_t, fc_t = model_t(inp)
    loss_cls = F.cross_entropy(logit_s[nor], target)
    fc_sm = torch.cat([a.unsqueeze(1) if a.ndim == 1 else a for a in fc_s.parameters()], 1)
    fc_tm = torch.cat([a.unsqueeze(1) if a.ndim == 1 else a for a in fc_t.parameters()], 1)
    loss_corr = 0 if fc_sm.shape != fc_tm.shape else F.mse_loss(fc_sm, fc_tm)
    aug_target = target.unsqueeze(1).expand(-1, 4).contiguous().view(-1).long()
    loss_kd = off_category_con(embed_s, embed_t, f_s, fc_s.weight.t(), fc_t.weight.t(), aug_target)
    loss_align = off_align(mlp, f_s, f_t)
    loss_tem = off_distill_kl(logit_s[nor], logit_t[nor], reduction="none").sum(1)
    percent = off_percent(logit_s[nor], target, epoch)
    percent2 = torch.tensor([float(percent[i].detach()) for i in range(bs) for _ in range(4)], dtype=DT)
    loss1 = opt.delta * torch.dot(percent, loss_tem)
    loss2 = torch.dot(percent2, opt.beta * loss_kd) / (4 * bs)
    return loss_cls + loss1 + loss2 + opt.alpha * loss_corr + opt.ff * loss_align


class Stub(nn.Module):
    """A stub backbone: features = tanh(Linear(x)), logits = fc(features); returns the fc too."""

    def __init__(self, d_in, dim, C):
        super().__init__()
        self.body, self.fc = nn.Linear(d_in, dim), nn.Linear(dim, C)

    def forward(self, x):
        f = torch.tanh(self.body(x))
        return f, self.fc(f), self.fc


# ---- tests ------------------------------------------------------------------------------------
def _batch(step, B=6, d_in=5, C=3):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, 4, d_in, generator=g, dtype=DT), torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("s_dim,t_dim", [(6, 6), (6, 8)], ids=["equal-dims", "different-dims"])
@pytest.mark.parametrize("delta", [0.0, 1.0], ids=["defaults", "d=1"])
def test_whole_loss_matches_official_over_3_sgd_steps(s_dim, t_dim, delta):
    torch.manual_seed(0)
    d_in, C = 5, 3
    model_s, model_t = Stub(d_in, s_dim, C).to(DT), Stub(d_in, t_dim, C).to(DT)
    opt = SimpleNamespace(
        s_dim=s_dim, t_dim=t_dim, alpha=1.0, beta=0.05, ff=20.0, delta=delta, gamma=1.0, kd_T=4.0, n_cls=C, feat_dim=128
    )
    ours = PCKDLoss.from_opt(opt, backend="eager").to(DT)
    off_es, off_et = nn.Linear(s_dim, s_dim).to(DT), nn.Linear(s_dim, t_dim).to(DT)
    off_mlp = OffMLPHead(s_dim, 16 * t_dim, t_dim).to(DT)
    off_es.load_state_dict({"weight": ours.embed_s.weight, "bias": ours.embed_s.bias})
    off_et.load_state_dict({"weight": ours.embed_t.weight, "bias": ours.embed_t.bias})
    off_mlp.net.load_state_dict(ours.align_mlp.state_dict())
    off_s = copy.deepcopy(model_s)
    ours_params = list(model_s.parameters()) + list(ours.parameters())
    off_params = (
        list(off_s.parameters()) + list(off_es.parameters()) + list(off_et.parameters()) + list(off_mlp.parameters())
    )
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    o1, o2 = torch.optim.SGD(ours_params, **sgd), torch.optim.SGD(off_params, **sgd)
    for step, epoch in enumerate((1, 2, 3)):
        x, y = _batch(step, d_in=d_in, C=C)
        ours.set_epoch(epoch)
        inp = x.view(-1, d_in)
        f_s, logit_s, fc_s = model_s(inp)
        with torch.no_grad():
            f_t, logit_t, fc_t = model_t(inp)
        loss = ours(f_s, f_t, logit_s, logit_t, y, fc_s, fc_t)
        ref = off_step_loss(opt, epoch, x, y, off_s, model_t, off_es, off_et, off_mlp)
        close(loss, ref)
        o1.zero_grad(), o2.zero_grad()
        loss.backward(), ref.backward()
        for p, q in zip(ours_params, off_params):
            close(p.grad, q.grad)
        o1.step(), o2.step()
        for p, q in zip(ours_params, off_params):
            close(p, q)
        for a, b in zip(ours.align_mlp.buffers(), off_mlp.net.buffers()):
            close(a, b)
    if s_dim != t_dim:
        assert float(ours.last_terms["ca"]) == 0.0  # official: loss_corr = 0 when the shapes differ
    assert (ours.last_weights < 1).any() or delta == 0.0  # some hard samples were down-weighted


def test_category_contrast_matches_official_over_3_sgd_steps():
    torch.manual_seed(1)
    s_dim, t_dim, C, n = 5, 7, 4, 12
    ours = PCKDLoss(s_dim, t_dim, num_views=4, backend="eager").to(DT)
    es, et = nn.Linear(s_dim, s_dim).to(DT), nn.Linear(s_dim, t_dim).to(DT)
    es.load_state_dict({"weight": ours.embed_s.weight, "bias": ours.embed_s.bias})
    et.load_state_dict({"weight": ours.embed_t.weight, "bias": ours.embed_t.bias})
    g = torch.Generator().manual_seed(3)
    f1 = torch.randn(n, s_dim, generator=g, dtype=DT, requires_grad=True)
    w1 = torch.randn(C, s_dim, generator=g, dtype=DT, requires_grad=True)
    wt = torch.randn(C, t_dim, generator=g, dtype=DT)
    f2, w2 = f1.detach().clone().requires_grad_(), w1.detach().clone().requires_grad_()
    y = torch.randint(0, C, (n,), generator=g)
    p1 = [f1, w1, ours.embed_s.weight, ours.embed_s.bias, ours.embed_t.weight, ours.embed_t.bias]
    p2 = [f2, w2, es.weight, es.bias, et.weight, et.bias]
    o1, o2 = torch.optim.SGD(p1, lr=0.1), torch.optim.SGD(p2, lr=0.1)
    for _ in range(3):
        z = torch.cat([ours.embed_s(f1) @ w1.t(), ours.embed_t(f1) @ wt.t()])
        ours_rows = ops.supcon_contrast(z, torch.cat([y, y]), logit_scale=0.25, reduction="none", backend="eager")
        ours_rows = (ours_rows[:n] + ours_rows[n:]) * (4 / 0.07)
        ref = off_category_con(es, et, f2, w2.t(), wt.t(), y)
        close(ours_rows, ref)
        o1.zero_grad(), o2.zero_grad()
        ours_rows.sum().backward(), ref.sum().backward()
        for a, b in zip(p1, p2):
            close(a.grad, b.grad)
        o1.step(), o2.step()


def test_preview_weights_match_official_over_epochs_1_to_240():
    g = torch.Generator().manual_seed(0)
    B, C = 32, 10
    base = torch.randn(B, C, generator=g, dtype=DT) * 2
    y = torch.randint(0, C, (B,), generator=g)
    loss = PCKDLoss(4, 4, backend="eager")
    assert loss._epoch == 1 and int(loss.epoch) == 1  # the official loop starts at epoch 1
    n_hard = 0
    for epoch in range(1, 241):
        loss.set_epoch(epoch)
        l1 = base.clone().requires_grad_()
        l2 = base.clone().requires_grad_()
        w_ours = loss.preview_weights(l1, y)
        w_off = off_percent(l2, y, epoch)
        close(w_ours, w_off, rel=1e-12)
        n_hard += int((w_off < 1).sum())
        # gradient through the weights, as the official KD term (percent is not detached)
        v = torch.linspace(0.5, 2.0, B, dtype=DT)
        (w_ours @ v).backward(), (w_off @ v).backward()
        close(l1.grad, l2.grad, rel=1e-12)
    assert n_hard > 0
    # no floor: a very hard sample's weight underflows to 0, as the official
    hard = torch.zeros(16, 5)  # float32: a = 16, exp(-256) underflows
    hard[0, 1] = 80.0
    assert float(loss.preview_weights(hard, torch.zeros(16, dtype=torch.long)).min()) == 0.0
    floored = PCKDLoss(4, 4, min_weight=1e-6)
    assert float(floored.preview_weights(hard, torch.zeros(16, dtype=torch.long)).min()) > 0.99e-6


def test_from_opt_reads_the_official_names():
    opt = SimpleNamespace(
        s_dim=8, t_dim=12, alpha=1.0, beta=0.05, ff=20.0, gamma=1.0, kd_T=4.0, n_cls=5, feat_dim=128, delta=None
    )
    m = PCKDLoss.from_opt(opt)
    assert (m.ca_weight, m.cc_weight, m.fa_weight, m.kd_weight, m.ce_weight) == (1.0, 0.05, 20.0, 0.0, 1.0)
    assert m.n_cls == 5 and m.embed_t.out_features == 12 and m.align_mlp[0].out_features == 16 * 12
    short = PCKDLoss.from_opt(SimpleNamespace(s_dim=8, t_dim=12, a=2.0, b=0.1, d=0.5, f=3.0))
    assert (short.ca_weight, short.cc_weight, short.kd_weight, short.fa_weight) == (2.0, 0.1, 0.5, 3.0)
    d = PCKDLoss(8, 12)  # the constructor defaults are the README command's
    assert (d.ca_weight, d.cc_weight, d.fa_weight, d.kd_weight, d.cc_temperature) == (1.0, 0.05, 20.0, 0.0, 4.0)
    # the official state-dict keys (Embed wraps a Linear) load
    sd = {
        k.replace("embed_s.", "embed_s.linear.").replace("embed_t.", "embed_t.linear.")
        if k.startswith("embed")
        else k: v
        for k, v in d.state_dict().items()
    }
    PCKDLoss(8, 12).load_state_dict(sd)


def _valid_call(B=3, V=4, S=6, T=8, C=5):
    g = torch.Generator().manual_seed(9)
    r = B * V
    return dict(
        f_s=torch.randn(r, S, generator=g),
        f_t=torch.randn(r, T, generator=g),
        logit_s=torch.randn(r, C, generator=g),
        logit_t=torch.randn(r, C, generator=g),
        labels=torch.tensor([0, 4, 2]),
        fc_s=nn.Linear(S, C),
        fc_t=nn.Linear(T, C),
    )


def test_rejected_call_names_the_argument_and_leaves_no_trace():
    """Issue 15 classes 5 and 11 for PCKD: every input is checked before any head runs."""
    torch.manual_seed(0)
    loss = PCKDLoss(6, 8, n_cls=5)
    loss.train()
    kw = _valid_call()
    before = copy.deepcopy(loss.state_dict())
    nan = kw["f_s"].clone()
    nan[2, 1] = float("nan")
    inf_t = kw["f_t"].clone()
    inf_t[0, 0] = float("inf")
    nan_logit = kw["logit_s"].clone()
    nan_logit[1, 1] = float("nan")
    bad = {
        "f_s has non-finite": dict(f_s=nan),
        "f_t has non-finite": dict(f_t=inf_t),
        "logit_s has non-finite": dict(logit_s=nan_logit),
        "labels has entries out of range": dict(labels=torch.tensor([0, 5, 1])),
        "labels has entries out of range ": dict(labels=torch.tensor([-1, 0, 1])),
        "labels must be a": dict(labels=torch.tensor([0.0, 1.0, 2.0])),
        "labels must be a  ": dict(labels=torch.tensor([0, 1])),
        "fc_s weight must be": dict(fc_s=nn.Linear(6, 4)),
        "fc_t weight must be": dict(fc_t=nn.Linear(7, 5)),
        "fc_s bias must be": dict(fc_s=(torch.randn(5, 6), torch.randn(4))),
        "fc_t must be an nn.Linear": dict(fc_t="linear"),
        "not a multiple of num_views": dict(
            f_s=kw["f_s"][:11], f_t=kw["f_t"][:11], logit_s=kw["logit_s"][:11], logit_t=kw["logit_t"][:11]
        ),
        "n_cls = 5": dict(logit_s=torch.randn(12, 4), logit_t=torch.randn(12, 4)),
    }
    for match, override in bad.items():
        with pytest.raises((ValueError, TypeError), match=match.strip()):
            loss(**{**kw, **override})
        after = loss.state_dict()
        for k, v in before.items():
            assert torch.equal(v, after[k]), f"{match}: {k} changed"
    assert torch.isfinite(loss(**kw))
    assert not torch.equal(before["align_mlp.1.running_mean"], loss.state_dict()["align_mlp.1.running_mean"])


def test_trainer_views_are_the_official_four_rotations():
    from dcdkernels.train.distill import build_criterion, pckd_views

    x = torch.randn(3, 2, 5, 5)
    v = pckd_views(x)
    assert v.shape == (12, 2, 5, 5)
    for b in range(3):
        assert torch.equal(v[4 * b], x[b])  # row 4b: the normal view (the official nor_index)
        for k in range(1, 4):
            assert torch.equal(v[4 * b + k], torch.rot90(x[b], k, (1, 2)))
    with pytest.raises(ValueError, match="square"):
        pckd_views(torch.randn(2, 1, 4, 5))
    cfg = SimpleNamespace(dataset="digits", loss_kwargs={}, kd_T=4.0)
    c = build_criterion(cfg, "pckd", 6, 8, 100, 10, "eager", None, None)
    assert (c.num_views, c.n_cls, c.ce_weight, c.ca_weight, c.cc_weight, c.fa_weight, c.kd_weight) == (
        4,
        10,
        0.0,
        1.0,
        0.05,
        20.0,
        0.0,
    )
