"""Reference values a figure can draw the curves against, computed from a run's config with ``envs``' exact
oracles: on a one-state env (a bandit) with a fixed β, the KL to the reference of the Gibbs optimum
π* ∝ π_ref·e^{r/β} (where k1 in the reward, k2 and the exact KL as a loss settle) and of the forward-KL point
(the stationary point of E_π[r] − β·KL(π_ref‖π), where k3 as a loss stops; docs/theory.md)."""

from __future__ import annotations

import math

import torch

import envs
from envs.tabular import forward_kl_stationary_point


def kl_references(config: dict) -> list[tuple[str, float]]:
    """``[(label, KL(π‖π_ref) in nats)]`` for the Gibbs optimum and the forward-KL point of the reward phase
    of ``config`` (a run's nested config); empty where they are not defined (sequences, continuous actions,
    an adaptive β, DPO, β = 0)."""
    env, kl, train = config.get("env", {}), config.get("kl", {}), config.get("train", {})
    beta = kl.get("beta") or 0.0
    if (env.get("id") != "bandit" or kl.get("controller", "fixed") != "fixed" or beta <= 0
            or train.get("algo", "ppo") != "ppo"):
        return []
    try:
        mdp = envs.from_config(env).build()
    except (ValueError, TypeError, KeyError):
        return []
    if mdp.n_states != 1:
        return []
    phases = train.get("phases") or [{"reward_scale": 1.0}]
    scale = float(phases[0].get("reward_scale", 1.0))
    if scale <= 0:
        return []
    r = scale * (mdp.reward[0] * mdp.next_prob[0]).sum(-1).to(torch.float64)  # [A] expected reward
    ref = mdp.ref_logp[0].to(torch.float64).exp()
    out = []
    opt = torch.softmax(torch.log(ref) + r / beta, -1)
    out.append((r"KL($\pi^*\|\pi_{\mathrm{ref}}$)", _kl(opt, ref)))
    fwd = forward_kl_stationary_point(r, ref, beta)
    out.append(("k3-as-loss point", _kl(fwd, ref)))
    return out


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    mask = p > 0
    return float(max(0.0, (p[mask] * (p[mask].log() - q[mask].log())).sum()) if bool(mask.any()) else math.nan)
