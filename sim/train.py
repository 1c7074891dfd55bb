"""The batched training loop: many independent runs (seeds, β, placements, estimators) as one tensor program.

``train_batch(configs)`` trains every config at once and returns one :class:`RunOutput` per config. The
runs must share a :func:`sim.config.batch_signature` (same env, shapes and schedule); the per-run keys
(seed, ``kl.*``, ``train.lr``) become tensors ``[R]``. Every random number comes from the run's own
counter-based stream (:mod:`sim.rng`), and every loss is a sum of per-run losses, so a run gives the same
numbers in any batch.

Reading order: ``DiscreteTrainer.collect`` (sampling) → ``_shape_and_advantage`` (KL in the reward, GAE)
→ ``sampled_update``/``_group``/``_ppo_loss`` (clipped loss + KL in the loss, on per-(s, a) sums)
→ ``exact_update`` (the same placement × estimator by enumeration) → ``BatchTrainer.run`` (phases,
reference schedule, β controller, divergence, logging).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import overload

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

import envs
from envs import tabular
from sim import rng
from sim.config import Config, batch_signature
from sim.kl import (
    ESTIMATORS,
    PLACEMENTS,
    Weights,
    all_estimates,
    estimator_weights,
    full_kl,
    full_kl_slope,
    weighted_estimate,
    weighted_estimate_and_slope,
)
from sim.memory import keep_freed_memory, release_free_memory
from sim.optim import BatchedOptimizer, clip_grad_norm_per_run, grad_norm_per_run
from sim.policies import (
    MLPPolicy,
    MLPValue,
    TabularPolicy,
    TabularValue,
    gather_rows,
    log_softmax_action_major,
    sum_actions,
)
from sim.ppo import gae, normalize_per_run

ProgressFn = Callable[[int, int], None]

ROW_PAD = 64
"""Row tables of the PPO loss are padded to a multiple of this many rows: vectorized CPU kernels then cover
every real row (no scalar tail, whose transcendental functions may round differently), with up to two
threads, so a row's numbers do not depend on how many other rows share its table."""

ROW_CHUNK = 20416
"""Most columns per block of the tabular loss and its gradient; the columns are split into equal blocks of
at most this many (multiples of :data:`ROW_PAD`). Sized for the autograd backward pass the loss once had
(40 paired timings on the gridworld grid: 0.79–0.92× the one-pass time); not a power of two, whose equally
spaced buffers alias in the CPU caches."""


@dataclass
class RunOutput:
    """What one run produced: the tables of the output contract and its final status."""

    config: Config
    metrics: pd.DataFrame
    policy: pd.DataFrame
    trajectories: pd.DataFrame
    status: dict = field(default_factory=dict)
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    """Further tables of this kind of run (e.g. ``preferences``), written as ``<name>.parquet``."""

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the run by file stem: metrics, policy, trajectories and the extras."""
        return {"metrics": self.metrics, "policy": self.policy, "trajectories": self.trajectories, **self.extra}


class RunOutputs(Sequence[RunOutput]):
    """The outputs of a trained batch, one :class:`RunOutput` per config, built when accessed.

    A run's tables are made from the batch's logs on access and not kept, so writing the runs of a batch one
    after the other holds one run's tables in memory at a time (10 000 runs' DataFrames at once would not).
    """

    def __init__(self, trainer: BatchTrainer, cols: dict[str, np.ndarray], traj_stacked: tuple):
        self._trainer, self._cols, self._traj = trainer, cols, traj_stacked

    def __len__(self) -> int:
        return self._trainer.R

    @overload
    def __getitem__(self, i: int) -> RunOutput: ...

    @overload
    def __getitem__(self, i: slice) -> list[RunOutput]: ...

    def __getitem__(self, i: int | slice) -> RunOutput | list[RunOutput]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._trainer._run_output(i % len(self), self._cols, self._traj)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but torch.cuda.is_available() is false")
    return torch.device(name)


def build_env(cfg: Config):
    """The env's params object for ``cfg.env`` (``.build()`` gives its tables/spec)."""
    env = dict(cfg.env)
    return envs.ENV_PARAMS[env.pop("id")].from_dict(env)


# ------------------------------------------------------------------------------------------------------
# Per-run settings as tensors
# ------------------------------------------------------------------------------------------------------


@dataclass
class RunTensors:
    """Per-run settings ``[R]`` of a batch."""

    keys: Tensor
    beta: Tensor
    placement: Tensor  # index into PLACEMENTS
    estimator: Tensor  # index into ESTIMATORS
    is_correction: Tensor
    adaptive: Tensor
    target: Tensor
    kl_horizon: Tensor
    lr: Tensor

    @classmethod
    def from_configs(cls, configs: list[Config], device: torch.device) -> RunTensors:
        def t(values, dt):
            return torch.tensor(values, dtype=dt, device=device)

        return cls(
            keys=rng.run_keys([c.seed for c in configs], device),
            beta=t([c.kl.beta for c in configs], torch.float64),
            placement=t([PLACEMENTS.index(c.kl.placement) for c in configs], torch.long),
            estimator=t([ESTIMATORS.index(c.kl.estimator) for c in configs], torch.long),
            is_correction=t([c.kl.is_correction for c in configs], torch.bool),
            adaptive=t([c.kl.controller == "adaptive" for c in configs], torch.bool),
            target=t([c.kl.target for c in configs], torch.float64),
            kl_horizon=t([c.kl.horizon for c in configs], torch.float64),
            lr=t([c.train.lr for c in configs], torch.float64),
        )

    def __post_init__(self) -> None:
        onehot = torch.nn.functional.one_hot(self.estimator, len(ESTIMATORS)).to(torch.float64)
        in_reward = (self.placement == PLACEMENTS.index("reward")).to(torch.float64)
        in_loss = (self.placement == PLACEMENTS.index("loss")).to(torch.float64)
        is_corr = self.is_correction.to(torch.float64)
        # One-hot estimator masks per role; multiplied by the current β when used.
        self._masks = {"reward": onehot * in_reward[:, None],
                       "loss": onehot * (in_loss * (1 - is_corr))[:, None],
                       "loss_is": onehot * (in_loss * is_corr)[:, None]}

    def coef(self, role: str) -> Tensor:
        """``[R, 4]`` weights of (k1, k2, k3, full) for ``role`` ∈ reward | loss | loss_is: β on the run's
        estimator if its KL sits there, else 0."""
        return self._masks[role] * self.beta[:, None]


