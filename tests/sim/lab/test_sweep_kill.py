"""A sweep SIGKILLed at any point, its first metadata write included, resumes to the uninterrupted result.

A forked child runs a small sweep in-process (an executor that trains the tasks in the sweep's own process, so a
kill stops the sweep and its "workers" together, as the local executor's workers die with the sweep) and
SIGKILLs itself at its k-th file-system step: taking the lock, creating a temporary file, writing it (the
temp file is cut in half first, as a kill mid-write leaves it), renaming it into place, creating a folder.
The kill points are real kills, not simulations, and the test hooks live here, not in the code under test.
Every step up to the end of the first index write is a kill point, then every few steps to the end. The
parent resumes each killed folder with the same sweep (one resume is itself killed) and compares everything
with an uninterrupted sweep: index.parquet, every table of every run, and no leftover file.
"""

from __future__ import annotations

import os
import signal
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from sim.lab import sweep as sweep_mod
from sim.lab.cli import main
from sim.lab.executors import Executor, Task, TaskOutcome, run_task
from sim.lab.grid import plan_sweep
from sim.lab.runs import TABLES
from sim.lab.sweep import INDEX_FILE, LOCK_FILE, SWEEP_FILE, run_sweep

GRID = {
    "base": {"env": {"id": "bandit", "rewards": [1, 0, 0], "ref_probs": [0.2, 0.5, 0.3]},
             "train": {"updates": 3, "batch": 8}, "log": {"trajectories": 1, "policy_every": 3}},
    "variants": [{"kl.placement": "reward", "kl.estimator": "k1"}, {"kl.placement": "loss", "kl.estimator": "k3"}],
    "batch_size": 1,  # two tasks: the index is refreshed between them
}
#: Kill points after the first index write: every STRIDE-th step (the steps repeat per run and per write).
STRIDE = 3


class InProcess(Executor):
    """Trains each task in this process (what a local worker does), in order."""

    name = "in-process"

    def __init__(self) -> None:
        super().__init__(1)

    def run(self, tasks: list[Task]) -> Iterator[TaskOutcome]:
        for task in tasks:
            yield TaskOutcome(task, run_task(task))


class Steps:
    """Counts the sweep's file-system steps; with ``kill_at`` set, SIGKILLs this process at that step."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at, self.labels = kill_at, []

    def step(self, label: str, before_kill: Callable[[], None] | None = None) -> None:
        self.labels.append(label)
        if len(self.labels) == self.kill_at:
            if before_kill is not None:
                before_kill()
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self, setattr_: Callable[[object, str, object], None]) -> None:
        real_mkstemp, real_write_bytes, real_replace = tempfile.mkstemp, Path.write_bytes, os.replace
        real_mkdir, real_pwrite, real_to_parquet = Path.mkdir, os.pwrite, pd.DataFrame.to_parquet
        real_open, real_write = os.open, os.write
        steps, temp_fds = self, set()

        def mkstemp(*a, **k):
            fd, name = real_mkstemp(*a, **k)
            steps.step(f"create {Path(name).name}")
            return fd, name

        def os_open(path, flags, *a, **k):
            fd = real_open(path, flags, *a, **k)
            if str(path).endswith(".tmp") and flags & os.O_CREAT:  # a temporary file made with os.open
                temp_fds.add(fd)
                steps.step(f"create {Path(path).name}")
            return fd

        def os_write(fd, data):
            n = real_write(fd, data)
            if fd in temp_fds:
                steps.step("write a temporary file", lambda: os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR) // 2))
            return n

        def write_bytes(self, data):
            n = real_write_bytes(self, data)
            steps.step("write a temporary file", lambda: os.truncate(self, len(data) // 2))
            return n

        def replace(src, dst):
            steps.step(f"before renaming to {Path(dst).name}")
            real_replace(src, dst)
            steps.step(f"after renaming to {Path(dst).name}")

        def mkdir(self, *a, **k):
            existed = self.is_dir()
            real_mkdir(self, *a, **k)
            if not existed:
                steps.step(f"mkdir {self.name}")

        def pwrite(fd, data, offset):
            n = real_pwrite(fd, data, offset)
            steps.step("write the lock")
            return n

        def to_parquet(df, path=None, *a, **k):
            if path is None:  # encoded in memory: its temporary file is cut by the os.write hook
                return real_to_parquet(df, path, *a, **k)
            real_to_parquet(df, path, *a, **k)
            steps.step(f"write {Path(path).name}", lambda: os.truncate(path, os.path.getsize(path) // 2))

        setattr_(tempfile, "mkstemp", mkstemp)
        setattr_(Path, "write_bytes", write_bytes)
        setattr_(os, "replace", replace)
        setattr_(os, "open", os_open)
        setattr_(os, "write", os_write)
        setattr_(Path, "mkdir", mkdir)
        setattr_(os, "pwrite", pwrite)
        setattr_(pd.DataFrame, "to_parquet", to_parquet)


def _sweep(out: Path) -> None:
    run_sweep(plan_sweep(GRID, "grid"), out, InProcess(), "none")


def _fork(fn: Callable[[], int]) -> int:
    """Run ``fn`` in a forked child that exits with its return value (3 if it raises); the child's pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            code = fn()
        except BaseException:  # noqa: BLE001 - reported to the parent through the exit code
            traceback.print_exc()
        os._exit(code)
    return pid


