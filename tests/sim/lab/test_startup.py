"""Start-up: ``reflab --help``, the commands' help and config errors that need no env import nothing heavy.

Each case runs the command line in a fresh interpreter and reads ``sys.modules`` afterwards (no timing: what is
imported decides the start-up time, ``reflab bench`` and the README measure it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "pandas", "matplotlib", "pyarrow", "scipy", "seaborn", "stable_baselines3")

SCRIPT = """
import contextlib, io, json, sys
from sim.lab.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "modules": sorted(sys.modules)}))
"""


def run_cli(argv: list[str]) -> dict:
    """``reflab argv`` in a fresh interpreter on this checkout: exit code, stdout, stderr and the imported modules."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(argv)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def heavy(result: dict) -> list[str]:
    return [m for m in HEAVY if m in result["modules"]]


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["sweep", "--help"], ["status", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_imports_nothing_heavy(argv):
    res = run_cli(argv)
    assert res["code"] == 0
    assert heavy(res) == []
    if argv == ["--help"]:  # the top-level help imports no env either
        assert "numpy" not in res["modules"] and "gymnasium" not in res["modules"]


def test_run_help_still_lists_every_config_key():
    res = run_cli(["run", "--help"])
    assert "config keys" in res["out"] and "kl.beta=0.1" in res["out"] and "train.lr=0.01" in res["out"]
    assert "env.id=\"bandit\" (bandit|gaussian_bandit|diffusion_chain|gridworld|token_tree)" in res["out"]
    assert "{config keys}" not in res["out"]


@pytest.mark.parametrize(("argv", "needle"), [
    (["run", "--set", "kl.beta=-1"], "kl.beta must be >= 0"),
    (["run", "--set", "kl.betta=1"], "unknown key 'kl.betta'"),
    (["run", "--set", "train.optimizer=adamw"], "train.optimizer must be one of"),
    (["run", "--set", "kl.estimator=k2"], "kl.estimator=\"k2\" has no effect"),
    (["sweep", "quickstart", "--set", "kl.beta=-1"], "kl.beta must be >= 0"),
    (["sweep", "quickstart", "--set", "train.lr=0.01,abc"], "train.lr must be a number"),
    (["sweep", "quickstart", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
], ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_config_errors_without_an_env_import_nothing_heavy(tmp_path, argv, needle):
    out = tmp_path / "out"
    res = run_cli([*argv, "--out", str(out)])
    assert res["code"] == 2
    lines = res["err"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reflab: error: ") and needle in lines[0], res["err"]
    assert heavy(res) == []
    assert not out.exists()


def test_an_env_error_is_still_one_line(tmp_path):
    """An ``env.*`` error needs the env's params class (its module imports torch): same one line, exit 2."""
    out = tmp_path / "out"
    res = run_cli(["run", "--set", "env.n_arms=0", "--out", str(out)])
    assert res["code"] == 2
    assert res["err"].strip().splitlines() == [res["err"].strip()] and "env.n_arms" in res["err"]
    assert not out.exists()
