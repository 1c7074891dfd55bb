"""A toy diffusion chain: T Gaussian denoising steps from ``x_T ~ N(0, I)`` to ``x_0`` in ``d`` dimensions.

The data distribution is a Gaussian mixture ``p_data(x) = Σ_m w_m N(x; m_m, s_m² I)``. The forward (noising)
process is DDPM's, ``q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)`` with ``ᾱ_t = Π_{s≤t} (1 − b_s)`` and the noise
schedule ``b_t`` linear from ``noise_start`` (t = 1) to ``noise_end`` (t = T). Its marginals are Gaussian
mixtures in closed form, ``q_t(x) = Σ_m w_m N(x; √ᾱ_t m_m, (ᾱ_t s_m² + 1 − ᾱ_t) I)``.

**Reference denoiser.** Step ``t`` (``t = T, …, 1``) is the Gaussian policy
``x_{t−1} ~ N(μ_ref(x_t, t), σ_t² I)`` with

* ``μ_ref(x_t, t) = E_q[x_{t−1} | x_t] = c1_t·E_q[x_0 | x_t] + c2_t·x_t`` (DDPM's posterior-mean coefficients
  ``c1_t = √ᾱ_{t−1} b_t/(1 − ᾱ_t)``, ``c2_t = √(1 − b_t)(1 − ᾱ_{t−1})/(1 − ᾱ_t)``), where ``E_q[x_0 | x_t]`` is
  the exact Tweedie denoiser of the mixture: component responsibilities times each component's Gaussian
  posterior mean (:meth:`DiffusionChainCore.denoise`). Equivalently ``E_q[x_0|x_t] = (x_t + (1 − ᾱ_t)∇log
  q_t(x_t))/√ᾱ_t`` with the exact score.
* ``σ_t² = b̃_t = b_t (1 − ᾱ_{t−1})/(1 − ᾱ_t)``, the forward posterior's variance (``step_variance =
  "posterior"``, the default; at t = 1, where b̃_1 = 0, ``b_1`` is used), or ``σ_t² = b_t`` (``"beta"``,
  DDPM's upper choice; its x_0 is wider and its mode mix 0.014 further from ``w`` at the defaults).

*What "exact" means here*: the mean of every step is the exact conditional mean of the forward process (no
network, no training, no score-matching error). The true reverse kernel ``q(x_{t−1} | x_t)`` of a mixture
is itself a mixture, not a Gaussian, so the chain's x_0 distribution ``p_ref(x_0)`` is DDPM's Gaussian
approximation of ``p_data``: close for enough steps (see ``tests/envs/test_diffusion_chain_env.py``: the
mode mix of the default 10-step chain matches ``w`` within Monte-Carlo error), not identical. Oracles that
need ``p_ref`` itself (the KL-optimal tilt) therefore weight samples of the reference chain; closed forms
relative to ``p_data`` are given beside them.

**KL.** With the policy's std fixed to the reference's σ_t, the per-step KL is seed eq. 39,
``KL_t = ‖μ_θ(x_t, t) − μ_ref(x_t, t)‖²/(2σ_t²)`` (:func:`step_kl`), and by the chain rule the sequence KL
is ``KL(P_θ(τ) ‖ P_ref(τ)) = E_{τ~P_θ} Σ_t KL_t(x_t)``.

**Tilt.** The optimum of ``E[r(x_0)] − β·KL(P_θ(τ) ‖ P_ref(τ))`` over *all* path measures is
``P*(τ) ∝ P_ref(τ) e^{r(x_0)/β}``, whose x_0 marginal is ``p*(x_0) ∝ p_ref(x_0) e^{r(x_0)/β}``
(:func:`tilt_weights`). A policy with Gaussian steps of fixed σ_t can approach but not always reach it.

Rewards of ``x_0`` (``reward``):

* ``"bump"``: ``r(x) = h·exp(−‖x − c‖²/(2 w²))`` with height ``h = reward_coef``, centre ``c = reward_center``,
  width ``w = reward_width``: favours the mode nearest ``c`` and leaves the others alone.
* ``"linear"``: ``r(x) = a·x`` with ``a = reward_coef`` (scalar: ``a·(1, …, 1)``).
* ``"quadratic"``: ``r(x) = −(k/2)‖x − c‖²`` with curvature ``k = reward_coef`` (> 0), centre ``c``.
"""

