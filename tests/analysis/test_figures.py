"""Every figure function draws a non-empty file from a small real sweep."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from analysis import figures as F
from analysis import loading, plotting
from analysis import metrics as M
from analysis import policy_figures as P
from analysis.loading import load


def written(paths: list[Path], suffixes: tuple[str, ...] = (".png",)) -> None:
    assert [p.suffix for p in paths] == list(suffixes)
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000, p


@pytest.fixture(scope="module")
def bandit(bandit_sweep: Path):
    return load(bandit_sweep)


@pytest.fixture(scope="module")
def bandit_beta(bandit):
    """The bandit sweep's metrics at one β (one condition)."""
    return bandit.metrics[bandit.metrics["kl.beta"] == 0.25]


def test_variant_styles_are_distinct() -> None:
    styles = {v: plotting.variant_style(v) for v in loading.VARIANT_ORDER}
    pairs = {(tuple(s["color"]) if not isinstance(s["color"], str) else s["color"], s["dashes"])
             for s in styles.values()}
    assert len(pairs) == len(loading.VARIANT_ORDER)
    assert plotting.variant_parts("k3 as loss (IS)") == ("loss", "k3", True)


def test_kl_figure_pdf_and_png(bandit_beta, tmp_path: Path) -> None:
    paths = F.plot_kl(bandit_beta, tmp_path / "kl.pdf", seeds=True, title="β = 0.25")
    written(paths, (".pdf", ".png"))
    pdf = paths[0].read_bytes()
    assert pdf.startswith(b"%PDF") and b"/Type3" not in pdf  # TrueType (fonttype 42), no Type 3 fonts


def test_kl_figure_log_and_single_layout(bandit_beta, tmp_path: Path) -> None:
    written(F.plot_kl(bandit_beta, tmp_path / "kl_log", log=True, layout="single", formats=("png",)))


def test_entropy_figure(bandit_beta, tmp_path: Path) -> None:
    written(F.plot_entropy(bandit_beta, tmp_path / "entropy", formats=("png",)))


def test_recovery_figure(bandit_beta, tmp_path: Path) -> None:
    written(F.plot_recovery(bandit_beta, tmp_path / "recovery", before=10, formats=("png",)))


def test_heatmap_over_beta(bandit, tmp_path: Path) -> None:
    written(F.plot_heatmap(bandit.metrics, tmp_path / "heat", value="kl_final", formats=("png",)))
    written(F.plot_heatmap(bandit.metrics, tmp_path / "heat_c", value="collapsed", stat="mean", formats=("png",)))


def test_a_narrow_heatmap_with_a_long_title_is_laid_out_without_warnings(bandit, tmp_path: Path) -> None:
    """A one-β heatmap (the narrowest) titled with a long condition label: its title is wrapped to the figure
    instead of leaving constrained layout no room ("axes sizes collapsed to zero", a UserWarning per figure)."""
    one_beta = M.run_summary(bandit.metrics[bandit.metrics["kl.beta"] == 0.25])
    one_beta = one_beta[one_beta["variant"].astype(str).isin(["none", "k1 in reward", "k3 as loss"])]
    title = "final TV distance to the optimum, IQM over seeds (train.lr = 1e+06, env.horizon = 12)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        paths = F.plot_heatmap(one_beta, tmp_path / "heat", value="tv_opt_final", summary=one_beta, title=title,
                               formats=("pdf", "png"))
    written(paths, (".pdf", ".png"))


def test_bandit_final_policy(bandit, tmp_path: Path) -> None:
    pol = bandit.policy[bandit.policy["kl.beta"] == 0.25]
    written(P.plot_final_policy(pol, tmp_path / "policy", formats=("png",)))


def test_gridworld_final_policy(grid_sweep: Path, tmp_path: Path) -> None:
    res = load(grid_sweep)
    cfg = res.config(str(res.runs["run_id"].iloc[0]))
    few = res.policy[res.policy["variant"].isin(["k1 in reward", "k3 in reward"])]  # 4 panels: ref, π*, 2 runs
    written(P.plot_final_policy(few, tmp_path / "grid_policy", config=cfg, formats=("png",)))
    written(F.plot_kl(res.metrics, tmp_path / "grid_kl", formats=("png",)))


