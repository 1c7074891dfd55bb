"""Per-run measures of drift, collapse, recovery and distance to the optimum, computed from loaded tables.

Every function takes a tidy table from :func:`analysis.load` (one row per run × logged update, key columns
in front: see :func:`analysis.loading.key_columns`) and returns one row per run (or per run × something) with
the run's key columns kept, so results can be grouped by ``variant``, ``kl.beta`` … and aggregated over seeds
with :mod:`analysis.stats`. Updates are the ``update`` column; update 0 is the initial policy.

Conventions (stated once, used everywhere):

- **final** = the last logged update of the *reward phase*: the whole run, or, for a run whose reward is
  switched off (a ``reward_scale = 0`` phase), the last update before the switch. What happens after the
  switch is measured by :func:`recovery`.
- **collapse**: entropy (nats, occupancy-weighted mean over visited states) below
  :data:`COLLAPSE_ENTROPY` = 0.1 nats.
- **support**: actions with probability above :data:`SUPPORT_EPS` = 1e-3 (the engine's ``support`` column
  uses the same ε).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.loading import key_columns

#: Entropy (nats) below which a policy counts as collapsed.
COLLAPSE_ENTROPY = 0.1
#: Probability above which an action counts as supported.
SUPPORT_EPS = 1e-3
#: Max probability at or above which a state's policy counts as deterministic.
DETERMINISTIC_PROB = 0.99
#: KL (nats) within which a run counts as returned to the reference after the reward is removed.
RECOVERY_TOL = 0.05
#: Exact KLs (nats) in [−this, 0) are float rounding of a KL of 0 and are read as 0 (:func:`clamp_rounding`);
#: anything more negative is left as it is, so that a real error shows.
KL_ROUNDING_TOL = 1e-5
#: Exact-KL columns of the metrics (each ≥ 0 by definition).
EXACT_KL_COLUMNS = ("kl_true", "kl_forward", "kl_opt")
#: Sampled KL estimators logged per update, in order.
ESTIMATOR_COLUMNS = {"k1": "kl_k1", "k2": "kl_k2", "k3": "kl_k3"}


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _run_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run with its key columns (in the frame's run order)."""
    keys = key_columns(frame)
    return frame.drop_duplicates("run_id")[keys].reset_index(drop=True)


def _with_keys(frame: pd.DataFrame, per_run: pd.DataFrame) -> pd.DataFrame:
    """``per_run`` (indexed or keyed by ``run_id``) joined to the run key columns."""
    per_run = per_run.reset_index() if "run_id" not in per_run.columns else per_run
    keys = _run_keys(frame)
    out = keys.merge(per_run, on="run_id", how="left")
    return out


def clamp_rounding(values: pd.Series, tol: float = KL_ROUNDING_TOL) -> pd.Series:
    """An exact KL with values in [−``tol``, 0) (float rounding around 0, e.g. −1.3e-8) set to 0."""
    v = values.astype("float64")
    return v.mask((v < 0) & (v >= -tol), 0.0)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["run_id", "update"], kind="stable")


def reward_phase(metrics: pd.DataFrame, switch: pd.Series | None = None) -> pd.DataFrame:
    """Rows up to the end of the reward phase: all rows, or for runs with a ``reward_scale = 0`` phase after a
    rewarded one, the rows up to the last update before the first such switch.

    ``switch`` (``run_id`` → that update, see :func:`switch_updates`) lets another table of the same runs
    (e.g. the policy snapshots) be cut where the metrics say; by default it comes from ``metrics`` itself.
    """
    switch = switch_updates(metrics) if switch is None else switch
    if switch.empty:
        return metrics
    limit = metrics["run_id"].map(switch).astype("float64")
    return metrics[limit.isna().to_numpy() | (metrics["update"].to_numpy() <= limit.to_numpy())]


