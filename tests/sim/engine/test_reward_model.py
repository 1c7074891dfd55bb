"""Proxy reward models (sim/engine/reward_model.py): the fit is the Bradley–Terry MLE of its pairs (checked against
an independent dense Newton solve in numpy), converges to the gold reward up to its shift with many pairs (within
the asymptotic sd of the MLE), and gives each run the same proxy alone or in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import envs
from envs.best_of_n import episode_tree
from sim.config import ConfigError
from sim.engine import reward_model, rng
from sim.engine.preferences import sample_preferences, sampler_logp
from sim.lab.dispatch import resolve

BANDIT = ["env.id=bandit", "env.rewards=[1.0,0.0,0.5,-0.3]", "env.ref_probs=[0.2,0.3,0.3,0.2]"]
TREE = ["env.id=token_tree", "env.vocab=2", "env.length=3", "env.reward=random", "env.reward_seed=4"]


def _fit(overrides: list[str], seeds: list[int]) -> tuple[torch.Tensor, dict, dict, object]:
    cfg = resolve(None, ["reward.model=learned", *overrides])
    mdp = envs.from_config(cfg.env).build()
    keys = rng.run_keys(seeds)
    data = sample_preferences(envs.TabularCore(mdp), sampler_logp(cfg.reward.sampler, mdp), keys, cfg.reward.pairs,
                              cfg.reward.bt_temperature)
    design = reward_model.build_design(mdp, cfg)
    table, diag = reward_model.fit(design, data, cfg, keys)
    return table, diag, data, (cfg, mdp, design)


def _numpy_mle(x: np.ndarray, lam: float) -> np.ndarray:
    """argmin_θ mean softplus(−xθ) + λ/2‖θ‖² by Newton's method on the dense Hessian (independent of the engine)."""
    theta = np.zeros(x.shape[1])
    for _ in range(100):
        m = x @ theta
        s = 1 / (1 + np.exp(m))  # σ(−m)
        grad = -(x * s[:, None]).mean(0) + lam * theta
        if np.abs(grad).max() < 1e-15:
            break
        w = s * (1 - s)
        hess = (x * w[:, None]).T @ x / len(x) + lam * np.eye(x.shape[1])
        theta = theta - np.linalg.solve(hess, grad)
    return theta


def _episode_columns(data: dict, design) -> np.ndarray:
    """Each pair's column incidence (winner − loser), dense ``[N, C]``, from the raw steps."""
    sa = (data["state"] * design.n_actions + data["action"])[0].numpy()
    valid = data["valid"][0].numpy()
    col = design.col_of.numpy()
    x = np.zeros((sa.shape[0], design.n_columns))
    for side, sign in ((0, 1.0), (1, -1.0)):
        for t in range(sa.shape[-1]):
            c = col[sa[:, side, t]]
            keep = valid[:, side, t] & (c < design.n_columns)
            np.add.at(x, (np.nonzero(keep)[0], c[keep]), sign)
    return x


@pytest.mark.parametrize("case", ["bandit_tabular", "tree_tabular", "tree_linear"])
def test_the_fit_is_the_mle_of_its_pairs(case: str):
    """Newton–CG stops at a gradient max-norm of 1e-12 and the problem is λ-strongly convex (λ = 1e-3 here), so
    its parameters are within 1e-9 of the optimum; the dense numpy Newton reaches 1e-15."""
    if case == "bandit_tabular":
        table, diag, data, (cfg, mdp, design) = _fit(BANDIT + ["reward.pairs=300", "reward.bt_temperature=0.5"], [3])
        x = _episode_columns(data, design)
    elif case == "tree_tabular":
        table, diag, data, (cfg, mdp, design) = _fit(TREE + ["reward.pairs=400"], [5])
        x = _episode_columns(data, design)
    else:
        table, diag, data, (cfg, mdp, design) = _fit(
            TREE + ["env.vocab=3", "reward.pairs=400", "reward.family=linear", "reward.features=time_action"], [6])
        # per-sequence features: one-hot (position, token) summed over the sequence, built from the tokens
        acts = data["action"][0].numpy()
        V, T = 3, 3
        phi = np.zeros(acts.shape[:2] + (T * V,))
        for t in range(T):
            np.add.at(phi, (np.arange(acts.shape[0])[:, None], np.arange(2)[None, :], t * V + acts[:, :, t]), 1.0)
        x = phi[:, 0] - phi[:, 1]
    assert float(diag["grad_norm"][0]) <= 1e-12
    theta = _numpy_mle(x, cfg.reward.l2)
    if case == "tree_linear":
        seq_tokens = envs.token_tree.sequence_tokens(3, 3).numpy()
        feats = np.zeros((len(seq_tokens), 9))
        for t in range(3):
            feats[np.arange(len(seq_tokens)), t * 3 + seq_tokens[:, t]] = 1.0
        want = cfg.reward.bt_temperature * feats @ theta  # per sequence, in sequence order
        tree = episode_tree(mdp)
        got = table[0].reshape(-1)[tree.final_pairs].numpy()
    else:
        want = cfg.reward.bt_temperature * theta
        got = table[0].reshape(-1)[design.columns].numpy()
    assert np.abs(got - want).max() < 1e-9


