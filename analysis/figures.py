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

import matplotlib as mpl
import numpy as np
import pandas as pd

from analysis import metrics as M
from analysis import plotting
from analysis.heatmap import heatmap
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
    line_panels,
    lines_of,
    mark_off,
    new_figure,
    off_spans,
    paper_style,
    save,
    variant_style,
)
from analysis.stats import iqm, performance_profile

# ----------------------------------------------------------------------------------------------------------
# Curves over updates
# ----------------------------------------------------------------------------------------------------------


def plot_curves(metrics: pd.DataFrame, path: str | Path, column: str, ylabel: str, *, layout: str = "placement",
                seeds: bool = False, log: bool = False, stat: str = "mean", n_boot: int = 1000, seed: int = 0,
                hline: float | None = None, hline_label: str | None = None, title: str | None = None,
                xlim: tuple[float, float] | None = None, log_floor: float = 1e-6,
                references: Sequence[tuple[str, float, float | None]] = (),
                formats: Sequence[str] = FORMATS) -> list[Path]:
    """``column`` vs update, one line per variant (``stat`` over seeds, 95 % bootstrap band).

    Lines are styled from the runs' config columns (colour = estimator, dashes = placement; a comparison's
    sweeps add markers); a line that mixes runs of different configs is refused (:func:`check_lines`).

    Args:
        metrics: metrics rows of one condition (key columns, ``update``, ``column``); a comparison
            (:func:`analysis.load` of several folders) draws each sweep's lines on the same axes.
        column: the metric to plot.
        layout: ``"placement"`` (a panel per KL placement, the no-KL run repeated in each) or ``"single"``.
        seeds: also draw every seed as a thin line.
        log: logarithmic y axis; values below ``log_floor`` (a KL of 0 or float noise around it) are drawn at
            the floor, which is the bottom of the axis and is labelled as such.
        hline: draw a horizontal reference line at this value (e.g. the collapse threshold).
        references: ``(label, value, until_update)`` horizontal reference lines (e.g. KL(π*‖π_ref)), drawn up to
            ``until_update`` (``None``: across) and named in each panel's legend.
        xlim: restrict the x axis.
    """
    check_one_condition(metrics, overlay=True)
    m = metrics[metrics[column].notna()] if column in metrics else metrics.iloc[:0]
    lines = lines_of(m) if not m.empty else []
    panels = line_panels(lines, layout)
    fig = new_figure(COLUMN_WIDTH, 1.35 * len(panels) + 0.55)
    axes = fig.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    spans = off_spans(metrics)
    for i, (ax, (panel_title, members)) in enumerate(zip(axes, panels, strict=True)):
        mark_off(ax, spans, label=i == 0)
        # the no-KL baseline last, above the others, so it is never hidden under them
        order = [ln for ln in members if ln.placement != "none"] + [ln for ln in members if ln.placement == "none"]
        for j, ln in enumerate(order):
            label = ln.label if panel_title is None else ln.panel_label
            draw_variant(ax, ln.rows, ln.variant, column, seeds, stat, n_boot, seed + j, label,
                         log_floor if log else None, style={**ln.style, **({"zorder": 3.5} if ln.placement == "none"
                                                                           else {})})
        for k, (ref_label, value, until) in enumerate(references):
            if not np.isfinite(value) or (log and value <= log_floor):
                continue
            # named in the legend: a label on the line would cross the curves that reach it, and the title
            ax.plot([0, until if until is not None else m["update"].max()], [value, value], label=ref_label, zorder=4,
                    **REFERENCE_STYLES[k % len(REFERENCE_STYLES)])
        if hline is not None:
            ax.axhline(hline, color="0.5", lw=0.6, ls=(0, (1, 1)), zorder=1)
            if hline_label and i == 0:  # right of the axes: no curve crosses it there
                ax.annotate(hline_label, (1.0, hline), xycoords=ax.get_yaxis_transform(), xytext=(2, 0),
                            textcoords="offset points", ha="left", va="center", fontsize=5, color="0.4",
                            annotation_clip=False)
        if log:
            ax.set_yscale("log", nonpositive="mask")
            ax.set_ylim(bottom=log_floor * 0.7)
            _mark_floor(ax, log_floor)
        if panel_title:
            ax.set_title(panel_title, loc="left")
        ax.set_ylabel(ylabel)
        if members:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0) if not hline_label else (1.0, 0.82),
                      handlelength=2.4, borderaxespad=0.2,
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


