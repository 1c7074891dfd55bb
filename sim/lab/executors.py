"""Where a sweep's tasks run: local worker processes, Ray tasks, or Slurm job arrays (submitit).

A *task* is one batch of runs that share a :func:`sim.config.batch_signature`; :func:`run_task` trains it
with :func:`sim.lab.dispatch.train_batch` and writes every run's folder itself through :mod:`sim.lab.runs`
(a shared filesystem is assumed for Ray clusters and Slurm). A batch that raises is retried run by run,
so one bad run never loses the others; each failure is recorded in its run's ``status.json``.

Every executor yields one :class:`TaskOutcome` per task as tasks complete. An executor-level failure (a
worker process killed, a Ray task lost, a Slurm job cancelled) is reported as an outcome with ``error``
set; the sweep records it and goes on. Ray and submitit are optional extras, imported only when chosen.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.config import Config
from sim.lab import runs

EXECUTORS = ("local", "ray", "slurm")
#: Seconds between completion checks of submitit jobs (Slurm's accounting is queried at most this often).
SLURM_POLL_S = {"local": 0.2, "slurm": 5.0}


class ExecutorError(RuntimeError):
    """An executor cannot be used as asked (package missing, no cluster): one line for the user."""


@dataclass(frozen=True)
class Task:
    """One batch of runs trained together as one tensor program.

    ``run_dirs[i]`` is the absolute folder of the run configured by ``configs[i]``; all configs share a
    batch signature.
    """

    index: int
    run_ids: tuple[str, ...]
    run_dirs: tuple[str, ...]
    configs: tuple[Config, ...]
    keys: tuple[dict, ...] = ()
    """Per run: its index columns (``seed``, ``kl.beta``, the swept keys …), written into its tables."""

    def __len__(self) -> int:
        return len(self.run_ids)


@dataclass(frozen=True)
class RunResult:
    """The final state of one run after a task: ``status`` is done | diverged | failed."""

    run_id: str
    status: str
    error: str | None = None


@dataclass(frozen=True)
class TaskOutcome:
    """What became of a task: per-run ``results``, or the executor-level ``error`` when it never reported."""

    task: Task
    results: tuple[RunResult, ...] = ()
    error: str | None = None


# ------------------------------------------------------------------------------------------------------
# The worker side
# ------------------------------------------------------------------------------------------------------


def describe_exception(e: BaseException) -> str:
    """One line: ``Type: message (at file:line in function)`` of the innermost frame."""
    msg = " ".join(str(e).split()) or "(no message)"
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name})" if tb else ""
    return f"{type(e).__name__}: {msg}{where}"


def _clear_run_dir(run_dir: Path) -> None:
    """Remove an unfinished run folder so the run starts from scratch (a finished one is never passed)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)


def _train_and_write(run_dirs: list[Path], configs: list[Config], run_ids: list[str],
                     keys: list[dict] | None = None) -> list[RunResult]:
    """Train ``configs`` as one batch and write their folders (``keys``: each run's index columns, written
    into its tables with its ``run_id``); raises if training raises."""
    from sim.lab.dispatch import resolve_device, train_batch  # the trainers (torch): in the worker only

    device = resolve_device(configs[0].device)

    def start(i: int) -> None:
        _clear_run_dir(run_dirs[i])
        runs.start_run(run_dirs[i], configs[i], device, extra={"sweep": {"run_id": run_ids[i]}})

    _each(start, len(run_dirs))
    outputs = train_batch(configs, device=device)

    def finish(i: int) -> RunResult:
        run_dir, output, run_id = run_dirs[i], outputs[i], run_ids[i]
        try:
            cells = {"run_id": run_id, **(keys[i] if keys else {"seed": output.config.seed})}
            runs.finish_run(run_dir, output.tables(), output.status, cells)
            return RunResult(run_id, output.status["status"], output.status.get("error"))
        except Exception as e:  # e.g. disk full: this run failed, the others may still be written
            return record_failure(run_dir, run_id, f"writing results: {describe_exception(e)}")

    return _each(finish, len(run_dirs))


#: Threads writing a task's run folders: Parquet encoding and file writes release the GIL, so the runs' folders
#: are written side by side.
WRITE_THREADS = 8


def _each(fn: Any, n: int) -> list:
    """``[fn(0), …, fn(n - 1)]``, run in up to :data:`WRITE_THREADS` threads; the first exception is raised."""
    if n <= 1:
        return [fn(i) for i in range(n)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(WRITE_THREADS, n)) as pool:
        return list(pool.map(fn, range(n)))


def record_failure(run_dir: Path, run_id: str, error: str) -> RunResult:
    """Mark the run ``failed`` with ``error`` (best effort) and return its result."""
    try:
        runs.fail_run(run_dir, error)
    except OSError:
        pass  # the folder is unwritable: the run stays unfinished and is retried on resume
    return RunResult(run_id, "failed", error)