def _killed_at(out: Path, k: int) -> bool:
    """Run the sweep into ``out`` in a child that SIGKILLs itself at step ``k``; whether it was killed there."""

    def child() -> int:
        Steps(kill_at=k).install(setattr)
        _sweep(out)
        return 0

    _, status = os.waitpid(_fork(child), 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status) == signal.SIGKILL
    assert os.WEXITSTATUS(status) == 0, f"the sweep to be killed at step {k} failed before"
    return False


def _kill_and_resume(out: Path, k: int, kill_the_resume: bool) -> int:
    """Kill a sweep at step ``k`` (and its resume at the same step if asked), then resume it to the end.

    Exit code of the child this runs in: 0, or 4 if step ``k`` was never reached."""
    if not _killed_at(out, k):
        return 4
    if kill_the_resume:
        _killed_at(out, k)
    _sweep(out)
    return 0


def _run_two_at_a_time(jobs: dict[int, Callable[[], int]]) -> dict[int, int]:
    """Run each job in a forked child, two at once (the CI machines have two cores); ``{key: exit code}``."""
    pending, running, codes = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < 2:
            key = pending.pop(0)
            running[_fork(jobs[key])] = key
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    return codes


def _result(out: Path) -> dict[str, pd.DataFrame]:
    index = pd.read_parquet(out / INDEX_FILE)
    tables = {"index": index}
    for rid in index["run_id"]:
        for t in TABLES:
            tables[f"{rid}/{t}"] = pd.read_parquet(out / "runs" / rid / f"{t}.parquet")
    return tables


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != LOCK_FILE)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_sweep_killed_at_any_step_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_mod, "INDEX_REFRESH_S", 0.0)  # refresh the index after every task: same steps
    reference = tmp_path / "reference"
    counter = Steps()
    with monkeypatch.context() as m:
        counter.install(m.setattr)
        _sweep(reference)
    want, files = _result(reference), _files(reference)
    labels = counter.labels
    first_index = max(i for i, label in enumerate(labels, 1) if label == f"after renaming to {INDEX_FILE}"
                      and i < labels.index("mkdir runs") + 8)
    assert "write the lock" in labels[:3] and labels[first_index - 1] == f"after renaming to {INDEX_FILE}"
    assert f"before renaming to {SWEEP_FILE}" in labels[:first_index], labels
    points = list(range(1, first_index + 1)) + list(range(first_index + 1, len(labels) + 1, STRIDE))

    def job(k: int, kill_the_resume: bool) -> Callable[[], int]:
        return lambda: _kill_and_resume(tmp_path / f"killed{k}", k, kill_the_resume)

    codes = _run_two_at_a_time({k: job(k, kill_the_resume=n % 5 == 4) for n, k in enumerate(points)})
    for k in points:
        assert codes[k] == 0, f"kill at step {k} ({labels[k - 1]}): {'never reached' if codes[k] == 4 else codes[k]}"
        out = tmp_path / f"killed{k}"
        got = _result(out)
        assert got.keys() == want.keys(), labels[k - 1]
        for name, df in want.items():
            pd.testing.assert_frame_equal(got[name], df, check_exact=True, obj=f"{name} after a kill at step {k} "
                                          f"({labels[k - 1]})")
        assert _files(out) == files, f"leftovers after a kill at step {k} ({labels[k - 1]})"


def test_a_sweep_killed_in_its_first_sweep_json_write_resumes(tmp_path, capsys, monkeypatch):
    """The leftovers of a kill during the first write of sweep.json (the lock and a temporary file) are not
    "a folder that holds no sweep": the same command resumes and removes them."""
    monkeypatch.setattr(sweep_mod, "make_executor", lambda *a, **k: InProcess())
    out = tmp_path / "X"
    out.mkdir()
    for name in (LOCK_FILE, f".{SWEEP_FILE}.a1b2c3.tmp", f".{INDEX_FILE}.d4e5f6.tmp"):
        (out / name).write_text("")
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"base: {GRID['base']}\nvariants: {GRID['variants']}\n")
    assert main(["sweep", str(grid), "--out", str(out), "--workers", "1", "--quiet"]) == 0, capsys.readouterr().err
    assert "2 runs | done 2" in capsys.readouterr().out
    assert not list(out.glob("*.tmp")) and (out / SWEEP_FILE).is_file()
    # anything else in a folder without sweep.json is still refused, and left alone
    other = tmp_path / "other"
    other.mkdir()
    (other / LOCK_FILE).write_text("")
    (other / ".notes.txt.tmp").write_text("mine")
    assert main(["sweep", str(grid), "--out", str(other), "--quiet"]) == 2
    assert "not empty and holds no sweep" in capsys.readouterr().err
    assert (other / ".notes.txt.tmp").read_text() == "mine"
