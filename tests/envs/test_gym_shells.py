"""The gymnasium shells: API checkers, registration, and lockstep parity with the batched cores."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils import seeding
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs.bandit import BanditEnv
from envs.gaussian_bandit import GaussianBanditCore, GaussianBanditEnv
from envs.gym_shell import TabularEnv, torch_generator
from envs.tabular import TabularCore

REPO = Path(__file__).resolve().parents[2]

CONFIGS = [
    ("reflab/Bandit-v0", {}),
    ("reflab/Bandit-v0", {"n_arms": 5, "reward_noise": 0.5}),
    ("reflab/GaussianBandit-v0", {}),
    ("reflab/GaussianBandit-v0", {"dim": 2, "reward": "two_mode", "reward_noise": 0.3}),
    ("reflab/GridWorld-v0", {}),
    ("reflab/GridWorld-v0", {"layout": "cliff", "slip": 0.1, "obs": "onehot"}),
    ("reflab/GridWorld-v0", {"layout": "open_5x5", "obs": "coords", "horizon": 6}),
    ("reflab/TokenTree-v0", {}),
    ("reflab/TokenTree-v0", {"vocab": 2, "length": 4, "reward": "random"}),
]
IDS = [f"{gym_id.split('/')[1]}{kwargs}" for gym_id, kwargs in CONFIGS]


@pytest.mark.parametrize(("gym_id", "kwargs"), CONFIGS, ids=IDS)
def test_gymnasium_env_checker(gym_id: str, kwargs: dict[str, Any]) -> None:
    env = gymnasium.make(gym_id, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # gymnasium's advice on Box action ranges is the only warning we accept (Gaussian bandit)
        warnings.filterwarnings("ignore", message=".*symmetric and normalized space.*")
        gymnasium_check_env(env.unwrapped)  # with a spec: every declared render mode is checked too


@pytest.mark.parametrize(("gym_id", "kwargs"), CONFIGS, ids=IDS)
def test_stable_baselines3_env_checker(gym_id: str, kwargs: dict[str, Any]) -> None:
    sb3_check_env(gymnasium.make(gym_id, **kwargs).unwrapped, warn=True)  # SB3 may warn; errors fail


def test_every_id_makes_in_a_fresh_interpreter() -> None:
    code = (
        "import sys, gymnasium, envs\n"
        f"for gym_id in {list(envs.GYM_IDS)!r}:\n"
        "    env = gymnasium.make(gym_id)\n"
        "    env.reset(seed=0)\n"
        "    env.step(env.action_space.sample())\n"
        "assert 'sim' not in sys.modules and 'analysis' not in sys.modules, 'envs imported sim or analysis'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_registration_is_idempotent() -> None:
    envs.register_gym_envs()
    envs.register_gym_envs()
    assert all(gym_id in gymnasium.registry for gym_id in envs.GYM_IDS)


def test_gymnasium_kwargs_go_through_from_dict() -> None:
    env = gymnasium.make("reflab/GridWorld-v0", layout="cliff", slip=0.1)
    assert env.unwrapped.params.layout == "cliff" and env.unwrapped.params.slip == 0.1
    with pytest.raises(ValueError, match=r"unknown key env\.slipp for GridWorldParams; valid keys: layout, "):
        gymnasium.make("reflab/GridWorld-v0", slipp=0.1)
    with pytest.raises(ValueError, match=r"env\.ref_probs must sum to 1 \(got 0\.9\)"):
        gymnasium.make("reflab/Bandit-v0", ref_probs=[0.5, 0.3, 0.1])


@pytest.mark.parametrize(("gym_id", "kwargs"), [c for c in CONFIGS if "Gaussian" not in c[0]],
                         ids=[i for i in IDS if "Gaussian" not in i])
def test_tabular_shell_and_core_in_lockstep(gym_id: str, kwargs: dict[str, Any]) -> None:
    """Same seed and actions: shell and batch-1 core draw the same transitions, episode after episode."""
    env = gymnasium.make(gym_id, **kwargs).unwrapped
    assert isinstance(env, TabularEnv)
    seed = 123
    obs, info = env.reset(seed=seed)
    g = torch_generator(seeding.np_random(seed)[0])  # the shell's own recipe: np_random(seed) → torch seed
    core = TabularCore(env.params.build())
    state = core.sample_reset(1, g)
    assert info["state"] == state.item()
    actions = np.random.default_rng(0)
    n_episodes = 0
    for _ in range(300):
        a = int(actions.integers(env.action_space.n))
        obs, reward, terminated, truncated, info = env.step(a)
        next_state, core_reward, done = core.sample_step(state, torch.tensor([a]), g)
        assert info["state"] == next_state.item()
        assert reward == core_reward.item()
        assert (terminated or truncated) == done.item()
        assert not (terminated and truncated)
        if done.item():
            n_episodes += 1
            obs, info = env.reset()  # no seed: the generator continues
            state = core.sample_reset(1, g)
            assert info["state"] == state.item()
        else:
            state = next_state
    assert n_episodes >= 3


@pytest.mark.parametrize("kwargs", [{}, {"dim": 2, "reward": "two_mode", "reward_noise": 0.3}])
def test_gaussian_shell_and_core_in_lockstep(kwargs: dict[str, Any]) -> None:
    env = GaussianBanditEnv(**kwargs)
    env.reset(seed=7)
    g = torch_generator(seeding.np_random(7)[0])
    core = GaussianBanditCore(env.params)
    actions = np.random.default_rng(0)
    for _ in range(50):
        x = actions.normal(size=env.params.dim)
        _, reward, terminated, truncated, _ = env.step(x)
        _, core_reward, done = core.sample_step(torch.from_numpy(x)[None], g)
        assert reward == core_reward.item() and terminated and done.item() and not truncated
        env.reset()


def test_gridworld_truncation_and_final_observation() -> None:
    env = gymnasium.make("reflab/GridWorld-v0", layout="open_5x5", horizon=3).unwrapped
    obs, _ = env.reset(seed=0)
    world = env.world
    assert obs == world.state_of(0, world.start_cell)
    for t in range(3):
        obs, reward, terminated, truncated, _ = env.step(0)  # up: bump into the border, stay
        assert reward == 0.0 and not terminated
        assert truncated == (t == 2)
    assert obs == world.state_of(2, world.start_cell)  # (min(t+1, H−1), cell entered)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)


def test_gridworld_onehot_observation_is_the_feature_row() -> None:
    env = gymnasium.make("reflab/GridWorld-v0", obs="onehot").unwrapped
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    assert np.array_equal(obs, env.mdp.features[info["state"]].numpy())


def test_invalid_action_and_render_mode() -> None:
    env = gymnasium.make("reflab/Bandit-v0").unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must lie in Discrete"):
        env.step(3)
    with pytest.raises(ValueError, match="render_mode must be one of"):
        BanditEnv(render_mode="rgb_array")


def test_same_seed_same_episode() -> None:
    env = gymnasium.make("reflab/GridWorld-v0", slip=0.3).unwrapped

    def episode(seed: int) -> list[int]:
        env.reset(seed=seed)
        states, done = [], False
        while not done:
            _, _, terminated, truncated, info = env.step(2)  # always down: slip decides the path
            states.append(info["state"])
            done = terminated or truncated
        return states

    assert episode(42) == episode(42)
    assert len({tuple(episode(seed)) for seed in range(10)}) > 1
