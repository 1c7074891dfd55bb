"""Figures drawn in worker processes: a report queues its figures and draws them all at once, one per core.

A report spends most of its time laying out and writing figures (matplotlib is single-threaded), so
:class:`FigureQueue` collects each figure as a job — the figure function, its arguments and the report entry
list it belongs to — and :meth:`FigureQueue.draw` runs the jobs in ``workers`` processes forked from this one
(they inherit the loaded tables and imported modules: nothing is pickled but the written paths, and the jobs
queued after the processes started). Its two halves,
:meth:`FigureQueue.start` and :meth:`FigureQueue.finish`, leave this process free in between: a report starts
the processes as soon as its runs are loaded (``more=True``: they are forked with the first figure and draw each
figure as it is queued, those queued later handed over pickled), goes on queueing, writes its tables while the
processes draw, then waits. Every job
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


class Drawing:
    """Figure jobs being drawn: :meth:`start` forks the drawing processes (default: one per core; 1 = none) and
    hands them every job in :func:`draw_order`, then returns, so this process can do other work meanwhile;
    :meth:`finish` waits for the results (in job order), drawing here whatever no process drew: every job when
    there are no processes, the unfinished jobs of a process that died."""

    def __init__(self, jobs: list[FigureJob]) -> None:
        self.jobs = list(jobs)
        self.more = False
        """Whether jobs may be added while drawing (:meth:`start`'s ``more``)."""
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Any, int] = {}

    def start(self, workers: int | None = None, more: bool = False) -> Drawing:
        """Start drawing in ``workers`` forked processes (none: everything is drawn by :meth:`finish`).

        ``more``: jobs will be added (:meth:`add`) while the processes draw, so as many are started as there are
        ``workers`` whatever the number of jobs so far; they are forked when the first job is handed out."""
        global _JOBS
        self.more = more
        workers = available_cores() if workers is None else workers
        if not more:
            workers = min(workers, len(self.jobs))
        if workers <= 1 or not can_fork():
            return self
        _JOBS = self.jobs  # the processes are forked by the first submit: they read the jobs from their copy
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                         initializer=_init_worker)
        try:
            self._futures = {self._pool.submit(_draw_index, i): i for i in draw_order(self.jobs)}
        except BaseException:
            self.cancel()
            raise
        return self

    def add(self, job: FigureJob) -> None:
        """Append ``job`` while the processes draw: it is handed to them after the jobs already given (pickled, as
        it is not in the memory they were forked with); without processes it is drawn by :meth:`finish`."""
        self.jobs.append(job)
        if self._pool is not None:
            try:
                self._futures[self._pool.submit(draw_one, job)] = len(self.jobs) - 1
            except BaseException:
                self.cancel()
                raise

    def finish(self) -> list[FigureResult]:
        """Every job's result, in job order (see the class docstring)."""
        results: dict[int, FigureResult] = {}
        if self._pool is not None:
            try:
                for fut in as_completed(self._futures):
                    error = fut.exception()
                    if isinstance(error, BrokenProcessPool):
                        break  # a worker died (e.g. out of memory): what it did not finish is drawn below
                    if error is None:  # else a job that could not be handed over (not picklable): drawn below
                        results[self._futures[fut]] = fut.result()
            finally:
                self.cancel()
        return [results[i] if i in results else draw_one(job) for i, job in enumerate(self.jobs)]

    def cancel(self) -> None:
        """Stop the drawing processes (jobs not yet started are dropped); :meth:`finish` calls it."""
        global _JOBS
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        _JOBS = []


def draw_all(jobs: list[FigureJob], workers: int | None = None) -> list[FigureResult]:
    """Draw ``jobs`` in ``workers`` forked processes (default: one per core; 1 = in this process; started in
    :func:`draw_order`), results in job order."""
    return Drawing(jobs).start(workers).finish()


class FigureQueue:
    """Figures to draw later, each holding a place in the entry list (``[(sentence, paths)]``) of its report
    section."""

    def __init__(self) -> None:
        self.jobs: list[FigureJob] = []
        self._lists: list[list] = []
        self._drawing: Drawing | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, entries: list, sentence: str, name: str, fn: FigureFn, *args: Any, cost: float = 1.0,
            **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)``; once drawn, its ``(sentence, paths)`` takes this place in ``entries``
        (nothing if it fails: its error is returned by :meth:`draw` or :meth:`finish`, naming ``name``).
        ``cost``: its relative drawing time (:attr:`FigureJob.cost`), not passed to ``fn``. After
        :meth:`start` (``more=True``) the figure is handed to the drawing processes at once."""
        if self._drawing is not None and not self._drawing.more:
            raise RuntimeError("a figure cannot be queued while the queue is being drawn (start it with more=True)")
        entries.append(_Pending(len(self.jobs), sentence))
        job = FigureJob(fn, args, kwargs, name, cost)
        self.jobs.append(job)
        if self._drawing is not None:
            self._drawing.add(job)
        if not any(e is entries for e in self._lists):
            self._lists.append(entries)

    def draw(self, workers: int | None = None) -> list[str]:
        """Draw every queued figure (:func:`draw_all`), fill the entry lists in queue order and return the
        errors of the figures that could not be drawn, in queue order."""
        self.start(workers)
        return self.finish()

    def start(self, workers: int | None = None, more: bool = False) -> None:
        """Start drawing every queued figure in ``workers`` processes (:meth:`Drawing.start`) and return at once:
        this process is free for other work (e.g. the report's tables) until :meth:`finish`. ``more``: figures
        queued in between are drawn too, handed out as they come (otherwise none may be queued)."""
        if self._drawing is not None:
            raise RuntimeError("the figures are already being drawn")
        self._drawing = Drawing(self.jobs).start(workers, more)

    def finish(self) -> list[str]:
        """Wait for the figures started by :meth:`start` (or draw them here if it was not called), fill the
        entry lists in queue order and return the errors of the figures that could not be drawn, in queue
        order."""
        drawing, self._drawing = self._drawing or Drawing(self.jobs), None
        results = drawing.finish()
        for entries in self._lists:
            entries[:] = [(e.sentence, results[e.index].paths) if isinstance(e, _Pending) else e for e in entries
                          if not (isinstance(e, _Pending) and results[e.index].paths is None)]
        self.jobs, self._lists = [], []
        return [r.error for r in results if r.error is not None]

    def cancel(self) -> None:
        """Stop drawing (after an error in this process between :meth:`start` and :meth:`finish`)."""
        if self._drawing is not None:
            self._drawing.cancel()
            self._drawing = None