def _fisher_sd(p: np.ndarray, r: np.ndarray, tau: float, n_pairs: int) -> np.ndarray:
    """Asymptotic sd of the centred BT MLE (times τ) for pairs (a, b) ~ p × p and labels σ((r_a − r_b)/τ): the
    pseudo-inverse of the Fisher information E[σ'·(e_a − e_b)(e_a − e_b)ᵀ] over N pairs, projected off the shift."""
    C = len(p)
    info = np.zeros((C, C))
    for a in range(C):
        for b in range(C):
            if a == b:
                continue
            s = 1 / (1 + np.exp(-(r[a] - r[b]) / tau))
            e = np.zeros(C)
            e[a], e[b] = 1, -1
            info += p[a] * p[b] * s * (1 - s) * np.outer(e, e)
    cov = np.linalg.pinv(info) / n_pairs
    center = np.eye(C) - 1 / C
    return tau * np.sqrt(np.diag(center @ cov @ center))


@pytest.mark.parametrize("case", ["bandit", "tree"])
def test_many_pairs_recover_the_gold_reward_up_to_a_shift(case: str):
    """With 200 000 pairs and λ = 1e-8 the proxy minus the gold is one constant (one start state: BT fixes
    rewards up to a shift) within 5 asymptotic sds of the MLE (Fisher information, computed here)."""
    n_pairs = 200_000
    extra = ["reward.pairs=200000", "reward.l2=1e-8"]
    table, _, _, (cfg, mdp, design) = _fit((BANDIT if case == "bandit" else TREE) + extra, [11])
    tree = episode_tree(mdp)
    gold = tree.returns(mdp.expected_reward).numpy()
    p = tree.outcome_logp(mdp, mdp.ref_logp).exp().numpy()
    got = table[0].reshape(-1)[tree.final_pairs].numpy()
    err = (got - gold) - (got - gold).mean()
    sd = _fisher_sd(p, gold, cfg.reward.bt_temperature, n_pairs)
    assert np.all(np.abs(err) <= 5 * sd), (err, sd)
    assert sd.max() < 0.1  # the check has teeth: the shift-free error is small


@pytest.mark.parametrize("overrides", [BANDIT + ["reward.pairs=64"],
                                       TREE + ["env.vocab=3", "reward.pairs=64"],
                                       TREE + ["reward.pairs=64", "reward.family=linear", "reward.features=random"],
                                       ["env.id=gridworld", "env.layout=open_5x5", "env.horizon=4", "env.slip=0.2",
                                        "reward.pairs=32"]])
def test_a_proxy_is_the_same_alone_and_in_a_batch(overrides: list[str]):
    seeds = [4, 9, 1, 7]
    table, diag, _, _ = _fit(overrides, seeds)
    for i, s in enumerate(seeds):
        alone, diag_alone, _, _ = _fit(overrides, [s])
        assert torch.equal(alone[0], table[i])
        assert all(torch.equal(diag_alone[k][0], diag[k][i]) for k in diag)


def test_an_mlp_proxy_fits_and_is_nearly_batch_invariant():
    """Batched matrix products may sum in another order for another batch size (as for MLP policies), so the
    MLP proxy is compared with rtol 1e-9 after its 200 Adam steps; it must beat a constant on its pairs."""
    over = TREE + ["env.vocab=3", "reward.pairs=200", "reward.family=mlp", "reward.features=time_action",
                   "reward.steps=200", "reward.hidden=8", "reward.lr=0.05"]
    table, diag, _, _ = _fit(over, [2, 3])
    alone, _, _, _ = _fit(over, [3])
    assert torch.allclose(alone[0], table[1], rtol=1e-9, atol=1e-12)
    assert float(diag["loss"].max()) < np.log(2) - 0.05


def test_design_per_episode_and_per_step():
    cfg = resolve(None, ["reward.model=learned", *TREE])
    mdp = envs.from_config(cfg.env).build()
    d = reward_model.build_design(mdp, cfg)
    assert d.per_episode and d.n_columns == 8  # one value per sequence, at its last (prefix, token)
    grid = resolve(None, ["reward.model=learned", "env.id=gridworld", "env.layout=open_5x5", "env.horizon=4"])
    g = reward_model.build_design(envs.from_config(grid.env).build(), grid)
    assert not g.per_episode and g.n_columns == g.n_states * g.n_actions


@pytest.mark.parametrize("overrides, message", [
    (["reward.pairs=0"], "reward.pairs must be > 0 with reward.model=learned"),
    (["reward.l2=0"], "reward.l2 must be > 0 with reward.family=tabular"),
    (["reward.family=linear", "reward.features=[[1,0],[0,1]]"], "reward.features has 2 rows"),
    (["reward.family=linear", "reward.features=nonsense"], "reward.features must be one of"),
    (["reward.sampler=[0.5,0.5]"], "reward.sampler as a list of probabilities needs a one-state env with 3"),
])
def test_bad_reward_keys_are_one_line_errors(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as e:
        resolve(None, ["reward.model=learned", "env.id=bandit", *overrides])
    assert "\n" not in str(e.value)


def test_a_sampler_that_misses_arms_warns_once_with_the_count(capsys):
    over = ["reward.model=learned", "env.id=bandit", "env.rewards=[1,0,0,0.5]", "reward.sampler=[0.5,0.5,0,0]"]
    resolve(None, over)
    resolve(None, over + ["seed=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never reaches 2 of the 4 (state, action) pairs" in err[0]
