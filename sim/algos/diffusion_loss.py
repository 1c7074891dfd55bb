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
from sim.engine.ppo import clipped_fraction, masked_mean, ppo_diagnostics


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
    masks = [None if w is None or bool((w != 0).all()) else w != 0 for w in weights]
    prep: dict[str, Tensor | list] = {
        k: nrt(flat[k]) for k in ("x", "a", "base", "logp", "ref_logp", "adv")}
    prep.update(var=nrt(var), log_norm=nrt(0.5 * 1 * torch.log(2 * math.pi * var)), valid=flat["valid"],
                weights=weights, masks=masks)
    if weights[3] is not None:
        prep["mu_ref"] = nrt(flat["mu_ref"])
        prep["var2"] = nrt(2.0 * var)
    return prep


def loss_and_grads(prep: dict, bias: Tensor, gain: Tensor, alive: Tensor, clip: float, lo: float, hi: float,
                   want_diag: bool) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Per-run loss ``[R]``, diagnostics (if ``want_diag``) and the gradients of ``Σ_r alive_r·loss_r`` with
    respect to ``bias`` and ``gain`` ``[R, T, 1]``, bitwise those autograd gives for the trainer's loss."""
    x, a, base, logp_old, adv = prep["x"], prep["a"], prep["base"], prep["logp"], prep["adv"]
    var, weights, masks = prep["var"], prep["weights"], prep["masks"]
    N, R, T = x.shape
    b, g = bias.detach()[..., 0], gain.detach()[..., 0]  # [R, T]: broadcast over episodes
    # -- forward (the trainer's graph, op for op) ------------------------------------------------------------
    mu = base + (b + g * x)
    diff = a - mu
    lp = -0.5 * diff.square() / var - prep["log_norm"]  # a sum over d = 1 non-negative number is that number
    ratio = torch.exp(lp - logp_old)
    clipped_ratio = ratio.clamp(lo, hi)
    pa, pb = ratio * adv, clipped_ratio * adv
    pg = -torch.minimum(pa, pb)
    kl, parts, full = _kl_forward(lp, prep["ref_logp"], mu, prep, weights, masks)
    total = pg + kl
    valid = prep["valid"]
    loss = masked_mean(_rnt(total), valid)
    diag = {}
    if want_diag:
        diag = ppo_diagnostics(_rnt(pg), _rnt(kl), _rnt(clipped_fraction(ratio, clip, lo, hi)),
                               _rnt(logp_old - lp), valid)
    # -- backward ----------------------------------------------------------------------------------------------
    m = valid.to(total.dtype)
    g_total = ((alive.to(total.dtype) / m.sum(1).clamp(min=1.0))[:, None] * m)  # [R, N·T]
    g_total = _nrt(g_total, N, T)
    g_min = -g_total
    half = torch.where(pa == pb, g_min / 2, g_min)
    g_ratio = half.masked_fill(pa > pb, 0) * adv
    g_ratio = g_ratio + torch.where((ratio >= lo) & (ratio <= hi), half.masked_fill(pa < pb, 0) * adv, 0)
    g_lp = g_ratio * ratio
    g_mu = None
    if parts:
        g_delta = None
        for j, dj, e in parts:
            g_k = g_total * weights[j]
            if j == 0:
                g_dj = g_k
            elif j == 1:
                g_dj = (g_k * 0.5) * (2 * dj)
            else:
                g_dj = g_k + -(g_k * (e + 1))
            if masks[j] is not None:
                g_dj = torch.where(masks[j], g_dj, 0)
            g_delta = g_dj if g_delta is None else g_delta + g_dj
        g_lp = g_lp + g_delta
    if full is not None:
        g_term = g_total if masks[3] is None else torch.where(masks[3], g_total, 0)
        g_mu = ((g_term * weights[3]) / prep["var2"]) * (2 * full)
    g_mu_lp = -(((g_lp / var) * -0.5) * (2 * diff))
    g_mu = g_mu_lp if g_mu is None else g_mu_lp + g_mu
    grads = {"bias": _sum_episodes(g_mu), "gain": _sum_episodes(g_mu * x)}
    return loss, diag, grads


def _kl_forward(lp: Tensor, ref_logp: Tensor, mu: Tensor, prep: dict, weights: list, masks: list
                ) -> tuple[Tensor, list[tuple[int, Tensor, Tensor | None]], Tensor | None]:
    """:func:`sim.engine.placement.kl_loss_term` without importance weights, op for op: the KL term, each
    used sampled estimator's ``(j, δ_j, e^{−δ_j} − 1 or None)`` and ``μ − μ_ref`` if ``full`` is used."""
    out: Tensor | None = None
    parts = []
    sampled = [j for j in range(3) if weights[j] is not None]
    delta = lp - ref_logp if sampled else None
    for j in sampled:
        dj = delta if masks[j] is None else torch.where(masks[j], delta, 0.0)
        e = None
        if j == 0:
            k = dj
        elif j == 1:
            k = 0.5 * dj.square()
        else:
            e = torch.expm1(-dj)
            k = e + dj
        parts.append((j, dj, e))
        out = weights[j] * k if out is None else out + weights[j] * k
    full = None
    if weights[3] is not None:
        full = mu - prep["mu_ref"]
        kf = full.square() / prep["var2"]
        term = weights[3] * kf if masks[3] is None else torch.where(masks[3], weights[3] * kf, 0.0)
        out = term if out is None else out + term
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
