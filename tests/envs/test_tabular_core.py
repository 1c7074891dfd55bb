"""The batched TabularCore and the generic tabular oracles on hand-made MDPs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from envs import make_params, tabular
from envs.tabular import (
    TabularCore,
    TabularMDP,
    entropy_per_state,
    expected_return,
    forward_kl_per_state,
    forward_kl_stationary_point,
    kl_per_state,
    policy_evaluation,
    soft_value_iteration,
    state_occupancy,
    total_variation,
)


def chain_mdp(probs: list[float]) -> TabularMDP:
    """Two states, two actions, horizon 2; outcome ``k`` pays ``k``.

    From state 0 either action has outcomes ``probs``: outcome 0 leads to state 1, the others to the sink.
    """
    K = len(probs)
    next_state = torch.full((2, 2, K), 2, dtype=torch.long)
    next_state[0, :, 0] = 1
    next_prob = torch.zeros(2, 2, K, dtype=torch.float64)
    next_prob[0, :] = torch.tensor(probs, dtype=torch.float64)
    next_prob[1, :, 0] = 1.0
    reward = torch.arange(K, dtype=torch.float64).expand(2, 2, K).clone()
    return TabularMDP(next_state=next_state, next_prob=next_prob, reward=reward,
                      init_prob=torch.tensor([1.0, 0.0], dtype=torch.float64),
                      ref_logp=torch.full((2, 2), -math.log(2), dtype=torch.float64), horizon=2,
                      features=torch.eye(2), state_time=torch.tensor([0, 1]))


def test_outcome_never_selects_a_zero_probability_outcome() -> None:
    # 0.7 + 0.2 + 0.1 sums to 0.9999999999999999 in float64: a u in [that, 1) must still pick outcome 2,
    # not the zero-probability outcome 3 after it
    probs = [0.7, 0.2, 0.1, 0.0]
    assert torch.tensor(probs, dtype=torch.float64).cumsum(0)[2].item() < 1.0
    core = TabularCore(chain_mdp(probs))
    u = torch.tensor([0.0, 0.69, 0.7, 0.95, 0.9999999999999999, 1.0 - 2**-53], dtype=torch.float64)
    zeros = torch.zeros(len(u), dtype=torch.long)
    assert core.outcome(zeros, zeros, u).tolist() == [0, 0, 1, 2, 2, 2]


def test_sampled_outcome_frequencies_match_probabilities() -> None:
    probs = [0.25, 0.0, 0.5, 0.25]
    core = TabularCore(chain_mdp(probs))
    g = torch.Generator().manual_seed(0)  # fixed seed: the check is deterministic
    n = 200_000
    state = torch.zeros(n, dtype=torch.long)
    _, reward, _ = core.sample_step(state, torch.ones(n, dtype=torch.long), g)
    freq = torch.bincount(reward.long(), minlength=4).double() / n
    se = (torch.tensor(probs) * (1 - torch.tensor(probs)) / n).sqrt()
    assert freq[1] == 0
    assert ((freq - torch.tensor(probs, dtype=torch.float64)).abs() <= 5 * se + 1e-12).all()


def test_step_any_batch_shape_and_noise() -> None:
    mdp = chain_mdp([0.5, 0.5])
    mdp = TabularMDP(**{**mdp.__dict__, "reward_noise": 2.0})
    core = TabularCore(mdp)
    state = torch.zeros(3, 5, dtype=torch.long)
    action = torch.ones(3, 5, dtype=torch.long)
    u = torch.full((3, 5), 0.75, dtype=torch.float64)
    z = torch.ones(3, 5, dtype=torch.float64)
    next_state, reward, done = core.step(state, action, u, z)
    assert next_state.shape == reward.shape == done.shape == (3, 5)
    assert (next_state == 2).all() and done.all()
    assert torch.allclose(reward, torch.full((3, 5), 1.0 + 2.0, dtype=torch.float64))
    assert core.needs_uniform and core.needs_normal


def test_validate_names_the_field() -> None:
    mdp = chain_mdp([0.5, 0.5])
    bad = TabularMDP(**{**mdp.__dict__, "next_prob": mdp.next_prob * 0.5})
    with pytest.raises(ValueError, match="next_prob"):
        bad.validate()


def test_small_oracles_by_hand() -> None:
    logp = torch.tensor([[0.25, 0.75], [0.5, 0.5]], dtype=torch.float64).log()
    ref = torch.full((2, 2), 0.5, dtype=torch.float64).log()
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert kl_per_state(logp, ref)[0].item() == pytest.approx(kl, abs=1e-14)
    fkl = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    assert forward_kl_per_state(logp, ref)[0].item() == pytest.approx(fkl, abs=1e-14)
    assert total_variation(logp, ref)[0].item() == pytest.approx(0.25)
    assert entropy_per_state(ref)[1].item() == pytest.approx(math.log(2))
    # zero-probability actions: 0·log 0 = 0
    det = torch.tensor([[0.0, 1.0]], dtype=torch.float64).log()
    assert kl_per_state(det, ref[:1]).item() == pytest.approx(math.log(2))
    assert forward_kl_per_state(det, ref[:1]).item() == math.inf


def test_policy_evaluation_chain() -> None:
    mdp = chain_mdp([0.5, 0.5])  # state 0: reward 0 (→ state 1) or 1 (→ sink); state 1: reward 0
    logp = torch.full((2, 2), -math.log(2), dtype=torch.float64)
    v, q = policy_evaluation(mdp, logp)
    assert v[0].item() == pytest.approx(0.5)
    assert expected_return(mdp, logp).item() == pytest.approx(0.5)
    assert state_occupancy(mdp, logp).tolist() == pytest.approx([1.0, 0.5])


@pytest.mark.parametrize("beta", [0.0, -1.0, math.inf, math.nan])
def test_oracles_reject_bad_beta(beta: float) -> None:
    mdp = chain_mdp([0.5, 0.5])
    with pytest.raises(ValueError, match="beta must be positive"):
        soft_value_iteration(mdp, beta)
    if not math.isnan(beta) and beta <= 0:
        with pytest.raises(ValueError, match="beta must be positive"):
            forward_kl_stationary_point(torch.zeros(2), torch.full((2,), 0.5), beta)


def test_soft_value_iteration_batched_beta_matches_scalar() -> None:
    mdp = chain_mdp([0.3, 0.7])
    betas = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    v, q, logp = soft_value_iteration(mdp, betas)
    assert v.shape == (3, 2) and logp.shape == (3, 2, 2)
    for i, b in enumerate(betas.tolist()):
        v1, _, logp1 = soft_value_iteration(mdp, b)
        assert torch.allclose(v[i], v1) and torch.allclose(logp[i], logp1)


LAYERED_MDPS = {
    "bandit": {"id": "bandit", "n_arms": 5},
    "gridworld_slip": {"id": "gridworld", "layout": "two_goals", "horizon": 12, "slip": 0.2,
                       "ref_temperature": 3.0},
    "token_tree": {"id": "token_tree", "vocab": 3, "length": 3},
}


@pytest.mark.parametrize("name", list(LAYERED_MDPS))
def test_layered_dynamic_programming_equals_full_sweeps(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Solving a layered MDP one time step at a time gives the same occupancy, values and soft optimum as
    ``horizon`` sweeps over every state (the general path, forced here by hiding the layers); batched
    policies and β included. Both are float64 sums of the same terms: agreement to 1e-12."""
    import envs

    spec = dict(LAYERED_MDPS[name])
    mdp = envs.ENV_PARAMS[spec.pop("id")].from_dict(spec).build()
    assert tabular.layers(mdp) is not None
    gen = torch.Generator().manual_seed(3)
    logp = torch.log_softmax(torch.randn((4, mdp.n_states, mdp.n_actions), generator=gen, dtype=torch.float64), -1)
    extra = torch.randn((4, mdp.n_states, mdp.n_actions), generator=gen, dtype=torch.float64)
    beta = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)

    def solve() -> list[Tensor]:
        per_run_ref = mdp.with_reference(logp[:3])  # one reference per β, as the trainer does
        return [tabular.state_occupancy(mdp, logp), *tabular.policy_evaluation(mdp, logp, extra_reward=extra),
                *tabular.soft_value_iteration(mdp, beta), *tabular.soft_value_iteration(per_run_ref, beta)]

    layered = solve()
    monkeypatch.setattr(tabular, "layers", lambda _mdp: None)
    swept = solve()
    for a, b in zip(layered, swept, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["gridworld_slip", "token_tree"])
