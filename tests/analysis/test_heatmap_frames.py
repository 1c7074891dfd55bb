"""Which heatmaps a report draws: over β where β varies, else over the other conditions' combinations."""

from __future__ import annotations

import itertools

import pandas as pd

from analysis.report import heatmap_frames


def _runs(betas: list[float]) -> pd.DataFrame:
    rows = [{"variant": v, "env.id": e, "kl.beta": b, "train.advantage": a, "train.loss_agg": agg, "seed": s,
             "kl_final": 0.1}
            for v, e, b, a, agg, s in itertools.product(["k1 in reward", "k3 as loss"], ["bandit", "token_tree"],
                                                         betas, ["grpo", "rloo"], ["token-mean", "seq-mean"], [0, 1])]
    return pd.DataFrame(rows)


def test_beta_varies_one_heatmap_per_other_condition() -> None:
    runs = _runs([0.1, 0.5])
    frames = heatmap_frames(runs, ["env.id", "kl.beta", "train.advantage", "train.loss_agg"])
    assert len(frames) == 2 * 2 * 2
    for condition, g, x in frames:
        assert x == "kl.beta" and set(condition) == {"env.id", "train.advantage", "train.loss_agg"}
        assert len(g) == 2 * 2 * 2  # variants × β × seeds


def test_one_beta_the_other_conditions_are_the_columns_within_each_env() -> None:
    runs = _runs([0.1])
    frames = heatmap_frames(runs, ["env.id", "train.advantage", "train.loss_agg"])
    assert [c for c, _, _ in frames] == [{"env.id": "bandit"}, {"env.id": "token_tree"}]
    for _, g, x in frames:
        assert x == "train.advantage, train.loss_agg"
        assert "train.advantage" not in g and "train.loss_agg" not in g
        assert sorted(g[x].unique()) == ["grpo, seq-mean", "grpo, token-mean", "rloo, seq-mean", "rloo, token-mean"]
        assert len(g) == len(runs) // 2


def test_one_beta_and_only_envs_vary_keeps_single_column_heatmaps() -> None:
    runs = _runs([0.1])
    runs = runs[(runs["train.advantage"] == "grpo") & (runs["train.loss_agg"] == "token-mean")]
    frames = heatmap_frames(runs, ["env.id"])
    assert [(c, x) for c, _, x in frames] == [({"env.id": "bandit"}, "kl.beta"), ({"env.id": "token_tree"}, "kl.beta")]
