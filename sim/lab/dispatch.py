"""The one table from (backend, algorithm, env) to trainer, and the entry points that use it.

:data:`ROUTES` says which trainer class of :mod:`sim.algos` trains a config. Adding an algorithm is a new file
in ``sim/algos`` and a row here; a new env joins the routes of its kind through :mod:`envs`' registry.
:func:`check_config` applies the routing and the trainer's own ``check_config`` to a config that
:mod:`sim.config` already validated; :func:`resolve` and :func:`from_dict` do both, which is what every command
uses before anything is written. :func:`train_batch` trains a batch of configs as one tensor program.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import envs
from sim import config, yamlsafe
from sim.config import Config, ConfigError

if TYPE_CHECKING:  # the trainers (torch, and stable-baselines3 for one) are imported when a route is taken
    import torch

    from sim.engine.loop import BatchTrainer, ProgressFn
    from sim.engine.outputs import RunOutput


@dataclass(frozen=True)
class Route:
    """Configs with ``train.backend = backend``, ``train.algo = algo`` and ``env.id`` in ``envs`` are trained by
    the trainer class that ``load`` imports (when first asked for: :attr:`trainer`)."""

    backend: str
    algo: str
    envs: tuple[str, ...]
    load: Callable[[], type[BatchTrainer]]

    @property
    def trainer(self) -> type[BatchTrainer]:
        """The trainer class (its module imported now: only the routes a sweep takes import theirs)."""
        return self.load()


# The trainers, each imported by its route when taken: a sweep of native runs never imports stable-baselines3
# (nor tensorboard through it), nor the trainers it does not use.
def _ppo() -> type[BatchTrainer]:
    from sim.algos.ppo import PPOTrainer

    return PPOTrainer


def _gaussian() -> type[BatchTrainer]:
    from sim.algos.gaussian import GaussianTrainer

    return GaussianTrainer


def _diffusion() -> type[BatchTrainer]:
    from sim.algos.diffusion import DiffusionTrainer

    return DiffusionTrainer


def _dpo() -> type[BatchTrainer]:
    from sim.algos.dpo import DPOTrainer

    return DPOTrainer


def _bon() -> type[BatchTrainer]:
    from sim.algos.bon import BoNTrainer

    return BoNTrainer


def _sb3() -> type[BatchTrainer]:
    from sim.algos.sb3 import SB3Trainer

    return SB3Trainer


ROUTES: tuple[Route, ...] = (
    Route("native", "ppo", envs.DISCRETE_ENVS, _ppo),
    Route("native", "ppo", ("gaussian_bandit",), _gaussian),
    Route("native", "ppo", ("diffusion_chain",), _diffusion),
    Route("native", "dpo", envs.DISCRETE_ENVS, _dpo),
    Route("native", "bon", envs.DISCRETE_ENVS, _bon),
    Route("sb3", "ppo", envs.DISCRETE_ENVS, _sb3),
)


def trainer_class(cfg: Config) -> type[BatchTrainer]:
    """The trainer class of ``cfg`` (:data:`ROUTES`); one-line :class:`ConfigError` if none trains it."""
    t, env = cfg.train, cfg.env["id"]
    for key, value in (("train.backend", t.backend), ("train.algo", t.algo)):
        choices = list(dict.fromkeys(getattr(r, key.split(".")[1]) for r in ROUTES))
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    routes = [r for r in ROUTES if r.backend == t.backend and r.algo == t.algo]
    for r in routes:
        if env in r.envs:
            return r.trainer
    what = f"train.backend={t.backend}" if t.backend != "native" else f"train.algo={t.algo}"
    if not routes:
        raise ConfigError(f"{what} does not support train.algo={t.algo}")
    supported = [e for r in routes for e in r.envs]
    kind = "a discrete env: " if set(supported) <= set(envs.DISCRETE_ENVS) else ""
    raise ConfigError(f"{what} does not run on env.id={env!r}; it needs {kind}{', '.join(supported)}")


def check_config(cfg: Config) -> Config:
    """``cfg`` if some trainer runs it as configured, else one-line :class:`ConfigError`."""
    cls = trainer_class(cfg)
    if cfg.reward.model != "gold" and not getattr(cls, "fits_reward_model", False):
        raise ConfigError(f"reward.model={cfg.reward.model} needs a native trainer on a discrete env "
                          f"({', '.join(envs.DISCRETE_ENVS)}); this config is trained by {cls.__name__}")
    if cfg.bon.n != 1 and cfg.train.algo != "bon":
        raise ConfigError(f"bon.n applies to train.algo=bon only; got bon.n={cfg.bon.n} with "
                          f"train.algo={cfg.train.algo}")
    cls.check_config(cfg)
    return cfg


def from_dict(data: dict, effects: str = "strict") -> Config:
    """:func:`sim.config.from_dict` (``effects`` as there) and :func:`check_config`: a config some trainer runs."""
    return check_config(config.from_dict(data, effects))


def resolve(config_path: str | Path | None = None, overrides: list[str] | None = None,
            base: dict | None = None, effects: str = "grid", max_values: int = yamlsafe.MAX_VALUES,
            flag: str | None = None) -> Config:
    """:func:`sim.config.resolve` (``effects`` as there; YAML bounded by ``max_values``) and
    :func:`check_config`: a config some trainer runs."""
    return check_config(config.resolve(config_path, overrides, base, effects, max_values, flag))


def resolve_device(name: str) -> torch.device:
    """The device of ``device: NAME``: ``auto`` is CUDA when present, else CPU. ``cuda`` without CUDA is a
    :class:`ConfigError` naming what to install."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but this torch has no usable CUDA (torch.cuda.is_available() is false); "
                          "use device=cpu or auto, or install a CUDA build of torch")
    return torch.device(name)


def make_trainer(configs: list[Config], device: torch.device | None = None) -> BatchTrainer:
    """The trainer of a batch of configs that share a :func:`sim.config.batch_signature`."""
    cls = trainer_class(configs[0])
    for cfg in configs:
        cls.check_config(cfg)
    return cls(configs, device or resolve_device(configs[0].device))


def train_batch(configs: list[Config], progress: ProgressFn | None = None,
                device: torch.device | None = None) -> Sequence[RunOutput]:
    """Train ``configs`` together (one tensor program) and return their outputs in order."""
    return make_trainer(configs, device).run(progress)
