"""Run configuration: one frozen, documented dataclass tree, loaded from YAML and ``--set key=value``.

Every key is dotted (``kl.beta``, ``train.lr``); values given on the command line are YAML-parsed. Unknown
keys and invalid values raise :class:`ConfigError` with one line naming the key and the valid choices.

Fields marked *per-run* may differ between runs trained in one batch; all others define the batch's tensor
program and must be equal (see :func:`batch_signature`).

This module checks what any run needs (types, ranges, choices, the env's own keys); what a trainer does not
support is checked by that trainer (``check_config`` of each class in :mod:`sim.algos`, applied by
:func:`sim.lab.dispatch.check_config`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

import envs


class _Loader(yaml.SafeLoader):
    """YAML 1.1's SafeLoader, but ``1e-3`` is a float (YAML 1.1 reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str):
    """Parse YAML text the way every reflab input is parsed (floats like ``1e-3`` included)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration error; its message is one line naming the key and the valid choices."""


class UsageError(Exception):
    """Bad command-line input other than a config key (a flag, a folder, a grid file): one line, exit 2."""


@dataclass(frozen=True)
class KLConfig:
    placement: str = "none"
    """Where the KL penalty enters PPO: ``none`` | ``reward`` (r − β·k, k detached) | ``loss`` (+β·k). Per-run."""
    estimator: str = "k1"
    """Per-sample KL estimate: ``k1`` | ``k2`` | ``k3`` | ``full`` (exact per-state KL). Per-run."""
    beta: float = 0.1
    """KL coefficient β ≥ 0 (initial value when the controller is adaptive). Per-run."""
    is_correction: bool = False
    """Loss placement only: importance-weight the KL term by π_θ/π_old (docs/theory.md "Off-policy"). Per-run."""
    controller: str = "fixed"
    """``fixed`` | ``adaptive`` (Ziegler et al. 2019: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)). Per-run."""
    target: float = 0.1
    """Target KL for the adaptive controller (per episode, nats). Per-run."""
    horizon: float = 10000.0
    """Horizon of the adaptive controller, in episodes. Per-run."""
    clamp: float | None = None
    """If set, clamp the log-ratio δ to [−clamp, clamp] inside the KL estimators; clamps are counted and logged."""


@dataclass(frozen=True)
class ReferenceConfig:
    schedule: str = "frozen"
    """``frozen`` | ``reset`` (π_ref ← π_θ every ``every`` updates) | ``ema`` (parameter-space EMA)."""
    every: int = 100
    """Updates between reference refreshes (reset and ema)."""
    alpha: float = 0.6
    """EMA weight of the policy: π_ref ← α·π_θ + (1 − α)·π_ref in parameter space."""


