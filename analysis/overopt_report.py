"""The over-optimization part of ``reflab report``: frontier figures, Gao et al. fits and the peak table.

:func:`queue_overopt` and then :meth:`OveroptTables.write` are called by :mod:`analysis.report` for sweeps whose
runs log ``gold_return`` (a learned proxy reward or best-of-n). They write, into the report folder,

- ``figO1_frontier_<condition>``: per condition (env, proxy, …) and β, gold (left) and proxy (right) reward
  relative to π_ref against d = √KL: one line per variant (mean over seeds at each logged update, x = the mean
  d, band = 95 % bootstrap interval of the mean reward), best-of-n as its own line over n (black), each run's
  final point, and Gao et al.'s fitted forms (dashed: R_bon through the best-of-n points, R_RL through no KL's);
- ``figO2_beta_<condition>``: per KL variant, its gold curves for every β (light to dark = small to large β;
  dots = where training stopped) over the no-KL (grey) and best-of-n (black) curves: how β moves the stopping
  point along the frontier;
- ``overopt_peaks.csv``, ``overopt_fits.csv``, ``overopt_bon.csv``, ``overopt_frontier.csv`` and Markdown
  tables for ``index.md`` (:mod:`analysis.overopt` defines every number).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd

from analysis import overopt as O
from analysis.figure_pool import FigureQueue
from analysis.loading import variant_order
from analysis.plotting import (
    FORMATS,
    PAGE_WIDTH,
    condition_columns,
    condition_label,
    new_figure,
    paper_style,
    pivot_runs,
    save,
)
from analysis.plotting import variant_style as _variant_style
from analysis.stats import bootstrap_curve

BON_STYLE = {"color": "0.0", "dashes": (), "marker": "o", "markersize": 2.2}
D_LABEL = r"$d = \sqrt{\mathrm{KL}(\pi\,\|\,\pi_{\mathrm{ref}})}$"
FRONTIER_GRID_QUANTILES = (0.25, 0.5, 1.0)
"""KL budgets of the frontier comparison, as fractions of the largest d no KL reaches (median over seeds), plus
the d of no KL's gold peak."""


def variant_style(variant: str) -> dict[str, Any]:
    """Line keywords of a variant (best-of-n: black with markers)."""
    return dict(BON_STYLE) if variant == O.BON else _variant_style(variant)


