"""PPO on the discrete envs (bandit, gridworld, token tree) with tabular or MLP policies.

One sampled update, in the order of this file: :meth:`PPOTrainer.sampled_update` samples ``train.batch``
episodes per run (:meth:`~PPOTrainer._collect`), finds the (run, state) rows they visited
(:func:`~sim.engine.rows.visited_rows`), puts the KL in the reward and computes returns and advantages
(:meth:`~PPOTrainer._shape_and_advantage`), sums the samples per (state, action) (:meth:`~PPOTrainer._group`),
then runs ``train.epochs`` passes of the clipped loss with the KL in the loss on those sums
(:meth:`~PPOTrainer._ppo_loss_and_grads`, gradients derived by hand for tabular policies;
:meth:`~PPOTrainer._ppo_loss` through autograd for MLPs). ``train.mode: exact`` replaces the update by the
expected gradient of the same placement × estimator (:meth:`~PPOTrainer.exact_update`).
"""

from __future__ import annotations

import torch
from torch import Tensor

import envs
from envs import tabular
from sim.algos.discrete import DiscreteTrainer
from sim.config import Config, ConfigError
from sim.engine import policies
from sim.engine.exact import exact_loss
from sim.engine.kl import all_estimates, columns, full_kl, full_kl_slope, masked_product
from sim.engine.loop import FINITE
from sim.engine.outputs import snapshot
from sim.engine.placement import kl_loss_term, kl_loss_term_and_slope, kl_reward_penalty, reward_weights
from sim.engine.policies import MLPValue, TabularValue, gather_rows, log_softmax_action_major, sum_actions
from sim.engine.ppo import (
    advantages,
    batch_aggregation,
    clip_bounds,
    clipped_fraction,
    counted,
    merge_runs,
    normalize_per_run,
    resolve_baseline,
    run_masks,
)
from sim.engine.rollout import Episodes, sample_episodes
from sim.engine.rows import (
    ROW_PAD,
    RunsMemo,
    block_columns,
    block_plans,
    finite_rows,
    per_run_sum,
    sampled_kl_sums,
    step_visits,
    take_valid,
    visited_rows,
)
from sim.engine.staleness import BehaviourPolicies
from sim.engine.steps import gae_on_steps, layered_from_start, per_run_in_sample_order


