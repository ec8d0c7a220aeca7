"""Backend choice and input validation at the dispatch points (no kernel needed)."""

import pytest
import torch
from helpers import BACKENDS

import dcdkernels
from dcdkernels import backends


def _inputs(B=3, K=4, N=10, D=6):
    return torch.randn(B, D), torch.randn(N, D), torch.randint(0, N, (B, K + 1))


def test_unknown_backend_is_rejected():
    q, bank, idx = _inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        dcdkernels.sampled_contrast(q, bank, idx, logit_scale=1.0, backend="tpu")


def test_explicit_cuda_backend_on_cpu_tensors_fails_clearly():
    q, bank, idx = _inputs()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dcdkernels.sampled_contrast(q, bank, idx, logit_scale=1.0, backend="cuda")


def test_unavailable_backend_raises_not_implemented_naming_it(monkeypatch):
    monkeypatch.setattr(backends._ext, "has_kernel", lambda op, key: False)
    q, bank, idx = _inputs()
    with pytest.raises(NotImplementedError, match="backend 'cpu'"):
        dcdkernels.sampled_contrast(q, bank, idx, logit_scale=1.0, backend="cpu")
    # 'auto' may choose; with no kernels it chooses the eager oracle.
    assert backends.resolve("auto", torch.device("cpu"), "sampled_contrast") == "eager"


def test_auto_prefers_compiled_cpu_kernels_when_built():
    expected = "cpu" if dcdkernels.availability()["cpu"][0] else "eager"
    assert backends.resolve("auto", torch.device("cpu"), "sampled_contrast") == expected


@pytest.mark.parametrize(
    "case, match",
    [
        (lambda q, b, i: (q[0], b, i), "anchor must be 2-D"),
        (lambda q, b, i: (q, b[:, :3], i), "bank has D = 3"),
        (lambda q, b, i: (q.int(), b, i), "anchor must be float32"),
        (lambda q, b, i: (q, b, i.float()), "index must be int64"),
        (lambda q, b, i: (q, b, i[:2]), "index has 2 rows but there are 3 anchors"),
        (lambda q, b, i: (q, b, i[:, :1]), "K >= 1"),
        (lambda q, b, i: (q, b, i + 100), r"index has entries out of range \[0, 10\)"),
        (lambda q, b, i: (q, b, -i - 1), "out of range"),
        (lambda q, b, i: (q * float("nan"), b, i), "anchor has non-finite values"),
        (lambda q, b, i: (q[:0], b, i[:0]), "at least one row"),
        (lambda q, b, i: (q, b.t(), i), "bank has D"),
    ],
)
def test_sampled_contrast_rejects_bad_input(case, match):
    q, bank, idx = case(*_inputs())
    with pytest.raises((ValueError, TypeError), match=match):
        dcdkernels.sampled_contrast(q, bank, idx, logit_scale=1.0)


def test_nce_needs_log_z_and_scale_must_be_positive():
    q, bank, idx = _inputs()
    with pytest.raises(ValueError, match="needs log_z"):
        dcdkernels.sampled_contrast(q, bank, idx, logit_scale=1.0, loss="nce")
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        dcdkernels.sampled_contrast(q, bank, idx, logit_scale=-1.0)
    with pytest.raises(ValueError, match="loss must be"):
        dcdkernels.sampled_contrast(q, bank, idx, logit_scale=1.0, loss="hinge")


def test_one_dimensional_index_needs_num_negatives():
    q, bank, idx = _inputs()
    with pytest.raises(ValueError, match="num_negatives"):
        dcdkernels.sampled_contrast(q, bank, idx[:, 0], logit_scale=1.0)
    with pytest.raises(ValueError, match="only for a 1-D index"):
        dcdkernels.sampled_contrast(q, bank, idx, logit_scale=1.0, num_negatives=3)


def test_dense_contrast_rejects_bad_input():
    q, keys, _ = _inputs()
    with pytest.raises(ValueError, match="exactly one of target"):
        dcdkernels.dense_contrast(q, keys, logit_scale=1.0)
    with pytest.raises(ValueError, match="target has entries out of range"):
        dcdkernels.dense_contrast(q, keys, torch.tensor([0, 1, 10]), logit_scale=1.0)
    with pytest.raises(ValueError, match="weight must be"):
        dcdkernels.dense_contrast(q, keys, torch.tensor([0, 1, 2]), logit_scale=1.0, weight=torch.ones(2))


def test_bank_update_rejects_bad_input_and_leaves_bank_untouched():
    bank = torch.randn(10, 4)
    before = bank.clone()
    for index, value, m, match in [
        (torch.tensor([0, 10]), torch.randn(2, 4), 0.5, "out of range"),
        (torch.tensor([0, 1]), torch.randn(2, 3), 0.5, "value has D = 3"),
        (torch.tensor([0, 1]), torch.randn(3, 4), 0.5, "index has 2 rows"),
        (torch.tensor([0, 1]), torch.tensor([[1.0, 2, 3, float("inf")], [0, 0, 0, 1]]), 0.5, "non-finite"),
        (torch.tensor([0, 1]), torch.randn(2, 4), 1.5, "momentum must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            dcdkernels.bank_momentum_update_(bank, index, value, m)
        assert torch.equal(bank, before)


def test_value_checks_can_be_disabled_but_shape_checks_cannot():
    q, bank, idx = _inputs()
    dcdkernels.set_value_checks(False)
    try:
        with pytest.raises(ValueError, match="bank has D"):
            dcdkernels.sampled_contrast(q, bank[:, :2], idx, logit_scale=1.0)
    finally:
        dcdkernels.set_value_checks(True)


def test_info_reports_every_backend():
    from dcdkernels.info import report

    text = report()
    for name in ("eager", "cpu", "cuda", "triton"):
        assert f"  {name}" in text
    assert "torch " in text and "device:" in text


def test_float64_is_refused_by_gpu_backends_and_routed_to_eager_by_auto():
    assert backends.resolve("auto", torch.device("cuda"), "sampled_contrast", torch.float64) in ("eager",)
    with pytest.raises(TypeError, match="does not support float64"):
        backends.resolve("triton", torch.device("cpu"), "sampled_contrast", torch.float64)
    q, bank, idx = _inputs()
    with pytest.raises(TypeError, match="does not support float64"):
        dcdkernels.sampled_contrast(q.double(), bank.double(), idx, logit_scale=1.0, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_whose_device_is_present_is_available(backend):
    """The kernel grid skips a backend only for a missing device or optional dependency: where its
    device is present, the backend must be usable (a CUDA build that silently lost its kernels, or
    a CPU-only _C, fails here rather than skipping every CUDA test)."""
    ok, why = dcdkernels.availability()[backend]
    assert ok, why
