"""The stable-baselines3 backend (``sim.sb3_backend``): KL shaping in SB3's buffer, the KL term of the loss,
the reflab output contract from the CLI, and cross-checks of the final policies against the native engine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from sim.algos.sb3 import make_shell
from sim.algos.sb3_ppo import CallableReference, KLRegularizedPPO, TableReference
from sim.config import ConfigError
from sim.lab.dispatch import make_trainer, resolve

ROOT = Path(__file__).resolve().parents[3]
REWARDS = (1.0, 0.5, -0.25)
REF = (0.2, 0.5, 0.3)
BETA = 0.3


def _bandit_model(placement: str, estimator: str, baseline: str = "mean", **kw) -> KLRegularizedPPO:
    """KLRegularizedPPO on the 3-arm bandit shell with SB3's default (random) MlpPolicy, so π_old ≠ π_ref."""
    cfg = resolve(None, ["env.id=bandit", f"env.rewards={list(REWARDS)}", f"env.ref_probs={list(REF)}"])
    venv = DummyVecEnv([lambda: make_shell(cfg) for _ in range(4)])
    ref = TableReference(torch.tensor(REF).log().view(1, 3))
    return KLRegularizedPPO("MlpPolicy", venv, reference=ref, kl_placement=placement, kl_estimator=estimator,
                            kl_beta=BETA, baseline=baseline, n_steps=8, batch_size=32, n_epochs=2, gamma=1.0,
                            gae_lambda=1.0, seed=3, device="cpu", **kw)


def _independent_k(logp_row: np.ndarray, actions: np.ndarray, estimator: str) -> np.ndarray:
    """k of each sampled action, from the policy's log-probability row and the reference, in float64 numpy."""
    ref = np.log(np.array(REF))
    d = logp_row[actions] - ref[actions]
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return np.exp(-d) - 1 + d
    return np.full(actions.shape, float((np.exp(logp_row) * (logp_row - ref)).sum()))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "full"])