@dataclass(frozen=True)
class Phase:
    updates: int
    """Number of PPO updates in this phase."""
    reward_scale: float = 1.0
    """Multiplier of the task reward during the phase (0 removes the reward to measure recovery)."""


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "sampled"
    """``sampled`` (PPO on samples) | ``exact`` (expected gradient by enumeration; tabular envs only)."""
    updates: int = 300
    """Number of PPO updates (ignored when ``phases`` is given: then it is their sum)."""
    batch: int = 256
    """Episodes sampled per update per run."""
    epochs: int = 4
    """PPO epochs over each batch (sampled mode)."""
    minibatches: int = 1
    """Minibatches per epoch (sampled mode); 1 = full-batch epochs, the least noisy choice for small envs."""
    optimizer: str = "adam"
    """``adam`` | ``sgd``."""
    lr: float = 0.01
    """Learning rate of policy and value. Per-run."""
    clip: float = 0.2
    """PPO ratio clip ε."""
    gamma: float = 1.0
    """Discount of GAE (1 = the undiscounted sequence objective of docs/theory.md "Sequences")."""
    gae_lambda: float = 1.0
    """GAE λ (1 = reward-to-go minus baseline; what the sequence-level KL gradient needs)."""
    norm_adv: bool = False
    """Normalize advantages per run (changes the reward/KL-in-loss balance, so off by default)."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient (sequential envs)."""
    max_grad_norm: float | None = None
    """Per-run gradient norm clip, or none."""
    baseline: str = "auto"
    """``auto`` (batch mean for one-step envs, learned value otherwise) | ``mean`` | ``value`` | ``none``."""
    policy: str = "tabular"
    """``tabular`` (logits per state) | ``mlp`` (per-run MLP over state features, residual on the init logits)."""
    hidden: int = 64
    """Hidden width of MLP policies and values."""
    init: Any = "reference"
    """``reference`` | ``uniform`` | a list of probabilities (one-state envs)."""
    phases: tuple[Phase, ...] | None = None
    """Optional list of ``{updates, reward_scale}``; e.g. reward on, then off to measure recovery."""
    dtype: str = "float32"
    """``float32`` | ``float64`` (exact-mode checks use float64)."""
    backend: str = "native"
    """``native`` (batched torch engine) | ``sb3`` (stable-baselines3's PPO with reflab's KL placements,
    :mod:`sim.algos.sb3`; one process per run; discrete envs, tabular policy, sampled mode, frozen
    reference, no ``kl.clamp``). The choices are the backends of :data:`sim.lab.dispatch.ROUTES`."""
    algo: str = "ppo"
    """``ppo`` (RL on the env's reward with a KL penalty) | ``dpo`` (direct preference optimization on pairs
    labelled by Bradley–Terry on the env's reward; see the ``dpo`` section and :mod:`sim.algos.dpo`) | ``bon``
    (best-of-n, no training; the ``bon`` section and :mod:`sim.algos.bon`). The choices are the algorithms of
    :data:`sim.lab.dispatch.ROUTES`."""

    def phase_list(self) -> tuple[Phase, ...]:
        """The phases actually run (a single reward-scale-1 phase when none are given)."""
        return self.phases if self.phases else (Phase(self.updates, 1.0),)

    @property
    def total_updates(self) -> int:
        return sum(p.updates for p in self.phase_list())


@dataclass(frozen=True)
class LogConfig:
    every: int = 1
    """Log metrics every N updates (the first and last update are always logged)."""
    trajectories: int = 4
    """Sampled episodes written to trajectories.parquet per logged update (0 = none)."""
    policy_every: int = 10
    """Write the full policy table every N updates (and at the first and last)."""
    progress: str = "auto"
    """``auto`` (a rich bar on a terminal, plain lines otherwise) | ``bar`` | ``plain`` | ``none``."""


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimization (``train.algo: dpo``; :mod:`sim.algos.dpo`). Optimizer and learning rate are
    ``train.optimizer`` and ``train.lr``; ``train.updates`` counts updates of ``epochs`` passes each."""

    beta: float | None = None
    """DPO's β; none = ``kl.beta``, so a sweep over ``kl.beta`` moves DPO and PPO together. Per-run."""
    loss: str = "dpo"
    """``dpo`` (−log σ(β·Δ), seed eq. 52) | ``ipo`` ((Δ − 1/(2β))², Azar et al.), Δ = the log-ratio margin.
    Per-run."""
    pairs: int = 2048
    """Preference pairs in each run's dataset."""
    sampler: Any = "reference"
    """Policy the pairs are sampled from: ``reference`` | ``uniform`` | a list of probabilities (one-state
    envs; zeros leave arms out of every pair)."""
    bt_temperature: float = 1.0
    """Temperature τ of the Bradley–Terry labels: P(y₁ ≻ y₂) = σ((r(y₁) − r(y₂))/τ). DPO's optimum is then
    π_ref·e^{r/(τβ)}."""
    data_seed: int | None = None
    """Seed of the preference dataset; none = the run's ``seed``."""
    batch_size: int | None = None
    """Pairs per gradient step (none = all pairs, full-batch)."""
    epochs: int = 1
    """Passes over the dataset per update."""


