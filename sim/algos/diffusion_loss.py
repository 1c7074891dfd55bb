"""The diffusion trainer's PPO loss for ``train.policy: tabular`` with its gradient written out by hand.

Autograd over the loss of :meth:`sim.algos.diffusion.DiffusionTrainer._ppo_loss` spends most of an epoch
gathering each sample's step parameters, scattering their gradients back and recording the graph. Here the
same loss is evaluated on samples viewed ``[R, N, T]`` (run, episode, step index; d = 1), where a run's step
parameters ``[R, 1, T]`` broadcast without a gather, and its gradient is the chain of exactly the elementwise
operations autograd runs for that graph (PyTorch's derivative formulas: ``minimum`` splits a tie's gradient in
halves, ``clamp`` passes it inside the bounds, ``x²`` gives ``g·(2x)``, ``expm1`` gives ``g·(e + 1)``, ``where``
gives 0 outside its mask). The per-sample gradients are summed into each run's step parameters episode after
episode from zero (``index_add_`` along the episode axis), in the order autograd's ``scatter_add`` sums them.
Each run uses one KL estimator, so a sampled estimator is evaluated on the runs that use it only (contiguous
ranges of runs; elsewhere its term and its share of the gradient are exactly +0, as ``where`` makes them), and
terms are added to zeros wherever the trainer's sum adds zeros to them (which turns a −0 into +0). The clipped
surrogate's branches are picked by 0/1 float masks (:func:`_surrogate_grad`), which can only turn a +0 into a
−0 (absorbed by the sums from +0) or a masked non-finite value into NaN (in a run whose gradient is non-finite
either way). So the loss, the diagnostics and the gradients are bitwise those of autograd.

It applies when every run of the batch has a tabular correction in d = 1, full-batch epochs
(``train.minibatches = 1``), no log-ratio clamp and no importance-weighted KL (:func:`applies`); otherwise the
trainer keeps autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sim.config import PLACEMENTS
from sim.engine.kl import estimator_weights
from sim.engine.loop import FINITE
from sim.engine.placement import Clamp, RunTensors
from sim.engine.ppo import clipped_fraction, ppo_diagnostics

Ranges = list[tuple[int, int]]
"""Runs ``[start, end)`` in contiguous ranges."""


def applies(policy: str, dim: int, minibatches: int, clamp: Clamp, rt: RunTensors) -> bool:
    """Whether :func:`loss_and_grads` gives this batch's loss and gradients (see the module docstring)."""
    is_weighted = rt.is_correction & (rt.placement == PLACEMENTS.index("loss"))
    return policy == "tabular" and dim == 1 and minibatches == 1 and not clamp.active and not bool(is_weighted.any())


