"""``reflab run``: the output folder contract, config files, and one-line errors that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from sim.lab.cli import main

FAST = ["--set", "train.updates=5", "--set", "train.batch=16"]


def test_run_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "k3loss"
    code = main(["run", "--set", "env.id=bandit", "--set", "env.rewards=[1,0,0]", "--set",
                 "env.ref_probs=[0.2,0.5,0.3]", "--set", "kl.placement=loss", "--set", "kl.estimator=k3",
                 "--set", "kl.beta=0.5", *FAST, "--out", str(out), "--quiet"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.parquet", "policy.parquet",
                                                      "status.json", "trajectories.parquet"]
    info = json.loads((out / "config.json").read_text())
    assert info["config"]["kl"] == {**info["config"]["kl"], "placement": "loss", "estimator": "k3", "beta": 0.5}
    assert info["config"]["env"]["ref_probs"] == [0.2, 0.5, 0.3]
    for key in ("torch", "numpy", "pandas", "device", "torch_threads", "python"):
        assert key in info["environment"]
    assert json.loads((out / "status.json").read_text())["status"] == "done"
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics["update"].tolist() == list(range(6))
    assert "done" in capsys.readouterr().out


def test_run_reads_a_yaml_config_and_overrides(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("env: {id: gridworld, layout: open_5x5, horizon: 8}\nkl: {placement: reward, beta: 1e-1}\n"
                    "train: {updates: 3, batch: 8}\n")
    out = tmp_path / "run"
    assert main(["run", str(conf), "--set", "kl.estimator=k2", "--out", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["env"]["layout"] == "open_5x5" and cfg["kl"]["beta"] == 0.1 and cfg["kl"]["estimator"] == "k2"


@pytest.mark.parametrize("args,needle", [
    (["--set", "kl.estimator=k4"], "kl.estimator must be one of k1, k2, k3, full"),
    (["--set", "kl.placment=loss"], "unknown key 'kl.placment'"),
    (["--set", "kl.beta=-1"], "kl.beta must be >= 0"),
    (["--set", "train.lr=abc"], "train.lr must be a number"),
    (["--set", "env.id=atari"], "env.id must be one of"),
    (["--set", "env.ref_probs=[0.5,0.2,0.2]"], "env.ref_probs"),
    (["--set", "env.id=gridworld", "--set", "env.layout=nope"], "env.layout"),
    (["--set", "foo=1"], "unknown key 'foo'"),
    (["--set", "train.phases=[{updates: 0}]"], "train.phases[0].updates"),
    (["missing.yaml"], "does not exist"),
    (["--set", "train.init=[0.5,0.5]"], "train.init"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, needle):
    out = tmp_path / "never"
    code = main(["run", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err, err
    assert len(err.splitlines()) == 1 and err.startswith("reflab: error:")
    assert not out.exists()


def test_unknown_flag_exits_2(tmp_path, capsys):
    assert main(["run", "--nope", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_diverged_run_is_recorded_not_crashed(tmp_path):
    out = tmp_path / "div"
    code = main(["run", "--set", "kl.placement=loss", "--set", "kl.estimator=k3", "--set", "train.optimizer=sgd",
                 "--set", "train.lr=1e6", "--set", "train.updates=5", "--out", str(out), "--quiet"])
    assert code == 0
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "diverged" and status["update"] == 1


def test_console_script_prints_plain_progress_off_terminal(tmp_path):
    out = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-m", "sim.lab.cli", "run", *FAST, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "5/5 updates" in proc.stderr
    assert "\x1b[" not in proc.stderr  # no terminal control codes when not on a terminal
