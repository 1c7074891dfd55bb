"""The run configuration's schema: the frozen, documented dataclass tree and the vocabulary of its keys.

Every key is dotted (``kl.beta``, ``train.lr``). Fields marked *per-run* may differ between runs trained in one
batch; all others define the batch's tensor program and must be equal (:func:`batch_signature`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


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
    """How a loss-placed KL term is aggregated over the batch (see ``train.loss_agg``); none = as the policy loss.
    Per-run in sampled mode."""
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
    REINFORCE++). The group estimators broadcast an episode's advantage to all its steps. Per-run in sampled mode."""
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
    episodes: Dr. GRPO). Also the value loss. Per-run in sampled mode."""
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
        return plain_dict(self)

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
#: Keys that may also differ between the runs of one batch in ``train.mode: sampled`` (PPO's advantage estimator
#: and loss aggregations, chosen per run there; exact mode's expected losses take one of each per batch).
SAMPLED_PER_RUN_KEYS = ("train.advantage", "train.loss_agg", "kl.loss_agg")

SECTIONS: dict[str, type] = {"kl": KLConfig, "reference": ReferenceConfig, "train": TrainConfig, "log": LogConfig,
                             "dpo": DPOConfig, "reward": RewardConfig, "bon": BoNConfig}


def to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_plain(v) for v in x]
    return x


_ATOMIC = (str, int, float, bool, type(None))
SCALAR_TYPES = frozenset(_ATOMIC)
"""The immutable scalar types of a plain config value (kept as they are, never copied)."""
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def plain_dict(x: Any) -> Any:
    """``to_plain(dataclasses.asdict(x))`` of a dataclass tree (the same dict), in one pass: dataclasses become
    dicts of their fields, lists and tuples lists, dicts dicts; immutable scalars are kept, anything else is
    deep-copied (as ``asdict`` does). Several times faster than ``asdict``, which deep-copies every leaf: field
    names are looked up once per class, and the leaves of exactly a scalar type are kept without a call."""
    t = type(x)
    atomic = SCALAR_TYPES
    if t in atomic:
        return x
    if t is list or t is tuple:
        if atomic.issuperset(map(type, x)):  # a list of scalars (an env's table): one C-level copy
            return list(x)
        return [v if type(v) in atomic else plain_dict(v) for v in x]
    names = _FIELD_NAMES.get(t)
    if names is None:
        if isinstance(x, _ATOMIC):
            return x
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            names = _FIELD_NAMES[t] = tuple(f.name for f in dataclasses.fields(x))
    if names is not None:
        return {k: v if type(v := getattr(x, k)) in atomic else plain_dict(v) for k in names}
    if isinstance(x, dict):
        return {k if type(k) in atomic else plain_dict(k): v if type(v) in atomic else plain_dict(v)
                for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [v if type(v) in atomic else plain_dict(v) for v in x]
    return copy.deepcopy(x)


def default_dict() -> dict:
    """The default configuration as a nested dict."""
    return Config().to_dict()


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


def get_dotted(cfg_dict: dict, key: str) -> Any:
    """``cfg_dict[a][b]`` for ``key = "a.b"`` (``KeyError`` if absent)."""
    cur: Any = cfg_dict
    for p in key.split("."):
        cur = cur[p]
    return cur


def set_keys(cfg: Config, keys: tuple[str, ...]) -> list[str]:
    """``key=value`` for each dotted ``key`` of ``keys`` whose value in ``cfg`` differs from its default (what a
    trainer that does not support those keys reports)."""
    here, default = cfg.to_dict(), Config().to_dict()
    return [f"{k}={get_dotted(here, k)!r}" for k in keys if get_dotted(here, k) != get_dotted(default, k)]


#: Keys of PPO's advantage estimators and loss aggregation (trainers of other algorithms reject them).
PPO_VARIANT_KEYS = ("train.advantage", "train.group", "train.loss_agg", "kl.loss_agg", "train.clip_low",
                    "train.clip_high", "train.staleness", "train.staleness_dist", "train.decoupled", "kl.reward_logp")


def batch_signature(cfg: Config) -> str:
    """JSON of everything that must be equal for runs to share one batch (all but :data:`PER_RUN_KEYS`, and in
    sampled mode :data:`SAMPLED_PER_RUN_KEYS`)."""
    d = cfg.to_dict()
    for key in PER_RUN_KEYS + (SAMPLED_PER_RUN_KEYS if cfg.train.mode == "sampled" else ()):
        parts = key.split(".")
        cur = d
        for p in parts[:-1]:
            cur = cur[p]
        cur.pop(parts[-1], None)
    return json.dumps(d, sort_keys=True)


__all__ = [
    "BoNConfig",
    "CHOICES",
    "Config",
    "ConfigError",
    "DPOConfig",
    "ESTIMATORS",
    "ESTIMATOR_ALIASES",
    "GROUP_ADVANTAGES",
    "KLConfig",
    "LOSS_AGGREGATIONS",
    "LogConfig",
    "PER_RUN_KEYS",
    "PLACEMENTS",
    "PPO_VARIANT_KEYS",
    "SAMPLED_PER_RUN_KEYS",
    "Phase",
    "ReferenceConfig",
    "RewardConfig",
    "SECTIONS",
    "TrainConfig",
    "UsageError",
    "batch_signature",
    "default_dict",
    "get_dotted",
    "set_dotted",
    "set_keys",
    "plain_dict",
    "to_plain",
]
