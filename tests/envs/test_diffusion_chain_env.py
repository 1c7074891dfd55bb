"""The toy diffusion chain: exact denoiser, reference chain vs the data distribution, per-step KL, tilt oracles,
the gymnasium shell and parameter checks."""

from __future__ import annotations

import math
import warnings

import gymnasium
import numpy as np
import pytest
import torch
from scipy import integrate

import envs  # noqa: F401  (registers the gymnasium ids)
from envs.diffusion_chain import (
    DiffusionChainCore,
    DiffusionChainParams,
    density_grid,
    tilt_weights,
    tilted_data_mixture,
)


def test_denoiser_is_the_exact_posterior_mean() -> None:
    """E[x_0 | x_t] of the mixture by quadrature over x_0 in 1-D vs the closed form (tolerance 1e-8)."""
    p = DiffusionChainParams(modes=(-2.0, 1.5), mode_weights=(0.6, 0.4), mode_std=(0.5, 0.8))
    core = DiffusionChainCore(p)
    for t in (1, 4, p.steps):
        ab = float(core.alpha_bar[t])
        for xt in (-1.7, 0.0, 0.9, 3.0):
            def joint(x0: float, xt: float = xt, ab: float = ab) -> float:
                prior = math.exp(float(core.log_marginal(torch.tensor([[x0]], dtype=torch.float64), 0)[0]))
                return prior * math.exp(-0.5 * (xt - math.sqrt(ab) * x0) ** 2 / (1 - ab))
            z = integrate.quad(joint, -12, 12, limit=200, epsabs=1e-14)[0]
            num = integrate.quad(lambda x0, f=joint: x0 * f(x0), -12, 12, limit=200, epsabs=1e-14)[0] / z
            closed = float(core.denoise(torch.tensor([[xt]], dtype=torch.float64), t)[0, 0])
            assert closed == pytest.approx(num, abs=1e-8)


def test_reference_chain_reproduces_the_data_mode_mix() -> None:
    """The default 10-step chain's x_0 mode mix (mean of p_data(m | x_0)) equals the data weights w within
    Monte-Carlo error: 20 000 chains (seed 0), tolerance 4 standard errors computed from the samples (≈ 0.013).
    The Gaussian-step approximation's own bias measured with 2·10^5 chains: 0.004 on w = 0.7."""
    p = DiffusionChainParams()
    core = p.core()
    x0 = core.sample_reference(20_000, torch.Generator().manual_seed(0))
    resp = core.responsibilities(x0, 0)  # [n, M]
    se = resp.std(0) / math.sqrt(len(x0))
    err = (resp.mean(0) - p.mode_weight_vector()).abs()
    assert bool((err < 4 * se).all()), (err, se)
    # and the samples sit on the modes: the component spread is within 15 % of the data's s = 0.5
    right = x0[x0[:, 0] > 0, 0]
    assert abs(float(right.std()) - 0.5) < 0.075


def test_step_kl_is_the_expected_log_density_ratio() -> None:
    """Closed-form per-step KL ‖μ − μ_ref‖²/(2σ_t²) vs the sample mean of k1 = log N(x; μ) − log N(x; μ_ref) with
    x ~ N(μ, σ_t²I), 2-D, 40 000 samples (seed 1), tolerance 4 standard errors of that mean."""
    core = DiffusionChainCore(DiffusionChainParams(dim=2, modes=([-2.0, 0.0], [2.0, 1.0])))
    g = torch.Generator().manual_seed(1)
    for t in (1, 5, 10):
        x_t = torch.tensor([[0.3, -0.4]], dtype=torch.float64)
        mu_ref = core.ref_mean(x_t, t)
        mu = mu_ref + torch.tensor([[0.2, -0.1]], dtype=torch.float64) * core.step_std(t) * 3
        closed = float(core.step_kl(mu, mu_ref, t)[0])
        x = mu + core.step_std(t) * torch.randn(40_000, 2, generator=g, dtype=torch.float64)
        k1 = core.log_prob(x, mu, t) - core.log_prob(x, mu_ref, t)
        se = float(k1.std()) / math.sqrt(len(k1))
        assert abs(float(k1.mean()) - closed) < 4 * se, (t, float(k1.mean()), closed, se)


