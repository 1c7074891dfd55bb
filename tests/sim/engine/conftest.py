"""Engine unit tests: one torch thread (timing is irrelevant here, and results must not depend on it)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Timing is irrelevant here; keep the CPU light (and the results independent of the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
