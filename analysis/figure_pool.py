"""Figures drawn in worker processes: a report queues its figures and draws them all at once, one per core.

A report spends most of its time laying out and writing figures (matplotlib is single-threaded), so
:class:`FigureQueue` collects each figure as a job — the figure function, its arguments and the report entry
list it belongs to — and :meth:`FigureQueue.draw` runs the jobs in ``workers`` processes forked from this one
(they inherit the loaded tables and imported modules: nothing is pickled but the written paths). Every job
writes the same files whichever process draws it; the entries keep their queue order, so ``index.md`` is
the same as when the figures are drawn one after another in this process (``workers=1``, also what platforms
without ``fork`` get). A figure that raises is reported, never fatal; a worker process that dies has its
figures drawn again in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FigureFn = Callable[..., list[Path]]


@dataclass(frozen=True)
class FigureJob:
    """One figure to draw: ``fn(*args, **kwargs)`` writes its files and returns their paths."""

    fn: FigureFn
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    name: str
    """The figure's file name, named in its error if it cannot be drawn."""
    cost: float = 1.0
    """Its drawing time relative to the other jobs' (a guess): the pool starts the costliest first."""


@dataclass(frozen=True)
class FigureResult:
    """What became of a :class:`FigureJob`: the written ``paths``, or its one-line ``error``."""

    paths: list[Path] | None = None
    error: str | None = None


@dataclass(frozen=True)
class _Pending:
    """A queued figure's place in its entry list until it is drawn."""

    index: int
    sentence: str


def draw_one(job: FigureJob) -> FigureResult:
    """Draw ``job`` here; an exception becomes its error (``"name: Type: message"``)."""
    try:
        return FigureResult(paths=list(job.fn(*job.args, **job.kwargs)))
    except Exception as e:  # noqa: BLE001 - one broken figure must not lose the rest of the report
        return FigureResult(error=f"{job.name}: {type(e).__name__}: {e}")


_JOBS: list[FigureJob] = []
"""The jobs of the pool being run: forked workers read them from their copy of this process's memory."""


def _draw_index(i: int) -> FigureResult:
    return draw_one(_JOBS[i])


def _init_worker() -> None:
    """One thread per worker process (the workers are the parallelism; torch, if loaded, must not spawn more)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def available_cores() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    """Whether workers can be forked from this process (Linux; elsewhere figures are drawn in this process)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def draw_order(jobs: list[FigureJob]) -> list[int]:
    """The order the pool hands ``jobs`` to its processes: costliest first (ties in queue order), so the last
    jobs to start are short ones and no process waits long for the other to finish its last."""
    return sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)


def draw_all(jobs: list[FigureJob], workers: int | None = None) -> list[FigureResult]:
    """Draw ``jobs`` in ``workers`` forked processes (default: one per core; 1 = in this process; started in
    :func:`draw_order`), results in job order."""
    global _JOBS
    workers = min(available_cores() if workers is None else workers, len(jobs))
    if workers <= 1 or not can_fork():
        return [draw_one(job) for job in jobs]
    results: dict[int, FigureResult] = {}
    _JOBS = jobs
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(_draw_index, i): i for i in draw_order(jobs)}
            try:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
            except BrokenProcessPool:
                pass  # a worker died (e.g. out of memory): what it did not finish is drawn below
    finally:
        _JOBS = []
    return [results[i] if i in results else draw_one(job) for i, job in enumerate(jobs)]


class FigureQueue:
    """Figures to draw later, each holding a place in the entry list (``[(sentence, paths)]``) of its report
    section."""

    def __init__(self) -> None:
        self.jobs: list[FigureJob] = []
        self._lists: list[list] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, entries: list, sentence: str, name: str, fn: FigureFn, *args: Any, cost: float = 1.0,
            **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)``; once drawn, its ``(sentence, paths)`` takes this place in ``entries``
        (nothing if it fails: its error is returned by :meth:`draw`, naming ``name``). ``cost``: its relative
        drawing time (:attr:`FigureJob.cost`), not passed to ``fn``."""
        entries.append(_Pending(len(self.jobs), sentence))
        self.jobs.append(FigureJob(fn, args, kwargs, name, cost))
        if not any(e is entries for e in self._lists):
            self._lists.append(entries)

    def draw(self, workers: int | None = None) -> list[str]:
        """Draw every queued figure (:func:`draw_all`), fill the entry lists in queue order and return the
        errors of the figures that could not be drawn, in queue order."""
        results = draw_all(self.jobs, workers)
        for entries in self._lists:
            entries[:] = [(e.sentence, results[e.index].paths) if isinstance(e, _Pending) else e for e in entries
                          if not (isinstance(e, _Pending) and results[e.index].paths is None)]
        self.jobs, self._lists = [], []
        return [r.error for r in results if r.error is not None]
