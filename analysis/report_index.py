"""The ``index.md`` of a report: what was loaded, the problems, the summary table and its intervals, the
probability-of-improvement table and every figure with its sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from analysis import metrics as M
from analysis.improvement import poi_markdown
from analysis.loading import POOLED_KEYS, UNREADABLE, Results
from analysis.summary import interval_note, summary_markdown

FIGURE_KINDS = {"fig1": "Fig. 1: drift", "fig2": "Fig. 2: collapse", "fig3": "Fig. 3: recovery",
                "fig4": "Fig. 4: final measure over β × variant", "fig5": "Fig. 5: final policy",
                "fig6": "Fig. 6: estimators", "fig7": "Fig. 7: DPO vs PPO over β",
                "fig8": "Fig. 8: performance profile",
                "figG": "Gaussian policy vs the optimum", "figD1": "x_0 distribution", "figD2": "mode mix of x_0",
                "figO1": "Fig. O1: gold and proxy reward vs √KL", "figO2": "Fig. O2: β along the frontier"}


def index_markdown(res: Results, src: Path, out: Path, table: pd.DataFrame, by: list[str], rep: Any,
                    skipped: int, max_conditions: int, threshold: float, tol: float, n_boot: int,
                    seconds: float, poi: pd.DataFrame | None = None) -> str:
    runs = res.runs
    counts = runs["status"].astype(str).value_counts()
    kind = "run folder" if res.kind == "run" else f"sweep of {len(runs)} runs"
    status = ", ".join(f"{k} {v}" for k, v in counts.items())
    if len(res.sources) > 1:
        sources = ", ".join(f"`{lab}` = `{src_}`" for lab, src_ in zip(res.labels, res.sources, strict=True))
        lines = [f"# reflab report: comparison of {', '.join(res.labels)}", "",
                 f"Sources: {sources} ({len(runs)} runs; {status}); their curves are overlaid (markers tell the "
                 f"sweeps apart). Written by `reflab report` in {seconds:.0f} s.", ""]
    else:
        lines = [f"# reflab report: {src.resolve().name}", "",
                 f"Source: `{src}` ({kind}; {status}). Written by `reflab report` in {seconds:.0f} s.", ""]
    if [k for k in res.pooled if k not in POOLED_KEYS]:
        lines += [f"Pooled on request: runs differing in {', '.join(k for k in res.pooled if k not in POOLED_KEYS)} "
                  "count as seeds of one condition.", ""]
    varying = [k for k in res.conditions if k not in ("variant", "sweep") and k in runs and runs[k].nunique() > 1]
    parts = []
    if "variant" in runs:
        parts.append("variants: " + ", ".join(runs["variant"].cat.categories.astype(str)))
    for k in varying:
        u = sorted(runs[k].dropna().unique(), key=str) if runs[k].dtype == object else runs[k].dropna().unique()
        parts.append(f"`{k}` ∈ {{{', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in u)}}}")
    if by and not runs.empty and "variant" in runs:
        parts.append(f"seeds per condition: {int(runs.groupby(by, observed=True, dropna=False).size().max())}")
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
        if (problems["status"] == UNREADABLE).any():
            lines += ["*unreadable*: `status.json` says the run finished but a table cannot be read (a truncated or "
                      "overwritten file); the sweep's `reflab sweep` command, run again, trains them again (one whose "
                      "file looks whole: once its folder is removed).", ""]
    if table.empty and not rep.extra_markdown:
        lines += ["**No run has metrics: nothing to summarize.**", ""]
        return "\n".join(lines)
    lines += ["## Summary", "",
              f"Per variant{' × ' + ', '.join(b for b in by if b != 'variant') if len(by) > 1 else ''}: "
              f"interquartile mean over seeds [lo, hi]. {interval_note(table, n_boot)} Exact KLs within "
              f"{M.KL_ROUNDING_TOL:g} nats below 0 (float rounding) are read as 0. "
              "*collapsed* and *returned* are fractions of seeds. *final* = end of the "
              "reward phase (before any reward-off phase); *collapsed* = entropy below "
              f"{threshold:g} nats; *TV to π\\** = occupancy-weighted total variation to the KL-regularized "
              "optimum; *KL after reward off* = KL at the end of the reward-off phase; *half-life* = updates "
              f"until the KL halves after the switch; *returned* = KL after reward off ≤ {tol:g} nats.", "",
              summary_markdown(table, by),
              "Tables: [summary.csv](summary.csv), [summary.md](summary.md), per run: [runs.csv](runs.csv).", ""]
    if poi is not None and not poi.empty:
        conds = [c for c in by if c != "variant"]
        lines += ["## Probability of improvement over k1 in the reward", "",
                  "P(a run of the variant ends closer to the KL-regularized optimum than a run of k1 in the reward), "
                  "over all pairs of their seeds (Mann–Whitney; 0.5 = no difference, 1 = every run better) "
                  f"[95 % bootstrap over both variants' seeds, {n_boot} replicates] (seeds × seeds). "
                  "With few seeds the value moves in steps of 1/(pairs) and the interval is wide. "
                  "[poi.csv](poi.csv)", "", poi_markdown(poi, conds)]
    lines += rep.extra_markdown
    lines += ["## Figures", ""]
    if rep.kinds_note:
        lines += [rep.kinds_note, ""]
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
