"""DCDLoss with the official fixed temperature (giakoumoglou/distillers ``cifar/distillers/DCD.py``,
``trainable=False``: ``params.tau = nce_t`` used as the multiplier itself) against a float64
transcription, written for these tests, of the official forward; and ``DCDLoss.from_opt``."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcdkernels.losses import DCDLoss

DT = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


class OfficialDCD(nn.Module):
    """The official DCDLoss forward, both ``trainable`` settings (state keys as the official)."""

    def __init__(self, opt, max_tau=10.0, alpha=0.5, init_tau=1.0, init_b=0.0, trainable=True):
        super().__init__()
        self.max_tau, self.alpha, self.trainable = max_tau, alpha, trainable
        self.params = nn.Module()
        self.params.tau = nn.Parameter(torch.tensor(init_tau))
        self.params.b = nn.Parameter(torch.tensor(init_b))
        if not trainable:
            self.params.tau = nn.Parameter(torch.tensor(opt.nce_t), requires_grad=False)
            self.params.b = nn.Parameter(torch.tensor(0.0), requires_grad=False)
        self.embed_s = nn.Linear(opt.s_dim, opt.feat_dim)
        self.embed_t = nn.Linear(opt.t_dim, opt.feat_dim)

    def forward(self, f_s, f_t):
        f_s = F.normalize(self.embed_s(f_s), dim=1)
        f_t = F.normalize(self.embed_t(f_t), dim=1)
        n = f_s.size(0)
        tau = self.params.tau.exp().clamp(0, self.max_tau) if self.trainable else self.params.tau
        b = self.params.b if self.trainable else 0.0
        logits = torch.mm(f_s, f_t.t()) * tau + b
        ce = F.cross_entropy(logits, torch.arange(n))
        p1 = F.log_softmax(logits, dim=1)
        p2 = F.softmax(logits, dim=0).t()
        return ce + self.alpha * F.kl_div(p1, p2, reduction="batchmean")


OPT = SimpleNamespace(s_dim=6, t_dim=9, feat_dim=5, nce_t=0.07)


@pytest.mark.parametrize("trainable", [False, True], ids=["fixed-tau", "learnable-tau"])
def test_dcd_matches_official_over_3_sgd_steps(trainable):
    torch.manual_seed(0)
    off = OfficialDCD(OPT, trainable=trainable).to(DT)
    ours = DCDLoss.from_opt(OPT, trainable=trainable, backend="eager").to(DT)
    ours.load_state_dict(off.state_dict(), strict=True)  # the official state dict loads as is
    if not trainable:
        assert float(ours.logit_scale()) == pytest.approx(0.07, rel=1e-7)  # not e^0.07
    o_params = [p for p in off.parameters() if p.requires_grad]
    u_params = [p for p in ours.parameters() if p.requires_grad]
    assert len(o_params) == len(u_params)
    o1, o2 = torch.optim.SGD(o_params, lr=0.5, momentum=0.9), torch.optim.SGD(u_params, lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        f_s, f_t = torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 9, generator=g, dtype=DT)
        a, b = off(f_s, f_t), ours(f_s, f_t)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
        o1.zero_grad(), o2.zero_grad()
        a.backward(), b.backward()
        o1.step(), o2.step()
        for name, p in ours.named_parameters():
            if name in ("embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"):
                torch.testing.assert_close(p, dict(off.named_parameters())[name], rtol=1e-6, atol=1e-12)
    if trainable:
        torch.testing.assert_close(ours.log_scale, off.params.tau, rtol=1e-6, atol=1e-12)
    else:
        assert "fixed_scale" in ours.state_dict() and "log_scale" not in ours.state_dict()
        assert not ours.bias.requires_grad


def test_dcd_fixed_scale_memory_form_and_bad_values():
    m = DCDLoss(6, 9, feat_dim=5, trainable=False, nce_t=0.07, n_data=16, nce_k=4)
    f_s, f_t = torch.randn(4, 6), torch.randn(4, 9)
    assert torch.isfinite(m(f_s, f_t, torch.tensor([0, 3, 5, 9])))
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="nce_t"):
            DCDLoss(6, 9, trainable=False, nce_t=bad)
    with pytest.raises(TypeError, match="trainable"):
        DCDLoss(6, 9, trainable="no")
    fresh = DCDLoss(6, 9, feat_dim=5, trainable=False, nce_t=0.5, n_data=16, nce_k=4)
    fresh.load_state_dict(copy.deepcopy(m.state_dict()), strict=True)
    assert float(fresh.logit_scale()) == pytest.approx(0.07)
