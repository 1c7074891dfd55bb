"""reflab environments: params dataclasses, batched torch cores, exact oracles and gymnasium shells.

Every discrete environment compiles to a :class:`~envs.tabular.TabularMDP` (``params.build()``), so the
trainer handles them all through :class:`~envs.tabular.TabularCore` and the tabular oracles; the Gaussian
bandit and the toy diffusion chain have their own cores and closed forms. Importing this package registers
the gymnasium ids ``reflab/Bandit-v0``, ``reflab/GaussianBandit-v0``, ``reflab/GridWorld-v0``,
``reflab/TokenTree-v0`` and ``reflab/DiffusionChain-v0``.
This package never imports ``sim`` or ``analysis``.

Importing it is cheap (gymnasium, no torch): :data:`REGISTRY` names each env's module and classes, and a
module, class or function is imported the first time it is used (``envs.BanditParams``,
``REGISTRY["bandit"].params``, ``from envs import tabular``), so ``reflab --help`` and config errors that need
no env start without torch. The gymnasium ids are registered with ``"module:Class"`` entry points, which
gymnasium imports on ``gymnasium.make``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium

if TYPE_CHECKING:
    from envs.params import EnvParams


@dataclass(frozen=True)
class EnvSpec:
    """One environment of the registry: its config id, params class, gymnasium shell and action kind.

    The classes are named by module and attribute and imported when first read (:attr:`params`,
    :attr:`gym_env`)."""

    id: str
    """The config's ``env.id``."""
    module: str
    """The module defining the env (``envs.bandit``)."""
    params_name: str
    """The name of its frozen params dataclass in :attr:`module` (its fields are the ``env.*`` keys)."""
    gym_id: str
    """The gymnasium id of the thin shell (registered on ``import envs``)."""
    gym_env_name: str
    """The name of the shell's class in :attr:`module`."""
    discrete: bool
    """Enumerable actions: the params compile to a :class:`~envs.tabular.TabularMDP` (``params.build()``), so
    the exact tabular oracles apply. Otherwise the env has its own core and closed forms."""

    @property
    def params(self) -> type[EnvParams]:
        """The frozen params dataclass (imports :attr:`module`)."""
        return getattr(importlib.import_module(self.module), self.params_name)

    @property
    def gym_env(self) -> type[gymnasium.Env]:
        """The gymnasium shell's class (imports :attr:`module`)."""
        return getattr(importlib.import_module(self.module), self.gym_env_name)

    @property
    def entry_point(self) -> str:
        """The shell as a gymnasium entry point, ``"module:Class"``."""
        return f"{self.module}:{self.gym_env_name}"


REGISTRY: dict[str, EnvSpec] = {spec.id: spec for spec in (
    EnvSpec("bandit", "envs.bandit", "BanditParams", "reflab/Bandit-v0", "BanditEnv", discrete=True),
    EnvSpec("gaussian_bandit", "envs.gaussian_bandit", "GaussianBanditParams", "reflab/GaussianBandit-v0",
            "GaussianBanditEnv", discrete=False),
    EnvSpec("diffusion_chain", "envs.diffusion_chain", "DiffusionChainParams", "reflab/DiffusionChain-v0",
            "DiffusionChainEnv", discrete=False),
    EnvSpec("gridworld", "envs.gridworld", "GridWorldParams", "reflab/GridWorld-v0", "GridWorldEnv", discrete=True),
    EnvSpec("token_tree", "envs.token_tree", "TokenTreeParams", "reflab/TokenTree-v0", "TokenTreeEnv", discrete=True),
)}
"""Every environment, by ``env.id``: the one place that lists them."""

DISCRETE_ENVS: tuple[str, ...] = tuple(k for k, s in REGISTRY.items() if s.discrete)
"""The ``env.id``s with enumerable actions (tabular MDPs)."""

#: Names this package exports from its modules, imported on first use (``envs.X`` or ``from envs import X``).
_LAZY: dict[str, str] = {
    "BanditEnv": "envs.bandit", "BanditParams": "envs.bandit",
    "DiffusionChainEnv": "envs.diffusion_chain", "DiffusionChainParams": "envs.diffusion_chain",
    "GaussianBanditCore": "envs.gaussian_bandit", "GaussianBanditEnv": "envs.gaussian_bandit",
    "GaussianBanditParams": "envs.gaussian_bandit", "gaussian_kl": "envs.gaussian_bandit",
    "gibbs_optimum": "envs.gaussian_bandit",
    "GridWorld": "envs.gridworld", "GridWorldEnv": "envs.gridworld", "GridWorldParams": "envs.gridworld",
    "builtin_layouts": "envs.gridworld",
    "EnvParams": "envs.params",
    "TabularCore": "envs.tabular", "TabularMDP": "envs.tabular",
    "TokenTreeEnv": "envs.token_tree", "TokenTreeParams": "envs.token_tree",
    "gibbs_sequence_optimum": "envs.token_tree", "sequence_probs": "envs.token_tree",
}
_SUBMODULES = ("bandit", "best_of_n", "diffusion_chain", "gaussian_bandit", "gridworld", "gym_shell", "params",
               "tabular", "token_tree")


def __getattr__(name: str) -> Any:
    """Import on first use: the exported classes and functions, ``ENV_PARAMS``, ``GYM_IDS`` and the submodules."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name == "ENV_PARAMS":
        value = {k: s.params for k, s in REGISTRY.items()}
    elif name == "GYM_IDS":
        value = {s.gym_id: s.gym_env for s in REGISTRY.values()}
    elif name in _SUBMODULES:
        return importlib.import_module(f"envs.{name}")
    else:
        raise AttributeError(f"module 'envs' has no attribute {name!r}")
    globals()[name] = value
    return value


if TYPE_CHECKING:
    ENV_PARAMS: dict[str, type[EnvParams]]
    """The params class of each ``env.id``."""
    GYM_IDS: dict[str, type[gymnasium.Env]]
    """The gymnasium shell of each registered gymnasium id."""


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
    """Register the reflab ids with gymnasium (idempotent); gymnasium imports a shell's module on ``make``."""
    for s in REGISTRY.values():
        if s.gym_id not in gymnasium.registry:
            gymnasium.register(id=s.gym_id, entry_point=s.entry_point)


register_gym_envs()

__all__ = [
    "DISCRETE_ENVS", "ENV_PARAMS", "GYM_IDS", "REGISTRY", "BanditEnv", "BanditParams", "DiffusionChainEnv",
    "DiffusionChainParams", "EnvParams", "EnvSpec", "GaussianBanditCore", "GaussianBanditEnv", "GaussianBanditParams",
    "GridWorld", "GridWorldEnv", "GridWorldParams", "TabularCore", "TabularMDP", "TokenTreeEnv", "TokenTreeParams",
    "builtin_layouts", "from_config", "gaussian_kl", "gibbs_optimum", "gibbs_sequence_optimum", "make_params",
    "register_gym_envs", "sequence_probs", "spec",
]