def test_reward_placement_shapes_the_buffer_before_gae(estimator):
    """After a rollout, SB3's buffer holds r − β·k (k from π_old and π_ref of the sampled arm) and the
    advantages are those shaped rewards minus their batch mean (GAE ran on the shaped rewards). Expected
    values computed here in float64 from the arm rewards, the policy's log-probability row and the
    reference; the buffer is float32, hence 1e-6."""
    model = _bandit_model("reward", estimator)
    model.start(1)
    buf = model.rollout_buffer
    assert model.collect_rollouts(model.env, model._callback, buf, n_rollout_steps=model.n_steps)
    with torch.no_grad():
        logits = model.policy.get_distribution(torch.zeros(1, 1)).distribution.logits
    logp_row = torch.log_softmax(logits.double(), -1)[0].numpy()
    assert np.abs(logp_row - np.log(REF)).max() > 0.01  # π_old really differs from π_ref
    actions = buf.actions.reshape(-1).astype(np.int64)
    assert len(set(actions.tolist())) > 1
    expected = np.array(REWARDS)[actions] - BETA * _independent_k(logp_row, actions, estimator)
    np.testing.assert_allclose(buf.rewards.reshape(-1), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(buf.advantages.reshape(-1), expected - expected.mean(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.rollout_arrays["reward"].reshape(-1), np.array(REWARDS)[actions])


@pytest.mark.parametrize("estimator", ["k2", "k3", "full"])
def test_loss_placement_adds_beta_k_outside_the_clip(estimator):
    """With lr = 0 every minibatch sees π_old, so the logged KL term is β·mean k over the buffer (computed
    here independently) and the buffer's rewards are left unshaped."""
    model = _bandit_model("loss", estimator, learning_rate=0.0)
    model.start(1)
    assert model.update()
    ro = model.rollout_arrays
    actions = ro["actions"].reshape(-1).astype(np.int64)
    with torch.no_grad():
        logits = model.policy.get_distribution(torch.zeros(1, 1)).distribution.logits
    logp_row = torch.log_softmax(logits.double(), -1)[0].numpy()
    k = _independent_k(logp_row, actions, estimator)
    assert model.train_stats["kl_loss"] == pytest.approx(BETA * k.mean(), abs=1e-6)
    np.testing.assert_allclose(model.rollout_stats["reward"], np.array(REWARDS)[actions].mean(), atol=1e-6)


def test_adaptive_beta_follows_the_ziegler_controller():
    """After an update β ← β·(1 + clip(KL/target − 1, ±0.2)·n_episodes/horizon), KL = the rollout's k1 per
    episode (here 32 one-step episodes; horizon 100)."""
    model = _bandit_model("reward", "k1", kl_controller="adaptive", kl_target=1e-4, kl_horizon=100.0)
    model.start(2)
    for _ in range(2):
        beta = model.kl_beta
        assert model.update()
        kl, n = model.rollout_stats["kl_k1"], model.rollout_stats["episodes"]
        assert n == 32
        assert model.kl_beta == pytest.approx(beta * (1 + np.clip(kl / 1e-4 - 1, -0.2, 0.2) * n / 100.0))
        assert model.kl_beta != beta


def test_full_needs_the_reference_distribution():
    ref = CallableReference(lambda obs, a: torch.zeros(a.shape[0]))
    cfg = resolve(None, ["env.id=bandit"])
    venv = DummyVecEnv([lambda: make_shell(cfg)])
    with pytest.raises(ValueError, match="full"):
        KLRegularizedPPO("MlpPolicy", venv, reference=ref, kl_placement="loss", kl_estimator="full", n_steps=8,
                         batch_size=8, device="cpu")
    with pytest.raises(ValueError, match="reference"):
        KLRegularizedPPO("MlpPolicy", venv, kl_placement="reward", n_steps=8, batch_size=8, device="cpu")


def test_horizon_end_is_a_termination():
    """The gridworld shell truncates at the horizon; what SB3 sees is ``terminated`` (no bootstrap)."""
    env = make_shell(resolve(None, ["env.id=gridworld", "env.layout=open_5x5", "env.horizon=4"]))
    env.reset(seed=0)
    flags = [env.step(0)[2:4] for _ in range(4)]  # "up" from the top-left start: bump, never reach the goal
    assert flags == [(False, False)] * 3 + [(True, False)]


def test_config_rejects_what_sb3_cannot_do():
    for bad in (["train.mode=exact"], ["train.policy=mlp"], ["env.id=gaussian_bandit"], ["kl.clamp=5"],
                ["reference.schedule=reset"]):
        with pytest.raises(ConfigError) as e:
            resolve(None, ["train.backend=sb3", *bad])
        assert "train.backend=sb3" in str(e.value) and "\n" not in str(e.value)


def _short(*extra: str) -> list[str]:
    return ["env.id=bandit", "env.rewards=[1,0,0]", "env.ref_probs=[0.2,0.5,0.3]", "train.updates=3",
            "train.batch=32", "train.backend=sb3", "kl.placement=reward", *extra]


def test_same_seed_same_numbers_alone_or_batched():
    alone = make_trainer([resolve(None, _short("seed=1"))]).run()[0]
    again = make_trainer([resolve(None, _short("seed=0")), resolve(None, _short("seed=1"))]).run()
    pd.testing.assert_frame_equal(alone.metrics, again[1].metrics)
    pd.testing.assert_frame_equal(alone.trajectories, again[1].trajectories)
    assert not alone.metrics["kl_true"].equals(again[0].metrics["kl_true"])


def test_cli_run_sweep_and_report(tmp_path):
    """``reflab run`` writes the native contract (same columns as a native run); a sweep with
    ``train.backend`` as an axis runs each sb3 run as its own task and ``reflab report`` reads it."""
    from sim.lab.cli import main

    sets = [a for kv in _short("kl.estimator=k3") for a in ("--set", kv)]
    assert main(["run", *sets, "--out", str(tmp_path / "sb3"), "--quiet"]) == 0
    native = [a for kv in _short("kl.estimator=k3", "train.backend=native") for a in ("--set", kv)]
    assert main(["run", *native, "--out", str(tmp_path / "nat"), "--quiet"]) == 0
    for name in ("metrics", "policy", "trajectories"):
        a = pd.read_parquet(tmp_path / "sb3" / f"{name}.parquet")
        b = pd.read_parquet(tmp_path / "nat" / f"{name}.parquet")
        assert list(a.columns) == list(b.columns) and len(a) > 0, name
    status = json.loads((tmp_path / "sb3" / "status.json").read_text())
    assert status["status"] == "done" and status["backend"] == "sb3"

    grid = tmp_path / "grid.yaml"
    grid.write_text("base: {env: {id: bandit, rewards: [1, 0, 0], ref_probs: [0.2, 0.5, 0.3]},\n"
                    "       train: {updates: 3, batch: 32}, kl: {beta: 0.5}}\n"
                    "axes: {train.backend: [native, sb3]}\n"
                    "variants: [{kl.placement: reward, kl.estimator: k1}, {kl.placement: loss, kl.estimator: k3}]\n"
                    "seeds: 1\n")
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    index = pd.read_parquet(out / "index.parquet")
    assert len(index) == 4 and (index["status"] == "done").all()
    assert main(["report", str(out), "--formats", "png", "--n-boot", "50", "--figures", "kl"]) == 0


# ------------------------------------------------------------------------------------------------------
# Cross-checks: SB3 and the native engine end at the same final policy
# ------------------------------------------------------------------------------------------------------

VARIANTS = [("reward", "k1"), ("loss", "k2"), ("loss", "k3"), ("none", "k1")]
SEEDS = (0, 1, 2)


def _finals(base: list[str], final) -> dict[str, dict[tuple[str, str], np.ndarray]]:
    """``{backend: {variant: [seeds, ...] final values}}``; native runs as one batch, SB3 one run at a time."""
    cfgs = {v: [resolve(None, base + [f"kl.placement={v[0]}", f"kl.estimator={v[1]}", f"seed={s}"])
                for s in SEEDS] for v in VARIANTS}
    flat = [c for v in VARIANTS for c in cfgs[v]]
    native = make_trainer(flat).run()
    out = {"native": {}, "sb3": {}}
    for i, v in enumerate(VARIANTS):
        out["native"][v] = np.array([final(o) for o in native[i * len(SEEDS):(i + 1) * len(SEEDS)]], dtype=float)
        out["sb3"][v] = np.array([final(make_trainer([resolve(None, ["train.backend=sb3"], base=c.to_dict())]).run()[0])
                                  for c in cfgs[v]], dtype=float)
    return out


def _final_probs(o) -> np.ndarray:
    p = o.policy
    return p[p["update"] == p["update"].max()]["prob"].to_numpy()


def test_bandit_final_policies_match_native():
    """3-arm bandit, r = (1, 0, 0), π_ref = (0.1, 0.6, 0.3), β = 0.5, lr 0.07, 128 episodes × 30 updates,
    4 full-batch epochs, batch-mean baseline; both start at π_ref. Compared: the seed-mean final probability
    of each arm over seeds 0–2.

    Measured with 10 seeds per engine (seed-to-seed sd of π(arm 0), SB3 / native; max |mean difference| over
    arms): k1 in reward 0.0041 / 0.0035, 0.0004 (π(arm 0) = 0.466; Gibbs π* = 0.451); k2 as loss 0.020 /
    0.031, 0.0075 (0.452); k3 as loss 0.0029 / 0.0032, 0.0008 (0.585 = the forward-KL point); none 0.0008 /
    0.0010, 0.0004 (0.994). Tolerance per variant = 4·√(sd_sb3² + sd_native²)/√3 (four standard errors of a
    difference of 3-seed means; the worst arm), at least 0.01: 0.016, 0.086, 0.010, 0.010. The test also
    checks that the variants are told apart: k3 as loss ends > 0.08 above k1 in reward on arm 0 (10-seed gap
    0.12) and none > 0.95, in both engines.
    """
    tol = {("reward", "k1"): 0.016, ("loss", "k2"): 0.086, ("loss", "k3"): 0.010, ("none", "k1"): 0.010}
    base = ["env.id=bandit", "env.rewards=[1,0,0]", "env.ref_probs=[0.1,0.6,0.3]", "train.updates=30",
            "train.batch=128", "kl.beta=0.5", "train.lr=0.07", "log.policy_every=1000", "log.trajectories=0"]
    res = _finals(base, _final_probs)
    for v in VARIANTS:
        diff = np.abs(res["sb3"][v].mean(0) - res["native"][v].mean(0)).max()
        assert diff <= tol[v], (v, res["sb3"][v].mean(0), res["native"][v].mean(0))
    for eng in ("native", "sb3"):
        m = {v: res[eng][v].mean(0)[0] for v in VARIANTS}
        assert m[("loss", "k3")] - m[("reward", "k1")] > 0.08 and m[("none", "k1")] > 0.95, (eng, m)


def _final_return_kl(o) -> np.ndarray:
    return o.metrics.iloc[-1][["return_true", "kl_true"]].to_numpy(dtype=float)


def test_gridworld_final_policies_match_native():
    """Gridworld ``open_5x5`` (goal 8 moves away), horizon 8, β = 0.1, lr 0.06, 32 episodes × 16 updates
    (SB3: 8 envs × 32 steps per update), learned tabular value baseline; both start at π_ref. Compared: the
    seed means over seeds 0–2 of the final policy's exact return and sequence KL to π_ref (``return_true``,
    ``kl_true``).

    Measured with 10 seeds per engine (sd SB3 / native of return, of KL; |mean difference| of return, KL):
    k1 in reward 0.010 / 0.011, 0.12 / 0.16; 0.0025, 0.051. k2 as loss 0.012 / 0.009, 0.13 / 0.17; 0.0017,
    0.0025. k3 as loss 0.009 / 0.007, 0.12 / 0.15; 0.0021, 0.021. none 0.014 / 0.012, 0.66 / 0.65; 0.0016,
    0.017. Tolerance = 4·√(sd_sb3² + sd_native²)/√3 per variant and metric: return 0.034, 0.033, 0.028,
    0.042; KL 0.46, 0.49, 0.45, 2.14. The variants must also be told apart in both engines: every
    regularized KL more than 1.0 below ``none`` (10-seed gap 1.6) and k3 as loss's return more than 0.03
    below k1 in reward's (10-seed gap 0.07).
    """
    tol = {("reward", "k1"): (0.034, 0.46), ("loss", "k2"): (0.033, 0.49), ("loss", "k3"): (0.028, 0.45),
           ("none", "k1"): (0.042, 2.14)}
    base = ["env.id=gridworld", "env.layout=open_5x5", "env.horizon=8", "train.updates=16", "train.batch=32",
            "kl.beta=0.1", "train.lr=0.06", "log.policy_every=1000", "log.trajectories=0"]
    res = _finals(base, _final_return_kl)
    for v in VARIANTS:
        diff = np.abs(res["sb3"][v].mean(0) - res["native"][v].mean(0))
        assert (diff <= np.array(tol[v])).all(), (v, res["sb3"][v].mean(0), res["native"][v].mean(0))
    for eng in ("native", "sb3"):
        ret, kl = ({v: res[eng][v].mean(0)[i] for v in VARIANTS} for i in (0, 1))
        assert all(kl[("none", "k1")] - kl[v] > 1.0 for v in VARIANTS[:3]), (eng, kl)
        assert ret[("reward", "k1")] - ret[("loss", "k3")] > 0.03, (eng, ret)


def test_example_runs_with_tiny_step_counts():
    spec = importlib.util.spec_from_file_location("sb3_any_env", ROOT / "examples" / "sb3_any_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--steps", "64"])
    for case in ("cartpole", "pendulum"):
        assert np.isfinite(out[case]["kl_k1"]) and np.isfinite(out[case]["kl_full_sampled"])
