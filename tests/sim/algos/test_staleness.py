"""Asynchronous (stale) rollouts (docs/theory.md "Stale rollouts"): the lagging sampler, the ratio and IS
corrections against the behaviour policy, the decoupled form, and what the lag does to each KL placement.

Known answers: a lag of 0 is today's engine (bitwise, also beside lagging batch-mates); the behaviour policy
is the learner of k updates ago (checked against the logged policies); the decoupled loss equals its
per-sample formula; exact mode's fixed points under a lag are the on-time ones where the run converges
(float64, 2e-4), and the reward-placed KL computed from the behaviour policy is the one that loses stability.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sim.algos.ppo import PPOTrainer
from sim.config import ConfigError
from sim.engine.kl import kl_estimate
from sim.engine.rows import visited_rows
from sim.lab.dispatch import resolve, train_batch

BANDIT = ["env.id=bandit", "env.rewards=[1,0.5,0]", "env.ref_probs=[0.2,0.5,0.3]", "kl.beta=0.5"]
VARIANTS = [["kl.placement=none"], ["kl.placement=reward", "kl.estimator=k1"],
            ["kl.placement=loss", "kl.estimator=k1", "kl.is_correction=true"],
            ["kl.placement=loss", "kl.estimator=k3"], ["kl.placement=loss", "kl.estimator=full"]]


def test_a_run_without_lag_is_the_same_beside_lagging_batch_mates():
    base = [*BANDIT, "train.updates=12", "train.batch=64", "log.policy_every=3"]
    on_time = [resolve(None, [*base, *v, f"seed={i}"]) for i, v in enumerate(VARIANTS)]
    lagging = [resolve(None, [*base, *v, f"seed={i}", "train.staleness=4"]) for i, v in enumerate(VARIANTS)]
    uniform = [resolve(None, [*base, *v, f"seed={i}", "train.staleness=8", "train.staleness_dist=uniform"])
               for i, v in enumerate(VARIANTS)]
    batched = train_batch(on_time + lagging + uniform)
    for cfg, out in zip(on_time, batched[:len(on_time)], strict=True):
        (alone,) = train_batch([cfg])
        for name, table in alone.tables().items():
            pd.testing.assert_frame_equal(out.tables()[name], table, check_exact=True, obj=name)
    for cfg, out in zip(lagging + uniform, batched[len(on_time):], strict=True):  # lagging runs too
        (alone,) = train_batch([cfg])
        pd.testing.assert_frame_equal(out.metrics, alone.metrics, check_exact=True)


@pytest.mark.parametrize("env", [BANDIT, ["env.id=token_tree", "env.eos=0.2", "env.reward=prefix"]],
                         ids=["bandit", "eos-tree"])
def test_decoupled_and_learner_penalty_runs_are_batch_invariant(env):
    base = [*env, "train.updates=8", "train.batch=32", "train.staleness=3", "train.decoupled=true",
            "log.policy_every=4"]
    configs = [resolve(None, [*base, *v, f"seed={i}"]) for i, v in enumerate(VARIANTS)]
    configs.append(resolve(None, [*base, "kl.placement=reward", "kl.estimator=k1", "kl.reward_logp=learner"]))
    batched = train_batch(configs)
    for cfg, out in zip(configs, batched, strict=True):
        (alone,) = train_batch([cfg])
        for name, table in alone.tables().items():
            pd.testing.assert_frame_equal(out.tables()[name], table, check_exact=True, obj=name)


def test_the_sampler_acts_with_the_learner_of_k_updates_ago():
    """Logged every update: the exact KL of the behaviour policy to π_ref at update u is the learner's
    (logged ``kl_true`` after update u − 1 − k; 0 for the first k + 1 updates, which use the initial policy), and
    ``staleness`` is the lag used."""
    k = 3
    cfg = resolve(None, [*BANDIT, "kl.placement=reward", "kl.estimator=k1", "train.updates=12", "train.batch=64",
                         f"train.staleness={k}", "train.lr=0.05"])
    (out,) = train_batch([cfg])
    m = out.metrics.set_index("update")
    assert m.loc[1:, "staleness"].tolist() == [min(u - 1, k) for u in range(1, 13)]
    for u in range(1, 13):
        want = m.loc[max(u - 1 - k, 0), "kl_true"]
        assert m.loc[u, "kl_behaviour_ref"] == pytest.approx(want, rel=1e-5, abs=1e-9)
        assert m.loc[u, "kl_learner_behaviour"] >= -1e-12
    assert (m.loc[1:k + 1, "kl_behaviour_ref"] == 0).all() and m.loc[8, "kl_learner_behaviour"] > 0


def test_decoupled_loss_is_the_importance_weighted_clipped_loss():
    """The decoupled form: −(π_prox/μ)·min(ρA, clip(ρ)A) with ρ = π_θ/π_prox, plus a loss-placed KL whose IS
    weight is π_θ/μ (μ: the behaviour policy), written sample by sample (float64, 1e-10)."""
    configs = [resolve(None, [*BANDIT, "train.dtype=float64", "train.staleness=2", "train.decoupled=true",
                              "train.batch=48", *v, f"seed={i}"]) for i, v in enumerate(VARIANTS[2:4])]
    tr = PPOTrainer(configs, torch.device("cpu"))
    with torch.no_grad():  # three learner snapshots that differ, so that μ ≠ π_prox ≠ π_θ
        for _ in range(3):
            tr._tables()
            tr.stale.behaviour(tr._tables()[0], tr.rt.keys, 0)
            tr.params["logits"].add_(0.4 * torch.randn(tr.params["logits"].shape, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(_)))
    buf, tabs = tr._collect(5)
    assert not torch.equal(tabs["logp"], tabs["learner"])
    R, N, H = buf["valid"].shape
    vis = visited_rows({k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid")}, tabs, True, tr.dtype)
    buf.update(tr._shape_and_advantage(buf, tabs, vis))
    mb = {k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid", "adv", "ret")}
    with torch.no_grad():
        tr.params["logits"].add_(0.3)
    grouped, _ = tr._ppo_loss(tr._group(mb, tabs, vis), want_diag=False)

    lp = tr.policy.table(tr.params).reshape(R, -1).gather(1, mb["idx"])
    mu, prox = (tabs[k].reshape(R, -1).gather(1, mb["idx"]) for k in ("logp", "learner"))
    ref = tabs["ref_logp"].reshape(R, -1).gather(1, mb["idx"])
    ratio, adv, clip = torch.exp(lp - prox), mb["adv"], tr.cfg.train.clip
    pg = -torch.exp(prox - mu) * torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    w = torch.exp(lp - mu)
    kl = torch.stack([0.5 * w[0] * kl_estimate(lp[0], ref[0], "k1"), 0.5 * kl_estimate(lp[1], ref[1], "k3")])
    torch.testing.assert_close(grouped, (pg + kl).mean(1), rtol=1e-10, atol=1e-12)


PLACEMENTS = [["kl.placement=reward", "kl.estimator=k1"],
              ["kl.placement=reward", "kl.estimator=k1", "kl.reward_logp=learner"],
              ["kl.placement=loss", "kl.estimator=k1", "kl.is_correction=true"],
              ["kl.placement=loss", "kl.estimator=k3"]]


def _exact(lag: int, lr: float, placements: list[list[str]]) -> list[np.ndarray]:
    configs = [resolve(None, [*BANDIT, "train.mode=exact", "train.updates=3000", f"train.lr={lr}",
                              "train.dtype=float64", "log.every=3000", "log.policy_every=3000",
                              f"train.staleness={lag}", *p]) for p in placements]
    return [o.policy[o.policy["update"] == 3000]["prob"].to_numpy() for o in train_batch(configs)]


def test_exact_fixed_points_under_a_lag():
    """With a lag of 8 updates and Adam at lr 0.2: the IS-corrected k1 as a loss and k1 in the reward computed
    from the learner reach Gibbs at β (the lag does not move a fixed point: at rest every snapshot is the same
    policy, and these two forces act on the current policy); k1 in the reward computed from the behaviour
    policy — a restoring force that arrives k updates late — does not settle there (measured: it collapses onto
    one arm); plain k3 as a loss, whose samples are stale, ends off its forward-KL point (measured 0.497 on the
    best arm against 0.514)."""
    ref, r = np.array([0.2, 0.5, 0.3]), np.array([1.0, 0.5, 0.0])
    gibbs = ref * np.exp(r / 0.5) / (ref * np.exp(r / 0.5)).sum()
    behaviour, learner, k1_is, k3 = _exact(8, 0.2, PLACEMENTS)
    assert np.allclose(learner, gibbs, atol=2e-4) and np.allclose(k1_is, gibbs, atol=2e-4)
    assert np.abs(behaviour - gibbs).sum() > 0.5
    assert 2e-3 < np.abs(k3 - _exact(0, 0.2, PLACEMENTS[3:])[0]).max() < 0.1


@pytest.mark.parametrize(("overrides", "needle"), [
    (["train.staleness=-1"], "train.staleness must be >= 0"),
    (["train.staleness_dist=uniform"], "train.staleness_dist=uniform has no effect"),
    (["train.decoupled=true"], "train.decoupled=true has no effect"),
    (["kl.reward_logp=learner", "train.staleness=2"], "kl.reward_logp=learner has no effect"),
    (["train.staleness=2", "train.staleness_dist=uniform", "train.mode=exact"], "needs train.mode=sampled"),
    (["train.staleness=2", "train.backend=sb3"], "train.backend=sb3 does not support train.staleness=2"),
    (["train.staleness=2", "env.id=gaussian_bandit"], "not supported for env.id='gaussian_bandit'"),
    (["train.staleness=2", "train.algo=dpo"], "has no effect with train.algo=dpo"),
])
def test_bad_input_is_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        resolve(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)
