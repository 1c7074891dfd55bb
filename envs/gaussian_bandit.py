"""A one-step bandit with continuous actions ``x ∈ R^d`` and a Gaussian reference ``N(μ_ref, σ_ref² I)``.

The continuous counterpart of :mod:`envs.bandit` (docs/theory.md "Continuous actions"): a Gaussian policy
``N(μ, σ² I)`` has the closed-form KL of :func:`gaussian_kl`, and for a linear or quadratic reward the
KL-regularized optimum is again Gaussian (:func:`gibbs_optimum`). This env is not a
:class:`~envs.tabular.TabularMDP`; its batched core is :class:`GaussianBanditCore`.

Rewards (``reward``):

* ``"linear"``: ``r(x) = c·x`` with ``c = reward_coef`` (a scalar means ``c·(1, …, 1)``).
* ``"quadratic"``: ``r(x) = −(a/2)‖x − x0‖²`` with curvature ``a = reward_coef`` (> 0) and ``x0 = target``.
* ``"two_mode"``: ``r(x) = Σ_m w_m exp(−‖x − m_m‖² / (2 s²))``, bumps of height ``w = mode_weights`` and width
  ``s = mode_std`` at the centers ``modes``; its Gibbs optimum has no closed form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, SupportsFloat

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from envs.gym_shell import CoreEnv
from envs.params import (
    EnvParams,
    check_beta,
    check_choice,
    check_float,
    check_floats,
    check_int,
    check_vector,
    set_field,
)

REWARDS = ("linear", "quadratic", "two_mode")


@dataclass(frozen=True)
class GaussianBanditParams(EnvParams):
    """Config of the Gaussian bandit (the ``env:`` keys of ``id: gaussian_bandit``).

    Attributes:
        dim: action dimension ``d``.
        ref_mean: reference mean ``μ_ref`` (a scalar for every dimension, or a list of ``d``).
        ref_std: reference standard deviation ``σ_ref`` (isotropic, > 0).
        reward: ``"linear"``, ``"quadratic"`` or ``"two_mode"`` (see the module docstring).
        reward_coef: ``c`` of the linear reward (scalar or list of ``d``); the curvature ``a`` (> 0 scalar)
            of the quadratic one; unused by ``two_mode``.
        target: ``x0`` of the quadratic reward (scalar or list of ``d``).
        modes: centers of the ``two_mode`` bumps, each a scalar (the point ``m·(1, …, 1)``) or a list
            of ``d``.
        mode_weights: heights ``w_m ≥ 0`` of the bumps, one per mode.
        mode_std: width ``s > 0`` of the bumps.
        reward_noise: standard deviation of Gaussian noise added to each sampled reward.
        fixed_std: keep the trained policy's std at ``σ_ref`` (only its mean learns), so the KL is seed
            eq. 39, ``‖μ − μ_ref‖²/(2σ_ref²)``; false (default): the std is learned too (eq. 38).
    """

    dim: int = 1
    ref_mean: float | tuple[float, ...] = 0.0
    ref_std: float = 1.0
    reward: str = "linear"
    reward_coef: float | tuple[float, ...] = 1.0
    target: float | tuple[float, ...] = 0.0
    modes: tuple = (-1.0, 2.0)
    mode_weights: tuple[float, ...] = (0.5, 1.0)
    mode_std: float = 0.5
    reward_noise: float = 0.0
    fixed_std: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.fixed_std, bool):
            raise ValueError(f"env.fixed_std must be true or false (got {self.fixed_std!r})")
        d = check_int("dim", self.dim, minimum=1)
        set_field(self, "dim", d)
        check_vector("ref_mean", self.ref_mean, d)
        set_field(self, "ref_std", check_float("ref_std", self.ref_std, positive=True))
        check_choice("reward", self.reward, REWARDS)
        if self.reward == "quadratic":
            if isinstance(self.reward_coef, Sequence):
                raise ValueError("env.reward_coef must be a scalar curvature > 0 for env.reward='quadratic' "
                                 f"(got {self.reward_coef!r})")
            check_float("reward_coef", self.reward_coef, positive=True)
        else:
            check_vector("reward_coef", self.reward_coef, d)
        check_vector("target", self.target, d)
        if not isinstance(self.modes, Sequence) or isinstance(self.modes, str) or not self.modes:
            raise ValueError(f"env.modes must be a non-empty list of centers (got {self.modes!r})")
        for m in self.modes:
            check_vector("modes", m, d)
        weights = check_floats("mode_weights", self.mode_weights, length=len(self.modes))
        if min(weights) < 0:
            raise ValueError(f"env.mode_weights must be non-negative (got {list(weights)})")
        set_field(self, "mode_std", check_float("mode_std", self.mode_std, positive=True))
        set_field(self, "reward_noise", check_float("reward_noise", self.reward_noise, minimum=0.0))

    # -- tensors ---------------------------------------------------------------------------------------
    def ref_mean_vector(self) -> Tensor:
        """``[d]`` float64 reference mean ``μ_ref``."""
        return torch.tensor(check_vector("ref_mean", self.ref_mean, self.dim), dtype=torch.float64)

    def coef_vector(self) -> Tensor:
        """``[d]`` float64 linear coefficient ``c`` (for ``quadratic``: the curvature in every entry)."""
        return torch.tensor(check_vector("reward_coef", self.reward_coef, self.dim), dtype=torch.float64)

    def target_vector(self) -> Tensor:
        """``[d]`` float64 quadratic target ``x0``."""
        return torch.tensor(check_vector("target", self.target, self.dim), dtype=torch.float64)

    def mode_centers(self) -> Tensor:
        """``[M, d]`` float64 bump centers."""
        return torch.tensor([check_vector("modes", m, self.dim) for m in self.modes], dtype=torch.float64)

    def action_bound(self) -> float:
        """Half-width ``b`` of the gymnasium action box ``[−b, b]^d``.

        ``b = max(|μ_ref|, |x0|, |modes|) + 10·σ_ref``: generous enough that the reference, the targets and
        the optimum at any moderate β lie well inside it. The batched core does not clip.
        """
        points = [self.ref_mean_vector().abs().max()]
        if self.reward == "quadratic":
            points.append(self.target_vector().abs().max())
        if self.reward == "two_mode":
            points.append(self.mode_centers().abs().max())
        return float(max(points)) + 10.0 * self.ref_std

    def size_hint(self) -> tuple[int, int, int, int]:
        """One state, one step; a sample holds ``2·dim`` floats (action and mean)."""
        return 1, 2 * self.dim, 1, 1

    def core(self, device: torch.device | str | None = None) -> GaussianBanditCore:
        """The batched core of these params."""
        return GaussianBanditCore(self, device)


class GaussianBanditCore:
    """Batched torch core of the Gaussian bandit: one state, one step, actions ``[*B, d]``.

    Mirrors :class:`~envs.tabular.TabularCore` where it can: the single state is 0 and the sink is 1, and
    :meth:`step` returns ``(next_state, reward, done)`` with every episode ending after one step.
    """

    def __init__(self, params: GaussianBanditParams, device: torch.device | str | None = None):
        self.params = params
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dim = params.dim
        self.ref_mean = params.ref_mean_vector().to(self.device)
        self.ref_std = params.ref_std
        self.coef = params.coef_vector().to(self.device)
        self.target = params.target_vector().to(self.device)
        self.modes = params.mode_centers().to(self.device)
        self.mode_weights = torch.tensor(params.mode_weights, dtype=torch.float64, device=self.device)
        self.reward_noise = params.reward_noise
        self.terminal = 1

    @property
    def needs_normal(self) -> bool:
        """Whether ``step`` reads ``z`` (the rewards are noisy)."""
        return self.reward_noise > 0

    def reward(self, x: Tensor) -> Tensor:
        """Expected reward ``[*B]`` of actions ``x`` ``[*B, d]`` (in ``x``'s floating dtype)."""
        p = self.params
        if p.reward == "linear":
            return (x * self.coef.to(x)).sum(-1)
        if p.reward == "quadratic":
            return -0.5 * float(p.reward_coef) * ((x - self.target.to(x)) ** 2).sum(-1)
        sq = ((x.unsqueeze(-2) - self.modes.to(x)) ** 2).sum(-1)  # [*B, M]
        return (self.mode_weights.to(x) * torch.exp(-sq / (2 * p.mode_std**2))).sum(-1)

    def reset(self, u: Tensor) -> Tensor:
        """The single state 0, ``[*B]`` int64 (``u`` only gives the batch shape)."""
        return torch.zeros(u.shape, dtype=torch.long, device=u.device)

    def step(self, action: Tensor, z: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One pull per batch element.

        Args:
            action: ``[*B, d]`` actions (unclipped).
            z: ``[*B]`` standard normals for the reward noise (ignored when ``reward_noise == 0``).
        Returns:
            ``(next_state [*B] int64 (= 1, the sink), reward [*B], done [*B] bool (all true))``.
        """
        reward = self.reward(action)
        if self.reward_noise > 0 and z is not None:
            reward = reward + self.reward_noise * z.to(reward)
        batch = action.shape[:-1]
        next_state = torch.full(batch, self.terminal, dtype=torch.long, device=action.device)
        return next_state, reward, torch.ones(batch, dtype=torch.bool, device=action.device)

    def sample_draws(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None
                     ) -> Tensor | None:
        """The normal ``z`` ``[*shape]`` float64 of one ``step``, drawn only if :attr:`needs_normal`."""
        if not self.needs_normal:
            return None
        return torch.randn(shape, generator=generator, device=self.device, dtype=torch.float64)

    def sample_step(self, action: Tensor, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`step` with its noise drawn from ``generator``."""
        return self.step(action, self.sample_draws(action.shape[:-1], generator))

    def sample_reference(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n, d]`` float64 actions drawn from the reference ``N(μ_ref, σ_ref² I)``."""
        eps = torch.randn(n, self.dim, generator=generator, device=self.device, dtype=torch.float64)
        return self.ref_mean + self.ref_std * eps


# ---------------------------------------------------------------------------------------------------------
# Closed-form oracles
# ---------------------------------------------------------------------------------------------------------


def gaussian_kl(mu: Tensor, std: Tensor | float, mu_ref: Tensor, std_ref: Tensor | float) -> Tensor:
    """KL(N(μ, σ²I) ‖ N(μ_ref, σ_ref²I)) in ``k`` dimensions, batched (seed eqs. 37/38).

    ``k(log σ_ref/σ + σ²/(2σ_ref²) − ½) + ‖μ − μ_ref‖²/(2σ_ref²)``.

    Args:
        mu: ``[*B, k]`` means. std: scalar or ``[*B]`` standard deviations (> 0).
        mu_ref: ``[*B, k]`` or ``[k]``. std_ref: scalar or ``[*B]`` (> 0).
    Returns:
        ``[*B]`` KL in nats (in ``mu``'s dtype).
    """
    std = torch.as_tensor(std, dtype=mu.dtype, device=mu.device)
    std_ref = torch.as_tensor(std_ref, dtype=mu.dtype, device=mu.device)
    k = mu.shape[-1]
    var_ratio = (std / std_ref) ** 2
    shape_term = k * (-0.5 * torch.log(var_ratio) + 0.5 * var_ratio - 0.5)
    return shape_term + ((mu - mu_ref.to(mu)) ** 2).sum(-1) / (2 * std_ref**2)


def gibbs_optimum(params: GaussianBanditParams, beta: float | Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of the optimum of E_π[r] − β·KL(π‖π_ref), ``π* ∝ π_ref·e^{r/β}``, in closed form.

    Linear ``r = c·x``: ``N(μ_ref + σ_ref² c/β, σ_ref²)``. Quadratic ``r = −(a/2)‖x − x0‖²``: precision
    ``λ = 1/σ_ref² + a/β``, mean ``(μ_ref/σ_ref² + a·x0/β)/λ``, std ``λ^{-1/2}``.

    Args:
        beta: a positive scalar or ``[*B]`` tensor.
    Returns:
        ``(mean [*B, d], std [*B])`` float64.
    Raises:
        ValueError: for ``two_mode`` (no closed form) or a non-positive β.
    """
    check_beta(beta)
    if params.reward == "two_mode":
        raise ValueError("gibbs_optimum has no closed form for env.reward='two_mode' "
                         "(closed forms exist for 'linear' and 'quadratic'); integrate numerically")
    b = torch.as_tensor(beta, dtype=torch.float64)
    mu_ref, var_ref = params.ref_mean_vector(), params.ref_std**2
    if params.reward == "linear":
        mean = mu_ref + var_ref * params.coef_vector() / b[..., None]
        return mean, torch.full(b.shape, params.ref_std, dtype=torch.float64)
    a = float(params.reward_coef)
    precision = 1.0 / var_ref + a / b
    mean = (mu_ref / var_ref + a * params.target_vector() / b[..., None]) / precision[..., None]
    return mean, precision.rsqrt()


def expected_reward(params: GaussianBanditParams, mean: Tensor, std: Tensor | float) -> Tensor:
    """Exact ``E_{x~N(mean, std² I)}[r(x)]`` ``[*B]`` for ``mean [*B, d]`` and ``std`` scalar or ``[*B]``.

    Linear: ``c·μ``. Quadratic: ``−(a/2)(‖μ − x0‖² + d σ²)``. Two-mode: ``Σ_m w_m (s²/(s²+σ²))^{d/2}
    exp(−‖μ − m_m‖²/(2(s²+σ²)))`` (Gaussian convolution of each bump).
    """
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    var = std**2
    d = params.dim
    if params.reward == "linear":
        return (mean * params.coef_vector().to(mean)).sum(-1)
    if params.reward == "quadratic":
        sq = ((mean - params.target_vector().to(mean)) ** 2).sum(-1)
        return -0.5 * float(params.reward_coef) * (sq + d * var)
    s2 = params.mode_std**2
    tot = (s2 + var)[..., None]  # [*B, 1]
    sq = ((mean.unsqueeze(-2) - params.mode_centers().to(mean)) ** 2).sum(-1)  # [*B, M]
    w = torch.tensor(params.mode_weights, dtype=mean.dtype, device=mean.device)
    return (w * (s2 / tot) ** (d / 2) * torch.exp(-sq / (2 * tot))).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# gymnasium shell
# ---------------------------------------------------------------------------------------------------------


class GaussianBanditEnv(CoreEnv):
    """``reflab/GaussianBandit-v0``: observation ``Discrete(1)`` (always 0), action ``Box([−b, b]^d)``.

    ``b`` is :meth:`GaussianBanditParams.action_bound`; actions outside the box are clipped to it (the
    batched core itself never clips). The box is float32 (as stable-baselines3 prefers); actions are
    converted to float64 before the reward is computed. Every episode is one step.
    """

    params_cls = GaussianBanditParams

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        super().__init__(render_mode, **kwargs)
        self.core = GaussianBanditCore(self.params)
        bound = self.params.action_bound()
        self.action_space = spaces.Box(-bound, bound, shape=(self.params.dim,), dtype=np.float32)
        self.observation_space = spaces.Discrete(1)
        self.running = False
        self.last_action: np.ndarray | None = None
        self.last_reward: float | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        self._reseed(seed)
        self.running = True
        self.last_action = self.last_reward = None
        return np.int64(0), {}

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict]:
        if not self.running:
            raise RuntimeError("step() called without a running episode; call reset() first")
        x = np.clip(np.asarray(action, dtype=np.float64).reshape(self.params.dim),
                    self.action_space.low, self.action_space.high)
        _, reward_t, _ = self.core.sample_step(torch.from_numpy(x)[None], self.generator)
        self.running = False
        self.last_action, self.last_reward = x, float(reward_t[0])
        return np.int64(0), self.last_reward, True, False, {}

    def _render_ansi(self) -> str:
        if self.last_action is None:
            return f"Gaussian bandit in {self.params.dim} dimensions: choose x"
        coords = ", ".join(f"{v:+.3f}" for v in self.last_action)
        return f"x = ({coords}): reward {self.last_reward:+.4f}"
