"""Reference values a figure can draw the curves against, computed from a run's config with ``envs``' exact
oracles: on a one-state env (a bandit) with a fixed β, the KL to the reference of the Gibbs optimum
π* ∝ π_ref·e^{r/β} (where k1 in the reward, k2 and the exact KL as a loss settle) and of the forward-KL point
(the stationary point of E_π[r] − β·KL(π_ref‖π), where k3 as a loss stops; docs/theory.md).

A bandit given by its arm means (``env.rewards``) is computed in numpy, so a report does not import torch (over
a second of its start-up); so is one whose arm means are drawn from ``reward_seed`` (at least 16 arms, a uniform
reference or ``ref_probs``: :func:`torch_randn64` draws torch's numbers); other bandits build the env with
torch."""

from __future__ import annotations

import math

import numpy as np


def kl_references(config: dict) -> list[tuple[str, float]]:
    """``[(label, KL(π‖π_ref) in nats)]`` for the Gibbs optimum and the forward-KL point of the reward phase
    of ``config`` (a run's nested config); empty where they are not defined (sequences, continuous actions,
    an adaptive β, DPO, β = 0) or not known from the config (a learned proxy reward: the runs settle at the
    proxy's optimum, fitted per run, not at the env reward's)."""
    env, kl, train = config.get("env", {}), config.get("kl", {}), config.get("train", {})
    beta = kl.get("beta") or 0.0
    if (env.get("id") != "bandit" or kl.get("controller", "fixed") != "fixed" or beta <= 0
            or train.get("algo", "ppo") != "ppo" or (config.get("reward") or {}).get("model", "gold") != "gold"):
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
        drawn = _drawn_bandit_arrays(env)
        return drawn if drawn is not None else _bandit_arrays_torch(env)
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


def _drawn_bandit_arrays(env: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`_bandit_arrays` of a bandit whose arm means are drawn from ``reward_seed``, computed as ``envs``
    computes them (``torch.randn`` of the seed, π_ref as ``exp`` of its log-probabilities), in numpy; ``None``
    where that is not done here (fewer than 16 arms, a seed outside ``[0, 2**32)``, ``ref_preference``, keys
    the bandit does not know)."""
    n, seed = env.get("n_arms"), env.get("reward_seed", 0)
    if (set(env) - _BANDIT_KEYS or env.get("ref_preference") is not None or type(n) is not int or n < 16
            or type(seed) is not int or not 0 <= seed < 2**32):
        return None
    means = torch_randn64(n, seed)
    if env.get("ref_probs") is None:
        ref = np.exp(np.full(n, -math.log(n)))
    else:
        probs = [float(p) for p in env["ref_probs"]]
        total = math.fsum(probs)
        if len(probs) != n or not all(0 <= p < math.inf for p in probs) or abs(total - 1.0) > 1e-6:
            return None
        with np.errstate(divide="ignore"):
            ref = np.exp(np.log(np.array([p / total for p in probs])))  # renormalized as envs does
    return means, ref


_BANDIT_KEYS = {"id", "n_arms", "rewards", "reward_seed", "reward_noise", "ref_probs", "ref_preference",
                "ref_temperature"}


def torch_randn64(n: int, seed: int) -> np.ndarray:
    """``torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)`` in numpy, the
    same numbers (``n >= 16``, ``0 <= seed < 2**32``): torch's CPU normal kernel draws ``n`` uniforms from the
    seed's MT19937 (53 bits of two 32-bit words each, the first the high word), turns each block of 16 into
    normals by Box–Muller (``u1 = 1 − u[j]``, ``u2 = u[j + 8]``: ``√(−2 log u1)·cos(2π u2)`` into ``j`` and the
    ``sin`` into ``j + 8``), and when 16 does not divide ``n`` draws 16 more uniforms for the last 16 values."""
    if n < 16 or not 0 <= seed < 2**32:
        raise ValueError(f"torch_randn64 needs n >= 16 and 0 <= seed < 2**32; got n={n}, seed={seed}")
    tail = 16 if n % 16 else 0
    words = np.random.RandomState(seed)._bit_generator.random_raw(2 * (n + tail))  # MT19937 seeded as torch
    uniform = (((words[0::2] & 0x1FFFFF) << 32) | words[1::2]).astype(np.float64) * 2.0**-53
    out = uniform[:n].copy()
    for i in range(0, n - 15, 16):
        out[i:i + 16] = _box_muller16(out[i:i + 16])
    if tail:
        out[n - 16:] = _box_muller16(uniform[n:])
    return out


def _box_muller16(u: np.ndarray) -> list[float]:
    """torch's ``normal_fill_16`` of 16 uniforms, with the C library's ``log``, ``cos`` and ``sin`` (``math``)."""
    out = [0.0] * 16
    for j in range(8):
        radius = math.sqrt(-2.0 * math.log(1.0 - float(u[j])))
        theta = 2.0 * math.pi * float(u[j + 8])
        out[j], out[j + 8] = radius * math.cos(theta), radius * math.sin(theta)
    return out


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
