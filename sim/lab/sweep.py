"""Sweeps: a grid's runs packed into batched tasks, trained by an executor into one folder, resumable.

``reflab sweep GRID.yaml|PRESET --out DIR`` expands the grid (:mod:`sim.lab.grid`), then ``DIR`` holds
``sweep.json`` (the grid as given and resolved), ``index.parquet`` (one row per run: ``run_id``, ``status``,
``seed``, ``env.id``, ``kl.placement``, ``kl.estimator``, ``kl.beta`` and every swept key) and
``runs/<run_id>/`` (the files of ``reflab run``).

Runs that share a :func:`sim.config.batch_signature` are packed into tasks (one
:func:`sim.lab.dispatch.train_batch` call each; size automatic and memory-aware, or ``batch_size``) and run by an
executor from :mod:`sim.lab.executors` (``--executor local|ray|slurm``); workers write the run folders.

Resume: the same command again trains only the runs whose ``status.json`` is not ``done``/``diverged`` or
whose tables are missing or not whole (``unreadable``: :func:`sim.lab.runs.unreadable_tables`), each from
scratch; a sweep SIGKILLed anywhere, even before its ``sweep.json`` is in place, resumes. An exclusive ``flock``
on ``DIR/.lock`` keeps two sweeps off one folder. Before anything is written, the grid's size is bounded
(``--max-runs``, ``--max-yaml-values``) and every run's device is checked (:func:`check_devices`).
``reflab status DIR`` counts a sweep's runs by status (or shows one run folder's status).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sim import yamlsafe
from sim.config import Config, ConfigError, UsageError, batch_signature
from sim.lab import runs
from sim.lab.executors import (
    EXECUTORS,
    Executor,
    ExecutorError,
    RunResult,
    Task,
    TaskOutcome,
    make_executor,
    record_failure,
)
from sim.lab.grid import (
    MAX_RUNS,
    PlannedRun,
    SweepPlan,
    apply_sets,
    load_grid,
    parse_batch_size,
    plan_sweep,
    run_sampled_steps,
    sampled_steps,
    size_hint,
)
from sim.lab.lock import LOCK_FILE, lock_holder, sweep_lock
from sim.lab.progress import progress, use_bar
from sim.lab.startup import startup_frozen

if TYPE_CHECKING:  # imported where used, so `reflab sweep --help` and grid errors start without them
    import pandas as pd

SWEEP_FILE = "sweep.json"
INDEX_FILE = "index.parquet"
RUNS_DIR = "runs"
#: Auto batch size: at most this many runs per task (keeps tasks short enough to resume and to show progress).
AUTO_MAX_RUNS = 512
#: Auto batch size: the tasks running at once may use this fraction of the available memory.
MEMORY_FRACTION = 0.5
#: Seconds between refreshes of index.parquet while runs finish (it is always written at the end).
INDEX_REFRESH_S = 1.0
#: A local sweep (default workers) whose runs fit one task and sample fewer steps than this in all (runs ×
#: updates × batch × horizon; the quickstart: 7.4 M) trains in this process: a worker process costs a second or
#: two to start (it imports torch), about what such a sweep trains in, and cutting one batch into a task per
#: worker repeats each update's fixed cost in every task.
IN_PROCESS_STEPS = 10_000_000


# ------------------------------------------------------------------------------------------------------
# Packing runs into tasks
# ------------------------------------------------------------------------------------------------------


def estimate_run_bytes(cfg: Config) -> int:
    """A generous estimate of the memory one run adds to a batch, in bytes.

    Grows with the sampled steps per update (``train.batch`` × horizon), the policy table (states ×
    actions), MLP activations and the logs kept until the run is written; calibrated on the gridworld
    (tabular: ~5 MB per run at batch 256 × horizon 30).
    """
    tr, log = cfg.train, cfg.log
    n_states, n_actions, horizon, n_outcomes = size_hint(cfg.env)
    steps = tr.batch * horizon
    table = n_states * n_actions
    floats = 96 * steps + 64 * table
    if tr.policy == "mlp":
        floats += 4 * steps * tr.hidden + 4 * n_states * tr.hidden
    if tr.mode == "exact":
        floats += 16 * table * n_outcomes * horizon
    n_logs = tr.total_updates // log.every + 2
    n_policy_logs = tr.total_updates // log.policy_every + 2
    floats += 64 * n_logs + 4 * table * n_policy_logs + 8 * n_logs * log.trajectories * horizon
    return 8 * floats


def available_memory() -> int:
    """Bytes of memory available to new work on this machine (``MemAvailable``; 4 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def auto_batch_size(n_runs: int, workers: int, run_bytes: int, task_budget: int) -> int:
    """Max runs per task: fits ``task_budget`` bytes, gives every worker a task when ``n_runs`` allows.

    Bigger batches train faster per run (one tensor program), so this is the largest size that keeps
    ≥ ``workers`` tasks, fits the memory budget and stays under :data:`AUTO_MAX_RUNS`.
    """
    by_memory = max(1, task_budget // max(1, run_bytes))
    by_workers = max(1, math.ceil(n_runs / max(1, workers)))
    return int(min(by_memory, by_workers, AUTO_MAX_RUNS))


def _split_even(items: list, max_size: int) -> list[list]:
    """``items`` in consecutive chunks of at most ``max_size`` whose sizes differ by at most one."""
    n_chunks = math.ceil(len(items) / max_size)
    size, extra = divmod(len(items), n_chunks)
    out, start = [], 0
    for i in range(n_chunks):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


#: The fixed costs of an update (the async preset's 160 bandit runs train in 2.1x the CPU time of 53, not 3x) and
#: of a run's folder (~7 ms of writes) in a task's estimated cost (:func:`_task_cost`), in sampled steps.
UPDATE_COST_STEPS, RUN_COST_STEPS = 12_000, 30_000


def _task_cost(n_runs: int, run_steps: int, updates: int) -> float:
    """A task's estimated cost: the steps its runs sample (``run_steps`` each), a fixed cost per update and run."""
    return n_runs * (run_steps + RUN_COST_STEPS) + UPDATE_COST_STEPS * updates


def pack_tasks(planned: Sequence[PlannedRun], sweep_dir: Path, workers: int, batch_size: int | None = None,
               task_budget: int | None = None) -> list[Task]:
    """Group ``runs`` by batch signature and cut each group into tasks, listed the most costly first.

    ``batch_size`` caps the runs per task; ``None`` = :func:`auto_batch_size` with ``task_budget`` bytes per
    task (default: :data:`MEMORY_FRACTION` of the available memory shared by ``workers``). The tasks are listed
    by decreasing estimated cost (:func:`_task_cost`), the order workers take them in: a long task started
    last would leave the other workers idle at the end.
    """
    from sim.lab import dispatch

    groups: dict[str, list[PlannedRun]] = {}
    for run in planned:
        groups.setdefault(batch_signature(run.config), []).append(run)
    if task_budget is None:
        task_budget = int(available_memory() * MEMORY_FRACTION / max(1, workers))
    chunks: list[tuple[float, list[PlannedRun]]] = []
    for group in groups.values():
        cfg = group[0].config
        size = batch_size or auto_batch_size(len(planned), workers, estimate_run_bytes(cfg), task_budget)
        if not (cls := dispatch.trainer_class(cfg)).batches_runs:
            size = 1  # trained one run at a time (e.g. SB3): one task each, so workers run them in parallel
        updates = cfg.train.total_updates if cls.sampled_updates else 0  # best-of-n: none
        chunks += [(_task_cost(len(c), updates and run_sampled_steps(cfg), updates), c)
                   for c in _split_even(group, size)]
    chunks.sort(key=lambda c: -c[0])  # stable: equal costs keep the grid's order
    return [Task(index=i, run_ids=tuple(r.run_id for r in chunk),
                 run_dirs=tuple(str(sweep_dir / RUNS_DIR / r.run_id) for r in chunk),
                 configs=tuple(r.config for r in chunk), keys=tuple(r.columns for r in chunk))
            for i, (_, chunk) in enumerate(chunks)]


# ------------------------------------------------------------------------------------------------------
# The sweep folder: lock, sweep.json, index.parquet
# ------------------------------------------------------------------------------------------------------


def _json_cell(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list | tuple) else value


def _column(values: list[Any]) -> list[Any]:
    """Values of one index column, made Parquet-friendly (mixed types become strings)."""
    values = [_json_cell(v) for v in values]
    kinds = {type(v) for v in values if v is not None}
    if len(kinds) <= 1 or kinds <= {int, float}:
        return values
    return [None if v is None else str(v) for v in values]


def index_frame(plan: SweepPlan, statuses: dict[str, str]) -> pd.DataFrame:
    """The index table: one row per run, columns ``run_id``, ``status``, ``seed``, always-columns, swept keys."""
    import pandas as pd

    cols: dict[str, list[Any]] = {"run_id": [r.run_id for r in plan.runs],
                                  "status": [statuses.get(r.run_id, "pending") for r in plan.runs]}
    for key in plan.runs[0].columns:
        cols[key] = _column([r.columns[key] for r in plan.runs])
    return pd.DataFrame(cols)


def write_index(sweep_dir: Path, plan: SweepPlan, statuses: dict[str, str]) -> None:
    """Write ``index.parquet`` atomically."""
    runs.atomic_write_parquet(sweep_dir / INDEX_FILE, index_frame(plan, statuses))


def disk_status(run_dir: Path) -> str:
    """done | diverged | failed | running | pending from the run's ``status.json``, or ``unreadable`` when it says
    finished but a table is missing or unreadable (:func:`sim.lab.runs.run_state`; such a run is trained again)."""
    return runs.run_state(run_dir)


def check_devices(plan: SweepPlan, executor: Executor) -> None:
    """One-line :class:`ConfigError` naming a run whose ``device`` this machine lacks (``device=cuda`` without
    CUDA), checked before anything is written when ``executor`` trains here (:attr:`Executor.runs_here`)."""
    if not executor.runs_here:
        return
    from sim.lab import dispatch

    checked: set[str] = set()
    for run in plan.runs:
        if run.config.device in checked:
            continue
        try:
            dispatch.resolve_device(run.config.device)
        except ConfigError as e:
            n = sum(r.config.device == run.config.device for r in plan.runs)
            raise ConfigError(f"{plan.label}: {n} of {len(plan.runs)} runs (e.g. {run.run_id}) have {e}") from None
        checked.add(run.config.device)


def _check_sweep_dir(out: Path, plan: SweepPlan) -> None:
    """Refuse a folder that is not empty and holds no sweep, or holds a sweep of other runs."""
    if not out.is_dir():
        return
    manifest = out / SWEEP_FILE
    if not manifest.is_file():
        # A sweep killed before its sweep.json was in place leaves its lock and temporary files: resumable.
        if [p for p in out.iterdir() if not _is_sweep_leftover(p.name)]:
            raise UsageError(f"--out {str(out)!r} is not empty and holds no sweep ({SWEEP_FILE}); use a new folder")
        return
    try:
        old = json.loads(manifest.read_text())
        old_ids = set(old["run_ids"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--out {str(out)!r} has an unreadable {SWEEP_FILE} ({e}); use a new folder") from e
    new_ids = {r.run_id for r in plan.runs}
    if old_ids != new_ids:
        raise UsageError(f"--out {str(out)!r} holds another sweep ({len(old_ids)} runs, {len(new_ids - old_ids)} of "
                         f"this grid's {len(new_ids)} not among them); use a new folder for a different grid")


def _is_sweep_leftover(name: str) -> bool:
    """Whether ``name`` in a sweep folder is what a killed sweep may leave before its ``sweep.json``: the lock,
    or a temporary file of an atomic write of ``sweep.json`` or ``index.parquet``."""
    return name == LOCK_FILE or (name.endswith(".tmp") and name.startswith((f".{SWEEP_FILE}.", f".{INDEX_FILE}.")))


def _remove_stale_temp_files(sweep_dir: Path) -> None:
    """Delete temporary files of atomic writes interrupted by a kill (``.NAME.*.tmp``)."""
    for tmp in sweep_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------
# Running a sweep
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepSummary:
    """Counts after a sweep: ``counts`` by status over all runs, and what this invocation did."""

    counts: dict[str, int]
    skipped: int
    trained: int
    n_tasks: int
    wall_time_s: float
    errors: dict[str, str]


def _count(statuses: dict[str, str]) -> dict[str, int]:
    counts = {k: 0 for k in ("done", "diverged", "failed", "running", "pending")}
    for s in statuses.values():
        counts[s] = counts.get(s, 0) + 1
    return counts


def run_sweep(plan: SweepPlan, out: Path, executor: Executor, progress_mode: str = "auto",
              batch_size: int | str | None = None) -> SweepSummary:
    """Train every unfinished run of ``plan`` into ``out`` with ``executor``; return the final counts.

    Takes ``out``'s lock, writes ``sweep.json`` and ``index.parquet`` before any training, then packs the
    unfinished runs into tasks and refreshes the index as tasks complete. ``batch_size``: max runs per task,
    ``"auto"`` (memory-aware), or ``None`` for the grid's ``batch_size``. A task that fails as a whole marks
    its unfinished runs ``failed`` and the sweep goes on.
    """
    out = out.resolve()  # workers elsewhere (Ray, Slurm) need absolute run folders
    check_devices(plan, executor)
    _check_sweep_dir(out, plan)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {str(out)!r} cannot be created ({e.strerror or e})") from e
    t0 = time.perf_counter()
    with sweep_lock(out):
        _check_sweep_dir(out, plan)  # again under the lock: another sweep may have started meanwhile
        _remove_stale_temp_files(out)
        runs.atomic_write_json(out / SWEEP_FILE, plan.manifest())
        runs_dir = out / RUNS_DIR
        runs_dir.mkdir(exist_ok=True)
        statuses: dict[str, str] = {}
        for run in plan.runs:
            s = disk_status(runs_dir / run.run_id)
            statuses[run.run_id] = s if s in runs.FINISHED else "pending"
        write_index(out, plan, statuses)
        todo = [r for r in plan.runs if statuses[r.run_id] == "pending"]
        errors: dict[str, str] = {}
        n_tasks = 0
        try:
            if todo:
                with executor:
                    max_runs = plan.batch_size if batch_size is None else None if batch_size == "auto" else batch_size
                    tasks = pack_tasks(todo, out, executor.workers, max_runs, executor.memory_per_task())
                    if getattr(executor, "auto", False) and len(tasks) > 1 and sampled_steps(todo) < IN_PROCESS_STEPS:
                        one = pack_tasks(todo, out, 1, max_runs, executor.memory_per_task())
                        if len(one) == 1:  # small enough to train here, in one batch
                            tasks = one
                            executor.train_here()
                    n_tasks = len(tasks)
                    executor.prepare(tasks)
                    _drive(executor, tasks, plan, out, statuses, errors, progress, use_bar(progress_mode),
                           progress_mode)
        finally:
            for run in plan.runs:  # the folders are the truth, whatever happened above
                statuses[run.run_id] = s = disk_status(runs_dir / run.run_id)
                if s in ("running", runs.UNREADABLE):
                    statuses[run.run_id] = "pending"
            write_index(out, plan, statuses)
    return SweepSummary(_count(statuses), len(plan.runs) - len(todo), len(todo), n_tasks,
                        time.perf_counter() - t0, errors)


def _drive(executor: Executor, tasks: list[Task], plan: SweepPlan, out: Path, statuses: dict[str, str],
           errors: dict[str, str], progress: Any, bar: bool, progress_mode: str) -> None:
    """Consume the executor's outcomes: record statuses, show progress, refresh the index."""
    total = sum(len(t) for t in tasks)
    finished = failed = diverged = 0
    start = last_index = time.perf_counter()
    label = f"sweep {out.name} ({executor.name} x{executor.workers}, {len(tasks)} tasks)"
    with progress(label, total, progress_mode, unit="runs") as advance:
        advance(0, total, failed=0, diverged=0)
        for outcome in executor.run(tasks):
            for res in _outcome_results(outcome):
                statuses[res.run_id] = res.status
                finished += 1
                failed += res.status == "failed"
                diverged += res.status == "diverged"
                if res.error and res.status == "failed":
                    errors[res.run_id] = res.error
            info: dict[str, Any] = {"failed": failed, "diverged": diverged}
            if not bar:
                elapsed = time.perf_counter() - start
                info["eta"] = f"{elapsed / finished * (total - finished):.0f}s" if finished else "?"
            advance(finished, total, **info)
            now = time.perf_counter()
            if now - last_index >= INDEX_REFRESH_S or finished == total:
                write_index(out, plan, statuses)
                last_index = now


def _outcome_results(outcome: TaskOutcome) -> tuple[RunResult, ...]:
    """Per-run results of a task; a task that failed as a whole gets its unfinished runs marked failed."""
    if outcome.error is None:
        return outcome.results
    task, res = outcome.task, []
    for rid, run_dir in zip(task.run_ids, task.run_dirs, strict=True):
        if runs.is_finished(Path(run_dir)):
            res.append(RunResult(rid, runs.read_status(Path(run_dir))["status"]))
            continue
        res.append(record_failure(Path(run_dir), rid, f"task failed: {outcome.error}"))
    return tuple(res)


# ------------------------------------------------------------------------------------------------------
# Status
# ------------------------------------------------------------------------------------------------------


def status_report(path: Path, max_errors: int = 10) -> str:
    """A sweep's counts by status (plus failed runs' errors), or a single run folder's status."""

    path = Path(path)
    if (path / SWEEP_FILE).is_file():
        try:
            run_ids = json.loads((path / SWEEP_FILE).read_text())["run_ids"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{path}: unreadable {SWEEP_FILE} ({e})") from e
        holder = lock_holder(path)
        statuses = {rid: disk_status(path / RUNS_DIR / rid) for rid in run_ids}
        interrupted = 0
        if holder is None:  # nothing runs: a "running" folder was interrupted and will be re-run
            interrupted = sum(s == "running" for s in statuses.values())
            statuses = {k: ("pending" if s == "running" else s) for k, s in statuses.items()}
        counts = _count(statuses)
        lines = [f"sweep {path}: {len(run_ids)} runs | " + " | ".join(f"{k} {v}" for k, v in counts.items())]
        if holder:
            lines.append(f"a sweep is running on it ({holder})")
        elif counts["pending"] or counts["failed"] or counts.get(runs.UNREADABLE):
            note = f" ({interrupted} interrupted)" if interrupted else ""
            n_bad = counts.get(runs.UNREADABLE, 0)
            again = f" (it trains the {n_bad} unreadable run{'s' * (n_bad != 1)} again)" if n_bad else ""
            lines.append(f"no sweep is running on it{note}; run the same `reflab sweep` command to resume{again}")
        for kind in ("failed", runs.UNREADABLE):
            listed = [rid for rid, s in statuses.items() if s == kind]
            for rid in listed[:max_errors]:
                run_dir = path / RUNS_DIR / rid
                if kind == "failed":
                    why = runs.read_status(run_dir).get("error", "")
                else:
                    why = "; ".join(f"{name} {reason}" for name, reason in runs.unreadable_tables(run_dir).items())
                lines.append(f"{kind} {rid}: {why}")
            if len(listed) > max_errors:
                lines.append(f"... and {len(listed) - max_errors} more {kind} runs")
        return "\n".join(lines)
    if (path / runs.STATUS_FILE).is_file() or (path / runs.CONFIG_FILE).is_file():
        st = runs.read_status(path)
        state = runs.run_state(path)
        parts = [f"run {path}: {st.get('status', 'pending')}"]
        if state == runs.UNREADABLE:
            bad = runs.unreadable_tables(path)
            parts = [f"run {path}: {state} (status {st['status']}, but " +
                     "; ".join(f"{name} {reason}" for name, reason in bad.items()) + ")"]
        if "update" in st:
            parts.append(f"update {st['update']}")
        if "wall_time_s" in st:
            parts.append(f"{st['wall_time_s']}s")
        if st.get("error"):
            parts.append(str(st["error"]))
        return " | ".join(parts)
    raise UsageError(f"{str(path)!r} is neither a sweep folder ({SWEEP_FILE}) nor a run folder "
                     f"({runs.STATUS_FILE})")


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------


def _dry_run_table(plan: SweepPlan, out: Path | None) -> str:
    import pandas as pd

    cols: dict[str, list[Any]] = {"run_id": [r.run_id for r in plan.runs]}
    if out is not None and (out / RUNS_DIR).is_dir():
        cols["status"] = [disk_status(out / RUNS_DIR / r.run_id) for r in plan.runs]
    for key in ["seed", *plan.swept_keys]:
        cols[key] = [_json_cell(r.columns[key]) for r in plan.runs]
    return pd.DataFrame(cols).to_string(index=False)


def main(args: argparse.Namespace) -> int:
    """``reflab sweep``: expand, validate, then (unless ``--dry-run``) train into ``--out``; with ``--report``,
    then write its report (:mod:`sim.lab.follow_report`)."""
    if not args.report:
        return _sweep(args)
    if args.dry_run or not args.out:
        raise UsageError("--report writes the sweep's report after training: it needs --out DIR and no --dry-run")
    from sim.lab.follow_report import FollowingReport

    following = FollowingReport(Path(args.out))  # forked now: before torch is imported or a thread started
    try:
        code = _sweep(args)
    except BaseException:
        following.cancel()
        raise
    return following.finish(code)


def _sweep(args: argparse.Namespace) -> int:
    if args.max_runs < 1 or args.max_yaml_values < 1:
        raise UsageError("--max-runs and --max-yaml-values must be positive integers")
    with startup_frozen():  # planning imports torch, the trainers and pandas, kept until exit
        grid, path = load_grid(args.grid, args.max_yaml_values, "--max-yaml-values")
        grid = apply_sets(grid, args.set, args.grid, path.parent, args.max_yaml_values, "--max-yaml-values")
        plan = plan_sweep(grid, args.grid, path.parent, args.max_runs, args.max_yaml_values,
                          ("--max-runs", "--max-yaml-values"))
    batch_size = None
    if args.batch_size is not None:
        batch_size = parse_batch_size(_int_or_auto(args.batch_size), "--batch-size") or "auto"
    out = Path(args.out) if args.out else None
    if args.dry_run:
        print(_dry_run_table(plan, out))
        n_sig = len({batch_signature(r.config) for r in plan.runs})
        print(f"{len(plan.runs)} runs ({n_sig} batch signature{'s' * (n_sig != 1)}); dry run, nothing written")
        return 0
    if out is None:
        raise UsageError("sweep needs --out DIR (or --dry-run)")
    runs.check_writable_dir(out)
    _check_sweep_dir(out, plan)
    try:
        executor = make_executor(args.executor, args.workers, out.resolve(), address=args.address,
                                 slurm_local=args.slurm_local or os.environ.get("REFLAB_SLURM_LOCAL") == "1",
                                 slurm_partition=args.slurm_partition, slurm_time=args.slurm_time,
                                 slurm_cpus=args.slurm_cpus, slurm_mem_gb=args.slurm_mem)
        executor.check()
    except ExecutorError as e:
        raise UsageError(str(e)) from e
    check_devices(plan, executor)
    mode = "none" if args.quiet else args.progress
    try:
        summary = run_sweep(plan, out, executor, mode, batch_size)
    except KeyboardInterrupt:
        print(f"reflab: interrupted; run the same command to resume {out}", file=sys.stderr)
        return 130
    except ExecutorError as e:
        raise UsageError(str(e)) from e
    c = summary.counts
    print(f"sweep {out}: {len(plan.runs)} runs | done {c['done']} | diverged {c['diverged']} | failed {c['failed']} "
          f"| pending {c['pending']} ({summary.skipped} already finished, {summary.trained} trained in "
          f"{summary.n_tasks} tasks, {summary.wall_time_s:.1f}s)")
    for rid, err in list(summary.errors.items())[:10]:
        print(f"failed {rid}: {err}", file=sys.stderr)
    return 1 if c["failed"] or c["pending"] else 0


def _int_or_auto(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        return value


def status_main(args: argparse.Namespace) -> int:
    """``reflab status DIR``: counts of a sweep's runs by status, or one run folder's status."""
    print(status_report(Path(args.dir)))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``reflab sweep``."""
    p.description = ("Expand a grid (axes product x variants x seeds - exclude), pack runs that share a batch "
                     "signature into batched tasks and train them with an executor. Rerun the same command to "
                     "resume: finished runs are skipped, failed and unfinished ones trained again.")
    p.add_argument("grid", help="grid YAML file, or the name of a preset in sim/lab/presets (e.g. example_grid)")
    p.add_argument("--out", metavar="DIR", help="sweep folder (required unless --dry-run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a dotted config key for every run (YAML value); KEY=a,b,... makes it an axis over "
                        "those values; repeatable (see `reflab config` for the keys)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded runs and their count; write nothing")
    p.add_argument("--report", action="store_true",
                   help="then write the sweep's report (as `reflab report DIR` would), its modules imported on a "
                        "spare core while the sweep trains")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local worker processes (default), Ray tasks, or Slurm job arrays via submitit")
    p.add_argument("--workers", type=int, default=None,
                   help="tasks run at once (default: the cores here; a Ray cluster's CPUs; 16 for Slurm)")
    p.add_argument("--batch-size", default=None, metavar="N|auto",
                   help="max runs per task (default: the grid's batch_size, else auto: memory-aware)")
    p.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                   help="a rich bar on a terminal (auto), plain lines, or nothing")
    p.add_argument("--quiet", action="store_true", help="no progress output (same as --progress none)")
    p.add_argument("--max-runs", type=int, default=MAX_RUNS, metavar="N",
                   help=f"refuse a grid of more than N runs, counted before expanding it (default {MAX_RUNS})")
    p.add_argument("--max-yaml-values", type=int, default=yamlsafe.MAX_VALUES, metavar="N",
                   help="refuse a grid (or base) file of more than N YAML values once aliases are expanded "
                        f"(default {yamlsafe.MAX_VALUES}; also bounds its characters and bytes)")
    g = p.add_argument_group("ray")
    g.add_argument("--address", default=None,
                   help="address of an existing Ray cluster (default: start a local Ray instance)")
    g = p.add_argument_group("slurm (submitit; the sweep folder must be on a filesystem the nodes share)")
    g.add_argument("--slurm-partition", default=None, help="sbatch --partition")
    g.add_argument("--slurm-time", default="60", metavar="TIME",
                   help="time limit per task: minutes, HH:MM:SS or D-HH:MM:SS (default 60 minutes)")
    g.add_argument("--slurm-cpus", type=int, default=1, help="CPUs per task (default 1)")
    g.add_argument("--slurm-mem", type=float, default=None, metavar="GB",
                   help="memory per task in GB (also bounds the automatic batch size)")
    g.add_argument("--slurm-local", action="store_true",
                   help="run the jobs on this machine with submitit's LocalExecutor (also REFLAB_SLURM_LOCAL=1)")


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``reflab status``."""
    p.add_argument("dir", help="a sweep folder (from reflab sweep) or a run folder (from reflab run)")