#: Styles of the reference lines of :func:`plot_curves`, in the order of its ``references`` (thin, grey, and
#: unlike the variants' dashes).
REFERENCE_STYLES: tuple[dict[str, Any], ...] = (
    {"color": "0.25", "lw": 0.7, "dashes": (5.0, 2.0)},
    {"color": "0.45", "lw": 0.7, "dashes": (6.0, 1.5, 1.0, 1.5, 1.0, 1.5)},
)


def _mark_floor(ax: Any, floor: float) -> None:
    """Label the bottom of a log axis as the floor that values at or below it are drawn at (not data)."""
    ax.axhline(floor, color="0.6", lw=0.5, ls=(0, (0.5, 1.5)), zorder=1)
    ax.annotate(f"floor: lines end where they fall below {floor:.0e}", (1.0, floor), xycoords=ax.get_yaxis_transform(),
                xytext=(-2, 1), textcoords="offset points", ha="right", va="bottom", fontsize=4.5, color="0.45")


@paper_style
def plot_kl(metrics: pd.DataFrame, path: str | Path, *, column: str = "kl_true", seeds: bool = False,
            log: bool = False, layout: str = "placement", title: str | None = None, n_boot: int = 1000,
            seed: int = 0, references: Sequence[tuple[str, float, float | None]] = (),
            formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 1: the exact KL to the reference vs update, one line per placement × estimator.

    Mean over seeds with a 95 % bootstrap band; grey span = reward off (if the runs have such a phase).
    ``log``: a log axis (for KLs decades apart); ``references``: ``(label, KL, until update)`` lines, e.g. from
    :func:`analysis.references.kl_references` (KL(π*‖π_ref), the forward-KL point).
    """
    return plot_curves(metrics, path, column, KL_LABEL, layout=layout, seeds=seeds, log=log, title=title,
                       n_boot=n_boot, seed=seed, references=references, formats=formats)


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
    "kl_final": "KL to the reference at the end of the reward phase (nats)",
    "entropy_final": "entropy at the end of the reward phase (nats)",
    "tv_opt_final": "TV distance to the optimum at the end of the reward phase",
    "collapsed": "fraction of seeds collapsed (entropy at the end of the reward phase)",
    "kl_end": "KL after the reward-off phase (nats)", "return_final": "final expected return",
    "kl_mean": "time-averaged KL (nats)", "half_life": "KL half-life after reward off (updates)",
    "kl_opt_final": "KL to the optimum at the end of the reward phase (nats)",
}


@paper_style
def plot_heatmap(metrics: pd.DataFrame, path: str | Path, *, value: str = "kl_final", x: str = "kl.beta",
                 stat: str = "iqm", summary: pd.DataFrame | None = None, cmap: str = "viridis",
                 fmt: str = ".2f", title: str | None = None, log_scale: bool | None = None,
                 formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 4: a final per-run measure over ``x`` (default β) × variant, each cell the IQM over seeds.

    Args:
        metrics: metrics rows (several β allowed; other conditions must be filtered out).
        value: a column of :func:`analysis.metrics.run_summary` (``kl_final``, ``entropy_final``,
            ``tv_opt_final``, ``collapsed``, ``kl_end``, …).
        x: the key column on the horizontal axis.
        stat: ``"iqm"`` | ``"mean"`` | ``"median"`` over seeds (booleans such as ``collapsed``: use mean).
        summary: a precomputed :func:`analysis.metrics.run_summary` (computed from ``metrics`` if absent).
        log_scale: a log colour scale (``None``: when the non-negative values span more than two decades);
            cells are labelled 0 for an exact 0 and in scientific notation below 0.01.
        fmt: unused (cells choose their digits); kept for callers.
    """
    per_run = summary if summary is not None else M.run_summary(metrics)
    rest = [c for c in condition_columns(per_run) if c != x]
    if rest:
        raise ValueError(f"these runs mix several conditions besides {x} ({', '.join(rest)}); filter to one")
    plotting.check_lines(per_run)
    if plotting.comparison_keys(per_run):
        raise ValueError("these runs hold several sweeps of a comparison; draw one heatmap per sweep")
    reducer = {"iqm": lambda s: float(iqm(s.dropna().to_numpy())) if s.notna().any() else np.nan,
               "mean": "mean", "median": "median"}[stat]
    frame = per_run.assign(_v=per_run[value].astype(float)) if value in per_run else per_run.assign(_v=np.nan)
    xs = frame[x] if x in frame else pd.Series("all", index=frame.index)
    table = frame.assign(_x=xs.astype(float) if pd.api.types.is_numeric_dtype(xs) else xs.astype(str))
    grid = table.groupby(["variant", "_x"], observed=True)["_v"].agg(reducer).unstack("_x")
    grid = grid.reindex(variant_order(grid.index.astype(str)))
    grid.columns = [f"{c:g}" if isinstance(c, float) else str(c) for c in grid.columns]
    n_rows, n_cols = grid.shape
    width = max(COLUMN_WIDTH, min(PAGE_WIDTH, 1.35 + 0.42 * max(n_cols, 1) + 0.55))  # one β: still a column wide
    fig = new_figure(width, 0.75 + 0.2 * max(n_rows, 1))
    ax = fig.subplots()
    values = grid.to_numpy(float)
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    # a log colour scale when the values span decades (KL, TV: 3e-7 next to 0.5); exact zeros at its floor
    log = log_scale if log_scale is not None else bool(
        positive.size and finite.min() >= 0 and positive.max() / max(positive.min(), 1e-300) > 100)
    norm = None
    if log and positive.size:
        vmin = max(float(positive.min()), float(positive.max()) * 1e-6)
        norm = mpl.colors.LogNorm(vmin=vmin, vmax=float(positive.max()))
        grid_plot = grid.clip(lower=vmin)
    else:
        grid_plot = grid
    annot: Any = False
    if n_rows * n_cols <= 120:  # annotate readable grids with as many digits as the value needs
        annot = grid.map(_cell_text)
    heatmap(grid_plot, ax, cmap=cmap, annot=annot if annot is not False else None, annot_kws={"fontsize": 5.5},
            norm=norm, linewidths=0.4, linecolor="white", cbar_kws={"shrink": 0.9, "pad": 0.02})
    ax.set_xlabel({"kl.beta": "β"}.get(x, x))
    ax.set_ylabel("")
    ax.tick_params(axis="both", length=0)
    cbar = ax.figure.axes[-1]
    cbar.tick_params(labelsize=5.5, length=2)
    if norm is not None:
        cbar.set_ylabel("log scale" + (f" (≤ {norm.vmin:.0e} at the bottom)" if finite.min() < norm.vmin else ""),
                        fontsize=5.5)
    what = title or (f"{SUMMARY_LABELS.get(value, value)}, {stat.upper() if stat == 'iqm' else stat} over seeds")
    ax.set_title("\n".join(textwrap.wrap(what, int(width * 17))), loc="left")
    return save(fig, path, formats)


def _cell_text(v: float) -> str:
    """A heatmap cell: 0 for an exact 0, scientific below 0.01 (3e-07, 2.5e-03), else 2–3 significant digits."""
    if pd.isna(v):
        return ""
    if v == 0:
        return "0"
    if abs(v) < 0.01:
        return f"{v:.1e}".replace("e-0", "e-")
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.3g}"

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
    plotting.check_lines(metrics)
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
    counted = False
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
        if not counted:  # every sample gives all three estimates: the bins hold the same n for each
            counts = rows.groupby("_bin")["_err"].size()
            kept = counts[counts >= min_count]
            for x, n in zip(xs, kept.to_numpy(), strict=False):
                txt = f"{n}" if n < 1000 else f"{n / 1000:.2g}k" if n < 10**6 else f"{n / 10**6:.2g}M"
                ax_bot.annotate(txt, (x, 0.0), xycoords=("data", "axes fraction"), xytext=(0, 1.5),
                                textcoords="offset points", ha="center", va="bottom", fontsize=4.5, color="0.4")
            counted = True
    ax_top.set_ylabel("bias (nats)\nmean estimate − KL")
    ax_top.legend(loc="upper left", title="estimator", ncol=3, columnspacing=1.0)
    ax_bot.set_ylabel(f"spread (nats)\nsd of {unit}")
    if any((np.asarray(line.get_ydata(), float) > 0).any() for line in ax_bot.get_lines()):
        ax_bot.set_yscale("log")
        # labels at 1, 2, 5 × 10^k: a range of one or two decades still gets several labelled ticks
        ax_bot.yaxis.set_major_locator(mpl.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
        ax_bot.yaxis.set_major_formatter(mpl.ticker.LogFormatterSciNotation(labelOnlyBase=False))
        ax_bot.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())
    ax_bot.text(0.0, 1.0, "numbers: estimates per bin", transform=ax_bot.transAxes, fontsize=4.5, color="0.4",
                va="bottom")
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
    plotting.check_lines(per_run)
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