def wide_table(rows: pd.DataFrame, x_key: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(values [runs, xs], xs)``: ``column`` with one row per run (in ``run_id``'s group order: its categories'
    order, else sorted) and one column per distinct ``x_key`` value (sorted), NaN where a run has none.

    The numbers and order of ``rows.pivot_table(index="run_id", columns=x_key, values=column, observed=True,
    aggfunc="first")``: rows whose ``x_key`` or ``column`` is NaN are left out (so are runs and xs left with no
    value), and the first of duplicate (run, x) rows is kept: :func:`analysis.plotting.pivot_runs` without its
    all-NaN columns."""
    xs, wide = pivot_runs(rows, column, x_key)
    kept = ~np.isnan(wide).all(axis=0)
    return wide[:, kept], xs[kept]


def _mean_curve(rows: pd.DataFrame, column: str, n_boot: int, seed: int) -> tuple[np.ndarray, ...]:
    """``(mean d, mean value, lo, hi)`` per logged update (best-of-n: per n) over the runs of ``rows``."""
    x_key = "bon_n" if str(rows["variant"].iloc[0]) == O.BON else "update"
    rows = rows[rows["update"] == rows.groupby("run_id", observed=True)["update"].transform("max")] \
        if x_key == "bon_n" else rows
    wide_d, xs = wide_table(rows, x_key, "d")
    wide_v, _ = wide_table(rows, x_key, column)
    d = np.nanmean(wide_d, axis=0)
    point, lo, hi = bootstrap_curve(wide_v, "mean", n_boot, seed=seed)
    order = np.argsort(xs)
    return d[order], point[order], lo[order], hi[order]


def _draw(ax: Any, rows: pd.DataFrame, variant: str, column: str, n_boot: int, seed: int, label: str | None,
          **override: Any) -> None:
    style = {**variant_style(variant), **override}
    d, point, lo, hi = _mean_curve(rows, column, n_boot, seed)
    if variant == O.BON:  # prepend π_ref (n = 1 is the reference: d = 0, gain 0) when absent
        d, point, lo, hi = (np.concatenate([[0.0], a]) if len(d) and d[0] > 0 else a for a in (d, point, lo, hi))
    if rows["run_id"].nunique() > 1:
        ax.fill_between(d, lo, hi, color=style["color"], alpha=0.15, lw=0, zorder=2)
    ax.plot(d, point, label=label, zorder=3, lw=style.pop("lw", 1.1), **style)


def _finals(rows: pd.DataFrame, column: str) -> pd.DataFrame:
    return rows[rows["update"] == rows.groupby("run_id", observed=True)["update"].transform("max")][["d", column]]


@paper_style
def plot_frontier(points: pd.DataFrame, bon: pd.DataFrame, fits: pd.DataFrame, path: str | Path, *,
                  title: str | None = None, n_boot: int = 1000, seed: int = 0,
                  formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure O1: gold and proxy reward (relative to π_ref) against d for the variants of one condition and β
    (``points``) and best-of-n (``bon``, any β), with the fitted Gao forms (``fits``: rows of this condition)."""
    fig = new_figure(PAGE_WIDTH, 2.4)
    axes = fig.subplots(1, 2, sharex=True)
    variants = variant_order(points["variant"].astype(str).unique())
    for ax, column, name in ((axes[0], "gold_rel", "gold"), (axes[1], "proxy_rel", "proxy")):
        for j, v in enumerate(variants):
            rows = points[points["variant"].astype(str) == v]
            _draw(ax, rows, v, column, n_boot, seed + j, "no KL" if v == O.NO_KL else v)
            fin = _finals(rows, column)
            ax.scatter(fin["d"], fin[column], s=3, color=variant_style(v)["color"], zorder=4, lw=0)
        if not bon.empty:
            _draw(ax, bon, O.BON, column, n_boot, seed + 99, "best-of-n")
        ax.axhline(0, color="0.6", lw=0.5, zorder=1)
        ax.set_ylabel(f"{name} reward − π_ref's")
        ax.set_xlabel(D_LABEL)
    grid = np.linspace(0, float(max(points["d"].max(), bon["d"].max() if not bon.empty else 0)), 200)
    for _, f in fits.iterrows():
        if f["form"] == "bon" and np.isfinite(f["alpha"]):
            g = grid[grid <= f["d_max"]]
            axes[0].plot(g, O.gao_curve(g, f["alpha"], f["beta"], "bon"), color="0.0", lw=0.7, ls=(0, (3, 2)),
                         zorder=5, label=r"fit $d(\alpha-\beta d)$")
        elif f["form"] == "rl" and str(f.get("variant")) == O.NO_KL and np.isfinite(f["alpha"]):
            g = grid[grid <= f["d_max"]]
            axes[0].plot(g, O.gao_curve(g, f["alpha"], f["beta"], "rl"), color="0.45", lw=0.7, ls=(0, (3, 2)),
                         zorder=5, label=r"fit $d(\alpha-\beta\log d)$, no KL")
    axes[0].legend(loc="upper left", bbox_to_anchor=(0.0, -0.22), ncol=4, handlelength=2.0, fontsize=5.5)
    if title:
        fig.suptitle(title, fontsize=7)
    return save(fig, path, formats)


@paper_style
def plot_beta_frontier(points: pd.DataFrame, path: str | Path, *, title: str | None = None, n_boot: int = 0,
                       seed: int = 0, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure O2: per KL variant, gold reward against d for each β (light → dark = small → large β; dots = the
    runs' final points) over no KL (grey) and best-of-n (black), all of one condition."""
    variants = [v for v in variant_order(points["variant"].astype(str).unique()) if v not in (O.NO_KL, O.BON)]
    if not variants:
        raise ValueError("no KL variant besides none and best-of-n")
    ncol = min(3, len(variants))
    nrow = -(-len(variants) // ncol)
    fig = new_figure(PAGE_WIDTH, 1.9 * nrow + 0.4)
    axes = fig.subplots(nrow, ncol, sharex=True, sharey=True, squeeze=False).ravel()
    betas = sorted(points.loc[~points["variant"].astype(str).isin([O.BON]), "kl.beta"].dropna().unique()) \
        if "kl.beta" in points else []
    cmap = mpl.colormaps["viridis"]
    none = points[points["variant"].astype(str) == O.NO_KL]
    bon = points[points["variant"].astype(str) == O.BON]
    for ax, v in zip(axes, variants, strict=False):
        if not none.empty:
            first_beta = none["kl.beta"].iloc[0] if "kl.beta" in none else None
            rows = none[none["kl.beta"] == first_beta] if first_beta is not None else none
            _draw(ax, rows, O.NO_KL, "gold_rel", n_boot, seed, "no KL", color="0.6", dashes=())
        if not bon.empty:
            _draw(ax, bon, O.BON, "gold_rel", n_boot, seed, "best-of-n")
        for i, b in enumerate(betas):
            rows = points[(points["variant"].astype(str) == v) & (points["kl.beta"] == b)]
            if rows.empty:
                continue
            colour = cmap(0.15 + 0.75 * i / max(1, len(betas) - 1))
            _draw(ax, rows, v, "gold_rel", n_boot, seed + i, f"β = {b:g}", color=colour, dashes=())
            fin = _finals(rows, "gold_rel")
            ax.scatter(fin["d"], fin["gold_rel"], s=4, color=colour, zorder=4, lw=0)
        ax.set_title(v, loc="left")
        ax.axhline(0, color="0.6", lw=0.5, zorder=1)
    for ax in axes[len(variants):]:
        ax.set_visible(False)
    fig.supxlabel(D_LABEL, fontsize=7)
    fig.supylabel("gold reward − π_ref's", fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=min(6, len(labels)), handlelength=1.5,
               title=title)
    return save(fig, path, formats)


# ----------------------------------------------------------------------------------------------------------
# The report section
# ----------------------------------------------------------------------------------------------------------


@dataclass
class OveroptSection:
    """The section :meth:`OveroptTables.write` returns: index.md lines and figure entries ``(sentence, paths)``
    (their errors are the figure queue's)."""

    markdown: list[str] = field(default_factory=list)
    figures: list[tuple[str, list[Path]]] = field(default_factory=list)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or x is pd.NA or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _ci(row: pd.Series, col: str) -> str:
    point, lo, hi = row.get(col), row.get(f"{col}_lo"), row.get(f"{col}_hi")
    if point is None or not np.isfinite(point):
        return "–"
    if lo is None or not np.isfinite(lo) or lo == hi:
        return _fmt(point)
    return f"{_fmt(point)} [{_fmt(lo)}, {_fmt(hi)}]"


def _table(frame: pd.DataFrame, cols: list[tuple[str, str]], ci: set[str]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        cells = [_ci(row, c) if c in ci else _fmt(row[c]) if isinstance(row[c], float) else str(row[c])
                 for c, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _slug(values: dict[str, Any]) -> str:
    parts = []
    for k, v in values.items():
        name = {"kl.beta": "beta", "env.id": "env"}.get(k, k.replace(".", "-"))
        parts.append(f"{name}-{v:g}" if isinstance(v, float) else f"{name}-{v}")
    return "_".join(parts).replace("/", "-").replace(" ", "")


@dataclass
class OveroptTables:
    """The over-optimization section once its figures are queued (:func:`queue_overopt`): :meth:`write` computes
    its tables (what the figures do not need) and returns the section."""

    section: OveroptSection
    points: pd.DataFrame
    """:func:`analysis.overopt.frontier_points` of the metrics."""
    points_fit: pd.DataFrame
    """The same with ``variant`` as strings."""
    fits: pd.DataFrame
    conds: list[str]
    by: list[str]
    """The groups of the fits and of the peaks (``variant``, ``conds``, then ``kl.beta`` where it has values)."""
    out: Path
    n_boot: int
    seed: int

    def write(self) -> OveroptSection:
        """The peak, best-of-n and frontier tables: their CSVs into ``out`` and their Markdown into the
        section (whose figure entries are filled when the queue is drawn)."""
        points, fits, conds, n_boot, seed = self.points_fit, self.fits, self.conds, self.n_boot, self.seed
        by = self.by
        has_beta = "kl.beta" in by
        per_run = O.peak_per_run(self.points)
        per_run["variant"] = per_run["variant"].astype(str)
        is_bon = per_run["variant"] == O.BON
        bon_by = ["variant", *conds] + (["bon.n"] if "bon.n" in per_run else [])
        peaks = pd.concat([O.peak_table(per_run[~is_bon], by, n_boot, seed) if (~is_bon).any() else pd.DataFrame(),
                           O.peak_table(per_run[is_bon], bon_by, n_boot, seed) if is_bon.any() else pd.DataFrame()],
                          ignore_index=True)
        if is_bon.any() and "kl.beta" in peaks:  # best-of-n has no β
            peaks.loc[peaks["variant"] == O.BON, "kl.beta"] = np.nan
        fit_by = ["variant", *conds]
        bon_rows = O.bon_check(points, fits, fit_by, n_boot, seed) if (points["variant"] == O.BON).any() \
            else pd.DataFrame()
        grid_rows = []
        for _key, g in (points.groupby(conds, observed=True) if conds else [((), points)]):
            none = g[g["variant"] == O.NO_KL]
            if none.empty:
                continue
            d_max = float(none.groupby("seed")["d"].max().median())
            peak_d = float(np.median([r.loc[r["gold"].idxmax(), "d"]
                                      for _, r in none.groupby("run_id", observed=True)]))
            grid = sorted({round(q * d_max, 3) for q in FRONTIER_GRID_QUANTILES} | {round(peak_d, 3)})
            grid_rows.append(O.frontier_comparison(g, conds, grid, n_boot, seed))
        frontier = pd.concat(grid_rows, ignore_index=True) if grid_rows else pd.DataFrame()
        if "bon.n" in peaks:
            peaks["bon.n"] = peaks["bon.n"].astype("Int64")
        for name, table in (("peaks", peaks), ("fits", fits), ("bon", bon_rows), ("frontier", frontier)):
            table.to_csv(self.out / f"overopt_{name}.csv", index=False)
        self.section.markdown += _markdown(peaks, fits, bon_rows, frontier, conds, has_beta, n_boot)
        return self.section


def queue_overopt(metrics: pd.DataFrame, out: Path, formats: Sequence[str], n_boot: int, seed: int, figures: bool,
                  queue: FigureQueue) -> OveroptTables:
    """Tables, CSVs and figures of the over-optimization analysis of ``metrics`` into ``out`` (see the module
    docstring), first half: the frontier points and Gao fits, and the figures queued on ``queue`` (when
    ``figures``; its owner draws them and collects their errors); the tables the figures do not need are left to
    :meth:`OveroptTables.write`, which may run while the queue is drawn."""
    sec = OveroptSection()
    points = O.frontier_points(metrics)
    conds = [c for c in condition_columns(points) if c != "kl.beta"]
    has_beta = "kl.beta" in points and points["kl.beta"].nunique() > 0
    by = ["variant", *conds] + (["kl.beta"] if has_beta else [])
    points_fit = points.copy()
    points_fit["variant"] = points_fit["variant"].astype(str)
    fit_by = ["variant", *conds]
    fits = pd.concat([O.gao_fits(points_fit[points_fit["variant"] != O.BON], by, n_boot=min(n_boot, 1000), seed=seed),
                      O.gao_fits(points_fit[points_fit["variant"] == O.BON], fit_by, n_boot=min(n_boot, 1000),
                                 seed=seed)], ignore_index=True)
    if figures:
        _figures(sec, queue, points_fit, fits, conds, out, formats, n_boot, seed)
    return OveroptTables(sec, points, points_fit, fits, conds, by, out, n_boot, seed)


def _markdown(peaks: pd.DataFrame, fits: pd.DataFrame, bon: pd.DataFrame, frontier: pd.DataFrame,
              conds: list[str], has_beta: bool, n_boot: int) -> list[str]:
    keys = [(c, c) for c in conds] + ([("kl.beta", "β")] if has_beta else [])
    lines = ["## Reward over-optimization", "",
             "Gold = the env's reward, proxy = each run's learned reward model; both exact expectations (the table "
             "gives them as they are, the fits and the frontier relative to π_ref's); d = √KL(π‖π_ref). Mean over "
             "seeds [95 % bootstrap interval, "
             f"{n_boot} replicates]. *peak* = the highest gold over the reward phase, *final* = at its end; "
             "*lost* = the fraction of the peak's gain over π_ref given back by the end. Best-of-n rows are per n "
             "(one policy each: peak = final). Tables: [overopt_peaks.csv](overopt_peaks.csv), "
             "[overopt_fits.csv](overopt_fits.csv), [overopt_bon.csv](overopt_bon.csv), "
             "[overopt_frontier.csv](overopt_frontier.csv).", ""]
    if not peaks.empty:
        cols = [("variant", "variant"), *keys] + ([("bon.n", "n")] if "bon.n" in peaks else []) + [
            ("n", "seeds"), ("gold_ref", "π_ref's gold"), ("gold_peak", "peak gold"), ("kl_at_peak", "KL at peak"),
            ("gold_final", "final gold"),
            ("kl_final", "final KL"), ("proxy_final", "final proxy"), ("drop", "peak − final"),
            ("lost", "lost")]
        cols = [(c, h) for c, h in cols if c in peaks]
        sec_lines = _table(peaks, cols,
                           {"gold_peak", "kl_at_peak", "gold_final", "kl_final", "proxy_final", "drop", "lost"})
        lines += ["### Peak and final gold reward", ""] + sec_lines
    if not fits.empty:
        lines += ["### Gao et al.'s forms", "",
                  "Least squares through the origin on every logged (d, gold − π_ref's) of the group's runs: "
                  "best-of-n `bon` = d(α − β·d), the others `rl` = d(α − β·log d); intervals resample runs.", ""]
        cols = [("variant", "variant"), *[(c, h) for c, h in keys if c in fits], ("form", "form"), ("runs", "runs"),
                ("alpha", "α"), ("beta", "β"), ("rmse", "rmse"), ("d_max", "d max")]
        lines += _table(fits, cols, {"alpha", "beta"})
    if not bon.empty:
        inside = bon["inside"].dropna()
        lines += ["### Best-of-n against its fit", "",
                  f"The fitted R_bon lies inside the 95 % interval of the mean gold for {int(inside.sum())} of "
                  f"{len(inside)} values of n.", ""]
        cols = [("variant", "variant"), *[(c, c) for c in conds if c in bon], ("bon_n", "n"), ("d", "d"),
                ("gold_rel", "gold − π_ref's"), ("fit", "fit"), ("inside", "inside")]
        lines += _table(bon, cols, {"gold_rel"})
    if not frontier.empty:
        lines += ["### Frontier against no KL with early stopping", "",
                  "Each variant's best gold reached at KL budget d (over all its β and logged updates: early "
                  "stopping at the best point) minus no KL's, paired by seed (one proxy per seed). A positive "
                  "interval means a better frontier than no KL with early stopping at that budget.", ""]
        cols = [*[(c, c) for c in conds if c in frontier], ("variant", "variant"), ("d", "d budget"),
                ("seeds", "seeds"), ("gold_rel", "frontier"), ("none_gold_rel", "no KL"), ("diff", "difference"),
                ("wins", "seeds better")]
        lines += _table(frontier, cols, {"diff"})
    return lines


def _figures(sec: OveroptSection, queue: FigureQueue, points: pd.DataFrame, fits: pd.DataFrame, conds: list[str],
             out: Path, formats: Sequence[str], n_boot: int, seed: int) -> None:
    groups = points.groupby(conds, observed=True) if conds else [((), points)]
    for key, g in groups:
        values = dict(zip(conds, key if isinstance(key, tuple) else (key,), strict=True))
        bon = g[g["variant"] == O.BON]
        rest = g[g["variant"] != O.BON]
        f_cond = fits
        for k, v in values.items():
            f_cond = f_cond[f_cond[k] == v] if k in f_cond else f_cond
        betas = sorted(rest["kl.beta"].unique()) if "kl.beta" in rest and not rest.empty else [None]
        for b in betas:
            rows = rest[rest["kl.beta"] == b] if b is not None else rest
            fb = f_cond[(f_cond["form"] == "bon") | (f_cond["kl.beta"] == b)] if b is not None and "kl.beta" in f_cond \
                else f_cond
            cond = {**values, **({"kl.beta": b} if b is not None else {})}
            name = out / ("figO1_frontier" + (f"_{_slug(cond)}" if cond else ""))
            sentence = ("Gold (left) and proxy (right) reward minus π_ref's against d = √KL for each variant "
                        "(mean over seeds per logged update, band = 95 % bootstrap interval; dots = final points), "
                        "best-of-n over n (black, markers) and Gao et al.'s fitted forms (dashed)"
                        + (f" — {condition_label(cond)}." if cond else "."))
            queue.add(sec.figures, sentence, name.name, plot_frontier, rows, bon, fb, name,
                      title=condition_label(cond) or None, n_boot=min(n_boot, 1000), seed=seed, formats=formats)
        if len(betas) > 1:
            name = out / ("figO2_beta" + (f"_{_slug(values)}" if values else ""))
            sentence = ("How β moves the stopping point along the frontier: per KL variant, gold reward minus π_ref's "
                        "against d for each β (light to dark = small to large β; dots = final points), over no KL "
                        "(grey) and best-of-n (black)" + (f" — {condition_label(values)}." if values else "."))
            queue.add(sec.figures, sentence, name.name, plot_beta_frontier, g, name,
                      title=condition_label(values) or None, seed=seed, formats=formats)
