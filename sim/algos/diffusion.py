"""PPO with a KL to the reference denoiser on the toy diffusion chain (DDPO/DPOK-style diffusion RLHF).

Each run's step ``t`` is the Gaussian policy ``x_{t−1} ~ N(μ_θ(x_t, t), σ_t² I)`` with
``μ_θ(x_t, t) = μ_ref(x_t, t) + f_θ(x_t, t)``: the exact reference denoiser of :mod:`envs.diffusion_chain`
plus a learned per-run correction ``f_θ`` that starts at 0 (so π_θ = π_ref at update 0), and the
reference's fixed σ_t. ``train.policy`` chooses ``f_θ``:

* ``tabular``: per-step affine, ``f_θ(x, t) = b_t + g_t ⊙ x`` (``bias``, ``gain`` ``[R, T, d]``);
* ``mlp``: a one-hidden-layer tanh MLP of ``(x, one-hot t)`` (``train.hidden`` units, output layer zero).

An episode is the T denoising steps; the only task reward is ``r(x_0)`` at the last step. The KL estimators
are the usual ones on the Gaussian log-densities of the sampled steps (k1 = δ, k2 = ½δ², k3 = e^{−δ} − 1 + δ,
δ = log π_θ(x_{t−1}|x_t) − log π_ref(x_{t−1}|x_t)); ``full`` is the closed-form per-step KL
``‖μ_θ − μ_ref‖²/(2σ_t²)`` (seed eq. 39, gradient through μ_θ). Placements, PPO epochs, the β controller,
reference schedules and phases are the engine's (:mod:`sim.engine.loop`): KL in the reward is a per-step penalty
in the return-to-go (γ = ``train.gamma``, λ = 1), so a step's penalty reaches the earlier steps; the
baseline is the batch mean of the return-to-go per run and step (``train.baseline`` ``auto``/``mean``) or
none.

Metrics after each logged update come from a fresh evaluation batch of ``max(1024, train.batch)`` chains
drawn from the policy (own random stream, so they are Monte-Carlo estimates, not exact):

* ``kl_true``: sequence KL(P_θ(τ) ‖ P_ref(τ)) = E_{τ~P_θ} Σ_t ‖μ_θ − μ_ref‖²/(2σ_t²) — closed form per step,
  averaged over the policy's own trajectories (exact by the chain rule up to that average);
* ``mode_frac_<m>``: mean posterior probability ``p_data(m | x_0)`` of mixture component m over the x_0;
  ``ref_mode_frac_<m>`` and ``opt_mode_frac_<m>`` the same statistic for the reference chain and for the
  KL-optimal tilt ``p* ∝ p_ref·e^{scale·r/β}`` (importance weights on 20 000 reference-chain samples shared
  by every run; during a reward-off phase the tilt is the reference); ``tv_opt`` = ½ Σ_m |frac − opt frac|;
* ``x0_mean`` / ``opt_x0_mean`` (dimension 0) and ``opt_mean_error`` = ‖E_θ[x_0] − E_*[x_0]‖;
* ``return_true``: mean noise-free reward of the evaluation batch; ``entropy``, ``min_prob``, ``support``,
  ``kl_forward``: NaN (the step std is fixed, so the path entropy is a constant).

Tilt columns are NaN for runs with β = 0 and for reference schedules other than ``frozen`` (the tilt would be
relative to a moving reference). ``policy.parquet`` holds the mode mix in the bandit's layout (``state`` 0,
``action`` = mixture component, ``prob`` / ``ref_prob`` / ``opt_prob`` = policy / reference / tilt mode
fractions), so the report's final-policy figure draws it; ``samples.parquet`` (``RunOutput.extra``) holds
512 x_0 samples of each policy snapshot (``update, sample, x[, y], reward``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor

import envs
from envs.diffusion_chain import DiffusionChainCore, density_grid, tilt_weights
from sim.algos import diffusion_loss
from sim.algos.gaussian import check_continuous_ppo
from sim.config import Config, ConfigError
from sim.engine import rng
from sim.engine.kl import all_estimates
from sim.engine.loop import BatchTrainer
from sim.engine.outputs import snapshot
from sim.engine.placement import kl_loss_term
from sim.engine.ppo import clip_bounds, clipped_surrogate, gae, masked_mean, normalize_per_run, ppo_diagnostics

EVAL_STREAM = 0x7E57
TILT_SAMPLES = 20_000
TILT_SEED = 0xD1FF
SAMPLES_LOGGED = 512


class StepCorrection:
    """The learned correction ``f_θ(x, step) [R, n, d]`` of the reference denoiser's mean, per run.

    ``step`` is the step index ``i = T − t`` (0 for the first denoising step from x_T).
    """

    def __init__(self, kind: str, dim: int, steps: int, hidden: int):
        self.kind, self.dim, self.steps, self.hidden = kind, dim, steps, hidden

    def init_params(self, n_runs: int, keys: Tensor, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Parameters whose correction is exactly 0 (π_θ = π_ref at update 0)."""
        d, T = self.dim, self.steps
        if self.kind == "tabular":
            return {"bias": torch.zeros(n_runs, T, d, dtype=dtype, device=device),
                    "gain": torch.zeros(n_runs, T, d, dtype=dtype, device=device)}
        n_in, H = d + T, self.hidden
        w1 = rng.normal(rng.fold(keys, 0x3117), (n_in, H), dtype=dtype) / math.sqrt(n_in)
        return {"w1": w1, "b1": torch.zeros(n_runs, H, dtype=dtype, device=device),
                "w2": torch.zeros(n_runs, H, d, dtype=dtype, device=device),
                "b2": torch.zeros(n_runs, d, dtype=dtype, device=device)}

    def __call__(self, params: dict[str, Tensor], x: Tensor, step: Tensor | int) -> Tensor:
        """Correction ``[R, n, d]`` at states ``x [R, n, d]`` of step ``step`` (int, or ``[R, n]`` long)."""
        if self.kind == "tabular":
            if isinstance(step, int):
                return params["bias"][:, step].unsqueeze(1) + params["gain"][:, step].unsqueeze(1) * x
            idx = step.unsqueeze(-1).expand(-1, -1, self.dim)
            return params["bias"].gather(1, idx) + params["gain"].gather(1, idx) * x
        if isinstance(step, int):
            onehot = torch.zeros(x.shape[:-1] + (self.steps,), dtype=x.dtype, device=x.device)
            onehot[..., step] = 1.0
        else:
            onehot = torch.nn.functional.one_hot(step, self.steps).to(x.dtype)
        h = torch.tanh(torch.baddbmm(params["b1"].unsqueeze(1), torch.cat([x, onehot], -1), params["w1"]))
        return torch.baddbmm(params["b2"].unsqueeze(1), h, params["w2"])


