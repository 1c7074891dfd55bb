"""What a batch of runs produces: one :class:`RunOutput` per run (metrics, policy and trajectory tables, status),
built from the batch's logs when accessed (:class:`RunOutputs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sim.config import Config

TRAJECTORY_COLUMNS = ("update", "episode", "t", "state", "action", "reward", "logp", "ref_logp")
"""Columns of ``trajectories.parquet``: one row per sampled step of a logged episode."""


@dataclass
class RunOutput:
    """What one run produced: the tables of the output contract and its final status."""

    config: Config
    metrics: pd.DataFrame
    policy: pd.DataFrame
    trajectories: pd.DataFrame
    status: dict = field(default_factory=dict)
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    """Further tables of this kind of run (e.g. ``preferences``), written as ``<name>.parquet``."""

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table of the run by file stem: metrics, policy, trajectories and the extras."""
        return {"metrics": self.metrics, "policy": self.policy, "trajectories": self.trajectories, **self.extra}


class RunOutputs(Sequence[RunOutput]):
    """The outputs of a trained batch, one :class:`RunOutput` per config, built when accessed.

    A run's tables are made from the batch's logs on access and not kept, so writing the runs of a batch one
    after the other holds one run's tables in memory at a time (10 000 runs' DataFrames at once would not).
    """

    def __init__(self, n_runs: int, build: Callable[[int], RunOutput]):
        self._n, self._build = n_runs, build

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> RunOutput: ...

    @overload
    def __getitem__(self, i: slice) -> list[RunOutput]: ...

    def __getitem__(self, i: int | slice) -> RunOutput | list[RunOutput]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._build(i % len(self))


def snapshot(tensors: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """CPU numpy *copies* of ``tensors`` for the logs: a view could alias a live parameter (updated in place
    by the optimizer) or keep a whole batch buffer alive behind a small slice."""
    return {k: v.detach().to("cpu", copy=True).numpy() for k, v in tensors.items()}


def metric_columns(records: list[dict[str, Tensor]]) -> dict[str, np.ndarray]:
    """Per-update metric records (``{name: [R]}``, CPU) stacked into columns ``{name: [R, n_records]}``: the
    update and schedule columns first, NaN where a record lacks a metric."""
    lead = ["update", "phase", "reward_scale", "env_steps", "beta"]
    keys = list(dict.fromkeys(lead + [k for rec in records for k in rec]))
    n_runs = next(iter(records[0].values())).shape[0]
    nan = torch.full((n_runs,), float("nan"), dtype=torch.float64)
    return {k: torch.stack([rec.get(k, nan) for rec in records], dim=1).numpy() for k in keys}


class MetricFrames:
    """Each run's metrics table from the stacked columns ``{name: [R, n_records]}`` (:func:`metric_columns`):
    the same table as ``pd.DataFrame({name: column[run][keep]})`` without ``_alive`` and without the columns of
    ``drop_if_nan`` that are NaN for the run throughout, cut from one frame per block of :attr:`BLOCK` runs.

    A block's frame is copied once into one array per dtype; a run's rows are then copied out of it in a few
    passes instead of one per column (several times faster), into arrays of its own.
    """

    BLOCK = 256

    def __init__(self, cols: dict[str, np.ndarray], drop_if_nan: tuple[str, ...] = ()):
        self.cols = cols
        self.names = [k for k in cols if k != "_alive"]
        self.drop_if_nan = tuple(k for k in drop_if_nan if k in cols)
        self.n = next(iter(cols.values())).shape[1]
        self._block, self._frame = -1, pd.DataFrame()

    def frame(self, run: int, keep: np.ndarray) -> pd.DataFrame:
        """Run ``run``'s table: its records where ``keep [n_records]`` (bool) holds."""
        b = run // self.BLOCK
        if b != self._block:
            lo = b * self.BLOCK
            block = pd.DataFrame({k: self.cols[k][lo:lo + self.BLOCK].reshape(-1) for k in self.names}, copy=False)
            self._block, self._frame = b, block.copy()  # a deep copy: one array per dtype
        first = (run - b * self.BLOCK) * self.n
        rows = slice(first, first + self.n) if bool(keep.all()) else first + np.flatnonzero(keep)
        out = self._frame.iloc[rows].copy()
        out.index = pd.RangeIndex(len(out))
        drop = [k for k in self.drop_if_nan if bool(np.isnan(self.cols[k][run]).all())]
        return out.drop(columns=drop) if drop else out


def stack_trajectories(records: list[dict]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Logged trajectory records (``{column: [R, episodes, steps]}`` plus ``valid`` and ``update``) stacked once:
    ``{column: [R, n_records, episodes, steps]}`` and the records' updates."""
    if not records:
        return {}, np.zeros(0, dtype=np.int64)
    keys = ("valid", *TRAJECTORY_COLUMNS[3:])
    return ({k: np.stack([rec[k] for rec in records], axis=1) for k in keys},
            np.array([rec["update"] for rec in records], dtype=np.int64))


def trajectory_frame(run: int, stacked: dict[str, np.ndarray], updates: np.ndarray, diverged_at: int
                     ) -> pd.DataFrame:
    """Run ``run``'s ``trajectories.parquet`` from :func:`stack_trajectories`' arrays, cut after the update it
    diverged at (``diverged_at``; −1: none)."""
    cols = TRAJECTORY_COLUMNS
    if not stacked:
        return pd.DataFrame({k: np.zeros(0, dtype=np.int64 if k in cols[:5] else np.float64) for k in cols})
    valid = stacked["valid"][run].copy()  # [n_records, episodes, steps]
    if diverged_at >= 0:
        valid[updates > diverged_at] = False
    rec, ep, t = np.nonzero(valid)
    frame = {"update": updates[rec], "episode": ep.astype(np.int64), "t": t.astype(np.int64)}
    for k in cols[3:]:
        frame[k] = stacked[k][run][rec, ep, t]
    return pd.DataFrame(frame, copy=False)  # fresh arrays (fancy indexing copies)
