"""Figures of policies: the final policy against the reference and the optimum (bandit arms, gridworld
arrows, Gaussian densities) and the continuous-action figures (Gaussian mean/std over updates, the diffusion
chain's mode mix and x_0 distribution). Same conventions as :mod:`analysis.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd

from analysis import metrics as M
from analysis.loading import variant_order
from analysis.plotting import (
    COLUMN_WIDTH,
    FORMATS,
    PAGE_WIDTH,
    check_one_condition,
    draw_variant,
    finish_panels,
    mark_off,
    new_figure,
    off_spans,
    panel_label,
    paper_style,
    placement_groups,
    save,
    variant_style,
)

#: The light end of the gridworld's occupancy colour map (seaborn's ``"light:#3b6fb6"``: that blue's hue at
#: 95 % lightness and 15 % of its saturation in HUSL).
LIGHT_GREY_BLUE = (0.9409937142862176, 0.943548350639932, 0.950146500466969)
#: A bandit policy figure labels every arm up to this many arms.
MAX_ARM_TICKS = 30

# ----------------------------------------------------------------------------------------------------------
# Final policy vs reference and optimum
# ----------------------------------------------------------------------------------------------------------


@paper_style
def plot_final_policy(policy: pd.DataFrame, path: str | Path, *, config: dict | None = None,
                      update: int | str = "last", seed: int | None = None, ncols: int | None = None,
                      title: str | None = None, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Figure 5: the final policy of each variant against the reference and the KL-regularized optimum.

    - Bandit (one state): per variant, bars = mean probability of each arm over seeds (dots = single
      seeds), grey ticks = π_ref, black diamonds = the optimum π*.
    - Gridworld (needs ``config``, the run config, to rebuild the layout): per variant, shading = expected
      visits per episode to each cell, arrows = the occupancy-weighted action probabilities (length ∝
      probability) of one seed (``seed``, default the first); panels for π_ref and π* first.
    - Gaussian bandit: densities of the first action dimension (policy, reference, optimum).

    Args:
        policy: ``policy`` rows of one condition.
        config: a run config (``Results.config(run_id)``) — needed for the gridworld.
        update: the policy snapshot to draw (``"last"`` = each run's last).
    """
    check_one_condition(policy)
    p = M.at_update(policy, update)
    if "dim" in p.columns:
        return _plot_gaussian_policy(p, path, title, formats)
    env_id = (config or {}).get("env", {}).get("id")
    if env_id == "gridworld":
        return _plot_grid_policy(p, path, config or {}, seed, ncols, title, formats)
    return _plot_bandit_policy(p, path, ncols, title, formats)


def _plot_bandit_policy(p: pd.DataFrame, path: str | Path, ncols: int | None, title: str | None,
                        formats: Sequence[str]) -> list[Path]:
    variants = variant_order(p["variant"].unique())
    ncols = max(1, min(ncols or 2, len(variants)))
    nrows = int(np.ceil(len(variants) / ncols))
    fig = new_figure(COLUMN_WIDTH, max(1.9, 0.45 + 0.85 * nrows))  # one variant still gets a readable panel
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    state0 = p[p["state"] == p["state"].min()]
    arms = np.sort(state0["action"].unique())
    for ax, v in zip(axes, variants, strict=False):
        rows = state0[state0["variant"] == v]
        wide = rows.pivot_table(index="run_id", columns="action", values="prob", observed=True)
        colour = variant_style(v)["color"]
        _bars(ax, arms, wide.mean(axis=0).reindex(arms).to_numpy(), colour)
        # every seed's dots as one line (the same markers in the same order as a line per seed)
        jitter = np.linspace(-0.18, 0.18, max(len(wide), 1))
        per_seed = wide.reindex(columns=arms).to_numpy(float)
        ax.plot((arms[None, :] + jitter[:len(per_seed), None]).ravel(), per_seed.ravel(), ls="none", marker=".",
                ms=1.8, color="0.2", zorder=3)
        ref = rows.groupby("action")["ref_prob"].first().reindex(arms).to_numpy()
        opt = rows.groupby("action")["opt_prob"].first().reindex(arms).to_numpy()
        _ticks(ax, arms, ref)
        if np.isfinite(opt).any():
            ax.plot(arms, opt, ls="none", marker="D", ms=2.6, mfc="none", mec="black", mew=0.7, zorder=5,
                    label=r"optimum $\pi^*$")
        ax.set_title(v, loc="left", pad=1.5)
        ax.set_ylim(0, 1.02)
        if len(arms) <= MAX_ARM_TICKS:  # one tick per arm; more would overlap (matplotlib's ticks instead)
            ax.set_xticks(arms)
    return finish_panels(fig, axes, len(variants), "arm", "probability", 2, title, path, formats)