class DiffusionTrainer(BatchTrainer):
    """The batched trainer for ``env.id = diffusion_chain`` (see the module docstring)."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Sampled mode, a correction started at 0 (π_θ = π_ref), no learned value, no entropy bonus."""
        check_continuous_ppo(cfg)
        t, env = cfg.train, cfg.env["id"]
        if t.baseline == "value":
            raise ConfigError(f"train.baseline must be auto, mean or none for env.id={env!r}; got 'value'")
        if t.ent_coef != 0:
            raise ConfigError(f"train.ent_coef must be 0 for env.id={env!r} (the step std is fixed, so the "
                              f"entropy is constant); got {t.ent_coef!r}")

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
        cfg = self.cfg
        self.env_params = envs.from_config(cfg.env)
        self.core: DiffusionChainCore = self.env_params.core(device)
        self.d, self.T = self.env_params.dim, self.env_params.steps
        self.policy = StepCorrection(cfg.train.policy, self.d, self.T, cfg.train.hidden)
        self.params = self.policy.init_params(self.R, self.rt.keys, self.dtype, device)
        self.ref_params = {k: v.clone() for k, v in self.params.items()}
        self.trainable = list(self.params)
        for k in self.trainable:
            self.params[k].requires_grad_(True)
        self._make_optimizer()
        self.baseline = "mean" if cfg.train.baseline == "auto" else cfg.train.baseline
        self.fast_loss = diffusion_loss.applies(cfg.train.policy, self.d, cfg.train.minibatches, self.clamp, self.rt)
        self._loss_consts: dict[str, Tensor] | None = None
        # σ_t and σ_t² per step index i = T − t, in the training dtype
        self.var = torch.stack([self.core.step_var[self.T - i] for i in range(self.T)]).to(device, self.dtype)
        self.std_steps = torch.stack([self.var[i].sqrt() for i in range(self.T)]).view(self.T, 1)  # σ_i [T, 1]
        self._init_tilt()
        self._eval_cache: tuple[int, dict[str, Tensor]] | None = None
        self._last_update = 0
        self.sample_log: list[tuple[int, np.ndarray, np.ndarray]] = []

    # -- the tilt oracle -----------------------------------------------------------------------------------
    def _init_tilt(self) -> None:
        """Reference-chain samples (one fixed stream shared by every run) for the tilt's importance weights."""
        key = rng.run_keys([TILT_SEED], self.device)
        noise = rng.normal(key, (TILT_SAMPLES, self.T + 1, self.d))[0]
        with torch.no_grad():
            x0 = self.core.sample_reference(TILT_SAMPLES, noise=noise)
            self.tilt_reward = self.core.reward(x0)  # [n] float64
            self.tilt_resp = self.core.responsibilities(x0, 0)  # [n, M]
            self.tilt_x0 = x0
        self.ref_mode_frac = self.tilt_resp.mean(0)  # [M]
        self.ref_x0_mean = x0.mean(0)
        self._tilt_cache: dict[tuple[float, float], tuple[Tensor, Tensor]] = {}

    def _tilt(self) -> tuple[Tensor, Tensor]:
        """Tilt mode fractions ``[R, M]`` and x_0 mean ``[R, d]`` for the current β and reward scale (NaN where
        undefined: β = 0 or a moving reference).

        Each run's tilt is computed from its own β alone, with the same 1-run shapes whatever the batch (a
        batched product would sum in an order that depends on the batch size), once per (β, scale)."""
        M = self.core.n_modes
        beta = self.rt.beta.to(self.device, torch.float64)
        ok = beta > 0
        if self.cfg.reference.schedule != "frozen":
            ok = torch.zeros_like(ok)
        if self.reward_scale == 0:
            frac = self.ref_mode_frac.expand(self.R, M).clone()
            mean = self.ref_x0_mean.expand(self.R, self.d).clone()
        else:
            rows = [self._tilt_of(b, self.reward_scale) for b in beta.clamp(min=1e-12).tolist()]
            frac = torch.stack([f for f, _ in rows])
            mean = torch.stack([m for _, m in rows])
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        return torch.where(ok[:, None], frac, nan), torch.where(ok[:, None], mean, nan)

    def _tilt_of(self, beta: float, scale: float) -> tuple[Tensor, Tensor]:
        """Mode fractions ``[M]`` and x_0 mean ``[d]`` of the tilt ``p_ref·e^{scale·r/β}`` (cached)."""
        key = (beta, scale)
        if key not in self._tilt_cache:
            w = tilt_weights(scale * self.tilt_reward, beta).unsqueeze(0)  # [1, n]: the same product for every run
            self._tilt_cache[key] = ((w @ self.tilt_resp)[0], (w @ self.tilt_x0)[0])
        return self._tilt_cache[key]

    # -- rollouts -----------------------------------------------------------------------------------------------
    def _rollout(self, key: Tensor, N: int, keep: tuple[str, ...] = ("x", "a", "base", "mu", "mu_ref")
                 ) -> dict[str, Tensor]:
        """``N`` chains per run from the current policy (no gradient), stacked per step index ``i = T − t``.

        Returns those of ``x`` (x_t), ``a`` (x_{t−1}), ``base`` (μ_ref of the exact denoiser), ``mu`` (μ_θ),
        ``mu_ref`` (the reference's mean, = base unless the reference schedule moved it; then the same tensor
        as ``base`` if both are kept) named in ``keep``, each ``[R, N, T, d]``; and ``x0`` ``[R, N, d]``.
        """
        R, d, T = self.R, self.d, self.T
        x = rng.normal(rng.fold(key, 0), (N, d), dtype=self.dtype)
        noise = rng.normal(rng.fold(key, 1), (N, T, d), dtype=self.dtype).mul_(self.std_steps)  # σ_i·ε_i
        frozen_ref = self.cfg.reference.schedule == "frozen"
        # buffers written in place step by step; x_t is filled from a = x_{t−1} at the end; a frozen reference's
        # correction is exactly 0 (zero output layer), so its μ_ref is the base denoiser (the same buffer)
        names = set(keep) | ({"a"} if "x" in keep else set())
        if frozen_ref and "mu_ref" in names:
            names = (names - {"mu_ref"}) | {"base"}
        buf = {k: torch.empty(R, N, T, d, dtype=self.dtype, device=self.device) for k in names}
        x_T = x
        params = {k: v.detach() for k, v in self.params.items()}  # views without autograd bookkeeping
        with torch.no_grad():
            for i in range(T):
                base = self.core.ref_mean(x, T - i, out=buf["base"][:, :, i] if "base" in buf else None)
                corr = self.policy(params, x, i)
                mu = torch.add(base, corr, out=buf["mu"][:, :, i]) if "mu" in buf else base + corr
                if not frozen_ref and "mu_ref" in buf:
                    torch.add(base, self.policy(self.ref_params, x, i), out=buf["mu_ref"][:, :, i])
                x = torch.add(mu, noise[:, :, i], out=buf["a"][:, :, i]) if "a" in buf else mu + noise[:, :, i]
        out = {k: buf[k] for k in keep if k in buf}
        if "mu_ref" in keep and frozen_ref:
            out["mu_ref"] = buf["base"]
        if "x" in keep:
            out["x"] = torch.cat([x_T.unsqueeze(2), buf["a"][:, :, :-1]], dim=2)
        out["x0"] = x
        return out

    # -- one PPO update ----------------------------------------------------------------------------------------
    def sampled_update(self, update: int) -> dict[str, Tensor]:
        tr, rt = self.cfg.train, self.rt
        R, N, T, d = self.R, tr.batch, self.T, self.d
        self._last_update = update
        key = rng.fold(rt.keys, update)
        roll = self._rollout(key, N)
        t = torch.arange(T, 0, -1, device=self.device)  # the env's t of step index i = T − i
        with torch.no_grad():
            logp = self.core.log_prob(roll["a"], roll["mu"], t)  # [R, N, T]
            ref_logp = self.core.log_prob(roll["a"], roll["mu_ref"], t)
            k_full = self.core.step_kl(roll["mu"], roll["mu_ref"], t)
            z = rng.normal(rng.fold(key, 3), (N,), dtype=torch.float64) if self.core.reward_noise > 0 else None
            reward = self.core.noisy_reward(roll["x0"].to(torch.float64), z).to(self.dtype)  # [R, N]
        valid = torch.ones(R, N, T, dtype=torch.bool, device=self.device)
        done = torch.zeros_like(valid)
        done[..., -1] = True
        ref_c = self.clamp(logp, ref_logp, valid)
        step_reward = torch.zeros(R, N, T, dtype=self.dtype, device=self.device)
        step_reward[..., -1] = self.reward_scale * reward
        shaped = step_reward - diffusion_loss.reward_penalty(logp, ref_c, k_full, rt)
        zeros = torch.zeros_like(shaped)
        ret = gae(shaped, zeros, zeros, done, valid, tr.gamma, 1.0)
        adv = ret - ret.mean(1, keepdim=True) if self.baseline == "mean" else ret
        if tr.norm_adv:
            adv = normalize_per_run(adv, valid)
        flat = {"x": roll["x"], "a": roll["a"], "base": roll["base"], "mu_ref": roll["mu_ref"]}
        flat = {k: v.reshape(R, N * T, d) for k, v in flat.items()}
        flat.update({k: v.reshape(R, N * T) for k, v in
                     (("logp", logp), ("ref_logp", ref_logp), ("adv", adv.detach()), ("valid", valid))})
        if self.fast_loss:
            consts = self._loss_consts
            if consts is None or consts["count"].shape[0] != R or consts["var"].shape[1] != N:
                consts = self._loss_consts = diffusion_loss.step_constants(
                    self._steps(R, N), flat["valid"], self.core.step_var, T, self.dtype)
            stats = self._ppo_epochs(flat, update, self._ppo_loss_fast,
                                     prepare=lambda mb: diffusion_loss.prepare(mb, consts, rt))
        else:
            flat["step"] = self._steps(R, N)
            stats = self._ppo_epochs(flat, update, self._ppo_loss)
        self.env_steps += N * T
        logs = self._logs_at(update)
        out: dict[str, Tensor] = {}
        if logs or bool(rt.adaptive.any()):  # the β controller needs kl_k1; the rest is only logged
            ks = all_estimates(logp, ref_logp).to(torch.float64).sum(2).mean(1)  # per-episode sums, batch mean
            if logs:
                out["reward"] = reward.to(torch.float64).mean(1)
            out.update(kl_k1=ks[:, 0], kl_k2=ks[:, 1], kl_k3=ks[:, 2])
            if logs:
                out.update(kl_full_sampled=k_full.to(torch.float64).sum(2).mean(1),
                           episode_length=torch.full((R,), float(T), dtype=torch.float64, device=self.device))
            self._control_beta(out["kl_k1"], N)
        out.update(stats)
        n_traj = self.cfg.log.trajectories
        if n_traj > 0 and logs:
            traj_reward = torch.zeros_like(step_reward[:, :n_traj])  # the unscaled task reward, at t = 1
            traj_reward[..., -1] = reward[:, :n_traj]
            steps = {"valid": valid[:, :n_traj], "action": roll["a"][:, :n_traj, :, 0], "reward": traj_reward,
                     "logp": logp[:, :n_traj], "ref_logp": ref_logp[:, :n_traj]}
            rec: dict = snapshot(steps)
            rec.update(update=update, state=np.broadcast_to(np.arange(T, 0, -1, dtype=np.int64),
                                                            (R, min(n_traj, N), T)).copy())
            self.traj_log.append(rec)
        return out

    def _steps(self, R: int, N: int) -> Tensor:
        """The step index ``i`` of every sample ``[R, N·T]`` (episode-major)."""
        return torch.arange(self.T, device=self.device).expand(R, N, self.T).reshape(R, N * self.T)

    def _ppo_loss(self, mb: dict[str, Tensor], want_diag: bool = True, want_loss: bool = True
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        tr, rt = self.cfg.train, self.rt
        valid = mb["valid"]
        mu = mb["base"] + self.policy(self.params, mb["x"], mb["step"])
        t = self.T - mb["step"]
        lp = self.core.log_prob(mb["a"], mu, t)
        pg, clipped = clipped_surrogate(lp, mb["logp"], mb["adv"], tr.clip, *clip_bounds(tr.clip, tr.clip_low,
                                                                                              tr.clip_high))
        ref_lp = self.clamp(lp, mb["ref_logp"], valid)
        kl_term = kl_loss_term(lp, mb["logp"], ref_lp, lambda: self.core.step_kl(mu, mb["mu_ref"], t), rt)
        diag = ppo_diagnostics(pg, kl_term, clipped, mb["logp"] - lp, valid) if want_diag else {}
        return masked_mean(pg + kl_term, valid), diag

    def _ppo_loss_fast(self, prep: dict, want_diag: bool = True, want_loss: bool = True
                       ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """:meth:`_ppo_loss` and its gradients by :mod:`sim.algos.diffusion_loss` (bitwise autograd's)."""
        tr = self.cfg.train
        lo, hi = clip_bounds(tr.clip, tr.clip_low, tr.clip_high)
        out = (self.opt.grad_buffer("bias"), self.opt.grad_buffer("gain")) if self.opt.kind == "adam" else None
        return diffusion_loss.loss_and_grads(prep, self.params["bias"], self.params["gain"], self.alive, tr.clip,
                                             lo, hi, want_diag, out, want_loss)

    # -- evaluation metrics ---------------------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, Tensor]:
        """Metrics of the current policy from a fresh evaluation batch (cached per update)."""
        u = self._last_update
        if self._eval_cache is not None and self._eval_cache[0] == u:
            return self._eval_cache[1]
        n = max(1024, self.cfg.train.batch)
        key = rng.fold(rng.fold(self.rt.keys, EVAL_STREAM), u)
        roll = self._rollout(key, n, keep=("mu", "mu_ref"))
        mu, mu_ref = roll["mu"].to(torch.float64), roll["mu_ref"].to(torch.float64)
        x0 = roll["x0"].to(torch.float64)
        t = torch.arange(self.T, 0, -1, device=self.device)
        kl = self.core.step_kl(mu, mu_ref, t).sum(-1).mean(1)  # [R]
        frac = self.core.responsibilities(x0, 0).mean(1)  # [R, M]
        opt_frac, opt_mean = self._tilt()
        x0_mean = x0.mean(1)
        nan = torch.full((self.R,), float("nan"), dtype=torch.float64, device=self.device)
        out = {"kl_true": kl, "kl_forward": nan, "entropy": nan, "min_prob": nan, "support": nan,
               "return_true": self.core.reward(x0).mean(1),
               "tv_opt": 0.5 * (frac - opt_frac).abs().sum(-1),
               "x0_mean": x0_mean[:, 0], "opt_x0_mean": opt_mean[:, 0],
               "opt_mean_error": (x0_mean - opt_mean).norm(dim=-1)}
        for m in range(self.core.n_modes):
            out[f"mode_frac_{m}"] = frac[:, m]
            out[f"ref_mode_frac_{m}"] = self.ref_mode_frac[m].expand(self.R).clone()
            out[f"opt_mode_frac_{m}"] = opt_frac[:, m]
        k = min(SAMPLES_LOGGED, n)
        out["_x0"] = x0[:, :k]
        out["_frac"], out["_opt_frac"] = frac, opt_frac
        self._eval_cache = (u, out)
        return out

    def exact_metrics(self) -> dict[str, Tensor]:
        return {k: v for k, v in self._evaluate().items() if not k.startswith("_")}

    def policy_tables(self) -> dict[str, np.ndarray]:
        ev = self._evaluate()
        x0 = ev["_x0"]
        self.sample_log.append((self._last_update, snapshot({"x0": x0})["x0"],
                                snapshot({"r": self.core.reward(x0)})["r"]))
        M = self.core.n_modes
        return snapshot({"prob": ev["_frac"], "ref_prob": self.ref_mode_frac.expand(self.R, M),
                         "opt_prob": ev["_opt_frac"]})

    # -- outputs -------------------------------------------------------------------------------------------------
    def policy_frame(self, run: int) -> pd.DataFrame:
        M = self.core.n_modes
        dv = int(self.diverged_at[run])
        logs = [(u, tabs) for u, tabs in self.policy_log if dv < 0 or u <= dv]
        frame = {"update": np.repeat(np.array([u for u, _ in logs], dtype=np.int64), M),
                 "state": np.zeros(len(logs) * M, dtype=np.int64),
                 "action": np.tile(np.arange(M, dtype=np.int64), len(logs))}
        for k in ("prob", "ref_prob", "opt_prob"):
            frame[k] = np.concatenate([tabs[k][run] for _, tabs in logs])
        return pd.DataFrame(frame)

    def samples_frame(self, run: int) -> pd.DataFrame:
        """x_0 samples of each policy snapshot: ``update, sample, x`` (dimension 0), ``y`` (dimension 1 if
        d ≥ 2), ``reward`` (noise-free, unscaled)."""
        dv = int(self.diverged_at[run])
        logs = [rec for rec in self.sample_log if dv < 0 or rec[0] <= dv]
        k = logs[0][1].shape[1]
        frame = {"update": np.repeat(np.array([u for u, _, _ in logs], dtype=np.int64), k),
                 "sample": np.tile(np.arange(k, dtype=np.int64), len(logs)),
                 "x": np.concatenate([x0[run, :, 0] for _, x0, _ in logs])}
        if self.d >= 2:
            frame["y"] = np.concatenate([x0[run, :, 1] for _, x0, _ in logs])
        frame["reward"] = np.concatenate([r[run] for _, _, r in logs])
        return pd.DataFrame(frame)

    def density_frame(self, run: int) -> pd.DataFrame:
        """Dimension-0 densities on a grid: ``x, data`` (p_data) and ``tilt`` (p_data·e^{r/β}, the run's
        initial β, reward scale of the first rewarded phase; NaN for β = 0)."""
        beta = float(self.configs[run].kl.beta)
        scales = [p.reward_scale for p in self.cfg.train.phase_list() if p.reward_scale != 0]
        scale = scales[0] if scales else 0.0
        xs, data, tilt = density_grid(self.env_params, beta if beta > 0 else None, reward_scale=scale)
        if beta <= 0:
            tilt = np.full_like(tilt, np.nan)
        return pd.DataFrame({"x": xs, "data": data, "tilt": tilt})

    def _extra_tables(self, run: int) -> dict[str, pd.DataFrame]:
        """``samples`` and ``density`` (the density grid is shared by runs with the same β)."""
        beta = float(self.configs[run].kl.beta)
        cache = self.__dict__.setdefault("_density_cache", {})
        if beta not in cache:
            cache[beta] = self.density_frame(run)
        return {"samples": self.samples_frame(run), "density": cache[beta]}
