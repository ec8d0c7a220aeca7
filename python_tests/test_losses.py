"""The method losses (issue 6): fidelity to the official code, state handling, fused-vs-eager
parity over every available fused backend, autocast. Tiny shapes: the whole file runs in seconds.

The "official" modules below are transcriptions, written for these tests, of RepDistiller's CRD
path (crd/criterion.py, crd/memory.py), the DCD/ICD code (giakoumoglou/distillers) and CoCoRD's
builder/loop (ShipengFu/CoCoRD): same operations, same order, same numerics.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, backend_params
from torch import nn

import dcdkernels
from dcdkernels.losses import CoCoRDLoss, CRDLoss, DCDLoss, ICDLoss, PCKDLoss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: intra-op threads only add spin-wait overhead on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cpu_backends(with_triton=True):
    """eager + the fused backends that run on CPU tensors here (Triton ones marked ``triton``)."""
    out = ["eager"]
    for p in backend_params():
        dev, be = p.values
        if dev == "cpu" and be != "none" and (with_triton or be != "triton"):
            out.append(pytest.param(be, marks=pytest.mark.triton) if be == "triton" else be)
    return out


def _close(a, b, dtype=torch.float32, scale=1.0, msg=""):
    tol = TOL[dtype]
    torch.testing.assert_close(a, b, atol=tol["atol"] * scale, rtol=tol["rtol"] * scale, msg=msg or None)


# ----------------------------------------------------------------------------------------------
# RepDistiller transcription (CRD)
# ----------------------------------------------------------------------------------------------
class RDEmbed(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.view(x.shape[0], -1))
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class RDContrastMemory(nn.Module):
    """ContrastMemory with explicit indices (the AliasMethod draw is the only part left out)."""

    def __init__(self, input_size, output_size, K, T=0.07, momentum=0.5):
        super().__init__()
        # float64 here: RepDistiller keeps these in float32, i.e. T = 0.07000000029802322, which
        # shifts every logit by 4e-9 relative; we compare against T = 0.07 exactly.
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum], dtype=torch.float64))
        stdv = 1.0 / math.sqrt(input_size / 3)
        self.register_buffer("memory_v1", torch.rand(output_size, input_size).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(output_size, input_size).mul_(2 * stdv).add_(-stdv))

    def forward(self, v1, v2, y, idx):
        K, T = int(self.params[0].item()), self.params[1].item()
        Z_v1, Z_v2, momentum = self.params[2].item(), self.params[3].item(), self.params[4].item()
        B, N, D = v1.size(0), self.memory_v1.size(0), self.memory_v1.size(1)
        w1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach().view(B, K + 1, D)
        out_v2 = torch.exp(torch.div(torch.bmm(w1, v2.view(B, D, 1)), T))
        w2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach().view(B, K + 1, D)
        out_v1 = torch.exp(torch.div(torch.bmm(w2, v1.view(B, D, 1)), T))
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * N
            Z_v1 = self.params[2].clone().detach().item()
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * N
            Z_v2 = self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(memory, 0, y.view(-1))
                pos.mul_(momentum).add_(torch.mul(v, 1 - momentum))
                memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_v1, out_v2


def rd_contrast_loss(x, n_data, eps=1e-7):
    """RepDistiller ContrastLoss (Eq. 18)."""
    bsz, m = x.shape[0], x.size(1) - 1
    Pn = 1 / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    return -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz


class RDCRDLoss(nn.Module):
    def __init__(self, opt):
        super().__init__()
        self.n_data = opt.n_data
        self.embed_s = RDEmbed(opt.s_dim, opt.feat_dim)
        self.embed_t = RDEmbed(opt.t_dim, opt.feat_dim)
        self.contrast = RDContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)

    def forward(self, f_s, f_t, idx, contrast_idx):
        out_s, out_t = self.contrast(self.embed_s(f_s), self.embed_t(f_t), idx, contrast_idx)
        return (rd_contrast_loss(out_s, self.n_data) + rd_contrast_loss(out_t, self.n_data)).squeeze()


OPT = SimpleNamespace(s_dim=5, t_dim=7, n_data=40, feat_dim=8, nce_k=9, nce_t=0.07, nce_m=0.5)


def _crd_batch(step, B=6, opt=OPT, dtype=torch.float64, spatial=False):
    g = torch.Generator().manual_seed(100 + step)
    shape_s = (B, opt.s_dim) if not spatial else (B, opt.s_dim, 1, 1)
    f_s = torch.randn(*shape_s, generator=g, dtype=dtype).requires_grad_()
    f_t = torch.randn(B, opt.t_dim, generator=g, dtype=dtype).requires_grad_()
    idx = torch.randperm(opt.n_data, generator=g)[:B]
    neg = torch.randint(0, opt.n_data, (B, opt.nce_k), generator=g)
    return f_s, f_t, idx, torch.cat([idx[:, None], neg], dim=1)


def _sgd_(params, lr=0.5):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * p.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", _cpu_backends(with_triton=False))  # Triton: via the parity tests below
def test_crd_matches_repdistiller_for_three_steps(dtype, backend):
    torch.manual_seed(7)
    ours = CRDLoss.from_opt(OPT, backend=backend)
    torch.manual_seed(7)
    rd = RDCRDLoss(OPT)
    # Same RNG calls in the same order: identical initial state.
    assert torch.equal(ours.embed_s.weight, rd.embed_s.linear.weight)
    assert torch.equal(ours.embed_t.bias, rd.embed_t.linear.bias)
    assert torch.equal(ours.bank_s, rd.contrast.memory_v1) and torch.equal(ours.bank_t, rd.contrast.memory_v2)
    ours.to(dtype), rd.to(dtype)
    scale = 1.0 if dtype == torch.float64 else 4.0
    for step in range(3):
        f_s, f_t, idx, cidx = _crd_batch(step, dtype=dtype, spatial=step == 1)
        f_s2, f_t2 = f_s.detach().clone().requires_grad_(), f_t.detach().clone().requires_grad_()
        loss = ours(f_s, f_t, idx, cidx)
        ref = rd(f_s2, f_t2, idx, cidx)
        loss.backward(), ref.backward()
        _close(loss, ref, dtype, scale, f"loss, step {step}")
        _close(f_s.grad, f_s2.grad, dtype, scale)
        _close(f_t.grad, f_t2.grad, dtype, scale)
        for a, b in (
            (ours.embed_s.weight, rd.embed_s.linear.weight),
            (ours.embed_s.bias, rd.embed_s.linear.bias),
            (ours.embed_t.weight, rd.embed_t.linear.weight),
            (ours.embed_t.bias, rd.embed_t.linear.bias),
        ):
            _close(a.grad, b.grad, dtype, scale)
        _close(ours.bank_s, rd.contrast.memory_v1, dtype, scale)
        _close(ours.bank_t, rd.contrast.memory_v2, dtype, scale)
        _close(ours.log_z.exp(), rd.contrast.params[2:4], dtype, scale)
        _sgd_(ours.parameters()), _sgd_(rd.parameters())
        ours.zero_grad(), rd.zero_grad()


def test_crd_loads_a_repdistiller_state_and_continues_identically():
    torch.manual_seed(3)
    rd = RDCRDLoss(OPT).double()
    f_s, f_t, idx, cidx = _crd_batch(0)
    rd(f_s, f_t, idx, cidx)  # sets Z, updates the memory
    ours = CRDLoss.from_opt(OPT, backend="eager").double()
    ours.load_state_dict(rd.state_dict())  # strict: every key remapped
    assert torch.equal(ours.bank_s, rd.contrast.memory_v1)
    torch.testing.assert_close(ours.log_z, rd.contrast.params[2:4].log())
    f_s, f_t, idx, cidx = _crd_batch(1)
    torch.testing.assert_close(ours(f_s, f_t, idx, cidx), rd(f_s, f_t, idx, cidx), rtol=1e-10, atol=1e-10)
    # An unset RepDistiller Z (-1) loads as "unset".
    fresh = CRDLoss.from_opt(OPT, backend="eager")
    fresh.load_repdistiller_state_dict(RDCRDLoss(OPT).state_dict())
    assert torch.isnan(fresh.log_z).all() and not fresh.memory.log_z_is_set


def test_crd_from_opt_and_attributes():
    crd = CRDLoss.from_opt(OPT, z_momentum=0.99)
    assert isinstance(crd.embed_s, nn.Linear) and isinstance(crd.embed_t, nn.Linear)
    assert crd.bank_s.shape == (OPT.n_data, OPT.feat_dim) and crd.bank_t.shape == (OPT.n_data, OPT.feat_dim)
    assert (crd.nce_k, crd.nce_t, crd.nce_m, crd.z_momentum) == (9, 0.07, 0.5, 0.99)
    stdv = 1 / math.sqrt(OPT.feat_dim / 3)
    assert crd.bank_s.abs().max() <= stdv and torch.isnan(crd.log_z).all()
    assert {"memory.bank_s", "memory.bank_t", "memory.log_z", "memory.rng_seed", "memory.rng_offset"} <= set(
        crd.state_dict()
    )
    assert crd.memory_mode == "local" and not list(crd.buffers())  # all state in crd.memory, none a DDP buffer
    assert crd.bank_s.dtype == torch.float32
    assert CRDLoss.from_opt(OPT, bank_dtype=torch.bfloat16).bank_t.dtype == torch.bfloat16


def test_crd_in_kernel_sampling_stream_and_resume():
    torch.manual_seed(0)
    crd = CRDLoss.from_opt(OPT, backend="eager", seed=1234)
    B, K = 6, OPT.nce_k
    state0 = copy.deepcopy(crd.state_dict())
    losses = []
    for step in range(3):
        f_s, f_t, idx, _ = _crd_batch(step)
        losses.append(crd(f_s.float(), f_t.float(), idx))
        assert crd.rng_state.tolist() == [1234, (step + 1) * B * K]
    # The same steps with the explicit indices of the stream give the same losses.
    twin = CRDLoss.from_opt(OPT, backend="eager")
    twin.load_state_dict(state0)
    for step in range(3):
        f_s, f_t, idx, _ = _crd_batch(step)
        cidx = dcdkernels.sample_negatives(idx, K, OPT.n_data, seed=1234, offset=step * B * K)
        torch.testing.assert_close(twin(f_s.float(), f_t.float(), idx, cidx), losses[step])
    # Resume after step 2 from a state dict: step 3 is identical.
    resumed = CRDLoss.from_opt(OPT, backend="eager")
    crd2 = CRDLoss.from_opt(OPT, backend="eager")
    crd2.load_state_dict(state0)
    for step in range(2):
        f_s, f_t, idx, _ = _crd_batch(step)
        crd2(f_s.float(), f_t.float(), idx)
    resumed.load_state_dict(copy.deepcopy(crd2.state_dict()))
    f_s, f_t, idx, _ = _crd_batch(2)
    assert torch.equal(resumed(f_s.float(), f_t.float(), idx), losses[2])
    assert torch.equal(resumed.bank_t, crd.bank_t) and torch.equal(resumed.rng_state, crd.rng_state)


def test_crd_partition_is_first_batch_estimate_or_ema():
    torch.manual_seed(0)
    frozen = CRDLoss.from_opt(OPT, backend="eager").double()
    ema = copy.deepcopy(frozen)
    ema.z_momentum = 0.9
    f_s, f_t, idx, cidx = _crd_batch(0)
    with torch.no_grad():  # expected first-batch Z from the definition N * mean(exp(u))
        z_s, z_t = frozen.embed_s(f_s), frozen.embed_t(f_t)
        u_s = torch.einsum("bkd,bd->bk", frozen.bank_t[cidx], z_s) / OPT.nce_t
        u_t = torch.einsum("bkd,bd->bk", frozen.bank_s[cidx], z_t) / OPT.nce_t
        expected = torch.stack([(OPT.n_data * u_s.exp().mean()).log(), (OPT.n_data * u_t.exp().mean()).log()])
    frozen(f_s, f_t, idx, cidx), ema(f_s, f_t, idx, cidx)
    torch.testing.assert_close(frozen.log_z, expected)
    torch.testing.assert_close(ema.log_z, expected)
    f_s, f_t, idx, cidx = _crd_batch(1)
    with torch.no_grad():
        z_s, z_t = ema.embed_s(f_s), ema.embed_t(f_t)
        u_s = torch.einsum("bkd,bd->bk", ema.bank_t[cidx], z_s) / OPT.nce_t
        u_t = torch.einsum("bkd,bd->bk", ema.bank_s[cidx], z_t) / OPT.nce_t
        batch_z = torch.stack([OPT.n_data * u_s.exp().mean(), OPT.n_data * u_t.exp().mean()])
    before = ema.log_z.clone()
    frozen(f_s, f_t, idx, cidx), ema(f_s, f_t, idx, cidx)
    torch.testing.assert_close(frozen.log_z, expected)  # RepDistiller: frozen
    torch.testing.assert_close(ema.log_z.exp(), 0.9 * before.exp() + 0.1 * batch_z)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_crd_bf16_banks(backend):
    torch.manual_seed(0)
    half = CRDLoss.from_opt(OPT, backend=backend, bank_dtype=torch.bfloat16)
    full = CRDLoss.from_opt(OPT, backend="eager")
    full.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.state_dict().items()})
    for step in range(2):
        f_s, f_t, idx, cidx = _crd_batch(step, dtype=torch.float32)
        a = half(f_s, f_t, idx, cidx)
        b = full(f_s, f_t, idx, cidx)
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert half.bank_s.dtype == torch.bfloat16 and half.bank_t.dtype == torch.bfloat16
    torch.testing.assert_close(half.bank_t.float(), full.bank_t, rtol=1e-2, atol=1e-2)


def test_crd_eval_mode_changes_no_state():
    crd = CRDLoss.from_opt(OPT, backend="eager").double()
    f_s, f_t, idx, cidx = _crd_batch(0)
    crd.eval()
    with pytest.raises(RuntimeError, match="Z is not set"):
        crd(f_s, f_t, idx, cidx)
    crd.train()
    crd(f_s, f_t, idx, cidx)
    crd.eval()
    state = copy.deepcopy(crd.state_dict())
    crd(f_s, f_t, idx)
    assert all(torch.equal(v, crd.state_dict()[k]) for k, v in state.items() if not torch.isnan(v.float()).any())


# ----------------------------------------------------------------------------------------------
# DCD / ICD
# ----------------------------------------------------------------------------------------------
class OfficialDCD(nn.Module):
    """giakoumoglou/distillers DCDLoss (trainable=True), learnable params as ``params.tau/b``."""

    def __init__(self, s_dim, t_dim, feat_dim, max_tau=10.0, alpha=0.5):
        super().__init__()
        self.max_tau, self.alpha = max_tau, alpha
        self.params = nn.Module()
        self.params.tau = nn.Parameter(torch.tensor(1.0))
        self.params.b = nn.Parameter(torch.tensor(0.0))
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)

    def forward(self, f_s, f_t):
        f_s = F.normalize(self.embed_s(f_s), dim=1)
        f_t = F.normalize(self.embed_t(f_t), dim=1)
        tau = self.params.tau.exp().clamp(0, self.max_tau)
        logits = torch.mm(f_s, f_t.t()) * tau + self.params.b
        labels = torch.arange(f_s.size(0))
        contrastive = F.cross_entropy(logits, labels)
        p1 = F.log_softmax(logits, dim=1)
        p2 = F.softmax(logits, dim=0).t()
        return contrastive + self.alpha * F.kl_div(p1, p2, reduction="batchmean")


def _official_from(ours):
    off = OfficialDCD(OPT.s_dim, OPT.t_dim, OPT.feat_dim, alpha=ours.alpha).to(ours.log_scale.dtype)
    sd = {k: v for k, v in ours.state_dict().items() if k.startswith("embed")}
    sd["params.tau"], sd["params.b"] = ours.log_scale.detach().clone(), ours.bias.detach().clone()
    off.load_state_dict(sd)
    return off


def _dcd_batch(step, B=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(300 + step)
    return (
        torch.randn(B, OPT.s_dim, generator=g, dtype=dtype).requires_grad_(),
        torch.randn(B, OPT.t_dim, generator=g, dtype=dtype).requires_grad_(),
    )


@pytest.mark.parametrize("init_log_scale", [1.0, 2.5])  # 2.5: exp > 10, the clamp is active
def test_dcd_in_batch_matches_official(init_log_scale):
    torch.manual_seed(0)
    ours = DCDLoss(OPT.s_dim, OPT.t_dim, OPT.feat_dim, init_log_scale=init_log_scale, backend="eager").double()
    with torch.no_grad():
        ours.bias.fill_(0.3)  # the loss does not depend on it
    off = _official_from(ours)
    for step in range(2):
        f_s, f_t = _dcd_batch(step)
        f_s2, f_t2 = f_s.detach().clone().requires_grad_(), f_t.detach().clone().requires_grad_()
        loss, ref = ours(f_s, f_t), off(f_s2, f_t2)
        loss.backward(), ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f_s.grad, f_s2.grad)
        torch.testing.assert_close(f_t.grad, f_t2.grad)
        for name in ("embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"):
            torch.testing.assert_close(ours.get_parameter(name).grad, off.get_parameter(name).grad)
        torch.testing.assert_close(ours.log_scale.grad, off.params.tau.grad, atol=1e-12, rtol=1e-9)
        assert ours.bias.grad.item() == 0.0  # exact; official: rounding noise ~1e-16 in fp64
        assert abs(off.params.b.grad.item()) < 1e-12
        if init_log_scale > math.log(10):
            assert ours.log_scale.grad.item() == 0.0
        ours.zero_grad(), off.zero_grad()


def test_dcd_loads_official_and_icd_state_dicts():
    off = OfficialDCD(OPT.s_dim, OPT.t_dim, OPT.feat_dim)
    with torch.no_grad():
        off.params.tau.fill_(1.7)
    ours = DCDLoss(OPT.s_dim, OPT.t_dim, OPT.feat_dim)
    ours.load_state_dict(off.state_dict())
    assert ours.log_scale.item() == pytest.approx(1.7) and torch.equal(ours.embed_s.weight, off.embed_s.weight)
    # ICD's official heads are Embed(linear) wrappers.
    icd_sd = {
        (
            "embed_s.linear." + k[len("embed_s.") :]
            if k.startswith("embed_s.")
            else "embed_t.linear." + k[len("embed_t.") :]
            if k.startswith("embed_t.")
            else k
        ): v
        for k, v in off.state_dict().items()
    }
    icd = ICDLoss(OPT.s_dim, OPT.t_dim, OPT.feat_dim)
    icd.load_state_dict(icd_sd)
    f_s, f_t = _dcd_batch(0, dtype=torch.float32)
    torch.testing.assert_close(icd(f_s, f_t), off(f_s, f_t))


def test_icd_is_dcd_under_its_first_name():
    assert issubclass(ICDLoss, DCDLoss) and ICDLoss.__doc__ != DCDLoss.__doc__
    torch.manual_seed(0)
    a = DCDLoss(OPT.s_dim, OPT.t_dim, OPT.feat_dim, backend="eager")
    torch.manual_seed(0)
    b = ICDLoss(OPT.s_dim, OPT.t_dim, OPT.feat_dim, backend="eager")
    f_s, f_t = _dcd_batch(0, dtype=torch.float32)
    assert torch.equal(a(f_s, f_t), b(f_s, f_t))


def _perm_index(B, g):
    """(B, B): row b = [b, then the other rows in a random order]."""
    rows = []
    for b in range(B):
        others = torch.tensor([j for j in range(B) if j != b])
        rows.append(torch.cat([torch.tensor([b]), others[torch.randperm(B - 1, generator=g)]]))
    return torch.stack(rows)


def test_dcd_memory_form_with_the_batch_as_bank_equals_in_batch_form():
    B = 6
    torch.manual_seed(0)
    inb = DCDLoss(OPT.s_dim, OPT.t_dim, OPT.feat_dim, init_log_scale=1.3, backend="eager").double()
    mem = DCDLoss(OPT.s_dim, OPT.t_dim, OPT.feat_dim, n_data=B, backend="eager").double()
    mem.load_state_dict({**inb.state_dict(), "bank_s": mem.bank_s, "bank_t": mem.bank_t, "rng_state": mem.rng_state})
    f_s, f_t = _dcd_batch(0)
    with torch.no_grad():
        mem.bank_s.copy_(mem.embed_s(f_s))
        mem.bank_t.copy_(mem.embed_t(f_t))
    cidx = _perm_index(B, torch.Generator().manual_seed(0))
    loss_mem = mem(f_s, f_t, torch.arange(B), cidx)
    loss_inb = inb(f_s, f_t)
    torch.testing.assert_close(loss_mem, loss_inb, rtol=1e-12, atol=1e-12)
    # Gradients differ by design (banks are detached memories): only the anchor paths.
    loss_mem.backward()
    assert mem.bias.grad.item() == 0.0 and mem.log_scale.grad.item() != 0.0


def test_dcd_memory_form_updates_banks_after_scoring_and_samples_in_kernel():
    torch.manual_seed(0)
    mem = DCDLoss(OPT.s_dim, OPT.t_dim, OPT.feat_dim, n_data=30, nce_k=5, bank_momentum=0.5, backend="eager", seed=9)
    f_s, f_t = _dcd_batch(0, dtype=torch.float32)
    idx = torch.tensor([1, 4, 7, 8, 20, 29])
    bank_s, bank_t = mem.bank_s.clone(), mem.bank_t.clone()
    z_s, z_t = mem.embed_s(f_s), mem.embed_t(f_t)
    cidx = dcdkernels.sample_negatives(idx, 5, 30, seed=9, offset=0)
    out = dcdkernels.reference.dual_sampled_contrast(z_s, z_t, bank_s, bank_t, cidx, logit_scale=mem.logit_scale())
    expected = out[0].mean() + 0.5 * out[2].mean()
    torch.testing.assert_close(mem(f_s, f_t, idx), expected)
    dcdkernels.reference.bank_momentum_update_(bank_s, idx, z_s.detach(), 0.5)
    dcdkernels.reference.bank_momentum_update_(bank_t, idx, z_t.detach(), 0.5)
    torch.testing.assert_close(mem.bank_s, bank_s)
    torch.testing.assert_close(mem.bank_t, bank_t)
    assert mem.rng_state.tolist() == [9, 6 * 5]


# ----------------------------------------------------------------------------------------------
# CoCoRD
# ----------------------------------------------------------------------------------------------
CC = dict(embed_dim=12, hidden_dim=10, pred_dim=6, queue_size=10)


class OfficialCoCoRD(nn.Module):
    """CoCoRD builder + loop on features: EMA first, keys, logits, enqueue, then the losses."""

    def __init__(self, ours):
        super().__init__()
        self.K, self.m, self.b_m, self.T = (
            ours.queue.shape[0],
            ours.teacher_momentum,
            ours.slow_momentum,
            ours.temperature,
        )
        self.s_q_proj = copy.deepcopy(ours.projector)
        self.s_k_proj = copy.deepcopy(ours.slow_projector)
        self.t_k_proj = copy.deepcopy(ours.teacher_projector)
        self.s_q_pred = copy.deepcopy(ours.predictor)
        self.register_buffer("queue", ours.queue.t().clone())  # official layout (dim, K)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self):
        for q, k in zip(self.s_q_proj.parameters(), self.s_k_proj.parameters()):
            k.data = k.data * self.b_m + q.data * (1.0 - self.b_m)
        for q, k in zip(self.s_q_proj.parameters(), self.t_k_proj.parameters()):
            k.data = k.data * self.m + q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        B, ptr = keys.shape[0], int(self.queue_ptr)
        if ptr + B <= self.K:
            self.queue[:, ptr : ptr + B] = keys.T
        else:
            move = self.K - ptr
            self.queue[:, ptr:] = keys[:move].T
            self.queue[:, : (ptr + B) % self.K] = keys[move:].T
        self.queue_ptr[0] = (ptr + B) % self.K

    def forward(self, f_s, f_t, f_s2, f_slow, f_slow2):
        s_q = self.s_q_proj(f_s)
        s_q_norm = F.normalize(s_q, dim=1)
        s_q_2 = self.s_q_proj(f_s2)
        pred, pred_2 = self.s_q_pred(s_q), self.s_q_pred(s_q_2)
        with torch.no_grad():
            self._momentum_update()
            t_k = F.normalize(self.t_k_proj(f_t), dim=1)
            s_k, s_k_2 = self.s_k_proj(f_slow), self.s_k_proj(f_slow2)
        l_pos = torch.einsum("nc,nc->n", [s_q_norm, t_k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [s_q_norm, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        self._dequeue_and_enqueue(t_k)
        loss_ctr = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
        distill_mse = lambda x, y: 2 - 2 * (F.normalize(x, dim=-1) * F.normalize(y, dim=-1)).sum(dim=-1)  # noqa: E731
        loss_pred = (distill_mse(pred, s_k) + distill_mse(pred_2, s_k_2)).mean()
        return loss_ctr + 4.0 * loss_pred


def _cc_batch(step, B=4, s_dim=5, t_dim=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(500 + step)
    r = lambda d: torch.randn(B, d, generator=g, dtype=dtype)  # noqa: E731
    return r(s_dim).requires_grad_(), r(t_dim), r(s_dim).requires_grad_(), r(s_dim), r(s_dim)


def test_cocord_matches_official_for_three_steps():
    """Queue wraps (B=4, K=10: pointer 0, 4, 8 -> 2), EMA is non-trivial (SGD between steps)."""
    torch.manual_seed(0)
    ours = CoCoRDLoss(5, 5, **CC, backend="eager").double()
    off = OfficialCoCoRD(ours)
    for step in range(3):
        f_s, f_t, f_s2, f_slow, f_slow2 = _cc_batch(step)
        g_s, g_s2 = f_s.detach().clone().requires_grad_(), f_s2.detach().clone().requires_grad_()
        loss = ours(f_s, f_t, f_s2, f_slow, f_slow2)
        ref = off(g_s, f_t, g_s2, f_slow, f_slow2)
        loss.backward(), ref.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(f_s.grad, g_s.grad)
        torch.testing.assert_close(f_s2.grad, g_s2.grad)
        for (n, p), q in zip(
            list(ours.projector.named_parameters()) + list(ours.predictor.named_parameters()),
            list(off.s_q_proj.parameters()) + list(off.s_q_pred.parameters()),
        ):
            torch.testing.assert_close(p.grad, q.grad, msg=n)
        torch.testing.assert_close(ours.queue, off.queue.t())
        assert ours.queue_ptr.item() == off.queue_ptr.item()
        for a, b in ((ours.slow_projector, off.s_k_proj), (ours.teacher_projector, off.t_k_proj)):
            for p, q in zip(a.parameters(), b.parameters()):
                torch.testing.assert_close(p, q)
        _sgd_(list(ours.parameters())), _sgd_(list(off.parameters()))
        ours.zero_grad(), off.zero_grad()
    assert ours.queue_ptr.item() == 2


def test_cocord_teacher_dim_differs_from_student_dim():
    torch.manual_seed(0)
    ours = CoCoRDLoss(5, 9, **CC, backend="eager").double()
    first_w = ours.teacher_projector[0].weight.clone()
    assert first_w.shape == (CC["hidden_dim"], 9)
    for step in range(3):
        f_s, f_t, f_s2, f_slow, f_slow2 = _cc_batch(step, t_dim=9)
        online = [p.detach().clone() for p in ours.projector.parameters()]
        before = [p.clone() for p in ours.teacher_projector.parameters()]
        ours(f_s, f_t, f_s2, f_slow, f_slow2).backward()
        # The separate input layer stays fixed; every other teacher-head parameter is the official EMA.
        for i, (p, b, o) in enumerate(zip(ours.teacher_projector.parameters(), before, online)):
            if i == 0:
                assert torch.equal(p, b)
            else:
                torch.testing.assert_close(p, 0.999 * b + 0.001 * o)
        _sgd_(list(ours.parameters()))
        ours.zero_grad()
    assert torch.equal(ours.teacher_projector[0].weight, first_w)


def test_cocord_owns_a_slow_encoder_and_updates_it_first():
    torch.manual_seed(0)
    enc = nn.Linear(3, 5).double()
    ours = CoCoRDLoss(5, 5, **CC, student_encoder=enc, backend="eager").double()
    assert not any(p is q for p in ours.parameters() for q in enc.parameters())  # backbone not registered
    with torch.no_grad():
        enc.weight.add_(1.0)  # an optimizer step on the student
    slow_before = ours.slow_encoder.weight.clone()
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    f_s, f_t, f_s2 = enc(x1), torch.randn(4, 5, dtype=torch.float64), enc(x2)
    manual = copy.deepcopy(ours)
    loss = ours(f_s, f_t, f_s2, x_s=x1, x_s2=x2)
    new_slow = 0.9 * slow_before + 0.1 * enc.weight
    torch.testing.assert_close(ours.slow_encoder.weight, new_slow)
    manual.momentum_update()
    with torch.no_grad():
        manual.slow_encoder.weight.copy_(new_slow)
    manual._updated_this_step = True
    ref = manual(f_s, f_t, f_s2, manual.slow_encoder(x2), manual.slow_encoder(x1))
    torch.testing.assert_close(loss, ref)


def test_cocord_rejects_batches_larger_than_the_queue_and_needs_slow_features():
    ours = CoCoRDLoss(5, 5, **CC)
    f = torch.randn(11, 5)
    with pytest.raises(ValueError, match="larger than the queue"):
        ours(f, f, f, f, f)
    with pytest.raises(ValueError, match="slow student"):
        ours(f[:4], f[:4], f[:4])
    assert ours.queue_ptr.item() == 0


# ----------------------------------------------------------------------------------------------
# PCKD
# ----------------------------------------------------------------------------------------------
def _pckd_batch(step, B=8, s_dim=6, t_dim=8, C=5, dtype=torch.float64):
    """B rows = B / 4 images x 4 views (image-major), labels per image."""
    g = torch.Generator().manual_seed(700 + step)
    f_s = torch.randn(B, s_dim, generator=g, dtype=dtype).requires_grad_()
    f_t = torch.randn(B, t_dim, generator=g, dtype=dtype)
    labels = torch.randint(0, C, (B // 4,), generator=g)
    return f_s, f_t, labels


def _pckd_setup(s_dim=6, t_dim=8, C=5, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    loss = PCKDLoss(s_dim, t_dim, fa_hidden_dim=16, **kw).to(dtype)
    fc_s, fc_t = nn.Linear(s_dim, C).to(dtype), nn.Linear(t_dim, C).to(dtype)
    return loss, fc_s, fc_t


def test_pckd_preview_schedules():
    """The official schedule is checked against the authors' code in test_pckd_official.py;
    here the library's variants: the quantile schedule and the optional floor."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g) * 3
    y = torch.randint(0, 5, (16,), generator=g)
    floored = PCKDLoss(4, 4, min_weight=1e-6)
    quant = PCKDLoss(4, 4, preview="quantile", start_quantile=0.5, preview_epochs=10, hard_weight=0.25)
    ce = F.cross_entropy(logits, y, reduction="none")
    for epoch in (0, 1, 5, 10, 240):
        floored.set_epoch(epoch), quant.set_epoch(epoch)
        w_o, w_q = floored.preview_weights(logits, y), quant.preview_weights(logits, y)
        assert (w_o > 0).all() and (w_o <= 1).all() and (w_q > 0).all()
        q = 0.5 + 0.5 * min(epoch / 10, 1.0)
        torch.testing.assert_close(w_q, torch.where(ce > torch.quantile(ce, q), 0.25, 1.0))
    quant.set_epoch(0)
    assert (quant.preview_weights(logits, y) < 1).sum() == 8  # the harder half
    quant.set_epoch(10)
    assert (quant.preview_weights(logits, y) == 1).all()  # preview over
    # The epoch is saved with the state.
    floored.set_epoch(7)
    fresh = PCKDLoss(4, 4)
    fresh.load_state_dict(floored.state_dict())
    assert fresh._epoch == 7


