"""Shared test setup. The test grid itself (tolerances, backends, per-op shapes) is
python_tests/helpers.py; TRITON_INTERPRET is set by the repository's root conftest.py."""

import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny shapes: intra-op threads only add spin-wait overhead on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