def _bars(ax: mpl.axes.Axes, x: np.ndarray, heights: np.ndarray, colour: str) -> None:
    """Bars of width 0.7 at ``x``; past :data:`MAX_ARM_TICKS` arms one collection of the same rectangles (a patch
    per bar costs seconds with hundreds of arms)."""
    if len(x) <= MAX_ARM_TICKS:
        ax.bar(x, heights, width=0.7, color=colour, alpha=0.85, lw=0)
        return
    h = np.nan_to_num(np.asarray(heights, dtype=float))
    left, right = x - 0.35, x + 0.35
    verts = np.stack([np.stack([left, np.zeros_like(h)], -1), np.stack([left, h], -1),
                      np.stack([right, h], -1), np.stack([right, np.zeros_like(h)], -1)], axis=1)
    bars = mpl.collections.PolyCollection(verts, facecolors=colour, alpha=0.85, linewidths=0, edgecolors="none")
    ax.add_collection(bars, autolim=True)
    ax.sticky_edges.y.append(0)


def _ticks(ax: mpl.axes.Axes, x: np.ndarray, ref: np.ndarray) -> None:
    """π_ref's probability of each arm as a grey horizontal tick of width 0.84 at ``x``; past
    :data:`MAX_ARM_TICKS` arms one line broken between the ticks (one stroke instead of one per arm)."""
    style = {"color": "0.55", "lw": 1.2, "zorder": 4, "label": r"$\pi_{\mathrm{ref}}$"}
    if len(x) <= MAX_ARM_TICKS:
        ax.hlines(ref, x - 0.42, x + 0.42, **style)
        return
    gap = np.full_like(ref, np.nan, dtype=float)
    xs = np.stack([x - 0.42, x + 0.42, gap], -1).ravel()
    ys = np.stack([ref, ref, gap], -1).ravel()
    ax.plot(xs, ys, solid_capstyle="butt", **style)


