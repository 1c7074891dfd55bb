"""Action-major tables of visited rows (``log_softmax_action_major``, ``gather_rows``): a column's numbers
must not depend on where it sits in the table, and agree with torch's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from sim.engine.policies import (
    TabularPolicy,
    action_major_columns,
    action_major_storage,
    gather_rows,
    log_softmax_action_major,
)


def _logits(n_actions: int, n_cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Action-major logits ``[A, M]`` with scales from 0.01 to 30 across columns (large and tiny gaps)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1.5, n_cols, dtype=dtype)
    return torch.randn(n_actions, n_cols, generator=g, dtype=dtype) * scale


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("n_actions", [1, 2, 5, 9])
def test_log_softmax_action_major_matches_torch(dtype, atol, n_actions):
    """Guards the hand-written reduction: equals ``torch.log_softmax(dim=0)`` to rounding."""
    x = _logits(n_actions, 192, dtype)
    out = log_softmax_action_major(x)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, torch.log_softmax(x, dim=0), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_softmax_action_major_position_invariant(dtype):
    """Guards the batch-invariance promise: a column's values are bitwise the same whether computed in the
    whole [A, 256] table or in any subset of its columns gathered (``gather_rows``) into a table padded
    with zero columns to a multiple of 64 (padding columns are the uniform policy)."""
    n_actions, n_cols = 5, 256
    x = _logits(n_actions, n_cols, dtype, seed=1)
    full = log_softmax_action_major(x)
    table = x.t().contiguous()  # [M, A]: the row layout gather_rows reads
    g = torch.Generator().manual_seed(2)
    for m in (1, 3, 63, 64, 65, 100, 200, 256):
        rows = torch.randperm(n_cols, generator=g)[:m]
        size = -(-m // 64) * 64
        sub = log_softmax_action_major(gather_rows(table, rows, size))
        assert sub.shape == (n_actions, size)
        assert torch.equal(sub[:, :m], full[:, rows]), f"{m} columns"
        uniform = torch.full((n_actions, size - m), -math.log(n_actions), dtype=dtype)
        torch.testing.assert_close(sub[:, m:], uniform, rtol=0, atol=1e-6)


def test_log_softmax_action_major_gradient_matches_torch():
    """Guards the detached maximum: the gradient of Σ w·out equals that through ``torch.log_softmax``."""
    x = _logits(6, 128, torch.float64, seed=3)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    (w * log_softmax_action_major(a)).sum().backward()
    (w * torch.log_softmax(b, dim=0)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rows", [[4, 0, 7], [3, 3, 9, 3], list(range(10))], ids=["distinct", "repeated", "all"])
def test_gather_rows_action_major_zero_padded_and_gradient(rows):
    """Guards ``gather_rows``: ``[A, size]`` with column j = row ``rows[j]`` and zeros past M; the gradient
    reaches the selected rows only (summed over repeats)."""
    g = torch.Generator().manual_seed(6)
    table = torch.randn(10, 3, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor(rows)
    size = 16
    out = gather_rows(table, idx, size)
    assert out.shape == (3, size)
    assert torch.equal(out[:, : len(rows)], table.detach()[idx].t())
    assert torch.equal(out[:, len(rows):], torch.zeros(3, size - len(rows), dtype=torch.float64))
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (w * out).sum().backward()
    expected = torch.zeros(10, 3, dtype=torch.float64).index_add_(0, idx, w[:, : len(rows)].t())
    assert torch.equal(table.grad, expected)
    unselected = torch.ones(10, dtype=torch.bool)
    unselected[idx] = False
    assert bool((table.grad[unselected] == 0).all())


def test_gather_rows_one_dimensional_table():
    """Guards the 1-D form (values ``[N]`` → ``[size]``, zero past M) and its gradient."""
    g = torch.Generator().manual_seed(7)
    table = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([11, 2, 5, 2])
    out = gather_rows(table, idx, 8)
    assert out.shape == (8,)
    assert torch.equal(out[:4], table.detach()[idx])
    assert torch.equal(out[4:], torch.zeros(4, dtype=torch.float64))
    w = torch.randn(8, generator=g, dtype=torch.float64)
    (w * out).sum().backward()
    expected = torch.zeros(12, dtype=torch.float64).index_add_(0, idx, w[:4])
    assert torch.equal(table.grad, expected)


def test_action_major_storage_rows_and_tables_as_row_major():
    """Guards logits stored action-major (what tabular PPO keeps): the same ``[R, S, A]`` values whose memory
    is the ``[A, R·S]`` columns :func:`action_major_columns` gives (``None`` for a row-major table); the policy's
    visited rows and its whole table are bitwise those of the row-major logits."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 5, 4, generator=g)
    stored = action_major_storage(logits)
    assert torch.equal(stored, logits) and stored.shape == logits.shape
    assert action_major_columns(logits) is None
    cols = action_major_columns(stored)
    assert cols is not None and cols.data_ptr() == stored.data_ptr()
    assert torch.equal(cols, logits.reshape(-1, 4).t())
    policy, rows = TabularPolicy(5, 4), torch.tensor([0, 3, 7, 14])
    assert torch.equal(policy.row_logits({"logits": stored}, rows, 8), policy.row_logits({"logits": logits}, rows, 8))
    assert torch.equal(policy.table({"logits": stored}), policy.table({"logits": logits}))
