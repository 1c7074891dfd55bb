"""PPO pieces as pure functions over batched tensors ``[R, N, T]`` (runs, episodes, steps).

Losses are per-run means over valid samples so that the total loss is a *sum* over runs and each run's
gradient is exactly what it would be if the run were trained alone.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-run mean ``[R]`` of ``x [R, ...]`` over entries where ``mask`` is true (0 if none)."""
    m = mask.to(x.dtype)
    dims = tuple(range(1, x.dim()))
    return (x * m).sum(dims) / m.sum(dims).clamp(min=1.0)


def gae(rewards: Tensor, values: Tensor, next_values: Tensor, done: Tensor, valid: Tensor,
        gamma: float, lam: float) -> Tensor:
    """Generalized advantage estimates ``[R, N, T]``.

    ``δ_t = r_t + γ·V(s_{t+1})·(1 − done_t) − V(s_t)``, ``A_t = δ_t + γλ·(1 − done_t)·A_{t+1}``; steps
    after the end of an episode (``valid`` false) get 0. With λ = 1 this is the reward-to-go minus
    ``V(s_t)``, so a KL penalty in a later step's reward reaches earlier actions.

    Each row ``[..., T]`` holds one episode from ``t = 0``: ``valid`` is a prefix and ``done`` is set at most
    at its last valid step (as the samplers write them). With ``γλ = 1`` the recursion is then a reverse
    cumulative sum of ``δ``, which is how it is computed.
    """
    not_done = (~done).to(rewards.dtype)
    delta = (rewards + gamma * next_values * not_done - values) * valid.to(rewards.dtype)
    if gamma * lam == 1.0:
        # A_t = Σ_{t' ≥ t} δ_t' within the episode, and δ is 0 after its end: a reverse cumulative sum
        return delta.flip(-1).cumsum(-1).flip(-1)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        last = delta[..., t] + gamma * lam * not_done[..., t] * last
        adv[..., t] = last
    return adv * valid.to(rewards.dtype)


def clipped_surrogate(logp: Tensor, logp_old: Tensor, adv: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped policy loss per sample and whether the ratio was clipped, both shaped like ``logp``."""
    ratio = torch.exp(logp - logp_old)
    loss = -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
    return loss, (ratio - 1.0).abs() > clip


def ppo_diagnostics(pg: Tensor, kl_term: Tensor, clipped: Tensor, log_ratio_old: Tensor, valid: Tensor
                 ) -> dict[str, Tensor]:
    """Per-run means of PPO diagnostics over valid samples (one fused reduction)."""
    stacked = torch.stack([pg, kl_term, clipped.to(pg.dtype), log_ratio_old], dim=-1).detach()
    m = masked_mean_last(stacked, valid)
    return {"pg_loss": m[:, 0], "kl_loss": m[:, 1], "clip_frac": m[:, 2], "approx_kl": m[:, 3]}


def masked_mean_last(x: Tensor, valid: Tensor) -> Tensor:
    """Per-run mean ``[R, C]`` of ``x [R, n, C]`` over samples where ``valid [R, n]``."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def resolve_baseline(baseline: str, horizon: int) -> str:
    """The baseline ``train.baseline`` means for an env of ``horizon`` steps: ``auto`` is the batch mean of
    one-step envs and a learned value otherwise."""
    if baseline == "auto":
        return "mean" if horizon == 1 else "value"
    return baseline


def normalize_per_run(adv: Tensor, valid: Tensor) -> Tensor:
    """Advantages standardized per run over valid entries."""
    mean = masked_mean(adv, valid)
    shape = (-1,) + (1,) * (adv.dim() - 1)
    var = masked_mean((adv - mean.view(shape)).square(), valid)
    return (adv - mean.view(shape)) / (var.sqrt().view(shape) + 1e-8) * valid.to(adv.dtype)