def at_update(frame: pd.DataFrame, update: int | str = "last") -> pd.DataFrame:
    """Rows of ``frame`` at ``update``, or with ``"last"`` at each run's last logged update."""
    if update == "last":
        last = frame.groupby("run_id", observed=True)["update"].transform("max")
        return frame[frame["update"] == last]
    return frame[frame["update"] == int(update)]


def switch_updates(metrics: pd.DataFrame) -> pd.Series:
    """``run_id`` → the last update before the reward is first switched off (runs without a switch absent).

    A switch is a logged row with ``reward_scale == 0`` whose previous row had ``reward_scale > 0``; the
    returned update is that previous row's (the policy the moment the reward disappears).
    """
    if "reward_scale" not in metrics or metrics.empty:
        return pd.Series(dtype="float64")
    m = _sorted(metrics)[["run_id", "update", "reward_scale"]]
    same_run = m["run_id"].eq(m["run_id"].shift())
    prev_scale = m["reward_scale"].shift()
    is_switch = same_run & (m["reward_scale"] == 0) & (prev_scale > 0)
    prev_update = m["update"].shift()
    first = prev_update[is_switch].groupby(m.loc[is_switch, "run_id"], observed=True).first()
    return first.astype("float64")


def final_values(metrics: pd.DataFrame, columns: Sequence[str], window: int = 1,
                 phase: str = "reward") -> pd.DataFrame:
    """Per-run values of ``columns`` at the end of a run.

    Args:
        metrics: the metrics table.
        columns: metric columns to report.
        window: average over the last ``window`` logged rows (1 = the last row only).
        phase: ``"reward"`` (end of the reward phase, see the module docstring) or ``"end"`` (last logged row).
    Returns:
        One row per run: key columns, ``update`` (the last row's update) and ``columns``.
    """
    m = reward_phase(metrics) if phase == "reward" else metrics
    m = _sorted(m)
    tail = m.groupby("run_id", observed=True, sort=False).tail(window)
    agg = tail.groupby("run_id", observed=True, sort=False).agg(
        {"update": "max", **{c: "mean" for c in columns if c in tail}})
    return _with_keys(metrics, agg)


def _trapezoid_per_run(m: pd.DataFrame, column: str) -> pd.Series:
    """∫ column d(update) per run by the trapezoid rule over logged rows (NaN rows skipped)."""
    m = _sorted(m[m[column].notna()])
    y, x = m[column].to_numpy(float), m["update"].to_numpy(float)
    same = m["run_id"].eq(m["run_id"].shift()).to_numpy()
    piece = np.where(same, 0.5 * (y + np.roll(y, 1)) * (x - np.roll(x, 1)), 0.0)
    return pd.Series(piece, index=m.index).groupby(m["run_id"], observed=True).sum()


# ----------------------------------------------------------------------------------------------------------
# Drift
# ----------------------------------------------------------------------------------------------------------


def drift(metrics: pd.DataFrame, column: str = "kl_true") -> pd.DataFrame:
    """Drift from the reference per run, over the reward phase.

    Returns one row per run: key columns and
        ``kl_final`` (``column`` at the last update of the reward phase, nats),
        ``kl_max`` (its maximum over the phase),
        ``kl_auc`` (area under ``column`` vs update by the trapezoid rule, nats × updates),
        ``kl_mean`` (``kl_auc`` divided by the number of updates spanned: the time-averaged KL).
    """
    m = reward_phase(metrics)
    if column in EXACT_KL_COLUMNS:
        m = m.assign(**{column: clamp_rounding(m[column])})
    g = m.groupby("run_id", observed=True, sort=False)
    span = (g["update"].max() - g["update"].min()).astype(float)
    auc = _trapezoid_per_run(m, column)
    last = _sorted(m).groupby("run_id", observed=True, sort=False)[column].last()
    per_run = pd.DataFrame({"kl_final": last, "kl_max": g[column].max(), "kl_auc": auc,
                            "kl_mean": auc / span.where(span > 0)})
    return _with_keys(metrics, per_run)


