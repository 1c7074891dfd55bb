"""reflab environments: params dataclasses, batched torch cores, exact oracles and gymnasium shells.

Every discrete environment compiles to a :class:`~envs.tabular.TabularMDP` (``params.build()``), so the
trainer handles them all through :class:`~envs.tabular.TabularCore` and the tabular oracles; the Gaussian
bandit and the toy diffusion chain have their own cores and closed forms. Importing this package registers
the gymnasium ids ``reflab/Bandit-v0``, ``reflab/GaussianBandit-v0``, ``reflab/GridWorld-v0``,
``reflab/TokenTree-v0`` and ``reflab/DiffusionChain-v0``.
This package never imports ``sim`` or ``analysis``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium

from envs.bandit import BanditEnv, BanditParams
from envs.diffusion_chain import DiffusionChainEnv, DiffusionChainParams
from envs.gaussian_bandit import (
    GaussianBanditCore,
    GaussianBanditEnv,
    GaussianBanditParams,
    gaussian_kl,
    gibbs_optimum,
)
from envs.gridworld import GridWorld, GridWorldEnv, GridWorldParams, builtin_layouts
from envs.params import EnvParams
from envs.tabular import TabularCore, TabularMDP
from envs.token_tree import TokenTreeEnv, TokenTreeParams, gibbs_sequence_optimum, sequence_probs


@dataclass(frozen=True)
class EnvSpec:
    """One environment of the registry: its config id, params class, gymnasium shell and action kind."""

    id: str
    """The config's ``env.id``."""
    params: type[EnvParams]
    """The frozen params dataclass (its fields are the ``env.*`` keys)."""
    gym_id: str
    """The gymnasium id of the thin shell (registered on ``import envs``)."""
    gym_env: type[gymnasium.Env]
    """The shell's class."""
    discrete: bool
    """Enumerable actions: the params compile to a :class:`~envs.tabular.TabularMDP` (``params.build()``), so
    the exact tabular oracles apply. Otherwise the env has its own core and closed forms."""


REGISTRY: dict[str, EnvSpec] = {spec.id: spec for spec in (
    EnvSpec("bandit", BanditParams, "reflab/Bandit-v0", BanditEnv, discrete=True),
    EnvSpec("gaussian_bandit", GaussianBanditParams, "reflab/GaussianBandit-v0", GaussianBanditEnv, discrete=False),
    EnvSpec("diffusion_chain", DiffusionChainParams, "reflab/DiffusionChain-v0", DiffusionChainEnv, discrete=False),
    EnvSpec("gridworld", GridWorldParams, "reflab/GridWorld-v0", GridWorldEnv, discrete=True),
    EnvSpec("token_tree", TokenTreeParams, "reflab/TokenTree-v0", TokenTreeEnv, discrete=True),
)}
"""Every environment, by ``env.id``: the one place that lists them."""

ENV_PARAMS: dict[str, type[EnvParams]] = {k: s.params for k, s in REGISTRY.items()}
"""The params class of each ``env.id``."""

GYM_IDS: dict[str, type[gymnasium.Env]] = {s.gym_id: s.gym_env for s in REGISTRY.values()}
"""The gymnasium shell of each registered gymnasium id."""

DISCRETE_ENVS: tuple[str, ...] = tuple(k for k, s in REGISTRY.items() if s.discrete)
"""The ``env.id``s with enumerable actions (tabular MDPs)."""


def spec(env_id: str) -> EnvSpec:
    """The registry entry of ``env_id``; an unknown id raises one ``ValueError`` listing the valid ones."""
    if env_id not in REGISTRY:
        raise ValueError(f"env.id must be one of {', '.join(REGISTRY)} (got {env_id!r})")
    return REGISTRY[env_id]


def make_params(env_id: str, **kwargs: Any) -> EnvParams:
    """The params of environment ``env_id`` (a key of :data:`REGISTRY`) from config keys ``kwargs``."""
    return spec(env_id).params.from_dict(kwargs)


def from_config(env: Mapping[str, Any]) -> EnvParams:
    """The params of a config's ``env`` mapping (``id`` plus that env's keys)."""
    env = dict(env)
    return make_params(env.pop("id"), **env)


def register_gym_envs() -> None:
    """Register the reflab ids with gymnasium (idempotent)."""
    for gym_id, env_class in GYM_IDS.items():
        if gym_id not in gymnasium.registry:
            gymnasium.register(id=gym_id, entry_point=env_class)


register_gym_envs()

__all__ = [
    "DISCRETE_ENVS", "ENV_PARAMS", "GYM_IDS", "REGISTRY", "BanditEnv", "BanditParams", "DiffusionChainEnv",
    "DiffusionChainParams", "EnvParams", "EnvSpec", "GaussianBanditCore", "GaussianBanditEnv", "GaussianBanditParams",
    "GridWorld", "GridWorldEnv", "GridWorldParams", "TabularCore", "TabularMDP", "TokenTreeEnv", "TokenTreeParams",
    "builtin_layouts", "from_config", "gaussian_kl", "gibbs_optimum", "gibbs_sequence_optimum", "make_params",
    "register_gym_envs", "sequence_probs", "spec",
]
