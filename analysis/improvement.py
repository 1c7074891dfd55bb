"""Probability of improvement of each variant over a baseline variant, per condition (the report's PoI table).

P(X better than Y) is the Mann–Whitney statistic of :func:`analysis.stats.probability_of_improvement` over
all pairs of a condition's seeds of X and of Y: 1 = every run of X beats every run of Y, 0.5 = no
difference. With few seeds it moves in steps of 1/(n_X·n_Y) and its bootstrap interval is wide; the table
says how many pairs each value rests on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from analysis.stats import probability_of_improvement

#: The baseline of the PoI table: the placement that follows the true KL gradient (docs/theory.md).
POI_BASELINE = "k1 in reward"
#: Per-run scores the PoI table may use, in order of preference, and whether lower is better.
POI_SCORES: tuple[tuple[str, bool], ...] = (("tv_opt_final", True), ("kl_opt_final", True))


def poi_score(per_run: pd.DataFrame) -> tuple[str, bool] | None:
    """The first :data:`POI_SCORES` column with values in ``per_run``: ``(column, lower_is_better)``."""
    for col, lower in POI_SCORES:
        if col in per_run and per_run[col].notna().any():
            return col, lower
    return None


def poi_table(per_run: pd.DataFrame, conditions: Sequence[str], score: str, lower_is_better: bool = True,
              baseline: str = POI_BASELINE, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """P(variant better than ``baseline``) on ``score`` for every other variant, per condition.

    Args:
        per_run: one row per run (:func:`analysis.metrics.run_summary`): ``variant``, ``conditions``, ``score``.
        conditions: columns whose values define separate comparisons (e.g. ``kl.beta``, ``sweep``).
        lower_is_better: ``score`` is a distance (TV or KL to the optimum): better = lower.
    Returns:
        Columns ``conditions``…, ``variant``, ``n`` (the variant's seeds), ``n_baseline``, ``poi``, ``poi_lo``,
        ``poi_hi`` (95 % bootstrap over both variants' seeds); empty if the baseline is absent.
    """
    conds = [c for c in conditions if c in per_run and c != "variant"]
    rows = []
    sign = -1.0 if lower_is_better else 1.0
    for i, key, g, base in _with_baseline(per_run, conds, score, baseline):
        for j, v in enumerate(dict.fromkeys(g["variant"].astype(str))):
            if v == baseline:
                continue
            x = g.loc[g["variant"].astype(str) == v, score].to_numpy(float)
            est = probability_of_improvement(sign * x, sign * base, n_boot=n_boot, seed=seed + 1009 * i + j)
            rows.append({**dict(zip(conds, key, strict=True)), "variant": v, "n": x.size, "n_baseline": base.size,
                         "poi": est.point, "poi_lo": est.lo, "poi_hi": est.hi})
    cols = [*conds, "variant", "n", "n_baseline", "poi", "poi_lo", "poi_hi"]
    return pd.DataFrame(rows, columns=cols)


def _with_baseline(per_run: pd.DataFrame, conds: list[str], score: str,
                   baseline: str) -> Iterator[tuple[int, tuple, pd.DataFrame, np.ndarray]]:
    """``(group number, condition values, rows, the baseline's scores)`` of each condition (group of ``conds``)
    of the runs with a ``score`` in which ``baseline`` has one."""
    frame = per_run[per_run[score].notna()]
    groups = frame.groupby(conds, observed=True, sort=True) if conds else [((), frame)]
    for i, (key, g) in enumerate(groups):
        base = g.loc[g["variant"].astype(str) == baseline, score].to_numpy(float)
        if base.size:
            yield i, key if isinstance(key, tuple) else (key,), g, base


def has_poi(per_run: pd.DataFrame, conditions: Sequence[str], score: str, baseline: str = POI_BASELINE) -> bool:
    """Whether :func:`poi_table` of these arguments has a row (a condition holds ``baseline`` and another
    variant), without its bootstrap."""
    conds = [c for c in conditions if c in per_run and c != "variant"]
    return any((g["variant"].astype(str) != baseline).any() for _, _, g, _ in
               _with_baseline(per_run, conds, score, baseline))


def poi_markdown(table: pd.DataFrame, conditions: Sequence[str]) -> str:
    """The PoI table as Markdown: one row per variant, one column per condition: ``poi [lo, hi]``."""
    conds = [c for c in conditions if c in table and c != "variant"]
    if table.empty:
        return ""
    if conds:
        keys = list(dict.fromkeys(tuple(r) for r in table[conds].itertuples(index=False)))
    else:
        keys = [()]
    heads = [", ".join(f"{'β' if c == 'kl.beta' else c} = {v:g}" if isinstance(v, float) else
                       f"{'β' if c == 'kl.beta' else c} = {v}" for c, v in zip(conds, k, strict=True)) or "all runs"
             for k in keys]
    lines = ["| variant | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    first: dict[tuple, dict] = {}  # (variant, *condition values) -> the first such row (a missing value matches none)
    for r in table.to_dict("records"):
        key = (r["variant"], *(r[c] for c in conds))
        if not any(pd.isna(x) for x in key):
            first.setdefault(key, r)
    for v in dict.fromkeys(table["variant"]):
        cells = []
        for k in keys:
            r0 = first.get((v, *k))
            if r0 is None or not np.isfinite(r0["poi"]):
                cells.append("–")
            else:
                cells.append(f"{r0['poi']:.2f} [{r0['poi_lo']:.2f}, {r0['poi_hi']:.2f}] "
                             f"({int(r0['n'])}×{int(r0['n_baseline'])})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
