"""The token tree: indexing, rewards, and soft value iteration against the whole-sequence closed form."""

from __future__ import annotations

import itertools

import pytest
import torch

from envs.tabular import TabularCore, expected_return, sequence_kl, soft_value_iteration
from envs.token_tree import (
    TokenTreeParams,
    gibbs_sequence_optimum,
    n_prefixes_of,
    prefix_of_state,
    sequence_logprobs,
    sequence_probs,
    state_of_prefix,
)


def test_prefix_indexing_round_trip_and_transitions() -> None:
    params = TokenTreeParams(vocab=3, length=3)
    mdp = params.build()
    assert mdp.n_states == n_prefixes_of(3, 3) == 13 and mdp.horizon == 3
    for s in range(mdp.n_states):
        prefix = prefix_of_state(s, 3)
        assert state_of_prefix(prefix, 3) == s
        assert mdp.state_time[s].item() == len(prefix)
        for y in range(3):
            nxt = mdp.next_state[s, y, 0].item()
            if len(prefix) < 2:
                assert nxt == state_of_prefix(prefix + (y,), 3)
                assert mdp.reward[s, y, 0].item() == 0.0
            else:
                assert nxt == mdp.n_states
    assert [prefix_of_state(s, 3) for s in range(5)] == [(), (0,), (1,), (2,), (0, 0)]


def test_target_reward_pays_one_sequence() -> None:
    params = TokenTreeParams(vocab=2, length=3, target=[1, 0, 1])
    rewards = params.sequence_rewards()
    assert rewards.sum().item() == 1.0 and rewards[0b101].item() == 1.0
    # the MDP pays it on the last token only
    mdp = params.build()
    last = state_of_prefix((1, 0), 2)
    assert mdp.reward[last, 1, 0].item() == 1.0 and mdp.reward[last, 0, 0].item() == 0.0
    default = TokenTreeParams().sequence_rewards()
    assert default[0].item() == 1.0 and default.sum().item() == 1.0


def test_sequence_probs_enumerate_the_product_of_conditionals() -> None:
    params = TokenTreeParams(vocab=3, length=3, ref_logits_seed=5)
    mdp, ref = params.build(), params.ref_logp()
    probs = sequence_probs(mdp, ref)
    assert probs.shape == (27,) and probs.sum().item() == pytest.approx(1.0, abs=1e-14)
    for code, y in enumerate(itertools.product(range(3), repeat=3)):
        direct = sum(ref[state_of_prefix(y[:t], 3), y[t]].item() for t in range(3))
        assert sequence_logprobs(mdp, ref)[code].item() == pytest.approx(direct, abs=1e-14)


@pytest.mark.parametrize("reward", ["target", "random"])
def test_soft_vi_conditionals_match_whole_sequence_gibbs(reward: str) -> None:
    params = TokenTreeParams(vocab=3, length=4, reward=reward, target=(2, 0, 1, 1), reward_seed=7,
                             ref_logits_seed=3, ref_temperature=0.7)
    mdp = params.build()
    betas = torch.tensor([0.05, 0.3, 1.0, 4.0], dtype=torch.float64)
    v, _, logp = soft_value_iteration(mdp, betas)
    closed = gibbs_sequence_optimum(params, betas)
    assert closed.shape == (4, 81)
    assert torch.allclose(sequence_probs(mdp, logp), closed, atol=1e-12)
    # V0 = β log Σ_y π_ref(y) e^{r(y)/β} and equals E[r] − β·KL of the optimum
    ref_seq = sequence_logprobs(mdp, mdp.ref_logp)
    v0 = betas * torch.logsumexp(ref_seq + params.sequence_rewards() / betas[:, None], -1)
    assert torch.allclose(v[:, 0], v0, atol=1e-12)
    assert torch.allclose(expected_return(mdp, logp) - betas * sequence_kl(mdp, logp), v0, atol=1e-10)


def test_table_reward_and_explicit_reference() -> None:
    table = [float(i) / 4 for i in range(4)]
    params = TokenTreeParams(vocab=2, length=2, reward="table", reward_table=table,
                             ref_logits=[[0.0, 0.0], [1.0, -1.0], [0.0, 2.0]], ref_temperature=2.0)
    assert params.sequence_rewards().tolist() == table
    ref = params.ref_logp().exp()
    assert ref[1, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert isinstance(params.ref_logits, tuple) and isinstance(params.ref_logits[0], tuple)


def test_core_rollout_reaches_the_sink_after_length_steps() -> None:
    params = TokenTreeParams(vocab=4, length=5)
    core = TabularCore(params.build())
    g = torch.Generator().manual_seed(0)
    state = core.sample_reset(100, g)
    for t in range(5):
        action = torch.randint(0, 4, (100,), generator=g)
        state, reward, done = core.sample_step(state, action, g)
        assert bool(done.all()) == (t == 4)


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_gibbs_sequence_optimum_rejects_bad_beta(beta: float) -> None:
    with pytest.raises(ValueError, match="beta must be positive"):
        gibbs_sequence_optimum(TokenTreeParams(), beta)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vocab": 1}, r"env\.vocab must be >= 2"),
        ({"reward": "table"}, r"env\.reward_table \(27 values\) is required"),
        ({"reward": "table", "reward_table": [0.0] * 26}, r"env\.reward_table must have 27 entries"),
        ({"target": [0, 3, 0]}, r"env\.target tokens must lie in \[0, 3\)"),
        ({"target": [0, 1]}, r"env\.target must have 3 entries"),
        ({"ref_logits": [[0.0, 0.0, 0.0]]}, r"env\.ref_logits must be 13 rows"),
        ({"vocab": 10, "length": 5}, r"env\.vocab=10 and env\.length=5 give 11111 prefix states"),
        ({"reward": "bleu"}, r"env\.reward must be one of 'target', 'prefix', 'table', 'random'"),
    ],
)
def test_bad_params_raise_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        TokenTreeParams(**kwargs)
    assert "\n" not in str(err.value)
