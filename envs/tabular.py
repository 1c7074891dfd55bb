"""Finite-horizon tabular MDPs: the one representation every discrete reflab env compiles to.

A :class:`TabularMDP` holds, as tensors, everything the batched torch core and the exact oracles need:
transitions as at most ``K`` outcomes per (state, action), the reward of each outcome, the initial state
distribution, the reference policy ``ref_logp`` and per-state features for function approximators.

States are *layered*: every state belongs to one time step (``state_time``), so a stationary table
``π[s, a]`` can represent any time-dependent policy and finite-horizon dynamic programming is exact.
The bandit has one state; the TokenTree's states are prefixes; the GridWorld's states are (t, cell) pairs.

Index ``S`` (= ``n_states``) is the terminal sink: an outcome whose ``next_state`` is ``S`` ends the
episode. Oracles work in float64 and accept a leading batch of policies (``[..., S, A]``) so the trainer
can evaluate hundreds of runs in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class TabularMDP:
    """A layered finite-horizon MDP over ``S`` states and ``A`` actions with ``K`` outcomes per pair.

    Attributes:
        next_state: ``[S, A, K]`` int64 in ``[0, S]``; ``S`` is the terminal sink.
        next_prob: ``[S, A, K]`` float64, each ``[s, a, :]`` sums to 1.
        reward: ``[S, A, K]`` float64, reward received for outcome ``k`` of ``(s, a)``.
        init_prob: ``[S]`` float64 initial state distribution.
        ref_logp: ``[S, A]`` float64 log-probabilities of the frozen reference policy.
        horizon: maximum episode length; every episode reaches the sink within it.
        features: ``[S, F]`` float32 observation features used by MLP policies.
        state_time: ``[S]`` int64 time step of each state.
        reward_noise: standard deviation of Gaussian noise added to each sampled reward.
    """

    next_state: Tensor
    next_prob: Tensor
    reward: Tensor
    init_prob: Tensor
    ref_logp: Tensor
    horizon: int
    features: Tensor
    state_time: Tensor
    reward_noise: float = 0.0

    @property
    def n_states(self) -> int:
        return int(self.next_state.shape[0])

    @property
    def n_actions(self) -> int:
        return int(self.next_state.shape[1])

    @property
    def n_outcomes(self) -> int:
        return int(self.next_state.shape[2])

    @property
    def expected_reward(self) -> Tensor:
        """``[S, A]`` expected immediate reward of each state-action pair."""
        return (self.next_prob * self.reward).sum(-1)

    @cached_property
    def layers(self) -> list[Tensor] | list[slice] | None:
        """States per time step if every possible transition goes from ``t`` to ``t + 1`` or to the sink,
        else ``None``; computed once per MDP object (and kept by :meth:`with_reference`). When every time
        step's states are a contiguous range of indices (as the gridworld numbers them) the layers are slices,
        so indexing a table by a layer is a view rather than a gather."""
        t, nxt = self.state_time, self.next_state
        possible = (self.next_prob > 0) & (nxt < self.n_states)
        t_next = torch.cat([t, t.new_full((1,), -1)])[nxt]
        if not (bool(((t_next == t[:, None, None] + 1) | ~possible).all()) and bool((t >= 0).all())):
            return None
        idx = [torch.nonzero(t == i).flatten() for i in range(int(t.max()) + 1)]
        if all(i.numel() > 0 and int(i[-1]) - int(i[0]) + 1 == i.numel() for i in idx):  # sorted, so a range
            return [slice(int(i[0]), int(i[-1]) + 1) for i in idx]
        return idx

    def to(self, device: torch.device | str) -> TabularMDP:
        """The same MDP with every tensor on ``device``."""
        return replace(
            self,
            next_state=self.next_state.to(device),
            next_prob=self.next_prob.to(device),
            reward=self.reward.to(device),
            init_prob=self.init_prob.to(device),
            ref_logp=self.ref_logp.to(device),
            features=self.features.to(device),
            state_time=self.state_time.to(device),
        )

    def with_reference(self, ref_logp: Tensor) -> TabularMDP:
        """The same dynamics with another reference policy ``[S, A]`` (log-probabilities)."""
        new = replace(self, ref_logp=ref_logp.to(self.ref_logp))
        if "layers" in self.__dict__:  # the same dynamics: the same layers
            new.__dict__["layers"] = self.__dict__["layers"]
        return new

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field if the tables are inconsistent."""
        S, A, K = self.next_state.shape
        for name in ("next_prob", "reward"):
            if tuple(getattr(self, name).shape) != (S, A, K):
                raise ValueError(f"TabularMDP.{name} must have shape {(S, A, K)}")
        if int(self.next_state.min()) < 0 or int(self.next_state.max()) > S:
            raise ValueError(f"TabularMDP.next_state must lie in [0, {S}] ({S} = terminal)")
        if not torch.allclose(self.next_prob.sum(-1), torch.ones((), dtype=self.next_prob.dtype), atol=1e-9):
            raise ValueError("TabularMDP.next_prob must sum to 1 over outcomes")
        if tuple(self.ref_logp.shape) != (S, A):
            raise ValueError(f"TabularMDP.ref_logp must have shape {(S, A)}")
        if not torch.allclose(self.ref_logp.exp().sum(-1), torch.ones((), dtype=torch.float64), atol=1e-9):
            raise ValueError("TabularMDP.ref_logp must be normalized log-probabilities")
        if abs(float(self.init_prob.sum()) - 1.0) > 1e-9:
            raise ValueError("TabularMDP.init_prob must sum to 1")
        if self.horizon < 1:
            raise ValueError("TabularMDP.horizon must be >= 1")