def run_task(task: Task) -> tuple[RunResult, ...]:
    """Train ``task``'s runs that are not finished yet and write their folders; return every run's result.

    Runs already ``done``/``diverged`` on disk (e.g. by an earlier attempt) are skipped. If the batch
    raises, each run is retried alone so that only the runs that raise by themselves are marked failed.
    Sets torch's intra-op threads to the config's ``threads`` (1 when unset) so parallel workers do not
    oversubscribe the cores.
    """
    import torch

    torch.set_num_threads(task.configs[0].threads or 1)
    done: dict[str, RunResult] = {}
    todo: list[tuple[str, Path, Config]] = []
    key_of = dict(zip(task.run_ids, task.keys, strict=True)) if task.keys else {}
    for run_id, run_dir, cfg in zip(task.run_ids, task.run_dirs, task.configs, strict=True):
        if runs.is_finished(Path(run_dir)):  # a status of done over unreadable tables is trained again
            status = runs.read_status(Path(run_dir))
            done[run_id] = RunResult(run_id, status["status"], status.get("error"))
        else:
            todo.append((run_id, Path(run_dir), cfg))
    if todo:
        ids, dirs, cfgs = (list(x) for x in zip(*todo, strict=True))
        try:
            done.update((r.run_id, r) for r in _train_and_write(dirs, cfgs, ids, _keys(key_of, ids)))
        except Exception as batch_error:
            if len(todo) == 1:
                done[ids[0]] = record_failure(dirs[0], ids[0], describe_exception(batch_error))
            else:
                for run_id, run_dir, cfg in todo:
                    try:
                        (res,) = _train_and_write([run_dir], [cfg], [run_id], _keys(key_of, [run_id]))
                    except Exception as e:
                        res = record_failure(run_dir, run_id, describe_exception(e))
                    done[run_id] = res
    return tuple(done[run_id] for run_id in task.run_ids)


def _keys(key_of: dict[str, dict], ids: list[str]) -> list[dict] | None:
    return [key_of[i] for i in ids] if key_of else None


def _init_local_worker() -> None:
    """Initializer of local worker processes: one torch thread, and die with the sweep process."""
    import torch

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        # A SIGKILLed sweep must not leave workers writing run folders behind the next sweep's back.
        import ctypes

        pr_set_pdeathsig = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass


# ------------------------------------------------------------------------------------------------------
# Executors
# ------------------------------------------------------------------------------------------------------


