"""PPO pieces as pure functions over batched tensors ``[R, N, T]`` (runs, episodes, steps).

Losses are per-run means over valid samples so that the total loss is a *sum* over runs and each run's
gradient is exactly what it would be if the run were trained alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sim.config import GROUP_ADVANTAGES


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
        # A_t = Σ_{t' ≥ t} δ_t' within the episode, and δ is 0 after its end: a reverse cumulative sum (with
        # one step, whose flips are copies, the cumulative sum alone)
        return delta.cumsum(-1) if delta.shape[-1] == 1 else delta.flip(-1).cumsum(-1).flip(-1)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        last = delta[..., t] + gamma * lam * not_done[..., t] * last
        adv[..., t] = last
    return adv * valid.to(rewards.dtype)


def clip_bounds(clip: float, clip_low: float | None, clip_high: float | None) -> tuple[float, float]:
    """The ratio's bounds ``(1 − ε_low, 1 + ε_high)``: ``train.clip_low`` / ``train.clip_high``, each ``clip``
    when unset (DAPO's clip-higher raises only the upper one)."""
    return 1.0 - (clip if clip_low is None else clip_low), 1.0 + (clip if clip_high is None else clip_high)


def clipped_fraction(ratio: Tensor, clip: float, lo: float, hi: float) -> Tensor:
    """Whether each ratio lies outside ``[lo, hi]`` (``|ρ − 1| > clip`` when the bounds are symmetric)."""
    if lo == 1.0 - clip and hi == 1.0 + clip:
        return (ratio - 1.0).abs() > clip
    return (ratio < lo) | (ratio > hi)


def clipped_surrogate(logp: Tensor, logp_old: Tensor, adv: Tensor, clip: float, lo: float | None = None,
                      hi: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO's clipped policy loss per sample and whether the ratio was clipped, both shaped like ``logp``
    (bounds ``[lo, hi]``, by default ``[1 − clip, 1 + clip]``)."""
    lo = 1.0 - clip if lo is None else lo
    hi = 1.0 + clip if hi is None else hi
    ratio = torch.exp(logp - logp_old)
    loss = -torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)
    return loss, clipped_fraction(ratio, clip, lo, hi)


def sum_steps(x: Tensor) -> Tensor:
    """``x [R, N, H] → [R, N]``: each episode's sum over its steps, left to right (the same order for every
    episode, whatever the batch)."""
    total = x[..., 0]
    for t in range(1, x.shape[-1]):
        total = total + x[..., t]
    return total


def aggregation_weights(valid: Tensor, mode: str, horizon: int, n_minibatches: int = 1
                        ) -> tuple[Tensor | None, Tensor | None]:
    """How per-step losses of a batch ``valid [R, N, H]`` become one loss per run (``train.loss_agg``):
    ``Σ_i u_i·loss_i / D`` over a (mini)batch's samples, with per-sample weights ``u [R, N, H]`` and a per-run
    divisor ``D [R]``.

    - ``token-mean``: u = 1, D = the (mini)batch's valid steps (``None, None``: the caller counts them);
    - ``seq-mean-token-sum``: u = 1, D = episodes;
    - ``seq-mean-token-mean``: u = 1/|episode|, D = episodes (GRPO's per-sequence mean);
    - ``seq-mean-token-sum-norm``: u = 1, D = episodes × ``horizon`` (Dr. GRPO's constant normaliser).

    The episode count is split evenly over ``n_minibatches`` (samples, not episodes, are shuffled into
    minibatches), so the minibatches' losses add up to the batch's.
    """
    if mode == "token-mean":
        return None, None
    R, N, H = valid.shape
    episodes = torch.full((R,), N / n_minibatches, dtype=torch.float64, device=valid.device)
    if mode == "seq-mean-token-sum":
        return None, episodes
    if mode == "seq-mean-token-sum-norm":
        return None, episodes * horizon
    if mode == "seq-mean-token-mean":
        length = sum_steps(valid.to(torch.float64)).clamp(min=1)  # [R, N]
        return valid.to(torch.float64) / length.unsqueeze(-1), episodes
    raise ValueError(f"unknown loss aggregation {mode!r}")


def run_masks(values: Sequence[str], device: torch.device | None = None) -> dict[str, Tensor]:
    """Each distinct value of a per-run setting (``values``: one per run) → the mask ``[R]`` of its runs, in the
    order the values first appear."""
    return {v: torch.tensor([x == v for x in values], device=device) for v in dict.fromkeys(values)}


def merge_runs(parts: dict[str, tuple[Tensor, dict[str, Tensor]]]) -> dict[str, Tensor]:
    """One dict of ``[R, ...]`` tensors from the results of several settings of a batch, ``{setting: (runs [R],
    {key: tensor})}``: each run's values are those of the setting its mask holds it in, bitwise; a key some
    settings lack is NaN at their runs (a metric those runs do not have)."""
    out: dict[str, Tensor] = {}
    for key in dict.fromkeys(k for _, part in parts.values() for k in part):
        for runs, part in parts.values():
            if key in part:
                x = part[key]
                mask = runs.view((-1,) + (1,) * (x.dim() - 1))
                out[key] = torch.where(mask, x, out[key] if key in out else torch.full_like(x, float("nan")))
    return out


def batch_aggregation(valid: Tensor, modes: Sequence[str], horizon: int, n_minibatches: int = 1
                      ) -> tuple[Tensor | None, Tensor | None]:
    """:func:`aggregation_weights` with a mode per run (``modes``, one per run of ``valid [R, N, H]``). With
    several modes, runs whose mode has no weights get weight 1 and runs whose divisor is the counted valid
    steps (``token-mean``) get NaN, which the loss reads as that count: either way each run's loss is its own."""
    masks = run_masks(modes, valid.device)
    if len(masks) == 1:
        return aggregation_weights(valid, modes[0], horizon, n_minibatches)
    parts = {m: aggregation_weights(valid, m, horizon, n_minibatches) for m in masks}
    fill = {"w": torch.ones_like(valid, dtype=torch.float64), "d": torch.full(
        (valid.shape[0],), float("nan"), dtype=torch.float64, device=valid.device)}
    merged = merge_runs({m: (masks[m], {k: fill[k] if x is None else x for k, x in zip("wd", wd, strict=True)})
                         for m, wd in parts.items()})
    w = merged["w"] if any(w is not None for w, _ in parts.values()) else None
    d = merged["d"] if any(d is not None for _, d in parts.values()) else None
    return w, d


def counted(divisor: Tensor, n_valid: Tensor) -> Tensor:
    """A per-run loss divisor from :func:`batch_aggregation` with NaN (count the valid steps) read as ``n_valid``."""
    return torch.where(torch.isnan(divisor), n_valid, divisor)


def group_advantages(scores: Tensor, group: int, kind: str, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Advantages of the group estimators from episode scores ``[R, N]`` (consecutive groups of ``group``
    episodes: G completions of one start state).

    ``grpo``: (s − mean_g)/(std_g + ε) with the group's sample std (Bessel-corrected, as verl and TRL);
    ``drgrpo``: s − mean_g; ``rloo``: s minus the mean of the other G − 1 members, G/(G−1)·(s − mean_g). Sums over
    a group run left to right, so a run's numbers do not depend on the batch. Returns the advantages ``[R, N]``
    and, per run ``[R]``, the fraction of groups whose scores are all equal (their advantages are 0).
    """
    R, N = scores.shape
    g = scores.view(R, N // group, group)
    total = g[..., 0]
    for j in range(1, group):
        total = total + g[..., j]
    mean = total / group
    centred = g - mean.unsqueeze(-1)
    same = (g == g[..., :1]).all(-1)  # identical scores: exactly zero advantage, whatever the rounding
    if kind == "grpo":
        sq = centred[..., 0].square()
        for j in range(1, group):
            sq = sq + centred[..., j].square()
        std = (sq / (group - 1)).sqrt()
        adv = centred / (std.unsqueeze(-1) + eps)
    elif kind == "drgrpo":
        adv = centred
    elif kind == "rloo":
        adv = centred * (group / (group - 1))
    else:
        raise ValueError(f"unknown group advantage {kind!r}")
    adv = torch.where(same.unsqueeze(-1), torch.zeros_like(adv), adv)
    return adv.reshape(R, N), same.to(torch.float64).mean(-1)


def advantages(kind: str, shaped: Tensor, valid: Tensor, done: Tensor, group: int, gamma: float, lam: float,
               baseline: str, values: Callable[[], Tensor] | None = None) -> dict[str, Tensor]:
    """``adv`` and ``ret`` ``[R, N, H]`` of the estimator ``kind`` (``train.advantage``) from the shaped rewards
    ``shaped`` (zero at invalid steps; ``valid`` as a float mask), and for the group estimators ``zero_adv_frac
    [R]``. ``gae`` subtracts ``baseline``: ``value`` (``values()``: the state values ``[R, N, H]``), ``mean`` (the
    batch mean per run and step) or ``none``."""
    extra: dict[str, Tensor] = {}
    if kind in GROUP_ADVANTAGES:  # the episode's score against its group, on every step
        adv, extra["zero_adv_frac"] = group_advantages(sum_steps(shaped), group, kind)
        adv = adv.unsqueeze(-1) * valid
        ret = torch.zeros_like(adv)  # no value function
    elif kind == "reinforce_pp":  # reward-to-go, normalised over the run's batch (REINFORCE++)
        ret = gae(shaped, torch.zeros_like(shaped), torch.zeros_like(shaped), done, valid, gamma, 1.0)
        adv = normalize_per_run(ret, valid)
    elif baseline == "value":
        assert values is not None
        with torch.no_grad():
            v = values()
        v = v * valid
        next_v = torch.cat([v[..., 1:], torch.zeros_like(v[..., :1])], dim=-1)
        adv = gae(shaped, v, next_v, done, valid, gamma, lam)
        ret = adv + v
    else:
        ret = gae(shaped, torch.zeros_like(shaped), torch.zeros_like(shaped), done, valid, gamma, 1.0)
        adv = ret
        if baseline == "mean":
            # Batch-mean baseline per run and step (one-step envs: the mean shaped reward).
            mean = (ret * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
            adv = (ret - mean) * valid
    return {"adv": adv, "ret": ret, **extra}


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
