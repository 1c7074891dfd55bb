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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import figures as F
from analysis import metrics as M
from analysis import overopt, plotting
from analysis import policy_figures as P
from analysis.loading import Results, load
from analysis.stats import aggregate

#: Per-run measures in the summary table: (column of run_summary, header, statistic).
SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("kl_final", "KL final", "iqm"),
    ("entropy_final", "entropy final", "iqm"),
    ("tv_opt_final", "TV to π*", "iqm"),
    ("kl_opt_final", "KL to π*", "iqm"),
    ("return_final", "return", "iqm"),
    ("collapsed", "collapsed", "mean"),
    ("kl_end", "KL after reward off", "iqm"),
    ("half_life", "half-life (updates)", "iqm"),
    ("returned", "returned", "mean"),
)
MAX_CONDITIONS = 8
#: Figure kinds a report can draw (``--figures``).
FIGURE_CHOICES = ("kl", "entropy", "recovery", "heatmap", "policy", "estimators", "dpo", "continuous", "overopt")
#: Figure file prefixes and their titles in index.md.
FIGURE_KINDS = {"fig1": "Fig. 1: drift", "fig2": "Fig. 2: collapse", "fig3": "Fig. 3: recovery",
                "fig4": "Fig. 4: final measure over β × variant", "fig5": "Fig. 5: final policy",
                "fig6": "Fig. 6: estimators", "fig7": "Fig. 7: DPO vs PPO over β",
                "figG": "Gaussian policy vs the optimum", "figD1": "x_0 distribution", "figD2": "mode mix of x_0",
                "figO1": "Fig. O1: gold and proxy reward vs √KL", "figO2": "Fig. O2: β along the frontier"}
#: Diffusion chain: estimator figures leave out batches whose sampling policy's KL exceeds this (nats).
DIFFUSION_ESTIMATOR_MAX_KL = 50.0


def _slug(condition: dict[str, Any]) -> str:
    parts = []
    for k, v in condition.items():
        name = {"kl.beta": "beta", "env.id": "env"}.get(k, k.replace(".", "-"))
        value = f"{v:g}" if isinstance(v, float) else str(v)
        parts.append(f"{name}-{value}".replace("/", "-").replace(" ", ""))
    return "_".join(parts)


def _fmt(x: float) -> str:
    if pd.isna(x):
        return "–"
    ax = abs(x)
    if ax < 1e-8:  # float noise of an exact 0 (e.g. a KL of -1e-9)
        return "0"
    if ax != 0 and (ax < 1e-2 or ax >= 1e4):
        return f"{x:.1e}"
    return f"{x:.3g}" if ax < 10 else f"{x:.1f}"


