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

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis import metrics as M
from analysis.loading import NOT_CONDITION_KEYS, VARIANT_ORDER, key_columns, variant_order  # noqa: F401 (re-exported)
from analysis.stats import bootstrap_curve, iqm

#: Single-column width (inches) of the default figures.
COLUMN_WIDTH = 3.3
#: Two-column width (inches) for wide figures.
PAGE_WIDTH = 6.9
FORMATS = ("pdf", "png")
PAPER_RC: dict[str, Any] = {
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
    "font.family": "sans-serif", "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7,
    "xtick.labelsize": 6, "ytick.labelsize": 6, "legend.fontsize": 6, "legend.title_fontsize": 6,
    "lines.linewidth": 1.1, "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
    "xtick.major.size": 2.5, "ytick.major.size": 2.5, "axes.spines.top": False, "axes.spines.right": False,
    "legend.frameon": False, "savefig.dpi": 300, "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
    "axes.titlepad": 3.0, "axes.labelpad": 2.0,
}
_PALETTE = sns.color_palette("colorblind")
ESTIMATOR_COLOURS = {"k1": _PALETTE[0], "k2": _PALETTE[1], "k3": _PALETTE[2], "full": _PALETTE[4],
                     "DPO": _PALETTE[3], "IPO": _PALETTE[7]}
#: Variants that are not a KL placement but preference optimization (``train.algo: dpo``).
PREFERENCE_VARIANTS = ("DPO", "IPO")
PLACEMENT_DASHES: dict[str, tuple] = {"reward": (), "loss": (4.0, 1.6), "none": (1.0, 1.4), "is": (4.0, 1.2, 1.0, 1.2)}
PLACEMENT_DASHES["preference"] = (6.0, 1.5, 1.5, 1.5)
PLACEMENT_TITLES = {"reward": "KL in the reward", "loss": "KL as a loss", "preference": "preference optimization"}
# Keys that never split a figure into conditions.
_NOT_CONDITIONS = NOT_CONDITION_KEYS | {"variant"}
KL_LABEL = r"KL($\pi\,\|\,\pi_{\mathrm{ref}}$) (nats)"


def variant_parts(variant: str) -> tuple[str, str, bool]:
    """``"k3 as loss (IS)"`` → ``("loss", "k3", True)``; ``"none"`` → ``("none", "", False)``;
    ``"DPO"`` → ``("preference", "DPO", False)``."""
    if variant == "none":
        return "none", "", False
    if variant in PREFERENCE_VARIANTS:
        return "preference", variant, False
    est, _, rest = variant.partition(" ")
    placement = "reward" if rest.startswith("in reward") else "loss"
    return placement, est, rest.endswith("(IS)")


def _panel_label(variant: str) -> str:
    """A variant's legend label inside a panel titled by its placement: the estimator (+ IS), or "no KL"."""
    if variant == "none":
        return "no KL"
    _, est, is_corr = variant_parts(variant)
    return est + (" (IS)" if is_corr else "")


def variant_style(variant: str) -> dict[str, Any]:
    """Matplotlib line keywords (``color``, ``dashes``) of a variant label."""
    placement, est, is_corr = variant_parts(variant)
    if placement == "none":
        return {"color": "0.15", "dashes": PLACEMENT_DASHES["none"]}
    colour = ESTIMATOR_COLOURS.get(est, _PALETTE[7])
    return {"color": colour, "dashes": PLACEMENT_DASHES["is" if is_corr else placement]}


def condition_columns(frame: pd.DataFrame) -> list[str]:
    """Key columns of ``frame`` other than seed/variant that take more than one value."""
    cols = [c for c in key_columns(frame) if c not in _NOT_CONDITIONS]
    return [c for c in cols if frame[c].nunique(dropna=False) > 1]


