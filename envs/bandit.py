"""The multi-armed bandit: one state, one step, the cleanest place to see each KL placement's fixed point.

Arm ``a`` pays ``rewards[a]`` (plus Gaussian noise of std ``reward_noise``). The reference policy — the
"SFT model" — is a fixed distribution over arms. The KL-regularized optimum is the Gibbs policy
``π* ∝ π_ref·e^{r/β}`` (``envs.tabular.soft_value_iteration``); the forward-KL point that k3-as-loss
converges to is ``envs.tabular.forward_kl_stationary_point``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from envs.gym_shell import TabularEnv
from envs.params import EnvParams, check_float, check_floats, check_int, check_probs, set_field
from envs.tabular import TabularMDP

DEFAULT_REWARDS = (1.0, 0.0, 0.0)


@dataclass(frozen=True)
class BanditParams(EnvParams):
    """Config of the bandit (the ``env:`` keys of ``id: bandit``).

    Attributes:
        n_arms: number of arms. Without ``rewards`` the arm means are drawn standard normal from
            ``reward_seed``; with ``rewards`` it may be omitted (or must equal ``len(rewards)``). With
            neither, the bandit is ``rewards = (1, 0, 0)``.
        rewards: the arm means.
        reward_seed: seed of the standard-normal arm means when only ``n_arms`` is given.
        reward_noise: standard deviation of Gaussian noise added to each sampled reward.
        ref_probs: the reference distribution over arms (non-negative, summing to 1 within 1e-6; zeros are
            allowed but make KL(π‖π_ref) infinite for any π that plays such an arm).
        ref_preference: alternatively, reference logits:
            ``π_ref = softmax(ref_preference / ref_temperature)``.
        ref_temperature: temperature of ``ref_preference`` (> 0). Default reference: uniform.
    """

    n_arms: int | None = None
    rewards: tuple[float, ...] | None = None
    reward_seed: int = 0
    reward_noise: float = 0.0
    ref_probs: tuple[float, ...] | None = None
    ref_preference: tuple[float, ...] | None = None
    ref_temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rewards is not None:
            rewards = check_floats("rewards", self.rewards)
            set_field(self, "rewards", rewards)
            if self.n_arms is not None and check_int("n_arms", self.n_arms) != len(rewards):
                raise ValueError(f"env.n_arms must equal len(env.rewards) = {len(rewards)} "
                                 f"(got {self.n_arms})")
        if self.n_arms is not None:
            set_field(self, "n_arms", check_int("n_arms", self.n_arms, minimum=1))
        set_field(self, "reward_seed", check_int("reward_seed", self.reward_seed))
        set_field(self, "reward_noise", check_float("reward_noise", self.reward_noise, minimum=0.0))
        temperature = check_float("ref_temperature", self.ref_temperature, positive=True)
        set_field(self, "ref_temperature", temperature)
        n = self.arm_count
        if self.ref_probs is not None and self.ref_preference is not None:
            raise ValueError("env.ref_probs and env.ref_preference are exclusive: give at most one")
        if self.ref_probs is not None:
            set_field(self, "ref_probs", check_probs("ref_probs", self.ref_probs, length=n))
        if self.ref_preference is not None:
            set_field(self, "ref_preference", check_floats("ref_preference", self.ref_preference, length=n))

    @property
    def arm_count(self) -> int:
        """The number of arms ``A``."""
        if self.rewards is not None:
            return len(self.rewards)
        return self.n_arms if self.n_arms is not None else len(DEFAULT_REWARDS)

    def arm_means(self) -> Tensor:
        """``[A]`` float64 expected reward of each arm."""
        if self.rewards is not None:
            return torch.tensor(self.rewards, dtype=torch.float64)
        if self.n_arms is None:
            return torch.tensor(DEFAULT_REWARDS, dtype=torch.float64)
        g = torch.Generator().manual_seed(self.reward_seed)
        return torch.randn(self.n_arms, generator=g, dtype=torch.float64)

    def ref_logp(self) -> Tensor:
        """``[A]`` float64 log-probabilities of the reference (``-inf`` for zero-probability arms)."""
        n = self.arm_count
        if self.ref_probs is not None:
            return torch.tensor(self.ref_probs, dtype=torch.float64).log()
        if self.ref_preference is not None:
            logits = torch.tensor(self.ref_preference, dtype=torch.float64) / self.ref_temperature
            return torch.log_softmax(logits, dim=-1)
        return torch.full((n,), -math.log(n), dtype=torch.float64)

    def build(self) -> TabularMDP:
        """The bandit as a one-state, horizon-1 :class:`TabularMDP` (``K = 1``, every arm ends the episode).

        Features are the constant ``[[1.0]]`` (``F = 1``).
        """
        n = self.arm_count
        mdp = TabularMDP(
            next_state=torch.ones(1, n, 1, dtype=torch.long),  # 1 = S = the sink
            next_prob=torch.ones(1, n, 1, dtype=torch.float64),
            reward=self.arm_means().view(1, n, 1),
            init_prob=torch.ones(1, dtype=torch.float64),
            ref_logp=self.ref_logp().view(1, n),
            horizon=1,
            features=torch.ones(1, 1, dtype=torch.float32),
            state_time=torch.zeros(1, dtype=torch.long),
            reward_noise=self.reward_noise,
        )
        mdp.validate()
        return mdp


class BanditEnv(TabularEnv):
    """``reflab/Bandit-v0``: observation ``Discrete(1)`` (always 0), action ``Discrete(A)``, one step."""

    params_cls = BanditParams

    def _render_ansi(self) -> str:
        if self.last_action is None:
            return f"bandit with {self.mdp.n_actions} arms: pull one"
        return f"pulled arm {self.last_action}: reward {self.last_reward:+.4f}"
