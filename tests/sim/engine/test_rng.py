"""Counter-based random streams: ``uniform_at`` per-element draws are bitwise equal to the matching elements of
``uniform`` (the int64 hash and, where the import-time check enables it, the int32 hash)."""

from __future__ import annotations

import pytest
import torch

from sim.engine import rng

_RNG_PATHS = ["int64"] + (["int32"] if rng._I32_EXACT else [])


@pytest.fixture(params=_RNG_PATHS)
def hash_path(request, monkeypatch):
    """Run a ``uniform_at`` test on each hash path this machine supports (int32 only if ``_I32_EXACT``)."""
    monkeypatch.setattr(rng, "_I32_EXACT", request.param == "int32")
    return request.param


def _keys(n_runs: int) -> torch.Tensor:
    """Run keys including the edge patterns (0, 2^31 − 1, 2^31, 2^32 − 1) next to ordinary hashed keys."""
    edge = torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.long)
    return torch.cat([edge, rng.run_keys(list(range(n_runs - edge.numel())))])


@pytest.mark.parametrize("shape", [(1,), (7,), (5, 7, 3), (1031,), (4, 16, 33)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uniform_at_per_element_keys_bitwise_equal_uniform(hash_path, shape, dtype):
    """Guards: a per-element draw (key [K], index [K]) is bitwise the element ``index`` of that run's
    ``uniform`` stream, whatever the shape with ``n`` elements, keys ≥ 2^31 included."""
    keys = _keys(12)
    full = rng.uniform(keys, shape, dtype=dtype).reshape(keys.numel(), -1)
    n = full.shape[1]
    g = torch.Generator().manual_seed(1)
    k = 500
    run = torch.randint(0, keys.numel(), (k,), generator=g)
    index = torch.randint(0, n, (k,), generator=g)
    got = rng.uniform_at(keys[run], index, n, dtype=dtype)
    assert got.dtype == dtype and got.shape == (k,)
    assert torch.equal(got, full[run, index])


@pytest.mark.parametrize("n_episodes, horizon", [(1, 1), (5, 8), (37, 3), (64, 9)])
def test_uniform_at_broadcast_key_column_index_row(hash_path, n_episodes, horizon):
    """Guards the form the rollout uses: keys [R, 1] against counters [1, N] (counter n·H + t) must give
    ``uniform(keys, (N, H))[:, :, t]`` bitwise, for every step t."""
    keys = _keys(9)
    full = rng.uniform(keys, (n_episodes, horizon))
    n = torch.arange(n_episodes).unsqueeze(0)
    for t in range(horizon):
        got = rng.uniform_at(keys.unsqueeze(1), n * horizon + t, n_episodes * horizon)
        assert got.shape == (keys.numel(), n_episodes)
        assert torch.equal(got, full[:, :, t]), f"step {t}"
