"""Comparing sweeps and never pooling what differs: analysis.load([A, B]), config_id checks in the figures, styles
from config columns, reflab report A B, and the short repr / curve frame of Results."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import figures as F
from analysis import plotting
from analysis.loading import load
from sim.lab.cli import main
from tests.analysis.sweep_fixture import write_sweep

SMALL = {
    "base": {"env": {"id": "bandit", "rewards": [1, 0, 0], "ref_probs": [0.2, 0.5, 0.3]},
             "kl": {"beta": 0.5}, "train": {"updates": 8, "batch": 32, "lr": 0.01},
             "log": {"every": 1, "trajectories": 2, "policy_every": 4, "progress": "none"}},
    "variants": [{"kl.placement": "none"}, {"kl.placement": "reward", "kl.estimator": "k1"},
                 {"kl.placement": "loss", "kl.estimator": "k3"}],
    "seeds": 2,
}


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    fast = copy.deepcopy(SMALL)
    fast["base"]["train"]["lr"] = 0.05
    return write_sweep(SMALL, root / "lr01"), write_sweep(fast, root / "lr05")


def test_load_of_several_folders_keeps_the_keys_that_differ(two_sweeps: tuple[Path, Path]) -> None:
    a, b = two_sweeps
    alone = load(a)
    assert "train.lr" not in alone.keys  # constant within one sweep
    res = load([a, b], labels=["slow", "fast"])
    assert res.kind == "comparison" and res.labels == ["slow", "fast"]
    assert "train.lr" in res.keys and "sweep" in res.keys
    assert res.conditions[:2] == ["variant", "sweep"] and "train.lr" in res.conditions
    assert set(res.metrics["sweep"].astype(str)) == {"slow", "fast"}
    assert all(str(r).split("/")[0] in ("slow", "fast") for r in res.runs["run_id"])
    assert res.runs.groupby(["sweep", "variant"], observed=True)["config_id"].nunique().max() == 1
    with pytest.raises(ValueError, match="labels"):
        load([a, b], labels=["same", "same"])


def test_figures_refuse_a_line_that_mixes_configs(two_sweeps: tuple[Path, Path], tmp_path: Path) -> None:
    """Two loads concatenated: train.lr is a column of neither, but config_id tells the runs apart."""
    a, b = two_sweeps
    mb = load(b).metrics
    mb["run_id"] = "b" + mb["run_id"].astype(str)  # the fixture numbers runs 0000…; real ids are config hashes
    mixed = pd.concat([load(a).metrics, mb], ignore_index=True)
    with pytest.raises(ValueError, match=r"train\.lr: 0\.01, 0\.05"):
        F.plot_kl(mixed, tmp_path / "mixed", formats=("png",))
    with pytest.raises(ValueError, match="train.lr"):
        F.plot_heatmap(mixed, tmp_path / "heat", formats=("png",))


def test_a_comparison_is_drawn_as_overlaid_lines(two_sweeps: tuple[Path, Path], tmp_path: Path) -> None:
    res = load(list(two_sweeps), labels=["slow", "fast"])
    lines = plotting.lines_of(res.metrics)
    assert len(lines) == 6  # 3 variants x 2 sweeps
    markers = {(ln.variant, ln.style.get("marker")) for ln in lines}
    assert len(markers) == 6
    assert any("fast (train.lr = 0.05)" in ln.label for ln in lines)
    paths = F.plot_kl(res.metrics, tmp_path / "kl", formats=("png",))
    assert paths[0].stat().st_size > 1000
    with pytest.raises(ValueError, match="several sweeps"):  # a figure of one panel per variant draws one sweep
        from analysis.policy_figures import plot_final_policy

        plot_final_policy(res.policy, tmp_path / "pol", formats=("png",))


def test_relabelled_variants_keep_distinct_styles(two_sweeps: tuple[Path, Path]) -> None:
    m = load(two_sweeps[0]).metrics
    m = m.assign(variant=m["variant"].cat.rename_categories({"k1 in reward": "ours", "k3 as loss": "baseline"}))
    styles = {ln.variant: ln.style for ln in plotting.lines_of(m)}
    assert styles["ours"]["color"] != styles["baseline"]["color"]
    assert styles["ours"]["dashes"] != styles["baseline"]["dashes"]  # reward solid, loss dashed
    assert plotting.panel_label("ours", m[m["variant"] == "ours"]) == "ours"


def test_report_of_two_sweeps(two_sweeps: tuple[Path, Path], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["report", *map(str, two_sweeps), "--labels", "slow,fast", "--out", str(out), "--formats", "png",
                 "--n-boot", "50", "--figures", "kl,policy"]) == 0
    table = pd.read_csv(out / "summary.csv")
    assert {"sweep", "train.lr"} <= set(table.columns) and len(table) == 6 and (table["n"] == 2).all()
    index = (out / "index.md").read_text()
    assert "comparison of slow, fast" in index
    assert (out / "fig1_kl.png").is_file()
    assert (out / "fig5_policy_sweep-slow.png").is_file() and (out / "fig5_policy_sweep-fast.png").is_file()
    assert main(["report", *map(str, two_sweeps)]) == 2  # several folders need --out
    assert "--out" in capsys.readouterr().err


def _run(root: Path, name: str, cfg: dict, kl: float) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": cfg}))
    (run / "status.json").write_text(json.dumps({"status": "done"}))
    pq.write_table(pa.table({"update": np.arange(3), "kl_true": np.full(3, kl), "entropy": np.ones(3),
                             "reward_scale": np.ones(3)}), run / "metrics.parquet")


def test_runs_that_differ_in_any_config_value_are_never_pooled(tmp_path: Path) -> None:
    """Old folders may hold is_correction with the reward placement, or runs differing only in a key nobody
    swept: they stay apart unless pooled on request."""
    base = {"env": {"id": "bandit"}, "kl": {"placement": "reward", "estimator": "k1", "beta": 0.1,
                                           "is_correction": False}, "train": {"lr": 0.01}}
    for seed in (0, 1):
        _run(tmp_path, f"plain{seed}", {**base, "seed": seed}, 1.0)
        is_corr = {**base, "kl": {**base["kl"], "is_correction": True}, "seed": seed}
        _run(tmp_path, f"is{seed}", is_corr, 2.0)
        _run(tmp_path, f"lr{seed}", {**base, "train": {"lr": 0.03}, "seed": seed}, 3.0)
    res = load(tmp_path)
    assert set(res.runs["variant"].astype(str)) == {"k1 in reward", "k1 in reward (IS)"}
    assert "train.lr" in res.conditions
    per = res.runs.groupby(["variant", "train.lr"], observed=True).size()
    assert per.to_dict() == {("k1 in reward", "0.01"): 2, ("k1 in reward", "0.03"): 2,
                             ("k1 in reward (IS)", "0.01"): 2} or (per == 2).all()
    pooled = load(tmp_path, pool=["train.lr"])
    assert "train.lr" not in pooled.conditions
    assert pooled.runs.groupby("variant", observed=True)["config_id"].nunique().to_dict() == \
        {"k1 in reward": 1, "k1 in reward (IS)": 1}


def test_repr_is_short_and_curves_are_tidy(two_sweeps: tuple[Path, Path]) -> None:
    res = load(two_sweeps[0])
    text = repr(res)
    assert len(text) < 1500 and "6 runs" in text and "k1 in reward" in text
    curves = res.curves("kl_true", n_boot=100)
    assert list(curves.columns[-5:]) == ["update", "n", "value", "lo", "hi"]
    assert len(curves) == 3 * 9 and (curves["n"] == 2).all()
    m = res.metrics
    want = m[(m["variant"] == "k1 in reward") & (m["update"] == 8)]["kl_true"].mean()
    got = curves[(curves["variant"] == "k1 in reward") & (curves["update"] == 8)]["value"].iloc[0]
    assert got == pytest.approx(want)
    assert (curves["lo"] <= curves["value"] + 1e-12).all() and (curves["value"] <= curves["hi"] + 1e-12).all()
