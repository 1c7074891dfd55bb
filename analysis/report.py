"""``reflab report DIR``: figures, a summary table and an ``index.md`` for a run or a sweep folder.

Writes ``DIR/report/`` (or ``--out``):

- ``index.md``: what was loaded (runs by status, runs that failed or are missing), the summary table and
  every figure with one sentence saying what it shows;
- ``summary.csv`` / ``summary.md``: per variant × condition (β, env, …): final KL to the reference, entropy,
  distance to the optimum, expected return, fraction of seeds collapsed and, for runs with a reward-off
  phase, the KL after it, its half-life and the fraction returned — each an IQM (fractions: a mean) over
  seeds with a 95 % stratified-bootstrap interval;
- ``runs.csv``: every per-run measure (:func:`analysis.metrics.run_summary`);
- figures (PDF + PNG by default): KL vs update, entropy vs update, recovery across the reward switch,
  heatmaps over β × variant, the final policy against the reference and the optimum, and the estimators'
  bias and spread.

Failed, unfinished or missing runs are listed, never fatal; a folder with no usable run still gets an
``index.md`` saying so (exit code 1).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import axis_figures as A
from analysis import figures as F
from analysis import metrics as M
from analysis import overopt, plotting
from analysis import policy_figures as P
from analysis.figure_kinds import FIGURE_CHOICES, KindsError, choices_text, parse_kinds, report_kinds
from analysis.figure_pool import FigureQueue
from analysis.improvement import has_poi, poi_score, poi_table
from analysis.loading import UNREADABLE, LoadError, Results, load
from analysis.references import kl_references
from analysis.report_index import index_markdown
from analysis.summary import (  # noqa: F401 (re-exported)
    MIN_BOOTSTRAP_N,
    SUMMARY_COLUMNS,
    _fmt,
    interval_note,
    summary_markdown,
    summary_table,
)

MAX_CONDITIONS = 8
#: Figure kinds of a condition's curve section (:meth:`_Report.curves`).
CURVE_KINDS = frozenset({"kl", "entropy", "recovery", "policy", "estimators", "continuous"})
#: Diffusion chain: estimator figures leave out batches whose sampling policy's KL exceeds this (nats).
DIFFUSION_ESTIMATOR_MAX_KL = 50.0


def _conditions_varying(frame: pd.DataFrame, by: str) -> Iterator[tuple[pd.DataFrame, str, str]]:
    """``(rows, label, slug)`` of each condition of ``frame`` (its other condition columns) in which ``by`` takes
    at least two values."""
    rest = [c for c in plotting.condition_columns(frame) if c != by]
    for key, g in (frame.groupby(rest, observed=True, dropna=False) if rest else [((), frame)]):
        if g[by].nunique() >= 2:
            condition = dict(zip(rest, key if isinstance(key, tuple) else (key,), strict=True))
            yield g, plotting.condition_label(condition), _slug(condition)


def _slug(condition: dict[str, Any]) -> str:
    parts = []
    for k, v in condition.items():
        name = {"kl.beta": "beta", "env.id": "env"}.get(k, k.replace(".", "-"))
        value = f"{v:g}" if isinstance(v, float) else str(v)
        parts.append(f"{name}-{value}".replace("/", "-").replace(" ", ""))
    return "_".join(parts)


def _ids(frame: pd.DataFrame) -> set[str]:
    """The run ids of ``frame``'s rows."""
    return {str(r) for r in frame["run_id"].unique()}


def _of_runs(frame: pd.DataFrame, ids: set[str]) -> pd.DataFrame:
    """The rows of ``frame`` whose ``run_id`` is in ``ids`` (a categorical column is matched by its categories,
    not by a string per row: the policy and trajectory tables hold many rows per run)."""
    col = frame["run_id"]
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes = col.cat.codes.to_numpy()
        keep = np.append(col.cat.categories.astype(str).isin(list(ids)), False)  # code -1 (missing): not kept
        return frame[keep[codes]]
    return frame[col.astype(str).isin(ids)]


