"""``reflab sweep … --report`` writes the report ``reflab report`` would, and nothing when the sweep fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from sim.lab.cli import main

REPO = Path(__file__).resolve().parents[3]
GRID = {
    "base": {"env": {"id": "bandit", "rewards": [1, 0, 0], "ref_probs": [0.2, 0.5, 0.3]},
             "train": {"updates": 20, "batch": 16}},
    "variants": [{"kl.placement": "reward", "kl.estimator": "k1"}, {"kl.placement": "loss", "kl.estimator": "k3"}],
    "seeds": 2,
}


def _reflab(*args: str) -> subprocess.CompletedProcess:
    """``reflab ARGS`` in a fresh interpreter importing this checkout (the option forks at start-up)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "sim.lab.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _grid(tmp_path: Path, grid: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_sweep_with_report_writes_what_reflab_report_writes(tmp_path):
    out = tmp_path / "sweep"
    done = _reflab("sweep", str(_grid(tmp_path, GRID)), "--out", str(out), "--quiet", "--report")
    assert done.returncode == 0, done.stderr
    assert done.stdout.index(f"sweep {out}") < done.stdout.index("report: "), done.stdout
    again = tmp_path / "again"
    assert main(["report", str(out), "--out", str(again)]) == 0
    got = sorted(p.name for p in (out / "report").iterdir())
    assert got == sorted(p.name for p in again.iterdir())
    assert any(name.endswith(".png") for name in got) and any(name.endswith(".pdf") for name in got)
    for name in ("summary.csv", "runs.csv", "summary.md"):
        assert (out / "report" / name).read_bytes() == (again / name).read_bytes(), name


def test_a_failing_sweep_writes_no_report(tmp_path):
    out = tmp_path / "sweep"
    bad = {**GRID, "base": {**GRID["base"], "train": {"updates": 20, "batch": 16, "lrr": 0.1}}}
    done = _reflab("sweep", str(_grid(tmp_path, bad)), "--out", str(out), "--quiet", "--report")
    assert done.returncode == 2 and "train.lrr" in done.stderr, done.stderr
    assert not (out / "report").exists()
    assert "report:" not in done.stdout


def test_report_needs_a_sweep_that_trains(tmp_path, capsys):
    assert main(["sweep", str(_grid(tmp_path, GRID)), "--dry-run", "--report"]) == 2
    assert "--report" in capsys.readouterr().err
