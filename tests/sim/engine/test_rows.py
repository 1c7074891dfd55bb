"""Per-run sums over visited rows (:mod:`sim.engine.rows`): bitwise the plain sums over actions."""

from __future__ import annotations

import pytest
import torch

from sim.engine.rows import per_run_sum, sampled_kl_sums


def _written_out(count: torch.Tensor, ks: torch.Tensor, kfull: torch.Tensor, rows: torch.Tensor, R: int, S: int
                 ) -> torch.Tensor:
    """The sums as the PPO metrics once wrote them: ``count·ks``, ``count`` and ``count·kfull`` summed over
    actions (:func:`per_run_sum`)."""
    c = count.to(torch.float64)
    kf = kfull.to(torch.float64)
    return per_run_sum(torch.cat([c.unsqueeze(-1) * ks, c.unsqueeze(-1), (c * kf).unsqueeze(-1)], dim=-1),
                       rows, R, S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_actions", [4, 300])
@pytest.mark.parametrize("special", [None, float("inf"), float("nan")])
def test_sampled_kl_sums_equal_the_sums_over_actions(n_actions: int, special: float | None, dtype: torch.dtype
                                                     ) -> None:
    """Guards :func:`sampled_kl_sums` (the sample count and count·kfull as one exact product per row): bitwise the
    sums over actions, with unsampled entries, a padded table, and an infinite or NaN exact KL (where 0·inf
    makes the sum NaN), in float32 (one product) and float64 (whose products round: summed)."""
    g = torch.Generator().manual_seed(n_actions)
    R, S, M, P = 6, 9, 37, 64
    rows = torch.randperm(R * S, generator=g)[:M].sort().values
    count = torch.randint(0, 40, (n_actions, P), generator=g).to(dtype)
    count[:, M:] = 0
    count[0, :M] += 1  # every visited row has a sample
    ks = torch.randn(n_actions, P, 3, generator=g, dtype=torch.float64) * 1e-3
    kfull = torch.rand(P, generator=g, dtype=dtype) * 3
    if special is not None:
        kfull[5] = special
    got = sampled_kl_sums(count, ks, kfull, rows, R, S)
    want = _written_out(count, ks, kfull, rows, R, S)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
