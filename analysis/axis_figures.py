"""Figures against a swept key: the episode length over updates per loss aggregation (``train.loss_agg``) and
final per-run measures against a numeric key such as the rollouts' lag (``train.staleness``). Same conventions
as :mod:`analysis.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.loading import variant_order
from analysis.plotting import (
    DARK_PALETTE,
    FORMATS,
    PAGE_WIDTH,
    new_figure,
    panel_label,
    paper_style,
    save,
    variant_style,
)
from analysis.stats import bootstrap_curve


@paper_style
def plot_length(metrics: pd.DataFrame, path: str | Path, *, by: str = "train.loss_agg", column: str = "length_true",
                title: str | None = None, n_boot: int = 1000, seed: int = 0,
                formats: Sequence[str] = FORMATS) -> list[Path]:
    """The mean episode length vs update, one panel per KL variant and one line per value of ``by`` (the loss
    aggregation by default): mean over seeds with a 95 % bootstrap band. ``column``: ``length_true`` (exact,
    the policy after each update) or ``episode_length`` (the sampled batch)."""
    variants = variant_order(metrics["variant"].unique())
    levels = sorted(metrics[by].astype(str).unique())
    ncol = min(4, len(variants))
    nrow = -(-len(variants) // ncol)
    fig = new_figure(PAGE_WIDTH, 1.25 * nrow + 0.5)
    axes = fig.subplots(nrow, ncol, sharex=True, sharey=True, squeeze=False).ravel()
    palette = [DARK_PALETTE[i % len(DARK_PALETTE)] for i in range(len(levels))]
    for ax, variant in zip(axes, variants, strict=False):
        rows = metrics[metrics["variant"] == variant]
        for colour, level in zip(palette, levels, strict=True):
            sub = rows[rows[by].astype(str) == level]
            if sub.empty:
                continue
            curve = sub.pivot_table(index="update", columns="run_id", values=column, observed=True)
            x = curve.index.to_numpy()
            mean, lo, hi = bootstrap_curve(curve.to_numpy().T, n_boot=n_boot, seed=seed)
            ax.plot(x, mean, color=colour, label=level, lw=1.0)
            ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
        ax.set_title(panel_label(variant) if variant == "none" else variant, fontsize=6)
    for ax in axes[len(variants):]:
        ax.set_visible(False)
    for ax in axes[::ncol]:
        ax.set_ylabel("episode length")
    for ax in axes[-ncol:]:
        ax.set_xlabel("update")
    axes[0].legend(title=by.split(".")[-1], loc="lower left", fontsize=5, title_fontsize=5)
    if title:
        fig.suptitle(title)
    return save(fig, path, formats)


@paper_style
def plot_against(per_run: pd.DataFrame, path: str | Path, *, x: str, columns: Sequence[str] = ("kl_final",
                 "tv_opt_final"), labels: Sequence[str] | None = None, title: str | None = None, n_boot: int = 1000,
                 seed: int = 0, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Per-run final measures (``columns`` of :func:`analysis.metrics.run_summary`) against a swept numeric key
    ``x`` (e.g. ``train.staleness``), one line per variant: mean over seeds with a 95 % bootstrap interval, one
    panel per column, a log y axis when a column spans more than two decades."""
    variants = variant_order(per_run["variant"].unique())
    fig = new_figure(PAGE_WIDTH, 2.2)
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, col, label in zip(axes, columns, labels or columns, strict=True):
        for variant in variants:
            rows = per_run[per_run["variant"] == variant]
            xs = sorted(rows[x].dropna().unique())
            stats = [bootstrap_curve(rows.loc[rows[x] == v, col].to_numpy(dtype=float)[:, None], n_boot=n_boot,
                                     seed=seed) for v in xs]
            mean = np.array([m[0] for m, _, _ in stats])
            lo = np.array([lo[0] for _, lo, _ in stats])
            hi = np.array([hi[0] for _, _, hi in stats])
            style = variant_style(variant)
            ax.plot(xs, mean, marker="o", ms=2.5, label=panel_label(variant) if variant == "none" else variant,
                    **style)
            ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.15, lw=0)
        values = per_run[col].to_numpy(dtype=float)
        positive = values[np.isfinite(values) & (values > 0)]
        if positive.size and positive.max() / max(positive.min(), 1e-12) > 100:
            ax.set_yscale("symlog", linthresh=max(float(np.quantile(positive, 0.05)), 1e-6))
        ax.set_xlabel(x.split(".")[-1])
        ax.set_ylabel(label)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=5)
    if title:
        fig.suptitle(title)
