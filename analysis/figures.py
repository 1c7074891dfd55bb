"""Paper-style figures of loaded runs and sweeps (matplotlib + seaborn, no pyplot state, any backend).

Every figure function takes tables from :func:`analysis.load` and an output path, writes one file per format
(default vector PDF with TrueType fonts and a 300 dpi PNG; the path's suffix, if any, is replaced) and
returns the written paths. Figures are sized for a single column (3.3 in wide) unless stated.

Style: colour = estimator (seaborn's colour-blind palette: k1 blue, k2 orange, k3 green, full purple),
line style = placement (solid: in the reward, dashed: as a loss, black dotted: no KL), so every variant has a
distinct colour × dash pair and the two axes of the experiment stay readable. Curves are the mean over seeds
with a 95 % bootstrap band (:func:`analysis.stats.bootstrap_curve`); optional thin lines show single seeds.

Curve figures expect one experimental condition (one β, one env, …): filter a multi-condition sweep first,
e.g. ``m[m["kl.beta"] == 0.25]`` (:func:`split_conditions` does it for every condition).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns

from analysis import metrics as M
from analysis.loading import variant_order
from analysis.plotting import (
    COLUMN_WIDTH,
    ESTIMATOR_COLOURS,
    FORMATS,
    KL_LABEL,
    PAGE_WIDTH,
    PLACEMENT_TITLES,
    check_one_condition,
    condition_columns,
    draw_variant,
    mark_off,
    new_figure,
    off_spans,
    panel_label,
    paper_style,
    placement_groups,
    save,
    variant_style,
)
from analysis.stats import iqm

# ----------------------------------------------------------------------------------------------------------
# Curves over updates
# ----------------------------------------------------------------------------------------------------------


def plot_curves(metrics: pd.DataFrame, path: str | Path, column: str, ylabel: str, *, layout: str = "placement",
                seeds: bool = False, log: bool = False, stat: str = "mean", n_boot: int = 1000, seed: int = 0,
                hline: float | None = None, hline_label: str | None = None, title: str | None = None,
                xlim: tuple[float, float] | None = None, log_floor: float = 1e-6,
                formats: Sequence[str] = FORMATS) -> list[Path]:
    """``column`` vs update, one line per variant (``stat`` over seeds, 95 % bootstrap band).

    Args:
        metrics: metrics rows of one condition (key columns, ``update``, ``column``).
        column: the metric to plot.
        layout: ``"placement"`` (a panel per KL placement, the no-KL run repeated in each) or ``"single"``.
        seeds: also draw every seed as a thin line.
        log: logarithmic y axis; values below ``log_floor`` (a KL of 0 or float noise around it) are drawn at
            the floor, which is the bottom of the axis.
        hline: draw a horizontal reference line at this value (e.g. the collapse threshold).
        xlim: restrict the x axis.
    """
    check_one_condition(metrics)
    m = metrics[metrics[column].notna()] if column in metrics else metrics.iloc[:0]
    variants = variant_order(m["variant"].unique()) if not m.empty else []
    panels = placement_groups(variants, layout)
    fig = new_figure(COLUMN_WIDTH, 1.35 * len(panels) + 0.55)
    axes = fig.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    spans = off_spans(metrics)
    by_variant = {str(k): v for k, v in m.groupby("variant", observed=True)}
    for i, (ax, (panel_title, members)) in enumerate(zip(axes, panels, strict=True)):
        mark_off(ax, spans, label=i == 0)
        for j, v in enumerate(members):
            label = v if panel_title is None else panel_label(v)
            draw_variant(ax, by_variant[v], v, column, seeds, stat, n_boot, seed + j, label,
                          log_floor if log else None)
        if hline is not None:
            ax.axhline(hline, color="0.5", lw=0.6, ls=(0, (1, 1)), zorder=1)
            if hline_label and i == 0:
                ax.text(0.01, hline, hline_label, transform=ax.get_yaxis_transform(), ha="left",
                        va="bottom", fontsize=5.5, color="0.4")
        if log:
            ax.set_yscale("log", nonpositive="mask")
            ax.set_ylim(bottom=log_floor * 0.7)
        if panel_title:
            ax.set_title(panel_title, loc="left")
        ax.set_ylabel(ylabel)
        if members:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=2.4, borderaxespad=0.2,
                      title=("loss" if panel_title == PLACEMENT_TITLES["preference"] else "estimator")
                      if panel_title else None)
    if m.empty:
        axes[0].text(0.5, 0.5, f"no {column} values", transform=axes[0].transAxes, ha="center", va="center")
    axes[-1].set_xlabel("update")
    if xlim is not None:
        axes[-1].set_xlim(*xlim)
    if title:
        fig.suptitle(title, fontsize=7)
    out = save(fig, path, formats)
    return out


@paper_style
def plot_kl(metrics: pd.DataFrame, path: str | Path, *, column: str = "kl_true", seeds: bool = False,
            log: bool = False, layout: str = "placement", title: str | None = None, n_boot: int = 1000,
            seed: int = 0, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 1: the exact KL to the reference vs update, one line per placement × estimator.

    Mean over seeds with a 95 % bootstrap band; grey span = reward off (if the runs have such a phase).
    """
    return plot_curves(metrics, path, column, KL_LABEL, layout=layout, seeds=seeds, log=log, title=title,
                       n_boot=n_boot, seed=seed, formats=formats)


