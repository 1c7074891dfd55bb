"""Per-step work on sampled episodes (sim/engine/steps.py, Episodes.steps_per_run): the shortcuts taken when no
episode ends before the last step give what the general path gives."""

from __future__ import annotations

import pytest
import torch

from sim.engine.steps import gae_on_steps, returns_to_go, successors
from sim.lab.dispatch import make_trainer, resolve

ENVS = {"token_tree": ["env.id=token_tree", "env.vocab=3", "env.length=4"],  # every episode runs all its steps
        "gridworld": ["env.id=gridworld", "env.layout=two_goals", "env.horizon=30"]}  # episodes end early


def sampled(env: str):
    configs = [resolve(None, ENVS[env] + ["train.batch=16", f"seed={s}"]) for s in range(3)]
    trainer = make_trainer(configs)
    buf, _ = trainer._collect(1)
    return trainer, buf


def general_successors(counts: list[int], goings: list) -> torch.Tensor:
    """successors() without its shortcut: every step's continuing samples listed."""
    n = sum(counts)
    off = [sum(counts[:t]) for t in range(len(counts) + 1)]
    succ = torch.full((n,), n, dtype=torch.long)
    preds = [torch.arange(off[t], off[t] + counts[t]) if g is None else g + off[t]
             for t, g in enumerate(goings[: len(counts) - 1])]
    succ.index_copy_(0, torch.cat(preds), torch.arange(off[1], n))
    return succ


@pytest.mark.parametrize("env", sorted(ENVS))
def test_steps_per_run_counts_the_steps_of_each_run(env: str):
    trainer, buf = sampled(env)
    expected = torch.bincount(buf.steps["run"], minlength=trainer.R)
    assert torch.equal(buf.steps_per_run(), expected)
    assert torch.equal(buf.steps_per_run(), buf["valid"].reshape(trainer.R, -1).sum(1))


@pytest.mark.parametrize("env", sorted(ENVS))
def test_successors_and_returns_to_go_shortcuts_equal_the_general_path(env: str):
    _, buf = sampled(env)
    counts, goings = buf.counts, buf.goings
    assert (env == "token_tree") == all(g is None for g in goings[: len(counts) - 1])
    succ = successors(counts, goings, torch.device("cpu"))
    assert torch.equal(succ, general_successors(counts, goings))
    x = torch.randn(sum(counts))
    assert torch.equal(returns_to_go(x, counts, succ, goings), returns_to_go(x, counts, succ))
    # and the buffers' reverse cumulative sum, accumulated in float64
    R, N, H = buf.shape
    dense = torch.zeros(R * N * H).index_copy_(0, buf.steps["at"], x).view(R, N, H)
    want = dense.flip(-1).cumsum(-1).flip(-1).reshape(-1).index_select(0, buf.steps["at"])
    adv, ret = gae_on_steps(x, None, buf.steps["done"], 1.0, counts, goings)
    assert torch.equal(adv, want) and torch.equal(ret, want)


def test_the_steps_rewards_actions_and_ends_are_joined_and_cast_when_first_read():
    trainer, buf = sampled("gridworld")
    for key in ("reward", "action", "done"):  # still one tensor per step: a learned reward, say, replaces the env's
        assert key not in buf.steps and len(buf.steps._parts[key]) == len(buf.counts) > 1
    reward, action, done = buf.steps["reward"], buf.steps["action"], buf.steps["done"]
    assert reward.dtype == trainer.dtype and action.dtype == torch.long and done.dtype == torch.bool
    at = buf.steps["at"]
    assert torch.equal(buf["reward"].reshape(-1).index_select(0, at), reward)
    assert torch.equal(buf["action"].reshape(-1).index_select(0, at), action)
    assert torch.equal(buf["done"].reshape(-1).index_select(0, at), done)