def test_layers_as_slices_or_index_tensors_give_the_same_numbers(name: str) -> None:
    """States numbered time step by time step give layers as slices (views); the same MDP with its states
    shuffled gives index tensors (gathers). Occupancy, values, return and the soft optimum agree state for
    state to float64 rounding (1e-12: the flows into a state are summed in the order of the numbering)."""
    import envs

    spec = dict(LAYERED_MDPS[name])
    mdp = envs.ENV_PARAMS[spec.pop("id")].from_dict(spec).build()
    S = mdp.n_states
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(5))  # new state i is old state perm[i]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(S)
    new_index = torch.cat([inv, torch.tensor([S])])  # the sink stays last
    shuffled = replace(mdp, next_state=new_index[mdp.next_state[perm]], next_prob=mdp.next_prob[perm],
                       reward=mdp.reward[perm], init_prob=mdp.init_prob[perm], ref_logp=mdp.ref_logp[perm],
                       features=mdp.features[perm], state_time=mdp.state_time[perm])
    assert all(isinstance(idx, slice) for idx in tabular.layers(mdp))
    assert all(isinstance(idx, Tensor) for idx in tabular.layers(shuffled))
    gen = torch.Generator().manual_seed(6)
    logp = torch.log_softmax(torch.randn((3, S, mdp.n_actions), generator=gen, dtype=torch.float64), -1)
    ordered = [tabular.state_occupancy(mdp, logp), *tabular.policy_evaluation(mdp, logp),
               *tabular.soft_value_iteration(mdp, 0.5)]
    mixed = [tabular.state_occupancy(shuffled, logp[:, perm]), *tabular.policy_evaluation(shuffled, logp[:, perm]),
             *tabular.soft_value_iteration(shuffled, 0.5)]
    for a, b in zip(ordered, mixed, strict=True):
        a = a[..., perm, :] if a.shape[-1] == mdp.n_actions and a.shape[-2] == S else a[..., perm]
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(tabular.expected_return(mdp, logp), tabular.expected_return(shuffled, logp[:, perm]),
                               rtol=1e-12, atol=1e-15)


