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
import functools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

import envs
from sim import yamlsafe


def yaml_load(text: str, what: str = "YAML input", max_values: int = yamlsafe.MAX_VALUES,
              flag: str | None = None) -> Any:
    """Parse YAML text the way every reflab input is parsed (floats like ``1e-3`` included), within the bounds of
    :mod:`sim.yamlsafe`.

    A text over a bound (values or characters once aliases are expanded, nesting depth, a recursive alias)
    raises :class:`ConfigError` "``what`` holds more than ..." without building anything; ``flag`` names the
    option that raises the size bound ``max_values``. Malformed YAML raises ``yaml.YAMLError``.
    """
    try:
        return yamlsafe.load(text, max_values)
    except yamlsafe.YAMLBoundError as e:
        hint = f" (the bound of {flag}; raise it with {flag} N if this is meant)" if flag and e.raisable else ""
        raise ConfigError(f"{what} {e}{hint}") from None


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
    value_clamp: float | None = None
    """If set, clamp each sampled estimate's value to [−value_clamp, value_clamp] (verl clamps k3 to ±10 as
    ``low_var_kl``; set by that alias); counted and logged like ``clamp``."""
    loss_agg: str | None = None
    """How a loss-placed KL term is aggregated over the batch (see ``train.loss_agg``); none = as the policy loss."""
    reward_logp: str = "behaviour"
    """With stale rollouts, the policy a reward-placed KL is computed from: ``behaviour`` (the sampler's, as the
    systems do) | ``learner`` (the learner's at sampling time). Per-run."""


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
    """Number of updates. With ``phases`` it is their sum: leave it out (it is filled in) or give exactly that."""
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
    clip_low: float | None = None
    """Lower ratio clip: ρ ≥ 1 − clip_low for negative advantages (in (0, 1)); none = ``clip``."""
    clip_high: float | None = None
    """Upper ratio clip: ρ ≤ 1 + clip_high for positive advantages (DAPO's clip-higher); none = ``clip``."""
    advantage: str = "gae"
    """``gae`` (returns minus the baseline of ``train.baseline``, GAE(γ, λ)) | ``grpo`` (episode return minus the
    mean of its group, divided by the group's std + 1e-6) | ``drgrpo`` (minus the group mean, no std) | ``rloo``
    (minus the mean of the other G − 1 members) | ``reinforce_pp`` (reward-to-go normalised over the run's batch,
    REINFORCE++). The group estimators broadcast an episode's advantage to all its steps."""
    group: int = 1
    """Episodes per group (G completions of one start state, sharing it); ``train.batch`` must be a multiple."""
    staleness: int = 0
    """Asynchronous rollouts: update u trains on episodes of the policy of update u − staleness (the first updates
    use the initial policy); the PPO ratio and IS corrections are taken against that behaviour policy. Per-run."""
    staleness_dist: str = "fixed"
    """``fixed`` (every update lags by ``staleness``) | ``uniform`` (a lag drawn uniformly from 0 … staleness per
    update, from the run's stream: the irregular lag of real systems). Per-run."""
    decoupled: bool = False
    """Stale rollouts only: the ratio against the learner's own previous policy π_prox, with the importance
    weight π_prox/π_behaviour outside the clip (decoupled PPO)."""
    loss_agg: str = "token-mean"
    """How per-step losses become the batch's loss: ``token-mean`` (mean over every valid step) |
    ``seq-mean-token-sum`` (sum per episode, mean over episodes) | ``seq-mean-token-mean`` (mean per episode, then
    over episodes: GRPO's 1/|o|) | ``seq-mean-token-sum-norm`` (sum per episode divided by the horizon, mean over
    episodes: Dr. GRPO). Also the value loss."""
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
        return to_plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)



PLACEMENTS = ("none", "reward", "loss")
"""Where the KL enters PPO (docs/theory.md "The two placements")."""
ESTIMATORS = ("k1", "k2", "k3", "full")
"""What stands for the KL per sample; the engine's estimator weights follow this order."""
ESTIMATOR_ALIASES: dict[str, tuple[str, float | None]] = {"kl": ("k1", None), "mse": ("k2", None),
                                                           "low_var_kl": ("k3", 10.0)}
"""verl's names of the estimators: ``kl.estimator: low_var_kl`` is k3 with its value clamped to ±10 (verl's
clamp; ``kl.value_clamp``), the others are renamings. Resolved when the config is read."""
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
GROUP_ADVANTAGES = ("grpo", "drgrpo", "rloo")