def _plot_grid_policy(p: pd.DataFrame, path: str | Path, config: dict, seed: int | None, ncols: int | None,
                      title: str | None, formats: Sequence[str]) -> list[Path]:
    import torch

    from analysis.gridworld import fold_to_cells, policy_table, world_from_config

    world = world_from_config(config)
    S, A = world.mdp.n_states, world.mdp.n_actions
    variants = variant_order(p["variant"].unique())
    chosen_seed = seed if seed is not None else int(p["seed"].min())
    first = p[p["seed"] == chosen_seed] if (p["seed"] == chosen_seed).any() else p
    any_run = first[first["run_id"] == first["run_id"].iloc[0]]
    panels: list[tuple[str, np.ndarray]] = [
        (r"reference $\pi_{\mathrm{ref}}$", policy_table(any_run, S, A, "ref_prob"))]
    if any_run["opt_prob"].notna().all():
        panels.append((r"optimum $\pi^*$", policy_table(any_run, S, A, "opt_prob")))
    for v in variants:
        rows = first[first["variant"] == v]
        run = rows[rows["run_id"] == rows["run_id"].iloc[0]]
        panels.append((v, policy_table(run, S, A, "prob")))
    ncols = max(1, min(ncols or 5, len(panels)))
    nrows = int(np.ceil(len(panels) / ncols))
    # Crop the grid to the bounding box of its non-wall cells (layouts are framed by walls).
    rc = world.cell_rc.numpy()
    r0, r1, c0, c1 = rc[:, 0].min(), rc[:, 0].max(), rc[:, 1].min(), rc[:, 1].max()
    aspect = (r1 - r0 + 1) / (c1 - c0 + 1)
    width = COLUMN_WIDTH if ncols <= 3 else PAGE_WIDTH
    fig = new_figure(width, 0.35 + nrows * (width / ncols) * aspect * 1.12)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    folded = [fold_to_cells(world, probs) for _, probs in panels]
    vmax = max(float(f.occupancy.max()) for f in folded)
    cmap = mpl.colors.LinearSegmentedColormap.from_list("blend", [LIGHT_GREY_BLUE, mpl.colors.to_rgb("#3b6fb6")])
    norm = mpl.colors.PowerNorm(0.5, vmin=0.0, vmax=vmax)
    goal_of_cell = world.goal_of_cell.numpy()
    lava = world.lava.numpy()
    dx = np.array([0.0, 1.0, 0.0, -1.0])  # up, right, down, left in image coordinates (row 0 at the top)
    dy = np.array([-1.0, 0.0, 1.0, 0.0])
    for ax, (name, _), cp in zip(axes, panels, folded, strict=False):
        img = world.to_grid(torch.from_numpy(cp.occupancy)).numpy()
        ax.imshow(np.where(world.walls, np.nan, img), cmap=cmap, norm=norm, interpolation="nearest")
        ax.imshow(np.where(world.walls, 1.0, np.nan), cmap=mpl.colors.ListedColormap(["0.3"]), vmin=0, vmax=1,
                  interpolation="nearest")
        for c in range(world.n_cells):
            r, col = rc[c]
            if goal_of_cell[c] >= 0 or lava[c]:
                text = f"{world.goal_rewards[goal_of_cell[c]]:g}" if goal_of_cell[c] >= 0 else "L"
                ax.text(col, r, text, ha="center", va="center", fontsize=5.5, fontweight="bold",
                        color="#1b7837" if goal_of_cell[c] >= 0 else "#b2182b")
                continue
            if cp.occupancy[c] < 1e-3:
                continue
            # one spoke per action: length ∝ its probability relative to the cell's most likely action (so a
            # uniform cell is a full cross), width ∝ the probability; an arrow head marks the most likely action
            probs = cp.probs[c]
            top = int(np.argmax(probs))
            for a in range(A):
                if probs[a] < 0.05:
                    continue
                length = 0.42 * probs[a] / probs[top]
                ax.plot([col, col + dx[a] * length], [r, r + dy[a] * length], color="black",
                        lw=0.3 + 1.5 * probs[a], solid_capstyle="butt", zorder=5)
            if probs[top] >= 0.4:
                ax.annotate("", (col + dx[top] * 0.44, r + dy[top] * 0.44), (col + dx[top] * 0.2, r + dy[top] * 0.2),
                            arrowprops={"arrowstyle": "-|>,head_length=0.35,head_width=0.2", "color": "black",
                                        "lw": 0.3 + 1.5 * probs[top], "shrinkA": 0, "shrinkB": 0}, zorder=6)
        sr, sc = rc[world.start_cell]
        ax.add_patch(mpl.patches.Rectangle((sc - 0.5, sr - 0.5), 1, 1, fill=False, ec="#d95f02", lw=0.9))
        ax.set_xlim(c0 - 0.5, c1 + 0.5)
        ax.set_ylim(r1 + 0.5, r0 - 0.5)
        ax.set_title(name, loc="left", fontsize=6, pad=1.5)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes.tolist(), shrink=0.6, pad=0.01,
                 label="visits per episode")
    explain = (f"final policy (seed {chosen_seed}); spokes: π(a | cell), occupancy-weighted over time (length "
               "relative to the most likely action, width ∝ probability; head: most likely); box: start")
    fig.suptitle((f"{title}: " if title else "") + explain, fontsize=6)
    return save(fig, path, formats)