def test_pckd_weight_tensors_and_pairs():
    loss_fn, fc_s, fc_t = _pckd_setup(s_dim=6, t_dim=6, backend="eager")
    f_s, f_t, y = _pckd_batch(0, t_dim=6)
    a = loss_fn(f_s, f_t, fc_s(f_s), fc_t(f_t), y, fc_s, fc_t)
    assert float(loss_fn.last_terms["ca"]) > 0  # equal shapes: the classifiers are aligned
    b = loss_fn(f_s, f_t, fc_s(f_s), fc_t(f_t), y, (fc_s.weight, fc_s.bias), (fc_t.weight, fc_t.bias))
    torch.testing.assert_close(a, b)
    c = loss_fn(f_s, f_t, fc_s(f_s), fc_t(f_t), y, fc_s.weight, fc_t.weight)  # no biases: L_CA on weights only
    assert torch.isfinite(c)


# ----------------------------------------------------------------------------------------------
# Fused vs eager parity: loss, every gradient, every buffer, over 3 steps
# ----------------------------------------------------------------------------------------------
def _dev(module):
    return next(module.parameters()).device


def _crd_factory(backend, sampled):
    torch.manual_seed(11)
    m = CRDLoss(5, 7, 40, feat_dim=8, nce_k=9, backend=backend, seed=5)

    def step(m, i):
        f_s, f_t, idx, cidx = _crd_batch(i, dtype=torch.float32)
        d = _dev(m)
        return m(f_s.to(d), f_t.to(d), idx.to(d), None if sampled else cidx.to(d)), (f_s, f_t)

    return m, step


