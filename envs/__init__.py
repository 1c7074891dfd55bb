"""reflab environments: params dataclasses, batched torch cores, exact oracles and gymnasium shells.

Every discrete environment compiles to a :class:`~envs.tabular.TabularMDP` (``params.build()``), so the
trainer handles them all through :class:`~envs.tabular.TabularCore` and the tabular oracles; the Gaussian
bandit and the toy diffusion chain have their own cores and closed forms. Importing this package registers
the gymnasium ids ``reflab/Bandit-v0``, ``reflab/GaussianBandit-v0``, ``reflab/GridWorld-v0``,
``reflab/TokenTree-v0`` and ``reflab/DiffusionChain-v0``.
This package never imports ``sim`` or ``analysis``.
"""

from __future__ import annotations

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

ENV_PARAMS: dict[str, type[EnvParams]] = {
    "bandit": BanditParams,
    "gaussian_bandit": GaussianBanditParams,
    "diffusion_chain": DiffusionChainParams,
    "gridworld": GridWorldParams,
    "token_tree": TokenTreeParams,
}

GYM_IDS: dict[str, str] = {
    "reflab/Bandit-v0": "envs.bandit:BanditEnv",
    "reflab/GaussianBandit-v0": "envs.gaussian_bandit:GaussianBanditEnv",
    "reflab/DiffusionChain-v0": "envs.diffusion_chain:DiffusionChainEnv",
    "reflab/GridWorld-v0": "envs.gridworld:GridWorldEnv",
    "reflab/TokenTree-v0": "envs.token_tree:TokenTreeEnv",
}


def make_params(env_id: str, **kwargs: Any) -> EnvParams:
    """The params of environment ``env_id`` (a key of :data:`ENV_PARAMS`) from config keys ``kwargs``."""
    if env_id not in ENV_PARAMS:
        raise ValueError(f"env.id must be one of {', '.join(ENV_PARAMS)} (got {env_id!r})")
    return ENV_PARAMS[env_id].from_dict(kwargs)


def register_gym_envs() -> None:
    """Register the reflab ids with gymnasium (idempotent)."""
    for gym_id, entry_point in GYM_IDS.items():
        if gym_id not in gymnasium.registry:
            gymnasium.register(id=gym_id, entry_point=entry_point)


register_gym_envs()

__all__ = [
    "ENV_PARAMS", "GYM_IDS", "BanditEnv", "BanditParams", "DiffusionChainEnv", "DiffusionChainParams", "EnvParams",
    "GaussianBanditCore", "GaussianBanditEnv", "GaussianBanditParams", "GridWorld", "GridWorldEnv", "GridWorldParams",
    "TabularCore", "TabularMDP", "TokenTreeEnv", "TokenTreeParams", "builtin_layouts", "gaussian_kl",
    "gibbs_optimum", "gibbs_sequence_optimum", "make_params", "register_gym_envs", "sequence_probs",
]
