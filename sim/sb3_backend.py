"""The stable-baselines3 backend: reflab's KL placements inside SB3's PPO, and ``train.backend: sb3``.

Two layers:

* :class:`KLRegularizedPPO` — a subclass of SB3's ``PPO`` for *any* gymnasium env with ``Discrete`` or
  ``Box`` actions. It keeps the policy near a frozen reference (:func:`make_reference`: an SB3 policy, a
  file written by ``model.save()``, or a callable ``(obs, actions) -> log-probs``) with the same ``kl.*``
  settings as the native engine: placement ``none | reward | loss``, estimator ``k1 | k2 | k3 | full``,
  β fixed or adaptive (Ziegler et al.'s controller, as ``sim.train.BatchTrainer._control_beta``).

  - *Reward placement*: after each rollout and **before** SB3's GAE, the rollout buffer's rewards become
    ``reward_scale·r − β·k`` with ``k`` from the sampled action's ``log π_old`` (stored by SB3) and
    ``log π_ref`` (``full``: the exact KL of the state's action distribution), detached
    (:class:`ShapingRolloutBuffer`).
  - *Loss placement*: ``train()`` is SB3 2.9's ``PPO.train`` with ``+ β·mean(k)`` added outside the clipped
    surrogate, the gradient flowing through ``log π_θ`` (``full``: through the exact KL); with
    ``kl_is_correction`` the importance-weighted forms of :func:`sim.kl.weighted_estimate`.

  The estimators are :mod:`sim.kl`'s functions, not re-derived.

* :class:`SB3Trainer` — what ``make_trainer`` returns for ``train.backend: sb3``: one
  :class:`KLRegularizedPPO` per config on the env's gymnasium shell (``reflab/*``), with the reflab output
  contract. It subclasses :class:`sim.train.DiscreteTrainer` and only replaces the update: after every
  SB3 update the SB3 policy is evaluated on every state's observation and its ``[S, A]`` log-probability
  table is copied into the native tabular parameters, so the exact metrics, policy tables, optimum,
  logging, phases and divergence handling are the native engine's own code.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import Tensor
from torch.nn import functional as F

from sim.config import Config
from sim.kl import ESTIMATORS, PLACEMENTS, all_estimates, full_kl, weighted_estimate
from sim.train import DiscreteTrainer

GYM_ID = {"bandit": "reflab/Bandit-v0", "gridworld": "reflab/GridWorld-v0", "token_tree": "reflab/TokenTree-v0"}
"""The gymnasium shell each ``env.id`` is trained on by the SB3 backend."""

NO_CLIP = 1e9
"""``max_grad_norm`` given to SB3 when the config has none (SB3 requires a number)."""


# ------------------------------------------------------------------------------------------------------
# Reference policies
# ------------------------------------------------------------------------------------------------------


def exact_kl(pi: torch.distributions.Distribution, ref: torch.distributions.Distribution) -> Tensor:
    """Exact KL(π‖π_ref) per state ``[N]`` between two torch distributions of batch ``[N]`` (or ``[N, d]``
    for SB3's diagonal Gaussians, summed over ``d``). Categoricals use :func:`sim.kl.full_kl`."""
    if isinstance(pi, torch.distributions.Categorical) and isinstance(ref, torch.distributions.Categorical):
        return full_kl(pi.logits, ref.logits)
    kl = torch.distributions.kl_divergence(pi, ref)
    return kl.sum(-1) if kl.dim() > 1 else kl


class Reference:
    """A frozen reference policy as :class:`KLRegularizedPPO` uses it.

    ``obs`` is the observation batch as stored in SB3's rollout buffer, as a tensor ``[N, *obs_shape]``
    (``Discrete`` observations: ``[N, 1]`` float indices); ``actions`` is ``[N]`` (``Discrete``, long) or
    ``[N, d]`` (``Box``).
    """

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """``log π_ref(a|s)`` per sample ``[N]``."""
        raise NotImplementedError

    def kl(self, dist: Distribution, obs: Tensor) -> Tensor:
        """Exact ``KL(π(·|s)‖π_ref(·|s))`` per sample ``[N]`` for the SB3 distribution ``dist`` of π on ``obs``
        (with gradient through ``dist``). Raises ``ValueError`` when the reference cannot give it."""
        raise ValueError("kl.estimator=full needs the reference's full action distribution; this reference "
                         "only gives log-probabilities of actions (pass distribution= to CallableReference)")


class PolicyReference(Reference):
    """An SB3 policy (e.g. ``PPO.load(path).policy``), frozen and in eval mode."""

    def __init__(self, policy: BasePolicy):
        self.policy = policy
        policy.set_training_mode(False)
        for p in policy.parameters():
            p.requires_grad_(False)

    def _dist(self, obs: Tensor) -> Distribution:
        with torch.no_grad():
            return self.policy.get_distribution(obs.to(self.policy.device))

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        with torch.no_grad():
            return self._dist(obs).log_prob(actions.to(self.policy.device)).to(obs.device)

    def kl(self, dist: Distribution, obs: Tensor) -> Tensor:
        return exact_kl(dist.distribution, self._dist(obs).distribution)


class CallableReference(Reference):
    """A reference given as functions: ``log_prob(obs, actions) -> [N]`` and, optionally,
    ``distribution(obs) -> torch.distributions.Distribution`` (needed for ``kl.estimator=full``)."""

    def __init__(self, log_prob: Callable[[Tensor, Tensor], Tensor],
                 distribution: Callable[[Tensor], torch.distributions.Distribution] | None = None):
        self._log_prob = log_prob
        self._distribution = distribution

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        with torch.no_grad():
            return self._log_prob(obs, actions).reshape(-1)

    def kl(self, dist: Distribution, obs: Tensor) -> Tensor:
        if self._distribution is None:
            return super().kl(dist, obs)
        with torch.no_grad():
            ref = self._distribution(obs)
        return exact_kl(dist.distribution, ref)


class TableReference(Reference):
    """A tabular reference ``[S, A]`` (log-probabilities) for envs whose observation is the state index."""

    def __init__(self, logp_table: Tensor):
        self.table = logp_table.to(torch.float32)

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        s = obs.reshape(-1).long()
        return self.table.to(obs.device)[s, actions.reshape(-1).long()]

    def kl(self, dist: Distribution, obs: Tensor) -> Tensor:
        ref = self.table.to(obs.device)[obs.reshape(-1).long()]
        return full_kl(torch.log_softmax(dist.distribution.logits, -1), ref)


def make_reference(ref: Any, device: str | torch.device = "cpu") -> Reference:
    """A :class:`Reference` from ``ref``: a :class:`Reference`, an SB3 policy, a path to a model saved with
    ``save()`` (loaded with ``PPO.load``), or a callable ``(obs, actions) -> log-probs [N]``."""
    if isinstance(ref, Reference):
        return ref
    if isinstance(ref, BasePolicy):
        return PolicyReference(ref)
    if isinstance(ref, str | Path):
        return PolicyReference(PPO.load(str(ref), device=device).policy)
    if callable(ref):
        return CallableReference(ref)
    raise TypeError(f"reference must be an SB3 policy, a saved model path or a callable; got {type(ref).__name__}")


# ------------------------------------------------------------------------------------------------------
# KLRegularizedPPO
# ------------------------------------------------------------------------------------------------------


class ShapingRolloutBuffer(RolloutBuffer):
    """SB3's rollout buffer with a hook called right before GAE (``compute_returns_and_advantage``)."""

    before_gae: Callable[[RolloutBuffer, Tensor, np.ndarray], None] | None = None

    def compute_returns_and_advantage(self, last_values: Tensor, dones: np.ndarray) -> None:
        if self.before_gae is not None:
            self.before_gae(self, last_values, dones)
        super().compute_returns_and_advantage(last_values, dones)


class KLRegularizedPPO(PPO):
    """SB3 PPO keeping π_θ near a frozen reference with β·KL in the reward or in the loss.

    Args:
        policy, env: as for ``PPO`` (non-``Dict`` observations; ``Discrete`` or ``Box`` actions).
        reference: the frozen π_ref (see :func:`make_reference`); may be omitted only with placement ``none``.
        kl_placement: ``none`` | ``reward`` (``r − β·k`` before GAE, k detached) | ``loss`` (``+β·k`` outside
            the clip, gradient through ``log π_θ``).
        kl_estimator: ``k1`` | ``k2`` | ``k3`` | ``full`` (exact per-state KL; needs the reference's
            distribution).
        kl_beta: β (initial β with the adaptive controller).
        kl_controller, kl_target, kl_horizon: ``fixed`` | ``adaptive`` (Ziegler et al.: after each update
            ``β ← β·(1 + clip(KL/target − 1, ±0.2)·n_episodes/horizon)`` with KL the rollout's mean k1 per
            episode).
        kl_is_correction: importance-weighted loss forms for samples from π_old (loss placement).
        baseline: ``value`` (SB3's learned value) | ``mean`` (batch-mean shaped reward; one-step envs only)
            | ``none``.
        reward_scale: multiplier of the env reward in the buffer (a reward-off phase uses 0).
        **kwargs: passed to ``PPO``.

    After each update: ``rollout_stats`` (per-episode sample means ``reward, kl_k1, kl_k2, kl_k3,
    kl_full_sampled, episode_length``; ``episodes``) and ``train_stats`` (last epoch's means of ``pg_loss,
    kl_loss, clip_frac, approx_kl = mean(log π_old − log π_θ), grad_norm, v_loss = ½·mse``), also recorded
    in SB3's logger under ``kl/``; ``rollout_arrays`` (copies ``[n_steps, n_envs, ...]`` of the last rollout
    before shaping: ``obs, actions, logp`` (π_old), ``reward`` (the env's), ``starts``, ``ends``).
    """

    def __init__(self, policy: Any, env: Any, reference: Any = None, kl_placement: str = "none",
                 kl_estimator: str = "k1", kl_beta: float = 0.1, kl_controller: str = "fixed",
                 kl_target: float = 0.1, kl_horizon: float = 10000.0, kl_is_correction: bool = False,
                 baseline: str = "value", reward_scale: float = 1.0, **kwargs: Any):
        if kl_placement not in PLACEMENTS:
            raise ValueError(f"kl_placement must be one of {', '.join(PLACEMENTS)}; got {kl_placement!r}")
        if kl_estimator not in ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(ESTIMATORS)}; got {kl_estimator!r}")
        if kl_controller not in ("fixed", "adaptive"):
            raise ValueError(f"kl_controller must be fixed or adaptive; got {kl_controller!r}")
        if baseline not in ("value", "mean", "none"):
            raise ValueError(f"baseline must be value, mean or none; got {baseline!r}")
        if kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0; got {kl_beta!r}")
        if reference is None and (kl_placement != "none" or kl_controller == "adaptive"):
            raise ValueError(f"kl_placement={kl_placement!r} needs a reference policy (reference=...)")
        if "rollout_buffer_class" in kwargs:
            raise ValueError("KLRegularizedPPO uses its own rollout buffer class")
        self.kl_placement, self.kl_estimator, self.kl_beta = kl_placement, kl_estimator, float(kl_beta)
        self.kl_controller, self.kl_target, self.kl_horizon = kl_controller, float(kl_target), float(kl_horizon)
        self.kl_is_correction, self.baseline, self.reward_scale = bool(kl_is_correction), baseline, reward_scale
        self.rollout_stats: dict[str, float] = {}
        self.train_stats: dict[str, float] = {}
        self.rollout_arrays: dict[str, np.ndarray] = {}
        super().__init__(policy, env, rollout_buffer_class=ShapingRolloutBuffer, **kwargs)
        if isinstance(self.observation_space, spaces.Dict):
            raise ValueError("KLRegularizedPPO supports non-Dict observation spaces only")
        if not isinstance(self.action_space, spaces.Discrete | spaces.Box):
            raise ValueError(f"KLRegularizedPPO supports Discrete or Box actions; got {self.action_space}")
        self.reference = make_reference(reference, self.device) if reference is not None else None
        if self.kl_estimator == "full" and self.reference is not None and kl_placement != "none":
            self._check_full()

    def _setup_model(self) -> None:
        super()._setup_model()
        self.rollout_buffer.before_gae = self._before_gae

    def _check_full(self) -> None:
        """Fail at construction (not mid-training) when ``full`` cannot be computed for this reference."""
        obs = torch.as_tensor(self.observation_space.sample()[None], device=self.device).float()
        if isinstance(self.observation_space, spaces.Discrete):
            obs = obs.reshape(1, 1)
        with torch.no_grad():
            self.reference.kl(self.policy.get_distribution(obs), obs)

    # -- buffer → tensors ------------------------------------------------------------------------------------
    def _flat_obs_actions(self, buf: RolloutBuffer) -> tuple[Tensor, Tensor]:
        n = buf.buffer_size * buf.n_envs
        obs = torch.as_tensor(buf.observations.reshape((n, *buf.obs_shape)), device=self.device)
        actions = torch.as_tensor(buf.actions.reshape(n, -1), device=self.device)
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        return obs, actions

    def _coef(self) -> Tensor:
        """``[1, 4]``: β on this model's estimator (the ``coef`` of :func:`sim.kl.weighted_estimate`)."""
        c = torch.zeros(1, len(ESTIMATORS), device=self.device)
        c[0, ESTIMATORS.index(self.kl_estimator)] = self.kl_beta
        return c

    # -- KL in the reward, before GAE -----------------------------------------------------------------------
    def _before_gae(self, buf: RolloutBuffer, last_values: Tensor, dones: np.ndarray) -> None:
        """Shape ``buf.rewards`` (``reward_scale·r − β·k``), set mean/none baselines, record rollout stats."""
        raw = buf.rewards.copy()  # [n_steps, n_envs]; SB3 already added γ·V(terminal) at time-limit truncations
        ends = np.zeros_like(buf.episode_starts, dtype=bool)  # the step ends an episode
        ends[:-1], ends[-1] = buf.episode_starts[1:].astype(bool), np.asarray(dones, dtype=bool)
        n_ep = max(1, int(ends.sum()))
        stats: dict[str, float] = {"reward": float(raw.sum()) / n_ep, "episodes": float(n_ep),
                                   "episode_length": float(raw.size) / n_ep}
        shaped = self.reward_scale * raw if self.reward_scale != 1.0 else raw
        if self.reference is not None:
            obs, actions = self._flat_obs_actions(buf)
            with torch.no_grad():
                logp_old = torch.as_tensor(buf.log_probs.reshape(-1), device=self.device)
                ref_lp = self.reference.log_prob(obs, actions).to(logp_old.dtype)
                ks = all_estimates(logp_old, ref_lp).to(torch.float64)  # [N, 3]
                kfull = (self.reference.kl(self.policy.get_distribution(obs), obs).to(logp_old.dtype)
                         if self._full_available() else None)
                for i in range(3):
                    stats[f"kl_k{i + 1}"] = float(ks[:, i].sum()) / n_ep
                stats["kl_full_sampled"] = float(kfull.sum()) / n_ep if kfull is not None else math.nan
                if self.kl_placement == "reward":
                    pen = weighted_estimate(logp_old[None], ref_lp[None], self._coef(),
                                            None if kfull is None else kfull[None])[0]
                    shaped = shaped - pen.cpu().numpy().reshape(raw.shape).astype(raw.dtype)
        buf.rewards = np.ascontiguousarray(shaped, dtype=np.float32)
        self.rollout_arrays = {"obs": buf.observations.copy(), "actions": buf.actions.copy(),
                               "logp": buf.log_probs.copy(), "reward": raw,
                               "starts": buf.episode_starts.astype(bool), "ends": ends}
        if self.baseline == "mean":
            if not ends.all():
                raise ValueError("baseline='mean' needs a one-step env (every step ends an episode)")
            buf.values[:] = float(buf.rewards.mean())
            last_values.zero_()  # never used (every step ends an episode)
        elif self.baseline == "none":
            buf.values[:] = 0.0
            last_values.zero_()  # no bootstrap at the rollout's end either
        self.rollout_stats = stats
        for k, v in stats.items():
            self.logger.record(f"kl/{k}", v)

    _full_ok: bool | None = None

    def _full_available(self) -> bool:
        """Whether the exact KL can be computed for logging (checked once)."""
        if self._full_ok is None:
            try:
                self._check_full()
                self._full_ok = True
            except (ValueError, NotImplementedError):
                self._full_ok = False
        return self._full_ok

    # -- KL in the loss: SB3 2.9's PPO.train plus β·k outside the clip ----------------------------------------
    def train(self) -> None:
        """One PPO update on the rollout buffer (SB3 2.9's ``PPO.train``) with the KL term of the loss
        placement added outside the clipped surrogate; then the adaptive β controller."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)
        entropy_losses, pg_losses, value_losses, clip_fractions = [], [], [], []
        last: dict[str, list[float]] = {}
        in_loss = self.kl_placement == "loss" and self.kl_beta != 0
        coef = self._coef()
        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            last = {k: [] for k in ("pg_loss", "kl_loss", "clip_frac", "approx_kl", "grad_norm", "v_loss")}
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()
                obs = rollout_data.observations
                # evaluate_actions, keeping the distribution for the exact KL
                dist = self.policy.get_distribution(obs)
                log_prob = dist.log_prob(actions)
                entropy = dist.entropy()
                values = self.policy.predict_values(obs).flatten()
                advantages = rollout_data.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                ratio = torch.exp(log_prob - rollout_data.old_log_prob)
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -torch.min(policy_loss_1, policy_loss_2).mean()
                pg_losses.append(policy_loss.item())
                clip_fraction = torch.mean((torch.abs(ratio - 1) > clip_range).float()).item()
                clip_fractions.append(clip_fraction)
                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = rollout_data.old_values + torch.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf)
                value_loss = F.mse_loss(rollout_data.returns, values_pred)
                value_losses.append(value_loss.item())
                if entropy is None:
                    entropy_loss = -torch.mean(-log_prob)
                else:
                    entropy_loss = -torch.mean(entropy)
                entropy_losses.append(entropy_loss.item())
                # β·k outside the clip: gradient through log π_θ (full: through the exact KL)
                if in_loss:
                    ref_lp = self.reference.log_prob(obs, actions).to(log_prob.dtype)
                    k_full = self.reference.kl(dist, obs)[None] if self.kl_estimator == "full" else None
                    k = weighted_estimate(log_prob[None], ref_lp[None], coef, k_full,
                                          logp_old=rollout_data.old_log_prob[None] if self.kl_is_correction
                                          else None)[0]
                    kl_loss = k.mean()
                else:
                    kl_loss = torch.zeros((), device=self.device)
                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss + kl_loss
                with torch.no_grad():
                    log_ratio = log_prob - rollout_data.old_log_prob
                    approx_kl_div = torch.mean((torch.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)
                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break
                self.policy.optimizer.zero_grad()
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
                last["pg_loss"].append(policy_loss.item())
                last["kl_loss"].append(kl_loss.item())
                last["clip_frac"].append(clip_fraction)
                last["approx_kl"].append(float(-log_ratio.mean()))
                last["grad_norm"].append(float(grad_norm))
                last["v_loss"].append(0.5 * value_loss.item())
            self._n_updates += 1
            if not continue_training:
                break
        self.train_stats = {k: float(np.mean(v)) if v else math.nan for k, v in last.items()}
        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs) if approx_kl_divs else math.nan)
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        self.logger.record("kl/loss", self.train_stats["kl_loss"])
        self._control_beta()
        self.logger.record("kl/beta", self.kl_beta)

    def _control_beta(self) -> None:
        """Ziegler et al.'s proportional controller (the native ``BatchTrainer._control_beta``, one run)."""
        if self.kl_controller != "adaptive" or "kl_k1" not in self.rollout_stats:
            return
        err = min(max(self.rollout_stats["kl_k1"] / self.kl_target - 1.0, -0.2), 0.2)
        new_beta = self.kl_beta * (1.0 + err * self.rollout_stats["episodes"] / self.kl_horizon)
        if math.isfinite(new_beta):
            self.kl_beta = new_beta

    # -- one update at a time ---------------------------------------------------------------------------------
    def start(self, total_updates: int) -> None:
        """Prepare :meth:`update` (what ``learn`` does before its loop) for ``total_updates`` updates."""
        total = total_updates * self.n_steps * self.env.num_envs
        self._total_timesteps, self._callback = self._setup_learn(total, None, True, "KLRegularizedPPO", False)
        self._callback.on_training_start(locals(), globals())

    def update(self) -> bool:
        """One rollout and one PPO update (one iteration of ``learn``); ``False`` if a callback stopped it."""
        if not self.collect_rollouts(self.env, self._callback, self.rollout_buffer, n_rollout_steps=self.n_steps):
            return False
        self._update_current_progress_remaining(self.num_timesteps, self._total_timesteps)
        self.train()
        return True


