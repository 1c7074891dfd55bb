"""reflab analysis: read run and sweep folders, measure drift, collapse and recovery, draw and report.

The data path goes one way: ``analysis`` reads the files ``reflab run`` / ``reflab sweep`` write and never
imports the trainer (``sim``); it uses ``envs`` only to rebuild gridworld layouts for drawing.

- :func:`load` (:mod:`analysis.loading`): a run or sweep folder → :class:`Results` with tidy ``runs``,
  ``metrics``, ``policy`` and ``trajectories`` frames (key columns such as ``variant`` and ``kl.beta`` in
  front of every table); ``load([A, B], labels=[...])`` compares folders (a ``sweep`` column and every key
  that differs across them); ``Results.curves(column)`` is a pre-aggregated curve frame for quick plots.
- :mod:`analysis.metrics`: per-run drift, estimator bias, collapse, recovery and distance to the optimum.
- :mod:`analysis.stats`: IQM and mean with stratified bootstrap intervals, probability of improvement and
  performance profiles (numpy, seeded).
- :mod:`analysis.figures`: the paper-style figures; :mod:`analysis.report`: ``reflab report DIR``.

Example::

    import analysis
    res = analysis.load("results/quickstart")
    per_run = analysis.metrics.run_summary(res.metrics)
    analysis.stats.aggregate(per_run, ["kl_final"], ["variant", "kl.beta"])
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["VARIANT_ORDER", "Results", "figures", "key_columns", "load", "metrics", "report", "stats",
           "variant_label"]

_FROM_LOADING = ("VARIANT_ORDER", "Results", "key_columns", "load", "variant_label")
"""Names taken from :mod:`analysis.loading` when first used."""


def __getattr__(name: str) -> Any:
    # everything on first use: pandas (loading, metrics, stats) and matplotlib (figures, report) are heavy, and
    # light modules such as analysis.figure_kinds are imported where neither is wanted (a sweep's grid check)
    if name in _FROM_LOADING:
        return getattr(importlib.import_module("analysis.loading"), name)
    if name in ("metrics", "stats", "figures", "report", "gridworld", "policy_figures", "export", "references",
                "improvement", "summary", "plotting", "loading", "overopt"):
        return importlib.import_module(f"analysis.{name}")
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
