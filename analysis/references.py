"""Reference values a figure can draw the curves against, computed from a run's config with ``envs``' exact
oracles: on a one-state env (a bandit) with a fixed β, the KL to the reference of the Gibbs optimum
π* ∝ π_ref·e^{r/β} (where k1 in the reward, k2 and the exact KL as a loss settle) and of the forward-KL point
(the stationary point of E_π[r] − β·KL(π_ref‖π), where k3 as a loss stops; docs/theory.md).

A bandit given by its arm means (``env.rewards``) is computed in numpy, so a report does not import torch (over
a second of its start-up); other bandits (arm means drawn from ``reward_seed``) build the env with torch."""

from __future__ import annotations

import math

import numpy as np


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
        arms = _bandit_arrays(env)
    except (ValueError, TypeError, KeyError):
        return []
    if arms is None:
        return []
    phases = train.get("phases") or [{"reward_scale": 1.0}]
    scale = float(phases[0].get("reward_scale", 1.0))
    if scale <= 0:
        return []
    r, ref = scale * arms[0], arms[1]
    with np.errstate(divide="ignore"):
        logits = np.log(ref) + r / beta
    opt = np.exp(logits - logits.max())
    opt /= opt.sum()
    return [(r"KL($\pi^*\|\pi_{\mathrm{ref}}$)", _kl(opt, ref)),
            ("k3-as-loss point", _kl(forward_kl_point(r, ref, beta), ref))]


def _bandit_arrays(env: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """``(arm means [A], reference probabilities [A])`` (float64) of a bandit's ``env`` config; ``None`` if it
    is not a valid bandit."""
    if env.get("rewards") is None:
        return _bandit_arrays_torch(env)
    rewards = np.asarray(env["rewards"], dtype=np.float64)
    n = rewards.size
    if rewards.shape != (n,) or n < 1 or env.get("n_arms") not in (None, n):
        return None
    if env.get("ref_probs") is not None:
        ref = np.asarray(env["ref_probs"], dtype=np.float64)
        if ref.shape != (n,) or (ref < 0).any() or abs(ref.sum() - 1.0) > 1e-6:
            return None
    elif env.get("ref_preference") is not None:
        logits = np.asarray(env["ref_preference"], dtype=np.float64) / float(env.get("ref_temperature", 1.0))
        if logits.shape != (n,):
            return None
        ref = np.exp(logits - logits.max())
        ref /= ref.sum()
    else:
        ref = np.full(n, 1.0 / n)
    return rewards, ref


def _bandit_arrays_torch(env: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_bandit_arrays` of a bandit whose arm means ``envs`` draws (torch)."""
    import envs

    mdp = envs.from_config(env).build()
    if mdp.n_states != 1:
        return None
    r = (mdp.reward[0] * mdp.next_prob[0]).sum(-1).double().numpy()  # [A] expected reward
    return r, mdp.ref_logp[0].double().exp().numpy()


def forward_kl_point(r: np.ndarray, ref: np.ndarray, beta: float, tol: float = 1e-13,
                     max_iter: int = 200) -> np.ndarray:
    """The stationary point of E_π[r] − β·KL(π_ref‖π) on a one-state bandit, as
    :func:`envs.tabular.forward_kl_stationary_point` (the same bisection on ``c = E_π[r]`` of
    ``π_a = β·π_ref,a / (β + c − r_a)``) in numpy."""
    support = ref > 0
    lo = float(r[support].max()) - beta
    hi = lo + beta * (1.0 + float(r.max() - r.min()) + 1.0) + 1.0

    def probs(c: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(support, beta * ref / (beta + c - r), 0.0)

    while probs(hi).sum() > 1:
        hi = hi + (hi - lo)
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if probs(mid).sum() > 1:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    p = probs(0.5 * (lo + hi))
    return p / p.sum()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    if not mask.any():
        return math.nan
    with np.errstate(divide="ignore"):
        return float(max(0.0, float((p[mask] * (np.log(p[mask]) - np.log(q[mask]))).sum())))
