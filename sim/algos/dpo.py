"""Direct preference optimization on the discrete envs, batched over runs like the PPO engine (seed §6).

With ``train.algo: dpo`` every run gets its own dataset of ``dpo.pairs`` preference pairs: two episodes
from the same start state, both sampled from ``dpo.sampler`` (the reference by default), labelled by a
Bradley–Terry model on the env's noise-free reward, ``P(y₁ ≻ y₂) = σ((r(y₁) − r(y₂))/τ)`` with
``τ = dpo.bt_temperature`` (``r(y)`` = the episode's summed expected reward). The policy then minimizes,
over the stored pairs ``(y_w, y_l)``,

- DPO (seed eq. 52): ``−log σ(β·Δ)``, or
- IPO (Azar et al. 2023): ``(Δ − 1/(2β))²``,

with the log-ratio margin ``Δ = h(y_w) − h(y_l)``, ``h(y) = Σ_t log π_θ(a_t|s_t) − log π_ref(a_t|s_t)`` (the
sequence log-ratio; the dynamics cancel because they are deterministic, which the config enforces).

Optima (what ``tv_opt`` and ``opt_prob`` measure against, per run):

- DPO with every pair covered: the labels' implied reward is ``r/τ``, so the optimum is the KL-regularized
  one ``π* ∝ π_ref·e^{r/(τβ)}`` — on sequences the soft-value-iteration policy of :mod:`envs.tabular` with
  ``β_eff = τ·β``. With ``τ = 1`` it is exactly the PPO runs' π*.
- IPO: ``π ∝ π_ref·e^{g/β}`` with ``g(y) = E_{y'~μ} σ((r(y) − r(y'))/τ)`` (μ = the sampler); computed for
  one-state envs only (for sequences ``g`` is not a sum over steps), NaN elsewhere.

Everything else is :class:`sim.algos.discrete.DiscreteTrainer`'s: the policy and reference tables, the optimizer
(``train.optimizer``, ``train.lr``), divergence detection, ``exact_metrics`` (kl_true, entropy, tv_opt …),
the policy snapshots and the output tables; the dataset is returned as ``extra["preferences"]`` and written
as ``preferences.parquet``. Metrics add ``pref_loss`` (the loss on all pairs after the update), ``pref_acc``
(fraction of pairs whose margin ranks the preferred episode first; identical episodes count ½) and
``pref_margin`` (mean β·Δ); ``reward`` is NaN (no episodes are sampled while training) and
``trajectories.parquet`` is empty. Every random number comes from the run's counter-based stream
(:mod:`sim.engine.rng`), so a run gives the same result alone or in a batch.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor

import envs
from envs import tabular
from sim.algos.discrete import DiscreteTrainer
from sim.config import PPO_VARIANT_KEYS, Config, ConfigError, check_positive, set_keys
from sim.engine import rng
from sim.engine.loop import take_samples
from sim.engine.outputs import snapshot

#: Columns of ``preferences.parquet`` (one row per pair × side × step of the episode).
PREFERENCE_COLUMNS = ("pair", "chosen", "t", "state", "action", "reward", "return", "bt_prob")
_DATA_STREAM = 0xD0D0  # purpose tags of the run's random streams (distinct from the PPO engine's)
_SHUFFLE_STREAM = 0xD5F1


def _check_dpo(cfg: Config) -> None:
    d = cfg.dpo
    for key in ("beta", "pairs", "bt_temperature", "batch_size", "epochs"):
        check_positive(f"dpo.{key}", getattr(d, key))
    if (d.beta if d.beta is not None else cfg.kl.beta) <= 0:
        raise ConfigError(f"train.algo=dpo needs a positive β (dpo.beta or kl.beta); got {cfg.kl.beta!r}")
    mdp = envs.from_config(cfg.env).build()
    if isinstance(d.sampler, str):
        if d.sampler not in ("reference", "uniform"):
            raise ConfigError(f"dpo.sampler must be reference, uniform or a list of probabilities; got {d.sampler!r}")
    elif not (isinstance(d.sampler, list | tuple) and d.sampler
              and all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in d.sampler)
              and abs(sum(d.sampler) - 1.0) <= 1e-6):
        raise ConfigError(f"dpo.sampler must be reference, uniform or a list of probabilities summing to 1; "
                          f"got {d.sampler!r}")
    elif mdp.n_states != 1 or len(d.sampler) != mdp.n_actions:
        raise ConfigError(f"dpo.sampler as a list of probabilities needs a one-state env with {mdp.n_actions} "
                          f"actions (a bandit); got {list(d.sampler)} with env.id={cfg.env['id']!r}")
    if mdp.n_outcomes > 1:
        raise ConfigError(f"train.algo=dpo needs deterministic dynamics (its optimum is the soft-VI policy only "
                          f"then); env.id={cfg.env['id']!r} has random transitions with these env keys")
    if cfg.train.mode != "sampled":
        raise ConfigError("train.mode must be sampled with train.algo=dpo (the dataset is the sample)")
    if cfg.train.phases is not None:
        raise ConfigError("train.phases is not supported with train.algo=dpo (the preference data are fixed)")
    if cfg.kl.controller != "fixed":
        raise ConfigError("kl.controller must be fixed with train.algo=dpo")
    bad = set_keys(cfg, (*PPO_VARIANT_KEYS, "kl.value_clamp"))
    if bad:
        raise ConfigError(f"{bad[0]} has no effect with train.algo=dpo (a PPO setting)")


def sampler_logp(cfg: Config, mdp: tabular.TabularMDP) -> Tensor:
    """Log-probabilities ``[S, A]`` (float64) of the policy the preference pairs are sampled from."""
    S, A = mdp.n_states, mdp.n_actions
    sampler = cfg.dpo.sampler
    if sampler == "reference":
        return mdp.ref_logp.to(torch.float64)
    if sampler == "uniform":
        return torch.full((S, A), -math.log(A), dtype=torch.float64, device=mdp.ref_logp.device)
    probs = torch.tensor(sampler, dtype=torch.float64, device=mdp.ref_logp.device)
    return probs.log().view(1, A)  # a one-state env with A actions (checked by DPOTrainer.check_config)


def sample_preferences(core: tabular.TabularCore, sampler: Tensor, keys: Tensor, n_pairs: int,
                       temperature: float) -> dict[str, Tensor]:
    """Each run's preference dataset: ``n_pairs`` pairs of episodes from one start state, labelled by BT.

    Args:
        core: the env's batched sampler (deterministic dynamics).
        sampler: ``[S, A]`` log-probabilities of the sampling policy (shared by the runs).
        keys: ``[R]`` the runs' data keys (:func:`sim.engine.rng.run_keys`).
        n_pairs: pairs per run ``N``. temperature: BT temperature τ > 0.
    Returns:
        ``state, action`` ``[R, N, 2, H]`` int64, ``valid`` ``[R, N, 2, H]`` bool, ``reward`` ``[R, N, 2, H]``
        float64 (expected reward of each step), ``ret`` ``[R, N, 2]`` (episode return), ``bt_prob`` ``[R, N, 2]``
        (BT probability that the episode beats the other one). Side 0 is the preferred episode ``y_w``,
        side 1 the rejected ``y_l``.
    """
    mdp = core.mdp
    R, N, H, A, S = keys.shape[0], n_pairs, mdp.horizon, mdp.n_actions, mdp.n_states
    dev = keys.device
    key = rng.fold(keys, _DATA_STREAM)
    u_act = rng.uniform(rng.fold(key, 0), (N, 2, H))
    u_start = rng.uniform(rng.fold(key, 1), (N,))
    u_label = rng.uniform(rng.fold(key, 2), (N,))
    cdf = sampler.exp().cumsum(-1)  # [S, A]
    state = core.reset(u_start).unsqueeze(-1).expand(R, N, 2).contiguous()  # both episodes of a pair: one start
    shape = (R, N, 2, H)
    st = torch.zeros(shape, dtype=torch.long, device=dev)
    ac = torch.zeros(shape, dtype=torch.long, device=dev)
    rw = torch.zeros(shape, dtype=torch.float64, device=dev)
    valid = torch.zeros(shape, dtype=torch.bool, device=dev)
    alive = torch.ones(R, N, 2, dtype=torch.bool, device=dev)
    for t in range(H):
        s = state.clamp(max=S - 1)
        a = (u_act[..., t, None] >= cdf[s]).sum(-1).clamp_(max=A - 1)
        nxt, r, done = core.step(s, a, None)  # no draws: deterministic dynamics, noise-free reward (float64)
        st[..., t], ac[..., t], valid[..., t] = s, a, alive
        rw[..., t] = torch.where(alive, r, torch.zeros((), dtype=torch.float64, device=dev))
        alive = alive & ~done
        state = nxt
        if not bool(alive.any()):
            break
    ret = rw.sum(-1)  # [R, N, 2]
    p_first = torch.sigmoid((ret[..., 0] - ret[..., 1]) / temperature)  # [R, N]
    first_wins = u_label < p_first
    order = torch.stack([~first_wins, first_wins], dim=-1).long()  # side index of (winner, loser)
    out = {"state": st, "action": ac, "valid": valid, "reward": rw}
    out = {k: v.gather(2, order.view(R, N, 2, 1).expand(shape)) for k, v in out.items()}
    out["ret"] = ret.gather(2, order)
    p_w = torch.where(first_wins, p_first, 1 - p_first)
    out["bt_prob"] = torch.stack([p_w, 1 - p_w], dim=-1)
    return out


def preference_loss(margin: Tensor, beta: Tensor, is_ipo: Tensor) -> Tensor:
    """Per-pair loss ``[R, n]`` from log-ratio margins ``Δ [R, n]``: DPO ``−log σ(β·Δ)`` (= softplus(−β·Δ)),
    or IPO ``(Δ − 1/(2β))²`` where ``is_ipo [R]``; ``beta [R]``."""
    b = beta.view(-1, 1).to(margin.dtype)
    if not bool(is_ipo.any()):
        return torch.nn.functional.softplus(-b * margin)
    # each loss sees only its own runs' margins (the others get a harmless 0), so a run's overflow cannot
    # reach a batch-mate through the other loss's gradient (0·inf)
    ipo_run = is_ipo.view(-1, 1)
    zero = torch.zeros((), dtype=margin.dtype, device=margin.device)
    dpo = torch.nn.functional.softplus(-b * torch.where(ipo_run, zero, margin))
    ipo = (torch.where(ipo_run, margin, zero) - 0.5 / b).square()
    return torch.where(ipo_run, ipo, dpo)


def ipo_optimum(mdp: tabular.TabularMDP, ref_logp: Tensor, sampler: Tensor, beta: Tensor, temperature: float
                ) -> Tensor:
    """IPO's population optimum on a one-state env, ``[R, 1, A]``: ``π ∝ π_ref·e^{g/β}`` with
    ``g(a) = Σ_b μ(b)·σ((r_a − r_b)/τ)`` (``ref_logp [R, 1, A]``, ``sampler [1, A]``, ``beta [R]``)."""
    r = mdp.expected_reward[0].to(torch.float64)  # [A]
    g = (sampler[0].exp()[None, :] * torch.sigmoid((r[:, None] - r[None, :]) / temperature)).sum(-1)  # [A]
    logp = ref_logp + g.view(1, 1, -1) / beta.view(-1, 1, 1)
    return logp - torch.logsumexp(logp, dim=-1, keepdim=True)


class DPOTrainer(DiscreteTrainer):
    """DPO / IPO on a preference dataset per run; the rest (metrics, logs, outputs) is the discrete base's.
    It trains the policy only (no value function).

    One *update* is ``dpo.epochs`` passes over the run's ``dpo.pairs`` pairs in minibatches of
    ``dpo.batch_size`` (each run shuffles with its own stream); ``train.updates`` updates in all.
    """

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Ranges of the ``dpo`` keys and the combinations DPO does not support (one line each)."""
        super().check_config(cfg)
        _check_dpo(cfg)

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
        self._make_optimizer()
        betas = [c.dpo.beta if c.dpo.beta is not None else c.kl.beta for c in configs]
        self.rt.beta = torch.tensor(betas, dtype=torch.float64, device=device)
        self.is_ipo = torch.tensor([c.dpo.loss == "ipo" for c in configs], dtype=torch.bool, device=device)
        self.tau = float(self.cfg.dpo.bt_temperature)
        # The labels' implied reward is r/τ: the engine's soft-VI optimum of this MDP is then π_ref·e^{r/(τβ)},
        # the optimum DPO targets (exact_metrics' tv_opt and opt_prob use it). DPO has no reward phases.
        self._scaled_mdp = replace(self.mdp, reward=self.mdp.reward / self.tau)
        self.sampler = sampler_logp(self.cfg, self.mdp)
        data_seeds = [c.dpo.data_seed if c.dpo.data_seed is not None else c.seed for c in configs]
        self.data = sample_preferences(self.core, self.sampler, rng.run_keys(data_seeds, device),
                                       self.cfg.dpo.pairs, self.tau)
        self.env_steps += self.data["valid"].reshape(self.R, -1).sum(-1)
        self._sa = self.data["state"] * self.A + self.data["action"]  # flat (state, action) index [R, N, 2, H]

    # -- the loss ---------------------------------------------------------------------------------------
    def log_ratio_margin(self, idx: Tensor | None = None) -> Tensor:
        """``Δ = h(y_w) − h(y_l)`` ``[R, n]`` of the pairs ``idx [R, n]`` (all pairs if ``None``), with gradient."""
        lr_table = self.policy.table(self.params) - self._ref_table()  # [R, S, A]
        sa, valid = self._sa, self.data["valid"]
        if idx is not None:
            sa, valid = take_samples(sa, idx), take_samples(valid, idx)
        R, S, A = lr_table.shape
        steps = lr_table.reshape(R, S * A).gather(1, sa.reshape(R, -1)).view(sa.shape)
        h = torch.where(valid, steps, torch.zeros((), dtype=steps.dtype, device=steps.device)).sum(-1)  # [R, n, 2]
        return h[..., 0] - h[..., 1]

    def sampled_update(self, update: int) -> dict[str, Tensor]:
        d = self.cfg.dpo
        n = d.pairs
        bs = min(d.batch_size or n, n)
        n_chunks = math.ceil(n / bs)
        key = rng.fold(rng.fold(self.rt.keys, update), _SHUFFLE_STREAM) if n_chunks > 1 else self.rt.keys
        for epoch in range(d.epochs):
            if n_chunks > 1:
                perm = torch.argsort(rng.uniform(rng.fold(key, epoch), (n,)), dim=-1)  # [R, n]
                chunks: list[Tensor | None] = list(torch.tensor_split(perm, n_chunks, dim=1))
            else:
                chunks = [None]
            for i, chunk in enumerate(chunks):
                margin = self.log_ratio_margin(chunk)
                loss = preference_loss(margin, self.rt.beta, self.is_ipo).mean(-1)
                last = epoch == d.epochs - 1 and i == len(chunks) - 1
                norm = self._apply_grads(loss, update, want_norm=last)
        if not self._logs_at(update):
            return {}
        with torch.no_grad():  # diagnostics on the whole dataset after the update
            margin = self.log_ratio_margin()
            loss = preference_loss(margin, self.rt.beta, self.is_ipo).mean(-1)
        nan = torch.full((self.R,), float("nan"), dtype=torch.float64, device=self.device)
        acc = ((margin > 0).double() + 0.5 * (margin == 0).double()).mean(-1)  # identical episodes: a tie
        return {"reward": nan, "pref_loss": loss.to(torch.float64), "pref_acc": acc,
                "pref_margin": (self.rt.beta.view(-1, 1) * margin.to(torch.float64)).mean(-1), "grad_norm": norm}

    # -- the optimum it targets -------------------------------------------------------------------------
    def _on_phase(self) -> None:
        """Nothing to do: DPO runs one phase (the config rejects ``train.phases``) on the τ-scaled MDP set in
        ``__init__``."""

    def _optimum(self, ref64: Tensor) -> Tensor:
        opt = super()._optimum(ref64)
        if not bool(self.is_ipo.any()):
            return opt
        if self.S == 1:
            ipo = ipo_optimum(self.mdp, ref64, self.sampler, self.rt.beta, self.tau)
        else:  # no per-step closed form on sequences
            ipo = torch.full_like(opt, float("nan"))
        return torch.where(self.is_ipo.view(-1, 1, 1), ipo, opt)

    # -- outputs ----------------------------------------------------------------------------------------
    def preference_frame(self, run: int) -> pd.DataFrame:
        """Run ``run``'s dataset, long format: one row per pair × side × step (columns
        :data:`PREFERENCE_COLUMNS`; ``chosen`` marks the preferred episode, ``return`` its summed reward and
        ``bt_prob`` the BT probability that it beats the other episode of the pair)."""
        d = snapshot({k: self.data[k][run] for k in ("state", "action", "valid", "reward", "ret", "bt_prob")})
        pair, side, t = np.nonzero(d["valid"])
        return pd.DataFrame({"pair": pair.astype(np.int64), "chosen": side == 0, "t": t.astype(np.int64),
                             "state": d["state"][pair, side, t], "action": d["action"][pair, side, t],
                             "reward": d["reward"][pair, side, t], "return": d["ret"][pair, side],
                             "bt_prob": d["bt_prob"][pair, side]})

    def _extra_tables(self, run: int) -> dict[str, pd.DataFrame]:
        """``preferences``: the run's dataset (:meth:`preference_frame`), written as ``preferences.parquet``."""
        return {"preferences": self.preference_frame(run)}
