"""The loss modules' memory state (issue 13, issue 15 classes 5-7): every input is validated before
the first state change (log Z and its "set" flag, banks, stream, queue and pointer, EMA heads,
BatchNorm statistics, loaded state), deferred-mode failures leave the state as it was, rejected
state dicts change nothing, and every older state-dict layout loads."""

import copy

import pytest
import torch

import dcdkernels
from dcdkernels import CoCoRDLoss, CRDLoss, DCDLoss
from dcdkernels.ops import _validate as V

N, S_DIM, T_DIM, FEAT, K, B = 30, 10, 12, 8, 5, 4


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(torch.nan_to_num(after[k]), torch.nan_to_num(v)), k


def crd(**kw):
    torch.manual_seed(0)
    return CRDLoss(S_DIM, T_DIM, N, FEAT, nce_k=K, backend="eager", seed=3, **kw)


def batch(step=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    idx = torch.randperm(N, generator=g)[:B]
    cidx = torch.cat([idx[:, None], torch.randint(0, N, (B, K), generator=g)], 1)
    return torch.randn(B, S_DIM, generator=g, dtype=dtype), torch.randn(B, T_DIM, generator=g, dtype=dtype), idx, cidx


# ------------------------------------------------------------------------------------- validation first
@pytest.mark.parametrize("with_cidx", [True, False])
def test_crd_bad_idx_changes_nothing(with_cidx):
    for z_set in (False, True):
        loss = crd(z_momentum=0.5)
        if z_set:
            f_s, f_t, idx, cidx = batch(0)
            loss(f_s, f_t, idx, cidx if with_cidx else None)
        before, flag, stream = snapshot(loss), loss.memory.log_z_is_set, loss.memory.rng_state()
        f_s, f_t, idx, cidx = batch(1)
        bad = idx.clone()
        bad[1] = N  # out of range (the explicit contrast_idx stays valid)
        with pytest.raises(ValueError, match="out of range"):
            loss(f_s, f_t, bad, cidx if with_cidx else None)
        with pytest.raises(TypeError, match="idx must be int64"):
            loss(f_s, f_t, idx.float(), cidx if with_cidx else None)
        with pytest.raises(ValueError, match="non-finite"):
            loss(torch.full_like(f_s, float("nan")), f_t, idx, cidx if with_cidx else None)
        assert_unchanged(loss, before)
        assert loss.memory.log_z_is_set == flag and loss.memory.rng_state() == stream


def test_dcd_memory_bad_idx_changes_nothing():
    torch.manual_seed(0)
    loss = DCDLoss(S_DIM, T_DIM, FEAT, n_data=N, nce_k=K, backend="eager", seed=1)
    f_s, f_t, idx, cidx = batch(0)
    loss(f_s, f_t, idx)
    before, stream = snapshot(loss), loss.memory.rng_state()
    bad = idx.clone()
    bad[0] = -1
    with pytest.raises(ValueError, match="out of range"):
        loss(f_s, f_t, bad, cidx)
    with pytest.raises(ValueError, match="contrast_idx"):
        loss(f_s, f_t, idx, cidx[:, 0])
    assert_unchanged(loss, before)
    assert loss.memory.rng_state() == stream


def cocord(**kw):
    torch.manual_seed(0)
    return CoCoRDLoss(S_DIM, T_DIM, embed_dim=FEAT, hidden_dim=16, pred_dim=8, queue_size=12, backend="eager", **kw)


def cocord_batch(step=0):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(B, d, generator=g) for d in (S_DIM, T_DIM, S_DIM, S_DIM, S_DIM)]


