"""Shared pieces of reflab's figures: the paper style, variant colours and dashes, conditions, saving, and
the helpers that draw a variant's curve over updates (used by :mod:`analysis.figures` and
:mod:`analysis.policy_figures`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis import draw_caches, pdf_fonts, pdf_markers
from analysis.loading import (  # noqa: F401 (re-exported)
    NOT_CONDITION_KEYS,
    VARIANT_ORDER,
    config_difference,
    key_columns,
    variant_order,
)
from analysis.stats import bootstrap_curve

pdf_fonts.install()  # TrueType subsets for the PDFs without the layout tables, made once per glyph set
draw_caches.install()  # $...$ parsed once per process; ticks computed once per layout state (in save)
pdf_markers.install()  # a line's markers written to the PDF in one piece

#: Single-column width (inches) of the default figures.
COLUMN_WIDTH = 3.3
#: Two-column width (inches) for wide figures.
PAGE_WIDTH = 6.9
FORMATS = ("pdf", "png")
#: Extra ``savefig`` keywords per format. PNG: zlib level 1 instead of PIL's 6, the same pixels in a file ≈ 6 %
#: larger written in half the time (compressing was a twelfth of a report's drawing time).
SAVE_KWARGS: dict[str, dict[str, Any]] = {"png": {"pil_kwargs": {"compress_level": 1}}}
PAPER_RC: dict[str, Any] = {
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
    "font.family": "sans-serif", "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7,
    "xtick.labelsize": 6, "ytick.labelsize": 6, "legend.fontsize": 6, "legend.title_fontsize": 6,
    "lines.linewidth": 1.1, "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
    "xtick.major.size": 2.5, "ytick.major.size": 2.5, "axes.spines.top": False, "axes.spines.right": False,
    "legend.frameon": False, "savefig.dpi": 300, "savefig.bbox": "tight", "savefig.pad_inches": 0.02,
    "axes.titlepad": 3.0, "axes.labelpad": 2.0,
}
#: seaborn's "colorblind" palette (RGB, as ``seaborn.color_palette("colorblind")`` gives it; seaborn is not
#: imported: it brings scipy, over a second of every report's start-up).
_PALETTE = [mpl.colors.to_rgb(c) for c in ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161",
                                           "#fbafe4", "#949494", "#ece133", "#56b4e9")]
#: seaborn's "dark" palette (``seaborn.color_palette("dark")``), cycled for more colours.
DARK_PALETTE = [mpl.colors.to_rgb(c) for c in ("#001c7f", "#b1400d", "#12711c", "#8c0800", "#591e71", "#592f0d",
                                               "#a23582", "#3c3c3c", "#b8850a", "#006374")]
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


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "1.0")


def variant_parts(variant: str, rows: pd.DataFrame | None = None) -> tuple[str, str, bool]:
    """``(placement, estimator, IS correction)`` of a variant: from the config columns of its ``rows``
    (``kl.placement``, ``kl.estimator``, ``kl.is_correction``, ``train.algo``, ``dpo.loss``) when given, so a
    relabelled variant keeps its style; else parsed from the label: ``"k3 as loss (IS)"`` → ``("loss", "k3",
    True)``; ``"none"`` → ``("none", "", False)``; ``"DPO"`` → ``("preference", "DPO", False)``."""
    if rows is not None and len(rows) and "kl.placement" in rows:
        r = rows.iloc[0]
        if str(r.get("train.algo", "ppo")) == "dpo":
            return "preference", "IPO" if str(r.get("dpo.loss", "dpo")) == "ipo" else "DPO", False
        placement = str(r["kl.placement"])
        if placement == "none":
            return "none", "", False
        return placement, str(r.get("kl.estimator", "k1")), _truthy(r.get("kl.is_correction", False))
    if variant == "none":
        return "none", "", False
    if variant in PREFERENCE_VARIANTS:
        return "preference", variant, False
    est, _, rest = variant.partition(" ")
    placement = "reward" if rest.startswith("in reward") else "loss"
    return placement, est, rest.endswith("(IS)")


def panel_label(variant: str, rows: pd.DataFrame | None = None) -> str:
    """A variant's legend label inside a panel titled by its placement: the estimator (+ IS), or "no KL";
    a relabelled variant (a label that is not the standard one of its config) keeps its label."""
    placement, est, is_corr = variant_parts(variant, rows)
    standard = "none" if placement == "none" else est if placement == "preference" else \
        f"{est} {'in reward' if placement == 'reward' else 'as loss'}" + (" (IS)" if is_corr else "")
    if variant != standard:
        return variant
    if placement == "none":
        return "no KL"
    return est + (" (IS)" if is_corr else "")


def variant_style(variant: str, rows: pd.DataFrame | None = None) -> dict[str, Any]:
    """Matplotlib line keywords (``color``, ``dashes``) of a variant: colour = estimator, dashes = placement,
    from the config columns of ``rows`` when given (:func:`variant_parts`)."""
    placement, est, is_corr = variant_parts(variant, rows)
    if placement == "none":
        return {"color": "0.15", "dashes": PLACEMENT_DASHES["none"]}
    colour = ESTIMATOR_COLOURS.get(est, _PALETTE[7])
    return {"color": colour, "dashes": PLACEMENT_DASHES["is" if is_corr else placement]}


#: Markers that tell the sweeps of a comparison apart (the first sweep has none).
SWEEP_MARKERS = (None, "o", "s", "^", "D", "v", "P", "X")


def comparison_keys(frame: pd.DataFrame) -> list[str]:
    """In a comparison (``sweep`` column with several labels): ``sweep`` and the key columns that are constant
    within each sweep but differ between them (what the sweeps compare, e.g. ``train.lr``); else empty."""
    if "sweep" not in frame or frame["sweep"].nunique() < 2:
        return []
    cols = [c for c in key_columns(frame) if c not in _NOT_CONDITIONS and c != "sweep"]
    per = frame.groupby("sweep", observed=True)
    return ["sweep"] + [c for c in cols if frame[c].nunique(dropna=False) > 1
                        and bool((per[c].nunique(dropna=False) <= 1).all())]


def condition_columns(frame: pd.DataFrame) -> list[str]:
    """Key columns of ``frame`` other than seed/variant (and a comparison's :func:`comparison_keys`, which are
    drawn as lines) that take more than one value; an env's own keys (``env.*``) are left out where ``env.id``
    varies and they are fixed within each env (a sweep over whole env mappings: ``env.id`` names the condition)."""
    skip = set(comparison_keys(frame)) | {"sweep"}
    cols = [c for c in key_columns(frame) if c not in _NOT_CONDITIONS and c not in skip]
    cols = [c for c in cols if frame[c].nunique(dropna=False) > 1]
    if "env.id" in cols:
        by_env = frame.groupby("env.id", observed=True, dropna=False)
        cols = [c for c in cols if not c.startswith("env.") or c == "env.id"
                or bool((by_env[c].nunique(dropna=False) > 1).any())]
    return cols


@dataclass
class Line:
    """One line of a curve figure: a variant (× a sweep of a comparison), its rows and its style."""

    variant: str
    sweep: str | None
    rows: pd.DataFrame
    style: dict[str, Any]
    label: str
    panel_label: str
    placement: str


def sweep_label(frame: pd.DataFrame, sweep: str, keys: Sequence[str]) -> str:
    """``"B (train.lr = 0.03)"``: a sweep's label with the values of the keys the comparison varies."""
    rows = frame[frame["sweep"].astype(str) == sweep]
    extra = [f"{k} = {rows[k].iloc[0]:g}" if isinstance(rows[k].iloc[0], float) else f"{k} = {rows[k].iloc[0]}"
             for k in keys if k != "sweep" and len(rows)]
    extra = [e for e in extra if e.split(" = ", 1)[1] not in sweep]  # a label that already says it
    return sweep + (f" ({', '.join(extra)})" if extra else "")


