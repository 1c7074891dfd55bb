"""The batched engine: batch invariance, determinism, divergence, and the theory's behaviour on real runs.

Statistical tests fix their seeds. Tolerances come from the theory where it gives one and from the measured
spread otherwise (numbers quoted below were measured over 20 seeds with the same settings).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sim.config import ConfigError
from sim.lab.dispatch import resolve, train_batch

BANDIT = ["env.id=bandit", "env.rewards=[1,0,0]", "env.ref_probs=[0.2,0.5,0.3]", "kl.beta=0.5"]
VARIANTS = {
    "none": ["kl.placement=none"],
    "k1-reward": ["kl.placement=reward", "kl.estimator=k1"],
    "k2-reward": ["kl.placement=reward", "kl.estimator=k2"],
    "k3-reward": ["kl.placement=reward", "kl.estimator=k3"],
    "k1-loss": ["kl.placement=loss", "kl.estimator=k1"],
    "k2-loss": ["kl.placement=loss", "kl.estimator=k2"],
    "k3-loss": ["kl.placement=loss", "kl.estimator=k3"],
    "full-loss": ["kl.placement=loss", "kl.estimator=full"],
}


def cfg(*overrides: str):
    return resolve(None, list(overrides))


def grid(base: list[str], names: list[str], seeds) -> tuple[list, list[tuple[str, int]]]:
    keys = [(n, s) for n in names for s in seeds]
    return [cfg(*base, *VARIANTS[n], f"seed={s}") for n, s in keys], keys


def final(out, col: str) -> float:
    return float(out.metrics[col].iloc[-1])


# ----------------------------------------------------------------------------------------------------
# Batch invariance and determinism
# ----------------------------------------------------------------------------------------------------

MIXED = [
    ["seed=3", "kl.placement=reward", "kl.estimator=k1", "kl.beta=0.2"],
    ["seed=4", "kl.placement=loss", "kl.estimator=k3", "kl.beta=0.7", "kl.is_correction=true"],
    ["seed=5", "kl.placement=loss", "kl.estimator=full", "kl.controller=adaptive", "kl.target=0.05"],
    ["seed=6", "kl.placement=none", "train.lr=0.03"],
]


@pytest.mark.parametrize("env", [
    ["env.id=bandit", "env.n_arms=5", "env.reward_noise=0.3", "train.minibatches=4"],
    ["env.id=gridworld", "env.layout=open_5x5", "env.horizon=10", "env.slip=0.1", "train.batch=16"],
    ["env.id=token_tree", "train.policy=mlp", "train.hidden=16", "train.batch=32", "reference.schedule=ema",
     "reference.every=5"],
], ids=["bandit", "gridworld-slip", "tokentree-mlp"])
def test_batched_runs_equal_runs_trained_alone(env):
    common = env + ["train.updates=15", "log.policy_every=5"]
    configs = [cfg(*common, *m) for m in MIXED]
    together = train_batch(configs)
    for c, out in zip(configs, together, strict=True):
        (alone,) = train_batch([c])
        for name in ("metrics", "policy", "trajectories"):
            a, b = getattr(out, name), getattr(alone, name)
            if "train.policy=mlp" in env:
                # Batched matmuls may sum in another order: floats equal to float32 rounding, ints exactly.
                pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)
            else:
                pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_batch_invariance_holds_when_row_blocks_split_runs(monkeypatch):
    """The tabular loss runs in column blocks of the visited rows (``sim.train.ROW_CHUNK``); with 64-column
    blocks a run's rows fall into different blocks, at different offsets, in the batch and alone. Its
    numbers must still be bitwise the same."""
    import sim.engine.rows

    monkeypatch.setattr(sim.engine.rows, "ROW_CHUNK", 64)
    common = ["env.id=gridworld", "env.layout=open_5x5", "env.horizon=10", "env.slip=0.1", "train.batch=16",
              "train.updates=8", "log.policy_every=4"]
    configs = [cfg(*common, *m) for m in MIXED]
    together = train_batch(configs)
    for c, out in zip(configs, together, strict=True):
        (alone,) = train_batch([c])
        for name in ("metrics", "policy", "trajectories"):
            pd.testing.assert_frame_equal(getattr(out, name), getattr(alone, name), check_exact=True)


def test_same_seed_same_results_and_seeds_differ():
    c = cfg(*BANDIT, "kl.placement=reward", "train.updates=20", "env.reward_noise=0.5")
    a, b = train_batch([c])[0], train_batch([c])[0]
    pd.testing.assert_frame_equal(a.metrics, b.metrics, check_exact=True)
    pd.testing.assert_frame_equal(a.trajectories, b.trajectories, check_exact=True)
    other = train_batch([cfg(*BANDIT, "kl.placement=reward", "train.updates=20", "env.reward_noise=0.5",
                             "seed=1")])[0]
    assert not np.array_equal(a.trajectories["action"], other.trajectories["action"])


# ----------------------------------------------------------------------------------------------------
# Output contract
# ----------------------------------------------------------------------------------------------------

METRIC_COLUMNS = {"update", "env_steps", "phase", "beta", "reward", "kl_true", "kl_forward", "kl_k1", "kl_k2",
                  "kl_k3", "entropy", "min_prob", "tv_opt", "clip_frac", "pg_loss", "kl_loss", "approx_kl"}


@pytest.mark.parametrize("env", ["bandit", "gridworld", "token_tree"])
def test_output_tables_have_the_contract_columns(env):
    c = cfg(f"env.id={env}", "kl.placement=reward", "train.updates=4", "train.batch=8", "log.trajectories=2",
            "log.policy_every=2")
    (out,) = train_batch([c])
    assert METRIC_COLUMNS <= set(out.metrics.columns)
    assert out.metrics["update"].tolist() == [0, 1, 2, 3, 4]
    assert {"update", "state", "action", "prob", "ref_prob", "opt_prob"} <= set(out.policy.columns)
    assert sorted(out.policy["update"].unique()) == [0, 2, 4]
    per_state = out.policy.groupby(["update", "state"])["prob"].sum()
    assert np.allclose(per_state, 1.0, atol=1e-5)
    assert {"update", "episode", "t", "state", "action", "reward", "logp", "ref_logp"} <= set(out.trajectories)
    assert set(out.trajectories["episode"]) <= {0, 1}
    assert out.status["status"] == "done"
    # Exact KL at the start (policy = reference) is zero.
    assert abs(out.metrics["kl_true"].iloc[0]) < 1e-6


def test_sampled_estimator_means_track_true_kl():
    """k1 and k3 are unbiased for KL(π‖π_ref): their sample means over 4096 pulls match kl_true within
    5 standard errors of the mean (the spread is measured from the same run's trajectories)."""
    c = cfg(*BANDIT, "kl.placement=none", "train.updates=30", "train.batch=4096", "log.every=30",
            "log.trajectories=4096")
    (out,) = train_batch([c])
    last = out.metrics.iloc[-1]
    # The samples of update 30 were drawn from the policy *before* that update: compare with update 29's KL
    # is not logged, so recompute from the sampled log-ratios' exact expectation instead.
    traj = out.trajectories[out.trajectories["update"] == 30]
    delta = traj["logp"] - traj["ref_logp"]
    se1 = delta.std() / math.sqrt(len(delta))
    k3 = np.expm1(-delta) + delta
    se3 = k3.std() / math.sqrt(len(delta))
    assert abs(last["kl_k1"] - delta.mean()) < 1e-5 and abs(last["kl_k3"] - k3.mean()) < 1e-5
    assert abs(last["kl_k1"] - last["kl_k3"]) < 5 * (se1 + se3)


# ----------------------------------------------------------------------------------------------------
# Behaviour the theory predicts (sampled PPO)
# ----------------------------------------------------------------------------------------------------


def test_bandit_fixed_points_and_collapse():
    """k1-in-reward reaches Gibbs: at the optimum its shaped reward r − β·k1 is the same for every arm, so
    its advantage — and gradient noise — vanish there; measured max tv_opt over 20 seeds < 1e-4 → bound 1e-3.
    k2-as-loss / full-as-loss keep sampling noise at lr 0.01: max tv_opt over 20 seeds 0.0097 / 0.0193 →
    bound 0.04. k1-as-loss regularizes nothing: like no KL it collapses to the rewarded arm (entropy < 0.1
    nats vs 0.88 at Gibbs); k2/k3 in the reward collapse too."""
    names = ["k1-reward", "k2-loss", "full-loss", "k1-loss", "none", "k2-reward", "k3-reward"]
    configs, keys = grid(BANDIT + ["train.updates=300", "log.every=50"], names, range(3))
    outs = dict(zip(keys, train_batch(configs), strict=True))
    for s in range(3):
        assert final(outs["k1-reward", s], "tv_opt") < 1e-3
        assert final(outs["k2-loss", s], "tv_opt") < 0.04
        assert final(outs["full-loss", s], "tv_opt") < 0.04
        for collapsing in ("k1-loss", "none", "k2-reward", "k3-reward"):
            assert final(outs[collapsing, s], "entropy") < 0.1, collapsing
            assert final(outs[collapsing, s], "tv_opt") > 0.3, collapsing
        assert final(outs["k1-reward", s], "entropy") > 0.8
        # k1-as-loss behaves like no KL: the same final policy within sampling noise.
        assert abs(final(outs["k1-loss", s], "kl_true") - final(outs["none", s], "kl_true")) < 0.1


def test_gridworld_k1_in_reward_reaches_soft_optimum_and_per_step_losses_do_not():
    """Sequence-level: only k1 in the reward with returns (λ = γ = 1) follows the sequence-level KL gradient.
    With deterministic moves the shaped return is constant at the soft optimum, so it converges exactly:
    measured tv_opt 3e-4 (4 seeds) → bound 0.01. Per-step KL losses (k2, full) regularize each visited state
    but ignore how an action changes later states' KL: they stop at tv_opt ≈ 0.09 (4 seeds, all > 0.08)."""
    base = ["env.id=gridworld", "env.layout=open_5x5", "env.horizon=12", "env.ref_temperature=2", "kl.beta=0.3",
            "train.updates=300", "train.batch=64", "log.every=100", "log.policy_every=300"]
    configs, keys = grid(base, ["k1-reward", "k2-loss", "full-loss"], [0, 1])
    outs = dict(zip(keys, train_batch(configs), strict=True))
    for s in (0, 1):
        assert final(outs["k1-reward", s], "tv_opt") < 0.01
        assert final(outs["k2-loss", s], "tv_opt") > 0.05
        assert final(outs["full-loss", s], "tv_opt") > 0.05


def test_token_tree_k1_in_reward_reaches_sequence_gibbs():
    """TokenTree (V = 3, T = 3): measured tv_opt < 1e-4 for k1-in-reward over 4 seeds → bound 1e-3; k1-as-loss
    collapses like no KL (entropy 0.017 nats vs 0.60 at the optimum)."""
    base = ["env.id=token_tree", "kl.beta=0.3", "train.updates=300", "train.batch=128", "log.every=100",
            "log.policy_every=300"]
    configs, keys = grid(base, ["k1-reward", "k1-loss"], [0, 1])
    outs = dict(zip(keys, train_batch(configs), strict=True))
    for s in (0, 1):
        assert final(outs["k1-reward", s], "tv_opt") < 1e-3
        assert final(outs["k1-loss", s], "entropy") < 0.1


def test_recovery_when_reward_is_removed():
    """Reward on for 150 updates, then off for 300: k1-in-reward, k2-as-loss and k3-as-loss return to π_ref
    (KL < 1e-3; measured < 1e-5 over 5 seeds) while k1-as-loss stays where it drifted (KL ≈ 1.5, > 1)."""
    base = BANDIT + ["train.phases=[{updates: 150, reward_scale: 1}, {updates: 300, reward_scale: 0}]",
                     "log.every=50"]
    configs, keys = grid(base, ["k1-reward", "k2-loss", "k3-loss", "k1-loss"], [0, 1])
    outs = dict(zip(keys, train_batch(configs), strict=True))
    for (name, _), out in outs.items():
        m = out.metrics
        assert m["phase"].iloc[-1] == 1 and m["reward_scale"].iloc[-1] == 0.0
        drifted = float(m.loc[m["update"] == 150, "kl_true"].iloc[0])
        assert drifted > 0.3, name
        if name == "k1-loss":
            assert final(out, "kl_true") > 1.0
        else:
            assert final(out, "kl_true") < 1e-3, name
            # In the reward-off phase the optimum is the reference itself.
            assert final(out, "tv_opt") < 0.02, name


# ----------------------------------------------------------------------------------------------------
# Robustness and every feature end to end
# ----------------------------------------------------------------------------------------------------


def test_non_finite_policy_marks_run_diverged_and_spares_the_batch():
    ok = cfg(*BANDIT, "kl.placement=reward", "train.updates=10", "train.optimizer=sgd", "train.lr=0.1")
    # A huge SGD step sends one arm's probability to ~0, where k3 = π_ref/π − 1 − log(π_ref/π) overflows.
    bad = cfg(*BANDIT, "kl.placement=loss", "kl.estimator=k3", "train.updates=10", "train.optimizer=sgd",
              "train.lr=1e6")
    out_ok, out_bad = train_batch([ok, bad])
    assert out_ok.status["status"] == "done"
    assert out_bad.status["status"] == "diverged"
    assert 1 <= out_bad.status["update"] <= 10
    for table in (out_bad.metrics, out_bad.policy, out_bad.trajectories):
        assert table["update"].max() <= out_bad.status["update"]
    (alone,) = train_batch([ok])
    pd.testing.assert_frame_equal(out_ok.metrics, alone.metrics, check_exact=True)


def test_clamps_are_counted():
    c = cfg(*BANDIT, "kl.placement=loss", "kl.estimator=k3", "kl.beta=0.01", "kl.clamp=0.5", "train.updates=50",
            "train.lr=0.1")
    (out,) = train_batch([c])
    assert out.metrics["kl_clamps"].iloc[-1] > 0
    assert out.status["kl_clamps"] == out.metrics["kl_clamps"].iloc[-1]


@pytest.mark.parametrize("extra", [
    ["env.id=bandit", "reference.schedule=reset", "reference.every=3"],
    ["env.id=bandit", "reference.schedule=ema", "reference.every=2", "reference.alpha=0.5"],
    ["env.id=bandit", "kl.controller=adaptive", "kl.target=0.01", "kl.horizon=100"],
    ["env.id=bandit", "train.init=[0.1,0.1,0.8]", "train.norm_adv=true", "train.ent_coef=0.01"],
    ["env.id=bandit", "train.init=uniform", "train.policy=mlp", "train.max_grad_norm=0.5"],
    ["env.id=gridworld", "train.policy=mlp", "train.batch=8", "env.obs=coords"],
    ["env.id=gridworld", "train.mode=exact", "reference.schedule=reset", "reference.every=2"],
    ["env.id=token_tree", "train.mode=exact", "train.policy=mlp", "kl.controller=adaptive"],
    ["env.id=gaussian_bandit", "env.reward=quadratic", "env.target=2.0"],
    ["env.id=gaussian_bandit", "env.dim=2", "env.reward=two_mode", "reference.schedule=ema"],
], ids=lambda e: "-".join(x.split("=")[-1] for x in e))
@pytest.mark.parametrize("variant", ["k1-reward", "k3-reward", "k2-loss", "full-loss"])
def test_every_feature_runs(extra, variant):
    is_corr = ["kl.is_correction=true"] if variant == "k2-loss" else []  # IS changes only sampled loss estimators
    c = cfg(*extra, *VARIANTS[variant], "train.updates=6", "log.policy_every=3", *is_corr)
    (out,) = train_batch([c])
    assert out.status["status"] == "done", out.status
    m = out.metrics
    assert np.isfinite(m[["kl_true", "entropy", "reward"]].iloc[1:].to_numpy()).all()
    if "kl.controller=adaptive" in extra:
        assert m["beta"].iloc[-1] != m["beta"].iloc[0]


def test_reference_reset_moves_the_reference():
    c = cfg(*BANDIT, "kl.placement=reward", "reference.schedule=reset", "reference.every=50", "train.updates=100",
            "log.policy_every=50")
    (out,) = train_batch([c])
    p = out.policy
    ref0 = p[p["update"] == 0].sort_values("action")["ref_prob"].to_numpy()
    ref_end = p[p["update"] == 100].sort_values("action")["ref_prob"].to_numpy()  # reset at 100: = policy
    assert not np.allclose(ref0, ref_end, atol=1e-3)
    pol_100 = p[p["update"] == 100].sort_values("action")["prob"].to_numpy()
    assert np.allclose(ref_end, pol_100, atol=1e-6)


def test_gaussian_bandit_k1_in_reward_moves_toward_gibbs_mean():
    """Linear reward c·x with reference N(0, 1): Gibbs mean μ_ref + σ²c/β = 1/β·c. With β = 2 the optimum mean
    is 0.5; the policy's mean must move most of the way there (measured 0.49–0.51 with 4 seeds, bound ±0.1)."""
    base = ["env.id=gaussian_bandit", "env.reward=linear", "env.reward_coef=1.0", "kl.beta=2.0",
            "train.updates=300", "train.lr=0.02", "log.every=100"]
    configs = [cfg(*base, *VARIANTS["k1-reward"], f"seed={s}") for s in (0, 1)]
    for out in train_batch(configs):
        assert abs(final(out, "policy_mean") - 0.5) < 0.1
        assert final(out, "opt_mean_error") < 0.1


def test_cuda_path_is_rejected_cleanly_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="device=cuda .*CUDA build of torch"):
        train_batch([cfg("device=cuda", "train.updates=1")])


def test_logged_values_are_snapshots_not_views_of_live_parameters():
    """In float64 the Gaussian mean is logged straight from the parameter tensor; the logs must hold copies,
    so the policy's history moves update by update instead of repeating the final value."""
    c = cfg("env.id=gaussian_bandit", "kl.placement=reward", "train.updates=20", "train.dtype=float64",
            "log.policy_every=5")
    (out,) = train_batch([c])
    means = out.metrics["policy_mean"].to_numpy()
    assert means[0] == 0.0 and np.all(np.diff(means) != 0)
    assert out.policy["mean"].nunique() == len(out.policy)