def test_layers_reject_transitions_that_skip_time() -> None:
    """An MDP whose possible transitions do not go from t to t + 1 is not layered (DP falls back to sweeps)."""
    mdp = chain_mdp([0.5, 0.5])
    assert tabular.layers(mdp) is not None
    loop = replace(mdp, state_time=torch.zeros_like(mdp.state_time))
    assert tabular.layers(loop) is None



def test_tabular_step_2d_batch_matches_flat_batch():
    """Guards the flat ``take`` / ``index_select`` lookups on a [B1, B2] batch (contiguous and transposed):
    element by element the same as the flattened [B1·B2] batch, and as a per-element lookup in the MDP's
    tables (outcome = first k with u < cumulative probability) on a slippery gridworld."""
    mdp = make_params("gridworld", layout="open_5x5", horizon=8, slip=0.2).build()
    core = TabularCore(mdp)
    assert core.needs_uniform
    S, A = mdp.n_states, mdp.n_actions
    g = torch.Generator().manual_seed(14)
    b1, b2 = 6, 7
    state = torch.randint(0, S, (b1, b2), generator=g)
    action = torch.randint(0, A, (b1, b2), generator=g)
    u = torch.rand(b1, b2, generator=g, dtype=torch.float64)
    flat = core.step(state.reshape(-1), action.reshape(-1), u.reshape(-1))
    for s, a, uu in [(state, action, u), (state.t(), action.t(), u.t())]:
        got = core.step(s, a, uu)
        for x, y in zip(got, core.step(s.reshape(-1), a.reshape(-1), uu.reshape(-1)), strict=True):
            assert x.shape == s.shape
            assert torch.equal(x.reshape(-1), y)
    nxt, rew, done = core.step(state, action, u)
    n_slipped = 0
    for i in range(b1):
        for j in range(b2):
            s, a = int(state[i, j]), int(action[i, j])
            cdf = mdp.next_prob[s, a].cumsum(0)
            k = int((u[i, j] >= cdf).sum().clamp(max=cdf.numel() - 1))
            n_slipped += int(k != int(mdp.next_prob[s, a].argmax()))
            assert int(nxt[i, j]) == int(mdp.next_state[s, a, k]) == int(flat[0][i * b2 + j])
            assert float(rew[i, j]) == float(mdp.reward[s, a, k])
            assert bool(done[i, j]) == (int(mdp.next_state[s, a, k]) == S)
    assert n_slipped > 0  # the batch exercises more than one outcome