def lines_of(frame: pd.DataFrame) -> list[Line]:
    """The lines of a figure of one condition: one per variant (× sweep in a comparison), in variant order,
    each styled from its config columns (sweeps add markers). Refuses (``ValueError``) a line whose rows come
    from runs whose configs differ beyond the seed (:func:`check_lines`)."""
    check_lines(frame)
    comp = comparison_keys(frame)
    sweeps = list(dict.fromkeys(frame["sweep"].astype(str))) if comp else [None]
    out = []
    for v in variant_order(frame["variant"].astype(str).unique()):
        rows_v = frame[frame["variant"].astype(str) == v]
        for i, sw in enumerate(sweeps):
            rows = rows_v if sw is None else rows_v[rows_v["sweep"].astype(str) == sw]
            if rows.empty:
                continue
            style = variant_style(v, rows)
            label, plabel = v, panel_label(v, rows)
            if sw is not None:
                style = {**style, "marker": SWEEP_MARKERS[i % len(SWEEP_MARKERS)], "markevery": 0.12, "ms": 2.6,
                         "mfc": "white", "mew": 0.7}
                tag = sweep_label(frame, sw, comp)
                label, plabel = f"{v} · {tag}", f"{plabel} · {tag}"
            out.append(Line(v, sw, rows, style, label, plabel, variant_parts(v, rows)[0]))
    return out