CHOICES: dict[str, tuple] = {
    "kl.placement": PLACEMENTS,
    "kl.estimator": ESTIMATORS,
    "kl.controller": ("fixed", "adaptive"),
    "reference.schedule": ("frozen", "reset", "ema"),
    "train.mode": ("sampled", "exact"),
    "train.advantage": ("gae", "grpo", "drgrpo", "rloo", "reinforce_pp"),
    "train.staleness_dist": ("fixed", "uniform"),
    "kl.reward_logp": ("behaviour", "learner"),
    "train.loss_agg": LOSS_AGGREGATIONS,
    "kl.loss_agg": LOSS_AGGREGATIONS,
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
                "kl.target", "kl.horizon", "kl.value_clamp", "kl.reward_logp", "train.lr", "train.staleness",
                "train.staleness_dist", "dpo.beta", "dpo.loss", "reward.data_seed", "bon.n")

SECTIONS: dict[str, type] = {"kl": KLConfig, "reference": ReferenceConfig, "train": TrainConfig, "log": LogConfig,
                             "dpo": DPOConfig, "reward": RewardConfig, "bon": BoNConfig}


def to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_plain(v) for v in x]
    return x


def default_dict() -> dict:
    """The default configuration as a nested dict."""
    return Config().to_dict()


def parse_override(item: str, max_values: int = yamlsafe.MAX_VALUES, flag: str | None = None) -> tuple[str, Any]:
    """``"a.b=VALUE"`` → ``("a.b", yaml-parsed VALUE)`` (VALUE within :func:`yaml_load`'s bounds)."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw, f"--set {key.strip()}", max_values, flag) if raw.strip() else None
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


def read_yaml_file(path: str | Path, what: str, max_values: int = yamlsafe.MAX_VALUES,
                   flag: str | None = None) -> Any:
    """The parsed YAML of the file ``path``, named ``what`` in errors (e.g. ``"config file 'a.yaml'"``).

    One-line :class:`ConfigError` if it is missing, a folder, unreadable, larger than
    :data:`sim.yamlsafe.BYTES_PER_VALUE` × ``max_values`` bytes, malformed, or over :func:`yaml_load`'s bounds
    (``flag`` names the option that raises ``max_values``).
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} does not exist")
    max_bytes = yamlsafe.BYTES_PER_VALUE * max_values
    try:
        size = p.stat().st_size
        if size > max_bytes:
            bound = f"{yamlsafe.BYTES_PER_VALUE} bytes per value of {flag or 'the bound on YAML values'}"
            hint = f"; raise it with {flag} N if this is meant" if flag else ""
            raise ConfigError(f"{what} has {size} bytes, more than {max_bytes} ({bound}){hint}")
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} cannot be read ({e})") from e
    try:
        return yaml_load(text, what, max_values, flag)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML ({str(e).splitlines()[0]})") from e


def load_yaml(path: str | Path, max_values: int = yamlsafe.MAX_VALUES, flag: str | None = None) -> dict:
    """Read a YAML mapping from ``path`` (one clear error if missing, malformed or too large: see read_yaml_file)."""
    data = read_yaml_file(path, f"config file {str(path)!r}", max_values, flag)
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
        if key == "kl.estimator" and v in ESTIMATOR_ALIASES:
            v, value_clamp = ESTIMATOR_ALIASES[v]
            if value_clamp is not None and "value_clamp" not in data:
                kwargs["value_clamp"] = value_clamp
        if key in CHOICES and v not in CHOICES[key] and not (v is None and default is None):
            if key == "kl.estimator":
                raise ConfigError(f"kl.estimator must be one of {', '.join(ESTIMATORS)} (or verl's "
                                  f"{', '.join(ESTIMATOR_ALIASES)}); got {v!r}")
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
    return {"id": env_id, **to_plain(dataclasses.asdict(params))}