def _plot_gaussian_policy(p: pd.DataFrame, path: str | Path, title: str | None,
                          formats: Sequence[str]) -> list[Path]:
    d0 = p[p["dim"] == p["dim"].min()]
    variants = variant_order(d0["variant"].unique())
    fig = new_figure(COLUMN_WIDTH, 1.9)
    ax = fig.subplots()
    mean_all = pd.concat([d0["mean"], d0["ref_mean"], d0["opt_mean"]]).dropna()
    std_all = pd.concat([d0["std"], d0["ref_std"], d0["opt_std"]]).dropna()
    lo = float((mean_all - 3.5 * std_all.max()).min())
    hi = float((mean_all + 3.5 * std_all.max()).max())
    xs = np.linspace(lo, hi, 400)

    def density(mu: float, sd: float) -> np.ndarray:
        return np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))

    ref = d0.iloc[0]
    ax.fill_between(xs, density(ref["ref_mean"], ref["ref_std"]), color="0.85", lw=0, label=r"$\pi_{\mathrm{ref}}$")
    if np.isfinite(ref["opt_mean"]):
        ax.plot(xs, density(ref["opt_mean"], ref["opt_std"]), color="0.35", lw=0.9, ls=(0, (4, 1, 1, 1)),
                label=r"optimum $\pi^*$")
    for v in variants:
        rows = d0[d0["variant"] == v]
        ax.plot(xs, density(rows["mean"].mean(), rows["std"].mean()), label=v, **variant_style(v))
    ax.set_xlabel("action (dimension 0)")
    ax.set_ylabel("density")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title, loc="left")
    return save(fig, path, formats)

# ----------------------------------------------------------------------------------------------------------
# Continuous actions: Gaussian policy trajectories, diffusion x_0 distribution and mode mix
# ----------------------------------------------------------------------------------------------------------