def summary_table(per_run: pd.DataFrame, by: Sequence[str], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per group ``by``: ``n`` and, for each :data:`SUMMARY_COLUMNS` measure present, its statistic over seeds
    with ``_lo``/``_hi`` 95 % stratified-bootstrap bounds (columns absent from every run are left out)."""
    frame = per_run.copy()
    cols = []
    for col, _, stat in SUMMARY_COLUMNS:
        if col in frame and frame[col].notna().any():
            frame[col] = frame[col].astype(float)
            cols.append((col, stat))
    parts = []
    for stat in ("iqm", "mean"):
        values = [c for c, s in cols if s == stat]
        if values:
            parts.append(aggregate(frame, values, by, stat=stat, n_boot=n_boot, seed=seed).set_index(list(by)))
    if not parts:
        return frame.groupby(list(by), observed=True).size().rename("n").reset_index()
    out = parts[0]
    for p in parts[1:]:
        out = out.join(p.drop(columns="n"))
    order = ["n"] + [c for col, _ in cols for c in (col, f"{col}_lo", f"{col}_hi")]
    return out[[c for c in order if c in out]].reset_index()


def summary_markdown(table: pd.DataFrame, by: Sequence[str]) -> str:
    """The summary table as Markdown: ``point [lo, hi]`` per measure."""
    heads = {col: head for col, head, _ in SUMMARY_COLUMNS}
    measures = [c for c in heads if c in table]
    header = [{"kl.beta": "β", "env.id": "env"}.get(b, b) for b in by] + ["n"] + [heads[c] for c in measures]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [f"{row[b]:g}" if isinstance(row[b], float) else str(row[b]) for b in by] + [str(int(row["n"]))]
        for c in measures:
            point, lo, hi = row[c], row.get(f"{c}_lo"), row.get(f"{c}_hi")
            if pd.isna(point):
                cells.append("–")
            elif int(row["n"]) > 1 and not pd.isna(lo):
                cells.append(f"{_fmt(point)} [{_fmt(lo)}, {_fmt(hi)}]")
            else:
                cells.append(_fmt(point))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _reward_end_policy(policy: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Each run's last policy snapshot at or before the end of its reward phase."""
    return M.at_update(M.reward_phase(policy, M.switch_updates(metrics)))


class _Report:
    """Collects figure entries and writes them; one instance per report."""

    def __init__(self, res: Results, out: Path, formats: Sequence[str], seeds: bool, collapse_threshold: float,
                 n_boot: int, seed: int, kinds: Sequence[str] = FIGURE_CHOICES):
        self.res, self.out, self.formats, self.kinds = res, out, tuple(formats), set(kinds)
        self.seeds, self.threshold, self.n_boot, self.seed = seeds, collapse_threshold, n_boot, seed
        self.sections: list[tuple[str, list[tuple[str, list[Path]]]]] = []
        self.errors: list[str] = []
        self.extra_markdown: list[str] = []

    def _figure(self, entries: list[tuple[str, list[Path]]], sentence: str, fn: Any, *args: Any, **kw: Any) -> None:
        """Draw one figure; a figure that cannot be drawn is reported in index.md, not raised."""
        kind = {F.plot_kl: "kl", F.plot_entropy: "entropy", F.plot_recovery: "recovery", F.plot_heatmap: "heatmap",
                P.plot_final_policy: "policy", F.plot_estimators: "estimators", F.plot_dpo_beta: "dpo",
                P.plot_gaussian_trajectory: "continuous", P.plot_mode_mix: "continuous",
                P.plot_x0_distribution: "continuous"}[fn]
        if kind not in self.kinds:
            return
        try:
            paths = fn(*args, formats=self.formats, **kw)
        except Exception as e:  # noqa: BLE001 - one broken figure must not lose the rest of the report
            self.errors.append(f"{Path(args[1]).name}: {type(e).__name__}: {e}")
            return
        entries.append((sentence, paths))

    def curves(self, condition: dict[str, Any], m: pd.DataFrame) -> None:
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
        what = ("Sequence KL(P_θ‖P_ref) of the denoising chain (closed form per step, averaged over the policy's "
                "own chains; log scale)" if diffusion else "Exact KL(π‖π_ref) to the reference")
        self._figure(entries, f"{what} vs update for each placement × estimator ({seeds_txt}).{off}", F.plot_kl, m,
                     self.out / f"fig1_kl{tag}", seeds=self.seeds, log=diffusion, title=label or None,
                     n_boot=self.n_boot, seed=self.seed)
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
                         f"after update {u0} (dashed line): curves that fall return to the reference (values below "
                         "1e-6 nats are drawn on the axis floor).",
                         F.plot_recovery, m, self.out / f"fig3_recovery{tag}", seeds=self.seeds,
                         title=label or None, n_boot=self.n_boot, seed=self.seed)
        ids = set(m["run_id"].astype(str))
        policy = self.res.policy
        policy = policy[policy["run_id"].astype(str).isin(ids)]
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
        traj = self.res.trajectories
        traj = traj[traj["run_id"].astype(str).isin(ids)] if not traj.empty else traj
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
        self.sections.append((label or "all runs", entries))

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
        if not diffusion:
            return
        self._figure(entries, f"Fraction of x_0 in the rewarded mixture component vs update ({seeds_txt}), against "
                     "the KL-optimal tilt of the current phase (black dashed; the reference once the reward is off) "
                     f"and the reference chain (grey dotted).{off}", P.plot_mode_mix, m,
                     self.out / f"figD2_modes{tag}", title=label or None, n_boot=self.n_boot, seed=self.seed)
        ids = set(m["run_id"].astype(str))
        samples, density = self.res.samples, self.res.density
        if samples.empty:
            return
        samples = samples[samples["run_id"].astype(str).isin(ids)]
        density = density[density["run_id"].astype(str).isin(ids)] if not density.empty else density
        end = None if switch.empty else int(switch.min())
        after = " and after the reward-off phase (black outline)" if end is not None else ""
        self._figure(entries, f"x_0 distribution (dimension 0, samples pooled over seeds) at the end of the reward "
                     f"phase (filled){after}, against the data distribution p_data (grey) and its KL-optimal "
                     "tilt p_data·e^{r/β} (dashed).", P.plot_x0_distribution, samples, density,
                     self.out / f"figD1_x0{tag}", reward_end=end, title=label or None)

    def dpo_beta(self, condition: dict[str, Any], per_run: pd.DataFrame, x: str) -> None:
        """Fig. 7: DPO/IPO against the PPO variants of this condition across β."""
        slug = _slug(condition)
        label = plotting.condition_label(condition)
        ids = set(per_run["run_id"].astype(str))
        policy = self.res.policy
        policy = policy[policy["run_id"].astype(str).isin(ids)] if not policy.empty else policy
        if not policy.empty:
            metrics = self.res.metrics
            policy = _reward_end_policy(policy, metrics[metrics["run_id"].astype(str).isin(ids)])
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


