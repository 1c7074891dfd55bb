"""PPO with a KL to a Gaussian reference on the Gaussian bandit (continuous actions, seed §5).

The policy is ``N(mean, σ²I)`` per run (``mean [R, d]``, ``log_std [R, 1]``); ``full`` is the closed-form
Gaussian KL (seed eq. 38), sampled k1/k2/k3 use the Gaussian log-densities. Everything else — placements,
PPO epochs, reference schedules, the β controller, logging — is the engine's (:mod:`sim.engine`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor

import envs
from envs.gaussian_bandit import expected_reward, gaussian_kl, gibbs_optimum
from sim.config import PPO_VARIANT_KEYS, Config, ConfigError, set_keys
from sim.engine import rng
from sim.engine.kl import all_estimates
from sim.engine.loop import BatchTrainer
from sim.engine.outputs import snapshot
from sim.engine.placement import kl_loss_term, kl_reward_penalty
from sim.engine.ppo import clip_bounds, clipped_surrogate, masked_mean, normalize_per_run, ppo_diagnostics


def check_continuous_ppo(cfg: Config) -> None:
    """What every continuous-action PPO trainer needs: sampled mode (no enumeration), a policy started at the
    reference, and none of the discrete trainers' PPO variants (batch-mean baseline, token-mean loss, on-time
    rollouts; only the clip bounds apply). Raises :class:`ConfigError` naming the first offending key."""
    env = cfg.env["id"]
    if cfg.train.mode != "sampled":
        raise ConfigError(f"train.mode=exact needs a discrete env; got env.id={env!r}")
    if cfg.train.init != "reference":
        raise ConfigError(f"train.init must be reference for env.id={env!r}; got {cfg.train.init!r}")
    bad = set_keys(cfg, tuple(k for k in PPO_VARIANT_KEYS if "clip" not in k))
    if bad:
        raise ConfigError(f"{bad[0]} is not supported for env.id={env!r} (batch-mean baseline, token-mean loss, "
                          "on-time rollouts)")


class GaussianPolicy:
    """Isotropic Gaussian actions ``N(mean, exp(log_std)²·I)`` per run, with no state."""

    frozen_keys: tuple[str, ...] = ()

    def __init__(self, dim: int):
        self.dim = dim

    def log_prob(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Log-density ``[R, N]`` of actions ``x [R, N, d]``."""
        log_std = params["log_std"].unsqueeze(1)  # [R, 1, 1]
        z = (x - params["mean"].unsqueeze(1)) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, params: dict[str, Tensor], noise: Tensor) -> Tensor:
        """Actions ``[R, N, d]`` from standard normals ``noise [R, N, d]``."""
        return params["mean"].unsqueeze(1) + torch.exp(params["log_std"]).unsqueeze(1) * noise

    def kl(self, params: dict[str, Tensor], ref: dict[str, Tensor]) -> Tensor:
        """Closed-form KL(π‖π_ref) ``[R]`` (differentiable in ``params``)."""
        return gaussian_kl(params["mean"], torch.exp(params["log_std"][:, 0]),
                           ref["mean"], torch.exp(ref["log_std"][:, 0]))

    def entropy(self, params: dict[str, Tensor]) -> Tensor:
        """Differential entropy ``[R]`` in nats."""
        return self.dim * (params["log_std"][:, 0] + 0.5 * math.log(2 * math.pi * math.e))


