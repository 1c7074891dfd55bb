"""The Gaussian bandit: closed forms (KL, Gibbs optimum, expected reward) vs numerical quadrature in 1-D."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from envs.gaussian_bandit import (
    GaussianBanditCore,
    GaussianBanditParams,
    expected_reward,
    gaussian_kl,
    gibbs_optimum,
)


def quad(f, lo: float = -40.0, hi: float = 40.0) -> float:
    value, _ = integrate.quad(f, lo, hi, limit=400, epsabs=1e-13, epsrel=1e-12)
    return value


def reward_fn(params: GaussianBanditParams):
    core = GaussianBanditCore(params)
    return lambda x: core.reward(torch.tensor([[x]], dtype=torch.float64)).item()


@pytest.mark.parametrize(("mu", "std", "mu_ref", "std_ref"), [(0.3, 0.5, -0.2, 1.0), (2.0, 2.0, 0.0, 0.7),
                                                               (0.0, 1.0, 0.0, 1.0)])
def test_gaussian_kl_matches_quadrature(mu: float, std: float, mu_ref: float, std_ref: float) -> None:
    p, q = stats.norm(mu, std), stats.norm(mu_ref, std_ref)
    numeric = quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), mu - 20 * std, mu + 20 * std)
    as_t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    closed = gaussian_kl(as_t(mu), std, as_t(mu_ref), std_ref)
    assert closed.item() == pytest.approx(numeric, abs=1e-9)


def test_gaussian_kl_batched_and_multidimensional() -> None:
    mu = torch.tensor([[0.1, -0.4, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    std = torch.tensor([0.5, 1.0], dtype=torch.float64)
    mu_ref = torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64)
    kl = gaussian_kl(mu, std, mu_ref, 0.8)
    assert kl.shape == (2,)
    # an isotropic Gaussian factorizes: KL is the sum of the 1-D KLs
    for i in range(2):
        one_d = sum(gaussian_kl(mu[i, j:j + 1], std[i], mu_ref[j:j + 1], 0.8).item() for j in range(3))
        assert kl[i].item() == pytest.approx(one_d, abs=1e-12)
    # equal σ: ‖μ − μ_ref‖²/(2σ²)
    same = gaussian_kl(mu[:1], 0.8, mu_ref, 0.8).item()
    assert same == pytest.approx(((mu[0] - mu_ref) ** 2).sum().item() / (2 * 0.64), abs=1e-14)


def gibbs_moments_by_quadrature(params: GaussianBanditParams, beta: float) -> tuple[float, float]:
    """Mean and std of π_ref(x) e^{r(x)/β} / Z in 1-D, in log space around the mode for stability."""
    r = reward_fn(params)
    ref = stats.norm(float(params.ref_mean), params.ref_std)
    shift = max(ref.logpdf(x) + r(x) / beta for x in np.linspace(-30, 30, 601))  # keeps exp() in range
    w = lambda x: math.exp(ref.logpdf(x) + r(x) / beta - shift)  # noqa: E731
    z = quad(w, -30, 30)
    mean = quad(lambda x: x * w(x), -30, 30) / z
    var = quad(lambda x: (x - mean) ** 2 * w(x), -30, 30) / z
    return mean, math.sqrt(var)


@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize(
    "params",
    [
        GaussianBanditParams(ref_mean=0.5, ref_std=0.8, reward="linear", reward_coef=1.3),
        GaussianBanditParams(ref_mean=-1.0, ref_std=1.2, reward="quadratic", reward_coef=2.0, target=1.5),
    ],
    ids=["linear", "quadratic"],
)
def test_gibbs_optimum_matches_quadrature(params: GaussianBanditParams, beta: float) -> None:
    mean, std = gibbs_optimum(params, beta)
    q_mean, q_std = gibbs_moments_by_quadrature(params, beta)
    assert mean.item() == pytest.approx(q_mean, abs=1e-7)
    assert std.item() == pytest.approx(q_std, abs=1e-7)


def test_gibbs_optimum_batched_beta_and_theory_formula() -> None:
    params = GaussianBanditParams(dim=2, ref_mean=[0.0, 1.0], ref_std=0.5, reward_coef=[1.0, -2.0])
    betas = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    mean, std = gibbs_optimum(params, betas)
    assert mean.shape == (3, 2) and std.shape == (3,)
    # docs/theory.md: N(μ_ref + σ_ref² c/β, σ_ref² I)
    expected = torch.tensor([0.0, 1.0]) + 0.25 * torch.tensor([1.0, -2.0]) / betas[:, None]
    assert torch.allclose(mean, expected.double()) and torch.allclose(std, torch.full((3,), 0.5).double())


@pytest.mark.parametrize("reward", ["linear", "quadratic", "two_mode"])
def test_expected_reward_matches_quadrature(reward: str) -> None:
    params = GaussianBanditParams(reward=reward, reward_coef=0.7, target=0.4, modes=(-1.0, 2.0),
                                  mode_weights=(0.5, 1.0), mode_std=0.6)
    r = reward_fn(params)
    for mu, std in [(0.0, 1.0), (1.5, 0.3)]:
        density = stats.norm(mu, std)
        numeric = quad(lambda x, p=density: p.pdf(x) * r(x), mu - 15 * std, mu + 15 * std)
        closed = expected_reward(params, torch.tensor([mu], dtype=torch.float64), std).item()
        assert closed == pytest.approx(numeric, abs=1e-9)


def test_two_mode_reward_shape_and_no_closed_form() -> None:
    params = GaussianBanditParams(reward="two_mode", dim=2, modes=(-1.0, [2.0, 0.0]), mode_weights=(0.5, 1.0))
    core = GaussianBanditCore(params)
    x = torch.tensor([[-1.0, -1.0], [2.0, 0.0], [10.0, 10.0]], dtype=torch.float64)
    assert core.reward(x).tolist() == pytest.approx([0.5, 1.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="no closed form for env.reward='two_mode'"):
        gibbs_optimum(params, 1.0)


def test_core_step_noise_and_batch_shapes() -> None:
    params = GaussianBanditParams(dim=3, reward_coef=[1.0, 0.0, -1.0], reward_noise=0.5)
    core = GaussianBanditCore(params)
    x = torch.ones(4, 2, 3, dtype=torch.float64)
    z = torch.full((4, 2), 2.0, dtype=torch.float64)
    next_state, reward, done = core.step(x, z)
    assert next_state.shape == reward.shape == done.shape == (4, 2)
    assert torch.allclose(reward, torch.full((4, 2), 0.0 + 0.5 * 2.0, dtype=torch.float64))
    assert done.all() and (next_state == core.terminal).all()
    g = torch.Generator().manual_seed(0)  # fixed seed: the moment check is deterministic
    samples = core.sample_reference(100_000, g)
    assert samples.mean(0).abs().max().item() < 5 * 1.0 / math.sqrt(100_000)


@pytest.mark.parametrize("beta", [0.0, -0.5])
def test_gibbs_optimum_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta must be positive"):
        gibbs_optimum(GaussianBanditParams(), beta)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reward": "cubic"}, r"env\.reward must be one of 'linear', 'quadratic', 'two_mode'"),
        ({"ref_std": 0.0}, r"env\.ref_std must be > 0"),
        ({"dim": 2, "ref_mean": [0.0, 1.0, 2.0]}, r"env\.ref_mean must have 2 entries"),
        ({"reward": "quadratic", "reward_coef": [1.0]}, r"env\.reward_coef must be a scalar curvature"),
        ({"reward": "quadratic", "reward_coef": -1.0}, r"env\.reward_coef must be > 0"),
        ({"modes": (0.0, 1.0), "mode_weights": (1.0,)}, r"env\.mode_weights must have 2 entries"),
        ({"mode_weights": (1.0, -1.0)}, r"env\.mode_weights must be non-negative"),
    ],
)
def test_bad_params_raise_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        GaussianBanditParams(**kwargs)
    assert "\n" not in str(err.value)