def sampling_kl(metrics: pd.DataFrame) -> pd.Series:
    """The KL of the policy that sampled each row's batch, aligned with ``metrics`` rows (NaN if unknown).

    The logged estimators ``kl_k1/k2/k3`` (and the trajectories) of update ``u`` come from the batch sampled
    *before* update ``u``, while ``kl_true`` is measured *after* it. The true KL of the sampling policy is
    ``kl_full_sampled`` (the exact per-state KL averaged over the batch's states: exact for one-state envs)
    where logged, else ``kl_true`` of update ``u − 1`` when that update was logged.
    """
    out = pd.Series(np.nan, index=metrics.index, dtype="float64")
    if "kl_full_sampled" in metrics:
        out = metrics["kl_full_sampled"].astype("float64").copy()
    missing = out.isna()
    if missing.any() and "kl_true" in metrics:
        m = _sorted(metrics)
        prev_ok = m["run_id"].eq(m["run_id"].shift()) & (m["update"] - m["update"].shift() == 1)
        lagged = m["kl_true"].shift().where(prev_ok)
        out[missing] = lagged.reindex(metrics.index)[missing]
    return out


def estimator_error(metrics: pd.DataFrame) -> pd.DataFrame:
    """Bias and spread of each sampled KL estimator against the true KL of the sampling policy.

    Uses the per-update batch means ``kl_k1``, ``kl_k2``, ``kl_k3`` and :func:`sampling_kl` as the truth,
    over every logged update where both exist (all phases).

    Returns:
        One row per run × estimator: key columns, ``estimator`` (k1 | k2 | k3), ``n`` (updates used),
        ``bias`` (mean of estimate − truth, nats), ``spread`` (standard deviation of estimate − truth),
        ``rmse``, ``rel_bias`` (mean estimate / mean truth − 1; NaN when the mean truth is 0).
    """
    truth = sampling_kl(metrics)
    parts = []
    for name, col in ESTIMATOR_COLUMNS.items():
        if col not in metrics:
            continue
        err = metrics[col] - truth
        ok = err.notna()
        frame = pd.DataFrame({"run_id": metrics.loc[ok, "run_id"], "err": err[ok],
                              "est": metrics.loc[ok, col], "truth": truth[ok]})
        g = frame.groupby("run_id", observed=True, sort=False)
        mean_truth = g["truth"].mean()
        per = pd.DataFrame({
            "estimator": name, "n": g["err"].size(), "bias": g["err"].mean(), "spread": g["err"].std(ddof=0),
            "rmse": np.sqrt(g["err"].apply(lambda e: float(np.mean(np.square(e))))),
            "rel_bias": g["est"].mean() / mean_truth.where(mean_truth > 0) - 1.0,
        })
        parts.append(_with_keys(metrics, per).dropna(subset=["n"]))
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True)
    out["n"] = out["n"].astype("int64")
    out["estimator"] = pd.Categorical(out["estimator"], categories=list(ESTIMATOR_COLUMNS))
    return out


