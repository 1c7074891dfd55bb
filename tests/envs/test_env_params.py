"""Params handling shared by every environment: from_dict, YAML lists, make_params and the registry."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

import envs
from envs import ENV_PARAMS, make_params
from envs.tabular import TabularMDP


def test_registry_names() -> None:
    assert set(ENV_PARAMS) == {"bandit", "gaussian_bandit", "gridworld", "token_tree", "diffusion_chain"}


@pytest.mark.parametrize("env_id", sorted(ENV_PARAMS))
def test_defaults_build_and_round_trip(env_id: str) -> None:
    params = make_params(env_id)
    assert dataclasses.is_dataclass(params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(params, type(params).keys()[0], None)
    assert type(params).from_dict(params.to_dict()) == params
    hash(params)
    if env_id not in ("gaussian_bandit", "diffusion_chain"):  # continuous envs have their own cores
        mdp = params.build()
        assert isinstance(mdp, TabularMDP)
        mdp.validate()
        for name in ("next_prob", "reward", "init_prob", "ref_logp"):
            assert getattr(mdp, name).dtype == torch.float64
        assert mdp.features.dtype == torch.float32 and mdp.next_state.dtype == torch.int64
        assert mdp.features.shape[0] == mdp.n_states and mdp.state_time.shape == (mdp.n_states,)


@pytest.mark.parametrize("env_id", sorted(ENV_PARAMS))
def test_unknown_key_is_named_with_the_valid_keys(env_id: str) -> None:
    cls = ENV_PARAMS[env_id]
    with pytest.raises(ValueError) as err:
        make_params(env_id, not_a_key=1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"unknown key env.not_a_key for {cls.__name__}; valid keys: ")
    assert all(key in message for key in cls.keys())


def test_unknown_env_id() -> None:
    expected = (r"env\.id must be one of bandit, gaussian_bandit, diffusion_chain, gridworld, token_tree "
                r"\(got 'cartpole'\)")
    with pytest.raises(ValueError, match=expected):
        make_params("cartpole")


def test_yaml_lists_become_tuples() -> None:
    bandit = make_params("bandit", rewards=[1, 0.5], ref_probs=[0.25, 0.75])
    assert bandit.rewards == (1.0, 0.5) and bandit.ref_probs == (0.25, 0.75)
    gauss = make_params("gaussian_bandit", dim=2, ref_mean=[0, 1], modes=[[0, 0], [1, 1]])
    assert gauss.ref_mean == (0, 1) and gauss.modes == ((0, 0), (1, 1))
    tree = make_params("token_tree", vocab=2, length=2, ref_logits=[[0, 1], [1, 0], [0, 0]])
    assert tree.ref_logits == ((0.0, 1.0), (1.0, 0.0), (0.0, 0.0))
    hash(bandit), hash(gauss), hash(tree)


def test_probabilities_are_renormalized_within_tolerance() -> None:
    params = make_params("bandit", ref_probs=[0.3333333, 0.3333333, 0.3333334])
    assert sum(params.ref_probs) == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ValueError, match=r"env\.ref_probs must sum to 1"):
        make_params("bandit", ref_probs=[0.333, 0.333, 0.333])


def test_bad_types_are_named() -> None:
    with pytest.raises(ValueError, match=r"env\.horizon must be an integer \(got 2\.5\)"):
        make_params("gridworld", horizon=2.5)
    with pytest.raises(ValueError, match=r"env\.slip must be a finite number \(got 'high'\)"):
        make_params("gridworld", slip="high")
    with pytest.raises(ValueError, match=r"env\.n_arms must be an integer \(got True\)"):
        make_params("bandit", n_arms=True)


def test_package_exports() -> None:
    for name in envs.__all__:
        assert hasattr(envs, name), name


@pytest.mark.parametrize("env_id", sorted(ENV_PARAMS))
def test_params_pickle(env_id: str) -> None:
    params = make_params(env_id)
    assert pickle.loads(pickle.dumps(params)) == params