class GaussianTrainer(BatchTrainer):
    """The batched trainer for ``env.id = gaussian_bandit`` (one step, batch-mean baseline)."""

    optional_metrics = ("kl_opt", "opt_mean_error", "opt_mean", "opt_std")  # only where a closed form exists

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Sampled mode, a state-free Gaussian policy started at the reference."""
        check_continuous_ppo(cfg)
        if cfg.train.policy != "tabular":
            raise ConfigError(f"train.policy must be tabular for env.id={cfg.env['id']!r} (a state-free Gaussian)")

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
        self.env_params = envs.from_config(self.cfg.env)
        self.core = self.env_params.core(device)
        d = self.env_params.dim
        self.policy = GaussianPolicy(d)
        mean_ref = self.env_params.ref_mean_vector().to(device, self.dtype).expand(self.R, d).contiguous()
        log_std_ref = torch.full((self.R, 1), math.log(self.env_params.ref_std), dtype=self.dtype, device=device)
        self.ref_params = {"mean": mean_ref.clone(), "log_std": log_std_ref.clone()}
        self.params = {"mean": mean_ref.clone(), "log_std": log_std_ref.clone()}
        self.trainable = ["mean"] if self.env_params.fixed_std else ["mean", "log_std"]  # fixed: seed eq. 39
        for k in self.trainable:
            self.params[k].requires_grad_(True)
        self._make_optimizer()

    def sampled_update(self, update: int) -> dict[str, Tensor]:
        tr, rt = self.cfg.train, self.rt
        N, d = tr.batch, self.policy.dim
        key = rng.fold(self.rt.keys, update)
        noise = rng.normal(key, (N, d), dtype=self.dtype)
        z = rng.normal(rng.fold(key, 3), (N,)) if self.core.needs_normal else None
        with torch.no_grad():
            x = self.policy.sample(self.params, noise)
            logp = self.policy.log_prob(self.params, x)
            ref_logp = self.policy.log_prob(self.ref_params, x)
            k_full = self.policy.kl(self.params, self.ref_params).unsqueeze(1).expand(self.R, N)
            _, reward, _ = self.core.step(x, z)
            reward = reward.to(self.dtype)
        valid = torch.ones(self.R, N, dtype=torch.bool, device=self.device)
        ref_c = self.clamp(logp, ref_logp, valid)
        shaped = self.reward_scale * reward - kl_reward_penalty(logp, ref_c, k_full, rt)
        adv = shaped - shaped.mean(1, keepdim=True)
        if tr.norm_adv:
            adv = normalize_per_run(adv, valid)
        flat = {"x": x, "logp": logp, "ref_logp": ref_logp, "adv": adv, "valid": valid}
        stats = self._ppo_epochs(flat, update, self._ppo_loss)
        self.env_steps += N
        ks = all_estimates(logp, ref_logp).to(torch.float64)
        out = {"reward": reward.to(torch.float64).mean(1),
               "kl_k1": ks[..., 0].mean(1), "kl_k2": ks[..., 1].mean(1), "kl_k3": ks[..., 2].mean(1),
               "episode_length": torch.ones(self.R, dtype=torch.float64, device=self.device), **stats}
        self._control_beta(out["kl_k1"], N)
        n_traj = self.cfg.log.trajectories
        if n_traj > 0 and self._logs_at(update):
            steps = {"valid": valid, "action": x[..., 0], "reward": reward, "logp": logp, "ref_logp": ref_logp}
            rec: dict = snapshot({k: v[:, :n_traj, None] for k, v in steps.items()})
            rec.update(update=update, state=np.zeros((self.R, n_traj, 1), dtype=np.int64))
            self.traj_log.append(rec)
        return out

    def _ppo_loss(self, mb: dict[str, Tensor], want_diag: bool = True, want_loss: bool = True
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        tr, rt = self.cfg.train, self.rt
        valid = mb["valid"]
        lp = self.policy.log_prob(self.params, mb["x"])
        pg, clipped = clipped_surrogate(lp, mb["logp"], mb["adv"], tr.clip, *clip_bounds(tr.clip, tr.clip_low,
                                                                                              tr.clip_high))
        k_full = self.policy.kl(self.params, self.ref_params).unsqueeze(1).expand_as(lp)
        ref_lp = self.clamp(lp, mb["ref_logp"], valid)
        kl_term = kl_loss_term(lp, mb["logp"], ref_lp, k_full, rt)
        per_sample = pg + kl_term
        if tr.ent_coef > 0:
            per_sample = per_sample - tr.ent_coef * self.policy.entropy(self.params).unsqueeze(1)
        diag = ppo_diagnostics(pg, kl_term, clipped, mb["logp"] - lp, valid) if want_diag else {}
        return masked_mean(per_sample, valid), diag

    def exact_metrics(self) -> dict[str, Tensor]:
        """Closed-form KL both ways, entropy, exact expected reward and distance to the Gibbs optimum."""
        p = {k: v.detach().to(torch.float64) for k, v in self.params.items()}
        r = {k: v.detach().to(torch.float64) for k, v in self.ref_params.items()}
        std, ref_std = p["log_std"][:, 0].exp(), r["log_std"][:, 0].exp()
        out = {
            "kl_true": gaussian_kl(p["mean"], std, r["mean"], ref_std),
            "kl_forward": gaussian_kl(r["mean"], ref_std, p["mean"], std),
            "entropy": self.policy.entropy(p),
            "min_prob": torch.full_like(std, float("nan")),
            "return_true": expected_reward(self.env_params, p["mean"], std),
            "policy_mean": p["mean"][:, 0],
            "policy_std": std,
            "tv_opt": torch.full_like(std, float("nan")),
        }
        opt = self._optimum(r)
        if opt is not None:
            opt_mean, opt_std = opt
            out["kl_opt"] = gaussian_kl(p["mean"], std, opt_mean, opt_std)
            out["opt_mean_error"] = (p["mean"] - opt_mean).norm(dim=-1)
            out["opt_mean"], out["opt_std"] = opt_mean[:, 0], opt_std  # the optimum's first coordinate and std
        return out

    def _optimum(self, ref: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """Gibbs optimum ``(mean [R, d], std [R])`` relative to each run's *current* reference and the
        phase's reward scale, where a closed form exists (linear and quadratic rewards)."""
        if self.env_params.reward == "two_mode":
            return None
        beta = self.rt.beta.cpu().clamp(min=1e-12)  # runs without a KL: NaN below, per run
        if self.reward_scale == 0:  # no reward: the optimum of a KL-regularized objective is the reference
            mean, std = ref["mean"].cpu(), ref["log_std"][:, 0].exp().cpu()
        else:
            base = dataclasses.replace(self.env_params,
                                       reward_coef=_scaled(self.env_params.reward_coef, self.reward_scale))
            if self.cfg.reference.schedule == "frozen":  # every run shares the env's reference: one call
                mean, std = gibbs_optimum(base, beta)
            else:
                parts = [gibbs_optimum(dataclasses.replace(base, ref_mean=tuple(ref["mean"][i].tolist()),
                                                           ref_std=float(ref["log_std"][i, 0].exp())), beta[i])
                         for i in range(self.R)]
                mean, std = torch.stack([m for m, _ in parts]), torch.stack([s for _, s in parts])
        none = (self.rt.beta <= 0).cpu()  # a run without a KL has no optimum, whatever its batch-mates have
        mean = torch.where(none.view(-1, 1), torch.nan, mean)
        std = torch.where(none, torch.nan, std)
        return mean.to(self.device), std.to(self.device)

    def policy_tables(self) -> dict[str, np.ndarray]:
        p = {k: v.detach().to(torch.float64) for k, v in self.params.items()}
        r = {k: v.detach().to(torch.float64) for k, v in self.ref_params.items()}
        tabs = {"mean": p["mean"], "std": p["log_std"].exp().expand_as(p["mean"]),
                "ref_mean": r["mean"], "ref_std": r["log_std"].exp().expand_as(r["mean"])}
        opt = self._optimum(r)
        nan = torch.full_like(p["mean"], float("nan"))
        tabs["opt_mean"] = opt[0] if opt is not None else nan
        tabs["opt_std"] = opt[1].unsqueeze(-1).expand_as(p["mean"]) if opt is not None else nan
        return snapshot(tabs)

    def policy_frame(self, run: int) -> pd.DataFrame:
        d = self.policy.dim
        dv = int(self.diverged_at[run])
        logs = [(u, tabs) for u, tabs in self.policy_log if dv < 0 or u <= dv]
        frame = {"update": np.repeat(np.array([u for u, _ in logs], dtype=np.int64), d),
                 "dim": np.tile(np.arange(d, dtype=np.int64), len(logs))}
        for k in logs[0][1]:
            frame[k] = np.concatenate([tabs[k][run] for _, tabs in logs])
        return pd.DataFrame(frame)


def _scaled(coef, scale: float):
    if isinstance(coef, tuple):
        return tuple(c * scale for c in coef)
    return coef * scale