def check_lines(frame: pd.DataFrame) -> None:
    """Raise ``ValueError`` if one line (a variant, × sweep in a comparison) mixes runs whose configs differ in
    anything but the seed: e.g. frames of two loads with different learning rates concatenated, where
    ``train.lr`` is a column of neither. Uses the ``config_id`` key column (absent: nothing to check)."""
    if "config_id" not in frame or "variant" not in frame or frame.empty:
        return
    cols = ["variant", *condition_columns(frame), *comparison_keys(frame)]
    counts = frame.groupby(cols, observed=True)["config_id"].nunique()
    bad = counts[counts > 1]
    if bad.empty:
        return
    key = bad.index[0]
    key = key if isinstance(key, tuple) else (key,)
    rows = frame
    for c, v in zip(cols, key, strict=True):
        rows = rows[rows[c] == v]
    diff = config_difference(rows["config_id"].astype(str).unique())
    what = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in list(diff.items())[:4]) or \
        "keys that are not columns of these rows"
    raise ValueError(f"variant {key[0]!r} mixes runs of {int(bad.iloc[0])} different configs in one line "
                     f"({what}); load the folders together with analysis.load([A, B], labels=[...]) so the "
                     "keys that differ become columns, or filter to one config")


def split_conditions(frame: pd.DataFrame) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """``(condition values, rows)`` for every combination of :func:`condition_columns` (one if none vary)."""
    cols = condition_columns(frame)
    if not cols:
        yield {}, frame
        return
    for values, rows in frame.groupby(cols, observed=True, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        yield dict(zip(cols, values, strict=True)), rows


def condition_label(condition: dict[str, Any]) -> str:
    """``{"kl.beta": 0.25}`` → ``"β = 0.25"`` (other keys as ``key = value``), joined by commas."""
    parts = []
    for k, v in condition.items():
        name = {"kl.beta": "β", "env.id": "env"}.get(k, k)
        parts.append(f"{name} = {v:g}" if isinstance(v, float) else f"{name} = {v}")
    return ", ".join(parts)


def check_one_condition(frame: pd.DataFrame, overlay: bool = False) -> None:
    """Raise ``ValueError`` unless ``frame`` holds one condition (:func:`condition_columns` constant) whose lines
    each hold one config (:func:`check_lines`); unless ``overlay`` (a figure that draws a comparison's sweeps as
    separate lines), also unless it holds one sweep."""
    cols = condition_columns(frame)
    if cols:
        raise ValueError(f"these rows mix several conditions ({', '.join(cols)} vary); filter to one, e.g. "
                         f"with analysis.figures.split_conditions")
    if not overlay and comparison_keys(frame):
        raise ValueError("these rows hold several sweeps of a comparison and this figure draws one; filter to "
                         "one sweep (frame[frame['sweep'] == label])")
    check_lines(frame)


def paper_style(fn: Callable[..., list[Path]]) -> Callable[..., list[Path]]:
    """Run a figure function inside :data:`PAPER_RC` (fonts, line widths, TrueType fonts in PDFs) and the
    drawing caches (:func:`analysis.draw_caches.draw_cache`: ticks made while the figure is built are copies
    too)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> list[Path]:
        with mpl.rc_context(PAPER_RC), draw_caches.draw_cache():
            return fn(*args, **kwargs)

    return wrapper


def save(fig: Figure, path: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``fig`` as ``path.<fmt>`` for each format (the suffix of ``path`` is replaced) and return the paths."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix.lstrip(".") in ("pdf", "png", "svg", "eps", "ps") else path
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with mpl.rc_context(PAPER_RC), draw_caches.draw_cache():
        drop_crowded_minor_ticks(fig)
        bbox = freeze_layout(fig) if mpl.rcParams["savefig.bbox"] == "tight" else None
        for fmt in formats:
            target = base.with_name(f"{base.name}.{fmt}")
            fig.savefig(target, format=fmt, bbox_inches=bbox, **SAVE_KWARGS.get(fmt, {}))
            out.append(target)
    return out


MINOR_TICK_MAX_DECADES = 4
"""A log axis spanning more decades than this shows no minor ticks: eight a decade make a comb, not a scale."""


def drop_crowded_minor_ticks(fig: Figure) -> None:
    """Remove the minor ticks of ``fig``'s log axes (with matplotlib's default minor locator) whose view spans
    more than :data:`MINOR_TICK_MAX_DECADES` decades; the major ticks and their labels stay."""
    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(limits)
            if (axis.get_scale() == "log" and type(axis.get_minor_locator()) is mpl.ticker.LogLocator and lo > 0
                    and np.log10(hi / lo) > MINOR_TICK_MAX_DECADES):
                axis.set_minor_locator(mpl.ticker.NullLocator())


def freeze_layout(fig: Figure) -> Any:
    """Lay ``fig`` out once (its layout engine, at the PNG resolution) and return its tight bounding box
    (inches, padded by ``savefig.pad_inches``); the layout engine is then switched off, so every format saved
    with that box draws the figure once instead of laying it out and measuring it again (twice per format
    with ``bbox_inches="tight"`` and a constrained layout)."""
    dpi = fig.dpi
    save_dpi = mpl.rcParams["savefig.dpi"]
    fig.dpi = dpi if save_dpi == "figure" else float(save_dpi)
    try:
        engine = fig.get_layout_engine()
        if engine is not None:
            engine.execute(fig)
        bbox = fig.get_tightbbox()
    finally:
        fig.dpi = dpi
    fig.set_layout_engine(None)
    pad = mpl.rcParams["savefig.pad_inches"]
    return bbox.padded(pad)


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on an Agg canvas (which keeps its renderer between layout passes, so text is
    measured once per size instead of once per pass; its PNGs are written by :mod:`analysis.png`)."""
    from analysis.png import Canvas

    fig = Figure(figsize=(width, height), layout="constrained")
    Canvas(fig)
    return fig



