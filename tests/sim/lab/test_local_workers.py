"""Local worker processes: forked from the sweep when that is safe (even after the sweep's process has used torch's
thread pool), writing exactly what the sweep's own process writes; tasks listed the most costly first; the sweep's
lock never kept by a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from sim.lab.executors import LocalExecutor, can_fork_workers
from sim.lab.grid import plan_sweep
from sim.lab.lock import sweep_lock
from sim.lab.sweep import _task_cost, pack_tasks, run_sweep

REPO = Path(__file__).resolve().parents[3]
BASE = {"env": {"id": "bandit", "rewards": [1, 0, 0], "ref_probs": [0.2, 0.5, 0.3]},
        "train": {"updates": 6, "batch": 16}, "log": {"trajectories": 2, "policy_every": 3}}
GRID = {"base": BASE, "axes": {"kl.beta": [0.1, 0.5]},
        "variants": [{"kl.placement": "reward", "kl.estimator": "k1"}, {"kl.placement": "loss", "kl.estimator": "k3"}],
        "seeds": 2}
LINUX_FORK = sys.platform.startswith("linux") and hasattr(os, "fork")

#: A sweep with two local workers, in a process that first ran torch ops on two threads (its OpenMP pool started):
#: prints whether the workers were forked and the sweep's counts.
SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
(a @ a).sum()
torch.randn(4_000_000).exp_()
from sim.lab import executors
from sim.lab.grid import plan_sweep
from sim.lab.sweep import run_sweep
forked = []
real = executors.LocalExecutor._new_pool
def spy(self, fork=False):
    forked.append(fork)
    return real(self, fork)
executors.LocalExecutor._new_pool = spy
summary = run_sweep(plan_sweep(json.loads(sys.argv[2]), "grid"), Path(sys.argv[1]), executors.LocalExecutor(2), "none")
print(json.dumps({"forked": forked, "counts": summary.counts, "tasks": summary.n_tasks}))
"""


def _files(out: Path) -> dict[str, bytes]:
    """Every file of the sweep's run folders but the statuses (which hold wall times)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "runs").rglob("*"))
            if p.is_file() and p.name != "status.json"}


@pytest.mark.skipif(not LINUX_FORK, reason="workers are forked on Linux only")
def test_forked_workers_after_torch_threads_write_what_this_process_writes(tmp_path):
    forked = tmp_path / "forked"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(forked), json.dumps(GRID)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["forked"] == [True] and report["tasks"] == 2 and report["counts"]["done"] == 8

    here = tmp_path / "here"
    executor = LocalExecutor(1)  # the tasks train in this process, one after the other
    assert run_sweep(plan_sweep(GRID, "grid"), here, executor, "none").counts["done"] == 8
    a, b = _files(forked), _files(here)
    assert list(a) == list(b) and len(a) == 8 * 4
    assert a == b  # byte for byte: configs and every table
    for name in a:
        if name.endswith(".parquet"):
            x, y = pd.read_parquet(forked / name), pd.read_parquet(here / name)
            assert x.equals(y) and (x.dtypes == y.dtypes).all()


@pytest.mark.skipif(not LINUX_FORK, reason="workers are forked on Linux only")
def test_workers_are_spawned_when_a_fork_is_not_safe(tmp_path, monkeypatch):
    plan = plan_sweep(GRID, "grid")
    threaded = plan_sweep({**GRID, "base": {**BASE, "threads": 2}}, "grid")
    monkeypatch.setattr(threading, "active_count", lambda: 1)  # this process alone (whatever pytest runs)
    assert can_fork_workers(pack_tasks(plan.runs, tmp_path, 2))
    assert not can_fork_workers(pack_tasks(threaded.runs, tmp_path, 2))  # torch's thread pool in the worker
    # another thread of this process (e.g. a progress display) might hold a lock at the fork
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    assert not can_fork_workers(pack_tasks(plan.runs, tmp_path, 2))


@pytest.mark.skipif(not LINUX_FORK, reason="needs fork")
def test_a_forked_child_does_not_keep_the_sweep_lock(tmp_path):
    with sweep_lock(tmp_path):
        fds = set(os.listdir("/proc/self/fd"))
        pid = os.fork()
        if pid == 0:  # the child: the lock's descriptor is closed, every other one is still there
            lock_fd = [fd for fd in fds if os.path.realpath(f"/proc/self/fd/{fd}") == str(tmp_path / ".lock")]
            os._exit(0 if not lock_fd else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_tasks_are_listed_most_costly_first(tmp_path):
    grid = {"base": BASE, "axes": {"train.batch": [16, 64]}, "seeds": 4}  # two signatures, one 4x the steps
    plan = plan_sweep(grid, "grid")
    tasks = pack_tasks(plan.runs, tmp_path, workers=2, batch_size=3)
    steps = [sum(c.train.batch for c in t.configs) for t in tasks]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]
    assert [t.index for t in tasks] == list(range(len(tasks)))
    assert sorted(r for t in tasks for r in t.run_ids) == sorted(r.run_id for r in plan.runs)
    assert _task_cost(10, 100, 5) > _task_cost(5, 100, 5) > _task_cost(5, 100, 1)


def test_best_of_n_tasks_cost_their_runs_folders_not_updates(tmp_path):
    """Best-of-n trains no sampled updates: its task (many runs, nothing to sample) is listed after a PPO task of
    fewer runs; a run's folder still costs something (more runs, more cost)."""
    env = {"id": "token_tree", "vocab": 3, "length": 3}
    grid = {"base": {"env": env, "reward": {"model": "learned", "family": "linear"}, "train": {"updates": 50}},
            "variants": [{"train.algo": "ppo"}, *({"train.algo": "bon", "bon.n": n} for n in (2, 4, 8))],
            "seeds": 2}
    tasks = pack_tasks(plan_sweep(grid, "grid").runs, tmp_path, workers=2, batch_size=8)
    assert [(t.configs[0].train.algo, len(t)) for t in tasks] == [("ppo", 2), ("bon", 6)]
    assert _task_cost(6, 0, 0) > _task_cost(2, 0, 0) > 0