# ----------------------------------------------------------------------------------------------------------
# Performance profile of a per-run score
# ----------------------------------------------------------------------------------------------------------


@paper_style
def plot_performance_profile(per_run: pd.DataFrame, path: str | Path, *, value: str = "tv_opt_final",
                             tasks: Sequence[str] = ("kl.beta",), lower_is_better: bool = True, n_boot: int = 500,
                             seed: int = 0, title: str | None = None,
                             formats: Sequence[str] = FORMATS) -> list[Path]:
    """The fraction of runs whose ``value`` is better than a threshold τ, against τ (Agarwal et al. 2021),
    one line per variant (× sweep) with a 95 % stratified-bootstrap band.

    Args:
        per_run: :func:`analysis.metrics.run_summary` rows; conditions in ``tasks`` are averaged with equal
            weight (each a stratum of the bootstrap).
        value: the per-run score; ``lower_is_better``: fraction with score < τ (a distance), else > τ.
        tasks: columns whose values are the tasks (absent columns are ignored).
    """
    frame = per_run[per_run[value].notna()] if value in per_run else per_run.iloc[:0]
    task_cols = [t for t in tasks if t in frame and t != "variant"]
    scores = frame[value].to_numpy(float)
    positive = scores[scores > 0]
    lo = max(float(positive.min()) if positive.size else 1e-4, 1e-6)
    hi = float(scores.max()) if scores.size else 1.0
    taus = np.geomspace(lo / 1.5, max(hi * 1.5, lo * 10), 120)
    fig = new_figure(COLUMN_WIDTH, 1.9)
    ax = fig.subplots()
    for ln in lines_of(frame):
        rows = ln.rows
        parts = [g[value].to_numpy(float) for _, g in rows.groupby(task_cols, observed=True)] if task_cols \
            else [rows[value].to_numpy(float)]
        prof = performance_profile(parts, taus, higher_is_better=not lower_is_better, n_boot=n_boot, seed=seed)
        style = {k: v for k, v in ln.style.items() if k not in ("markevery",)}
        ax.fill_between(taus, prof["lo"], prof["hi"], color=style["color"], alpha=0.15, lw=0)
        ax.plot(taus, prof["fraction"], label=ln.label, **{**style, "markevery": 0.1} if "marker" in style
                else style)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    what = SUMMARY_LABELS.get(value, value)
    ax.set_xlabel(f"threshold τ on the {what}")
    ax.set_ylabel(f"fraction of runs {'<' if lower_is_better else '>'} τ")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=2.4, borderaxespad=0.2)
    if title:
        ax.set_title(title, loc="left")
    return save(fig, path, formats)