from __future__ import annotations

import math
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
from envs.softmax import softmax2_first_, softmax2_is_exact, softmax_last

REWARDS = ("bump", "linear", "quadratic")
STEP_VARIANCES = ("beta", "posterior")


@dataclass(frozen=True)
class DiffusionChainParams(EnvParams):
    """Config of the toy diffusion chain (the ``env:`` keys of ``id: diffusion_chain``).

    Attributes:
        dim: dimension ``d`` of ``x`` (figures show dimension 0).
        steps: number of denoising steps ``T`` (the episode length).
        noise_start, noise_end: DDPM noise schedule ``b_1`` and ``b_T`` (linear in between, in (0, 1)).
        step_variance: ``"beta"`` (σ_t² = b_t) or ``"posterior"`` (σ_t² = b̃_t, b_1 at t = 1).
        modes: centres ``m_m`` of the data mixture, each a scalar (the point ``m·(1, …, 1)``) or a list of d.
        mode_weights: mixture weights ``w_m`` (non-negative, summing to 1).
        mode_std: component standard deviation ``s_m`` (> 0; a scalar for all, or one per mode).
        reward: ``"bump"``, ``"linear"`` or ``"quadratic"`` (see the module docstring).
        reward_coef: bump height ``h`` / linear coefficient ``a`` (scalar or list of d) / curvature ``k`` (> 0).
        reward_center: centre ``c`` of the bump or the quadratic (scalar or list of d).
        reward_width: width of the bump (> 0).
        reward_noise: standard deviation of Gaussian noise added to each sampled reward.
    """

    dim: int = 1
    steps: int = 10
    noise_start: float = 0.02
    noise_end: float = 0.5
    step_variance: str = "posterior"
    modes: tuple = (-2.0, 2.0)
    mode_weights: tuple[float, ...] = (0.7, 0.3)
    mode_std: float | tuple[float, ...] = 0.5
    reward: str = "bump"
    reward_coef: float | tuple[float, ...] = 1.0
    reward_center: float | tuple[float, ...] = 2.0
    reward_width: float = 1.0
    reward_noise: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        d = check_int("dim", self.dim, minimum=1)
        set_field(self, "dim", d)
        set_field(self, "steps", check_int("steps", self.steps, minimum=1))
        lo = check_float("noise_start", self.noise_start, positive=True, maximum=0.999)
        hi = check_float("noise_end", self.noise_end, positive=True, maximum=0.999)
        set_field(self, "noise_start", lo)
        set_field(self, "noise_end", hi)
        check_choice("step_variance", self.step_variance, STEP_VARIANCES)
        if not isinstance(self.modes, Sequence) or isinstance(self.modes, str) or not self.modes:
            raise ValueError(f"env.modes must be a non-empty list of centers (got {self.modes!r})")
        for m in self.modes:
            check_vector("modes", m, d)
        weights = check_floats("mode_weights", self.mode_weights, length=len(self.modes))
        if min(weights) < 0 or abs(math.fsum(weights) - 1.0) > 1e-6:
            raise ValueError(f"env.mode_weights must be non-negative and sum to 1 (got {list(weights)})")
        stds = self.mode_std if isinstance(self.mode_std, Sequence) else (self.mode_std,) * len(self.modes)
        stds = check_floats("mode_std", stds, length=len(self.modes))
        if min(stds) <= 0:
            raise ValueError(f"env.mode_std must be > 0 (got {self.mode_std!r})")
        check_choice("reward", self.reward, REWARDS)
        if self.reward == "linear":
            check_vector("reward_coef", self.reward_coef, d)
        elif isinstance(self.reward_coef, Sequence):
            raise ValueError(f"env.reward_coef must be a scalar for env.reward={self.reward!r} "
                             f"(got {self.reward_coef!r})")
        elif self.reward == "quadratic":
            check_float("reward_coef", self.reward_coef, positive=True)
        else:
            check_float("reward_coef", self.reward_coef)
        check_vector("reward_center", self.reward_center, d)
        set_field(self, "reward_width", check_float("reward_width", self.reward_width, positive=True))
        set_field(self, "reward_noise", check_float("reward_noise", self.reward_noise, minimum=0.0))

    # -- tensors (float64, CPU) --------------------------------------------------------------------------
    def mode_centers(self) -> Tensor:
        """``[M, d]`` mixture centres."""
        return torch.tensor([check_vector("modes", m, self.dim) for m in self.modes], dtype=torch.float64)

    def mode_weight_vector(self) -> Tensor:
        """``[M]`` mixture weights (renormalized to sum to 1)."""
        w = torch.tensor(self.mode_weights, dtype=torch.float64)
        return w / w.sum()

    def mode_std_vector(self) -> Tensor:
        """``[M]`` component standard deviations."""
        s = self.mode_std if isinstance(self.mode_std, Sequence) else (self.mode_std,) * len(self.modes)
        return torch.tensor(s, dtype=torch.float64)

    def noise_schedule(self) -> Tensor:
        """``[T + 1]`` DDPM noise ``b_t`` indexed by t (entry 0 is 0)."""
        b = torch.linspace(self.noise_start, self.noise_end, self.steps, dtype=torch.float64)
        return torch.cat([torch.zeros(1, dtype=torch.float64), b])

    def action_bound(self) -> float:
        """Half-width of the gymnasium boxes: the farthest mode centre plus 10 (x_T is N(0, I))."""
        return float(self.mode_centers().abs().max()) + 10.0

    def size_hint(self) -> tuple[int, int, int, int]:
        """``steps`` denoising steps; per step a sample holds x_t, x_{t−1} and three means of ``dim`` floats."""
        return self.steps, 8 * self.dim, self.steps, 1

    def core(self, device: torch.device | str | None = None) -> DiffusionChainCore:
        """The batched core of these params."""
        return DiffusionChainCore(self, device)


