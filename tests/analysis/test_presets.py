"""The science presets in sim/lab/presets expand into valid runs of the intended shape and size."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.analysis.sweep_fixture import GRID_KEYS, expand_grid

PRESETS = Path(__file__).resolve().parents[2] / "sim" / "lab" / "presets"
STANDARD_VARIANTS = {("none", "k1"), ("reward", "k1"), ("reward", "k2"), ("reward", "k3"), ("loss", "k1"),
                     ("loss", "k2"), ("loss", "k3"), ("loss", "full")}
# A bound on the work of a preset: Σ over runs of updates × batch × horizon (env steps). The quickstart must
# train in well under a minute on 2 cores, the science presets in minutes.
MAX_STEPS = {"quickstart": 2e7, "placements": 2e7, "recovery": 2e7, "beta": 1.5e8, "gridworld": 1.2e8}


def grid(name: str) -> dict:
    return yaml.safe_load((PRESETS / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", sorted(MAX_STEPS))
def test_preset_expands_to_valid_runs(name: str) -> None:
    g = grid(name)
    assert set(g) <= GRID_KEYS | {"description"}
    runs = expand_grid(g)
    variants = {(c.kl.placement, c.kl.estimator) for _, c in runs}
    assert variants == STANDARD_VARIANTS
    seeds = {c.seed for _, c in runs}
    assert len(seeds) >= 3
    steps = sum(c.train.total_updates * c.train.batch * (c.env.get("horizon") or 1) for _, c in runs)
    assert steps <= MAX_STEPS[name], f"{name}: {steps:.2g} env steps"
    assert all(c.log.progress == "none" for _, c in runs)


def test_preset_science_settings() -> None:
    for name in ("placements", "recovery", "beta", "quickstart"):
        env = grid(name)["base"]["env"]
        assert env["id"] == "bandit" and env["ref_probs"][0] < 0.05 and env["rewards"][0] == max(env["rewards"])
    gw = grid("gridworld")["base"]
    assert gw["env"]["id"] == "gridworld" and gw["env"]["ref_temperature"] == 3 and gw["kl"]["beta"] == 0.1
    assert gw["log"]["every"] == 5 and gw["log"]["policy_every"] > gw["log"]["every"]
    for name in ("recovery", "quickstart"):
        phases = grid(name)["base"]["train"]["phases"]
        assert [p["reward_scale"] for p in phases] == [1, 0]
    assert len(grid("beta")["axes"]["kl.beta"]) >= 5


@pytest.mark.parametrize("name", sorted(MAX_STEPS))
def test_reflab_sweep_accepts_preset(name: str) -> None:
    from sim.lab.grid import plan_sweep

    plan = plan_sweep(grid(name), name, PRESETS)
    assert len(plan.runs) == len(expand_grid(grid(name)))


def test_overopt_preset_couples_env_and_proxy_and_keeps_best_of_n_at_one_beta() -> None:
    from sim.lab.grid import plan_sweep

    plan = plan_sweep(grid("overopt"), "overopt", PRESETS)
    cfgs = [r.config for r in plan.runs]
    assert len(cfgs) == 620 and all(c.reward.model == "learned" for c in cfgs)
    assert {(c.env["id"], c.reward.family) for c in cfgs} == {("bandit", "tabular"), ("token_tree", "linear")}
    bon = [c for c in cfgs if c.train.algo == "bon"]
    assert len({c.kl.beta for c in bon}) == 1 and len({c.bon.n for c in bon}) == 11
    trained = {(c.train.algo, c.kl.placement, c.kl.estimator) for c in cfgs if c.train.algo != "bon"}
    assert trained == {("ppo", "none", "k1"), ("ppo", "reward", "k1"), ("ppo", "loss", "k2"), ("ppo", "loss", "k3"),
                       ("dpo", "none", "k1")}
    assert len({c.seed for c in cfgs}) == 10 and all(c.log.progress == "none" for c in cfgs)
