"""reflab sweep: grid expansion, ids, dry run, malformed grids, lock, status, packing and failure handling.

The fast tests here run in-process; one small sweep trains for real with local worker processes.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sim.config import ConfigError
from sim.lab import runs as results
from sim.lab.cli import main
from sim.lab.dispatch import from_dict
from sim.lab.executors import RunResult, TaskOutcome, run_task
from sim.lab.grid import ALWAYS_COLUMNS, available_presets, load_grid, plan_sweep
from sim.lab.sweep import (
    LOCK_FILE,
    SWEEP_FILE,
    _outcome_results,
    auto_batch_size,
    estimate_run_bytes,
    index_frame,
    pack_tasks,
    status_report,
)

BASE = {"env": {"id": "bandit", "rewards": [1, 0, 0], "ref_probs": [0.2, 0.5, 0.3]},
        "train": {"updates": 20, "batch": 32}}
GRID = {
    "base": BASE,
    "axes": {"kl.beta": [0.1, 0.5], "train.lr": [0.01, 0.02]},
    "variants": [{"kl.placement": "none"},
                 {"kl.placement": "reward", "kl.estimator": "k1"},
                 {"kl": {"placement": "loss", "estimator": "k3"}}],
    "seeds": 2,
    "exclude": [{"kl.placement": "none", "kl.beta": 0.5}],
}


def write_grid(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid))
    return path


# ------------------------------------------------------------------------------------------------------
# Expansion
# ------------------------------------------------------------------------------------------------------


def test_expansion_product_variants_seeds_minus_exclusions():
    plan = plan_sweep(GRID, "grid")
    # 2 β × 2 lr × 3 variants × 2 seeds = 24, minus none × β=0.5 (2 lr × 2 seeds) = 20
    assert len(plan.runs) == 20
    assert plan.swept_keys == ["kl.beta", "train.lr", "kl.placement", "kl.estimator"]
    assert not [r for r in plan.runs if r.config.kl.placement == "none" and r.config.kl.beta == 0.5]
    # grid order: axes product (first axis slowest), then variants, then seeds
    first = plan.runs[:6]
    assert [(r.config.kl.placement, r.config.seed) for r in first] == [
        ("none", 0), ("none", 1), ("reward", 0), ("reward", 1), ("loss", 0), ("loss", 1)]
    assert all(r.config.kl.beta == 0.1 and r.config.train.lr == 0.01 for r in first)
    assert plan.runs[4].config.kl.estimator == "k3"  # nested-mapping variant keys are flattened
    assert plan.runs[0].config.train.updates == 20 and plan.runs[0].config.env["rewards"] == [1.0, 0.0, 0.0]


def test_run_ids_are_deterministic_unique_and_follow_the_config():
    a, b = plan_sweep(GRID, "grid"), plan_sweep(GRID, "other label")
    ids = [r.run_id for r in a.runs]
    assert ids == [r.run_id for r in b.runs]
    assert len(set(ids)) == len(ids) and all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
    # the id is a function of the resolved config alone: a one-run grid with the same config agrees
    run = a.runs[7]
    single = plan_sweep({"base": run.config.to_dict()}, "single")
    assert single.runs[0].run_id == run.run_id


def test_seed_lists_base_paths_and_exclude_drops_invalid_combinations(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    grid = {"base": "base.yaml", "seeds": [3, 7],
            "axes": {"env.id": ["bandit", "gaussian_bandit"], "train.mode": ["sampled", "exact"]},
            "exclude": [{"env.id": "gaussian_bandit", "train.mode": "exact"}]}
    path = write_grid(tmp_path / "grid.yaml", grid)
    data, found = load_grid(str(path))
    plan = plan_sweep(data, str(path), found.parent)
    assert len(plan.runs) == 3 * 2
    assert sorted({r.config.seed for r in plan.runs}) == [3, 7]
    bandit = [r for r in plan.runs if r.config.env["id"] == "bandit"]
    assert bandit[0].config.env["rewards"] == [1.0, 0.0, 0.0]  # from the base file
    gauss = [r for r in plan.runs if r.config.env["id"] == "gaussian_bandit"]
    assert "rewards" not in gauss[0].config.env  # a new env.id starts from that env's defaults


def test_index_columns():
    grid = {"base": BASE, "axes": {"env.rewards": [[1, 0, 0], [0, 0, 1]]}, "variants": [{"kl.beta": 0.2}]}
    plan = plan_sweep(grid, "grid")
    df = index_frame(plan, {plan.runs[0].run_id: "done"})
    assert list(df.columns) == ["run_id", "status", "seed", *ALWAYS_COLUMNS, "env.rewards"]
    assert list(df["status"]) == ["done", "pending"]
    assert list(df["env.rewards"]) == ["[1.0, 0.0, 0.0]", "[0.0, 0.0, 1.0]"]  # lists as JSON text
    assert df["kl.beta"].tolist() == [0.2, 0.2] and df["env.id"].tolist() == ["bandit", "bandit"]


def test_report_section_goes_into_the_manifest_checked():
    plan = plan_sweep({**GRID, "report": {"figures": ["overopt", "kl", "kl"]}}, "grid")
    assert plan.manifest()["report"] == {"figures": ["kl", "overopt"]}  # in the report's order, once each
    assert plan_sweep({**GRID, "report": {"figures": ["all"]}}, "grid").manifest()["report"]["figures"][-1] == \
        "overopt"
    assert plan_sweep({**GRID, "report": {"figures": ["none"]}}, "grid").manifest()["report"] == {"figures": []}
    assert "report" not in plan_sweep(GRID, "grid").manifest()
    assert [r.run_id for r in plan.runs] == [r.run_id for r in plan_sweep(GRID, "grid").runs]  # runs unchanged


def test_example_preset_is_shipped_and_small():
    assert "example_grid" in available_presets()
    data, path = load_grid("example_grid")
    plan = plan_sweep(data, "example_grid", path.parent)
    assert 8 <= len(plan.runs) <= 40
    assert all(r.config.train.total_updates <= 200 for r in plan.runs)


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", GRID)
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    plan = plan_sweep(GRID, "grid")
    assert printed[0].split() == ["run_id", "seed", *plan.swept_keys]
    assert [line.split()[0] for line in printed[1:-1]] == [r.run_id for r in plan.runs]
    assert printed[-1].startswith("20 runs")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------
# Malformed grids and bad folders: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------------------

MALFORMED = [
    ("axes: {kl.betta: [0.1]}", "kl.betta"),
    ("axes: {kl.beta: []}", "axes.kl.beta is empty"),
    ("axes: {kl.beta: 0.1}", "axes.kl.beta must be a list"),
    ("variants: [{train.lrr: 1}]", "train.lrr"),
    ("base: {kl: {bta: 1}}", "kl.bta"),
    ("base: {env: {id: bandit, colour: 1}}", "env.colour"),
    ("variants: [{env.colour: 1}]", "env.colour"),
    ("axes: {kl.beta: [0.1, -1]}", "kl.beta must be >= 0"),
    ("exclude: [{kl.placemnt: none}]", "kl.placemnt"),
    ("sweeps: 3", "unknown grid key 'sweeps'; valid keys: base, axes"),
    ("seeds: -1", "seeds"),
    ("seeds: 0", "seeds"),
    ("seeds: 1.5", "seeds"),
    ("seeds: []", "seeds"),
    ("seeds: [0, x]", "seeds"),
    ("seeds: [1, 1]", "seeds"),
    ("batch_size: 0", "batch_size"),
    ("axes: {seed: [1, 2]}", "seeds"),
    ("axes: {kl.beta: [0.1]}\nvariants: [{kl.beta: 0.2}]", "kl.beta"),
    ("variants: [{kl.beta: 0.1}, {kl.beta: 0.1}]", "same config"),
    ("axes: {kl.beta: [1\n", "not valid YAML"),
    ("- just a list", "must hold a mapping"),
    ("base: missing.yaml", "missing.yaml"),
    ("report: {figures: [kl, pie]}", "report.figures must be a list of figure kinds (kl, entropy, recovery"),
    ("report: {figures: kl}", "report.figures must be a list of figure kinds"),
    ("report: {figure: [kl]}", "unknown report key 'figure'; valid keys: figures"),
    ("report: [kl]", "report must be a mapping with keys figures"),
]


@pytest.mark.parametrize("text,needle", MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_grid_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, text, needle):
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reflab: error: ") and needle in err[0], err
    assert not out.exists()


def test_missing_file_unknown_preset_and_unwritable_out(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", {"base": BASE})
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["sweep", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "s")], "does not exist"),
        (["sweep", "no_such_preset", "--out", str(tmp_path / "s")], "available presets: "),
        (["sweep", str(grid), "--out", str(blocker / "sub")], "not writable"),
        (["sweep", str(grid), "--out", str(blocker)], "not a folder"),
        (["sweep", str(grid)], "--out"),
        (["sweep", str(grid), "--out", str(tmp_path / "s"), "--batch-size", "x"], "--batch-size"),
        (["sweep", str(grid), "--out", str(tmp_path / "s"), "--executor", "slurm"], "--executor slurm needs"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("reflab: error: ") and needle in err[0], (argv, err)
    assert not (tmp_path / "s").exists() and blocker.read_text() == ""


def test_unknown_preset_lists_the_presets(capsys):
    assert main(["sweep", "placemnts", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'placemnts'" in err and "example_grid" in err


def test_out_holding_something_else_is_refused(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", {"base": BASE})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["sweep", str(grid), "--out", str(other)]) == 2
    assert "not empty and holds no sweep" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------------
# Lock
# ------------------------------------------------------------------------------------------------------


def test_a_second_sweep_on_a_locked_folder_fails_with_one_line(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", {"base": BASE})
    out = tmp_path / "sweep"
    out.mkdir()
    with open(out / LOCK_FILE, "w") as held:  # what a running sweep holds
        held.write("pid 12345 on somehost\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["sweep", str(grid), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another sweep (pid 12345 on somehost)" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


# ------------------------------------------------------------------------------------------------------
# A real sweep, status
# ------------------------------------------------------------------------------------------------------


def test_small_sweep_writes_run_folders_index_and_manifest_then_resumes_as_a_no_op(tmp_path, capsys):
    grid = {"base": BASE, "axes": {"kl.beta": [0.1, 0.5]},
            "variants": [{"kl.placement": "reward", "kl.estimator": "k1"}], "seeds": 2}
    path = write_grid(tmp_path / "grid.yaml", grid)
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "2", "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "4 runs | done 4 | diverged 0 | failed 0" in summary
    index = pd.read_parquet(out / "index.parquet")
    plan = plan_sweep(grid, "grid")
    assert list(index["run_id"]) == [r.run_id for r in plan.runs]
    assert set(index["status"]) == {"done"}
    assert list(index.columns) == ["run_id", "status", "seed", *ALWAYS_COLUMNS]
    manifest = json.loads((out / SWEEP_FILE).read_text())
    assert manifest["grid"] == grid and manifest["run_ids"] == list(index["run_id"])
    assert manifest["resolved"]["seeds"] == [0, 1] and manifest["resolved"]["base"]["train"]["updates"] == 20
    for run in plan.runs:
        run_dir = out / "runs" / run.run_id
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(
            ["config.json", "status.json", "metrics.parquet", "policy.parquet", "trajectories.parquet"])
        assert from_dict(json.loads((run_dir / "config.json").read_text())["config"]) == run.config
        assert len(pd.read_parquet(run_dir / "metrics.parquet")) == 21
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet") if "runs" in p.parts}
    assert main(["sweep", str(path), "--out", str(out), "--quiet"]) == 0
    assert "4 already finished, 0 trained" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet") if "runs" in p.parts}

    assert main(["status", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"sweep {out}: 4 runs | done 4 | diverged 0 | failed 0 | running 0 | pending 0")
    assert main(["status", str(out / "runs" / plan.runs[0].run_id)]) == 0
    assert capsys.readouterr().out.startswith(f"run {out / 'runs' / plan.runs[0].run_id}: done | update 20")


def _fake_sweep(tmp_path: Path, statuses: list[str | None]) -> tuple[Path, list[str]]:
    """A sweep folder with run folders in the given states (``None`` = never started); finished runs get
    a config and (tiny) readable tables, as :func:`sim.lab.runs.start_run` and :func:`~sim.lab.runs.finish_run`
    write them."""
    out = tmp_path / "fake"
    ids = [f"{i:012x}" for i in range(len(statuses))]
    results.atomic_write_json(out / SWEEP_FILE, {"run_ids": ids})
    for rid, st in zip(ids, statuses, strict=True):
        if st == "failed":
            results.fail_run(out / "runs" / rid, "ValueError: boom")
        elif st in results.FINISHED:
            results.atomic_write_json(out / "runs" / rid / results.CONFIG_FILE, {"config": {}})
            results.finish_run(out / "runs" / rid, {t: pd.DataFrame({"update": [0]}) for t in results.TABLES},
                               {"status": st})
        elif st is not None:
            results.atomic_write_json(out / "runs" / rid / "status.json", {"status": st})
    return out, ids


def test_status_counts_and_interrupted_runs(tmp_path, capsys):
    out, ids = _fake_sweep(tmp_path, ["done", "done", "diverged", "failed", "running", None])
    report = status_report(out).splitlines()
    # no sweep holds the lock: the "running" run was interrupted and counts as pending
    assert report[0] == f"sweep {out}: 6 runs | done 2 | diverged 1 | failed 1 | running 0 | pending 2"
    assert "1 interrupted" in report[1]
    assert report[2] == f"failed {ids[3]}: ValueError: boom"
    with open(out / LOCK_FILE, "w") as held:
        held.write("pid 1 on host\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        report = status_report(out).splitlines()
        assert report[0].endswith("| running 1 | pending 1") and "(pid 1 on host)" in report[1]
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "neither a sweep folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# Packing and failures
# ------------------------------------------------------------------------------------------------------


def test_packing_groups_by_signature_and_sizes_batches():
    grid = {"base": BASE, "axes": {"kl.beta": [0.1, 0.2, 0.3], "train.epochs": [1, 2]}, "seeds": 3}
    plan = plan_sweep(grid, "grid")  # 18 runs, 2 batch signatures (train.epochs is not per-run)
    tasks = pack_tasks(plan.runs, Path("sweep"), workers=2, batch_size=4)
    assert sorted(len(t) for t in tasks) == [3, 3, 3, 3, 3, 3]  # 9 per signature, 3 even chunks of <= 4
    for t in tasks:
        assert len({c.train.epochs for c in t.configs}) == 1
        assert t.run_dirs == tuple(str(Path("sweep") / "runs" / rid) for rid in t.run_ids)
    assert sorted(rid for t in tasks for rid in t.run_ids) == sorted(r.run_id for r in plan.runs)
    # auto: enough tasks for the workers, and the memory budget caps the batch
    auto = pack_tasks(plan.runs, Path("sweep"), workers=2, task_budget=2**40)
    assert sorted(len(t) for t in auto) == [9, 9]
    per_run = estimate_run_bytes(plan.runs[0].config)
    tight = pack_tasks(plan.runs, Path("sweep"), workers=2, task_budget=2 * per_run)
    assert max(len(t) for t in tight) == 2
    assert auto_batch_size(1000, 4, run_bytes=10, task_budget=10**9) == 250
    assert auto_batch_size(3, 8, run_bytes=10, task_budget=10**9) == 1
    big = from_dict({"env": {"id": "gridworld"}, "train": {"policy": "mlp"}})
    assert estimate_run_bytes(big) > 100 * estimate_run_bytes(plan.runs[0].config)


def test_a_failing_run_does_not_lose_its_batch(tmp_path, monkeypatch):
    import sim.lab.dispatch

    plan = plan_sweep({"base": BASE, "seeds": 4}, "grid")
    (task,) = pack_tasks(plan.runs, tmp_path, workers=1, batch_size=4)
    real = sim.lab.dispatch.train_batch  # what the worker calls (imported there when a task runs)

    def train_batch(configs, progress=None, device=None):
        if any(c.seed == 2 for c in configs):
            raise RuntimeError("seed 2 is cursed")
        return real(configs, progress, device)

    monkeypatch.setattr(sim.lab.dispatch, "train_batch", train_batch)
    # a stale, unfinished folder from an earlier attempt is replaced
    stale = Path(task.run_dirs[0])
    results.atomic_write_json(stale / "status.json", {"status": "running"})
    (stale / "junk.tmp").write_text("x")
    out = run_task(task)
    assert [r.status for r in out] == ["done", "done", "failed", "done"]
    assert "RuntimeError: seed 2 is cursed" in out[2].error
    assert results.read_status(Path(task.run_dirs[2]))["status"] == "failed"
    assert not (stale / "junk.tmp").exists() and results.is_finished(stale)
    # finished runs are skipped, not retrained
    before = (stale / "metrics.parquet").stat().st_mtime_ns
    assert [r.status for r in run_task(task)] == ["done", "done", "failed", "done"]
    assert (stale / "metrics.parquet").stat().st_mtime_ns == before


def test_a_task_lost_by_the_executor_marks_its_unfinished_runs_failed(tmp_path):
    plan = plan_sweep({"base": BASE, "seeds": 2}, "grid")
    (task,) = pack_tasks(plan.runs, tmp_path, workers=1, batch_size=2)
    results.atomic_write_json(Path(task.run_dirs[0]) / results.CONFIG_FILE, {"config": {}})
    results.finish_run(Path(task.run_dirs[0]), {t: pd.DataFrame({"update": [0]}) for t in results.TABLES},
                       {"status": "done"})
    res = _outcome_results(TaskOutcome(task, error="worker process died"))
    assert res == (RunResult(task.run_ids[0], "done"),
                   RunResult(task.run_ids[1], "failed", "task failed: worker process died"))
    assert results.read_status(Path(task.run_dirs[1])) == {"status": "failed",
                                                           "error": "task failed: worker process died"}


def test_plan_errors_are_config_errors():
    with pytest.raises(ConfigError, match="everything is excluded"):
        plan_sweep({"base": BASE, "exclude": [{"env.id": "bandit"}]}, "grid")


def test_preset_run_ids_never_change():
    """Run ids are the folders a sweep resumes into: every preset's ids equal those recorded when ids were first
    defined (``tests/sim/lab/data/preset_run_ids.json``; keys added since enter an id only when set,
    ``sim.lab.run_ids``)."""
    import hashlib

    recorded = json.loads((Path(__file__).parent / "data" / "preset_run_ids.json").read_text())
    for name, want in recorded.items():
        grid, path = load_grid(name)
        ids = [r.run_id for r in plan_sweep(grid, name, path.parent).runs]
        assert len(ids) == want["n_runs"] and ids[0] == want["first"], name
        assert hashlib.sha256(" ".join(ids).encode()).hexdigest() == want["sha256_of_ids"], name


def test_excluded_runs_skip_the_env_and_trainer_checks(monkeypatch, capsys):
    """A run excluded by keys known without its env (env.id, keys outside env) is dropped before the env's and
    trainer's checks (the costly part of planning a grid that excludes most of its product); the plan is the one
    of matching every run after them (forced by an exclude entry on another env key)."""
    from sim.lab import dispatch

    calls = []
    real = dispatch.from_dict
    monkeypatch.setattr(dispatch, "from_dict", lambda data, *a, **k: calls.append(1) or real(data, *a, **k))
    plan = plan_sweep(GRID, "grid")
    assert len(plan.runs) == 2 * 2 * 3 * 2 - 2 * 2  # kl.placement none at beta 0.5: 2 lrs x 2 seeds excluded
    assert len(calls) == 1 + len(plan.runs)  # the base, then the runs kept
    calls.clear()
    late = plan_sweep({**GRID, "exclude": [*GRID["exclude"], {"env.rewards": [9, 9, 9]}]}, "grid")
    assert len(calls) == 1 + 2 * 2 * 3 * 2  # every run checked, then matched
    assert [(r.run_id, r.columns) for r in late.runs] == [(r.run_id, r.columns) for r in plan.runs]
    assert "exclude[1]" in capsys.readouterr().err  # matched no run
