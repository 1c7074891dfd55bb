"""Training on a learned proxy reward (sim/algos/proxy.py) and best-of-n (sim/algos/bon.py).

- With the gold reward as the proxy (the infinite-data limit, injected in place of the fit), every trainer's
  outputs equal today's gold-reward outputs bitwise, and gold_return = proxy_return = return_true.
- DPO with a learned reward trains on exactly the pairs the proxy was fitted to.
- Best-of-n: exact KL and returns; its runs are the same alone and in a batch.
- Bad input: one line, exit 2, nothing written; a non-finite fit is recorded, not raised.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import envs
from envs.best_of_n import best_of_n, episode_tree, kl_upper_bound
from sim.engine import reward_model
from sim.lab.cli import main
from sim.lab.dispatch import make_trainer, resolve, train_batch

V8 = [["kl.placement=none"], ["kl.placement=reward", "kl.estimator=k1"], ["kl.placement=reward", "kl.estimator=k2"],
      ["kl.placement=reward", "kl.estimator=k3"], ["kl.placement=loss", "kl.estimator=k1"],
      ["kl.placement=loss", "kl.estimator=k2"], ["kl.placement=loss", "kl.estimator=k3", "kl.is_correction=true"],
      ["kl.placement=loss", "kl.estimator=full"]]
NEW = ["gold_return", "proxy_return", "opt_gold", "opt_proxy", "sqrt_kl"]
PHASES = "train.phases=[{updates: 3, reward_scale: 1}, {updates: 3, reward_scale: 0}]"
CASES = {
    "bandit": (["env.id=bandit", "env.rewards=[1,0,0.3,0]", "env.ref_probs=[0.1,0.4,0.3,0.2]", "train.updates=6",
                "train.batch=32"], V8),
    "bandit_phases_mlp": (["env.id=bandit", "env.rewards=[1,0,0.3]", PHASES, "train.policy=mlp", "train.hidden=8",
                           "train.batch=32"], V8[1::2]),
    "token_tree": (["env.id=token_tree", "env.reward=random", "train.updates=4", "train.batch=32"], V8),
    "gridworld_exact": (["env.id=gridworld", "env.layout=open_5x5", "env.horizon=6", "train.mode=exact",
                         "train.updates=4", "train.lr=0.05"], V8[1::2]),
    "gridworld_sampled": (["env.id=gridworld", "env.layout=open_5x5", "env.horizon=6", "train.updates=3",
                           "train.batch=16"], V8[:4]),
    "dpo": (["env.id=token_tree", "train.algo=dpo", "train.updates=4", "reward.pairs=2048"], [["dpo.beta=0.5"]]),
}


@pytest.fixture
def gold_as_proxy(monkeypatch):
    """Replace the fit by the gold reward: each run's proxy table is the env's expected reward."""
    def fit(design, data, cfg, keys):
        mdp = envs.from_config(cfg.env).build()
        R = keys.shape[0]
        table = mdp.expected_reward.to(torch.float64).unsqueeze(0).expand(R, -1, -1).clone()
        zero = torch.zeros(R, dtype=torch.float64)
        return table, {"loss": zero, "accuracy": zero, "grad_norm": zero, "iterations": zero.long(),
                       "unseen": zero.long()}
    monkeypatch.setattr(reward_model, "fit", fit)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_gold_reward_as_proxy_gives_todays_results(gold_as_proxy, case: str):
    base, variants = CASES[case]
    base = [*base, "kl.beta=0.3", "log.policy_every=2", "log.trajectories=2"]
    gold = [resolve(None, base + v + [f"seed={i}"]) for i, v in enumerate(variants)]
    learned = [resolve(None, base + v + [f"seed={i}", "reward.model=learned"]) for i, v in enumerate(variants)]
    for g, lo in zip(train_batch(gold), train_batch(learned), strict=True):
        m = lo.metrics
        pd.testing.assert_frame_equal(m.drop(columns=NEW), g.metrics, check_exact=True)
        assert np.array_equal(m["gold_return"], m["return_true"])
        assert np.array_equal(m["proxy_return"], m["gold_return"])
        for name in ("policy", "trajectories", *[k for k in g.extra]):
            pd.testing.assert_frame_equal(lo.tables()[name], g.tables()[name], check_exact=True, obj=name)
        assert lo.status["status"] == g.status["status"] and "reward_model" in lo.status
        rm = lo.extra["reward_model"]
        assert np.array_equal(rm["proxy"], rm["gold"])


@pytest.mark.parametrize("env", [["env.id=token_tree", "env.reward=random"],
                                 ["env.id=gridworld", "env.layout=open_5x5", "env.horizon=6"]])
def test_a_learned_proxy_trains_on_the_steps_taken_as_on_the_buffers(env: list[str]):
    """PPO on a learned proxy shapes and groups the sampled steps (no [R, N, H] buffers) where the gold reward
    would, with the numbers of the buffers' path."""
    base = [*env, "reward.model=learned", "reward.pairs=40", "kl.beta=0.3", "train.updates=3", "train.batch=16",
            "log.trajectories=2"]
    configs = [resolve(None, base + v + [f"seed={i}"]) for i, v in enumerate(V8)]
    on_steps, on_buffers = make_trainer(configs), make_trainer(configs)
    assert on_steps._by_steps
    on_buffers._by_steps = False
    for s, b in zip(on_steps.run(), on_buffers.run(), strict=True):
        for name, frame in b.tables().items():
            pd.testing.assert_frame_equal(s.tables()[name], frame, check_exact=True, obj=name)
        assert {**s.status, "wall_time_s": 0} == {**b.status, "wall_time_s": 0}