def _dcd_factory(backend, memory):
    torch.manual_seed(12)
    kw = dict(n_data=40, nce_k=9, seed=5) if memory else {}
    m = DCDLoss(5, 7, feat_dim=8, init_log_scale=1.2, backend=backend, **kw)

    def step(m, i):
        f_s, f_t, idx, cidx = _crd_batch(i, dtype=torch.float32)
        d = _dev(m)
        return m(f_s.to(d), f_t.to(d), idx.to(d), cidx.to(d) if (memory and i == 1) else None), (f_s, f_t)

    return m, step


def _cocord_factory(backend, t_dim):
    torch.manual_seed(13)
    m = CoCoRDLoss(5, t_dim, **CC, backend=backend)

    def step(m, i):
        batch = _cc_batch(i, t_dim=t_dim, dtype=torch.float32)
        return m(*(x.to(_dev(m)) for x in batch)), (batch[0], batch[2])

    return m, step


def _pckd_factory(backend, preview):
    torch.manual_seed(14)
    m = PCKDLoss(6, 8, fa_hidden_dim=16, preview=preview, backend=backend)
    fcs = [nn.Linear(6, 5), nn.Linear(8, 5)]
    m.fc_holder = nn.ModuleList(fcs)  # so the classifier gradients are compared as parameters

    def step(m, i):
        m.set_epoch(i)
        f_s0, f_t, y = _pckd_batch(i, dtype=torch.float32)
        d = _dev(m)
        f_s, f_t, y = f_s0.to(d), f_t.to(d), y.to(d)
        fc_s, fc_t = m.fc_holder
        return m(f_s, f_t, fc_s(f_s), fc_t(f_t), y, fc_s, fc_t), (f_s0,)

    return m, step


