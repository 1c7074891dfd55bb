"""Best-of-n as a method (``train.algo: bon``): no training, the exact law of the best of ``bon.n`` episodes.

On envs whose episodes form a tree (:func:`envs.best_of_n.episode_tree`: the bandit, the token tree) each
episode is one outcome with reference probability π_ref(y) and a score: its return under the reward the run
optimises (the run's learned proxy with ``reward.model: learned``, else the env's gold reward). Best-of-n keeps
the highest-scoring of ``n`` episodes drawn from π_ref; its law, its KL to π_ref and its gold and proxy returns
are exact (:func:`envs.best_of_n.best_of_n`; ties — exactly equal scores — are broken by the order of the
draws, so within a tied level the kept episode follows π_ref). On a tree the law is a Markov policy
(:meth:`envs.best_of_n.EpisodeTree.policy`), so the run's tables and exact metrics are those of every discrete
trainer.

A run logs two rows: update 0 is π_ref (best-of-1) and update 1 the best-of-n policy. Metrics add ``bon_n``,
``kl_bon`` (the KL from the score levels, equal to ``kl_true`` up to rounding) and ``kl_bon_bound``
(``log n − (n−1)/n``, the continuous-score value and an upper bound), plus ``gold_return``, ``proxy_return``
and ``sqrt_kl``; ``tv_opt``, ``opt_prob``, ``opt_gold`` and ``opt_proxy`` are NaN (best-of-n has no β). No
``train.*`` key other than ``train.dtype`` is used.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import Tensor

from envs.best_of_n import EpisodeTree, best_of_n, episode_tree, kl_upper_bound
from sim.algos.discrete import DiscreteTrainer
from sim.config import Config, ConfigError
from sim.engine.loop import ProgressFn
from sim.engine.outputs import RunOutput, RunOutputs
from sim.engine.reward_model import config_tree


class BoNTrainer(DiscreteTrainer):
    """Exact best-of-n policies for a batch of runs (each with its ``bon.n`` and its proxy)."""

    sampled_updates = False

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``bon.n ≥ 1``; an env whose episodes form a tree; no phases, reference schedule or MLP policy."""
        super().check_config(cfg)
        if cfg.bon.n < 1:
            raise ConfigError(f"bon.n must be >= 1, got {cfg.bon.n}")
        if config_tree(cfg.env) is None:
            raise ConfigError(f"train.algo=bon needs an env whose episodes form a tree (one start state, fixed "
                              f"transitions, each state entered by one (state, action): bandit, token_tree); "
                              f"env.id={cfg.env['id']!r} with these keys is not one")
        if cfg.train.phases is not None:
            raise ConfigError("train.phases is not supported with train.algo=bon (nothing is trained)")
        if cfg.reference.schedule != "frozen":
            raise ConfigError("reference.schedule must be frozen with train.algo=bon")
        if cfg.train.policy != "tabular":
            raise ConfigError("train.policy must be tabular with train.algo=bon (its policy is an exact table)")

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
        tree = episode_tree(self.mdp.to("cpu"))
        assert tree is not None  # checked by check_config
        self.n = torch.tensor([c.bon.n for c in configs], dtype=torch.float64, device=device)
        ref = self.mdp.ref_logp.to(torch.float64)
        self.ref64 = ref.unsqueeze(0).expand(self.R, -1, -1).contiguous()
        ref_prob = tree.outcome_logp(self.mdp.to("cpu"), ref.cpu()).exp().to(device)  # [O]
        tree = _to(tree, device)
        reward = self.train_mdp.expected_reward.to(torch.float64)  # [S, A] gold or [R, S, A] proxy
        scores = tree.returns(reward.expand(self.R, -1, -1))  # [R, O]
        prob, self.kl_levels = best_of_n(ref_prob, scores, self.n)
        self.bon_logp = tree.policy(prob, self.ref64)
        self._current = self.ref64

    # -- the policy the metrics see -------------------------------------------------------------------
    def _policy64(self) -> Tensor:
        return self._current

    def _ref64(self) -> Tensor:
        """The env's float64 reference (not the ``train.dtype`` table): the KL to it is then exact."""
        return self.ref64

    def _optimum(self, ref64: Tensor) -> Tensor:
        """No KL-regularized optimum: best-of-n has no β (NaN, so ``tv_opt`` and ``opt_*`` are NaN)."""
        return torch.full_like(ref64, float("nan"))

    def exact_metrics(self) -> dict[str, Tensor]:
        out = super().exact_metrics()
        at_n = self._current is self.bon_logp
        if self.proxy is None:  # the gold reward is the score: proxy and gold coincide
            out["gold_return"] = out["proxy_return"] = out["return_true"]
            out["sqrt_kl"] = out["kl_true"].clamp(min=0).sqrt()
        out["bon_n"] = self.n if at_n else torch.ones_like(self.n)
        out["kl_bon"] = self.kl_levels if at_n else torch.zeros_like(self.n)
        out["kl_bon_bound"] = kl_upper_bound(out["bon_n"])
        return out

    # -- no training: update 0 is π_ref, update 1 the best-of-n policy ----------------------------------
    def run(self, progress: ProgressFn | None = None) -> RunOutputs:
        t0 = time.perf_counter()
        with torch.no_grad():
            for update, table in ((0, self.ref64), (1, self.bon_logp)):
                self._current = table
                self._log(update, self.exact_metrics())
                self.policy_log.append((update, self.policy_tables()))
        if progress is not None:
            progress(1, 1)
        self.wall_time = time.perf_counter() - t0
        return self._outputs()

    def _run_output(self, i: int, cols: dict, traj_stacked: tuple) -> RunOutput:
        out = super()._run_output(i, cols, traj_stacked)
        if out.status["status"] == "done":
            out.status["update"] = 1
        return out


def _to(tree: EpisodeTree, device: torch.device) -> EpisodeTree:
    """``tree`` with its index tensors on ``device``."""
    return replace(tree, final_pairs=tree.final_pairs.to(device), parent_pair=tree.parent_pair.to(device),
                   order=tree.order.to(device))
