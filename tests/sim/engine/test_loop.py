"""The base loop's helpers: the one-pass finiteness check must not flag overflowing sums of finite rows."""

from __future__ import annotations

import pytest
import torch

from sim.engine.loop import finite_per_run


@pytest.mark.parametrize("dtype, huge", [(torch.float32, 3e38), (torch.float64, 1.7e308)])
def test_finite_per_run_flags_nonfinite_rows_only(dtype, huge):
    """Guards the divergence check: rows with nan / +inf / -inf (or both infs) are flagged; rows of huge
    finite values whose sum overflows are not (whether or not another row is non-finite)."""
    inf, nan = float("inf"), float("nan")
    rows = [
        [1.0, -2.0, 3.0, 0.0],
        [1.0, nan, 0.0, 0.0],
        [0.0, 0.0, 0.0, inf],
        [-inf, 0.0, 0.0, 0.0],
        [huge, huge, 0.0, 0.0],
        [-huge, -huge, -huge, 1.0],
        [inf, -inf, 0.0, 0.0],
    ]
    x = torch.tensor(rows, dtype=dtype)
    assert torch.equal(finite_per_run(x), torch.tensor([True, False, False, False, True, True, False]))
    # every row finite, but a row's sum overflows: the fast path must fall back to the elementwise check
    x = torch.tensor([[huge, huge], [1.0, 2.0], [-huge, -huge]], dtype=dtype)
    assert bool(torch.isinf(x.sum(-1)).any())
    assert torch.equal(finite_per_run(x), torch.tensor([True, True, True]))
    # the common case: all finite, no overflow
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(9), dtype=dtype)
    assert torch.equal(finite_per_run(x), torch.ones(4, dtype=torch.bool))