FACTORIES = {
    "crd-explicit": lambda be: _crd_factory(be, False),
    "crd-sampled": lambda be: _crd_factory(be, True),
    "dcd-in-batch": lambda be: _dcd_factory(be, False),
    "dcd-memory": lambda be: _dcd_factory(be, True),
    "cocord": lambda be: _cocord_factory(be, 5),
    "cocord-t-dim-differs": lambda be: _cocord_factory(be, 9),
    "pckd-official": lambda be: _pckd_factory(be, "official"),
    "pckd-quantile": lambda be: _pckd_factory(be, "quantile"),
}


def _trajectory(factory, backend, device):
    module, step = factory(backend)
    module.to(device)
    out = []
    for i in range(3):
        module.zero_grad(set_to_none=True)
        loss, inputs = step(module, i)
        loss.backward()
        grads = {n: p.grad.detach().cpu().clone() for n, p in module.named_parameters() if p.grad is not None}
        grads.update({f"input{j}": x.grad.detach().cpu().clone() for j, x in enumerate(inputs) if x.grad is not None})
        _sgd_(module.parameters(), lr=0.2)
        out.append((loss.detach().cpu(), grads, {n: b.detach().cpu().clone() for n, b in module.named_buffers()}))
    return out


@pytest.mark.parametrize("method", list(FACTORIES))
@pytest.mark.parametrize(
    "device, backend",
    [
        pytest.param(*p.values, marks=[*p.marks, pytest.mark.triton], id=p.id) if p.values[1] == "triton" else p
        for p in backend_params()
    ],
)
def test_fused_backend_matches_eager(method, device, backend):
    ref = _trajectory(FACTORIES[method], "eager", device)
    got = _trajectory(FACTORIES[method], backend, device)
    for i, ((l_ref, g_ref, b_ref), (l_got, g_got, b_got)) in enumerate(zip(ref, got)):
        _close(l_got, l_ref, msg=f"{method} loss at step {i}")
        assert g_got.keys() == g_ref.keys()
        for name in g_ref:
            _close(g_got[name], g_ref[name], scale=2.0, msg=f"{method} grad {name} at step {i}")
        assert b_got.keys() == b_ref.keys()
        for name in b_ref:
            if b_ref[name].is_floating_point():
                _close(b_got[name], b_ref[name], scale=2.0, msg=f"{method} buffer {name} at step {i}")
            else:
                assert torch.equal(b_got[name], b_ref[name]), f"{method} buffer {name} at step {i}"


# ----------------------------------------------------------------------------------------------
# Autocast: heads in bf16, loss math in fp32, state untouched in dtype
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["crd-explicit", "dcd-in-batch", "dcd-memory", "cocord", "pckd-official"])
def test_losses_run_under_cpu_autocast_bf16(method):
    module, step = FACTORIES[method]("eager")
    ref_module = copy.deepcopy(module)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, inputs = step(module, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    assert all(b.dtype == rb.dtype for b, rb in zip(module.buffers(), ref_module.buffers()))
    ref, _ = step(ref_module, 0)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=5e-2, atol=5e-2)