def first_run_line(metrics: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """``(update, column)`` of the first run that has ``column`` (phase-wise optima are shared by the runs of
    one condition)."""
    m = metrics[metrics[column].notna()] if column in metrics else metrics.iloc[:0]
    if m.empty:
        return np.zeros(0), np.zeros(0)
    first = m[m["run_id"] == m["run_id"].iloc[0]].sort_values("update")
    return first["update"].to_numpy(float), first[column].to_numpy(float)


@paper_style
def plot_gaussian_trajectory(metrics: pd.DataFrame, path: str | Path, *, title: str | None = None,
                             n_boot: int = 1000, seed: int = 0, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Gaussian bandit: the policy's mean (dimension 0) and std vs update against the Gibbs optimum.

    Columns: mean, std; rows: one per KL placement (no KL repeated in each). Lines are the mean over seeds
    with a 95 % bootstrap band; the black dashed line is the optimum ``μ*``/``σ*`` of the current phase (the
    reference once the reward is off; metrics ``opt_mean``/``opt_std``; absent where there is no closed form).
    """
    check_one_condition(metrics)
    m = metrics[metrics["policy_mean"].notna()] if "policy_mean" in metrics else metrics.iloc[:0]
    variants = variant_order(m["variant"].unique()) if not m.empty else []
    panels = placement_groups(variants, "placement")
    fig = new_figure(PAGE_WIDTH * 0.8, 1.35 * len(panels) + 0.55)
    axes = fig.subplots(len(panels), 2, sharex=True, squeeze=False)
    spans = off_spans(metrics)
    by_variant = {str(k): v for k, v in m.groupby("variant", observed=True)}
    for col, (column, opt_col, ylabel) in enumerate((("policy_mean", "opt_mean", "policy mean μ (dim 0)"),
                                                     ("policy_std", "opt_std", "policy std σ"))):
        ox, oy = first_run_line(metrics, opt_col)
        for row, (panel_title, members) in enumerate(panels):
            ax = axes[row, col]
            mark_off(ax, spans, label=row == 0 and col == 0)
            for j, v in enumerate(members):
                label = panel_label(v)
                draw_variant(ax, by_variant[v], v, column, False, "mean", n_boot, seed + j, label)
            if oy.size:
                ax.plot(ox, oy, color="black", lw=0.9, ls=(0, (3, 1.5)), zorder=4, label="optimum")
            if panel_title:
                ax.set_title(panel_title, loc="left")
            ax.set_ylabel(ylabel)
            if col == 1 and members:
                ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=2.4, borderaxespad=0.2)
    for ax in axes[-1]:
        ax.set_xlabel("update")
    if title:
        fig.suptitle(title, fontsize=7)
    return save(fig, path, formats)


def rewarded_mode(metrics: pd.DataFrame) -> int | None:
    """The mixture component the reward favours most: largest tilt / reference mode fraction in the reward
    phase (diffusion-chain metrics ``opt_mode_frac_<m>``, ``ref_mode_frac_<m>``); ``None`` if unknown."""
    modes = sorted(int(c.rsplit("_", 1)[1]) for c in metrics.columns if c.startswith("opt_mode_frac_"))
    if not modes:
        return None
    rows = M.reward_phase(metrics)
    ratios = [float((rows[f"opt_mode_frac_{k}"] / rows[f"ref_mode_frac_{k}"]).mean()) for k in modes]
    if not np.isfinite(ratios).any():
        return None
    return modes[int(np.nanargmax(ratios))]


@paper_style
def plot_mode_mix(metrics: pd.DataFrame, path: str | Path, *, mode: int | None = None, title: str | None = None,
                  n_boot: int = 1000, seed: int = 0, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Diffusion chain: the fraction of x_0 in the rewarded mixture component vs update, per variant.

    ``mode_frac_<m>`` = mean posterior probability p_data(m | x_0) over an evaluation batch. Black dashed:
    the same statistic for the KL-optimal tilt p* ∝ p_ref·e^{r/β} of the current phase (the reference once
    the reward is off); grey dotted: the reference chain. Mean over seeds with a 95 % bootstrap band.
    """
    check_one_condition(metrics)
    mode = rewarded_mode(metrics) if mode is None else mode
    if mode is None:
        raise ValueError("no mode_frac_<m> columns: not a diffusion-chain run")
    column = f"mode_frac_{mode}"
    m = metrics[metrics[column].notna()]
    variants = variant_order(m["variant"].unique()) if not m.empty else []
    panels = placement_groups(variants, "placement")
    fig = new_figure(COLUMN_WIDTH, 1.35 * len(panels) + 0.55)
    axes = fig.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    spans = off_spans(metrics)
    ox, oy = first_run_line(metrics, f"opt_mode_frac_{mode}")
    rx, ry = first_run_line(metrics, f"ref_mode_frac_{mode}")
    by_variant = {str(k): v for k, v in m.groupby("variant", observed=True)}
    for i, (ax, (panel_title, members)) in enumerate(zip(axes, panels, strict=True)):
        mark_off(ax, spans, label=i == 0)
        if ry.size:
            ax.plot(rx, ry, color="0.5", lw=0.8, ls=(0, (1, 1)), zorder=1, label="reference")
        if oy.size:
            ax.plot(ox, oy, color="black", lw=0.9, ls=(0, (3, 1.5)), zorder=4, label="tilt p*")
        for j, v in enumerate(members):
            label = panel_label(v)
            draw_variant(ax, by_variant[v], v, column, False, "mean", n_boot, seed + j, label)
        if panel_title:
            ax.set_title(panel_title, loc="left")
        ax.set_ylabel(f"x$_0$ in mode {mode}")
        ax.set_ylim(-0.02, 1.02)
        if members:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), handlelength=2.4, borderaxespad=0.2)
    axes[-1].set_xlabel("update")
    if title:
        fig.suptitle(title, fontsize=7)
    return save(fig, path, formats)


