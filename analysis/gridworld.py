"""Gridworld policies per cell: rebuild the layout from a run's config and fold (t, cell) states into cells.

The gridworld's policy states are layered, ``state = t·n_cells + cell``. To draw a policy on the grid, each
cell gets the occupancy-weighted average of its per-time policies, ``π̄(a|c) = Σ_t d(t, c)·π(a|t, c) / Σ_t
d(t, c)``, with ``d`` the exact state occupancy of the drawn policy (expected visits per episode). The layout
and dynamics come from ``envs`` (rebuilt from the config's ``env`` section); nothing here imports ``sim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

import envs
from envs.gridworld import GridWorld
from envs.tabular import state_occupancy


def world_from_config(config: dict) -> GridWorld:
    """The compiled :class:`envs.gridworld.GridWorld` of a run config (the nested ``"config"`` mapping)."""
    env = dict(config["env"])
    env_id = env.pop("id")
    if env_id != "gridworld":
        raise ValueError(f"not a gridworld run (env.id = {env_id!r})")
    return envs.ENV_PARAMS["gridworld"].from_dict(env).world()


@dataclass
class CellPolicy:
    """A policy folded onto the grid's cells.

    Attributes:
        occupancy: ``[n_cells]`` expected visits per episode to each cell (summed over time).
        probs: ``[n_cells, 4]`` occupancy-weighted action probabilities (up, right, down, left); the
            time-0 policy for cells never visited.
        state_occupancy: ``[S]`` expected visits of each layered state.
    """

    occupancy: np.ndarray
    probs: np.ndarray
    state_occupancy: np.ndarray


def policy_table(policy: pd.DataFrame, n_states: int, n_actions: int, column: str = "prob") -> np.ndarray:
    """``[S, A]`` probabilities from the rows of one run at one update (``state``, ``action``, ``column``)."""
    table = np.zeros((n_states, n_actions))
    table[policy["state"].to_numpy(), policy["action"].to_numpy()] = policy[column].to_numpy(float)
    return table


def fold_to_cells(world: GridWorld, probs: np.ndarray) -> CellPolicy:
    """Fold a layered policy ``probs [S, A]`` onto the cells, weighting each time step by its occupancy."""
    mdp = world.mdp
    with np.errstate(divide="ignore"):
        logp = torch.from_numpy(np.log(np.clip(probs, 0.0, 1.0)))
    occ = state_occupancy(mdp, logp).numpy()  # [S]
    n_cells, horizon = world.n_cells, world.horizon
    occ_tc = occ.reshape(horizon, n_cells)
    probs_tc = probs.reshape(horizon, n_cells, -1)
    cell_occ = occ_tc.sum(0)
    weighted = (occ_tc[..., None] * probs_tc).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cell_probs = np.where(cell_occ[:, None] > 0, weighted / cell_occ[:, None], probs_tc[0])
    return CellPolicy(cell_occ, cell_probs, occ)