def check_positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` (if not ``None``) is > 0 (``allow_zero``: >= 0)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def from_dict(data: dict, effects: str = "strict") -> Config:
    """Validate a nested dict (partial: missing keys take defaults) and build a :class:`Config`.

    ``effects``: how keys without effect are checked (:func:`check_effects`): ``strict`` (one run: refused),
    ``grid`` (a run of a grid whose base is shared by runs of several kinds: keys only some of them read are
    accepted) or ``off`` (a grid's base on its own, before the axes and variants complete it)."""
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of keys")
    top = {f.name for f in fields(Config)}
    for k in data:
        if k not in top:
            raise ConfigError(f"unknown key {k!r}; valid top-level keys: {', '.join(sorted(top))}")
    kwargs: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        kwargs[name] = _build_section(name, cls, data.get(name, {}) or {})
    kwargs["env"] = _validate_env(data.get("env", {"id": "bandit"}))
    for k in ("seed", "threads"):
        if k in data:
            kwargs[k] = _check_type(k, data[k], "int | None" if k == "threads" else "int", None)
    if "device" in data:
        if data["device"] not in CHOICES["device"]:
            raise ConfigError(f"device must be one of {', '.join(CHOICES['device'])}; got {data['device']!r}")
        kwargs["device"] = data["device"]
    train = kwargs["train"]
    if train.phases is not None:  # record what is run: the phases' sum (run ids hash the old default, sim.lab.run_ids)
        total = sum(ph.updates for ph in train.phases)
        given = (data.get("train") or {}).get("updates")
        if given is not None and given != total:
            raise ConfigError(f"train.updates={given!r} has no effect with train.phases, which run {total} "
                              f"updates; leave train.updates out or set it to {total}")
        kwargs["train"] = dataclasses.replace(train, updates=total)
    cfg = Config(**kwargs)
    _check_ranges(cfg)
    if effects != "off":
        check_effects(cfg, shared_base=effects == "grid")
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
    check_positive("train.clip_high", t.clip_high)
    check_positive("kl.value_clamp", kl.value_clamp)
    if kl.value_clamp is not None and (kl.estimator == "full" or kl.placement == "none"):
        raise ConfigError(f"kl.value_clamp has no effect with kl.placement={kl.placement}, "
                          f"kl.estimator={kl.estimator}: it clamps a sampled estimate (k1, k2, k3) in the reward or "
                          "the loss")
    if t.clip_low is not None and not 0.0 < t.clip_low < 1.0:
        raise ConfigError(f"train.clip_low must be in (0, 1) (the ratio's lower bound 1 − clip_low must stay "
                          f"above 0); got {t.clip_low!r}")
    check_positive("train.group", t.group)
    if t.batch % t.group:
        raise ConfigError(f"train.batch ({t.batch}) must be a multiple of train.group ({t.group}): the batch is a "
                          "whole number of groups")
    if t.advantage in GROUP_ADVANTAGES and t.group < 2:
        raise ConfigError(f"train.advantage={t.advantage} needs train.group >= 2 (a baseline from the other "
                          f"members of a group); got {t.group}")
    check_positive("train.staleness", t.staleness, allow_zero=True)
    no_effect = [(t.staleness_dist != "fixed" and t.staleness == 0, f"train.staleness_dist={t.staleness_dist}"),
                 (t.decoupled and t.staleness == 0, "train.decoupled=true"),
                 (kl.reward_logp != "behaviour" and (t.staleness == 0 or kl.placement != "reward"),
                  f"kl.reward_logp={kl.reward_logp}")]
    for bad, what in no_effect:
        if bad:
            raise ConfigError(f"{what} has no effect here: it needs stale rollouts (train.staleness > 0)"
                              + (" and the KL in the reward" if what.startswith("kl.") else ""))
    if t.advantage != "gae" and t.baseline not in ("auto", "none"):
        raise ConfigError(f"train.baseline={t.baseline} has no effect with train.advantage={t.advantage} (its own "
                          "baseline); leave train.baseline at auto")
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


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    return default_dict()  # read only


def _default(key: str) -> Any:
    return get_dotted(_defaults(), key)


def _no_effect_reasons(cfg: Config) -> list[tuple[str, str, bool]]:
    """``(key, why, shared)`` for every key that has no effect in ``cfg`` (whatever its value: training never
    reads it with the other keys as they are). ``shared``: a grid's common ``base`` may well set the key for
    runs it does not affect (``dpo.*`` beside PPO variants, a ``kl.clamp`` beside the no-KL variant), so a
    single config with it is accepted and the grid planner refuses runs that differ only in it."""
    kl, t, ref = cfg.kl, cfg.train, cfg.reference
    out: list[tuple[str, str, bool]] = []
    if not (t.algo == "ppo" and kl.placement == "loss" and kl.estimator in ("k1", "k2", "k3")):
        out.append(("kl.is_correction", "unless a sampled estimator (k1, k2, k3) is placed in the loss "
                                        "(kl.placement=loss, train.algo=ppo)", False))
    if kl.placement == "none":
        out.append(("kl.estimator", "with kl.placement=none (no KL term is trained)", False))
        out.append(("kl.clamp", "with kl.placement=none (no KL term is trained)", True))
        if t.algo == "ppo":
            out.append(("kl.controller", "with kl.placement=none (no KL term to scale)", False))
    if kl.controller == "fixed":
        out += [(k, "with kl.controller=fixed", False) for k in ("kl.target", "kl.horizon")]
    if ref.schedule == "frozen":
        out += [(k, "with reference.schedule=frozen", False) for k in ("reference.every", "reference.alpha")]
    elif ref.schedule == "reset":
        out.append(("reference.alpha", "with reference.schedule=reset (only ema mixes)", False))
    if t.policy == "tabular":
        out.append(("train.hidden", "with train.policy=tabular (no MLP)", True))
    if t.mode == "exact":
        out += [(k, "with train.mode=exact (one expected-gradient step per update)", False)
                for k in ("train.epochs", "train.minibatches", "train.clip")]
    if t.algo == "dpo":
        out.append(("kl.placement", "with train.algo=dpo (DPO has no KL placement)", False))
        out += [(f"train.{k}", "with train.algo=dpo (dpo.epochs and dpo.batch_size set the passes)", True)
                for k in ("epochs", "minibatches", "clip")]
        if cfg.dpo.beta is not None:
            out.append(("kl.beta", "with train.algo=dpo and dpo.beta set", True))
    else:
        out += [(f"dpo.{f.name}", "with train.algo=ppo", True) for f in fields(DPOConfig)]
    return out


def effective_dict(cfg: Config) -> dict:
    """``cfg.to_dict()`` with every key that has no effect in ``cfg`` reset to its default: two configs with
    the same effective dict train the same numbers (the seed is kept)."""
    d = cfg.to_dict()
    for key, _, _ in _no_effect_reasons(cfg):
        set_dotted(d, key, _default(key))
    return d


def check_effects(cfg: Config, shared_base: bool = False) -> None:
    """Raise :class:`ConfigError` for a key set to a non-default value where it has no effect (e.g.
    ``kl.is_correction: true`` with ``kl.placement: reward``): such a run would train the numbers of the plain
    one under another id, and a report would pool the two. With ``shared_base`` (a grid's run) the keys a
    shared base may set for runs they do not affect are let through (:func:`_no_effect_reasons`); the grid
    planner (:func:`sim.lab.grid.plan_sweep`) then refuses two runs that differ only in such keys."""
    d = cfg.to_dict()
    for key, why, shared in _no_effect_reasons(cfg):
        value, default = get_dotted(d, key), _default(key)
        if value == default or (shared and shared_base):
            continue
        raise ConfigError(f"{key}={json.dumps(value)} has no effect {why}; leave it at its default "
                          f"({json.dumps(default)}), or exclude these runs in a grid")


def resolve(config_path: str | Path | None = None, overrides: list[str] | None = None,
            base: dict | None = None, effects: str = "grid", max_values: int = yamlsafe.MAX_VALUES,
            flag: str | None = None) -> Config:
    """Defaults ← ``base`` ← YAML file ← ``--set`` overrides, validated into a :class:`Config` (``effects`` as
    :func:`from_dict`: ``grid`` by default, as configs built in code are often batched like a grid's runs;
    ``reflab run`` uses ``strict``).

    The YAML file and every ``--set`` value are bounded by ``max_values`` (:func:`yaml_load`; ``flag`` names
    the option that raises it)."""
    data: dict = dict(base or {})
    if config_path is not None:
        data = deep_merge(data, load_yaml(config_path, max_values, flag))
    for item in overrides or []:
        set_key(data, *parse_override(item, max_values, flag))
    return from_dict(data, effects)


def set_keys(cfg: Config, keys: tuple[str, ...]) -> list[str]:
    """``key=value`` for each dotted ``key`` of ``keys`` whose value in ``cfg`` differs from its default (what a
    trainer that does not support those keys reports)."""
    here, default = cfg.to_dict(), Config().to_dict()
    return [f"{k}={get_dotted(here, k)!r}" for k in keys if get_dotted(here, k) != get_dotted(default, k)]


#: Keys of PPO's advantage estimators and loss aggregation (trainers of other algorithms reject them).
PPO_VARIANT_KEYS = ("train.advantage", "train.group", "train.loss_agg", "kl.loss_agg", "train.clip_low",
                    "train.clip_high", "train.staleness", "train.staleness_dist", "train.decoupled", "kl.reward_logp")


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