def _bcast(x: Tensor, like: Tensor) -> Tensor:
    """``x [R]`` viewed to broadcast against ``like [R, ...]`` in ``like``'s dtype."""
    return x.view((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


def kl_reward_penalty(logp: Tensor, ref_logp: Tensor, k_full: Tensor, rt: RunTensors,
                      row_run: Tensor | None = None) -> Tensor:
    """``β·k`` for runs whose KL sits in the reward (0 for the others), ``[R, ...]``, no gradient.

    ``logp``/``ref_logp`` are the sampling policy's and the reference's log-probabilities of the sampled
    actions; ``k_full`` the exact per-state KL (used by ``full``). With ``row_run [M]`` the inputs are
    action-major row tables ``[A, M]`` whose row ``m`` belongs to run ``row_run[m]``.
    """
    with torch.no_grad():
        return weighted_estimate(logp, ref_logp, rt.coef("reward"), k_full, run_index=row_run)


def kl_loss_term(logp: Tensor, logp_old: Tensor, ref_logp: Tensor, k_full: Tensor | Callable[[], Tensor],
                 rt: RunTensors, row_run: Tensor | None = None, weights: tuple[Weights, Weights] | None = None
                 ) -> Tensor:
    """``β·k`` with gradient through ``logp`` (the current policy at the sampled actions) for runs whose KL
    sits in the loss (0 for the others), ``[R, ...]``. Added outside the PPO clip.

    Runs with ``kl.is_correction`` use the importance-weighted forms for samples from π_old;
    ``full`` (``k_full``, carrying gradient; may be a callable so it is only computed when used) needs none.
    ``row_run`` as in :func:`kl_reward_penalty`. ``weights``: the samples' :func:`sim.kl.estimator_weights`
    for the plain and the importance-weighted forms, if already computed (``rt`` and ``row_run`` are then
    not used for them).
    """
    out = _kl_loss(logp, logp_old, ref_logp, k_full, rt, row_run, weights, None, slope=False)[0]
    assert out is not None
    return out


def kl_loss_term_and_slope(logp: Tensor, logp_old: Tensor, ref_logp: Tensor,
                           k_full: Tensor | Callable[[], Tensor], rt: RunTensors, row_run: Tensor | None = None,
                           weights: tuple[Weights, Weights] | None = None, delta_slope: Tensor | None = None,
                           value: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`kl_loss_term` (the same values; ``None`` unless ``value``) with its derivative
    ``(value, slope, full_weight)`` as in :func:`sim.kl.weighted_estimate_and_slope`, for losses
    differentiated by hand."""
    return _kl_loss(logp, logp_old, ref_logp, k_full, rt, row_run, weights, delta_slope, slope=True, value=value)


def _kl_loss(logp: Tensor, logp_old: Tensor, ref_logp: Tensor, k_full: Tensor | Callable[[], Tensor],
             rt: RunTensors, row_run: Tensor | None, weights: tuple[Weights, Weights] | None,
             delta_slope: Tensor | None, slope: bool, value: bool = True
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    def estimate(w: Weights, old: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if slope:
            return weighted_estimate_and_slope(logp, ref_logp, w, k_full, old, delta_slope=delta_slope, value=value)
        return weighted_estimate(logp, ref_logp, w, k_full, old), None, None

    if weights is None:
        weights = (estimator_weights(rt.coef("loss"), logp, row_run),
                   estimator_weights(rt.coef("loss_is"), logp, row_run))
    plain, is_weighted = weights
    parts = [estimate(plain, None)]
    if any(w is not None for w in is_weighted):
        parts.append(estimate(is_weighted, logp_old))

    def total(xs: list[Tensor | None]) -> Tensor | None:
        xs = [x for x in xs if x is not None]
        return None if not xs else xs[0] if len(xs) == 1 else xs[0] + xs[1]

    return total([p[0] for p in parts]), total([p[1] for p in parts]), total([p[2] for p in parts])


class _Clamp:
    """Optional clamp of log-ratios with a per-run count of clamped values (THEORY.md: clamps hide collapse)."""

    def __init__(self, limit: float | None, n_runs: int, device: torch.device):
        self.limit = limit
        self.count = torch.zeros(n_runs, dtype=torch.long, device=device)

    def __call__(self, logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None,
                 row_run: Tensor | None = None) -> Tensor:
        """``ref_logp`` adjusted so that ``logp − ref_logp`` lies in [−limit, limit].

        ``mask`` (bool, same shape) says which entries are samples; or, for tables, integer sample counts
        per entry, so a clamped table entry counts once per sample that uses it. Inputs are ``[R, ...]``,
        or action-major row tables ``[A, M]`` with ``row_run [M]`` naming each row's run.
        """
        if self.limit is None:
            return ref_logp
        delta = logp - ref_logp
        hit = delta.detach().abs() > self.limit
        if mask is not None:
            hit = hit & mask if mask.dtype == torch.bool else hit * mask
        if row_run is None:
            self.count += hit.reshape(hit.shape[0], -1).sum(-1).to(self.count.dtype)
        else:
            self.count.index_add_(0, row_run, hit.sum(0).to(self.count.dtype))
        return logp - delta.clamp(-self.limit, self.limit)

    def slope(self, logp: Tensor, ref_logp: Tensor) -> Tensor | None:
        """``∂δ/∂logp`` of the clamped log-ratio ``δ = logp − clamped ref``: 1 where ``|logp − ref_logp|`` is
        within the limit (bounds included, as autograd's clamp), 0 where clamped; ``None`` without a clamp."""
        if self.limit is None:
            return None
        return ((logp - ref_logp).abs() <= self.limit).to(logp.dtype)


# ------------------------------------------------------------------------------------------------------
# The shared loop
# ------------------------------------------------------------------------------------------------------


class BatchTrainer:
    """Phases, reference schedule, β controller, divergence detection and logging for a batch of runs.

    Subclasses provide sampling (``collect``), the PPO and exact updates and the env-specific metrics.
    """

    def __init__(self, configs: list[Config], device: torch.device):
        sigs = {batch_signature(c) for c in configs}
        if len(sigs) != 1:
            raise ValueError("runs in one batch must share env, shapes and schedule (see sim.config.PER_RUN_KEYS)")
        self.configs = configs
        self.cfg = configs[0]
        self.device = device
        self.dtype = torch.float64 if self.cfg.train.dtype == "float64" else torch.float32
        self.R = len(configs)
        self.rt = RunTensors.from_configs(configs, device)
        self.clamp = _Clamp(self.cfg.kl.clamp, self.R, device)
        self.diverged_at = torch.full((self.R,), -1, dtype=torch.long, device=device)
        self.diverge_reason: list[str] = [""] * self.R
        self.env_steps = torch.zeros(self.R, dtype=torch.long, device=device)
        self.reward_scale = 1.0
        self.phase = 0
        self.ref_version = 0
        self.metric_log: list[dict[str, Tensor]] = []
        self.policy_log: list[tuple[int, dict[str, np.ndarray]]] = []
        self.traj_log: list[dict[str, np.ndarray]] = []

    # -- hooks for subclasses ------------------------------------------------------------------------
    params: dict[str, Tensor]
    ref_params: dict[str, Tensor]
    trainable: list[str]

    def sampled_update(self, update: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def exact_update(self, update: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def exact_metrics(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def policy_tables(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def policy_frame(self, run: int) -> pd.DataFrame:
        raise NotImplementedError

    # -- shared machinery -----------------------------------------------------------------------------
    @property
    def alive(self) -> Tensor:
        return self.diverged_at < 0

    def _make_optimizer(self) -> None:
        self.opt = BatchedOptimizer({k: self.params[k] for k in self.trainable}, self.rt.lr.clone(),
                                    self.cfg.train.optimizer)

    def _apply_grads(self, loss_per_run: Tensor | None, update: int, want_norm: bool = True,
                     grads: dict[str, Tensor] | None = None) -> Tensor | None:
        """Backpropagate ``Σ_r loss_r`` (unless the gradients ``grads`` are given), freeze runs whose loss or
        gradient is non-finite, step. With ``grads`` given the loss may be ``None`` (not computed on this
        step): only the gradients are checked.

        Returns the per-run gradient norms ``[R]`` (before clipping) when clipping or ``want_norm`` needs them.
        """
        if grads is None:
            leaves = [self.params[k] for k in self.trainable]
            total = torch.where(self.alive, loss_per_run, torch.zeros_like(loss_per_run)).sum()
            grads_list = torch.autograd.grad(total, leaves, allow_unused=True)
            grads = {k: (g if g is not None else torch.zeros_like(self.params[k]))
                     for k, g in zip(self.trainable, grads_list, strict=True)}
        finite = (torch.isfinite(loss_per_run) if loss_per_run is not None
                  else torch.ones(self.R, dtype=torch.bool, device=self.device))
        for g in grads.values():
            finite &= _finite_per_run(g.reshape(self.R, -1))
        self._mark_diverged(~finite, update, "non-finite loss or gradient")
        if not bool(self.alive.all()):
            for k in grads:
                grads[k] = torch.where(_bcast(self.alive, grads[k]).bool(), grads[k], torch.zeros_like(grads[k]))
        norm = None
        if self.cfg.train.max_grad_norm is not None:
            norm = clip_grad_norm_per_run(grads, self.cfg.train.max_grad_norm)
        elif want_norm:
            norm = grad_norm_per_run(grads)
        self.opt.step(grads)
        return norm

    def _ppo_epochs(self, flat: dict[str, Tensor], update: int,
                    loss_fn: Callable[[dict[str, Tensor], bool, bool], tuple],
                    prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
                    ) -> dict[str, Tensor]:
        """``train.epochs`` passes over samples ``flat [R, n]`` in ``train.minibatches`` per-run shuffled chunks.

        Each run's permutation comes from its own stream, so the minibatches of a run do not depend on the
        batch it is trained in. ``prepare(minibatch)`` (optional) turns a minibatch into what the loss needs
        (computed once for full-batch epochs); ``loss_fn(prepared, want_diagnostics, want_loss)`` returns the
        per-run loss, diagnostics (when asked) and optionally the gradients it computed itself, in which case
        the loss may be ``None`` unless ``want_loss``. The loss is asked for on the last epoch: a loss that
        is not finite there marks the run diverged at this update, as a non-finite gradient does at any step.
        Diagnostics are averaged over the last epoch's gradient steps of an update whose metrics are logged
        (other updates compute none).
        """
        tr = self.cfg.train
        n = next(iter(flat.values())).shape[1]
        mb_key = rng.fold(self.rt.keys, update ^ 0x5A5A5A)
        stats: dict[str, Tensor] = {}
        n_steps = 0
        logs = self._logs_at(update)
        n_mb = min(tr.minibatches, n)
        prepare = prepare or (lambda mb: mb)
        if n_mb > 1:
            perms = torch.argsort(rng.uniform(mb_key, (tr.epochs, n)), dim=-1)  # [R, epochs, n]
        else:
            whole = prepare(flat)
        for epoch in range(tr.epochs):
            chunks = torch.tensor_split(perms[:, epoch], n_mb, dim=1) if n_mb > 1 else [None]
            last = epoch == tr.epochs - 1
            diagnose = logs and last
            for chunk in chunks:
                mb = whole if chunk is None else prepare({k: _take(v, chunk) for k, v in flat.items()})
                loss, diag, *grads = loss_fn(mb, diagnose, last)
                norm = self._apply_grads(loss, update, want_norm=diagnose, grads=grads[0] if grads else None)
                if diagnose:  # diagnostics of the last epoch: how far the update moved from π_old
                    diag["grad_norm"] = norm
                    for k, v in diag.items():
                        stats[k] = stats.get(k, 0.0) + v.detach().to(torch.float64)
                    n_steps += 1
        return {k: v / max(n_steps, 1) for k, v in stats.items()}

    def _mark_diverged(self, bad: Tensor, update: int, reason: str) -> None:
        new = bad & self.alive
        if bool(new.any()):
            self.diverged_at = torch.where(new, torch.full_like(self.diverged_at, update), self.diverged_at)
            self.opt.lr.masked_fill_(new, 0.0)
            for i in torch.nonzero(new).flatten().tolist():
                self.diverge_reason[i] = reason

    def _check_params(self, update: int) -> None:
        finite = torch.ones(self.R, dtype=torch.bool, device=self.device)
        for k in self.trainable:
            finite &= _finite_per_run(self.params[k].detach().reshape(self.R, -1))
        self._mark_diverged(~finite, update, "non-finite policy parameters")

    def _refresh_reference(self, update: int) -> None:
        ref = self.cfg.reference
        if ref.schedule == "frozen" or update % ref.every != 0:
            return
        with torch.no_grad():
            for k in self.ref_params:
                if ref.schedule == "reset":
                    self.ref_params[k] = self.params[k].detach().clone()
                else:
                    self.ref_params[k] = ref.alpha * self.params[k].detach() + (1 - ref.alpha) * self.ref_params[k]
        self.ref_version += 1

    def _control_beta(self, kl_per_episode: Tensor, n_episodes: int) -> None:
        """Ziegler et al.'s proportional controller on runs with ``kl.controller = adaptive``."""
        err = (kl_per_episode.to(torch.float64) / self.rt.target - 1.0).clamp(-0.2, 0.2)
        new_beta = self.rt.beta * (1.0 + err * n_episodes / self.rt.kl_horizon)
        ok = self.rt.adaptive & torch.isfinite(new_beta)
        self.rt.beta = torch.where(ok, new_beta, self.rt.beta)

    def _log(self, update: int, values: dict[str, Tensor]) -> None:
        values = dict(values)
        values["update"] = torch.full((self.R,), update, dtype=torch.long, device=self.device)
        values["phase"] = torch.full((self.R,), self.phase, dtype=torch.long, device=self.device)
        values["reward_scale"] = torch.full((self.R,), self.reward_scale, dtype=torch.float64, device=self.device)
        values["env_steps"] = self.env_steps.clone()
        values["beta"] = self.rt.beta.clone()
        values["kl_clamps"] = self.clamp.count.clone()
        values["_alive"] = self.alive.clone()
        # copy=True: a value may be a view of a live parameter (e.g. the Gaussian mean in float64)
        self.metric_log.append({k: v.detach().to("cpu", torch.float64 if v.is_floating_point() else torch.long,
                                                 copy=True) for k, v in values.items()})

    def run(self, progress: ProgressFn | None = None) -> RunOutputs:
        """Train every run through all phases and return their outputs (built one run at a time on access)."""
        cfg = self.cfg
        total = cfg.train.total_updates
        pol_every = cfg.log.policy_every
        keep_freed_memory()
        t0 = time.perf_counter()
        update = 0
        # Huge batches (≥ 2^20 samples per update) free tens of MB of temporaries every update, which
        # fragments the C heap; giving the free pages back every 10 updates keeps the peak memory flat.
        trim_every = 10 if self.R * cfg.train.batch * getattr(self, "H", 1) >= 1 << 20 else 0
        with torch.no_grad():
            self._log(0, self.exact_metrics())
        self.policy_log.append((0, self.policy_tables()))
        for phase_idx, phase in enumerate(cfg.train.phase_list()):
            self.phase, self.reward_scale = phase_idx, phase.reward_scale
            self._on_phase()
            for _ in range(phase.updates):
                update += 1
                if cfg.train.mode == "exact":
                    diag = self.exact_update(update)
                else:
                    diag = self.sampled_update(update)
                self._check_params(update)
                self._refresh_reference(update)
                if self._logs_at(update):
                    with torch.no_grad():
                        self._log(update, {**diag, **self.exact_metrics()})
                if update % pol_every == 0 or update == total:
                    self.policy_log.append((update, self.policy_tables()))
                if progress is not None:
                    progress(update, total)
                if trim_every and update % trim_every == 0:
                    release_free_memory()
        self.wall_time = time.perf_counter() - t0
        return self._outputs()

    def _on_phase(self) -> None:
        pass

    def _logs_at(self, update: int) -> bool:
        """Whether metrics are logged after ``update`` (every ``log.every`` and the last)."""
        return update % self.cfg.log.every == 0 or update == self.cfg.train.total_updates

    def _outputs(self) -> RunOutputs:
        lead = ["update", "phase", "reward_scale", "env_steps", "beta"]
        keys = list(dict.fromkeys(lead + [k for rec in self.metric_log for k in rec]))
        nan = torch.full((self.R,), float("nan"), dtype=torch.float64)
        cols = {k: torch.stack([rec.get(k, nan) for rec in self.metric_log], dim=1).numpy() for k in keys}
        self.metric_log = []  # the stacked columns replace the per-update records
        return RunOutputs(self, cols, self._stack_traj_log())

    def _extra_tables(self, run: int) -> dict[str, pd.DataFrame]:
        """Further output tables of run ``run`` (``RunOutput.extra``); none by default."""
        return {}

    def _run_output(self, i: int, cols: dict[str, np.ndarray], traj_stacked: tuple) -> RunOutput:
        """The :class:`RunOutput` of run ``i`` from the stacked logs."""
        c = self.configs[i]
        keep = cols["_alive"][i].astype(bool) | (cols["update"][i] == self.diverged_at[i].item())
        # copy=False: every column is a fresh array (boolean indexing copies), not shared with other runs
        metrics = pd.DataFrame({k: v[i][keep] for k, v in cols.items() if k != "_alive"}, copy=False)
        d = int(self.diverged_at[i])
        if d >= 0:
            status = {"status": "diverged", "update": d, "error": self.diverge_reason[i]}
        else:
            status = {"status": "done", "update": c.train.total_updates}
        status["wall_time_s"] = round(self.wall_time, 3)
        status["n_runs_in_batch"] = self.R
        status["kl_clamps"] = int(self.clamp.count[i])
        status["backend"] = c.train.backend
        return RunOutput(c, metrics, self.policy_frame(i), self._traj_frame(i, *traj_stacked), status,
                         self._extra_tables(i))

    _TRAJ_COLS = ("update", "episode", "t", "state", "action", "reward", "logp", "ref_logp")

    def _stack_traj_log(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Logged trajectory records stacked once: ``{key: [R, n_records, episodes, steps]}`` and their updates."""
        if not self.traj_log:
            return {}, np.zeros(0, dtype=np.int64)
        keys = ("valid", *self._TRAJ_COLS[3:])
        return ({k: np.stack([rec[k] for rec in self.traj_log], axis=1) for k in keys},
                np.array([rec["update"] for rec in self.traj_log], dtype=np.int64))

    def _traj_frame(self, run: int, stacked: dict[str, np.ndarray], updates: np.ndarray) -> pd.DataFrame:
        cols = self._TRAJ_COLS
        if not stacked:
            return pd.DataFrame({k: np.zeros(0, dtype=np.int64 if k in cols[:5] else np.float64) for k in cols})
        valid = stacked["valid"][run].copy()  # [n_records, episodes, steps]
        d = int(self.diverged_at[run])
        if d >= 0:
            valid[updates > d] = False
        rec, ep, t = np.nonzero(valid)
        frame = {"update": updates[rec], "episode": ep.astype(np.int64), "t": t.astype(np.int64)}
        for k in cols[3:]:
            frame[k] = stacked[k][run][rec, ep, t]
        return pd.DataFrame(frame, copy=False)  # fresh arrays (fancy indexing copies)


# ------------------------------------------------------------------------------------------------------
# Discrete (tabular MDP) envs: bandit, gridworld, token tree
# ------------------------------------------------------------------------------------------------------


class DiscreteTrainer(BatchTrainer):
    """PPO on a :class:`envs.tabular.TabularMDP` with tabular or MLP policies."""

    trains_value_fn = True
    """Whether a value baseline may be trained (``False`` for algorithms without one, e.g. DPO)."""

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
        cfg = self.cfg
        self.mdp = build_env(cfg).build().to(device)
        self.core = tabular.TabularCore(self.mdp)
        S, A = self.mdp.n_states, self.mdp.n_actions
        self.S, self.A, self.H = S, A, self.mdp.horizon
        dt = self.dtype
        ref_logp = self.mdp.ref_logp.to(dt).unsqueeze(0).expand(self.R, S, A).contiguous()
        init_logp = self._init_logp(cfg.train.init, ref_logp)
        if cfg.train.policy == "mlp":
            self.policy = MLPPolicy(self.mdp.features, A, cfg.train.hidden)
        else:
            self.policy = TabularPolicy(S, A)
        self.params = self.policy.init_params(init_logp, self.rt.keys)
        self.ref_params = {k: v.clone() for k, v in self.params.items()}
        if "base" in self.ref_params:
            self.ref_params["base"] = ref_logp.clone()
        else:
            self.ref_params["logits"] = ref_logp.clone()
        self.baseline = cfg.train.baseline if self.trains_value_fn else "none"
        if self.baseline == "auto":
            self.baseline = "mean" if self.H == 1 else "value"
        self.trainable = [k for k in self.params if k not in self.policy.frozen_keys]
        if self.baseline == "value":
            vf = MLPValue(self.mdp.features, cfg.train.hidden) if cfg.train.policy == "mlp" else TabularValue(S)
            self.value_fn = vf
            vparams = vf.init_params(self.R, dt, device, self.rt.keys)
            self.params.update(vparams)
            self.trainable += list(vparams)
        for k in self.trainable:
            self.params[k].requires_grad_(True)
        self._make_optimizer()
        self._grad_rows: Tensor | None = None  # the rows the gradient buffers were last written at
        self._opt_cache: dict = {}
        self._ref_derived_cache: dict[str, Tensor] = {}
        self._ref_derived_version = -1
        self._scaled_mdp = self.mdp

    def _init_logp(self, init, ref_logp: Tensor) -> Tensor:
        if init == "reference":
            return ref_logp.clone()
        if init == "uniform":
            return torch.full_like(ref_logp, -math.log(self.A))
        probs = torch.tensor(init, dtype=torch.float64, device=self.device)
        if self.S != 1 or probs.shape != (self.A,):
            raise ValueError(f"train.init as a list needs a one-state env with {self.A} actions; got {list(init)}")
        if bool((probs < 0).any()) or abs(float(probs.sum()) - 1) > 1e-6:
            raise ValueError(f"train.init probabilities must be non-negative and sum to 1; got {list(init)}")
        return torch.log(probs).to(self.dtype).view(1, 1, -1).expand_as(ref_logp).contiguous()

    def _on_phase(self) -> None:
        self._scaled_mdp = replace(self.mdp, reward=self.mdp.reward * self.reward_scale)

    # -- tables -------------------------------------------------------------------------------------------
    def _tables(self) -> tuple[Tensor, Tensor]:
        """Current policy and reference log-probability tables ``[R, S, A]`` (no grad, contiguous)."""
        with torch.no_grad():
            return self.policy.table(self.params).contiguous(), self._ref_table()

    def _ref_table(self) -> Tensor:
        """The reference's log-probability table ``[R, S, A]``, recomputed only when the reference changes."""
        def make() -> Tensor:
            with torch.no_grad():
                return self.policy.table(self.ref_params).contiguous()
        return self._ref_derived("table", make)

    # -- sampling ---------------------------------------------------------------------------------------
    def collect(self, update: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Sample ``train.batch`` episodes per run from the current policy.

        Returns the samples ``state, action, idx (= state·A + action), reward, done, valid`` ``[R, N, H]``
        (zeros, ``done`` true, after an episode's end) and the tables they were drawn with: ``logp`` (π_old)
        and ``ref_logp`` ``[R, S, A]``.

        Random draws come from the run's stream for this update: actions (inverse CDF), then transition
        outcomes, the initial state and reward noise, each drawn only if the env needs it. Step ``t`` of
        episode ``n`` uses element ``n·H + t`` of the ``[N, H]`` streams. Each step computes only the
        episodes still running (uniforms: those running at the first of each pair of steps), so the cost
        follows the steps taken rather than ``N·H``.
        """
        R, N, H, A, S = self.R, self.cfg.train.batch, self.H, self.A, self.S
        dev = self.device
        key = rng.fold(self.rt.keys, update)
        k_act = rng.fold(key, 0)
        k_out = rng.fold(key, 1) if self.mdp.n_outcomes > 1 else None
        z = rng.normal(rng.fold(key, 3), (N, H)).view(-1) if self.mdp.reward_noise > 0 else None  # [R·N·H]
        if self.core.needs_reset_uniform:
            state = self.core.reset(rng.uniform(rng.fold(key, 2), (N,))).reshape(-1)
        else:  # a fixed start state: no draw
            state = self.core.reset(torch.zeros(R * N, dtype=torch.float64, device=dev))
        pi_t, ref_t = self._tables()
        # float32 CDF rows (compared with float64 uniforms after exact promotion); with several states and
        # a few actions, its first A − 1 columns action-major: the action is the number of them at or below u
        # (the CDF does not decrease, and u ≥ the last column only happens where the others are all below u)
        cdf = pi_t.exp().cumsum(-1).reshape(R * S, A)
        cdf_cols = cdf[:, : A - 1].t().contiguous() if S > 1 and 1 < A <= 9 else None
        taken: dict[str, list[Tensor]] = {"at": [], "state": [], "action": [], "reward": [], "done": []}
        streams = [k_act] if k_out is None else [k_act, k_out]
        ahead: list[Tensor] = []  # the streams' next-step uniforms for the running episodes, if drawn

        def draw(t: int) -> list[Tensor]:
            """Element ``n·H + t`` of each running episode's ``[N, H]`` streams (actions, outcomes), flat.

            Steps are drawn in pairs, ``t`` and ``t + 1`` in one hash pass (half the passes); the second is
            kept in ``ahead`` for the episodes still running at ``t + 1``. The numbers are the same.
            """
            if ahead:
                out = list(ahead)
                ahead.clear()
                return out
            counter = torch.stack([n_h + t + i for i in range(min(2, H - t))])
            out = []
            for key in streams:
                u = rng.uniform_at(key.index_select(0, run.view(-1)).view(run.shape), counter, N * H)
                out.append(u[0].reshape(-1))
                ahead.extend(x.reshape(-1) for x in u[1:])
            return out

        # per running episode: its run, run·S, n·H and (run·N + n)·H; while every episode runs, broadcastable
        # [R, 1] / [1, N] forms and ep_h = None
        run = torch.arange(R, device=dev).unsqueeze(1)
        run_s = run * S
        n_h = (torch.arange(N, device=dev) * H).unsqueeze(0)
        ep_h: Tensor | None = None
        for t in range(H):
            s = state  # running episodes only: never the sink
            u, *u_outcome = draw(t)
            if S == 1 and ep_h is None:  # one state, every episode running: binary search in the run's CDF
                a = torch.searchsorted(cdf.to(u.dtype), u.view(R, N), right=True).view(-1).clamp_(max=A - 1)
            else:
                rows = run_s.expand(R, N).reshape(-1) + s if ep_h is None else run_s + s
                if cdf_cols is None:  # one state, or many actions: compare with whole CDF rows
                    a = (u.unsqueeze(-1) >= cdf.index_select(0, rows)).sum(-1).clamp_(max=A - 1)
                else:  # count the columns at or below u, in uint8 (at most A − 1 ≤ 8)
                    hits = [(u >= cdf_cols[j].index_select(0, rows)).view(torch.uint8) for j in range(A - 1)]
                    a = hits[0]
                    for h in hits[1:]:
                        a = a + h
                    a = a.long()
            u_out = u_outcome[0] if u_outcome else u
            at = (torch.arange(0, R * N * H, H, device=dev) if ep_h is None else ep_h) + t  # (run·N + n)·H + t
            nxt, r, end = self.core.step(s, a, u_out, None if z is None else z.take(at))
            for k, v in (("at", at), ("state", s), ("action", a), ("reward", r), ("done", end)):
                taken[k].append(v)
            going = (~end).nonzero().squeeze(1)
            if going.numel() == 0:
                break
            if ep_h is None:
                run = going // N
                run_s, n_h, ep_h = run * S, going % N * H, going * H
            else:
                run, run_s, n_h, ep_h = (x.index_select(0, going) for x in (run, run_s, n_h, ep_h))
            state = nxt.index_select(0, going)
            ahead[:] = [x.index_select(0, going) for x in ahead]
        taken["reward"] = [torch.cat(taken["reward"]).to(self.dtype)]  # cast once, not per step
        if H == 1:  # one step, taken by every episode: the step's tensors are the buffers
            buf = {k: v[0].view(R, N, 1) for k, v in taken.items() if k != "at"}
            buf["valid"] = torch.ones(R, N, 1, dtype=torch.bool, device=dev)
        else:  # one scatter per buffer; steps after an episode's end stay zero (done true, valid false)
            at = torch.cat(taken.pop("at"))
            cat = {k: torch.cat(v) for k, v in taken.items()}
            buf = {k: torch.full((R * N * H,), k == "done", dtype=v.dtype, device=dev).scatter_(0, at, v)
                   .view(R, N, H) for k, v in cat.items()}
            buf["valid"] = torch.zeros(R * N * H, dtype=torch.bool, device=dev).scatter_(0, at, True).view(R, N, H)
        buf["idx"] = buf["state"] * A + buf["action"]
        self.env_steps += torch.count_nonzero(buf["valid"].reshape(R, -1), 1)
        return buf, {"logp": pi_t, "ref_logp": ref_t}

    # -- visited rows ---------------------------------------------------------------------------------------
    def _visits(self, mb: dict[str, Tensor], tabs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Where a (mini)batch's valid samples fall: the (run, state) rows they visited, as columns of
        action-major tables ``[A, P]``.

        Columns ``0 … M−1`` are the visited rows in (run, state) order, the rest zero padding up to a multiple
        of :data:`ROW_PAD`. Per-sample KL quantities depend on the sample only through its (state, action),
        so they are computed on these tables and gathered; only visited rows carry loss.

        Args:
            mb: per-sample ``idx`` (= state·A + action), ``state``, ``valid``, each ``[R, n]``.
            tabs: the batch's ``logp`` (π_old) and ``ref_logp`` tables ``[R, S, A]``.
        Returns:
            ``rows [M]`` (flat ``run·S + state``), ``run [P]`` (each column's run; padding: 0), ``sel`` (the
            valid samples' flat indices into ``[R·n]``, run-major; absent for a one-step env whose samples are
            all valid),
            ``entry`` (each valid sample's flat index ``action·P + column``), ``count`` (samples per entry),
            ``old`` (log π_old) and ``ref`` (log π_ref) ``[A, P]``.
        """
        (R, n), S, A = mb["idx"].shape, self.S, self.A
        dev = self.device
        v: dict[str, Tensor] = {}
        # episodes that end before the horizon leave invalid samples; a one-step env's samples are checked
        if self.H > 1 or not bool(mb["valid"].all()):
            v["sel"] = mb["valid"].reshape(-1).nonzero().squeeze(1)  # run-major sample order
            row_of = self._take_valid(mb["state"].reshape(-1), v) + v["sel"] // n * S  # flat run·S + state
        else:
            row_of = (mb["state"] + (torch.arange(R, device=dev) * S).unsqueeze(1)).reshape(-1)
        seen = torch.zeros(R * S, dtype=torch.bool, device=dev)
        seen.index_fill_(0, row_of, True)
        rows = seen.nonzero().squeeze(1)
        M = rows.numel()
        P = -(-max(M, 1) // ROW_PAD) * ROW_PAD
        pos = torch.zeros(R * S, dtype=torch.long, device=dev)
        pos.index_copy_(0, rows, torch.arange(M, device=dev))
        col = pos.index_select(0, row_of)
        action = self._take_valid(mb["idx"].reshape(-1), v) % A  # idx = state·A + action
        entry = action * P + col
        v.update(rows=rows, run=F.pad(rows // S, (0, P - M)), col=col, entry=entry,
                 count=torch.bincount(entry, minlength=A * P).to(self.dtype).view(A, P),
                 old=gather_rows(tabs["logp"].reshape(R * S, A), rows, P),
                 ref=gather_rows(tabs["ref_logp"].reshape(R * S, A), rows, P))
        return v

    @staticmethod
    def _take_valid(x: Tensor, vis: dict[str, Tensor]) -> Tensor:
        """The valid samples' values of a flat per-sample tensor ``x [R·n]`` (see :meth:`_visits`)."""
        return x.index_select(0, vis["sel"]) if "sel" in vis else x

    # -- KL in the reward, advantages ---------------------------------------------------------------------
    def _shape_and_advantage(self, buf: dict[str, Tensor], tabs: dict[str, Tensor],
                             vis: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Shaped rewards ``r − β·k`` (KL in the reward), advantages and returns ``[R, N, H]``.

        The penalty of a sample depends on it only through its (state, action): it is computed on the
        visited rows (``vis``, from :meth:`_visits`; computed here if not given) and gathered. Adds ``kfull``
        (exact per-state KL of the visited rows ``[P]``) to ``vis``.
        """
        tr, rt = self.cfg.train, self.rt
        R, N, H = buf["valid"].shape
        valid = buf["valid"].to(self.dtype)  # the mask as a float, made once (a float mask is used as is)
        if vis is None:
            vis = self._visits({k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid")}, tabs)
        old, ref, run = vis["old"], vis["ref"], vis["run"]
        vis["kfull"] = full_kl(old, ref, dim=0)
        ref_c = self.clamp(old, ref, vis["count"], row_run=run)
        pen = kl_reward_penalty(old, ref_c, vis["kfull"].unsqueeze(0), rt, row_run=run).reshape(-1)
        penalty = pen.index_select(0, vis["entry"])  # the valid samples'
        shaped = (self.reward_scale * buf["reward"]).view(-1)
        if "sel" in vis:  # r − β·k at the valid samples (x + (−y) is x − y exactly)
            shaped.index_add_(0, vis["sel"], penalty, alpha=-1)
        else:
            shaped = shaped - penalty
        shaped = shaped.view(R, N, H) * valid
        if self.baseline == "value":
            with torch.no_grad():
                v = self.value_fn.value(self.params, buf["state"].reshape(R, N * H)).view(R, N, H)
            v = v * valid
            next_v = torch.cat([v[..., 1:], torch.zeros_like(v[..., :1])], dim=-1)
            adv = gae(shaped, v, next_v, buf["done"], valid, tr.gamma, tr.gae_lambda)
            ret = adv + v
        else:
            ret = gae(shaped, torch.zeros_like(shaped), torch.zeros_like(shaped), buf["done"], valid,
                      tr.gamma, 1.0)
            adv = ret
            if self.baseline == "mean":
                # Batch-mean baseline per run and step (one-step envs: the mean shaped reward).
                mean = (ret * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
                adv = (ret - mean) * valid
        if tr.norm_adv:
            adv = normalize_per_run(adv, valid)
        return {"adv": adv.detach(), "ret": ret.detach()}

    # -- one PPO update ----------------------------------------------------------------------------------
    def sampled_update(self, update: int) -> dict[str, Tensor]:
        buf, tabs = self.collect(update)
        R, N, H = buf["valid"].shape
        flat = {k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid")}
        vis = self._visits(flat, tabs)
        buf.update(self._shape_and_advantage(buf, tabs, vis))
        flat.update({k: buf[k].reshape(R, N * H) for k in ("adv", "ret")})
        whole = min(self.cfg.train.minibatches, N * H) == 1  # one full-batch minibatch: its visits are vis
        loss_fn = self._ppo_loss_and_grads if self.cfg.train.policy == "tabular" else self._ppo_loss
        stats = self._ppo_epochs(flat, update, loss_fn, lambda mb: self._group(mb, tabs, vis if whole else None))
        self._maybe_log_traj(update, buf, tabs)
        logs, adaptive = self._logs_at(update), bool(self.rt.adaptive.any())
        if not (logs or adaptive):
            return stats
        count = vis["count"].to(torch.float64)
        ks = all_estimates(vis["old"], vis["ref"]).to(torch.float64)  # [A, P, 3]
        kfull = vis["kfull"].to(torch.float64)
        per_run = self._per_run_sum(torch.cat([count.unsqueeze(-1) * ks, count.unsqueeze(-1),
                                               (count * kfull).unsqueeze(-1)], dim=-1), vis["rows"]) / N
        out = {"reward": (buf["reward"].to(torch.float64) * buf["valid"]).sum((1, 2)) / N,
               "kl_k1": per_run[:, 0], "kl_k2": per_run[:, 1], "kl_k3": per_run[:, 2],  # per-episode sums
               "kl_full_sampled": per_run[:, 4], "episode_length": per_run[:, 3], **stats}
        if adaptive:
            self._control_beta(out["kl_k1"], N)
        return out

    def _group(self, mb: dict[str, Tensor], tabs: dict[str, Tensor], vis: dict[str, Tensor] | None = None
               ) -> dict[str, Tensor]:
        """Sufficient statistics of a (mini)batch for the PPO loss of a tabular-state policy.

        The clipped surrogate of one sample is ``−adv·min(ρ, clip(ρ))`` if ``adv ≥ 0`` and
        ``−adv·max(ρ, clip(ρ))`` otherwise, with ``ρ = π_θ(a|s)/π_old(a|s)`` shared by every sample of the
        same (s, a); the KL and entropy terms depend on (s, a) alone and the value loss on s alone. So summing
        positive and negative advantages per (s, a) and returns per s once per (mini)batch gives every
        epoch's loss and gradient exactly.

        The statistics are kept for the visited rows alone, as the action-major tables of :meth:`_visits`
        (``vis``: the minibatch's visits, computed here if not given). Every sum runs over one entry's
        samples in sample order and every per-row computation is elementwise, so a run's numbers do not
        depend on the batch it is trained in.

        Args:
            mb: per-sample ``idx`` (= state·A + action), ``state``, ``valid``, ``adv``, ``ret``, each ``[R, n]``.
            tabs: the batch's ``logp`` (π_old) and ``ref_logp`` tables ``[R, S, A]``.
        Returns:
            ``rows [M]``, ``run [P]``, ``count``, ``ref`` (as in :meth:`_visits`), ``adv_pos``, ``adv_neg``,
            ``old`` (log π_old; 0 where unsampled) ``[A, P]``; ``n_s`` (samples per row) ``[P]``; ``n`` (valid
            samples, ≥ 1) ``[R]``; ``kl_weights`` ``[2, 4, P]``, each column's weights of (k1, k2, k3, full)
            in the loss, plain and importance-weighted (β where the column's run uses them, else 0); with a
            value baseline ``ret_mean`` ``[P]`` and ``ret_ss`` (within-state sum of squares) ``[R]``.
        """
        vis = vis if vis is not None else self._visits(mb, tabs)
        R, (A, P) = mb["idx"].shape[0], vis["count"].shape
        dt, dev = self.dtype, self.device
        adv = self._take_valid(mb["adv"].reshape(-1), vis)
        zeros = torch.zeros(A * P, dtype=dt, device=dev)
        count = vis["count"]
        g = {"rows": vis["rows"], "run": vis["run"], "count": count, "ref": vis["ref"],
             "adv_pos": zeros.index_add(0, vis["entry"], adv.clamp(min=0)).view(A, P),
             "adv_neg": zeros.index_add(0, vis["entry"], adv.clamp(max=0)).view(A, P),
             # entries without samples carry no loss; log π_old := 0 there keeps their ratio finite
             "old": torch.where(count > 0, vis["old"], torch.zeros_like(vis["old"])),
             "n": torch.count_nonzero(mb["valid"], 1).to(dt).clamp(min=1), "n_s": sum_actions(count),
             # the KL-in-loss weights of each column's run (β on its estimator), plain and IS forms
             "kl_weights": torch.cat([self.rt.coef("loss"), self.rt.coef("loss_is")], 1).to(dt).t().contiguous()
             .index_select(1, vis["run"]).view(2, 4, P)}
        if self.baseline == "value":
            ret_valid = self._take_valid(mb["ret"].reshape(-1), vis)
            ret_sum = torch.zeros(P, dtype=dt, device=dev).index_add_(0, vis["col"], ret_valid)
            g["ret_mean"] = ret_sum / g["n_s"].clamp(min=1)
            # Σ (return − its state's mean)² over each run's valid samples, summed in sample order
            spread = (ret_valid - g["ret_mean"].index_select(0, vis["col"])).square()
            g["ret_ss"] = torch.zeros(R, dtype=dt, device=dev).index_add_(
                0, vis["run"].index_select(0, vis["col"]), spread)
        return g

    def _ppo_loss(self, g: dict[str, Tensor], want_diag: bool = True, want_loss: bool = True
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-run PPO loss ``[R]`` (mean over the minibatch's samples) from the statistics of :meth:`_group`,
        differentiable with respect to the policy and value parameters (always computed: ``want_loss`` is
        part of :meth:`_ppo_epochs`' protocol)."""
        rows, P = g["rows"], g["count"].shape[1]
        lp = self.policy.rows(self.params, rows, P)  # [A, P], carries gradient
        v = self._value_rows(rows, P) if self.baseline == "value" else None
        per_row, parts, _ = self._rows_loss(g, slice(None), lp, v, want_diag)
        sums = torch.zeros(self.R, dtype=per_row.dtype, device=self.device).index_add(0, g["run"], per_row)
        return self._mean_loss(g, sums), self._loss_diagnostics(g, parts) if want_diag else {}

    def _value_rows(self, rows: Tensor, size: int) -> Tensor:
        """State values of rows ``rows [M]`` as ``[size]`` (zero past ``M``)."""
        return gather_rows(self.value_fn.table(self.params).reshape(-1), rows, size)

    def _mean_loss(self, g: dict[str, Tensor], sums: Tensor) -> Tensor:
        """Per-run loss ``[R]`` from :meth:`_rows_loss`'s sums: divided by the samples, plus the value loss's
        within-state spread."""
        loss = sums / g["n"]
        if self.baseline == "value":
            loss = loss + self.cfg.train.vf_coef * 0.5 * g["ret_ss"] / g["n"]
        return loss

    @torch.no_grad()
    def _ppo_loss_and_grads(self, g: dict[str, Tensor], want_diag: bool = True, want_loss: bool = True
                            ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """:meth:`_ppo_loss` and its gradients, for tabular policies and values, derived by hand.

        A visited row's logits (and value) get gradient only from that row's loss terms. :meth:`_rows_loss`
        gives each row's loss with its derivatives with respect to the row's log-probabilities and value, and
        the log-softmax is chained by hand (``∂/∂x_a = g_a − π_a·Σ_b g_b``): no autograd graph, about half
        the tensor passes of autograd's backward. The rows run in equal blocks of at most :data:`ROW_CHUNK`
        columns (smaller working sets; estimators no run of a block uses are skipped there), and the
        gradients are written into the optimizer's dense gradient buffers. Loss and diagnostics are bitwise those of the
        one-pass loss, whatever the blocking; the gradients equal autograd's to rounding
        (``tests/sim/test_grouped_loss.py``).

        Returns ``(loss [R], diagnostics, gradients)`` (gradients keyed like the trainable parameters); the
        loss is ``None`` when neither ``want_loss`` nor ``want_diag`` asks for it.
        """
        want_loss = want_loss or want_diag
        rows, (A, P) = g["rows"], g["count"].shape
        M = rows.numel()
        x_all = self.policy.row_logits(self.params, rows, P)
        v_all = self._value_rows(rows, P) if self.baseline == "value" else None
        gx = torch.empty_like(x_all)
        gv = torch.empty_like(v_all) if v_all is not None else None
        loss = torch.zeros(self.R, dtype=self.dtype, device=self.device)
        parts: list[dict[str, Tensor]] = []
        n_blocks = -(-P // ROW_CHUNK)
        size = -(-P // (n_blocks * ROW_PAD)) * ROW_PAD  # equal blocks, each a multiple of ROW_PAD
        for c0 in range(0, P, size):
            cols = slice(c0, min(P, c0 + size))
            run = g["run"][cols]
            v = v_all[cols] if v_all is not None else None
            per_row, block_parts, (g_lp, g_v, prob) = self._rows_loss(
                g, cols, log_softmax_action_major(x_all[:, cols]), v, want_diag, grad=True, want_loss=want_loss)
            parts.append(block_parts)
            n_run = g["n"].index_select(0, run)  # the per-run mean's divisor
            torch.div(torch.addcmul(g_lp, prob, sum_actions(g_lp), value=-1), n_run, out=gx[:, cols])
            if gv is not None:
                gv[cols] = g_v / n_run
            if per_row is not None:  # summed block after block: each run's terms in column order, as in one pass
                loss.index_add_(0, run, per_row)
        loss = self._mean_loss(g, loss) if want_loss else None
        # written straight into the optimizer's gradient buffers, zero outside the visited rows: zeroed only
        # when the rows differ from the last write's (every epoch of a full-batch update has the same rows)
        out = {"logits": self.opt.grad_buffer("logits")}
        if gv is not None:
            out["v"] = self.opt.grad_buffer("v")
        if self._grad_rows is not rows:
            for buf in out.values():
                buf.zero_()
            self._grad_rows = rows
        out["logits"].view(-1, A).index_copy_(0, rows, gx[:, :M].t())
        if gv is not None:
            out["v"].view(-1).index_copy_(0, rows, gv[:M])
        diag = self._loss_diagnostics(g, {k: torch.cat([p[k] for p in parts], dim=-1) for k in parts[0]}) \
            if want_diag else {}
        return loss, diag, out

    def _rows_loss(self, g: dict[str, Tensor], cols: slice, lp: Tensor, v: Tensor | None, keep: bool,
                   grad: bool = False, want_loss: bool = True
                   ) -> tuple[Tensor | None, dict[str, Tensor], tuple | None]:
        """The PPO loss of columns ``cols`` of the row tables, per row ``[c]`` (a sum over the row's samples;
        with a value ``v``, ``vf_coef·½·n_s·(v − mean return)²`` too: the within-state spread ``ret_ss`` is
        added per run by :meth:`_mean_loss`).

        ``lp [A, c]`` are the log-probabilities of those columns, ``v [c]`` their values. Also returns the
        per-entry parts the diagnostics need when ``keep``, and with ``grad`` the loss's derivatives derived
        by hand, ``(∂/∂lp [A, c]`` with each log-probability a free variable, ``∂/∂v [c]`` or ``None``,
        ``π = e^{lp} [A, c])``; else ``None`` (differentiate the loss by autograd through ``lp`` and ``v``).
        With ``grad``, ``want_loss=False`` skips the loss itself (returned as ``None``).
        """
        tr, rt = self.cfg.train, self.rt
        want_loss = want_loss or keep or not grad
        n, old, ref, run = g["count"][:, cols], g["old"][:, cols], g["ref"][:, cols], g["run"][cols]
        n_s = g["n_s"][cols]
        hi, lo = 1.0 + tr.clip, 1.0 - tr.clip
        adv_pos, adv_neg = g["adv_pos"][:, cols], g["adv_neg"][:, cols]
        ratio = torch.exp(lp - old)
        prob = lp.exp() if grad or tr.ent_coef > 0 else None
        ref_lp = self.clamp(lp, ref, n, row_run=run)
        k_full = lambda: full_kl(lp, ref, dim=0, prob_all=prob).unsqueeze(0)  # noqa: E731
        kl_w = g["kl_weights"][:, :, cols]  # [2, 4, c]: plain and importance-weighted forms
        used = (kl_w != 0).any(-1).tolist()
        weights = tuple([kl_w[f, j] if used[f][j] else None for j in range(4)] for f in range(2))
        if grad:
            kl, kl_slope, full_w = kl_loss_term_and_slope(lp, old, ref_lp, k_full, rt, weights=weights,
                                                          delta_slope=self.clamp.slope(lp, ref), value=want_loss)
        else:
            kl = kl_loss_term(lp, old, ref_lp, k_full, rt, weights=weights)
        per_row = pg = None
        if want_loss:
            # min(ρ, clip(ρ)) = min(ρ, 1 + ε) and max(ρ, clip(ρ)) = max(ρ, 1 − ε), with the same gradient
            pg = -(adv_pos * ratio.clamp(max=hi) + adv_neg * ratio.clamp(min=lo))
            kl = n * kl
            per_row = sum_actions(pg + kl)
            if tr.ent_coef > 0:
                entropy = -sum_actions(torch.where(prob > 0, prob * lp, torch.zeros_like(prob)))
                per_row = per_row - tr.ent_coef * n_s * entropy
        if v is not None:
            v_err = v - g["ret_mean"][cols]
            if want_loss:
                v_sq = n_s * v_err.square()
                per_row = per_row + tr.vf_coef * 0.5 * v_sq
        grads = None
        if grad:
            # ∂pg/∂lp = −adv·ρ where the clip passes ρ (bounds included, as autograd's clamp), else 0
            g_lp = -(adv_pos * (ratio <= hi) + adv_neg * (ratio >= lo)) * ratio
            if kl_slope is not None:
                g_lp = g_lp + n * kl_slope
            if full_w is not None:  # the row's exact KL counts once per sample of the row
                g_lp = g_lp + (n_s * full_w) * full_kl_slope(lp, ref, prob)
            if tr.ent_coef > 0:  # ∂(−c·n_s·H)/∂lp = c·n_s·π·(lp + 1) where π > 0
                g_lp = g_lp + (tr.ent_coef * n_s) * torch.where(prob > 0, prob * (lp + 1.0), 0.0)
            grads = (g_lp, tr.vf_coef * n_s * v_err if v is not None else None, prob)
        if not keep:
            return per_row, {}, grads
        with torch.no_grad():
            parts = {"terms": torch.stack([pg, kl, n * ((ratio - 1.0).abs() > tr.clip), n * (old - lp)], dim=-1)
                     .transpose(-1, -2)}  # [A, 4, c]
            if v is not None:
                parts["v_sq"] = v_sq
        return per_row, parts, grads

    def _loss_diagnostics(self, g: dict[str, Tensor], parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-run means of the PPO diagnostics from :meth:`_rows_loss`'s parts (all columns)."""
        n = g["n"].unsqueeze(-1)
        sums = self._per_run_sum(parts["terms"].transpose(-1, -2), g["rows"]) / n
        diag = {"pg_loss": sums[:, 0], "kl_loss": sums[:, 1], "clip_frac": sums[:, 2], "approx_kl": sums[:, 3]}
        if "v_sq" in parts:
            v_sq = self._per_run_sum(parts["v_sq"].view(1, -1, 1), g["rows"])[:, 0]
            diag["v_loss"] = 0.5 * (v_sq + g["ret_ss"]) / g["n"]
        return diag

    def _per_run_sum(self, x: Tensor, rows: Tensor) -> Tensor:
        """Per-run sums ``[R, C]`` of action-major row values ``x [A, P, C]`` of rows ``rows [M]`` (columns
        past ``M`` are padding): each row's actions summed left to right, then a run's rows added one after
        the other in column order, so a run's sum does not depend on the other runs' rows."""
        per_row = sum_actions(x[:, : rows.numel()])  # [M, C]
        out = torch.zeros(self.R, x.shape[-1], dtype=x.dtype, device=x.device)
        return out.index_add_(0, rows // self.S, per_row)

    # -- exact mode ---------------------------------------------------------------------------------------
    def exact_update(self, update: int) -> dict[str, Tensor]:
        exp_diag = self._expected_sample_stats() if self._logs_at(update) else {}
        loss, diag = exact_loss(self._scaled_mdp, self.policy.table(self.params),
                                self._ref_table(), self.rt, self.cfg.train.ent_coef)
        diag.update(exp_diag)
        diag["grad_norm"] = self._apply_grads(loss, update)
        if bool(self.rt.adaptive.any()):
            with torch.no_grad():
                pi = self.policy.table(self.params).to(torch.float64)
                self._control_beta(tabular.sequence_kl(self.mdp.with_reference(self._ref64()), pi), 1)
        return diag

    def _expected_sample_stats(self) -> dict[str, Tensor]:
        with torch.no_grad():
            # What a sampled run would report as sample means, as exact expectations.
            pi, ref = self._tables()
            pi, ref = pi.to(torch.float64), ref.to(torch.float64)
            occ = tabular.state_occupancy(self.mdp, pi)
            ks = (pi.exp().unsqueeze(-1) * all_estimates(pi, ref)).sum(-2)  # [R, S, 3]
            exp_diag = {"reward": tabular.expected_return(self.mdp, pi),
                        **{f"kl_k{i + 1}": (occ * ks[..., i]).sum(-1) for i in range(3)},
                        "episode_length": occ.sum(-1)}
        return exp_diag

    def _ref64(self) -> Tensor:
        """The reference table in float64 ``[R, S, A]`` (recomputed only when the reference changes)."""
        return self._ref_derived("ref64", lambda: self._ref_table().to(torch.float64))

    def _ref_derived(self, name: str, make: Callable[[], Tensor]) -> Tensor:
        """``make()``, cached until the reference changes."""
        if self._ref_derived_version != self.ref_version:
            self._ref_derived_cache, self._ref_derived_version = {}, self.ref_version
        if name not in self._ref_derived_cache:
            self._ref_derived_cache[name] = make()
        return self._ref_derived_cache[name]

    # -- metrics ---------------------------------------------------------------------------------------------
    def _optimum_key(self) -> tuple:
        return (self.phase, self.ref_version, tuple(self.rt.beta.tolist()))

    def _optimum(self, ref64: Tensor) -> Tensor:
        """log π* ``[R, S, A]``: each run's KL-regularized optimum (cached until phase, reference or β change)."""
        key = self._optimum_key()
        if key not in self._opt_cache:
            self._opt_cache.clear()
            mdp = self._scaled_mdp.with_reference(ref64)
            beta = self.rt.beta.clamp(min=1e-12)
            _, _, logp_opt = tabular.soft_value_iteration(mdp, beta)
            self._opt_cache[key] = logp_opt
        return self._opt_cache[key]

    def _optimum_prob(self, ref64: Tensor) -> Tensor:
        """π* ``[R, S, A]`` (``exp`` of :meth:`_optimum`, cached the same way)."""
        key = ("prob", self._optimum_key())
        if key not in self._opt_cache:
            self._opt_cache[key] = self._optimum(ref64).exp()
        return self._opt_cache[key]

    def exact_metrics(self) -> dict[str, Tensor]:
        """Exact (float64) KL to the reference, entropy, support, return and distance to the optimum."""
        pi = self.policy.table(self.params).detach().to(torch.float64)
        prob = pi.exp()
        ref = self._ref64()
        mdp = self.mdp.with_reference(ref)
        occ = tabular.state_occupancy(mdp, pi, prob)
        length = occ.sum(-1).clamp(min=1e-12)
        visited = occ > 1e-9
        kl_s = tabular.kl_per_state(pi, ref, prob)
        ent_s = tabular.entropy_per_state(pi, prob)
        minp = torch.where(visited, prob.min(-1).values, torch.ones_like(occ)).min(-1).values
        support = torch.where(visited.unsqueeze(-1), (prob > 1e-3).to(torch.float64), 0.0).sum(-1)
        # KL(π_ref(τ)‖π(τ)) = Σ_s occupancy_ref(s)·KL(π_ref‖π)_s; the reference's occupancy and probabilities
        # are computed once per reference
        ref_prob = self._ref_derived("prob", ref.exp)
        occ_ref = self._ref_derived("occupancy", lambda: tabular.state_occupancy(mdp, ref, ref_prob))
        out = {
            "kl_true": (occ * kl_s).sum(-1),
            "kl_forward": (occ_ref * tabular.forward_kl_per_state(pi, ref, ref_prob)).sum(-1),
            "entropy": (occ * ent_s).sum(-1) / length,
            "min_prob": minp,
            "support": (support * occ).sum(-1) / length,
            "return_true": tabular.expected_return(self.mdp, pi, prob),
        }
        if bool((self.rt.beta > 0).all()):
            tv = tabular.total_variation(pi, self._optimum(ref), prob, self._optimum_prob(ref))
            out["tv_opt"] = (occ * tv).sum(-1) / length
        else:
            out["tv_opt"] = torch.full_like(length, float("nan"))
        return out

    def policy_tables(self) -> dict[str, np.ndarray]:
        pi = self.policy.table(self.params).detach().to(torch.float64)
        ref = self._ref64()
        tabs = {"prob": pi.exp(), "ref_prob": self._ref_derived("prob", ref.exp)}
        if bool((self.rt.beta > 0).all()):
            tabs["opt_prob"] = self._optimum_prob(ref)
        else:
            tabs["opt_prob"] = torch.full_like(pi, float("nan"))
        return snapshot(tabs)

    def policy_frame(self, run: int) -> pd.DataFrame:
        S, A = self.S, self.A
        d = int(self.diverged_at[run])
        logs = [(u, tabs) for u, tabs in self.policy_log if d < 0 or u <= d]
        n = len(logs)
        frame = {"update": np.repeat(np.array([u for u, _ in logs], dtype=np.int64), S * A),
                 "state": np.tile(np.repeat(np.arange(S, dtype=np.int64), A), n),
                 "action": np.tile(np.arange(A, dtype=np.int64), S * n)}
        for k in logs[0][1]:
            frame[k] = np.concatenate([tabs[k][run].reshape(-1) for _, tabs in logs])
        return pd.DataFrame(frame, copy=False)  # fresh arrays

    def _maybe_log_traj(self, update: int, buf: dict[str, Tensor], tabs: dict[str, Tensor]) -> None:
        n = self.cfg.log.trajectories
        if n <= 0 or not self._logs_at(update):
            return
        R, S, A = self.R, self.S, self.A
        idx = buf["idx"][:, :n]
        steps = {k: buf[k][:, :n] for k in ("state", "action", "reward", "valid")}
        for k in ("logp", "ref_logp"):
            steps[k] = tabs[k].reshape(R, S * A).gather(1, idx.reshape(R, -1)).view(idx.shape)
        rec: dict = snapshot(steps)
        rec["update"] = update
        self.traj_log.append(rec)


def snapshot(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """CPU numpy *copies* of ``tensors`` for the logs: a view could alias a live parameter (updated in place
    by the optimizer) or keep a whole batch buffer alive behind a small slice."""
    return {k: v.detach().to("cpu", copy=True).numpy() for k, v in tensors.items()}


def _diagnostics(pg: Tensor, kl_term: Tensor, clipped: Tensor, log_ratio_old: Tensor, valid: Tensor
                 ) -> dict[str, Tensor]:
    """Per-run means of PPO diagnostics over valid samples (one fused reduction)."""
    stacked = torch.stack([pg, kl_term, clipped.to(pg.dtype), log_ratio_old], dim=-1).detach()
    m = _masked_mean_last(stacked, valid)
    return {"pg_loss": m[:, 0], "kl_loss": m[:, 1], "clip_frac": m[:, 2], "approx_kl": m[:, 3]}


def _masked_mean_last(x: Tensor, valid: Tensor) -> Tensor:
    """Per-run mean ``[R, C]`` of ``x [R, n, C]`` over samples where ``valid [R, n]``."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def _finite_per_run(x: Tensor) -> Tensor:
    """``[R]``: whether every element of run ``r``'s row of ``x [R, n]`` is finite.

    A row's sum is finite unless an element is not (or the sum overflows, which the elementwise check then
    tells apart): one pass over ``x`` in the common case instead of four.
    """
    ok = torch.isfinite(x.sum(-1))
    return ok if bool(ok.all()) else torch.isfinite(x).all(-1)


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx [R, m]`` of ``x [R, n, ...]`` along the sample axis → ``[R, m, ...]``."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx.view(idx.shape + (1,) * (x.dim() - 2)).expand(idx.shape + x.shape[2:]))


def exact_loss(mdp: tabular.TabularMDP, logp: Tensor, ref_logp: Tensor, rt: RunTensors, ent_coef: float = 0.0
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-run loss ``[R]`` whose gradient is the *expected* gradient of the sampled PPO loss (first epoch).

    With ``d`` the policy's state occupancy and ``L = Σ_s d(s)`` the expected episode length (sampled
    losses are means over timesteps):

    - KL in the reward: Q of the shaped reward ``r − β·k(s, a)`` (k from the current policy, detached) by
      exact policy evaluation; the surrogate ``Σ_s d(s) Σ_a π(a|s)·sg(Q(s, a) − V(s)) / L``.
    - KL in the loss: ``β·Σ_s d(s) Σ_a sg(π(a|s))·k(s, a) / L`` with gradient through ``log π`` in ``k``
      (samples fixed); ``full``: ``β·Σ_s d(s)·KL_s(π‖π_ref) / L`` with gradient through everything.

    Args:
        logp: ``[R, S, A]`` policy log-probabilities (carrying gradient). ref_logp: ``[R, S, A]``.
    Returns:
        ``(loss [R], diagnostics)``.
    """
    lp_d = logp.detach()
    with torch.no_grad():
        occ = tabular.state_occupancy(mdp, lp_d)
        w = occ / occ.sum(-1, keepdim=True).clamp(min=1e-12)  # [R, S]
        penalty = kl_reward_penalty(lp_d, ref_logp, full_kl(lp_d, ref_logp)[..., None], rt)
        v, q = tabular.policy_evaluation(mdp, lp_d, extra_reward=-penalty)
        adv = q - v.unsqueeze(-1)
    surrogate = (w * (logp.exp() * adv).sum(-1)).sum(-1)
    # E_{a ~ sg(π)} of the per-sample loss (on-policy: π_old = π): its gradient flows only through k.
    k_live = kl_loss_term(logp, lp_d, ref_logp, full_kl(logp, ref_logp)[..., None], rt)
    kl_term = (w * (lp_d.exp() * k_live).sum(-1)).sum(-1)
    entropy = (w * tabular.entropy_per_state(logp)).sum(-1)
    loss = -surrogate + kl_term - ent_coef * entropy
    diag = {"pg_loss": -surrogate.detach(), "kl_loss": kl_term.detach(), "entropy_loss": entropy.detach()}
    return loss, diag


# ------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------


def make_trainer(configs: list[Config], device: torch.device | None = None) -> BatchTrainer:
    """The trainer for a batch of configs that share a batch signature."""
    device = device or resolve_device(configs[0].device)
    if configs[0].train.backend == "sb3":
        from sim.sb3_backend import SB3Trainer

        return SB3Trainer(configs, device)
    if configs[0].train.algo == "dpo":
        from sim.dpo import DPOTrainer

        return DPOTrainer(configs, device)
    if configs[0].env["id"] == "gaussian_bandit":
        from sim.gaussian import GaussianTrainer

        return GaussianTrainer(configs, device)
    if configs[0].env["id"] == "diffusion_chain":
        from sim.diffusion import DiffusionTrainer

        return DiffusionTrainer(configs, device)
    return DiscreteTrainer(configs, device)


def train_batch(configs: list[Config], progress: ProgressFn | None = None,
                device: torch.device | None = None) -> Sequence[RunOutput]:
    """Train ``configs`` together (one tensor program) and return their outputs in order."""
    return make_trainer(configs, device).run(progress)