def test_opt_gold_and_proxy_are_the_returns_of_the_proxys_optimum():
    cfg = resolve(None, ["env.id=bandit", "env.n_arms=6", "reward.model=learned", "reward.pairs=50", "kl.beta=0.5",
                         "kl.placement=reward", "train.updates=2", "train.batch=16"])
    (out,) = train_batch([cfg])
    proxy = out.extra["reward_model"]["proxy"].to_numpy()
    gold = out.extra["reward_model"]["gold"].to_numpy()
    ref = np.exp(envs.from_config(cfg.env).build().ref_logp[0].numpy())
    opt = ref * np.exp(proxy / 0.5)
    opt /= opt.sum()
    row = out.metrics.iloc[-1]
    assert abs(row["opt_gold"] - opt @ gold) < 1e-12 and abs(row["opt_proxy"] - opt @ proxy) < 1e-12
    assert abs(row["sqrt_kl"] - math.sqrt(row["kl_true"])) < 1e-15


def test_dpo_trains_on_the_pairs_the_proxy_was_fitted_to():
    base = ["env.id=bandit", "env.n_arms=5", "train.algo=dpo", "train.updates=2", "reward.model=learned",
            "reward.pairs=100"]
    (out,) = train_batch([resolve(None, base)])
    prefs = out.extra["preferences"]
    seen = prefs.groupby("action").size().reindex(range(5), fill_value=0).to_numpy()
    assert np.array_equal(seen, out.extra["reward_model"]["pairs"].to_numpy())
    assert out.metrics["env_steps"].iloc[-1] == 200


def test_checking_dpo_runs_of_one_env_builds_it_once(monkeypatch):
    """A grid checks hundreds of DPO runs of one env: its MDP is built once (reward_model.config_mdp), not per run."""
    built = []
    from_config = envs.from_config

    def counting(env):
        built.append(env["id"])
        return from_config(env)

    monkeypatch.setattr(envs, "from_config", counting)
    reward_model._mdp_of.cache_clear()
    base = ["env.id=token_tree", "env.vocab=3", "env.length=2", "train.algo=dpo", "reward.model=learned"]
    for seed in range(20):
        resolve(None, base + [f"seed={seed}", f"kl.beta={0.1 * (1 + seed % 4)}"])
    assert len(built) <= 2  # the config's env check may build it once, the DPO check at most once more


def test_best_of_n_runs_are_exact_and_batch_invariant():
    base = ["env.id=token_tree", "env.vocab=3", "env.length=3", "env.reward=random", "train.algo=bon",
            "reward.model=learned", "reward.pairs=50", "reward.family=linear", "reward.features=time_action"]
    configs = [resolve(None, base + [f"bon.n={n}", f"seed={s}"]) for n, s in ((1, 0), (4, 1), (64, 2), (10**6, 0))]
    batched = train_batch(configs)
    for cfg, out in zip(configs, batched, strict=True):
        (alone,) = train_batch([cfg])
        for name, table in alone.tables().items():
            pd.testing.assert_frame_equal(out.tables()[name], table, check_exact=True, obj=name)
        m = out.metrics.set_index("update")
        assert list(m.index) == [0, 1] and out.status["update"] == 1
        assert m.loc[0, "kl_true"] == 0 and m.loc[1, "bon_n"] == cfg.bon.n
        assert abs(m.loc[1, "kl_true"] - m.loc[1, "kl_bon"]) < 1e-12
        assert m.loc[1, "kl_bon"] <= kl_upper_bound(cfg.bon.n) + 1e-12
        # independent: the law from the tree's sequences, the proxy's table and the gold rewards
        mdp = envs.from_config(cfg.env).build()
        tree = episode_tree(mdp)
        proxy = torch.tensor(out.extra["reward_model"]["proxy"].to_numpy()).view(mdp.n_states, mdp.n_actions)
        law, kl = best_of_n(tree.outcome_logp(mdp, mdp.ref_logp).exp(), tree.returns(proxy), cfg.bon.n)
        assert abs(float(kl) - m.loc[1, "kl_bon"]) < 1e-12
        assert abs(float(law @ tree.returns(mdp.expected_reward)) - m.loc[1, "gold_return"]) < 1e-12
        assert abs(float(law @ tree.returns(proxy)) - m.loc[1, "proxy_return"]) < 1e-12