@dataclass(frozen=True)
class RewardConfig:
    """The reward the runs optimise (:mod:`sim.engine.reward_model`): the env's own, the *gold* reward, or a
    *proxy* fitted before training, per run, to Bradley–Terry preference pairs. Metrics of runs with a proxy add
    ``gold_return``, ``proxy_return``, ``sqrt_kl``, ``opt_gold`` and ``opt_proxy``; the keys below other than
    ``model`` apply to ``learned`` only."""

    model: str = "gold"
    """``gold`` (train on the env's reward) | ``learned`` (train on a proxy reward model fitted to
    ``pairs`` preference pairs by maximum likelihood; the env's reward stays the gold measure)."""
    family: str = "tabular"
    """``tabular`` (one value per (state, action); per whole episode on envs that pay only when an episode
    ends and whose states determine their history: per arm on the bandit, per sequence on the token tree) |
    ``linear`` (w·φ over ``features``) | ``mlp`` (a one-hidden-layer tanh MLP of ``features``)."""
    pairs: int = 1024
    """Preference pairs the proxy is fitted to (> 0)."""
    sampler: Any = "reference"
    """Policy the pairs' episodes are sampled from: ``reference`` | ``uniform`` | a list of arm probabilities
    (one-state envs; zeros leave arms out of every pair)."""
    bt_temperature: float = 1.0
    """Temperature τ of the Bradley–Terry labels, P(y₁ ≻ y₂) = σ((r(y₁) − r(y₂))/τ); the fitted logits are
    multiplied by τ, so the proxy is on the gold reward's scale."""
    l2: float = 1e-3
    """L2 coefficient λ ≥ 0 of the fit: minimise mean_pairs softplus(−Δ) + (λ/2)·‖θ‖² over the parameters θ
    (tabular needs λ > 0: BT fixes values only up to a shift)."""
    data_seed: int | None = None
    """Seed of the pairs (and of an MLP's initial weights); none = the run's ``seed``. The same data seed gives
    the same pairs as ``dpo.data_seed``. Per-run."""
    features: Any = "state_action"
    """Features φ(s, a) of ``linear`` and ``mlp``: ``state_action`` (the env's state features ⊗ one-hot
    action) | ``time_action`` (one-hot (time step, action): the arm on a bandit, (position, token) on the
    token tree) | ``random`` (``feature_dim`` standard normals per (state, action), seed ``feature_seed``) | a
    list of S·A rows of numbers, state-major. On per-episode envs an episode's features are the sum over its
    steps."""
    feature_dim: int = 16
    """Dimension of ``random`` features."""
    feature_seed: int = 0
    """Seed of ``random`` features (shared by every run: the features are the model, not the data)."""
    hidden: int = 32
    """Hidden width of the ``mlp`` proxy."""
    steps: int = 500
    """Full-batch Adam steps of the ``mlp`` fit (``tabular`` and ``linear`` are solved by Newton's method)."""
    lr: float = 0.01
    """Adam learning rate of the ``mlp`` fit."""


@dataclass(frozen=True)
class BoNConfig:
    """Best-of-n (``train.algo: bon``; :mod:`sim.algos.bon`): no training; the policy is the exact law of the
    episode with the highest proxy reward among ``n`` episodes drawn from π_ref."""

    n: int = 1
    """Episodes drawn from the reference (n ≥ 1; 1 is π_ref itself). Per-run."""


@dataclass(frozen=True)
class Config:
    env: dict = field(default_factory=lambda: {"id": "bandit"})
    """Environment: ``env.id`` (bandit | gaussian_bandit | gridworld | token_tree | diffusion_chain) and that
    env's parameters."""
    kl: KLConfig = field(default_factory=KLConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    bon: BoNConfig = field(default_factory=BoNConfig)
    seed: int = 0
    """Seed of the run's random streams. Per-run."""
    device: str = "cpu"
    """``cpu`` | ``cuda`` | ``auto`` (CUDA when present)."""
    threads: int | None = 1
    """torch intra-op threads of the process training this run (none = torch's default). One thread per
    process is fastest for reflab's small tensors; sweeps run parallel worker processes instead."""

    def to_dict(self) -> dict:
        """Plain nested dict (JSON/YAML-serializable)."""
        return _to_plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


PLACEMENTS = ("none", "reward", "loss")
"""Where the KL enters PPO (docs/theory.md "The two placements")."""
ESTIMATORS = ("k1", "k2", "k3", "full")
"""What stands for the KL per sample; the engine's estimator weights follow this order."""

CHOICES: dict[str, tuple] = {
    "kl.placement": PLACEMENTS,
    "kl.estimator": ESTIMATORS,
    "kl.controller": ("fixed", "adaptive"),
    "reference.schedule": ("frozen", "reset", "ema"),
    "train.mode": ("sampled", "exact"),
    "train.optimizer": ("adam", "sgd"),
    "train.baseline": ("auto", "mean", "value", "none"),
    "train.policy": ("tabular", "mlp"),
    "train.dtype": ("float32", "float64"),
    "dpo.loss": ("dpo", "ipo"),
    "reward.model": ("gold", "learned"),
    "reward.family": ("tabular", "linear", "mlp"),
    "log.progress": ("auto", "bar", "plain", "none"),
    "device": ("cpu", "cuda", "auto"),
}

#: Keys that may differ between runs that share one batch.
PER_RUN_KEYS = ("seed", "kl.placement", "kl.estimator", "kl.beta", "kl.is_correction", "kl.controller",
                "kl.target", "kl.horizon", "train.lr", "dpo.beta", "dpo.loss", "reward.data_seed", "bon.n")

_SECTIONS = {"kl": KLConfig, "reference": ReferenceConfig, "train": TrainConfig, "log": LogConfig, "dpo": DPOConfig,
             "reward": RewardConfig, "bon": BoNConfig}


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_to_plain(v) for v in x]
    return x


