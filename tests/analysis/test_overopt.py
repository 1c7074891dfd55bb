"""The over-optimization analysis (analysis/overopt.py, analysis/overopt_report.py): Gao et al.'s forms, the
peak/final table, the early-stopping frontier, and the report section on a small real sweep with a learned proxy
and best-of-n."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis import overopt as O
from analysis.loading import variant_label
from sim.lab.cli import main
from tests.analysis.sweep_fixture import write_sweep


@pytest.mark.parametrize("form, alpha, beta", [("bon", 1.3, 0.4), ("rl", 0.8, 0.25)])
def test_gao_forms_are_recovered_from_their_own_curves(form: str, alpha: float, beta: float):
    d = np.linspace(0.0, 3.0, 40)
    a, b, rmse = O.fit_gao(d, O.gao_curve(d, alpha, beta, form), form)
    assert abs(a - alpha) < 1e-12 and abs(b - beta) < 1e-12 and rmse < 1e-12
    assert O.gao_curve(np.array([0.0]), alpha, beta, form)[0] == 0  # R(0) = 0 for both forms



@pytest.mark.parametrize("form", ["bon", "rl"])
@pytest.mark.parametrize("case", range(6))
def test_bootstrap_interval_is_the_quantiles_of_every_replicates_least_squares(form: str, case: int):
    """The interval refits only the replicates near its ranks: the same numbers as refitting them all."""
    rng = np.random.default_rng(case)
    runs = []
    for k in range(int(rng.integers(2, 9))):
        n = int(rng.integers(1, 40)) if case % 3 else int(rng.integers(1, 3))  # some runs with < 2 positive d
        d = np.sqrt(rng.exponential(1.0, n)) * (k % 4 != 3)  # some runs stay at d = 0
        r = O.gao_curve(d, 0.8, 0.3, form) + rng.normal(0, 0.05 * (1 + case), n)
        runs.append(O._FitRows(d, r, form))
    picks = np.array([rng.integers(0, len(runs), len(runs)) for _ in range(int(rng.integers(20, 400)))])
    every = np.array([O._refit([runs[j] for j in p]) for p in picks], dtype=float)
    lo, hi = O._boot_interval(runs, picks)
    if not np.isfinite(every).any():
        assert np.isnan(lo).all() and np.isnan(hi).all()
        return
    with np.errstate(all="ignore"):
        expected = np.nanquantile(every, [0.025, 0.975], axis=0)
    np.testing.assert_array_equal(np.stack([lo, hi]), expected)


def _points() -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        for variant, beta, path in (("none", 0.1, [(0, 0), (1, 1.0), (2, 1.5), (3, 0.5)]),
                                    ("k1 in reward", 0.1, [(0, 0), (0.5, 0.8), (1.0, 1.2)]),
                                    ("k1 in reward", 1.0, [(0, 0), (0.2, 0.3)])):
            for u, (d, g) in enumerate(path):
                rows.append({"run_id": f"{variant}-{beta}-{seed}", "variant": variant, "seed": seed, "kl.beta": beta,
                             "update": u, "kl": d * d, "d": d, "gold": g + seed, "proxy": 2 * d, "gold_rel": g,
                             "proxy_rel": 2 * d, "bon_n": np.nan})
    return pd.DataFrame(rows)


def test_env_keys_that_env_id_determines_are_no_condition():
    """A sweep over whole env mappings (an axis ``env: [{id: bandit, ...}, {id: token_tree, ...}]``) varies every
    env key with env.id; env.id alone is the condition, an env key that varies within one env stays one."""
    from analysis.loading import _env_determined

    runs = pd.DataFrame({"env.id": ["bandit", "bandit", "token_tree", "token_tree"],
                         "env.n_arms": [300, 300, np.nan, np.nan], "env.vocab": [np.nan, np.nan, 4, 4],
                         "env.reward_seed": [1, 2, 0, 0], "env": ["{}", "{}", "{x}", "{x}"]})
    swept = ["env", "env.id", "env.n_arms", "env.vocab", "env.reward_seed"]
    assert _env_determined(runs, swept) == {"env", "env.n_arms", "env.vocab"}
    assert _env_determined(runs.iloc[:2], swept) == set()  # one env: nothing is implied


def test_peaks_and_the_early_stopping_frontier():
    points = _points()
    per = O.peak_per_run(points).set_index("run_id")
    none = per.loc["none-0.1-0"]
    assert none["gold_peak"] == 1.5 and none["kl_at_peak"] == 4.0 and none["gold_final"] == 0.5
    assert none["drop"] == 1.0
    table = O.peak_table(per.reset_index(), ["variant", "kl.beta"], n_boot=50)
    assert abs(table.loc[table["variant"] == "none", "lost"].iloc[0] - 1 / 1.5) < 1e-12
    grid = np.array([0.5, 1.0, 2.0])
    # the path (0, 0) → (1, 1) → (1.5², …) is joined by segments: half-way to d = 1 it has gold 0.5
    assert np.array_equal(O.frontier_envelope(points[points["run_id"] == "none-0.1-0"], grid), [0.5, 1.0, 1.5])
    comp = O.frontier_comparison(points, [], grid, n_boot=50)
    k1 = comp[comp["variant"] == "k1 in reward"].set_index("d")
    # k1's frontier (both β) reaches 0.8 at d ≤ 0.5 and 1.2 at d ≤ 1 where no KL has 0.5 and 1.0
    assert np.allclose(k1["diff"], [0.3, 0.2, -0.3]) and np.allclose(k1["wins"], [1, 1, 0])


GRID = {
    "base": {"env": {"id": "bandit", "n_arms": 12, "reward_seed": 2},
             "reward": {"model": "learned", "pairs": 40, "l2": 0.01},
             "train": {"updates": 12, "batch": 32, "lr": 0.1},
             "log": {"every": 1, "trajectories": 0, "policy_every": 12, "progress": "none"}},
    "axes": {"kl.beta": [0.1, 1.0]},
    "variants": [{"kl.placement": "none"}, {"kl.placement": "reward", "kl.estimator": "k1"},
                 {"train.algo": "bon", "bon.n": 4}, {"train.algo": "bon", "bon.n": 64}],
    "exclude": [{"train.algo": "bon", "kl.beta": 1.0}],
    "seeds": 3,
}


def test_a_learned_reward_sweep_gets_the_over_optimization_section(tmp_path: Path):
    out = write_sweep(GRID, tmp_path / "sweep")
    res = analysis.load(out)
    assert variant_label("none", "k1", algo="bon") == "BoN"
    assert "bon.n" not in res.conditions
    assert {"gold_return", "proxy_return", "sqrt_kl", "opt_gold", "opt_proxy"} <= set(res.metrics.columns)
    assert main(["report", str(out), "--n-boot", "50", "--formats", "png", "--figures", "overopt"]) == 0
    rep = out / "report"
    index = (rep / "index.md").read_text()
    assert "## Reward over-optimization" in index and "Gao et al.'s forms" in index
    assert "Best-of-n against its fit" in index and "Frontier against no KL" in index
    for beta in ("0.1", "1"):
        assert (rep / f"figO1_frontier_beta-{beta}.png").is_file()
    assert (rep / "figO2_beta.png").is_file()
    peaks = pd.read_csv(rep / "overopt_peaks.csv")
    assert set(peaks["variant"]) == {"none", "k1 in reward", "BoN"}
    assert sorted(peaks.loc[peaks["variant"] == "BoN", "bon.n"]) == [4, 64]
    fits = pd.read_csv(rep / "overopt_fits.csv")
    assert set(fits.loc[fits["variant"] == "BoN", "form"]) == {"bon"}
    summary = pd.read_csv(rep / "summary.csv")
    assert "BoN" not in set(summary["variant"])  # best-of-n trains nothing: only in its own section


def _envelope_one_budget_at_a_time(points: pd.DataFrame, grid: np.ndarray) -> np.ndarray:
    """frontier_envelope as it was first written: one budget and one run at a time."""
    best = np.full(len(grid), -np.inf)
    for _, r in points.sort_values(["run_id", "update"], kind="stable").groupby("run_id", sort=False):
        d, g = r["d"].to_numpy(float), r["gold_rel"].to_numpy(float)
        for j, budget in enumerate(grid):
            ok = d <= budget
            if ok.any():
                best[j] = max(best[j], g[ok].max())
            a, b = d[:-1], d[1:]
            cross = (np.minimum(a, b) <= budget) & (np.maximum(a, b) > budget)
            if cross.any():
                t = (budget - a[cross]) / (b[cross] - a[cross])
                best[j] = max(best[j], float(np.max(g[:-1][cross] + t * (g[1:][cross] - g[:-1][cross]))))
    return np.where(np.isfinite(best), best, np.nan)


@pytest.mark.parametrize("case", range(8))
def test_frontier_envelope_is_the_one_budget_at_a_time_envelope(case: int):
    rng = np.random.default_rng(case)
    rows = []
    for run in range(int(rng.integers(1, 5))):
        n = int(rng.integers(1, 30))
        d = np.abs(np.cumsum(rng.normal(0.1, 0.3, n)))
        g = rng.normal(0, 1, n)
        if case % 2:
            g[rng.random(n) < 0.1] = np.nan  # a NaN gold keeps its budget's best where it was
        rows += [{"run_id": f"r{run}", "update": u, "d": d[u], "gold_rel": g[u]} for u in range(n)]
    points = pd.DataFrame(rows)
    grid = np.sort(rng.uniform(0, 2, int(rng.integers(1, 6))))
    np.testing.assert_array_equal(O.frontier_envelope(points, grid), _envelope_one_budget_at_a_time(points, grid))


@pytest.mark.parametrize("categorical", [True, False])
@pytest.mark.parametrize("case", range(4))
def test_wide_table_is_pivot_table_first(categorical: bool, case: int):
    """The figures' wide run × x tables are ``pivot_table(aggfunc="first")``'s: order, NaN and duplicates."""
    from analysis.overopt_report import wide_table

    rng = np.random.default_rng(case)
    n = 200
    names = [f"r{i:02d}" for i in rng.permutation(12)]
    run = rng.choice(names[:9], n)  # categories 9..11 never occur
    frame = pd.DataFrame({"run_id": pd.Categorical(run, categories=names) if categorical else run,
                          "update": rng.integers(0, 6, n).astype(float),  # duplicate (run, update) rows
                          "d": rng.normal(size=n)})
    frame.loc[rng.random(n) < 0.1, "d"] = np.nan
    frame.loc[rng.random(n) < 0.05, "update"] = np.nan
    values, xs = wide_table(frame, "update", "d")
    pivot = frame.pivot_table(index="run_id", columns="update", values="d", observed=True, aggfunc="first")
    np.testing.assert_array_equal(values, pivot.to_numpy(float))
    np.testing.assert_array_equal(xs, pivot.columns.to_numpy(float))


def test_gao_fits_are_every_replicates_least_squares_over_each_runs_rows():
    """gao_fits' numbers from a plain reference: per group, the runs' rows by pandas, one draw per replicate, a
    least-squares fit of every replicate and the 2.5/97.5 % quantiles."""
    rng = np.random.default_rng(3)
    rows = []
    for k in range(14):
        n = int(rng.integers(2, 9))
        d = np.sqrt(rng.exponential(1.0, n))
        rows.append(pd.DataFrame({"run_id": f"r{k:02d}", "variant": ["none", "k1"][k % 2], "update": np.arange(n),
                                  "d": d, "gold_rel": O.gao_curve(d, 0.8, 0.3, "rl") + rng.normal(0, 0.1, n)}))
    points = pd.concat(rows[::-1], ignore_index=True)
    points["run_id"] = pd.Categorical(points["run_id"], categories=sorted(points["run_id"].unique())[::-1])
    fits = O.gao_fits(points, ["variant"], n_boot=200, seed=5)
    draw = np.random.default_rng(5)
    for (variant, g), (_, fit) in zip(points.groupby("variant", observed=True), fits.iterrows(), strict=True):
        runs = [O._FitRows(r["d"].to_numpy(float), r["gold_rel"].to_numpy(float), "rl")
                for _, r in g.groupby("run_id", observed=True)]
        picks = [draw.integers(0, len(runs), len(runs)) for _ in range(200)]
        reps = np.array([O._refit([runs[j] for j in p]) for p in picks])
        lo, hi = np.nanquantile(reps, [0.025, 0.975], axis=0)
        assert fit["variant"] == variant
        assert (fit["alpha_lo"], fit["beta_lo"], fit["alpha_hi"], fit["beta_hi"]) == (lo[0], lo[1], hi[0], hi[1])