def test_cocord_nan_features_change_nothing():
    loss = cocord()
    loss(*cocord_batch(0))
    before = snapshot(loss)  # heads, EMA copies, BatchNorm running statistics, queue, pointer
    params = {k: p.detach().clone() for k, p in loss.named_parameters()}
    for pos in range(5):
        feats = cocord_batch(1)
        feats[pos][0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            loss(*feats)
    feats = cocord_batch(1)
    with pytest.raises(ValueError, match="larger than the queue"):
        loss(*[torch.cat([f] * 4) for f in feats])
    assert_unchanged(loss, before)
    for k, p in loss.named_parameters():
        assert torch.equal(p, params[k]), k
    assert loss.memory.pointer == B


def test_deferred_failures_leave_log_z_and_pointer(monkeypatch):
    """Deferred checks (the CUDA default; forced here on CPU with the Triton interpreter): the call
    that sets log Z is checked at once; a later failing call is reported afterwards, its log Z
    EMA and bank rows discarded on the device; the queue's pointer never moves on a bad call."""
    if not dcdkernels.availability().get("triton", (False,))[0]:
        pytest.skip("the Triton backend is not available")
    dcdkernels.set_value_checks("deferred")
    try:
        loss = CRDLoss(S_DIM, T_DIM, N, FEAT, nce_k=K, backend="triton", seed=3, z_momentum=0.5)
        f_s, f_t, idx, cidx = batch(0)
        bad = idx.clone()
        bad[0] = N
        with pytest.raises(ValueError, match="out of range"):  # first batch: never deferred
            loss(f_s, f_t, bad, cidx)
        assert not loss.memory.log_z_is_set and torch.isnan(loss.log_z).all()
        loss(f_s, f_t, idx, cidx)
        V.check_errors()
        before = snapshot(loss)
        f_s, f_t, idx, cidx = batch(1)
        cbad = cidx.clone()
        cbad[0, 2] = N
        raised = 0
        for _ in range(2):  # on CPU a deferred flag lands at once: the next check (maybe in this call) raises
            try:
                loss(f_s, f_t, idx, cbad) if raised == 0 else V.check_errors()
            except ValueError as exc:
                raised += 1
                assert "out of range" in str(exc)
        assert raised >= 1
        assert loss.memory.log_z_is_set
        for key in ("memory.log_z", "memory.bank_s", "memory.bank_t"):
            assert torch.equal(loss.state_dict()[key], before[key]), key
        q = cocord()
        feats = cocord_batch(0)
        feats[1][0, 0] = float("inf")
        with pytest.raises(ValueError, match="non-finite"):
            q(*feats)
        assert q.memory.pointer == 0 and int(q.queue_ptr) == 0
    finally:
        dcdkernels.set_value_checks("auto")
        V.check_errors()


# ------------------------------------------------------------------------------------- loading
def test_rejected_state_dict_changes_nothing():
    loss = crd()
    loss(*batch(0))
    before = snapshot(loss)
    torch.manual_seed(1)
    other_n = CRDLoss(S_DIM, T_DIM, N + 1, FEAT, nce_k=K, backend="eager").state_dict()
    other_d = CRDLoss(S_DIM, T_DIM, N, FEAT + 2, nce_k=K, backend="eager").state_dict()
    for sd in (other_n, other_d):
        with pytest.raises(RuntimeError, match="shape"):
            loss.load_state_dict(sd)
        assert_unchanged(loss, before)  # the heads (loaded first by torch) too
    q = cocord()
    q(*cocord_batch(0))
    qbefore = snapshot(q)
    sd = copy.deepcopy(q.state_dict())
    sd["memory.queue_ptr"] = torch.tensor(12)
    sd["projector.0.weight"].zero_()
    with pytest.raises(RuntimeError, match="outside"):
        q.load_state_dict(sd)
    assert_unchanged(q, qbefore)
    assert q.memory.pointer == B


def test_crd_former_keys_load():
    """This library's former CRDLoss layout (``bank_s``, ``bank_t``, ``log_z``, ``rng_state``),
    written by hand as the former code saved it, loads and continues identically."""
    a = crd(z_momentum=0.5)
    f_s, f_t, idx, _ = batch(0)
    a(f_s, f_t, idx)
    new = a.state_dict()
    former = {k: v.clone() for k, v in new.items() if k.startswith("embed_")}
    former.update(
        bank_s=new["memory.bank_s"].clone(),
        bank_t=new["memory.bank_t"].clone(),
        log_z=new["memory.log_z"].clone(),
        rng_state=torch.tensor([int(new["memory.rng_seed"]), int(new["memory.rng_offset"])]),
    )
    b = crd(z_momentum=0.5, bank_init="uniform")
    b.memory.set_rng_state(77, 1)
    b.load_state_dict(former)  # strict
    assert_unchanged(b, snapshot(a))
    assert b.memory.log_z_is_set and b.memory.rng_state() == a.memory.rng_state()
    f_s, f_t, idx, _ = batch(1)
    assert torch.equal(a(f_s, f_t, idx), b(f_s, f_t, idx))
    assert_unchanged(b, snapshot(a))


def test_dcd_former_and_official_keys_load():
    torch.manual_seed(0)
    a = DCDLoss(S_DIM, T_DIM, FEAT, n_data=N, nce_k=K, backend="eager", seed=2)
    a(*batch(0)[:3])
    new = a.state_dict()
    # the former memory-form keys, with the official names of the heads and parameters
    former = {
        k.replace("embed_s.", "embed_s.linear.").replace("embed_t.", "embed_t.linear."): v.clone()
        for k, v in new.items()
        if k.startswith("embed_")
    }
    former.update(
        {
            "params.tau": new["log_scale"].clone(),
            "params.b": new["bias"].clone(),
            "bank_s": new["memory.bank_s"].clone(),
            "bank_t": new["memory.bank_t"].clone(),
            "rng_state": torch.tensor(list(a.memory.rng_state())),
        }
    )
    torch.manual_seed(5)
    b = DCDLoss(S_DIM, T_DIM, FEAT, n_data=N, nce_k=K, backend="eager", seed=9)
    b.load_state_dict(former)
    assert_unchanged(b, snapshot(a))
    f_s, f_t, idx, _ = batch(1)
    assert torch.equal(a(f_s, f_t, idx), b(f_s, f_t, idx))


def test_cocord_former_keys_load():
    a = cocord()
    a(*cocord_batch(0))
    new = a.state_dict()
    former = {k: v.clone() for k, v in new.items() if not k.startswith("memory.")}
    former["queue"] = new["memory.queue"].clone()
    former["queue_ptr"] = new["memory.queue_ptr"].reshape(1).clone()  # the former (1,) pointer
    torch.manual_seed(4)
    b = CoCoRDLoss(S_DIM, T_DIM, embed_dim=FEAT, hidden_dim=16, pred_dim=8, queue_size=12, backend="eager")
    b.load_state_dict(former)
    assert_unchanged(b, snapshot(a))
    assert b.memory.pointer == a.memory.pointer == B
    feats = cocord_batch(1)
    assert torch.equal(a(*feats), b(*feats))
    assert torch.equal(a.queue, b.queue)


def test_memory_modes_and_ddp_buffers():
    for module in (crd(), cocord(), DCDLoss(S_DIM, T_DIM, FEAT, n_data=N, nce_k=K)):
        assert module.memory_mode == "local"
        # no memory state is a buffer, so DistributedDataParallel's broadcasts never touch it
        assert not [n for n, _ in module.named_buffers() if n.startswith("memory.")]
    with pytest.raises(ValueError, match="memory_mode"):
        crd(memory_mode="global")
    with pytest.raises(RuntimeError, match="init_process_group"):
        crd(memory_mode="sharded")
    with pytest.raises(ValueError, match="holds no memory"):
        DCDLoss(S_DIM, T_DIM, FEAT, memory_mode="replicated")
