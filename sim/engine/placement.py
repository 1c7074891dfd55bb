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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sim.config import ESTIMATORS, PLACEMENTS, Config
from sim.engine import rng
from sim.engine.kl import Weights, estimator_weights, weighted_estimate, weighted_estimate_and_slope


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


def kl_reward_penalty(logp: Tensor, ref_logp: Tensor, k_full: Tensor, rt: RunTensors,
                      row_run: Tensor | None = None) -> Tensor:
    """``β·k`` for runs whose KL sits in the reward (0 for the others), ``[R, ...]``, no gradient.

    ``logp``/``ref_logp`` are the sampling policy's and the reference's log-probabilities of the sampled
    actions; ``k_full`` the exact per-state KL (used by ``full``). With ``row_run [M]`` the inputs are
    action-major row tables ``[A, M]`` whose row ``m`` belongs to run ``row_run[m]``.
    """
    with torch.no_grad():
        return weighted_estimate(logp, ref_logp, rt.coef("reward"), k_full, run_index=row_run)


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
                           weights: tuple[Weights, Weights] | None = None, delta_slope: Tensor | None = None,
                           value: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`kl_loss_term` (the same values; ``None`` unless ``value``) with its derivative
    ``(value, slope, full_weight)`` as in :func:`sim.engine.kl.weighted_estimate_and_slope`, for losses
    differentiated by hand."""
    return _kl_loss(logp, logp_old, ref_logp, k_full, rt, row_run, weights, delta_slope, slope=True, value=value)


def _kl_loss(logp: Tensor, logp_old: Tensor, ref_logp: Tensor, k_full: Tensor | Callable[[], Tensor],
             rt: RunTensors, row_run: Tensor | None, weights: tuple[Weights, Weights] | None,
             delta_slope: Tensor | None, slope: bool, value: bool = True
             ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    def estimate(w: Weights, old: Tensor | None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if slope:
            return weighted_estimate_and_slope(logp, ref_logp, w, k_full, old, delta_slope=delta_slope, value=value)
        return weighted_estimate(logp, ref_logp, w, k_full, old), None, None

    if weights is None:
        weights = (estimator_weights(rt.coef("loss"), logp, row_run),
                   estimator_weights(rt.coef("loss_is"), logp, row_run))
    plain, is_weighted = weights
    parts = [estimate(plain, None)]
    if any(w is not None for w in is_weighted):
        parts.append(estimate(is_weighted, logp_old))

    def total(xs: list[Tensor | None]) -> Tensor | None:
        xs = [x for x in xs if x is not None]
        return None if not xs else xs[0] if len(xs) == 1 else xs[0] + xs[1]

    return total([p[0] for p in parts]), total([p[1] for p in parts]), total([p[2] for p in parts])


class Clamp:
    """Optional clamp of log-ratios with a per-run count of clamped values (docs/theory.md "Clamps")."""

    def __init__(self, limit: float | None, n_runs: int, device: torch.device):
        self.limit = limit
        self.count = torch.zeros(n_runs, dtype=torch.long, device=device)

    def __call__(self, logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None,
                 row_run: Tensor | None = None) -> Tensor:
        """``ref_logp`` adjusted so that ``logp − ref_logp`` lies in [−limit, limit].

        ``mask`` (bool, same shape) says which entries are samples; or, for tables, integer sample counts
        per entry, so a clamped table entry counts once per sample that uses it. Inputs are ``[R, ...]``,
        or action-major row tables ``[A, M]`` with ``row_run [M]`` naming each row's run.
        """
        if self.limit is None:
            return ref_logp
        delta = logp - ref_logp
        hit = delta.detach().abs() > self.limit
        if mask is not None:
            hit = hit & mask if mask.dtype == torch.bool else hit * mask
        if row_run is None:
            self.count += hit.reshape(hit.shape[0], -1).sum(-1).to(self.count.dtype)
        else:
            self.count.index_add_(0, row_run, hit.sum(0).to(self.count.dtype))
        return logp - delta.clamp(-self.limit, self.limit)

    def slope(self, logp: Tensor, ref_logp: Tensor) -> Tensor | None:
        """``∂δ/∂logp`` of the clamped log-ratio ``δ = logp − clamped ref``: 1 where ``|logp − ref_logp|`` is
        within the limit (bounds included, as autograd's clamp), 0 where clamped; ``None`` without a clamp."""
        if self.limit is None:
            return None
        return ((logp - ref_logp).abs() <= self.limit).to(logp.dtype)
