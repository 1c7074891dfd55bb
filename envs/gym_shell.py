"""The thin gymnasium shells over the batched torch cores.

Every reflab environment is a params dataclass plus a batched torch core; the ``gymnasium.Env`` classes
here only adapt one element of that core (batch 1) to the gymnasium API, so a gymnasium agent (e.g.
stable-baselines3) and the lab's own batched trainer see the same dynamics draw for draw:

* :class:`CoreEnv` holds what all shells share: params from gymnasium keyword arguments (through
  ``params_cls.from_dict``, so unknown keys fail the same way as in a config file), seeding, rendering.
* :class:`TabularEnv` steps a :class:`~envs.tabular.TabularCore`; the bandit, the gridworld and the token
  tree subclass it and only choose spaces, observations and pictures.

Randomness: ``reset(seed=...)`` seeds gymnasium's ``np_random`` and from it a ``torch.Generator``
(:func:`torch_generator`); all draws of an episode come from that generator in the order the batched
core documents, so a core stepped with the same generator and actions reproduces the shell exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from envs.params import EnvParams
from envs.tabular import TabularCore, TabularMDP


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with one 63-bit draw from the numpy generator ``rng``."""
    return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))


class CoreEnv(gym.Env):
    """Shared base of the reflab gymnasium shells (not registered itself).

    Subclasses set ``params_cls`` and ``metadata["render_modes"]`` and implement ``_render_<mode>`` for
    each mode. Keyword arguments other than ``render_mode`` are params keys.
    """

    params_cls: ClassVar[type[EnvParams]]
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        self.params = self.params_cls.from_dict(kwargs)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            modes = self.metadata["render_modes"]
            raise ValueError(f"render_mode must be one of {modes} (got {render_mode!r})")
        self.render_mode = render_mode
        self.generator: torch.Generator | None = None

    def _reseed(self, seed: int | None) -> None:
        """Seed ``np_random`` (gymnasium) and, on a new seed or first use, the torch generator from it."""
        super().reset(seed=seed)
        if seed is not None or self.generator is None:
            self.generator = torch_generator(self.np_random)

    def render(self) -> str | np.ndarray | None:
        """The current frame in ``self.render_mode`` (``None`` when no render mode was chosen)."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode= to the constructor")
            return None
        return getattr(self, f"_render_{self.render_mode}")()


class TabularEnv(CoreEnv):
    """A gymnasium shell over one episode of a :class:`TabularCore` (batch 1).

    Observation: by default the state index (``Discrete(S)``); subclasses may override
    :meth:`_observation`. After the episode ends the observation is :meth:`_terminal_observation`
    (by default the last state's), never acted on. ``info`` carries ``state`` (the core's state index,
    ``S`` = sink after the end) and, after a step, ``outcome`` (the transition outcome ``k``).
    Stepping after the end raises ``RuntimeError``; call ``reset``.
    """

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        super().__init__(render_mode, **kwargs)
        self.mdp: TabularMDP = self._build_mdp()
        self.core = TabularCore(self.mdp)
        self.action_space = spaces.Discrete(self.mdp.n_actions)
        self.observation_space = self._observation_space()
        self.state: int | None = None  # None: no episode running
        self.last_state: int | None = None  # state the last step was taken from
        self.last_action: int | None = None
        self.last_outcome: int | None = None
        self.last_reward: float | None = None

    # -- hooks for subclasses -------------------------------------------------------------------------
    def _build_mdp(self) -> TabularMDP:
        return self.params.build()

    def _observation_space(self) -> spaces.Space:
        return spaces.Discrete(self.mdp.n_states)

    def _observation(self, state: int) -> Any:
        return np.int64(state)

    def _terminal_observation(self, state: int, action: int, outcome: int) -> Any:
        """Observation returned with the final transition from ``state``; by default ``state``'s."""
        return self._observation(state)

    def _is_truncation(self, state: int, action: int, outcome: int) -> bool:
        """Whether an episode-ending outcome is a time-limit truncation rather than a termination."""
        return False

    # -- gymnasium API ----------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        self._reseed(seed)
        self.state = int(self.core.sample_reset(1, self.generator)[0])
        self.last_state = self.last_action = self.last_outcome = self.last_reward = None
        return self._observation(self.state), {"state": self.state}

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict]:
        if self.state is None:
            raise RuntimeError("step() called without a running episode; call reset() first")
        if not self.action_space.contains(action):
            raise ValueError(f"action must lie in {self.action_space} (got {action!r})")
        state, a = self.state, int(action)
        s_t, a_t = torch.tensor([state]), torch.tensor([a])
        u, z = self.core.sample_draws((1,), self.generator)
        k_t = self.core.outcome(s_t, a_t, u)
        next_t, reward_t, done_t = self.core.transition(s_t, a_t, k_t, z)
        k, next_state, reward = int(k_t[0]), int(next_t[0]), float(reward_t[0])
        self.last_state, self.last_action, self.last_outcome, self.last_reward = state, a, k, reward
        if bool(done_t[0]):
            truncated = self._is_truncation(state, a, k)
            obs = self._terminal_observation(state, a, k)
            self.state = None
        else:
            truncated = False
            self.state = next_state
            obs = self._observation(next_state)
        terminated = bool(done_t[0]) and not truncated
        return obs, reward, terminated, truncated, {"state": next_state, "outcome": k}