# --------------------------------------------------------------------------------------------------------
# Batched torch core
# --------------------------------------------------------------------------------------------------------


class TabularCore:
    """Batched, device-agnostic sampler of a :class:`TabularMDP`.

    ``reset`` and ``step`` are pure functions of explicit random draws so that a caller can use any random
    stream (the trainer uses counter-based per-run streams, the gymnasium shell a ``torch.Generator``).
    All tensors may have any leading shape ``[*B]``.

    For speed the ``[S, A, K]`` tables are kept flattened and looked up with one flat index
    ``(state·A + action)·K + k``; the outcome is chosen by comparing ``u`` with a cumulative table whose
    entries from the last positive-probability outcome on are exactly 1, so a rounding shortfall of the
    cumulative sum can never select a zero-probability outcome.
    """

    def __init__(self, mdp: TabularMDP, device: torch.device | str | None = None):
        mdp = mdp.to(device) if device is not None else mdp
        self.mdp = mdp
        self.device = mdp.next_state.device
        S, A, K = mdp.next_state.shape
        self._n_actions = A
        self._n_outcomes = K
        self._init_cdf = mdp.init_prob.cumsum(0)
        cdf = mdp.next_prob.cumsum(-1)
        positive = mdp.next_prob > 0
        # index of the last outcome with positive probability; from there on the cdf is exactly 1
        last_pos = torch.where(positive, torch.arange(K, device=self.device), 0).amax(-1, keepdim=True)
        cdf = torch.where(torch.arange(K, device=self.device) >= last_pos, torch.ones_like(cdf), cdf)
        self._cdf = cdf.reshape(S * A, K)
        self._next_state_flat = mdp.next_state.reshape(-1)
        self._reward_flat = mdp.reward.reshape(-1)
        self._deterministic = K == 1
        self._single_init = mdp.n_states == 1 or bool((mdp.init_prob == 1).any())
        self._init_state = int(mdp.init_prob.argmax())

    @property
    def terminal(self) -> int:
        """The sink index ``S``: a next state equal to it means the episode ended."""
        return self.mdp.n_states

    @property
    def needs_uniform(self) -> bool:
        """Whether ``step`` reads ``u`` (some state-action pair has more than one outcome)."""
        return not self._deterministic

    @property
    def needs_reset_uniform(self) -> bool:
        """Whether ``reset`` reads its uniforms (the start state is random)."""
        return not self._single_init

    @property
    def needs_normal(self) -> bool:
        """Whether ``step`` reads ``z`` (the rewards are noisy)."""
        return self.mdp.reward_noise > 0

    def reset(self, u: Tensor) -> Tensor:
        """Initial states ``[*B]`` (int64) from uniforms ``u`` ``[*B]`` in [0, 1)."""
        if self._single_init:
            return torch.full(u.shape, self._init_state, dtype=torch.long, device=u.device)
        idx = torch.searchsorted(self._init_cdf.to(u.dtype), u.contiguous(), right=True)
        return idx.clamp_(max=self.mdp.n_states - 1)

    def outcome(self, state: Tensor, action: Tensor, u: Tensor | None) -> Tensor:
        """Outcome indices ``k`` ``[*B]`` (int64) of ``(state, action)`` chosen by uniforms ``u`` ``[*B]``.

        ``u`` may be ``None`` when :attr:`needs_uniform` is false (every pair has a single outcome).
        """
        if self._deterministic:
            return torch.zeros_like(state)
        if u is None:
            raise ValueError("TabularCore.outcome needs uniforms u: this MDP has stochastic transitions")
        cdf = self._cdf.index_select(0, (state * self._n_actions + action).reshape(-1)).view(state.shape + (-1,))
        return (u.unsqueeze(-1) >= cdf.to(u.dtype)).sum(-1).clamp_(max=self._n_outcomes - 1)

    def transition(self, state: Tensor, action: Tensor, k: Tensor, z: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """The transition of outcome ``k`` ``[*B]``: ``(next_state [*B] int64, reward [*B], done [*B] bool)``.

        ``z`` ``[*B]`` are standard normals for the reward noise (ignored when ``reward_noise == 0``).
        The reward is float64 unless ``z`` has another floating dtype.
        """
        flat = state * self._n_actions + action
        if self._n_outcomes > 1:
            flat = flat * self._n_outcomes + k
        next_state, reward = self._outcome_of(flat, z)
        return next_state, reward, next_state == self.mdp.n_states

    def _outcome_of(self, flat: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor]:
        """Next states and rewards ``[*B]`` of flat (state, action, outcome) indices ``flat [*B]``, with the
        reward noise ``reward_noise·z`` when the rewards are noisy and ``z`` is given."""
        idx = flat.reshape(-1)  # a gather along one axis: the same values as torch.take, several times faster
        next_state = self._next_state_flat.index_select(0, idx).view(flat.shape)
        reward = self._reward_flat.index_select(0, idx).view(flat.shape)
        if self.mdp.reward_noise > 0 and z is not None:
            reward = reward.to(z.dtype) + self.mdp.reward_noise * z
        return next_state, reward

    def step(self, state: Tensor, action: Tensor, u: Tensor | None, z: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """One transition for every element of the batch.

        Args:
            state: ``[*B]`` int64 states (must not be the sink).
            action: ``[*B]`` int64 actions.
            u: ``[*B]`` uniforms in [0, 1) choosing the outcome (``None`` allowed if not
                :attr:`needs_uniform`).
            z: ``[*B]`` standard normals for reward noise (ignored when ``reward_noise == 0``).
        Returns:
            ``(next_state [*B] int64, reward [*B] float, done [*B] bool)``; the reward has ``u``'s dtype
            (when ``u`` is ``None``: that of ``z`` if the rewards are noisy, else float64).
        """
        return self.step_pairs(state * self._n_actions + action, u, z)

    def step_pairs(self, pair: Tensor, u: Tensor | None, z: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`step` from flat (state, action) indices ``pair = state·A + action`` ``[*B]`` (int64): the same
        outcomes, rewards and ends, for a caller that has the flat index already."""
        next_state, reward = self.step_pairs_no_end(pair, u, z)
        return next_state, reward, next_state == self.mdp.n_states

    def step_pairs_no_end(self, pair: Tensor, u: Tensor | None, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`step_pairs` without the ends (an end is a next state equal to :attr:`terminal`), for a
        caller that finds them later."""
        flat = pair
        if not self._deterministic:
            if u is None:
                raise ValueError("TabularCore.outcome needs uniforms u: this MDP has stochastic transitions")
            cdf = self._cdf.index_select(0, pair.reshape(-1)).view(pair.shape + (-1,))
            k = (u.unsqueeze(-1) >= cdf.to(u.dtype)).sum(-1).clamp_(max=self._n_outcomes - 1)
            flat = pair * self._n_outcomes + k
        next_state, reward = self._outcome_of(flat, z)
        if u is not None and reward.dtype != u.dtype:
            reward = reward.to(u.dtype)
        return next_state, reward

    def sample_reset(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n]`` initial states drawn with ``generator`` (no draw when the start state is fixed)."""
        if self._single_init:
            return torch.full((n,), self._init_state, dtype=torch.long, device=self.device)
        return self.reset(torch.rand(n, generator=generator, device=self.device, dtype=torch.float64))

    def sample_draws(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None
                     ) -> tuple[Tensor | None, Tensor | None]:
        """The random draws of one ``step``: ``(u, z)``, each ``[*shape]`` float64 or ``None``.

        Draw order, part of the reproducibility contract: the uniform ``u`` first, only if
        :attr:`needs_uniform`; then the normal ``z``, only if :attr:`needs_normal`.
        """
        u = z = None
        if self.needs_uniform:
            u = torch.rand(shape, generator=generator, device=self.device, dtype=torch.float64)
        if self.needs_normal:
            z = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float64)
        return u, z

    def sample_step(self, state: Tensor, action: Tensor, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """``step`` with its random draws taken from ``generator`` (see :meth:`sample_draws`)."""
        u, z = self.sample_draws(state.shape, generator)
        return self.step(state, action, u, z)


# --------------------------------------------------------------------------------------------------------
# Exact oracles (float64). Policies are log-probability tables ``[..., S, A]``.
# --------------------------------------------------------------------------------------------------------


def _gather_next(mdp: TabularMDP, value: Tensor) -> Tensor:
    """``E[V(s') | s, a]`` as ``[..., S, A]`` for a value ``[..., S]`` (the sink has value 0)."""
    v_ext = torch.cat([value, value.new_zeros(value.shape[:-1] + (1,))], dim=-1)
    nxt = v_ext[..., mdp.next_state]  # [..., S, A, K]
    return (mdp.next_prob.to(value) * nxt).sum(-1)


def layers(mdp: TabularMDP) -> list[Tensor] | list[slice] | None:
    """The states of each time step, ``[states of t = 0, states of t = 1, …]``, if every possible
    transition goes from time ``t`` to ``t + 1`` or to the sink; else ``None`` (see :attr:`TabularMDP.layers`).

    Dynamic programming then visits each state once (in time order) instead of sweeping every state
    ``horizon`` times.
    """
    return mdp.layers


def state_occupancy(mdp: TabularMDP, logp: Tensor, prob: Tensor | None = None) -> Tensor:
    """Expected number of visits ``[..., S]`` to each state in one episode under policy ``logp [..., S, A]``.

    For layered MDPs this is the probability that the episode passes through the state; its sum is the
    expected episode length. ``prob`` (optional) is ``logp.exp()`` when the caller has it already.
    """
    pi = logp.exp() if prob is None else prob
    S, A, K = mdp.next_state.shape
    P = mdp.next_prob.to(pi)
    batch = pi.shape[:-2]
    occ = torch.zeros(batch + (S + 1,), dtype=pi.dtype, device=pi.device)
    occ[..., :S] = mdp.init_prob.to(pi)
    layer_list = layers(mdp)
    if layer_list is not None:  # forward in time order: a layer's occupancy is complete before it flows on
        for idx in layer_list[:-1]:
            flow = (occ[..., idx, None] * pi[..., idx, :]).unsqueeze(-1) * P[idx]  # [..., n, A, K]
            occ.index_add_(-1, mdp.next_state[idx].reshape(-1), flow.reshape(batch + (-1,)))
        return occ[..., :S]
    d = occ[..., :S].clone()
    flat_idx = mdp.next_state.reshape(-1)
    for _ in range(mdp.horizon - 1):
        flow = (d.unsqueeze(-1) * pi).unsqueeze(-1) * P  # [..., S, A, K]
        nxt = d.new_zeros(batch + (S + 1,))
        nxt.index_add_(-1, flat_idx, flow.reshape(batch + (S * A * K,)))
        d = nxt[..., :S]
        occ[..., :S] += d
    return occ[..., :S]


def _backward_induction(mdp: TabularMDP, r: Tensor, batch: torch.Size,
                        state_value: Callable[[Tensor, Tensor | slice], Tensor], want_q: bool = True
                        ) -> tuple[Tensor, Tensor | None]:
    """Finite-horizon DP: ``Q(s,a) = r(s,a) + E[V(s')]`` and ``V(s) = state_value(Q(s, ·), s)``.

    ``r`` is ``[..., S, A]`` (broadcastable to ``batch``); ``state_value(q_rows [..., n, A], idx)`` gives the
    values ``[..., n]`` of the states ``idx``. Layered MDPs are solved one time step at a time, backwards;
    others by ``horizon`` sweeps over all states. Returns ``(V [*batch, S], Q [*batch, S, A])`` (for a
    layered MDP, ``Q`` is ``None`` unless ``want_q``).
    """
    S, A, _ = mdp.next_state.shape
    dt, dev = r.dtype, r.device
    layer_list = layers(mdp)
    if layer_list is None:
        v = torch.zeros(batch + (S,), dtype=dt, device=dev)
        q = r.expand(batch + (S, A))
        for _ in range(mdp.horizon):
            q = r + _gather_next(mdp, v)
            v = state_value(q, slice(None))
        return v, q
    P = mdp.next_prob.to(dt)
    v_ext = torch.zeros(batch + (S + 1,), dtype=dt, device=dev)
    q = torch.zeros(batch + (S, A), dtype=dt, device=dev) if want_q else None
    for idx in reversed(layer_list):
        nxt = mdp.next_state[idx]  # [n, A, K]
        v_next = v_ext.index_select(-1, nxt.reshape(-1)).view(batch + nxt.shape)
        q_l = r[..., idx, :] + (P[idx] * v_next).sum(-1)  # [..., n, A]
        if q is not None:
            q[..., idx, :] = q_l
        v_ext[..., idx] = state_value(q_l, idx)
    return v_ext[..., :S], q


def kl_per_state(logp: Tensor, ref_logp: Tensor, prob: Tensor | None = None, positive: bool | None = None
                 ) -> Tensor:
    """Reverse KL(π‖π_ref) per state, ``[..., S]``; ``0·log 0`` counts as 0 (``prob``: ``logp.exp()`` if known;
    ``positive``: :func:`all_positive` of it, if known)."""
    pi = logp.exp() if prob is None else prob
    return _where_positive(pi, pi * (logp - ref_logp), positive).sum(-1)


def forward_kl_per_state(logp: Tensor, ref_logp: Tensor, ref_prob: Tensor | None = None,
                         positive: bool | None = None) -> Tensor:
    """Forward KL(π_ref‖π) per state, ``[..., S]`` (``inf`` where π drops an action π_ref keeps;
    ``ref_prob``: ``ref_logp.exp()`` if known; ``positive``: :func:`all_positive` of it, if known)."""
    ref = ref_logp.exp() if ref_prob is None else ref_prob
    return _where_positive(ref, ref * (ref_logp - logp), positive).sum(-1)


def all_positive(p: Tensor) -> bool:
    """Whether every element of ``p`` is positive (false when some is NaN). A dense tensor in any dimension
    order (e.g. a transposed table) is reduced in its memory order, without a contiguous copy."""
    if not p.numel():
        return False
    if not p.is_contiguous() and p.dim() > 1:
        order = sorted(range(p.dim()), key=lambda d: -p.stride(d))
        dense = p.permute(order)
        p = dense if dense.is_contiguous() else p
    return bool(p.min() > 0)


def _where_positive(p: Tensor, x: Tensor, positive: bool | None = None) -> Tensor:
    """``x`` where ``p > 0``, else 0 (``torch.where``; when every ``p`` is positive (``positive``, or
    :func:`all_positive` when ``None``), ``x`` itself, without the elementwise select)."""
    if positive if positive is not None else all_positive(p):
        return x
    return torch.where(p > 0, x, 0.0)


def sequence_kl(mdp: TabularMDP, logp: Tensor) -> Tensor:
    """Trajectory-level KL(π(τ)‖π_ref(τ)) ``[...]`` = Σ_s occupancy_π(s) · KL_s."""
    ref = mdp.ref_logp.to(logp)
    return (state_occupancy(mdp, logp) * kl_per_state(logp, ref)).sum(-1)


def sequence_forward_kl(mdp: TabularMDP, logp: Tensor) -> Tensor:
    """Trajectory-level KL(π_ref(τ)‖π(τ)) ``[...]`` = Σ_s occupancy_ref(s) · KL(π_ref‖π)_s."""
    ref = mdp.ref_logp.to(logp)
    return (state_occupancy(mdp, ref) * forward_kl_per_state(logp, ref)).sum(-1)


def policy_evaluation(mdp: TabularMDP, logp: Tensor, extra_reward: Tensor | None = None,
                      prob: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact finite-horizon values of policy ``logp [..., S, A]``.

    Args:
        extra_reward: optional ``[..., S, A]`` added to the expected reward (e.g. a KL penalty).
        prob: ``logp.exp()``, if the caller has it already.
    Returns:
        ``(V [..., S], Q [..., S, A])``.
    """
    v, q = _evaluate(mdp, logp, extra_reward, prob, want_q=True)
    assert q is not None
    return v, q


def _evaluate(mdp: TabularMDP, logp: Tensor, extra_reward: Tensor | None, prob: Tensor | None, want_q: bool
              ) -> tuple[Tensor, Tensor | None]:
    """:func:`policy_evaluation` (``Q`` only if ``want_q``)."""
    pi = logp.exp() if prob is None else prob
    r = mdp.expected_reward.to(pi)
    if extra_reward is not None:
        r = r + extra_reward
    batch = _broadcast_shapes(pi.shape, r.shape)[:-2]
    return _backward_induction(mdp, r, batch, lambda q, idx: (pi[..., idx, :] * q).sum(-1), want_q)


def _broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
    """The broadcast of ``shapes`` (``torch.broadcast_shapes`` would import sympy on its first call)."""
    return torch.Size(np.broadcast_shapes(*shapes))


def expected_return(mdp: TabularMDP, logp: Tensor, prob: Tensor | None = None) -> Tensor:
    """Exact expected episode reward ``[...]`` of policy ``logp [..., S, A]`` (``prob``: ``logp.exp()`` if
    known)."""
    v, _ = _evaluate(mdp, logp, None, prob, want_q=False)
    return (mdp.init_prob.to(v) * v).sum(-1)


def soft_value_iteration(mdp: TabularMDP, beta: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The optimum of E[Σ_t r_t] − β·KL(π(τ)‖π_ref(τ)) by soft value iteration with the reference as prior.

    ``Q(s,a) = r(s,a) + E[V(s')]``, ``V(s) = β log Σ_a π_ref(a|s) e^{Q(s,a)/β}``,
    ``π*(a|s) = π_ref(a|s) e^{(Q(s,a) − V(s))/β}``. For one-step envs this is the Gibbs policy
    ``π* ∝ π_ref·e^{r/β}``.

    Args:
        beta: a positive scalar or a tensor ``[*B]`` of them (one optimum per β).
    Returns:
        ``(V [*B, S], Q [*B, S, A], logp_opt [*B, S, A])`` in float64.
    """
    beta_t = torch.as_tensor(beta, dtype=torch.float64, device=mdp.ref_logp.device)
    if bool((beta_t <= 0).any()) or not bool(torch.isfinite(beta_t).all()):
        raise ValueError(f"beta must be positive and finite, got {beta}")
    b = beta_t[..., None]  # [*B, 1]
    ref = mdp.ref_logp
    r = mdp.expected_reward
    v, q = _backward_induction(mdp, r, _broadcast_shapes(beta_t.shape, ref.shape[:-2]),
                               lambda q, idx: b * torch.logsumexp(ref[..., idx, :] + q / b[..., None], dim=-1))
    logp_opt = ref + (q - v[..., None]) / b[..., None]
    logp_opt = logp_opt - torch.logsumexp(logp_opt, dim=-1, keepdim=True)  # remove rounding drift
    return v, q, logp_opt


def total_variation(logp: Tensor, other_logp: Tensor, prob: Tensor | None = None,
                    other_prob: Tensor | None = None) -> Tensor:
    """Per-state total variation distance ``[..., S]`` between two policies (``prob``, ``other_prob``: their
    ``exp`` if known)."""
    p = logp.exp() if prob is None else prob
    q = other_logp.exp() if other_prob is None else other_prob
    return 0.5 * (p - q).abs().sum(-1)


def entropy_per_state(logp: Tensor, prob: Tensor | None = None, positive: bool | None = None) -> Tensor:
    """Per-state entropy ``[..., S]`` in nats (``prob``: ``logp.exp()`` if known; ``positive``:
    :func:`all_positive` of it, if known)."""
    pi = logp.exp() if prob is None else prob
    return -_where_positive(pi, pi * logp, positive).sum(-1)


def forward_kl_stationary_point(rewards: Tensor, ref_probs: Tensor, beta: float | Tensor,
                                tol: float = 1e-13, max_iter: int = 200) -> Tensor:
    """Stationary point of E_π[r] − β·KL(π_ref‖π) on a one-state bandit (where k3-as-loss converges).

    Solves ``π_a = β·π_ref,a / (β + c − r_a)`` with ``c = E_π[r]`` by bisection on ``c``: the map
    ``c ↦ Σ_a β·π_ref,a/(β + c − r_a)`` decreases from ∞ to 0 on ``c > max_a r_a − β`` so the root with
    sum 1 is unique, and summing the stationarity condition shows it satisfies ``c = E_π[r]``.

    Args:
        rewards: ``[A]`` arm means. ref_probs: ``[A]``. beta: scalar or ``[*B]``.
    Returns:
        ``[*B, A]`` float64 probabilities.
    """
    r = rewards.to(torch.float64)
    p = ref_probs.to(torch.float64)
    beta_t = torch.as_tensor(beta, dtype=torch.float64, device=r.device)
    if bool((beta_t <= 0).any()):
        raise ValueError(f"beta must be positive, got {beta}")
    b = beta_t[..., None]
    support = p > 0
    r_max = torch.where(support, r, torch.full_like(r, -torch.inf)).max()
    lo = (r_max - beta_t).clone()
    hi = lo + beta_t * (1.0 + float(r.max() - r.min()) + 1.0) + 1.0

    def mass(c: Tensor) -> Tensor:
        denom = b + c[..., None] - r
        return torch.where(support, b * p / denom, torch.zeros_like(denom)).sum(-1)

    while bool((mass(hi) > 1).any()):
        hi = hi + (hi - lo)
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        too_much = mass(mid) > 1
        lo = torch.where(too_much, mid, lo)
        hi = torch.where(too_much, hi, mid)
        if float((hi - lo).max()) < tol:
            break
    c = 0.5 * (lo + hi)
    denom = b + c[..., None] - r
    probs = torch.where(support, b * p / denom, torch.zeros_like(denom))
    return probs / probs.sum(-1, keepdim=True)