def split_conditions(frame: pd.DataFrame) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """``(condition values, rows)`` for every combination of :func:`condition_columns` (one if none vary)."""
    cols = condition_columns(frame)
    if not cols:
        yield {}, frame
        return
    for values, rows in frame.groupby(cols, observed=True, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        yield dict(zip(cols, values, strict=True)), rows


def condition_label(condition: dict[str, Any]) -> str:
    """``{"kl.beta": 0.25}`` → ``"β = 0.25"`` (other keys as ``key = value``), joined by commas."""
    parts = []
    for k, v in condition.items():
        name = {"kl.beta": "β", "env.id": "env"}.get(k, k)
        parts.append(f"{name} = {v:g}" if isinstance(v, float) else f"{name} = {v}")
    return ", ".join(parts)


def _check_one_condition(frame: pd.DataFrame) -> None:
    cols = condition_columns(frame)
    if cols:
        raise ValueError(f"these rows mix several conditions ({', '.join(cols)} vary); filter to one, e.g. "
                         f"with analysis.figures.split_conditions")


def paper_style(fn: Callable[..., list[Path]]) -> Callable[..., list[Path]]:
    """Run a figure function inside :data:`PAPER_RC` (fonts, line widths, TrueType fonts in PDFs)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> list[Path]:
        with mpl.rc_context(PAPER_RC):
            return fn(*args, **kwargs)

    return wrapper


def save(fig: Figure, path: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``fig`` as ``path.<fmt>`` for each format (the suffix of ``path`` is replaced) and return the paths."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix.lstrip(".") in ("pdf", "png", "svg", "eps", "ps") else path
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with mpl.rc_context(PAPER_RC):
        for fmt in formats:
            target = base.with_name(f"{base.name}.{fmt}")
            fig.savefig(target, format=fmt)
            out.append(target)
    return out


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


# ----------------------------------------------------------------------------------------------------------
# Curves over updates
# ----------------------------------------------------------------------------------------------------------


def _off_spans(metrics: pd.DataFrame) -> list[tuple[float, float]]:
    """Update spans with the reward off (``reward_scale == 0``), from the first run (phases are shared)."""
    if "reward_scale" not in metrics or metrics.empty:
        return []
    first = metrics[metrics["run_id"] == metrics["run_id"].iloc[0]].sort_values("update")
    upd, off = first["update"].to_numpy(float), (first["reward_scale"] == 0).to_numpy()
    spans, start = [], None
    for i in range(len(upd)):
        if off[i] and start is None:
            start = upd[i - 1] if i > 0 else upd[i]
        if not off[i] and start is not None:
            spans.append((start, upd[i - 1]))
            start = None
    if start is not None:
        spans.append((start, upd[-1]))
    return spans


def _mark_off(ax: Axes, spans: list[tuple[float, float]], label: bool) -> None:
    for a, b in spans:
        ax.axvspan(a, b, color="0.92", zorder=0, lw=0)
        ax.axvline(a, color="0.35", lw=0.7, ls=(0, (2, 1.5)), zorder=1)
        if label:
            ax.text(b, 1.0, "reward off", transform=ax.get_xaxis_transform(), ha="right", va="bottom",
                    fontsize=5.5, color="0.3")


def _pivot(rows: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(updates [n_x], values [n_seeds, n_x])`` of one variant's runs (NaN where a run has no row)."""
    wide = rows.pivot_table(index="run_id", columns="update", values=column, observed=True, dropna=False,
                            aggfunc="first")
    wide = wide.dropna(how="all")
    return wide.columns.to_numpy(float), wide.to_numpy(float)


def _draw_variant(ax: Axes, rows: pd.DataFrame, variant: str, column: str, seeds: bool, stat: str, n_boot: int,
                  seed: int, label: str, floor: float | None = None) -> None:
    x, values = _pivot(rows, column)
    if values.size == 0:
        return
    if floor is not None:  # log axes: values at or below the floor (0, float noise) are drawn on it
        values = np.where(np.isnan(values), np.nan, np.maximum(values, floor))
    style = variant_style(variant)
    point, lo, hi = bootstrap_curve(values, stat, n_boot, seed=seed)
    if seeds and values.shape[0] > 1:
        for v in values:
            ax.plot(x, v, color=style["color"], lw=0.35, alpha=0.35, zorder=2)
    if values.shape[0] > 1:
        ax.fill_between(x, lo, hi, color=style["color"], alpha=0.18, lw=0, zorder=2)
    ax.plot(x, point, label=label, zorder=3, **style)


def _placement_groups(variants: list[str], layout: str) -> list[tuple[str | None, list[str]]]:
    """Panels as ``(title, variants)``: one per KL placement (``none`` repeated in each as the baseline)."""
    if layout == "single":
        return [(None, variants)]
    groups: list[tuple[str | None, list[str]]] = []
    for placement in ("reward", "loss", "preference"):
        members = [v for v in variants if variant_parts(v)[0] == placement]
        if members:
            base = [v for v in variants if v == "none"]
            groups.append((PLACEMENT_TITLES[placement], base + members))
    return groups or [(None, variants)]


@paper_style
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
    _check_one_condition(metrics)
    m = metrics[metrics[column].notna()] if column in metrics else metrics.iloc[:0]
    variants = variant_order(m["variant"].unique()) if not m.empty else []
    panels = _placement_groups(variants, layout)
    fig = _new_figure(COLUMN_WIDTH, 1.35 * len(panels) + 0.55)
    axes = fig.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    spans = _off_spans(metrics)
    by_variant = {str(k): v for k, v in m.groupby("variant", observed=True)}
    for i, (ax, (panel_title, members)) in enumerate(zip(axes, panels, strict=True)):
        _mark_off(ax, spans, label=i == 0)
        for j, v in enumerate(members):
            label = v if panel_title is None else _panel_label(v)
            _draw_variant(ax, by_variant[v], v, column, seeds, stat, n_boot, seed + j, label,
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
    width = min(PAGE_WIDTH, 1.35 + 0.42 * max(n_cols, 1) + 0.55)
    fig = _new_figure(max(width, 2.2), 0.55 + 0.2 * max(n_rows, 1))
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
    ax.set_title(title or f"{SUMMARY_LABELS.get(value, value)}, {stat.upper() if stat == 'iqm' else stat} "
                 "over seeds", loc="left")
    return save(fig, path, formats)


# ----------------------------------------------------------------------------------------------------------
# Final policy vs reference and optimum
# ----------------------------------------------------------------------------------------------------------


@paper_style
def plot_final_policy(policy: pd.DataFrame, path: str | Path, *, config: dict | None = None,
                      update: int | str = "last", seed: int | None = None, ncols: int | None = None,
                      title: str | None = None, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 5: the final policy of each variant against the reference and the KL-regularized optimum.

    - Bandit (one state): per variant, bars = mean probability of each arm over seeds (dots = single
      seeds), grey ticks = π_ref, black diamonds = the optimum π*.
    - Gridworld (needs ``config``, the run config, to rebuild the layout): per variant, shading = expected
      visits per episode to each cell, arrows = the occupancy-weighted action probabilities (length ∝
      probability) of one seed (``seed``, default the first); panels for π_ref and π* first.
    - Gaussian bandit: densities of the first action dimension (policy, reference, optimum).

    Args:
        policy: ``policy`` rows of one condition.
        config: a run config (``Results.config(run_id)``) — needed for the gridworld.
        update: the policy snapshot to draw (``"last"`` = each run's last).
    """
    _check_one_condition(policy)
    p = M.at_update(policy, update)
    if "dim" in p.columns:
        return _plot_gaussian_policy(p, path, title, formats)
    env_id = (config or {}).get("env", {}).get("id")
    if env_id == "gridworld":
        return _plot_grid_policy(p, path, config or {}, seed, ncols, title, formats)
    return _plot_bandit_policy(p, path, ncols, title, formats)


def _plot_bandit_policy(p: pd.DataFrame, path: str | Path, ncols: int | None, title: str | None,
                        formats: Sequence[str]) -> list[Path]:
    variants = variant_order(p["variant"].unique())
    ncols = max(1, min(ncols or 2, len(variants)))
    nrows = int(np.ceil(len(variants) / ncols))
    fig = _new_figure(COLUMN_WIDTH, 0.25 + 0.85 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    state0 = p[p["state"] == p["state"].min()]
    arms = np.sort(state0["action"].unique())
    for ax, v in zip(axes, variants, strict=False):
        rows = state0[state0["variant"] == v]
        wide = rows.pivot_table(index="run_id", columns="action", values="prob", observed=True)
        colour = variant_style(v)["color"]
        ax.bar(arms, wide.mean(axis=0).reindex(arms).to_numpy(), width=0.7, color=colour, alpha=0.85, lw=0)
        jitter = np.linspace(-0.18, 0.18, max(len(wide), 1))
        for k, (_, seed_row) in enumerate(wide.iterrows()):
            ax.plot(arms + jitter[k], seed_row.reindex(arms).to_numpy(), ls="none", marker=".", ms=1.8,
                    color="0.2", zorder=3)
        ref = rows.groupby("action")["ref_prob"].first().reindex(arms).to_numpy()
        opt = rows.groupby("action")["opt_prob"].first().reindex(arms).to_numpy()
        ax.hlines(ref, arms - 0.42, arms + 0.42, color="0.55", lw=1.2, zorder=4, label=r"$\pi_{\mathrm{ref}}$")
        if np.isfinite(opt).any():
            ax.plot(arms, opt, ls="none", marker="D", ms=2.6, mfc="none", mec="black", mew=0.7, zorder=5,
                    label=r"optimum $\pi^*$")
        ax.set_title(v, loc="left", pad=1.5)
        ax.set_ylim(0, 1.02)
        ax.set_xticks(arms)
    return _finish_panels(fig, axes, len(variants), "arm", "probability", 2, title, path, formats)


def _finish_panels(fig: Figure, axes: Sequence[Axes], n_used: int, xlabel: str, ylabel: str, ncol: int,
                   title: str | None, path: str | Path, formats: Sequence[str]) -> list[Path]:
    """Hide the unused panels, label the shared axes, put the first panel's legend on top and save."""
    for ax in axes[n_used:]:
        ax.set_visible(False)
    fig.supxlabel(xlabel, fontsize=7)
    fig.supylabel(ylabel, fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncol=ncol, handlelength=1.5)
    if title:
        fig.suptitle(title, fontsize=7)
    return save(fig, path, formats)


def _plot_grid_policy(p: pd.DataFrame, path: str | Path, config: dict, seed: int | None, ncols: int | None,
                      title: str | None, formats: Sequence[str]) -> list[Path]:
    import torch

    from analysis.gridworld import fold_to_cells, policy_table, world_from_config

    world = world_from_config(config)
    S, A = world.mdp.n_states, world.mdp.n_actions
    variants = variant_order(p["variant"].unique())
    chosen_seed = seed if seed is not None else int(p["seed"].min())
    first = p[p["seed"] == chosen_seed] if (p["seed"] == chosen_seed).any() else p
    any_run = first[first["run_id"] == first["run_id"].iloc[0]]
    panels: list[tuple[str, np.ndarray]] = [
        (r"reference $\pi_{\mathrm{ref}}$", policy_table(any_run, S, A, "ref_prob"))]
    if any_run["opt_prob"].notna().all():
        panels.append((r"optimum $\pi^*$", policy_table(any_run, S, A, "opt_prob")))
    for v in variants:
        rows = first[first["variant"] == v]
        run = rows[rows["run_id"] == rows["run_id"].iloc[0]]
        panels.append((v, policy_table(run, S, A, "prob")))
    ncols = max(1, min(ncols or 5, len(panels)))
    nrows = int(np.ceil(len(panels) / ncols))
    # Crop the grid to the bounding box of its non-wall cells (layouts are framed by walls).
    rc = world.cell_rc.numpy()
    r0, r1, c0, c1 = rc[:, 0].min(), rc[:, 0].max(), rc[:, 1].min(), rc[:, 1].max()
    aspect = (r1 - r0 + 1) / (c1 - c0 + 1)
    width = COLUMN_WIDTH if ncols <= 3 else PAGE_WIDTH
    fig = _new_figure(width, 0.35 + nrows * (width / ncols) * aspect * 1.12)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    folded = [fold_to_cells(world, probs) for _, probs in panels]
    vmax = max(float(f.occupancy.max()) for f in folded)
    cmap = sns.color_palette("light:#3b6fb6", as_cmap=True)
    norm = mpl.colors.PowerNorm(0.5, vmin=0.0, vmax=vmax)
    goal_of_cell = world.goal_of_cell.numpy()
    lava = world.lava.numpy()
    dx = np.array([0.0, 1.0, 0.0, -1.0])  # up, right, down, left in image coordinates (row 0 at the top)
    dy = np.array([-1.0, 0.0, 1.0, 0.0])
    for ax, (name, _), cp in zip(axes, panels, folded, strict=False):
        img = world.to_grid(torch.from_numpy(cp.occupancy)).numpy()
        ax.imshow(np.where(world.walls, np.nan, img), cmap=cmap, norm=norm, interpolation="nearest")
        ax.imshow(np.where(world.walls, 1.0, np.nan), cmap=mpl.colors.ListedColormap(["0.3"]), vmin=0, vmax=1,
                  interpolation="nearest")
        for c in range(world.n_cells):
            r, col = rc[c]
            if goal_of_cell[c] >= 0 or lava[c]:
                text = f"{world.goal_rewards[goal_of_cell[c]]:g}" if goal_of_cell[c] >= 0 else "L"
                ax.text(col, r, text, ha="center", va="center", fontsize=5.5, fontweight="bold",
                        color="#1b7837" if goal_of_cell[c] >= 0 else "#b2182b")
                continue
            if cp.occupancy[c] < 1e-3:
                continue
            for a in range(A):  # one arrow per action, length ∝ its probability
                length = 0.46 * cp.probs[c, a]
                if length < 0.03:
                    continue
                head = 0.2 * min(1.0, length / 0.25)
                ax.arrow(col, r, dx[a] * length, dy[a] * length, width=0.035, head_width=head,
                         head_length=0.7 * head, length_includes_head=True, color="black", lw=0)
        sr, sc = rc[world.start_cell]
        ax.add_patch(mpl.patches.Rectangle((sc - 0.5, sr - 0.5), 1, 1, fill=False, ec="#d95f02", lw=0.9))
        ax.set_xlim(c0 - 0.5, c1 + 0.5)
        ax.set_ylim(r1 + 0.5, r0 - 0.5)
        ax.set_title(name, loc="left", fontsize=6, pad=1.5)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes.tolist(), shrink=0.6, pad=0.01,
                 label="visits per episode")
    fig.suptitle(title or f"final policy (seed {chosen_seed}); arrows: π(a | cell), occupancy-weighted over time; "
                 "box: start", fontsize=6)
    return save(fig, path, formats)


def _plot_gaussian_policy(p: pd.DataFrame, path: str | Path, title: str | None,
                          formats: Sequence[str]) -> list[Path]:
    d0 = p[p["dim"] == p["dim"].min()]
    variants = variant_order(d0["variant"].unique())
    fig = _new_figure(COLUMN_WIDTH, 1.9)
    ax = fig.subplots()
    mean_all = pd.concat([d0["mean"], d0["ref_mean"], d0["opt_mean"]]).dropna()
    std_all = pd.concat([d0["std"], d0["ref_std"], d0["opt_std"]]).dropna()
    lo = float((mean_all - 3.5 * std_all.max()).min())
    hi = float((mean_all + 3.5 * std_all.max()).max())
    xs = np.linspace(lo, hi, 400)

    def density(mu: float, sd: float) -> np.ndarray:
        return np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))

    ref = d0.iloc[0]
    ax.fill_between(xs, density(ref["ref_mean"], ref["ref_std"]), color="0.85", lw=0, label=r"$\pi_{\mathrm{ref}}$")
    if np.isfinite(ref["opt_mean"]):
        ax.plot(xs, density(ref["opt_mean"], ref["opt_std"]), color="0.35", lw=0.9, ls=(0, (4, 1, 1, 1)),
                label=r"optimum $\pi^*$")
    for v in variants:
        rows = d0[d0["variant"] == v]
        ax.plot(xs, density(rows["mean"].mean(), rows["std"].mean()), label=v, **variant_style(v))
    ax.set_xlabel("action (dimension 0)")
    ax.set_ylabel("density")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title, loc="left")
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
    fig = _new_figure(COLUMN_WIDTH, 2.5)
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
    fig = _new_figure(PAGE_WIDTH if one_state else COLUMN_WIDTH, 2.0)
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
# Continuous actions: Gaussian policy trajectories, diffusion x_0 distribution and mode mix
# ----------------------------------------------------------------------------------------------------------


