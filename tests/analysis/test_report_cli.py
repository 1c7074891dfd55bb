"""``reflab report DIR`` end to end: index.md, tables and figures, problems reported, bad input refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from sim.lab.cli import main


def test_report_of_a_sweep(bandit_sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(["report", str(bandit_sweep), "--out", str(out), "--formats", "png", "--n-boot", "200",
                 "--max-conditions", "1"]) == 0
    assert "32 of 32 runs" in capsys.readouterr().out
    index = (out / "index.md").read_text()
    for kind in ("fig1_kl_beta-0.25", "fig2_entropy_beta-0.25", "fig3_recovery_beta-0.25", "fig4_heatmap_kl_final",
                 "fig4_heatmap_collapsed", "fig4_heatmap_kl_end", "fig5_policy_beta-0.25", "fig6_estimators_beta-0.25"):
        files = list(out.glob(f"{kind}*.png"))
        assert files and all(f.stat().st_size > 1000 for f in files), kind
        assert all(f.name in index for f in files)
    assert "## Runs without results" not in index
    table = pd.read_csv(out / "summary.csv")
    assert len(table) == 16 and {"variant", "kl.beta", "n", "kl_final", "kl_final_lo", "kl_final_hi", "collapsed",
                                 "kl_end", "returned"} <= set(table.columns)
    assert (table["n"] == 2).all()
    assert "| variant | β | n |" in (out / "summary.md").read_text()
    assert len(pd.read_csv(out / "runs.csv")) == 32


def test_report_lists_failed_and_missing_runs(broken_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["report", str(broken_sweep), "--out", str(out), "--formats", "png", "--n-boot", "50",
                 "--max-conditions", "1", "--figures", "kl"]) == 0
    index = (out / "index.md").read_text()
    assert "## Runs without results" in index and "| failed | RuntimeError: boom |" in index
    assert "| missing |" in index
    assert "Curve figures were drawn for the first 1 conditions only" in index
    assert [p.name for p in out.glob("*.png")] == ["fig1_kl_beta-0.25.png"]
    assert pd.read_csv(out / "summary.csv")["n"].sum() == 30


def test_report_of_a_single_run_defaults_to_dir_report(single_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    assert main(["report", str(run), "--formats", "png", "--n-boot", "50", "--figures", "kl,recovery"]) == 0
    out = run / "report"
    assert (out / "index.md").is_file()
    assert (out / "fig1_kl.png").is_file() and not (out / "fig1_kl.pdf").exists()
    assert (out / "fig3_recovery.png").is_file() and not (out / "fig5_policy.png").exists()
    assert len(pd.read_csv(out / "summary.csv")) == 1


def test_report_of_a_gridworld_sweep(grid_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["report", str(grid_sweep), "--out", str(out), "--formats", "png", "--n-boot", "50",
                 "--figures", "kl,estimators"]) == 0
    assert (out / "fig1_kl.png").is_file() and (out / "fig6_estimators.png").is_file()
    assert "## Figures that could not be drawn" not in (out / "index.md").read_text()


def test_report_without_results_still_writes_index(tmp_path: Path, broken_sweep: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    shutil.copytree(broken_sweep, empty)
    for f in empty.glob("runs/*/metrics.parquet"):
        f.unlink()
    assert main(["report", str(empty), "--formats", "png"]) == 1
    assert "no run" in capsys.readouterr().err
    assert "No run has metrics" in (empty / "report" / "index.md").read_text()


def _with_report_figures(sweep: Path, dest: Path, figures: object) -> Path:
    """A copy of ``sweep`` whose ``sweep.json`` names ``figures`` in its grid's ``report`` section."""
    shutil.copytree(sweep, dest)
    spec = json.loads((dest / "sweep.json").read_text())
    spec["report"] = {"figures": figures}
    (dest / "sweep.json").write_text(json.dumps(spec))
    return dest