def test_gaussian_final_policy_and_curves(gauss_sweep: Path, tmp_path: Path) -> None:
    res = load(gauss_sweep)
    written(P.plot_final_policy(res.policy, tmp_path / "gauss_policy", formats=("png",)))
    written(F.plot_kl(res.metrics, tmp_path / "gauss_kl", formats=("png",)))
    written(F.plot_estimators(res.metrics, tmp_path / "gauss_est", formats=("png",)))


def test_estimator_figure_from_trajectories_and_batches(bandit, bandit_beta, tmp_path: Path) -> None:
    traj = bandit.trajectories[bandit.trajectories["kl.beta"] == 0.25]
    written(F.plot_estimators(bandit_beta, tmp_path / "est_traj", trajectories=traj, formats=("png",)))
    written(F.plot_estimators(bandit_beta, tmp_path / "est_batch", formats=("png",)))


def test_curves_refuse_mixed_conditions(bandit, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kl.beta"):
        F.plot_kl(bandit.metrics, tmp_path / "mixed", formats=("png",))
    conditions = [c for c, _ in plotting.split_conditions(bandit.metrics)]
    assert conditions == [{"kl.beta": 0.25}, {"kl.beta": 1.0}]
    assert plotting.condition_label(conditions[0]) == "β = 0.25"


def test_single_run_figures(single_run: Path, tmp_path: Path) -> None:
    res = load(single_run)
    written(F.plot_kl(res.metrics, tmp_path / "one_kl", formats=("png",)))
    written(P.plot_final_policy(res.policy, tmp_path / "one_policy", formats=("png",)))


def _placed_texts(fig) -> list:
    """``(text, window extent)`` of the figure's titles, legend entries and texts placed in its axes (not the
    tick labels), after drawing it."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    texts = [*fig.texts]
    for ax in fig.axes:
        legend = ax.get_legend()
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts,
                  *(legend.get_texts() if legend is not None else [])]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text()]


def test_kl_reference_lines_are_named_without_overlapping_text(bandit_beta, tmp_path: Path, monkeypatch) -> None:
    """Two reference KLs close together near the top of a log axis: each is named once per panel (in the
    legend) and no two texts of the figure overlap (labels drawn on the lines lay on top of each other and of
    the panel title)."""
    figs = []
    save = F.save
    monkeypatch.setattr(F, "save", lambda fig, *a, **kw: figs.append(fig) or save(fig, *a, **kw))
    top = float(bandit_beta["kl_true"].max())
    refs = [(r"KL($\pi^*\|\pi_{\mathrm{ref}}$)", 0.8 * top, 10.0), ("k3-as-loss point", 0.9 * top, 10.0)]
    F.plot_kl(bandit_beta, tmp_path / "kl", log=True, references=refs, title="β = 0.25", formats=("png",))
    fig = figs[0]
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()][-2:] == [label for label, _, _ in refs]
    texts = _placed_texts(fig)
    assert len(texts) > 8
    overlaps = [(a, b) for i, (a, box_a) in enumerate(texts) for b, box_b in texts[i + 1:]
                if box_a.overlaps(box_b) and box_a.intersection(box_a, box_b).width > 0.5]
    assert not overlaps


def test_log_axes_spanning_many_decades_lose_only_their_minor_ticks(tmp_path):
    import math

    import matplotlib as mpl

    from analysis.plotting import MINOR_TICK_MAX_DECADES, new_figure, save

    fig = new_figure(3.0, 2.0)
    wide, narrow = fig.subplots(1, 2)
    wide.plot([1, 2], [1e-6, 10.0])
    narrow.plot([1, 2], [0.1, 10.0])
    for ax in (wide, narrow):
        ax.set_yscale("log")
    assert math.log10(wide.get_ylim()[1] / wide.get_ylim()[0]) > MINOR_TICK_MAX_DECADES
    majors = list(wide.yaxis.get_majorticklocs())
    save(fig, tmp_path / "ticks", ["png"])
    assert isinstance(wide.yaxis.get_minor_locator(), mpl.ticker.NullLocator)
    assert type(narrow.yaxis.get_minor_locator()) is mpl.ticker.LogLocator
    assert list(wide.yaxis.get_majorticklocs()) == majors and len(wide.yaxis.get_minorticklocs()) == 0
