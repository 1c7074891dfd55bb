"""The diffusion trainer's PPO loss for ``train.policy: tabular`` with its gradient written out by hand.

Autograd over the loss of :meth:`sim.algos.diffusion.DiffusionTrainer._ppo_loss` spends most of an epoch
gathering each sample's step parameters, scattering their gradients back and recording the graph. Here the
same loss is evaluated on samples laid out ``[N, R, T]`` (episode, run, step index; d = 1), where a run's step
parameters ``[R, T]`` broadcast without a gather, and its gradient is the chain of exactly the elementwise
operations autograd runs for that graph (PyTorch's derivative formulas: ``minimum`` splits a tie's gradient in
halves, ``clamp`` passes it inside the bounds, ``x²`` gives ``g·(2x)``, ``expm1`` gives ``g·(e + 1)``, ``where``
gives 0 outside its mask). The per-sample gradients are summed into each run's step parameters episode after
episode from zero (``index_add_`` along the episode axis), in the order autograd's ``scatter_add`` sums them.
So the loss, the diagnostics and the gradients are bitwise those of autograd.

It applies when every run of the batch has a tabular correction in d = 1, full-batch epochs
(``train.minibatches = 1``), no log-ratio clamp and no importance-weighted KL (:func:`applies`); otherwise the
trainer keeps autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sim.engine.kl import estimator_weights
from sim.engine.placement import Clamp, RunTensors
from sim.engine.ppo import clipped_fraction, ppo_diagnostics


def applies(policy: str, dim: int, minibatches: int, clamp: Clamp, rt: RunTensors) -> bool:
    """Whether :func:`loss_and_grads` gives this batch's loss and gradients (see the module docstring)."""
    return (policy == "tabular" and dim == 1 and minibatches == 1 and not clamp.active
            and not bool((rt.coef("loss_is") != 0).any()))


def prepare(flat: dict[str, Tensor], step_var: Tensor, T: int, dtype: torch.dtype, rt: RunTensors
            ) -> dict[str, Tensor | list]:
    """What every epoch of an update reuses: the samples of ``flat`` (``[R, N·T(, 1)]``, episode-major as the
    trainer flattens them) laid out ``[N, R, T]``, the step variances and log-normalisers ``[N, R, T]``
    computed as :meth:`envs.diffusion_chain.DiffusionChainCore.log_prob` computes them, and the loss
    placement's estimator weights ``[R, 1]`` with where they are non-zero (``None``: everywhere)."""
    R, n = flat["logp"].shape
    N = n // T

    def nrt(v: Tensor) -> Tensor:
        return v.reshape(R, N, T).transpose(0, 1).contiguous()

    var = step_var[T - flat["step"]].to(dtype)  # [R, N·T]
    weights = estimator_weights(rt.coef("loss"), flat["logp"])
    off = [None if w is None or bool((w != 0).all()) else torch.nonzero(w.view(-1) == 0).view(-1) for w in weights]
    prep: dict[str, Tensor | list] = {
        k: nrt(flat[k]) for k in ("x", "a", "base", "logp", "ref_logp", "adv")}
    valid = flat["valid"]
    prep.update(var=nrt(var), log_norm=nrt(0.5 * 1 * torch.log(2 * math.pi * var)), valid=valid,
                count=valid.to(var.dtype).sum(1).clamp(min=1.0), weights=weights, off=off)
    if weights[3] is not None:
        prep["mu_ref"] = nrt(flat["mu_ref"])
        prep["var2"] = nrt(2.0 * var)
    return prep


