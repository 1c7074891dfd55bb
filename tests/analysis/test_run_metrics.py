"""analysis.metrics on synthetic frames with known answers (and one real sweep)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import metrics as M
from analysis.loading import load


def frame(run_id: str, update: np.ndarray, variant: str = "k1 in reward", seed: int = 0, beta: float = 0.1,
          **columns: np.ndarray) -> pd.DataFrame:
    """A metrics-like table of one run: key columns + ``update`` + ``columns``."""
    n = len(update)
    return pd.DataFrame({"run_id": run_id, "variant": variant, "seed": seed, "kl.beta": beta,
                         "update": np.asarray(update), **{k: np.asarray(v, float) for k, v in columns.items()},
                         **({"reward_scale": np.ones(n)} if "reward_scale" not in columns else {})})


# ----------------------------------------------------------------------------------------------------------
# drift
# ----------------------------------------------------------------------------------------------------------


def test_drift_auc_final_and_mean() -> None:
    u = np.arange(11)
    a = frame("a", u, kl_true=u.astype(float))          # ∫_0^10 u du = 50
    b = frame("b", np.array([0, 2, 10]), kl_true=np.array([1.0, 1.0, 3.0]))  # 2·1 + 8·(1+3)/2 = 18
    d = M.drift(pd.concat([a, b])).set_index("run_id")
    assert d.loc["a", "kl_auc"] == pytest.approx(50.0)
    assert d.loc["a", "kl_final"] == 10.0 and d.loc["a", "kl_max"] == 10.0
    assert d.loc["a", "kl_mean"] == pytest.approx(5.0)
    assert d.loc["b", "kl_auc"] == pytest.approx(18.0)
    assert d.loc["b", "kl_mean"] == pytest.approx(1.8)
    assert d.loc["a", "variant"] == "k1 in reward" and d.loc["a", "kl.beta"] == 0.1  # keys carried along


def test_drift_stops_at_the_reward_switch() -> None:
    u = np.arange(21)
    scale = np.where(u <= 10, 1.0, 0.0)
    kl = np.where(u <= 10, u, 20 - u).astype(float)
    d = M.drift(frame("a", u, kl_true=kl, reward_scale=scale)).iloc[0]
    assert d["kl_final"] == 10.0  # the last update with the reward on
    assert d["kl_auc"] == pytest.approx(50.0)


def test_final_values_window_and_phase() -> None:
    u = np.arange(6)
    f = frame("a", u, x=np.array([0, 1, 2, 3, 4, 5.0]), reward_scale=np.array([1, 1, 1, 1, 0, 0.0]))
    assert M.final_values(f, ["x"]).iloc[0]["x"] == 3.0
    assert M.final_values(f, ["x"], phase="end").iloc[0]["x"] == 5.0
    assert M.final_values(f, ["x"], window=2, phase="end").iloc[0]["x"] == 4.5


# ----------------------------------------------------------------------------------------------------------
# estimators
# ----------------------------------------------------------------------------------------------------------


def test_estimator_bias_and_spread() -> None:
    u = np.arange(5)
    truth = np.array([np.nan, 1.0, 2.0, 3.0, 4.0])  # update 0 has no sampled batch
    f = frame("a", u, kl_full_sampled=truth, kl_k1=truth + np.array([0, 1, -1, 1, -1]), kl_k2=truth + 0.5,
              kl_k3=truth * 0.5, kl_true=np.zeros(5))
    e = M.estimator_error(f).set_index("estimator")
    assert e.loc["k1", "n"] == 4
    assert e.loc["k1", "bias"] == pytest.approx(0.0) and e.loc["k1", "spread"] == pytest.approx(1.0)
    assert e.loc["k1", "rmse"] == pytest.approx(1.0)
    assert e.loc["k2", "bias"] == pytest.approx(0.5) and e.loc["k2", "spread"] == pytest.approx(0.0)
    assert e.loc["k3", "bias"] == pytest.approx(-1.25) and e.loc["k3", "rel_bias"] == pytest.approx(-0.5)


def test_sampling_kl_falls_back_to_the_previous_update() -> None:
    # Without kl_full_sampled, the truth of update u's batch is kl_true after update u − 1 (if logged).
    f = frame("a", np.array([0, 1, 2, 4]), kl_true=np.array([0.0, 0.5, 0.7, 0.9]))
    np.testing.assert_array_equal(M.sampling_kl(f).to_numpy(), [np.nan, 0.0, 0.5, np.nan])


def test_estimator_samples_from_trajectories() -> None:
    # Two steps with δ = log 2 and 0: k1 = log 2, k2 = ½ log²2, k3 = (½ − 1 + log 2) + 0.
    traj = pd.DataFrame({"run_id": "a", "variant": "none", "seed": 0, "update": 1, "episode": [0, 0],
                         "t": [0, 1], "logp": [np.log(0.5), np.log(0.3)], "ref_logp": [np.log(0.25), np.log(0.3)]})
    metrics = frame("a", np.array([0, 1]), kl_full_sampled=np.array([np.nan, 0.6]))
    s = M.estimator_samples(traj, metrics).set_index("estimator")
    ln2 = np.log(2.0)
    assert s.loc["k1", "value"] == pytest.approx(ln2)
    assert s.loc["k2", "value"] == pytest.approx(0.5 * ln2 ** 2)
    assert s.loc["k3", "value"] == pytest.approx(0.5 - 1 + ln2)
    assert s.loc["k1", "error"] == pytest.approx(ln2 - 0.6)
    assert (s["variant"] == "none").all()


# ----------------------------------------------------------------------------------------------------------
# collapse
# ----------------------------------------------------------------------------------------------------------


def test_time_to_collapse_and_collapsed_fraction() -> None:
    u = np.arange(101)
    a = frame("a", u, seed=0, entropy=(100 - u) / 100, min_prob=np.full(101, 0.01), support=np.full(101, 2.0))
    b = frame("b", u, seed=1, entropy=np.full(101, 0.5), min_prob=np.full(101, 0.2), support=np.full(101, 3.0))
    c = M.collapse(pd.concat([a, b])).set_index("run_id")
    # (100 − u)/100 < 0.1 first at u = 91 (u = 90 gives exactly 0.1, not below)
    assert c.loc["a", "collapse_update"] == 91
    assert c.loc["a", "collapsed"] and not c.loc["b", "collapsed"]
    assert np.isnan(c.loc["b", "collapse_update"])
    assert c.loc["a", "support_final"] == 2.0 and c.loc["b", "min_prob_final"] == 0.2
    frac = M.collapsed_fraction(c.reset_index(), ["variant"])
    assert frac["collapsed_fraction"].tolist() == [0.5] and frac["n"].tolist() == [2]
    assert M.collapse(pd.concat([a, b]), threshold=0.6).set_index("run_id").loc["b", "collapse_update"] == 0


def test_support_size_and_deterministic_states() -> None:
    pol = pd.DataFrame({"run_id": "a", "variant": "none", "seed": 0,
                        "update": [0, 0, 0, 0, 9, 9, 9, 9], "state": [0, 0, 1, 1, 0, 0, 1, 1],
                        "action": [0, 1, 0, 1, 0, 1, 0, 1],
                        "prob": [0.5, 0.5, 0.9, 0.1, 0.9995, 0.0005, 0.3, 0.7],
                        "ref_prob": [0.5, 0.5, 0.995, 0.005] * 2})
    sup = M.support_size(pol).set_index(["update", "state"])
    assert sup.loc[(0, 0), "support"] == 2 and sup.loc[(9, 0), "support"] == 1
    assert sup.loc[(9, 1), "ref_support"] == 2
    det = M.deterministic_states(pol).set_index("state")
    assert (det["update"] == 9).all()
    assert det.loc[0, "deterministic"] and det.loc[0, "became_deterministic"] and det.loc[0, "action"] == 0
    assert not det.loc[1, "deterministic"] and det.loc[1, "action"] == 1 and det.loc[1, "ref_max_prob"] == 0.995


# ----------------------------------------------------------------------------------------------------------
# recovery
# ----------------------------------------------------------------------------------------------------------


def test_half_life_of_an_exponential_decay() -> None:
    u = np.arange(0, 61, dtype=float)
    kl = 2.0 * 0.5 ** (u / 10.0)
    assert M.half_life(u, kl, 0.0) == pytest.approx(10.0)
    # logged every 3 updates: linear interpolation between 9 (2·0.5^0.9) and 12 (2·0.5^1.2)
    u3 = u[::3]
    y0, y1 = 2 * 0.5 ** 0.9, 2 * 0.5 ** 1.2
    assert M.half_life(u3, 2.0 * 0.5 ** (u3 / 10.0), 0.0) == pytest.approx(9 + 3 * (y0 - 1.0) / (y0 - y1))
    assert np.isnan(M.half_life(u, np.full_like(u, 2.0), 0.0))  # never halves
    assert np.isnan(M.half_life(u, np.zeros_like(u), 0.0))      # nothing to recover


def test_recovery_after_the_reward_is_switched_off() -> None:
    u = np.arange(0, 101)
    scale = np.where(u <= 50, 1.0, 0.0)
    decay = np.where(u <= 50, np.minimum(u, 40) / 40.0, 0.5 ** ((u - 50) / 8.0))
    stuck = np.where(u <= 50, np.minimum(u, 40) / 20.0, 2.0)
    f = pd.concat([frame("back", u, kl_true=decay, reward_scale=scale),
                   frame("stuck", u, seed=1, kl_true=stuck, reward_scale=scale),
                   frame("plain", u, seed=2, kl_true=u / 100.0)])  # no reward-off phase: not in the table
    r = M.recovery(f).set_index("run_id")
    assert list(r.index) == ["back", "stuck"]
    assert r.loc["back", "switch_update"] == 50
    assert r.loc["back", "kl_switch"] == 1.0
    assert r.loc["back", "half_life"] == pytest.approx(8.0)
    assert r.loc["back", "kl_end"] == pytest.approx(0.5 ** (50 / 8))
    assert r.loc["back", "returned"] and not r.loc["stuck", "returned"]
    assert np.isnan(r.loc["stuck", "half_life"]) and r.loc["stuck", "kl_ratio"] == 1.0
    assert M.recovery(f, tol=3.0).set_index("run_id").loc["stuck", "returned"]


def test_reward_phase_keeps_runs_without_a_switch() -> None:
    u = np.arange(5)
    f = pd.concat([frame("a", u, x=u, reward_scale=np.array([1, 1, 0, 0, 1.0])), frame("b", u, x=u)])
    kept = M.reward_phase(f)
    assert kept[kept["run_id"] == "a"]["update"].tolist() == [0, 1]
    assert kept[kept["run_id"] == "b"]["update"].tolist() == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------------
# optimum and the full per-run summary, on a real sweep
# ----------------------------------------------------------------------------------------------------------


def test_optimum_distance() -> None:
    u = np.arange(3)
    d = M.optimum_distance(frame("a", u, tv_opt=np.array([1.0, 0.5, 0.25]))).iloc[0]
    assert d["tv_opt_final"] == 0.25 and d["tv_opt_auc"] == pytest.approx(0.75 + 0.375)


def test_run_summary_on_a_real_sweep(bandit_sweep: Path) -> None:
    res = load(bandit_sweep)
    s = M.run_summary(res.metrics)
    assert len(s) == 32 and s["run_id"].is_unique
    for col in ("kl_final", "kl_auc", "entropy_final", "collapsed", "tv_opt_final", "return_final",
                "kl_switch", "kl_end", "half_life", "returned"):
        assert col in s, col
    assert (s["switch_update"] == 30).all()
    # the initial policy is the reference: the KL starts at 0 and no run has negative drift
    assert (s["kl_auc"] >= 0).all()
    e = M.estimator_error(res.metrics)
    assert set(e["estimator"].astype(str)) == {"k1", "k2", "k3"} and (e["n"] == 60).all()
