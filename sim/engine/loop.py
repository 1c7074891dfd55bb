"""The base training loop shared by every trainer: phases, reference schedule, β controller, PPO epochs,
divergence and logging for a batch of runs.

A batch is many independent runs (seeds, β, placements, estimators) as one tensor program: every per-run
setting is a tensor ``[R]`` (:class:`~sim.engine.placement.RunTensors`), every random number comes from the
run's own counter-based stream (:mod:`sim.engine.rng`) and every loss is a sum of per-run losses, so a run
gives the same numbers alone or in any batch. A run whose loss, gradient or parameters stop being finite is
frozen and marked diverged at that update; the others go on.

Trainers (:mod:`sim.algos`) subclass :class:`BatchTrainer` and provide the sampled and exact updates, the
exact metrics and the policy tables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sim.config import Config, batch_signature
from sim.engine import rng
from sim.engine.memory import keep_freed_memory, release_free_memory
from sim.engine.optim import BatchedOptimizer, clip_grad_norm_per_run, grad_norm_per_run
from sim.engine.outputs import (
    MetricFrames,
    RunOutput,
    RunOutputs,
    metric_columns,
    stack_trajectories,
    trajectory_frame,
)
from sim.engine.placement import Clamp, RunTensors

ProgressFn = Callable[[int, int], None]

FINITE = "_finite"
"""Key of a loss function's gradients (:meth:`BatchTrainer._ppo_epochs`) under which it may give, per run,
whether all its gradients are finite (``[R]`` bool, or ``True`` when all runs' are), checked instead of the
gradients themselves."""


class BatchTrainer:
    """Phases, reference schedule, β controller, divergence detection and logging for a batch of runs.

    Subclasses provide sampling (``collect``), the PPO and exact updates and the env-specific metrics.
    """

    optional_metrics: tuple[str, ...] = ()
    """Metric columns only some runs of a batch have: NaN for the others, and left out of their tables."""
    batches_runs: bool = True
    """Whether the runs of a batch are trained as one tensor program (``False``: one after the other, so a
    sweep gives each run its own task and its workers run them in parallel)."""
    sampled_updates: bool = True
    """Whether the trainer runs sampled updates (``False``, e.g. best-of-n: a sweep's task of its runs costs
    their folders' writes, :func:`sim.lab.sweep.pack_tasks`)."""

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
        self.update_keys = rng.UpdateKeys(self.rt.keys)  # each update's random streams of every run
        self.clamp = Clamp.from_configs(configs, device)
        self.opt: BatchedOptimizer | None = None
        self.diverged_at = torch.full((self.R,), -1, dtype=torch.long, device=device)
        self._alive_of: tuple[Tensor, int] | None = None  # the diverged_at (and its version) :attr:`alive` is of
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
        """Whether each run is still training ``[R]`` (bool; kept until a run diverges)."""
        d = self.diverged_at
        if self._alive_of is None or self._alive_of[0] is not d or self._alive_of[1] != d._version:
            self._alive = d < 0  # made again when diverged_at is replaced or written in place
            self._alive_of = (d, d._version)
            self._all_alive = bool(self._alive.all())
        return self._alive

    @property
    def all_alive(self) -> bool:
        """Whether no run has diverged (a Python bool, kept with :attr:`alive`)."""
        self.alive  # noqa: B018 (refreshes the cached flag if the runs changed)
        return self._all_alive

    def _make_optimizer(self) -> None:
        self.opt = BatchedOptimizer({k: self.params[k] for k in self.trainable}, self.rt.lr.clone(),
                                    self.cfg.train.optimizer)

    def _apply_grads(self, loss_per_run: Tensor | None, update: int, want_norm: bool = True,
                     grads: dict[str, Tensor] | None = None, grads_finite: Tensor | bool | None = None
                     ) -> Tensor | None:
        """Backpropagate ``Σ_r loss_r`` (unless the gradients ``grads`` are given), freeze runs whose loss or
        gradient is non-finite, step. With ``grads`` given the loss may be ``None`` (not computed on this
        step): only the gradients are checked; ``grads_finite [R]`` (optional) says per run whether its
        gradients are all finite (``True``: every run's are), when the caller knows it more cheaply than a pass
        over them.

        Returns the per-run gradient norms ``[R]`` (before clipping) when clipping or ``want_norm`` needs them.
        """
        if grads is None:
            leaves = [self.params[k] for k in self.trainable]
            total = torch.where(self.alive, loss_per_run, torch.zeros_like(loss_per_run)).sum()
            grads_list = torch.autograd.grad(total, leaves, allow_unused=True)
            grads = {k: (g if g is not None else torch.zeros_like(self.params[k]))
                     for k, g in zip(self.trainable, grads_list, strict=True)}
        if loss_per_run is not None or grads_finite is not True:  # (True: every run's gradients are finite)
            finite = (torch.isfinite(loss_per_run) if loss_per_run is not None
                      else torch.ones(self.R, dtype=torch.bool, device=self.device))
            if grads_finite is None:
                for g in grads.values():
                    finite &= finite_per_run(g.reshape(self.R, -1))
            elif grads_finite is not True:
                finite &= grads_finite
            self._mark_diverged(~finite, update, "non-finite loss or gradient")
        if not self.all_alive:
            for k in grads:
                grads[k] = torch.where(_bcast_runs(self.alive, grads[k]).bool(), grads[k], torch.zeros_like(grads[k]))
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
        per-run loss, diagnostics (when asked) and optionally the gradients it computed itself (with, under
        :data:`FINITE`, whether each run's are finite, or ``True`` if all are), in which case
        the loss may be ``None`` unless ``want_loss``. The loss is asked for on the last epoch: a loss that
        is not finite there marks the run diverged at this update, as a non-finite gradient does at any step.
        Diagnostics are averaged over the last epoch's gradient steps of an update whose metrics are logged
        (other updates compute none).
        """
        tr = self.cfg.train
        n = next(iter(flat.values())).shape[-1]
        stats: dict[str, Tensor] = {}
        n_steps = 0
        logs = self._logs_at(update)
        n_mb = min(tr.minibatches, n)
        prepare = prepare or (lambda mb: mb)
        if n_mb > 1:
            mb_key = rng.fold(self.rt.keys, update ^ 0x5A5A5A)
            perms = torch.argsort(rng.uniform(mb_key, (tr.epochs, n)), dim=-1)  # [R, epochs, n]
        else:
            whole = prepare(flat)
        for epoch in range(tr.epochs):
            chunks = torch.tensor_split(perms[:, epoch], n_mb, dim=1) if n_mb > 1 else [None]
            last = epoch == tr.epochs - 1
            diagnose = logs and last
            for chunk in chunks:
                mb = whole if chunk is None else prepare({k: take_samples(v, chunk) for k, v in flat.items()})
                loss, diag, *grads = loss_fn(mb, diagnose, last)
                g = dict(grads[0]) if grads else None
                norm = self._apply_grads(loss, update, want_norm=diagnose, grads=g,
                                         grads_finite=g.pop(FINITE, None) if g is not None else None)
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
            if self.opt is not None:
                self.opt.lr.masked_fill_(new, 0.0)
            for i in torch.nonzero(new).flatten().tolist():
                self.diverge_reason[i] = reason

    def _check_params(self, update: int) -> None:
        """Mark the runs whose parameters are no longer all finite diverged at ``update``."""
        params = [self.params[k].detach() for k in self.trainable]
        if all(math.isfinite(p.sum().item()) for p in params):  # (a sum is finite unless some element is not)
            return
        finite = torch.ones(self.R, dtype=torch.bool, device=self.device)
        for p in params:
            finite &= finite_per_run(p.reshape(self.R, -1))
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
        # copied (a value may be a view of a live parameter, e.g. the Gaussian mean in float64): the floating
        # values stacked into one float64 tensor (one copy), the others copied as int64
        floats = [k for k, v in values.items() if v.is_floating_point() and v.shape == (self.R,)]
        rec = dict(zip(floats, torch.stack([values[k].detach().to(torch.float64) for k in floats]).cpu(),
                       strict=True)) if floats else {}
        self.metric_log.append({k: rec[k] if k in rec else v.detach().to("cpu", torch.float64
                                if v.is_floating_point() else torch.long, copy=True) for k, v in values.items()})

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
        cols = metric_columns(self.metric_log)
        self.metric_log = []  # the stacked columns replace the per-update records
        traj = stack_trajectories(self.traj_log)
        return RunOutputs(self.R, lambda i: self._run_output(i, cols, traj))

    def _extra_tables(self, run: int) -> dict[str, pd.DataFrame]:
        """Further output tables of run ``run`` (``RunOutput.extra``); none by default."""
        return {}

    def _run_output(self, i: int, cols: dict[str, np.ndarray], traj_stacked: tuple) -> RunOutput:
        """The :class:`RunOutput` of run ``i`` from the stacked logs."""
        c = self.configs[i]
        keep = cols["_alive"][i].astype(bool) | (cols["update"][i] == self.diverged_at[i].item())
        # arrays of the run's own; an optional column that is NaN throughout is one this run does not have (it
        # would not exist alone)
        frames = getattr(self, "_metric_frames", None)
        if frames is None or frames.cols is not cols:
            frames = self._metric_frames = MetricFrames(cols, self.optional_metrics)
        metrics = frames.frame(i, keep)
        d = int(self.diverged_at[i])
        if d >= 0:
            status = {"status": "diverged", "update": d, "error": self.diverge_reason[i]}
        else:
            status = {"status": "done", "update": c.train.total_updates}
        status["wall_time_s"] = round(self.wall_time, 3)
        status["n_runs_in_batch"] = self.R
        status["kl_clamps"] = int(self.clamp.count[i])
        status["backend"] = c.train.backend
        return RunOutput(c, metrics, self.policy_frame(i), trajectory_frame(i, *traj_stacked, d), status,
                         self._extra_tables(i))


def _bcast_runs(x: Tensor, like: Tensor) -> Tensor:
    """``x [R]`` viewed to broadcast against ``like [R, ...]`` in ``like``'s dtype."""
    return x.view((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


def finite_per_run(x: Tensor) -> Tensor:
    """``[R]``: whether every element of run ``r``'s row of ``x [R, n]`` is finite.

    A row's sum is finite unless an element is not (or the sum overflows, which the elementwise check then
    tells apart): one pass over ``x`` in the common case instead of four.
    """
    ok = torch.isfinite(x.sum(-1))
    return ok if bool(ok.all()) else torch.isfinite(x).all(-1)


def take_samples(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx [R, m]`` of ``x [R, n, ...]`` along the sample axis → ``[R, m, ...]``."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx.view(idx.shape + (1,) * (x.dim() - 2)).expand(idx.shape + x.shape[2:]))
