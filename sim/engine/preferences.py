"""Preference pairs: two episodes from one start state, both sampled from a sampler policy, labelled by a
Bradley–Terry model on the env's noise-free (gold) reward.

Shared by DPO (:mod:`sim.algos.dpo`, which trains on the pairs) and the proxy reward models
(:mod:`sim.engine.reward_model`, fitted to them). Every random number comes from the run's data key
(:func:`sim.engine.rng.run_keys` of the data seed) folded with :data:`PAIR_STREAM`, so a dataset depends on its
data seed alone: a DPO run and a proxy reward model with the same data seed see the same pairs, and a run's
pairs do not depend on its batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from envs import tabular
from sim.config import ConfigError
from sim.engine import rng
from sim.engine.elementwise import sigmoid

PAIR_STREAM = 0xD0D0
"""Purpose tag of the pair streams (distinct from the PPO engine's)."""
SAMPLERS = ("reference", "uniform")
"""Named samplers; a list of arm probabilities is the third form (one-state envs)."""


def check_sampler(key: str, sampler: Any, mdp: tabular.TabularMDP, env_id: str) -> None:
    """Raise :class:`ConfigError` (one line naming ``key``) unless ``sampler`` is ``reference``, ``uniform`` or,
    on a one-state env with ``A`` actions, a list of ``A`` probabilities summing to 1."""
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ConfigError(f"{key} must be reference, uniform or a list of probabilities; got {sampler!r}")
        return
    if not (isinstance(sampler, list | tuple) and sampler
            and all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in sampler)
            and abs(sum(sampler) - 1.0) <= 1e-6):
        raise ConfigError(f"{key} must be reference, uniform or a list of probabilities summing to 1; "
                          f"got {sampler!r}")
    if mdp.n_states != 1 or len(sampler) != mdp.n_actions:
        raise ConfigError(f"{key} as a list of probabilities needs a one-state env with {mdp.n_actions} "
                          f"actions (a bandit); got {list(sampler)} with env.id={env_id!r}")


def sampler_logp(sampler: Any, mdp: tabular.TabularMDP) -> Tensor:
    """Log-probabilities ``[S, A]`` (float64) of the sampler ``reference`` | ``uniform`` | a list of
    probabilities (a one-state env, checked by :func:`check_sampler`)."""
    S, A = mdp.n_states, mdp.n_actions
    if sampler == "reference":
        return mdp.ref_logp.to(torch.float64)
    if sampler == "uniform":
        return torch.full((S, A), -math.log(A), dtype=torch.float64, device=mdp.ref_logp.device)
    probs = torch.tensor(sampler, dtype=torch.float64, device=mdp.ref_logp.device)
    return probs.log().view(1, A)


def sample_preferences(core: tabular.TabularCore, sampler: Tensor, keys: Tensor, n_pairs: int,
                       temperature: float) -> dict[str, Tensor]:
    """Each run's preference dataset: ``n_pairs`` pairs of episodes from one start state, labelled by BT.

    Episode rewards are the env's expected rewards of the steps taken (``r(y) = Σ_t r̄(s_t, a_t)``, no reward
    noise); the label says ``y₁ ≻ y₂`` with probability ``σ((r(y₁) − r(y₂))/τ)``. Draws, from each run's key
    folded with :data:`PAIR_STREAM`: actions (fold 0, ``[N, 2, H]``), the start state (fold 1, ``[N]``), the
    labels (fold 2, ``[N]``) and, only where the dynamics are random, the transition outcomes (fold 3,
    ``[N, 2, H]``).

    Args:
        core: the env's batched sampler.
        sampler: ``[S, A]`` log-probabilities of the sampling policy (shared by the runs).
        keys: ``[R]`` the runs' data keys (:func:`sim.engine.rng.run_keys` of their data seeds).
        n_pairs: pairs per run ``N``. temperature: BT temperature τ > 0.
    Returns:
        ``state, action`` ``[R, N, 2, H]`` int64, ``valid`` ``[R, N, 2, H]`` bool, ``reward`` ``[R, N, 2, H]``
        float64 (expected reward of each step), ``ret`` ``[R, N, 2]`` (episode return), ``bt_prob`` ``[R, N, 2]``
        (BT probability that the episode beats the other one). Side 0 is the preferred episode ``y_w``,
        side 1 the rejected ``y_l``.
    """
    mdp = core.mdp
    R, N, H, A, S = keys.shape[0], n_pairs, mdp.horizon, mdp.n_actions, mdp.n_states
    dev = keys.device
    key = rng.fold(keys, PAIR_STREAM)
    u_act = rng.uniform(rng.fold(key, 0), (N, 2, H))
    u_start = rng.uniform(rng.fold(key, 1), (N,))
    u_label = rng.uniform(rng.fold(key, 2), (N,))
    u_out = rng.uniform(rng.fold(key, 3), (N, 2, H)) if core.needs_uniform else None
    cdf = sampler.exp().cumsum(-1)  # [S, A]
    mean_reward = mdp.expected_reward.reshape(-1)  # [S·A] (with one outcome per pair: the reward itself)
    state = core.reset(u_start).unsqueeze(-1).expand(R, N, 2).contiguous()  # both episodes of a pair: one start
    shape = (R, N, 2, H)
    st = torch.zeros(shape, dtype=torch.long, device=dev)
    ac = torch.zeros(shape, dtype=torch.long, device=dev)
    rw = torch.zeros(shape, dtype=torch.float64, device=dev)
    valid = torch.zeros(shape, dtype=torch.bool, device=dev)
    alive = torch.ones(R, N, 2, dtype=torch.bool, device=dev)
    for t in range(H):
        s = state.clamp(max=S - 1)
        a = (u_act[..., t, None] >= cdf[s]).sum(-1).clamp_(max=A - 1)
        nxt, _, done = core.step(s, a, None if u_out is None else u_out[..., t])  # no reward noise drawn
        st[..., t], ac[..., t], valid[..., t] = s, a, alive
        rw[..., t] = torch.where(alive, mean_reward[s * A + a], torch.zeros((), dtype=torch.float64, device=dev))
        alive = alive & ~done
        state = nxt
        if not bool(alive.any()):
            break
    ret = rw.sum(-1)  # [R, N, 2]
    p_first = sigmoid((ret[..., 0] - ret[..., 1]) / temperature)  # [R, N]
    first_wins = u_label < p_first
    order = torch.stack([~first_wins, first_wins], dim=-1).long()  # side index of (winner, loser)
    out = {"state": st, "action": ac, "valid": valid, "reward": rw}
    out = {k: v.gather(2, order.view(R, N, 2, 1).expand(shape)) for k, v in out.items()}
    out["ret"] = ret.gather(2, order)
    p_w = torch.where(first_wins, p_first, 1 - p_first)
    out["bt_prob"] = torch.stack([p_w, 1 - p_w], dim=-1)
    return out
