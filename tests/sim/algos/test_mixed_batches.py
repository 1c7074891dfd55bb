"""PPO's advantage estimator and loss aggregations are per-run settings in sampled mode: runs that differ in
``train.advantage``, ``train.loss_agg`` or ``kl.loss_agg`` share one batch (one tensor program), and each run's
tables are bitwise the ones it has trained alone, where it takes its own code path (e.g. a GAE, token-mean run
alone works on the sampled steps, in a mixed batch on the ``[R, N, H]`` buffers).
"""

from __future__ import annotations

import pandas as pd
import pytest

from sim.config import batch_signature
from sim.lab.dispatch import resolve, train_batch

EOS_TREE = ["env.id=token_tree", "env.vocab=3", "env.length=5", "env.eos=0.2", "env.reward=prefix", "train.group=8",
            "train.batch=32", "train.updates=5", "kl.beta=0.2", "log.every=2", "log.policy_every=2",
            "log.trajectories=2"]
BANDIT = ["env.id=bandit", "env.rewards=[1,0,0,0]", "env.ref_probs=[0.1,0.3,0.3,0.3]", "train.group=4",
          "train.batch=32", "train.updates=6", "kl.beta=0.3", "log.policy_every=3"]
TREE_RUNS = [["train.advantage=gae", "kl.placement=loss", "kl.estimator=k3"],
             ["train.advantage=grpo", "train.loss_agg=seq-mean-token-mean", "kl.placement=reward"],
             ["train.advantage=drgrpo", "train.loss_agg=seq-mean-token-sum-norm", "kl.placement=loss",
              "kl.estimator=full"],
             ["train.advantage=rloo", "train.loss_agg=seq-mean-token-sum", "kl.placement=loss", "kl.estimator=k1",
              "kl.loss_agg=token-mean"],
             ["train.advantage=gae", "train.loss_agg=seq-mean-token-mean", "kl.placement=loss", "kl.estimator=k2",
              "kl.loss_agg=seq-mean-token-sum-norm"],
             ["train.advantage=reinforce_pp", "kl.placement=none"],
             ["train.advantage=grpo", "kl.placement=loss", "kl.estimator=k3", "kl.is_correction=true"]]
BANDIT_RUNS = [["train.advantage=gae", "kl.placement=reward"], ["train.advantage=grpo", "kl.placement=loss"],
               ["train.advantage=drgrpo", "kl.placement=loss", "kl.estimator=k3"],
               ["train.advantage=rloo", "kl.placement=reward", "kl.estimator=k2"]]


def _assert_each_run_as_alone(configs: list) -> None:
    assert len({batch_signature(c) for c in configs}) == 1
    batched = train_batch(configs)
    for cfg, out in zip(configs, batched, strict=True):
        (alone,) = train_batch([cfg])
        assert out.status["status"] == alone.status["status"]
        for name, table in alone.tables().items():
            pd.testing.assert_frame_equal(out.tables()[name], table, check_exact=True, obj=name)


@pytest.mark.parametrize("extra", [[], ["train.minibatches=2"]])
def test_estimators_and_aggregations_mixed_on_the_eos_tree(extra: list[str]):
    """A learned value baseline (GAE), every group estimator, REINFORCE++ and every aggregation, the KL's own
    aggregation too, with full-batch epochs and with minibatches."""
    configs = [resolve(None, [*EOS_TREE, *extra, *run, f"seed={i}"]) for i, run in enumerate(TREE_RUNS)]
    _assert_each_run_as_alone(configs)


def test_estimators_mixed_on_the_bandit():
    """The batch-mean baseline (GAE on a one-step env) beside the group estimators."""
    configs = [resolve(None, [*BANDIT, *run, f"seed={i}"]) for i, run in enumerate(BANDIT_RUNS)]
    batched = train_batch(configs)
    assert "zero_adv_frac" not in batched[0].metrics and batched[1].metrics["zero_adv_frac"].notna().any()
    _assert_each_run_as_alone(configs)


def test_exact_mode_keeps_one_estimator_per_batch():
    """Exact mode's expected loss takes one estimator per batch: its runs of two estimators are two batches."""
    exact = ["env.id=bandit", "env.rewards=[1,0,0]", "train.mode=exact", "train.group=4"]
    gae, rloo = (resolve(None, [*exact, f"train.advantage={a}"]) for a in ("gae", "rloo"))
    assert batch_signature(gae) != batch_signature(rloo)
    sampled = [resolve(None, ["train.group=4", f"train.advantage={a}"]) for a in ("gae", "rloo")]
    assert batch_signature(sampled[0]) == batch_signature(sampled[1])
