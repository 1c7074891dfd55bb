"""The KL references of a bandit are computed without torch in the report, with the numbers ``envs`` gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.references import _bandit_arrays, _bandit_arrays_torch, kl_references, torch_randn64


@pytest.mark.parametrize("n", [16, 17, 31, 32, 100, 300])
@pytest.mark.parametrize("seed", [0, 1, 7, 12345, 2**32 - 1])
def test_torch_randn64_draws_torchs_numbers(n: int, seed: int) -> None:
    expected = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    assert np.array_equal(torch_randn64(n, seed), expected)


@pytest.mark.parametrize("env", [
    {"id": "bandit", "n_arms": 300, "reward_seed": 1},
    {"id": "bandit", "n_arms": 40, "reward_seed": 3, "ref_probs": list(np.full(40, 1 / 40))},
    {"id": "bandit", "n_arms": 20, "reward_seed": 5,
     "ref_probs": list(np.random.default_rng(0).dirichlet(np.ones(20)))},
])
def test_drawn_bandit_arrays_are_the_envs(env: dict) -> None:
    means, ref = _bandit_arrays(env)
    means_t, ref_t = _bandit_arrays_torch(env)
    assert np.array_equal(means, means_t) and np.array_equal(ref, ref_t)
    config = {"env": env, "kl": {"beta": 0.1}}
    assert len(kl_references(config)) == 2


def test_few_arms_and_reference_logits_still_use_the_env() -> None:
    for env in ({"id": "bandit", "n_arms": 5, "reward_seed": 2},
                {"id": "bandit", "n_arms": 20, "reward_seed": 2, "ref_preference": list(np.linspace(0, 1, 20))}):
        means, ref = _bandit_arrays(env)
        means_t, ref_t = _bandit_arrays_torch(env)
        assert np.array_equal(means, means_t) and np.array_equal(ref, ref_t)


@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_forward_kl_point_is_the_envs_oracle(beta: float) -> None:
    """The report's numpy copy of the k3-as-loss point agrees with the oracle in ``envs`` (the same bisection
    to 1e-13 in c; float64 sums in another order: 1e-12 allows for that)."""
    from analysis.references import forward_kl_point
    from envs.tabular import forward_kl_stationary_point

    rng = np.random.default_rng(int(beta * 100))
    r, ref = rng.normal(size=12), rng.dirichlet(np.ones(12))
    ref[3] = 0.0
    ref /= ref.sum()
    expected = forward_kl_stationary_point(torch.tensor(r), torch.tensor(ref), beta).numpy()
    np.testing.assert_allclose(forward_kl_point(r, ref, beta), expected, rtol=0, atol=1e-12)


def test_runs_on_a_learned_proxy_get_no_reference_lines() -> None:
    """The references are the env reward's optimum; a proxy fitted per run has its own, unknown to the config."""
    env = {"id": "bandit", "rewards": [1.0, 0.0, 0.0], "ref_probs": [0.2, 0.5, 0.3]}
    assert len(kl_references({"env": env, "kl": {"beta": 0.1}, "reward": {"model": "gold"}})) == 2
    assert kl_references({"env": env, "kl": {"beta": 0.1}, "reward": {"model": "learned", "pairs": 64}}) == []
