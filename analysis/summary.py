"""The report's summary table: per variant × condition, each per-run measure's IQM (fractions: mean) over
seeds with an interval that says what it is (a bootstrap interval, or the range of the seeds when they are too
few), as CSV columns and as Markdown."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

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
#: Groups with fewer seeds than this get the range of the seeds [min, max] as their interval instead of a
#: bootstrap one: a percentile bootstrap of n ≤ 4 values has at most 35 distinct resamples (10 for n = 3) and no
#: 95 % coverage (for n ≤ 3 its 2.5 % and 97.5 % quantiles are, almost surely, the min and the max anyway).
MIN_BOOTSTRAP_N = 5


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
    """Per group ``by``: ``n``, ``interval`` (``bootstrap95`` or ``range``) and, for each :data:`SUMMARY_COLUMNS`
    measure present, its statistic over seeds with ``_lo``/``_hi`` bounds: a 95 % percentile bootstrap over the
    group's seeds (one stratum) when ``n`` ≥ :data:`MIN_BOOTSTRAP_N`, else the range [min, max] of the seeds.
    Columns absent from every run are left out."""
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
            # groups too small for a bootstrap get the range of their seeds below
            parts.append(aggregate(frame, values, by, stat=stat, n_boot=n_boot, seed=seed,
                                   min_boot_n=MIN_BOOTSTRAP_N).set_index(list(by)))
    if not parts:
        return frame.groupby(list(by), observed=True).size().rename("n").reset_index()
    out = parts[0]
    for p in parts[1:]:
        out = out.join(p.drop(columns="n"))
    small = out["n"] < MIN_BOOTSTRAP_N
    if small.any():  # too few seeds for a bootstrap interval: the range of the seeds, said as such
        lo = frame.groupby(list(by), observed=True)[[c for c, _ in cols]].min()
        hi = frame.groupby(list(by), observed=True)[[c for c, _ in cols]].max()
        for col, _ in cols:
            out.loc[small, f"{col}_lo"] = lo.loc[out.index[small], col].to_numpy()
            out.loc[small, f"{col}_hi"] = hi.loc[out.index[small], col].to_numpy()
    out["interval"] = ["range" if s else "bootstrap95" for s in small]
    order = ["n", "interval"] + [c for col, _ in cols for c in (col, f"{col}_lo", f"{col}_hi")]
    return out[[c for c in order if c in out]].reset_index()


def interval_note(table: pd.DataFrame, n_boot: int) -> str:
    """What the summary's ``[lo, hi]`` are, for the seed counts in ``table`` (one sentence or two)."""
    ns = sorted(set(int(n) for n in table["n"])) if "n" in table else []
    if not ns:
        return ""
    n_txt = f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"
    parts = [f"Each row is over its n seeds ({n_txt} here); the IQM is the mean of the middle 50 % of them "
             "(floor(n/4) cut from each end, so for n < 4 it is their plain mean)."]
    if ns[-1] >= MIN_BOOTSTRAP_N:
        parts.append(f"With n ≥ {MIN_BOOTSTRAP_N}, [lo, hi] is a 95 % percentile bootstrap interval ({n_boot} "
                     "replicates; the seeds of a row are resampled as one stratum).")
    if ns[0] < MIN_BOOTSTRAP_N:
        parts.append(f"With n < {MIN_BOOTSTRAP_N}, (lo – hi) is the range of the seeds (min – max), not a "
                     "confidence interval: so few values have too few distinct bootstrap resamples (10 for n = 3) "
                     "for a 95 % interval to mean anything.")
    return " ".join(parts)


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
            elif int(row["n"]) > 1 and not pd.isna(lo) and row.get("interval") == "range":
                cells.append(f"{_fmt(point)} ({_fmt(lo)} – {_fmt(hi)})")
            elif int(row["n"]) > 1 and not pd.isna(lo):
                cells.append(f"{_fmt(point)} [{_fmt(lo)}, {_fmt(hi)}]")
            else:
                cells.append(_fmt(point))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