def estimator_samples(trajectories: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per-episode estimator values from ``trajectories`` against the true KL of the sampling policy.

    Each logged episode's ``k1 = Σ_t δ_t``, ``k2 = Σ_t ½δ_t²``, ``k3 = Σ_t (e^{−δ_t} − 1 + δ_t)`` with
    ``δ = logp − ref_logp`` (the sequence-level single-sample estimates) is paired with :func:`sampling_kl`
    of the same run and update.

    Returns:
        Long table: key columns, ``update``, ``episode``, ``estimator``, ``value``, ``kl`` (the truth),
        ``error = value − kl``. Empty if there are no trajectories.
    """
    if trajectories.empty:
        return pd.DataFrame(columns=["run_id", "update", "episode", "estimator", "value", "kl", "error"])
    delta = (trajectories["logp"] - trajectories["ref_logp"]).astype("float64")
    per_step = pd.DataFrame({"run_id": trajectories["run_id"], "update": trajectories["update"],
                             "episode": trajectories["episode"], "k1": delta, "k2": 0.5 * delta ** 2,
                             "k3": np.expm1(-delta) + delta})
    ep = per_step.groupby(["run_id", "update", "episode"], observed=True, sort=False).sum().reset_index()
    truth = metrics[["run_id", "update"]].assign(kl=sampling_kl(metrics))
    ep = ep.merge(truth, on=["run_id", "update"], how="inner").dropna(subset=["kl"])
    long = ep.melt(id_vars=["run_id", "update", "episode", "kl"], value_vars=list(ESTIMATOR_COLUMNS),
                   var_name="estimator", value_name="value")
    long["error"] = long["value"] - long["kl"]
    long["estimator"] = pd.Categorical(long["estimator"], categories=list(ESTIMATOR_COLUMNS))
    keys = _run_keys(trajectories)
    return keys.merge(long, on="run_id", how="inner")


# ----------------------------------------------------------------------------------------------------------
# Collapse
# ----------------------------------------------------------------------------------------------------------


def collapse(metrics: pd.DataFrame, threshold: float = COLLAPSE_ENTROPY, column: str = "entropy") -> pd.DataFrame:
    """Entropy collapse per run, over the reward phase.

    Args:
        threshold: entropy (nats) below which the policy is collapsed (default 0.1).
        column: the entropy column (``entropy``; differential entropy for the Gaussian bandit, where a
            threshold in nats has no absolute meaning).
    Returns:
        One row per run: key columns, ``entropy_final``, ``min_prob_final``, ``support_final`` (from the
        logged columns, when present), ``collapse_update`` (first logged update with entropy < threshold,
        NaN if never), ``collapsed`` (entropy at the end of the reward phase < threshold). Runs with
        continuous actions (no finite ``min_prob`` logged: their entropy is differential, so a threshold in
        nats has no absolute meaning) get NaN in both.
    """
    m = _sorted(reward_phase(metrics))
    g = m.groupby("run_id", observed=True, sort=False)
    per = pd.DataFrame({"entropy_final": g[column].last()})
    for col in ("min_prob", "support"):
        if col in m:
            per[f"{col}_final"] = g[col].last()
    below = m[m[column] < threshold]
    per["collapse_update"] = below.groupby("run_id", observed=True)["update"].min().reindex(per.index)
    per["collapsed"] = per["entropy_final"] < threshold
    if "min_prob" in m:
        continuous = ~m["min_prob"].notna().groupby(m["run_id"], observed=True).any().reindex(per.index)
        if bool(continuous.any()):
            per["collapse_update"] = per["collapse_update"].astype("float64").where(~continuous)
            per["collapsed"] = per["collapsed"].astype("float64").where(~continuous)
    return _with_keys(metrics, per)


def collapsed_fraction(per_run: pd.DataFrame, by: Sequence[str], column: str = "collapsed") -> pd.DataFrame:
    """Fraction of runs (seeds) with ``column`` true, per group ``by``: columns ``by + [n, collapsed_fraction]``."""
    g = per_run.groupby(list(by), observed=True, sort=True, dropna=False)[column]
    return pd.DataFrame({"n": g.size(), f"{column}_fraction": g.mean()}).reset_index()


def support_size(policy: pd.DataFrame, eps: float = SUPPORT_EPS) -> pd.DataFrame:
    """Number of actions with probability > ``eps`` per run × update × state (discrete ``policy`` tables).

    Returns: key columns, ``update``, ``state``, ``support`` (policy), ``ref_support`` (reference).
    """
    keys = key_columns(policy)
    cols = keys + ["update", "state"]
    sup = policy.assign(_p=policy["prob"] > eps, _r=policy["ref_prob"] > eps)
    out = sup.groupby(cols, observed=True, sort=False)[["_p", "_r"]].sum().reset_index()
    return out.rename(columns={"_p": "support", "_r": "ref_support"})


def deterministic_states(policy: pd.DataFrame, threshold: float = DETERMINISTIC_PROB,
                         update: int | str = "last") -> pd.DataFrame:
    """Per run × state at one update: the most likely action and whether the policy is deterministic there.

    Args:
        threshold: a state is deterministic when its most likely action has probability ≥ ``threshold``.
        update: the update to inspect, or ``"last"`` (each run's last logged policy).
    Returns:
        Key columns, ``update``, ``state``, ``action`` (argmax), ``max_prob``, ``ref_max_prob``,
        ``deterministic``, ``became_deterministic`` (deterministic where the reference is not).
        Gridworld states are ``t·n_cells + cell`` (see :mod:`analysis.gridworld` for cells).
    """
    p = at_update(policy, update)
    keys = key_columns(p)
    idx = p.groupby(keys + ["update", "state"], observed=True, sort=False)["prob"].idxmax()
    best = p.loc[idx.to_numpy(), keys + ["update", "state", "action", "prob"]].rename(columns={"prob": "max_prob"})
    ref_max = p.groupby(["run_id", "state"], observed=True)["ref_prob"].max().rename("ref_max_prob").reset_index()
    out = best.merge(ref_max, on=["run_id", "state"], how="left")
    out["deterministic"] = out["max_prob"] >= threshold
    out["became_deterministic"] = out["deterministic"] & (out["ref_max_prob"] < threshold)
    return out.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# Recovery
# ----------------------------------------------------------------------------------------------------------


def half_life(update: np.ndarray, kl: np.ndarray, start: float) -> float:
    """Updates from ``start`` until ``kl`` first falls to half its value at ``start`` (linear interpolation
    between logged updates); NaN if it never does or the starting KL is 0.

    Args:
        update: ``[n]`` increasing logged updates (including ``start``).
        kl: ``[n]`` the KL at those updates.
        start: the update the clock starts at (the reward switch).
    """
    update, kl = np.asarray(update, float), np.asarray(kl, float)
    after = update >= start
    u, y = update[after], kl[after]
    if len(u) == 0 or not np.isfinite(y[0]) or y[0] <= 1e-12:
        return float("nan")
    target = 0.5 * y[0]
    below = np.flatnonzero(y <= target)
    if len(below) == 0:
        return float("nan")
    j = below[0]
    if j == 0:
        return 0.0
    u0, u1, y0, y1 = u[j - 1], u[j], y[j - 1], y[j]
    frac = (y0 - target) / (y0 - y1) if y0 != y1 else 1.0
    return float(u0 + frac * (u1 - u0) - start)


def recovery(metrics: pd.DataFrame, tol: float = RECOVERY_TOL, column: str = "kl_true") -> pd.DataFrame:
    """Return to the reference after the reward is switched off, for runs with a ``reward_scale = 0`` phase.

    The clock starts at the switch update ``u0`` (last update with the reward on) and the phase ends at the
    last logged update of the contiguous ``reward_scale = 0`` block after it.

    Returns:
        One row per run with a switch: key columns, ``switch_update``, ``kl_switch`` (KL at ``u0``),
        ``kl_end`` (KL at the end of the reward-off phase), ``kl_ratio = kl_end / kl_switch``,
        ``half_life`` (updates until the KL first halves, :func:`half_life`; NaN if never), and ``returned``
        (``kl_end ≤ tol``, default 0.05 nats). Empty if no run has a reward-off phase.
    """
    switch = switch_updates(metrics)
    cols = ["switch_update", "kl_switch", "kl_end", "kl_ratio", "half_life", "returned"]
    if switch.empty:
        return pd.DataFrame(columns=key_columns(metrics) + cols)
    m = _sorted(metrics[metrics["run_id"].isin(switch.index)])
    if column in EXACT_KL_COLUMNS:
        m = m.assign(**{column: clamp_rounding(m[column])})
    rows = {}
    for run_id, r in m.groupby("run_id", observed=True, sort=False):
        u0 = switch[run_id]
        upd, scale, kl = r["update"].to_numpy(float), r["reward_scale"].to_numpy(float), r[column].to_numpy(float)
        i0 = int(np.flatnonzero(upd == u0)[0])
        off = np.flatnonzero((upd > u0) & (scale != 0))
        end = (off[0] - 1) if len(off) else len(upd) - 1
        seg_u, seg_kl = upd[i0:end + 1], kl[i0:end + 1]
        k0, k_end = seg_kl[0], seg_kl[-1]
        rows[run_id] = {"switch_update": u0, "kl_switch": k0, "kl_end": k_end,
                        "kl_ratio": k_end / k0 if k0 > 0 else np.nan,
                        "half_life": half_life(seg_u, seg_kl, u0), "returned": bool(k_end <= tol)}
    per = pd.DataFrame.from_dict(rows, orient="index")
    per.index.name = "run_id"
    out = _with_keys(metrics, per)
    return out[out["switch_update"].notna()].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# Distance to the optimum
# ----------------------------------------------------------------------------------------------------------


def optimum_distance(metrics: pd.DataFrame) -> pd.DataFrame:
    """Distance to the KL-regularized optimum over the reward phase.

    Discrete envs: ``tv_opt`` (occupancy-weighted total variation to the soft-optimal policy π*, in [0, 1]);
    the Gaussian bandit: ``kl_opt`` (KL to the Gibbs optimum) and ``opt_mean_error`` (‖μ − μ*‖).

    Returns:
        One row per run: key columns, ``<col>_final`` and ``<col>_auc`` (trapezoid area over updates) for
        every available column.
    """
    m = reward_phase(metrics)
    per = pd.DataFrame(index=pd.Index(m["run_id"].unique(), name="run_id"))
    if "kl_opt" in m:
        m = m.assign(kl_opt=clamp_rounding(m["kl_opt"]))
    for col in ("tv_opt", "kl_opt", "opt_mean_error"):
        if col in m and m[col].notna().any():
            last = _sorted(m[m[col].notna()]).groupby("run_id", observed=True, sort=False)[col].last()
            per[f"{col}_final"] = last
            per[f"{col}_auc"] = _trapezoid_per_run(m, col)
    return _with_keys(metrics, per)


# ----------------------------------------------------------------------------------------------------------
# Everything per run
# ----------------------------------------------------------------------------------------------------------


def run_summary(metrics: pd.DataFrame, collapse_threshold: float = COLLAPSE_ENTROPY,
                recovery_tol: float = RECOVERY_TOL) -> pd.DataFrame:
    """One row per run with every measure of this module (reward-phase finals, collapse, recovery).

    Columns: key columns; ``kl_final, kl_max, kl_auc, kl_mean`` (:func:`drift`); ``entropy_final,
    min_prob_final, support_final, collapse_update, collapsed`` (:func:`collapse`); ``return_final``
    (expected return at the end of the reward phase); ``tv_opt_final`` … (:func:`optimum_distance`); and,
    for runs with a reward-off phase, ``kl_switch, kl_end, kl_ratio, half_life, returned`` (:func:`recovery`).
    """
    keys = key_columns(metrics)
    out = drift(metrics)
    out = out.merge(collapse(metrics, collapse_threshold).drop(columns=[k for k in keys if k != "run_id"]),
                    on="run_id", how="left")
    if "return_true" in metrics:
        ret = final_values(metrics, ["return_true"])[["run_id", "return_true"]]
        out = out.merge(ret.rename(columns={"return_true": "return_final"}), on="run_id", how="left")
    opt = optimum_distance(metrics).drop(columns=[k for k in keys if k != "run_id"])
    out = out.merge(opt, on="run_id", how="left")
    rec = recovery(metrics, recovery_tol)
    if not rec.empty:
        out = out.merge(rec.drop(columns=[k for k in keys if k != "run_id"]), on="run_id", how="left")
    return out
