"""PPO pieces: ``gae``'s reverse-cumsum fast path (γλ = 1) and its loop, against an explicit reference."""

from __future__ import annotations

import pytest
import torch

from sim.engine.ppo import gae


def _gae_reference(rewards, values, next_values, done, valid, gamma, lam):
    """Textbook GAE by explicit loops: A_t = δ_t + γλ(1 − done_t)·A_{t+1} within the episode, 0 after it."""
    R, N, T = rewards.shape
    adv = torch.zeros(R, N, T, dtype=torch.float64)
    for r in range(R):
        for n in range(N):
            nxt = 0.0
            for t in reversed(range(T)):
                if not valid[r, n, t]:
                    nxt = 0.0
                    continue
                nd = 0.0 if done[r, n, t] else 1.0
                delta = float(rewards[r, n, t]) + gamma * float(next_values[r, n, t]) * nd - float(values[r, n, t])
                nxt = delta + gamma * lam * nd * nxt
                adv[r, n, t] = nxt
    return adv


def _episodes(with_values: bool, seed: int = 8):
    """Random episodes ``[R, N, T]`` of lengths 1..T (valid prefix), done at the last valid step, except a
    few truncated at T (not done: bootstrapped from next_values); garbage rewards/values past the end."""
    R, N, T = 3, 6, 9
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(1, T + 1, (R, N), generator=g)
    t = torch.arange(T)
    valid = t < length.unsqueeze(-1)
    truncated = (length == T) & (torch.rand(R, N, generator=g) < 0.5)
    done = (t == (length - 1).unsqueeze(-1)) & ~truncated.unsqueeze(-1)
    rewards = torch.randn(R, N, T, generator=g, dtype=torch.float64)
    if with_values:
        values = torch.randn(R, N, T, generator=g, dtype=torch.float64)
        next_values = torch.randn(R, N, T, generator=g, dtype=torch.float64)
    else:
        values = torch.zeros(R, N, T, dtype=torch.float64)
        next_values = torch.zeros(R, N, T, dtype=torch.float64)
    assert bool(truncated.any()) and bool((length < T).any())
    return rewards, values, next_values, done, valid


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.9, 0.95), (1.0, 0.95), (0.99, 1.0)])
@pytest.mark.parametrize("with_values", [True, False], ids=["values", "no-values"])
def test_gae_matches_reference_loop(gamma, lam, with_values):
    """Guards both GAE paths (γλ = 1: reverse cumulative sum; otherwise the loop) against the explicit
    recursion on episodes of varied lengths, including zeros after the end despite garbage there."""
    batch = _episodes(with_values)
    got = gae(*batch, gamma=gamma, lam=lam)
    ref = _gae_reference(*batch, gamma=gamma, lam=lam)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert bool((got[~batch[4]] == 0).all())
