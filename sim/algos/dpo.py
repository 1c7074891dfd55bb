"""Direct preference optimization on the discrete envs, batched over runs like the PPO engine (seed §6).

With ``train.algo: dpo`` every run gets its own dataset (:mod:`sim.engine.preferences`; with
``reward.model: learned``, the pairs its proxy reward was fitted to) of ``dpo.pairs`` preference pairs: two episodes
from the same start state, both sampled from ``dpo.sampler`` (the reference by default), labelled by a
Bradley–Terry model on the env's noise-free reward, ``P(y₁ ≻ y₂) = σ((r(y₁) − r(y₂))/τ)`` with
``τ = dpo.bt_temperature`` (``r(y)`` = the episode's summed expected reward). The policy then minimizes,
over the stored pairs ``(y_w, y_l)``,

- DPO (seed eq. 52): ``−log σ(β·Δ)``, or
- IPO (Azar et al. 2023): ``(Δ − 1/(2β))²``,

with the log-ratio margin ``Δ = h(y_w) − h(y_l)``, ``h(y) = Σ_t log π_θ(a_t|s_t) − log π_ref(a_t|s_t)`` (the
sequence log-ratio; the dynamics cancel because they are deterministic, which the config enforces).

Optima (what ``tv_opt`` and ``opt_prob`` measure against, per run):

- DPO with every pair covered: the labels' implied reward is ``r/τ``, so the optimum is the KL-regularized
  one ``π* ∝ π_ref·e^{r/(τβ)}`` — on sequences the soft-value-iteration policy of :mod:`envs.tabular` with
  ``β_eff = τ·β``. With ``τ = 1`` it is exactly the PPO runs' π*.
- IPO: ``π ∝ π_ref·e^{g/β}`` with ``g(y) = E_{y'~μ} σ((r(y) − r(y'))/τ)`` (μ = the sampler); computed for
  one-state envs only (for sequences ``g`` is not a sum over steps), NaN elsewhere.

Everything else is :class:`sim.algos.discrete.DiscreteTrainer`'s: the policy and reference tables, the optimizer
(``train.optimizer``, ``train.lr``), divergence detection, ``exact_metrics`` (kl_true, entropy, tv_opt …),
the policy snapshots and the output tables; the dataset is returned as ``extra["preferences"]`` and written
as ``preferences.parquet``. Metrics add ``pref_loss`` (the loss on all pairs after the update), ``pref_acc``
(fraction of pairs whose margin ranks the preferred episode first; identical episodes count ½) and
``pref_margin`` (mean β·Δ); ``reward`` is NaN (no episodes are sampled while training) and
``trajectories.parquet`` is empty. Every random number comes from the run's counter-based stream
(:mod:`sim.engine.rng`), so a run gives the same result alone or in a batch. With a tabular policy the loss's
gradient is written out by hand (:mod:`sim.algos.dpo_grad`, bitwise autograd's); an MLP policy uses autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from envs import tabular
from sim.algos import dpo_grad
from sim.algos.discrete import DiscreteTrainer
from sim.config import PPO_VARIANT_KEYS, Config, ConfigError, DPOConfig, check_positive, set_keys
from sim.engine import rng
from sim.engine.elementwise import softplus
from sim.engine.loop import take_samples
from sim.engine.outputs import snapshot
from sim.engine.policies import TabularPolicy
from sim.engine.preferences import check_sampler, sample_preferences, sampler_logp
from sim.engine.reward_model import config_mdp

#: Columns of ``preferences.parquet`` (one row per pair × side × step of the episode).
PREFERENCE_COLUMNS = ("pair", "chosen", "t", "state", "action", "reward", "return", "bt_prob")
_SHUFFLE_STREAM = 0xD5F1  # purpose tag of the minibatch shuffles (the pairs' is sim.engine.preferences')


def _check_dpo(cfg: Config) -> None:
    d = cfg.dpo
    for key in ("beta", "pairs", "bt_temperature", "batch_size", "epochs"):
        check_positive(f"dpo.{key}", getattr(d, key))
    if (d.beta if d.beta is not None else cfg.kl.beta) <= 0:
        raise ConfigError(f"train.algo=dpo needs a positive β (dpo.beta or kl.beta); got {cfg.kl.beta!r}")
    mdp = config_mdp(cfg.env)  # built once per distinct env (a grid checks hundreds of runs of one)
    check_sampler("dpo.sampler", d.sampler, mdp, cfg.env["id"])
    if mdp.n_outcomes > 1:
        raise ConfigError(f"train.algo=dpo needs deterministic dynamics (its optimum is the soft-VI policy only "
                          f"then); env.id={cfg.env['id']!r} has random transitions with these env keys")
    if cfg.train.mode != "sampled":
        raise ConfigError("train.mode must be sampled with train.algo=dpo (the dataset is the sample)")
    if cfg.train.phases is not None:
        raise ConfigError("train.phases is not supported with train.algo=dpo (the preference data are fixed)")
    if cfg.kl.controller != "fixed":
        raise ConfigError("kl.controller must be fixed with train.algo=dpo")
    bad = set_keys(cfg, (*PPO_VARIANT_KEYS, "kl.value_clamp"))
    if bad:
        raise ConfigError(f"{bad[0]} has no effect with train.algo=dpo (a PPO setting)")

    if cfg.reward.model == "learned":  # DPO then trains on the pairs the proxy is fitted to (reward.*)
        default = DPOConfig()
        for key in ("pairs", "sampler", "bt_temperature", "data_seed"):
            if getattr(d, key) != getattr(default, key):
                raise ConfigError(f"dpo.{key} must keep its default with reward.model=learned: DPO then trains on "
                                  f"the proxy's pairs; set reward.{key} instead")
        if d.loss == "ipo":
            raise ConfigError("dpo.loss=ipo is not supported with reward.model=learned (its optimum is computed "
                              "from the gold reward); use dpo.loss=dpo")


def preference_loss(margin: Tensor, beta: Tensor, is_ipo: Tensor) -> Tensor:
    """Per-pair loss ``[R, n]`` from log-ratio margins ``Δ [R, n]``: DPO ``−log σ(β·Δ)`` (= softplus(−β·Δ)),
    or IPO ``(Δ − 1/(2β))²`` where ``is_ipo [R]``; ``beta [R]``."""
    b = beta.view(-1, 1).to(margin.dtype)
    if not bool(is_ipo.any()):
        return softplus(-b * margin)
    # each loss sees only its own runs' margins (the others get a harmless 0), so a run's overflow cannot
    # reach a batch-mate through the other loss's gradient (0·inf)
    ipo_run = is_ipo.view(-1, 1)
    zero = torch.zeros((), dtype=margin.dtype, device=margin.device)
    dpo = softplus(-b * torch.where(ipo_run, zero, margin))
    ipo = (torch.where(ipo_run, margin, zero) - 0.5 / b).square()
    return torch.where(ipo_run, ipo, dpo)


def ipo_optimum(mdp: tabular.TabularMDP, ref_logp: Tensor, sampler: Tensor, beta: Tensor, temperature: float
                ) -> Tensor:
    """IPO's population optimum on a one-state env, ``[R, 1, A]``: ``π ∝ π_ref·e^{g/β}`` with
    ``g(a) = Σ_b μ(b)·σ((r_a − r_b)/τ)`` (``ref_logp [R, 1, A]``, ``sampler [1, A]``, ``beta [R]``)."""
    r = mdp.expected_reward[0].to(torch.float64)  # [A]
    g = (sampler[0].exp()[None, :] * torch.sigmoid((r[:, None] - r[None, :]) / temperature)).sum(-1)  # [A]
    logp = ref_logp + g.view(1, 1, -1) / beta.view(-1, 1, 1)
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


class DPOTrainer(DiscreteTrainer):
    """DPO / IPO on a preference dataset per run; the rest (metrics, logs, outputs) is the discrete base's.
    It trains the policy only (no value function).

    One *update* is ``dpo.epochs`` passes over the run's ``dpo.pairs`` pairs in minibatches of
    ``dpo.batch_size`` (each run shuffles with its own stream); ``train.updates`` updates in all.
    """

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Ranges of the ``dpo`` keys and the combinations DPO does not support (one line each)."""
        super().check_config(cfg)
        _check_dpo(cfg)

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
        self._make_optimizer()
        betas = [c.dpo.beta if c.dpo.beta is not None else c.kl.beta for c in configs]
        self.rt.beta = torch.tensor(betas, dtype=torch.float64, device=device)
        self.is_ipo = torch.tensor([c.dpo.loss == "ipo" for c in configs], dtype=torch.bool, device=device)
        if self.proxy is not None:  # a learned reward: train on the pairs the proxy was fitted to
            self.tau, self.data = self.proxy.tau, self.proxy.data
            self.sampler = sampler_logp(self.cfg.reward.sampler, self.mdp)
        else:
            self.tau = float(self.cfg.dpo.bt_temperature)
            self.sampler = sampler_logp(self.cfg.dpo.sampler, self.mdp)
            data_seeds = [c.dpo.data_seed if c.dpo.data_seed is not None else c.seed for c in configs]
            self.data = sample_preferences(self.core, self.sampler, rng.run_keys(data_seeds, device),
                                           self.cfg.dpo.pairs, self.tau)
        # The labels' implied reward is r/τ: the engine's soft-VI optimum of this MDP is then π_ref·e^{r/(τβ)},
        # the optimum DPO targets (exact_metrics' tv_opt and opt_prob use it; with a learned reward the
        # proxy's, r̂/τ being the fitted logits). DPO has no reward phases.
        self._scaled_mdp = replace(self.train_mdp, reward=self.train_mdp.reward / self.tau)
        self.n_pairs = int(self.data["valid"].shape[1])
        self.env_steps += self.data["valid"].reshape(self.R, -1).sum(-1)
        self._sa = self.data["state"] * self.A + self.data["action"]  # flat (state, action) index [R, N, 2, H]
        # one step per episode, all valid (a bandit's pairs): an episode's sum is its step alone
        self._one_step = self._sa.shape[-1] == 1 and bool(self.data["valid"].all())
        # ... and then a margin is a cell of a small table (elementwise work done per cell, not per pair)
        n_sa = self.S * self.A
        self._cells = dpo_grad.PairCells(self._sa, n_sa) if self._one_step and n_sa * n_sa <= self.n_pairs else None
        # a logit table: the gradient by hand (dpo_grad), bitwise autograd's
        self._explicit = type(self.policy) is TabularPolicy

    # -- the loss ---------------------------------------------------------------------------------------
    def log_ratio_margin(self, idx: Tensor | None = None) -> Tensor:
        """``Δ = h(y_w) − h(y_l)`` ``[R, n]`` of the pairs ``idx [R, n]`` (all pairs if ``None``), with gradient."""
        return self._margin_of(self.policy.table(self.params) - self._ref_table(), idx)

    def _margin_of(self, lr_table: Tensor, idx: Tensor | None) -> Tensor:
        """The margins ``[R, n]`` of pairs ``idx`` from the log-ratio table ``lr_table [R, S, A]``."""
        sa, valid = self._sa, self.data["valid"]
        if idx is not None:
            sa, valid = take_samples(sa, idx), take_samples(valid, idx)
        R, S, A = lr_table.shape
        steps = lr_table.reshape(R, S * A).gather(1, sa.reshape(R, -1)).view(sa.shape)
        if self._one_step:  # the sum over one valid step, from 0: the step + 0 (+0 for −0), the same gradient
            h = steps[..., 0] + 0.0
        else:
            h = torch.where(valid, steps, torch.zeros((), dtype=steps.dtype, device=steps.device)).sum(-1)  # [R, n, 2]
        return h[..., 0] - h[..., 1]

    def _pair_values(self, lr_table: Tensor) -> Callable[[Callable[[Tensor], Tensor]], Tensor]:
        """A function of ``fn`` (elementwise) giving ``fn`` of every pair's margin ``[R, N]`` from the log-ratio
        table ``lr_table``, without gradient: the margins are made once, as a table evaluated and picked per pair
        when :attr:`_cells` has one, else per pair."""
        cells = self._cells
        if cells is not None:
            table = cells.margins(lr_table)
            return lambda fn: cells.pick(fn(table))
        margin = self._margin_of(lr_table, None)
        return lambda fn: fn(margin)

    def loss_and_grads(self, idx: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The per-run loss ``[R]`` on pairs ``idx [R, n]`` (all if ``None``) and the gradient of
        ``Σ_r alive_r·loss_r`` with respect to the logit table, bitwise what autograd gives
        (:mod:`sim.algos.dpo_grad`; a tabular policy only)."""
        lp, backward = dpo_grad.log_softmax_with_backward(self.params["logits"].detach())
        lr_table = lp - self._ref_table()
        R, n = self.R, self.n_pairs if idx is None else idx.shape[1]
        beta, is_ipo = self.rt.beta, self.is_ipo
        g_run = (self.alive.to(lp.dtype) / n).view(R, 1)  # the mean's and the alive mask's backward
        sa = self._sa if idx is None else take_samples(self._sa, idx)
        if self._cells is not None:
            table = self._cells.margins(lr_table)
            loss = self._cells.pick(preference_loss(table, beta, is_ipo), idx).mean(-1)
            g_steps = self._cells.pick_steps(dpo_grad.preference_loss_grad(table, beta, is_ipo, g_run), idx)
        else:
            margin = self._margin_of(lr_table, idx)
            loss = preference_loss(margin, beta, is_ipo).mean(-1)
            g_margin = dpo_grad.preference_loss_grad(margin, beta, is_ipo, g_run)
            g_sides = torch.stack([g_margin, -g_margin], dim=-1).unsqueeze(-1)  # [R, n, 2, 1]: Δ = h_w − h_l
            if not self._one_step:  # the sum over the valid steps
                valid = self.data["valid"] if idx is None else take_samples(self.data["valid"], idx)
                g_sides = torch.where(valid, g_sides, torch.zeros((), dtype=lp.dtype, device=lp.device))
            g_steps = g_sides.expand(sa.shape).reshape(R, -1)
        g_table = torch.zeros(R, self.S * self.A, dtype=lp.dtype, device=lp.device)
        g_table.scatter_add_(1, sa.reshape(R, -1), g_steps)  # gather's backward: a sum in step order from 0
        return loss, {"logits": backward(g_table.view(lp.shape))}

    def sampled_update(self, update: int) -> dict[str, Tensor]:
        d = self.cfg.dpo
        n = self.n_pairs
        bs = min(d.batch_size or n, n)
        n_chunks = math.ceil(n / bs)
        key = rng.fold(rng.fold(self.rt.keys, update), _SHUFFLE_STREAM) if n_chunks > 1 else self.rt.keys
        for epoch in range(d.epochs):
            if n_chunks > 1:
                perm = torch.argsort(rng.uniform(rng.fold(key, epoch), (n,)), dim=-1)  # [R, n]
                chunks: list[Tensor | None] = list(torch.tensor_split(perm, n_chunks, dim=1))
            else:
                chunks = [None]
            for i, chunk in enumerate(chunks):
                last = epoch == d.epochs - 1 and i == len(chunks) - 1
                if self._explicit:
                    loss, grads = self.loss_and_grads(chunk)
                    norm = self._apply_grads(loss, update, want_norm=last, grads=grads)
                    continue
                margin = self.log_ratio_margin(chunk)
                loss = preference_loss(margin, self.rt.beta, self.is_ipo).mean(-1)
                norm = self._apply_grads(loss, update, want_norm=last)
        if not self._logs_at(update):
            return {}
        with torch.no_grad():  # diagnostics on the whole dataset after the update
            lr_table = self.policy.table(self.params) - self._ref_table()
            beta = self.rt.beta.view(-1, 1)
            of_pairs = self._pair_values(lr_table)
            loss = of_pairs(lambda m: preference_loss(m, self.rt.beta, self.is_ipo)).mean(-1)
            acc = of_pairs(lambda m: (m > 0).double() + 0.5 * (m == 0).double()).mean(-1)  # identical episodes: a tie
            margin = of_pairs(lambda m: beta * m.to(torch.float64)).mean(-1)
        nan = torch.full((self.R,), float("nan"), dtype=torch.float64, device=self.device)
        return {"reward": nan, "pref_loss": loss.to(torch.float64), "pref_acc": acc, "pref_margin": margin,
                "grad_norm": norm}

    # -- the optimum it targets -------------------------------------------------------------------------
    def _on_phase(self) -> None:
        """Nothing to do: DPO runs one phase (the config rejects ``train.phases``) on the τ-scaled MDP set in
        ``__init__``."""

    def _optimum(self, ref64: Tensor) -> Tensor:
        opt = super()._optimum(ref64)
        if not bool(self.is_ipo.any()):
            return opt
        if self.S == 1:
            ipo = ipo_optimum(self.mdp, ref64, self.sampler, self.rt.beta, self.tau)
        else:  # no per-step closed form on sequences
            ipo = torch.full_like(opt, float("nan"))
        return torch.where(self.is_ipo.view(-1, 1, 1), ipo, opt)

    # -- outputs ----------------------------------------------------------------------------------------
    def preference_frame(self, run: int) -> pd.DataFrame:
        """Run ``run``'s dataset, long format: one row per pair × side × step (columns
        :data:`PREFERENCE_COLUMNS`; ``chosen`` marks the preferred episode, ``return`` its summed reward and
        ``bt_prob`` the BT probability that it beats the other episode of the pair)."""
        d = snapshot({k: self.data[k][run] for k in ("state", "action", "valid", "reward", "ret", "bt_prob")})
        pair, side, t = np.nonzero(d["valid"])
        return pd.DataFrame({"pair": pair.astype(np.int64), "chosen": side == 0, "t": t.astype(np.int64),
                             "state": d["state"][pair, side, t], "action": d["action"][pair, side, t],
                             "reward": d["reward"][pair, side, t], "return": d["ret"][pair, side],
                             "bt_prob": d["bt_prob"][pair, side]})

    def _extra_tables(self, run: int) -> dict[str, pd.DataFrame]:
        """``preferences``: the run's dataset (:meth:`preference_frame`), written as ``preferences.parquet``
        (and, with a learned reward, the base's ``reward_model``)."""
        return {**super()._extra_tables(run), "preferences": self.preference_frame(run)}
