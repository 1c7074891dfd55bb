"""Reward over-optimization: gold and proxy reward against d = √KL, Gao et al.'s functional forms, best-of-n.

Runs trained on a learned proxy (``reward.model: learned``) log ``gold_return`` (the env's exact expected
return) and ``proxy_return`` (the proxy's) besides ``kl_true``; best-of-n runs (``train.algo: bon``, variant
``BoN``) log the same for π_ref (update 0) and the best-of-n policy (update 1). Runs without them (the gold
reward) count with ``gold = proxy = return_true``. Conventions:

- **d** = √KL(π‖π_ref), the x axis of Gao, Schulman & Hilton (2022, arXiv:2210.10760);
- gold and proxy are measured **relative to π_ref** (their value at update 0, the same for every run of an env
  and proxy), as Gao et al.'s forms assume R(0) = 0;
- only the reward phase counts (rows up to a switch to ``reward_scale = 0``, :func:`analysis.metrics.reward_phase`);
- **peak** = the highest gold over a run's logged updates, **final** = the last one.

Gao et al.'s forms, fitted by least squares through the origin (both are linear in (α, β)):
``R_bon(d) = d(α − β·d)`` and ``R_RL(d) = d(α − β·log d)``; 95 % intervals by resampling runs (seeds) with
replacement (:func:`gao_fits`). :func:`frontier_envelope` gives each run group's early-stopping frontier
(the best gold reached at KL ≤ d) and :func:`frontier_comparison` compares each variant's with no KL's, seed by
seed (the runs of one seed share the proxy: the same data seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis import metrics as M
from analysis.loading import key_columns, variant_order
from analysis.stats import aggregate

BON = "BoN"
"""The variant label of best-of-n runs."""
NO_KL = "none"
FORMS = ("bon", "rl")
"""Gao et al.'s functional forms: ``bon``: d(α − β d); ``rl``: d(α − β log d)."""


def has_frontier(metrics: pd.DataFrame) -> bool:
    """Whether ``metrics`` has what a frontier needs: a KL and a gold return, from a proxy or best-of-n run."""
    return not metrics.empty and "kl_true" in metrics and ("gold_return" in metrics and
                                                          bool(metrics["gold_return"].notna().any()))