def _reward_end_policy(policy: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Each run's last policy snapshot at or before the end of its reward phase."""
    return M.at_update(M.reward_phase(policy, M.switch_updates(metrics)))


class _Report:
    """Collects figure entries and writes them; one instance per report."""

    def __init__(self, res: Results, out: Path, formats: Sequence[str], seeds: bool, collapse_threshold: float,
                 n_boot: int, seed: int, kinds: Sequence[str] = FIGURE_CHOICES, kinds_note: str = ""):
        self.res, self.out, self.formats, self.kinds = res, out, tuple(formats), set(kinds)
        self.seeds, self.threshold, self.n_boot, self.seed = seeds, collapse_threshold, n_boot, seed
        self.sections: list[tuple[str, list[tuple[str, list[Path]]]]] = []
        self.errors: list[str] = []
        self.extra_markdown: list[str] = []
        self.kinds_note = kinds_note  # index.md's sentence on figure kinds the sweep's grid chose (report.figures)
        self.queue = FigureQueue()
        self._kept: list[list] = []  # entry lists whose section stays in index.md even without a figure

    def _figure(self, entries: list[tuple[str, list[Path]]], sentence: str, fn: Any, *args: Any, **kw: Any) -> None:
        """Queue one figure (drawn by :meth:`finish`); a figure that cannot be drawn is reported in index.md, not
        raised."""
        kind = {F.plot_kl: "kl", F.plot_entropy: "entropy", F.plot_recovery: "recovery", F.plot_heatmap: "heatmap",
                P.plot_final_policy: "policy", F.plot_estimators: "estimators", F.plot_dpo_beta: "dpo",
                P.plot_gaussian_trajectory: "continuous", P.plot_mode_mix: "continuous",
                P.plot_x0_distribution: "continuous", F.plot_performance_profile: "profile", A.plot_length: "length",
                A.plot_against: "staleness"}[fn]
        if kind not in self.kinds:
            return
        name = next((Path(a).name for a in args if isinstance(a, str | Path)), getattr(fn, "__name__", "figure"))
        self.queue.add(entries, sentence, name, fn, *args, formats=self.formats, **kw)

    def finish(self) -> None:
        """Wait for (or draw) every queued figure (:meth:`analysis.figure_pool.FigureQueue.finish`); sections
        left without a figure are dropped (but the per-condition curve sections, listed whatever they hold)."""
        self.errors += self.queue.finish()
        self.sections = [(title, entries) for title, entries in self.sections
                         if entries or any(entries is k for k in self._kept)]

    def curves(self, condition: dict[str, Any], m: pd.DataFrame) -> None:
        """Queue the condition's curve and per-variant figures (a section of index.md); nothing when no kind of
        them is drawn (:data:`CURVE_KINDS`), so that their inputs (policy, trajectories) are not even read."""
        if not self.kinds & CURVE_KINDS:
            return
        slug = _slug(condition)
        tag = f"_{slug}" if slug else ""
        label = plotting.condition_label(condition)
        n_seeds = int(m.groupby("variant", observed=True)["run_id"].nunique().max())
        seeds_txt = f"mean over {n_seeds} seeds with a 95 % bootstrap band" if n_seeds > 1 else "one seed"
        entries: list[tuple[str, list[Path]]] = []
        switch = M.switch_updates(m)
        off = " The grey span is the phase with the reward switched off." if not switch.empty else ""
        # what the runs logged tells their kind: continuous actions log no action probability (min_prob), a
        # diffusion chain the mode mix of its samples (its sequence KL is estimated on the policy's own chains,
        # and runs that blow up span many decades)
        continuous = "min_prob" in m and not bool(m["min_prob"].notna().any())
        diffusion = any(c.startswith("mode_frac_") for c in m.columns)
        # a log axis when the lines end decades apart (e.g. a large β, whose KLs sit near 0 next to a collapse)
        ends = m.groupby("run_id", observed=True)["kl_true"].last().to_numpy(float)
        ends = ends[np.isfinite(ends) & (ends > 1e-6)]
        log = diffusion or (ends.size > 1 and ends.max() / ends.min() > 100)
        refs = [(name, value, None if switch.empty else float(switch.min()))
                for name, value in kl_references(self.res.config(str(m["run_id"].iloc[0])))]
        what = ("Sequence KL(P_θ‖P_ref) of the denoising chain (closed form per step, averaged over the policy's "
                "own chains)" if diffusion else "Exact KL(π‖π_ref) to the reference")
        scale = (" Log scale (the lines end decades apart); values at or below 1e-6 nats are drawn on the marked "
                 "floor." if log else "")
        ref_txt = (" Grey reference lines (named in the legend): KL(π*‖π_ref) of the Gibbs optimum (where k1 in the "
                   "reward, k2 and the exact KL as a loss settle) and of the forward-KL point where k3 as a loss "
                   "stops." if refs else "")
        self._figure(entries, f"{what} vs update for each placement × estimator ({seeds_txt}).{off}{scale}{ref_txt}",
                     F.plot_kl, m, self.out / f"fig1_kl{tag}", seeds=self.seeds, log=log, title=label or None,
                     n_boot=self.n_boot, seed=self.seed, references=refs)
        if continuous:
            sentence = f"Differential entropy of the policy (nats) vs update ({seeds_txt})."
        else:
            sentence = (f"Policy entropy (nats, occupancy-weighted over visited states) vs update ({seeds_txt}); "
                        f"the dotted line is the collapse threshold ({self.threshold:g} nats).")
        if bool(m["entropy"].notna().any()):  # none logged: e.g. fixed step stds, whose path entropy is constant
            self._figure(entries, sentence, F.plot_entropy, m, self.out / f"fig2_entropy{tag}",
                         threshold=None if continuous else self.threshold, seeds=self.seeds, title=label or None,
                         n_boot=self.n_boot, seed=self.seed)
        if not switch.empty:
            u0 = int(switch.min())
            self._figure(entries, f"KL to the reference on a log scale around the switch to the reward-off phase "
                         f"after update {u0} (dashed line): curves that fall return to the reference (a line ends "
                         "where it falls below 1e-6 nats, the marked floor).",
                         F.plot_recovery, m, self.out / f"fig3_recovery{tag}", seeds=self.seeds,
                         title=label or None, n_boot=self.n_boot, seed=self.seed)
        sweeps = list(dict.fromkeys(m["sweep"].astype(str))) if plotting.comparison_keys(m) else [None]
        for sw in sweeps:  # figures of one variant per panel: one per sweep of a comparison
            ms = m if sw is None else m[m["sweep"].astype(str) == sw]
            lab = label if sw is None else ", ".join(x for x in (label, f"sweep {sw}") if x)
            self._per_variant(entries, ms, tag + ("" if sw is None else f"_sweep-{sw}"), lab, seeds_txt,
                              switch, diffusion)
        self.sections.append((label or "all runs", entries))
        self._kept.append(entries)

    def _per_variant(self, entries: list[tuple[str, list[Path]]], m: pd.DataFrame, tag: str, label: str,
                     seeds_txt: str, switch: pd.Series, diffusion: bool) -> None:
        """The figures with a panel or bar per variant: final policy, estimators, continuous-action figures."""
        ids = _ids(m)
        policy = _of_runs(self.res.policy, ids) if "policy" in self.kinds else pd.DataFrame()
        if not policy.empty:
            policy = _reward_end_policy(policy, m)
            first_id = str(m["run_id"].iloc[0])
            config = self.res.config(first_id)
            env_id = config.get("env", {}).get("id")
            when = "at the end of the reward phase" if not switch.empty else "at the last logged update"
            if env_id == "gridworld":
                sentence = (f"Final policy {when} on the grid for one seed per variant, with the reference and "
                            "the KL-regularized optimum: shading = expected visits per episode to each cell, "
                            "arrows = action probabilities (occupancy-weighted over time steps).")
            elif env_id == "diffusion_chain":
                sentence = (f"Mode mix of x_0 {when}: mean posterior probability p_data(m | x_0) of each mixture "
                            "component (bars: mean over seeds, dots: seeds) against the reference chain (grey "
                            "ticks) and the KL-optimal tilt p* ∝ p_ref·e^{r/β} (diamonds).")
            elif "dim" in policy.columns:
                sentence = (f"Final Gaussian policy {when} (first action dimension, mean over seeds) against the "
                            "reference and the Gibbs optimum.")
            else:
                sentence = (f"Final policy {when}: probability of each arm (bars: mean over seeds, dots: single "
                            "seeds) against the reference (grey ticks) and the KL-regularized optimum "
                            "(diamonds).")
            self._figure(entries, sentence, P.plot_final_policy, policy, self.out / f"fig5_policy{tag}",
                         config=config, title=label or None)
        traj = self.res.trajectories if "estimators" in self.kinds else pd.DataFrame()
        traj = _of_runs(traj, ids) if not traj.empty else traj
        unit = "single-episode" if not traj.empty else "batch-mean"
        m_est, left_out = m, ""
        if diffusion and "kl_full_sampled" in m:  # runs that blew up would set the axes
            m_est = m[~(m["kl_full_sampled"] > DIFFUSION_ESTIMATOR_MAX_KL)]
            if len(m_est) < len(m):
                left_out = (f" Batches whose sampling policy had a KL above {DIFFUSION_ESTIMATOR_MAX_KL:g} nats "
                            f"({len(m) - len(m_est)} logged updates of runs that blew up) are left out.")
        self._figure(entries, f"Bias (top) and spread (bottom) of the {unit} estimates k1, k2, k3 against the "
                     f"exact KL of the policy that sampled them, pooled over every run of this condition.{left_out}",
                     F.plot_estimators, m_est, self.out / f"fig6_estimators{tag}",
                     trajectories=traj if not traj.empty else None, title=label or None)
        self._continuous(entries, m, diffusion, tag, label, seeds_txt, switch)

    def _continuous(self, entries: list[tuple[str, list[Path]]], m: pd.DataFrame, diffusion: bool, tag: str,
                    label: str, seeds_txt: str, switch: pd.Series) -> None:
        """The continuous-action figures: Gaussian mean/std trajectories (runs that log ``policy_mean``);
        diffusion mode mix and x_0."""
        off = " Grey span: reward off." if not switch.empty else ""
        if "policy_mean" in m:
            self._figure(entries, f"Gaussian policy mean (dimension 0, left) and std (right) vs update against the "
                         f"Gibbs optimum of the current phase (black dashed; {seeds_txt}).{off}",
                         P.plot_gaussian_trajectory, m, self.out / f"figG_trajectory{tag}", title=label or None,
                         n_boot=self.n_boot, seed=self.seed)
        if not diffusion or "continuous" not in self.kinds:
            return
        self._figure(entries, f"Fraction of x_0 in the rewarded mixture component vs update ({seeds_txt}), against "
                     "the KL-optimal tilt of the current phase (black dashed; the reference once the reward is off) "
                     f"and the reference chain (grey dotted).{off}", P.plot_mode_mix, m,
                     self.out / f"figD2_modes{tag}", title=label or None, n_boot=self.n_boot, seed=self.seed)
        ids = _ids(m)
        samples, density = self.res.samples, self.res.density
        if samples.empty:
            return
        samples = _of_runs(samples, ids)
        density = _of_runs(density, ids) if not density.empty else density
        end = None if switch.empty else int(switch.min())
        after = " and after the reward-off phase (black outline)" if end is not None else ""
        self._figure(entries, f"x_0 distribution (dimension 0, samples pooled over seeds) at the end of the reward "
                     f"phase (filled){after}, against the data distribution p_data (grey) and its KL-optimal "
                     "tilt p_data·e^{r/β} (dashed).", P.plot_x0_distribution, samples, density,
                     self.out / f"figD1_x0{tag}", reward_end=end, title=label or None)

    def profile(self, per_run: pd.DataFrame, value: str, conds: Sequence[str]) -> None:
        """The performance profile of ``value`` (a distance to the optimum), conditions as equal-weight tasks."""
        tasks = [c for c in conds if c != "sweep"]
        entries: list[tuple[str, list[Path]]] = []
        what = F.SUMMARY_LABELS.get(value, value)
        over = f" (the {', '.join(tasks)} values weighted equally)" if tasks else ""
        self._figure(entries, f"Performance profile: fraction of runs whose {what} is below τ, for every τ{over}, "
                     "with a 95 % stratified-bootstrap band; a curve to the upper left is closer to the optimum in "
                     "more runs.", F.plot_performance_profile, per_run, self.out / "fig8_profile", value=value,
                     tasks=tasks, n_boot=min(self.n_boot, 500), seed=self.seed)
        if entries:
            self.sections.append(("performance profile", entries))

    def dpo_beta(self, condition: dict[str, Any], per_run: pd.DataFrame, x: str) -> None:
        """Fig. 7: DPO/IPO against the PPO variants of this condition across β."""
        slug = _slug(condition)
        label = plotting.condition_label(condition)
        ids = _ids(per_run)
        policy = self.res.policy
        policy = _of_runs(policy, ids) if not policy.empty else policy
        if not policy.empty:
            metrics = self.res.metrics
            policy = _reward_end_policy(policy, _of_runs(metrics, ids))
        one_state = not policy.empty and "state" in policy and policy["state"].nunique() == 1
        first = ("Left: final probability of the best arm per variant (line: mean over seeds, dots: seeds) and the "
                 "KL-regularized optimum π* (black). Right: " if one_state else "")
        sentence = (f"DPO against the PPO variants across β. {first}final TV distance to each run's optimum (median "
                    "over seeds, dots: seeds, log scale with values below 1e-4 on the axis floor; DPO's optimum is "
                    "π_ref·e^{r/(τβ)} with τ the Bradley–Terry temperature, IPO's its own).")
        entries: list[tuple[str, list[Path]]] = []
        name = "fig7_dpo_beta" + (f"_{slug}" if slug else "")
        self._figure(entries, sentence, F.plot_dpo_beta, per_run, self.out / name,
                     policy=policy if not policy.empty else None, x=x, title=label or None)
        if entries:
            self.sections.append(("DPO vs PPO over β" + (f" ({label})" if label else ""), entries))

    def lengths(self, metrics: pd.DataFrame) -> None:
        """The episode length over updates per loss aggregation, for runs whose episodes vary in length."""
        by = "train.loss_agg"
        if by not in metrics or metrics[by].nunique() < 2 or "length_true" not in metrics:
            return
        entries: list[tuple[str, list[Path]]] = []
        for g, label, slug in _conditions_varying(metrics[metrics["length_true"].notna()], by):
            self._figure(entries, f"Exact expected episode length of the policy vs update for each loss aggregation "
                         f"(train.loss_agg; mean over seeds, 95 % bootstrap band){' — ' + label if label else ''}.",
                         A.plot_length, g, self.out / ("figL_length" + (f"_{slug}" if slug else "")),
                         title=label or None, n_boot=self.n_boot, seed=self.seed)
        if entries:
            self.sections.append(("Episode length by loss aggregation", entries))

    def staleness(self, per_run: pd.DataFrame) -> None:
        """Final KL to the reference and TV to the optimum against the rollouts' lag (``train.staleness``)."""
        x = "train.staleness"
        if x not in per_run or per_run[x].nunique() < 2:
            return
        entries: list[tuple[str, list[Path]]] = []
        for g, label, slug in _conditions_varying(per_run, x):
            self._figure(entries, "KL to the reference (left) and TV distance to the KL-regularized optimum (right) "
                         "at the end of the reward phase against the sampler's lag in updates (mean over seeds, "
                         f"95 % bootstrap interval){' — ' + label if label else ''}.", A.plot_against, g,
                         self.out / ("figS_staleness" + (f"_{slug}" if slug else "")), x=x,
                         labels=("KL(π‖π_ref), end of reward phase", "TV to π*, end of reward phase"),
                         title=label or None, n_boot=self.n_boot, seed=self.seed)
        if entries:
            self.sections.append(("Stale rollouts", entries))

    def heatmaps(self, condition: dict[str, Any], per_run: pd.DataFrame, x: str) -> None:
        slug = _slug(condition)
        tag = f"_{slug}" if slug else ""
        label = plotting.condition_label(condition)
        entries: list[tuple[str, list[Path]]] = []
        xname = "β" if x == "kl.beta" else x
        for value, stat in (("kl_final", "iqm"), ("entropy_final", "iqm"), ("tv_opt_final", "iqm"),
                            ("collapsed", "mean"), ("kl_end", "iqm")):
            if value not in per_run or per_run[value].isna().all():
                continue
            what = F.SUMMARY_LABELS.get(value, value)
            stat_txt = "IQM over seeds" if stat == "iqm" else "mean over seeds"
            self._figure(entries, f"{what[0].upper() + what[1:]} ({stat_txt}) for each variant (rows) and {xname} "
                         "(columns).", F.plot_heatmap, per_run, self.out / f"fig4_heatmap_{value}{tag}",
                         value=value, x=x, stat=stat, summary=per_run,
                         title=f"{what}, {stat_txt}" + (f" ({label})" if label else ""))
        if entries:
            self.sections.append((f"final measures over {xname}" + (f" ({label})" if label else ""), entries))


def heatmap_frames(per_run: pd.DataFrame, conds: Sequence[str],
                   x: str = "kl.beta") -> list[tuple[dict[str, Any], pd.DataFrame, str]]:
    """The heatmaps' ``(condition, per-run rows, column key)``: one heatmap per value of the conditions other
    than ``x`` (β), with ``x`` on the columns. When ``x`` does not vary but other conditions do (a sweep at one
    β over, say, advantage estimator × loss aggregation), a heatmap per env instead whose columns are those other
    conditions' combinations (one column ``"a, b"`` per combination, under a key naming them, ``"k1, k2"``):
    every variant beside every setting in one figure rather than one single-column figure per setting."""
    rest = [c for c in conds if c != x]
    inner = [c for c in rest if not c.startswith("env.")]
    if x in conds or not inner:
        if not rest:
            return [({}, per_run, x)]
        return [(dict(zip(rest, k if isinstance(k, tuple) else (k,), strict=True)), g, x)
                for k, g in per_run.groupby(rest, observed=True, dropna=False)]
    key = ", ".join(inner)
    combined = per_run[inner].astype(str).agg(", ".join, axis=1)
    frame = per_run.drop(columns=inner).assign(**{key: combined})
    outer = [c for c in rest if c not in inner]
    if not outer:
        return [({}, frame, key)]
    return [(dict(zip(outer, k if isinstance(k, tuple) else (k,), strict=True)), g, key)
            for k, g in frame.groupby(outer, observed=True, dropna=False)]


@dataclass
class ReportOutput:
    """What :func:`write_report` wrote."""

    index: Path
    """The report's ``index.md``."""
    n_runs: int
    """Runs found in the folder (including failed and missing ones)."""
    n_with_metrics: int
    """Runs whose metrics were read (the ones the table and figures cover)."""
    figures: list[Path]
    """Every figure file written."""
    unreadable: dict[str, str] = field(default_factory=dict)
    """``run_id`` → the error of every run whose status says finished but whose tables cannot be read (left out)."""


def write_report(path: str | Path | Sequence[str | Path], out: str | Path | None = None,
                 formats: Sequence[str] = plotting.FORMATS,
                 collapse_threshold: float = M.COLLAPSE_ENTROPY, recovery_tol: float = M.RECOVERY_TOL,
                 n_boot: int = 2000, seed: int = 0, seeds: bool = False,
                 max_conditions: int = MAX_CONDITIONS, figures: Sequence[str] | None = None,
                 labels: Sequence[str] | None = None, pool: Sequence[str] = (),
                 workers: int | None = None) -> ReportOutput:
    """Write the report of the run or sweep folder ``path`` (see the module docstring).

    Args:
        path: a run folder or a sweep folder, or a list of them: a comparison (:func:`analysis.load` of the
            list; ``labels`` name them), whose sweeps are overlaid in the curve figures and are rows of the
            tables.
        out: output folder (default ``path/report``; required for a comparison).
        pool: config keys whose runs may be pooled as repeats (default: only seeds, see :func:`analysis.load`).
        formats: figure formats (``pdf``, ``png``, ``svg``); ``index.md`` shows the PNGs when written.
        collapse_threshold: entropy (nats) below which a run counts as collapsed.
        recovery_tol: KL (nats) within which a run counts as returned after the reward is removed.
        n_boot, seed: bootstrap replicates and seed of every interval in the report.
        seeds: also draw each seed as a thin line in the curve figures.
        max_conditions: draw curve figures for at most this many conditions (the table covers all).
        figures: the figure kinds to draw (a subset of :data:`FIGURE_CHOICES`; empty: tables only; default: the
            kinds the sweep's grid names in ``report.figures`` — every sweep of a comparison: their union — else
            every kind). :class:`analysis.figure_kinds.KindsError` if a ``sweep.json`` names something else.
        workers: processes drawing the figures (default: one per core; 1: in this process, one after another;
            :mod:`analysis.figure_pool`). The files and ``index.md`` are the same for any number.
    """
    t0 = time.perf_counter()
    many = not isinstance(path, str | Path)
    figures, kinds_note = report_kinds(figures, [Path(p) for p in path] if many else [Path(path)])
    res = load(list(path) if many else path, labels=labels, pool=pool)
    if out is None and many:
        raise ValueError("a report of several folders needs an output folder (--out)")
    out = Path(out) if out is not None else Path(path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rep = _Report(res, out, formats, seeds, collapse_threshold, n_boot, seed, figures, kinds_note)
    # the drawing processes start now and draw each figure as it is queued, while this process goes on queueing
    # and then writes the tables
    rep.queue.start(workers, more=True)
    try:
        metrics = res.metrics
        # best-of-n trains nothing: its runs are in the over-optimization section only (analysis.overopt_report)
        frontier = overopt.has_frontier(metrics)
        everything, metrics = metrics, metrics[metrics["variant"].astype(str) != overopt.BON] if frontier else metrics
        by: list[str] = []
        table = pd.DataFrame()
        poi = pd.DataFrame()
        if not metrics.empty:
            per_run = M.run_summary(metrics, collapse_threshold, recovery_tol)
            per_run.to_csv(out / "runs.csv", index=False)
            # every condition of the load (a comparison's sweep first): runs of one row differ only in their seed
            conds = [c for c in res.conditions if c != "variant" and c in per_run and
                     (c == "sweep" or per_run[c].nunique(dropna=False) > 1)]
            by = ["variant"] + conds
            score = poi_score(per_run)
            if score is not None and has_poi(per_run, conds, score[0]):
                rep.profile(per_run, score[0], conds)
            groups = list(plotting.split_conditions(metrics))
            for condition, m in groups[:max_conditions]:
                rep.curves(condition, m)
            skipped = len(groups) - min(len(groups), max_conditions)
            rep.lengths(metrics)
            rep.staleness(per_run)
            for condition, g, x in heatmap_frames(per_run, conds):
                if g["variant"].nunique() * (g[x].nunique() if x in g else 1) >= 2:
                    rep.heatmaps(condition, g, x)
                if g["variant"].astype(str).isin(plotting.PREFERENCE_VARIANTS).any() and x in g and g[x].nunique() >= 2:
                    rep.dpo_beta(condition, g, x)
        else:
            skipped = 0
        if frontier:
            from analysis.overopt_report import queue_overopt  # matplotlib figures, like the rest of this module

            overopt_tables = queue_overopt(everything, out, formats, n_boot, seed, "overopt" in rep.kinds, rep.queue)
        if not metrics.empty:
            table = summary_table(per_run, by, n_boot, seed)
            table.to_csv(out / "summary.csv", index=False)
            (out / "summary.md").write_text(summary_markdown(table, by))
            if score is not None:
                poi = poi_table(per_run, conds, score[0], score[1], n_boot=n_boot, seed=seed)
                if not poi.empty:
                    poi.to_csv(out / "poi.csv", index=False)
        if frontier:
            section = overopt_tables.write()
            rep.extra_markdown = section.markdown
            if section.figures:
                rep.sections.append(("Reward over-optimization", section.figures))
    except BaseException:
        rep.queue.cancel()
        raise
    rep.finish()
    index = out / "index.md"
    src = Path(path) if not many else Path(out)
    index.write_text(index_markdown(res, src, out, table, by, rep, skipped, max_conditions,
                                     collapse_threshold, recovery_tol, n_boot, time.perf_counter() - t0, poi))
    n_with = int(everything["run_id"].nunique()) if not everything.empty else 0
    figures = [p for _, entries in rep.sections for _, paths in entries for p in paths]
    bad = res.runs[res.runs["status"].astype(str) == UNREADABLE]
    unreadable = dict(zip(bad["run_id"].astype(str), bad["error"].astype(str), strict=True))
    return ReportOutput(index, len(res.runs), n_with, figures, unreadable)


def _usage_error(msg: str) -> int:
    """One ``reflab: error: ...`` line and exit code 2, as every reflab command reports bad input."""
    print(f"reflab: error: {msg}", file=sys.stderr)
    return 2


def _files(error: str) -> list[str]:
    """The table files named by an unreadable run's error (``"metrics.parquet: reason; ..."``)."""
    return re.findall(r"([^\s;:]+\.parquet):", error)


def main(args: argparse.Namespace) -> int:
    """``reflab report DIR``: 0 on success, 1 if no run had metrics, 2 on bad input."""
    dirs = [Path(d) for d in args.dir]
    for d in dirs:
        if not d.is_dir():
            return _usage_error(f"DIR {str(d)!r} is not a folder")
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    if len(dirs) > 1 and args.out is None:
        return _usage_error("a report of several folders (a comparison) needs --out DIR")
    if labels is not None and (len(labels) != len(dirs) or len(set(labels)) != len(labels) or len(dirs) == 1):
        return _usage_error(f"--labels must give one distinct label per DIR of a comparison ({len(dirs)} DIRs); "
                            f"got {args.labels!r}")
    pool = [k.strip() for k in args.pool.split(",") if k.strip()] if args.pool else []
    if any("." not in k and k not in ("device", "threads") for k in pool):
        return _usage_error(f"--pool takes dotted config keys such as train.lr; got {args.pool!r}")
    src = dirs[0] if len(dirs) == 1 else dirs
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("pdf", "png", "svg")]
    if bad or not formats:
        return _usage_error(f"--formats must be a comma-separated list of pdf, png, svg; got {args.formats!r}")
    if args.n_boot < 0 or args.max_conditions < 1:
        return _usage_error("--n-boot must be >= 0 and --max-conditions >= 1")
    if args.workers is not None and args.workers < 1:
        return _usage_error(f"--workers must be a positive integer; got {args.workers}")
    kinds = None if args.figures is None else parse_kinds(args.figures.split(","))
    if args.figures is not None and (kinds is None or not args.figures.strip()):
        return _usage_error(f"--figures must be a comma-separated list of {choices_text()}; got {args.figures!r}")
    try:
        result = write_report(src, args.out, formats, args.collapse_threshold, args.recovery_tol, args.n_boot,
                              args.seed, args.seed_lines, args.max_conditions, kinds, labels, pool, args.workers)
    except (FileNotFoundError, LoadError, KindsError) as e:
        return _usage_error(str(e))
    unreadable = ""
    if result.unreadable:
        names = ", ".join(f"{rid} ({', '.join(_files(err))})" for rid, err in result.unreadable.items())
        n = len(result.unreadable)
        unreadable = f"; {n} unreadable run{'s' * (n != 1)} left out: {names}"
    print(f"report: {result.index} ({result.n_with_metrics} of {result.n_runs} runs with results, "
          f"{len(result.figures)} figure files{unreadable})")
    if result.n_with_metrics == 0:
        print(f"reflab: error: no run in {' '.join(map(str, dirs))} has metrics; see {result.index}",
              file=sys.stderr)
        return 1
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``reflab report DIR``."""
    p.description = ("Load a run or sweep folder and write DIR/report/: index.md, summary.csv/.md, runs.csv, "
                     "poi.csv and figures (KL, entropy, recovery, heatmaps over beta x variant, final policy, "
                     "estimators, performance profile). Several DIRs: a comparison, their curves overlaid.")
    p.add_argument("dir", metavar="DIR", nargs="+",
                   help="a run folder (reflab run) or a sweep folder (reflab sweep); several: compare them")
    p.add_argument("--out", default=None, help="output folder (default: DIR/report; required with several DIRs)")
    p.add_argument("--labels", default=None, metavar="A,B,...",
                   help="labels of the DIRs of a comparison (default: their folder names)")
    p.add_argument("--pool", default=None, metavar="KEY,...",
                   help="config keys whose runs may be pooled as seeds of one condition (default: none: runs "
                        "that differ in any config value but the seed are never pooled)")
    p.add_argument("--formats", default="pdf,png", help="figure formats, comma-separated (default: pdf,png)")
    p.add_argument("--figures", default=None,
                   help=f"figure kinds to draw, comma-separated, of {','.join(FIGURE_CHOICES)}; all: every kind; "
                        "none: tables only (default: the kinds the sweep's grid names in report.figures, else all)")
    p.add_argument("--collapse-threshold", type=float, default=M.COLLAPSE_ENTROPY, metavar="NATS",
                   help=f"entropy below which a run counts as collapsed (default {M.COLLAPSE_ENTROPY:g})")
    p.add_argument("--recovery-tol", type=float, default=M.RECOVERY_TOL, metavar="NATS",
                   help=f"KL within which a run counts as returned to the reference (default {M.RECOVERY_TOL:g})")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates of every interval (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--seed-lines", action="store_true", help="also draw every seed as a thin line")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes drawing the figures (default: one per core; 1: one after another in this "
                        "process); the files are the same for any N")
    p.add_argument("--max-conditions", type=int, default=MAX_CONDITIONS,
                   help=f"curve figures for at most this many conditions (default {MAX_CONDITIONS})")
