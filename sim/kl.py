"""KL estimators and placements as small pure functions (THEORY.md "Notation" and "The two placements").

Two independent axes: the *estimator* (``k1 | k2 | k3 | full``) says what per-sample number stands for the
KL; the *placement* (``none | reward | loss``) says where it enters PPO. Everything is in log space:
``delta = log π(a) − log π_ref(a)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

PLACEMENTS = ("none", "reward", "loss")
ESTIMATORS = ("k1", "k2", "k3", "full")
SAMPLED_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-sample estimate of KL(π‖π_ref) from log-probabilities of the *sampled* actions.

    ``k1 = δ``, ``k2 = ½δ²``, ``k3 = e^{−δ} − 1 + δ`` with ``δ = logp − ref_logp``; shapes broadcast.
    ``k3`` is written with ``expm1`` so it stays accurate (and ≥ 0) for small ``δ``.
    """
    return _from_delta(logp - ref_logp, kind)


def _from_delta(delta: Tensor, kind: str) -> Tensor:
    if kind == "k1":
        return delta
    if kind == "k2":
        return 0.5 * delta.square()
    if kind == "k3":
        return torch.expm1(-delta) + delta
    raise ValueError(f"kl.estimator must be one of {SAMPLED_ESTIMATORS} here, got {kind!r}")


def all_estimates(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``[..., 3]``: k1, k2, k3 stacked on a new last axis."""
    return torch.stack([kl_estimate(logp, ref_logp, k) for k in SAMPLED_ESTIMATORS], dim=-1)


def full_kl(logp_all: Tensor, ref_logp_all: Tensor, dim: int = -1) -> Tensor:
    """Exact per-state KL(π‖π_ref) from full log-probability rows: the action axis ``dim`` is summed out
    (``[..., A] → [...]`` by default; ``dim=0`` for action-major tables ``[A, M] → [M]``)."""
    pi = logp_all.exp()
    return (pi * (logp_all - ref_logp_all)).sum(dim)


def weighted_estimate(logp: Tensor, ref_logp: Tensor, coef: Tensor, k_full: Tensor | Callable[[], Tensor] | None,
                      logp_old: Tensor | None = None, run_index: Tensor | None = None) -> Tensor:
    """``Σ_j coef[r, j]·k_j`` per sample: each run's own estimator, scaled (by β and its placement mask).

    Only estimators with a non-zero coefficient in some run (with ``run_index``: some indexed run) are
    computed, so a batch mixing runs of every placement × estimator costs little more than one estimator.

    Args:
        logp: ``[R, ...]`` log π of the sampled actions (carrying gradient in the loss); with
            ``run_index``, any shape whose last axis is indexed by it (e.g. action-major rows ``[A, M]``).
        ref_logp: log π_ref of the same actions, shaped like ``logp``.
        coef: ``[R, 4]`` weights of (k1, k2, k3, full) per run.
        k_full: exact per-state KL (broadcasting against ``logp``), or a callable computing it (only called
            if used).
        logp_old: if given, the importance-weighted loss forms for samples from π_old (THEORY.md
            "Off-policy"): ``w·k1``, ``sg(w)·k2``, ``w·k3`` with ``w = π_θ/π_old`` carrying gradient.
        run_index: ``[M]`` the run of each index of ``logp``'s last axis; without it the runs are ``logp``'s
            leading axis.
    Returns:
        shaped like ``logp``.
    """
    used = (coef != 0).any(0).tolist()
    c = coef.to(logp.dtype).t().contiguous()  # [4, R]: each estimator's weights contiguous
    weights: list[Tensor | None] = [None] * 4
    for j in range(4):
        if used[j]:
            if run_index is None:
                weights[j] = c[j].view((-1,) + (1,) * (logp.dim() - 1))
            else:  # only estimators that some indexed run uses (e.g. a block of rows)
                weights[j] = c[j].index_select(0, run_index)
                used[j] = bool((weights[j] != 0).any())

    w = torch.exp(logp - logp_old) if logp_old is not None and any(used[:3]) else None
    delta = logp - ref_logp if any(used[:3]) else None
    out: Tensor | None = None
    for j, kind in enumerate(SAMPLED_ESTIMATORS):
        if used[j]:
            k = _from_delta(delta, kind)
            if w is not None:  # k2's weight carries no gradient (THEORY.md "Off-policy")
                k = (w.detach() if kind == "k2" else w) * k
            out = weights[j] * k if out is None else out + weights[j] * k
    if used[3]:
        kf = k_full() if callable(k_full) else k_full
        out = weights[3] * kf if out is None else out + weights[3] * kf
    if out is None:
        return torch.zeros_like(logp)
    return out if out.shape == logp.shape else out.expand_as(logp).clone()