@paper_style
def plot_x0_distribution(samples: pd.DataFrame, density: pd.DataFrame, path: str | Path, *,
                         reward_end: int | None = None, bins: int = 40, ncols: int = 4, title: str | None = None,
                         formats: Sequence[str] = FORMATS) -> list[Path]:
    """Diffusion chain: the x_0 distribution (dimension 0) of each variant against p_data and the tilt.

    Per variant (samples pooled over seeds): filled histogram = x_0 at the end of the reward phase (the last
    snapshot at or before ``reward_end``; the last snapshot if ``None``); black step outline = x_0 at the
    last snapshot (after the reward-off phase, when there is one). Grey fill = the data density p_data;
    dashed line = its KL-optimal tilt p_data·e^{r/β} (closed-form grid, ``density`` table).

    Args:
        samples: ``samples`` rows of one condition (``run_id, variant, update, x``).
        density: ``density`` rows of the same condition (``x, data, tilt``; one run's grid is used).
    """
    check_one_condition(samples)
    variants = variant_order(samples["variant"].unique())
    ncols = max(1, min(ncols, len(variants)))
    nrows = int(np.ceil(len(variants) / ncols))
    fig = new_figure(PAGE_WIDTH, 0.45 + 1.05 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
    grid = density[density["run_id"] == density["run_id"].iloc[0]] if not density.empty else density
    last = int(samples["update"].max())
    ups = np.sort(samples["update"].unique())
    end = last if reward_end is None else int(ups[ups <= reward_end].max())
    if not grid.empty:  # the grid spans the modes and the reward; far-off samples (diverged runs) sit on the edges
        lo, hi = float(grid["x"].min()), float(grid["x"].max())
    else:
        lo, hi = np.nanpercentile(samples["x"], [1.0, 99.0])
    edges = np.linspace(lo, hi, bins + 1)
    for ax, v in zip(axes, variants, strict=False):
        rows = samples[samples["variant"] == v]
        colour = variant_style(v)["color"]
        if not grid.empty:
            ax.fill_between(grid["x"], grid["data"], color="0.85", lw=0, zorder=1, label=r"$p_{\mathrm{data}}$")
            if grid["tilt"].notna().any():
                ax.plot(grid["x"], grid["tilt"], color="black", lw=0.8, ls=(0, (3, 1.5)), zorder=4,
                        label=r"tilt $p^*$")
        at_end = rows.loc[rows["update"] == end, "x"].to_numpy(float)
        at_end = at_end[np.isfinite(at_end)]
        if at_end.size:
            ax.hist(np.clip(at_end, lo, hi), bins=edges, density=True, color=colour, alpha=0.55, zorder=2,
                    label=f"update {end}")
        else:  # diverged runs keep no snapshot after their divergence
            ax.text(0.5, 0.6, f"no samples at update {end}\n(runs diverged)", transform=ax.transAxes, ha="center",
                    va="center", fontsize=6, color="0.3")
        if end != last:
            after = rows.loc[rows["update"] == last, "x"].to_numpy(float)
            after = after[np.isfinite(after)]
            if after.size:
                ax.hist(np.clip(after, lo, hi), bins=edges, density=True, histtype="step", color="0.1", lw=0.8,
                        zorder=3, label=f"update {last} (reward off)")
        ax.set_title(v, loc="left", pad=1.5)
    return finish_panels(fig, axes, len(variants), "x$_0$ (dimension 0)", "density", 4, title, path, formats)