def test_runs_of_one_data_seed_share_one_fit(monkeypatch):
    """Each distinct data seed's pairs are sampled and fitted once in a batch; its runs get them bit for bit as
    when fitted alone."""
    base = ["env.id=token_tree", "env.vocab=3", "env.length=3", "env.reward=random", "train.updates=2",
            "train.batch=16", "reward.model=learned", "reward.pairs=40", "reward.family=linear",
            "reward.features=time_action"]
    runs = (["seed=0"], ["seed=1", "kl.beta=0.3"], ["seed=2", "reward.data_seed=0"],
            ["seed=3", "reward.data_seed=1", "kl.placement=none"])
    configs = [resolve(None, base + sets) for sets in runs]
    fitted = []
    fit = reward_model.fit

    def counting_fit(design, data, cfg, keys):
        fitted.append(keys.shape[0])
        return fit(design, data, cfg, keys)

    monkeypatch.setattr(reward_model, "fit", counting_fit)
    batched = train_batch(configs)
    assert fitted == [2]
    for cfg, out in zip(configs, batched, strict=True):
        (alone,) = train_batch([cfg])
        for name, table in alone.tables().items():
            pd.testing.assert_frame_equal(out.tables()[name], table, check_exact=True, obj=name)
        assert out.status["reward_model"] == alone.status["reward_model"]
    pd.testing.assert_frame_equal(batched[0].extra["reward_model"], batched[2].extra["reward_model"], check_exact=True)


def test_a_non_finite_fit_is_recorded_not_raised():
    """Features of ±1e308 overflow the fit (their differences are infinite): the run is marked diverged at update
    0 with the reason, its status says the fit is not finite, and its tables are still written."""
    rows = [[1e308, 0.0], [0.0, 1e308], [-1e308, 1.0]]
    base = ["env.id=bandit", "env.rewards=[1,0,0.5]", "reward.model=learned", "reward.pairs=40",
            "reward.family=linear", "train.updates=3", "train.batch=16"]
    (bad,) = train_batch([resolve(None, base + [f"reward.features={rows}"])])
    assert bad.status["status"] == "diverged" and bad.status["update"] == 0
    assert bad.status["error"] == "non-finite proxy reward model" and bad.status["reward_model"]["finite"] is False
    assert list(bad.metrics["update"]) == [0]
    (good,) = train_batch([resolve(None, base + ["reward.features=[[1,0],[0,1],[1,1]]"])])
    assert good.status["status"] == "done" and good.status["reward_model"]["finite"] is True
    assert good.status["reward_model"]["converged"] is True


@pytest.mark.parametrize("sets, message", [
    (["reward.model=learned", "reward.pairs=0"], "reward.pairs must be > 0"),
    (["reward.model=learned", "reward.family=linear", "reward.features=[[1.0],[2.0]]"], "reward.features has 2 rows"),
    (["reward.model=learned", "env.id=gaussian_bandit"], "reward.model=learned needs a native trainer"),
    (["reward.model=learned", "train.backend=sb3"], "reward.model=learned needs a native trainer"),
    (["train.algo=bon", "env.id=gridworld"], "train.algo=bon needs an env whose episodes form a tree"),
    (["bon.n=4"], "bon.n applies to train.algo=bon only"),
    (["train.algo=bon", "bon.n=0"], "bon.n must be >= 1"),
    (["train.algo=dpo", "reward.model=learned", "dpo.pairs=100"], "dpo.pairs must keep its default"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, sets: list[str], message: str):
    out = tmp_path / "run"
    args = ["run", "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reflab: error: ") and message in err[0]
    assert not out.exists()


def test_reflab_run_writes_a_best_of_n_run_with_its_proxy(tmp_path: Path, capsys):
    out = tmp_path / "bon"
    args = ["run", "--quiet", "--out", str(out), "--set", "train.algo=bon", "--set", "bon.n=8", "--set",
            "reward.model=learned", "--set", "reward.pairs=30"]
    assert main(args) == 0
    assert "reward nan" in capsys.readouterr().out  # best-of-n samples no batch
    assert {p.name for p in out.iterdir()} >= {"metrics.parquet", "policy.parquet", "reward_model.parquet"}