def default_workers() -> int:
    """The number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def fork_available() -> bool:
    """Whether this platform forks processes (Linux; macOS's fork is unsafe with system libraries)."""
    import multiprocessing

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def can_fork_workers(tasks: Sequence[Task]) -> bool:
    """Whether local workers for ``tasks`` may be forked from this process instead of spawned.

    A forked worker starts at once with this process's imports (torch, the trainers), where a spawned one
    imports them again (a second or two). It is safe on Linux when this process runs no other Python thread
    (one holding a lock would leave it held in the copy) and every task trains on the CPU with one torch
    thread: torch's OpenMP pool, if this process started one, is not usable in a fork, and a worker that
    keeps to one thread never enters it (CUDA cannot be used in a fork at all). Otherwise workers are spawned.
    """
    import threading

    if not fork_available() or threading.active_count() != 1:
        return False
    from sim.lab.dispatch import resolve_device

    devices = {cfg.device for task in tasks for cfg in task.configs}
    one_thread = all((cfg.threads or 1) == 1 for task in tasks for cfg in task.configs)
    return one_thread and all(resolve_device(d).type == "cpu" for d in devices)


class Executor:
    """Runs tasks somewhere and yields their outcomes as they complete. Use as a context manager."""

    name: str = ""

    def __init__(self, workers: int):
        self.workers = workers
        """How many tasks run at once (the sweep makes at least this many tasks when it can)."""

    @property
    def runs_here(self) -> bool:
        """Whether the tasks train on this machine (so its devices, e.g. CUDA, are the ones they get)."""
        return True

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def check(self) -> None:
        """Raise :class:`ExecutorError` if this executor cannot run here (called before anything is written)."""

    def start(self) -> None:
        """Acquire resources (processes, a Ray instance); called before :meth:`run`."""

    def close(self) -> None:
        """Release what :meth:`start` acquired; cancels what is still queued."""

    def prepare(self, tasks: Sequence[Task]) -> None:
        """Make ready to run ``tasks`` (e.g. start worker processes); called before :meth:`run`."""

    def memory_per_task(self) -> int | None:
        """Bytes a task may use if the executor knows (e.g. Slurm ``--mem``); ``None`` = this machine's share."""
        return None

    def run(self, tasks: Iterable[Task]) -> Iterator[TaskOutcome]:
        """Run ``tasks``; yield one :class:`TaskOutcome` per task, in completion order."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """``workers`` spawned processes on this machine (one torch thread each), at most ``workers`` tasks in flight;
    one worker: the tasks train one after another in this process (no process to start, no torch to import).

    ``auto``: the number of workers was not asked for (one per core), so a sweep too small to gain from worker
    processes may run here instead (:func:`sim.lab.sweep.run_sweep`)."""

    name = "local"

    def __init__(self, workers: int, auto: bool = False):
        super().__init__(workers)
        self.auto = auto
        self._pool: ProcessPoolExecutor | None = None

    def train_here(self) -> None:
        """Train the tasks in this process, one after another (a sweep too small to gain from worker processes)."""
        self.workers = 1

    def _new_pool(self, fork: bool = False) -> ProcessPoolExecutor:
        import multiprocessing

        context = multiprocessing.get_context("fork" if fork else "spawn")
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=_init_local_worker)

    def start(self) -> None:
        pass  # the pool is made when the first task runs there (training here needs none)

    def prepare(self, tasks: Sequence[Task]) -> None:
        """Start the worker processes (forked when :func:`can_fork_workers` allows: no start-up, no imports),
        before the caller starts a thread of its own (a progress display), which a fork must not copy."""
        if self.workers > 1 and self._pool is None:
            self._pool = self._new_pool(can_fork_workers(tasks))
            self._pool.submit(os.getpid)  # a forked pool starts all its workers at its first task

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def run(self, tasks: Iterable[Task]) -> Iterator[TaskOutcome]:
        queue = list(tasks)[::-1]
        if self.workers == 1:  # one at a time: here, without a worker process to start (and torch to import)
            while queue:
                task = queue.pop()
                try:
                    yield TaskOutcome(task, results=run_task(task))
                except Exception as e:
                    yield TaskOutcome(task, error=describe_exception(e))
            return
        if self._pool is None:
            self._pool = self._new_pool()
        in_flight: dict[Future, Task] = {}
        while queue or in_flight:
            # Submitting only `workers` tasks at a time keeps a pool crash's damage to the tasks running.
            while queue and len(in_flight) < self.workers:
                task = queue.pop()
                in_flight[self._pool.submit(run_task, task)] = task
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                task = in_flight.pop(fut)
                try:
                    yield TaskOutcome(task, results=fut.result())
                except BrokenProcessPool as e:
                    broken = True
                    yield TaskOutcome(task, error=f"worker process died ({describe_exception(e)})")
                except Exception as e:
                    yield TaskOutcome(task, error=describe_exception(e))
            if broken:
                for task in in_flight.values():
                    yield TaskOutcome(task, error="worker process died while this task ran (BrokenProcessPool)")
                in_flight.clear()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()


class RayExecutor(Executor):
    """Ray tasks (one CPU each): a local Ray instance with ``workers`` CPUs, or the cluster at ``address``."""

    name = "ray"

    def __init__(self, workers: int | None, address: str | None = None):
        super().__init__(workers or 0)
        self.address = address
        self._started = False

    @property
    def runs_here(self) -> bool:
        return self.address is None  # a new local Ray instance; a cluster's nodes may have other devices

    def check(self) -> None:
        if importlib.util.find_spec("ray") is None:
            raise ExecutorError("--executor ray needs the ray package: pip install 'reflab[ray]'")

    def start(self) -> None:
        self.check()
        import ray

        if ray.is_initialized():
            pass
        elif self.address:
            ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            self._started = True
        else:
            self.workers = self.workers or default_workers()
            ray.init(num_cpus=self.workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            self._started = True
        if not self.workers:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def run(self, tasks: Iterable[Task]) -> Iterator[TaskOutcome]:
        import ray

        remote = ray.remote(num_cpus=1, max_retries=0)(run_task)
        pending = {remote.remote(task): task for task in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        yield TaskOutcome(task, results=ray.get(ref))
                    except Exception as e:  # RayTaskError, WorkerCrashedError, ...: the task is lost
                        yield TaskOutcome(task, error=describe_exception(e))
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def parse_slurm_time(text: str) -> int:
    """Minutes from ``MIN``, ``HH:MM:SS``, ``MM:SS`` or ``D-HH:MM:SS`` (Slurm's ``--time`` formats)."""
    try:
        days = 0
        if "-" in text:
            d, text = text.split("-", 1)
            days = int(d)
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
        elif len(parts) == 2:
            minutes = parts[0] + (parts[1] > 0)
        elif len(parts) == 3:
            minutes = parts[0] * 60 + parts[1] + (parts[2] > 0)
        else:
            raise ValueError(text)
    except ValueError:
        raise ExecutorError(f"--slurm-time must be MINUTES, HH:MM:SS or D-HH:MM:SS; got {text!r}") from None
    minutes += days * 24 * 60
    if minutes < 1:
        raise ExecutorError(f"--slurm-time must be at least one minute; got {text!r}")
    return minutes


class SlurmExecutor(Executor):
    """Slurm job arrays through submitit (``folder`` holds its logs and pickles).

    ``local=True`` uses submitit's LocalExecutor (subprocesses on this machine, at most ``workers`` at once)
    to test the same path without a cluster. On Slurm the tasks are submitted as one array with
    ``--array`` parallelism ``workers``; ``partition``, ``time_min``, ``cpus`` and ``mem_gb`` go to sbatch.
    """

    name = "slurm"

    def __init__(self, workers: int, folder: Path, local: bool = False, partition: str | None = None,
                 time_min: int = 60, cpus: int = 1, mem_gb: float | None = None):
        super().__init__(workers)
        self.name = "slurm-local" if local else "slurm"
        self.folder, self.local = folder, local
        self.partition, self.time_min, self.cpus, self.mem_gb = partition, time_min, cpus, mem_gb
        self._executor: Any = None
        self._jobs: list[Any] = []

    @property
    def runs_here(self) -> bool:
        return self.local

    def check(self) -> None:
        if importlib.util.find_spec("submitit") is None:
            raise ExecutorError("--executor slurm needs the submitit package: pip install 'reflab[slurm]'")
        if not self.local and shutil.which("sbatch") is None:
            raise ExecutorError("--executor slurm needs sbatch on PATH (use --slurm-local to run the jobs here)")

    def start(self) -> None:
        self.check()
        import submitit

        ex = submitit.AutoExecutor(folder=self.folder, cluster="local" if self.local else "slurm")
        params: dict[str, Any] = {"timeout_min": self.time_min, "cpus_per_task": self.cpus, "name": "reflab-sweep"}
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        if not self.local:
            params["slurm_array_parallelism"] = self.workers
            if self.partition:
                params["slurm_partition"] = self.partition
        ex.update_parameters(**params)
        self._executor = ex

    def memory_per_task(self) -> int | None:
        return int(self.mem_gb * 2**30) if self.mem_gb else None

    def close(self) -> None:
        for job in self._jobs:
            if not job.done():
                job.cancel(check=False)
        self._jobs = []

    def run(self, tasks: Iterable[Task]) -> Iterator[TaskOutcome]:
        queue = list(tasks)[::-1]
        in_flight: dict[Any, Task] = {}
        if not self.local:  # one array; Slurm enforces the parallelism
            with self._executor.batch():
                subs = [(self._executor.submit(run_task, t), t) for t in queue[::-1]]
            in_flight = dict(subs)
            self._jobs = list(in_flight)
            queue = []
        poll = SLURM_POLL_S["local" if self.local else "slurm"]
        while queue or in_flight:
            while queue and len(in_flight) < self.workers:
                task = queue.pop()
                job = self._executor.submit(run_task, task)
                self._jobs.append(job)
                in_flight[job] = task
            finished = [job for job in in_flight if job.done()]
            if not finished:
                time.sleep(poll)
                continue
            for job in finished:
                task = in_flight.pop(job)
                try:
                    yield TaskOutcome(task, results=tuple(job.result()))
                except Exception as e:  # FailedJobError / UncompletedJobError: the job died or timed out
                    yield TaskOutcome(task, error=f"job {job.job_id}: {describe_exception(e)}")


def make_executor(name: str, workers: int | None, sweep_dir: Path, *, address: str | None = None,
                  slurm_local: bool = False, slurm_partition: str | None = None, slurm_time: str = "60",
                  slurm_cpus: int = 1, slurm_mem_gb: float | None = None) -> Executor:
    """The executor called ``name`` (``local`` | ``ray`` | ``slurm``); ``workers=None`` picks a default.

    Defaults: ``local`` and a new local Ray instance use every core; Ray at ``address`` uses the cluster's
    CPUs; Slurm allows 16 array tasks at once.
    """
    if workers is not None and workers < 1:
        raise ExecutorError(f"--workers must be >= 1; got {workers}")
    if name == "local":
        return LocalExecutor(workers or default_workers(), auto=workers is None)
    if name == "ray":
        return RayExecutor(workers, address)
    if name == "slurm":
        return SlurmExecutor(workers or 16, sweep_dir / "slurm", local=slurm_local, partition=slurm_partition,
                             time_min=parse_slurm_time(slurm_time), cpus=slurm_cpus, mem_gb=slurm_mem_gb)
    raise ExecutorError(f"--executor must be one of {', '.join(EXECUTORS)}; got {name!r}")