def write_report(path: str | Path, out: str | Path | None = None, formats: Sequence[str] = plotting.FORMATS,
                 collapse_threshold: float = M.COLLAPSE_ENTROPY, recovery_tol: float = M.RECOVERY_TOL,
                 n_boot: int = 2000, seed: int = 0, seeds: bool = False,
                 max_conditions: int = MAX_CONDITIONS, figures: Sequence[str] = FIGURE_CHOICES) -> ReportOutput:
    """Write the report of the run or sweep folder ``path`` (see the module docstring).

    Args:
        path: a run folder or a sweep folder.
        out: output folder (default ``path/report``).
        formats: figure formats (``pdf``, ``png``, ``svg``); ``index.md`` shows the PNGs when written.
        collapse_threshold: entropy (nats) below which a run counts as collapsed.
        recovery_tol: KL (nats) within which a run counts as returned after the reward is removed.
        n_boot, seed: bootstrap replicates and seed of every interval in the report.
        seeds: also draw each seed as a thin line in the curve figures.
        max_conditions: draw curve figures for at most this many conditions (the table covers all).
        figures: the figure kinds to draw (a subset of :data:`FIGURE_CHOICES`; empty: tables only).
    """
    t0 = time.perf_counter()
    res = load(path)
    out = Path(out) if out is not None else Path(path) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rep = _Report(res, out, formats, seeds, collapse_threshold, n_boot, seed, figures)
    metrics = res.metrics
    # best-of-n trains nothing: its runs are in the over-optimization section only (analysis.overopt_report)
    frontier = overopt.has_frontier(metrics)
    everything, metrics = metrics, metrics[metrics["variant"].astype(str) != overopt.BON] if frontier else metrics
    by: list[str] = []
    table = pd.DataFrame()
    if not metrics.empty:
        per_run = M.run_summary(metrics, collapse_threshold, recovery_tol)
        per_run.to_csv(out / "runs.csv", index=False)
        conds = plotting.condition_columns(per_run)
        by = ["variant"] + conds
        table = summary_table(per_run, by, n_boot, seed)
        table.to_csv(out / "summary.csv", index=False)
        (out / "summary.md").write_text(summary_markdown(table, by))
        groups = list(plotting.split_conditions(metrics))
        for condition, m in groups[:max_conditions]:
            rep.curves(condition, m)
        skipped = len(groups) - min(len(groups), max_conditions)
        x = "kl.beta"
        rest = [c for c in conds if c != x]
        frames = [({}, per_run)] if not rest else [
            (dict(zip(rest, k if isinstance(k, tuple) else (k,), strict=True)), g)
            for k, g in per_run.groupby(rest, observed=True)]
        for condition, g in frames:
            if g["variant"].nunique() * (g[x].nunique() if x in g else 1) >= 2:
                rep.heatmaps(condition, g, x)
            if g["variant"].astype(str).isin(plotting.PREFERENCE_VARIANTS).any() and x in g and g[x].nunique() >= 2:
                rep.dpo_beta(condition, g, x)
    else:
        skipped = 0
    if frontier:
        from analysis.overopt_report import write_overopt  # matplotlib figures, like the rest of this module

        section = write_overopt(everything, out, formats, n_boot, seed, figures="overopt" in rep.kinds)
        rep.extra_markdown, rep.errors = section.markdown, rep.errors + section.errors
        if section.figures:
            rep.sections.append(("Reward over-optimization", section.figures))
    index = out / "index.md"
    index.write_text(_index_markdown(res, Path(path), out, table, by, rep, skipped, max_conditions,
                                     collapse_threshold, recovery_tol, n_boot, time.perf_counter() - t0))
    n_with = int(everything["run_id"].nunique()) if not everything.empty else 0
    figures = [p for _, entries in rep.sections for _, paths in entries for p in paths]
    return ReportOutput(index, len(res.runs), n_with, figures)


