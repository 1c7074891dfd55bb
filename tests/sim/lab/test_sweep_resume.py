"""A sweep SIGKILLed mid-way resumes to exactly the result of an uninterrupted sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from sim.lab.cli import main
from sim.lab.runs import TABLES

REPO = Path(__file__).resolve().parents[3]
# 12 runs of one bandit signature, one run per task: slow enough to kill mid-way, quick to finish.
GRID = {
    "base": {"env": {"id": "bandit", "rewards": [1, 0, 0], "ref_probs": [0.2, 0.5, 0.3]},
             "train": {"updates": 40, "batch": 32}},
    "axes": {"kl.beta": [0.1, 0.5]},
    "variants": [{"kl.placement": "reward", "kl.estimator": "k1"},
                 {"kl.placement": "loss", "kl.estimator": "k2"},
                 {"kl.placement": "loss", "kl.estimator": "k3"}],
    "seeds": 2,
    "batch_size": 1,
}


def _sweep_cmd(grid: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sim.lab.cli", "sweep", str(grid), "--out", str(out), "--workers", "2", "--quiet"]


def _env() -> dict[str, str]:
    """The subprocess imports this checkout's sim, whatever is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _n_done(out: Path) -> int:
    n = 0
    for status in out.glob("runs/*/status.json"):
        try:
            n += json.loads(status.read_text())["status"] == "done"
        except (OSError, ValueError, KeyError):
            pass
    return n


def _kill_when(cmd: list[str], ready, timeout: float = 60.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds; fail if it finished first."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "sweep made no progress"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def _tables(out: Path) -> dict[tuple[str, str], pd.DataFrame]:
    index = pd.read_parquet(out / "index.parquet")
    return {(rid, t): pd.read_parquet(out / "runs" / rid / f"{t}.parquet") for rid in index["run_id"] for t in TABLES}


def test_sigkilled_sweep_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    killed = tmp_path / "killed"

    # Kill 1: as soon as the run list is on disk, before any run finished.
    _kill_when(_sweep_cmd(grid, killed), lambda: (killed / "index.parquet").exists())
    # Kill 2: mid-way, with some runs done and others running.
    _kill_when(_sweep_cmd(grid, killed), lambda: _n_done(killed) >= 2)
    assert 2 <= _n_done(killed) < 12, "the second kill must land mid-way"
    index = pd.read_parquet(killed / "index.parquet")
    assert len(index) == 12 and set(index["status"]) <= {"pending", "done"}
    assert main(["status", str(killed)]) == 0
    assert "pending" in capsys.readouterr().out

    # Resume: the same command finishes the sweep.
    resumed = subprocess.run(_sweep_cmd(grid, killed), env=_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "12 runs | done 12 | diverged 0 | failed 0 | pending 0" in resumed.stdout

    # Reference: an uninterrupted sweep, packed differently (auto batches); results must not depend on packing.
    reference = tmp_path / "reference"
    assert main(["sweep", str(grid), "--out", str(reference), "--workers", "2", "--batch-size", "auto",
                 "--quiet"]) == 0
    capsys.readouterr()

    pd.testing.assert_frame_equal(pd.read_parquet(killed / "index.parquet"),
                                  pd.read_parquet(reference / "index.parquet"))
    got, want = _tables(killed), _tables(reference)
    assert got.keys() == want.keys() and len(got) == 12 * len(TABLES)
    for key, df in want.items():
        pd.testing.assert_frame_equal(got[key], df, check_exact=True, obj=str(key))
    # nothing half-written or duplicated is left behind
    assert not list(killed.rglob("*.tmp"))
    assert sorted(p.name for p in (killed / "runs").iterdir()) == sorted(pd.read_parquet(
        reference / "index.parquet")["run_id"])
    for run_dir in (killed / "runs").iterdir():
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(
            ["config.json", "status.json", *(f"{t}.parquet" for t in TABLES)])