def _first_run_line(metrics: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(update, column)`` of the first run that has ``column`` (phase-wise optima are shared by the runs of
    one condition)."""
    m = metrics[metrics[column].notna()] if column in metrics else metrics.iloc[:0]
    if m.empty:
        return np.zeros(0), np.zeros(0)
    first = m[m["run_id"] == m["run_id"].iloc[0]].sort_values("update")
    return first["update"].to_numpy(float), first[column].to_numpy(float)


@paper_style
def plot_gaussian_trajectory(metrics: pd.DataFrame, path: str | Path, *, title: str | None = None,
                             n_boot: int = 1000, seed: int = 0, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Gaussian bandit: the policy's mean (dimension 0) and std vs update against the Gibbs optimum.

    Columns: mean, std; rows: one per KL placement (no KL repeated in each). Lines are the mean over seeds
    with a 95 % bootstrap band; the black dashed line is the optimum ``μ*``/``σ*`` of the current phase (the
    reference once the reward is off; metrics ``opt_mean``/``opt_std``; absent where there is no closed form).
    """
    _check_one_condition(metrics)
    m = metrics[metrics["policy_mean"].notna()] if "policy_mean" in metrics else metrics.iloc[:0]
    variants = variant_order(m["variant"].unique()) if not m.empty else []
    panels = _placement_groups(variants, "placement")
    fig = _new_figure(PAGE_WIDTH * 0.8, 1.35 * len(panels) + 0.55)
    axes = fig.subplots(len(panels), 2, sharex=True, squeeze=False)
    spans = _off_spans(metrics)
    by_variant = {str(k): v for k, v in m.groupby("variant", observed=True)}
    for col, (column, opt_col, ylabel) in enumerate((("policy_mean", "opt_mean", "policy mean μ (dim 0)"),
                                                     ("policy_std", "opt_std", "policy std σ"))):
        ox, oy = _first_run_line(metrics, opt_col)
        for row, (panel_title, members) in enumerate(panels):
            ax = axes[row, col]
            _mark_off(ax, spans, label=row == 0 and col == 0)
            for j, v in enumerate(members):
                label = _panel_label(v)
                _draw_variant(ax, by_variant[v], v, column, False, "mean", n_boot, seed + j, label)
            if oy.size:
                ax.plot(ox, oy, color="black", lw=0.9, ls=(0, (3, 1.5)), zorder=4, label="optimum")
            if panel_title:
                ax.set_title(panel_title, loc="left")
            ax.set_ylabel(ylabel)
            if col == 1 and members:
                ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=2.4, borderaxespad=0.2)
    for ax in axes[-1]:
        ax.set_xlabel("update")
    if title:
        fig.suptitle(title, fontsize=7)
    return save(fig, path, formats)


