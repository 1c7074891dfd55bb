"""The bandit: params, the compiled MDP, and the Gibbs and forward-KL points vs numerical optimization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax

from envs.bandit import BanditParams
from envs.tabular import (
    expected_return,
    forward_kl_stationary_point,
    sequence_forward_kl,
    sequence_kl,
    soft_value_iteration,
)

PARAMS = BanditParams(rewards=(1.0, 0.3, -0.5, 0.8), ref_probs=(0.1, 0.5, 0.3, 0.1))


def maximize_over_simplex(objective, n: int) -> np.ndarray:
    """argmax of ``objective(probs)`` over the simplex, by BFGS on softmax logits (tight tolerance)."""
    res = minimize(lambda z: -objective(np.exp(log_softmax(z))), np.zeros(n), method="BFGS",
                   options={"gtol": 1e-11, "maxiter": 10_000})
    return np.exp(log_softmax(res.x))


def test_defaults_and_seeded_rewards() -> None:
    mdp = BanditParams().build()
    assert mdp.n_states == 1 and mdp.n_actions == 3 and mdp.horizon == 1
    assert mdp.reward.flatten().tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(mdp.ref_logp.exp(), torch.full((1, 3), 1 / 3, dtype=torch.float64))
    a, b = BanditParams(n_arms=5, reward_seed=3), BanditParams(n_arms=5, reward_seed=3)
    assert torch.equal(a.arm_means(), b.arm_means())
    assert not torch.equal(a.arm_means(), BanditParams(n_arms=5, reward_seed=4).arm_means())
    pref = BanditParams(rewards=[0, 0], ref_preference=[1.0, 0.0], ref_temperature=0.5)
    assert pref.ref_logp().exp()[0].item() == pytest.approx(1 / (1 + math.exp(-2.0)))


@pytest.mark.parametrize("beta", [0.05, 0.3, 1.0, 5.0])
def test_gibbs_matches_numerical_maximization(beta: float) -> None:
    mdp = PARAMS.build()
    r, ref = PARAMS.arm_means().numpy(), np.array(PARAMS.ref_probs)

    def objective(p: np.ndarray) -> float:
        return float(p @ r - beta * np.sum(p * (np.log(p) - np.log(ref))))

    numeric = maximize_over_simplex(objective, len(r))
    _, _, logp = soft_value_iteration(mdp, beta)
    gibbs = logp[0].exp().numpy()
    assert np.allclose(gibbs, numeric, atol=1e-6)
    closed = ref * np.exp(r / beta) / np.sum(ref * np.exp(r / beta))
    assert np.allclose(gibbs, closed, atol=1e-12)
    # its objective equals the soft value β log E_ref e^{r/β}
    value = expected_return(mdp, logp) - beta * sequence_kl(mdp, logp)
    assert value.item() == pytest.approx(beta * math.log(np.sum(ref * np.exp(r / beta))), abs=1e-10)


@pytest.mark.parametrize("beta", [0.2, 0.7, 3.0])
def test_forward_kl_point_stationarity_and_maximization(beta: float) -> None:
    r, ref = PARAMS.arm_means(), torch.tensor(PARAMS.ref_probs, dtype=torch.float64)
    pi = forward_kl_stationary_point(r, ref, beta)
    # stationarity: π_a (r_a − E_π r) = β (π_a − π_ref,a)
    residual = pi * (r - (pi * r).sum()) - beta * (pi - ref)
    assert residual.abs().max().item() < 1e-10
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-14)

    def objective(p: np.ndarray) -> float:
        return float(p @ r.numpy() - beta * np.sum(ref.numpy() * (np.log(ref.numpy()) - np.log(p))))

    numeric = maximize_over_simplex(objective, len(r))
    assert np.allclose(pi.numpy(), numeric, atol=1e-6)
    # the tabular sequence-level forward KL agrees with the direct formula
    mdp = PARAMS.build()
    fkl = sequence_forward_kl(mdp, pi.log().view(1, -1)).item()
    assert fkl == pytest.approx(float(np.sum(ref.numpy() * np.log(ref.numpy() / pi.numpy()))), abs=1e-12)


def test_forward_kl_point_batched_beta() -> None:
    r, ref = PARAMS.arm_means(), torch.tensor(PARAMS.ref_probs, dtype=torch.float64)
    betas = torch.tensor([0.2, 1.0, 4.0], dtype=torch.float64)
    batched = forward_kl_stationary_point(r, ref, betas)
    assert batched.shape == (3, 4)
    for i, b in enumerate(betas.tolist()):
        assert torch.allclose(batched[i], forward_kl_stationary_point(r, ref, b), atol=1e-12)


def test_zero_reference_probability_is_allowed() -> None:
    params = BanditParams(rewards=(1.0, 0.0, 0.5), ref_probs=(0.0, 0.5, 0.5))
    mdp = params.build()
    assert mdp.ref_logp[0, 0].item() == -math.inf
    _, _, logp = soft_value_iteration(mdp, 0.1)
    assert logp[0, 0].exp().item() == 0.0 and torch.isfinite(logp[0, 1:]).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ref_probs": (0.5, 0.3, 0.1)}, r"env\.ref_probs must sum to 1 \(got 0\.9\)"),
        ({"ref_probs": (1.2, -0.2, 0.0)}, r"env\.ref_probs must be non-negative"),
        ({"ref_probs": (0.5, 0.5)}, r"env\.ref_probs must have 3 entries"),
        ({"rewards": (1.0, 2.0), "n_arms": 3}, r"env\.n_arms must equal len\(env\.rewards\)"),
        ({"n_arms": 0}, r"env\.n_arms must be >= 1"),
        ({"ref_temperature": 0.0}, r"env\.ref_temperature must be > 0"),
        ({"reward_noise": -1.0}, r"env\.reward_noise must be >= 0"),
        ({"ref_probs": (0.2, 0.3, 0.5), "ref_preference": (0, 0, 0)},
         r"env\.ref_probs and env\.ref_preference"),
        ({"rewards": ()}, r"env\.rewards must not be empty"),
    ],
)
def test_bad_params_raise_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        BanditParams(**kwargs)
    assert "\n" not in str(err.value)