def loss_and_grads(prep: dict, bias: Tensor, gain: Tensor, alive: Tensor, clip: float, lo: float, hi: float,
                   want_diag: bool) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Per-run loss ``[R]``, diagnostics (if ``want_diag``) and the gradients of ``Σ_r alive_r·loss_r`` with
    respect to ``bias`` and ``gain`` ``[R, T, 1]``, bitwise those autograd gives for the trainer's loss.

    Every operation is the trainer's (or autograd's) on the same operands, run in place on a tensor of its
    own where it can be; a gradient that is the same for every sample of a run (the loss is a per-run mean
    over samples that are all valid) is computed once per run ``[R, 1]`` and broadcast; a ``where`` that keeps
    whole runs is an ``index_fill_`` of the others with +0.
    """
    x, a, base, logp_old, adv = prep["x"], prep["a"], prep["base"], prep["logp"], prep["adv"]
    var, weights, off = prep["var"], prep["weights"], prep["off"]
    N, R, T = x.shape
    b, g = bias.detach()[..., 0], gain.detach()[..., 0]  # [R, T]: broadcast over episodes
    # -- forward (the trainer's graph, op for op) ------------------------------------------------------------
    mu = (g * x).add_(b).add_(base)  # base + (bias + gain·x)
    diff = a - mu
    # log π: −½·(a − μ)²/σ² − ½·log 2πσ² (a sum over d = 1 non-negative number is that number)
    lp = diff.square().mul_(-0.5).div_(var).sub_(prep["log_norm"])
    ratio = (lp - logp_old).exp_()
    pa, pb = ratio * adv, ratio.clamp(lo, hi).mul_(adv)
    pg = torch.minimum(pa, pb).neg_()
    kl, parts, full = _kl_forward(lp, prep["ref_logp"], mu, prep, weights, off)
    total = pg + kl
    loss = _rnt(total).sum(1) / prep["count"]  # masked_mean over all-valid samples (x·1 = x)
    diag = {}
    if want_diag:
        diag = ppo_diagnostics(_rnt(pg), _rnt(kl), _rnt(clipped_fraction(ratio, clip, lo, hi)),
                               _rnt(logp_old - lp), prep["valid"])
    # -- backward ----------------------------------------------------------------------------------------------
    g_run = (alive.to(total.dtype) / prep["count"])[:, None]  # [R, 1]: ∂loss/∂(pg + kl) of every sample
    g_min = -g_run
    half = torch.where(pa == pb, g_min / 2, g_min)
    g_ratio = half.masked_fill(pa > pb, 0).mul_(adv)
    in_bounds = (ratio >= lo).logical_and_(ratio <= hi)
    g_ratio.add_(torch.where(in_bounds, half.masked_fill_(pa < pb, 0).mul_(adv), 0))
    g_lp = g_ratio.mul_(ratio)
    for j, dj, e in parts:
        g_k = g_run * weights[j]  # [R, 1]
        if j == 0:
            g_dj = g_k.expand(N, R, T).clone()
        elif j == 1:
            g_dj = (g_k * 0.5) * (2 * dj)
        else:
            g_dj = (g_k * e.add_(1)).neg_().add_(g_k)
        if off[j] is not None:
            g_dj.index_fill_(1, off[j], 0.0)
        g_lp.add_(g_dj)
    g_mu = g_lp.div_(var).mul_(-0.5).mul_(diff.mul_(2)).neg_()
    if full is not None:
        g_term = g_run if off[3] is None else g_run.index_fill(0, off[3], 0.0)
        g_mu.add_(((g_term * weights[3]) / prep["var2"]).mul_(full.mul_(2)))
    grads = {"bias": _sum_episodes(g_mu), "gain": _sum_episodes(g_mu.mul_(x))}
    return loss, diag, grads


def _kl_forward(lp: Tensor, ref_logp: Tensor, mu: Tensor, prep: dict, weights: list, off: list
                ) -> tuple[Tensor, list[tuple[int, Tensor, Tensor | None]], Tensor | None]:
    """:func:`sim.engine.placement.kl_loss_term` without importance weights, op for op: the KL term, each
    used sampled estimator's ``(j, δ_j, e^{−δ_j} − 1 or None)`` and ``μ − μ_ref`` if ``full`` is used.
    ``where(mask, v, 0)`` of a per-run mask is ``v`` with the runs in ``off[j]`` filled with +0."""
    out: Tensor | None = None
    parts = []
    sampled = [j for j in range(3) if weights[j] is not None]
    for j in sampled:
        dj = lp - ref_logp
        if off[j] is not None:
            dj.index_fill_(1, off[j], 0.0)
        e = None
        if j == 0:
            k = dj
        elif j == 1:
            k = dj.square().mul_(0.5)
        else:
            e = torch.expm1(-dj)
            k = e + dj
        parts.append((j, dj, e))
        out = weights[j] * k if out is None else out.add_(weights[j] * k)
    full = None
    if weights[3] is not None:
        full = mu - prep["mu_ref"]
        term = full.square().div_(prep["var2"]).mul_(weights[3])
        if off[3] is not None:
            term.index_fill_(1, off[3], 0.0)
        out = term if out is None else out.add_(term)
    return (torch.zeros_like(lp) if out is None else out), parts, full


def _rnt(v: Tensor) -> Tensor:
    """``[N, R, T] → [R, N·T]`` (the trainer's episode-major sample order)."""
    N, R, T = v.shape
    return v.transpose(0, 1).reshape(R, N * T)


def _nrt(v: Tensor, N: int, T: int) -> Tensor:
    """``[R, N·T] → [N, R, T]``."""
    return v.view(v.shape[0], N, T).transpose(0, 1)


def _sum_episodes(v: Tensor) -> Tensor:
    """``[N, R, T] → [R, T, 1]``: each entry's sum over episodes, left to right from zero (as ``scatter_add``)."""
    N, R, T = v.shape
    out = torch.zeros(1, R, T, dtype=v.dtype, device=v.device)
    out.index_add_(0, torch.zeros(N, dtype=torch.long, device=v.device), v)
    return out.view(R, T, 1)