def rewarded_mode(metrics: pd.DataFrame) -> int | None:
    """The mixture component the reward favours most: largest tilt / reference mode fraction in the reward
    phase (diffusion-chain metrics ``opt_mode_frac_<m>``, ``ref_mode_frac_<m>``); ``None`` if unknown."""
    modes = sorted(int(c.rsplit("_", 1)[1]) for c in metrics.columns if c.startswith("opt_mode_frac_"))
    if not modes:
        return None
    rows = M.reward_phase(metrics)
    ratios = [float((rows[f"opt_mode_frac_{k}"] / rows[f"ref_mode_frac_{k}"]).mean()) for k in modes]
    if not np.isfinite(ratios).any():
        return None
    return modes[int(np.nanargmax(ratios))]


@paper_style
def plot_mode_mix(metrics: pd.DataFrame, path: str | Path, *, mode: int | None = None, title: str | None = None,
                  n_boot: int = 1000, seed: int = 0, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Diffusion chain: the fraction of x_0 in the rewarded mixture component vs update, per variant.

    ``mode_frac_<m>`` = mean posterior probability p_data(m | x_0) over an evaluation batch. Black dashed:
    the same statistic for the KL-optimal tilt p* ∝ p_ref·e^{r/β} of the current phase (the reference once
    the reward is off); grey dotted: the reference chain. Mean over seeds with a 95 % bootstrap band.
    """
    _check_one_condition(metrics)
    mode = rewarded_mode(metrics) if mode is None else mode
    if mode is None:
        raise ValueError("no mode_frac_<m> columns: not a diffusion-chain run")
    column = f"mode_frac_{mode}"
    m = metrics[metrics[column].notna()]
    variants = variant_order(m["variant"].unique()) if not m.empty else []
    panels = _placement_groups(variants, "placement")
    fig = _new_figure(COLUMN_WIDTH, 1.35 * len(panels) + 0.55)
    axes = fig.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    spans = _off_spans(metrics)
    ox, oy = _first_run_line(metrics, f"opt_mode_frac_{mode}")
    rx, ry = _first_run_line(metrics, f"ref_mode_frac_{mode}")
    by_variant = {str(k): v for k, v in m.groupby("variant", observed=True)}
    for i, (ax, (panel_title, members)) in enumerate(zip(axes, panels, strict=True)):
        _mark_off(ax, spans, label=i == 0)
        if ry.size:
            ax.plot(rx, ry, color="0.5", lw=0.8, ls=(0, (1, 1)), zorder=1, label="reference")
        if oy.size:
            ax.plot(ox, oy, color="black", lw=0.9, ls=(0, (3, 1.5)), zorder=4, label="tilt p*")
        for j, v in enumerate(members):
            label = _panel_label(v)
            _draw_variant(ax, by_variant[v], v, column, False, "mean", n_boot, seed + j, label)
        if panel_title:
            ax.set_title(panel_title, loc="left")
        ax.set_ylabel(f"x$_0$ in mode {mode}")
        ax.set_ylim(-0.02, 1.02)
        if members:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=2.4, borderaxespad=0.2)
    axes[-1].set_xlabel("update")
    if title:
        fig.suptitle(title, fontsize=7)
    return save(fig, path, formats)


@paper_style
def plot_x0_distribution(samples: pd.DataFrame, density: pd.DataFrame, path: str | Path, *,
                         reward_end: int | None = None, bins: int = 40, ncols: int = 4, title: str | None = None,
                         formats: Sequence[str] = FORMATS) -> list[Path]:
    """Diffusion chain: the x_0 distribution (dimension 0) of each variant against p_data and the tilt.

    Per variant (samples pooled over seeds): filled histogram = x_0 at the end of the reward phase (the last
    snapshot at or before ``reward_end``; the last snapshot if ``None``); black step outline = x_0 at the
    last snapshot (after the reward-off phase, when there is one). Grey fill = the data density p_data;
    dashed line = its KL-optimal tilt p_data·e^{r/β} (closed-form grid, ``density`` table).

    Args:
        samples: ``samples`` rows of one condition (``run_id, variant, update, x``).
        density: ``density`` rows of the same condition (``x, data, tilt``; one run's grid is used).
    """
    _check_one_condition(samples)
    variants = variant_order(samples["variant"].unique())
    ncols = max(1, min(ncols, len(variants)))
    nrows = int(np.ceil(len(variants) / ncols))
    fig = _new_figure(PAGE_WIDTH, 0.45 + 1.05 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    grid = density[density["run_id"] == density["run_id"].iloc[0]] if not density.empty else density
    last = int(samples["update"].max())
    ups = np.sort(samples["update"].unique())
    end = last if reward_end is None else int(ups[ups <= reward_end].max())
    if not grid.empty:  # the grid spans the modes and the reward; far-off samples (diverged runs) sit on the edges
        lo, hi = float(grid["x"].min()), float(grid["x"].max())
    else:
        lo, hi = np.nanpercentile(samples["x"], [1.0, 99.0])
    edges = np.linspace(lo, hi, bins + 1)
    for ax, v in zip(axes, variants, strict=False):
        rows = samples[samples["variant"] == v]
        colour = variant_style(v)["color"]
        if not grid.empty:
            ax.fill_between(grid["x"], grid["data"], color="0.85", lw=0, zorder=1, label=r"$p_{\mathrm{data}}$")
            if grid["tilt"].notna().any():
                ax.plot(grid["x"], grid["tilt"], color="black", lw=0.8, ls=(0, (3, 1.5)), zorder=4,
                        label=r"tilt $p^*$")
        at_end = rows.loc[rows["update"] == end, "x"].to_numpy(float)
        at_end = at_end[np.isfinite(at_end)]
        if at_end.size:
            ax.hist(np.clip(at_end, lo, hi), bins=edges, density=True, color=colour, alpha=0.55, zorder=2,
                    label=f"update {end}")
        else:  # diverged runs keep no snapshot after their divergence
            ax.text(0.5, 0.6, f"no samples at update {end}\n(runs diverged)", transform=ax.transAxes, ha="center",
                    va="center", fontsize=6, color="0.3")
        if end != last:
            after = rows.loc[rows["update"] == last, "x"].to_numpy(float)
            after = after[np.isfinite(after)]
            if after.size:
                ax.hist(np.clip(after, lo, hi), bins=edges, density=True, histtype="step", color="0.1", lw=0.8,
                        zorder=3, label=f"update {last} (reward off)")
        ax.set_title(v, loc="left", pad=1.5)
    return _finish_panels(fig, axes, len(variants), "x$_0$ (dimension 0)", "density", 4, title, path, formats)
