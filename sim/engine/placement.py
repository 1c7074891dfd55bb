"""Where the KL enters PPO: the placements as small pure functions over per-run settings.

A batch mixes runs of every placement × estimator (:class:`RunTensors`). In the reward (docs/theory.md "The
two placements"), ``β·k`` of the sampling policy is subtracted from the reward, detached
(:func:`kl_reward_penalty`); in the loss, ``β·k`` is added outside the PPO clip with its gradient flowing
through ``log π_θ`` (:func:`kl_loss_term`, and with its derivative for losses differentiated by hand,
:func:`kl_loss_term_and_slope`); runs with ``kl.is_correction`` use the importance-weighted forms for samples
from π_old (docs/theory.md "Off-policy"). :class:`Clamp` optionally bounds the log-ratio and counts every
clamp (docs/theory.md "Clamps").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sim.config import ESTIMATORS, PLACEMENTS, Config
from sim.engine import rng
from sim.engine.kl import (
    PreparedWeights,
    Weights,
    estimator_weights,
    prepare_weights,
    weighted_estimate,
    weighted_estimate_and_slope,
)


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

    def loss_weights(self, run: Tensor, dtype: torch.dtype) -> Tensor:
        """``[2, 4, P]``: the KL-in-loss weights of (k1, k2, k3, full) of columns whose runs are ``run [P]``,
        plain and importance-weighted (:meth:`coef` of ``loss`` and ``loss_is``), in ``dtype``."""
        both = torch.cat([self.coef("loss"), self.coef("loss_is")], 1).to(dtype).t().contiguous()
        return both.index_select(1, run).view(2, 4, run.shape[0])


def kl_reward_penalty(logp: Tensor, ref_logp: Tensor, k_full: Tensor, rt: RunTensors,
                      row_run: Tensor | None = None, pad: int | None = None,
                      weights: PreparedWeights | None = None) -> Tensor:
    """``β·k`` for runs whose KL sits in the reward (0 for the others), ``[R, ...]``, no gradient.

    ``logp``/``ref_logp`` are the sampling policy's and the reference's log-probabilities of the sampled
    actions; ``k_full`` the exact per-state KL (used by ``full``). With ``row_run [M]`` the inputs are
    action-major row tables ``[A, M]`` whose row ``m`` belongs to run ``row_run[m]``; with ``pad`` too (``M`` a
    multiple of it), each estimator is evaluated on the span of rows its runs occupy
    (:func:`sim.engine.kl.prepare_weights`; the same numbers). ``weights``: those rows' :func:`reward_weights`,
    if already computed (``rt``, ``row_run`` and ``pad`` are then not used).
    """
    with torch.no_grad():
        coef: Tensor | PreparedWeights = rt.coef("reward") if weights is None else weights
        if weights is None and row_run is not None and pad is not None:
            coef = reward_weights(rt, logp, row_run, pad)
        return weighted_estimate(logp, ref_logp, coef, k_full, run_index=row_run)


def reward_weights(rt: RunTensors, like: Tensor, row_run: Tensor, pad: int) -> PreparedWeights:
    """The reward-placed KL's weights of action-major row tables ``like [A, M]`` whose row ``m`` belongs to run
    ``row_run[m]`` (``M`` a multiple of ``pad``), prepared for :func:`kl_reward_penalty`."""
    return prepare_weights(estimator_weights(rt.coef("reward"), like, row_run), pad)


def kl_loss_term(logp: Tensor, logp_old: Tensor, ref_logp: Tensor, k_full: Tensor | Callable[[], Tensor],
                 rt: RunTensors, row_run: Tensor | None = None, weights: tuple[Weights, Weights] | None = None
                 ) -> Tensor:
    """``β·k`` with gradient through ``logp`` (the current policy at the sampled actions) for runs whose KL
    sits in the loss (0 for the others), ``[R, ...]``. Added outside the PPO clip.

    Runs with ``kl.is_correction`` use the importance-weighted forms for samples from π_old;
    ``full`` (``k_full``, carrying gradient; may be a callable so it is only computed when used) needs none.
    ``row_run`` as in :func:`kl_reward_penalty`. ``weights``: the samples' :func:`sim.engine.kl.estimator_weights`
    for the plain and the importance-weighted forms, if already computed (``rt`` and ``row_run`` are then
    not used for them).
    """
    out = _kl_loss(logp, logp_old, ref_logp, k_full, rt, row_run, weights, None, slope=False)[0]
    assert out is not None
    return out


def kl_loss_term_and_slope(logp: Tensor, logp_old: Tensor, ref_logp: Tensor,
                           k_full: Tensor | Callable[[], Tensor], rt: RunTensors, row_run: Tensor | None = None,
                           weights: tuple[Weights | PreparedWeights, Weights | PreparedWeights] | None = None,
                           delta_slope: Tensor | None = None, value: bool = True
                           ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`kl_loss_term` (the same values; ``None`` unless ``value``) with its derivative
    ``(value, slope, full_weight)`` as in :func:`sim.engine.kl.weighted_estimate_and_slope`, for losses
    differentiated by hand. ``weights`` may be :class:`~sim.engine.kl.PreparedWeights` (reused over many
    evaluations on the same row tables)."""
    return _kl_loss(logp, logp_old, ref_logp, k_full, rt, row_run, weights, delta_slope, slope=True, value=value)