def default_dict() -> dict:
    """The default configuration as a nested dict."""
    return Config().to_dict()


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=VALUE"`` → ``("a.b", yaml-parsed VALUE)``."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key.strip()}: cannot parse value {raw!r} as YAML ({str(e).splitlines()[0]})") from e
    return key.strip(), value


def set_dotted(d: dict, key: str, value: Any) -> None:
    """Set ``d[a][b] = value`` for ``key = "a.b"``, creating nested dicts as needed."""
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in recursively (dicts merge, everything else replaces)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "env":
            out[k] = deep_merge(out[k], v)
        elif k == "env" and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_env(out[k], v)
        else:
            out[k] = v
    return out


def merge_env(old: dict, new: dict) -> dict:
    """The ``env`` mapping ``new`` merged over ``old``: a new ``env.id`` starts from that env's defaults
    rather than the old env's parameters (an ``old`` without an id keeps its keys, checked against the new env)."""
    if old.get("id") not in (None, new.get("id", old.get("id"))):
        return dict(new)
    return {**old, **new}


def set_key(data: dict, key: str, value: Any) -> None:
    """Set the dotted config ``key`` in the config dict ``data`` (as ``--set`` does): ``env.id`` through
    :func:`merge_env`, any other key with :func:`set_dotted`."""
    if key == "env.id":
        data["env"] = merge_env(data["env"] if isinstance(data.get("env"), dict) else {}, {"id": value})
    else:
        set_dotted(data, key, value)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from ``path`` (one clear error if missing or malformed)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({str(e).splitlines()[0]})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _check_type(key: str, value: Any, annotation: Any, default: Any) -> Any:
    ann = str(annotation)
    if value is None and ("None" in ann or default is None):
        return None
    if ann in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if ann in ("float", "float | None"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if ann == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if ann == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _build_section(name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a mapping of keys, got {data!r}")
    valid = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{name}.{k}"
        if k not in valid:
            raise ConfigError(f"unknown key {key!r}; valid keys of {name}: {', '.join(sorted(valid))}")
        f = valid[k]
        default = f.default if f.default is not dataclasses.MISSING else None
        if key == "train.phases":
            kwargs[k] = _parse_phases(v)
            continue
        v = _check_type(key, v, f.type, default)
        if key in CHOICES and v not in CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, CHOICES[key]))}; got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def _parse_phases(v: Any) -> tuple[Phase, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list | tuple) or not v:
        raise ConfigError("train.phases must be a non-empty list of {updates, reward_scale} mappings")
    out = []
    for i, ph in enumerate(v):
        if not isinstance(ph, dict) or set(ph) - {"updates", "reward_scale"} or "updates" not in ph:
            raise ConfigError(f"train.phases[{i}] must be a mapping with keys updates, reward_scale; got {ph!r}")
        upd = ph["updates"]
        if isinstance(upd, bool) or not isinstance(upd, int) or upd < 1:
            raise ConfigError(f"train.phases[{i}].updates must be a positive integer, got {upd!r}")
        scale = ph.get("reward_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ConfigError(f"train.phases[{i}].reward_scale must be a number, got {scale!r}")
        out.append(Phase(int(upd), float(scale)))
    return tuple(out)


def _validate_env(env: Any) -> dict:
    if not isinstance(env, dict):
        raise ConfigError(f"env must be a mapping with an id, got {env!r}")
    env = dict(env)
    env_id = env.pop("id", "bandit")
    if env_id not in envs.REGISTRY:
        raise ConfigError(f"env.id must be one of {', '.join(envs.REGISTRY)}; got {env_id!r}")
    try:
        params = envs.make_params(env_id, **env)
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(msg if msg.startswith("env.") else f"env: {msg}") from e
    return {"id": env_id, **_to_plain(dataclasses.asdict(params))}


def check_positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` (if not ``None``) is > 0 (``allow_zero``: >= 0)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def from_dict(data: dict) -> Config:
    """Validate a nested dict (partial: missing keys take defaults) and build a :class:`Config`."""
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of keys")
    top = {f.name for f in fields(Config)}
    for k in data:
        if k not in top:
            raise ConfigError(f"unknown key {k!r}; valid top-level keys: {', '.join(sorted(top))}")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        kwargs[name] = _build_section(name, cls, data.get(name, {}) or {})
    kwargs["env"] = _validate_env(data.get("env", {"id": "bandit"}))
    for k in ("seed", "threads"):
        if k in data:
            kwargs[k] = _check_type(k, data[k], "int | None" if k == "threads" else "int", None)
    if "device" in data:
        if data["device"] not in CHOICES["device"]:
            raise ConfigError(f"device must be one of {', '.join(CHOICES['device'])}; got {data['device']!r}")
        kwargs["device"] = data["device"]
    cfg = Config(**kwargs)
    _check_ranges(cfg)
    return cfg


def _check_ranges(cfg: Config) -> None:
    t, kl, ref, log = cfg.train, cfg.kl, cfg.reference, cfg.log
    check_positive("kl.beta", kl.beta, allow_zero=True)
    check_positive("kl.target", kl.target)
    check_positive("kl.horizon", kl.horizon)
    check_positive("kl.clamp", kl.clamp)
    check_positive("reference.every", ref.every)
    if not 0.0 <= ref.alpha <= 1.0:
        raise ConfigError(f"reference.alpha must be in [0, 1], got {ref.alpha!r}")
    for key in ("updates", "batch", "epochs", "minibatches", "hidden"):
        check_positive(f"train.{key}", getattr(t, key))
    check_positive("train.lr", t.lr)
    check_positive("train.clip", t.clip)
    check_positive("train.max_grad_norm", t.max_grad_norm)
    check_positive("train.ent_coef", t.ent_coef, allow_zero=True)
    check_positive("train.vf_coef", t.vf_coef, allow_zero=True)
    if not 0.0 <= t.gamma <= 1.0:
        raise ConfigError(f"train.gamma must be in [0, 1], got {t.gamma!r}")
    if not 0.0 <= t.gae_lambda <= 1.0:
        raise ConfigError(f"train.gae_lambda must be in [0, 1], got {t.gae_lambda!r}")
    if isinstance(t.init, str):
        if t.init not in ("reference", "uniform"):
            raise ConfigError(f"train.init must be reference, uniform or a list of probabilities; got {t.init!r}")
    elif not (isinstance(t.init, list | tuple) and all(isinstance(x, int | float) for x in t.init)):
        raise ConfigError(f"train.init must be reference, uniform or a list of probabilities; got {t.init!r}")
    check_positive("log.every", log.every)
    check_positive("log.policy_every", log.policy_every)
    check_positive("log.trajectories", log.trajectories, allow_zero=True)
    check_positive("threads", cfg.threads)


def resolve(config_path: str | Path | None = None, overrides: list[str] | None = None,
            base: dict | None = None) -> Config:
    """Defaults ← ``base`` ← YAML file ← ``--set`` overrides, validated into a :class:`Config`."""
    data: dict = dict(base or {})
    if config_path is not None:
        data = deep_merge(data, load_yaml(config_path))
    for item in overrides or []:
        set_key(data, *parse_override(item))
    return from_dict(data)


def get_dotted(cfg_dict: dict, key: str) -> Any:
    """``cfg_dict[a][b]`` for ``key = "a.b"`` (``KeyError`` if absent)."""
    cur: Any = cfg_dict
    for p in key.split("."):
        cur = cur[p]
    return cur


def batch_signature(cfg: Config) -> str:
    """JSON of everything that must be equal for runs to share one batch (all but :data:`PER_RUN_KEYS`)."""
    d = cfg.to_dict()
    for key in PER_RUN_KEYS:
        parts = key.split(".")
        cur = d
        for p in parts[:-1]:
            cur = cur[p]
        cur.pop(parts[-1], None)
    return json.dumps(d, sort_keys=True)
