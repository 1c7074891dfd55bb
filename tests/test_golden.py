"""Every trainer's outputs are bitwise those recorded in ``tests/golden/data`` (``tests/golden/golden.py``).

The cases cover every trainer (tabular and MLP PPO, exact mode, DPO/IPO, Gaussian, diffusion, the SB3
backend), every env, every placement × estimator, IS correction, clamps, the β controller, reference
schedules and phases. They run in a subprocess whose CPU kernels are pinned (AVX2 for ATen and MKL, one
thread), so the floating-point operations and their order are the same on every x86-64 machine with AVX2 or
AVX-512: the comparison is exact. A change that moves any number of any case fails here; if the change is
meant to move them, re-record (the command is in ``tests/golden/golden.py``) and say why in the commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

GOLDEN = Path(__file__).parent / "golden"
DATA = GOLDEN / "data"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    # the code under test, not whatever copy of the package is installed (the script's own folder comes first on
    # its sys.path, so without this an editable install of another checkout would be imported)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GOLDEN.parent.parent), env.get("PYTHONPATH")) if p)
    subprocess.run([sys.executable, str(GOLDEN / "golden.py"), "--out", str(out)], check=True, env=env,
                   cwd=GOLDEN.parent.parent)
    return out


def _cases() -> list[str]:
    return sorted({p.name.split(".")[0] for p in DATA.glob("*.status.json")})


def test_every_case_is_recorded():
    from tests.golden.golden import CASES

    assert _cases() == sorted(CASES)


@pytest.mark.parametrize("case", _cases())
def test_outputs_equal_the_recorded_ones(fresh: Path, case: str):
    assert json.loads((fresh / f"{case}.status.json").read_text()) == \
        json.loads((DATA / f"{case}.status.json").read_text())
    recorded = sorted(p.name for p in DATA.glob(f"{case}.*.parquet"))
    assert sorted(p.name for p in fresh.glob(f"{case}.*.parquet")) == recorded
    for name in recorded:
        got, want = pd.read_parquet(fresh / name), pd.read_parquet(DATA / name)
        pd.testing.assert_frame_equal(got, want, check_exact=True, obj=name)