def _kl_loss(logp: Tensor, logp_old: Tensor, ref_logp: Tensor, k_full: Tensor | Callable[[], Tensor],
             rt: RunTensors, row_run: Tensor | None,
             weights: tuple[Weights | PreparedWeights, Weights | PreparedWeights] | None,
             delta_slope: Tensor | None, slope: bool, value: bool = True
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    def estimate(w: Weights | PreparedWeights, old: Tensor | None
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if slope:
            return weighted_estimate_and_slope(logp, ref_logp, w, k_full, old, delta_slope=delta_slope, value=value)
        return weighted_estimate(logp, ref_logp, w, k_full, old), None, None

    if weights is None:
        weights = (estimator_weights(rt.coef("loss"), logp, row_run),
                   estimator_weights(rt.coef("loss_is"), logp, row_run))
    plain, is_weighted = weights
    parts = [estimate(plain, None)]
    is_list = is_weighted.weights if isinstance(is_weighted, PreparedWeights) else is_weighted
    if any(w is not None for w in is_list):
        parts.append(estimate(is_weighted, logp_old))

    def total(xs: list[Tensor | None]) -> Tensor | None:
        xs = [x for x in xs if x is not None]
        return None if not xs else xs[0] if len(xs) == 1 else xs[0] + xs[1]

    return total([p[0] for p in parts]), total([p[1] for p in parts]), total([p[2] for p in parts])


class Clamp:
    """Optional per-run bounds on the log-ratio δ inside the KL estimators, with a per-run count of clamped
    samples (docs/theory.md "Clamps").

    ``kl.clamp: c`` bounds δ to [−c, c]. ``kl.value_clamp: v`` bounds the run's sampled estimate to [−v, v];
    every sampled estimator is monotone in δ on each side of 0, so that is the δ interval where the estimate
    stays within v (k1: [−v, v]; k2: |δ| ≤ √(2v); k3: e^{−δ} − 1 + δ ≤ v, solved for each side): the same
    values and zero slope where clamped as clamping the value itself (verl's ``low_var_kl`` clamp of k3 at 10).
    A run's bounds are the intersection of both.
    """

    def __init__(self, lo: Tensor | None, hi: Tensor | None, n_runs: int, device: torch.device):
        self.count = torch.zeros(n_runs, dtype=torch.long, device=device)
        self.limit: float | None = None  # one symmetric bound shared by every run (the common case)
        self.lo = self.hi = None
        if lo is not None and hi is not None:
            symmetric = bool((lo == -hi).all()) and bool((hi == hi[0]).all()) and bool(torch.isfinite(hi[0]))
            if symmetric:
                self.limit = float(hi[0])
            else:
                self.lo, self.hi = lo.to(device), hi.to(device)

    @classmethod
    def from_configs(cls, configs: list[Config], device: torch.device) -> Clamp:
        """The bounds of each run from its ``kl.clamp`` and ``kl.value_clamp`` (see the class docstring)."""
        inf = float("inf")
        lo, hi = [], []
        for c in configs:
            a, b = (-c.kl.clamp, c.kl.clamp) if c.kl.clamp is not None else (-inf, inf)
            if c.kl.value_clamp is not None:
                va, vb = value_clamp_bounds(c.kl.estimator, c.kl.value_clamp)
                a, b = max(a, va), min(b, vb)
            lo.append(a)
            hi.append(b)
        if all(x == -inf for x in lo) and all(x == inf for x in hi):
            return cls(None, None, len(configs), device)
        return cls(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), len(configs),
                   device)

    @property
    def active(self) -> bool:
        return self.limit is not None or self.lo is not None

    def _bounds(self, like: Tensor, row_run: Tensor | None) -> tuple[Tensor, Tensor]:
        """The per-run bounds broadcasting against ``like`` (``[R, ...]``, or ``[A, M]`` rows of ``row_run``)."""
        assert self.lo is not None and self.hi is not None
        if row_run is not None:
            return (self.lo.index_select(0, row_run).to(like.dtype), self.hi.index_select(0, row_run).to(like.dtype))
        shape = (-1,) + (1,) * (like.dim() - 1)
        return self.lo.to(like.dtype).view(shape), self.hi.to(like.dtype).view(shape)

    def __call__(self, logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None,
                 row_run: Tensor | None = None) -> Tensor:
        """``ref_logp`` adjusted so that ``logp − ref_logp`` lies within the run's bounds.

        ``mask`` (bool, same shape) says which entries are samples; or, for tables, integer sample counts
        per entry, so a clamped table entry counts once per sample that uses it. Inputs are ``[R, ...]``,
        or action-major row tables ``[A, M]`` with ``row_run [M]`` naming each row's run.
        """
        if not self.active:
            return ref_logp
        delta = logp - ref_logp
        if self.limit is not None:
            hit = delta.detach().abs() > self.limit
            clamped = delta.clamp(-self.limit, self.limit)
        else:
            lo, hi = self._bounds(delta, row_run)
            d = delta.detach()
            hit = (d < lo) | (d > hi)
            clamped = torch.clamp(delta, min=lo, max=hi)
        if mask is not None:
            hit = hit & mask if mask.dtype == torch.bool else hit * mask
        if row_run is None:
            self.count += hit.reshape(hit.shape[0], -1).sum(-1).to(self.count.dtype)
        else:
            self.count.index_add_(0, row_run, hit.sum(0).to(self.count.dtype))
        return logp - clamped

    def slope(self, logp: Tensor, ref_logp: Tensor, row_run: Tensor | None = None) -> Tensor | None:
        """``∂δ/∂logp`` of the clamped log-ratio ``δ = logp − clamped ref``: 1 where ``logp − ref_logp`` is
        within the bounds (bounds included, as autograd's clamp), 0 where clamped; ``None`` without a clamp."""
        if not self.active:
            return None
        delta = logp - ref_logp
        if self.limit is not None:
            return (delta.abs() <= self.limit).to(logp.dtype)
        lo, hi = self._bounds(delta, row_run)
        return ((delta >= lo) & (delta <= hi)).to(logp.dtype)


def value_clamp_bounds(estimator: str, v: float) -> tuple[float, float]:
    """The interval of δ where the sampled ``estimator``'s value lies within [−v, v] (``v > 0``)."""
    if estimator == "k1":
        return -v, v
    if estimator == "k2":
        r = math.sqrt(2.0 * v)
        return -r, r
    if estimator == "k3":
        return _k3_root(v, negative=True), _k3_root(v, negative=False)
    raise ValueError(f"kl.value_clamp needs a sampled estimator (k1, k2, k3); got {estimator!r}")


def _k3_root(v: float, negative: bool) -> float:
    """The δ < 0 (or δ > 0) where e^{−δ} − 1 + δ = v, by bisection in float64."""
    a, b = (-(math.log1p(v) + 1.0) - 1.0, 0.0) if negative else (0.0, v + 1.0)
    for _ in range(200):
        m = 0.5 * (a + b)
        f = math.expm1(-m) + m - v
        if (f > 0) == negative:  # the root lies between m and 0
            a = m
        else:
            b = m
    return 0.5 * (a + b)
