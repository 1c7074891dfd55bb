"""The report's numbers say what they are: exact KL not negative, n stated, the interval of few seeds is their
range, PoI of each variant over k1 in the reward, the performance profile, heatmap cells that keep small values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import figures as F
from analysis import metrics as M
from analysis.figures import _cell_text
from analysis.improvement import poi_markdown, poi_table
from analysis.summary import MIN_BOOTSTRAP_N, interval_note, summary_markdown, summary_table


def _per_run(values: dict[str, list[float]], beta: float = 0.5) -> pd.DataFrame:
    rows = [{"run_id": f"{v}{i}", "variant": v, "kl.beta": beta, "kl_final": x, "tv_opt_final": x}
            for v, xs in values.items() for i, x in enumerate(xs)]
    return pd.DataFrame(rows)


def test_exact_kl_rounding_below_zero_reads_as_zero() -> None:
    m = pd.DataFrame({"run_id": ["a"] * 3, "variant": ["none"] * 3, "update": [0, 1, 2],
                      "kl_true": [0.0, 0.2, -1.3e-8], "entropy": [1.0, 1.0, 1.0], "reward_scale": [1.0] * 3})
    assert M.drift(m)["kl_final"].iloc[0] == 0.0
    assert M.clamp_rounding(pd.Series([-1.3e-8, -0.5, 0.3])).tolist() == [0.0, -0.5, 0.3]  # a real error shows


def test_few_seeds_get_their_range_said_as_such() -> None:
    per_run = _per_run({"k1 in reward": [1.0, 2.0, 9.0], "k3 as loss": list(np.linspace(0, 1, 8))})
    table = summary_table(per_run, ["variant", "kl.beta"], n_boot=500).set_index("variant")
    small = table.loc["k1 in reward"]
    assert small["n"] == 3 and small["interval"] == "range"
    assert (small["kl_final_lo"], small["kl_final_hi"]) == (1.0, 9.0)
    assert small["kl_final"] == pytest.approx(4.0)  # the IQM of 3 values trims nothing: their mean
    big = table.loc["k3 as loss"]
    assert big["n"] == 8 >= MIN_BOOTSTRAP_N and big["interval"] == "bootstrap95"
    assert 0 < big["kl_final_lo"] < big["kl_final"] < big["kl_final_hi"] < 1
    md = summary_markdown(table.reset_index(), ["variant", "kl.beta"])
    assert "| k1 in reward | 0.5 | 3 | 4 (1 – 9)" in md and "[" in md.split("k3 as loss")[1]
    note = interval_note(table.reset_index(), 2000)
    assert "n = 3–8" in note and "range of the seeds" in note and "95 % percentile bootstrap" in note


def test_poi_over_k1_in_the_reward() -> None:
    per_run = _per_run({"k1 in reward": [0.5, 0.6, 0.7], "k3 as loss": [0.1, 0.2, 0.3],
                        "none": [0.9, 0.95, 0.99]})
    table = poi_table(per_run, ["kl.beta"], "tv_opt_final", lower_is_better=True, n_boot=300).set_index("variant")
    assert table.loc["k3 as loss", "poi"] == 1.0 and table.loc["none", "poi"] == 0.0
    assert table.loc["k3 as loss", "n"] == 3 and table.loc["k3 as loss", "n_baseline"] == 3
    md = poi_markdown(table.reset_index(), ["kl.beta"])
    assert "| k3 as loss | 1.00 [1.00, 1.00] (3×3) |" in md and "β = 0.5" in md


def test_performance_profile_figure(bandit_sweep: Path, tmp_path: Path) -> None:
    from analysis import load

    per_run = M.run_summary(load(bandit_sweep).metrics)
    paths = F.plot_performance_profile(per_run, tmp_path / "profile", tasks=["kl.beta"], n_boot=50,
                                       formats=("png",))
    assert paths[0].stat().st_size > 1000


def test_heatmap_cells_keep_small_values_apart() -> None:
    assert [_cell_text(v) for v in (3e-7, 2.5e-3, 6e-3, 0.0, 0.47, np.nan)] == \
        ["3.0e-7", "2.5e-3", "6.0e-3", "0", "0.47", ""]


def test_heatmap_uses_a_log_scale_when_values_span_decades(bandit_sweep: Path, tmp_path: Path) -> None:
    import matplotlib as mpl

    from analysis import load

    per_run = M.run_summary(load(bandit_sweep).metrics)
    per_run["tv_opt_final"] = np.where(per_run["variant"] == "k1 in reward", 3e-7, per_run["tv_opt_final"])
    seen = {}
    real = mpl.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        seen["norm"] = type(fig.axes[0].collections[0].norm).__name__
        seen["title"] = fig.axes[0].get_title(loc="left")
        return real(fig, *args, **kwargs)

    mpl.figure.Figure.savefig = spy
    try:
        F.plot_heatmap(per_run, tmp_path / "h", value="tv_opt_final", summary=per_run, formats=("png",))
    finally:
        mpl.figure.Figure.savefig = real
    assert seen["norm"] == "LogNorm" and "end of the reward phase" in seen["title"].replace("\n", " ")


def test_has_poi_tells_whether_the_poi_table_has_rows() -> None:
    from analysis.improvement import has_poi

    per_run = pd.DataFrame({"variant": ["k1 in reward", "k1 in reward", "k3 in loss", "none"],
                            "kl.beta": [0.1, 0.3, 0.1, 0.3], "tv_opt_final": [0.1, 0.2, 0.3, np.nan]})
    for frame, conds in ((per_run, ["kl.beta"]), (per_run, []), (per_run.iloc[[0, 1, 3]], ["kl.beta"]),
                         (per_run.iloc[[1, 2, 3]], ["kl.beta"]), (per_run.iloc[[2, 3]], [])):
        table = poi_table(frame, conds, "tv_opt_final", n_boot=20)
        assert has_poi(frame, conds, "tv_opt_final") == (not table.empty)