@paper_style
def plot_entropy(metrics: pd.DataFrame, path: str | Path, *, threshold: float | None = M.COLLAPSE_ENTROPY,
                 seeds: bool = False, log: bool = False, layout: str = "placement", title: str | None = None,
                 n_boot: int = 1000, seed: int = 0, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 2: policy entropy vs update (collapse), same layout as :func:`plot_kl`; the dotted line is the
    collapse threshold (default 0.1 nats; ``None``: no line, e.g. for the Gaussian bandit's differential
    entropy)."""
    return plot_curves(metrics, path, "entropy", "entropy (nats)", layout=layout, seeds=seeds, log=log,
                       hline=threshold, hline_label=None if threshold is None else f"collapse < {threshold:g}",
                       title=title, n_boot=n_boot, seed=seed, formats=formats)


@paper_style
def plot_recovery(metrics: pd.DataFrame, path: str | Path, *, column: str = "kl_true", before: int | None = None,
                  seeds: bool = False, log: bool = True, layout: str = "placement", title: str | None = None,
                  n_boot: int = 1000, seed: int = 0, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 3: KL vs update across the switch to a reward-off phase (dashed line + grey span), log scale.

    Only runs with a ``reward_scale = 0`` phase are drawn, from ``before`` updates before the switch (default:
    a quarter of the reward phase) to the end: runs that return to the reference fall towards 0 (straight
    down on the log scale, to the 1e-6 floor of the axis), runs that do not stay flat.
    """
    switch = M.switch_updates(metrics)
    rows = metrics[metrics["run_id"].isin(switch.index)]
    xlim = None
    if not switch.empty:
        u0 = float(switch.min())
        start = max(0.0, u0 - (before if before is not None else max(10.0, 0.25 * u0)))
        rows = rows[rows["update"] >= start]
        xlim = (start, float(rows["update"].max()))
    return plot_curves(rows, path, column, KL_LABEL, layout=layout, seeds=seeds, log=log, title=title,
                       xlim=xlim, n_boot=n_boot, seed=seed, formats=formats)

# ----------------------------------------------------------------------------------------------------------
# Heatmap of a final measure
# ----------------------------------------------------------------------------------------------------------

#: Width (points) of one character of a 7-point title, generously: titles are wrapped to the figure with it.
TITLE_CHAR_PT = 4.0
SUMMARY_LABELS = {
    "kl_final": "final KL to the reference (nats)", "entropy_final": "final entropy (nats)",
    "tv_opt_final": "final TV distance to the optimum", "collapsed": "fraction of seeds collapsed",
    "kl_end": "KL after the reward-off phase (nats)", "return_final": "final expected return",
    "kl_mean": "time-averaged KL (nats)", "half_life": "KL half-life after reward off (updates)",
}


@paper_style
def plot_heatmap(metrics: pd.DataFrame, path: str | Path, *, value: str = "kl_final", x: str = "kl.beta",
                 stat: str = "iqm", summary: pd.DataFrame | None = None, cmap: str = "viridis",
                 fmt: str = ".2f", title: str | None = None, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 4: a final per-run measure over ``x`` (default β) × variant, each cell the IQM over seeds.

    Args:
        metrics: metrics rows (several β allowed; other conditions must be filtered out).
        value: a column of :func:`analysis.metrics.run_summary` (``kl_final``, ``entropy_final``,
            ``tv_opt_final``, ``collapsed``, ``kl_end``, …).
        x: the key column on the horizontal axis.
        stat: ``"iqm"`` | ``"mean"`` | ``"median"`` over seeds (booleans such as ``collapsed``: use mean).
        summary: a precomputed :func:`analysis.metrics.run_summary` (computed from ``metrics`` if absent).
    """
    per_run = summary if summary is not None else M.run_summary(metrics)
    rest = [c for c in condition_columns(per_run) if c != x]
    if rest:
        raise ValueError(f"these runs mix several conditions besides {x} ({', '.join(rest)}); filter to one")
    reducer = {"iqm": lambda s: float(iqm(s.dropna().to_numpy())) if s.notna().any() else np.nan,
               "mean": "mean", "median": "median"}[stat]
    frame = per_run.assign(_v=per_run[value].astype(float)) if value in per_run else per_run.assign(_v=np.nan)
    xs = frame[x] if x in frame else pd.Series("all", index=frame.index)
    table = frame.assign(_x=xs.astype(float) if pd.api.types.is_numeric_dtype(xs) else xs.astype(str))
    grid = table.groupby(["variant", "_x"], observed=True)["_v"].agg(reducer).unstack("_x")
    grid = grid.reindex(variant_order(grid.index.astype(str)))
    grid.columns = [f"{c:g}" if isinstance(c, float) else str(c) for c in grid.columns]
    n_rows, n_cols = grid.shape
    width = max(min(PAGE_WIDTH, 1.35 + 0.42 * max(n_cols, 1) + 0.55), 2.2)
    # The title is wrapped to the figure's width: a wider one (a long condition label on a narrow grid) would
    # leave constrained layout no room for the axes ("axes sizes collapsed to zero") and the figure unlaid-out.
    title = title or f"{SUMMARY_LABELS.get(value, value)}, {stat.upper() if stat == 'iqm' else stat} over seeds"
    title_lines = textwrap.wrap(title, max(20, int(width * 72 / TITLE_CHAR_PT)))
    fig = new_figure(width, 0.55 + 0.2 * max(n_rows, 1) + 0.12 * (len(title_lines) - 1))
    ax = fig.subplots()
    annot: Any = False
    if n_rows * n_cols <= 120:  # annotate readable grids; "-0.00" (float noise around 0) reads as "0.00"
        annot = grid.map(lambda v: "" if pd.isna(v) else format(v, fmt)).replace(f"-{format(0.0, fmt)}",
                                                                                   format(0.0, fmt))
    sns.heatmap(grid, ax=ax, cmap=cmap, annot=annot, fmt="", annot_kws={"fontsize": 5.5},
                linewidths=0.4, linecolor="white", cbar_kws={"shrink": 0.9, "pad": 0.02})
    ax.set_xlabel({"kl.beta": "β"}.get(x, x))
    ax.set_ylabel("")
    ax.tick_params(axis="both", length=0)
    ax.figure.axes[-1].tick_params(labelsize=5.5, length=2)
    ax.set_title("\n".join(title_lines), loc="left")
    return save(fig, path, formats)

# ----------------------------------------------------------------------------------------------------------
# Estimators vs the true KL
# ----------------------------------------------------------------------------------------------------------


@paper_style
def plot_estimators(metrics: pd.DataFrame, path: str | Path, *, trajectories: pd.DataFrame | None = None,
                    bins: int = 12, min_count: int = 20, title: str | None = None,
                    formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 6: bias and spread of the sampled KL estimators k1, k2, k3 against the true KL.

    With ``trajectories``, single-episode estimates (:func:`analysis.metrics.estimator_samples`); otherwise
    the per-update batch means ``kl_k1/k2/k3``. The truth is the exact KL of the policy that sampled them
    (:func:`analysis.metrics.sampling_kl`). Estimates are pooled over all runs given and binned by the true KL
    (``bins`` equal-width bins; bins with fewer than ``min_count`` estimates are dropped). Top: bias = mean
    estimate − true KL per bin (0 = unbiased), with a 95 % normal-approximation band of the mean (±1.96 standard
    errors; bins hold tens to thousands of estimates); bottom: the standard deviation of
    a single estimate around the truth (log scale).
    """
    if trajectories is not None and not trajectories.empty:
        samples = M.estimator_samples(trajectories, metrics)
        unit = "one episode"
    else:
        truth = M.sampling_kl(metrics)
        parts = [pd.DataFrame({"estimator": name, "value": metrics[col], "kl": truth})
                 for name, col in M.ESTIMATOR_COLUMNS.items() if col in metrics]
        samples = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["estimator", "value", "kl"])
        unit = "one batch mean"
    samples = samples.dropna(subset=["value", "kl"])
    fig = new_figure(COLUMN_WIDTH, 2.5)
    ax_top, ax_bot = fig.subplots(2, 1, sharex=True)
    if samples.empty:
        ax_top.text(0.5, 0.5, "no estimator values", transform=ax_top.transAxes, ha="center", va="center")
        return save(fig, path, formats)
    truth = samples["kl"].to_numpy(float)
    per_estimator = int(samples.groupby(samples["estimator"].astype(str)).size().min())
    bins = max(1, min(bins, per_estimator // max(min_count, 1)))  # few estimates: fewer, fuller bins
    min_count = min(min_count, per_estimator)
    edges = np.linspace(truth.min(), truth.max() + 1e-12, bins + 1)
    samples = samples.assign(_bin=np.clip(np.searchsorted(edges, truth, side="right") - 1, 0, bins - 1),
                             _err=samples["value"] - samples["kl"])
    ax_top.axhline(0.0, color="0.3", lw=0.7, ls=(0, (1, 1.2)))
    for est, rows in samples.groupby(samples["estimator"].astype(str), sort=True):
        colour = ESTIMATOR_COLOURS.get(est, "0.5")
        xs, bias, lo, hi, sd = [], [], [], [], []
        for _, b in rows.groupby("_bin"):
            if len(b) < min_count:
                continue
            err = b["_err"].to_numpy(float)
            half = 1.96 * err.std(ddof=1) / np.sqrt(len(err))
            xs.append(b["kl"].mean())
            bias.append(err.mean())
            lo.append(err.mean() - half)
            hi.append(err.mean() + half)
            sd.append(err.std())
        ax_top.fill_between(xs, lo, hi, color=colour, alpha=0.2, lw=0)
        ax_top.plot(xs, bias, color=colour, marker="o", ms=2.0, label=est)
        ax_bot.plot(xs, sd, color=colour, marker="o", ms=2.0)
    ax_top.set_ylabel("bias (nats)\nmean estimate − KL")
    ax_top.legend(loc="upper left", title="estimator", ncol=3, columnspacing=1.0)
    ax_bot.set_ylabel(f"spread (nats)\nsd of {unit}")
    if any((np.asarray(line.get_ydata(), float) > 0).any() for line in ax_bot.get_lines()):
        ax_bot.set_yscale("log")
    ax_bot.set_xlabel(r"true KL($\pi\,\|\,\pi_{\mathrm{ref}}$) of the sampling policy (nats)")
    if title:
        ax_top.set_title(title, loc="left")
    return save(fig, path, formats)

# ----------------------------------------------------------------------------------------------------------
# DPO against the PPO placements across β
# ----------------------------------------------------------------------------------------------------------


@paper_style
def plot_dpo_beta(per_run: pd.DataFrame, path: str | Path, *, policy: pd.DataFrame | None = None,
                  x: str = "kl.beta", title: str | None = None, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 7: DPO (and IPO) against the PPO variants across β, each at its final policy.

    - One-state envs (``policy`` given with one state): left, the final probability of the best arm (the arm
      with the largest π*/π_ref, i.e. the highest reward) per variant — mean over seeds (line) and single
      seeds (dots) — with the KL-regularized optimum π*(best arm) as a black curve; right, the final TV
      distance to each run's own optimum (log scale, values below 1e-4 drawn at 1e-4; for DPO
      π_ref·e^{r/(τβ)}, for IPO its own optimum).
    - Other envs: the right panel only (occupancy-weighted TV).

    Args:
        per_run: :func:`analysis.metrics.run_summary` rows of one condition besides ``x`` (``variant``, ``x``,
            ``tv_opt_final``, ``run_id``).
        policy: final policy snapshot rows (``run_id, state, action, prob, ref_prob, opt_prob``) or ``None``.
    """
    variants = variant_order(per_run["variant"].astype(str).unique())
    xs = per_run[x].astype(float)
    one_state = policy is not None and not policy.empty and "state" in policy and policy["state"].nunique() == 1
    fig = new_figure(PAGE_WIDTH if one_state else COLUMN_WIDTH, 2.0)
    axes = list(np.atleast_1d(fig.subplots(1, 2 if one_state else 1, squeeze=False)).ravel())
    ax_tv = axes[-1]
    rng = np.random.default_rng(0)
    if one_state:
        ax_p = axes[0]
        p = policy.assign(_ratio=np.log(policy["opt_prob"].astype(float)) - np.log(policy["ref_prob"].astype(float)))
        best = p.loc[p.groupby("run_id", observed=True)["_ratio"].idxmax(), ["run_id", "action", "prob", "opt_prob"]]
        best = best.assign(run_id=best["run_id"].astype(str))
        frame = per_run.assign(run_id=per_run["run_id"].astype(str), _x=xs).merge(best, on="run_id")
        optimum = frame[~frame["variant"].astype(str).isin(["IPO"])].groupby("_x")["opt_prob"].mean()
        if not optimum.empty:
            ax_p.plot(optimum.index, optimum.to_numpy(), color="black", lw=1.4, marker="D", ms=2.5, zorder=4,
                      label=r"$\pi^*$ (optimum)")
        for v in variants:
            rows = frame[frame["variant"].astype(str) == v]
            if rows.empty:
                continue
            style = variant_style(v)
            mean = rows.groupby("_x")["prob"].mean()
            ax_p.plot(mean.index, mean.to_numpy(), label=v, marker="o", ms=2.2, zorder=3, **style)
            jitter = np.exp(rng.uniform(-0.04, 0.04, len(rows)))
            ax_p.scatter(rows["_x"] * jitter, rows["prob"], s=3, color=style["color"], alpha=0.45, lw=0, zorder=2)
        ax_p.set_xscale("log")
        ax_p.set_xlabel({"kl.beta": "β"}.get(x, x))
        ax_p.set_ylabel("final probability of the best arm")
        ax_p.set_ylim(-0.02, 1.02)
        ax_p.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=2.4, borderaxespad=0.2)
    tv = per_run.assign(_x=xs, _v=per_run["tv_opt_final"].astype(float) if "tv_opt_final" in per_run else np.nan)
    for v in variants:
        rows = tv[(tv["variant"].astype(str) == v) & tv["_v"].notna()]
        if rows.empty:
            continue
        style = variant_style(v)
        med = rows.groupby("_x")["_v"].median()
        ax_tv.plot(med.index, np.maximum(med.to_numpy(), 1e-4), label=v, marker="o", ms=2.2, zorder=3, **style)
        jitter = np.exp(rng.uniform(-0.04, 0.04, len(rows)))
        ax_tv.scatter(rows["_x"] * jitter, np.maximum(rows["_v"], 1e-4), s=3, color=style["color"], alpha=0.45,
                      lw=0, zorder=2)
    ax_tv.set_xscale("log")
    ax_tv.set_yscale("log")
    ax_tv.set_xlabel({"kl.beta": "β"}.get(x, x))
    ax_tv.set_ylabel(r"final TV to the optimum")
    if not one_state:
        ax_tv.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=2.4, borderaxespad=0.2)
    if title:
        fig.suptitle(title, fontsize=7)
    return save(fig, path, formats)
