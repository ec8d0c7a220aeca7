"""Scaling sweeps of the core op (sampled NCE, one bank, forward + backward) over K and over B.

What the sweeps show (``benchmarks/report.py`` fits them; nothing here asserts on time):
* fused time grows linearly in B*K (one read of each gathered row): exponent ~ 1, R^2 ~ 1;
* fused transient memory is flat in K: no (B, K+1, D) gather and no (B, K+1) logits;
* eager transient memory grows linearly in K: the gather costs >= 4D bytes per index.

The memory claims are also checked by a plain test (``test_transient_memory_scaling``): memory
is deterministic, time is not, so only memory is asserted.
"""

import math

import pytest

import dcdkernels
from benchmarks import baselines as BL
from benchmarks import sizes as S
from benchmarks.harness import CFG, ELEM, FUSED, grad_step, peak_transient_bytes, skip_reason
from benchmarks.test_bench_ops import _analytic, _sampled_inputs, nce_steps, pick_step

T = 0.07


def _points(axis):
    return [p for sw in S.SWEEPS[CFG.size_set] if sw.axis == axis for p in sw.points()]


@pytest.mark.bench(table={k: _points for k in S.SIZE_SETS}, ops=["sampled_contrast"], cases=["K", "B"])
def test_scaling(bench, case, size, dtype, provider):
    idx, (bank,), (q,) = _sampled_inputs(size, dtype)
    Z = BL.repdistiller_first_z(q.detach(), bank, idx, T)
    fn = pick_step(provider, *nce_steps(q, bank, idx, Z, provider))
    nbytes, note = _analytic(provider, size, dtype)
    bench.run(
        grad_step(fn, [q]),
        family="scaling",
        op="sampled_contrast",
        case=f"nce-sweep{case}",
        size=size,
        dtype=dtype,
        provider=provider,
        bytes_read=size.gather_bytes(ELEM[dtype]),
        analytic_bytes=nbytes,
        analytic_note=note,
        params={"axis": case},
    )


def _peak(provider, size, mode):
    """Peak transient bytes of one NCE step at ``size`` (explicit index, or in-kernel sampling)."""
    idx, (bank,), (q,) = _sampled_inputs(size, "fp32")
    log_z = 2.0
    if provider == "eager":

        def loss():
            return BL.crd_nce_sampled(q, bank, idx, T, math.exp(log_z))
    elif mode == "idx":

        def loss():
            return dcdkernels.sampled_contrast(
                q, bank, idx, logit_scale=1 / T, loss="nce", log_z=log_z, backend=provider
            ).mean()
    else:
        pos = idx[:, 0].contiguous()

        def loss():
            return dcdkernels.sampled_contrast(
                q, bank, pos, num_negatives=size.K, seed=3, logit_scale=1 / T, loss="nce", log_z=log_z, backend=provider
            ).mean()

    step = grad_step(loss, [q])
    step()
    return peak_transient_bytes(step)["peak_bytes"]


@pytest.mark.parametrize("provider", ["eager", *FUSED])
def test_transient_memory_scaling(provider):
    """Eager memory grows by >= 4D bytes per gathered index; fused memory does not grow with the
    gathered rows: with an explicit index it may hold index-sized (B, K+1) temporaries of the
    input checks (<= 1/16 of eager's slope), and with in-kernel sampling it is flat."""
    why = skip_reason(provider, ["sampled_contrast"])
    if why:
        pytest.skip(why)
    D, B, N = 64, 8, 4096
    small, large = (S.Sampled("mem", N=N, B=B, K=k, D=D) for k in (64, 1024))
    d_index = B * (large.K - small.K)
    eager_slope = (_peak("eager", large, "idx") - _peak("eager", small, "idx")) / d_index
    if provider == "eager":
        assert eager_slope >= 4 * D * 0.9, f"eager gather should cost >= 4D bytes per index, got {eager_slope:.1f}"
        return
    for mode in ("idx", "sampler"):
        slope = (_peak(provider, large, mode) - _peak(provider, small, mode)) / d_index
        limit = eager_slope / 16 if mode == "idx" else 1.0
        assert slope <= limit, (
            f"{provider} ({mode}): transient memory grows by {slope:.1f} bytes per gathered "
            f"index (eager: {eager_slope:.1f}); expected <= {limit:.1f}"
        )
