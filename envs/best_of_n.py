"""Episodes of tree-shaped tabular MDPs as outcomes, and the exact law of best-of-n over them.

An :class:`~envs.tabular.TabularMDP` is an *episode tree* when it has one start state, deterministic
transitions and every other state is entered by exactly one (state, action) pair: a state then determines the
history that led to it, and each *final pair* (a pair whose transition ends the episode) is one whole episode.
The bandit (one state, every arm final) and the token tree (the last token's (prefix, token) pairs, one per
sequence) are episode trees; a gridworld is not (paths merge). :func:`episode_tree` finds the structure and
:class:`EpisodeTree` maps between per-(state, action) tables and per-episode vectors.

Best-of-n (BoN): draw ``n`` episodes from π_ref and keep the one with the highest score (a proxy reward). With
the episodes' distinct score levels ``v`` in increasing order, level reference mass ``p_v`` and
``F(v) = Σ_{w ≤ v} p_w``, the best of ``n`` lies on level ``v`` with probability ``P_v = F(v)^n − F(v⁻)^n``
(``F(v⁻) = F(v) − p_v``). Ties (episodes with exactly equal float64 scores) are broken by the order of the
draws — the first drawn among the best is kept, or equivalently one of them uniformly — so, by exchangeability,
the kept episode is distributed within its level as π_ref restricted to the level:

    π_n(y) = π_ref(y) · P_v / p_v   for y on level v.

Hence ``KL(π_n‖π_ref) = Σ_v P_v log(P_v/p_v)``: the KL between the level laws. For continuous scores (every
level infinitesimal) it is ``log n − (n−1)/n``; for discrete outcomes it is at most that (Beirami et al. 2024,
arXiv:2401.01879) and approaches it when no level carries much reference mass (:func:`kl_upper_bound`).
Everything is float64 and accepts leading batch dimensions (one law per run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from envs.tabular import TabularMDP, state_occupancy


@dataclass(frozen=True)
class EpisodeTree:
    """The episodes of an episode-tree MDP (see the module docstring).

    Attributes:
        final_pairs: ``[O]`` flat indices ``state·A + action`` of the final pairs, one per episode (outcome).
        parent_pair: ``[S]`` flat index of the pair that enters each state (``-1`` for the start state).
        order: ``[S]`` the states in time order (a state's parent comes before it).
        n_states, n_actions: ``S`` and ``A``.
    """

    final_pairs: Tensor
    parent_pair: Tensor
    order: Tensor
    n_states: int
    n_actions: int

    @property
    def n_outcomes(self) -> int:
        """Number of episodes ``O``."""
        return int(self.final_pairs.numel())

    def path_sums(self, values: Tensor) -> Tensor:
        """``[..., O, F]``: the sum of ``values [..., S·A, F]`` (per-pair features, or scalars with ``F = 1``)
        over the pairs of each episode: its path from the start, the final pair included."""
        A = self.n_actions
        v = values
        acc = v.new_zeros(v.shape[:-2] + (self.n_states, v.shape[-1]))  # sum over the pairs before each state
        for s in self.order.tolist():
            p = int(self.parent_pair[s])
            if p >= 0:
                acc[..., s, :] = acc[..., p // A, :] + v[..., p, :]
        states = torch.div(self.final_pairs, A, rounding_mode="floor")
        return acc.index_select(-2, states) + v.index_select(-2, self.final_pairs)

    def returns(self, reward: Tensor) -> Tensor:
        """``[..., O]``: each episode's return under the per-pair rewards ``reward [..., S, A]``."""
        flat = reward.reshape(reward.shape[:-2] + (-1, 1))
        return self.path_sums(flat).squeeze(-1)

    def outcome_logp(self, mdp: TabularMDP, logp: Tensor) -> Tensor:
        """``[..., O]`` log-probability of each episode under the policy ``logp [..., S, A]``."""
        occ = state_occupancy(mdp, logp)  # [..., S]: the probability of passing through each state
        states = torch.div(self.final_pairs, self.n_actions, rounding_mode="floor")
        final = logp.reshape(logp.shape[:-2] + (-1,)).index_select(-1, self.final_pairs)
        return occ.index_select(-1, states).log() + final

    def policy(self, outcome_prob: Tensor, fallback_logp: Tensor) -> Tensor:
        """The per-state policy ``[..., S, A]`` (log-probabilities) whose episode law is ``outcome_prob [..., O]``.

        On a tree a law over episodes is a law over paths, so it is exactly Markov: π(a|s) is the mass of the
        episodes through (s, a) over the mass through s. States the law never reaches take ``fallback_logp``
        ``[..., S, A]`` (e.g. the reference; they carry no weight in any occupancy-weighted quantity).
        """
        S, A = self.n_states, self.n_actions
        batch = outcome_prob.shape[:-1]
        mass = outcome_prob.new_zeros(batch + (S * A,))
        mass.index_copy_(-1, self.final_pairs, outcome_prob)
        state_mass = outcome_prob.new_zeros(batch + (S,))
        for s in reversed(self.order.tolist()):  # children before parents
            total = mass[..., s * A:(s + 1) * A].sum(-1)
            state_mass[..., s] = total
            p = int(self.parent_pair[s])
            if p >= 0:
                mass[..., p] = total
        mass = mass.view(batch + (S, A))
        logp = mass.log() - state_mass.log().unsqueeze(-1)
        reached = (state_mass > 0).unsqueeze(-1)
        return torch.where(reached, logp, fallback_logp.to(logp).expand_as(logp))


def episode_tree(mdp: TabularMDP) -> EpisodeTree | None:
    """The :class:`EpisodeTree` of ``mdp``, or ``None`` if it is not one (several start states, random
    transitions, or a state entered by more than one pair)."""
    S, A = mdp.n_states, mdp.n_actions
    if int((mdp.init_prob > 0).sum()) != 1:
        return None
    possible = mdp.next_prob > 0  # [S, A, K]
    if bool((possible.sum(-1) != 1).any()):
        return None
    nxt = torch.where(possible, mdp.next_state, 0).sum(-1).reshape(-1)  # [S·A]: the one outcome
    start = int(mdp.init_prob.argmax())
    inner = nxt < S
    entered = torch.bincount(nxt[inner], minlength=S)
    if bool((entered > 1).any()) or int(entered[start]) != 0:
        return None
    parent = torch.full((S,), -1, dtype=torch.long)
    parent[nxt[inner]] = torch.nonzero(inner).flatten()
    order = torch.argsort(mdp.state_time, stable=True)
    if bool((mdp.state_time[nxt[inner]] <= mdp.state_time[torch.nonzero(inner).flatten() // A]).any()):
        return None  # time must increase along transitions for the forward order to be valid
    final = torch.nonzero(~inner).flatten()
    reached = torch.zeros(S, dtype=torch.bool)
    reached[start] = True
    for s in order.tolist():  # keep the final pairs of states the start can reach
        if int(parent[s]) >= 0:
            reached[s] = bool(reached[int(parent[s]) // A])
    final = final[reached[final // A]]
    return EpisodeTree(final, parent, order, S, A)


def kl_upper_bound(n: Tensor | float) -> Tensor:
    """``log n − (n − 1)/n``: the KL of best-of-n to π_ref for continuous scores, an upper bound for discrete
    ones (Beirami et al. 2024). ``n`` scalar or ``[...]``."""
    n_t = torch.as_tensor(n, dtype=torch.float64)
    return torch.log(n_t) - (n_t - 1) / n_t


def _levels(ref_prob: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Score levels of ``scores [..., O]``: ``(order [..., O], level of each sorted outcome [..., O], level
    mass p_v [..., O] (zero past the last level), mass below each level F(v⁻) [..., O])``."""
    O = scores.shape[-1]
    sorted_scores, order = torch.sort(scores, dim=-1, stable=True)
    p_sorted = ref_prob.expand_as(scores).gather(-1, order)
    new = torch.ones_like(sorted_scores, dtype=torch.bool)
    new[..., 1:] = sorted_scores[..., 1:] != sorted_scores[..., :-1]
    level = new.long().cumsum(-1) - 1  # [..., O]
    flat = p_sorted.reshape(-1, O)
    lv = level.reshape(-1, O)
    mass = torch.zeros_like(flat).scatter_add_(1, lv, flat)  # [B, O], levels in increasing score
    below = mass.cumsum(-1) - mass
    return order, level, mass.view(scores.shape), below.view(scores.shape)


def _level_law(mass: Tensor, below: Tensor, n: Tensor) -> Tensor:
    """``P_v = F(v)^n − F(v⁻)^n`` ``[..., O]`` for level masses ``p_v`` and masses below ``F(v⁻)``, in log space
    so that neither large ``n`` nor tiny levels lose it: ``P_v = exp(n·log F(v) + log(−expm1(n·log(F(v⁻)/F(v)))))``
    (``F(v)^n`` on the lowest level, where ``F(v⁻) = 0``)."""
    nn = n.to(mass).unsqueeze(-1)
    upper = below + mass
    ok = mass > 0
    safe_upper = torch.where(ok, upper, torch.ones_like(upper))
    log_upper = torch.log(safe_upper)
    ratio = torch.where(below > 0, torch.log(torch.where(below > 0, below, torch.ones_like(below))) - log_upper,
                        torch.full_like(below, -torch.inf))
    law = torch.exp(nn * log_upper + torch.log(-torch.expm1(nn * ratio)))
    return torch.where(ok, law, torch.zeros_like(law))


def best_of_n(ref_prob: Tensor, scores: Tensor, n: Tensor | int) -> tuple[Tensor, Tensor]:
    """The exact law of the best of ``n`` draws from ``ref_prob`` by ``scores`` (ties: see the module docstring).

    Args:
        ref_prob: ``[O]`` or ``[..., O]`` reference probability of each outcome (summing to 1).
        scores: ``[..., O]`` float64 score of each outcome (e.g. the proxy's episode return).
        n: ``[...]`` (or a scalar) number of draws, ≥ 1.
    Returns:
        ``(prob [..., O], kl [...])``: the law of the kept outcome and its exact KL to ``ref_prob``
        (``Σ_v P_v log(P_v/p_v)`` over the levels).
    """
    scores = scores.to(torch.float64)
    ref = ref_prob.to(scores).expand_as(scores)
    n_t = torch.as_tensor(n, dtype=torch.float64, device=scores.device).expand(scores.shape[:-1])
    order, level, mass, below = _levels(ref, scores)
    law = _level_law(mass, below, n_t)
    law = law / law.sum(-1, keepdim=True)  # Σ_v P_v = F(top)^n, 1 up to the rounding of the cumulative sum
    ratio = torch.where(mass > 0, law / torch.where(mass > 0, mass, torch.ones_like(mass)), torch.zeros_like(mass))
    kl = torch.where(law > 0, law * torch.log(torch.where(law > 0, ratio, torch.ones_like(ratio))),
                     torch.zeros_like(law)).sum(-1)
    prob_sorted = ref.gather(-1, order) * ratio.gather(-1, level)
    prob = torch.empty_like(prob_sorted).scatter_(-1, order, prob_sorted)
    return prob, kl
