"""Op benchmarks: one forward + backward step of each fused op against the user-style eager code
(``benchmarks/baselines.py``) and ``torch.compile`` of it, at the sizes of ``benchmarks/sizes.py``.

* ``sampled_contrast``: ``nce`` (RepDistiller CRD, one bank, explicit (B, K+1) index),
  ``nce-sampler`` (negatives drawn each step: RepDistiller's AliasMethod + gather vs the
  in-kernel counter-based sampler) and ``infonce`` (gather + bmm + cross-entropy, learnable
  scale and bias).
* ``dual_sampled_contrast``: ``nce`` (both CRD directions) and ``infonce-kl`` (DCD memory form:
  CE + 0.5 KL).
* ``dense_contrast``: ``queue`` (MoCo: positive key + queue; also lightly's NTXent memory bank as
  ``eager-lightly``) and ``keys-grad`` (target column, keys require grad: DCD in-batch, PCKD; the
  fused call is ``reduction="mean"``, which computes every gradient in its forward pass).
* ``supcon_contrast``: B anchors against themselves with labels (SupCon) vs SupContrast's
  ``SupConLoss`` (``eager``, transcribed in ``baselines.py``) and pytorch-metric-learning's
  ``SupConLoss`` (``eager-pml``; skipped when the optional package is not installed).
* ``bank_momentum_update_``: RepDistiller's index_select/mul/add/normalise/index_copy_ (no
  backward: it is an in-place buffer update).

The bank dtype (fp32, bf16) is a parameter; anchors are fp32. No assertion here is about time:
speed is a ratio of rows of the same run (``benchmarks/report.py``). A few plain tests check
that each baseline computes the same loss as the library's oracle, so the comparison is fair.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import dcdkernels
from benchmarks import baselines as BL
from benchmarks import sizes as S
from benchmarks.harness import CFG, DTYPES, ELEM, compiled, grad_step

T = 0.07


def _unit(*shape, dtype=torch.float32, requires_grad=False):
    x = F.normalize(torch.randn(*shape, device=CFG.device), dim=-1).to(dtype)
    return x.requires_grad_(requires_grad)


def _sampled_inputs(size, dtype, dual=False):
    g = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(size.N, (size.B, size.K + 1), generator=g).to(CFG.device)
    banks = [_unit(size.N, size.D, dtype=DTYPES[dtype]) for _ in range(2 if dual else 1)]
    anchors = [_unit(size.B, size.D, requires_grad=True) for _ in range(2 if dual else 1)]
    return idx, banks, anchors


def pick_step(provider, eager, fused):
    """The step ``provider`` times: the eager baseline, ``torch.compile`` of it, or the fused call."""
    if provider == "eager":
        return eager
    return compiled(eager) if provider == "compile" else fused


def nce_steps(q, bank, idx, Z, provider):
    """(eager, fused) of CRD's NCE over one bank with an explicit (B, K+1) index: RepDistiller's
    code at partition Z, and ``sampled_contrast(loss="nce")`` on ``provider``."""
    log_z = math.log(Z)

    def eager():
        return BL.crd_nce_sampled(q, bank, idx, T, Z)

    def fused():
        return dcdkernels.sampled_contrast(
            q, bank, idx, logit_scale=1 / T, loss="nce", log_z=log_z, backend=provider
        ).mean()

    return eager, fused


def _eager_gather_bytes(size, dtype, banks=1):
    """Dominant eager transient: the (B, K+1, D) gather per bank (+ its fp32 cast for bf16)."""
    n = size.B * (size.K + 1) * size.D
    return banks * n * (ELEM[dtype] + (4 if dtype != "fp32" else 0))


def _analytic(provider, size, dtype, banks=1, anchors=1):
    if provider.startswith("eager"):
        return _eager_gather_bytes(size, dtype, banks), "eager: B(K+1)D gather per bank (+ fp32 cast of bf16 rows)"
    if provider in ("cpu", "triton", "cuda"):
        return anchors * size.B * size.D * 4, "fused: the (B, D) fp32 anchor gradients only"
    return None, ""


# ---------------------------------------------------------------------------------------------
# sampled_contrast
# ---------------------------------------------------------------------------------------------
@pytest.mark.bench(table=S.SAMPLED, ops=["sampled_contrast"], cases=["nce", "nce-sampler", "infonce"])
def test_sampled_contrast(bench, case, size, dtype, provider):
    idx, (bank,), (q,) = _sampled_inputs(size, dtype)
    pos = idx[:, 0].contiguous()
    if case.startswith("nce"):
        Z = BL.repdistiller_first_z(q.detach(), bank, idx, T)
        if case == "nce":
            eager, fused = nce_steps(q, bank, idx, Z, provider)
        else:
            sampler = BL.AliasMethod(size.N, CFG.device)
            log_z = math.log(Z)

            def eager():  # RepDistiller's ImageNet path: draw B(K+1), overwrite column 0, score
                draw = sampler.draw(size.B * (size.K + 1)).view(size.B, -1)
                draw.select(1, 0).copy_(pos)
                return BL.crd_nce_sampled(q, bank, draw, T, Z)

            def fused():
                return dcdkernels.sampled_contrast(
                    q,
                    bank,
                    pos,
                    num_negatives=size.K,
                    seed=1,
                    offset=0,
                    logit_scale=1 / T,
                    loss="nce",
                    log_z=log_z,
                    backend=provider,
                ).mean()

        leaves = [q]
    else:
        s = torch.tensor(1 / T, device=CFG.device, requires_grad=True)
        b = torch.tensor(0.0, device=CFG.device, requires_grad=True)

        def eager():
            return BL.infonce_sampled(q, bank, idx, s, b)

        def fused():
            return dcdkernels.sampled_contrast(q, bank, idx, logit_scale=s, bias=b, backend=provider).mean()

        leaves = [q, s, b]
    fn = pick_step(provider, eager, fused)
    nbytes, note = _analytic(provider, size, dtype)
    bench.run(
        grad_step(fn, leaves),
        family="ops",
        op="sampled_contrast",
        case=case,
        size=size,
        dtype=dtype,
        provider=provider,
        bytes_read=size.gather_bytes(ELEM[dtype]),
        analytic_bytes=nbytes,
        analytic_note=note,
    )


# ---------------------------------------------------------------------------------------------
# dual_sampled_contrast
# ---------------------------------------------------------------------------------------------
@pytest.mark.bench(table=S.SAMPLED, ops=["dual_sampled_contrast"], cases=["nce", "infonce-kl"])
def test_dual_sampled_contrast(bench, case, size, dtype, provider):
    idx, (bank_s, bank_t), (z_s, z_t) = _sampled_inputs(size, dtype, dual=True)
    if case == "nce":
        Z_s = BL.repdistiller_first_z(z_s.detach(), bank_t, idx, T)
        Z_t = BL.repdistiller_first_z(z_t.detach(), bank_s, idx, T)

        def eager():
            return BL.crd_nce_dual(z_s, z_t, bank_s, bank_t, idx, T, Z_s, Z_t)

        def fused():
            out = dcdkernels.dual_sampled_contrast(
                z_s,
                z_t,
                bank_s,
                bank_t,
                idx,
                logit_scale=1 / T,
                loss="nce",
                log_z=(math.log(Z_s), math.log(Z_t)),
                backend=provider,
            )
            return out.loss_s.mean() + out.loss_t.mean()

        leaves = [z_s, z_t]
    else:
        s = torch.tensor(math.e, device=CFG.device, requires_grad=True)
        b = torch.tensor(0.0, device=CFG.device, requires_grad=True)

        def eager():
            return BL.dcd_memory_dual(z_s, z_t, bank_s, bank_t, idx, s, b, 0.5)

        def fused():
            out = dcdkernels.dual_sampled_contrast(
                z_s, z_t, bank_s, bank_t, idx, logit_scale=s, bias=b, loss="infonce", consistency=0.5, backend=provider
            )
            return out.loss_s.mean() + out.consistency.mean()

        leaves = [z_s, z_t, s, b]
    fn = pick_step(provider, eager, fused)
    nbytes, note = _analytic(provider, size, dtype, banks=2, anchors=2)
    bench.run(
        grad_step(fn, leaves),
        family="ops",
        op="dual_sampled_contrast",
        case=case,
        size=size,
        dtype=dtype,
        provider=provider,
        bytes_read=2 * size.gather_bytes(ELEM[dtype]),
        analytic_bytes=nbytes,
        analytic_note=note,
    )


# ---------------------------------------------------------------------------------------------
# dense_contrast
# ---------------------------------------------------------------------------------------------
def _dense_sizes(case):
    return (S.DENSE_QUEUE if case == "queue" else S.DENSE_KEYS_GRAD)[CFG.size_set]


def _dense_providers(case):
    base = ["eager", "compile", "cpu", "triton", "cuda"]
    return base[:1] + ["eager-lightly"] + base[1:] if case == "queue" else base


def _dense_ops(case):
    return ["dense_contrast_reduced"] if case == "keys-grad" else ["dense_contrast"]


@pytest.mark.bench(
    table={k: _dense_sizes for k in S.SIZE_SETS},
    ops=_dense_ops,
    cases=["queue", "keys-grad"],
    providers=_dense_providers,
)
def test_dense_contrast(bench, case, size, dtype, provider):
    dt, e = DTYPES[dtype], ELEM[dtype]
    q = _unit(size.B, size.D, requires_grad=True)
    if case == "queue":
        Tq = 0.1 if size.D >= 1024 else 0.2  # CoCoRD T = 0.1; MoCo v2 T = 0.2
        k = _unit(size.B, size.D)
        keys = _unit(size.M, size.D, dtype=dt)
        queue_dm = keys.t().contiguous()  # MoCo / lightly keep the queue as (D, K)

        def eager():
            return BL.moco_infonce(q, k, queue_dm, Tq)

        def eager_lightly():
            return BL.lightly_ntxent_memory(q, k, queue_dm, Tq)

        def fused():
            return dcdkernels.dense_contrast(q, keys, positive=k, logit_scale=1 / Tq, backend=provider).mean()

        leaves = [q]
        clone = size.M * size.D * (e + (4 if dtype != "fp32" else 0))
        logits = 3 * size.B * (size.M + 1) * 4
        analytic = {
            "eager": (clone + logits, "MoCo: queue.clone() (+ fp32 cast) + ~3 (B, M+1) fp32 logits buffers"),
            "eager-lightly": (clone + logits, "lightly: bank.clone() (+ fp32 cast) + ~3 (B, M+1) fp32 logits"),
        }
        analytic_fused = (size.B * size.D * 4, "fused: the (B, D) fp32 anchor gradient only")
        bytes_read = size.keys_bytes(e)
    else:
        target = torch.randint(size.M, (size.B,), device=CFG.device)
        keys = _unit(size.M, size.D, dtype=dt, requires_grad=True)
        s = torch.tensor(1 / T, device=CFG.device, requires_grad=True)
        b = torch.tensor(0.0, device=CFG.device, requires_grad=True)

        def eager():
            return BL.dense_ce(q, keys, target, s, b)

        eager_lightly = None

        def fused():
            return dcdkernels.dense_contrast(q, keys, target, logit_scale=s, bias=b, reduction="mean", backend=provider)

        leaves = [q, keys, s, b]
        grads = (size.B + size.M) * size.D * 4
        analytic = {
            "eager": (3 * size.B * size.M * 4 + grads, "~3 (B, M) fp32 logits buffers + fp32 grads of q and keys")
        }
        analytic_fused = (grads, "fused: fp32 grads of q and keys only")
        bytes_read = 2 * size.keys_bytes(e)  # keys are read in the forward and in the key-gradient pass
    fn = eager_lightly if provider == "eager-lightly" else pick_step(provider, eager, fused)
    nbytes, note = analytic.get(provider, analytic_fused if provider in ("cpu", "triton", "cuda") else (None, ""))
    bench.run(
        grad_step(fn, leaves),
        family="ops",
        op="dense_contrast",
        case=case,
        size=size,
        dtype=dtype,
        provider=provider,
        bytes_read=bytes_read,
        analytic_bytes=nbytes,
        analytic_note=note,
    )


# ---------------------------------------------------------------------------------------------
# supcon_contrast
# ---------------------------------------------------------------------------------------------
def _pml_supcon():
    try:
        from pytorch_metric_learning.losses import SupConLoss
    except ImportError:
        return None
    return SupConLoss


@pytest.mark.bench(
    table=S.SUPCON,
    ops=["supcon_contrast"],
    dtypes=["fp32"],
    providers=("eager", "eager-pml", "compile", "cpu", "triton", "cuda"),
)
def test_supcon_contrast(bench, case, size, dtype, provider):
    g = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(S.SUPCON_CLASSES, (size.B,), generator=g).to(CFG.device)
    q = _unit(size.B, size.D, requires_grad=True)
    if provider == "eager-pml":
        cls = _pml_supcon()
        if cls is None:
            pytest.skip("pytorch-metric-learning is not installed (optional: pip install pytorch-metric-learning)")
        pml = cls(temperature=T)

        def fn():
            return pml(q, labels)
    else:

        def eager():
            return BL.supcontrast_supcon(q[:, None], labels, T, T)

        def fused():
            return dcdkernels.supcon_contrast(q, labels, logit_scale=1 / T, reduction="mean", backend=provider)

        fn = pick_step(provider, eager, fused)
    if provider.startswith("eager"):
        nbytes, note = 6 * size.B * size.B * 4, "~6 (B, B) fp32 buffers: logits, masks, exp, log_prob"
    elif provider in ("cpu", "triton", "cuda"):
        nbytes, note = size.B * size.D * 4, "fused: the (B, D) fp32 anchor gradient (+ per-row stats)"
    else:
        nbytes, note = None, ""
    bench.run(
        grad_step(fn, [q]),
        family="ops",
        op="supcon_contrast",
        case=case,
        size=size,
        dtype=dtype,
        provider=provider,
        bytes_read=2 * size.B * size.D * 4,
        analytic_bytes=nbytes,
        analytic_note=note,
    )


def test_supcon_baselines_match_oracle():
    torch.manual_seed(0)
    B, D = 24, 16
    q = _unit(B, D)
    y = torch.randint(5, (B,), device=CFG.device)
    ours = dcdkernels.reference.supcon_contrast(q, y, logit_scale=1 / T, eps=0.0).mean()
    torch.testing.assert_close(BL.supcontrast_supcon(q[:, None], y, T, T), ours, rtol=1e-5, atol=1e-5)
    cls = _pml_supcon()
    if cls is None:
        pytest.skip("pytorch-metric-learning is not installed (optional)")
    # PML normalises the embeddings (unit already) and averages the non-zero rows (every row has a
    # positive here, so all of them)
    torch.testing.assert_close(cls(temperature=T)(q, y), ours, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bank_momentum_update_
# ---------------------------------------------------------------------------------------------
@pytest.mark.bench(table=S.UPDATE, ops=["bank_momentum_update_"])
def test_bank_update(bench, case, size, dtype, provider):
    bank = _unit(size.N, size.D, dtype=DTYPES[dtype])
    y = torch.randperm(size.N, device=CFG.device)[: size.B]  # a batch's dataset rows are distinct
    v = _unit(size.B, size.D)

    def eager():
        BL.repdistiller_memory_update_(bank, y, v, 0.5)

    def fused():
        dcdkernels.bank_momentum_update_(bank, y, v, 0.5, backend=provider)

    fn = pick_step(provider, eager, fused)
    e = ELEM[dtype]
    if provider == "eager":
        nbytes, note = 4 * size.B * size.D * 4, "RepDistiller: ~4 (B, D) temporaries (index_select, mul, norm, div)"
    elif provider in ("cpu", "triton", "cuda"):
        nbytes, note = 0, "fused: in place, no temporaries"
    else:
        nbytes, note = None, ""
    bench.run(
        fn,
        family="ops",
        op="bank_momentum_update_",
        case=case,
        size=size,
        dtype=dtype,
        provider=provider,
        bytes_read=size.B * size.D * (2 * e + 4),
        analytic_bytes=nbytes,
        analytic_note=note,
    )


# ---------------------------------------------------------------------------------------------
# the baselines compute what the library computes (plain tests, smoke-sized)
# ---------------------------------------------------------------------------------------------
def test_baselines_match_oracle():
    torch.manual_seed(0)
    dev = CFG.device
    B, K, N, D = 4, 9, 40, 16
    q, qt = _unit(B, D, requires_grad=True), _unit(B, D, requires_grad=True)
    bank_s, bank_t = _unit(N, D), _unit(N, D)
    idx = torch.randint(N, (B, K + 1), device=dev)
    ref = dcdkernels.reference
    # CRD NCE, one bank and both
    Z = BL.repdistiller_first_z(q.detach(), bank_t, idx, T)
    ours = ref.sampled_contrast(q, bank_t, idx, logit_scale=1 / T, loss="nce", log_z=math.log(Z))[0].mean()
    torch.testing.assert_close(BL.crd_nce_sampled(q, bank_t, idx, T, Z), ours, rtol=1e-4, atol=1e-4)
    Zt = BL.repdistiller_first_z(qt.detach(), bank_s, idx, T)
    ls, lt, _, _, _ = ref.dual_sampled_contrast(
        q, qt, bank_s, bank_t, idx, logit_scale=1 / T, loss="nce", log_z=(math.log(Z), math.log(Zt)), compute_kl=False
    )
    torch.testing.assert_close(
        BL.crd_nce_dual(q, qt, bank_s, bank_t, idx, T, Z, Zt), ls.mean() + lt.mean(), rtol=1e-4, atol=1e-4
    )
    # InfoNCE over sampled rows, DCD memory form
    s, b = torch.tensor(2.5), torch.tensor(0.3)
    ours = ref.sampled_contrast(q, bank_t, idx, logit_scale=s, bias=b)[0].mean()
    torch.testing.assert_close(BL.infonce_sampled(q, bank_t, idx, s, b), ours)
    ls, _, kl, _, _ = ref.dual_sampled_contrast(q, qt, bank_s, bank_t, idx, logit_scale=s, bias=b)
    torch.testing.assert_close(BL.dcd_memory_dual(q, qt, bank_s, bank_t, idx, s, b, 0.5), ls.mean() + 0.5 * kl.mean())
    # Dense: MoCo, lightly, plain CE
    k, keys = _unit(B, D), _unit(N, D)
    ours = ref.dense_contrast(q, keys, positive=k, logit_scale=1 / 0.2)[0].mean()
    torch.testing.assert_close(BL.moco_infonce(q, k, keys.t().contiguous(), 0.2), ours)
    torch.testing.assert_close(BL.lightly_ntxent_memory(q, k, keys.t().contiguous(), 0.2), ours)
    target = torch.randint(N, (B,), device=dev)
    ours = ref.dense_contrast(q, keys, target, logit_scale=s, bias=b)[0].mean()
    torch.testing.assert_close(BL.dense_ce(q, keys, target, s, b), ours)
    # Bank update (distinct rows)
    y = torch.randperm(N, device=dev)[:B]
    v = _unit(B, D)
    a, c = bank_s.clone(), bank_s.clone()
    BL.repdistiller_memory_update_(a, y, v, 0.5)
    ref.bank_momentum_update_(c, y, v, 0.5)
    torch.testing.assert_close(a, c)
