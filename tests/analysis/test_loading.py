"""analysis.load (analysis/loading.py): run and sweep folders into tidy frames, problems reported, fast."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.loading import VARIANT_ORDER, flatten_config, key_columns, load, variant_label


def test_variant_labels() -> None:
    assert variant_label("none", "k3") == "none"
    assert variant_label("reward", "k1") == "k1 in reward"
    assert variant_label("loss", "k3") == "k3 as loss"
    assert variant_label("loss", "k1", is_correction=True) == "k1 as loss (IS)"


def test_flatten_config_makes_dotted_hashable_keys() -> None:
    flat = flatten_config({"kl": {"beta": 0.1}, "env": {"id": "bandit", "rewards": [1, 0]}, "seed": 3})
    assert flat == {"kl.beta": 0.1, "env.id": "bandit", "env.rewards": "[1, 0]", "seed": 3}


def test_single_run(single_run: Path) -> None:
    res = load(single_run)
    assert res.kind == "run"
    assert len(res.runs) == 1
    assert res.runs["variant"].iloc[0] == "k1 in reward"
    assert res.runs["status"].iloc[0] == "done"
    assert res.metrics["update"].tolist() == list(range(61))  # update 0 = the initial policy
    assert res.swept == []
    assert res.problems.empty
    assert res.config(res.runs["run_id"].iloc[0])["kl"]["placement"] == "reward"


def test_sweep_tables_have_keys_and_categories(bandit_sweep: Path) -> None:
    res = load(bandit_sweep)
    assert res.kind == "sweep"
    assert len(res.runs) == 32
    assert "kl.beta" in res.swept and "seed" in res.swept
    assert res.keys[:7] == ["run_id", "variant", "seed", "env.id", "kl.placement", "kl.estimator", "kl.beta"]
    m = res.metrics
    assert list(m.columns[:len(res.keys)]) == res.keys
    assert key_columns(m) == res.keys
    assert isinstance(m["variant"].dtype, pd.CategoricalDtype) and m["variant"].cat.ordered
    assert list(m["variant"].cat.categories) == list(VARIANT_ORDER)
    assert isinstance(m["kl.placement"].dtype, pd.CategoricalDtype)
    assert m["kl.beta"].dtype == np.float64
    assert len(m) == 32 * 61
    assert m.groupby("run_id", observed=True)["update"].is_monotonic_increasing.all()
    # one row per run × update, and each run's keys match its config
    first = m[m["run_id"] == m["run_id"].iloc[0]]
    cfg = res.config(str(first["run_id"].iloc[0]))
    assert first["kl.beta"].iloc[0] == cfg["kl"]["beta"]
    assert set(res.conditions) == {"variant", "env.id", "kl.beta"}


def test_policy_and_trajectories_are_lazy(bandit_sweep: Path) -> None:
    res = load(bandit_sweep)
    assert res._cache == {}
    pol = res.policy
    assert set(res._cache) == {"policy"}
    assert {"update", "state", "action", "prob", "ref_prob", "opt_prob"} <= set(pol.columns)
    assert key_columns(pol) == res.keys
    np.testing.assert_allclose(pol.groupby(["run_id", "update"], observed=True)["prob"].sum(), 1.0, atol=1e-6)
    traj = res.trajectories
    assert {"episode", "t", "logp", "ref_logp"} <= set(traj.columns)
    assert traj["run_id"].nunique() == 32


def test_failed_and_missing_runs_are_reported(broken_sweep: Path) -> None:
    res = load(broken_sweep)
    assert len(res.runs) == 32
    problems = res.problems.set_index("status")
    assert set(problems.index) == {"failed", "missing"}
    assert "boom" in problems.loc["failed", "error"]
    assert res.metrics["run_id"].nunique() == 30
    assert len(res.policy["run_id"].unique()) == 30


def test_unreadable_runs_are_marked_and_left_out(bandit_sweep: Path, tmp_path: Path) -> None:
    """A run whose status says done but whose metrics.parquet is truncated is not silently dropped."""
    out = tmp_path / "sweep"
    shutil.copytree(bandit_sweep, out)
    victim = sorted((out / "runs").iterdir())[3]
    metrics = victim / "metrics.parquet"
    metrics.write_bytes(metrics.read_bytes()[:100])
    res = load(out)
    row = res.runs[res.runs["run_id"].astype(str) == victim.name].iloc[0]
    assert row["status"] == "unreadable" and not row["has_metrics"]
    assert row["error"].startswith("metrics.parquet: ")
    assert victim.name not in set(res.metrics["run_id"].astype(str)) and res.metrics["run_id"].nunique() == 31
    problems = res.problems
    assert list(problems["run_id"].astype(str)) == [victim.name] and list(problems["status"]) == ["unreadable"]
    assert victim.name not in set(res.policy["run_id"].astype(str))
    # a metrics.parquet that looks whole (magic bytes, footer length) but whose footer is garbage is caught on reading
    other = sorted((out / "runs").iterdir())[5] / "metrics.parquet"
    data = bytearray(other.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[-8 - footer:-8] = b"\xff" * footer
    other.write_bytes(bytes(data))
    res = load(out)
    assert list(res.problems["run_id"].astype(str)) == [victim.name, other.parent.name]
    assert set(res.problems["status"]) == {"unreadable"} and res.metrics["run_id"].nunique() == 30
    assert "remove the run's folder" in res.problems["error"].iloc[1]


def test_folder_of_run_folders(bandit_sweep: Path, tmp_path: Path) -> None:
    # No index.parquet: every sub-folder with a config.json is a run.
    import shutil

    for run in sorted((bandit_sweep / "runs").iterdir())[:3]:
        shutil.copytree(run, tmp_path / run.name)
    res = load(tmp_path)
    assert res.kind == "sweep" and len(res.runs) == 3


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load(tmp_path)


def _fake_sweep(root: Path, n_runs: int, n_updates: int) -> None:
    """``n_runs`` synthetic run folders with small metrics tables and an index."""
    rows = []
    updates = np.arange(n_updates)
    for i in range(n_runs):
        run = root / "runs" / f"r{i:04d}"
        run.mkdir(parents=True)
        placement = ("none", "reward", "loss")[i % 3]
        cfg = {"env": {"id": "bandit"}, "kl": {"placement": placement, "estimator": "k1", "beta": 0.1 * (1 + i % 5)},
               "seed": i // 15}
        (run / "config.json").write_text(json.dumps({"config": cfg}))
        (run / "status.json").write_text(json.dumps({"status": "done"}))
        table = pa.table({"update": updates, "kl_true": np.full(n_updates, float(i)),
                          "entropy": np.linspace(1.0, 0.0, n_updates), "reward_scale": np.ones(n_updates)})
        pq.write_table(table, run / "metrics.parquet")
        rows.append({"run_id": f"r{i:04d}", "status": "done", "seed": cfg["seed"], "kl.beta": cfg["kl"]["beta"]})
    pd.DataFrame(rows).to_parquet(root / "index.parquet")


def test_load_is_fast_on_a_thousand_runs(tmp_path: Path) -> None:
    _fake_sweep(tmp_path, 1000, 300)
    t0 = time.perf_counter()
    res = load(tmp_path)
    elapsed = time.perf_counter() - t0
    assert len(res.runs) == 1000 and len(res.metrics) == 300_000
    assert res.metrics.groupby("run_id", observed=True)["kl_true"].first().tolist() == [float(i) for i in range(1000)]
    assert elapsed < 10.0, f"loading 1000 runs took {elapsed:.1f}s"


def test_analysis_never_imports_the_trainer() -> None:
    import ast

    root = Path(__file__).resolve().parents[2] / "analysis"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "sim" or n.startswith("sim.") for n in names), f"{path.name} imports {names}"


def test_subset(bandit_sweep: Path) -> None:
    res = load(bandit_sweep)
    ids = [str(i) for i in res.runs["run_id"][:4]]
    sub = res.subset(ids)
    assert len(sub.runs) == 4 and set(sub.metrics["run_id"].astype(str)) == set(ids)
    assert set(sub.policy["run_id"].astype(str)) == set(ids)