def step_constants(step: Tensor, valid: Tensor, step_var: Tensor, T: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """What is the same in every update: the step variance ``var``, ``2σ²`` (``var2``) and log-normaliser
    ``½·log 2πσ²`` (``log_norm``) of every sample ``[R, N, T]``, computed from the step indices ``step
    [R, N·T]`` as :meth:`envs.diffusion_chain.DiffusionChainCore.log_prob` and ``step_kl`` compute them; the
    samples' ``valid`` mask ``[R, N·T]`` and their count per run ``[R]``."""
    R, n = step.shape
    var = step_var[T - step].to(dtype)  # [R, N·T]
    shape = (R, n // T, T)
    return {"var": var.view(shape), "var2": (2.0 * var).view(shape),
            "log_norm": (0.5 * 1 * torch.log(2 * math.pi * var)).view(shape), "valid": valid,
            "count": valid.to(dtype).sum(1).clamp(min=1.0)}


def prepare(flat: dict[str, Tensor], consts: dict[str, Tensor], rt: RunTensors) -> dict[str, Tensor | list]:
    """What every epoch of an update reuses: the samples of ``flat`` (``[R, N·T(, 1)]``, episode-major as the
    trainer flattens them) viewed ``[R, N, T]``, the :func:`step_constants`, and the loss placement's KL
    terms: ``(j, weight [R, 1, 1], runs using it or None for all)`` for each estimator j some run uses."""
    R, N, T = consts["var"].shape
    prep: dict[str, Tensor | list] = {
        k: flat[k].reshape(R, N, T) for k in ("x", "a", "base", "logp", "ref_logp", "adv")}
    terms = kl_terms(rt.coef("loss"), prep["logp"])
    prep.update(consts, terms=terms)
    if terms and terms[-1][0] == 3:
        prep["mu_ref"] = flat["mu_ref"].reshape(R, N, T)
    return prep


def _ranges(on: list[bool]) -> Ranges:
    """The contiguous ranges of runs where ``on`` is true."""
    out: Ranges = []
    for r, v in enumerate(on):
        if v:
            if out and out[-1][1] == r:
                out[-1] = (out[-1][0], r + 1)
            else:
                out.append((r, r + 1))
    return out


def loss_and_grads(prep: dict, bias: Tensor, gain: Tensor, alive: Tensor, clip: float, lo: float, hi: float,
                   want_diag: bool, out: tuple[Tensor, Tensor] | None = None, want_loss: bool = True
                   ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
    """Per-run loss ``[R]`` (``None`` unless ``want_loss`` or ``want_diag``: the gradients do not need it),
    diagnostics (if ``want_diag``) and the gradients of ``Σ_r alive_r·loss_r`` with respect to ``bias`` and
    ``gain`` ``[R, T, 1]``, bitwise those autograd gives for the trainer's loss (written into ``out``, e.g.
    the optimizer's gradient buffers, if given), with under :data:`sim.engine.loop.FINITE` whether each run's
    are all finite.

    Every operation is the trainer's (or autograd's) on the same operands, run in place on a tensor of its
    own where it can be; a gradient that is the same for every sample of a run (the loss is a per-run mean
    over samples that are all valid) is computed once per run ``[R, 1, 1]`` and broadcast.
    """
    x, a, base, logp_old, adv, var = prep["x"], prep["a"], prep["base"], prep["logp"], prep["adv"], prep["var"]
    R, N, T = x.shape
    b, g = bias.detach()[..., 0].unsqueeze(1), gain.detach()[..., 0].unsqueeze(1)  # [R, 1, T]
    # -- forward (the trainer's graph, op for op) ------------------------------------------------------------
    mu = (g * x).add_(b).add_(base)  # base + (bias + gain·x)
    diff = a - mu
    # log π: −½·(a − μ)²/σ² − ½·log 2πσ² (a sum over d = 1 non-negative number is that number)
    lp = diff.square().mul_(-0.5).div_(var).sub_(prep["log_norm"])
    ratio = (lp - logp_old).exp_()
    pa, pb = ratio * adv, ratio.clamp(lo, hi).mul_(adv)
    want_loss = want_loss or want_diag
    kl, parts, full = _kl_forward(lp, prep["ref_logp"], mu, prep, want_loss)
    loss, diag = None, {}
    if want_loss:
        pg = torch.minimum(pa, pb).neg_()
        total = pg + kl
        loss = total.view(R, N * T).sum(1) / prep["count"]  # masked_mean over all-valid samples (x·1 = x)
    if want_diag:
        clipped = clipped_fraction(ratio, clip, lo, hi)
        diag = ppo_diagnostics(*(v.view(R, N * T) for v in (pg, kl, clipped, logp_old - lp)), prep["valid"])
    # -- backward ----------------------------------------------------------------------------------------------
    g_run = (alive.to(lp.dtype) / prep["count"]).view(R, 1, 1)  # ∂loss/∂(pg + kl) of every sample
    g_lp = _surrogate_grad(-g_run, pa, pb, ratio, adv, lo, hi)
    if parts:  # autograd's Σ_j where(on_j, ∂k_j, 0): each run's own term, added to zeros if there are several
        g_delta = None if len(parts) == 1 and parts[0][1] is None else torch.zeros_like(g_lp)
        for j, ranges, w, dj, e in parts:
            for (s, t), dj_r, e_r in zip(ranges or [(0, R)], dj, e or dj, strict=True):
                g_k = g_run[s:t] * w[s:t]  # [n, 1, 1]
                if j == 0:
                    g_dj = g_k
                elif j == 1:
                    g_dj = (g_k * 0.5) * (2 * dj_r)
                else:
                    g_dj = (g_k * e_r.add_(1)).neg_().add_(g_k)
                if g_delta is None:
                    g_lp.add_(g_dj)
                elif len(parts) == 1:
                    g_delta[s:t].copy_(g_dj)
                else:
                    g_delta[s:t].add_(g_dj)
        if g_delta is not None:
            g_lp.add_(g_delta)
    g_mu = g_lp.div_(var).mul_(-0.5).mul_(diff.mul_(2)).neg_()
    if full is not None:  # every run: where(on, g, 0)·w/2σ²·2(μ − μ_ref) is 0·… (NaN where μ − μ_ref is not finite)
        _, w, ranges = prep["terms"][-1]
        g_term = g_run if ranges is None else _keep(g_run, ranges)
        g_mu.add_(((g_term * w) / prep["var2"]).mul_(full.mul_(2)))
    gb, gg = out if out is not None else (None, None)
    grads = {"bias": _sum_episodes(g_mu, gb), "gain": _sum_episodes(g_mu.mul_(x), gg)}
    grads[FINITE] = _all_finite(grads["bias"], grads["gain"])
    return loss, diag, grads


def _all_finite(a: Tensor, b: Tensor) -> Tensor:
    """``[R]``: whether every entry of run r's rows of ``a`` and ``b`` ``[R, …]`` is finite (one sum per row
    in the common case, as :func:`sim.engine.loop.finite_per_run`; elementwise where a sum is not)."""
    R = a.shape[0]
    ok = torch.isfinite(a.reshape(R, -1).sum(-1) + b.reshape(R, -1).sum(-1))
    if bool(ok.all()):
        return ok
    return torch.isfinite(a.reshape(R, -1)).all(-1) & torch.isfinite(b.reshape(R, -1)).all(-1)


def _surrogate_grad(g_min: Tensor, pa: Tensor, pb: Tensor, ratio: Tensor, adv: Tensor, lo: float, hi: float
                    ) -> Tensor:
    """``∂(−min(ρ·A, clamp(ρ)·A))/∂log π`` ``[R, N, T]`` from the upstream gradient of the minimum ``g_min
    [R, 1, 1]``, as autograd's ``minimum``, ``clamp`` and ``exp`` backward give it: the minimum passes its
    gradient to the smaller side (half to each on a tie, all to both where a side is NaN), the clamp inside
    its bounds, and ``exp`` multiplies by ρ.

    The branches are selected by multiplying with 0/1 masks (comparisons written to float tensors, about
    ten times faster than boolean ``where``/``masked_fill``): a branch autograd sets to +0 is then ``±0``,
    and a masked non-finite value is NaN instead of 0. Neither changes a gradient: signed zeros vanish in the
    episode sums, which start from +0; and a masked value is non-finite only where the advantage is, where
    the other branch is non-finite too, so the run's gradient is non-finite either way (and is dropped).
    """
    half = torch.eq(pa, pb, out=torch.empty_like(pa)).mul_(-0.5).add_(1).mul_(g_min)  # where(pa == pb, g/2, g)
    g_ratio = torch.gt(pa, pb, out=torch.empty_like(pa)).neg_().add_(1).mul_(half).mul_(adv)  # 0 where pa > pb
    g_clip = torch.lt(pa, pb, out=torch.empty_like(pa)).neg_().add_(1).mul_(half).mul_(adv)  # 0 where pa < pb
    mask = half  # no longer needed: its buffer takes the clamp's masks, 0 outside [lo, hi]
    g_clip.mul_(torch.ge(ratio, lo, out=mask)).mul_(torch.le(ratio, hi, out=mask))
    return g_ratio.add_(g_clip).mul_(ratio)


def kl_terms(coef: Tensor, like: Tensor) -> list[tuple[int, Tensor, Ranges | None]]:
    """The estimators some run weights in ``coef [R, 4]`` (k1, k2, k3, full): ``(j, weight [R, 1, …], runs with
    a non-zero weight or None for all)``, the weights shaped to broadcast against ``like [R, …]``."""
    terms = []
    for j, w in enumerate(estimator_weights(coef, like)):
        if w is not None:
            on = (w.view(-1) != 0).tolist()
            terms.append((j, w, None if all(on) else _ranges(on)))
    return terms


def reward_penalty(logp: Tensor, ref_logp: Tensor, k_full: Tensor, rt: RunTensors) -> Tensor:
    """:func:`sim.engine.placement.kl_reward_penalty` of ``[R, N, T]`` samples (the same numbers), each
    estimator evaluated on the runs that use it only."""
    with torch.no_grad():
        return weighted_kl(logp, ref_logp, kl_terms(rt.coef("reward"), logp),
                           lambda s, t, w: w[s:t] * k_full[s:t])[0]


def _kl_forward(lp: Tensor, ref_logp: Tensor, mu: Tensor, prep: dict, want_value: bool = True
                ) -> tuple[Tensor | None, list, Tensor | None]:
    """The loss's KL term ``[R, N, T]`` (:func:`weighted_kl` with ``full`` from μ; ``None`` unless
    ``want_value``), its sampled ``parts`` and ``μ − μ_ref`` (every run) if ``full`` is used."""
    diff: list[Tensor] = []

    def full_term(s: int, t: int, w: Tensor) -> Tensor:
        if not diff:
            diff.append(mu - prep["mu_ref"])
        return diff[0][s:t].square().div_(prep["var2"][s:t]).mul_(w[s:t])  # w·‖μ − μ_ref‖²/2σ²

    if not want_value and prep["terms"] and prep["terms"][-1][0] == 3:
        diff.append(mu - prep["mu_ref"])
    kl, parts = weighted_kl(lp, ref_logp, prep["terms"], full_term, want_value)
    return kl, parts, diff[0] if diff else None


def weighted_kl(lp: Tensor, ref_logp: Tensor, terms: list, full_term: Callable[[int, int, Tensor], Tensor],
                want_value: bool = True) -> tuple[Tensor | None, list]:
    """:func:`sim.engine.kl.weighted_estimate` without importance weights, the same numbers: the KL term
    ``[R, N, T]`` and per used sampled estimator ``(j, ranges, weight, [δ_j], [e^{−δ_j} − 1] or None)`` on its
    runs' ranges. ``full_term(start, end, weight)`` is ``full``'s weighted term on runs ``[start, end)``.
    Without ``want_value`` only the parts are computed (what the gradients need) and the term is ``None``.

    The engine evaluates every estimator on every run with ``δ`` replaced by 0 (and ``full``'s term by 0)
    where the run does not use it, which gives exactly +0 there, and adds the terms in estimator order.
    """
    R = lp.shape[0]
    kl = None if len(terms) == 1 and terms[0][2] is None or not want_value else torch.zeros_like(lp)
    parts = []
    for j, w, ranges in terms:
        djs, es = [], []
        for s, t in ranges or [(0, R)]:
            if j == 3:
                if not want_value:
                    continue
                term = full_term(s, t, w)
            else:
                dj = lp[s:t] - ref_logp[s:t]
                djs.append(dj)
                if j == 2:
                    es.append(torch.expm1(-dj))
                if not want_value:
                    continue
                if j == 0:
                    k = dj
                elif j == 1:
                    k = dj.square().mul_(0.5)
                else:
                    k = es[-1] + dj
                term = w[s:t] * k
            if kl is None:
                kl = term
            elif len(terms) == 1:
                kl[s:t].copy_(term)
            else:
                kl[s:t].add_(term)
        if j < 3:
            parts.append((j, ranges, w, djs, es or None))
    if not want_value:
        return None, parts
    return (torch.zeros_like(lp) if kl is None else kl), parts


def _keep(v: Tensor, ranges: Ranges) -> Tensor:
    """``v [R, ...]`` with the runs outside ``ranges`` set to +0 (``where(on, v, 0)``)."""
    out = torch.zeros_like(v)
    for s, t in ranges:
        out[s:t] = v[s:t]
    return out


def _sum_episodes(v: Tensor, out: Tensor | None = None) -> Tensor:
    """``[R, N, T] → [R, T, 1]``: each entry's sum over episodes, left to right from zero (as ``scatter_add``),
    written into ``out [R, T, 1]`` if given."""
    R, N, T = v.shape
    acc = torch.zeros(1, R, T, dtype=v.dtype, device=v.device) if out is None else out.view(1, R, T).zero_()
    acc.index_add_(0, torch.zeros(N, dtype=torch.long, device=v.device), v.transpose(0, 1).contiguous())
    return acc.view(R, T, 1)
