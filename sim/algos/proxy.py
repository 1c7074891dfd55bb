"""A batch's learned proxy rewards on a discrete env, as the trainers use them (``reward.model: learned``).

:class:`ProxyReward` samples each run's preference pairs (:func:`sim.engine.preferences.sample_preferences`,
the run's data seed), fits its proxy (:func:`sim.engine.reward_model.fit`) and exposes it the way the
discrete trainers need it:

- ``mdp``: the env's MDP with the proxy as its reward, one table per run (``reward [R, S, A, K]``, no reward
  noise). The exact oracles of :mod:`envs.tabular` accept such a batched reward, so exact mode, the
  KL-regularized optimum (soft value iteration) and ``proxy_return`` use it as they use the gold MDP;
- :meth:`ProxyReward.step_rewards` (:meth:`ProxyReward.rewards` on the buffers of one-step episodes): the
  proxy rewards of sampled episodes. Episodes are sampled with the env's own dynamics and their rewards
  replaced by the run's proxy of each step's (state, action);
- :meth:`ProxyReward.metrics`: ``gold_return`` and ``proxy_return`` (exact expectations under the current
  policy), and ``opt_gold`` / ``opt_proxy``: the gold and proxy values of the KL-regularized optimum of the
  proxy for the current β, phase and reference (NaN for runs with β = 0);
- :meth:`ProxyReward.frame` (``reward_model.parquet``) and :meth:`ProxyReward.status` (``status.json``).

The gold reward stays the env's: ``return_true`` and every other exact metric are measured on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from envs import tabular
from sim.config import Config
from sim.engine import reward_model, rng
from sim.engine.outputs import snapshot
from sim.engine.preferences import sample_preferences, sampler_logp

#: Gradient max-norm at or below which a tabular or linear fit counts as converged in ``status.json``.
CONVERGED = 1e-9
#: Columns of ``reward_model.parquet`` (one row per (state, action) of the env).
REWARD_MODEL_COLUMNS = ("state", "action", "proxy", "gold", "column", "pairs")


class ProxyReward:
    """Every run's fitted proxy reward and what the trainers compute with it (see the module docstring).

    Attributes:
        table: ``[R, S, A]`` float64 proxy reward of each (state, action) (0 off the proxy's columns).
        mdp: the gold MDP's dynamics with ``table`` as its reward (batched over runs).
        gold: the env's MDP (the gold reward).
        data: the runs' preference pairs (as :func:`~sim.engine.preferences.sample_preferences` returns them).
        tau: the Bradley–Terry temperature of the labels.
        finite: ``[R]`` whether each run's fit and its final gradient are finite (a run whose fit is not is
            marked diverged at update 0 by the trainer and trains on a zero proxy).
    """

    def __init__(self, configs: list[Config], mdp: tabular.TabularMDP, core: tabular.TabularCore,
                 device: torch.device):
        cfg = configs[0]
        rc = cfg.reward
        self.tau = float(rc.bt_temperature)
        self.gold = mdp
        seeds = [c.reward.data_seed if c.reward.data_seed is not None else c.seed for c in configs]
        # runs of one data seed have the same pairs and proxy (each run's are its own, whatever its batch): each
        # distinct data seed's are sampled and fitted once and shared by its runs
        distinct = list(dict.fromkeys(seeds))
        keys = rng.run_keys(distinct, device)
        data = sample_preferences(core, sampler_logp(rc.sampler, mdp), keys, rc.pairs, self.tau)
        self.design = reward_model.build_design(mdp.to("cpu"), cfg)
        table, diag = reward_model.fit(self.design, data, cfg, keys)
        if len(distinct) < len(seeds):
            of = {s: i for i, s in enumerate(distinct)}
            run = torch.tensor([of[s] for s in seeds], device=device)
            data, diag = ({k: v.index_select(0, run) for k, v in x.items()} for x in (data, diag))
            table = table.index_select(0, run)
        self.data, self.diag = data, diag
        self.finite = torch.isfinite(table).reshape(len(configs), -1).all(-1) & torch.isfinite(self.diag["grad_norm"])
        self.table = torch.where(self.finite[:, None, None], table, torch.zeros_like(table))
        R, (S, A, K) = len(configs), mdp.next_state.shape
        self.mdp = replace(mdp, reward=self.table.unsqueeze(-1).expand(R, S, A, K).contiguous(), reward_noise=0.0)
        self._flat = self.table.reshape(R, S * A)
        self._opt_key: tuple | None = None
        self._opt: dict[str, Tensor] = {}

    def rewards(self, buf: dict[str, Tensor]) -> Tensor:
        """The proxy rewards ``[R, N, H]`` of sampled episodes (``buf``: ``idx`` = state·A + action and
        ``valid``, ``[R, N, H]``; ``reward`` gives the dtype), 0 after an episode's end."""
        idx, valid = buf["idx"], buf["valid"]
        r = self._flat.gather(1, idx.reshape(idx.shape[0], -1)).view(idx.shape)
        return torch.where(valid, r, torch.zeros((), dtype=r.dtype, device=r.device)).to(buf["reward"].dtype)

    def step_rewards(self, row: Tensor, action: Tensor, dtype: torch.dtype) -> Tensor:
        """The proxy rewards ``[n]`` in ``dtype`` of sampled steps (each step's ``row`` = run·S + state and
        ``action``, ``[n]``): :meth:`rewards`' values at those steps, without the ``[R, N, H]`` buffers."""
        return self._flat.reshape(-1).index_select(0, torch.add(action, row, alpha=self.table.shape[2])).to(dtype)

    def metrics(self, logp: Tensor, prob: Tensor, gold_return: Tensor, opt_key: tuple,
                optimum: Callable[[], Tensor], beta: Tensor) -> dict[str, Tensor]:
        """``gold_return``, ``proxy_return``, ``opt_gold``, ``opt_proxy`` ``[R]`` for the policy ``logp [R, S, A]``
        (``prob`` its ``exp``; ``gold_return`` its exact gold return, already computed). ``optimum()`` gives
        log π* ``[R, S, A]`` of the proxy for the current phase, reference and β (``beta [R]``); its values are
        recomputed only when ``opt_key`` changes."""
        out = {"gold_return": gold_return, "proxy_return": tabular.expected_return(self.mdp, logp, prob)}
        if opt_key != self._opt_key:
            opt = optimum()
            nan = torch.full_like(gold_return, float("nan"))
            with_beta = beta > 0
            self._opt = {"opt_gold": torch.where(with_beta, tabular.expected_return(self.gold, opt), nan),
                         "opt_proxy": torch.where(with_beta, tabular.expected_return(self.mdp, opt), nan)}
            self._opt_key = opt_key
        return {**out, **self._opt}

    def frame(self, run: int) -> pd.DataFrame:
        """Run ``run``'s proxy, one row per (state, action): ``proxy`` (the fitted reward), ``gold`` (the env's
        expected reward: on per-episode envs the episode's return, paid at its final pair), ``column`` (the
        pair carries a proxy value) and ``pairs`` (how often the pair's column occurs in the run's pairs: the
        episodes ending there, on per-episode envs)."""
        S, A = self.gold.n_states, self.gold.n_actions
        d = self.design
        seen = torch.zeros(S * A, dtype=torch.long)
        is_column = torch.zeros(S * A, dtype=torch.bool)
        is_column[d.columns] = True
        col = d.col_of[self._sa(run)]
        col = col[col < d.n_columns]
        seen.index_add_(0, d.columns[col], torch.ones_like(col))
        t = snapshot({"proxy": self.table[run].reshape(-1), "gold": self.gold.expected_reward.reshape(-1)})
        return pd.DataFrame({"state": np.repeat(np.arange(S, dtype=np.int64), A),
                             "action": np.tile(np.arange(A, dtype=np.int64), S), "proxy": t["proxy"],
                             "gold": t["gold"], "column": is_column.numpy(), "pairs": seen.numpy()})

    def _sa(self, run: int) -> Tensor:
        """The flat (state, action) of every valid step of run ``run``'s pairs (CPU, int64)."""
        valid = self.data["valid"][run].cpu()
        return (self.data["state"][run].cpu() * self.gold.n_actions + self.data["action"][run].cpu())[valid]

    def status(self, run: int) -> dict:
        """The fit's summary for ``status.json``: family, columns, per-episode or per-step, pairs, columns in no
        pair (``unseen``), the final loss, training accuracy, gradient norm and iterations, whether Newton's
        method converged (gradient max-norm ≤ :data:`CONVERGED`; ``None`` for the MLP's fixed Adam steps) and
        finiteness."""
        d = self.diag
        return {"family": self.design.family, "per_episode": self.design.per_episode,
                "columns": self.design.n_columns, "pairs": int(self.data["valid"].shape[1]),
                "unseen": int(d["unseen"][run]), "loss": float(d["loss"][run]), "accuracy": float(d["accuracy"][run]),
                "grad_norm": float(d["grad_norm"][run]), "iterations": int(d["iterations"][run]),
                "converged": None if self.design.family == "mlp" else bool(d["grad_norm"][run] <= CONVERGED),
                "finite": bool(self.finite[run])}