def frontier_points(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per run × logged update of the reward phase: key columns, ``update``, ``kl``, ``d``, ``gold``,
    ``proxy`` (their values), ``gold_rel``/``proxy_rel`` (minus the run's update-0 value) and ``bon_n``."""
    m = M.reward_phase(metrics)
    m = m[m["kl_true"].notna()]
    keys = key_columns(m)
    gold = m["gold_return"] if "gold_return" in m else m["return_true"]
    proxy = m["proxy_return"] if "proxy_return" in m else m["return_true"]
    gold = gold.fillna(m["return_true"])
    proxy = proxy.fillna(gold)
    out = m[keys + ["update"]].copy()
    out["kl"] = m["kl_true"].astype(float).clip(lower=0.0)
    out["d"] = np.sqrt(out["kl"])
    out["gold"], out["proxy"] = gold.astype(float), proxy.astype(float)
    out["bon_n"] = m["bon_n"].astype(float) if "bon_n" in m else np.nan
    first = out.sort_values(["run_id", "update"]).groupby("run_id", observed=True)[["gold", "proxy"]].first()
    out["gold_rel"] = out["gold"] - out["run_id"].map(first["gold"]).astype(float)
    out["proxy_rel"] = out["proxy"] - out["run_id"].map(first["proxy"]).astype(float)
    return out.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# Gao et al.'s forms
# ----------------------------------------------------------------------------------------------------------


def gao_design(d: np.ndarray, form: str) -> np.ndarray:
    """``[n, 2]`` regressors of ``R(d) = α·x₁ − β·x₂``: ``(d, d²)`` for ``bon``, ``(d, d·log d)`` for ``rl``
    (``d log d = 0`` at ``d = 0``)."""
    d = np.asarray(d, dtype=float)
    if form == "bon":
        return np.stack([d, d * d], axis=-1)
    if form == "rl":
        with np.errstate(divide="ignore", invalid="ignore"):
            dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
        return np.stack([d, dlogd], axis=-1)
    raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")


def gao_curve(d: np.ndarray, alpha: float, beta: float, form: str) -> np.ndarray:
    """``R(d)`` of the form with coefficients α, β."""
    x = gao_design(d, form)
    return alpha * x[..., 0] - beta * x[..., 1]


def fit_gao(d: np.ndarray, r: np.ndarray, form: str) -> tuple[float, float, float]:
    """Least-squares ``(α, β, rmse)`` of ``r ≈ d(α − β·d)`` (``bon``) or ``d(α − β·log d)`` (``rl``) through the
    origin (NaN if fewer than two distinct positive ``d``)."""
    d, r = np.asarray(d, float), np.asarray(r, float)
    ok = np.isfinite(d) & np.isfinite(r)
    d, r = d[ok], r[ok]
    if np.unique(d[d > 0]).size < 2:
        return np.nan, np.nan, np.nan
    x = gao_design(d, form)
    x[:, 1] = -x[:, 1]
    coef, *_ = np.linalg.lstsq(x, r, rcond=None)
    rmse = float(np.sqrt(np.mean((x @ coef - r) ** 2)))
    return float(coef[0]), float(coef[1]), rmse


class _FitRows:
    """One run's rows of a fit, prepared once for its bootstrap replicates: its finite points, their regressors
    (the second negated, as :func:`fit_gao` solves) and its distinct positive d."""

    def __init__(self, d: np.ndarray, r: np.ndarray, form: str):
        ok = np.isfinite(d) & np.isfinite(r)
        self.d, self.r = d[ok], r[ok]
        self.x = gao_design(self.d, form)
        self.x[:, 1] = -self.x[:, 1]
        self.positive = np.unique(self.d[self.d > 0])


def _refit(runs: list[_FitRows]) -> tuple[float, float]:
    """``(α, β)`` of :func:`fit_gao` on the runs' points concatenated: the same regressors and the same
    least-squares problem, so the same numbers, without building them again for every replicate."""
    if max(run.positive.size for run in runs) < 2 and np.unique(np.concatenate(
            [run.positive for run in runs])).size < 2:
        return np.nan, np.nan
    coef, *_ = np.linalg.lstsq(np.concatenate([run.x for run in runs]), np.concatenate([run.r for run in runs]),
                               rcond=None)
    return float(coef[0]), float(coef[1])


def _boot_coefs(runs: list[_FitRows], picks: np.ndarray) -> np.ndarray:
    """``[n_boot, 2]`` (α, β) of each replicate (row of ``picks``: the runs it draws) from the normal equations:
    the sum of the picked runs' ``XᵀX`` and ``Xᵀr``, solved in closed form. Close to :func:`_refit`'s least squares
    (round-off apart), NaN where the 2 × 2 system is near singular or a replicate may hold fewer than two distinct
    positive d (those are left to :func:`_refit`)."""
    n_runs = len(runs)
    gram = np.array([[*(run.x.T @ run.x).ravel()[[0, 1, 3]], *(run.x.T @ run.r)] for run in runs])  # [R, 5]
    counts = np.bincount((picks + n_runs * np.arange(len(picks))[:, None]).ravel(),
                         minlength=len(picks) * n_runs).reshape(len(picks), n_runs).astype(float)
    g00, g01, g11, h0, h1 = (counts @ gram).T
    det = g00 * g11 - g01 * g01
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.stack([(g11 * h0 - g01 * h1) / det, (g00 * h1 - g01 * h0) / det], axis=-1)
    # fewer than two distinct positive d in a replicate (NaN in _refit) only if each picked run has at most one:
    # then the replicate is sure if two of its runs have different ones
    few = np.array([run.positive.size < 2 for run in runs])
    values = np.unique(np.concatenate([run.positive for run in runs]))
    single = np.array([int(np.searchsorted(values, run.positive[0])) if run.positive.size == 1 else -1
                       for run in runs])[picks]
    lowest = np.where(single >= 0, single, values.size).min(axis=1)
    two = single.max(axis=1) > lowest
    unsure = (few[picks].all(axis=1) & ~two) | ~(det > 1e-8 * g00 * g11) | ~np.isfinite(coef).all(axis=1)
    coef[unsure] = np.nan
    return coef


def _boot_interval(runs: list[_FitRows], picks: np.ndarray, window: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``(lo [2], hi [2])``: the 2.5 and 97.5 % quantiles (``np.nanquantile``) of the replicates' (α, β) of
    :func:`_refit`, the same numbers, from :func:`_refit` run on a few replicates only.

    Only the replicates at the two ranks each quantile interpolates between enter it. Every replicate is
    solved from the normal equations (:func:`_boot_coefs`, round-off apart from least squares), then the ones
    whose value lies within ``window`` (relative to the largest value) of those ranks' values are refitted by
    :func:`_refit` until no unrefitted replicate is that close; the replicates that could change rank are then
    exact, the others are far enough not to. Should a refit move by more than a thousandth of the window, every
    replicate is refitted."""
    n = len(picks)
    b = _boot_coefs(runs, picks)
    exact = np.zeros(n, dtype=bool)

    def refit(rows: np.ndarray) -> bool:
        moved = False
        for i in rows:
            old = b[i].copy()
            b[i] = _refit([runs[j] for j in picks[i]])
            exact[i] = True
            moved |= bool(np.isfinite(old).all() and (np.abs(b[i] - old) > tol).any())
        return moved

    tol = np.inf
    refit(np.flatnonzero(~np.isfinite(b).all(axis=1)))  # the ones the normal equations leave to least squares
    while True:
        near = np.zeros(n, dtype=bool)
        for c in range(2):
            col = b[:, c]
            ok = np.flatnonzero(~np.isnan(col))
            if ok.size == 0:
                continue
            values = np.sort(col[ok])
            width = window * float(np.max(np.abs(values)))
            tol = min(tol, width / 1000) if width > 0 else 0.0
            for q in (0.025, 0.975):
                pos = q * (values.size - 1)
                lo = values[max(int(np.floor(pos)) - 1, 0)] - width  # a rank either side, to be safe
                hi = values[min(int(np.ceil(pos)) + 1, values.size - 1)] + width
                near |= (col >= lo) & (col <= hi)
        todo = np.flatnonzero(near & ~exact)
        if todo.size == 0:
            break
        if refit(todo):  # round-off larger than assumed: refit them all
            refit(np.flatnonzero(~exact))
            break
    if not np.isfinite(b).any():
        return np.full(2, np.nan), np.full(2, np.nan)
    lo, hi = np.nanquantile(b, [0.025, 0.975], axis=0)
    return lo, hi


def run_codes(frame: pd.DataFrame) -> np.ndarray:
    """``frame``'s ``run_id`` as integer codes in ``groupby("run_id")``'s order (a categorical's categories'
    order, else sorted); -1 where it is missing."""
    run = frame["run_id"]
    return run.cat.codes.to_numpy() if isinstance(run.dtype, pd.CategoricalDtype) else pd.factorize(run, sort=True)[0]


def _per_run(g: pd.DataFrame, columns: Sequence[str], by_update: bool = False) -> list[tuple[np.ndarray, ...]]:
    """``columns`` of each run of ``g`` as float arrays, runs and rows in ``g.groupby("run_id", observed=True)``'s
    order (``run_id``'s categories' order, else sorted; rows as in ``g``, or stably sorted by ``update`` with
    ``by_update``), without building a frame per run."""
    codes = run_codes(g)
    keep = np.flatnonzero(codes >= 0)
    if by_update:
        order = keep[np.lexsort((g["update"].to_numpy()[keep], codes[keep]))]
    else:
        order = keep[np.argsort(codes[keep], kind="stable")]
    cuts = np.flatnonzero(np.diff(codes[order])) + 1
    cols = [np.split(g[c].to_numpy(float)[order], cuts) for c in columns]
    return list(zip(*cols, strict=True)) if len(order) else []


def gao_fits(points: pd.DataFrame, by: Sequence[str], form: str | None = None, n_boot: int = 1000, seed: int = 0
             ) -> pd.DataFrame:
    """Gao et al.'s form fitted to ``gold_rel`` vs ``d`` per group ``by`` (pooled over its runs and updates):
    ``bon`` for best-of-n, ``rl`` for the others (or ``form`` for all). 95 % intervals by resampling the group's
    runs with replacement ``n_boot`` times (:func:`_boot_interval`: the quantiles of the replicates' least-squares
    fits).

    Returns one row per group: ``by``, ``form``, ``runs``, ``points``, ``alpha``, ``alpha_lo``, ``alpha_hi``,
    ``beta``, ``beta_lo``, ``beta_hi``, ``rmse`` and ``d_max`` (the largest d fitted).
    """
    rows = []
    rng = np.random.default_rng(seed)
    for group, g in points.groupby(list(by), observed=True, sort=True):
        values = dict(zip(by, group if isinstance(group, tuple) else (group,), strict=True))
        f = form or ("bon" if str(values.get("variant", "")) == BON else "rl")
        per_run = _per_run(g, ("d", "gold_rel"))
        d = np.concatenate([p[0] for p in per_run])
        r = np.concatenate([p[1] for p in per_run])
        alpha, beta, rmse = fit_gao(d, r, f)
        lo, hi = np.full(2, np.nan), np.full(2, np.nan)
        if n_boot and len(per_run) > 1:
            # all replicates in one draw: the same numbers as one draw per replicate, one after another
            picks = rng.integers(0, len(per_run), (n_boot, len(per_run)))
            lo, hi = _boot_interval([_FitRows(*p, f) for p in per_run], picks)
        rows.append({**values, "form": f, "runs": len(per_run), "points": int(d.size), "alpha": alpha,
                     "alpha_lo": lo[0], "alpha_hi": hi[0], "beta": beta, "beta_lo": lo[1], "beta_hi": hi[1],
                     "rmse": rmse, "d_max": float(np.nanmax(d)) if d.size else np.nan})
    return pd.DataFrame(rows)


def bon_check(points: pd.DataFrame, fits: pd.DataFrame, by: Sequence[str], n_boot: int = 1000, seed: int = 0
              ) -> pd.DataFrame:
    """Per best-of-n group and ``n``: the mean ``d`` and ``gold_rel`` over seeds with a 95 % bootstrap interval of
    the mean gold, the fitted ``R_bon`` at that mean d, and whether the fit lies in the interval (``inside``)."""
    bon = points[points["variant"].astype(str) == BON]
    bon = bon[bon["update"] == bon.groupby("run_id", observed=True)["update"].transform("max")]
    if bon.empty:
        return pd.DataFrame()
    table = aggregate(bon, ["gold_rel", "d"], list(by) + ["bon_n"], stat="mean", n_boot=n_boot, seed=seed)
    fit = fits[fits["form"] == "bon"].set_index(list(by)) if not fits.empty else None
    out = []
    for _, row in table.iterrows():
        key = tuple(row[b] for b in by)
        key = key[0] if len(key) == 1 else key
        if fit is None or key not in fit.index:
            continue
        f = fit.loc[key]
        pred = float(gao_curve(np.array([row["d"]]), f["alpha"], f["beta"], "bon")[0])
        inside = bool(row["gold_rel_lo"] <= pred <= row["gold_rel_hi"]) if row["n"] > 1 else np.nan
        out.append({**{b: row[b] for b in by}, "bon_n": int(row["bon_n"]), "seeds": int(row["n"]), "d": row["d"],
                    "gold_rel": row["gold_rel"], "gold_rel_lo": row["gold_rel_lo"], "gold_rel_hi": row["gold_rel_hi"],
                    "fit": pred, "inside": inside})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------------------
# Peak and final gold per run
# ----------------------------------------------------------------------------------------------------------


def peak_per_run(points: pd.DataFrame) -> pd.DataFrame:
    """One row per run: key columns, ``gold_peak`` (highest gold over the reward phase), ``kl_at_peak``,
    ``update_at_peak``, ``gold_final``, ``kl_final``, ``proxy_final``, ``drop = gold_peak − gold_final`` and
    ``gold_ref`` (gold of π_ref). A best-of-n run is its n-policy alone (peak = final)."""
    keys = key_columns(points)
    p = points.sort_values(["run_id", "update"], kind="stable")
    first = p.groupby("run_id", observed=True, sort=False).head(1).set_index("run_id")
    last_update = p.groupby("run_id", observed=True, sort=False)["update"].transform("max")
    p = p[(p["variant"].astype(str) != BON) | (p["update"] == last_update)]  # best-of-n: its n-policy only
    g = p.groupby("run_id", observed=True, sort=False)
    at_peak = p.loc[g["gold"].idxmax().dropna().to_numpy()].set_index("run_id")
    last = g.tail(1).set_index("run_id")
    per = pd.DataFrame({"gold_peak": at_peak["gold"], "kl_at_peak": at_peak["kl"],
                        "update_at_peak": at_peak["update"], "gold_final": last["gold"], "kl_final": last["kl"],
                        "proxy_final": last["proxy"], "gold_ref": first["gold"]})
    per["drop"] = per["gold_peak"] - per["gold_final"]
    per.index.name = "run_id"
    out = p.drop_duplicates("run_id")[keys].merge(per.reset_index(), on="run_id", how="left")
    return out.reset_index(drop=True)


PEAK_COLUMNS = ("gold_ref", "gold_peak", "kl_at_peak", "gold_final", "kl_final", "proxy_final", "drop")


def peak_table(per_run: pd.DataFrame, by: Sequence[str], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean over seeds with a 95 % bootstrap interval of every :data:`PEAK_COLUMNS` measure per group ``by``,
    plus ``lost``: the fraction of the peak's gain over π_ref given back by the end,
    ``(gold_peak − gold_final)/(gold_peak − gold_ref)`` (NaN for runs whose peak gains nothing)."""
    frame = per_run.copy()
    gain = frame["gold_peak"] - frame["gold_ref"]
    frame["lost"] = (frame["drop"] / gain).where(gain > 1e-12)
    out = aggregate(frame, [*PEAK_COLUMNS, "lost"], list(by), stat="mean", n_boot=n_boot, seed=seed)
    if "variant" in out:
        order = {v: i for i, v in enumerate(variant_order(out["variant"].astype(str)))}
        out = out.sort_values(["variant", *[b for b in by if b != "variant"]],
                              key=lambda c: c.map(order) if c.name == "variant" else c, kind="stable")
    return out.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------------
# The early-stopping frontier
# ----------------------------------------------------------------------------------------------------------


def frontier_envelope(points: pd.DataFrame, grid: np.ndarray) -> np.ndarray:
    """The best ``gold_rel`` reached at ``d ≤ grid[j]`` over ``points``' runs: ``[len(grid)]`` (NaN below the
    smallest d reached). Each run's logged (d, gold) are joined by straight segments in update order, so a run
    that moves fast in d between two logged updates is not penalized for the gap (the points inside a segment
    with d ≤ budget are an interval, whose best gold is at one of its ends). With the runs of one variant and
    seed over every β, it is the frontier that variant reaches by early stopping at a KL budget."""
    grid = np.asarray(grid, dtype=float)
    best = np.full(len(grid), -np.inf)
    for d, g in _per_run(points, ("d", "gold_rel"), by_update=True):
        budget = grid[:, None]
        # per budget (rows): the best logged gold within it (NaN if any of those is NaN: then it is not taken) ...
        inside = np.max(np.broadcast_to(g, (len(grid), len(g))), axis=1, where=d <= budget, initial=-np.inf)
        best = np.where(inside > best, inside, best)
        # ... and the best gold where a segment leaves the budget (linear in between)
        a, b, g0, g1 = d[:-1], d[1:], g[:-1], g[1:]
        cross = (np.minimum(a, b) <= budget) & (np.maximum(a, b) > budget)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (budget - a) / (b - a)
            at_cross = np.max(g0 + t * (g1 - g0), axis=1, where=cross, initial=-np.inf)
        best = np.where(at_cross > best, at_cross, best)
    return np.where(np.isfinite(best), best, np.nan)


def frontier_comparison(points: pd.DataFrame, by: Sequence[str], grid: Sequence[float], n_boot: int = 2000,
                        seed: int = 0) -> pd.DataFrame:
    """Each variant's early-stopping frontier (over all its β) minus no KL's, per seed and KL budget ``d``.

    Per group ``by`` (e.g. env and proxy: not β) and seed, :func:`frontier_envelope` of each variant and of
    ``none`` on ``grid``; the difference is paired by seed (same proxy). Returns one row per group × variant ×
    ``d``: ``seeds``, the mean variant frontier ``gold_rel``, the mean no-KL frontier ``none_gold_rel``, their
    mean difference ``diff`` with a 95 % bootstrap interval (``diff_lo``, ``diff_hi``) and ``wins`` (the fraction
    of seeds where the variant's frontier is higher by more than 1e-3).
    """
    grid_a = np.asarray(grid, dtype=float)
    rows = []
    rng = np.random.default_rng(seed)
    for group, g in points.groupby(list(by), observed=True, sort=True) if by else [((), points)]:
        values = dict(zip(by, group if isinstance(group, tuple) else (group,), strict=True))
        base = {s: frontier_envelope(r, grid_a) for s, r in g[g["variant"].astype(str) == NO_KL].groupby("seed")}
        for variant, gv in g[g["variant"].astype(str) != NO_KL].groupby("variant", observed=True):
            env = {s: frontier_envelope(r, grid_a) for s, r in gv.groupby("seed")}
            seeds = sorted(set(env) & set(base))
            if not seeds:
                continue
            a = np.array([env[s] for s in seeds])
            b = np.array([base[s] for s in seeds])
            diff = a - b
            boot = diff[rng.integers(0, len(seeds), (n_boot, len(seeds)))]
            with np.errstate(all="ignore"):
                lo, hi = np.nanquantile(np.nanmean(boot, axis=1), [0.025, 0.975], axis=0) if len(seeds) > 1 else (
                    np.nanmean(diff, 0), np.nanmean(diff, 0))
            for j, dj in enumerate(grid_a):
                rows.append({**values, "variant": str(variant), "d": dj, "seeds": len(seeds),
                             "gold_rel": np.nanmean(a[:, j]), "none_gold_rel": np.nanmean(b[:, j]),
                             "diff": np.nanmean(diff[:, j]), "diff_lo": lo[j], "diff_hi": hi[j],
                             "wins": float(np.mean(diff[:, j] > 1e-3))})
    return pd.DataFrame(rows)