def off_spans(metrics: pd.DataFrame) -> list[tuple[float, float]]:
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


def mark_off(ax: Axes, spans: list[tuple[float, float]], label: bool) -> None:
    for a, b in spans:
        ax.axvspan(a, b, color="0.92", zorder=0, lw=0)
        ax.axvline(a, color="0.35", lw=0.7, ls=(0, (2, 1.5)), zorder=1)
        if label:
            ax.text(b, 1.0, "reward off", transform=ax.get_xaxis_transform(), ha="right", va="bottom",
                    fontsize=5.5, color="0.3")


def pivot_runs(rows: pd.DataFrame, column: str, x: str = "update") -> tuple[np.ndarray, np.ndarray]:
    """``(updates [n_x], values [n_seeds, n_x])`` of one variant's runs (NaN where a run has no row): runs in
    ``run_id`` order (category order if categorical), updates (the distinct values of ``x``) sorted, each cell
    the first non-missing value of its run and update; runs without any value are left out (what
    ``pivot_table(..., aggfunc="first")`` gives, without its group-by machinery)."""
    run_codes, _ = pd.factorize(rows["run_id"], sort=True)
    upd_codes, updates = pd.factorize(rows[x], sort=True)
    values = rows[column].to_numpy(float)
    wide = np.full((int(run_codes.max()) + 1 if len(rows) else 0, len(updates)), np.nan)
    keep = ~np.isnan(values) & (run_codes >= 0) & (upd_codes >= 0)
    cell = run_codes[keep] * len(updates) + upd_codes[keep]
    cell, first = np.unique(cell, return_index=True)  # the first row of each (run, update)
    wide.ravel()[cell] = values[keep][first]
    wide = wide[~np.isnan(wide).all(axis=1)]
    return np.asarray(updates, float), wide


def draw_variant(ax: Axes, rows: pd.DataFrame, variant: str, column: str, seeds: bool, stat: str, n_boot: int,
                  seed: int, label: str, floor: float | None = None, style: dict[str, Any] | None = None) -> None:
    x, values = pivot_runs(rows, column)
    if values.size == 0:
        return
    style = style or variant_style(variant, rows)
    point, lo, hi = bootstrap_curve(values, stat, n_boot, seed=seed)
    if floor is not None:  # log axes: a line at or below the floor (0, float noise) is not drawn as data there
        point = np.where(point > floor, point, np.nan)
        lo = np.maximum(lo, floor)
        hi = np.where(hi > floor, hi, np.nan)
        values = np.where(values > floor, values, np.nan)
    if seeds and values.shape[0] > 1:
        for v in values:
            ax.plot(x, v, color=style["color"], lw=0.35, alpha=0.35, zorder=2)
    if values.shape[0] > 1:
        ax.fill_between(x, lo, hi, color=style["color"], alpha=0.18, lw=0, zorder=2)
    ax.plot(x, point, label=label, **{"zorder": 3, **style})


def placement_groups(variants: list[str], layout: str) -> list[tuple[str | None, list[str]]]:
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


def line_panels(lines: list[Line], layout: str) -> list[tuple[str | None, list[Line]]]:
    """Panels as ``(title, lines)``: one per KL placement (the no-KL lines repeated in each as the baseline),
    placements from the lines' config columns."""
    if layout == "single":
        return [(None, lines)]
    groups: list[tuple[str | None, list[Line]]] = []
    base = [ln for ln in lines if ln.placement == "none"]
    for placement in ("reward", "loss", "preference"):
        members = [ln for ln in lines if ln.placement == placement]
        if members:
            groups.append((PLACEMENT_TITLES[placement], base + members))
    return groups or [(None, lines)]


@paper_style


def finish_panels(fig: Figure, axes: Sequence[Axes], n_used: int, xlabel: str, ylabel: str, ncol: int,
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