# ------------------------------------------------------------------------------------------------------
# The reflab backend
# ------------------------------------------------------------------------------------------------------


class EndAtHorizon(gym.Wrapper):
    """Reports a time-limit end as ``terminated``: reflab's sequential envs carry time in the state, so the
    value after the horizon is 0 and SB3 must not bootstrap through it."""

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, bool(terminated or truncated), False, info


def make_shell(cfg: Config) -> gym.Env:
    """The gymnasium shell of ``cfg.env`` as the SB3 backend trains on it (state-index observations)."""
    import envs  # noqa: F401  registers reflab/*

    kwargs = {k: v for k, v in cfg.env.items() if k != "id"}
    if cfg.env["id"] == "gridworld":
        kwargs["obs"] = "index"  # tabular policy: the state index (one-hot in SB3), whatever the MLP features
    return EndAtHorizon(gym.make(GYM_ID[cfg.env["id"]], disable_env_checker=True, **kwargs))


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

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
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

    def exact_update(self, update: int) -> dict[str, Tensor]:
        raise ValueError("train.mode=exact is not available with train.backend=sb3")

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



__all__ = ["GYM_ID", "CallableReference", "EndAtHorizon", "KLRegularizedPPO", "PolicyReference", "Reference",
           "SB3Trainer", "ShapingRolloutBuffer", "TableReference", "build_model", "exact_kl", "make_reference",
           "make_shell", "policy_table", "rollout_shape"]
