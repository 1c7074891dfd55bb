"""Start-up objects frozen for the garbage collector: :mod:`sim.lab.startup` and where the sweep uses it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from sim.lab.startup import startup_frozen

REPO = Path(__file__).resolve().parents[3]


def test_startup_frozen_collects_nothing_inside_then_freezes_and_enables():
    assert gc.isenabled()
    before = gc.get_freeze_count()
    try:
        with startup_frozen():
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]  # noqa: F841 - objects alive at the freeze
        assert gc.isenabled()
        assert gc.get_freeze_count() >= before + 1000
    finally:
        gc.unfreeze()


def test_startup_frozen_leaves_a_disabled_collector_disabled():
    gc.disable()
    try:
        with startup_frozen():
            pass
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_sweep_freezes_what_its_planning_imported(tmp_path):
    """After planning (torch and the trainers imported) the collector is on and their objects are frozen."""
    script = ("import gc, json, sys\nfrom sim.lab.cli import main\ncode = main(sys.argv[1:])\n"
              "print(json.dumps({'code': code, 'frozen': gc.get_freeze_count(), 'enabled': gc.isenabled(), "
              "'torch': 'torch' in sys.modules}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, "sweep", "quickstart", "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["code"] == 0 and res["enabled"] and res["torch"]
    assert res["frozen"] > 50_000  # torch's modules, functions and classes among them
