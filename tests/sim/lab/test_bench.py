"""``reflab bench``'s cases stay valid: each grid is one batch that trains, and counts the work it claims.

No timing is asserted here (speed targets live in ``reflab bench``); these tests catch a case whose configs
stop resolving, stop sharing a batch, or count env-steps other than as documented.
"""

from __future__ import annotations

import pytest

from sim.lab.bench import bandit_grid, gridworld_grid, time_native
from sim.lab.bench_timing import time_one_by_one
from sim.lab.bench_trainers import DIFFUSION, GAUSSIAN, TOKEN_TREE, dpo_grid, kl_grid


@pytest.mark.parametrize(("name", "make", "steps_per_episode"), [
    ("bandit", lambda: bandit_grid(updates=1, seeds=1), 1),
    ("token tree MLP", lambda: kl_grid(TOKEN_TREE, 1, seeds=1), 6),
    ("gaussian", lambda: kl_grid(GAUSSIAN, 1, seeds=1), 1),
    ("diffusion", lambda: kl_grid(DIFFUSION, 1, seeds=1), 10),
])
def test_each_grid_trains_as_one_batch_and_counts_its_steps(name, make, steps_per_episode):
    configs = make()
    assert len(configs) == 40  # 8 variants × 5 β
    res = time_native(configs, repeats=1)
    assert res["runs"] == 40
    assert res["env_steps"] == 40 * configs[0].train.batch * steps_per_episode, name


def test_gridworld_grid_is_the_documented_one():
    configs = gridworld_grid(updates=1, seeds=1)
    assert len(configs) == 40 and configs[0].env["layout"] == "two_goals" and configs[0].train.batch == 64
    res = time_native(configs[:8], repeats=1)
    assert 0 < res["env_steps"] <= 8 * 64 * 30  # episodes end at a goal or at the horizon


def test_dpo_batch_and_one_by_one_do_the_same_work():
    """The obvious-way yardstick trains the same runs as the batch: the same pair samples in total."""
    configs = dpo_grid(1, seeds=1)[:3]
    assert time_native(configs, repeats=1)["env_steps"] == time_one_by_one(configs, repeats=1)["env_steps"] > 0