def test_report_draws_the_kinds_the_sweeps_grid_names(bandit_sweep: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = _with_report_figures(bandit_sweep, tmp_path / "sweep", ["heatmap"])
    out = tmp_path / "chosen"
    assert main(["report", str(src), "--out", str(out), "--formats", "png", "--n-boot", "20"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names and all(n.startswith("fig4_heatmap_") for n in names)
    index = (out / "index.md").read_text()
    assert "Figure kinds drawn: heatmap, as the sweep's grid asks (`report.figures`)" in index
    assert "`reflab report DIR --figures all` also draws kl, entropy" in index
    assert "### β = 0.25" not in index  # no empty per-condition section for the curve figures not drawn
    # --figures overrides the grid's choice; `all` is every kind
    every = tmp_path / "every"
    assert main(["report", str(src), "--out", str(every), "--formats", "png", "--n-boot", "20",
                 "--max-conditions", "1", "--figures", "all"]) == 0
    assert list(every.glob("fig1_kl_*.png")) and list(every.glob("fig5_policy_*.png"))
    assert "Figure kinds drawn" not in (every / "index.md").read_text()
    capsys.readouterr()
    # a sweep.json naming something else: one line, nothing written
    bad = _with_report_figures(bandit_sweep, tmp_path / "bad", ["kl", "pie"])
    assert main(["report", str(bad), "--formats", "png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sweep.json: report.figures must be a list of figure kinds" in err[0], err
    assert not (bad / "report").exists()


def test_report_bad_input(tmp_path: Path, bandit_sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("reflab: error:")
    assert main(["report", str(bandit_sweep), "--formats", "gif"]) == 2
    assert "--formats" in capsys.readouterr().err
    assert main(["report", str(bandit_sweep), "--figures", "kl,pie"]) == 2
    assert "--figures" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2  # an empty folder is neither a run nor a sweep


def test_report_of_a_gaussian_sweep(gauss_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["report", str(gauss_sweep), "--out", str(out), "--formats", "png", "--n-boot", "50",
                 "--figures", "entropy,policy"]) == 0
    index = (out / "index.md").read_text()
    assert "Differential entropy" in index and "Gibbs optimum" in index
    table = pd.read_csv(out / "summary.csv")
    assert "collapsed" not in table.columns  # no absolute entropy threshold for a Gaussian
    assert "kl_opt_final" in table.columns


def _damage(sweep: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of ``sweep`` whose first run's metrics.parquet is truncated and second run's policy.parquet has a
    garbage footer; both runs' status.json still say done."""
    out = tmp_path / "damaged"
    shutil.copytree(sweep, out)
    ids = [str(r) for r in pd.read_parquet(out / "index.parquet")["run_id"]]
    metrics = out / "runs" / ids[0] / "metrics.parquet"
    metrics.write_bytes(metrics.read_bytes()[: metrics.stat().st_size // 2])
    policy = out / "runs" / ids[1] / "policy.parquet"
    policy.write_bytes(policy.read_bytes()[:-16] + b"\xff" * 16)
    return out, ids


def test_report_names_every_unreadable_run(bandit_sweep: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    src, ids = _damage(bandit_sweep, tmp_path)
    out = tmp_path / "report"
    assert main(["report", str(src), "--out", str(out), "--formats", "png", "--n-boot", "20", "--figures",
                 "none"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"report: {out / 'index.md'} (30 of 32 runs with results, 0 figure files; 2 unreadable "
                           "runs left out: ")
    assert f"{ids[0]} (metrics.parquet)" in line and f"{ids[1]} (policy.parquet)" in line
    index = (out / "index.md").read_text()
    assert "(sweep of 32 runs; done 30, unreadable 2)" in index
    assert f"| {ids[0]} | unreadable | metrics.parquet: " in index
    assert f"| {ids[1]} | unreadable | policy.parquet: " in index
    assert "trains them again" in index
    assert pd.read_csv(out / "summary.csv")["n"].sum() == 30


def test_report_refuses_unreadable_sweep_metadata_in_one_line(bandit_sweep: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    def damaged(name: str, content: bytes) -> Path:
        out = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(bandit_sweep, out)
        (out / name).write_bytes(content)
        return out

    cases = [(damaged("index.parquet", b"garbage, not parquet"), "index.parquet is not a readable Parquet table"),
             (damaged("sweep.json", b"{not json"), "sweep.json is unreadable"),
             (damaged("sweep.json", b"[1, 2]"), "sweep.json holds list")]
    no_run_id = tmp_path / "no_run_id"
    shutil.copytree(bandit_sweep, no_run_id)
    pd.read_parquet(no_run_id / "index.parquet").drop(columns="run_id").to_parquet(no_run_id / "index.parquet")
    cases.append((no_run_id, "index.parquet has no run_id column"))
    for src, needle in cases:
        assert main(["report", str(src), "--formats", "png", "--figures", "none"]) == 2, needle
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
        assert captured.err.startswith("reflab: error: ") and needle in captured.err
        assert "reflab sweep" in captured.err
        assert not (src / "report").exists()
