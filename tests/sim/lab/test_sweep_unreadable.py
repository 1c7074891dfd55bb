"""A run whose status says done but whose tables cannot be read is not finished: status names it, resume retrains it."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from sim.lab import runs
from sim.lab import sweep as sweep_mod
from sim.lab.cli import main
from sim.lab.executors import run_task
from sim.lab.grid import plan_sweep
from sim.lab.sweep import pack_tasks, run_sweep, status_report
from tests.sim.lab.test_sweep_kill import GRID, InProcess

GRID3 = {**GRID, "variants": [*GRID["variants"], {"kl.placement": "none"}]}


def truncate(path: Path) -> None:
    """Cut a file in half, as a full disk or a copy interrupted mid-way leaves it."""
    os.truncate(path, path.stat().st_size // 2)


def overwrite_tail(path: Path) -> None:
    """Overwrite the last bytes (the Parquet footer) with garbage; the size stays."""
    with open(path, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\xff" * 16)


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, list[str], dict[str, pd.DataFrame]]:
    """A finished 3-run sweep whose first run's metrics are truncated and second run's policy is overwritten."""
    out = tmp_path / "sweep"
    summary = run_sweep(plan_sweep(GRID3, "grid"), out, InProcess(), "none")
    assert summary.counts["done"] == 3
    ids = list(pd.read_parquet(out / "index.parquet")["run_id"])
    tables = {f"{rid}/{t}": pd.read_parquet(out / "runs" / rid / f"{t}.parquet") for rid in ids for t in runs.TABLES}
    truncate(out / "runs" / ids[0] / "metrics.parquet")
    overwrite_tail(out / "runs" / ids[1] / "policy.parquet")
    return out, ids, tables


def test_unreadable_tables_are_found_from_the_footers_alone(damaged, monkeypatch):
    out, ids, _ = damaged

    def no_full_reads(*a, **k):
        raise AssertionError("a whole table was read")

    monkeypatch.setattr(pq, "read_table", no_full_reads)
    monkeypatch.setattr(pd, "read_parquet", no_full_reads)
    assert list(runs.unreadable_tables(out / "runs" / ids[0])) == ["metrics.parquet"]
    assert list(runs.unreadable_tables(out / "runs" / ids[1])) == ["policy.parquet"]
    assert runs.unreadable_tables(out / "runs" / ids[2]) == {}
    assert [runs.run_state(out / "runs" / rid) for rid in ids] == ["unreadable", "unreadable", "done"]
    assert not runs.is_finished(out / "runs" / ids[0]) and runs.is_finished(out / "runs" / ids[2])
    (out / "runs" / ids[2] / "trajectories.parquet").unlink()  # a finished run missing a table is not finished
    assert runs.unreadable_tables(out / "runs" / ids[2]) == {"trajectories.parquet": "missing"}


def test_a_finished_run_with_an_empty_or_missing_config_is_unreadable(damaged):
    """Run files are not fsynced: after an operating-system crash a config.json can be empty; such a run is
    trained again like one with a broken table."""
    out, ids, _ = damaged
    config = out / "runs" / ids[2] / runs.CONFIG_FILE
    config.write_bytes(b"")
    assert runs.unreadable_tables(out / "runs" / ids[2]) == {"config.json": "not readable JSON"}
    assert runs.run_state(out / "runs" / ids[2]) == "unreadable"
    config.write_text("[1, 2]\n")
    assert runs.unreadable_tables(out / "runs" / ids[2]) == {"config.json": "not a JSON object"}
    config.unlink()
    assert runs.unreadable_tables(out / "runs" / ids[2]) == {"config.json": "missing"}


def test_status_names_unreadable_runs(damaged, capsys):
    out, ids, _ = damaged
    lines = status_report(out).splitlines()
    assert lines[0] == f"sweep {out}: 3 runs | done 1 | diverged 0 | failed 0 | running 0 | pending 0 | unreadable 2"
    assert "run the same `reflab sweep` command to resume (it trains the 2 unreadable runs again)" in lines[1]
    assert lines[2].startswith(f"unreadable {ids[0]}: metrics.parquet ")
    assert lines[3].startswith(f"unreadable {ids[1]}: policy.parquet ")
    assert main(["status", str(out / "runs" / ids[0])]) == 0
    assert capsys.readouterr().out.startswith(f"run {out / 'runs' / ids[0]}: unreadable (status done, but "
                                              "metrics.parquet ")


def test_the_same_sweep_retrains_unreadable_runs_to_the_same_tables(damaged, tmp_path, capsys, monkeypatch):
    out, ids, tables = damaged
    untouched = {p: p.stat().st_mtime_ns for p in (out / "runs" / ids[2]).iterdir()}
    monkeypatch.setattr(sweep_mod, "make_executor", lambda *a, **k: InProcess())
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID3))
    assert main(["sweep", str(grid), "--out", str(out), "--quiet"]) == 0
    assert "3 runs | done 3 | diverged 0 | failed 0 | pending 0 (1 already finished, 2 trained" in \
        capsys.readouterr().out
    for name, df in tables.items():
        pd.testing.assert_frame_equal(pd.read_parquet(out / "runs" / f"{name}.parquet"), df, check_exact=True)
    assert {p: p.stat().st_mtime_ns for p in (out / "runs" / ids[2]).iterdir()} == untouched
    assert list(pd.read_parquet(out / "index.parquet")["status"]) == ["done"] * 3
    assert status_report(out).splitlines() == [f"sweep {out}: 3 runs | done 3 | diverged 0 | failed 0 | running 0 "
                                               "| pending 0"]


def test_a_task_retrains_its_unreadable_runs(damaged):
    """The worker side agrees: run_task skips finished runs, but not one whose tables are unreadable."""
    out, ids, tables = damaged
    plan = plan_sweep(GRID3, "grid")
    (task,) = pack_tasks(plan.runs, out, workers=1, batch_size=3)
    assert [r.status for r in run_task(task)] == ["done"] * 3
    assert all(runs.run_state(out / "runs" / rid) == "done" for rid in ids)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "runs" / ids[0] / "metrics.parquet"),
                                  tables[f"{ids[0]}/metrics"], check_exact=True)
