"""The Ray and Slurm (submitit) executors on a tiny sweep: a real local Ray instance, submitit's LocalExecutor.

Each test skips only when its package is not importable; CI installs both (``.[ray,slurm]``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sim.lab.grid import plan_sweep
from sim.lab.runs import TABLES, read_status

REPO = Path(__file__).resolve().parents[3]
GRID = {
    "base": {"env": {"id": "bandit", "rewards": [1, 0, 0], "ref_probs": [0.2, 0.5, 0.3]},
             "train": {"updates": 20, "batch": 32}},
    "variants": [{"kl.placement": "reward", "kl.estimator": "k1"},
                 {"kl.placement": "loss", "kl.estimator": "k3"}],
    "seeds": 2,
    "batch_size": 2,
}


def _sweep(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "sim.lab.cli", "sweep", str(grid), "--out", str(out), "--workers", "2",
                           "--progress", "plain", *extra], env=env, capture_output=True, text=True, timeout=240)
    return proc, out


def _assert_complete(proc: subprocess.CompletedProcess, out: Path) -> None:
    assert proc.returncode == 0, proc.stderr
    assert "4 runs | done 4 | diverged 0 | failed 0 | pending 0" in proc.stdout
    assert "2 tasks" in proc.stdout
    ids = [r.run_id for r in plan_sweep(GRID, "grid").runs]
    index = pd.read_parquet(out / "index.parquet")
    assert list(index["run_id"]) == ids and set(index["status"]) == {"done"}
    for rid in ids:
        status = read_status(out / "runs" / rid)
        assert status["status"] == "done" and status["n_runs_in_batch"] == 2
        for t in TABLES:
            assert len(pd.read_parquet(out / "runs" / rid / f"{t}.parquet")) > 0


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'reflab[ray]')")
def test_ray_executor_on_a_local_ray_instance(tmp_path):
    proc, out = _sweep(tmp_path, "--executor", "ray")
    _assert_complete(proc, out)
    assert "(ray x2, 2 tasks)" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                    reason="submitit is not installed (pip install 'reflab[slurm]')")
def test_slurm_executor_through_submitits_local_executor(tmp_path):
    proc, out = _sweep(tmp_path, "--executor", "slurm", "--slurm-local", "--slurm-time", "0:10:00")
    _assert_complete(proc, out)
    assert "(slurm-local x2, 2 tasks)" in proc.stderr
    assert list((out / "slurm").glob("*_log.out"))  # submitit's job logs live in DIR/slurm
