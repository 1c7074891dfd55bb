"""Asynchronous (stale) rollouts: the policies a lagging sampler acts with.

With ``train.staleness: k`` update u trains on episodes drawn from the policy of update u − k (the policy after
update u − k − 1 … the one the learner had k updates ago); the first k updates use the initial policy.
:class:`BehaviourPolicies` keeps each run's last k + 1 policy tables and picks, per run, the one its lag points
at: a fixed lag, or one drawn uniformly from 0 … k per update from the run's own stream (the irregular lag of
real systems). Runs with no lag get the learner's table itself, so their numbers are those of on-time rollouts.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from sim.config import Config
from sim.engine import rng

_LAG_STREAM = 0x57A1E


class BehaviourPolicies:
    """The last ``max(staleness) + 1`` policy tables of a batch of runs and each run's lag."""

    def __init__(self, configs: list[Config], device: torch.device):
        self.max_lag = max(c.train.staleness for c in configs)
        self.lag = torch.tensor([c.train.staleness for c in configs], dtype=torch.long, device=device)
        self.uniform = torch.tensor([c.train.staleness_dist == "uniform" for c in configs], device=device)
        self.history: deque[Tensor] = deque(maxlen=self.max_lag + 1)

    @property
    def active(self) -> bool:
        return self.max_lag > 0

    def behaviour(self, learner: Tensor, keys: Tensor, update: int) -> tuple[Tensor, Tensor]:
        """The tables ``[R, ...]`` the sampler uses at ``update`` and each run's lag ``[R]``.

        ``learner`` is the learner's table now (after update − 1); it is remembered for later updates. A run's
        lag is capped by the updates done so far (early on, the initial policy).
        """
        self.history.append(learner)
        lag = self.lag
        if bool(self.uniform.any()):
            u = rng.uniform(rng.fold(keys, update ^ _LAG_STREAM), ())  # [R] float64 in (0, 1)
            drawn = torch.floor(u * (self.lag + 1).to(u.dtype)).long().clamp(max=self.max_lag)
            lag = torch.where(self.uniform, drawn, self.lag)
        lag = lag.clamp(max=len(self.history) - 1)
        if not bool((lag > 0).any()):
            return learner, lag
        stacked = torch.stack(list(self.history))  # [L, R, ...], oldest first
        index = len(self.history) - 1 - lag
        return stacked[index, torch.arange(learner.shape[0], device=learner.device)], lag
