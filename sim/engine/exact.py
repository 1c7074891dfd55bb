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


def exact_loss(mdp: tabular.TabularMDP, logp: Tensor, ref_logp: Tensor, rt: RunTensors, ent_coef: float = 0.0
               ) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-run loss ``[R]`` whose gradient is the *expected* gradient of the sampled PPO loss (first epoch).

    With ``d`` the policy's state occupancy and ``L = Σ_s d(s)`` the expected episode length (sampled
    losses are means over timesteps):

    - KL in the reward: Q of the shaped reward ``r − β·k(s, a)`` (k from the current policy, detached) by
      exact policy evaluation; the surrogate ``Σ_s d(s) Σ_a π(a|s)·sg(Q(s, a) − V(s)) / L``.
    - KL in the loss: ``β·Σ_s d(s) Σ_a sg(π(a|s))·k(s, a) / L`` with gradient through ``log π`` in ``k``
      (samples fixed); ``full``: ``β·Σ_s d(s)·KL_s(π‖π_ref) / L`` with gradient through everything.

    Args:
        logp: ``[R, S, A]`` policy log-probabilities (carrying gradient). ref_logp: ``[R, S, A]``.
    Returns:
        ``(loss [R], diagnostics)``.
    """
    lp_d = logp.detach()
    with torch.no_grad():
        occ = tabular.state_occupancy(mdp, lp_d)
        w = occ / occ.sum(-1, keepdim=True).clamp(min=1e-12)  # [R, S]
        penalty = kl_reward_penalty(lp_d, ref_logp, full_kl(lp_d, ref_logp)[..., None], rt)
        v, q = tabular.policy_evaluation(mdp, lp_d, extra_reward=-penalty)
        adv = q - v.unsqueeze(-1)
    surrogate = (w * (logp.exp() * adv).sum(-1)).sum(-1)
    # E_{a ~ sg(π)} of the per-sample loss (on-policy: π_old = π): its gradient flows only through k.
    k_live = kl_loss_term(logp, lp_d, ref_logp, full_kl(logp, ref_logp)[..., None], rt)
    kl_term = (w * (lp_d.exp() * k_live).sum(-1)).sum(-1)
    entropy = (w * tabular.entropy_per_state(logp)).sum(-1)
    loss = -surrogate + kl_term - ent_coef * entropy
    diag = {"pg_loss": -surrogate.detach(), "kl_loss": kl_term.detach(), "entropy_loss": entropy.detach()}
    return loss, diag