class PPOTrainer(DiscreteTrainer):
    """PPO with every KL placement × estimator on a discrete env (see the module docstring)."""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """What PPO on a discrete env cannot run: in exact mode, a random lag, REINFORCE++ (its batch
        normalisation has no expected update by enumeration), GRPO beyond one-state one-step envs, and a loss
        aggregation other than ``token-mean`` on sequences."""
        super().check_config(cfg)
        t = cfg.train
        if t.mode != "exact":
            return
        if t.staleness_dist != "fixed":
            raise ConfigError("train.staleness_dist=uniform needs train.mode=sampled (exact mode follows one fixed "
                              "lag)")
        if t.advantage == "reinforce_pp":
            raise ConfigError("train.advantage=reinforce_pp has no exact mode (its batch normalisation); use "
                              "train.mode=sampled")
        mdp = envs.from_config(cfg.env).build()
        one_step = mdp.horizon == 1
        if t.advantage == "grpo" and not (one_step and mdp.n_states == 1):
            raise ConfigError(f"train.advantage=grpo in train.mode=exact needs a one-state one-step env (a bandit: "
                              f"group compositions are enumerated); got env.id={cfg.env['id']!r}")
        aggs = {t.loss_agg, cfg.kl.loss_agg or t.loss_agg}
        if not one_step and aggs != {"token-mean"}:
            raise ConfigError(f"train.loss_agg / kl.loss_agg other than token-mean need train.mode=sampled on "
                              f"env.id={cfg.env['id']!r} (exact mode weighs steps by the state occupancy)")

    def __init__(self, configs: list[Config], device: torch.device):
        super().__init__(configs, device)
        cfg = self.cfg
        self.baseline = resolve_baseline(cfg.train.baseline, self.H)
        if self.baseline == "value":
            vf = (MLPValue(self.mdp.features, cfg.train.hidden) if cfg.train.policy == "mlp"
                  else TabularValue(self.S))
            self.value_fn = vf
            vparams = vf.init_params(self.R, self.dtype, device, self.rt.keys)
            self.params.update(vparams)
            self.trainable += list(vparams)
            for k in vparams:
                self.params[k].requires_grad_(True)
        if cfg.train.policy == "tabular" and cfg.train.mode == "sampled":  # rows gathered, gradients written by column
            self.params["logits"] = policies.action_major_storage(self.params["logits"].detach()).requires_grad_(True)
        self._make_optimizer()
        self._grad_rows: Tensor | None = None  # the rows the gradient buffers were last written at
        self._memo = RunsMemo()  # KL weights of the visited rows' runs, while those and β stay the same
        self._rows_memo: dict = {}  # the visited rows' tables, while the samples' rows stay the same
        self.stale = BehaviourPolicies(configs, device)  # the lagging sampler's policies (train.staleness)
        self._reward_learner = torch.tensor([c.kl.reward_logp == "learner" for c in configs], device=device)
        self._lag = torch.zeros(self.R, dtype=torch.long, device=device)
        tr = cfg.train
        # per run in sampled mode: the advantage estimator's runs, and the policy loss's and KL term's aggregation
        self._adv_runs = run_masks([c.train.advantage for c in configs], device)
        self._aggs = {"": [c.train.loss_agg for c in configs],
                      "_kl": [c.kl.loss_agg or c.train.loss_agg for c in configs]}
        self._by_steps = (  # work on the sampled steps, not on [R, N, H] buffers (see _steps_update_inputs)
            self.H > 1 and tr.policy == "tabular" and set(self._adv_runs) == {"gae"}
            and not tr.norm_adv and min(tr.minibatches, tr.batch * self.H) == 1
            and set(self._aggs[""] + self._aggs["_kl"]) == {"token-mean"}
            and ((self.baseline == "value" and tr.gamma * tr.gae_lambda == 1.0)
                 or (self.baseline == "none" and tr.gamma == 1.0))
            and layered_from_start(self.mdp))

    # -- one sampled update, top to bottom -----------------------------------------------------------------
    def sampled_update(self, update: int) -> dict[str, Tensor]:
        """One PPO update: sample episodes, shape rewards and compute advantages, then ``train.epochs``
        passes of the clipped loss (+ KL in the loss) on per-(state, action) sums; returns the update's
        sample statistics and diagnostics."""
        buf, tabs = self._collect(update)
        R, N, H = self.R, self.cfg.train.batch, self.H
        if self._by_steps and buf.steps is not None:
            vis = step_visits(buf.steps, tabs, self.dtype)
            flat = self._steps_update_inputs(buf, tabs, vis)
            whole = True
        else:
            flat = {k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid")}
            vis = visited_rows(flat, tabs, self.H == 1, self.dtype, self._rows_memo)
            buf.update(self._shape_and_advantage(buf, tabs, vis))
            flat.update({k: buf[k].reshape(R, N * H) for k in ("adv", "ret")})
            flat.update(self._aggregation(buf["valid"]))
            whole = min(self.cfg.train.minibatches, N * H) == 1  # one full-batch minibatch: its visits are vis
        loss_fn = self._ppo_loss_and_grads if self.cfg.train.policy == "tabular" else self._ppo_loss
        stats = self._ppo_epochs(flat, update, loss_fn, lambda mb: self._group(mb, tabs, vis if whole else None))
        self._maybe_log_traj(update, buf, tabs)
        logs, adaptive = self._logs_at(update), bool(self.rt.adaptive.any())
        if not (logs or adaptive):
            return stats
        ks = all_estimates(vis["old"], vis["ref"]).to(torch.float64)  # [A, P, 3]
        per_run = sampled_kl_sums(vis["count"], ks, vis["kfull"], vis["rows"], R, self.S) / N
        out = {"reward": (buf["reward"].to(torch.float64) * buf["valid"]).sum((1, 2)) / N,
               "kl_k1": per_run[:, 0], "kl_k2": per_run[:, 1], "kl_k3": per_run[:, 2],  # per-episode sums
               "kl_full_sampled": per_run[:, 4], "episode_length": per_run[:, 3], **stats}
        if "zero_adv_frac" in buf:
            out["zero_adv_frac"] = buf["zero_adv_frac"]
        if self.stale.active:
            out.update(self._staleness_metrics(tabs))
        if adaptive:
            self._control_beta(out["kl_k1"], N)
        return out

    def _collect(self, update: int) -> tuple[Episodes, dict[str, Tensor]]:
        """``train.batch`` episodes per run from the current policy (:func:`sim.engine.rollout.sample_episodes`,
        each run's stream for this update), and the tables they were drawn with: ``logp`` (π_old) and
        ``ref_logp`` ``[R, S, A]``."""
        pi_t, ref_t = self._tables()
        tabs = {"logp": pi_t, "ref_logp": ref_t}
        if self.stale.active:  # the sampler lags: its policy is the behaviour policy, the ratio's denominator
            tabs["logp"], self._lag = self.stale.behaviour(pi_t, self.rt.keys, update)
            tabs["learner"] = pi_t
        buf = sample_episodes(self.core, tabs["logp"], self.update_keys(update), self.cfg.train.batch, self.dtype,
                              group=self.cfg.train.group, streams=lambda i: self.update_keys(update, i))
        if self.proxy is not None:  # a learned reward: the runs train on their proxy (sim.algos.proxy), looked up
            st = buf.steps  # at each step taken (the buffers, where read, are made from the steps)
            if st is not None:
                st["reward"] = self.proxy.step_rewards(st["row"], st["action"], self.dtype)
            else:  # one-step episodes: the buffers themselves
                buf["reward"] = self.proxy.rewards(buf)
        if buf.steps is not None:  # every step taken is a valid sample
            buf.run_steps = buf.steps_per_run()
            self.env_steps += buf.run_steps
        else:
            self.env_steps += torch.count_nonzero(buf["valid"].reshape(self.R, -1), 1)
        return buf, tabs

    def _shape_and_advantage(self, buf: dict[str, Tensor], tabs: dict[str, Tensor], vis: dict[str, Tensor]
                             ) -> dict[str, Tensor]:
        """Shaped rewards ``r − β·k`` (KL in the reward), advantages and returns ``[R, N, H]``.

        The penalty of a sample depends on it only through its (state, action): it is computed on the
        visited rows (``vis``, from :func:`~sim.engine.rows.visited_rows`) and gathered. Adds ``kfull``
        (exact per-state KL of the visited rows ``[P]``) to ``vis``.
        """
        tr = self.cfg.train
        R, N, H = buf["valid"].shape
        valid = buf["valid"].to(self.dtype)  # the mask as a float, made once (a float mask is used as is)
        penalty = self._reward_penalty(tabs, vis)
        shaped = (self.reward_scale * buf["reward"]).view(-1)
        if "sel" in vis:  # r − β·k at the valid samples (x + (−y) is x − y exactly)
            shaped.index_add_(0, vis["sel"], penalty, alpha=-1)
        else:
            shaped = shaped - penalty
        shaped = shaped.view(R, N, H) * valid
        # each estimator of the batch on every run; a run keeps its own estimator's numbers (merge_runs)
        values = (lambda: self.value_fn.value(self.params, buf["state"].reshape(R, N * H)).view(R, N, H)) \
            if self.baseline == "value" else None
        parts = {kind: (runs, advantages(kind, shaped, valid, buf["done"], tr.group, tr.gamma, tr.gae_lambda,
                                         self.baseline, values)) for kind, runs in self._adv_runs.items()}
        out = merge_runs(parts) if len(parts) > 1 else next(iter(parts.values()))[1]
        if tr.norm_adv:
            out["adv"] = normalize_per_run(out["adv"], valid)
        return {k: v.detach() for k, v in out.items()}

    def _reward_penalty(self, tabs: dict[str, Tensor], vis: dict[str, Tensor]) -> Tensor:
        """β·k of the KL in the reward at each valid sample (in ``vis``' sample order), computed on the visited
        rows; adds ``kfull`` (exact per-state KL of the visited rows ``[P]``) to ``vis``."""
        old, ref, run = vis["old"], vis["ref"], vis["run"]
        if "learner" in tabs and bool(self._reward_learner.any()):  # kl.reward_logp: learner, per run
            learner = gather_rows(tabs["learner"].reshape(-1, self.A), vis["rows"], run.numel())
            old = torch.where(self._reward_learner.index_select(0, run), learner, old)
        vis["kfull"] = full_kl(old, ref, dim=0)
        ref_c = self.clamp(old, ref, vis["count"], row_run=run)
        weights = self._memo.get("reward", run, self.rt.beta, lambda: reward_weights(self.rt, old, run, ROW_PAD))
        pen = kl_reward_penalty(old, ref_c, vis["kfull"].unsqueeze(0), self.rt, weights=weights).reshape(-1)
        return pen.index_select(0, vis["entry"])

    def _steps_update_inputs(self, buf: Episodes, tabs: dict[str, Tensor], vis: dict[str, Tensor]
                             ) -> dict[str, Tensor]:
        """:meth:`_shape_and_advantage` on the sampled steps (``buf.steps``, in the order taken; ``vis`` from
        :func:`~sim.engine.rows.step_visits`), for what :attr:`_by_steps` allows (GAE with γλ = 1 and a
        tabular value or none, token-mean losses, one minibatch, a layered MDP): the same numbers, per step.

        Returns :meth:`_group`'s input: ``adv``, ``ret`` ``[n]`` in the steps' order, ``at`` (their positions in
        the ``[R, N, H]`` buffers) and ``n_valid`` (samples per run ``[R]``)."""
        st = buf.steps
        shaped = self.reward_scale * st["reward"] - self._reward_penalty(tabs, vis)  # the buffers' r − β·k
        v = self.value_fn.table(self.params).detach().reshape(-1).index_select(0, st["row"]) \
            if self.baseline == "value" else None
        adv, ret = gae_on_steps(shaped, v, st["done"], self.cfg.train.gamma, buf.counts, buf.goings)
        return {"adv": adv, "ret": ret, "at": st["at"],
                "n_valid": buf.run_steps.to(self.dtype)}  # counted by _collect

    def _aggregation(self, valid: Tensor) -> dict[str, Tensor]:
        """Per-sample weights and per-run divisors ``[R, N·H]`` of the loss aggregation (``train.loss_agg``
        and, for a loss-placed KL, ``kl.loss_agg``): the loss is Σ weight·loss / divisor over a (mini)batch's
        samples. ``token-mean`` needs none (weights 1, divisor the valid samples of the minibatch, as ever);
        keys ``w``/``d`` (policy loss) and ``w_kl``/``d_kl`` (KL term) are present only where they differ."""
        out: dict[str, Tensor] = {}
        for suffix, modes in self._aggs.items():  # a mode per run (batch_aggregation)
            w, d = batch_aggregation(valid, modes, self.H, min(self.cfg.train.minibatches, valid[0].numel()))
            if w is not None:
                out["w" + suffix] = w.reshape(valid.shape[0], -1)
            if d is not None:
                out["d" + suffix] = d.unsqueeze(1).expand(valid.shape[0], valid[0].numel())
        return out

    def _group(self, mb: dict[str, Tensor], tabs: dict[str, Tensor], vis: dict[str, Tensor] | None = None
               ) -> dict[str, Tensor]:
        """Sufficient statistics of a (mini)batch for the PPO loss of a tabular-state policy.

        The clipped surrogate of one sample is ``−adv·min(ρ, clip(ρ))`` if ``adv ≥ 0`` and
        ``−adv·max(ρ, clip(ρ))`` otherwise, with ``ρ = π_θ(a|s)/π_old(a|s)`` shared by every sample of the
        same (s, a); the KL and entropy terms depend on (s, a) alone and the value loss on s alone. So summing
        positive and negative advantages per (s, a) and returns per s once per (mini)batch gives every
        epoch's loss and gradient exactly.

        The statistics are kept for the visited rows alone, as action-major tables (``vis``: the minibatch's
        :func:`~sim.engine.rows.visited_rows`, computed here if not given). Every sum runs over one entry's
        samples in sample order and every per-row computation is elementwise, so a run's numbers do not
        depend on the batch it is trained in.

        Args:
            mb: per-sample ``idx`` (= state·A + action), ``state``, ``valid``, ``adv``, ``ret``, each ``[R, n]``.
            tabs: the batch's ``logp`` (π_old) and ``ref_logp`` tables ``[R, S, A]``.
        Returns:
            ``rows [M]``, ``run [P]``, ``count``, ``ref`` (as in :func:`~sim.engine.rows.visited_rows`),
            ``adv_pos``, ``adv_neg``, ``old`` (log π_old; 0 where unsampled) ``[A, P]``; ``n_s`` (samples per
            row) ``[P]``; ``n`` (valid samples, ≥ 1) ``[R]``; ``kl_weights`` ``[2, 4, P]``, each column's
            weights of (k1, k2, k3, full) in the loss, plain and importance-weighted (β where the column's run
            uses them, else 0); with a value baseline ``ret_mean`` ``[P]`` and ``ret_ss`` (within-state sum of
            squares) ``[R]``.
        """
        vis = vis if vis is not None else visited_rows(mb, tabs, self.H == 1, self.dtype)
        R, (A, P) = self.R, vis["count"].shape
        dt, dev = self.dtype, self.device
        steps = "at" in mb  # the sampled steps' values, in the order taken (_steps_update_inputs)
        adv = mb["adv"] if steps else take_valid(mb["adv"].reshape(-1), vis)
        zeros = torch.zeros(A * P, dtype=dt, device=dev)
        count = vis["count"]
        n_valid = (mb["n_valid"] if steps else torch.count_nonzero(mb["valid"], 1).to(dt)).clamp(min=1)
        w = take_valid(mb["w"].reshape(-1), vis).to(dt) if "w" in mb else None  # the samples' aggregation weights
        if w is not None:
            adv = adv * w
            weight = zeros.index_add(0, vis["entry"], w).view(A, P)
        else:
            weight = count
        g = {"rows": vis["rows"], "run": vis["run"], "count": count, "ref": vis["ref"],
             "adv_pos": zeros.index_add(0, vis["entry"], adv.clamp(min=0)).view(A, P),
             "adv_neg": zeros.index_add(0, vis["entry"], adv.clamp(max=0)).view(A, P),
             # entries without samples carry no loss; log π_old := 0 there keeps their ratio finite
             "old": torch.where(count > 0, vis["old"], torch.zeros_like(vis["old"])),
             "n": counted(mb["d"][:, 0].to(dt), n_valid) if "d" in mb else n_valid, "n_tokens": n_valid,
             "weight": weight, "n_s": sum_actions(weight),
             # the KL-in-loss weights of each column's run (β on its estimator), plain and IS forms
             "kl_weights": self._memo.get("kl_weights", vis["run"], self.rt.beta,
                                          lambda: self.rt.loss_weights(vis["run"], dt))}
        if self.cfg.train.decoupled and "learner" in tabs:
            self._decouple(g, vis, tabs)
        g["kl_count"] = self._kl_count(mb, vis, g, zeros, n_valid)
        g["n_s_kl"] = g["n_s"] if g["kl_count"] is weight else sum_actions(g["kl_count"])
        if self.baseline == "value":  # the value loss, aggregated like the policy loss
            ret_valid = mb["ret"] if steps else take_valid(mb["ret"].reshape(-1), vis)
            wret = ret_valid if w is None else w * ret_valid
            ret_sum = torch.zeros(P, dtype=dt, device=dev).index_add_(0, vis["col"], wret)
            g["ret_mean"] = ret_sum / g["n_s"].clamp(min=1) if w is None else ret_sum / g["n_s"].clamp(min=1e-30)
            # Σ (return − its state's mean)² over each run's valid samples, summed in sample order
            spread = (ret_valid - g["ret_mean"].index_select(0, vis["col"])).square()
            if steps:
                g["ret_ss"] = per_run_in_sample_order(spread, mb["at"], R, self.cfg.train.batch * self.H)
            else:
                g["ret_ss"] = torch.zeros(R, dtype=dt, device=dev).index_add_(
                    0, vis["run"].index_select(0, vis["col"]), spread if w is None else w * spread)
        return g

    def _decouple(self, g: dict[str, Tensor], vis: dict[str, Tensor], tabs: dict[str, Tensor]) -> None:
        """Decoupled PPO on stale samples: the ratio against the learner's policy at sampling time π_prox, and
        each (s, a)'s advantage sums weighted by π_prox/π_behaviour (outside the clip); a loss-placed KL's IS
        correction stays against the behaviour policy."""
        count = g["count"]
        prox = gather_rows(tabs["learner"].reshape(-1, self.A), vis["rows"], count.shape[1])
        sampled = count > 0
        weight = torch.where(sampled, torch.exp(prox - vis["old"]), torch.zeros_like(prox))
        g["adv_pos"], g["adv_neg"] = g["adv_pos"] * weight, g["adv_neg"] * weight
        g["kl_old"] = g["old"]
        g["old"] = torch.where(sampled, prox, torch.zeros_like(prox))

    def _kl_count(self, mb: dict[str, Tensor], vis: dict[str, Tensor], g: dict[str, Tensor], zeros: Tensor,
                  n_valid: Tensor) -> Tensor:
        """Each entry's weight of a loss-placed KL term ``[A, P]``, on the policy loss's divisor: the samples
        (``kl.loss_agg`` as ``train.loss_agg``), or Σ KL weights × (policy divisor / KL divisor)."""
        if "w_kl" not in mb and "d_kl" not in mb and "w" not in mb and "d" not in mb:
            return g["count"]
        A, P = g["count"].shape
        w_kl = take_valid(mb["w_kl"].reshape(-1), vis).to(zeros.dtype) if "w_kl" in mb else None
        kl = g["count"] if w_kl is None else zeros.index_add(0, vis["entry"], w_kl).view(A, P)
        d_kl = counted(mb["d_kl"][:, 0].to(g["n"].dtype), n_valid) if "d_kl" in mb else n_valid
        if torch.equal(d_kl, g["n"]):
            return kl
        return kl * (g["n"] / d_kl).index_select(0, vis["run"])

    # -- the loss on per-(state, action) sums ----------------------------------------------------------
    @torch.no_grad()
    def _ppo_loss_and_grads(self, g: dict[str, Tensor], want_diag: bool = True, want_loss: bool = True
                            ) -> tuple[Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """:meth:`_ppo_loss` and its gradients, for tabular policies and values, derived by hand.

        A visited row's logits (and value) get gradient only from that row's loss terms. :meth:`_rows_loss`
        gives each row's loss with its derivatives with respect to the row's log-probabilities and value, and
        the log-softmax is chained by hand (``∂/∂x_a = g_a − π_a·Σ_b g_b``): no autograd graph, about half
        the tensor passes of autograd's backward. The rows run in equal blocks
        (:func:`~sim.engine.rows.row_blocks`: smaller working sets; estimators no run of a block uses are
        skipped there), and the gradients are written into the optimizer's dense gradient buffers. Loss and
        diagnostics are bitwise those of the one-pass loss, whatever the blocking; the gradients equal
        autograd's to rounding (``tests/sim/test_grouped_loss.py``).

        Returns ``(loss [R], diagnostics, gradients)`` (gradients keyed like the trainable parameters); the
        loss is ``None`` when neither ``want_loss`` nor ``want_diag`` asks for it.
        """
        want_loss = want_loss or want_diag
        rows, P = g["rows"], g["count"].shape[1]
        M = rows.numel()
        x_all = self.policy.row_logits(self.params, rows, P)
        v_all = self._value_rows(rows, P) if self.baseline == "value" else None
        # ∂/∂logits, action-major [A, P], written column by column into the action-major gradient buffer
        plans = block_plans(g, self._memo, self.rt.beta, self.cfg.train.vf_coef)
        gx = plans[0]["gx"]  # (one buffer for every epoch of the update: each writes all its columns)
        gv = torch.empty_like(v_all) if v_all is not None else None
        loss = torch.zeros(self.R, dtype=self.dtype, device=self.device) if want_loss else None
        parts: list[dict[str, Tensor]] = []
        for plan in plans:
            cols, run = plan["cols"], plan["run"]
            v = v_all[cols] if v_all is not None else None
            per_row, block_parts, (g_lp, g_v, prob) = self._rows_loss(
                g, cols, log_softmax_action_major(x_all[:, cols]), v, want_diag, grad=True, want_loss=want_loss,
                plan=plan)
            parts.append(block_parts)
            n_run = plan["n_run"]  # the per-run mean's divisor
            torch.div(torch.addcmul(g_lp, prob, sum_actions(g_lp), value=-1), n_run, out=gx[:, cols])
            if gv is not None:
                torch.div(g_v, n_run, out=gv[cols])
            if per_row is not None:  # summed block after block: each run's terms in column order, as in one pass
                loss.index_add_(0, run, per_row)
        loss = self._mean_loss(g, loss) if want_loss else None
        # written straight into the optimizer's gradient buffers, zero outside the visited rows: zeroed only
        # when the rows differ from the last write's (every epoch of a full-batch update has the same rows)
        out = {"logits": self.opt.grad_buffer("logits")}
        if gv is not None:
            out["v"] = self.opt.grad_buffer("v")
        if self._grad_rows is not rows:
            for buf in out.values():
                buf.zero_()
            self._grad_rows = rows
        grad_cols = policies.action_major_columns(out["logits"])  # (laid out as the logits: action-major)
        assert grad_cols is not None, "tabular PPO keeps its logits action-major (PPOTrainer.__init__)"
        grad_cols.index_copy_(1, rows, gx[:, :M])
        if gv is not None:
            out["v"].view(-1).index_copy_(0, rows, gv[:M])
        out[FINITE] = finite_rows(gx[:, :M], None if gv is None else gv[:M], g["run"], self.R)
        diag = self._loss_diagnostics(g, {k: torch.cat([p[k] for p in parts], dim=-1) for k in parts[0]}) \
            if want_diag else {}
        return loss, diag, out

    def _rows_loss(self, g: dict[str, Tensor], cols: slice, lp: Tensor, v: Tensor | None, keep: bool,
                   grad: bool = False, want_loss: bool = True, plan: dict | None = None
                   ) -> tuple[Tensor | None, dict[str, Tensor], tuple | None]:
        """The PPO loss of columns ``cols`` of the row tables, per row ``[c]`` (a sum over the row's samples;
        with a value ``v``, ``vf_coef·½·n_s·(v − mean return)²`` too: the within-state spread ``ret_ss`` is
        added per run by :meth:`_mean_loss`).

        ``lp [A, c]`` are the log-probabilities of those columns, ``v [c]`` their values. Also returns the
        per-entry parts the diagnostics need when ``keep``, and with ``grad`` the loss's derivatives derived
        by hand, ``(∂/∂lp [A, c]`` with each log-probability a free variable, ``∂/∂v [c]`` or ``None``,
        ``π = e^{lp} [A, c])``; else ``None`` (differentiate the loss by autograd through ``lp`` and ``v``).
        With ``grad``, ``want_loss=False`` skips the loss itself (returned as ``None``).
        """
        tr, rt = self.cfg.train, self.rt
        want_loss = want_loss or keep or not grad
        at = plan["at"] if plan is not None else block_columns(g, cols)  # the statistics' columns ``cols``
        n, old, ref, run, n_kl, n_s = at["count"], at["old"], at["ref"], at["run"], at["kl_count"], at["n_s"]
        lo, hi = clip_bounds(tr.clip, tr.clip_low, tr.clip_high)
        adv_pos, adv_neg = at["adv_pos"], at["adv_neg"]
        ratio = torch.exp(lp - old)
        prob = lp.exp() if grad or tr.ent_coef > 0 else None
        ref_lp = self.clamp(lp, ref, n, row_run=run)
        k_full = lambda: full_kl(lp, ref, dim=0, prob_all=prob).unsqueeze(0)  # noqa: E731
        if plan is not None:
            weights = plan["weights"]
        else:
            kl_w = g["kl_weights"][:, :, cols]  # [2, 4, c]: plain and importance-weighted forms
            used = (kl_w != 0).any(-1).tolist()
            weights = tuple([kl_w[f, j] if used[f][j] else None for j in range(4)] for f in range(2))
        if grad:
            kl_old = at.get("kl_old", old)  # the IS corrections' denominator
            kl, kl_slope, full_w = kl_loss_term_and_slope(lp, kl_old, ref_lp, k_full, rt, weights=weights,
                                                          delta_slope=self.clamp.slope(lp, ref, run), value=want_loss)
        else:
            kl = kl_loss_term(lp, at.get("kl_old", old), ref_lp, k_full, rt, weights=weights)
        per_row = pg = None
        if want_loss:
            # min(ρ, clip(ρ)) = min(ρ, 1 + ε) and max(ρ, clip(ρ)) = max(ρ, 1 − ε), with the same gradient
            pg = -(adv_pos * ratio.clamp(max=hi) + adv_neg * ratio.clamp(min=lo))
            kl = n_kl * kl
            per_row = sum_actions(pg + kl)
            if tr.ent_coef > 0:
                entropy = -sum_actions(torch.where(prob > 0, prob * lp, torch.zeros_like(prob)))
                per_row = per_row - tr.ent_coef * n_s * entropy
        if v is not None:
            v_err = v - at["ret_mean"]
            if want_loss:
                v_sq = n_s * v_err.square()
                per_row = per_row + tr.vf_coef * 0.5 * v_sq
        grads = None
        if grad:
            # ∂pg/∂lp = −adv·ρ where the clip passes ρ (bounds included, as autograd's clamp), else 0
            if plan is not None:  # −x·m + −y·m' is −(x·m + y·m') exactly; the masks made as floats directly
                neg_pos, neg_neg = plan["neg_adv"]
                passes = plan["passes"]  # every epoch's masks in one buffer
                torch.le(ratio, hi, out=passes[0])
                torch.ge(ratio, lo, out=passes[1])
                g_lp = (neg_pos * passes[0] + neg_neg * passes[1]) * ratio
            else:
                g_lp = -(adv_pos * (ratio <= hi) + adv_neg * (ratio >= lo)) * ratio
            if kl_slope is not None:
                g_lp = g_lp + n_kl * kl_slope
            if full_w is not None and plan is not None and "full" in plan:  # on the weights' span only
                sp, fw, off, to, cut = plan["full"]
                term = fw * full_kl_slope(columns(lp, sp), columns(ref, sp), columns(prob, sp))
                columns(g_lp, to).add_(columns(term if off is None else term.masked_fill_(off, 0.0), cut))
            elif full_w is not None:  # the row's exact KL counts once per sample of the row
                g_lp = g_lp + masked_product(at["n_s_kl"] * full_w, full_kl_slope(lp, ref, prob))
            if tr.ent_coef > 0:  # ∂(−c·n_s·H)/∂lp = c·n_s·π·(lp + 1) where π > 0
                g_lp = g_lp + (tr.ent_coef * n_s) * torch.where(prob > 0, prob * (lp + 1.0), 0.0)
            vf_n_s = plan["vf_n_s"] if plan is not None else tr.vf_coef * n_s
            grads = (g_lp, vf_n_s * v_err if v is not None else None, prob)
        if not keep:
            return per_row, {}, grads
        with torch.no_grad():
            parts = {"terms": torch.stack([pg, kl, n * clipped_fraction(ratio, tr.clip, lo, hi), n * (old - lp)],
                                          dim=-1).transpose(-1, -2)}  # [A, 4, c]
            if v is not None:
                parts["v_sq"] = v_sq
        return per_row, parts, grads

    def _ppo_loss(self, g: dict[str, Tensor], want_diag: bool = True, want_loss: bool = True
                  ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-run PPO loss ``[R]`` (mean over the minibatch's samples) from the statistics of :meth:`_group`,
        differentiable with respect to the policy and value parameters (always computed: ``want_loss`` is
        part of :meth:`_ppo_epochs`' protocol)."""
        rows, P = g["rows"], g["count"].shape[1]
        lp = self.policy.rows(self.params, rows, P)  # [A, P], carries gradient
        v = self._value_rows(rows, P) if self.baseline == "value" else None
        per_row, parts, _ = self._rows_loss(g, slice(None), lp, v, want_diag)
        sums = torch.zeros(self.R, dtype=per_row.dtype, device=self.device).index_add(0, g["run"], per_row)
        return self._mean_loss(g, sums), self._loss_diagnostics(g, parts) if want_diag else {}

    def _value_rows(self, rows: Tensor, size: int) -> Tensor:
        """State values of rows ``rows [M]`` as ``[size]`` (zero past ``M``)."""
        return gather_rows(self.value_fn.table(self.params).reshape(-1), rows, size)

    def _mean_loss(self, g: dict[str, Tensor], sums: Tensor) -> Tensor:
        """Per-run loss ``[R]`` from :meth:`_rows_loss`'s sums: divided by the samples, plus the value loss's
        within-state spread."""
        loss = sums / g["n"]
        if self.baseline == "value":
            loss = loss + self.cfg.train.vf_coef * 0.5 * g["ret_ss"] / g["n"]
        return loss

    def _loss_diagnostics(self, g: dict[str, Tensor], parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-run means of the PPO diagnostics from :meth:`_rows_loss`'s parts (all columns)."""
        sums = per_run_sum(parts["terms"].transpose(-1, -2), g["rows"], self.R, self.S)
        if g["n_tokens"] is g["n"] or torch.equal(g["n_tokens"], g["n"]):
            sums = sums / g["n"].unsqueeze(-1)
        else:  # the losses as aggregated; clip fraction and approx. KL per sample
            sums = torch.cat([sums[:, :2] / g["n"].unsqueeze(-1), sums[:, 2:] / g["n_tokens"].unsqueeze(-1)], 1)
        diag = {"pg_loss": sums[:, 0], "kl_loss": sums[:, 1], "clip_frac": sums[:, 2], "approx_kl": sums[:, 3]}
        if "v_sq" in parts:
            v_sq = per_run_sum(parts["v_sq"].view(1, -1, 1), g["rows"], self.R, self.S)[:, 0]
            diag["v_loss"] = 0.5 * (v_sq + g["ret_ss"]) / g["n"]
        return diag

    optional_metrics = ("staleness", "kl_learner_behaviour", "kl_behaviour_ref", "zero_adv_frac")

    def _staleness_metrics(self, tabs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The lag of this update's samples, the exact sequence KL of the learner (at sampling time) to the
        behaviour policy, KL(π(τ)‖μ(τ)), and of the behaviour policy to the reference, KL(μ(τ)‖π_ref(τ))."""
        with torch.no_grad():
            mu, learner = tabs["logp"].to(torch.float64), tabs["learner"].to(torch.float64)
            out = {"staleness": self._lag.to(torch.float64),
                   "kl_learner_behaviour": tabular.sequence_kl(self.mdp.with_reference(mu), learner),
                   "kl_behaviour_ref": tabular.sequence_kl(self.mdp.with_reference(self._ref64()), mu)}
            # runs without a lag have none of these columns (as when trained beside no lagging run)
            return {k: torch.where(self.stale.lag > 0, v, torch.nan) for k, v in out.items()}

    def _maybe_log_traj(self, update: int, buf: dict[str, Tensor], tabs: dict[str, Tensor]) -> None:
        """Keep the first ``log.trajectories`` episodes of a logged update for ``trajectories.parquet``."""
        n = self.cfg.log.trajectories
        if n <= 0 or not self._logs_at(update):
            return
        R, S, A = self.R, self.S, self.A
        idx = buf["idx"][:, :n]
        steps = {k: buf[k][:, :n] for k in ("state", "action", "reward", "valid")}
        for k in ("logp", "ref_logp"):
            steps[k] = tabs[k].reshape(R, S * A).gather(1, idx.reshape(R, -1)).view(idx.shape)
        rec: dict = snapshot(steps)
        rec["update"] = update
        self.traj_log.append(rec)

    # -- exact mode ---------------------------------------------------------------------------------------
    def exact_update(self, update: int) -> dict[str, Tensor]:
        """One step on the expected gradient of the same placement × estimator
        (:func:`sim.engine.exact.exact_loss`)."""
        exp_diag = self._expected_sample_stats() if self._logs_at(update) else {}
        tr = self.cfg.train
        logp = self.policy.table(self.params)
        behaviour = None
        if self.stale.active:  # the expected update with samples from the lagging policy
            behaviour, self._lag = self.stale.behaviour(logp.detach(), self.rt.keys, update)
        loss, diag = exact_loss(self._scaled_mdp, logp, self._ref_table(), self.rt, tr.ent_coef, tr.advantage,
                                tr.group, behaviour, self._reward_learner)
        if behaviour is not None and self._logs_at(update):
            diag.update(self._staleness_metrics({"logp": behaviour, "learner": logp.detach()}))
        diag.update(exp_diag)
        diag["grad_norm"] = self._apply_grads(loss, update)
        if bool(self.rt.adaptive.any()):
            with torch.no_grad():
                pi = self.policy.table(self.params).to(torch.float64)
                self._control_beta(tabular.sequence_kl(self.mdp.with_reference(self._ref64()), pi), 1)
        return diag

    def _expected_sample_stats(self) -> dict[str, Tensor]:
        """What a sampled run would report as sample means, as exact expectations."""
        with torch.no_grad():
            pi, ref = self._tables()
            pi, ref = pi.to(torch.float64), ref.to(torch.float64)
            occ = tabular.state_occupancy(self.mdp, pi)
            ks = (pi.exp().unsqueeze(-1) * all_estimates(pi, ref)).sum(-2)  # [R, S, 3]
            exp_diag = {"reward": tabular.expected_return(self.train_mdp, pi),
                        **{f"kl_k{i + 1}": (occ * ks[..., i]).sum(-1) for i in range(3)},
                        "episode_length": occ.sum(-1)}
        return exp_diag
