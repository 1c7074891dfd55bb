"""A run's numbers and status never depend on its batch-mates, in every trainer, even when a batch-mate
overflows or goes NaN.

Each case trains a run alone and then in a batch with runs of every other placement × estimator, one of them
forced to overflow (``train.lr: 1e10`` with k3 as a loss, whose e^{−δ} leaves the float range); the run's
tables and status must be the same. Tabular trainers are compared exactly. Batched matrix products (MLP
policies and corrections) may sum in another order for another batch size; float32 rounding differences then
grow through the updates (largest differences measured here: 3.3e-6 absolute, 1.7e-5 relative where not near
0, in a diffusion chain's x_0 after 3 updates of 4 denoising steps), so there floats are compared with rtol
1e-4 and atol 1e-5, and the status and the update of divergence exactly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sim.lab.dispatch import resolve, train_batch

VARIANTS = [["kl.placement=none"], ["kl.placement=reward", "kl.estimator=k1"],
            ["kl.placement=reward", "kl.estimator=k2"], ["kl.placement=reward", "kl.estimator=k3"],
            ["kl.placement=loss", "kl.estimator=k1"], ["kl.placement=loss", "kl.estimator=k2"],
            ["kl.placement=loss", "kl.estimator=k3", "kl.is_correction=true"],
            ["kl.placement=loss", "kl.estimator=full"]]
BLOWUP = ["kl.placement=loss", "kl.estimator=k3", "train.lr=1e10"]

CASES = {
    "bandit": (["env.id=bandit", "env.rewards=[1,0,0]", "env.ref_probs=[0.2,0.5,0.3]", "train.updates=6",
                "train.batch=64"], True),
    "gridworld": (["env.id=gridworld", "env.layout=open_5x5", "env.horizon=8", "env.slip=0.1", "train.updates=4",
                   "train.batch=16"], True),
    "token_tree_mlp": (["env.id=token_tree", "train.policy=mlp", "train.hidden=8", "train.updates=4",
                        "train.batch=32"], False),
    "bandit_exact": (["env.id=bandit", "env.rewards=[1,0,0]", "train.mode=exact", "train.updates=6"], True),
    "token_tree_learned_reward": (["env.id=token_tree", "env.reward=random", "reward.model=learned",
                                   "reward.pairs=64", "reward.family=linear", "reward.features=time_action",
                                   "train.updates=4", "train.batch=32"], True),
    "bandit_learned_exact": (["env.id=bandit", "env.n_arms=12", "reward.model=learned", "reward.pairs=40",
                              "train.mode=exact", "train.updates=6"], True),
    "gaussian": (["env.id=gaussian_bandit", "env.dim=2", "train.updates=6", "train.batch=32"], True),
    "diffusion": (["env.id=diffusion_chain", "env.steps=4", "train.updates=3", "train.batch=16"], True),
    "diffusion_mlp": (["env.id=diffusion_chain", "env.steps=4", "train.policy=mlp", "train.hidden=8",
                       "train.updates=3", "train.batch=16"], False),
}


def _check_equal(a: pd.DataFrame, b: pd.DataFrame, exact: bool, name: str) -> None:
    if exact:
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
    else:
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5, obj=name)


def _assert_same_run(alone, batched, exact: bool) -> None:
    assert batched.status["status"] == alone.status["status"]
    assert batched.status["update"] == alone.status["update"]
    for name, table in alone.tables().items():
        _check_equal(batched.tables()[name], table, exact, name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_is_the_same_alone_and_beside_an_overflowing_batch_mate(case: str):
    base, exact = CASES[case]
    base = [*base, "kl.beta=0.3", "log.policy_every=2", "log.trajectories=2"]
    configs = [resolve(None, base + v + [f"seed={i}"]) for i, v in enumerate(VARIANTS)]
    configs.append(resolve(None, base + BLOWUP + ["seed=99"]))
    batched = train_batch(configs)
    assert batched[-1].status["status"] == "diverged", "the batch-mate must overflow for the test to mean anything"
    for i in (1, 4, 6, 7):  # k1 in the reward; k1, k3 (IS) and full as a loss
        (alone,) = train_batch([configs[i]])
        _assert_same_run(alone, batched[i], exact)


def test_dpo_and_ipo_runs_are_the_same_beside_overflowing_batch_mates():
    """DPO and IPO runs share a batch; two of them overflow (lr 1e38). Every run, the overflowing ones
    included, has the status, update of divergence and numbers it has alone."""
    base = ["env.id=bandit", "env.rewards=[1,0,0]", "train.algo=dpo", "dpo.pairs=64", "train.updates=5",
            "log.policy_every=2", "kl.beta=0.5"]
    configs = [resolve(None, base + extra) for extra in (
        ["dpo.loss=dpo", "seed=1"], ["dpo.loss=ipo", "seed=2"],
        ["dpo.loss=dpo", "seed=3", "train.lr=1e38"], ["dpo.loss=ipo", "seed=4", "train.lr=1e38"])]
    batched = train_batch(configs)
    assert batched[3].status["status"] == "diverged"
    for cfg, out in zip(configs, batched, strict=True):
        (alone,) = train_batch([cfg])
        _assert_same_run(alone, out, exact=True)


def test_metric_columns_agree_for_every_batch_size_in_the_diffusion_evaluation():
    """The diffusion chain's evaluation (Monte-Carlo metrics and the tilt oracle) gives each run the same
    numbers in batches of 1, 3 and 8 runs."""
    base = ["env.id=diffusion_chain", "env.steps=4", "train.updates=2", "train.batch=16", "kl.beta=0.5"]
    configs = [resolve(None, base + v + [f"seed={i}"]) for i, v in enumerate(VARIANTS)]
    full = train_batch(configs)
    three = train_batch(configs[2:5])
    for i in range(2, 5):
        m = full[i].metrics
        assert np.array_equal(m.to_numpy(float), three[i - 2].metrics.to_numpy(float), equal_nan=True)
        assert np.array_equal(m.to_numpy(float), train_batch([configs[i]])[0].metrics.to_numpy(float),
                              equal_nan=True)


@pytest.mark.parametrize("env", [["env.id=bandit", "env.rewards=[1,0,0]", "train.mode=exact"],
                                 ["env.id=gaussian_bandit", "env.dim=2", "train.batch=32"]])
def test_the_distance_to_the_optimum_is_per_run_beside_a_run_without_a_kl(env: list[str]):
    """A run with β > 0 keeps its distance to its Gibbs optimum (``tv_opt`` or ``kl_opt``) beside a run with
    β = 0, which has no optimum and records NaN; the β > 0 run's numbers are the ones it has alone."""
    base = [*env, "train.updates=4", "log.policy_every=2", "kl.placement=reward", "kl.estimator=k1"]
    with_kl, without = resolve(None, [*base, "kl.beta=0.3", "seed=1"]), resolve(None, [*base, "kl.beta=0", "seed=2"])
    batched = train_batch([with_kl, without])
    for cfg, out in zip((with_kl, without), batched, strict=True):
        (alone,) = train_batch([cfg])
        _assert_same_run(alone, out, exact=True)
    col = "tv_opt" if "env.id=bandit" in env else "kl_opt"
    assert batched[0].metrics[col].notna().all()
    # without a KL there is no optimum: NaN where the column always exists, absent where it is optional
    assert col not in batched[1].metrics or batched[1].metrics[col].isna().all()
