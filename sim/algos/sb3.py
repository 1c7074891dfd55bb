"""``train.backend: sb3``: reflab runs trained by stable-baselines3's PPO with reflab's KL placements.

:class:`SB3Trainer` trains one :class:`~sim.algos.sb3_ppo.KLRegularizedPPO` per config on the env's gymnasium
shell, with the reflab output contract. It subclasses :class:`~sim.algos.discrete.DiscreteTrainer` and only
replaces the update: after every SB3 update the SB3 policy is evaluated on every state's observation and its
``[S, A]`` log-probability table is copied into the native tabular parameters, so the exact metrics, policy
tables, optimum, logging, phases and divergence handling are the engine's own code.

Matching the native engine (``train.policy: tabular``): SB3's ``MlpPolicy`` with ``net_arch=[]`` on the
one-hot of the state index is a logit table (the action net's weight column of the state; its bias is
frozen at 0) initialised at ``train.init``; the value net likewise (a zero table). ``n_steps × n_envs =
train.batch × horizon``, ``batch_size = n_steps·n_envs / train.minibatches``, the same epochs, lr, clip,
γ, λ, ``vf_coef``, ``ent_coef``, ``norm_adv``, Adam with ε = 1e-8 (SB3's default is 1e-5) and
``max_grad_norm`` (none → 1e9; SB3 clips one global norm). The ``mean`` baseline of one-step envs (the
batch-mean shaped reward) and ``none`` are set in the buffer's values before GAE. Time limits: the reflab
gridworld and token tree carry time in the state, so a horizon end is reported to SB3 as ``terminated``
(value 0 after it) instead of ``truncated`` (which SB3 would bootstrap).

Differences that remain (documented, measured by the cross-check tests): SB3 collects a fixed number of
*steps* per update (the native engine a fixed number of *episodes*), cutting episodes at rollout
boundaries and bootstrapping the value there; SB3 computes in float32; its random streams differ.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import Tensor

import envs
from sim.algos.discrete import DiscreteTrainer
from sim.algos.sb3_ppo import KLRegularizedPPO, TableReference
from sim.config import PPO_VARIANT_KEYS, Config, ConfigError, set_keys
from sim.engine.ppo import resolve_baseline

NO_CLIP = 1e9
"""``max_grad_norm`` given to SB3 when the config has none (SB3 requires a number)."""


class EndAtHorizon(gym.Wrapper):
    """Reports a time-limit end as ``terminated``: reflab's sequential envs carry time in the state, so the
    value after the horizon is 0 and SB3 must not bootstrap through it."""

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, bool(terminated or truncated), False, info


def make_shell(cfg: Config) -> gym.Env:
    """The gymnasium shell of ``cfg.env`` as the SB3 backend trains on it (state-index observations)."""
    kwargs = {k: v for k, v in cfg.env.items() if k != "id"}
    spec = envs.spec(cfg.env["id"])
    if "obs" in spec.params.keys():
        kwargs["obs"] = "index"  # tabular policy: the state index (one-hot in SB3), whatever the MLP features
    return EndAtHorizon(gym.make(spec.gym_id, disable_env_checker=True, **kwargs))


def rollout_shape(batch: int, horizon: int) -> tuple[int, int]:
    """``(n_envs, n_steps)`` with ``n_envs·n_steps = batch·horizon`` (at most ``horizon`` steps per episode).

    One-step envs use up to 64 parallel envs (fewer policy calls); sequential envs up to 8, so that long
    rollouts per env cut few episodes at the rollout boundary.
    """
    n_envs = math.gcd(batch, 64 if horizon == 1 else 8)
    return n_envs, batch * horizon // n_envs


def build_model(cfg: Config, ref_logp: Tensor, init_logp: Tensor, baseline: str, horizon: int,
                device: str = "cpu") -> KLRegularizedPPO:
    """A :class:`KLRegularizedPPO` matching the native engine's hyperparameters for ``cfg`` (see the module
    docstring), its logit table initialised at ``init_logp [S, A]`` and its reference ``ref_logp [S, A]``."""
    tr, kl = cfg.train, cfg.kl
    S, A = ref_logp.shape
    n_envs, n_steps = rollout_shape(tr.batch, horizon)
    venv = DummyVecEnv([lambda: make_shell(cfg) for _ in range(n_envs)])
    if not isinstance(venv.observation_space, spaces.Discrete) or venv.observation_space.n != S:
        raise ValueError(f"the SB3 backend needs Discrete({S}) state-index observations; "
                         f"got {venv.observation_space}")
    if tr.optimizer == "adam":
        opt = {"optimizer_class": torch.optim.Adam, "optimizer_kwargs": {"eps": 1e-8}}
    else:
        opt = {"optimizer_class": torch.optim.SGD, "optimizer_kwargs": {}}
    model = KLRegularizedPPO(
        "MlpPolicy", venv, reference=TableReference(ref_logp), kl_placement=kl.placement,
        kl_estimator=kl.estimator, kl_beta=kl.beta, kl_controller=kl.controller, kl_target=kl.target,
        kl_horizon=kl.horizon, kl_is_correction=kl.is_correction, baseline=baseline,
        learning_rate=tr.lr, n_steps=n_steps, batch_size=max(1, n_steps * n_envs // tr.minibatches),
        n_epochs=tr.epochs, gamma=tr.gamma, gae_lambda=tr.gae_lambda, clip_range=tr.clip,
        normalize_advantage=tr.norm_adv, ent_coef=tr.ent_coef, vf_coef=tr.vf_coef,
        max_grad_norm=tr.max_grad_norm if tr.max_grad_norm is not None else NO_CLIP,
        policy_kwargs={"net_arch": [], "ortho_init": False, **opt}, seed=cfg.seed, device=device, verbose=0)
    with torch.no_grad():
        pol = model.policy
        pol.action_net.weight.copy_(init_logp.T.to(pol.action_net.weight))
        pol.value_net.weight.zero_()
        for bias in (pol.action_net.bias, pol.value_net.bias):
            bias.zero_()
            bias.requires_grad_(False)
    return model


def policy_table(model: KLRegularizedPPO, n_states: int) -> Tensor:
    """``[S, A]`` log-probabilities of the SB3 policy on every state's (index) observation."""
    obs = torch.arange(n_states, dtype=torch.float32, device=model.device).view(n_states, 1)
    with torch.no_grad():
        return torch.log_softmax(model.policy.get_distribution(obs).distribution.logits, -1)


