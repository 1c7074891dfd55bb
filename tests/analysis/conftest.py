"""Shared fixtures of the analysis tests: small real sweeps trained once per session.

Tests may import ``sim`` to *make* data; ``analysis`` itself only reads the folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib
import pytest

from tests.analysis.sweep_fixture import write_sweep

matplotlib.use("Agg")

VARIANTS = [
    {"kl.placement": "none", "kl.estimator": "k1"},
    {"kl.placement": "reward", "kl.estimator": "k1"},
    {"kl.placement": "reward", "kl.estimator": "k2"},
    {"kl.placement": "reward", "kl.estimator": "k3"},
    {"kl.placement": "loss", "kl.estimator": "k1"},
    {"kl.placement": "loss", "kl.estimator": "k2"},
    {"kl.placement": "loss", "kl.estimator": "k3"},
    {"kl.placement": "loss", "kl.estimator": "full"},
]

BANDIT_GRID = {
    "base": {
        "env": {"id": "bandit", "rewards": [1, 0, 0, 0, 0], "ref_probs": [0.02, 0.245, 0.245, 0.245, 0.245]},
        "train": {"batch": 64, "phases": [{"updates": 30, "reward_scale": 1}, {"updates": 30, "reward_scale": 0}]},
        "log": {"every": 1, "trajectories": 4, "policy_every": 30, "progress": "none"},
    },
    "axes": {"kl.beta": [0.25, 1.0]},
    "variants": VARIANTS,
    "seeds": 2,
}

GRID_GRID = {
    "base": {
        "env": {"id": "gridworld", "layout": "two_goals", "horizon": 12, "ref_temperature": 3},
        "kl": {"beta": 0.1},
        "train": {"updates": 10, "batch": 32},
        "log": {"every": 2, "trajectories": 2, "policy_every": 5, "progress": "none"},
    },
    "variants": VARIANTS,
    "seeds": 1,
}

GAUSS_GRID = {
    "base": {
        "env": {"id": "gaussian_bandit"},
        "kl": {"beta": 0.5},
        "train": {"updates": 15, "batch": 64},
        "log": {"every": 1, "trajectories": 2, "policy_every": 5, "progress": "none"},
    },
    "variants": [VARIANTS[0], VARIANTS[1], VARIANTS[7]],
    "seeds": 2,
}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("analysis_data")


@pytest.fixture(scope="session")
def bandit_sweep(data_root: Path) -> Path:
    """8 variants × β ∈ {0.25, 1} × 2 seeds on the rare-arm bandit, 30 updates with and 30 without reward."""
    return write_sweep(BANDIT_GRID, data_root / "bandit")


@pytest.fixture(scope="session")
def grid_sweep(data_root: Path) -> Path:
    """8 variants × 1 seed on a short-horizon two_goals gridworld, 10 updates."""
    return write_sweep(GRID_GRID, data_root / "gridworld")


@pytest.fixture(scope="session")
def gauss_sweep(data_root: Path) -> Path:
    """3 variants × 2 seeds on the Gaussian bandit, 15 updates."""
    return write_sweep(GAUSS_GRID, data_root / "gaussian")


@pytest.fixture(scope="session")
def broken_sweep(bandit_sweep: Path, data_root: Path) -> Path:
    """The bandit sweep with one run marked failed (its tables deleted) and one run folder missing."""
    out = data_root / "broken"
    shutil.copytree(bandit_sweep, out)
    runs = sorted((out / "runs").iterdir())
    failed, missing = runs[0], runs[1]
    for name in ("metrics.parquet", "policy.parquet", "trajectories.parquet"):
        (failed / name).unlink()
    (failed / "status.json").write_text(json.dumps({"status": "failed", "error": "RuntimeError: boom"}))
    shutil.rmtree(missing)
    return out


@pytest.fixture(scope="session")
def single_run(bandit_sweep: Path) -> Path:
    """One run folder (k1 in the reward, β = 0.25, seed 0) of the bandit sweep."""
    import pandas as pd

    index = pd.read_parquet(bandit_sweep / "index.parquet")
    row = index[(index["kl.placement"] == "reward") & (index["kl.estimator"] == "k1") & (index["kl.beta"] == 0.25)
                & (index["seed"] == 0)].iloc[0]
    return bandit_sweep / "runs" / row["run_id"]