class DiffusionChainCore:
    """Batched torch core: the exact reference denoiser, step log-densities and KLs, and the reward.

    Every method takes tensors with any leading batch shape ``[*B, d]`` on the core's device and works in
    their floating dtype (schedule constants are converted); the step index ``t`` (1 … T) is a Python int,
    since every chain of a batch moves in lockstep.
    """

    def __init__(self, params: DiffusionChainParams, device: torch.device | str | None = None):
        self.params = params
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dim, self.T = params.dim, params.steps
        dev = self.device
        b = params.noise_schedule()
        alpha_bar = torch.cumprod(1.0 - b, 0)  # ᾱ_0 = 1
        self.noise = b.to(dev)
        self.alpha_bar = alpha_bar.to(dev)
        post = torch.zeros_like(b)
        post[1:] = b[1:] * (1.0 - alpha_bar[:-1]) / (1.0 - alpha_bar[1:])
        var = b.clone() if params.step_variance == "beta" else post.clone()
        if params.step_variance == "posterior":
            var[1] = b[1]
        self.step_var = var.to(dev)  # [T + 1], entry 0 unused
        c1 = torch.zeros_like(b)
        c2 = torch.zeros_like(b)
        c1[1:] = alpha_bar[:-1].sqrt() * b[1:] / (1.0 - alpha_bar[1:])
        c2[1:] = (1.0 - b[1:]).sqrt() * (1.0 - alpha_bar[:-1]) / (1.0 - alpha_bar[1:])
        self.c1, self.c2 = c1.to(dev), c2.to(dev)
        self.modes = params.mode_centers().to(dev)  # [M, d]
        self.log_w = params.mode_weight_vector().log().to(dev)  # [M]
        self.mode_var = params.mode_std_vector().square().to(dev)  # [M]
        self.reward_noise = params.reward_noise
        self._consts: dict[tuple[int, torch.dtype], dict[str, Tensor]] = {}
        self._coef = torch.tensor(check_vector("reward_coef", params.reward_coef, params.dim)
                                  if params.reward == "linear" else (float(params.reward_coef),) * params.dim,
                                  dtype=torch.float64, device=dev)
        self._center = torch.tensor(check_vector("reward_center", params.reward_center, params.dim),
                                    dtype=torch.float64, device=dev)

    @property
    def n_modes(self) -> int:
        return int(self.modes.shape[0])

    def step_std(self, t: int) -> float:
        """σ_t of step ``t`` (1 … T)."""
        return float(self.step_var[t].sqrt())

    # -- the forward process and the exact denoiser ---------------------------------------------------------
    def _marginal(self, x: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """Log-responsibilities ``[*B, M]`` of the components of ``q_t`` at ``x``, and their means ``[M, d]``
        and variances ``[M]``."""
        ab = self.alpha_bar[t].to(x.dtype)
        means = ab.sqrt() * self.modes.to(x.dtype)
        var = ab * self.mode_var.to(x.dtype) + (1.0 - ab)
        sq = (x.unsqueeze(-2) - means).square().sum(-1)  # [*B, M]
        log_comp = self.log_w.to(x.dtype) - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return log_comp, means, var

    def log_marginal(self, x: Tensor, t: int = 0) -> Tensor:
        """``log q_t(x)`` ``[*B]`` (t = 0: the data density)."""
        log_comp, _, _ = self._marginal(x, t)
        return torch.logsumexp(log_comp, -1)

    def responsibilities(self, x: Tensor, t: int = 0) -> Tensor:
        """``q_t(m | x)`` ``[*B, M]``: posterior probability of each mixture component (t = 0: under p_data)."""
        log_comp, _, _ = self._marginal(x, t)
        return softmax_last(log_comp)

    def denoise(self, x: Tensor, t: int) -> Tensor:
        """Exact ``E_q[x_0 | x_t = x]`` ``[*B, d]`` (Tweedie): ``Σ_m q_t(m|x)·(m_m + √ᾱ_t s_m²/v_m (x − √ᾱ_t m_m))``
        with ``v_m = ᾱ_t s_m² + 1 − ᾱ_t``."""
        log_comp, means, var = self._marginal(x, t)
        resp = softmax_last(log_comp)  # [*B, M]
        ab = self.alpha_bar[t].to(x.dtype)
        gain = ab.sqrt() * self.mode_var.to(x.dtype) / var  # [M]
        post = self.modes.to(x.dtype) + gain[:, None] * (x.unsqueeze(-2) - means)  # [*B, M, d]
        return (resp.unsqueeze(-1) * post).sum(-2)

    def ref_mean(self, x: Tensor, t: int, out: Tensor | None = None) -> Tensor:
        """The reference denoiser's step mean ``μ_ref(x_t, t) = E_q[x_{t−1} | x_t]`` ``[*B, d]`` (written into
        ``out`` if given)."""
        if self.dim == 1:
            return self._ref_mean_1d(x, t, out)
        return torch.add(self.c1[t].to(x.dtype) * self.denoise(x, t), self.c2[t].to(x.dtype) * x, out=out)

    def _step_constants(self, t: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """The per-component constants of step ``t`` in ``dtype`` (cached), computed by the same operations as
        :meth:`_marginal` and :meth:`denoise`: ``means``, ``var``, ``log_w``, ``log_norm`` (``½d·log 2πv``),
        ``gain``, ``modes`` (each ``[M]`` for d = 1) and ``c1``, ``c2`` (0-d)."""
        key = (t, dtype)
        if key not in self._consts:
            ab = self.alpha_bar[t].to(dtype)
            var = ab * self.mode_var.to(dtype) + (1.0 - ab)
            self._consts[key] = {
                "means": (ab.sqrt() * self.modes.to(dtype))[:, 0], "var": var, "log_w": self.log_w.to(dtype),
                "log_norm": 0.5 * self.dim * torch.log(2 * math.pi * var),
                "gain": ab.sqrt() * self.mode_var.to(dtype) / var, "modes": self.modes.to(dtype)[:, 0],
                "c1": self.c1[t].to(dtype), "c2": self.c2[t].to(dtype)}
        return self._consts[key]

    def _ref_mean_1d(self, x: Tensor, t: int, out: Tensor | None = None) -> Tensor:
        """:meth:`ref_mean` for d = 1 (``x [*B, 1]``), the same numbers from ``[*B, M]`` tensors: no component
        axis of size d to sum (a sum over one non-negative number is that number) and no constants rebuilt."""
        c = self._step_constants(t, x.dtype)
        if self.n_modes == 2 and x.device.type == "cpu" and softmax2_is_exact():
            return self._ref_mean_1d_two(x, c, out)
        diff = x - c["means"]  # [*B, M]
        # log w − ½(x − m)²/v − ½·log 2πv, in place
        t_sq = diff.square().mul_(0.5).div_(c["var"])
        log_comp = torch.sub(c["log_w"], t_sq, out=t_sq).sub_(c["log_norm"])
        resp = softmax_last(log_comp, inplace=True)
        weighted = diff.mul_(c["gain"]).add_(c["modes"]).mul_(resp)  # q_t(m|x)·(m + gain·(x − √ᾱ m))
        if weighted.shape[-1] == 2:  # the sum of two: a + b, and +0 for −0 + −0 as the reduction gives
            den = (weighted[..., :1] + weighted[..., 1:]).add_(0.0)
        else:
            den = weighted.sum(-1, keepdim=True)
        return torch.add(den.mul_(c["c1"]), c["c2"] * x, out=out)

    def _ref_mean_1d_two(self, x: Tensor, c: dict[str, Tensor], out: Tensor | None) -> Tensor:
        """:meth:`_ref_mean_1d` for two components, the same operations on the same operands per element, laid
        out component-major (``[2, *B]``: each component's values one contiguous block, its constants
        broadcast as scalars) instead of ``[*B, 2]``, whose axis of two makes every kernel loop two elements
        at a time."""
        col = (2,) + (1,) * (x.dim() - 1)
        diff = x[..., 0].unsqueeze(0) - c["means"].view(col)  # [2, *B]
        t_sq = diff.square().mul_(0.5).div_(c["var"].view(col))
        log_comp = torch.sub(c["log_w"].view(col), t_sq, out=t_sq).sub_(c["log_norm"].view(col))
        resp = softmax2_first_(log_comp)
        weighted = diff.mul_(c["gain"].view(col)).add_(c["modes"].view(col)).mul_(resp)
        den = (weighted[0] + weighted[1]).add_(0.0).unsqueeze(-1)  # [*B, 1]
        return torch.add(den.mul_(c["c1"]), c["c2"] * x, out=out)

    def log_prob(self, x_prev: Tensor, mean: Tensor, t: int | Tensor) -> Tensor:
        """Log-density ``[*B]`` of ``x_{t−1} = x_prev`` under ``N(mean, σ_t² I)`` (``t`` an int or a tensor of
        steps broadcasting against ``[*B]``)."""
        var = self.step_var[t].to(x_prev.dtype)
        return -0.5 * _sum_last(x_prev - mean) / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def step_kl(self, mean: Tensor, ref_mean: Tensor, t: int | Tensor) -> Tensor:
        """Closed-form KL(N(mean, σ_t²I) ‖ N(ref_mean, σ_t²I)) = ‖mean − ref_mean‖²/(2σ_t²) ``[*B]`` (seed eq. 39)."""
        return _sum_last(mean - ref_mean) / (2.0 * self.step_var[t].to(mean.dtype))

    # -- reward -----------------------------------------------------------------------------------------------
    def reward(self, x0: Tensor) -> Tensor:
        """Expected reward ``[*B]`` of final samples ``x0 [*B, d]``."""
        p = self.params
        if p.reward == "linear":
            return (x0 * self._coef.to(x0)).sum(-1)
        sq = (x0 - self._center.to(x0)).square().sum(-1)
        if p.reward == "quadratic":
            return -0.5 * float(p.reward_coef) * sq
        return float(p.reward_coef) * torch.exp(-sq / (2.0 * p.reward_width**2))

    def noisy_reward(self, x0: Tensor, z: Tensor | None = None) -> Tensor:
        """:meth:`reward` plus ``reward_noise·z`` (``z [*B]`` standard normals; ignored when the noise is 0)."""
        r = self.reward(x0)
        if self.reward_noise > 0 and z is not None:
            r = r + self.reward_noise * z.to(r)
        return r

    # -- sampling -------------------------------------------------------------------------------------------
    def sample_reference(self, n: int, generator: torch.Generator | None = None,
                         noise: Tensor | None = None) -> Tensor:
        """``[n, d]`` float64 final samples ``x_0`` of the reference chain.

        ``noise`` (optional, ``[n, T + 1, d]`` standard normals: ``x_T`` first, then one per step T … 1)
        replaces draws from ``generator``.
        """
        if noise is None:
            noise = torch.randn(n, self.T + 1, self.dim, generator=generator, dtype=torch.float64,
                                device=self.device)
        x = noise[:, 0]
        for i, t in enumerate(range(self.T, 0, -1), start=1):
            x = self.ref_mean(x, t) + self.step_std(t) * noise[:, i]
        return x


def _sum_last(diff: Tensor) -> Tensor:
    """``‖diff‖²`` over the last axis ``[*B, d] → [*B]``; for d = 1 the square itself (a sum of one
    non-negative number is that number), without a reduction kernel."""
    sq = diff.square()
    return sq[..., 0] if sq.shape[-1] == 1 else sq.sum(-1)


# ---------------------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------------------


def tilt_weights(reward: Tensor, beta: float | Tensor) -> Tensor:
    """Self-normalized importance weights of reference-chain samples for ``p* ∝ p_ref·e^{r/β}``.

    Args:
        reward: ``[n]`` (or ``[R, n]``) rewards of ``n`` samples of the reference chain (already scaled).
        beta: positive scalar or ``[R]`` tensor.
    Returns:
        weights of the same shape as ``reward`` broadcast with β, summing to 1 over the last axis, computed
        in log space. ``E_{p*}[f] ≈ Σ_i w_i f(x_i)``; the effective sample size is ``1/Σ w_i²``.
    """
    check_beta(beta)
    b = torch.as_tensor(beta, dtype=reward.dtype, device=reward.device)
    if b.dim() > 0:
        b = b.unsqueeze(-1)
    return torch.softmax(reward / b, dim=-1)


def tilted_data_mixture(params: DiffusionChainParams, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form tilt of the *data* mixture, ``p_data(x)·e^{r(x)/β}/Z``, for linear and quadratic rewards.

    Each component stays Gaussian. Linear ``r = a·x``: mean ``m + s² a/β``, std ``s``, weight
    ``∝ w·exp(a·m/β + s²‖a‖²/(2β²))``. Quadratic ``r = −(k/2)‖x − c‖²``: precision ``λ = 1/s² + k/β``, mean
    ``(m/s² + k c/β)/λ``, weight ``∝ w·(λ s²)^{−d/2}·exp(−(k/β)‖m − c‖²/(2(1 + k s²/β)))``.

    Returns:
        ``(weights [M], means [M, d], stds [M])`` float64.
    Raises:
        ValueError: for the bump reward (no closed form: use :func:`tilt_weights` or :func:`density_grid`).
    """
    check_beta(beta)
    if params.reward == "bump":
        raise ValueError("tilted_data_mixture has a closed form for env.reward='linear' and 'quadratic' only")
    w, m, s2 = params.mode_weight_vector(), params.mode_centers(), params.mode_std_vector().square()
    d = params.dim
    if params.reward == "linear":
        a = torch.tensor(check_vector("reward_coef", params.reward_coef, d), dtype=torch.float64)
        log_w = w.log() + (m @ a) / beta + s2 * a.square().sum() / (2 * beta**2)
        return torch.softmax(log_w, 0), m + s2[:, None] * a / beta, s2.sqrt()
    k = float(params.reward_coef)
    c = torch.tensor(check_vector("reward_center", params.reward_center, d), dtype=torch.float64)
    lam = 1.0 / s2 + k / beta
    mean = (m / s2[:, None] + k * c / beta) / lam[:, None]
    log_w = (w.log() - 0.5 * d * torch.log(lam * s2)
             - (k / beta) * (m - c).square().sum(-1) / (2 * (1 + k * s2 / beta)))
    return torch.softmax(log_w, 0), mean, lam.rsqrt()


def density_grid(params: DiffusionChainParams, beta: float | None, n: int = 241,
                 reward_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Densities of dimension 0 of ``p_data`` and of its tilt ``p_data·e^{scale·r/β}`` on a grid (quadrature).

    In d = 2 the other dimension is integrated out on the same grid; higher dimensions are not supported.
    The tilt here is of ``p_data`` (the chain's ``p_ref`` has no closed-form density); β = None or a
    reward scale of 0 gives the data density again.

    Returns:
        ``(x [n], data [n], tilt [n])`` numpy float64; each density integrates to 1 over the grid.
    """
    if params.dim > 2:
        raise ValueError(f"density_grid supports env.dim 1 or 2 (got {params.dim})")
    centers, stds = params.mode_centers(), params.mode_std_vector()
    lo = float((centers - 5 * stds.max()).min())
    hi = float((centers + 5 * stds.max()).max())
    if params.reward in ("bump", "quadratic"):
        c = torch.tensor(check_vector("reward_center", params.reward_center, params.dim), dtype=torch.float64)
        lo, hi = min(lo, float(c.min()) - 1.0), max(hi, float(c.max()) + 1.0)
    xs = torch.linspace(lo, hi, n, dtype=torch.float64)
    core = DiffusionChainCore(params)
    if params.dim == 1:
        pts = xs[:, None]
    else:
        pts = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    log_p = core.log_marginal(pts, 0)
    log_t = log_p if beta is None or reward_scale == 0 else log_p + reward_scale * core.reward(pts) / beta
    dx = float(xs[1] - xs[0])
    out = []
    for lp in (log_p, log_t):
        dens = torch.exp(lp - lp.max())
        if params.dim == 2:
            dens = dens.reshape(n, n).sum(1)
        out.append((dens / (dens.sum() * dx)).numpy())
    return xs.numpy(), out[0], out[1]


# ---------------------------------------------------------------------------------------------------------
# gymnasium shell
# ---------------------------------------------------------------------------------------------------------


class DiffusionChainEnv(CoreEnv):
    """``reflab/DiffusionChain-v0``: observation ``(x_t, t)`` as a float32 Box of ``d + 1``, action ``x_{t−1}``.

    ``reset`` draws ``x_T ~ N(0, I)``; each ``step(action)`` sets ``x_{t−1} = action`` (clipped to the box) and
    lowers t; the episode terminates after T steps with reward ``r(x_0)`` (0 before). The agent is the
    denoiser: to act like the reference, sample ``N(info["ref_mean"], info["step_std"]² I)``; ``info`` also
    carries ``t``. Draws (``x_T``, then reward noise) come from the env's torch generator.
    """

    params_cls = DiffusionChainParams

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        super().__init__(render_mode, **kwargs)
        self.core = DiffusionChainCore(self.params)
        bound = self.params.action_bound()
        d, T = self.params.dim, self.params.steps
        self.action_space = spaces.Box(-bound, bound, shape=(d,), dtype=np.float32)
        low = np.concatenate([np.full(d, -bound), [0.0]]).astype(np.float32)
        high = np.concatenate([np.full(d, bound), [float(T)]]).astype(np.float32)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.x: np.ndarray | None = None
        self.t: int = 0
        self.last_reward: float | None = None

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.x, [float(self.t)]]).astype(np.float32)

    def _info(self) -> dict:
        if self.t == 0:
            return {"t": 0}
        x = torch.from_numpy(self.x)[None]
        return {"t": self.t, "ref_mean": self.core.ref_mean(x, self.t)[0].numpy(),
                "step_std": self.core.step_std(self.t)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        self._reseed(seed)
        bound = self.params.action_bound()
        x_T = torch.randn(self.params.dim, generator=self.generator, dtype=torch.float64)
        self.x = np.clip(x_T.numpy(), -bound, bound)
        self.t = self.params.steps
        self.last_reward = None
        return self._obs(), self._info()

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict]:
        if self.x is None or self.t == 0:
            raise RuntimeError("step() called without a running episode; call reset() first")
        self.x = np.clip(np.asarray(action, dtype=np.float64).reshape(self.params.dim),
                         self.action_space.low, self.action_space.high)
        self.t -= 1
        reward = 0.0
        done = self.t == 0
        if done:
            z = torch.randn(1, generator=self.generator, dtype=torch.float64) if self.core.reward_noise > 0 else None
            reward = float(self.core.noisy_reward(torch.from_numpy(self.x)[None], z)[0])
            self.last_reward = reward
        return self._obs(), reward, done, False, self._info()

    def _render_ansi(self) -> str:
        if self.x is None:
            return f"diffusion chain in {self.params.dim} dimensions, {self.params.steps} steps"
        coords = ", ".join(f"{v:+.3f}" for v in self.x)
        tail = f": reward {self.last_reward:+.4f}" if self.t == 0 and self.last_reward is not None else ""
        return f"t = {self.t}, x = ({coords}){tail}"
