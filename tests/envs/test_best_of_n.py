"""Exact best-of-n on episode trees (envs/best_of_n.py): the law against brute-force enumeration of the n draws
(ties included), the KL against log n − (n−1)/n (Beirami et al. 2024), the tree ↔ policy maps, large n, and
batch invariance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import envs
from envs import tabular
from envs.best_of_n import best_of_n, episode_tree, kl_upper_bound


def brute_force(p: list[float], scores: list[float], n: int) -> list[float]:
    """The law of the kept outcome by enumerating every sequence of n draws; the first drawn among the best
    is kept."""
    law = [0.0] * len(p)
    for seq in itertools.product(range(len(p)), repeat=n):
        best = max(scores[i] for i in seq)
        kept = next(i for i in seq if scores[i] == best)
        law[kept] += math.prod(p[i] for i in seq)
    return law


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_law_equals_brute_force_enumeration_with_ties(n: int):
    p = [0.1, 0.25, 0.05, 0.3, 0.2, 0.1]
    scores = [0.5, 1.0, 1.0, -2.0, 0.5, 1.0]  # two tied levels: {0, 4} and {1, 2, 5}
    prob, kl = best_of_n(torch.tensor(p, dtype=torch.float64), torch.tensor(scores, dtype=torch.float64), n)
    want = brute_force(p, scores, n)
    assert torch.allclose(prob, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-14)
    direct = sum(q * math.log(q / r) for q, r in zip(want, p, strict=True) if q > 0)
    assert abs(float(kl) - direct) < 1e-13


def test_kl_never_exceeds_the_continuous_value():
    """log n − (n−1)/n bounds the exact KL for any discrete reference and scores (ties or not)."""
    g = torch.Generator().manual_seed(0)
    worst = -1.0
    for trial in range(200):
        O = int(torch.randint(2, 60, (1,), generator=g))
        p = torch.rand(O, generator=g, dtype=torch.float64) ** 3
        p = p / p.sum()
        scores = torch.randint(0, max(2, O // (1 + trial % 4)), (O,), generator=g).to(torch.float64)  # ties
        for n in (1, 2, 3, 7, 20, 100, 1000, 10**6):
            _, kl = best_of_n(p, scores, n)
            worst = max(worst, float(kl - kl_upper_bound(n)))
    assert worst <= 1e-12


def test_kl_approaches_the_bound_when_no_outcome_has_much_mass():
    """Uniform reference over O distinct scores: the gap to log n − (n−1)/n is the Riemann error of a discretized
    density n·x^{n−1}, ≈ n²/(24·O²) (measured 1.07e-5 at n = 16, O = 1000); it shrinks as O grows."""
    n = 16
    gaps = []
    for O in (10, 100, 1000, 10000):
        p = torch.full((O,), 1.0 / O, dtype=torch.float64)
        _, kl = best_of_n(p, torch.arange(O, dtype=torch.float64), n)
        gaps.append(float(kl_upper_bound(n) - kl))
        if O >= 10 * n:
            assert 0 < gaps[-1] < n * n / (10 * O * O)
    assert gaps == sorted(gaps, reverse=True)
    # a random reference whose largest outcome mass falls: the gap falls with it
    g = torch.Generator().manual_seed(1)
    last = math.inf
    for O in (30, 300, 3000, 30000):
        p = torch.rand(O, generator=g, dtype=torch.float64) + 0.5
        p = p / p.sum()
        _, kl = best_of_n(p, torch.randn(O, generator=g, dtype=torch.float64), n)
        gap = float(kl_upper_bound(n) - kl)
        assert 0 < gap < last
        last = gap
    assert last < 1e-5


def test_large_n_concentrates_on_the_top_level_without_overflow():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    scores = torch.tensor([0.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    prob, kl = best_of_n(p, scores, 10**9)
    assert torch.allclose(prob, torch.tensor([0.0, 0.6, 0.4, 0.0], dtype=torch.float64), atol=1e-15)
    assert abs(float(kl) - math.log(1 / 0.5)) < 1e-12  # the top level has mass 0.5


def test_trees_and_their_policies():
    bandit = envs.make_params("bandit", rewards=[1.0, 0.0, 0.5], ref_probs=[0.2, 0.5, 0.3]).build()
    tree = envs.make_params("token_tree", vocab=3, length=3, reward="random").build()
    grid = envs.make_params("gridworld", layout="open_5x5", horizon=4).build()
    assert episode_tree(grid) is None  # paths merge
    assert episode_tree(bandit).n_outcomes == 3
    t = episode_tree(tree)
    assert t.n_outcomes == 27
    ref = tree.ref_logp
    prob = t.outcome_logp(tree, ref).exp()
    assert abs(float(prob.sum()) - 1) < 1e-12
    seq = envs.sequence_probs(tree, ref)  # the token tree's own enumeration, in sequence order
    assert torch.allclose(prob, seq, atol=1e-15)
    assert torch.allclose(t.returns(tree.expected_reward), envs.TokenTreeParams(reward="random").sequence_rewards())
    # a law over episodes → policy → the same law
    law = torch.rand(27, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    law = law / law.sum()
    policy = t.policy(law, ref)
    assert torch.allclose(t.outcome_logp(tree, policy).exp(), law, atol=1e-14)
    for n in (1, 4, 32):  # the policy's exact sequence KL and return are the law's
        bon, kl = best_of_n(prob, t.returns(tree.expected_reward), n)
        pol = t.policy(bon, ref)
        assert abs(float(tabular.sequence_kl(tree, pol)) - float(kl)) < 1e-12
        assert abs(float(tabular.expected_return(tree, pol)) - float((bon * t.returns(tree.expected_reward)).sum())) \
            < 1e-12


def test_a_run_is_the_same_alone_and_in_a_batch():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(50, generator=g, dtype=torch.float64)
    p = p / p.sum()
    scores = torch.randint(0, 12, (7, 50), generator=g).to(torch.float64)
    n = torch.tensor([1.0, 2.0, 5.0, 64.0, 1000.0, 3.0, 10.0**7])
    prob, kl = best_of_n(p, scores, n)
    for i in range(7):
        alone, kl_alone = best_of_n(p, scores[i:i + 1], n[i:i + 1])
        assert torch.equal(alone[0], prob[i]) and torch.equal(kl_alone[0], kl[i])
