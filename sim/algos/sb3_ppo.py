"""KLRegularizedPPO: reflab's KL placements inside stable-baselines3's PPO, for any gymnasium env.

:class:`KLRegularizedPPO` is a subclass of SB3's ``PPO`` for *any* gymnasium env with ``Discrete`` or ``Box``
actions. It keeps the policy near a frozen reference (:func:`make_reference`: an SB3 policy, a file written by
``model.save()``, or a callable ``(obs, actions) -> log-probs``) with the same ``kl.*`` settings as the native
engine: placement ``none | reward | loss``, estimator ``k1 | k2 | k3 | full``, β fixed or adaptive (Ziegler et
al.'s controller, as the engine's ``BatchTrainer._control_beta``).

- *Reward placement*: after each rollout and **before** SB3's GAE, the rollout buffer's rewards become
  ``reward_scale·r − β·k`` with ``k`` from the sampled action's ``log π_old`` (stored by SB3) and
  ``log π_ref`` (``full``: the exact KL of the state's action distribution), detached
  (:class:`ShapingRolloutBuffer`).
- *Loss placement*: ``train()`` is SB3 2.9's ``PPO.train`` with ``+ β·mean(k)`` added outside the clipped
  surrogate, the gradient flowing through ``log π_θ`` (``full``: through the exact KL); with
  ``kl_is_correction`` the importance-weighted forms of :func:`sim.engine.kl.weighted_estimate`.

The estimators are :mod:`sim.engine.kl`'s functions, not re-derived. ``train.backend: sb3`` trains reflab
runs with it (:mod:`sim.algos.sb3`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from torch import Tensor
from torch.nn import functional as F

from sim.config import ESTIMATORS, PLACEMENTS
from sim.engine.kl import all_estimates, full_kl, weighted_estimate

# ------------------------------------------------------------------------------------------------------
# Reference policies
# ------------------------------------------------------------------------------------------------------


def exact_kl(pi: torch.distributions.Distribution, ref: torch.distributions.Distribution) -> Tensor:
    """Exact KL(π‖π_ref) per state ``[N]`` between two torch distributions of batch ``[N]`` (or ``[N, d]``
    for SB3's diagonal Gaussians, summed over ``d``). Categoricals use :func:`sim.engine.kl.full_kl`."""
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
        """``[1, 4]``: β on this model's estimator (the ``coef`` of :func:`sim.engine.kl.weighted_estimate`)."""
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
