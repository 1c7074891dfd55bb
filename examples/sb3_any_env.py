"""reflab's KL placements on any gymnasium env through stable-baselines3 (:class:`sim.algos.sb3_ppo.KLRegularizedPPO`).

Two cases (``--env cartpole|pendulum|both``):

* **CartPole-v1** (``Discrete`` actions), reference = an SB3 policy saved with ``save()``: a plain PPO is
  trained for ``--steps`` steps and saved; then KLRegularizedPPO continues from scratch with the saved
  model as π_ref and the KL **in the loss** with the exact per-state KL (``full``).
* **Pendulum-v1** (``Box`` actions), reference = a callable: a fixed Gaussian N(0, 1) per action dimension
  given as ``log_prob(obs, actions)`` plus its ``distribution(obs)`` (so ``full`` works too); the KL **in
  the reward** with the k1 estimator (``r − β·(log π_old − log π_ref)`` before GAE).

It prints, per case, the mean episode reward and the mean KL estimates of the last rollout. Run::

    python examples/sb3_any_env.py --steps 20000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import gymnasium as gym
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from sim.algos.sb3_ppo import CallableReference, KLRegularizedPPO


def _summary(name: str, model: KLRegularizedPPO) -> dict[str, float]:
    s = model.rollout_stats
    print(f"{name}: placement={model.kl_placement} estimator={model.kl_estimator} β={model.kl_beta:.3g}  "
          f"reward/episode {s['reward']:.2f}  KL/episode: k1 {s['kl_k1']:.4f}  k3 {s['kl_k3']:.4f}  "
          f"full {s['kl_full_sampled']:.4f}", flush=True)
    return s


def cartpole(steps: int, seed: int, workdir: Path) -> dict[str, float]:
    """Reference = a PPO trained for ``steps`` and saved; KL (exact, per state) in the loss."""
    n_steps = max(16, min(256, steps // 4))
    ref_env = make_vec_env("CartPole-v1", n_envs=4, seed=seed)
    reference = PPO("MlpPolicy", ref_env, n_steps=n_steps, batch_size=n_steps, seed=seed, device="cpu")
    reference.learn(total_timesteps=steps)
    path = workdir / "cartpole_reference.zip"
    reference.save(path)

    env = make_vec_env("CartPole-v1", n_envs=4, seed=seed + 1)
    model = KLRegularizedPPO("MlpPolicy", env, reference=path, kl_placement="loss", kl_estimator="full",
                             kl_beta=0.1, n_steps=n_steps, batch_size=n_steps, seed=seed + 1, device="cpu")
    model.learn(total_timesteps=steps)
    return _summary("CartPole-v1", model)


def gaussian_reference(action_dim: int, std: float = 1.0) -> CallableReference:
    """A state-independent Gaussian N(0, std²) per action dimension as a callable reference."""

    def distribution(obs: torch.Tensor) -> torch.distributions.Normal:
        shape = (obs.shape[0], action_dim)
        mean = torch.zeros(shape, device=obs.device)
        return torch.distributions.Normal(mean, torch.full_like(mean, std))

    def log_prob(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return distribution(obs).log_prob(actions).sum(-1)

    return CallableReference(log_prob, distribution)


def pendulum(steps: int, seed: int) -> dict[str, float]:
    """Reference = a callable Gaussian; k1 in the reward."""
    n_steps = max(16, min(256, steps // 4))
    env = make_vec_env("Pendulum-v1", n_envs=4, seed=seed)
    dim = gym.make("Pendulum-v1").action_space.shape[0]
    model = KLRegularizedPPO("MlpPolicy", env, reference=gaussian_reference(dim), kl_placement="reward",
                             kl_estimator="k1", kl_beta=0.05, n_steps=n_steps, batch_size=n_steps, seed=seed,
                             device="cpu")
    model.learn(total_timesteps=steps)
    return _summary("Pendulum-v1", model)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20_000, help="env steps of each training (20000)")
    p.add_argument("--env", choices=["cartpole", "pendulum", "both"], default="both")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.env in ("cartpole", "both"):
            out["cartpole"] = cartpole(args.steps, args.seed, Path(tmp))
        if args.env in ("pendulum", "both"):
            out["pendulum"] = pendulum(args.steps, args.seed)
    return out


if __name__ == "__main__":
    main()