class SB3Trainer(DiscreteTrainer):
    """``train.backend: sb3``: each config trained by its own :class:`KLRegularizedPPO` on the env's
    gymnasium shell, with the native engine's metrics, tables and output contract.

    The native tabular parameters hold, after every update, the SB3 policy's log-probability table (never
    trained natively), so :meth:`exact_metrics`, :meth:`policy_tables` and the whole :meth:`run` loop are
    the native code. Runs are trained one after the other; each keeps its own torch and numpy global RNG
    states, so a run gives the same numbers alone or in a batch.
    """

    batches_runs = False
    fits_reward_model = False  # SB3 trains on the gymnasium shell's (gold) reward

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The combinations the SB3 backend does not support (one line naming the key)."""
        super().check_config(cfg)
        t = cfg.train
        unsupported = [
            (t.mode != "sampled", f"train.mode={t.mode!r} (sampled only)"),
            (t.policy != "tabular", f"train.policy={t.policy!r} (tabular only)"),
            (cfg.reference.schedule != "frozen", f"reference.schedule={cfg.reference.schedule!r} (frozen only)"),
            (cfg.kl.clamp is not None, f"kl.clamp={cfg.kl.clamp!r} (none only)"),
            (t.dtype != "float32", f"train.dtype={t.dtype!r} (float32 only)"),
        ]
        for bad, what in unsupported:
            if bad:
                raise ConfigError(f"train.backend=sb3 does not support {what}")
        bad_keys = set_keys(cfg, (*PPO_VARIANT_KEYS, "kl.value_clamp"))
        if bad_keys:
            raise ConfigError(f"train.backend=sb3 does not support {bad_keys[0]} (GAE, token-mean loss, symmetric "
                              "clip, on-time rollouts)")

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
        self.baseline = resolve_baseline(self.cfg.train.baseline, self.H)
        ref = self.mdp.ref_logp.to(torch.float32)
        self.models: list[KLRegularizedPPO] = []
        self._rng: list[tuple[Tensor, Any]] = []
        for i, cfg in enumerate(configs):
            model = build_model(cfg, ref, self.params["logits"][i].detach().float(), self.baseline,
                                self.H, str(device))
            model.start(cfg.train.total_updates)
            self.models.append(model)
            self._rng.append((torch.get_rng_state(), np.random.get_state()))
        self.steps_per_update = self.models[0].n_steps * self.models[0].env.num_envs
        self._copy_tables(range(self.R))

    def _copy_tables(self, runs: Any) -> None:
        with torch.no_grad():
            for i in runs:
                self.params["logits"][i] = policy_table(self.models[i], self.S).to(self.params["logits"])

    def _on_phase(self) -> None:
        super()._on_phase()
        for m in self.models:
            m.reward_scale = self.reward_scale

    def sampled_update(self, update: int) -> dict[str, Tensor]:
        keys = ("reward", "kl_k1", "kl_k2", "kl_k3", "kl_full_sampled", "episode_length",
                "pg_loss", "kl_loss", "clip_frac", "approx_kl", "grad_norm") + (
                    ("v_loss",) if self.baseline == "value" else ())
        out = {k: torch.full((self.R,), math.nan, dtype=torch.float64) for k in keys}
        bad = torch.zeros(self.R, dtype=torch.bool, device=self.device)
        recs = []
        want_traj = self.cfg.log.trajectories > 0 and self._logs_at(update)
        for i, model in enumerate(self.models):
            if not bool(self.alive[i]):
                recs.append(None)
                continue
            torch.set_rng_state(self._rng[i][0])
            np.random.set_state(self._rng[i][1])
            try:
                model.update()
                ok = True
            except ValueError:  # e.g. a non-finite policy (torch's distribution checks)
                ok = False
            self._rng[i] = (torch.get_rng_state(), np.random.get_state())
            if not ok:
                bad[i] = True
                recs.append(None)
                continue
            model_stats = {**model.rollout_stats, **model.train_stats}
            for k in keys:
                out[k][i] = model_stats.get(k, math.nan)
            self.rt.beta[i] = model.kl_beta
            self.env_steps[i] += self.steps_per_update
            recs.append(self._trajectories(model) if want_traj else None)
        self._copy_tables([i for i in range(self.R) if bool(self.alive[i]) and not bool(bad[i])])
        self._mark_diverged(bad, update, "SB3 update failed (non-finite policy)")
        if want_traj:
            self._log_traj(update, recs)
        return {k: v.to(self.device) for k, v in out.items()}

    # -- trajectories -----------------------------------------------------------------------------------------
    def _trajectories(self, model: KLRegularizedPPO) -> dict[str, np.ndarray]:
        """The first ``log.trajectories`` complete episodes of the last rollout (env by env), ``[n, H]``."""
        n = self.cfg.log.trajectories
        ro = model.rollout_arrays
        starts, ends = ro["starts"], ro["ends"]
        T, E = starts.shape
        obs = ro["obs"].reshape(T, E).astype(np.int64)
        act = ro["actions"].reshape(T, E).astype(np.int64)
        ref = model.reference.table.numpy()
        rec = self._empty_traj()
        ep = 0
        for e in range(E):
            t = 0
            while t < T and ep < n:
                if not starts[t, e]:
                    t += 1
                    continue
                t_end = t
                while t_end < T and not ends[t_end, e]:
                    t_end += 1
                if t_end >= T:  # episode runs past the rollout
                    break
                sl = slice(t, t_end + 1)
                L = t_end + 1 - t
                rec["state"][ep, :L], rec["action"][ep, :L] = obs[sl, e], act[sl, e]
                rec["reward"][ep, :L] = ro["reward"][sl, e]
                rec["logp"][ep, :L] = ro["logp"][sl, e]
                rec["ref_logp"][ep, :L] = ref[obs[sl, e], act[sl, e]]
                rec["valid"][ep, :L] = True
                ep += 1
                t = t_end + 1
            if ep >= n:
                break
        return rec

    def _empty_traj(self) -> dict[str, np.ndarray]:
        """A record of ``log.trajectories`` empty episodes ``[n, H]`` (no valid step)."""
        n, H = self.cfg.log.trajectories, self.H
        return {"state": np.zeros((n, H), np.int64), "action": np.zeros((n, H), np.int64),
                "reward": np.zeros((n, H)), "logp": np.zeros((n, H)), "ref_logp": np.zeros((n, H)),
                "valid": np.zeros((n, H), bool)}

    def _log_traj(self, update: int, recs: list[dict[str, np.ndarray] | None]) -> None:
        empty = self._empty_traj()
        stacked: dict[str, Any] = {k: np.stack([(r or empty)[k] for r in recs]) for k in empty}
        stacked["update"] = update
        self.traj_log.append(stacked)
