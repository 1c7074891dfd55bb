"""The gridworld: layouts, dynamics, and the sequence oracles checked against brute-force enumeration of every
trajectory of a tiny grid (and against Monte-Carlo rollouts of the batched core)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from envs.gridworld import GridWorldEnv, GridWorldParams, builtin_layouts
from envs.tabular import (
    TabularCore,
    TabularMDP,
    expected_return,
    sequence_kl,
    soft_value_iteration,
    state_occupancy,
)

TINY = """
S.0
.L.
..1
"""


def tiny(slip: float) -> GridWorldParams:
    return GridWorldParams(layout=TINY, horizon=4, slip=slip, step_reward=-0.05, lava_reward=-1.0,
                           goal_rewards=(0.3, 1.0), ref_goal=0, ref_temperature=1.5)


class Paths:
    """Every (s, a, k) path of a tiny MDP from its start to the sink, as padded tensors.

    states/actions ``[N, H]`` (padded with 0), mask ``[N, H]``, log_dyn ``[N]`` (log of the initial-state and
    transition probabilities), reward ``[N]`` (the path's total reward).
    """

    def __init__(self, mdp: TabularMDP):
        S, A, K = mdp.next_state.shape
        done: list[tuple[list[int], list[int], float, float]] = []
        stack = [([s], [], math.log(p), 0.0) for s, p in enumerate(mdp.init_prob.tolist()) if p > 0]
        while stack:
            states, actions, log_dyn, total = stack.pop()
            s = states[-1]
            for a in range(A):
                for k in range(K):
                    p = mdp.next_prob[s, a, k].item()
                    if p == 0:
                        continue
                    nxt, r = int(mdp.next_state[s, a, k]), mdp.reward[s, a, k].item()
                    item = (states, actions + [a], log_dyn + math.log(p), total + r)
                    if nxt == S:
                        done.append(item)
                    else:
                        stack.append((states + [nxt], *item[1:]))
        H = mdp.horizon
        n = len(done)
        self.states = torch.zeros(n, H, dtype=torch.long)
        self.actions = torch.zeros(n, H, dtype=torch.long)
        self.mask = torch.zeros(n, H, dtype=torch.float64)
        for i, (states, actions, _, _) in enumerate(done):
            self.states[i, :len(states)] = torch.tensor(states)
            self.actions[i, :len(actions)] = torch.tensor(actions)
            self.mask[i, :len(actions)] = 1.0
        self.log_dyn = torch.tensor([d[2] for d in done], dtype=torch.float64)
        self.reward = torch.tensor([d[3] for d in done], dtype=torch.float64)

    def policy_logp(self, logp: Tensor) -> Tensor:
        """``[N]`` Σ_t log π(a_t|s_t) along each path."""
        return (logp[self.states, self.actions] * self.mask).sum(-1)

    def objective(self, logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
        """E_π[R(τ)] − β·KL(π(τ)‖π_ref(τ)) summed over every path."""
        lp, lref = self.policy_logp(logp), self.policy_logp(ref_logp)
        prob = (self.log_dyn + lp).exp()
        return (prob * (self.reward - beta * (lp - lref))).sum()



@pytest.fixture(scope="module")
def tiny_deterministic() -> tuple[TabularMDP, Paths]:
    mdp = tiny(0.0).build()
    return mdp, Paths(mdp)


@pytest.fixture(scope="module")
def tiny_slip() -> tuple[TabularMDP, Paths]:
    mdp = tiny(0.2).build()
    return mdp, Paths(mdp)


def test_enumeration_is_a_distribution(tiny_slip: tuple[TabularMDP, Paths]) -> None:
    mdp, paths = tiny_slip
    prob = (paths.log_dyn + paths.policy_logp(mdp.ref_logp)).exp()
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert len(paths.reward) > 1000  # slip makes the tree bushy


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_soft_vi_without_slip_is_the_trajectory_gibbs_distribution(
        tiny_deterministic: tuple[TabularMDP, Paths], beta: float) -> None:
    mdp, paths = tiny_deterministic
    v, _, logp = soft_value_iteration(mdp, beta)
    ref_traj = paths.policy_logp(mdp.ref_logp)
    # V0 = β log E_{τ~π_ref} e^{R(τ)/β}
    brute_v0 = beta * torch.logsumexp(ref_traj + paths.reward / beta, 0)
    start = int(mdp.init_prob.argmax())
    assert v[start].item() == pytest.approx(brute_v0.item(), abs=1e-12)
    # π*(τ) ∝ π_ref(τ) e^{R(τ)/β}
    gibbs = torch.softmax(ref_traj + paths.reward / beta, 0)
    assert torch.allclose(paths.policy_logp(logp).exp(), gibbs, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_soft_vi_with_slip_maximizes_the_regularized_objective(
        tiny_slip: tuple[TabularMDP, Paths], beta: float) -> None:
    mdp, paths = tiny_slip
    v, _, logp_opt = soft_value_iteration(mdp, beta)
    start = int(mdp.init_prob.argmax())
    # its objective, computed by enumerating every trajectory, is V0
    assert paths.objective(logp_opt, mdp.ref_logp, beta).item() == pytest.approx(v[start].item(), abs=1e-12)
    # it is a stationary point of the enumerated objective in the policy logits ...
    logits = logp_opt.clone().requires_grad_(True)
    objective = paths.objective(torch.log_softmax(logits, -1), mdp.ref_logp, beta)
    (grad,) = torch.autograd.grad(objective, logits)
    assert grad.abs().max().item() < 1e-10
    # ... and no perturbed policy does better
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 0.3, 3.0):
        noise = torch.randn(logp_opt.shape, generator=g, dtype=torch.float64)
        other = torch.log_softmax(logp_opt + scale * noise, -1)
        assert paths.objective(other, mdp.ref_logp, beta).item() < v[start].item()
    # with stochastic transitions the policy cannot reach the trajectory-level Gibbs value
    # β log E_ref e^{R/β}, which would need control of the dynamics (Jensen)
    ref_traj = paths.log_dyn + paths.policy_logp(mdp.ref_logp)
    risk_seeking = beta * torch.logsumexp(ref_traj + paths.reward / beta, 0)
    assert v[start].item() < risk_seeking.item() - 1e-6


def test_sequence_kl_return_and_occupancy_match_enumeration(tiny_slip: tuple[TabularMDP, Paths]) -> None:
    mdp, paths = tiny_slip
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(mdp.n_states, mdp.n_actions, generator=g, dtype=torch.float64), -1)
    lp, lref = paths.policy_logp(logp), paths.policy_logp(mdp.ref_logp)
    prob = (paths.log_dyn + lp).exp()
    assert sequence_kl(mdp, logp).item() == pytest.approx((prob * (lp - lref)).sum().item(), abs=1e-12)
    assert expected_return(mdp, logp).item() == pytest.approx((prob * paths.reward).sum().item(), abs=1e-12)
    visits = torch.zeros(mdp.n_states, dtype=torch.float64)
    visits.index_add_(0, paths.states[paths.mask > 0], prob[:, None].expand_as(paths.mask)[paths.mask > 0])
    assert torch.allclose(state_occupancy(mdp, logp), visits, atol=1e-12)


def test_state_occupancy_matches_monte_carlo_rollouts() -> None:
    params = GridWorldParams(slip=0.2, ref_temperature=2.0, horizon=12)
    mdp = params.build()
    core = TabularCore(mdp)
    g = torch.Generator().manual_seed(0)  # fixed seed: the comparison below is deterministic
    n = 20_000
    probs = mdp.ref_logp.exp()
    counts = torch.zeros(mdp.n_states + 1, dtype=torch.float64)
    state = core.sample_reset(n, g)
    alive = torch.ones(n, dtype=torch.bool)
    for _ in range(mdp.horizon):
        counts += torch.bincount(torch.where(alive, state, mdp.n_states), minlength=mdp.n_states + 1)
        action = torch.multinomial(probs[state.clamp(max=mdp.n_states - 1)], 1, generator=g).squeeze(-1)
        next_state, _, done = core.sample_step(state.clamp(max=mdp.n_states - 1), action, g)
        alive &= ~done
        state = torch.where(alive, next_state, mdp.n_states)
    mc = counts[:-1] / n
    exact = state_occupancy(mdp, mdp.ref_logp)
    # layered states are visited at most once per episode: binomial standard error per state
    se = (exact * (1 - exact) / n).sqrt()
    assert ((mc - exact).abs() <= 5 * se + 1e-9).all()
    assert exact.sum().item() == pytest.approx(mc.sum().item(), rel=0.02)


def test_builtin_layouts_build() -> None:
    assert {"two_goals", "open_5x5", "cliff"} <= set(builtin_layouts())
    for name in builtin_layouts():
        for slip in (0.0, 0.1):
            world = GridWorldParams(layout=name, slip=slip, horizon=8).world()
            assert world.mdp.n_states == 8 * world.n_cells
            assert world.mdp.n_outcomes == (4 if slip else 1)


def test_two_goals_geometry_and_reference() -> None:
    world = GridWorldParams().world()
    assert world.shape == (7, 7) and world.n_cells == 25
    assert world.cell_rc_of(world.start_cell) == (1, 1) and world.cell_xy(world.start_cell) == (1, 1)
    assert world.goal_rewards == (0.5, 1.0)
    assert [world.cell_rc_of(c[0]) for c in world.goal_cells] == [(1, 3), (5, 5)]
    # the reference heads for the near goal 0 (it pays 0.5 and nearly always ends there) ...
    mdp = world.mdp
    assert expected_return(mdp, mdp.ref_logp).item() == pytest.approx(0.5, abs=1e-3)
    assert int(mdp.ref_logp[world.start_cell].argmax()) == 1  # right, along the shortest path
    # ... and weak regularization switches to the far goal 1 that pays 1.0
    _, _, logp = soft_value_iteration(mdp, 0.01)
    assert expected_return(mdp, logp).item() > 0.99
    picture = world.to_grid(world.ref_distance)
    assert picture.shape == (7, 7) and torch.isnan(picture[0, 0]) and picture[1, 3] == 0


def test_the_finite_horizon_optimum_depends_on_time() -> None:
    world = GridWorldParams(ref_temperature=3.0).world()
    _, _, logp = soft_value_iteration(world.mdp, 0.1)
    cell = world.start_cell
    early, late = logp[world.state_of(0, cell)].exp(), logp[world.state_of(world.horizon - 3, cell)].exp()
    assert (early - late).abs().max().item() > 0.05


def test_dynamics_walls_goals_lava_truncation() -> None:
    layout = "#####\n#S.0#\n#.L.#\n#####"
    world = GridWorldParams(layout=layout, horizon=3, step_reward=-0.1, lava_reward=-2.0,
                            goal_rewards=(0.7,)).world()
    mdp, n = world.mdp, world.n_cells
    start = world.start_cell
    up, right, down, left = range(4)
    assert mdp.next_state[start, up, 0].item() == n + start  # wall: stay, time advances
    assert mdp.next_state[start, left, 0].item() == n + start
    right_cell = world.cell_index[1, 2].item()
    assert mdp.next_state[start, right, 0].item() == n + right_cell
    assert mdp.reward[start, right, 0].item() == pytest.approx(-0.1)
    # from (1,2): right enters the goal, down enters lava; both end the episode
    s = world.state_of(1, right_cell)
    assert mdp.next_state[s, right, 0].item() == mdp.n_states
    assert mdp.reward[s, right, 0].item() == pytest.approx(-0.1 + 0.7)
    assert mdp.next_state[s, down, 0].item() == mdp.n_states
    assert mdp.reward[s, down, 0].item() == pytest.approx(-0.1 - 2.0)
    assert bool(world.outcome_ends[s, right, 0]) and bool(world.outcome_ends[s, down, 0])
    # the step at t = H − 1 goes to the sink (truncation) and still pays
    last = world.state_of(2, start)
    assert mdp.next_state[last, down, 0].item() == mdp.n_states
    assert mdp.reward[last, down, 0].item() == pytest.approx(-0.1)
    assert not bool(world.outcome_ends[last, down, 0])
    assert world.time_of_state(last) == 2 and world.cell_of_state(last) == start


def test_slip_outcome_probabilities() -> None:
    mdp = GridWorldParams(slip=0.2).build()
    probs = mdp.next_prob[0]  # [A, K]: outcome k is direction k
    expected = torch.full((4, 4), 0.05, dtype=torch.float64) + 0.8 * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(probs, expected)


@pytest.mark.parametrize(("obs", "width"), [("index", 26), ("onehot", 26), ("coords", 3)])
def test_features(obs: str, width: int) -> None:
    mdp = GridWorldParams(obs=obs).build()
    assert mdp.features.shape == (mdp.n_states, width) and mdp.features.dtype == torch.float32
    assert mdp.features.min() >= 0 and mdp.features.max() <= 1
    assert torch.unique(mdp.features, dim=0).shape[0] == mdp.n_states  # every state is distinguishable


def test_layout_from_file(tmp_path: Path) -> None:
    path = tmp_path / "corridor.txt"
    path.write_text("; corridor\n; goal_rewards: 2.0\nS..G\n")
    world = GridWorldParams(layout=str(path), horizon=5).world()
    assert world.layout.name == "corridor" and world.goal_rewards == (2.0,)
    _, _, logp = soft_value_iteration(world.mdp, 0.05)
    assert expected_return(world.mdp, logp).item() == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("S.G\n..", r"env\.layout: ragged rows"),
        ("...\n..G", r"env\.layout: .*exactly one start 'S' \(found 0\)"),
        ("S.S\n..G", r"env\.layout: .*exactly one start 'S' \(found 2\)"),
        ("S..\n...", r"env\.layout: .*has no goal"),
        ("S.x\n..G", r"env\.layout: unknown character 'x'"),
        ("no_such_layout", r"env\.layout: unknown layout 'no_such_layout'; built-in layouts: .*two_goals"),
        ("; goal_rewards: 1 2\nS.G\n...", r"env\.layout: .*goal_rewards header has 2 values for 1 goals"),
    ],
)
def test_malformed_layouts_raise_one_clear_error(layout: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        GridWorldParams(layout=layout)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slip": 1.5}, r"env\.slip must be <= 1"),
        ({"horizon": 0}, r"env\.horizon must be >= 1"),
        ({"goal_rewards": (1.0,)}, r"env\.goal_rewards must have 2 entries"),
        ({"ref_goal": 2}, r"env\.ref_goal must be < 2"),
        ({"obs": "pixels"}, r"env\.obs must be one of 'index', 'onehot', 'coords'"),
        ({"ref_temperature": -1}, r"env\.ref_temperature must be > 0"),
    ],
)
def test_bad_params_raise_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GridWorldParams(**kwargs)


def test_render_modes() -> None:
    env = GridWorldEnv(render_mode="rgb_array", layout="cliff")
    env.reset(seed=0)
    img = env.render()
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape == (4 * 24, 7 * 24, 3)
    env = GridWorldEnv(render_mode="ansi")
    env.reset(seed=0)
    text = env.render()
    assert "@" in text and "t=0/30" in text
    for action in (1, 1):  # right, right: into goal 0
        _, reward, terminated, truncated, _ = env.step(action)
    assert terminated and not truncated and reward == pytest.approx(0.5)
    assert env.render().splitlines()[1] == "#S.@..#"


def test_sequence_oracles_accept_a_batch_of_policies() -> None:
    mdp = GridWorldParams(slip=0.1, horizon=6).build()
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 2, mdp.n_states, 4, generator=g, dtype=torch.float64), -1)
    occ, kl, ret = state_occupancy(mdp, logp), sequence_kl(mdp, logp), expected_return(mdp, logp)
    assert occ.shape == (3, 2, mdp.n_states) and kl.shape == ret.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert torch.allclose(occ[i, j], state_occupancy(mdp, logp[i, j]))
            assert torch.allclose(kl[i, j], sequence_kl(mdp, logp[i, j]))
            assert torch.allclose(ret[i, j], expected_return(mdp, logp[i, j]))