def _index_markdown(res: Results, src: Path, out: Path, table: pd.DataFrame, by: list[str], rep: _Report,
                    skipped: int, max_conditions: int, threshold: float, tol: float, n_boot: int,
                    seconds: float) -> str:
    runs = res.runs
    counts = runs["status"].astype(str).value_counts()
    kind = "run folder" if res.kind == "run" else f"sweep of {len(runs)} runs"
    status = ", ".join(f"{k} {v}" for k, v in counts.items())
    lines = [f"# reflab report: {src.resolve().name}", "",
             f"Source: `{src}` ({kind}; {status}). Written by `reflab report` in {seconds:.0f} s.", ""]
    varying = [k for k in plotting.condition_columns(runs)]
    parts = []
    if "variant" in runs:
        parts.append("variants: " + ", ".join(runs["variant"].cat.categories.astype(str)))
    for k in varying:
        u = sorted(runs[k].dropna().unique(), key=str) if runs[k].dtype == object else runs[k].dropna().unique()
        parts.append(f"`{k}` ∈ {{{', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in u)}}}")
    if by and not runs.empty and "variant" in runs:
        parts.append(f"seeds per condition: {int(runs.groupby(by, observed=True).size().max())}")
    if parts:
        lines += ["; ".join(parts) + ".", ""]
    problems = res.problems
    if not problems.empty:
        lines += ["## Runs without results", "",
                  f"{len(problems)} of {len(runs)} runs have no complete results and are left out of the table "
                  "and the figures:", "", "| run | status | error |", "|---|---|---|"]
        for _, p in problems.iterrows():
            err = str(p["error"]).replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(f"| {p['run_id']} | {p['status']} | {err} |")
        lines.append("")
    if table.empty and not rep.extra_markdown:
        lines += ["**No run has metrics: nothing to summarize.**", ""]
        return "\n".join(lines)
    lines += ["## Summary", "",
              f"Per variant{' × ' + ', '.join(b for b in by if b != 'variant') if len(by) > 1 else ''}: "
              "interquartile mean over seeds [95 % stratified-bootstrap interval, "
              f"{n_boot} replicates]; *collapsed* and *returned* are fractions of seeds. *final* = end of the "
              "reward phase (before any reward-off phase); *collapsed* = entropy below "
              f"{threshold:g} nats; *TV to π\\** = occupancy-weighted total variation to the KL-regularized "
              "optimum; *KL after reward off* = KL at the end of the reward-off phase; *half-life* = updates "
              f"until the KL halves after the switch; *returned* = KL after reward off ≤ {tol:g} nats.", "",
              summary_markdown(table, by),
              "Tables: [summary.csv](summary.csv), [summary.md](summary.md), per run: [runs.csv](runs.csv).", ""]
    lines += rep.extra_markdown
    lines += ["## Figures", ""]
    for title, entries in rep.sections:
        lines += [f"### {title}", ""]
        for sentence, paths in entries:
            kind = FIGURE_KINDS.get(paths[0].name.split("_")[0], "") if paths else ""
            png = [p for p in paths if p.suffix == ".png"]
            links = " · ".join(f"[{p.suffix[1:].upper()}]({p.relative_to(out).as_posix()})" for p in paths)
            lines += [f"**{kind}.** {sentence} {links}", ""]
            if png:
                lines += [f"![{kind}]({png[0].relative_to(out).as_posix()})", ""]
    if skipped:
        lines += [f"Curve figures were drawn for the first {max_conditions} conditions only ({skipped} more in the "
                  "table; use `--max-conditions`).", ""]
    if rep.errors:
        lines += ["## Figures that could not be drawn", ""] + [f"- {e}" for e in rep.errors] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _usage_error(msg: str) -> int:
    """One ``reflab: error: ...`` line and exit code 2, as every reflab command reports bad input."""
    print(f"reflab: error: {msg}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    """``reflab report DIR``: 0 on success, 1 if no run had metrics, 2 on bad input."""
    src = Path(args.dir)
    if not src.is_dir():
        return _usage_error(f"DIR {str(args.dir)!r} is not a folder")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("pdf", "png", "svg")]
    if bad or not formats:
        return _usage_error(f"--formats must be a comma-separated list of pdf, png, svg; got {args.formats!r}")
    if args.n_boot < 0 or args.max_conditions < 1:
        return _usage_error("--n-boot must be >= 0 and --max-conditions >= 1")
    kinds = [k.strip() for k in args.figures.split(",") if k.strip() and k.strip() != "none"]
    if any(k not in FIGURE_CHOICES for k in kinds):
        return _usage_error(f"--figures must be a comma-separated list of {', '.join(FIGURE_CHOICES)} (or none); "
                            f"got {args.figures!r}")
    try:
        result = write_report(src, args.out, formats, args.collapse_threshold, args.recovery_tol, args.n_boot,
                              args.seed, args.seed_lines, args.max_conditions, kinds)
    except FileNotFoundError as e:
        return _usage_error(str(e))
    print(f"report: {result.index} ({result.n_with_metrics} of {result.n_runs} runs with results, "
          f"{len(result.figures)} figure files)")
    if result.n_with_metrics == 0:
        print(f"reflab: error: no run in {src} has metrics; see {result.index}", file=sys.stderr)
        return 1
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``reflab report DIR``."""
    p.description = ("Load a run or sweep folder and write DIR/report/: index.md, summary.csv/.md, runs.csv and "
                     "figures (KL, entropy, recovery, heatmaps over beta x variant, final policy, estimators).")
    p.add_argument("dir", metavar="DIR", help="a run folder (reflab run) or a sweep folder (reflab sweep)")
    p.add_argument("--out", default=None, help="output folder (default: DIR/report)")
    p.add_argument("--formats", default="pdf,png", help="figure formats, comma-separated (default: pdf,png)")
    p.add_argument("--figures", default=",".join(FIGURE_CHOICES),
                   help=f"figure kinds to draw, comma-separated (default: all of {','.join(FIGURE_CHOICES)}; "
                        "none: tables only)")
    p.add_argument("--collapse-threshold", type=float, default=M.COLLAPSE_ENTROPY, metavar="NATS",
                   help=f"entropy below which a run counts as collapsed (default {M.COLLAPSE_ENTROPY:g})")
    p.add_argument("--recovery-tol", type=float, default=M.RECOVERY_TOL, metavar="NATS",
                   help=f"KL within which a run counts as returned to the reference (default {M.RECOVERY_TOL:g})")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates of every interval (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--seed-lines", action="store_true", help="also draw every seed as a thin line")
    p.add_argument("--max-conditions", type=int, default=MAX_CONDITIONS,
                   help=f"curve figures for at most this many conditions (default {MAX_CONDITIONS})")