@pytest.mark.parametrize("reward", ["linear", "quadratic"])
def test_tilted_data_mixture_matches_quadrature_and_importance_weights(reward: str) -> None:
    """Closed-form tilt of p_data (linear / quadratic reward) vs (a) the grid quadrature of p_data·e^{r/β} (mean
    within 2e-5, the grid's truncation) and (b) self-normalized importance weights on 50 000 exact p_data samples
    (seed 2): tilted mode weights within 4 standard errors (delta-method SE computed from the weights)."""
    p = DiffusionChainParams(reward=reward, reward_coef=0.6, reward_center=1.0, mode_std=(0.5, 0.7))
    beta = 1.5
    w, means, stds = tilted_data_mixture(p, beta)
    xs, _, tilt = density_grid(p, beta, n=2001)
    dx = xs[1] - xs[0]
    # the grid stops 5 component stds beyond the modes: its truncated tail moves the mean by ~4e-6 here
    assert float((w * means[:, 0]).sum()) == pytest.approx(float((xs * tilt).sum() * dx), abs=2e-5)
    # exact draws from p_data, then importance weights e^{r/β}
    g = torch.Generator().manual_seed(2)
    n = 50_000
    comp = torch.multinomial(p.mode_weight_vector(), n, replacement=True, generator=g)
    x = p.mode_centers()[comp] + p.mode_std_vector()[comp, None] * torch.randn(n, 1, generator=g, dtype=torch.float64)
    iw = tilt_weights(DiffusionChainCore(p).reward(x), beta)
    onehot = torch.nn.functional.one_hot(comp, 2).to(torch.float64)
    est = iw @ onehot
    se = torch.sqrt(((iw[:, None] * (onehot - est)) ** 2).sum(0))  # delta-method SE of a ratio estimator
    assert bool(((est - w).abs() < 4 * se).all()), (est, w, se)


def test_tilt_weights_shapes_and_beta_check() -> None:
    r = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64).expand(2, 3)
    w = tilt_weights(r, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert w.shape == (2, 3) and torch.allclose(w.sum(-1), torch.ones(2, dtype=torch.float64))
    assert float(w[1, 2] / w[1, 1]) == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="beta must be positive"):
        tilt_weights(r, 0.0)


def test_batched_core_any_leading_shape_and_dtype() -> None:
    core = DiffusionChainCore(DiffusionChainParams(dim=2, modes=(-1.0, [2.0, 0.0])))
    x = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        mu = core.ref_mean(xd, 4)
        assert mu.shape == (3, 5, 2) and mu.dtype == dtype
        assert core.reward(xd).shape == (3, 5)
        assert core.log_prob(xd, mu, 4).shape == (3, 5)
    # the batched call equals the flat call row by row
    flat = core.ref_mean(x.reshape(-1, 2).double(), 4).reshape(3, 5, 2)
    assert torch.allclose(flat, core.ref_mean(x.double(), 4))


def test_gym_shell_follows_the_reference_and_rewards_x0() -> None:
    env = gymnasium.make("reflab/DiffusionChain-v0", dim=1, steps=4)
    obs, info = env.reset(seed=5)
    assert obs.shape == (2,) and info["t"] == 4
    rng = np.random.default_rng(0)
    total, n_steps, done = 0.0, 0, False
    while not done:
        action = info["ref_mean"] + info["step_std"] * rng.standard_normal(1)
        obs, reward, done, truncated, info = env.step(action)
        total += reward
        n_steps += 1
        assert not truncated
    assert n_steps == 4 and obs[-1] == 0.0
    core = DiffusionChainCore(DiffusionChainParams(dim=1, steps=4))
    assert total == pytest.approx(float(core.reward(torch.tensor([[float(obs[0])]], dtype=torch.float64))[0]),
                                  rel=1e-5)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1))
    shown = gymnasium.make("reflab/DiffusionChain-v0", render_mode="ansi")
    shown.reset(seed=0)
    assert shown.render().startswith("t = 10, x = (")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reward": "cubic"}, r"env\.reward must be one of 'bump', 'linear', 'quadratic'"),
        ({"mode_weights": (0.5, 0.6)}, r"env\.mode_weights must be non-negative and sum to 1"),
        ({"steps": 0}, r"env\.steps must be >= 1"),
        ({"noise_end": 1.0}, r"env\.noise_end must be <= 0.999"),
        ({"mode_std": (0.5,)}, r"env\.mode_std must have 2 entries"),
        ({"step_variance": "ddim"}, r"env\.step_variance must be one of"),
        ({"reward": "quadratic", "reward_coef": -1.0}, r"env\.reward_coef must be > 0"),
        ({"dim": 2, "modes": ([0.0, 1.0, 2.0], 1.0)}, r"env\.modes must have 2 entries"),
    ],
)
def test_bad_params_raise_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        DiffusionChainParams(**kwargs)
    assert "\n" not in str(err.value)


def test_gymnasium_env_checker_passes() -> None:
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker's warnings are failures here, except the advice to
        warnings.filterwarnings("ignore", message=".*symmetric and normalized space")  # normalize Box actions
        check_env(gymnasium.make("reflab/DiffusionChain-v0", dim=2, modes=[[-2.0, 0.0], [2.0, 0.0]]).unwrapped)


def test_stable_baselines3_env_checker_passes() -> None:
    from stable_baselines3.common.env_checker import check_env

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*symmetric and normalized")  # advice, not an error
        check_env(gymnasium.make("reflab/DiffusionChain-v0", dim=2, modes=[[-2.0, 0.0], [2.0, 0.0]]).unwrapped)
