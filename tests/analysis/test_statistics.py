"""analysis.stats against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import stats as S


def test_iqm_by_hand() -> None:
    assert S.iqm(np.arange(1, 9)) == pytest.approx(4.5)  # mean(3, 4, 5, 6)
    assert S.iqm([1, 2, 3, 4, 100]) == pytest.approx(3.0)  # cut floor(1.25) = 1 from each end
    assert S.iqm([7.0]) == 7.0
    x = np.random.default_rng(0).normal(size=(3, 37))
    np.testing.assert_allclose(S.iqm(x, axis=-1), sps.trim_mean(x, 0.25, axis=-1))


def test_interval_is_seeded_and_degenerate_when_constant() -> None:
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.3])
    a = S.interval_estimate(x, "mean", n_boot=500, seed=3)
    b = S.interval_estimate(x, "mean", n_boot=500, seed=3)
    assert a == b
    assert a.point == pytest.approx(x.mean()) and a.lo <= a.point <= a.hi
    assert S.interval_estimate([2.0, 2.0, 2.0], "iqm", n_boot=200) == (2.0, 2.0, 2.0)
    assert S.interval_estimate(x, "mean", n_boot=0) == (x.mean(),) * 3
    assert np.isnan(S.interval_estimate([np.nan], "mean").point)


def test_bootstrap_distribution_of_a_two_point_sample() -> None:
    # Resampling {0, 1} twice gives means 0, ½, 1 with probabilities ¼, ½, ¼.
    reps = S.stratified_bootstrap(np.array([0.0, 1.0]), n_boot=40_000, seed=0).mean(axis=1)
    freq = [np.mean(reps == v) for v in (0.0, 0.5, 1.0)]
    np.testing.assert_allclose(freq, [0.25, 0.5, 0.25], atol=0.01)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert S.interval_estimate([0.0, 1.0], "mean", n_boot=40_000, seed=0) == (0.5, lo, hi) == (0.5, 0.0, 1.0)


def test_stratified_bootstrap_stays_within_tasks() -> None:
    # Task 0 holds values < 10, task 1 values ≥ 100: every replicate keeps 3 + 2 values from the right task.
    reps = S.stratified_bootstrap([np.array([1.0, 2.0, 3.0]), np.array([100.0, 200.0])], n_boot=300, seed=1)
    assert reps.shape == (300, 5)
    assert (reps[:, :3] < 10).all() and (reps[:, 3:] >= 100).all()
    # the [n_runs, n_tasks] layout is the same thing
    m = np.array([[1.0, 100.0], [2.0, 200.0]])
    assert (S.stratified_bootstrap(m, 50, seed=0)[:, :2] < 10).all()
    # the mean of tasks with a constant value each has no spread
    assert S.interval_estimate([np.full(4, 1.0), np.full(4, 3.0)], "mean", n_boot=100) == (2.0, 2.0, 2.0)


def test_probability_of_improvement_by_hand() -> None:
    # pairs (x, y): 1>0; 2>0; 2=2 (½); 3>0; 3>2 → (1 + 1 + 0.5 + 1 + 1) / 9 = 0.5
    assert S.probability_of_improvement([1, 2, 3], [0, 2, 4], n_boot=0).point == pytest.approx(0.5)
    assert S.probability_of_improvement([3, 4], [1, 2], n_boot=0).point == 1.0
    assert S.probability_of_improvement([1, 1], [1, 1], n_boot=0).point == 0.5
    # two tasks weigh equally: task 0 gives 1, task 1 gives 0
    p = S.probability_of_improvement([np.array([5.0]), np.array([0.0])], [np.array([1.0]), np.array([9.0])],
                                     n_boot=0)
    assert p.point == 0.5
    ci = S.probability_of_improvement([0.1, 0.5, 0.2, 0.9], [0.3, 0.4, 0.0, 0.2], n_boot=1000, seed=0)
    assert 0.0 <= ci.lo <= ci.point <= ci.hi <= 1.0
    with pytest.raises(ValueError):
        S.probability_of_improvement([np.ones(2), np.ones(2)], [np.ones(2)])


def test_performance_profile_by_hand() -> None:
    prof = S.performance_profile([1.0, 2.0, 3.0, 4.0], [0.0, 2.5, 5.0])
    assert prof["fraction"].tolist() == [1.0, 0.5, 0.0]
    low = S.performance_profile([1.0, 2.0, 3.0, 4.0], [2.5], higher_is_better=False)
    assert low["fraction"].tolist() == [0.5]
    # tasks weigh equally: fractions ½ (task of 2 runs) and 1 (task of 1 run) → ¾
    assert S.performance_profile([np.array([0.0, 2.0]), np.array([5.0])], [1.0])["fraction"].tolist() == [0.75]
    ci = S.performance_profile([1.0, 2.0, 3.0, 4.0], [2.5], n_boot=500, seed=0)
    assert ci["lo"].iloc[0] <= 0.5 <= ci["hi"].iloc[0]


def test_aggregate_per_group() -> None:
    per_run = pd.DataFrame({"variant": ["a"] * 4 + ["b"] * 4, "x": [1.0, 2.0, 3.0, 100.0, 5.0, 5.0, 5.0, 5.0],
                            "flag": [True, False, False, False, True, True, True, True]})
    iqm = S.aggregate(per_run, ["x"], ["variant"], stat="iqm", n_boot=200).set_index("variant")
    assert iqm.loc["a", "x"] == pytest.approx(2.5) and iqm.loc["a", "n"] == 4
    assert iqm.loc["b", ["x", "x_lo", "x_hi"]].tolist() == [5.0, 5.0, 5.0]
    mean = S.aggregate(per_run, ["flag"], ["variant"], stat="mean", n_boot=200).set_index("variant")
    assert mean.loc["a", "flag"] == 0.25 and mean.loc["b", "flag"] == 1.0


def test_bootstrap_curve_handles_missing_seeds() -> None:
    values = np.array([[0.0, 1.0, 2.0], [2.0, 3.0, np.nan]])  # the second seed has no value at the last x
    point, lo, hi = S.bootstrap_curve(values, "mean", n_boot=400, seed=0)
    np.testing.assert_allclose(point, [1.0, 2.0, 2.0])
    assert (lo <= point).all() and (point <= hi).all()
    assert lo[0] == 0.0 and hi[0] == 2.0
    one = S.bootstrap_curve(values[:1], "mean")
    np.testing.assert_array_equal(one[0], one[1])
