"""The shared base of the trainers on discrete envs (bandit, gridworld, token tree): tabular run state.

Every discrete env compiles to a :class:`envs.tabular.TabularMDP`. :class:`DiscreteTrainer` holds, per run, the
policy parameters (a logit table or an MLP over state features, :mod:`sim.engine.policies`) and the
reference's, the reference-derived tables (cached until the reference changes), the KL-regularized optimum
for the current β, reward scale and reference (soft value iteration, cached), the exact float64 metrics and the
policy tables. It trains nothing itself: PPO (:mod:`sim.algos.ppo`), DPO (:mod:`sim.algos.dpo`) and the SB3
backend (:mod:`sim.algos.sb3`) add their updates and their optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor

import envs
from envs import tabular
from sim.algos.proxy import ProxyReward
from sim.config import Config, ConfigError
from sim.engine.loop import BatchTrainer
from sim.engine.outputs import RunOutput, snapshot
from sim.engine.policies import MLPPolicy, TabularPolicy
from sim.engine.reward_model import check_reward_config


class DiscreteTrainer(BatchTrainer):
    """Tabular run state, reference caches, exact metrics and policy tables of runs on a discrete env."""

    fits_reward_model = True
    """Runs may train on a learned proxy reward (``reward.model: learned``, :mod:`sim.algos.proxy`)."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise :class:`ConfigError` (one line) for what runs on a discrete env cannot do: ``train.init`` as
        a list of probabilities needs a one-state env with that many actions; a learned reward's keys
        (:func:`sim.engine.reward_model.check_reward_config`)."""
        init = cfg.train.init
        if cfg.reward.model == "learned":
            check_reward_config(cfg)
        if isinstance(init, str):
            return
        mdp = envs.from_config(cfg.env).build()
        if mdp.n_states != 1 or len(init) != mdp.n_actions:
            raise ConfigError(f"train.init as a list needs a one-state env with {mdp.n_actions} actions; "
                              f"got {list(init)}")
        if min(init) < 0 or abs(math.fsum(init) - 1) > 1e-6:
            raise ConfigError(f"train.init probabilities must be non-negative and sum to 1; got {list(init)}")

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
        cfg = self.cfg
        self.mdp = envs.from_config(cfg.env).build().to(device)
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
        self.trainable = [k for k in self.params if k not in self.policy.frozen_keys]
        for k in self.trainable:
            self.params[k].requires_grad_(True)
        self._opt_cache: dict = {}
        self._ref_derived_cache: dict[str, Tensor] = {}
        self._ref_derived_version = -1
        # the reward the runs optimise: the env's (gold), or each run's proxy fitted to preference pairs
        self.proxy = ProxyReward(configs, self.mdp, self.core, device) if cfg.reward.model == "learned" else None
        self.train_mdp = self.proxy.mdp if self.proxy is not None else self.mdp
        if self.proxy is not None:
            self._mark_diverged(~self.proxy.finite, 0, "non-finite proxy reward model")
        self._scaled_mdp = self.train_mdp

    def _init_logp(self, init: str | list[float], ref_logp: Tensor) -> Tensor:
        """The initial policy's log-probabilities ``[R, S, A]`` for ``train.init`` (checked by
        :meth:`check_config`)."""
        if init == "reference":
            return ref_logp.clone()
        if init == "uniform":
            return torch.full_like(ref_logp, -math.log(self.A))
        probs = torch.tensor(init, dtype=torch.float64, device=self.device)
        return torch.log(probs).to(self.dtype).view(1, 1, -1).expand_as(ref_logp).contiguous()

    def _on_phase(self) -> None:
        self._scaled_mdp = replace(self.train_mdp, reward=self.train_mdp.reward * self.reward_scale)

    # -- tables -------------------------------------------------------------------------------------------
    def _tables(self) -> tuple[Tensor, Tensor]:
        """Current policy and reference log-probability tables ``[R, S, A]`` (no grad, contiguous)."""
        return self._policy_table(contiguous=True), self._ref_table()

    def _policy_table(self, contiguous: bool = False) -> Tensor:
        """The current policy's log-probability table ``[R, S, A]`` (no grad; as the policy gives it, or a
        contiguous copy), recomputed only when a parameter has changed since (the tensors' in-place version
        counters)."""
        key = tuple((id(p), p._version) for p in self.params.values())
        if getattr(self, "_table_key", None) != key:
            with torch.no_grad():
                self._table = {False: self.policy.table(self.params)}
            self._table_key, self._table_of = key, list(self.params.values())  # held: their ids stay theirs
        if contiguous not in self._table:
            self._table[contiguous] = self._table[False].contiguous()
        return self._table[contiguous]

    def _ref_table(self) -> Tensor:
        """The reference's log-probability table ``[R, S, A]``, recomputed only when the reference changes."""
        def make() -> Tensor:
            with torch.no_grad():
                return self.policy.table(self.ref_params).contiguous()
        return self._ref_derived("table", make)

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

    def _policy64(self) -> Tensor:
        """The current policy's log-probability table ``[R, S, A]`` in float64 (what the metrics measure)."""
        return self._policy_table().to(torch.float64)

    def exact_metrics(self) -> dict[str, Tensor]:
        """Exact (float64) KL to the reference, entropy, support, return and distance to the optimum; with a
        learned reward also ``gold_return``, ``proxy_return``, ``sqrt_kl``, ``opt_gold``, ``opt_proxy``."""
        pi = self._policy64()
        prob = pi.exp()
        ref = self._ref64()
        mdp = self.mdp.with_reference(ref)
        occ = tabular.state_occupancy(mdp, pi, prob)
        length = occ.sum(-1).clamp(min=1e-12)
        visited = occ > 1e-9
        positive = tabular.all_positive(prob)  # checked once for both
        kl_s = tabular.kl_per_state(pi, ref, prob, positive)
        ent_s = tabular.entropy_per_state(pi, prob, positive)
        minp = torch.where(visited, prob.min(-1).values, 1.0).min(-1).values
        # 0/1 products (exactly the select of the visited states' indicators), the masks made as floats directly
        support = (torch.gt(prob, 1e-3, out=torch.empty_like(prob))
                   * torch.gt(occ, 1e-9, out=torch.empty_like(occ)).unsqueeze(-1)).sum(-1)
        # KL(π_ref(τ)‖π(τ)) = Σ_s occupancy_ref(s)·KL(π_ref‖π)_s; the reference's occupancy and probabilities
        # are computed once per reference
        ref_prob = self._ref_derived("prob", ref.exp)
        occ_ref = self._ref_derived("occupancy", lambda: tabular.state_occupancy(mdp, ref, ref_prob))
        ref_positive = bool(self._ref_derived("positive", lambda: torch.tensor(tabular.all_positive(ref_prob))))
        out = {
            "kl_true": (occ * kl_s).sum(-1),
            "kl_forward": (occ_ref * tabular.forward_kl_per_state(pi, ref, ref_prob, ref_positive)).sum(-1),
            "entropy": (occ * ent_s).sum(-1) / length,
            "min_prob": minp,
            "support": (support * occ).sum(-1) / length,
            "return_true": tabular.expected_return(self.mdp, pi, prob),
        }
        if self.H > 1:  # the exact expected episode length (steps taken), where episodes can end early
            out["length_true"] = occ.sum(-1)
        # per run: a run without a KL (β = 0) has no optimum, whatever its batch-mates have
        tv = tabular.total_variation(pi, self._optimum(ref), prob, self._optimum_prob(ref))
        out["tv_opt"] = torch.where(self.rt.beta > 0, (occ * tv).sum(-1) / length, torch.nan)
        if self.proxy is not None:
            out.update(self.proxy.metrics(pi, prob, out["return_true"], self._optimum_key(),
                                          lambda: self._optimum(ref), self.rt.beta))
            out["sqrt_kl"] = out["kl_true"].clamp(min=0).sqrt()
        return out

    def policy_tables(self) -> dict[str, np.ndarray]:
        pi = self._policy64()
        ref = self._ref64()
        tabs = {"prob": pi.exp(), "ref_prob": self._ref_derived("prob", ref.exp)}
        tabs["opt_prob"] = torch.where((self.rt.beta > 0).view(-1, 1, 1), self._optimum_prob(ref), torch.nan)
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

    def _extra_tables(self, run: int) -> dict[str, pd.DataFrame]:
        """``reward_model``: the run's fitted proxy (:meth:`sim.algos.proxy.ProxyReward.frame`), with a
        learned reward."""
        return {"reward_model": self.proxy.frame(run)} if self.proxy is not None else {}

    def _run_output(self, i: int, cols: dict[str, np.ndarray], traj_stacked: tuple) -> RunOutput:
        out = super()._run_output(i, cols, traj_stacked)
        if self.proxy is not None:
            out.status["reward_model"] = self.proxy.status(i)
        return out
