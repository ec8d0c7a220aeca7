"""``python -m benchmarks.gpu_check``: its no-GPU path (what CI can run) exits cleanly with a
clear message and writes its one-line report; its parts fit the 8-minute budget."""

import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path (with a GPU the script runs for real)")
def test_no_gpu_path_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
    report = (out / "report.md").read_text()
    assert "no CUDA GPU" in report
    assert len(os.listdir(out)) <= gpu_check.MAX_FILES


def test_budgets_fit_eight_minutes():
    assert gpu_check.TOTAL_BUDGET <= 8 * 60 - 10
    assert sum(gpu_check.BUDGETS.values()) <= 8 * 60 + 120  # parts that finish early leave time to the rest
    assert set(gpu_check.BUDGETS) == {"build", "info", "tests", "multi_device", "sanitizer", "determinism", "bench"}
    for path in gpu_check.TEST_FILES:
        assert os.path.exists(os.path.join(ROOT, path)), path
