"""Input that would exhaust the machine or fail every run is refused up front: one line, exit 2, nothing written.

YAML bombs and deep nesting in grid files, config files and ``--set`` values; grids of more runs than
``--max-runs`` (counted before anything is expanded); ``device: cuda`` without CUDA; a ``base:`` that is a folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sim.lab import grid as grid_mod
from sim.lab import sweep as sweep_mod
from sim.lab.cli import main
from sim.lab.executors import Executor
from tests.sim.test_yamlsafe import laughs

BASE = {"env": {"id": "bandit", "rewards": [1, 0, 0], "ref_probs": [0.2, 0.5, 0.3]}, "train": {"updates": 5}}
BOMB = laughs(10).replace("\n", "\n  ")  # the anchors, indented under `description:`
#: The same bomb as one flow value (for --set): ``[&a0 [lol, ...], &a1 [*a0, ...], ...]``.
FLOW_BOMB = "[&a0 [" + ", ".join(["lol"] * 9) + "], " + ", ".join(
    f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)) + "]"


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("reflab: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in err, err
    return err


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_yaml_bomb_in_a_grid_is_refused_in_one_line_and_writes_nothing(tmp_path, capsys):
    grid = write(tmp_path / "bomb.yaml", f"description:\n  {BOMB}\nbase: {BASE}\n")
    out = tmp_path / "out"
    assert main(["sweep", str(grid), "--out", str(out)]) == 2
    one_line_error(capsys, "bomb.yaml", "holds more than 1000000 values", "--max-yaml-values")
    assert not out.exists()
    assert main(["sweep", str(grid), "--dry-run"]) == 2
    one_line_error(capsys, "--max-yaml-values")


def test_a_grid_base_file_is_bounded_too(tmp_path, capsys):
    write(tmp_path / "base.yaml", f"x:\n  {BOMB}\n")
    grid = write(tmp_path / "grid.yaml", "base: base.yaml\n")
    assert main(["sweep", str(grid), "--dry-run"]) == 2
    one_line_error(capsys, "base: config file", "base.yaml", "--max-yaml-values")


def test_deep_nesting_anywhere_is_one_line_not_a_recursion_error(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    grid = write(tmp_path / "deep.yaml", f"description: {deep}\nbase: {BASE}\n")
    assert main(["sweep", str(grid), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "deep.yaml", "nests deeper than 64 levels")
    config = write(tmp_path / "deep_config.yaml", f"train: {{init: {deep}}}\n")
    for args, needle in (([str(config)], "deep_config.yaml"), (["--set", f"train.init={deep}"], "--set train.init"),
                         (["--set", "train.init=&a [1, *a]"], "recursive alias"),
                         (["--set", f"train.init={FLOW_BOMB}"], "--set train.init holds more than 1000000 values")):
        out = tmp_path / "run"
        assert main(["run", *args, "--out", str(out), "--quiet"]) == 2
        one_line_error(capsys, needle)
        assert not out.exists()


def test_a_config_bomb_for_reflab_run_names_the_flag(tmp_path, capsys):
    config = write(tmp_path / "c.yaml", f"x:\n  {BOMB}\n")
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "c.yaml", "--max-yaml-values")
    assert not (tmp_path / "run").exists()


def test_the_run_count_is_checked_before_expanding(tmp_path, capsys, monkeypatch):
    calls = []
    real = grid_mod.from_dict  # sim.config's checks, which the grid applies first (the trainers' come later)
    monkeypatch.setattr(grid_mod, "from_dict", lambda d, **kw: calls.append(1) or real(d, **kw))
    values = [round(0.001 * (i + 1), 6) for i in range(1000)]
    big = write(tmp_path / "big.yaml", yaml.safe_dump({"base": BASE, "axes": {"kl.beta": values, "train.lr": values},
                                                       "seeds": 3}))
    assert main(["sweep", str(big), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "expands to 3000000 runs (1000 kl.beta x 1000 train.lr x 3 seeds)",
                   "bound of 100000 runs", "--max-runs N")
    assert len(calls) == 1  # the base only: no run was expanded or validated
    assert not (tmp_path / "out").exists()
    many_seeds = write(tmp_path / "seeds.yaml", yaml.safe_dump({"base": BASE, "seeds": 10**12}))
    assert main(["sweep", str(many_seeds), "--dry-run"]) == 2  # never materializes a trillion seeds
    one_line_error(capsys, "1000000000000 runs")
    small = write(tmp_path / "small.yaml", yaml.safe_dump({"base": BASE, "axes": {"kl.beta": [0.1, 0.2]},
                                                           "variants": [{"kl.placement": "none"},
                                                                        {"kl.placement": "loss"}], "seeds": 2}))
    assert main(["sweep", str(small), "--dry-run", "--max-runs", "7"]) == 2
    one_line_error(capsys, "8 runs (2 kl.beta x 2 variants x 2 seeds), more than the bound of 7 runs")
    assert main(["sweep", str(small), "--dry-run", "--max-runs", "8"]) == 0
    assert "8 runs" in capsys.readouterr().out
    assert main(["sweep", str(small), "--dry-run", "--max-runs", "0"]) == 2
    one_line_error(capsys, "--max-runs")


def test_max_yaml_values_raises_the_document_bound(tmp_path, capsys):
    grid = write(tmp_path / "g.yaml", f"description:\n  {laughs(3, width=10)}base: {BASE}\n".replace("\na", "\n  a"))
    assert main(["sweep", str(grid), "--dry-run", "--max-yaml-values", "500"]) == 2
    one_line_error(capsys, "holds more than 500 values", "--max-yaml-values N")
    assert main(["sweep", str(grid), "--dry-run", "--max-yaml-values", "5000"]) == 0
    capsys.readouterr()
    padded = write(tmp_path / "padded.yaml", f"base: {BASE}\n" + "#" * 1000 + "\n")  # the file's size is checked first
    assert main(["sweep", str(padded), "--dry-run", "--max-yaml-values", "10"]) == 2
    one_line_error(capsys, "more than 640 (64 bytes per value of --max-yaml-values)", "--max-yaml-values N")


class Recorder(Executor):
    """An executor that only records whether it was started."""

    name = "recorder"
    started = False

    def __init__(self) -> None:
        super().__init__(1)

    def start(self) -> None:
        Recorder.started = True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_sweep_without_cuda_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep_mod, "make_executor", lambda *a, **k: Recorder())
    grid = write(tmp_path / "cuda.yaml", yaml.safe_dump({"base": BASE, "axes": {"device": ["cpu", "cuda"]},
                                                         "seeds": 2}))
    out = tmp_path / "out"
    assert main(["sweep", str(grid), "--out", str(out)]) == 2
    one_line_error(capsys, "cuda.yaml: 2 of 4 runs", "device=cuda", "torch.cuda.is_available() is false")
    assert not out.exists() and not Recorder.started
    # reflab run already refuses it the same way
    assert main(["run", "--set", "device=cuda", "--out", str(out)]) == 2
    one_line_error(capsys, "device=cuda")
    assert not out.exists()


def test_a_base_that_is_a_folder_says_so(tmp_path, capsys):
    (tmp_path / "configs").mkdir()
    grid = write(tmp_path / "g.yaml", "base: configs\n")
    assert main(["sweep", str(grid), "--dry-run"]) == 2
    err = one_line_error(capsys, "base: config file", "is a folder, not a YAML file")
    assert "does not exist" not in err
    assert main(["sweep", str(tmp_path / "configs"), "--dry-run"]) == 2
    one_line_error(capsys, "is a folder, not a grid YAML file")
    assert main(["run", str(tmp_path / "configs"), "--out", str(tmp_path / "run")]) == 2
    one_line_error(capsys, "is a folder")
