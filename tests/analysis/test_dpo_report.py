"""DPO runs in sweeps and reports: one more variant ("DPO", "IPO") next to the PPO placements, their
preference data written as preferences.parquet, and Fig. 7 (DPO vs PPO over β) in the report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

import analysis
from analysis.loading import variant_label
from sim.lab.cli import main
from tests.analysis.sweep_fixture import write_sweep

GRID = {
    "base": {"env": {"id": "bandit", "rewards": [1, 0, 0], "ref_probs": [0.2, 0.5, 0.3]},
             "train": {"updates": 20, "batch": 32, "lr": 0.05}, "dpo": {"pairs": 256, "epochs": 2},
             "log": {"every": 5, "trajectories": 2, "policy_every": 10, "progress": "none"}},
    "axes": {"kl.beta": [0.25, 1.0]},
    "variants": [{"train.algo": "dpo", "dpo.loss": "dpo"}, {"train.algo": "dpo", "dpo.loss": "ipo"},
                 {"train.algo": "ppo", "kl.placement": "reward", "kl.estimator": "k1"}],
    "seeds": 2,
}


def test_variant_label_names_dpo_runs():
    assert variant_label("none", "k1", algo="dpo") == "DPO"
    assert variant_label("reward", "k1", algo="dpo", dpo_loss="ipo") == "IPO"
    assert variant_label("reward", "k1") == "k1 in reward"


def test_dpo_sweep_loads_as_variants_and_reports_fig7(tmp_path: Path):
    out = write_sweep(GRID, tmp_path / "sweep")  # what `reflab sweep` writes, trained in this process
    res = analysis.load(out)
    assert set(res.runs["variant"].astype(str)) == {"DPO", "IPO", "k1 in reward"}
    assert "train.algo" not in res.conditions and "dpo.loss" not in res.conditions
    m = res.metrics
    assert {"kl_true", "tv_opt", "entropy"} <= set(m.columns)
    assert m.groupby("variant", observed=True)["tv_opt"].apply(lambda s: s.notna().all()).all()
    dpo_runs = res.runs[res.runs["variant"].astype(str) == "DPO"]
    for path in dpo_runs["path"]:
        prefs = pq.read_table(Path(path) / "preferences.parquet").to_pandas()
        assert len(prefs) == 2 * 256 and set(prefs["chosen"]) == {True, False}
    assert main(["report", str(out), "--n-boot", "50", "--formats", "png", "--figures", "dpo"]) == 0
    index = (out / "report" / "index.md").read_text()
    assert "Fig. 7" in index and "DPO vs PPO over β" in index
    assert (out / "report" / "fig7_dpo_beta.png").is_file()
    summary = pd.read_csv(out / "report" / "summary.csv")
    assert {"DPO", "IPO", "k1 in reward"} <= set(summary["variant"])
    assert len(summary) == 3 * 2  # variant × β: DPO and PPO runs are not split into separate conditions
