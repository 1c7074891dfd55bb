"""Expected-gradient losses by enumeration on tabular MDPs (``train.mode: exact``).

:func:`exact_loss` is a per-run loss whose gradient is the *expected* gradient of the sampled PPO loss on its
first epoch, for every placement × estimator: the same combination without sampling noise, PPO epochs or
clipping, so its fixed points are those of docs/theory.md "Each placement × estimator".
"""

from __future__ import annotations

import torch
from torch import Tensor

from envs import tabular
from sim.engine.kl import full_kl
from sim.engine.placement import RunTensors, kl_loss_term, kl_reward_penalty


def exact_loss(mdp: tabular.TabularMDP, logp: Tensor, ref_logp: Tensor, rt: RunTensors, ent_coef: float = 0.0,
               advantage: str = "gae", group: int = 1, behaviour: Tensor | None = None,
               reward_learner: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-run loss ``[R]`` whose gradient is the *expected* gradient of the sampled PPO loss (first epoch).

    With ``d`` the policy's state occupancy and ``L = Σ_s d(s)`` the expected episode length (sampled
    losses are means over timesteps):

    - KL in the reward: Q of the shaped reward ``r − β·k(s, a)`` (k from the current policy, detached) by
      exact policy evaluation; the surrogate ``Σ_s d(s) Σ_a π(a|s)·sg(Q(s, a) − V(s)) / L``.
    - KL in the loss: ``β·Σ_s d(s) Σ_a sg(π(a|s))·k(s, a) / L`` with gradient through ``log π`` in ``k``
      (samples fixed); ``full``: ``β·Σ_s d(s)·KL_s(π‖π_ref) / L`` with gradient through everything.

    The advantage estimator (``train.advantage``, groups of ``group`` episodes) changes the first term:
    ``gae`` and ``rloo`` are unbiased (the true value baseline and the leave-one-out mean: the surrogate above);
    ``drgrpo``'s group mean includes the sample itself, which scales it by (G − 1)/G (a loss-placed KL is not
    scaled); ``grpo`` divides by the group's std, whose expectation is enumerated over the group's
    compositions (one-state one-step envs: :func:`grpo_weights`).

    Stale samples (``behaviour``: the sampler's log-probabilities ``μ [R, S, A]``, detached): the states and
    actions come from μ and the ratio π/μ reweighs them, so the surrogate is ``Σ_s d_μ(s) Σ_a π(a|s)·sg(A^μ(s, a))``
    with μ's occupancy and advantages, a loss-placed KL ``Σ_s d_μ(s) Σ_a μ(a|s)·k(s, a)`` (its IS form uses π/μ),
    and a reward-placed KL computed from μ, or from π for the runs with ``reward_learner [R]``.

    Args:
        logp: ``[R, S, A]`` policy log-probabilities (carrying gradient). ref_logp: ``[R, S, A]``.
    Returns:
        ``(loss [R], diagnostics)``.
    """
    lp_d = logp.detach()
    mu = lp_d if behaviour is None else behaviour.to(lp_d.dtype)
    with torch.no_grad():
        occ = tabular.state_occupancy(mdp, mu)
        w = occ / occ.sum(-1, keepdim=True).clamp(min=1e-12)  # [R, S]
        pen_logp = mu
        if reward_learner is not None and behaviour is not None and bool(reward_learner.any()):
            pen_logp = torch.where(reward_learner.view(-1, 1, 1), lp_d, mu)
        penalty = kl_reward_penalty(pen_logp, ref_logp, full_kl(pen_logp, ref_logp)[..., None], rt)
        v, q = tabular.policy_evaluation(mdp, mu, extra_reward=-penalty)
        adv = q - v.unsqueeze(-1)
    if advantage == "grpo":
        with torch.no_grad():
            weights = grpo_weights(q[:, 0], mu[:, 0], group)  # one step: Q is the shaped reward  [R, A]
        if behaviour is None:
            surrogate = (weights * logp[:, 0]).sum(-1)
        else:  # E_μ[ρ·A·∇log π] = Σ_a (W_a/μ_a)·∇π_a
            surrogate = ((weights / mu[:, 0].exp()) * logp[:, 0].exp()).sum(-1)
    else:
        surrogate = (w * (logp.exp() * adv).sum(-1)).sum(-1)
        if advantage == "drgrpo":
            surrogate = surrogate * ((group - 1) / group)
    # E_{a ~ sg(μ)} of the per-sample loss (on-policy μ = π): its gradient flows only through k.
    k_live = kl_loss_term(logp, mu, ref_logp, full_kl(logp, ref_logp)[..., None], rt)
    kl_term = (w * (mu.exp() * k_live).sum(-1)).sum(-1)
    entropy = (w * tabular.entropy_per_state(logp)).sum(-1)
    loss = -surrogate + kl_term - ent_coef * entropy
    diag = {"pg_loss": -surrogate.detach(), "kl_loss": kl_term.detach(), "entropy_loss": entropy.detach()}
    return loss, diag


def grpo_weights(scores: Tensor, logp: Tensor, group: int, eps: float = 1e-6) -> Tensor:
    """``W [R, A]`` with ``Σ_a W_a ∇log π(a)`` the expected GRPO policy gradient of a one-step one-state env:
    ``E[(1/G) Σ_i (s_i − mean)/(std + ε) ∇log π(a_i)]`` over groups of ``group`` arms drawn from ``π = e^{logp}``
    (``logp [R, A]``), with arm scores ``scores [R, A]`` (the reward minus a reward-placed KL). The expectation
    runs over every composition of the group (counts per arm, multinomial probabilities); the std is the
    group's sample std, as in :func:`sim.engine.ppo.group_advantages`, and a group of one arm has advantage 0.
    """
    R, A = scores.shape
    comps = compositions(group, A).to(scores.device)  # [C, A]
    c = comps.to(scores.dtype)
    log_coef = torch.lgamma(torch.tensor(group + 1.0, dtype=scores.dtype)) - torch.lgamma(c + 1).sum(-1)  # [C]
    prob = torch.exp(log_coef + torch.where(c > 0, c * logp.unsqueeze(1), 0.0).sum(-1))  # [R, C]
    mean = (c * scores.unsqueeze(1)).sum(-1) / group  # [R, C]
    dev = scores.unsqueeze(1) - mean.unsqueeze(-1)  # [R, C, A]
    std = ((c * dev.square()).sum(-1) / (group - 1)).sqrt()
    adv = dev / (std.unsqueeze(-1) + eps)
    adv = torch.where(((comps > 0).sum(-1) > 1).view(1, -1, 1), adv, 0.0)
    return (prob.unsqueeze(-1) * c * adv).sum(1) / group


def compositions(total: int, parts: int) -> Tensor:
    """Every vector of ``parts`` non-negative integers summing to ``total``, ``[C, parts]`` int64
    (C = binom(total + parts − 1, parts − 1))."""
    if parts == 1:
        return torch.tensor([[total]], dtype=torch.long)
    rows = [torch.cat([torch.full((sub.shape[0], 1), first, dtype=torch.long), sub], 1)
            for first in range(total, -1, -1) for sub in [compositions(total - first, parts - 1)]]
    return torch.cat(rows)
